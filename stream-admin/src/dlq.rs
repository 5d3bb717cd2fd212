//! `dlq list | redrive | purge`: the dead letters the projections set aside.
//!
//! A redrive does not re-apply the one event out of order (a later event of the same
//! aggregate may already be applied): it rebuilds the whole aggregate in the live read
//! model from every event of its subject up to the projection's checkpoint, in one
//! transaction serialised with the projection's batches: it locks the checkpoint row, then
//! reads the history up to that checkpoint, then folds and writes. (Read before the lock,
//! the history could miss an event the live projection applied in between, and the rebuild
//! would write the older state over it.) Once that succeeds, the dead letter is deleted; if
//! the cause is not fixed yet, the redrive fails and the letter stays.

use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::stream::RawMessageErrorKind;
use async_nats::jetstream::{self, message::StreamMessage};
use events::dead_letter_headers::{
    ORIGINAL_SEQUENCE as ORIGINAL_SEQUENCE_HEADER, ORIGINAL_SUBJECT as ORIGINAL_SUBJECT_HEADER,
    PROJECTION as PROJECTION_HEADER, REASON as REASON_HEADER,
};
use events::{Event, StreamNames};
use futures::StreamExt;
use read_models::StoreError;
use read_models::rebuild::{AggregateHistory, Rebuildable};
use serde::Serialize;
use service_kit::event_reader::EventReader;
use uuid::Uuid;

use crate::read_models::ReadModel;

/// One dead letter as `dlq list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    /// Its sequence in the dead-letter stream (what `redrive` takes).
    pub sequence: u64,
    pub projection: String,
    pub original_sequence: Option<u64>,
    pub original_subject: String,
    pub reason: String,
    /// The event type, when the payload decodes.
    pub event_type: Option<String>,
}

/// Every dead letter, oldest first (of one projection if `projection` is given).
pub async fn list(
    jetstream: &jetstream::Context,
    names: &StreamNames,
    projection: Option<events::Projection>,
) -> anyhow::Result<Vec<DeadLetter>> {
    let mut stream = jetstream
        .get_stream(names.dead_letter_stream())
        .await
        .context("opening the dead-letter stream (run `stream-admin apply`)")?;
    let state = stream.info().await?.state.clone();
    let mut letters = Vec::new();
    if state.messages == 0 {
        return Ok(letters);
    }
    let wanted = projection.map(|p| names.dead_letter_subject(p));
    for sequence in state.first_sequence..=state.last_sequence {
        // Deleted (redriven) letters leave gaps. (The dead-letter stream has no direct
        // get: reads go through its leader, which is fine for an operator's listing.)
        let message = match stream.get_raw_message(sequence).await {
            Ok(message) => message,
            Err(error) if matches!(error.kind(), RawMessageErrorKind::NoMessageFound) => continue,
            Err(error) => {
                return Err(error).with_context(|| format!("reading dead letter {sequence}"));
            }
        };
        if wanted
            .as_deref()
            .is_some_and(|w| w != message.subject.as_str())
        {
            continue;
        }
        letters.push(dead_letter(sequence, &message));
    }
    Ok(letters)
}

fn dead_letter(sequence: u64, message: &StreamMessage) -> DeadLetter {
    let header = |name: &str| {
        message
            .headers
            .get(name)
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default()
    };
    DeadLetter {
        sequence,
        projection: header(PROJECTION_HEADER),
        original_sequence: header(ORIGINAL_SEQUENCE_HEADER).parse().ok(),
        original_subject: header(ORIGINAL_SUBJECT_HEADER),
        reason: header(REASON_HEADER),
        // Sealed or not, the type is readable without a key.
        event_type: events::decode_sealed(&message.payload)
            .ok()
            .map(|decoded| match decoded {
                events::Decoded::Plain(event) => event.payload.event_type().to_owned(),
                events::Decoded::Sealed(sealed) => sealed.event_type().to_owned(),
            }),
    }
}

/// What a redrive did with one letter.
#[derive(Debug, Clone, Serialize)]
pub struct Redriven {
    pub sequence: u64,
    pub aggregate: String,
    /// Events of the aggregate applied by the rebuild.
    pub events_applied: usize,
}

/// Rebuilds the aggregate of each letter in `sequences` in its live read model and deletes
/// the letter. Stops at the first letter that still fails. The aggregate's history is read
/// through `reader`, the one reading path (sealed names opened, or empty once erased).
pub async fn redrive(
    client: &async_nats::Client,
    names: &StreamNames,
    reader: &EventReader,
    models: &ReadModels,
    sequences: &[u64],
) -> anyhow::Result<Vec<Redriven>> {
    let jetstream = jetstream::new(client.clone());
    let letters = list(&jetstream, names, None).await?;
    let dlq = jetstream
        .get_stream_no_info(names.dead_letter_stream())
        .await?;
    let mut done = Vec::new();
    for sequence in sequences {
        let letter = letters
            .iter()
            .find(|l| l.sequence == *sequence)
            .with_context(|| format!("no dead letter with sequence {sequence}"))?;
        let projection: events::Projection = letter
            .projection
            .parse()
            .map_err(|e| anyhow::anyhow!("dead letter {sequence}: {e}"))?;
        let model = models.get(projection)?;
        let aggregate = aggregate_id(&letter.original_subject)
            .with_context(|| format!("dead letter {sequence} names no aggregate subject"))?;
        // Read by the store once it holds the checkpoint lock, not here.
        let history = StreamHistory {
            jetstream: &jetstream,
            names,
            reader,
            subject: &letter.original_subject,
        };
        let rebuilt = match model {
            ReadModel::Students(store) => store.rebuild_aggregate(aggregate, history).await,
            ReadModel::Courses(store) => store.rebuild_aggregate(aggregate, history).await,
        };
        let events_applied = rebuilt
            .with_context(|| format!("redriving dead letter {sequence}: the cause is not fixed"))?;
        dlq.delete_message(*sequence)
            .await
            .with_context(|| format!("deleting redriven dead letter {sequence}"))?;
        done.push(Redriven {
            sequence: *sequence,
            aggregate: aggregate.to_string(),
            events_applied,
        });
    }
    Ok(done)
}

/// The live read models redrive writes to, connected on first use.
pub struct ReadModels {
    pub students: Option<ReadModel>,
    pub courses: Option<ReadModel>,
}

impl ReadModels {
    fn get(&self, projection: events::Projection) -> anyhow::Result<&ReadModel> {
        let model = match projection {
            events::Projection::Students => self.students.as_ref(),
            events::Projection::Courses => self.courses.as_ref(),
        };
        model.with_context(|| format!("no read model configured for {}", projection.as_str()))
    }
}

/// The last segment of `<prefix>.events.<kind>.<uuid>`.
fn aggregate_id(subject: &str) -> Option<Uuid> {
    subject
        .rsplit('.')
        .next()
        .and_then(|id| Uuid::parse_str(id).ok())
}

/// One aggregate's events in the stream, read when a rebuild asks (under its lock).
#[derive(Clone, Copy)]
struct StreamHistory<'a> {
    jetstream: &'a jetstream::Context,
    names: &'a StreamNames,
    reader: &'a EventReader,
    subject: &'a str,
}

impl AggregateHistory for StreamHistory<'_> {
    async fn read_through(self, checkpoint: u64) -> Result<Vec<(u64, Event)>, StoreError> {
        history(
            self.jetstream,
            self.names,
            self.reader,
            self.subject,
            checkpoint,
        )
        .await
    }
}

/// Every event on one aggregate's subject up to stream position `through`, in stream order.
/// Fails on an event that does not decode: the aggregate cannot be rebuilt until this build
/// can read it.
async fn history(
    jetstream: &jetstream::Context,
    names: &StreamNames,
    reader: &EventReader,
    subject: &str,
    through: u64,
) -> Result<Vec<(u64, Event)>, StoreError> {
    let unavailable = |error: &dyn std::fmt::Display| {
        StoreError::Unavailable(format!("reading {subject}: {error}"))
    };
    let last = service_kit::nats::last_sequence_on(
        &jetstream.client(),
        &names.event_stream(),
        subject,
        Duration::from_secs(5),
    )
    .await
    .map_err(|e| unavailable(&e))?;
    let Some(last) = last else {
        return Ok(Vec::new());
    };
    let stream = jetstream
        .get_stream_no_info(names.event_stream())
        .await
        .map_err(|e| unavailable(&e))?;
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
            filter_subject: subject.to_owned(),
            ..Default::default()
        })
        .await
        .map_err(|e| unavailable(&e))?;
    let mut messages = consumer.messages().await.map_err(|e| unavailable(&e))?;
    let mut history = Vec::new();
    while let Some(message) = messages.next().await {
        let message = message.map_err(|e| unavailable(&e))?;
        let sequence = message.info().map_err(|e| unavailable(&e))?.stream_sequence;
        if sequence > through {
            break;
        }
        let event = match reader.read(&message.payload).await {
            Ok(read) => read.event,
            Err(e) if e.is_transient() => {
                return Err(StoreError::Unavailable(format!(
                    "event {sequence} on {subject}: {e}"
                )));
            }
            Err(e) => {
                return Err(StoreError::Refused(format!(
                    "event {sequence} on {subject} cannot be read: {e}"
                )));
            }
        };
        history.push((sequence, event));
        if sequence >= last {
            break;
        }
    }
    Ok(history)
}

/// Deletes every dead letter (of one projection if given); returns how many.
pub async fn purge(
    jetstream: &jetstream::Context,
    names: &StreamNames,
    projection: Option<events::Projection>,
) -> anyhow::Result<u64> {
    let stream = jetstream
        .get_stream_no_info(names.dead_letter_stream())
        .await?;
    let response = match projection {
        Some(p) => stream.purge().filter(names.dead_letter_subject(p)).await?,
        None => stream.purge().await?,
    };
    Ok(response.purged)
}
