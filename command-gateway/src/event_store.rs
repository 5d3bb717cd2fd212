//! The event stream as the command side sees it: read one aggregate's events from its
//! subject, append events with optimistic concurrency, several aggregates atomically.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::header::{
    NATS_BATCH_COMMIT, NATS_BATCH_ID, NATS_BATCH_SEQUENCE, NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
    NATS_MESSAGE_ID,
};
use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::{DirectGetErrorKind, RawMessageErrorKind};
use async_nats::jetstream::{self, context::PublishErrorKind, message::PublishMessage};
use bytes::Bytes;
use events::personal::{DataKeyRef, KekRing};
use events::{Event, EventPayload, StreamNames};
use serde::Deserialize;
use service_kit::data_keys::KeyLookup;
use service_kit::event_reader::EventReader;
use std::sync::Arc;
use tokio::sync::Semaphore;
use uuid::Uuid;

use crate::domain::AggregateId;

/// Header naming the event type, so tools can filter without decoding payloads.
pub const EVENT_TYPE_HEADER: &str = "School-Event-Type";
/// JetStream's error code for a failed expected-sequence check.
const WRONG_LAST_SEQUENCE: u64 = 10071;
/// JetStream's error code for an atomic batch holding an already stored `Nats-Msg-Id`.
const BATCH_DUPLICATE_MESSAGE_ID: u64 = 10201;
/// JetStream's error code for an atomic batch refused because the stream has too many in
/// flight (nats-server's `max_inflight_per_stream`, 50 by default).
const BATCH_TOO_MANY_IN_FLIGHT: u64 = 10210;
/// JetStream's error code for a commit whose batch the server does not hold whole. A first
/// message refused for [`BATCH_TOO_MANY_IN_FLIGHT`] is answered to no one (it carries no
/// reply subject), so the commit reports this instead. Either way nothing was stored.
const BATCH_INCOMPLETE: u64 = 10176;
/// nats-server accepts at most 50 atomic batches in flight per stream; stay below it so
/// a burst of multi-aggregate commands waits here instead of being refused. The limit is
/// shared by every gateway replica, so a refusal is still possible: it is retried.
const MAX_BATCHES_IN_FLIGHT: usize = 32;
/// Pauses before resending a batch the broker refused for lack of room: doubling from
/// 5 ms, about 2.5 s in all, then the command is answered 503.
const BATCH_RETRY_FIRST_PAUSE: Duration = Duration::from_millis(5);
const BATCH_RETRIES: u32 = 9;
/// How long to wait for the broker to confirm an append.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Why an append did not happen.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// Another writer appended to one of the aggregates since it was read. Nothing of the
    /// append was stored.
    #[error("an aggregate changed since it was read")]
    Conflict,
    /// The broker did not confirm the write; it may or may not be stored. A retry with the
    /// same event ids is recognised (see [`EventStore::append`]).
    #[error("the event store is unavailable: {0}")]
    Unavailable(String),
}

/// Why an aggregate could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("the event store is unavailable: {0}")]
    Unavailable(String),
    #[error("event {sequence} on {subject} cannot be decoded: {reason}")]
    Undecodable {
        subject: String,
        sequence: u64,
        reason: String,
    },
}

/// Which replica of the stream answers a read.
///
/// With `allow_direct` every replica of an R3 stream answers direct gets, and a follower may
/// not have applied the newest appends yet. That is fine for a read an append's expected
/// version will check (a stale read only loses the race), not for a read whose answer is
/// final on its own: those go to the stream leader (`STREAM.MSG.GET`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadFrom {
    /// Any replica (direct get): fast, possibly behind.
    AnyReplica,
    /// The stream leader: every acknowledged append.
    Leader,
}

/// The first message on `subject` at or after stream sequence `from_sequence`, if any.
async fn next_on_subject(
    stream: &jetstream::stream::Stream<()>,
    subject: &str,
    from_sequence: u64,
    from: ReadFrom,
) -> Result<Option<StreamMessage>, String> {
    match from {
        ReadFrom::AnyReplica => match stream
            .direct_get_next_for_subject(subject, Some(from_sequence))
            .await
        {
            Ok(message) => Ok(Some(message)),
            Err(error) if error.kind() == DirectGetErrorKind::NotFound => Ok(None),
            Err(error) => Err(error.to_string()),
        },
        ReadFrom::Leader => match stream
            .get_first_raw_message_by_subject(subject, from_sequence)
            .await
        {
            Ok(message) => Ok(Some(message)),
            Err(error) if error.kind() == RawMessageErrorKind::NoMessageFound => Ok(None),
            Err(error) => Err(error.to_string()),
        },
    }
}

/// The event stream's command-side port.
#[derive(Clone)]
pub struct EventStore {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    names: StreamNames,
    /// Seals a student's personal fields with its data key on the way out, opens them on
    /// the way in (the one reading path).
    reader: EventReader,
    /// Off only for the benchmark's figure without encryption (`--unsealed-for-benchmark`).
    seal: bool,
    batches: std::sync::Arc<Semaphore>,
}

/// One event of an aggregate as read back.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub sequence: u64,
    pub payload: EventPayload,
    /// Where the data key of a sealed student event is kept.
    pub key: Option<DataKeyRef>,
}

/// What the broker answers to an atomic batch commit.
#[derive(Debug, Deserialize)]
struct BatchAck {
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    count: Option<u64>,
    #[serde(default)]
    error: Option<BrokerError>,
}

#[derive(Debug, Deserialize)]
struct BrokerError {
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

impl EventStore {
    pub fn new(jetstream: jetstream::Context, names: StreamNames, kek: Arc<KekRing>) -> Self {
        EventStore {
            reader: EventReader::lazy(jetstream.clone(), names.clone(), kek),
            seal: true,
            client: jetstream.client(),
            jetstream,
            names,
            batches: std::sync::Arc::new(Semaphore::new(MAX_BATCHES_IN_FLIGHT)),
        }
    }

    /// Writes personal fields in the clear (schema version 1), for the benchmark's figure
    /// without encryption only: never in a deployment.
    pub fn unsealed_for_benchmark(mut self) -> Self {
        self.seal = false;
        self
    }

    pub fn names(&self) -> &StreamNames {
        &self.names
    }

    /// The one reading path this store reads with (its data keys seal what it writes).
    pub fn reader(&self) -> &EventReader {
        &self.reader
    }

    fn subject(&self, aggregate: AggregateId) -> String {
        self.names.aggregate_subject(aggregate.kind, aggregate.id)
    }

    /// The events of one aggregate after stream sequence `after`, in order, with their
    /// sequences. Reads only that aggregate's subject, from where `from` says.
    pub async fn load(
        &self,
        aggregate: AggregateId,
        after: u64,
        from: ReadFrom,
    ) -> Result<Vec<Loaded>, LoadError> {
        let subject = self.subject(aggregate);
        let stream = self
            .jetstream
            .get_stream_no_info(self.names.event_stream())
            .await
            .map_err(|e| LoadError::Unavailable(e.to_string()))?;
        let mut events = Vec::new();
        let mut next = after + 1;
        while let Some(message) = next_on_subject(&stream, &subject, next, from)
            .await
            .map_err(LoadError::Unavailable)?
        {
            let read = match self.reader.read(&message.payload).await {
                Ok(read) => read,
                Err(error) if error.is_transient() => {
                    return Err(LoadError::Unavailable(format!(
                        "event {} on {subject}: {error}",
                        message.sequence
                    )));
                }
                Err(error) => {
                    return Err(LoadError::Undecodable {
                        subject: subject.clone(),
                        sequence: message.sequence,
                        reason: error.to_string(),
                    });
                }
            };
            events.push(Loaded {
                sequence: message.sequence,
                payload: read.event.payload,
                key: read.key,
            });
            next = message.sequence + 1;
        }
        Ok(events)
    }

    /// Appends `events` (in order) if every aggregate they touch is still at the version in
    /// `expected` (0: no event yet). Several events are one atomic batch: all are stored or
    /// none. Returns the stream sequence of each event.
    ///
    /// A student's registration or update is sealed with the data key `keys` names for it;
    /// a student without one (a new one, or one written before sealing) gets a new key,
    /// added to `keys`.
    pub async fn append(
        &self,
        events: &[Event],
        expected: &BTreeMap<AggregateId, u64>,
        keys: &mut BTreeMap<Uuid, DataKeyRef>,
    ) -> Result<Vec<u64>, AppendError> {
        let mut encoded = Vec::with_capacity(events.len());
        for event in events {
            encoded.push(Bytes::from(self.encode(event, keys).await?));
        }
        match events {
            [] => Ok(Vec::new()),
            [event] => self
                .append_one(event, encoded.swap_remove(0), expected)
                .await
                .map(|seq| vec![seq]),
            _ => self.append_batch(events, &encoded, expected).await,
        }
    }

    /// A student's registration or update sealed with its data key, an erasure naming that
    /// key (so the projectors can destroy it too), every other event as it is.
    async fn encode(
        &self,
        event: &Event,
        keys: &mut BTreeMap<Uuid, DataKeyRef>,
    ) -> Result<Vec<u8>, AppendError> {
        if let EventPayload::StudentErased(erasure) = &event.payload
            && erasure.key.is_none()
            && let Some(&key) = keys.get(&event.metadata.aggregate_id)
        {
            let mut event = event.clone();
            event.payload = EventPayload::StudentErased(events::Erasure { key: Some(key) });
            return Ok(events::encode(&event));
        }
        let personal = matches!(
            event.payload,
            EventPayload::StudentRegistered(_) | EventPayload::StudentUpdated(_)
        );
        if !personal || !self.seal {
            return Ok(events::encode(event));
        }
        let unavailable = |e: &dyn std::fmt::Display| {
            AppendError::Unavailable(format!("the student's data key: {e}"))
        };
        let data_keys = self.reader.data_keys().await.map_err(|e| unavailable(&e))?;
        let student = event.metadata.aggregate_id;
        let (key_ref, key) = match keys.get(&student) {
            Some(&key_ref) => match data_keys
                .lookup(key_ref)
                .await
                .map_err(|e| unavailable(&e))?
            {
                KeyLookup::Key(key) => (key_ref, key),
                // Erased meanwhile: the decision read a student that is gone; deciding again
                // reads its deletion.
                KeyLookup::Erased => return Err(AppendError::Conflict),
                KeyLookup::Missing => {
                    return Err(AppendError::Unavailable(format!(
                        "key block {} is not there (yet)",
                        key_ref.block
                    )));
                }
            },
            None => {
                let (key_ref, key) = data_keys.allocate().await.map_err(|e| unavailable(&e))?;
                keys.insert(student, key_ref);
                (key_ref, key)
            }
        };
        Ok(events::encode_sealed(event, key_ref, &key))
    }

    /// Headers of one event: dedup id, type, trace context, and the expected version on the
    /// first event of each aggregate (the broker checks it against the stream before the
    /// batch, so later events of the same aggregate must not repeat it).
    fn headers(event: &Event, expected_version: Option<u64>) -> HeaderMap {
        let meta = &event.metadata;
        let mut headers = HeaderMap::new();
        headers.insert(NATS_MESSAGE_ID, meta.event_id.to_string().as_str());
        headers.insert(EVENT_TYPE_HEADER, event.payload.event_type());
        if let Some(version) = expected_version {
            headers.insert(
                NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                version.to_string().as_str(),
            );
        }
        if !meta.trace.traceparent.is_empty() {
            headers.insert("traceparent", meta.trace.traceparent.as_str());
        }
        headers
    }

    fn aggregate_of(event: &Event) -> AggregateId {
        AggregateId {
            kind: event.metadata.aggregate_kind,
            id: event.metadata.aggregate_id,
        }
    }

    async fn append_one(
        &self,
        event: &Event,
        payload: Bytes,
        expected: &BTreeMap<AggregateId, u64>,
    ) -> Result<u64, AppendError> {
        let aggregate = Self::aggregate_of(event);
        let subject = self.subject(aggregate);
        let version = expected.get(&aggregate).copied().unwrap_or(0);
        let message = PublishMessage::build()
            .payload(payload)
            .headers(Self::headers(event, Some(version)));
        let ack = self
            .jetstream
            .send_publish(subject.clone(), message)
            .await
            .map_err(|e| AppendError::Unavailable(e.to_string()))?
            .await;
        match ack {
            Ok(ack) => Ok(ack.sequence),
            Err(error) if error.kind() == PublishErrorKind::WrongLastSequence => {
                // nats-server checks the expected sequence before the `Nats-Msg-Id` dedup, so
                // a retry of an append whose ack was lost lands here: if the subject's last
                // event is this very event, the append already happened.
                self.already_appended(&subject, event.metadata.event_id)
                    .await
                    .ok_or(AppendError::Conflict)
            }
            Err(error) => Err(AppendError::Unavailable(error.to_string())),
        }
    }

    async fn append_batch(
        &self,
        events: &[Event],
        encoded: &[Bytes],
        expected: &BTreeMap<AggregateId, u64>,
    ) -> Result<Vec<u64>, AppendError> {
        let _permit = self
            .batches
            .acquire()
            .await
            .map_err(|e| AppendError::Unavailable(e.to_string()))?;
        let mut pause = BATCH_RETRY_FIRST_PAUSE;
        for retry in 0..=BATCH_RETRIES {
            let ack = self.send_batch(events, encoded, expected).await?;
            match ack.error {
                Some(error)
                    if matches!(error.err_code, BATCH_TOO_MANY_IN_FLIGHT | BATCH_INCOMPLETE)
                        && retry < BATCH_RETRIES =>
                {
                    // Other gateways' batches fill the stream's slots; nothing was stored.
                    tracing::debug!(
                        code = error.err_code,
                        retry,
                        "batch refused for room; resending"
                    );
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
                _ => return self.batch_outcome(ack, events, expected).await,
            }
        }
        Err(AppendError::Unavailable("batch refused".into()))
    }

    /// Publishes `events` as one atomic batch (a fresh batch id) and returns the commit's
    /// answer.
    async fn send_batch(
        &self,
        events: &[Event],
        encoded: &[Bytes],
        expected: &BTreeMap<AggregateId, u64>,
    ) -> Result<BatchAck, AppendError> {
        let batch_id = Uuid::new_v4().simple().to_string();
        let mut seen = std::collections::BTreeSet::new();
        let last = events.len() - 1;
        let mut commit_reply = None;
        for (index, event) in events.iter().enumerate() {
            let aggregate = Self::aggregate_of(event);
            let first_of_aggregate = seen.insert(aggregate);
            let version =
                first_of_aggregate.then(|| expected.get(&aggregate).copied().unwrap_or(0));
            let mut headers = Self::headers(event, version);
            headers.insert(NATS_BATCH_ID, batch_id.as_str());
            headers.insert(NATS_BATCH_SEQUENCE, (index + 1).to_string().as_str());
            let subject = self.subject(aggregate);
            let payload = encoded[index].clone();
            if index < last {
                self.client
                    .publish_with_headers(subject, headers, payload)
                    .await
                    .map_err(|e| AppendError::Unavailable(e.to_string()))?;
            } else {
                headers.insert(NATS_BATCH_COMMIT, "1");
                let request = async_nats::Request::new()
                    .headers(headers)
                    .payload(payload)
                    .timeout(Some(ACK_TIMEOUT));
                commit_reply = Some(
                    self.client
                        .send_request(subject, request)
                        .await
                        .map_err(|e| AppendError::Unavailable(e.to_string()))?,
                );
            }
        }
        let reply = commit_reply.ok_or_else(|| AppendError::Unavailable("empty batch".into()))?;
        serde_json::from_slice(&reply.payload)
            .map_err(|e| AppendError::Unavailable(format!("unreadable batch ack: {e}")))
    }

    /// The sequences a committed batch got, or why it was not stored.
    async fn batch_outcome(
        &self,
        ack: BatchAck,
        events: &[Event],
        expected: &BTreeMap<AggregateId, u64>,
    ) -> Result<Vec<u64>, AppendError> {
        if let Some(error) = ack.error {
            if error.err_code == WRONG_LAST_SEQUENCE || error.err_code == BATCH_DUPLICATE_MESSAGE_ID
            {
                // A lost race, or a retried batch whose first ack was lost (the broker refuses
                // a batch repeating stored message ids instead of deduplicating it).
                let first = Self::aggregate_of(&events[0]);
                let after = expected.get(&first).copied().unwrap_or(0);
                return match self.already_appended_batch(first, after, events).await {
                    Some(sequences) => Ok(sequences),
                    None => Err(AppendError::Conflict),
                };
            }
            return Err(AppendError::Unavailable(format!(
                "batch refused ({}): {}",
                error.err_code, error.description
            )));
        }
        let (Some(last_sequence), Some(count)) = (ack.seq, ack.count) else {
            return Err(AppendError::Unavailable(
                "batch ack without sequence".into(),
            ));
        };
        if count != events.len() as u64 {
            return Err(AppendError::Unavailable(format!(
                "batch stored {count} of {} events",
                events.len()
            )));
        }
        // A committed batch occupies consecutive sequences ending at the acked one.
        let first_sequence = last_sequence + 1 - count;
        Ok((first_sequence..=last_sequence).collect())
    }

    /// The sequence of `event_id` if it is the last event on `subject`.
    async fn already_appended(&self, subject: &str, event_id: Uuid) -> Option<u64> {
        let stream = self
            .jetstream
            .get_stream_no_info(self.names.event_stream())
            .await
            .ok()?;
        // From the leader: a follower that has not applied the append yet would make a
        // stored event look lost, and the command would be decided again.
        let last = stream.get_last_raw_message_by_subject(subject).await.ok()?;
        let id = last.headers.get(NATS_MESSAGE_ID)?.as_str();
        (id == event_id.to_string()).then_some(last.sequence)
    }

    /// The sequences of a batch already stored, recognised by its first event, which can only
    /// be after the version the batch expected of its aggregate.
    async fn already_appended_batch(
        &self,
        first: AggregateId,
        after: u64,
        events: &[Event],
    ) -> Option<Vec<u64>> {
        let subject = self.subject(first);
        let stream = self
            .jetstream
            .get_stream_no_info(self.names.event_stream())
            .await
            .ok()?;
        let first_id = events[0].metadata.event_id.to_string();
        let mut next = after + 1;
        loop {
            let message = next_on_subject(&stream, &subject, next, ReadFrom::Leader)
                .await
                .ok()??;
            if message
                .headers
                .get(NATS_MESSAGE_ID)
                .is_some_and(|id| id.as_str() == first_id)
            {
                let first = message.sequence;
                return Some((first..first + events.len() as u64).collect());
            }
            next = message.sequence + 1;
        }
    }

    /// Whether the event stream answers (for `/readyz`).
    pub async fn check(&self) -> Result<(), String> {
        self.jetstream
            .get_stream(self.names.event_stream())
            .await
            .map(|_| ())
            .map_err(|error| format!("event stream {}: {error}", self.names.event_stream()))
    }
}

// For `Idempotency-Key` retries (`CommandService::find_stored`), kept apart from the rest of
// the store so it can change on its own.
impl EventStore {
    /// The sequence and `Nats-Msg-Id` of the first message on `aggregate`'s subject after
    /// stream sequence `after`, if any, read from the stream leader: an append that expected
    /// version `after` is stored exactly when it is that message.
    pub async fn first_after(
        &self,
        aggregate: AggregateId,
        after: u64,
    ) -> Result<Option<(u64, Option<String>)>, LoadError> {
        let stream = self
            .jetstream
            .get_stream_no_info(self.names.event_stream())
            .await
            .map_err(|e| LoadError::Unavailable(e.to_string()))?;
        let message = next_on_subject(
            &stream,
            &self.subject(aggregate),
            after + 1,
            ReadFrom::Leader,
        )
        .await
        .map_err(LoadError::Unavailable)?;
        Ok(message.map(|message| {
            let id = message
                .headers
                .get(NATS_MESSAGE_ID)
                .map(|id| id.as_str().to_owned());
            (message.sequence, id)
        }))
    }
}
