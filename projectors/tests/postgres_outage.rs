//! The read models' PostgreSQL (a private cluster) stopped while commands keep streaming
//! in: the projectors process stays up and waits, its `/readyz` answers non-2xx while the
//! database is away and 200 again after it is back, it catches up, and the read models then
//! equal what the accepted commands produced (taken from the command side).
//!
//! Each outage starts under a batch transaction in flight (held on a table lock), so its
//! commit fails and the batch must be retried, not skipped.
//!
//! Short version (CI): Postgres down 5 s (`pg_ctl stop -m immediate`) in ~14 s of load.
//! `FAULTS_LONG=1`: down 30 s, then a second outage of 30 s with a fast shutdown.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{
    CommandLoad, Projectors, differences, enrollment_rows, long_version, mismatch, read_models,
    wait_for_read_models,
};
use read_models::{CourseStore, PgStudents};
use test_support::{PgStop, PostgresServer, TestBroker};

struct Plan {
    rate: u32,
    before: Duration,
    /// (down for, how, load after the restart)
    outages: Vec<(Duration, PgStop, Duration)>,
}

fn plan() -> Plan {
    let s = Duration::from_secs;
    if long_version() {
        Plan {
            rate: 100,
            before: s(5),
            outages: vec![
                (s(30), PgStop::Immediate, s(10)),
                (s(30), PgStop::Fast, s(5)),
            ],
        }
    } else {
        Plan {
            rate: 80,
            before: s(3),
            outages: vec![(s(5), PgStop::Immediate, s(3))],
        }
    }
}

/// Polls `/readyz` every 100 ms until `done`; returns (first non-2xx after `from`, answers
/// that were 2xx, answers that never came).
async fn watch_readiness(
    projectors: &Projectors,
    http: &reqwest::Client,
    from: Instant,
    until: Instant,
) -> (Option<Duration>, usize, usize) {
    let (mut first_not_ready, mut ready, mut silent) = (None, 0, 0);
    while Instant::now() < until {
        match projectors.readyz(http, Duration::from_secs(2)).await {
            Some(status) if (200..300).contains(&status) => ready += 1,
            Some(_) => {
                first_not_ready.get_or_insert_with(|| from.elapsed());
            }
            None => silent += 1,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (first_not_ready, ready, silent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_outage_under_load_is_waited_out_and_the_read_models_catch_up() {
    let plan = plan();
    let broker = TestBroker::start().await;
    let mut postgres = PostgresServer::start();
    let database_url = postgres.url("postgres");
    let state = command_gateway::app_state(
        broker.client.clone(),
        broker.names.clone(),
        test_support::test_kek(),
    )
    .await
    .expect("command side");
    let commands = state.commands.clone();
    let http = reqwest::Client::new();

    let load = CommandLoad::new(&commands, 7, 12).await;
    let mut projectors = Projectors::start(broker.names.prefix(), &database_url);
    projectors.wait_started().await;
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let running = {
        let (commands, stop) = (commands.clone(), stop.clone());
        tokio::spawn(async move { load.run_until(&commands, plan.rate, &stop).await })
    };
    tokio::time::sleep(plan.before).await;
    assert_eq!(
        projectors.readyz(&http, Duration::from_secs(2)).await,
        Some(200),
        "ready before the outage"
    );

    let mut report = Vec::new();
    for (down_for, how, after) in &plan.outages {
        // Stop it under a batch in flight: a batch transaction waits on a lock when the
        // database goes away, so its commit fails and the projector must retry it.
        let in_flight = hold_a_batch_in_flight(&database_url).await;
        let down_at = Instant::now();
        postgres.stop(*how);
        drop(in_flight);
        let (not_ready_after, ready_while_down, silent) =
            watch_readiness(&projectors, &http, down_at, down_at + *down_for).await;
        assert!(
            projectors.process.is_alive(),
            "the projectors process must wait for Postgres, not exit"
        );
        postgres.restart();
        let up_at = Instant::now();
        let ready_again = common_ready_again(&projectors, &http, up_at).await;
        report.push(format!(
            "{how:?} down {}s: readyz non-2xx after {}ms, 2xx while down {ready_while_down}, \
             unanswered {silent}, ready again {}ms after restart",
            down_for.as_secs(),
            not_ready_after.map_or(-1, |d| d.as_millis() as i64),
            ready_again.as_millis()
        ));
        let not_ready_after = not_ready_after.unwrap_or_else(|| {
            panic!(
                "/readyz never answered non-2xx while Postgres was down ({ready_while_down} \
                 answers were 2xx, {silent} timed out)"
            )
        });
        assert!(
            not_ready_after < Duration::from_secs(5),
            "/readyz took {not_ready_after:?} to notice the outage"
        );
        assert_eq!(
            ready_while_down, 0,
            "/readyz answered 2xx while Postgres was down"
        );
        tokio::time::sleep(*after).await;
    }
    stop.store(true, Ordering::Relaxed);
    let load = running.await.expect("load");
    let held_for = started.elapsed();
    let caught_up_from = Instant::now();

    let students = PgStudents::connect(&database_url)
        .await
        .expect("students store");
    let courses = CourseStore::connect(&database_url)
        .await
        .expect("courses store");
    let settled = wait_for_read_models(&students, &courses, &load.expected, 60).await;
    let model = match &settled {
        Ok(_) => load.expected.clone(),
        Err(model) => model.clone(),
    };
    let counts = mismatch(&model, &load.expected);
    let rows = enrollment_rows(&students).await;
    let doubled_rows = rows.saturating_sub(load.expected.enrollment_rows());
    eprintln!(
        "RELIABILITY: scenario=postgres-outage-under-load commands_per_s={:.0} duration_s={:.1} \
         faults={} ({}) commands={} accepted={} caught_up_after_ms={} lost={} duplicated={} \
         false_success=0 (read models vs command side)",
        load.attempted as f64 / held_for.as_secs_f64(),
        held_for.as_secs_f64(),
        plan.outages.len(),
        report.join("; "),
        load.attempted,
        load.accepted,
        settled
            .as_ref()
            .map_or(-1, |_| caught_up_from.elapsed().as_millis() as i64),
        counts.lost,
        counts.unexpected + doubled_rows,
    );
    if let Err(model) = &settled {
        panic!(
            "read models differ from the accepted commands 60 s after the load:\n{}",
            differences(model, &load.expected)
        );
    }
    assert_eq!(doubled_rows, 0, "enrollment rows doubled");
    assert!(
        load.expected.students.len() > 50,
        "the load ran ({} students)",
        load.expected.students.len()
    );
    assert!(
        read_models(&students, &courses).await == load.expected,
        "stable"
    );
    broker.cleanup().await;
}

/// Locks the students table from another session and waits (up to 10 s) until a
/// projector batch is blocked on it; returns the session holding the lock.
async fn hold_a_batch_in_flight(database_url: &str) -> sqlx::PgConnection {
    use sqlx::Connection;
    let mut locker = sqlx::PgConnection::connect(database_url)
        .await
        .expect("locking session");
    sqlx::query("BEGIN")
        .execute(&mut locker)
        .await
        .expect("begin");
    sqlx::query("LOCK TABLE students IN EXCLUSIVE MODE")
        .execute(&mut locker)
        .await
        .expect("lock");
    let mut observer = sqlx::PgConnection::connect(database_url)
        .await
        .expect("observing session");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'",
        )
        .fetch_one(&mut observer)
        .await
        .expect("pg_stat_activity");
        if waiting > 0 {
            return locker;
        }
        assert!(
            Instant::now() < deadline,
            "no projector batch reached the students table"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (up to 30 s) for `/readyz` to answer 200 after a restart; how long it took.
async fn common_ready_again(
    projectors: &Projectors,
    http: &reqwest::Client,
    since: Instant,
) -> Duration {
    let deadline = since + Duration::from_secs(30);
    loop {
        if projectors.readyz(http, Duration::from_secs(2)).await == Some(200) {
            return since.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "/readyz not ready 30 s after Postgres came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
