//! `replay <projection>`: rebuilds a read model from the first event into its next
//! generation while the live one keeps serving, catches up to the live projection,
//! verifies, and switches atomically, through the store's own port
//! (`read_models::rebuild::Rebuildable`: tables renamed in one Postgres transaction, or a
//! MongoDB collection renamed over the live one).
//!
//! Events are applied by the projection's own store code (`ProjectionStore::apply_batch`),
//! read with an ephemeral ordered consumer on the projection's subjects. The next
//! generation's checkpoint is committed with each batch, so an interrupted replay resumes
//! where it stopped when run again (`--restart` starts over).

use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream::{self, consumer};
use events::{Projection, StreamNames};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use read_models::ProjectionStore;
use read_models::rebuild::{GenerationSwitch, Rebuildable, SwitchError, SwitchReport};
use service_kit::event_reader::{EventReader, ReadError};

/// Below this many events behind, the rest is applied while the live projection is paused.
const PAUSE_GAP: u64 = 2_000;

#[derive(Debug, Clone, Copy)]
pub struct ReplayOptions {
    /// Switch even when the new model differs from the live one.
    pub force: bool,
    /// Keep the old generation as `<table>__old`.
    pub keep_old: bool,
    /// Drop a half-built next generation and start from the first event.
    pub restart: bool,
    /// Events per transaction.
    pub batch_size: usize,
    /// Draw a progress bar on the terminal.
    pub progress: bool,
}

#[derive(Debug)]
pub struct ReplayReport {
    /// Events written into the new model by this run.
    pub applied: u64,
    /// Events that could not be decoded (the live projection dead-lettered them too).
    pub undecodable: u64,
    /// Where an interrupted earlier run had got to.
    pub resumed_at: Option<u64>,
    pub elapsed: Duration,
    pub switch: SwitchReport,
}

impl ReplayReport {
    pub fn events_per_second(&self) -> f64 {
        self.applied as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Rebuilds `live`'s read model into its next generation and switches it in.
///
/// Events are read through `reader`, the one reading path: sealed names are opened with the
/// student's key, or come in empty once it was erased; a key out of reach stops the replay
/// (it resumes where it was).
pub async fn replay<S: Rebuildable>(
    client: &async_nats::Client,
    names: &StreamNames,
    reader: &EventReader,
    live: S,
    options: ReplayOptions,
) -> anyhow::Result<ReplayReport> {
    let started = Instant::now();
    let next = live.next_generation();
    if options.restart {
        live.drop_next()
            .await
            .context("dropping the half-built model")?;
    }
    let resumed = live
        .prepare_next()
        .await
        .context("creating the next generation")?;
    let resumed_at = if resumed {
        Some(next.checkpoint().await?)
    } else {
        None
    };
    let mut copier = Copier::new(client, names, reader, live.projection(), options)?;

    // Bulk: follow the live checkpoint (never past it) until close behind.
    loop {
        let target = live.checkpoint().await?;
        let done = next.checkpoint().await?;
        copier.show_target(target);
        if done + PAUSE_GAP >= target {
            break;
        }
        copier.copy(&next, done + 1, target).await?;
    }
    // The rest with the live projection paused at its checkpoint, then verify and switch.
    let switch = live.begin_switch().await?;
    let target = switch.live_checkpoint();
    copier.show_target(target);
    let caught_up = async {
        let done = next.checkpoint().await?;
        if done < target {
            copier.copy(&next, done + 1, target).await?;
        }
        anyhow::Ok(())
    }
    .await;
    if let Err(error) = caught_up {
        switch.abort().await;
        return Err(error);
    }
    copier.finish();
    let switched = switch
        .finish(options.force, options.keep_old)
        .await
        .map_err(|error| match error {
            SwitchError::Mismatch { .. } => anyhow::anyhow!(
                "{error}; the live model was left in place. Investigate (dead letters? a \
                 projection change?), then rerun, or pass --force to switch anyway"
            ),
            other => anyhow::Error::new(other),
        })?;
    Ok(ReplayReport {
        applied: copier.applied,
        undecodable: copier.undecodable,
        resumed_at,
        elapsed: started.elapsed(),
        switch: switched,
    })
}

/// Reads a projection's events from the stream and applies them to a store.
struct Copier<'a> {
    client: &'a async_nats::Client,
    reader: &'a EventReader,
    jetstream: jetstream::Context,
    stream: String,
    subjects: String,
    batch_size: usize,
    bar: ProgressBar,
    applied: u64,
    undecodable: u64,
}

impl<'a> Copier<'a> {
    fn new(
        client: &'a async_nats::Client,
        names: &StreamNames,
        reader: &'a EventReader,
        projection: Projection,
        options: ReplayOptions,
    ) -> anyhow::Result<Self> {
        let bar = if options.progress {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} replaying {prefix} [{bar:40}] {pos}/{len} stream positions · {msg} · ETA {eta}",
                )?
                .progress_chars("=> "),
            );
            bar.set_prefix(projection.as_str());
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        } else {
            ProgressBar::hidden()
        };
        Ok(Copier {
            client,
            reader,
            jetstream: jetstream::new(client.clone()),
            stream: names.event_stream(),
            subjects: names.aggregate_kind_subjects(projection.source_aggregate()),
            batch_size: options.batch_size.max(1),
            bar,
            applied: 0,
            undecodable: 0,
        })
    }

    fn show_target(&self, live: u64) {
        self.bar.set_length(live);
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }

    /// Applies every event of the projection's subjects from `from` through `to` and leaves
    /// the store's checkpoint at `to`.
    async fn copy<S: ProjectionStore>(
        &mut self,
        store: &S,
        from: u64,
        to: u64,
    ) -> anyhow::Result<()> {
        let last_of_kind = service_kit::nats::last_sequence_on(
            self.client,
            &self.stream,
            &self.subjects,
            Duration::from_secs(5),
        )
        .await?;
        let end = last_of_kind.unwrap_or(0).min(to);
        let started = Instant::now();
        let applied_before = self.applied;
        if end >= from {
            let stream = self.jetstream.get_stream_no_info(&self.stream).await?;
            let consumer = stream
                .create_consumer(consumer::pull::OrderedConfig {
                    filter_subject: self.subjects.clone(),
                    deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                        start_sequence: from,
                    },
                    ..Default::default()
                })
                .await
                .context("creating the replay's ordered consumer")?;
            let mut messages = consumer.messages().await?;
            let mut batch = Vec::with_capacity(self.batch_size);
            while let Some(message) = messages.next().await {
                let message = message.context("reading the stream")?;
                let sequence = message
                    .info()
                    .map_err(|e| anyhow::anyhow!("{e}"))?
                    .stream_sequence;
                if sequence > end {
                    break;
                }
                match self.reader.read(&message.payload).await {
                    Ok(read) => batch.push((sequence, read.event)),
                    Err(error) if error.is_transient() || matches!(error, ReadError::NoKeys) => {
                        return Err(anyhow::anyhow!(
                            "event {sequence} cannot be read now ({error}); run the replay again to resume"
                        ));
                    }
                    Err(_) => self.undecodable += 1,
                }
                if batch.len() >= self.batch_size || sequence == end {
                    let outcome = store.apply_batch(&batch, sequence).await?;
                    self.applied += outcome.applied as u64;
                    batch.clear();
                    self.bar.set_position(sequence);
                    let rate = (self.applied - applied_before) as f64
                        / started.elapsed().as_secs_f64().max(1e-9);
                    self.bar
                        .set_message(format!("{} events, {rate:.0} events/s", self.applied));
                }
                if sequence >= end {
                    break;
                }
            }
        }
        // Nothing of this kind lies between `end` and `to`.
        store.apply_batch(&[], to).await?;
        self.bar.set_position(to);
        Ok(())
    }
}
