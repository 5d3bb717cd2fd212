//! The JetStream event store against a real server: optimistic concurrency, atomic batches,
//! recognised retries, and reading one aggregate's subject.

use std::collections::BTreeMap;

use command_gateway::domain::AggregateId;
use command_gateway::event_store::{AppendError, EventStore};
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
    let store = EventStore::new(broker.jetstream.clone(), broker.names.clone());
    let id = Uuid::now_v7();
    let fresh = BTreeMap::from([(AggregateId::student(id), 0)]);
    store
        .append(&[registered(id)], &fresh)
        .await
        .expect("first writer wins");
    let second = store.append(&[registered(id)], &fresh).await;
    assert!(matches!(second, Err(AppendError::Conflict)), "{second:?}");
    broker.cleanup().await;
}

#[tokio::test]
async fn a_retried_append_of_the_same_event_is_stored_once() {
    let broker = TestBroker::start().await;
    let store = EventStore::new(broker.jetstream.clone(), broker.names.clone());
    let event = registered(Uuid::now_v7());
    let fresh = BTreeMap::from([(AggregateId::student(event.metadata.aggregate_id), 0)]);
    let first = store
        .append(std::slice::from_ref(&event), &fresh)
        .await
        .expect("stored");
    // Same event id (a retry after a lost ack): the store recognises its own event on the
    // subject and answers with the original position instead of a conflict.
    let retry = store
        .append(&[event], &fresh)
        .await
        .expect("recognised, not a conflict");
    assert_eq!(first, retry);
    assert_eq!(stored_messages(&broker).await, 1);
    broker.cleanup().await;
}

#[tokio::test]
async fn a_batch_over_two_aggregates_is_stored_whole_at_consecutive_sequences() {
    let broker = TestBroker::start().await;
    let store = EventStore::new(broker.jetstream.clone(), broker.names.clone());
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
    let sequences = store.append(&batch, &expected).await.expect("stored");
    assert_eq!(sequences, vec![1, 2, 3]);

    // Each aggregate's subject holds exactly its own events.
    let on_student = store
        .load(AggregateId::student(student), 0)
        .await
        .expect("load");
    assert_eq!(
        on_student.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(),
        vec![1, 2]
    );
    let on_course = store
        .load(AggregateId::course(course), 0)
        .await
        .expect("load");
    assert_eq!(on_course, vec![(3, batch[2].payload.clone())]);
    assert!(
        store
            .load(AggregateId::course(course), 3)
            .await
            .expect("load")
            .is_empty()
    );

    // The same batch again (a retry after a lost ack) is recognised, not stored twice.
    let retry = store.append(&batch, &expected).await.expect("recognised");
    assert_eq!(retry, sequences);
    assert_eq!(stored_messages(&broker).await, 3);
    broker.cleanup().await;
}

#[tokio::test]
async fn a_batch_with_one_stale_expectation_stores_nothing() {
    let broker = TestBroker::start().await;
    let store = EventStore::new(broker.jetstream.clone(), broker.names.clone());
    let (student, course) = (Uuid::now_v7(), Uuid::now_v7());
    store
        .append(
            &[registered(student)],
            &BTreeMap::from([(AggregateId::student(student), 0)]),
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
    let result = store.append(&batch, &stale).await;
    assert!(matches!(result, Err(AppendError::Conflict)), "{result:?}");
    assert_eq!(
        stored_messages(&broker).await,
        1,
        "no event of the refused batch is stored"
    );
    // The course half alone would have passed its check: it was not stored either.
    assert!(
        store
            .load(AggregateId::course(course), 0)
            .await
            .expect("load")
            .is_empty()
    );
    broker.cleanup().await;
}
