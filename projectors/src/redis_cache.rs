//! Marks the query side's Redis entries of the aggregates a batch changed as stale, after
//! commit: each becomes `"<commit position>:~"` (see query-api's `cache.rs`: a reader may
//! not store a value read at an older position over it, so an entry cannot be put back
//! stale by a read that raced the commit).
//!
//! Markers only move up: an entry that already holds a later position (another
//! projection's marker, an old replica's late retry losing to the new one's, a value a
//! reader loaded after a later commit) is left as it is, in the same Lua script that reads
//! it. A plain `SET` let a lagging projection lower another's marker, and a reader that had
//! loaded the old row before that other commit could then store it over the lowered marker,
//! to be served to token-less reads for the whole TTL.
//!
//! Redis is a cache: its failure must never hold the projection up. Keys that could not be
//! marked are kept (bounded) and retried every second by a task the invalidator owns, and
//! with the next batch, so an entry is not served stale for the whole TTL after a short
//! Redis outage, even when no batch follows.

use std::collections::BTreeSet;
use std::sync::{Arc, Weak};
use std::time::Duration;

use anyhow::Context;
use opentelemetry::KeyValue;
use opentelemetry::metrics::Counter;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::Mutex;

/// A slow Redis costs a batch at most this much.
const TIMEOUT: Duration = Duration::from_millis(250);
/// Keys remembered for a retry while Redis is down.
const MAX_PENDING: usize = 100_000;
/// How often keys that could not be marked are tried again, batch or no batch.
const RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// Keys per script call: one call runs atomically in Redis, and blocks it meanwhile.
const KEYS_PER_CALL: usize = 1_000;

/// Entries live this long at most (the query side's TTL).
const TTL_SECONDS: u64 = 300;

/// Marks every key of `KEYS` stale at position `ARGV[1]` (TTL `ARGV[2]`) unless it holds an
/// entry of a later position. Positions are parsed as query-api's reader script parses them
/// (an entry without one is overwritten). Returns how many keys were marked.
const MARK_STALE: &str = r"
local position = tonumber(ARGV[1])
local marker = ARGV[1] .. ':~'
local marked = 0
for _, key in ipairs(KEYS) do
  local current = redis.call('GET', key)
  local digits = current and string.match(current, '^(%d+):')
  local stored = digits and tonumber(digits)
  if not (stored and stored > position) then
    redis.call('SET', key, marker, 'EX', ARGV[2])
    marked = marked + 1
  end
end
return marked
";

pub struct RedisInvalidator {
    shared: Arc<Shared>,
    /// Retries pending keys every [`RETRY_INTERVAL`]; stopped on drop.
    retry: tokio::task::JoinHandle<()>,
}

struct Shared {
    client: redis::Client,
    script: redis::Script,
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

impl RedisInvalidator {
    /// Does not connect yet: a Redis that is down at start must not stop the projector.
    /// Starts the retry task, so it must be called within a Tokio runtime.
    pub fn new(redis_url: &str, projection: &'static str) -> anyhow::Result<Self> {
        let failures = service_kit::metrics::meter()
            .u64_counter("projection.cache.invalidation.failures")
            .with_description("Batches whose Redis invalidation failed (keys kept for retry)")
            .build();
        // A series exists before the first failure, so dashboards show 0, not "no data".
        failures.add(0, &[KeyValue::new("projection", projection)]);
        let shared = Arc::new(Shared {
            client: redis::Client::open(redis_url)?,
            script: redis::Script::new(MARK_STALE),
            state: Mutex::new(State::default()),
            failures,
            projection,
        });
        let runtime = tokio::runtime::Handle::try_current()
            .context("the Redis invalidator's retry task needs a Tokio runtime")?;
        let retry = runtime.spawn(retry_pending(Arc::downgrade(&shared)));
        Ok(RedisInvalidator { shared, retry })
    }

    /// Marks `keys` stale as of stream `position` (and any still pending from earlier
    /// failures). Never fails.
    pub async fn invalidate(&self, position: u64, keys: impl IntoIterator<Item = String>) {
        let shared = &self.shared;
        let mut state = shared.state.lock().await;
        state.pending.extend(keys);
        state.position = state.position.max(position);
        if state.pending.is_empty() {
            return;
        }
        if let Err(error) = shared.mark_pending(&mut state).await {
            shared
                .failures
                .add(1, &[KeyValue::new("projection", shared.projection)]);
            tracing::warn!(
                error,
                pending = state.pending.len(),
                "redis invalidation failed; keys kept for a retry"
            );
        }
    }

    /// Keys waiting for Redis to come back.
    pub async fn pending(&self) -> usize {
        self.shared.state.lock().await.pending.len()
    }
}

impl Drop for RedisInvalidator {
    fn drop(&mut self) {
        self.retry.abort();
    }
}

/// Every [`RETRY_INTERVAL`], marks the keys still pending, until the invalidator is gone.
async fn retry_pending(shared: Weak<Shared>) {
    let mut ticks = tokio::time::interval(RETRY_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let mut state = shared.state.lock().await;
        if state.pending.is_empty() {
            continue;
        }
        let keys = state.pending.len();
        match shared.mark_pending(&mut state).await {
            Ok(()) => tracing::info!(keys, "redis invalidations retried and done"),
            // Counted and logged once, by the batch that failed; Redis is still down.
            Err(error) => tracing::debug!(error, keys, "redis invalidation retry failed"),
        }
    }
}

impl Shared {
    /// Marks every pending key at the newest pending position; they are forgotten only once
    /// all are marked (a partial run is harmless to repeat: markers only move up).
    async fn mark_pending(&self, state: &mut State) -> Result<(), String> {
        let keys: Vec<String> = state.pending.iter().cloned().collect();
        let result = tokio::time::timeout(TIMEOUT, self.mark_stale(state, &keys)).await;
        let error = match result {
            Ok(Ok(())) => {
                state.pending.clear();
                return Ok(());
            }
            Ok(Err(error)) => error.to_string(),
            Err(_) => "timed out".to_owned(),
        };
        if state.pending.len() > MAX_PENDING {
            // Past this, the TTL is the bound on staleness.
            state.pending.clear();
        }
        Err(error)
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
        let position = state.position;
        let Some(connection) = state.connection.as_mut() else {
            return Ok(());
        };
        for chunk in keys.chunks(KEYS_PER_CALL) {
            let mut invocation = self.script.prepare_invoke();
            for key in chunk {
                invocation.key(key);
            }
            invocation
                .arg(position)
                .arg(TTL_SECONDS)
                .invoke_async::<i64>(connection)
                .await?;
        }
        Ok(())
    }
}
