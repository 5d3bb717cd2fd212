//! MongoDB-only tests of the course store: what its lack of transactions makes it do
//! differently from Postgres (tombstones, compare-and-set writes, a reader that creates
//! nothing, rebuilds racing batches). Each test gets its own database on `MONGODB_URL` and
//! says SKIPPED when it is not set.

use events::{AggregateKind, CourseDetails, Enrollment, Event, EventPayload};
use mongodb::bson::{Document, doc};
use read_models::ProjectionStore;
use read_models::mongo_courses::MongoCourses;
use uuid::Uuid;

/// A fresh database on `MONGODB_URL`, dropped when the test passes.
struct TestMongo {
    url: String,
    database: mongodb::Database,
}

impl TestMongo {
    async fn create(test: &str) -> Option<TestMongo> {
        // SKIPPED without MONGODB_URL, failed under CI; a database of its own.
        let url = test_support::mongo::mongo_url(test)?;
        let client = mongodb::Client::with_uri_str(&url)
            .await
            .expect("connect to MONGODB_URL");
        Some(TestMongo {
            database: client
                .default_database()
                .expect("mongo_url names a database"),
            url,
        })
    }

    async fn store(&self) -> MongoCourses {
        MongoCourses::connect(&self.url).await.expect("connect")
    }

    /// Sets the live checkpoint as a crash between the document writes and the
    /// checkpoint write leaves it.
    async fn set_checkpoint(&self, sequence: i64) {
        self.database
            .collection::<Document>("projection_checkpoints")
            .update_one(
                doc! { "_id": "courses" },
                doc! { "$set": { "last_sequence": sequence } },
            )
            .upsert(true)
            .await
            .expect("set the checkpoint");
    }

    async fn drop(self) {
        self.database.drop().await.expect("drop the test database");
    }
}

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

fn updated(course: Uuid, name: &str) -> Event {
    event(course, EventPayload::CourseUpdated(details(name)))
}

fn deleted(course: Uuid) -> Event {
    event(course, EventPayload::CourseDeleted)
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

/// The live store applied [create X @10, update X @11, delete X @12] but its checkpoint
/// write was lost (crash between the document writes and the checkpoint write): the
/// checkpoint is still 9, and the redelivery comes back in a smaller batch.
#[tokio::test]
async fn a_deleted_course_stays_deleted_when_a_redelivery_follows_a_lost_checkpoint_write() {
    let Some(mongo) = TestMongo::create("the tombstone test").await else {
        return;
    };
    let store = mongo.store().await;
    let (x, kept) = (Uuid::now_v7(), Uuid::now_v7());
    ProjectionStore::apply_batch(&store, &[(9, created(kept, "Kept"))], 9)
        .await
        .expect("applied");
    let batch = [
        (10, created(x, "X")),
        (11, updated(x, "X II")),
        (12, deleted(x)),
    ];
    ProjectionStore::apply_batch(&store, &batch, 12)
        .await
        .expect("applied");
    assert_eq!(store.get(x).await.expect("get"), None, "deleted");

    mongo.set_checkpoint(9).await;
    assert_eq!(ProjectionStore::checkpoint(&store).await.expect("read"), 9);
    ProjectionStore::apply_batch(&store, &batch[..2], 11)
        .await
        .expect("redelivered");
    assert_eq!(
        store.get(x).await.expect("get"),
        None,
        "the course deleted at 12 came back from the redelivery of 10 and 11"
    );
    let listed: Vec<Uuid> = store
        .list(None, 100)
        .await
        .expect("list")
        .iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(
        listed,
        vec![kept],
        "the list shows only the course not deleted"
    );
    assert!(
        store.get_many(&[x, kept]).await.expect("get_many").len() == 1,
        "get_many skips the deleted course"
    );

    // The rest of the redelivery changes nothing either.
    ProjectionStore::apply_batch(&store, &batch[2..], 12)
        .await
        .expect("redelivered");
    assert_eq!(store.get(x).await.expect("get"), None);
    assert_eq!(ProjectionStore::checkpoint(&store).await.expect("read"), 12);
    mongo.drop().await;
}

/// query-api connects with a role that may only read: the reader must not create the
/// collections or indexes the projectors' `connect` creates.
#[tokio::test]
async fn a_reader_creates_nothing_in_the_database() {
    let Some(mongo) = TestMongo::create("the reader test").await else {
        return;
    };
    let reader = MongoCourses::connect_reader(&mongo.url)
        .await
        .expect("connect");
    let id = Uuid::now_v7();
    assert_eq!(reader.get(id).await.expect("get"), None);
    assert!(reader.get_many(&[id]).await.expect("get_many").is_empty());
    assert!(reader.list(None, 10).await.expect("list").is_empty());
    assert_eq!(ProjectionStore::checkpoint(&reader).await.expect("read"), 0);
    ProjectionStore::ping(&reader).await.expect("ping");
    let collections = mongo
        .database
        .list_collection_names()
        .await
        .expect("listCollections");
    assert!(collections.is_empty(), "the reader created {collections:?}");

    // The writer creates them; the reader then reads what it writes.
    let writer = mongo.store().await;
    let mut collections = mongo
        .database
        .list_collection_names()
        .await
        .expect("listCollections");
    collections.sort();
    assert_eq!(collections, ["courses", "projection_checkpoints"]);
    ProjectionStore::apply_batch(&writer, &[(1, created(id, "Algebra"))], 1)
        .await
        .expect("applied");
    assert_eq!(
        reader
            .get(id)
            .await
            .expect("get")
            .map(|d| d.name)
            .as_deref(),
        Some("Algebra")
    );
    mongo.drop().await;
}

/// The stream's events of one course (what a redrive reads), each rebuild attempt counted.
#[derive(Clone)]
struct CountedHistory<'a> {
    events: &'a [(u64, Event)],
    reads: &'a std::sync::atomic::AtomicUsize,
}

impl read_models::rebuild::AggregateHistory for CountedHistory<'_> {
    async fn read_through(
        self,
        checkpoint: u64,
    ) -> Result<Vec<(u64, Event)>, read_models::StoreError> {
        self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.events.read_through(checkpoint).await
    }
}

/// A course whose `CourseUpdated` was dead-lettered (skipped: the checkpoint moved past
/// it) gets its effect back from a rebuild of its history.
#[tokio::test]
async fn a_rebuild_restores_the_effect_of_a_dead_lettered_event() {
    let Some(mongo) = TestMongo::create("the rebuild test").await else {
        return;
    };
    let store = mongo.store().await;
    let (x, s1) = (Uuid::now_v7(), Uuid::now_v7());
    let history = vec![
        (1, created(x, "X")),
        (2, updated(x, "X II")),
        (3, enrolled(x, s1)),
    ];
    // 2 was dead-lettered: the batch [1, 3] is applied through 3.
    let applied = [history[0].clone(), history[2].clone()];
    ProjectionStore::apply_batch(&store, &applied, 3)
        .await
        .expect("applied");
    let before = store.get(x).await.expect("get").expect("exists");
    assert_eq!((before.name.as_str(), before.version), ("X", 3));

    let reads = std::sync::atomic::AtomicUsize::new(0);
    let rebuilt = store
        .rebuild_aggregate(
            x,
            CountedHistory {
                events: &history,
                reads: &reads,
            },
        )
        .await
        .expect("rebuilt");
    assert_eq!(rebuilt, 3, "every event of the course folded");
    let after = store.get(x).await.expect("get").expect("exists");
    assert_eq!(after.name, "X II", "the skipped update is back");
    assert_eq!(
        (after.student_ids.as_slice(), after.version),
        (&[s1][..], 3)
    );

    // A deleted course rebuilt stays deleted (a tombstone, not a document).
    let y = Uuid::now_v7();
    let deleted_history = vec![(4, created(y, "Y")), (5, deleted(y))];
    ProjectionStore::apply_batch(&store, &deleted_history, 5)
        .await
        .expect("applied");
    store
        .rebuild_aggregate(y, deleted_history.as_slice())
        .await
        .expect("rebuilt");
    assert_eq!(store.get(y).await.expect("get"), None);
    // Later events still apply on the rebuilt record; redelivered ones still do not.
    ProjectionStore::apply_batch(&store, &[(3, enrolled(x, s1)), (6, updated(x, "X III"))], 6)
        .await
        .expect("applied");
    assert_eq!(
        store
            .get(x)
            .await
            .expect("get")
            .map(|d| (d.name, d.version)),
        Some(("X III".to_owned(), 6))
    );
    mongo.drop().await;
}

/// A history that applies a live batch while the rebuild is between its read of the record
/// and its write (the first time it is read only): the deterministic interleaving of a
/// rebuild racing the live projection.
#[derive(Clone)]
struct RacedHistory<'a> {
    events: &'a [(u64, Event)],
    live: &'a MongoCourses,
    batch: &'a [(u64, Event)],
    reads: &'a std::sync::atomic::AtomicUsize,
}

impl read_models::rebuild::AggregateHistory for RacedHistory<'_> {
    async fn read_through(
        self,
        checkpoint: u64,
    ) -> Result<Vec<(u64, Event)>, read_models::StoreError> {
        if self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
            let through = self.batch.last().map_or(0, |(seq, _)| *seq);
            ProjectionStore::apply_batch(self.live, self.batch, through)
                .await
                .expect("the racing batch applies");
        }
        self.events.read_through(checkpoint).await
    }
}

#[tokio::test]
async fn a_rebuild_racing_a_batch_never_leaves_older_state() {
    let Some(mongo) = TestMongo::create("the rebuild race test").await else {
        return;
    };
    let store = mongo.store().await;
    let (x, s1, s2) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let stream = vec![
        (1, created(x, "X")),
        (2, updated(x, "X II")), // dead-lettered
        (3, enrolled(x, s1)),
        (4, enrolled(x, s2)), // applied by the batch racing the rebuild
    ];
    ProjectionStore::apply_batch(&store, &[stream[0].clone(), stream[2].clone()], 3)
        .await
        .expect("applied");
    let reads = std::sync::atomic::AtomicUsize::new(0);
    let rebuilt = store
        .rebuild_aggregate(
            x,
            RacedHistory {
                events: &stream,
                live: &store,
                batch: &stream[3..],
                reads: &reads,
            },
        )
        .await
        .expect("rebuilt");
    assert_eq!(
        reads.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "the first write lost its compare-and-set to the batch and the rebuild started over"
    );
    assert_eq!(
        rebuilt, 4,
        "the second attempt folded through the new checkpoint"
    );
    let course = store.get(x).await.expect("get").expect("exists");
    assert_eq!(course.name, "X II", "the rebuild's fix");
    let mut students = vec![s1, s2];
    students.sort();
    assert_eq!(course.student_ids, students, "the batch's enrolment kept");
    assert_eq!(course.version, 4);
    mongo.drop().await;
}

/// A replay's next generation is its own collection and checkpoint; the live ones do not
/// change.
#[tokio::test]
async fn the_next_generation_writes_its_own_collection_and_checkpoint() {
    let Some(mongo) = TestMongo::create("the generation test").await else {
        return;
    };
    let live = mongo.store().await;
    let next = live.generation(read_models::generation::Generation::Next);
    let x = Uuid::now_v7();
    ProjectionStore::apply_batch(&next, &[(7, created(x, "Next"))], 7)
        .await
        .expect("applied");
    assert_eq!(ProjectionStore::checkpoint(&next).await.expect("read"), 7);
    assert_eq!(ProjectionStore::checkpoint(&live).await.expect("read"), 0);
    assert_eq!(live.get(x).await.expect("get"), None);
    assert_eq!(
        next.get(x).await.expect("get").map(|d| d.name).as_deref(),
        Some("Next")
    );
    let stored = mongo
        .database
        .collection::<Document>("courses__next")
        .find_one(doc! { "_id": x.to_string() })
        .await
        .expect("read")
        .expect("in courses__next");
    assert_eq!(stored.get_i64("version"), Ok(7));
    let checkpoint = mongo
        .database
        .collection::<Document>("projection_checkpoints")
        .find_one(doc! { "_id": "courses__next" })
        .await
        .expect("read")
        .expect("checkpoint courses__next");
    assert_eq!(checkpoint.get_i64("last_sequence"), Ok(7));
    mongo.drop().await;
}
