//! One trace from the HTTP command to the projector: a `traceparent` sent with a command is
//! found, with the same trace id, on the projectors process's JSON log line for the event
//! the command produced — as a child of the gateway's own span, not of the caller's.

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use test_support::{TestBroker, TestDatabase};

struct Projectors(Child);

impl Drop for Projectors {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the projectors binary with per-event debug logs and hands its stdout lines over.
fn start_projectors(prefix: &str, database_url: &str) -> (Projectors, mpsc::Receiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_projectors"))
        .env("NATS_URL", test_support::nats_url())
        .env("DATABASE_URL", database_url)
        .env("STREAM_PREFIX", prefix)
        .env("KEK_FILE", test_support::test_kek_file())
        .env(
            "LISTEN_ADDR",
            format!("127.0.0.1:{}", test_support::free_port()),
        )
        .env("RUST_LOG", "warn,projectors::consumer=debug")
        .env_remove("REDIS_URL")
        .env_remove("COURSES_STORE_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("projectors binary");
    let stdout = child.stdout.take().expect("piped stdout");
    let (lines, received) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    (Projectors(child), received)
}

/// The first JSON log line saying `event applied` for `position`.
fn applied_line(lines: &mpsc::Receiver<String>, position: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no `event applied` line for position {position}"));
        let Ok(json) = serde_json::from_str::<Value>(&line) else {
            panic!("a log line that is not JSON: {line}");
        };
        if json["message"] == "event applied" && json["position"] == position {
            return json;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commands_traceparent_reaches_the_projectors_log_line_for_its_event() {
    let broker = TestBroker::start().await;
    let db = TestDatabase::create().await;
    let state = command_gateway::app_state(
        broker.client.clone(),
        broker.names.clone(),
        test_support::test_kek(),
    )
    .await
    .expect("command side");
    let app = command_gateway::http::router(state, test_support::api_keys(), 64 * 1024);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("listener");
    let gateway = format!("http://{}", listener.local_addr().expect("address"));
    tokio::spawn(command_gateway::run(listener, app, std::future::pending()));
    let (_projectors, lines) = start_projectors(broker.names.prefix(), &db.url);

    let http = reqwest::Client::new();
    let register = |traceparent: Option<String>| {
        let mut request = http
            .post(format!("{gateway}/api/students"))
            .header("x-api-key", test_support::WRITE_KEY)
            .json(
                &serde_json::json!({"name": "Ada L", "first_name": "Ada", "last_name": "Lovelace"}),
            );
        if let Some(traceparent) = traceparent {
            request = request.header("traceparent", traceparent);
        }
        async move {
            let response = request.send().await.expect("gateway answers");
            assert_eq!(response.status(), reqwest::StatusCode::CREATED);
            response
                .headers()
                .get("x-consistency-token")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .expect("a consistency token")
        }
    };

    // A fresh trace id per run, so a line from another test can never match.
    let trace_id = format!("{:032x}", uuid::Uuid::new_v4().as_u128());
    let caller_span = "00f067aa0ba902b7";
    let position = register(Some(format!("00-{trace_id}-{caller_span}-01"))).await;
    let line = applied_line(&lines, position);
    let span = &line["span"];
    assert_eq!(span["trace_id"], trace_id.as_str(), "line: {line}");
    assert_eq!(line["event_type"], "StudentRegistered", "line: {line}");
    let parent = span["parent_span_id"].as_str().expect("a parent span");
    assert_ne!(
        parent, caller_span,
        "the event's parent is the gateway's span, not the caller's"
    );
    assert_ne!(span["span_id"].as_str(), Some(parent));

    // Without a traceparent the gateway starts a trace of its own, and it still arrives.
    let position = register(None).await;
    let line = applied_line(&lines, position);
    let started = line["span"]["trace_id"].as_str().expect("a trace id");
    assert_eq!(started.len(), 32);
    assert_ne!(started, trace_id);
    assert_ne!(started, "0".repeat(32));

    db.cleanup().await;
    broker.cleanup().await;
}
