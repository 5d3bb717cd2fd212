//! `status`: the streams, how far each projection is, and the dead letters.

use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream;
use events::{Projection, StreamNames};
use futures::TryStreamExt;
use serde::Serialize;

use crate::read_models::ReadModel;

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub streams: Vec<StreamStatus>,
    pub projections: Vec<ProjectionStatus>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StreamStatus {
    pub name: String,
    pub messages: u64,
    pub bytes: u64,
    pub first_sequence: u64,
    pub last_sequence: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProjectionStatus {
    pub projection: &'static str,
    pub consumer: String,
    /// The read model's checkpoint (`None` when its database was not given or is down).
    pub applied_sequence: Option<u64>,
    /// Newest event of the projection's kind in the stream.
    pub last_event_sequence: Option<u64>,
    /// Events of the projection's subjects not yet applied (not yet delivered, or delivered
    /// and not yet acknowledged after commit).
    pub lag: u64,
    pub dead_letters: u64,
}

/// Reads the broker (and, for each entry of `models`, that read model's checkpoint).
pub async fn status(
    client: &async_nats::Client,
    names: &StreamNames,
    models: &[(Projection, Option<ReadModel>)],
) -> anyhow::Result<Status> {
    let jetstream = jetstream::new(client.clone());
    let mut streams = Vec::new();
    for name in [names.event_stream(), names.dead_letter_stream()] {
        let mut stream = jetstream
            .get_stream(&name)
            .await
            .with_context(|| format!("opening stream {name} (run `stream-admin apply`)"))?;
        let state = stream.info().await?.state.clone();
        streams.push(StreamStatus {
            name,
            messages: state.messages,
            bytes: state.bytes,
            first_sequence: state.first_sequence,
            last_sequence: state.last_sequence,
        });
    }
    let events = jetstream.get_stream_no_info(names.event_stream()).await?;
    let dead_letters = jetstream
        .get_stream_no_info(names.dead_letter_stream())
        .await?;
    let mut projections = Vec::new();
    for (projection, model) in models {
        let consumer_name = names.projection_consumer(*projection);
        let info = events
            .consumer_info(&consumer_name)
            .await
            .with_context(|| format!("reading consumer {consumer_name}"))?;
        let applied_sequence = match model {
            Some(model) => model.checkpoint().await.ok(),
            None => None,
        };
        let last_event_sequence = service_kit::nats::last_sequence_on(
            client,
            &names.event_stream(),
            &names.aggregate_kind_subjects(projection.source_aggregate()),
            Duration::from_secs(5),
        )
        .await?;
        let letters: Vec<(String, usize)> = dead_letters
            .info_with_subjects(names.dead_letter_subject(*projection))
            .await?
            .try_collect()
            .await?;
        projections.push(ProjectionStatus {
            projection: projection.as_str(),
            consumer: consumer_name,
            applied_sequence,
            last_event_sequence,
            lag: info.num_pending + info.num_ack_pending as u64,
            dead_letters: letters.iter().map(|(_, n)| *n as u64).sum(),
        });
    }
    Ok(Status {
        streams,
        projections,
    })
}

/// The human table.
pub fn render(status: &Status) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "{:<28} {:>12} {:>14} {:>12} {:>12}\n",
        "STREAM", "MESSAGES", "BYTES", "FIRST SEQ", "LAST SEQ"
    ));
    for s in &status.streams {
        out.push_str(&format!(
            "{:<28} {:>12} {:>14} {:>12} {:>12}\n",
            s.name, s.messages, s.bytes, s.first_sequence, s.last_sequence
        ));
    }
    out.push('\n');
    out.push_str(&format!(
        "{:<12} {:>14} {:>14} {:>10} {:>13}\n",
        "PROJECTION", "APPLIED SEQ", "LAST EVENT", "LAG", "DEAD LETTERS"
    ));
    let or_dash = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
    for p in &status.projections {
        out.push_str(&format!(
            "{:<12} {:>14} {:>14} {:>10} {:>13}\n",
            p.projection,
            or_dash(p.applied_sequence),
            or_dash(p.last_event_sequence),
            p.lag,
            p.dead_letters
        ));
    }
    out
}
