//! Redis invalidation against a real redis-server started (and stopped) by the test:
//! entries are marked stale after each commit, and a Redis outage never holds the projection up.

use std::sync::Arc;
use std::time::Duration;

use events::{AggregateKind, Event, EventMetadata, EventPayload, StudentDetails};
use projectors::redis_cache::RedisInvalidator;
use projectors::{PgStudents, ProjectionProgress, ProjectionRunner};
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

    // Back: the key missed during the outage is marked with a later batch.
    let redis = RedisServer::start(redis.port);
    let mut conn = connect(&redis.url()).await;
    let _: () = conn.set(key(grace), "stale").await.expect("set");
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
