//! Moves events a projection cannot apply to the dead-letter stream, with the reason.

use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind, Message};
use events::{Projection, StreamNames};

/// Headers describing a dead letter.
pub const REASON_HEADER: &str = "School-Dead-Letter-Reason";
pub const ORIGINAL_SEQUENCE_HEADER: &str = "School-Original-Sequence";
pub const ORIGINAL_SUBJECT_HEADER: &str = "School-Original-Subject";
pub const PROJECTION_HEADER: &str = "School-Projection";

#[derive(Clone)]
pub struct DeadLetters {
    jetstream: jetstream::Context,
    subject: String,
    projection: Projection,
}

impl DeadLetters {
    pub fn new(jetstream: jetstream::Context, names: &StreamNames, projection: Projection) -> Self {
        DeadLetters {
            jetstream,
            subject: names.dead_letter_subject(projection),
            projection,
        }
    }

    /// Stores a copy of `message` with `reason`, then terminates it on the event stream so it
    /// is never redelivered. The copy is deduplicated by original sequence, so a crash between
    /// the two steps does not store it twice.
    pub async fn send(&self, message: &Message, sequence: u64, reason: &str) -> anyhow::Result<()> {
        let mut headers = HeaderMap::new();
        headers.insert(REASON_HEADER, truncate(reason, 1024));
        headers.insert(ORIGINAL_SEQUENCE_HEADER, sequence.to_string().as_str());
        headers.insert(ORIGINAL_SUBJECT_HEADER, message.subject.as_str());
        headers.insert(PROJECTION_HEADER, self.projection.as_str());
        headers.insert(
            async_nats::header::NATS_MESSAGE_ID,
            format!("{}-{sequence}", self.projection.as_str()).as_str(),
        );
        self.jetstream
            .publish_with_headers(self.subject.clone(), headers, message.payload.clone())
            .await?
            .await?;
        message
            .ack_with(AckKind::Term)
            .await
            .map_err(|e| anyhow::anyhow!("terminating dead-lettered message: {e}"))?;
        tracing::warn!(
            projection = self.projection.as_str(),
            sequence,
            reason,
            "event moved to the dead-letter stream"
        );
        Ok(())
    }
}

fn truncate(text: &str, max_chars: usize) -> &str {
    match text.char_indices().nth(max_chars) {
        Some((index, _)) => &text[..index],
        None => text,
    }
}
