//! Marks the query side's Redis entries of the aggregates a batch changed as stale, after
//! commit: each becomes `"<commit position>:~"` (see query-api's `cache.rs`: a reader may
//! not store a value read at an older position over it, so an entry cannot be put back
//! stale by a read that raced the commit).
//!
//! Redis is a cache: its failure must never hold the projection up. Keys that could not be
//! deleted are kept (bounded) and retried with the next batch, so an entry is not served
//! stale for the whole TTL after a short Redis outage.

use std::collections::BTreeSet;
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::Counter;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::Mutex;

/// A slow Redis costs a batch at most this much.
const TIMEOUT: Duration = Duration::from_millis(250);
/// Keys remembered for a retry while Redis is down.
const MAX_PENDING: usize = 100_000;

pub struct RedisInvalidator {
    client: redis::Client,
    state: Mutex<State>,
    failures: Counter<u64>,
    projection: &'static str,
}

#[derive(Default)]
struct State {
    connection: Option<ConnectionManager>,
    pending: BTreeSet<String>,
    /// Position of the newest commit whose keys are pending.
    position: u64,
}

/// Entries live this long at most (the query side's TTL).
const TTL_SECONDS: u64 = 300;

impl RedisInvalidator {
    /// Does not connect yet: a Redis that is down at start must not stop the projector.
    pub fn new(redis_url: &str, projection: &'static str) -> anyhow::Result<Self> {
        let failures = service_kit::metrics::meter()
            .u64_counter("projection.cache.invalidation.failures")
            .with_description("Batches whose Redis invalidation failed (keys kept for retry)")
            .build();
        // A series exists before the first failure, so dashboards show 0, not "no data".
        failures.add(0, &[KeyValue::new("projection", projection)]);
        Ok(RedisInvalidator {
            client: redis::Client::open(redis_url)?,
            state: Mutex::new(State::default()),
            failures,
            projection,
        })
    }

    /// Marks `keys` stale as of stream `position` (and any still pending from earlier
    /// failures). Never fails.
    pub async fn invalidate(&self, position: u64, keys: impl IntoIterator<Item = String>) {
        let mut state = self.state.lock().await;
        state.pending.extend(keys);
        state.position = state.position.max(position);
        if state.pending.is_empty() {
            return;
        }
        let keys: Vec<String> = state.pending.iter().cloned().collect();
        let result = tokio::time::timeout(TIMEOUT, self.mark_stale(&mut state, &keys)).await;
        match result {
            Ok(Ok(())) => state.pending.clear(),
            Ok(Err(error)) => self.failed(&mut state, &error.to_string()),
            Err(_) => self.failed(&mut state, "timed out"),
        }
    }

    async fn mark_stale(&self, state: &mut State, keys: &[String]) -> redis::RedisResult<()> {
        if state.connection.is_none() {
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(TIMEOUT))
                .set_response_timeout(Some(TIMEOUT))
                .set_number_of_retries(1);
            state.connection =
                Some(ConnectionManager::new_with_config(self.client.clone(), config).await?);
        }
        let marker = format!("{}:~", state.position);
        let Some(connection) = state.connection.as_mut() else {
            return Ok(());
        };
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd("SET")
                .arg(key)
                .arg(&marker)
                .arg("EX")
                .arg(TTL_SECONDS)
                .ignore();
        }
        pipe.query_async::<()>(connection).await
    }

    fn failed(&self, state: &mut State, error: &str) {
        self.failures
            .add(1, &[KeyValue::new("projection", self.projection)]);
        if state.pending.len() > MAX_PENDING {
            // Past this, the TTL is the bound on staleness.
            state.pending.clear();
        }
        tracing::warn!(
            error,
            pending = state.pending.len(),
            "redis invalidation failed; keys kept for the next batch"
        );
    }

    /// Keys waiting for Redis to come back.
    pub async fn pending(&self) -> usize {
        self.state.lock().await.pending.len()
    }
}
