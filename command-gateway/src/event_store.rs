//! Appends events to the JetStream event stream with optimistic concurrency.

use async_nats::jetstream::{self, context::PublishErrorKind, message::PublishMessage};
use bytes::Bytes;
use events::{Event, StreamNames};

/// Header naming the event type, so tools can filter without decoding payloads.
pub const EVENT_TYPE_HEADER: &str = "School-Event-Type";

/// Why an append did not happen.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// Another writer appended to the aggregate since it was read.
    #[error("the aggregate changed since it was read (expected version {expected})")]
    Conflict { expected: u64 },
    /// The broker did not confirm the write; the event may or may not be stored, and a retry
    /// with the same event id is deduplicated by the broker.
    #[error("the event store is unavailable: {0}")]
    Unavailable(#[source] jetstream::context::PublishError),
}

/// The write side of the event stream.
#[derive(Clone)]
pub struct EventStore {
    jetstream: jetstream::Context,
    names: StreamNames,
}

impl EventStore {
    pub fn new(jetstream: jetstream::Context, names: StreamNames) -> Self {
        EventStore { jetstream, names }
    }

    pub fn names(&self) -> &StreamNames {
        &self.names
    }

    /// Appends one event to its aggregate's subject if the subject's last sequence is still
    /// `expected_version` (0: the aggregate has no event yet). Returns the event's stream
    /// sequence, which is the aggregate's new version and the consistency token.
    pub async fn append(&self, event: &Event, expected_version: u64) -> Result<u64, AppendError> {
        let meta = &event.metadata;
        let subject = self
            .names
            .aggregate_subject(meta.aggregate_kind, meta.aggregate_id);
        let mut message = PublishMessage::build()
            .payload(Bytes::from(events::encode(event)))
            .message_id(meta.event_id.to_string())
            .expected_last_subject_sequence(expected_version)
            .header(EVENT_TYPE_HEADER, event.payload.event_type());
        if !meta.trace.traceparent.is_empty() {
            message = message.header("traceparent", meta.trace.traceparent.as_str());
        }
        let ack = self
            .jetstream
            .send_publish(subject.clone(), message)
            .await
            .map_err(AppendError::Unavailable)?
            .await;
        match ack {
            Ok(ack) => Ok(ack.sequence),
            Err(error) if error.kind() == PublishErrorKind::WrongLastSequence => {
                // nats-server checks the expected sequence before the `Nats-Msg-Id` dedup, so
                // a retry of an append whose ack was lost lands here: if the subject's last
                // event is this very event, the append already happened.
                match self.last_event_id_and_sequence(&subject).await {
                    Some((last_id, sequence)) if last_id == meta.event_id.to_string() => {
                        Ok(sequence)
                    }
                    _ => Err(AppendError::Conflict {
                        expected: expected_version,
                    }),
                }
            }
            Err(error) => Err(AppendError::Unavailable(error)),
        }
    }

    /// The `Nats-Msg-Id` and stream sequence of the last message on `subject`.
    async fn last_event_id_and_sequence(&self, subject: &str) -> Option<(String, u64)> {
        let stream = self
            .jetstream
            .get_stream_no_info(self.names.event_stream())
            .await
            .ok()?;
        let last = stream.direct_get_last_for_subject(subject).await.ok()?;
        let id = last
            .headers
            .get(async_nats::header::NATS_MESSAGE_ID)?
            .as_str()
            .to_owned();
        Some((id, last.sequence))
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
