//! API-key authentication (`x-api-key`, as the replaced system's Kong key-auth) with read,
//! write and erase scopes, and a per-key request rate limit. Keys are compared in constant
//! time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use subtle::ConstantTimeEq;

use crate::problem::Problem;

/// Header carrying the key.
pub const API_KEY_HEADER: &str = "x-api-key";

/// What a key may do. A write key may also read. An erase key may read and erase a
/// student's personal data, nothing else: erasure cannot be undone, so the keys that may do
/// it are not the keys every writing client holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    Read,
    Write,
    Erase,
}

impl Scope {
    /// Whether a key of this scope may use a route that needs `needed`.
    pub fn allows(self, needed: Scope) -> bool {
        self == needed || needed == Scope::Read
    }

    fn refusal(self) -> &'static str {
        match self {
            Scope::Read => "this API key may only read",
            Scope::Write => "this API key may not erase personal data (that needs an erase key)",
            Scope::Erase => "this API key may only read and erase personal data",
        }
    }
}

/// The configured keys, each with its own rate budget.
#[derive(Clone)]
pub struct ApiKeys {
    keys: Arc<Vec<ConfiguredKey>>,
    limit: Option<RateLimit>,
}

struct ConfiguredKey {
    key: Vec<u8>,
    scope: Scope,
    budget: RateBudget,
}

impl std::fmt::Debug for ApiKeys {
    // Never print the keys themselves.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeys")
            .field("count", &self.keys.len())
            .field("limit", &self.limit)
            .finish()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ApiKeysError {
    #[error("entry {0} is not `read:KEY`, `write:KEY` or `erase:KEY`")]
    BadEntry(usize),
    #[error("entry {0} has a key shorter than 8 characters")]
    ShortKey(usize),
    #[error("no keys configured")]
    Empty,
}

impl std::str::FromStr for ApiKeys {
    type Err = ApiKeysError;

    /// Parses `scope:key` entries separated by commas, e.g. `write:abc123xyz,read:def456uvw`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut keys = Vec::new();
        for (index, entry) in text.split(',').map(str::trim).enumerate() {
            if entry.is_empty() {
                continue;
            }
            let (scope, key) = entry.split_once(':').ok_or(ApiKeysError::BadEntry(index))?;
            let scope = match scope {
                "read" => Scope::Read,
                "write" => Scope::Write,
                "erase" => Scope::Erase,
                _ => return Err(ApiKeysError::BadEntry(index)),
            };
            if key.chars().count() < 8 {
                return Err(ApiKeysError::ShortKey(index));
            }
            keys.push(ConfiguredKey {
                key: key.as_bytes().to_vec(),
                scope,
                budget: RateBudget::default(),
            });
        }
        if keys.is_empty() {
            return Err(ApiKeysError::Empty);
        }
        Ok(ApiKeys {
            keys: Arc::new(keys),
            limit: None,
        })
    }
}

impl ApiKeys {
    /// The same keys, each limited to `limit` (`None`: unlimited). Budgets start full.
    pub fn with_rate_limit(self, limit: Option<RateLimit>) -> Self {
        let keys = self
            .keys
            .iter()
            .map(|configured| ConfiguredKey {
                key: configured.key.clone(),
                scope: configured.scope,
                budget: RateBudget::default(),
            })
            .collect();
        ApiKeys {
            keys: Arc::new(keys),
            limit,
        }
    }

    /// The configured key equal to `presented`. Every configured key is compared (no early
    /// exit), so timing does not reveal which key or how much of it matched.
    fn find(&self, presented: &[u8]) -> Option<&ConfiguredKey> {
        let mut found = None;
        for configured in self.keys.iter() {
            if bool::from(configured.key.as_slice().ct_eq(presented)) {
                found = Some(configured);
            }
        }
        found
    }

    /// The scope of `presented`, if it is a configured key.
    pub fn scope_of(&self, presented: &[u8]) -> Option<Scope> {
        self.find(presented).map(|configured| configured.scope)
    }

    /// Checks a request's key against the scope a route needs (`401`, `403`), then takes
    /// one request from the key's budget (`429` with `Retry-After` when it is spent).
    pub fn authorize(&self, presented: Option<&[u8]>, needed: Scope) -> Result<Scope, Problem> {
        let presented = presented.ok_or_else(|| {
            unauthorized().with_detail(format!("send an API key in the `{API_KEY_HEADER}` header"))
        })?;
        let configured = self
            .find(presented)
            .ok_or_else(|| unauthorized().with_detail("unknown API key"))?;
        if !configured.scope.allows(needed) {
            return Err(
                Problem::new(StatusCode::FORBIDDEN, "forbidden", "Forbidden")
                    .with_detail(configured.scope.refusal()),
            );
        }
        if let Some(limit) = self.limit {
            configured
                .budget
                .take(limit, Instant::now())
                .map_err(|wait| {
                    Problem::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        "rate-limited",
                        "Too many requests",
                    )
                    .with_detail(format!(
                        "this API key may make {} requests per second (bursts of {})",
                        limit.per_second, limit.burst
                    ))
                    .with_retry_after(wait.as_secs() + u64::from(wait.subsec_nanos() > 0))
                })?;
        }
        Ok(configured.scope)
    }
}

/// How many requests one key may make: `per_second` on average, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    per_second: u32,
    burst: u32,
}

impl RateLimit {
    /// `None` when `per_second` is 0 (no limit). A `burst` of 0 means one second's worth.
    pub fn new(per_second: u32, burst: u32) -> Option<RateLimit> {
        (per_second > 0).then_some(RateLimit {
            per_second,
            burst: if burst == 0 { per_second } else { burst },
        })
    }

    fn interval_nanos(self) -> u64 {
        1_000_000_000 / u64::from(self.per_second)
    }
}

/// The per-key limit as configuration (environment variables with `--flag` mirrors).
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct RateLimitArgs {
    /// Requests per second each API key may make on this replica; 0 turns the limit off.
    #[arg(long, env = "RATE_LIMIT_PER_SECOND", default_value_t = 0)]
    pub rate_limit_per_second: u32,
    /// Requests a key may make at once before the rate applies; 0 means one second's worth.
    #[arg(long, env = "RATE_LIMIT_BURST", default_value_t = 0)]
    pub rate_limit_burst: u32,
}

impl RateLimitArgs {
    pub fn limit(&self) -> Option<RateLimit> {
        RateLimit::new(self.rate_limit_per_second, self.rate_limit_burst)
    }
}

/// A key's budget as a generic cell rate algorithm: one atomic "theoretical arrival time",
/// so admitting a request is a compare-and-swap, with no lock and no timer. Each replica
/// keeps its own budgets (in memory), so a key may make `replicas × per_second` in all.
#[derive(Default)]
struct RateBudget {
    /// Nanoseconds after `EPOCH` at which the budget would be full again.
    theoretical_arrival_nanos: AtomicU64,
}

static EPOCH: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);

impl RateBudget {
    /// Takes one request at `now`, or says how long until one may be taken.
    fn take(&self, limit: RateLimit, now: Instant) -> Result<(), Duration> {
        let now =
            u64::try_from(now.saturating_duration_since(*EPOCH).as_nanos()).unwrap_or(u64::MAX);
        let interval = limit.interval_nanos();
        let tolerance = interval.saturating_mul(u64::from(limit.burst.saturating_sub(1)));
        let mut arrival = self.theoretical_arrival_nanos.load(Ordering::Relaxed);
        loop {
            let start = arrival.max(now);
            let ahead = start - now;
            if ahead > tolerance {
                return Err(Duration::from_nanos(ahead - tolerance));
            }
            match self.theoretical_arrival_nanos.compare_exchange_weak(
                arrival,
                start.saturating_add(interval),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(current) => arrival = current,
            }
        }
    }
}

fn unauthorized() -> Problem {
    Problem::new(StatusCode::UNAUTHORIZED, "unauthorized", "Unauthorized")
}

/// State of [`require_scope`]: the keys and the scope the wrapped routes need.
#[derive(Clone, Debug)]
pub struct ScopeGuard {
    pub keys: ApiKeys,
    pub needed: Scope,
}

/// Middleware (`axum::middleware::from_fn_with_state`) rejecting requests without a key
/// of the needed scope.
pub async fn require_scope(
    State(guard): State<ScopeGuard>,
    request: Request,
    next: Next,
) -> Result<Response, Problem> {
    let presented = request
        .headers()
        .get(API_KEY_HEADER)
        .map(|value| value.as_bytes());
    guard.keys.authorize(presented, guard.needed)?;
    Ok(next.run(request).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> ApiKeys {
        "write:writer-key-1, read:reader-key-1"
            .parse()
            .expect("valid keys")
    }

    #[test]
    fn a_write_key_may_read_and_write() {
        assert_eq!(
            keys().authorize(Some(b"writer-key-1"), Scope::Write),
            Ok(Scope::Write)
        );
        assert_eq!(
            keys().authorize(Some(b"writer-key-1"), Scope::Read),
            Ok(Scope::Write)
        );
    }

    #[test]
    fn a_read_key_is_forbidden_to_write() {
        let err = keys()
            .authorize(Some(b"reader-key-1"), Scope::Write)
            .expect_err("forbidden");
        assert_eq!(err.status, StatusCode::FORBIDDEN);
    }

    #[test]
    fn only_an_erase_key_erases_and_it_may_do_nothing_else_but_read() {
        let keys: ApiKeys = "write:writer-key-1, read:reader-key-1, erase:eraser-key-1"
            .parse()
            .expect("valid keys");
        assert_eq!(
            keys.authorize(Some(b"eraser-key-1"), Scope::Erase),
            Ok(Scope::Erase)
        );
        assert_eq!(
            keys.authorize(Some(b"eraser-key-1"), Scope::Read),
            Ok(Scope::Erase)
        );
        for (key, needed) in [
            (&b"eraser-key-1"[..], Scope::Write),
            (b"writer-key-1", Scope::Erase),
            (b"reader-key-1", Scope::Erase),
        ] {
            let err = keys.authorize(Some(key), needed).expect_err("forbidden");
            assert_eq!(err.status, StatusCode::FORBIDDEN, "{needed:?}");
        }
    }

    #[test]
    fn missing_unknown_and_prefix_keys_are_unauthorized() {
        for presented in [
            None,
            Some(&b"nope-nope-nope"[..]),
            Some(b"writer-key"),
            Some(b""),
        ] {
            let err = keys()
                .authorize(presented, Scope::Read)
                .expect_err("unauthorized");
            assert_eq!(err.status, StatusCode::UNAUTHORIZED, "{presented:?}");
        }
    }

    fn limited(per_second: u32, burst: u32) -> ApiKeys {
        keys().with_rate_limit(RateLimit::new(per_second, burst))
    }

    #[test]
    fn a_key_gets_its_burst_then_429_with_the_seconds_to_wait() {
        let keys = limited(1, 3);
        for _ in 0..3 {
            assert!(keys.authorize(Some(b"reader-key-1"), Scope::Read).is_ok());
        }
        let refused = keys
            .authorize(Some(b"reader-key-1"), Scope::Read)
            .expect_err("over the burst");
        assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(refused.kind, "rate-limited");
        assert_eq!(refused.retry_after_seconds, Some(1));
    }

    #[test]
    fn each_key_has_its_own_budget_and_refusals_by_scope_spend_none() {
        let keys = limited(1, 1);
        assert!(keys.authorize(Some(b"reader-key-1"), Scope::Read).is_ok());
        assert!(keys.authorize(Some(b"reader-key-1"), Scope::Read).is_err());
        // The reader's budget is spent; the writer's is not.
        assert!(keys.authorize(Some(b"writer-key-1"), Scope::Write).is_ok());
        let keys = limited(1, 1);
        let forbidden = keys
            .authorize(Some(b"reader-key-1"), Scope::Write)
            .expect_err("a read key may not write");
        assert_eq!(forbidden.status, StatusCode::FORBIDDEN);
        assert!(keys.authorize(Some(b"reader-key-1"), Scope::Read).is_ok());
    }

    #[test]
    fn the_budget_refills_at_the_configured_rate() {
        let limit = RateLimit::new(10, 2).expect("a limit");
        let budget = RateBudget::default();
        let start = *EPOCH + Duration::from_secs(5);
        assert!(budget.take(limit, start).is_ok());
        assert!(budget.take(limit, start).is_ok());
        let wait = budget.take(limit, start).expect_err("burst spent");
        assert_eq!(wait, Duration::from_millis(100));
        // 100 ms later one request (and only one) is admitted again.
        let later = start + Duration::from_millis(100);
        assert!(budget.take(limit, later).is_ok());
        assert!(budget.take(limit, later).is_err());
        // After a quiet second the whole burst is back, and no more.
        let quiet = later + Duration::from_secs(1);
        assert!(budget.take(limit, quiet).is_ok());
        assert!(budget.take(limit, quiet).is_ok());
        assert!(budget.take(limit, quiet).is_err());
    }

    #[test]
    fn no_limit_is_configured_by_a_rate_of_zero() {
        assert_eq!(RateLimit::new(0, 100), None);
        let keys = limited(0, 0);
        for _ in 0..10_000 {
            assert!(keys.authorize(Some(b"reader-key-1"), Scope::Read).is_ok());
        }
    }

    #[test]
    fn bad_configuration_is_refused_with_the_entry_named() {
        assert_eq!(
            "admin:abcdefghijk".parse::<ApiKeys>().err(),
            Some(ApiKeysError::BadEntry(0))
        );
        assert_eq!(
            "read:abcdefghij,write:short".parse::<ApiKeys>().err(),
            Some(ApiKeysError::ShortKey(1))
        );
        assert_eq!("".parse::<ApiKeys>().err(), Some(ApiKeysError::Empty));
    }
}
