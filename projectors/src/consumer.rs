//! The consume loop of one projection: pull a batch, decode, apply in one transaction, ack.
//!
//! Ordering and exactly-once: the checkpoint (last applied stream sequence) is committed with
//! the data. Every (re)subscription first resets the durable consumer to `checkpoint + 1`
//! (ADR-60, nats-server >= 2.14), so delivery restarts gapless and in stream order; otherwise
//! a message left unacked by a crash would be redelivered only after `ack_wait`, behind newer
//! ones, and the checkpoint would then skip it. Within a subscription a failed batch is
//! retried in place, never skipped.

use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::consumer::pull::Stream as MessageStream;
use async_nats::jetstream::{self, AckKind, Message};
use events::{Event, Projection, StreamNames};
use futures::{FutureExt, StreamExt};

use crate::dead_letters::DeadLetters;
use crate::pg_students::PgStudents;

/// Pause between attempts after a failure (database or broker unavailable).
const RETRY_DELAY: Duration = Duration::from_secs(1);

/// Everything one projection's loop needs.
pub struct ProjectionRunner {
    pub jetstream: jetstream::Context,
    pub names: StreamNames,
    pub store: PgStudents,
    pub batch_size: usize,
}

/// Why a subscription ended.
enum SubscriptionEnd {
    ShutdownRequested,
    Failed(anyhow::Error),
}

impl ProjectionRunner {
    /// Runs the students projection until `shutdown` completes. A batch in flight then is
    /// finished (committed and acked) first.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
        let projection = Projection::Students;
        tokio::pin!(shutdown);
        loop {
            let subscription = tokio::select! {
                () = &mut shutdown => break,
                result = self.subscribe(projection) => result,
            };
            let end = match subscription {
                Ok(messages) => self.consume(messages, &mut shutdown).await,
                Err(error) => SubscriptionEnd::Failed(error),
            };
            match end {
                SubscriptionEnd::ShutdownRequested => break,
                SubscriptionEnd::Failed(error) => {
                    tracing::warn!(
                        error = format!("{error:#}"),
                        projection = projection.as_str(),
                        "subscription failed; resubscribing from the checkpoint"
                    );
                    tokio::select! {
                        () = &mut shutdown => break,
                        () = tokio::time::sleep(RETRY_DELAY) => {}
                    }
                }
            }
        }
        tracing::info!(projection = projection.as_str(), "projection stopped");
        Ok(())
    }

    /// Resets the durable consumer to just after the checkpoint and opens a message stream.
    async fn subscribe(&self, projection: Projection) -> anyhow::Result<MessageStream> {
        let consumer_name = self.names.projection_consumer(projection);
        let checkpoint = self.store.checkpoint().await?;
        let stream = self
            .jetstream
            .get_stream_no_info(self.names.event_stream())
            .await?;
        stream
            .reset_consumer(&consumer_name, Some(checkpoint + 1))
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "resetting consumer {consumer_name} (run `stream-admin apply`?): {e}"
                )
            })?;
        let consumer: PullConsumer = stream
            .get_consumer(&consumer_name)
            .await
            .map_err(|e| anyhow::anyhow!("opening consumer {consumer_name}: {e}"))?;
        let messages = consumer
            .stream()
            .max_messages_per_batch(self.batch_size)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await?;
        tracing::info!(projection = projection.as_str(), checkpoint, "subscribed");
        Ok(messages)
    }

    async fn consume(
        &self,
        mut messages: MessageStream,
        shutdown: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    ) -> SubscriptionEnd {
        let dead_letters =
            DeadLetters::new(self.jetstream.clone(), &self.names, Projection::Students);
        loop {
            // Wait for the first message of a batch, or for shutdown between batches.
            let first = tokio::select! {
                () = shutdown.as_mut() => return SubscriptionEnd::ShutdownRequested,
                next = messages.next() => next,
            };
            let mut batch = match first {
                Some(Ok(message)) => vec![message],
                Some(Err(error)) => return SubscriptionEnd::Failed(error.into()),
                None => return SubscriptionEnd::Failed(anyhow::anyhow!("message stream ended")),
            };
            // Then take whatever is already buffered, without waiting, up to the batch size.
            while batch.len() < self.batch_size {
                match messages.next().now_or_never() {
                    Some(Some(Ok(message))) => batch.push(message),
                    Some(Some(Err(error))) => return SubscriptionEnd::Failed(error.into()),
                    _ => break,
                }
            }
            if let Err(end) = self.process_batch(&dead_letters, batch, shutdown).await {
                return end;
            }
        }
    }

    /// Decodes, applies and acks one batch. Undecodable events go to the dead-letter stream;
    /// a failed transaction is retried until it commits or shutdown is requested.
    async fn process_batch(
        &self,
        dead_letters: &DeadLetters,
        batch: Vec<Message>,
        shutdown: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    ) -> Result<(), SubscriptionEnd> {
        let mut decoded: Vec<(u64, Event)> = Vec::with_capacity(batch.len());
        let mut last_sequence = 0;
        for message in &batch {
            let sequence = message
                .info()
                .map_err(|e| {
                    SubscriptionEnd::Failed(anyhow::anyhow!(
                        "message without JetStream metadata: {e}"
                    ))
                })?
                .stream_sequence;
            last_sequence = last_sequence.max(sequence);
            match events::decode(&message.payload) {
                Ok(event) => decoded.push((sequence, event)),
                Err(error) => dead_letters
                    .send(message, sequence, &format!("undecodable: {error}"))
                    .await
                    .map_err(SubscriptionEnd::Failed)?,
            }
        }
        loop {
            match self.store.apply_batch(&decoded, last_sequence).await {
                Ok(outcome) => {
                    tracing::debug!(
                        applied = outcome.applied,
                        skipped = outcome.skipped,
                        checkpoint = outcome.checkpoint,
                        "batch committed"
                    );
                    break;
                }
                Err(error) => {
                    tracing::error!(%error, events = decoded.len(), "applying the batch failed; retrying");
                    // Keep the broker from redelivering while we retry.
                    for message in &batch {
                        let _ = message.ack_with(AckKind::Progress).await;
                    }
                    tokio::select! {
                        () = shutdown.as_mut() => return Err(SubscriptionEnd::ShutdownRequested),
                        () = tokio::time::sleep(RETRY_DELAY) => {}
                    }
                }
            }
        }
        // Ack only after commit. A lost ack only means a redelivery that the checkpoint skips.
        for message in &batch {
            if let Err(error) = message.ack().await {
                tracing::warn!(%error, "ack failed; the event will be redelivered and skipped");
            }
        }
        Ok(())
    }
}
