//! Metrics: OpenTelemetry instruments exported in the Prometheus text format on `/metrics`,
//! together with the HTTP request metrics of [`crate::http_metrics`].
//!
//! One registry per process (tests run several servers in one process and share it).

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use opentelemetry::metrics::{Histogram, Meter, MeterProvider};
use opentelemetry_sdk::metrics::SdkMeterProvider;
use prometheus::{Encoder, TextEncoder};

use crate::{health, problem};

/// Latency buckets in seconds: sub-millisecond to seconds.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5,
];

struct Telemetry {
    registry: prometheus::Registry,
    provider: SdkMeterProvider,
}

static TELEMETRY: OnceLock<Option<Telemetry>> = OnceLock::new();

fn telemetry() -> Option<&'static Telemetry> {
    TELEMETRY
        .get_or_init(|| {
            let registry = prometheus::Registry::new();
            let exporter = opentelemetry_prometheus::exporter()
                .with_registry(registry.clone())
                // Keep series free of per-library labels; names stay Prometheus-conventional.
                .scope_info_enabled(false)
                .without_target_info()
                .build();
            match exporter {
                Ok(exporter) => Some(Telemetry {
                    registry,
                    provider: SdkMeterProvider::builder().with_reader(exporter).build(),
                }),
                Err(error) => {
                    tracing::error!(%error, "metrics exporter could not be built; metrics are off");
                    None
                }
            }
        })
        .as_ref()
}

/// The meter every instrument of this process is created from.
pub fn meter() -> Meter {
    match telemetry() {
        Some(telemetry) => telemetry.provider.meter("school"),
        None => opentelemetry::global::meter("school"),
    }
}

/// A latency histogram in seconds with [`LATENCY_BUCKETS`].
pub fn seconds_histogram(name: &'static str, description: &'static str) -> Histogram<f64> {
    meter()
        .f64_histogram(name)
        .with_unit("s")
        .with_description(description)
        .with_boundaries(LATENCY_BUCKETS.to_vec())
        .build()
}

/// The Prometheus text exposition of every metric of the process.
pub fn render() -> String {
    let mut out = Vec::new();
    if let Some(telemetry) = telemetry()
        && let Err(error) = TextEncoder::new().encode(&telemetry.registry.gather(), &mut out)
    {
        tracing::error!(%error, "encoding metrics failed");
    }
    // The HTTP metrics do not depend on the exporter: shown even when it could not be built.
    let mut text = String::from_utf8(out).unwrap_or_default();
    crate::http_metrics::render(&mut text);
    text
}

/// Set once `/metrics` is served on a port of its own: the main port then hides it.
static ON_OWN_PORT: AtomicBool = AtomicBool::new(false);

/// `GET /metrics` (unauthenticated, like the health endpoints). Answers 404 when
/// [`serve_on_own_port`] runs, so metrics never leak onto the public port.
pub async fn metrics_handler() -> Response {
    if ON_OWN_PORT.load(Ordering::Relaxed) {
        return problem::route_not_found().await.into_response();
    }
    exposition().await
}

/// Serves `/metrics` and `/healthz` on `addr` (`METRICS_LISTEN_ADDR`), for deployments
/// that keep them off the public port. Runs until the process ends: a scrape in flight at
/// shutdown may be cut, which costs nothing.
pub async fn serve_on_own_port(addr: SocketAddr) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding METRICS_LISTEN_ADDR {addr}"))?;
    ON_OWN_PORT.store(true, Ordering::Relaxed);
    let app = Router::new()
        .route("/metrics", get(exposition))
        .route("/healthz", get(health::healthz));
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(%error, "the metrics listener stopped");
        }
    });
    tracing::info!(%addr, "metrics listening");
    Ok(())
}

async fn exposition() -> Response {
    let mut response = render().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::KeyValue;

    #[test]
    fn instruments_show_up_with_prometheus_names() {
        let counter = meter().u64_counter("test.things").build();
        counter.add(3, &[KeyValue::new("kind", "a")]);
        seconds_histogram("test.wait.duration", "waits").record(0.002, &[]);
        let text = render();
        assert!(text.contains("test_things_total{kind=\"a\"} 3"), "{text}");
        assert!(text.contains("test_wait_duration_seconds_bucket"), "{text}");
        assert!(!text.contains("otel_scope"), "{text}");
    }

    /// Raw HTTP/1.0 GET on loopback; returns the status line.
    async fn status_of(addr: SocketAddr, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let request = format!("GET {path} HTTP/1.0\r\nhost: x\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.expect("read");
        answer.lines().next().unwrap_or_default().to_owned()
    }

    #[tokio::test]
    async fn on_its_own_port_metrics_leave_the_main_port() {
        assert_eq!(metrics_handler().await.status(), 200);
        let free = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
        let addr = free.local_addr().expect("address");
        drop(free);
        serve_on_own_port(addr).await.expect("metrics listener");
        assert!(status_of(addr, "/metrics").await.contains("200"));
        assert!(status_of(addr, "/healthz").await.contains("200"));
        assert!(status_of(addr, "/api/students").await.contains("404"));
        assert_eq!(
            metrics_handler().await.status(),
            404,
            "hidden on the main port"
        );
    }
}
