//! How the projectors process starts and stops being useful: started before
//! `stream-admin apply` it stays up and unready, retrying, and turns ready once the stream
//! and consumers exist; against a nats-server too old for consumer reset it exits non-zero
//! with one line naming both versions (a projection that can never work must not look
//! alive).

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Projectors;
use test_support::{NatsVersionStandIn, TestDatabase, free_port, unique_suffix};

async fn readyz(http: &reqwest::Client, port: u16) -> (u16, String) {
    match http
        .get(format!("http://127.0.0.1:{port}/readyz"))
        .timeout(Duration::from_secs(3))
        .send()
        .await
    {
        Ok(response) => (
            response.status().as_u16(),
            response.text().await.unwrap_or_default(),
        ),
        Err(error) => (0, error.to_string()),
    }
}

#[tokio::test]
async fn projectors_started_before_the_topology_stay_up_unready_then_become_ready() {
    let db = TestDatabase::create().await;
    let names = events::StreamNames::new(format!("t{}", unique_suffix()));
    let mut projectors = Projectors::start(names.prefix(), &db.url);
    projectors.wait_started().await;
    let http = reqwest::Client::new();

    // For a few seconds (several resubscription attempts): alive, not ready, and saying why.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let (status, body) = readyz(&http, projectors.port).await;
        assert_eq!(status, 503, "ready without a stream: {body}");
        assert!(
            body.contains("students_projection") && body.contains("courses_projection"),
            "{body}"
        );
        assert!(
            projectors.process.is_alive(),
            "the projectors exited for a missing stream"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    let client = async_nats::connect(test_support::nats_url())
        .await
        .expect("NATS");
    let jetstream = async_nats::jetstream::new(client);
    stream_admin::apply(
        &jetstream,
        &stream_admin::desired(&names, 1),
        stream_admin::ApplyOptions::default(),
    )
    .await
    .expect("apply");

    // The resubscription backoff is capped at 5 s.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, body) = readyz(&http, projectors.port).await;
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not ready 15 s after apply: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(projectors.process.is_alive());
    test_support::delete_topology(&jetstream, &names).await;
    db.cleanup().await;
}

#[tokio::test]
async fn a_server_older_than_2_14_ends_the_projectors_non_zero_naming_both_versions() {
    let db = TestDatabase::create().await;
    let old = NatsVersionStandIn::start("2.12.3").await;
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_projectors"))
        .env("NATS_URL", old.url())
        .env("DATABASE_URL", &db.url)
        .env("STREAM_PREFIX", format!("t{}", unique_suffix()))
        .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "error")
        .env("KEK_FILE", test_support::test_kek_file())
        .env_remove("REDIS_URL")
        .env_remove("COURSES_STORE_URL")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting projectors");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("status").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the projectors kept running against nats-server 2.12.3");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let output = child.wait_with_output().expect("output");
    assert!(!output.status.success(), "exit status {:?}", output.status);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let refusal = stderr
        .lines()
        .find(|line| line.contains("2.12.3"))
        .unwrap_or_else(|| panic!("no line names the version found: {stderr}"));
    assert!(refusal.contains("2.14.0"), "{refusal}");
    db.cleanup().await;
}

/// Without its key-encryption key the process could never apply a student's event: it does
/// not start, and says which variable is missing; the same for a file that is not a KEK.
#[test]
fn without_a_kek_file_the_projectors_do_not_start_and_say_why() {
    test_support::assert_refuses_to_start_without_a_kek(
        env!("CARGO_BIN_EXE_projectors"),
        &[
            ("NATS_URL", "nats://127.0.0.1:1"),
            ("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none"),
        ],
    );
}
