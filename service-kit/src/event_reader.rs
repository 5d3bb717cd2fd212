//! The one way to read an event from the stream: decoded whatever schema version wrote it,
//! a student's sealed personal fields opened with its data key, or read as erased once the
//! key is destroyed (see `events::personal` and [`crate::data_keys`]).
//!
//! Keys come from [`DataKeys`]: the process's copies of the key blocks, kept current by a
//! watch on the bucket, so a destroyed key stops opening anything in every process as soon
//! as the watch delivers the rewrite (milliseconds), with no round trip per event.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use events::personal::{DataKeyRef, KekRing};
use events::{DecodeError, Decoded, Event, SealedEvent};
use uuid::Uuid;

use crate::data_keys::{DataKeyError, DataKeys, KeyLookup};

/// What happened to an event's personal fields on the way in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Personal {
    /// Stored in the clear (schema version 1) or none in this event.
    Clear,
    /// Sealed, and opened with the student's data key.
    Opened,
    /// Sealed, and the key is destroyed: the fields are empty for good.
    Erased,
}

#[derive(Debug)]
pub struct ReadEvent {
    pub event: Event,
    pub personal: Personal,
    /// Where the data key of a sealed event is kept (`None` for plain events).
    pub key: Option<DataKeyRef>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Undecodable(#[from] DecodeError),
    #[error("the personal fields are sealed and this reader was given no data keys")]
    NoKeys,
    /// A key block is written before any event sealed with its keys, so this passes (a
    /// lagging replica).
    #[error("key block {} of student {student} is not there (yet)", .key.block)]
    KeyMissing { student: Uuid, key: DataKeyRef },
    #[error(transparent)]
    Keys(#[from] DataKeyError),
    #[error("event {event} does not open with student {student}'s data key: {reason}")]
    Rejected {
        event: Uuid,
        student: Uuid,
        reason: String,
    },
}

impl ReadError {
    /// Whether reading again later may succeed (the broker or the bucket was out of reach,
    /// or the key is not visible yet); otherwise the bytes or the configuration are wrong.
    /// This process cannot open the key block (a KEK it was not given, e.g. mid-rotation):
    /// a configuration to fix, never a reason to set an event aside.
    pub fn is_configuration(&self) -> bool {
        matches!(
            self,
            ReadError::NoKeys | ReadError::Keys(DataKeyError::Unwrap { .. })
        )
    }

    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ReadError::KeyMissing { .. } | ReadError::Keys(DataKeyError::Broker(_))
        )
    }
}

#[derive(Clone)]
pub struct EventReader {
    keys: Keys,
}

#[derive(Clone)]
enum Keys {
    None,
    Bound(Box<DataKeys>),
    /// Bound at the first sealed event: a service starts before `stream-admin apply` made
    /// the bucket, and waits instead of exiting (a missing bucket reads as transient).
    Lazy(Arc<LazyKeys>),
}

struct LazyKeys {
    jetstream: async_nats::jetstream::Context,
    names: events::StreamNames,
    ring: Arc<KekRing>,
    bound: tokio::sync::OnceCell<DataKeys>,
}

impl EventReader {
    pub fn new(keys: DataKeys) -> Self {
        EventReader {
            keys: Keys::Bound(Box::new(keys)),
        }
    }

    /// A reader whose data-key bucket is opened when the first sealed event needs it.
    pub fn lazy(
        jetstream: async_nats::jetstream::Context,
        names: events::StreamNames,
        ring: Arc<KekRing>,
    ) -> Self {
        EventReader {
            keys: Keys::Lazy(Arc::new(LazyKeys {
                jetstream,
                names,
                ring,
                bound: tokio::sync::OnceCell::new(),
            })),
        }
    }

    /// A reader for streams that hold no sealed event (tests, tools on version 1 streams):
    /// a sealed event is [`ReadError::NoKeys`].
    pub fn without_keys() -> Self {
        EventReader { keys: Keys::None }
    }

    /// The data keys behind this reader (the writer seals with the same ones).
    pub async fn data_keys(&self) -> Result<&DataKeys, ReadError> {
        self.keys().await
    }

    /// Destroys the data keys of `erasures` (student, key: see [`erased_keys`]). The
    /// gateway that appended an erasure destroys the key before it answers; a projector
    /// doing it again (destroying is idempotent) covers a gateway stopped in between. Only
    /// a broker error fails (transient: the caller tries again); a block this process cannot
    /// unwrap is logged and left to the gateway.
    pub async fn destroy_erased_keys(
        &self,
        erasures: Vec<(Uuid, DataKeyRef)>,
    ) -> Result<(), ReadError> {
        for (student, key) in erasures {
            match self.keys().await?.destroy(key).await {
                Ok(()) => {}
                Err(error @ DataKeyError::Broker(_)) => return Err(error.into()),
                Err(error) => tracing::warn!(
                    %student,
                    block = %key.block,
                    %error,
                    "the erased student's data key could not be destroyed here"
                ),
            }
        }
        Ok(())
    }

    async fn keys(&self) -> Result<&DataKeys, ReadError> {
        match &self.keys {
            Keys::None => Err(ReadError::NoKeys),
            Keys::Bound(keys) => Ok(keys),
            Keys::Lazy(lazy) => Ok(lazy
                .bound
                .get_or_try_init(|| DataKeys::bind(&lazy.jetstream, &lazy.names, lazy.ring.clone()))
                .await?),
        }
    }

    pub async fn read(&self, bytes: &[u8]) -> Result<ReadEvent, ReadError> {
        self.open(events::decode_sealed(bytes)?).await
    }

    /// [`EventReader::open`] without waiting: `Err` gives the event back when its key is
    /// not at hand in this process (its block not seen yet, or the keys not bound yet).
    #[allow(clippy::result_large_err)] // the event itself comes back, to be opened later
    pub fn open_cached(
        &self,
        sealed: SealedEvent,
    ) -> Result<Result<ReadEvent, ReadError>, SealedEvent> {
        let keys = match &self.keys {
            Keys::Bound(keys) => keys,
            Keys::Lazy(lazy) => match lazy.bound.get() {
                Some(keys) => keys,
                None => return Err(sealed),
            },
            Keys::None => return Err(sealed),
        };
        match keys.cached(sealed.key()) {
            Some(lookup) => Ok(opened_with(sealed, lookup)),
            None => Err(sealed),
        }
    }

    /// Opens what [`events::decode_sealed`] gave (for callers that decode ahead).
    pub async fn open(&self, decoded: Decoded) -> Result<ReadEvent, ReadError> {
        let sealed = match decoded {
            Decoded::Plain(event) => {
                return Ok(ReadEvent {
                    event,
                    personal: Personal::Clear,
                    key: None,
                });
            }
            Decoded::Sealed(sealed) => sealed,
        };
        let lookup = self.keys().await?.lookup(sealed.key()).await?;
        opened_with(sealed, lookup)
    }
}

/// A sealed event read with what the bucket holds for its key.
fn opened_with(sealed: SealedEvent, lookup: KeyLookup) -> Result<ReadEvent, ReadError> {
    let (student, key) = (sealed.student(), sealed.key());
    match lookup {
        KeyLookup::Key(data_key) => {
            let event = sealed.metadata().event_id;
            let opened = sealed
                .open(&data_key)
                .map_err(|error| ReadError::Rejected {
                    event,
                    student,
                    reason: error.to_string(),
                })?;
            Ok(ReadEvent {
                event: opened,
                personal: Personal::Opened,
                key: Some(key),
            })
        }
        KeyLookup::Erased => Ok(ReadEvent {
            event: sealed.erased(),
            personal: Personal::Erased,
            key: Some(key),
        }),
        KeyLookup::Missing => Err(ReadError::KeyMissing { student, key }),
    }
}

/// The key-encryption keys from the file `KEK_FILE` names (a mounted Secret in the chart):
/// lines `<id>:<64 hex digits>`, the first one wrapping new keys. A service that handles
/// personal data does not start without it.
pub fn load_kek_ring(path: Option<&Path>) -> anyhow::Result<Arc<KekRing>> {
    let path = path.context(
        "KEK_FILE is not set: it names the file of key-encryption keys (lines `<id>:<64 hex \
         digits>`, the first wraps new keys) that protect the students' data keys",
    )?;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("KEK_FILE {}: cannot be read", path.display()))?;
    let ring = KekRing::parse(&text).with_context(|| format!("KEK_FILE {}", path.display()))?;
    Ok(Arc::new(ring))
}

/// The (student, data key) of each erasure among `events` that names its key.
pub fn erased_keys<'a>(events: impl IntoIterator<Item = &'a Event>) -> Vec<(Uuid, DataKeyRef)> {
    events
        .into_iter()
        .filter_map(|event| match &event.payload {
            events::EventPayload::StudentErased(events::Erasure { key: Some(key) }) => {
                Some((event.metadata.aggregate_id, *key))
            }
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_bad_kek_file_says_what_to_do() {
        let error = load_kek_ring(None).expect_err("no file").to_string();
        assert!(error.contains("KEK_FILE is not set"), "{error}");
        let missing = std::env::temp_dir().join(format!("no-such-kek-{}", Uuid::now_v7()));
        let error = format!("{:#}", load_kek_ring(Some(&missing)).expect_err("missing"));
        assert!(error.contains("cannot be read"), "{error}");
        let bad = std::env::temp_dir().join(format!("bad-kek-{}", Uuid::now_v7()));
        std::fs::write(&bad, "k1:abc\n").expect("write");
        let error = format!("{:#}", load_kek_ring(Some(&bad)).expect_err("bad"));
        assert!(error.contains("line 1"), "{error}");
        // The key itself never appears in an error.
        let good = "k1:000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
        std::fs::write(&bad, format!("{good}\n{good}\n")).expect("write");
        let error = format!("{:#}", load_kek_ring(Some(&bad)).expect_err("twice"));
        assert!(!error.contains("0001020304"), "{error}");
        std::fs::write(&bad, format!("{good}\n")).expect("write");
        assert_eq!(load_kek_ring(Some(&bad)).expect("good").current_id(), "k1");
        let _ = std::fs::remove_file(&bad);
    }

    #[tokio::test]
    async fn a_reader_without_keys_reads_plain_events_and_refuses_sealed_ones() {
        let event = Event {
            metadata: events::EventMetadata {
                event_id: Uuid::now_v7(),
                aggregate_kind: events::AggregateKind::Student,
                aggregate_id: Uuid::now_v7(),
                occurred_at: chrono::Utc::now(),
                correlation_id: Uuid::now_v7(),
                causation_id: Uuid::now_v7(),
                trace: events::TraceContext::default(),
            },
            payload: events::EventPayload::StudentRegistered(events::StudentDetails {
                name: "Ada L".into(),
                first_name: "Ada".into(),
                last_name: "Lovelace".into(),
            }),
        };
        let reader = EventReader::without_keys();
        let plain = reader.read(&events::encode(&event)).await.expect("plain");
        assert_eq!(
            (plain.event, plain.personal),
            (event.clone(), Personal::Clear)
        );
        let key_ref = DataKeyRef {
            block: Uuid::now_v7(),
            slot: 0,
        };
        let sealed = events::encode_sealed(&event, key_ref, &events::personal::DataKey::generate());
        let error = reader.read(&sealed).await.expect_err("sealed");
        assert!(matches!(error, ReadError::NoKeys), "{error}");
        assert!(!error.is_transient());
    }
}
