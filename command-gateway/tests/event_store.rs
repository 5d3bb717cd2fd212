//! The JetStream event store against a real server: optimistic concurrency, atomic batches,
//! recognised retries, and reading one aggregate's subject.

use std::collections::BTreeMap;

use command_gateway::domain::AggregateId;
use command_gateway::event_store::{AppendError, EventStore, ReadFrom};
use events::{AggregateKind, Enrollment, Event, EventPayload, StudentDetails};
use test_support::TestBroker;
use uuid::Uuid;

use test_support::event;

fn registered(id: Uuid) -> Event {
    event(
        AggregateKind::Student,
        id,
        EventPayload::StudentRegistered(StudentDetails {
            name: "Grace H".into(),
            first_name: "Grace".into(),
            last_name: "Hopper".into(),
        }),
    )
}

fn enrolled(kind: AggregateKind, student_id: Uuid, course_id: Uuid) -> Event {
    let id = match kind {
        AggregateKind::Student => student_id,
        AggregateKind::Course => course_id,
    };
    event(
        kind,
        id,
        EventPayload::StudentEnrolled(Enrollment {
            student_id,
            course_id,
        }),
    )
}

async fn stored_messages(broker: &TestBroker) -> u64 {
    broker
        .jetstream
        .get_stream(broker.names.event_stream())
        .await
        .expect("stream")
        .get_info()
        .await
        .expect("info")
        .state
        .messages
}

#[tokio::test]
async fn a_second_writer_expecting_the_same_version_loses() {
    let broker = TestBroker::start().await;
    let store = EventStore::new(
        broker.jetstream.clone(),
        broker.names.clone(),
        test_support::test_kek(),
    );
    let id = Uuid::now_v7();
    let fresh = BTreeMap::from([(AggregateId::student(id), 0)]);
    store
        .append(&[registered(id)], &fresh, &mut BTreeMap::new())
        .await
        .expect("first writer wins");
    let second = store
        .append(&[registered(id)], &fresh, &mut BTreeMap::new())
        .await;
    assert!(matches!(second, Err(AppendError::Conflict)), "{second:?}");
    broker.cleanup().await;
}

#[tokio::test]
async fn a_retried_append_of_the_same_event_is_stored_once() {
    let broker = TestBroker::start().await;
    let store = EventStore::new(
        broker.jetstream.clone(),
        broker.names.clone(),
        test_support::test_kek(),
    );
    let event = registered(Uuid::now_v7());
    let fresh = BTreeMap::from([(AggregateId::student(event.metadata.aggregate_id), 0)]);
    let first = store
        .append(std::slice::from_ref(&event), &fresh, &mut BTreeMap::new())
        .await
        .expect("stored");
    // Same event id (a retry after a lost ack): the store recognises its own event on the
    // subject and answers with the original position instead of a conflict.
    let retry = store
        .append(&[event], &fresh, &mut BTreeMap::new())
        .await
        .expect("recognised, not a conflict");
    assert_eq!(first, retry);
    assert_eq!(stored_messages(&broker).await, 1);
    broker.cleanup().await;
}

#[tokio::test]
async fn a_batch_over_two_aggregates_is_stored_whole_at_consecutive_sequences() {
    let broker = TestBroker::start().await;
    let store = EventStore::new(
        broker.jetstream.clone(),
        broker.names.clone(),
        test_support::test_kek(),
    );
    let (student, course) = (Uuid::now_v7(), Uuid::now_v7());
    let batch = vec![
        registered(student),
        enrolled(AggregateKind::Student, student, course),
        enrolled(AggregateKind::Course, student, course),
    ];
    let expected = BTreeMap::from([
        (AggregateId::student(student), 0),
        (AggregateId::course(course), 0),
    ]);
    let sequences = store
        .append(&batch, &expected, &mut BTreeMap::new())
        .await
        .expect("stored");
    assert_eq!(sequences, vec![1, 2, 3]);

    // Each aggregate's subject holds exactly its own events.
    let on_student = store
        .load(AggregateId::student(student), 0, ReadFrom::AnyReplica)
        .await
        .expect("load");
    assert_eq!(
        on_student.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        vec![1, 2]
    );
    let on_course = store
        .load(AggregateId::course(course), 0, ReadFrom::Leader)
        .await
        .expect("load");
    assert_eq!(
        on_course
            .iter()
            .map(|e| (e.sequence, e.payload.clone()))
            .collect::<Vec<_>>(),
        vec![(3, batch[2].payload.clone())]
    );
    assert!(
        store
            .load(AggregateId::course(course), 3, ReadFrom::Leader)
            .await
            .expect("load")
            .is_empty()
    );

    // The same batch again (a retry after a lost ack) is recognised, not stored twice.
    let retry = store
        .append(&batch, &expected, &mut BTreeMap::new())
        .await
        .expect("recognised");
    assert_eq!(retry, sequences);
    assert_eq!(stored_messages(&broker).await, 3);
    broker.cleanup().await;
}

#[tokio::test]
async fn a_batch_with_one_stale_expectation_stores_nothing() {
    let broker = TestBroker::start().await;
    let store = EventStore::new(
        broker.jetstream.clone(),
        broker.names.clone(),
        test_support::test_kek(),
    );
    let (student, course) = (Uuid::now_v7(), Uuid::now_v7());
    store
        .append(
            &[registered(student)],
            &BTreeMap::from([(AggregateId::student(student), 0)]),
            &mut BTreeMap::new(),
        )
        .await
        .expect("registered");
    // The student is at version 1, but the batch claims to have read version 0.
    let batch = vec![
        enrolled(AggregateKind::Student, student, course),
        enrolled(AggregateKind::Course, student, course),
    ];
    let stale = BTreeMap::from([
        (AggregateId::student(student), 0),
        (AggregateId::course(course), 0),
    ]);
    let result = store.append(&batch, &stale, &mut BTreeMap::new()).await;
    assert!(matches!(result, Err(AppendError::Conflict)), "{result:?}");
    assert_eq!(
        stored_messages(&broker).await,
        1,
        "no event of the refused batch is stored"
    );
    // The course half alone would have passed its check: it was not stored either.
    assert!(
        store
            .load(AggregateId::course(course), 0, ReadFrom::Leader)
            .await
            .expect("load")
            .is_empty()
    );
    broker.cleanup().await;
}

/// The broker allows a bounded number of atomic batches in flight per stream, shared by
/// every gateway (nats-server's default is 50; here 1). A batch refused for that reason
/// stored nothing: it is retried after a short pause, not answered 503.
#[tokio::test]
async fn a_batch_over_the_brokers_in_flight_limit_waits_and_is_stored() {
    let server = test_support::NatsServer::start_with_config(
        "jetstream { limits { batch { max_inflight_per_stream: 1 } } }",
    )
    .await;
    let broker = server.broker().await;
    let store = EventStore::new(
        broker.jetstream.clone(),
        broker.names.clone(),
        test_support::test_kek(),
    );

    // Another writer's batch holds the only slot for 400 ms, then commits.
    let other = registered(Uuid::now_v7());
    let subject = broker
        .names
        .aggregate_subject(AggregateKind::Student, other.metadata.aggregate_id);
    let batch_header = |sequence: &str, commit: bool| {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Batch-Id", "held-by-another-writer");
        headers.insert("Nats-Batch-Sequence", sequence);
        if commit {
            headers.insert("Nats-Batch-Commit", "1");
        }
        headers
    };
    let payload = bytes::Bytes::from(events::encode(&other));
    broker
        .client
        .publish_with_headers(subject.clone(), batch_header("1", false), payload.clone())
        .await
        .expect("first message of the held batch");
    broker.client.flush().await.expect("flushed");
    let holder = {
        let client = broker.client.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(400)).await;
            let reply = client
                .request_with_headers(subject, batch_header("2", true), payload)
                .await
                .expect("commit of the held batch");
            String::from_utf8_lossy(&reply.payload).into_owned()
        })
    };

    let (student, course) = (Uuid::now_v7(), Uuid::now_v7());
    let batch = vec![
        registered(student),
        enrolled(AggregateKind::Student, student, course),
        enrolled(AggregateKind::Course, student, course),
    ];
    let expected = BTreeMap::from([
        (AggregateId::student(student), 0),
        (AggregateId::course(course), 0),
    ]);
    let stored = store.append(&batch, &expected, &mut BTreeMap::new()).await;
    let held = holder.await.expect("holder");
    assert!(held.contains("\"seq\""), "the held batch committed: {held}");
    let sequences = stored.expect("the batch waited for a slot instead of failing");
    assert_eq!(sequences.len(), 3);
    assert_eq!(stored_messages(&broker).await, 2 + 3);
}
