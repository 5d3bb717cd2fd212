//! The real command-gateway binary under a paced command load, and an audit of the event
//! stream afterwards: which answered commands are stored, how often, and which unanswered
//! ones were stored anyway. Shared by the fault tests (NATS outage, SIGTERM).

#![allow(dead_code)] // each test binary uses a different part

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use events::{EventPayload, StreamNames};
use serde_json::json;
use test_support::{ServiceProcess, WRITE_KEY, free_port};
use uuid::Uuid;

/// `FAULTS_LONG=1` selects the long version of a fault scenario.
pub fn long_version() -> bool {
    std::env::var("FAULTS_LONG").is_ok_and(|v| v == "1")
}

/// One command-gateway process.
pub struct GatewayProcess {
    pub process: ServiceProcess,
    pub url: String,
}

impl GatewayProcess {
    /// Starts the binary on a free port against `nats_url` and the streams of `names`, and
    /// waits until it answers `/healthz`.
    pub async fn start(nats_url: &str, names: &StreamNames) -> GatewayProcess {
        let port = free_port();
        let mut command = Command::new(env!("CARGO_BIN_EXE_command-gateway"));
        command
            .env("NATS_URL", nats_url)
            .env("STREAM_PREFIX", names.prefix())
            .env("KEK_FILE", test_support::test_kek_file())
            .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
            .env(
                "API_KEYS",
                format!("write:{WRITE_KEY},read:{}", test_support::READ_KEY),
            )
            .env(
                "RUST_LOG",
                std::env::var("GATEWAY_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let mut gateway = GatewayProcess {
            process: ServiceProcess::spawn("command-gateway", &mut command),
            url: format!("http://127.0.0.1:{port}"),
        };
        let http = reqwest::Client::new();
        let health = format!("{}/healthz", gateway.url);
        gateway.process.wait_until(|| healthy(&http, &health)).await;
        gateway
    }
}

/// Whether `url` answers 2xx.
pub async fn healthy(http: &reqwest::Client, url: &str) -> bool {
    http.get(url)
        .send()
        .await
        .is_ok_and(|response| response.status().is_success())
}

/// What a command was.
#[derive(Debug, Clone)]
pub enum Sent {
    CreateCourse { name: String },
    RegisterStudent { name: String, course: Uuid },
}

/// How the gateway answered one command.
#[derive(Debug, Clone)]
pub enum Answer {
    /// 2xx with the new aggregate's id and the consistency token (stream position).
    Accepted { id: Uuid, token: Option<u64> },
    /// 503; whether it carried `Retry-After` and was `application/problem+json`.
    Unavailable { retry_after: bool, problem: bool },
    /// Any other status.
    Other { status: u16, body: String },
    /// No HTTP answer at all; `connect` when the connection itself was refused.
    Transport { connect: bool, error: String },
}

#[derive(Debug, Clone)]
pub struct Attempt {
    pub sent: Sent,
    pub started: Instant,
    pub finished: Instant,
    pub answer: Answer,
}

/// The paced load: `clients` closed-loop clients holding `rate` commands/s in total, each
/// creating a course, then registering students into it (an atomic batch over the student
/// and the course) until it holds 40, then the next course.
pub struct Load {
    pub clients: usize,
    pub rate: u32,
    /// Fresh connection per request (`true`) or keep-alive.
    pub fresh_connections: bool,
}

/// Per-request timeout: longer than the gateway's own broker timeouts.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
const STUDENTS_PER_COURSE: usize = 40;

impl Load {
    /// Runs until `stop` is set, then returns every attempt (each client finishes the
    /// request it has in flight).
    pub async fn run(&self, url: &str, stop: Arc<AtomicBool>) -> Vec<Attempt> {
        self.run_counting(url, stop, Arc::default(), "").await
    }

    /// Like [`run`](Self::run), keeping `in_flight` at the number of requests issued and not
    /// yet answered (so a test can pick a moment when some are), and starting every name
    /// with `tag` (names must stay unique when one test runs several loads).
    pub async fn run_counting(
        &self,
        url: &str,
        stop: Arc<AtomicBool>,
        in_flight: Arc<AtomicUsize>,
        tag: &str,
    ) -> Vec<Attempt> {
        let mut tasks = Vec::new();
        let period = Duration::from_secs_f64(self.clients as f64 / f64::from(self.rate.max(1)));
        for client_number in 0..self.clients {
            let mut builder = reqwest::Client::builder().timeout(REQUEST_TIMEOUT);
            if self.fresh_connections {
                builder = builder.pool_max_idle_per_host(0);
            }
            let http = builder.build().expect("http client");
            let (url, stop, in_flight) = (url.to_owned(), stop.clone(), in_flight.clone());
            let tag = tag.to_owned();
            tasks.push(tokio::spawn(async move {
                let mut attempts = Vec::new();
                let mut course: Option<(Uuid, usize)> = None;
                let mut ticks = tokio::time::interval(period);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut n = 0u64;
                // Bounded by `stop`, which the test always sets.
                while !stop.load(Ordering::Relaxed) {
                    ticks.tick().await;
                    n += 1;
                    let sent = match course {
                        Some((id, used)) if used < STUDENTS_PER_COURSE => Sent::RegisterStudent {
                            name: format!("{tag}S{client_number}x{n}"),
                            course: id,
                        },
                        _ => Sent::CreateCourse {
                            name: format!("{tag}C{client_number}x{n}"),
                        },
                    };
                    in_flight.fetch_add(1, Ordering::SeqCst);
                    let attempt = send(&http, &url, sent).await;
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    match (&attempt.sent, &attempt.answer) {
                        (Sent::CreateCourse { .. }, Answer::Accepted { id, .. }) => {
                            course = Some((*id, 0));
                        }
                        (Sent::RegisterStudent { .. }, _) => {
                            if let Some((_, used)) = course.as_mut() {
                                *used += 1;
                            }
                        }
                        _ => {}
                    }
                    attempts.push(attempt);
                }
                attempts
            }));
        }
        let mut all = Vec::new();
        for task in tasks {
            all.extend(task.await.expect("load client"));
        }
        all
    }
}

/// Sends one command and records how it was answered.
pub async fn send(http: &reqwest::Client, url: &str, sent: Sent) -> Attempt {
    let (path, body) = match &sent {
        Sent::CreateCourse { name } => (
            "/api/courses",
            json!({"name": name, "description": "Fault load", "discipline": "Maths", "teacher": "Teacher"}),
        ),
        Sent::RegisterStudent { name, course } => (
            "/api/students",
            json!({"name": name, "first_name": "First", "last_name": "Last", "course_ids": [course]}),
        ),
    };
    let name = match &sent {
        Sent::CreateCourse { name } | Sent::RegisterStudent { name, .. } => name.clone(),
    };
    let started = Instant::now();
    let result = http
        .post(format!("{url}{path}"))
        .header("x-api-key", WRITE_KEY)
        // Names are unique per command: a retry of the same command sends the same key.
        .header("idempotency-key", name)
        .json(&body)
        .send()
        .await;
    let answer = match result {
        Err(error) => Answer::Transport {
            connect: error.is_connect(),
            error: format!("{error:?}"),
        },
        Ok(response) => {
            let status = response.status();
            let header = |name: &str| {
                response
                    .headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            let token = header("x-consistency-token").and_then(|t| t.parse().ok());
            let retry_after = header("retry-after").is_some();
            let problem = header("content-type").as_deref() == Some("application/problem+json");
            match response.text().await {
                Err(error) => Answer::Transport {
                    connect: false,
                    error: format!("body: {error:?}"),
                },
                Ok(text) if status.is_success() => {
                    let value: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                    match value["data"]["id"].as_str().and_then(|s| s.parse().ok()) {
                        Some(id) => Answer::Accepted { id, token },
                        None => Answer::Other {
                            status: status.as_u16(),
                            body: text,
                        },
                    }
                }
                Ok(_) if status == reqwest::StatusCode::SERVICE_UNAVAILABLE => {
                    Answer::Unavailable {
                        retry_after,
                        problem,
                    }
                }
                Ok(text) => Answer::Other {
                    status: status.as_u16(),
                    body: text,
                },
            }
        }
    };
    Attempt {
        sent,
        started,
        finished: Instant::now(),
        answer,
    }
}

/// What the event stream holds, indexed for the checks.
#[derive(Default)]
pub struct StreamAudit {
    pub messages: u64,
    /// Events stored more than once under the same event id.
    pub repeated_event_ids: u64,
    /// `StudentRegistered` / `CourseCreated` events per aggregate.
    pub creations: HashMap<Uuid, usize>,
    /// Aggregate ids by the name they were created with (names are unique per attempt).
    pub created_by_name: HashMap<String, Vec<Uuid>>,
    /// `StudentEnrolled` events on the course's subject, per (student, course).
    pub enrollments_on_course: HashMap<(Uuid, Uuid), usize>,
    /// The aggregate of the event at each stream sequence.
    pub aggregate_at: HashMap<u64, Uuid>,
}

impl StreamAudit {
    /// Reads every message of the event stream (through a client that may still be
    /// reconnecting: retried for up to 30 s).
    pub async fn read(client: &async_nats::Client, names: &StreamNames) -> StreamAudit {
        let js = jetstream::new(client.clone());
        let deadline = Instant::now() + Duration::from_secs(30);
        let (stream, last) = loop {
            let attempt = async {
                let mut stream = js.get_stream(names.event_stream()).await.ok()?;
                let last = stream.info().await.ok()?.state.last_sequence;
                Some((stream, last))
            };
            if let Some(found) = attempt.await {
                break found;
            }
            assert!(Instant::now() < deadline, "the event stream did not answer");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let mut audit = StreamAudit::default();
        let mut seen_ids = std::collections::HashSet::new();
        for sequence in 1..=last {
            let message = stream
                .get_raw_message(sequence)
                .await
                .unwrap_or_else(|e| panic!("stream message {sequence} ({e})"));
            let event = test_support::read_stored(&js, names, &message.payload).await;
            audit.messages += 1;
            if !seen_ids.insert(event.metadata.event_id) {
                audit.repeated_event_ids += 1;
            }
            audit
                .aggregate_at
                .insert(sequence, event.metadata.aggregate_id);
            match &event.payload {
                EventPayload::StudentRegistered(details) => {
                    *audit
                        .creations
                        .entry(event.metadata.aggregate_id)
                        .or_default() += 1;
                    audit
                        .created_by_name
                        .entry(details.name.clone())
                        .or_default()
                        .push(event.metadata.aggregate_id);
                }
                EventPayload::CourseCreated(details) => {
                    *audit
                        .creations
                        .entry(event.metadata.aggregate_id)
                        .or_default() += 1;
                    audit
                        .created_by_name
                        .entry(details.name.clone())
                        .or_default()
                        .push(event.metadata.aggregate_id);
                }
                EventPayload::StudentEnrolled(enrollment)
                    if event.metadata.aggregate_id == enrollment.course_id =>
                {
                    *audit
                        .enrollments_on_course
                        .entry((enrollment.student_id, enrollment.course_id))
                        .or_default() += 1;
                }
                _ => {}
            }
        }
        audit
    }
}

/// The verdict on a run: the counts the RELIABILITY line reports.
#[derive(Debug, Default)]
pub struct Verdict {
    pub accepted: usize,
    /// 2xx answered, but the command's events are not in the stream (or not at the
    /// position the token names).
    pub false_success: usize,
    /// Accepted commands whose creation or enrollment is stored more than once, plus event
    /// ids stored twice.
    pub duplicated: usize,
    /// 2xx answered, event missing: the same as a false success from the client's view.
    pub lost: usize,
    pub unavailable: usize,
    pub unavailable_without_retry_after: usize,
    pub other_status: usize,
    pub transport_refused: usize,
    pub transport_cut: usize,
    /// Commands without a 2xx whose creation is stored all the same (ambiguous outcome,
    /// allowed for a 503 or a refused connection, never for an accepted request).
    pub stored_without_success: usize,
    /// Transport errors (other than a refused connection) whose command was stored: the
    /// request had been accepted and its answer was lost.
    pub accepted_but_cut: usize,
}

impl Verdict {
    pub fn of(attempts: &[Attempt], audit: &StreamAudit) -> Verdict {
        let mut verdict = Verdict {
            duplicated: audit.repeated_event_ids as usize,
            ..Verdict::default()
        };
        for attempt in attempts {
            let name = match &attempt.sent {
                Sent::CreateCourse { name } | Sent::RegisterStudent { name, .. } => name,
            };
            let stored_by_name = audit.created_by_name.get(name).map_or(0, Vec::len);
            match &attempt.answer {
                Answer::Accepted { id, token } => {
                    verdict.accepted += 1;
                    let creations = audit.creations.get(id).copied().unwrap_or(0);
                    let mut stored = creations >= 1;
                    if creations > 1 || stored_by_name > 1 {
                        verdict.duplicated += 1;
                    }
                    if let Sent::RegisterStudent { course, .. } = &attempt.sent {
                        match audit.enrollments_on_course.get(&(*id, *course)) {
                            None => stored = false,
                            Some(&n) if n > 1 => verdict.duplicated += 1,
                            Some(_) => {}
                        }
                    }
                    // The token is the stream position of the command's last event.
                    let at_token = token.and_then(|t| audit.aggregate_at.get(&t));
                    let token_names_it = match (&attempt.sent, at_token) {
                        (_, None) => false,
                        (Sent::CreateCourse { .. }, Some(aggregate)) => aggregate == id,
                        (Sent::RegisterStudent { course, .. }, Some(aggregate)) => {
                            aggregate == id || aggregate == course
                        }
                    };
                    if !stored {
                        verdict.lost += 1;
                        verdict.false_success += 1;
                    } else if !token_names_it {
                        verdict.false_success += 1;
                    }
                }
                Answer::Unavailable {
                    retry_after,
                    problem,
                } => {
                    verdict.unavailable += 1;
                    if !retry_after || !problem {
                        verdict.unavailable_without_retry_after += 1;
                    }
                    verdict.stored_without_success += usize::from(stored_by_name > 0);
                }
                Answer::Other { .. } => {
                    verdict.other_status += 1;
                    verdict.stored_without_success += usize::from(stored_by_name > 0);
                }
                Answer::Transport { connect: true, .. } => {
                    verdict.transport_refused += 1;
                    verdict.stored_without_success += usize::from(stored_by_name > 0);
                }
                Answer::Transport { connect: false, .. } => {
                    verdict.transport_cut += 1;
                    verdict.stored_without_success += usize::from(stored_by_name > 0);
                    verdict.accepted_but_cut += usize::from(stored_by_name > 0);
                }
            }
        }
        verdict
    }
}

/// A few examples of one kind of answer, for failure messages.
pub fn examples(attempts: &[Attempt], pick: impl Fn(&Answer) -> bool) -> String {
    attempts
        .iter()
        .filter(|a| pick(&a.answer))
        .take(5)
        .map(|a| format!("{:?} -> {:?}", a.sent, a.answer))
        .collect::<Vec<_>>()
        .join("\n")
}
