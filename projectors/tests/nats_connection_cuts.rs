//! The projectors' NATS connection cut again and again under command load (a TCP proxy
//! between them drops every connection about once a second): messages in flight at a cut
//! must never be skipped. Before the projection detected delivery gaps and reconnects, the
//! deliveries lost in a cut were acked by the ack-all of a later message and skipped by
//! the checkpoint: students missing from the read model for good, with lag 0 and no dead
//! letter. Afterwards the read models must equal what the accepted commands produced.
//!
//! Short version (CI): 8 cuts in ~10 s. `FAULTS_LONG=1`: 40 cuts in ~50 s.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{CommandLoad, Projectors, differences, long_version, mismatch, wait_for_read_models};
use read_models::{CourseStore, PgStudents};
use test_support::{TcpProxy, TestBroker, TestDatabase};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutting_the_projectors_nats_connection_under_load_loses_nothing() {
    let (cuts, rate) = if long_version() { (40, 200) } else { (8, 200) };
    let broker = TestBroker::start().await;
    let db = TestDatabase::create().await;
    let state = command_gateway::app_state(
        broker.client.clone(),
        broker.names.clone(),
        test_support::test_kek(),
    )
    .await
    .expect("command side");
    let commands = state.commands.clone();
    let proxy = TcpProxy::start(test_support::nats_addr()).await;
    let mut projectors = Projectors::start_with(
        broker.names.prefix(),
        &db.url,
        &[("NATS_URL", proxy.nats_url().as_str())],
    );
    projectors.wait_started().await;

    let load = CommandLoad::new(&commands, 7, 10).await;
    let stop = Arc::new(AtomicBool::new(false));
    let running = {
        let (commands, stop) = (commands.clone(), stop.clone());
        tokio::spawn(async move { load.run_until(&commands, rate, &stop).await })
    };
    let started = Instant::now();
    for n in 0..cuts {
        // Uneven gaps, so cuts land at every point of a batch's life.
        tokio::time::sleep(Duration::from_millis(900 + 150 * (n % 4))).await;
        proxy.cut().await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let load = running.await.expect("load task");
    let duration = started.elapsed();

    let students = PgStudents::with_pool(db.pool.clone())
        .await
        .expect("students store");
    let courses = CourseStore::connect(&db.url).await.expect("courses store");
    let caught_up = wait_for_read_models(&students, &courses, &load.expected, 60).await;
    let model = common::read_models(&students, &courses).await;
    let found = mismatch(&model, &load.expected);
    if caught_up.is_err() {
        panic!(
            "after {cuts} cuts the read models differ from the accepted commands \
             ({} lost, {} unexpected):\n{}",
            found.lost,
            found.unexpected,
            differences(&model, &load.expected)
        );
    }
    assert!(projectors.process.is_alive(), "the projectors exited");
    assert!(
        load.accepted > 500,
        "the load ran: {} accepted",
        load.accepted
    );
    let dead_letters = broker.dead_letter_count().await;
    assert_eq!(dead_letters, 0);
    println!(
        "RELIABILITY: scenario=projectors-nats-connection-cuts commands_per_s={:.0} duration_s={:.1} \
         faults={} (TCP connection to NATS cut) commands={} accepted={} students={} \
         lost={} unexpected={} dead_letters={dead_letters}",
        load.attempted as f64 / duration.as_secs_f64(),
        duration.as_secs_f64(),
        proxy.cuts(),
        load.attempted,
        load.accepted,
        load.expected.students.len(),
        found.lost,
        found.unexpected,
    );
    db.cleanup().await;
    broker.cleanup().await;
}
