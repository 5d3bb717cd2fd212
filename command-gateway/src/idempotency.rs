//! `Idempotency-Key`: the first outcome of a command (status, headers, body) is kept in a
//! JetStream KV bucket for 24 h and returned for every retry, from any gateway replica and
//! across restarts.
//!
//! A key is claimed with a `pending` record (KV create: only one request wins), then
//! replaced by the outcome. Before each append, the claim records it ([`SentAppend`]) with
//! the answer it makes if stored: whoever answers for the key later (a retry after a `503`
//! whose append the broker did store, or after the gateway died right after sending it)
//! looks for it in the stream and answers that instead of deciding again. A claim older
//! than [`ABANDONED_AFTER`] belongs to a request that died and may be taken over. Server
//! errors are not remembered: the claim is released, or, when it had sent an append, left
//! `unanswered` for the retry to take over at once.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::kv::{self, CreateErrorKind, UpdateErrorKind};
use axum::http::StatusCode;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use service_kit::Problem;

use crate::commands::SentAppend;
use crate::outcome::Outcome;

/// Header naming the key.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";
/// Longest accepted key.
pub const MAX_KEY_LENGTH: usize = 128;
/// A pending claim older than this is considered abandoned by a crashed request.
pub const ABANDONED_AFTER: Duration = Duration::from_secs(60);
/// Creates of a key tried when it is released between a failed create and the read that
/// follows (then a retry's create may win). After that, `409`: someone is busy with it.
const CLAIM_TRIES: usize = 3;
/// Unconfirmed appends kept per key. Each one takes a `503` after sending an append; more
/// than this many in a row for one key drops the oldest (logged).
const MAX_ATTEMPTS_KEPT: usize = 8;

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

/// A claimed key: record appends with [`IdempotencyStore::record_attempt`], then finish it
/// with the outcome.
#[derive(Debug)]
pub struct Claim {
    kv_key: String,
    fingerprint: String,
    /// The nonce of the pending record: a release deletes this claim and no other.
    claim: String,
    started_at_ms: u64,
    /// Revision of this claim's last write; the next one is conditional on it, so a claim
    /// taken over by another request is never overwritten.
    revision: u64,
    /// Appends earlier requests with this key sent and never saw confirmed.
    earlier: Vec<Attempt>,
}

impl Claim {
    /// Attempts of earlier requests with this key whose appends may be stored.
    pub fn earlier(&self) -> &[Attempt] {
        &self.earlier
    }
}

/// An append a request sent for a key, and the answer it makes if the broker stored it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    pub append: SentAppend,
    /// The success answer, with its positions (`ETag`, consistency token) still to be set
    /// from where the append is found.
    pub outcome: Outcome,
}

/// What `begin` found.
#[derive(Debug)]
pub enum Begin {
    /// The key is this request's: run the command (after looking for
    /// [`Claim::earlier`] appends), then `finish`.
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
        /// Appends sent for this key and not confirmed: earlier requests' and the latest of
        /// this one's, recorded before it was sent.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        attempts: Vec<Attempt>,
    },
    /// No request runs, but appends were sent and not confirmed: a retry takes the key
    /// over at once and looks for them first.
    Unanswered {
        fingerprint: String,
        attempts: Vec<Attempt>,
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
        let bucket = self.bucket().await.map_err(|e| unavailable(&e))?;
        for _ in 0..CLAIM_TRIES {
            let mut claim = Claim {
                kv_key: kv_key.clone(),
                fingerprint: fingerprint.clone(),
                claim: uuid::Uuid::new_v4().simple().to_string(),
                started_at_ms: now_ms(),
                revision: 0,
                earlier: Vec::new(),
            };
            match bucket.create(&kv_key, claim.pending(&[])?).await {
                Ok(revision) => {
                    claim.revision = revision;
                    return Ok(Begin::Claimed(claim));
                }
                Err(error) if error.kind() == CreateErrorKind::AlreadyExists => {}
                Err(error) => {
                    // Unanswered is not unwritten: the claim may be stored once the broker is
                    // back (a resent publish), and would then block every retry until it
                    // counts as abandoned. Release it if it lands.
                    self.release_in_background(kv_key, claim.claim);
                    return Err(unavailable(&error));
                }
            }
            let entry = match bucket.entry(&kv_key).await.map_err(|e| unavailable(&e))? {
                Some(entry) if entry.operation == kv::Operation::Put => entry,
                // Released between the create and this read (a delete marker, or already
                // gone): the next create may win.
                _ => continue,
            };
            let record: Record =
                serde_json::from_slice(&entry.value).map_err(|e| unavailable(&e))?;
            return match record {
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
                    attempts,
                } => {
                    if stored != fingerprint {
                        return Err(reused());
                    }
                    if stored_claim == claim.claim {
                        // Our own claim: its write was resent and stored before the answer came.
                        claim.revision = entry.revision;
                        claim.earlier = attempts;
                        return Ok(Begin::Claimed(claim));
                    }
                    if now_ms().saturating_sub(started_at_ms) < ABANDONED_AFTER.as_millis() as u64 {
                        return Err(in_use("a request with this key is still running"));
                    }
                    // The first request died without an outcome: take its claim over.
                    self.take_over(bucket, claim, attempts, entry.revision)
                        .await
                }
                Record::Unanswered {
                    fingerprint: stored,
                    attempts,
                } => {
                    if stored != fingerprint {
                        return Err(reused());
                    }
                    self.take_over(bucket, claim, attempts, entry.revision)
                        .await
                }
            };
        }
        Err(in_use("the key was released a moment ago; retry"))
    }

    /// Replaces the record at `revision` by `claim`, keeping the unconfirmed `attempts`.
    async fn take_over(
        &self,
        bucket: &kv::Store,
        mut claim: Claim,
        attempts: Vec<Attempt>,
        revision: u64,
    ) -> Result<Begin, Problem> {
        match bucket
            .update(&claim.kv_key, claim.pending(&attempts)?, revision)
            .await
        {
            Ok(revision) => {
                claim.revision = revision;
                claim.earlier = attempts;
                Ok(Begin::Claimed(claim))
            }
            Err(error) if error.kind() == UpdateErrorKind::WrongLastRevision => {
                Err(in_use("another retry took this key over"))
            }
            Err(error) => {
                // As for a create: the write may land later; then leave it for the next retry.
                self.release_in_background(claim.kv_key, claim.claim);
                Err(unavailable(&error))
            }
        }
    }

    /// Records `attempt` in the claim before its append is sent, together with the
    /// unconfirmed appends of earlier requests (this request's own earlier attempts lost
    /// their race, so nothing of them is stored). `Err`: the append must not be sent.
    pub async fn record_attempt(&self, claim: &mut Claim, attempt: Attempt) -> Result<(), String> {
        let mut attempts = claim.earlier.clone();
        // Kept for a day where no erasure reaches: without the student's names.
        attempts.push(Attempt {
            outcome: attempt.outcome.without_personal(),
            ..attempt
        });
        if attempts.len() > MAX_ATTEMPTS_KEPT {
            tracing::warn!(key = %claim.kv_key, "too many unconfirmed appends for one key; forgetting the oldest");
            attempts.drain(..attempts.len() - MAX_ATTEMPTS_KEPT);
        }
        let record = claim
            .pending(&attempts)
            .map_err(|_| "encoding the claim".to_owned())?;
        let bucket = self.bucket().await?;
        let revision = bucket
            .update(&claim.kv_key, record, claim.revision)
            .await
            .map_err(|error| format!("recording the append in the idempotency claim: {error}"))?;
        claim.revision = revision;
        Ok(())
    }

    /// Stores the outcome of a claimed key, or releases the claim after a server error so a
    /// retry runs the command again.
    pub async fn finish(&self, claim: Claim, outcome: &Outcome) {
        if outcome.status >= 500 {
            if !self
                .release(&claim.kv_key, &claim.claim, Absent::Done)
                .await
            {
                // The broker is likely away (that is what most server errors are).
                self.release_in_background(claim.kv_key, claim.claim);
            }
            return;
        }
        let result = match encode(&Record::Done {
            fingerprint: claim.fingerprint,
            // Kept for a day where no erasure reaches: without the student's names.
            outcome: outcome.without_personal(),
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
            // for the claim to be abandoned, and find its append or run again).
            tracing::error!(%error, key = %claim.kv_key, "storing the idempotent outcome failed");
        }
    }

    /// Gives up the pending record with nonce `claim` under `kv_key`, and no other: deletes
    /// it, or, when it holds appends that may be stored, leaves them `unanswered` for the
    /// next retry. `true` when nothing is left to do (done, or the key does not hold that
    /// claim; a key holding nothing counts as done only with [`Absent::Done`]).
    async fn release(&self, kv_key: &str, claim: &str, absent: Absent) -> bool {
        let Ok(bucket) = self.bucket().await else {
            return false;
        };
        let entry = match bucket.entry(kv_key).await {
            Ok(Some(entry)) if entry.operation == kv::Operation::Put => entry,
            Ok(_) => return absent == Absent::Done,
            Err(_) => return false,
        };
        match serde_json::from_slice::<Record>(&entry.value) {
            Ok(Record::Pending {
                claim: stored,
                fingerprint,
                attempts,
                ..
            }) if stored == claim => {
                if attempts.is_empty() {
                    return bucket
                        .delete_expect_revision(kv_key, Some(entry.revision))
                        .await
                        .is_ok();
                }
                let Ok(record) = encode(&Record::Unanswered {
                    fingerprint,
                    attempts,
                }) else {
                    return false;
                };
                bucket.update(kv_key, record, entry.revision).await.is_ok()
            }
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
                // A claim whose write went unanswered may still be stored: keep looking.
                if store.release(&kv_key, &claim, Absent::MayLand).await {
                    return;
                }
            }
            tracing::warn!(key = %kv_key, "could not release an idempotency claim; it expires as abandoned");
        });
    }
}

impl Claim {
    /// This claim's pending record, holding `attempts`.
    fn pending(&self, attempts: &[Attempt]) -> Result<Bytes, Problem> {
        encode(&Record::Pending {
            fingerprint: self.fingerprint.clone(),
            started_at_ms: self.started_at_ms,
            claim: self.claim.clone(),
            attempts: attempts.to_vec(),
        })
    }
}

/// What a key holding no record means to a release.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Absent {
    /// The claim was written and confirmed: nothing to release.
    Done,
    /// The claim's write went unanswered: it may be stored a moment later (a resent
    /// publish after a broker blip), and would then block every retry until abandoned.
    /// The nemesis test found a key blocked 60 s this way.
    MayLand,
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
