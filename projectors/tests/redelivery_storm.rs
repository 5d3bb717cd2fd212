//! Duplicate publishes (same event id) and redelivery storms (short ack wait): no double
//! effect.
//!
//! The real projectors binary runs on durable consumers whose `ack_wait` the test cuts to tens
//! of milliseconds (the topology's consumers are updated in place, as `stream-admin apply`
//! would; the projector only resets them). While the real command side streams in a random
//! mix (registrations with enrollments, enrollments, unenrollments, renames, deletions), the
//! test
//! - stalls the read model again and again (holds the checkpoint rows locked for a few
//!   hundred milliseconds, as a slow database would), so every message in flight outlives its
//!   ack wait and the broker redelivers it, behind newer ones;
//! - republishes already stored events with their own `Nats-Msg-Id` (the event id), as a
//!   writer retrying an append would.
//!
//! Applying an event twice shows: a redelivered enrollment behind its unenrollment enrolls
//! again, a registration behind the deletion resurrects the student, an old rename renames
//! back, and versions move back. So afterwards the read models must equal the command side's
//! results (names, enrollments, both sides), every version must be the sequence of the
//! aggregate's last event in the stream (folded here from the stream), the projector must have
//! applied exactly as many events as its subjects hold, every duplicate publish must have been
//! refused as a duplicate, and the broker must have redelivered (so the storm happened).
//!
//! Short version (CI): 8 s of load, ack wait 50 ms, a 300 ms stall every second.
//! `FAULTS_LONG=1`: 60 s, ack wait 20 ms, a 400 ms stall every 700 ms.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{self, PullConsumer};
use async_nats::jetstream::message::PublishMessage;
use common::{
    CommandLoad, Lcg, Projectors, differences, enrollment_rows, long_version, mismatch,
    read_models, wait_for_read_models,
};
use events::{AggregateKind, Projection};
use read_models::{CourseStore, PgStudents};
use test_support::{TestBroker, TestDatabase};
use uuid::Uuid;

struct Plan {
    load_for: Duration,
    rate: u32,
    /// Courses created first (full courses refuse enrollments: more for a longer load).
    courses: usize,
    ack_wait: Duration,
    stall_every: Duration,
    stall_for: Duration,
    /// Every `duplicates_every`, this many stored events are published again.
    duplicates_every: Duration,
    duplicates: usize,
}

fn plan() -> Plan {
    let ms = Duration::from_millis;
    if long_version() {
        Plan {
            load_for: Duration::from_secs(60),
            rate: 120,
            courses: 48,
            ack_wait: ms(20),
            stall_every: ms(700),
            stall_for: ms(400),
            duplicates_every: ms(150),
            duplicates: 4,
        }
    } else {
        Plan {
            load_for: Duration::from_secs(8),
            rate: 100,
            courses: 8,
            ack_wait: ms(50),
            stall_every: ms(1000),
            stall_for: ms(300),
            duplicates_every: ms(200),
            duplicates: 3,
        }
    }
}

async fn projection_consumer(broker: &TestBroker, projection: Projection) -> PullConsumer {
    broker
        .jetstream
        .get_stream(broker.names.event_stream())
        .await
        .expect("event stream")
        .get_consumer(&broker.names.projection_consumer(projection))
        .await
        .expect("projection consumer")
}

/// Cuts the projection consumer's ack wait (an in-place update, like `stream-admin apply`).
async fn set_ack_wait(broker: &TestBroker, projection: Projection, ack_wait: Duration) {
    let mut consumer = projection_consumer(broker, projection).await;
    let mut config: consumer::Config = consumer.info().await.expect("consumer info").config.clone();
    config.ack_wait = ack_wait;
    let stream = broker
        .jetstream
        .get_stream(broker.names.event_stream())
        .await
        .expect("event stream");
    let updated = stream
        .update_consumer(config)
        .await
        .expect("updating the consumer's ack wait");
    assert_eq!(updated.cached_info().config.ack_wait, ack_wait);
}

/// The most messages the broker counted as redelivered and not yet acked at once, per
/// consumer, sampled until `stop`.
async fn sample_redeliveries(broker: &TestBroker, stop: &AtomicBool) -> HashMap<Projection, usize> {
    let mut consumers = Vec::new();
    for projection in Projection::ALL {
        consumers.push((projection, projection_consumer(broker, projection).await));
    }
    let mut most = HashMap::new();
    while !stop.load(Ordering::Relaxed) {
        for (projection, consumer) in &mut consumers {
            if let Ok(info) = consumer.info().await {
                let entry = most.entry(*projection).or_insert(0);
                *entry = (*entry).max(info.num_redelivered);
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    most
}

/// Holds every checkpoint row locked for `stall_for`, every `stall_every`, until `stop`: the
/// projector's next batch waits for the lock, and what it holds outlives the ack wait.
async fn stall_read_models(
    pool: sqlx::PgPool,
    every: Duration,
    stall_for: Duration,
    stop: Arc<AtomicBool>,
) -> usize {
    let mut stalls = 0;
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(every.saturating_sub(stall_for)).await;
        let mut tx = pool.begin().await.expect("stall transaction");
        sqlx::query("SELECT last_sequence FROM projection_checkpoints FOR UPDATE")
            .fetch_all(&mut *tx)
            .await
            .expect("locking the checkpoints");
        tokio::time::sleep(stall_for).await;
        tx.commit().await.expect("ending the stall");
        stalls += 1;
    }
    stalls
}

#[derive(Debug, Default)]
struct Duplicates {
    published: usize,
    refused_as_duplicate: usize,
    /// Stored again: a second copy of an event in the stream.
    stored: usize,
    /// Stored messages whose `Nats-Msg-Id` is not their event id.
    id_mismatch: usize,
}

/// Every `every`, publishes `count` already stored events again (random ones and the newest),
/// with the `Nats-Msg-Id` they were stored with, until `stop`.
async fn publish_duplicates(
    broker: &TestBroker,
    every: Duration,
    count: usize,
    stop: &AtomicBool,
) -> Duplicates {
    let mut stream = broker
        .jetstream
        .get_stream(broker.names.event_stream())
        .await
        .expect("event stream");
    let mut random = Lcg(7);
    let mut duplicates = Duplicates::default();
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(every).await;
        let last = stream
            .info()
            .await
            .expect("stream info")
            .state
            .last_sequence;
        if last == 0 {
            continue;
        }
        let mut picked: Vec<u64> = (1..count).map(|_| 1 + random.below(last)).collect();
        picked.push(last);
        for sequence in picked {
            let stored = stream
                .get_raw_message(sequence)
                .await
                .unwrap_or_else(|e| panic!("stream message {sequence} ({e})"));
            let event =
                test_support::read_stored(&broker.jetstream, &broker.names, &stored.payload).await;
            let Some(message_id) = stored
                .headers
                .get("Nats-Msg-Id")
                .map(|v| v.as_str().to_owned())
            else {
                duplicates.id_mismatch += 1;
                continue;
            };
            if message_id != event.metadata.event_id.to_string() {
                duplicates.id_mismatch += 1;
            }
            let ack = broker
                .jetstream
                .send_publish(
                    stored.subject.to_string(),
                    PublishMessage::build()
                        .payload(stored.payload.clone())
                        .message_id(message_id),
                )
                .await
                .expect("publishing a duplicate")
                .await
                .expect("duplicate publish acked");
            duplicates.published += 1;
            if ack.duplicate {
                duplicates.refused_as_duplicate += 1;
            } else {
                duplicates.stored += 1;
            }
        }
    }
    duplicates
}

/// The stream folded here: events per aggregate kind, the sequence of each aggregate's last
/// event (its version), and event ids stored more than once.
#[derive(Default)]
struct StreamFold {
    events: HashMap<AggregateKind, u64>,
    last_sequence_of: HashMap<Uuid, u64>,
    repeated_event_ids: usize,
}

async fn fold_stream(broker: &TestBroker) -> StreamFold {
    let mut stream = broker
        .jetstream
        .get_stream(broker.names.event_stream())
        .await
        .expect("event stream");
    let last = stream
        .info()
        .await
        .expect("stream info")
        .state
        .last_sequence;
    let mut fold = StreamFold::default();
    let mut seen = HashSet::new();
    for sequence in 1..=last {
        let message = stream
            .get_raw_message(sequence)
            .await
            .unwrap_or_else(|e| panic!("stream message {sequence} ({e})"));
        let event =
            test_support::read_stored(&broker.jetstream, &broker.names, &message.payload).await;
        *fold
            .events
            .entry(event.metadata.aggregate_kind)
            .or_default() += 1;
        fold.last_sequence_of
            .insert(event.metadata.aggregate_id, sequence);
        if !seen.insert(event.metadata.event_id) {
            fold.repeated_event_ids += 1;
        }
    }
    fold
}

/// Read-model rows whose version is not the sequence of the aggregate's last event.
async fn wrong_versions(
    students: &PgStudents,
    courses: &CourseStore,
    fold: &StreamFold,
) -> Vec<String> {
    let mut wrong = Vec::new();
    let rows: Vec<(Uuid, i64)> = sqlx::query_as("SELECT id, version FROM students")
        .fetch_all(students.pool())
        .await
        .expect("student versions");
    for (id, version) in rows {
        let want = fold.last_sequence_of.get(&id).copied();
        if u64::try_from(version).ok() != want {
            wrong.push(format!(
                "student {id}: version {version}, last event at {want:?}"
            ));
        }
    }
    let mut after = None;
    loop {
        let page = courses.list(after, 100).await.expect("courses");
        let Some(last) = page.last() else { break };
        after = Some(last.id);
        for doc in page {
            let want = fold.last_sequence_of.get(&doc.id).copied();
            if Some(doc.version) != want {
                wrong.push(format!(
                    "course {}: version {}, last event at {want:?}",
                    doc.id, doc.version
                ));
            }
            let unique: HashSet<&Uuid> = doc.student_ids.iter().collect();
            if unique.len() != doc.student_ids.len() {
                wrong.push(format!("course {}: a student listed twice", doc.id));
            }
        }
    }
    wrong
}

/// Waits (up to 30 s) until both consumers have nothing pending or unacked: the storm is
/// over and whatever the read models hold now is final.
async fn wait_until_idle(broker: &TestBroker) {
    let deadline = Instant::now() + Duration::from_secs(30);
    for projection in Projection::ALL {
        let mut consumer = projection_consumer(broker, projection).await;
        loop {
            let info = consumer.info().await.expect("consumer info");
            if info.num_pending == 0 && info.num_ack_pending == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{projection:?}: still {} pending and {} unacked",
                info.num_pending,
                info.num_ack_pending
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The deliveries beyond the first of each message: the consumer's delivery count (its
/// consumer sequence) minus the messages on its subjects.
async fn redeliveries(broker: &TestBroker, fold: &StreamFold) -> u64 {
    let mut total = 0;
    for projection in Projection::ALL {
        let mut consumer = projection_consumer(broker, projection).await;
        let delivered = consumer
            .info()
            .await
            .expect("consumer info")
            .delivered
            .consumer_sequence;
        let messages = fold
            .events
            .get(&projection.source_aggregate())
            .copied()
            .unwrap_or(0);
        total += delivered.saturating_sub(messages);
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivery_storms_and_duplicate_publishes_never_apply_an_event_twice() {
    let plan = plan();
    let broker = Arc::new(TestBroker::start().await);
    let db = TestDatabase::create().await;
    for projection in Projection::ALL {
        set_ack_wait(&broker, projection, plan.ack_wait).await;
    }
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
    let mut projectors = Projectors::start(broker.names.prefix(), &db.url);
    projectors.wait_started().await;

    let load = CommandLoad::new(&commands, 23, plan.courses).await;
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let running = {
        let (commands, stop) = (commands.clone(), stop.clone());
        tokio::spawn(async move { load.run_until(&commands, plan.rate, &stop).await })
    };
    let stalling = tokio::spawn(stall_read_models(
        db.pool.clone(),
        plan.stall_every,
        plan.stall_for,
        stop.clone(),
    ));
    let duplicating = {
        let (broker, stop) = (broker.clone(), stop.clone());
        let (every, count) = (plan.duplicates_every, plan.duplicates);
        tokio::spawn(async move { publish_duplicates(&broker, every, count, &stop).await })
    };
    let sampling_stop = Arc::new(AtomicBool::new(false));
    let sampling = {
        let (broker, stop) = (broker.clone(), sampling_stop.clone());
        tokio::spawn(async move { sample_redeliveries(&broker, &stop).await })
    };
    tokio::time::sleep(plan.load_for).await;
    stop.store(true, Ordering::Relaxed);
    let load = running.await.expect("load");
    let stalls = stalling.await.expect("stalls");
    let duplicates = duplicating.await.expect("duplicates");
    let held_for = started.elapsed();

    let mut settled = wait_for_read_models(&students, &courses, &load.expected, 60).await;
    if settled.is_ok() {
        // Redeliveries may still be on their way: judge the read models once all is acked.
        wait_until_idle(&broker).await;
        let model = read_models(&students, &courses).await;
        if model != load.expected {
            settled = Err(model);
        }
    }
    sampling_stop.store(true, Ordering::Relaxed);
    let most_redelivered = sampling.await.expect("sampling");
    let model = match &settled {
        Ok(_) => load.expected.clone(),
        Err(model) => model.clone(),
    };
    let counts = mismatch(&model, &load.expected);
    let doubled_rows = enrollment_rows(&students)
        .await
        .saturating_sub(load.expected.enrollment_rows());
    let fold = fold_stream(&broker).await;
    let wrong = wrong_versions(&students, &courses, &fold).await;
    let redelivered = redeliveries(&broker, &fold).await;
    let http = reqwest::Client::new();
    let (mut applied_twice, mut applied_short) = (0u64, false);
    let mut applied_report = Vec::new();
    for projection in Projection::ALL {
        let applied = projectors
            .metric(
                &http,
                "projection_events_applied_total",
                &format!("projection=\"{}\"", projection.as_str()),
            )
            .await
            .unwrap_or_else(|| panic!("{projection:?}: applied events metric"));
        let in_stream = fold
            .events
            .get(&projection.source_aggregate())
            .copied()
            .unwrap_or(0);
        // The counter is exact up to 2^53 events.
        let applied = applied as u64;
        applied_twice += applied.saturating_sub(in_stream);
        applied_report.push(format!(
            "{}: {applied} applied of {in_stream}",
            projection.as_str()
        ));
        applied_short |= applied < in_stream;
    }
    let duplicated = counts.unexpected
        + doubled_rows
        + fold.repeated_event_ids
        + usize::try_from(applied_twice).unwrap_or(usize::MAX);
    eprintln!(
        "RELIABILITY: scenario=projectors-redelivery-storm commands_per_s={:.0} duration_s={:.1} \
         faults={} (read-model stalls of {}ms every {}ms under ack_wait {}ms; {} duplicate \
         publishes, {} refused as duplicates) commands={} accepted={} redelivered={} \
         (most pending redelivered: {}) events=[{}] wrong_versions={} lost={} duplicated={} \
         false_success=0 (read models vs command side)",
        load.attempted as f64 / held_for.as_secs_f64(),
        held_for.as_secs_f64(),
        stalls + duplicates.published,
        plan.stall_for.as_millis(),
        plan.stall_every.as_millis(),
        plan.ack_wait.as_millis(),
        duplicates.published,
        duplicates.refused_as_duplicate,
        load.attempted,
        load.accepted,
        redelivered,
        Projection::ALL
            .iter()
            .map(|p| format!(
                "{}={}",
                p.as_str(),
                most_redelivered.get(p).copied().unwrap_or(0)
            ))
            .collect::<Vec<_>>()
            .join(" "),
        applied_report.join(", "),
        wrong.len(),
        counts.lost,
        duplicated,
    );

    if let Err(model) = &settled {
        panic!(
            "read models differ from the accepted commands:\n{}",
            differences(model, &load.expected)
        );
    }
    assert!(
        wrong.is_empty(),
        "versions that are not the aggregate's last event:\n{}",
        wrong
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(doubled_rows, 0, "enrollment rows doubled");
    assert!(
        !applied_short,
        "fewer events applied than stored, yet the read models are complete: {}",
        applied_report.join(", ")
    );
    assert_eq!(
        applied_twice,
        0,
        "events applied more than once: {}",
        applied_report.join(", ")
    );
    assert_eq!(fold.repeated_event_ids, 0, "an event stored twice");
    assert_eq!(duplicates.id_mismatch, 0, "stored without its event id");
    assert_eq!(
        duplicates.stored, 0,
        "a duplicate publish was stored instead of refused"
    );
    assert!(
        duplicates.published > 0 && duplicates.refused_as_duplicate == duplicates.published,
        "duplicates published and refused: {duplicates:?}"
    );
    assert!(
        redelivered > 0,
        "the broker redelivered nothing: the storm did not happen"
    );
    // Rule violations (a full course) are normal outcomes of the mix, but most of it must
    // have been real work.
    assert!(
        load.accepted > load.attempted / 3,
        "commands accepted: {} of {}",
        load.accepted,
        load.attempted
    );
    drop(projectors);
    db.cleanup().await;
    if let Ok(broker) = Arc::try_unwrap(broker) {
        broker.cleanup().await;
    }
}
