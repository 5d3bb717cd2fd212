//! SIGTERM to the real query-api binary while a few clients read seeded data, round after
//! round (a new process each round, on the same read models): every read sent before the
//! signal is answered `200` with the right body, the process exits 0 within its grace period,
//! and no answer at any time carries a wrong body.
//!
//! *Sent before the signal*, precisely: the client had issued the request (taken right before
//! it is handed to the HTTP client) before the test ran `kill -TERM`. Every such read must be
//! answered `200` with the body the seed implies; anything else (a reset, a connection closed
//! before the answer, a refused connection, another status) counts in `failed_in_flight` and
//! fails the test. Reads issued after the signal may be answered (the server drains for
//! `service_kit::shutdown::HTTP_DRAIN`) or refused; they are counted separately. Reads change
//! nothing, so `lost` and `duplicated` are 0 by construction; `false_success` counts `200`
//! answers with a wrong body.
//!
//! Half the clients keep their connections alive, half open one per request. Right before
//! each signal a burst of reads goes out at once on fresh connections, so that some are still
//! unanswered when `kill` has returned (`in_flight_at_signal` counts those, and must not be
//! 0: a read takes about as long as running `kill`). Short version (CI): 2 rounds of 3 s of
//! reads. `FAULTS_LONG=1`: 10 rounds of 10 s.

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Options, TestSystem};
use events::StreamNames;
use serde_json::{Value, json};
use test_support::{READ_KEY, ServiceProcess, WRITE_KEY, free_port};

/// The chart's `terminationGracePeriodSeconds` (30) minus its `preStop` sleep (5): the time
/// the process has between SIGTERM and SIGKILL.
const GRACE: Duration = Duration::from_secs(25);
/// Reads sent at once right before each signal.
const BURST: usize = 16;
const COURSES: usize = 4;
const STUDENTS: usize = 24;

fn long_version() -> bool {
    std::env::var("FAULTS_LONG").is_ok_and(|v| v == "1")
}

struct Plan {
    rounds: usize,
    /// Reads before each SIGTERM.
    load_for: Duration,
    clients: usize,
    rate: u32,
}

fn plan() -> Plan {
    if long_version() {
        Plan {
            rounds: 10,
            load_for: Duration::from_secs(10),
            clients: 8,
            rate: 400,
        }
    } else {
        Plan {
            rounds: 2,
            load_for: Duration::from_secs(3),
            clients: 6,
            rate: 300,
        }
    }
}

/// One query-api process on the test's read models, Redis and streams.
struct QueryApiProcess {
    process: ServiceProcess,
    url: String,
}

impl QueryApiProcess {
    async fn start(system: &TestSystem, names: &StreamNames) -> QueryApiProcess {
        let port = free_port();
        let mut command = Command::new(env!("CARGO_BIN_EXE_query-api"));
        command
            .env("DATABASE_URL", &system.db.url)
            .env("NATS_URL", test_support::nats_url())
            .env("STREAM_PREFIX", names.prefix())
            .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
            .env("GRPC_LISTEN_ADDR", format!("127.0.0.1:{}", free_port()))
            .env("API_KEYS", format!("write:{WRITE_KEY},read:{READ_KEY}"))
            .env(
                "RUST_LOG",
                std::env::var("QUERY_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .env_remove("COURSES_STORE_URL")
            .env_remove("METRICS_LISTEN_ADDR")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        match system.redis.as_ref() {
            Some(redis) => command.env("REDIS_URL", redis.url()),
            None => command.env_remove("REDIS_URL"),
        };
        let mut process = QueryApiProcess {
            process: ServiceProcess::spawn("query-api", &mut command),
            url: format!("http://127.0.0.1:{port}"),
        };
        let http = reqwest::Client::new();
        let health = format!("{}/healthz", process.url);
        process
            .process
            .wait_until(|| async {
                http.get(&health)
                    .send()
                    .await
                    .is_ok_and(|response| response.status().is_success())
            })
            .await;
        process
    }
}

/// What a read must answer: the whole body, or (relation pages) the ids in order on one page.
#[derive(Debug, Clone)]
enum Expect {
    Body(Value),
    Ids(Vec<String>),
}

impl Expect {
    fn holds(&self, body: &Value) -> bool {
        match self {
            Expect::Body(want) => body == want,
            Expect::Ids(want) => {
                let ids: Option<Vec<&str>> = body["data"]
                    .as_array()
                    .map(|items| items.iter().filter_map(|i| i["id"].as_str()).collect());
                ids.is_some_and(|ids| ids == *want) && body["next_cursor"].is_null()
            }
        }
    }
}

/// Seeds courses and students with enrollments through the real gateway and projections,
/// and returns every read path with the answer the seed implies.
async fn seed(system: &TestSystem) -> Vec<(String, Expect)> {
    let mut courses = Vec::new();
    for n in 0..COURSES {
        let name = format!("Course {n}");
        courses.push((system.create_course(&name).await.id, name));
    }
    let mut enrolled: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut students = Vec::new();
    let mut last = None;
    for n in 0..STUDENTS {
        let name = format!("Student {n}");
        let student = system.register_student(&name).await;
        let mut course_ids = Vec::new();
        // 0, 1 or 2 courses each.
        for (id, _) in courses.iter().skip(n % COURSES).take(n % 3) {
            last = Some(system.enroll(&student.id, id).await.token);
            course_ids.push(id.clone());
            enrolled
                .entry(id.clone())
                .or_default()
                .push(student.id.clone());
        }
        course_ids.sort();
        students.push((student.id, name, course_ids));
    }
    // Both projections have applied everything once both reads after the last write answer.
    let token = last.expect("some enrollment");
    for path in [
        format!("/api/students/{}", students[0].0),
        format!("/api/courses/{}", courses[0].0),
    ] {
        let answer = system.get_after(&path, &token).await;
        assert_eq!(answer.status, reqwest::StatusCode::OK, "{path}: {answer:?}");
    }

    let mut paths = Vec::new();
    for (id, name) in &courses {
        let mut student_ids = enrolled.get(id).cloned().unwrap_or_default();
        student_ids.sort();
        paths.push((
            format!("/api/courses/{id}"),
            Expect::Body(json!({"data": {
                "id": id, "name": name, "description": "About it", "discipline": "Maths",
                "teacher": "Teacher", "student_ids": student_ids
            }})),
        ));
        paths.push((
            format!("/api/courses/{id}/students?limit=100"),
            Expect::Ids(student_ids),
        ));
    }
    for (id, name, course_ids) in &students {
        paths.push((
            format!("/api/students/{id}"),
            Expect::Body(json!({"data": {
                "id": id, "name": name, "first_name": "First", "last_name": "Last",
                "course_ids": course_ids
            }})),
        ));
        paths.push((
            format!("/api/students/{id}/courses?limit=100"),
            Expect::Ids(course_ids.clone()),
        ));
    }
    paths
}

#[derive(Debug, Clone)]
#[allow(dead_code)] // the details are read through `Debug`, in failure messages
enum Outcome {
    /// `200` with the body the seed implies.
    Right,
    /// `200` with another body.
    WrongBody(String),
    Status(u16),
    /// No HTTP answer; `connect` when the connection was refused.
    Transport {
        connect: bool,
        error: String,
    },
}

#[derive(Debug, Clone)]
struct Read {
    path: String,
    started: Instant,
    finished: Instant,
    outcome: Outcome,
}

async fn read(http: &reqwest::Client, url: &str, path: &str, expect: &Expect) -> Read {
    let started = Instant::now();
    let result = http
        .get(format!("{url}{path}"))
        .header("x-api-key", READ_KEY)
        .send()
        .await;
    let outcome = match result {
        Err(error) => Outcome::Transport {
            connect: error.is_connect(),
            error: format!("{error:?}"),
        },
        Ok(response) => {
            let status = response.status();
            match response.text().await {
                Err(error) => Outcome::Transport {
                    connect: false,
                    error: format!("body: {error:?}"),
                },
                Ok(text) if status == reqwest::StatusCode::OK => {
                    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
                    if expect.holds(&body) {
                        Outcome::Right
                    } else {
                        Outcome::WrongBody(text)
                    }
                }
                Ok(_) => Outcome::Status(status.as_u16()),
            }
        }
    };
    Read {
        path: path.to_owned(),
        started,
        finished: Instant::now(),
        outcome,
    }
}

async fn counted_read(
    http: &reqwest::Client,
    url: &str,
    path: &str,
    expect: &Expect,
    in_flight: &AtomicUsize,
) -> Read {
    in_flight.fetch_add(1, Ordering::SeqCst);
    let read = read(http, url, path, expect).await;
    in_flight.fetch_sub(1, Ordering::SeqCst);
    read
}

/// `clients` paced clients reading the seeded paths round-robin at `rate` reads/s in total,
/// until `stop`; odd clients open a fresh connection per request.
async fn read_load(
    url: &str,
    paths: Arc<Vec<(String, Expect)>>,
    clients: usize,
    rate: u32,
    stop: Arc<AtomicBool>,
    in_flight: Arc<AtomicUsize>,
) -> Vec<Read> {
    let period = Duration::from_secs_f64(clients as f64 / f64::from(rate.max(1)));
    let mut tasks = Vec::new();
    for client in 0..clients {
        let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(20));
        if client % 2 == 1 {
            builder = builder.pool_max_idle_per_host(0);
        }
        let http = builder.build().expect("http client");
        let (url, paths, stop, in_flight) = (
            url.to_owned(),
            paths.clone(),
            stop.clone(),
            in_flight.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut reads = Vec::new();
            let mut ticks = tokio::time::interval(period);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut next = client * 7;
            // Bounded by `stop`, which the test always sets.
            while !stop.load(Ordering::Relaxed) {
                ticks.tick().await;
                let (path, expect) = &paths[next % paths.len()];
                next += 1;
                reads.push(counted_read(&http, &url, path, expect, &in_flight).await);
            }
            reads
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("read client"));
    }
    all
}

#[derive(Debug, Default)]
struct Counts {
    reads: usize,
    in_flight_at_signal: usize,
    answered_before: usize,
    failed_in_flight: usize,
    served_after: usize,
    refused_after: usize,
    cut_after: usize,
    other_after: usize,
    false_success: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_reads_answers_every_read_in_flight_rightly_and_exits_cleanly_in_time() {
    let plan = plan();
    let system = TestSystem::start(Options::default()).await;
    let paths = Arc::new(seed(&system).await);
    let names = system.broker.names.clone();

    let mut counts = Counts::default();
    let (mut loaded_for, mut slowest_exit) = (Duration::ZERO, Duration::ZERO);
    let mut failures = Vec::new();
    for round in 0..plan.rounds {
        let mut query = QueryApiProcess::start(&system, &names).await;
        let stop = Arc::new(AtomicBool::new(false));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let running = {
            let (url, paths, stop, in_flight) = (
                query.url.clone(),
                paths.clone(),
                stop.clone(),
                in_flight.clone(),
            );
            let (clients, rate) = (plan.clients, plan.rate);
            tokio::spawn(
                async move { read_load(&url, paths, clients, rate, stop, in_flight).await },
            )
        };
        tokio::time::sleep(plan.load_for).await;
        // A burst right before the signal (on fresh connections), so that reads are surely
        // still in flight when it lands: a read takes about as long as running `kill`.
        let burst_http = reqwest::Client::new();
        let burst: Vec<_> = (0..BURST)
            .map(|n| {
                let (http, url, paths, in_flight) = (
                    burst_http.clone(),
                    query.url.clone(),
                    paths.clone(),
                    in_flight.clone(),
                );
                tokio::spawn(async move {
                    let (path, expect) = &paths[(n * 5) % paths.len()];
                    counted_read(&http, &url, path, expect, &in_flight).await
                })
            })
            .collect();
        let wait_until = Instant::now() + Duration::from_secs(2);
        while in_flight.load(Ordering::SeqCst) < BURST && Instant::now() < wait_until {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let signal_at = Instant::now();
        query.process.sigterm();
        let delivered_at = Instant::now();
        let status = query.process.exit_within(GRACE).await;
        let took = signal_at.elapsed();
        // The reads go on a little after the exit: those meet a closed port.
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.store(true, Ordering::Relaxed);
        let mut reads = running.await.expect("read load");
        for read in burst {
            reads.push(read.await.expect("burst read"));
        }
        loaded_for += started.elapsed();
        let status =
            status.unwrap_or_else(|| panic!("round {round}: no exit within {GRACE:?} of SIGTERM"));
        assert!(
            status.success(),
            "round {round}: exit status after SIGTERM: {status:?}"
        );
        slowest_exit = slowest_exit.max(took);

        for read in &reads {
            counts.reads += 1;
            if let Outcome::WrongBody(_) = read.outcome {
                counts.false_success += 1;
            }
            let right = matches!(read.outcome, Outcome::Right);
            if read.started < signal_at {
                counts.in_flight_at_signal += usize::from(read.finished > delivered_at);
                if right {
                    counts.answered_before += 1;
                } else {
                    counts.failed_in_flight += 1;
                }
            } else {
                match read.outcome {
                    Outcome::Right => counts.served_after += 1,
                    Outcome::Transport { connect: true, .. } => counts.refused_after += 1,
                    Outcome::Transport { .. } => counts.cut_after += 1,
                    Outcome::Status(_) | Outcome::WrongBody(_) => counts.other_after += 1,
                }
            }
            let failed_before = read.started < signal_at && !right;
            if (failed_before || matches!(read.outcome, Outcome::WrongBody(_)))
                && failures.len() < 10
            {
                failures.push(format!(
                    "round {round}: issued {}us {} the signal: GET {} -> {:?}",
                    read.started
                        .max(signal_at)
                        .duration_since(read.started.min(signal_at))
                        .as_micros(),
                    if read.started < signal_at {
                        "before"
                    } else {
                        "after"
                    },
                    read.path,
                    read.outcome
                ));
            }
        }
    }

    eprintln!(
        "RELIABILITY: scenario=query-api-sigterm-under-reads commands_per_s={:.0} (reads) \
         duration_s={:.1} faults={} (SIGTERM, slowest exit {}ms, grace {}s) reads={} \
         in_flight_at_signal={} answered_before_signal={} failed_in_flight={} \
         served_after_signal={} refused_after_signal={} cut_after_signal={} \
         other_status_after_signal={} lost=0 duplicated=0 false_success={}",
        counts.reads as f64 / loaded_for.as_secs_f64(),
        loaded_for.as_secs_f64(),
        plan.rounds,
        slowest_exit.as_millis(),
        GRACE.as_secs(),
        counts.reads,
        counts.in_flight_at_signal,
        counts.answered_before,
        counts.failed_in_flight,
        counts.served_after,
        counts.refused_after,
        counts.cut_after,
        counts.other_after,
        counts.false_success,
    );
    assert!(
        counts.failed_in_flight == 0 && counts.false_success == 0,
        "every read issued before SIGTERM must be answered 200 with the right body, and no \
         answer may carry a wrong one:\n{}",
        failures.join("\n")
    );
    assert!(
        counts.in_flight_at_signal > 0,
        "no read was in flight at any SIGTERM: the test proved nothing"
    );
    assert!(
        counts.answered_before > counts.reads / 2,
        "most reads were answered ({} of {})",
        counts.answered_before,
        counts.reads
    );
    system.cleanup().await;
}
