//! The students projection against real Postgres and NATS: exactly once in effect, ordered,
//! resumable, and poison events dead-lettered.

use std::time::Duration;

use bytes::Bytes;
use events::{AggregateKind, Enrollment, Event, EventPayload, StudentDetails};
use std::sync::Arc;

use projectors::{ProjectionProgress, ProjectionRunner};
use read_models::{PgStudents, ProjectionStore};
use service_kit::data_keys::DataKeys;
use service_kit::event_reader::EventReader;
use test_support::{TestBroker, TestDatabase, eventually};
use tokio::sync::oneshot;
use uuid::Uuid;

fn event(student_id: Uuid, payload: EventPayload) -> Event {
    test_support::event(AggregateKind::Student, student_id, payload)
}

fn registered(student_id: Uuid, name: &str) -> Event {
    event(
        student_id,
        EventPayload::StudentRegistered(StudentDetails {
            name: name.into(),
            first_name: "First".into(),
            last_name: "Last".into(),
        }),
    )
}

fn enrolled(student_id: Uuid, course_id: Uuid) -> Event {
    event(
        student_id,
        EventPayload::StudentEnrolled(Enrollment {
            student_id,
            course_id,
        }),
    )
}

/// Everything in the read model, in a comparable form.
async fn snapshot(store: &PgStudents) -> Vec<(Uuid, String, i64, Vec<Uuid>)> {
    let students: Vec<(Uuid, String, i64)> =
        sqlx::query_as("SELECT id, name, version FROM students ORDER BY id")
            .fetch_all(store.pool())
            .await
            .expect("students");
    let mut rows = Vec::new();
    for (id, name, version) in students {
        let courses: Vec<Uuid> = sqlx::query_scalar(
            "SELECT course_id FROM student_courses WHERE student_id = $1 ORDER BY course_id",
        )
        .bind(id)
        .fetch_all(store.pool())
        .await
        .expect("courses");
        rows.push((id, name, version, courses));
    }
    rows
}

#[tokio::test]
async fn a_batch_delivered_twice_changes_nothing_the_second_time() {
    let db = TestDatabase::create().await;
    let store = PgStudents::with_pool(db.pool.clone())
        .await
        .expect("migrated");
    let (ada, grace, course) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let batch = vec![
        (1, registered(ada, "Ada L")),
        (2, enrolled(ada, course)),
        (3, registered(grace, "Grace H")),
    ];
    let first = store.apply_batch(&batch, 3).await.expect("first delivery");
    assert_eq!((first.applied, first.skipped, first.checkpoint), (3, 0, 3));
    let after_first = snapshot(&store).await;
    assert_eq!(after_first.len(), 2);
    assert_eq!(
        after_first.iter().find(|s| s.0 == ada).expect("ada").3,
        vec![course]
    );

    let second = store.apply_batch(&batch, 3).await.expect("redelivery");
    assert_eq!(
        (second.applied, second.skipped, second.checkpoint),
        (0, 3, 3)
    );
    assert_eq!(snapshot(&store).await, after_first);

    // A batch overlapping the checkpoint applies only the new part.
    let overlap = vec![
        (3, registered(grace, "Grace H")),
        (4, enrolled(grace, course)),
    ];
    let third = store.apply_batch(&overlap, 4).await.expect("overlap");
    assert_eq!((third.applied, third.skipped, third.checkpoint), (1, 1, 4));
    db.cleanup().await;
}

/// The checkpoint is locked, read and moved forward in one statement: concurrent writers of
/// the same batch apply it once between them, and an older batch never moves it back.
#[tokio::test]
async fn concurrent_batches_apply_once_and_the_checkpoint_never_moves_back() {
    let db = TestDatabase::create().await;
    let store = PgStudents::with_pool(db.pool.clone())
        .await
        .expect("migrated");
    let ada = Uuid::now_v7();
    let first = vec![(1, registered(ada, "Ada L"))];
    store.apply_batch(&first, 1).await.expect("first batch");
    // Enrollments of a stored student: a writer that missed the checkpoint would apply
    // them again (registrations would only be refused as already stored).
    let batch: Vec<(u64, Event)> = (2..=9)
        .map(|sequence| (sequence, enrolled(ada, Uuid::now_v7())))
        .collect();
    let writers: Vec<_> = (0..6)
        .map(|_| {
            let (store, batch) = (store.clone(), batch.clone());
            tokio::spawn(async move { store.apply_batch(&batch, 9).await })
        })
        .collect();
    let mut applied = Vec::new();
    for writer in writers {
        let outcome = writer.await.expect("joined").expect("applied");
        assert_eq!(outcome.checkpoint, 9);
        applied.push(outcome.applied);
    }
    applied.sort_unstable();
    assert_eq!(applied, [0, 0, 0, 0, 0, 8], "each writer's applied count");
    let students = snapshot(&store).await;
    assert_eq!(
        (students.len(), students[0].2, students[0].3.len()),
        (1, 9, 8)
    );

    let stale = store.apply_batch(&first, 1).await.expect("stale batch");
    assert_eq!((stale.applied, stale.skipped, stale.checkpoint), (0, 1, 9));
    assert_eq!(store.checkpoint().await.expect("checkpoint"), 9);
    db.cleanup().await;
}

#[tokio::test]
async fn every_student_event_type_lands_in_the_read_model() {
    let db = TestDatabase::create().await;
    let store = PgStudents::with_pool(db.pool.clone())
        .await
        .expect("migrated");
    let (ada, gone, c1, c2) = (
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
    );
    let updated = event(
        ada,
        EventPayload::StudentUpdated(StudentDetails {
            name: "Ada King".into(),
            first_name: "Augusta".into(),
            last_name: "King".into(),
        }),
    );
    let unenrolled = event(
        ada,
        EventPayload::StudentUnenrolled(Enrollment {
            student_id: ada,
            course_id: c1,
        }),
    );
    let batch = vec![
        (10, registered(ada, "Ada L")),
        (11, enrolled(ada, c1)),
        (12, enrolled(ada, c2)),
        (13, updated),
        (14, unenrolled),
        (15, registered(gone, "Gone Soon")),
        (16, enrolled(gone, c1)),
        (17, event(gone, EventPayload::StudentDeleted)),
    ];
    store.apply_batch(&batch, 17).await.expect("applied");
    assert_eq!(
        snapshot(&store).await,
        vec![(ada, "Ada King".to_owned(), 14, vec![c2])],
        "deleted student and its enrollments are gone; versions follow the last event"
    );
    let orphans: i64 =
        sqlx::query_scalar("SELECT count(*) FROM student_courses WHERE student_id = $1")
            .bind(gone)
            .fetch_one(store.pool())
            .await
            .expect("count");
    assert_eq!(orphans, 0);
    db.cleanup().await;
}

async fn publish(broker: &TestBroker, student_id: Uuid, payload: Bytes) -> u64 {
    broker
        .jetstream
        .publish(
            broker
                .names
                .aggregate_subject(AggregateKind::Student, student_id),
            payload,
        )
        .await
        .expect("publish")
        .await
        .expect("ack")
        .sequence
}

struct RunningProjection {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

fn start_projection<S: ProjectionStore>(broker: &TestBroker, store: &S) -> RunningProjection {
    start_projection_reading(broker, store, EventReader::without_keys())
}

fn start_projection_reading<S: ProjectionStore>(
    broker: &TestBroker,
    store: &S,
    reader: EventReader,
) -> RunningProjection {
    let runner = ProjectionRunner {
        reader,
        jetstream: broker.jetstream.clone(),
        names: broker.names.clone(),
        store: store.clone(),
        batch_size: 100,
        cache: None,
        progress: Arc::new(ProjectionProgress::default()),
        lease: projectors::lease::LeaseSettings::default(),
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(runner.run(async move {
        let _ = stopped.await;
    }));
    RunningProjection { stop, task }
}

impl RunningProjection {
    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("stops promptly")
            .expect("no panic")
            .expect("clean exit");
    }
}

async fn student_count(store: &PgStudents) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM students")
        .fetch_one(store.pool())
        .await
        .expect("count")
}

#[tokio::test]
async fn the_runner_projects_live_events_and_resumes_after_a_restart_without_doubling() {
    let broker = TestBroker::start().await;
    let db = TestDatabase::create().await;
    let store = PgStudents::with_pool(db.pool.clone())
        .await
        .expect("migrated");
    let course = Uuid::now_v7();
    let mut last = 0;
    for n in 0..3 {
        let id = Uuid::now_v7();
        publish(
            &broker,
            id,
            events::encode(&registered(id, &format!("Student {n}"))).into(),
        )
        .await;
        last = publish(&broker, id, events::encode(&enrolled(id, course)).into()).await;
    }
    let running = start_projection(&broker, &store);
    eventually(10, "3 students projected", || async {
        (PgStudents::checkpoint(&store).await.ok()? == last).then_some(())
    })
    .await;
    assert_eq!(student_count(&store).await, 3);
    running.stop().await;

    // While stopped, more events arrive; a new runner picks up exactly after the checkpoint.
    for n in 3..5 {
        let id = Uuid::now_v7();
        publish(
            &broker,
            id,
            events::encode(&registered(id, &format!("Student {n}"))).into(),
        )
        .await;
        last = publish(&broker, id, events::encode(&enrolled(id, course)).into()).await;
    }
    let running = start_projection(&broker, &store);
    eventually(10, "5 students projected", || async {
        (PgStudents::checkpoint(&store).await.ok()? == last).then_some(())
    })
    .await;
    running.stop().await;
    let rows = snapshot(&store).await;
    assert_eq!(rows.len(), 5);
    assert!(
        rows.iter().all(|row| row.3 == vec![course]),
        "one enrollment each: {rows:?}"
    );
    db.cleanup().await;
    broker.cleanup().await;
}

#[tokio::test]
async fn a_garbage_message_is_dead_lettered_and_later_events_still_apply() {
    let broker = TestBroker::start().await;
    let db = TestDatabase::create().await;
    let store = PgStudents::with_pool(db.pool.clone())
        .await
        .expect("migrated");
    let poisoned = Uuid::now_v7();
    let garbage_sequence =
        publish(&broker, poisoned, Bytes::from_static(b"\xffnot protobuf")).await;
    let ada = Uuid::now_v7();
    let last = publish(
        &broker,
        ada,
        events::encode(&registered(ada, "Ada L")).into(),
    )
    .await;

    let running = start_projection(&broker, &store);
    eventually(10, "the valid event projected", || async {
        (PgStudents::checkpoint(&store).await.ok()? == last).then_some(())
    })
    .await;
    running.stop().await;
    assert_eq!(student_count(&store).await, 1);

    let dead_letters = broker
        .jetstream
        .get_stream(broker.names.dead_letter_stream())
        .await
        .expect("dead-letter stream");
    assert_eq!(
        dead_letters.get_info().await.expect("info").state.messages,
        1
    );
    let letter = dead_letters.get_raw_message(1).await.expect("dead letter");
    let headers = letter.headers;
    assert_eq!(
        headers
            .get(projectors::dead_letters::ORIGINAL_SEQUENCE_HEADER)
            .map(|v| v.as_str()),
        Some(garbage_sequence.to_string().as_str())
    );
    let reason = headers
        .get(projectors::dead_letters::REASON_HEADER)
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default();
    assert!(reason.starts_with("undecodable"), "{reason}");
    assert_eq!(&letter.payload[..], b"\xffnot protobuf");
    db.cleanup().await;
    broker.cleanup().await;
}

#[tokio::test]
async fn events_fetched_but_never_committed_by_a_dead_projector_are_applied_in_order_by_the_next() {
    let broker = TestBroker::start().await;
    let db = TestDatabase::create().await;
    let store = PgStudents::with_pool(db.pool.clone())
        .await
        .expect("migrated");
    let mut ids = Vec::new();
    for n in 0..10 {
        let id = Uuid::now_v7();
        ids.push(id);
        publish(
            &broker,
            id,
            events::encode(&registered(id, &format!("Early {n}"))).into(),
        )
        .await;
    }
    // A projector fetches five events and dies before committing them: they stay delivered
    // and unacked, and the broker would hand them out again only after ack_wait (30 s).
    let consumer: async_nats::jetstream::consumer::PullConsumer = broker
        .jetstream
        .get_consumer_from_stream(
            broker
                .names
                .projection_consumer(events::Projection::Students),
            broker.names.event_stream(),
        )
        .await
        .expect("consumer");
    let mut fetched = consumer
        .fetch()
        .max_messages(5)
        .messages()
        .await
        .expect("fetch");
    let mut taken = 0;
    while let Some(message) = futures::StreamExt::next(&mut fetched).await {
        message.expect("message");
        taken += 1;
    }
    assert_eq!(taken, 5);
    drop(fetched);
    let mut last = 0;
    for n in 0..5 {
        let id = Uuid::now_v7();
        ids.push(id);
        last = publish(
            &broker,
            id,
            events::encode(&registered(id, &format!("Late {n}"))).into(),
        )
        .await;
    }
    // The next projector must not let the later events overtake the five.
    let running = start_projection(&broker, &store);
    eventually(10, "all 15 students projected", || async {
        (PgStudents::checkpoint(&store).await.ok()? == last).then_some(())
    })
    .await;
    running.stop().await;
    let projected: Vec<Uuid> = snapshot(&store)
        .await
        .into_iter()
        .map(|row| row.0)
        .collect();
    ids.sort();
    assert_eq!(projected, ids, "nothing skipped");
    db.cleanup().await;
    broker.cleanup().await;
}

/// A read model that refuses one particular event, as a bug or a constraint would.
#[derive(Clone)]
struct RefusingStore {
    inner: PgStudents,
    poison: Uuid,
}

impl ProjectionStore for RefusingStore {
    fn projection(&self) -> events::Projection {
        events::Projection::Students
    }

    async fn checkpoint(&self) -> Result<u64, read_models::StoreError> {
        ProjectionStore::checkpoint(&self.inner).await
    }

    async fn apply_batch(
        &self,
        batch: &[(u64, Event)],
        through_sequence: u64,
    ) -> Result<read_models::BatchOutcome, read_models::StoreError> {
        if batch
            .iter()
            .any(|(_, e)| e.metadata.event_id == self.poison)
        {
            return Err(read_models::StoreError::Refused("poisoned".into()));
        }
        ProjectionStore::apply_batch(&self.inner, batch, through_sequence).await
    }

    async fn ping(&self) -> Result<(), read_models::StoreError> {
        Ok(())
    }

    async fn claim(&self, token: u64) -> Result<(), read_models::StoreError> {
        ProjectionStore::claim(&self.inner, token).await
    }
}

#[tokio::test]
async fn an_event_the_read_model_keeps_refusing_is_dead_lettered_and_the_rest_applied() {
    let broker = TestBroker::start().await;
    let db = TestDatabase::create().await;
    let inner = PgStudents::with_pool(db.pool.clone())
        .await
        .expect("migrated");
    let (before, poisoned, after) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let poison_event = registered(poisoned, "Poison Ivy");
    let store = RefusingStore {
        inner: inner.clone(),
        poison: poison_event.metadata.event_id,
    };
    publish(
        &broker,
        before,
        events::encode(&registered(before, "Before")).into(),
    )
    .await;
    let poison_sequence = publish(&broker, poisoned, events::encode(&poison_event).into()).await;
    let last = publish(
        &broker,
        after,
        events::encode(&registered(after, "After")).into(),
    )
    .await;

    let running = start_projection(&broker, &store);
    eventually(20, "the projection moved past the poison", || async {
        (PgStudents::checkpoint(&inner).await.ok()? == last).then_some(())
    })
    .await;
    running.stop().await;
    let names: Vec<String> = snapshot(&inner)
        .await
        .into_iter()
        .map(|row| row.1)
        .collect();
    assert_eq!(names.len(), 2);
    assert!(names.contains(&"Before".to_owned()) && names.contains(&"After".to_owned()));

    let dead_letters = broker
        .jetstream
        .get_stream(broker.names.dead_letter_stream())
        .await
        .expect("dead-letter stream");
    let letter = dead_letters
        .get_raw_message(1)
        .await
        .expect("one dead letter");
    assert_eq!(
        letter
            .headers
            .get(projectors::dead_letters::ORIGINAL_SEQUENCE_HEADER)
            .map(|v| v.as_str().to_owned()),
        Some(poison_sequence.to_string())
    );
    let metrics = service_kit::metrics::render();
    assert!(
        metrics
            .contains(r#"projection_dead_letters_total{projection="students",reason="refused"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"projection_events_applied_total{projection="students"} 2"#),
        "{metrics}"
    );
    db.cleanup().await;
    broker.cleanup().await;
}

/// Streams, a database and the data-key bucket of one test (with the test KEK).
async fn with_data_keys() -> (TestBroker, TestDatabase, PgStudents, DataKeys) {
    let broker = TestBroker::start().await;
    let db = TestDatabase::create().await;
    let store = PgStudents::with_pool(db.pool.clone())
        .await
        .expect("migrated");
    let keys = DataKeys::bind(&broker.jetstream, &broker.names, test_support::test_kek())
        .await
        .expect("bucket");
    (broker, db, store, keys)
}

/// Sealed names (schema version 2) go through the one reading path: a projector without
/// the KEK applies nothing and dead-letters nothing (it waits for its configuration); with
/// it, the names are opened into the read model. A sealed value that does not open with the
/// student's key is dead-lettered like any undecodable event.
#[tokio::test]
async fn sealed_names_are_opened_with_the_students_key_and_wait_without_it() {
    let (broker, db, store, keys) = with_data_keys().await;
    let (ada, grace) = (Uuid::now_v7(), Uuid::now_v7());
    let (ada_at, ada_key) = keys.allocate().await.expect("key");
    let (grace_at, _) = keys.allocate().await.expect("key");
    publish(
        &broker,
        ada,
        events::encode_sealed(&registered(ada, "Zebulon Q"), ada_at, &ada_key).into(),
    )
    .await;

    let keyless = start_projection(&broker, &store);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(student_count(&store).await, 0, "applied without its key");
    assert_eq!(
        broker.dead_letter_count().await,
        0,
        "dead-lettered for a missing KEK"
    );
    keyless.stop().await;

    let running = start_projection_reading(&broker, &store, EventReader::new(keys.clone()));
    let names = eventually(20, "the sealed registration to be applied", || async {
        let rows = snapshot(&store).await;
        (!rows.is_empty()).then(|| rows.into_iter().map(|r| r.1).collect::<Vec<_>>())
    })
    .await;
    assert_eq!(names, vec!["Zebulon Q".to_owned()]);

    // Grace's event sealed with Ada's key but naming Grace's: it never opens.
    publish(
        &broker,
        grace,
        events::encode_sealed(&registered(grace, "Grace H"), grace_at, &ada_key).into(),
    )
    .await;
    eventually(20, "the unopenable event to be dead-lettered", || async {
        (broker.dead_letter_count().await == 1).then_some(())
    })
    .await;
    running.stop().await;
    broker.cleanup().await;
    db.cleanup().await;
}

/// A gateway destroys an erased student's key before it answers; one that stopped after
/// appending the erasure leaves the key alive. The projectors destroy the key the erasure
/// names when they apply it, so it is gone in any case. Fails without that step: the key
/// still opens.
#[tokio::test]
async fn the_projectors_destroy_the_key_an_erasure_names() {
    let (broker, db, store, keys) = with_data_keys().await;
    let ada = Uuid::now_v7();
    let (ada_at, ada_key) = keys.allocate().await.expect("key");
    publish(
        &broker,
        ada,
        events::encode_sealed(&registered(ada, "Zebulon Q"), ada_at, &ada_key).into(),
    )
    .await;
    publish(
        &broker,
        ada,
        events::encode(&test_support::event(
            AggregateKind::Student,
            ada,
            EventPayload::StudentDeleted,
        ))
        .into(),
    )
    .await;
    // What a gateway stopped before its destroy leaves: the erasure, and the key alive.
    let erasure = EventPayload::StudentErased(events::Erasure { key: Some(ada_at) });
    publish(
        &broker,
        ada,
        events::encode(&test_support::event(AggregateKind::Student, ada, erasure)).into(),
    )
    .await;
    assert!(matches!(
        keys.lookup(ada_at).await.expect("lookup"),
        service_kit::data_keys::KeyLookup::Key(_)
    ));

    let running = start_projection_reading(&broker, &store, EventReader::new(keys.clone()));
    eventually(20, "the erased student's key destroyed", || async {
        matches!(
            keys.lookup(ada_at).await.ok()?,
            service_kit::data_keys::KeyLookup::Erased
        )
        .then_some(())
    })
    .await;
    assert_eq!(student_count(&store).await, 0);
    assert_eq!(broker.dead_letter_count().await, 0);
    running.stop().await;
    broker.cleanup().await;
    db.cleanup().await;
}
