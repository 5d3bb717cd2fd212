//! `Idempotency-Key`: the first outcome of a command (status, headers, body) is kept in a
//! JetStream KV bucket for 24 h and returned for every retry, from any gateway replica and
//! across restarts.
//!
//! A key is claimed with a `pending` record (KV create: only one request wins), then
//! replaced by the outcome. A claim older than [`ABANDONED_AFTER`] belongs to a request that
//! died and may be taken over. Server errors are not remembered, so a retry runs again.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::kv::{self, CreateErrorKind};
use axum::http::StatusCode;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use service_kit::Problem;

use crate::outcome::Outcome;

/// Header naming the key.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";
/// Longest accepted key.
pub const MAX_KEY_LENGTH: usize = 128;
/// A pending claim older than this is considered abandoned by a crashed request.
pub const ABANDONED_AFTER: Duration = Duration::from_secs(60);

/// The bucket of outcomes. Cheap to clone (every command request clones the gateway's
/// state): a `kv::Store` carries the bucket's whole stream info.
///
/// The bucket is opened on first use, not at start: a gateway started before
/// `stream-admin apply` has run stays up (unready, see [`check`](Self::check)) and finds
/// the bucket once it exists.
#[derive(Clone)]
pub struct IdempotencyStore {
    bucket: Arc<tokio::sync::OnceCell<kv::Store>>,
    jetstream: async_nats::jetstream::Context,
    name: Arc<str>,
}

/// A claimed key: finish it with the outcome.
#[derive(Debug)]
pub struct Claim {
    kv_key: String,
    fingerprint: String,
    /// The nonce of the pending record: a release deletes this claim and no other.
    claim: String,
}

/// What `begin` found.
#[derive(Debug)]
pub enum Begin {
    /// First use of the key: run the command, then `finish`.
    Claimed(Claim),
    /// The key already has an outcome for this same request: answer it again.
    Replay(Outcome),
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
enum Record {
    Pending {
        fingerprint: String,
        started_at_ms: u64,
        /// Names the request that claimed the key. A claim whose write was resent after a
        /// broker blip (stored, then answered "already exists") is then still recognised as
        /// this request's own, not as another request's that is running.
        #[serde(default)]
        claim: String,
    },
    Done {
        fingerprint: String,
        outcome: Outcome,
    },
}

impl IdempotencyStore {
    /// The store of bucket `name`, opened on first use.
    pub fn new(jetstream: async_nats::jetstream::Context, name: &str) -> Self {
        IdempotencyStore {
            bucket: Arc::new(tokio::sync::OnceCell::new()),
            jetstream,
            name: name.into(),
        }
    }

    /// The bucket, opened now if it was not yet. `Err` names it when it is missing.
    async fn bucket(&self) -> Result<&kv::Store, String> {
        self.bucket
            .get_or_try_init(|| async {
                self.jetstream
                    .get_key_value(&*self.name)
                    .await
                    .map_err(|error| {
                        format!(
                            "KV bucket {} is not available (run `stream-admin apply`): {error}",
                            self.name
                        )
                    })
            })
            .await
    }

    /// Whether the bucket exists and answers (for `/readyz`).
    pub async fn check(&self) -> Result<(), String> {
        self.bucket().await.map(|_| ())
    }

    /// Claims `key` for the request described by `fingerprint`, or finds its outcome.
    /// `client` scopes keys per API key, so two clients cannot collide.
    pub async fn begin(
        &self,
        client: &[u8],
        key: &str,
        fingerprint: String,
    ) -> Result<Begin, Problem> {
        let kv_key = kv_key(client, key);
        let claim = uuid::Uuid::new_v4().simple().to_string();
        let pending = encode(&Record::Pending {
            fingerprint: fingerprint.clone(),
            started_at_ms: now_ms(),
            claim: claim.clone(),
        })?;
        let bucket = self.bucket().await.map_err(|e| unavailable(&e))?;
        match bucket.create(&kv_key, pending.clone()).await {
            Ok(_) => {
                return Ok(Begin::Claimed(Claim {
                    kv_key,
                    fingerprint,
                    claim,
                }));
            }
            Err(error) if error.kind() == CreateErrorKind::AlreadyExists => {}
            Err(error) => {
                // Unanswered is not unwritten: the claim may be stored once the broker is
                // back (a resent publish), and would then block every retry until it counts
                // as abandoned. Release it if it lands.
                self.release_in_background(kv_key, claim);
                return Err(unavailable(&error));
            }
        }
        let entry = bucket
            .entry(&kv_key)
            .await
            .map_err(|e| unavailable(&e))?
            .ok_or_else(|| in_use("the key was released a moment ago; retry"))?;
        let record: Record = serde_json::from_slice(&entry.value).map_err(|e| unavailable(&e))?;
        match record {
            Record::Done {
                fingerprint: stored,
                outcome,
            } => {
                if stored == fingerprint {
                    Ok(Begin::Replay(outcome))
                } else {
                    Err(reused())
                }
            }
            Record::Pending {
                fingerprint: stored,
                started_at_ms,
                claim: stored_claim,
            } => {
                if stored != fingerprint {
                    return Err(reused());
                }
                if stored_claim == claim {
                    // Our own claim: its write was resent and stored before the answer came.
                    return Ok(Begin::Claimed(Claim {
                        kv_key,
                        fingerprint,
                        claim,
                    }));
                }
                if now_ms().saturating_sub(started_at_ms) < ABANDONED_AFTER.as_millis() as u64 {
                    return Err(in_use("a request with this key is still running"));
                }
                // The first request died without an outcome: take its claim over.
                bucket
                    .update(&kv_key, pending, entry.revision)
                    .await
                    .map_err(|_| in_use("another retry took this key over"))?;
                Ok(Begin::Claimed(Claim {
                    kv_key,
                    fingerprint,
                    claim,
                }))
            }
        }
    }

    /// Stores the outcome of a claimed key, or releases the claim after a server error so a
    /// retry runs the command again.
    pub async fn finish(&self, claim: Claim, outcome: &Outcome) {
        if outcome.status >= 500 {
            if !self.release(&claim.kv_key, &claim.claim).await {
                // The broker is likely away (that is what most server errors are).
                self.release_in_background(claim.kv_key, claim.claim);
            }
            return;
        }
        let result = match encode(&Record::Done {
            fingerprint: claim.fingerprint,
            outcome: outcome.clone(),
        }) {
            Ok(record) => match self.bucket().await {
                Ok(bucket) => bucket
                    .put(&claim.kv_key, record)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                Err(error) => Err(error),
            },
            Err(_) => Err("encoding the outcome".into()),
        };
        if let Err(error) = result {
            // The command's effect stands; only its replay is lost (a retry would then wait
            // for the claim to be abandoned, and run again).
            tracing::error!(%error, key = %claim.kv_key, "storing the idempotent outcome failed");
        }
    }

    /// Deletes the pending record with nonce `claim` under `kv_key`, and nothing else. `true`
    /// when nothing is left to do: deleted, or the key does not hold that claim.
    async fn release(&self, kv_key: &str, claim: &str) -> bool {
        let Ok(bucket) = self.bucket().await else {
            return false;
        };
        let entry = match bucket.entry(kv_key).await {
            Ok(Some(entry)) if entry.operation == kv::Operation::Put => entry,
            Ok(_) => return true,
            Err(_) => return false,
        };
        match serde_json::from_slice::<Record>(&entry.value) {
            Ok(Record::Pending { claim: stored, .. }) if stored == claim => bucket
                .delete_expect_revision(kv_key, Some(entry.revision))
                .await
                .is_ok(),
            _ => true,
        }
    }

    /// Keeps trying to release a claim while the broker is away, so a client retrying once
    /// it is back finds the key free instead of "still running" until the claim counts as
    /// abandoned.
    fn release_in_background(&self, kv_key: String, claim: String) {
        let store = self.clone();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + ABANDONED_AFTER;
            while tokio::time::Instant::now() < deadline {
                tokio::time::sleep(RELEASE_RETRY).await;
                if store.release(&kv_key, &claim).await {
                    return;
                }
            }
            tracing::warn!(key = %kv_key, "could not release an idempotency claim; it expires as abandoned");
        });
    }
}

/// Pause between attempts to release a claim while the broker is away.
const RELEASE_RETRY: Duration = Duration::from_millis(500);

/// Checks the header value: 1..=128 visible ASCII characters.
pub fn parse_key(raw: &[u8]) -> Result<&str, Problem> {
    let valid =
        !raw.is_empty() && raw.len() <= MAX_KEY_LENGTH && raw.iter().all(|b| b.is_ascii_graphic());
    match std::str::from_utf8(raw) {
        Ok(key) if valid => Ok(key),
        _ => Err(Problem::bad_request(format!(
            "`Idempotency-Key` must be 1 to {MAX_KEY_LENGTH} visible ASCII characters"
        ))),
    }
}

/// KV keys allow only `[-/_=.a-zA-Z0-9]`: hex-encode the client's key, prefixed by a stable
/// fingerprint of the API key that sent it.
fn kv_key(client: &[u8], key: &str) -> String {
    let mut out = format!("{:016x}.", fnv1a(client));
    for byte in key.bytes() {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

/// FNV-1a, 64 bit: stable across builds and releases, unlike `std`'s hasher.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn encode(record: &Record) -> Result<Bytes, Problem> {
    serde_json::to_vec(record)
        .map(Bytes::from)
        .map_err(|e| unavailable(&e))
}

fn unavailable(error: &dyn std::fmt::Display) -> Problem {
    tracing::error!(%error, "idempotency store failed");
    Problem::unavailable("the idempotency store is unavailable; retry")
}

fn in_use(detail: &str) -> Problem {
    Problem::new(
        StatusCode::CONFLICT,
        "idempotency-key-in-use",
        "Idempotency key in use",
    )
    .with_detail(detail)
    .with_retry_after(1)
}

fn reused() -> Problem {
    Problem::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency-key-reused",
        "Idempotency key reused",
    )
    .with_detail("this Idempotency-Key was used for a different request")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_valid_kv_keys_scoped_per_client() {
        let a = kv_key(b"writer-a", "order 1/ü?");
        let b = kv_key(b"writer-b", "order 1/ü?");
        assert_ne!(a, b);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric() || c == '.'));
    }

    #[test]
    fn header_values_are_bounded_visible_ascii() {
        assert!(parse_key(b"0193a1c2-0000-7000-8000-000000000001").is_ok());
        assert!(parse_key(b"").is_err());
        assert!(parse_key(b"has space").is_err());
        assert!(parse_key(&[b'k'; MAX_KEY_LENGTH + 1]).is_err());
        assert!(parse_key("ünïcode".as_bytes()).is_err());
    }

    #[test]
    fn fnv1a_matches_the_reference_vectors() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
