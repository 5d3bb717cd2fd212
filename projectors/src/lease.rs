//! Active/standby: which projectors replica applies a projection. One key per projection in
//! a JetStream KV bucket (replicated like the event stream) names the active replica; the
//! KV revision of the write that acquired it is the **fencing token** the store checks in
//! the same transaction (or conditional write) as the checkpoint, so a replica that lost
//! the lease while paused or cut off cannot commit anything after another has claimed it.
//!
//! - The active renews every `renew_every` (a compare-and-set on its last revision). A
//!   renewal that finds another revision means the lease was taken: it stops at once. One
//!   that cannot reach NATS for most of the `ttl` stops too (the standby may take over).
//! - A standby polls the key. It takes over when the key is absent or deleted (a graceful
//!   stop releases it), or when the revision it sees has not changed for `ttl` by its own
//!   clock — no clock comparison between replicas.
//! - Taking over is a compare-and-set too, so of several standbys exactly one wins.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use events::Projection;
use serde::{Deserialize, Serialize};

/// Lease timings. A standby takes over at most `ttl + poll_every` after the active's last
/// renewal (plus its claim and resubscription).
#[derive(Debug, Clone)]
pub struct LeaseSettings {
    pub ttl: Duration,
    pub renew_every: Duration,
    pub poll_every: Duration,
    /// This replica's name in the lease; `None`: [`Leases::default_replica_name`]. A
    /// process restarted under the name that holds the lease takes it back at once (a
    /// container restarted in its pod); any other waits for the lease to expire.
    pub replica: Option<String>,
}

impl Default for LeaseSettings {
    fn default() -> Self {
        LeaseSettings::with_ttl(Duration::from_secs(5))
    }
}

impl LeaseSettings {
    /// Renewal five times per `ttl`, standby polls twenty times.
    pub fn with_ttl(ttl: Duration) -> Self {
        LeaseSettings {
            ttl,
            renew_every: ttl / 5,
            poll_every: ttl / 20,
            replica: None,
        }
    }

    /// How long the active keeps applying without a successful renewal: well before a
    /// standby may take over (the store's fence is the guarantee, this only avoids work
    /// that would be refused).
    fn self_demote_after(&self) -> Duration {
        self.ttl.mul_f64(0.8)
    }
}

/// What the key holds (for operators reading the bucket; the logic reads only revisions).
#[derive(Debug, Serialize, Deserialize)]
struct Holder {
    holder: String,
    token: u64,
}

/// The leases of one replica.
#[derive(Clone)]
pub struct Leases {
    jetstream: jetstream::Context,
    bucket: String,
    /// The bucket, opened on first use (it may not exist yet when the replica starts).
    store: std::sync::Arc<tokio::sync::OnceCell<kv::Store>>,
    /// Names this replica in the key (pod name, pid and a random part).
    pub holder: String,
    pub settings: LeaseSettings,
}

/// A lease this replica holds.
#[derive(Debug)]
pub struct HeldLease {
    key: String,
    revision: u64,
    /// The revision of the write that acquired the lease: the fencing token.
    pub token: u64,
    renewed: Instant,
}

/// What a standby has seen of the key so far.
#[derive(Default)]
pub struct Watch {
    seen: Option<(u64, Instant)>,
}

/// Why a renewal failed.
#[derive(Debug)]
pub enum RenewError {
    /// Another replica holds the lease now.
    Lost(String),
    /// NATS did not answer; the lease may still be ours.
    Unreachable(String),
}

impl Leases {
    pub fn new(
        jetstream: jetstream::Context,
        bucket: String,
        holder: String,
        settings: LeaseSettings,
    ) -> Self {
        Leases {
            jetstream,
            bucket,
            store: Default::default(),
            holder,
            settings,
        }
    }

    /// The pod's name (`HOSTNAME`, stable across container restarts in Kubernetes), else
    /// one unique to this process.
    pub fn default_replica_name() -> String {
        match std::env::var("HOSTNAME") {
            Ok(host) if !host.trim().is_empty() => host,
            _ => {
                let random = uuid::Uuid::new_v4().simple().to_string();
                format!("replica-{}-{}", std::process::id(), &random[..8])
            }
        }
    }

    async fn store(&self) -> anyhow::Result<&kv::Store> {
        self.store
            .get_or_try_init(|| async {
                self.jetstream
                    .get_key_value(&self.bucket)
                    .await
                    .map_err(|e| {
                        anyhow::anyhow!(
                            "KV bucket {} (run `stream-admin apply`?): {e}",
                            self.bucket
                        )
                    })
            })
            .await
    }

    fn value(&self, token: u64) -> bytes::Bytes {
        serde_json::to_vec(&Holder {
            holder: self.holder.clone(),
            token,
        })
        .unwrap_or_default()
        .into()
    }

    /// One look of a standby at `projection`'s key: `Ok(Some(lease))` when this replica
    /// now holds it, `Ok(None)` while another replica's lease is alive.
    pub async fn try_acquire(
        &self,
        projection: Projection,
        watch: &mut Watch,
    ) -> anyhow::Result<Option<HeldLease>> {
        let store = self.store().await?;
        let key = projection.as_str().to_owned();
        let expected = match store.entry(&key).await? {
            None => 0,
            Some(entry) if entry.operation != kv::Operation::Put => entry.revision,
            Some(entry) => {
                let ours = serde_json::from_slice::<Holder>(&entry.value)
                    .is_ok_and(|held| held.holder == self.holder);
                let expired = match watch.seen {
                    Some((revision, since)) if revision == entry.revision => {
                        since.elapsed() >= self.settings.ttl
                    }
                    _ => {
                        watch.seen = Some((entry.revision, Instant::now()));
                        false
                    }
                };
                if !ours && !expired {
                    return Ok(None);
                }
                entry.revision
            }
        };
        // The token is the revision this write gets, unknown before it: the value names
        // the revision it replaced, and the lease records the real token.
        match store.update(&key, self.value(expected), expected).await {
            Ok(revision) => {
                watch.seen = None;
                Ok(Some(HeldLease {
                    key,
                    revision,
                    token: revision,
                    renewed: Instant::now(),
                }))
            }
            // Another standby was quicker, or the active renewed just now.
            Err(error) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(None),
            Err(error) => Err(error.into()),
        }
    }

    /// Renews `lease` (compare-and-set on its last revision).
    pub async fn renew(&self, lease: &mut HeldLease) -> Result<(), RenewError> {
        let store = self
            .store()
            .await
            .map_err(|e| RenewError::Unreachable(format!("{e:#}")))?;
        match store
            .update(&lease.key, self.value(lease.token), lease.revision)
            .await
        {
            Ok(revision) => {
                lease.revision = revision;
                lease.renewed = Instant::now();
                Ok(())
            }
            Err(error) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => Err(
                RenewError::Lost(format!("the lease of {} was taken over", lease.key)),
            ),
            Err(error) => Err(RenewError::Unreachable(error.to_string())),
        }
    }

    /// Whether the active should stop for lack of renewals.
    pub fn expired_for_holder(&self, lease: &HeldLease) -> bool {
        lease.renewed.elapsed() >= self.settings.self_demote_after()
    }

    /// Gives the lease up (graceful stop), so a standby takes over at once.
    pub async fn release(&self, lease: HeldLease) {
        let Ok(store) = self.store().await else {
            return;
        };
        if let Err(error) = store
            .delete_expect_revision(&lease.key, Some(lease.revision))
            .await
        {
            tracing::warn!(%error, key = lease.key, "releasing the projection lease failed; it expires");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_holder_gives_up_before_a_standby_may_take_over() {
        let settings = LeaseSettings::with_ttl(Duration::from_secs(5));
        assert!(settings.self_demote_after() < settings.ttl);
        assert!(settings.renew_every * 3 < settings.self_demote_after());
        assert!(settings.poll_every < settings.renew_every);
    }
}
