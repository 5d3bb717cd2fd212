//! Rate, errors and latency of HTTP requests by method, route template and status: the
//! `http_server_requests_total` counter and the `http_server_request_duration_seconds`
//! histogram on `/metrics`.
//!
//! Not OpenTelemetry instruments like the other metrics: recording a request there hashes
//! its attributes and takes locks that every worker thread shares, and on a cached read
//! that cost 15–20 % of the throughput (PROFILING.md). Here each thread counts into a shard
//! of its own (a lock nobody else takes, except a scrape), and a scrape sums the shards.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::Duration;

use axum::http::{Method, StatusCode};

use crate::metrics::LATENCY_BUCKETS;

/// One series: a counter and a histogram share it (the counter is the histogram's count).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Series {
    count: u64,
    sum_seconds: f64,
    /// Observations per bucket, not cumulative: `[i]` counts those in
    /// `(LATENCY_BUCKETS[i - 1], LATENCY_BUCKETS[i]]`.
    buckets: [u64; LATENCY_BUCKETS.len()],
}

impl Series {
    fn observe(&mut self, seconds: f64) {
        self.count += 1;
        self.sum_seconds += seconds;
        if let Some(i) = LATENCY_BUCKETS.iter().position(|le| seconds <= *le) {
            self.buckets[i] += 1;
        }
    }

    fn add(&mut self, other: &Series) {
        self.count += other.count;
        self.sum_seconds += other.sum_seconds;
        for (mine, theirs) in self.buckets.iter_mut().zip(other.buckets) {
            *mine += theirs;
        }
    }
}

/// Route template → (method, status) → series.
type Routes = HashMap<Box<str>, HashMap<(&'static str, u16), Series>>;
type Shard = Mutex<Routes>;

/// Every live thread's shard, and what threads that ended had counted (counters never go
/// down). A scrape and a thread's end take this lock first, then a shard's.
struct Registry {
    live: Vec<Arc<Shard>>,
    retired: Routes,
}

static REGISTRY: LazyLock<Mutex<Registry>> = LazyLock::new(|| {
    Mutex::new(Registry {
        live: Vec::new(),
        retired: Routes::new(),
    })
});

/// This thread's shard; folded into `retired` when the thread ends.
struct Local(Arc<Shard>);

impl Local {
    fn new() -> Local {
        let shard = Arc::new(Shard::default());
        lock(&REGISTRY).live.push(shard.clone());
        Local(shard)
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        let mut registry = lock(&REGISTRY);
        merge(&mut registry.retired, &lock(&self.0));
        registry.live.retain(|shard| !Arc::ptr_eq(shard, &self.0));
    }
}

thread_local! {
    static LOCAL: Local = Local::new();
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn merge(into: &mut Routes, from: &Routes) {
    for (route, by_status) in from {
        let target = into.entry(route.clone()).or_default();
        for (key, series) in by_status {
            target.entry(*key).or_default().add(series);
        }
    }
}

/// Counts and times one answered request. `route` is the route template (never the raw
/// path: ids would make the label unbounded); methods outside the standard set count as
/// `other` for the same reason.
pub fn record(method: &Method, route: &str, status: StatusCode, elapsed: Duration) {
    let key = (standard_method(method), status.as_u16());
    let seconds = elapsed.as_secs_f64();
    // `try_with`: a request finishing while its thread shuts down goes uncounted, no panic.
    let _ = LOCAL.try_with(|local| {
        let mut routes = lock(&local.0);
        if let Some(by_status) = routes.get_mut(route) {
            by_status.entry(key).or_default().observe(seconds);
            return;
        }
        routes
            .entry(route.into())
            .or_default()
            .entry(key)
            .or_default()
            .observe(seconds);
    });
}

fn standard_method(method: &Method) -> &'static str {
    match method.as_str() {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "PATCH" => "PATCH",
        "OPTIONS" => "OPTIONS",
        "CONNECT" => "CONNECT",
        "TRACE" => "TRACE",
        _ => "other",
    }
}

/// Every series of the process, summed over the threads, in label order.
fn snapshot() -> BTreeMap<(String, &'static str, u16), Series> {
    let registry = lock(&REGISTRY);
    let mut all = Routes::new();
    merge(&mut all, &registry.retired);
    for shard in &registry.live {
        merge(&mut all, &lock(shard));
    }
    drop(registry);
    all.into_iter()
        .flat_map(|(route, by_status)| {
            by_status
                .into_iter()
                .map(move |((method, status), series)| {
                    ((route.to_string(), method, status), series)
                })
        })
        .collect()
}

/// Appends both metrics in the Prometheus text format (nothing before the first request).
pub fn render(out: &mut String) {
    let series = snapshot();
    if series.is_empty() {
        return;
    }
    let labels = |(route, method, status): &(String, &str, u16)| {
        format!(
            "method=\"{method}\",route=\"{}\",status=\"{status}\"",
            escape(route)
        )
    };
    // Writing to a String cannot fail.
    let _ = writeln!(
        out,
        "# HELP http_server_requests_total HTTP requests answered, by route and status\n\
         # TYPE http_server_requests_total counter"
    );
    for (key, s) in &series {
        let _ = writeln!(
            out,
            "http_server_requests_total{{{}}} {}",
            labels(key),
            s.count
        );
    }
    let _ = writeln!(
        out,
        "# HELP http_server_request_duration_seconds Time to answer an HTTP request, by route and status\n\
         # TYPE http_server_request_duration_seconds histogram"
    );
    let name = "http_server_request_duration_seconds";
    for (key, s) in &series {
        let labels = labels(key);
        let mut cumulative = 0;
        for (le, count) in LATENCY_BUCKETS.iter().zip(s.buckets) {
            cumulative += count;
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", s.count);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", s.sum_seconds);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", s.count);
    }
}

/// A label value as the text format needs it.
fn escape(value: &str) -> String {
    value
        .replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', r"\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line_value(text: &str, prefix: &str) -> Option<f64> {
        text.lines()
            .find(|line| line.starts_with(prefix))
            .and_then(|line| line.rsplit(' ').next())
            .and_then(|value| value.parse().ok())
    }

    #[test]
    fn requests_from_several_threads_and_ended_threads_add_up() {
        let route = "/test/http-metrics/{id}";
        record(
            &Method::GET,
            route,
            StatusCode::OK,
            Duration::from_micros(300),
        );
        std::thread::scope(|scope| {
            for _ in 0..3 {
                scope.spawn(|| {
                    record(
                        &Method::GET,
                        route,
                        StatusCode::OK,
                        Duration::from_millis(3),
                    );
                    record(&Method::GET, route, StatusCode::OK, Duration::from_secs(9));
                });
            }
        });
        let ext = Method::from_bytes(b"FROBNICATE").expect("a valid token");
        record(&ext, route, StatusCode::NOT_FOUND, Duration::ZERO);

        let mut text = String::new();
        render(&mut text);
        let ok = format!("method=\"GET\",route=\"{route}\",status=\"200\"");
        assert_eq!(
            line_value(&text, &format!("http_server_requests_total{{{ok}}}")),
            Some(7.0),
            "{text}"
        );
        let bucket = |le: &str| {
            line_value(
                &text,
                &format!("http_server_request_duration_seconds_bucket{{{ok},le=\"{le}\"}}"),
            )
        };
        assert_eq!(bucket("0.0005"), Some(1.0), "{text}");
        assert_eq!(bucket("0.0025"), Some(1.0), "{text}");
        assert_eq!(bucket("0.005"), Some(4.0), "cumulative: {text}");
        assert_eq!(bucket("2.5"), Some(4.0), "{text}");
        assert_eq!(bucket("+Inf"), Some(7.0), "{text}");
        let sum = line_value(
            &text,
            &format!("http_server_request_duration_seconds_sum{{{ok}}}"),
        )
        .expect("a sum");
        assert!((sum - 27.0093).abs() < 1e-9, "{sum}");
        let other = format!("method=\"other\",route=\"{route}\",status=\"404\"");
        assert_eq!(
            line_value(&text, &format!("http_server_requests_total{{{other}}}")),
            Some(1.0),
            "{text}"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
