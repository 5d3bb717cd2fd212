//! `stream-admin apply` as the install Job runs it: it refuses a nats-server too old for
//! the projectors (one line naming both versions, non-zero exit), and with
//! `--wait-seconds` it waits for a server that is not up yet instead of failing.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use test_support::{NatsServer, NatsStop, NatsVersionStandIn, unique_suffix};

/// Runs the binary to its end (at most `limit`) and returns what it printed.
async fn run_apply(url: &str, extra: &[&str], limit: Duration) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_stream-admin"))
        .env("NATS_URL", url)
        .env("STREAM_PREFIX", format!("w{}", unique_suffix()))
        .env_remove("APPLY_WAIT_SECONDS")
        .arg("apply")
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting stream-admin");
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("status").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("stream-admin apply did not finish within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child.wait_with_output().expect("output")
}

#[tokio::test]
async fn apply_refuses_a_server_older_than_2_14_naming_both_versions() {
    let old = NatsVersionStandIn::start("2.12.3").await;
    // Even while asked to wait: an old server does not get younger.
    let output = run_apply(
        &old.url(),
        &["--wait-seconds", "30"],
        Duration::from_secs(20),
    )
    .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "apply succeeded against 2.12.3");
    assert!(
        stderr.contains("2.12.3") && stderr.contains("2.14.0"),
        "the refusal names the version found and the version needed: {stderr}"
    );
}

#[tokio::test]
async fn apply_with_wait_seconds_waits_for_a_server_that_comes_up_later() {
    let mut server = NatsServer::start().await;
    server.stop(NatsStop::Kill);
    let url = server.url();
    let apply = tokio::spawn(async move {
        run_apply(&url, &["--wait-seconds", "60"], Duration::from_secs(60)).await
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !apply.is_finished(),
        "apply gave up while the server was down"
    );
    server.restart().await;
    let output = apply.await.expect("apply task");
    assert!(
        output.status.success(),
        "apply failed once the server was up: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("created"), "{stdout}");
}

#[tokio::test]
async fn apply_without_wait_fails_at_once_when_no_server_answers() {
    let mut server = NatsServer::start().await;
    server.stop(NatsStop::Kill);
    let started = Instant::now();
    let output = run_apply(&server.url(), &[], Duration::from_secs(30)).await;
    assert!(!output.status.success());
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
}
