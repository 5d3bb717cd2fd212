//! Redis cache-aside for single items, TTL 300 s, invalidated by the projectors.
//!
//! An entry is `"<position>:<json>"`, where `position` is the stream position the projection
//! had applied when the value was read (read *before* the value, so the value is at least
//! that fresh). Projectors do not delete entries: they overwrite them with a stale marker
//! `"<position>:~"` at the position of their commit, and a reader may only store a value
//! read at a position at least as high (a compare in a Lua script). So a reader that loaded
//! a value just before a commit cannot put it back over the projector's marker: no stale
//! entry outlives its invalidation. The projectors' marking is the same compare the other
//! way round (`projectors::redis_cache`): a marker never replaces an entry of a later
//! position, so the position under a key never goes down, and no projection (one behind the
//! other, or a replica's late retry) can reopen a key to a read older than a commit whose
//! marker it overwrote.
//!
//! Concurrent misses of one key in one process load once (single flight). When Redis fails,
//! reads go straight to the databases for a second before Redis is tried again, and the
//! `query_cache_requests_total{result="error"}` counter says so.

use std::collections::HashMap;
use std::future::Future;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use opentelemetry::KeyValue;
use opentelemetry::metrics::ObservableCounter;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::caching::{CacheConfig, CacheMode};
use redis::{CommandCacheConfig, IntoConnectionInfo, ProtocolVersion};
use serde::Serialize;
use serde::de::DeserializeOwned;
use service_kit::metrics;

/// Time to live of an entry (SPEC: 300 s).
pub const TTL_SECONDS: u64 = 300;
/// A Redis that is slower than this counts as down for this request.
const TIMEOUT: Duration = Duration::from_millis(100);
/// After a failure, Redis is left alone this long.
const BACKOFF: Duration = Duration::from_secs(1);

/// Entries each query-api process keeps in memory (server-assisted client-side caching).
const LOCAL_ENTRIES: NonZeroUsize = NonZeroUsize::new(10_000).expect("not zero");
/// How long a copy kept in memory is served. Redis's invalidation normally drops it at
/// once, but redis-rs (`cache-aio`, experimental) can store a reply after the invalidation
/// that followed it has been handled (seen under CPU load in tests): then this bounds how
/// long a token-less read can be served the stale copy. Reads with a token are not
/// affected (the position check).
const LOCAL_TTL: Duration = Duration::from_millis(500);

/// Stores `ARGV[1]:ARGV[2]` unless the key holds an entry from a later position.
const SET_IF_NOT_OLDER: &str = r"
local current = redis.call('GET', KEYS[1])
if current then
  local position = tonumber(string.match(current, '^(%d+):'))
  if position and position > tonumber(ARGV[1]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. ARGV[2], 'EX', ARGV[3])
return 1
";

/// What `query_cache_requests_total` counts, by `result` (the label is `LABELS[result]`).
#[derive(Clone, Copy)]
enum LookupResult {
    Hit,
    Miss,
    Error,
    Bypass,
}

impl LookupResult {
    const LABELS: [&str; 4] = ["hit", "miss", "error", "bypass"];
}

/// Lookups by result, process-wide, in plain atomics that metrics collection reads: a
/// synchronous OpenTelemetry counter on every cached read hashed its label and took a lock
/// both worker threads share (about 3 % of cached REST throughput).
static LOOKUPS: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];
static LOOKUPS_REPORTED: OnceLock<ObservableCounter<u64>> = OnceLock::new();

/// Registers the counter once per process. A result shows once it has been counted.
fn report_lookups() {
    LOOKUPS_REPORTED.get_or_init(|| {
        metrics::meter()
            .u64_observable_counter("query.cache.requests")
            .with_description("Cache lookups by result: hit, miss, error (Redis down), bypass")
            .with_callback(|observer| {
                for (result, count) in LookupResult::LABELS.iter().zip(&LOOKUPS) {
                    let count = count.load(Ordering::Relaxed);
                    if count > 0 {
                        observer.observe(count, &[KeyValue::new("result", *result)]);
                    }
                }
            })
            .build()
    });
}

/// The stale marker projectors write.
pub const STALE_MARKER: &str = "~";

pub struct Cache {
    redis: Option<Redis>,
    flights: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

struct Redis {
    client: redis::Client,
    /// Made on first use and kept: the manager reconnects by itself. A cell, not a lock:
    /// every cached read takes it, and a contended async lock parks and wakes tasks.
    connection: tokio::sync::OnceCell<ConnectionManager>,
    down_until: Mutex<Option<Instant>>,
    script: redis::Script,
}

/// What a lookup found.
enum Lookup<T> {
    /// A value (or a cached absence) read at this position.
    Hit(u64, Option<T>),
    Miss,
    Unavailable,
}

impl Cache {
    /// A cache on `redis_url`, or none. Does not connect yet: a Redis that is down at start
    /// must not stop the API.
    pub fn new(redis_url: Option<&str>) -> anyhow::Result<Self> {
        let redis = match redis_url {
            Some(url) => Some(Redis {
                client: resp3_client(url)?,
                connection: tokio::sync::OnceCell::new(),
                down_until: Mutex::new(None),
                script: redis::Script::new(SET_IF_NOT_OLDER),
            }),
            None => None,
        };
        report_lookups();
        Ok(Cache {
            redis,
            flights: Mutex::new(HashMap::new()),
        })
    }

    /// The value under `key`, from the cache if an entry read at `min_position` or later
    /// is there, else from `load` (which returns the value and the position it was read at)
    /// and stored for the next reader.
    pub async fn get_or_load<T, F, Fut, E>(
        &self,
        key: &str,
        min_position: u64,
        load: F,
    ) -> Result<Option<T>, E>
    where
        T: Serialize + DeserializeOwned,
        F: Fn() -> Fut,
        Fut: Future<Output = Result<(u64, Option<T>), E>>,
    {
        let Some(redis) = &self.redis else {
            self.count(LookupResult::Bypass);
            return load().await.map(|(_, value)| value);
        };
        match redis.lookup::<T>(key).await {
            Lookup::Hit(position, value) if position >= min_position => {
                self.count(LookupResult::Hit);
                return Ok(value);
            }
            Lookup::Unavailable => {
                self.count(LookupResult::Error);
                return load().await.map(|(_, value)| value);
            }
            Lookup::Hit(..) | Lookup::Miss => {}
        }
        // One load per key at a time in this process; the others then find it cached.
        let flight = self.flight(key);
        let _turn = flight.lock().await;
        if let Lookup::Hit(position, value) = redis.lookup::<T>(key).await
            && position >= min_position
        {
            self.count(LookupResult::Hit);
            return Ok(value);
        }
        self.count(LookupResult::Miss);
        let (position, value) = load().await?;
        redis.store(key, position, &value).await;
        drop(_turn);
        self.land(key, &flight);
        Ok(value)
    }

    fn count(&self, result: LookupResult) {
        LOOKUPS[result as usize].fetch_add(1, Ordering::Relaxed);
    }

    fn flight(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
        flights.entry(key.to_owned()).or_default().clone()
    }

    /// Forgets a finished flight nobody else waits on.
    fn land(&self, key: &str, flight: &Arc<tokio::sync::Mutex<()>>) {
        let mut flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
        // Ours, plus the map's: nobody else holds it.
        if Arc::strong_count(flight) <= 2 {
            flights.remove(key);
        }
    }
}

/// A client speaking RESP3, which server-assisted client-side caching needs: Redis tells the
/// connection when a key it read changes, so the copy kept in memory is dropped.
fn resp3_client(url: &str) -> redis::RedisResult<redis::Client> {
    let info = url.into_connection_info()?;
    let settings = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3);
    redis::Client::open(info.set_redis_settings(settings))
}

impl Redis {
    fn is_down(&self) -> bool {
        let down_until = self.down_until.lock().unwrap_or_else(|p| p.into_inner());
        down_until.is_some_and(|until| Instant::now() < until)
    }

    fn failed(&self, error: &str) {
        tracing::warn!(error, "redis unavailable; serving from the databases");
        *self.down_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now() + BACKOFF);
    }

    async fn connection(&self) -> redis::RedisResult<ConnectionManager> {
        self.connection
            .get_or_try_init(|| {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(TIMEOUT))
                    .set_response_timeout(Some(TIMEOUT))
                    .set_number_of_retries(1)
                    .set_cache_config(
                        CacheConfig::new()
                            .set_mode(CacheMode::OptIn)
                            .set_size(LOCAL_ENTRIES)
                            .set_default_client_ttl(LOCAL_TTL),
                    );
                ConnectionManager::new_with_config(self.client.clone(), config)
            })
            .await
            .cloned()
    }

    async fn lookup<T: DeserializeOwned>(&self, key: &str) -> Lookup<T> {
        if self.is_down() {
            return Lookup::Unavailable;
        }
        let result = tokio::time::timeout(TIMEOUT, async {
            let mut connection = self.connection().await?;
            redis::cmd("GET")
                .arg(key)
                .set_cache_config(CommandCacheConfig::new())
                .query_async::<Option<String>>(&mut connection)
                .await
        })
        .await;
        let entry = match result {
            Ok(Ok(entry)) => entry,
            Ok(Err(error)) => {
                self.failed(&error.to_string());
                return Lookup::Unavailable;
            }
            Err(_) => {
                self.failed("timed out");
                return Lookup::Unavailable;
            }
        };
        let Some(entry) = entry else {
            return Lookup::Miss;
        };
        let Some((position, body)) = entry.split_once(':') else {
            return Lookup::Miss;
        };
        let Ok(position) = position.parse::<u64>() else {
            return Lookup::Miss;
        };
        if body == STALE_MARKER {
            return Lookup::Miss;
        }
        match serde_json::from_str::<Option<T>>(body) {
            Ok(value) => Lookup::Hit(position, value),
            Err(_) => Lookup::Miss,
        }
    }

    async fn store<T: Serialize>(&self, key: &str, position: u64, value: &Option<T>) {
        if self.is_down() {
            return;
        }
        let Ok(body) = serde_json::to_string(value) else {
            return;
        };
        let result = tokio::time::timeout(TIMEOUT, async {
            let mut connection = self.connection().await?;
            self.script
                .key(key)
                .arg(position)
                .arg(body)
                .arg(TTL_SECONDS)
                .invoke_async::<i64>(&mut connection)
                .await
        })
        .await;
        match result {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => self.failed(&error.to_string()),
            Err(_) => self.failed("timed out"),
        }
    }
}

#[cfg(test)]
mod tests {
    use projectors::redis_cache::RedisInvalidator;
    use uuid::Uuid;

    use super::*;

    /// The test stack's Redis (`scripts/dev` exports `REDIS_URL`); keys are unique per test.
    fn redis_url() -> String {
        std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:16379".into())
    }

    async fn read(cache: &Cache, key: &str, loaded: (u64, &str)) -> Option<String> {
        cache
            .get_or_load(key, 0, || async {
                Ok::<_, ()>((loaded.0, Some(loaded.1.to_owned())))
            })
            .await
            .expect("loads")
    }

    /// A reader loads a course just before its rename commits (at 100), and stores what it
    /// read only after the courses projection has marked the entry. Meanwhile the students
    /// projection, behind at 95, marks the course side of an enrollment. The reader's old
    /// name must not get in: token-less reads would be served it for the whole TTL.
    #[tokio::test]
    async fn a_lagging_projections_marker_does_not_let_an_older_read_in() {
        let url = redis_url();
        let key = format!(
            "t{}:v1:course:{}",
            test_support::unique_suffix(),
            Uuid::now_v7()
        );
        let courses = RedisInvalidator::new(&url, "courses").expect("url");
        let students = RedisInvalidator::new(&url, "students").expect("url");

        courses.invalidate(100, [key.clone()]).await;
        students.invalidate(95, [key.clone()]).await;
        // The slow reader read the courses checkpoint at 99, then the old document.
        let slow = Cache::new(Some(&url)).expect("cache");
        assert_eq!(
            read(&slow, &key, (99, "Algebra")).await.as_deref(),
            Some("Algebra")
        );

        // A token-less read afterwards (another process: nothing kept in its memory).
        let later = Cache::new(Some(&url)).expect("cache");
        assert_eq!(
            read(&later, &key, (100, "Algebra II")).await.as_deref(),
            Some("Algebra II"),
            "the old name was stored over the invalidation"
        );
        assert_eq!(
            read(&later, &key, (100, "unused")).await.as_deref(),
            Some("Algebra II")
        );
    }
}
