//! SIGTERM to the projectors process while commands stream in, again and again: each time
//! the process finishes the batch in flight, acks what it applied (the durable consumer's
//! ack floor reaches the committed checkpoint) and exits 0 within its grace period; after
//! the last restart the read models equal what the accepted commands produced, nothing
//! applied twice, nothing missing. (SIGKILL is `crash_recovery.rs`.)
//!
//! Short version (CI): 4 SIGTERMs in ~12 s of load. `FAULTS_LONG=1`: 20 in ~60 s.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{
    CommandLoad, Projectors, differences, enrollment_rows, long_version, mismatch,
    wait_for_read_models,
};
use events::Projection;
use read_models::{CourseStore, PgStudents, ProjectionStore};
use test_support::{TestBroker, TestDatabase};

/// Kubernetes' default `terminationGracePeriodSeconds` is 30; the projector must be far
/// quicker (it finishes one batch).
const GRACE: Duration = Duration::from_secs(10);

/// The consumer's ack floor (stream sequence below which every message is acked).
async fn ack_floor(broker: &TestBroker, projection: Projection) -> u64 {
    let stream = broker
        .jetstream
        .get_stream(broker.names.event_stream())
        .await
        .expect("event stream");
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = stream
        .get_consumer(&broker.names.projection_consumer(projection))
        .await
        .expect("consumer");
    consumer
        .info()
        .await
        .expect("consumer info")
        .ack_floor
        .stream_sequence
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_acks_what_was_applied_and_exits_cleanly_in_time() {
    let (rounds, run_for, rate) = if long_version() {
        (20, Duration::from_millis(2500), 120)
    } else {
        (4, Duration::from_millis(2000), 100)
    };
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
    let students = PgStudents::with_pool(db.pool.clone())
        .await
        .expect("students store");
    let courses = CourseStore::connect(&db.url).await.expect("courses store");

    let load = CommandLoad::new(&commands, 11, 10).await;
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let running = {
        let (commands, stop) = (commands.clone(), stop.clone());
        tokio::spawn(async move { load.run_until(&commands, rate, &stop).await })
    };
    let (mut exits, mut slowest_exit, mut unacked_applied) = (0, Duration::ZERO, 0u64);
    for round in 0..rounds {
        let mut projectors = Projectors::start(broker.names.prefix(), &db.url);
        projectors.wait_started().await;
        tokio::time::sleep(run_for).await;
        let before = PgStudents::checkpoint(&students).await.expect("checkpoint");
        projectors.process.sigterm();
        let asked = Instant::now();
        let status = projectors.process.exit_within(GRACE).await;
        let took = asked.elapsed();
        let status =
            status.unwrap_or_else(|| panic!("round {round}: no exit within {GRACE:?} of SIGTERM"));
        assert!(
            status.success(),
            "round {round}: exit after SIGTERM: {status:?}"
        );
        exits += 1;
        slowest_exit = slowest_exit.max(took);
        // Everything committed must be acked: otherwise the broker would hand it out again.
        for (projection, checkpoint) in [
            (
                Projection::Students,
                PgStudents::checkpoint(&students).await.expect("checkpoint"),
            ),
            (
                Projection::Courses,
                ProjectionStore::checkpoint(&courses)
                    .await
                    .expect("checkpoint"),
            ),
        ] {
            let floor = ack_floor(&broker, projection).await;
            if floor < checkpoint {
                unacked_applied += checkpoint - floor;
            }
            assert!(
                floor >= checkpoint,
                "round {round}: {projection:?} committed through {checkpoint} but acked only \
                 through {floor}"
            );
        }
        assert!(
            round == 0 || PgStudents::checkpoint(&students).await.expect("checkpoint") >= before,
            "progress"
        );
    }
    stop.store(true, Ordering::Relaxed);
    let load = running.await.expect("load");
    let held_for = started.elapsed();

    let _last = {
        let mut last = Projectors::start(broker.names.prefix(), &db.url);
        last.wait_started().await;
        last
    };
    let settled = wait_for_read_models(&students, &courses, &load.expected, 60).await;
    let model = match &settled {
        Ok(_) => load.expected.clone(),
        Err(model) => model.clone(),
    };
    let counts = mismatch(&model, &load.expected);
    let rows = enrollment_rows(&students).await;
    let doubled_rows = rows.saturating_sub(load.expected.enrollment_rows());
    eprintln!(
        "RELIABILITY: scenario=projectors-sigterm-under-load commands_per_s={:.0} \
         duration_s={:.1} faults={exits} (SIGTERM, slowest exit {}ms, grace {}s) commands={} \
         accepted={} applied_but_unacked={unacked_applied} lost={} duplicated={} false_success=0",
        load.attempted as f64 / held_for.as_secs_f64(),
        held_for.as_secs_f64(),
        slowest_exit.as_millis(),
        GRACE.as_secs(),
        load.attempted,
        load.accepted,
        counts.lost,
        counts.unexpected + doubled_rows,
    );
    if let Err(model) = &settled {
        panic!(
            "read models differ from the accepted commands:\n{}",
            differences(model, &load.expected)
        );
    }
    assert_eq!(doubled_rows, 0, "enrollment rows doubled");
    db.cleanup().await;
    broker.cleanup().await;
}
