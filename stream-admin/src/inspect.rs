//! `events get | tail`: stored events decoded to JSON for humans (and `jq`).

use anyhow::Context;
use async_nats::jetstream::{self, consumer};
use events::StreamNames;
use futures::StreamExt;
use serde_json::{Value, json};
use service_kit::event_reader::{EventReader, Personal};

/// One stored event as JSON: its stream position and subject, and the event read through
/// the one reading path (or why it cannot be read). `personal_data` says whether a
/// student's fields were stored in the clear, opened with its data key, or erased (then
/// they are empty: the key that opened them is destroyed).
pub async fn describe(
    reader: &EventReader,
    sequence: u64,
    subject: &str,
    published: &str,
    payload: &[u8],
) -> Value {
    match reader.read(payload).await {
        Ok(read) => json!({
            "sequence": sequence,
            "subject": subject,
            "published_at": published,
            "personal_data": match read.personal {
                Personal::Clear => "clear",
                Personal::Opened => "opened",
                Personal::Erased => "erased",
            },
            "event": read.event,
        }),
        Err(error) => json!({
            "sequence": sequence,
            "subject": subject,
            "published_at": published,
            "undecodable": error.to_string(),
            "payload_bytes": payload.len(),
        }),
    }
}

/// The event at stream position `sequence`.
pub async fn get(
    jetstream: &jetstream::Context,
    names: &StreamNames,
    reader: &EventReader,
    sequence: u64,
) -> anyhow::Result<Value> {
    let stream = jetstream
        .get_stream_no_info(names.event_stream())
        .await
        .context("opening the event stream")?;
    let message = stream
        .direct_get(sequence)
        .await
        .with_context(|| format!("no event at position {sequence}"))?;
    Ok(describe(
        reader,
        sequence,
        message.subject.as_str(),
        &message.time.to_string(),
        &message.payload,
    )
    .await)
}

/// Where `tail` starts.
#[derive(Debug, Clone, Copy)]
pub enum TailFrom {
    /// Only events published from now on.
    New,
    /// The last `n` events, then new ones.
    Last(u64),
    /// From the first event.
    Start,
}

/// Prints events on `subject` (default: every event) as JSON lines until `count` were
/// printed (or forever).
pub async fn tail(
    jetstream: &jetstream::Context,
    names: &StreamNames,
    reader: &EventReader,
    subject: Option<String>,
    from: TailFrom,
    count: Option<u64>,
    mut emit: impl FnMut(Value),
) -> anyhow::Result<()> {
    let mut stream = jetstream
        .get_stream(names.event_stream())
        .await
        .context("opening the event stream")?;
    let last = stream.info().await?.state.last_sequence;
    let deliver_policy = match from {
        TailFrom::New => consumer::DeliverPolicy::New,
        TailFrom::Start => consumer::DeliverPolicy::All,
        TailFrom::Last(n) => consumer::DeliverPolicy::ByStartSequence {
            start_sequence: last.saturating_sub(n.saturating_sub(1)).max(1),
        },
    };
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: subject.unwrap_or_else(|| names.event_subjects()),
            deliver_policy,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let mut printed = 0;
    while count.is_none_or(|count| printed < count) {
        let Some(message) = messages.next().await else {
            break;
        };
        let message = message?;
        let info = message.info().map_err(|e| anyhow::anyhow!("{e}"))?;
        emit(
            describe(
                reader,
                info.stream_sequence,
                message.subject.as_str(),
                &info.published.to_string(),
                &message.payload,
            )
            .await,
        );
        printed += 1;
    }
    Ok(())
}
