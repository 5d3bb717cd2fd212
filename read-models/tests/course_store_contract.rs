//! One contract for every course-store adapter: the same batches must give the same
//! documents, exactly once in effect. Runs on Postgres always, on MongoDB when
//! `MONGODB_URL` names a server.

use events::{AggregateKind, CourseDetails, Enrollment, Event, EventPayload};
use read_models::course_document::CourseDocument;
use read_models::{CourseStore, ProjectionStore};
use test_support::TestDatabase;
use uuid::Uuid;

fn event(course: Uuid, payload: EventPayload) -> Event {
    test_support::event(AggregateKind::Course, course, payload)
}

fn details(name: &str) -> CourseDetails {
    CourseDetails {
        name: name.into(),
        description: "About it".into(),
        discipline: "Maths".into(),
        teacher: "Noether".into(),
    }
}

fn created(course: Uuid, name: &str) -> Event {
    event(course, EventPayload::CourseCreated(details(name)))
}

fn enrolled(course: Uuid, student: Uuid) -> Event {
    event(
        course,
        EventPayload::StudentEnrolled(Enrollment {
            student_id: student,
            course_id: course,
        }),
    )
}

fn unenrolled(course: Uuid, student: Uuid) -> Event {
    event(
        course,
        EventPayload::StudentUnenrolled(Enrollment {
            student_id: student,
            course_id: course,
        }),
    )
}

async fn all(store: &CourseStore) -> Vec<CourseDocument> {
    store.list(None, 100).await.expect("list")
}

/// The contract itself. `reader` is the same store connected as query-api connects.
async fn course_store_contract(store: CourseStore, reader: CourseStore) {
    assert_eq!(
        ProjectionStore::checkpoint(&store)
            .await
            .expect("checkpoint"),
        0
    );
    let (algebra, geometry, gone) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let (s1, s2, s3) = (Uuid::from_u128(3), Uuid::from_u128(1), Uuid::from_u128(2));

    // Every event type, several courses in one batch, sorted student ids.
    let batch = vec![
        (1, created(algebra, "Algebra")),
        (2, enrolled(algebra, s1)),
        (3, enrolled(algebra, s2)),
        (4, created(geometry, "Geometry")),
        (5, enrolled(algebra, s3)),
        (6, unenrolled(algebra, s2)),
        (
            7,
            event(
                geometry,
                EventPayload::CourseUpdated(details("Geometry II")),
            ),
        ),
        (8, created(gone, "Gone Soon")),
        (9, enrolled(gone, s1)),
        (10, event(gone, EventPayload::CourseDeleted)),
    ];
    let outcome = ProjectionStore::apply_batch(&store, &batch, 10)
        .await
        .expect("applied");
    assert_eq!(
        (outcome.applied, outcome.skipped, outcome.checkpoint),
        (10, 0, 10)
    );
    let algebra_doc = store.get(algebra).await.expect("get").expect("exists");
    assert_eq!(algebra_doc.name, "Algebra");
    assert_eq!(algebra_doc.student_ids, vec![s3, s1], "sorted, s2 removed");
    assert_eq!(algebra_doc.version, 6);
    let geometry_doc = store.get(geometry).await.expect("get").expect("exists");
    assert_eq!(geometry_doc.name, "Geometry II");
    assert_eq!(geometry_doc.version, 7);
    assert_eq!(store.get(gone).await.expect("get"), None, "deleted");
    let before = all(&store).await;
    assert_eq!(before.len(), 2);

    // The same batch again: nothing changes.
    let again = ProjectionStore::apply_batch(&store, &batch, 10)
        .await
        .expect("redelivered");
    assert_eq!((again.applied, again.skipped), (0, 10));
    assert_eq!(all(&store).await, before);

    // Overlap: only the new part applies; an event for an unknown course changes nothing.
    let unknown = Uuid::now_v7();
    let overlap = vec![
        (9, enrolled(gone, s1)),
        (10, event(gone, EventPayload::CourseDeleted)),
        (11, enrolled(geometry, s2)),
        (12, enrolled(unknown, s1)),
    ];
    let outcome = ProjectionStore::apply_batch(&store, &overlap, 12)
        .await
        .expect("applied");
    assert_eq!(
        (outcome.applied, outcome.skipped, outcome.checkpoint),
        (2, 2, 12)
    );
    assert_eq!(store.get(gone).await.expect("get"), None, "not resurrected");
    assert_eq!(store.get(unknown).await.expect("get"), None);
    assert_eq!(
        store
            .get(geometry)
            .await
            .expect("get")
            .expect("exists")
            .student_ids,
        vec![s2]
    );

    // A batch of dead letters only moves the checkpoint.
    let moved = ProjectionStore::apply_batch(&store, &[], 15)
        .await
        .expect("moved");
    assert_eq!(moved.checkpoint, 15);
    assert_eq!(
        ProjectionStore::checkpoint(&store)
            .await
            .expect("checkpoint"),
        15
    );

    // Keyset pages in id order.
    let first = store.list(None, 1).await.expect("page");
    let second = store.list(Some(first[0].id), 1).await.expect("page");
    let mut ids = vec![algebra, geometry];
    ids.sort();
    assert_eq!(vec![first[0].id, second[0].id], ids);
    assert!(
        store
            .list(Some(second[0].id), 1)
            .await
            .expect("page")
            .is_empty()
    );
    ProjectionStore::ping(&store).await.expect("ping");

    // A reader serves what the writer wrote, and skips what it deleted.
    assert_eq!(
        reader.list(None, 100).await.expect("list"),
        all(&store).await
    );
    assert_eq!(reader.get(gone).await.expect("get"), None);
    assert_eq!(
        reader.get_many(&[algebra, gone]).await.expect("get_many"),
        vec![algebra_doc_now(&store, algebra).await]
    );
    ProjectionStore::ping(&reader).await.expect("ping");
}

async fn algebra_doc_now(store: &CourseStore, id: Uuid) -> CourseDocument {
    store.get(id).await.expect("get").expect("exists")
}

#[tokio::test]
async fn the_postgres_adapter_keeps_the_course_store_contract() {
    let db = TestDatabase::create().await;
    let store = CourseStore::connect(&db.url).await.expect("connect");
    let reader = CourseStore::connect_reader(&db.url, None)
        .await
        .expect("connect");
    course_store_contract(store, reader).await;
    db.cleanup().await;
}

#[tokio::test]
async fn the_mongodb_adapter_keeps_the_course_store_contract() {
    let Some(url) = test_support::mongo::mongo_url("the MongoDB course-store contract") else {
        return;
    };
    let store = CourseStore::connect(&url)
        .await
        .expect("connect to MONGODB_URL");
    let reader = CourseStore::connect_reader(&url, None)
        .await
        .expect("connect to MONGODB_URL");
    course_store_contract(store, reader).await;
}
