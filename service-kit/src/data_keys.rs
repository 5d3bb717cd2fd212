//! The students' data keys, kept in a KV bucket of their own (never in the event stream):
//! one wrapped key per student, made when the student is registered and destroyed when it
//! is erased, after which every sealed name of that student is unreadable in every copy of
//! the stream (crypto-shredding, see `events::personal`).
//!
//! Destroying a key erases its stored message (`STREAM.MSG.DELETE`, which overwrites the
//! bytes on disk) before a purge marker records the erasure, so neither the bucket's history
//! nor its files keep the wrapped key. A destroyed key never comes back: a new key for that
//! student is refused.

use std::sync::Arc;

use async_nats::jetstream::{self, kv};
use events::StreamNames;
use events::personal::{DataKey, KekRing, OpenError};
use futures::TryStreamExt;
use uuid::Uuid;

/// What the bucket holds for one student.
#[derive(Debug)]
pub enum KeyLookup {
    Key(DataKey),
    /// Destroyed by an erasure: its sealed fields are gone for good.
    Erased,
    /// No key (yet): a reader that expects one retries, it is not an erasure.
    Missing,
}

#[derive(Debug, thiserror::Error)]
pub enum DataKeyError {
    #[error("the data key of student {0} was destroyed by its erasure")]
    Erased(Uuid),
    #[error("the data key of student {student} does not open: {error}")]
    Unwrap { student: Uuid, error: OpenError },
    #[error("the data-key bucket: {0}")]
    Broker(String),
}

fn broker(error: impl std::fmt::Display) -> DataKeyError {
    DataKeyError::Broker(error.to_string())
}

/// The bucket's configuration, for `stream-admin apply`: one revision per key (a destroyed
/// key must leave no older revision behind), replicated like the event stream, no expiry.
pub fn bucket_config(names: &StreamNames, replicas: usize) -> kv::Config {
    kv::Config {
        bucket: names.student_keys_bucket(),
        description: "Each student's data key, wrapped by a key-encryption key".into(),
        history: 1,
        storage: jetstream::stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    }
}

/// Outcome of re-wrapping every key with the current KEK.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RewrapReport {
    pub rewrapped: u64,
    pub already_current: u64,
}

#[derive(Clone)]
pub struct DataKeys {
    kv: kv::Store,
    ring: Arc<KekRing>,
}

impl DataKeys {
    /// The bucket `stream-admin apply` made.
    pub async fn bind(
        jetstream: &jetstream::Context,
        names: &StreamNames,
        ring: Arc<KekRing>,
    ) -> Result<Self, DataKeyError> {
        let kv = jetstream
            .get_key_value(names.student_keys_bucket())
            .await
            .map_err(broker)?;
        Ok(DataKeys { kv, ring })
    }

    /// The student's data key, made now if it has none. Two gateways registering the same
    /// student (a retried create) get the same key: only the first write wins, by
    /// compare-and-set on "no message yet", which an erasure's marker also fails.
    pub async fn key_for_registration(&self, student: Uuid) -> Result<DataKey, DataKeyError> {
        let key = DataKey::generate();
        let wrapped = self.ring.wrap(student, &key);
        match self.kv.update(entry_key(student), wrapped.into(), 0).await {
            Ok(_) => Ok(key),
            Err(error) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                match self.lookup(student).await? {
                    KeyLookup::Key(existing) => Ok(existing),
                    KeyLookup::Erased => Err(DataKeyError::Erased(student)),
                    KeyLookup::Missing => Err(broker(
                        "a key was refused as existing, then not found; try again",
                    )),
                }
            }
            Err(error) => Err(broker(error)),
        }
    }

    pub async fn lookup(&self, student: Uuid) -> Result<KeyLookup, DataKeyError> {
        let Some(entry) = self.kv.entry(entry_key(student)).await.map_err(broker)? else {
            return Ok(KeyLookup::Missing);
        };
        match entry.operation {
            kv::Operation::Put => self
                .ring
                .unwrap(student, &entry.value)
                .map(KeyLookup::Key)
                .map_err(|error| DataKeyError::Unwrap { student, error }),
            kv::Operation::Delete | kv::Operation::Purge => Ok(KeyLookup::Erased),
        }
    }

    /// Destroys the student's key for good. Idempotent: destroying an erased or missing key
    /// leaves (or writes) the erasure marker.
    pub async fn destroy(&self, student: Uuid) -> Result<(), DataKeyError> {
        let key = entry_key(student);
        if let Some(entry) = self.kv.entry(&key).await.map_err(broker)? {
            if entry.operation != kv::Operation::Put {
                return Ok(());
            }
            // Overwritten on disk by the server (no `no_erase`), on every replica.
            let stream = self
                .kv
                .stream
                .delete_message(entry.revision)
                .await
                .map_err(broker)?;
            if !stream {
                return Err(broker("the server did not erase the key's message"));
            }
        }
        self.kv.purge(&key).await.map_err(broker)
    }

    /// Re-wraps every key that an older KEK wraps with the current one (after a KEK
    /// rotation); events are not touched. Safe to run while keys are made: each rewrite is
    /// a compare-and-set on the revision it read.
    pub async fn rewrap_all(&self) -> Result<RewrapReport, DataKeyError> {
        let mut report = RewrapReport::default();
        let keys: Vec<String> = self
            .kv
            .keys()
            .await
            .map_err(broker)?
            .try_collect()
            .await
            .map_err(broker)?;
        for key in keys {
            let Ok(student) = Uuid::parse_str(&key) else {
                continue;
            };
            let Some(entry) = self.kv.entry(&key).await.map_err(broker)? else {
                continue;
            };
            if entry.operation != kv::Operation::Put {
                continue;
            }
            match self
                .ring
                .rewrap(student, &entry.value)
                .map_err(|error| DataKeyError::Unwrap { student, error })?
            {
                None => report.already_current += 1,
                Some(rewrapped) => {
                    self.kv
                        .update(&key, rewrapped.into(), entry.revision)
                        .await
                        .map_err(broker)?;
                    report.rewrapped += 1;
                }
            }
        }
        Ok(report)
    }
}

fn entry_key(student: Uuid) -> String {
    student.to_string()
}
