//! The students' data keys, kept in a KV bucket of their own (never in the event stream) as
//! key blocks (see `events::personal`): one entry per block, the block wrapped by a
//! key-encryption key, up to 256 students' keys in it. An erasure destroys one slot, after
//! which every sealed name of that student is unreadable in every copy of the stream
//! (crypto-shredding).
//!
//! - **Allocating** (gateways): a gateway writes a whole block of fresh keys when it needs
//!   one and hands out its slots, one per registration, so a registration costs no write of
//!   its own. A slot handed out for a registration that never lands is never used.
//! - **Reading**: every process keeps the blocks it has seen in memory, fed by a watch on
//!   the bucket (all blocks at start, then every rewrite), so opening a sealed event costs
//!   no round trip. A block not seen yet is read from the bucket. When the watch fails, the
//!   copies are dropped until it is back, so a destroyed slot is never served from a copy
//!   that missed the rewrite for longer than the watch takes to deliver it.
//! - **Destroying**: the block is rewritten without the slot (compare-and-set on its
//!   revision), then the previous revision's message is erased (`STREAM.MSG.DELETE`, which
//!   overwrites its bytes on disk): the bucket keeps two revisions per block, so the old one
//!   is never dropped by the history limit, which would leave its bytes in the files. A
//!   revision left behind by a crash between the two steps is erased by the next rewrite of
//!   that block (or `stream-admin keys sweep`).

use std::collections::HashMap;
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use events::StreamNames;
use events::personal::{BLOCK_SLOTS, DataKey, DataKeyRef, KekRing, KeyBlock, OpenError, SlotKey};
use futures::{StreamExt, TryStreamExt};
use tokio::sync::{Mutex, broadcast};
use uuid::Uuid;

/// What the bucket holds for one key reference.
#[derive(Debug)]
pub enum KeyLookup {
    Key(DataKey),
    /// Destroyed by an erasure: its sealed fields are gone for good.
    Erased,
    /// No such block (yet): a reader that expects one retries, it is not an erasure.
    Missing,
}

#[derive(Debug, thiserror::Error)]
pub enum DataKeyError {
    #[error("key block {block} does not open: {error}")]
    Unwrap { block: Uuid, error: OpenError },
    #[error("key block {0} has no slot {1}")]
    NoSuchSlot(Uuid, u16),
    #[error("the data-key bucket: {0}")]
    Broker(String),
}

fn broker(error: impl std::fmt::Display) -> DataKeyError {
    DataKeyError::Broker(error.to_string())
}

/// Sent on [`DataKeys::rewritten_blocks`] when any block may have been rewritten unseen.
pub const EVERY_BLOCK: Uuid = Uuid::nil();

/// Revisions kept per block: the current one, and the previous one until it is erased.
pub const BLOCK_HISTORY: i64 = 2;

/// The bucket's configuration, for `stream-admin apply`: replicated like the event stream,
/// no expiry, two revisions per block (see the module documentation).
pub fn bucket_config(names: &StreamNames, replicas: usize) -> kv::Config {
    kv::Config {
        bucket: names.student_keys_bucket(),
        description: "Blocks of the students' data keys, wrapped by a key-encryption key".into(),
        history: BLOCK_HISTORY,
        storage: jetstream::stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    }
}

/// Outcome of re-wrapping every block with the current KEK.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RewrapReport {
    pub rewrapped: u64,
    pub already_current: u64,
}

/// The data keys of one deployment: cheap to clone, one watch for all clones.
#[derive(Clone)]
pub struct DataKeys {
    inner: Arc<Inner>,
}

struct Inner {
    kv: kv::Store,
    ring: Arc<KekRing>,
    /// Blocks as last read, with the revision they were read at (a newer one always wins,
    /// whether the watch or a direct read brings it).
    blocks: RwLock<HashMap<Uuid, CachedBlock>>,
    /// The block this process hands slots out of.
    allocation: Mutex<Option<Allocation>>,
    /// Ids of blocks rewritten after this process first saw them (erasures, rotations).
    rewritten: broadcast::Sender<Uuid>,
    watch: tokio::task::JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.watch.abort();
    }
}

#[derive(Clone)]
struct CachedBlock {
    revision: u64,
    keys: Arc<KeyBlock>,
}

struct Allocation {
    block: Uuid,
    keys: Arc<KeyBlock>,
    next_slot: u16,
}

impl DataKeys {
    /// The bucket `stream-admin apply` made; starts the watch that keeps the copies current.
    pub async fn bind(
        jetstream: &jetstream::Context,
        names: &StreamNames,
        ring: Arc<KekRing>,
    ) -> Result<Self, DataKeyError> {
        let kv = jetstream
            .get_key_value(names.student_keys_bucket())
            .await
            .map_err(broker)?;
        let inner = Arc::new_cyclic(|weak: &Weak<Inner>| Inner {
            kv: kv.clone(),
            ring,
            blocks: RwLock::new(HashMap::new()),
            allocation: Mutex::new(None),
            rewritten: broadcast::channel(1024).0,
            watch: tokio::spawn(watch_blocks(kv, weak.clone())),
        });
        Ok(DataKeys { inner })
    }

    /// Block ids rewritten from now on (a slot destroyed, a KEK rotated): a holder of copies
    /// of anything a block's keys opened drops them. [`EVERY_BLOCK`] (the watch failed, so
    /// rewrites may have gone unseen) and a `Lagged` receiver mean: drop everything.
    pub fn rewritten_blocks(&self) -> broadcast::Receiver<Uuid> {
        self.inner.rewritten.subscribe()
    }

    /// A key for a new student (or a student written before sealing that gets its first
    /// key): a slot of this process's current block, after a new block is written when that
    /// one is used up.
    pub async fn allocate(&self) -> Result<(DataKeyRef, DataKey), DataKeyError> {
        let mut allocation = self.inner.allocation.lock().await;
        if allocation
            .as_ref()
            .is_none_or(|a| a.next_slot >= a.keys.len())
        {
            *allocation = Some(self.write_new_block().await?);
        }
        let Some(current) = allocation.as_mut() else {
            return Err(broker("no key block to allocate from"));
        };
        let slot = current.next_slot;
        current.next_slot += 1;
        match current.keys.slot(slot) {
            SlotKey::Key(key) => Ok((
                DataKeyRef {
                    block: current.block,
                    slot,
                },
                key,
            )),
            SlotKey::Destroyed | SlotKey::Unknown => {
                Err(DataKeyError::NoSuchSlot(current.block, slot))
            }
        }
    }

    async fn write_new_block(&self) -> Result<Allocation, DataKeyError> {
        let block = Uuid::now_v7();
        let keys = Arc::new(KeyBlock::generate());
        let wrapped = self.inner.ring.wrap(block, &keys);
        let revision = self
            .inner
            .kv
            .create(entry_key(block), wrapped.into())
            .await
            .map_err(broker)?;
        self.remember(block, revision, keys.clone());
        debug_assert_eq!(keys.len(), BLOCK_SLOTS);
        Ok(Allocation {
            block,
            keys,
            next_slot: 0,
        })
    }

    /// The key `key` names: from this process's copy of its block, or read from the bucket.
    pub async fn lookup(&self, key: DataKeyRef) -> Result<KeyLookup, DataKeyError> {
        let cached = self
            .inner
            .blocks
            .read()
            .ok()
            .and_then(|blocks| blocks.get(&key.block).map(|b| b.keys.clone()));
        let keys = match cached {
            Some(keys) => keys,
            None => match self.read_block(key.block).await? {
                Some((revision, keys)) => self.remember(key.block, revision, Arc::new(keys)),
                None => return Ok(KeyLookup::Missing),
            },
        };
        match keys.slot(key.slot) {
            SlotKey::Key(data_key) => Ok(KeyLookup::Key(data_key)),
            SlotKey::Destroyed => Ok(KeyLookup::Erased),
            SlotKey::Unknown => Err(DataKeyError::NoSuchSlot(key.block, key.slot)),
        }
    }

    /// The key `key` names if this process holds its block (no I/O): for opening events
    /// while waiting on something else. `None`: ask [`DataKeys::lookup`].
    pub fn cached(&self, key: DataKeyRef) -> Option<KeyLookup> {
        let blocks = self.inner.blocks.read().ok()?;
        match blocks.get(&key.block)?.keys.slot(key.slot) {
            SlotKey::Key(data_key) => Some(KeyLookup::Key(data_key)),
            SlotKey::Destroyed => Some(KeyLookup::Erased),
            SlotKey::Unknown => None,
        }
    }

    /// The block as the bucket holds it now.
    async fn read_block(&self, block: Uuid) -> Result<Option<(u64, KeyBlock)>, DataKeyError> {
        let Some(entry) = self
            .inner
            .kv
            .entry(entry_key(block))
            .await
            .map_err(broker)?
        else {
            return Ok(None);
        };
        if entry.operation != kv::Operation::Put {
            return Ok(None);
        }
        let keys = self
            .inner
            .ring
            .unwrap(block, &entry.value)
            .map_err(|error| DataKeyError::Unwrap { block, error })?;
        Ok(Some((entry.revision, keys)))
    }

    /// Keeps `keys` as block `block` at `revision` unless a newer revision is kept; answers
    /// the keys now kept.
    fn remember(&self, block: Uuid, revision: u64, keys: Arc<KeyBlock>) -> Arc<KeyBlock> {
        remember(&self.inner, block, revision, keys)
    }

    /// Destroys the key `key` names, for good. Idempotent: a destroyed slot stays destroyed
    /// (and any revision of its block left behind is erased now).
    pub async fn destroy(&self, key: DataKeyRef) -> Result<(), DataKeyError> {
        self.rewrite(key.block, |ring, keys, _wrapped| {
            if keys.destroy(key.slot) {
                Some(ring.wrap(key.block, keys))
            } else {
                None
            }
        })
        .await
    }

    /// Re-wraps every block that an older KEK wraps with the current one (after a KEK
    /// rotation); events are not touched. Safe while keys are made and destroyed: each
    /// rewrite is a compare-and-set on the revision it read.
    pub async fn rewrap_all(&self) -> Result<RewrapReport, DataKeyError> {
        let mut report = RewrapReport::default();
        for block in self.block_ids().await? {
            let mut rewrapped = false;
            self.rewrite(block, |ring, _, wrapped| {
                let again = ring.rewrap(block, wrapped).ok().flatten();
                rewrapped = again.is_some();
                again
            })
            .await?;
            if rewrapped {
                report.rewrapped += 1;
            } else {
                report.already_current += 1;
            }
        }
        Ok(report)
    }

    /// Erases every revision that is not its block's current one (what a crash between a
    /// rewrite and its erasure leaves behind); answers how many.
    pub async fn sweep(&self) -> Result<u64, DataKeyError> {
        let mut erased = 0;
        for block in self.block_ids().await? {
            erased += self.erase_older_revisions(block, None).await?;
        }
        Ok(erased)
    }

    async fn block_ids(&self) -> Result<Vec<Uuid>, DataKeyError> {
        let keys: Vec<String> = self
            .inner
            .kv
            .keys()
            .await
            .map_err(broker)?
            .try_collect()
            .await
            .map_err(broker)?;
        Ok(keys
            .iter()
            .filter_map(|k| Uuid::parse_str(k).ok())
            .collect())
    }

    /// Rewrites block `block` with what `change` makes of it (`None`: nothing to change),
    /// then erases the revision it replaced. Retried when another writer got there first.
    async fn rewrite(
        &self,
        block: Uuid,
        mut change: impl FnMut(&KekRing, &mut KeyBlock, &[u8]) -> Option<Vec<u8>>,
    ) -> Result<(), DataKeyError> {
        const TRIES: u32 = 10;
        for _ in 0..TRIES {
            let Some(entry) = self
                .inner
                .kv
                .entry(entry_key(block))
                .await
                .map_err(broker)?
            else {
                // A block is written before any event names it, so this is a replica that
                // has not seen it yet: claiming the key destroyed would be a lie.
                return Err(DataKeyError::Broker(format!(
                    "key block {block} is not visible here yet"
                )));
            };
            if entry.operation != kv::Operation::Put {
                return Ok(());
            }
            // A revision a crash left behind goes first, so the history limit never drops
            // one unerased.
            self.erase_older_revisions(block, Some(entry.revision))
                .await?;
            let mut keys = self
                .inner
                .ring
                .unwrap(block, &entry.value)
                .map_err(|error| DataKeyError::Unwrap { block, error })?;
            let Some(rewritten) = change(&self.inner.ring, &mut keys, &entry.value) else {
                return Ok(());
            };
            match self
                .inner
                .kv
                .update(entry_key(block), rewritten.into(), entry.revision)
                .await
            {
                Ok(revision) => {
                    self.erase(entry.revision).await?;
                    self.remember(block, revision, Arc::new(keys));
                    let _ = self.inner.rewritten.send(block);
                    return Ok(());
                }
                Err(error) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(error) => return Err(broker(error)),
            }
        }
        Err(broker(format!(
            "key block {block} kept changing; gave up after {TRIES} tries"
        )))
    }

    /// Erases the revisions of `block` other than `keep` (all but the newest when `None`).
    async fn erase_older_revisions(
        &self,
        block: Uuid,
        keep: Option<u64>,
    ) -> Result<u64, DataKeyError> {
        let revisions: Vec<u64> = self
            .inner
            .kv
            .history(entry_key(block))
            .await
            .map_err(broker)?
            .map_ok(|entry| entry.revision)
            .try_collect()
            .await
            .map_err(broker)?;
        let keep = keep.or_else(|| revisions.iter().copied().max());
        let mut erased = 0;
        for revision in revisions {
            if Some(revision) != keep && keep.is_some_and(|k| revision < k) {
                self.erase(revision).await?;
                erased += 1;
            }
        }
        Ok(erased)
    }

    /// Erases one message of the bucket: the server overwrites its bytes on disk, on every
    /// replica, before it answers.
    async fn erase(&self, revision: u64) -> Result<(), DataKeyError> {
        match self.inner.kv.stream.delete_message(revision).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(broker(
                "the server did not erase the key block's old revision",
            )),
            Err(error) => {
                // Erased already (a retry, a concurrent sweep): nothing is left to erase.
                let text = error.to_string();
                if text.contains("no message found") {
                    Ok(())
                } else {
                    Err(broker(text))
                }
            }
        }
    }
}

fn remember(inner: &Inner, block: Uuid, revision: u64, keys: Arc<KeyBlock>) -> Arc<KeyBlock> {
    let Ok(mut blocks) = inner.blocks.write() else {
        return keys;
    };
    if let Some(kept) = blocks.get(&block) {
        if kept.revision >= revision {
            return kept.keys.clone();
        }
        // A block this process had seen, rewritten: an erasure or a rotation.
        let _ = inner.rewritten.send(block);
    }
    blocks.insert(
        block,
        CachedBlock {
            revision,
            keys: keys.clone(),
        },
    );
    keys
}

/// Keeps the process's copies of the blocks current: every block at start, then every
/// rewrite. On any failure the copies go (lookups read the bucket) and the watch starts over.
async fn watch_blocks(kv: kv::Store, inner: Weak<Inner>) {
    let mut pause = Duration::from_millis(100);
    loop {
        match kv.watch_with_history(">").await {
            Ok(mut entries) => {
                pause = Duration::from_millis(100);
                while let Some(entry) = entries.next().await {
                    let Some(inner) = inner.upgrade() else {
                        return;
                    };
                    let Ok(entry) = entry else {
                        break;
                    };
                    let Ok(block) = Uuid::parse_str(&entry.key) else {
                        continue;
                    };
                    if entry.operation != kv::Operation::Put {
                        continue;
                    }
                    match inner.ring.unwrap(block, &entry.value) {
                        Ok(keys) => {
                            remember(&inner, block, entry.revision, Arc::new(keys));
                        }
                        Err(error) => {
                            // Lookups of this block read it again and report the error.
                            tracing::warn!(%block, %error, "a key block does not open");
                        }
                    }
                }
            }
            Err(error) => tracing::debug!(%error, "watching the data-key bucket"),
        }
        let Some(inner) = inner.upgrade() else {
            return;
        };
        if let Ok(mut blocks) = inner.blocks.write() {
            blocks.clear();
        }
        let _ = inner.rewritten.send(EVERY_BLOCK);
        drop(inner);
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

fn entry_key(block: Uuid) -> String {
    block.to_string()
}
