//! Redis invalidation against a real redis-server: entries are marked stale after each
//! commit, markers never lower an entry's position, a Redis outage never holds the
//! projection up, and keys that could not be marked are retried on a timer.

use std::sync::Arc;
use std::time::Duration;

use events::{AggregateKind, Event, EventMetadata, EventPayload, StudentDetails};
use projectors::redis_cache::RedisInvalidator;
use projectors::{ProjectionProgress, ProjectionRunner};
use read_models::PgStudents;
use redis::AsyncCommands;
use test_support::{RedisServer, TestBroker, TestDatabase, eventually, free_port};
use tokio::sync::oneshot;
use uuid::Uuid;

async fn connect(url: &str) -> redis::aio::MultiplexedConnection {
    eventually(10, "redis to accept connections", || async {
        let client = redis::Client::open(url).ok()?;
        client.get_multiplexed_async_connection().await.ok()
    })
    .await
}

fn registered(id: Uuid) -> Event {
    Event {
        metadata: EventMetadata {
            event_id: Uuid::now_v7(),
            aggregate_kind: AggregateKind::Student,
            aggregate_id: id,
            occurred_at: chrono::Utc::now(),
            correlation_id: Uuid::now_v7(),
            causation_id: Uuid::now_v7(),
            trace: Default::default(),
        },
        payload: EventPayload::StudentRegistered(StudentDetails {
            name: "Ada L".into(),
            first_name: "Ada".into(),
            last_name: "Lovelace".into(),
        }),
    }
}

async fn publish(broker: &TestBroker, id: Uuid) -> u64 {
    broker
        .jetstream
        .publish(
            broker.names.aggregate_subject(AggregateKind::Student, id),
            events::encode(&registered(id)).into(),
        )
        .await
        .expect("publish")
        .await
        .expect("ack")
        .sequence
}

/// Whether `key` holds the projectors' stale marker of a commit at `position` or later.
async fn is_stale_at(
    conn: &mut redis::aio::MultiplexedConnection,
    key: &str,
    position: u64,
) -> bool {
    let value: Option<String> = conn.get(key).await.unwrap_or(None);
    value
        .and_then(|v| v.strip_suffix(":~").and_then(|p| p.parse::<u64>().ok()))
        .is_some_and(|marked| marked >= position)
}

#[tokio::test]
async fn entries_are_marked_stale_after_commit_and_a_redis_outage_does_not_stop_the_projection() {
    let mut redis = RedisServer::start(free_port());
    let mut conn = connect(&redis.url()).await;
    let broker = TestBroker::start().await;
    let db = TestDatabase::create().await;
    let store = PgStudents::with_pool(db.pool.clone())
        .await
        .expect("migrated");
    let cache = Arc::new(RedisInvalidator::new(&redis.url(), "students").expect("redis url"));
    let (stop, stopped) = oneshot::channel::<()>();
    let runner = ProjectionRunner {
        reader: service_kit::event_reader::EventReader::lazy(
            broker.jetstream.clone(),
            broker.names.clone(),
            test_support::test_kek(),
        ),
        jetstream: broker.jetstream.clone(),
        names: broker.names.clone(),
        store: store.clone(),
        batch_size: 50,
        cache: Some(cache.clone()),
        progress: Arc::new(ProjectionProgress::default()),
        lease: projectors::lease::LeaseSettings::default(),
    };
    let task = tokio::spawn(runner.run(async move {
        let _ = stopped.await;
    }));
    let key = |id| broker.names.cache_key(AggregateKind::Student, id);

    // Up: a cached entry of a changed student is marked stale after the commit.
    let ada = Uuid::now_v7();
    let _: () = conn.set(key(ada), "stale").await.expect("set");
    let applied = publish(&broker, ada).await;
    eventually(10, "ada's entry marked stale", || async {
        let checkpoint = store.checkpoint().await.ok()?;
        (checkpoint >= applied && is_stale_at(&mut conn.clone(), &key(ada), applied).await)
            .then_some(())
    })
    .await;

    // Down: the projection keeps going.
    redis.stop();
    let grace = Uuid::now_v7();
    let applied = publish(&broker, grace).await;
    eventually(10, "grace projected while redis is down", || async {
        (store.checkpoint().await.ok()? >= applied).then_some(())
    })
    .await;
    assert!(cache.pending().await >= 1, "grace's key waits for redis");

    // Back: the key missed during the outage is marked, by the retry timer or with a later
    // batch, whichever comes first (the restarted Redis starts empty: a marker there is one
    // written after the restart).
    let redis = RedisServer::start(redis.port);
    let conn = connect(&redis.url()).await;
    eventually(15, "grace's entry marked after redis came back", || async {
        publish(&broker, Uuid::now_v7()).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        is_stale_at(&mut conn.clone(), &key(grace), applied)
            .await
            .then_some(())
    })
    .await;
    assert_eq!(cache.pending().await, 0);

    let _ = stop.send(());
    task.await.expect("no panic").expect("clean exit");
    db.cleanup().await;
    broker.cleanup().await;
}

/// The test stack's Redis (`scripts/dev` exports `REDIS_URL`); keys are unique per test.
fn stack_redis() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:16379".into())
}

fn unique_key(kind: &str) -> String {
    format!(
        "t{}:v1:{kind}:{}",
        test_support::unique_suffix(),
        Uuid::now_v7()
    )
}

#[tokio::test]
async fn a_marker_never_lowers_the_position_of_an_entry() {
    let url = stack_redis();
    let mut conn = connect(&url).await;
    let courses = RedisInvalidator::new(&url, "courses").expect("redis url");
    let students = RedisInvalidator::new(&url, "students").expect("redis url");
    let course = unique_key("course");
    let get = |conn: &mut redis::aio::MultiplexedConnection| {
        let (mut conn, key) = (conn.clone(), course.clone());
        async move { conn.get::<_, Option<String>>(key).await.expect("get") }
    };

    // The course is renamed at 100; the courses projection marks it.
    courses.invalidate(100, [course.clone()]).await;
    assert_eq!(get(&mut conn).await.as_deref(), Some("100:~"));
    // The students projection, behind at 95, marks the course side of an enrollment.
    students.invalidate(95, [course.clone()]).await;
    assert_eq!(
        get(&mut conn).await.as_deref(),
        Some("100:~"),
        "a lagging projection left the marker where it was"
    );
    // An entry a reader stored at 120 (fresher than any commit up to 120) stays too.
    let fresh = r#"120:{"name":"Algebra II","version":100}"#;
    let _: () = conn.set(&course, fresh).await.expect("set");
    students.invalidate(110, [course.clone()]).await;
    assert_eq!(get(&mut conn).await.as_deref(), Some(fresh));
    // A later commit marks it again, with its TTL.
    courses.invalidate(130, [course.clone()]).await;
    assert_eq!(get(&mut conn).await.as_deref(), Some("130:~"));
    let ttl: i64 = conn.ttl(&course).await.expect("ttl");
    assert!((1..=300).contains(&ttl), "ttl {ttl}");
    assert_eq!(courses.pending().await + students.pending().await, 0);
    let _: () = conn.del(&course).await.expect("del");
}

#[tokio::test]
async fn a_failed_invalidation_is_retried_on_a_timer_without_waiting_for_a_batch() {
    let mut redis = RedisServer::start(free_port());
    redis.ready().await;
    let cache = RedisInvalidator::new(&redis.url(), "students").expect("redis url");
    let student = unique_key("student");

    redis.stop();
    cache.invalidate(7, [student.clone()]).await;
    assert_eq!(cache.pending().await, 1, "kept for a retry");

    // Redis is back with the entry a reader stored before the commit; no batch comes.
    let redis = RedisServer::start(redis.port);
    let mut conn = connect(&redis.url()).await;
    let _: () = conn
        .set(&student, r#"6:{"name":"Ada L"}"#)
        .await
        .expect("set");
    eventually(10, "the pending key marked by the retry timer", || async {
        let value: Option<String> = conn.clone().get(&student).await.ok()?;
        (value.as_deref() == Some("7:~")).then_some(())
    })
    .await;
    assert_eq!(cache.pending().await, 0);
}
