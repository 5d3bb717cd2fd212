//! `stream-admin migrate --to-prefix NEW`: history written before names were sealed
//! (schema version 1) holds them in the clear, and the event stream cannot delete or
//! rewrite a message. This copies the deployment's stream into the stream of a new prefix,
//! every v1 registration and update sealed with its student's data key on the way, so an
//! erasure reaches that history too; then every service runs with the new prefix, and the
//! operator deletes the old stream.
//!
//! - **Positions are kept**: message `n` of the old stream is message `n` of the new one
//!   (each copy is published with `Nats-Expected-Last-Sequence: n - 1`), with the same event
//!   id, so read-model checkpoints, versions, ETags and consistency tokens keep their
//!   meaning and the projectors resume where they were.
//! - **Resumable**: a run continues after the new stream's last message; the student keys
//!   it sealed with are found again in the copies.
//! - **Online, then switched**: without `--switch` it copies what is there while the old
//!   deployment keeps writing; `--switch` seals the old stream (it takes no write after
//!   that: commands answer 503 until the services run with the new prefix), copies the rest
//!   and verifies every position.
//! - **Erased students** (a `StudentErased` in the history): the keys their v1 names were
//!   sealed with are destroyed when the erasure is copied, so their names are unreadable in
//!   the new stream as in every other copy.
//! - Key blocks are copied to the new prefix's bucket when it does not hold them yet
//!   (never replaced: the new copy may have slots destroyed since), and after a verified
//!   switch the old bucket is erased and deleted, so no copy of a key outlives an erasure
//!   made after it. Stored `Idempotency-Key` outcomes are not copied (those written before
//!   names were sealed hold them; a retried create still finds what it made). The new lease
//!   bucket's revisions continue above the old one's, so the fence recorded with each
//!   checkpoint lets the new projectors in.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer, kv};
use events::personal::{DataKeyRef, KekRing};
use events::{Decoded, Event, EventPayload, StreamNames};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use service_kit::data_keys::{DataKeys, KeyLookup};
use service_kit::event_reader::{EventReader, Personal};
use uuid::Uuid;

/// Publishes awaiting their acknowledgement at once.
const IN_FLIGHT: usize = 256;

#[derive(Debug, Clone)]
pub struct MigrateOptions {
    /// Replicas of the new prefix's streams and buckets.
    pub replicas: usize,
    /// Seal the old stream, copy the rest and verify every position.
    pub switch: bool,
    pub progress: bool,
    /// Stop after copying this many events (to show that a run resumes).
    pub stop_after: Option<u64>,
}

#[derive(Debug, Default)]
pub struct MigrateReport {
    /// Events the new stream already held when this run began.
    pub resumed_at: u64,
    pub copied: u64,
    /// Version 1 registrations and updates sealed on the way.
    pub sealed: u64,
    /// Erasures copied, each destroying the keys the student's names were sealed with.
    pub erasures: u64,
    /// Positions compared, old against new.
    pub verified: u64,
    /// The old stream's last position, and whether it is sealed (switched).
    pub source_last: u64,
    pub switched: bool,
    /// The old prefix's key bucket erased and deleted (after a verified switch).
    pub old_keys_retired: bool,
    pub elapsed: Duration,
}

pub async fn migrate(
    client: &async_nats::Client,
    from: &StreamNames,
    to: &StreamNames,
    ring: Arc<KekRing>,
    options: MigrateOptions,
) -> anyhow::Result<MigrateReport> {
    ensure!(
        from.prefix() != to.prefix(),
        "the new prefix must differ from the old one ({})",
        from.prefix()
    );
    let started = Instant::now();
    let js = jetstream::new(client.clone());
    let source = js
        .get_stream(from.event_stream())
        .await
        .with_context(|| format!("the old stream {}", from.event_stream()))?;

    crate::apply(
        &js,
        &crate::desired(to, options.replicas),
        crate::ApplyOptions::default(),
    )
    .await
    .context("declaring the new prefix's streams, consumers and buckets")?;
    let target = js.get_stream(to.event_stream()).await?;
    let target_last = target.clone().info().await?.state.last_sequence;
    let source_info = source.clone().info().await?.clone();
    // Before anything is copied: a new stream ahead of the old one is written by someone
    // else (the new deployment, after a switch), and copying onto it would undo its work.
    ensure!(
        target_last <= source_info.state.last_sequence,
        "the new stream {} holds {} events, the old one {}: something else writes to it \
         (start the services with the new prefix only after --switch)",
        to.event_stream(),
        target_last,
        source_info.state.last_sequence
    );
    ensure!(
        source_info.state.messages == 0 || source_info.state.first_sequence == 1,
        "the old stream starts at position {}, not 1: its positions cannot be kept",
        source_info.state.first_sequence
    );
    let mut report = MigrateReport::default();
    // Sealed first: an erasure appended before it is copied below and destroys its keys in
    // the new bucket; none can come after it.
    if options.switch {
        seal(&js, &from.event_stream()).await?;
        report.switched = true;
    }
    continue_lease_revisions(&js, from, to).await?;
    copy_absent_blocks(&js, &from.student_keys_bucket(), &to.student_keys_bucket()).await?;
    let new_keys = DataKeys::bind(&js, to, ring.clone()).await?;
    report.source_last = source.clone().info().await?.state.last_sequence;
    report.resumed_at = target_last;

    let bar = progress_bar(options.progress)?;
    let mut copier = Copier {
        js: js.clone(),
        from: from.clone(),
        to: to.clone(),
        keys: new_keys.clone(),
        student_keys: HashMap::new(),
        report,
    };
    copier
        .learn_keys(&target, target_last, &bar)
        .await
        .context("reading the keys of an earlier run's copies")?;
    let end = match options.stop_after {
        Some(limit) => copier.report.source_last.min(target_last + limit),
        None => copier.report.source_last,
    };
    bar.set_length(end.saturating_sub(target_last));
    bar.set_position(0);
    bar.set_prefix("copying");
    copier.copy(&source, target_last + 1, end, &bar).await?;

    let old_reader = EventReader::lazy(js.clone(), from.clone(), ring);
    let new_reader = EventReader::new(new_keys);
    bar.set_length(end);
    bar.set_position(0);
    bar.set_prefix("verifying");
    let mut report = copier.report;
    report.verified = verify(&js, from, to, &old_reader, &new_reader, end, &bar).await?;
    bar.finish_and_clear();
    if report.switched && report.verified == report.source_last {
        // Every block is in the new bucket now; the old one would keep alive the keys an
        // erasure after the switch destroys in the new one.
        retire_bucket(&js, &from.student_keys_bucket()).await?;
        report.old_keys_retired = true;
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

fn progress_bar(show: bool) -> anyhow::Result<ProgressBar> {
    if !show {
        return Ok(ProgressBar::hidden());
    }
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {prefix} [{bar:40}] {pos}/{len} events · {per_sec} · ETA {eta}",
        )?
        .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    Ok(bar)
}

struct Copier {
    js: jetstream::Context,
    from: StreamNames,
    to: StreamNames,
    keys: DataKeys,
    /// Every data key each student's events are sealed with in the new stream, in the
    /// order first seen (the first seals its version 1 events).
    student_keys: HashMap<Uuid, Vec<DataKeyRef>>,
    report: MigrateReport,
}

impl Copier {
    fn remember(&mut self, student: Uuid, key: DataKeyRef) {
        let keys = self.student_keys.entry(student).or_default();
        if !keys.contains(&key) {
            keys.push(key);
        }
    }

    /// Which keys the copies up to `last` are sealed with (a resumed run).
    async fn learn_keys(
        &mut self,
        target: &jetstream::stream::Stream,
        last: u64,
        bar: &ProgressBar,
    ) -> anyhow::Result<()> {
        if last == 0 {
            return Ok(());
        }
        bar.set_prefix("resuming");
        bar.set_length(last);
        let mut messages = ordered(target, 1).await?;
        while let Some(message) = messages.next().await {
            let message = message.context("reading the new stream")?;
            let sequence = message
                .info()
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .stream_sequence;
            if let Ok(Decoded::Sealed(sealed)) = events::decode_sealed(&message.payload) {
                self.remember(sealed.student(), sealed.key());
            }
            bar.set_position(sequence);
            if sequence >= last {
                break;
            }
        }
        Ok(())
    }

    async fn copy(
        &mut self,
        source: &jetstream::stream::Stream,
        first: u64,
        last: u64,
        bar: &ProgressBar,
    ) -> anyhow::Result<()> {
        if first > last {
            return Ok(());
        }
        let mut messages = ordered(source, first).await?;
        let mut acks = std::collections::VecDeque::with_capacity(IN_FLIGHT);
        while let Some(message) = messages.next().await {
            let message = message.context("reading the old stream")?;
            let sequence = message
                .info()
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .stream_sequence;
            let subject = self.new_subject(&message.subject)?;
            let payload = self.migrated(&message.payload).await?;
            let headers = copied_headers(message.headers.as_ref(), sequence - 1);
            let ack = self
                .js
                .publish_with_headers(subject, headers, payload.into())
                .await
                .with_context(|| format!("copying position {sequence}"))?;
            acks.push_back((sequence, ack));
            if acks.len() >= IN_FLIGHT {
                self.confirm(acks.pop_front(), bar).await?;
            }
            if sequence >= last {
                break;
            }
        }
        while let Some(next) = acks.pop_front() {
            self.confirm(Some(next), bar).await?;
        }
        Ok(())
    }

    async fn confirm(
        &mut self,
        next: Option<(u64, jetstream::context::PublishAckFuture)>,
        bar: &ProgressBar,
    ) -> anyhow::Result<()> {
        let Some((sequence, ack)) = next else {
            return Ok(());
        };
        let ack = ack.await.with_context(|| {
            format!("position {sequence} was not stored (the run resumes from what was)")
        })?;
        ensure!(
            ack.sequence == sequence,
            "position {sequence} was stored at {}: the positions would not be kept",
            ack.sequence
        );
        self.report.copied += 1;
        bar.inc(1);
        Ok(())
    }

    /// The old subject under the new prefix.
    fn new_subject(&self, subject: &str) -> anyhow::Result<String> {
        let old = format!("{}.", self.from.prefix());
        match subject.strip_prefix(&old) {
            Some(rest) => Ok(format!("{}.{rest}", self.to.prefix())),
            None => bail!("{subject} is not under the prefix {}", self.from.prefix()),
        }
    }

    /// The bytes the new stream stores for one old message.
    async fn migrated(&mut self, bytes: &[u8]) -> anyhow::Result<Vec<u8>> {
        match events::decode_sealed(bytes) {
            // Undecodable bytes stay as they were: a projection dead-letters them as before.
            Err(_) => Ok(bytes.to_vec()),
            Ok(Decoded::Sealed(sealed)) => {
                self.remember(sealed.student(), sealed.key());
                Ok(bytes.to_vec())
            }
            Ok(Decoded::Plain(event)) => match &event.payload {
                EventPayload::StudentRegistered(_) | EventPayload::StudentUpdated(_) => {
                    self.report.sealed += 1;
                    self.sealed(&event).await
                }
                EventPayload::StudentErased(erasure) => {
                    self.report.erasures += 1;
                    self.erased(event.clone(), erasure.key).await
                }
                _ => Ok(bytes.to_vec()),
            },
        }
    }

    /// A version 1 registration or update sealed with the student's key (made now if the
    /// student has none in the new stream yet).
    async fn sealed(&mut self, event: &Event) -> anyhow::Result<Vec<u8>> {
        let student = event.metadata.aggregate_id;
        if let Some(&key_ref) = self
            .student_keys
            .get(&student)
            .and_then(|keys| keys.first())
            && let KeyLookup::Key(key) = self.keys.lookup(key_ref).await?
        {
            return Ok(events::encode_sealed(event, key_ref, &key));
        }
        let (key_ref, key) = self.keys.allocate().await?;
        self.remember(student, key_ref);
        Ok(events::encode_sealed(event, key_ref, &key))
    }

    /// An erasure: every key the student's names are sealed with in the new stream is
    /// destroyed, and the copy names one of them (so the projectors destroy it too).
    async fn erased(
        &mut self,
        mut event: Event,
        named: Option<DataKeyRef>,
    ) -> anyhow::Result<Vec<u8>> {
        let student = event.metadata.aggregate_id;
        let keys: BTreeSet<DataKeyRef> = self
            .student_keys
            .get(&student)
            .into_iter()
            .flatten()
            .copied()
            .chain(named)
            .collect();
        for key in &keys {
            self.keys
                .destroy(*key)
                .await
                .with_context(|| format!("destroying a key of erased student {student}"))?;
        }
        if named.is_none()
            && let Some(first) = self.student_keys.get(&student).and_then(|k| k.first())
        {
            event.payload = EventPayload::StudentErased(events::Erasure { key: Some(*first) });
        }
        Ok(events::encode(&event))
    }
}

/// An ordered consumer over the whole stream from `start`.
async fn ordered(
    stream: &jetstream::stream::Stream,
    start: u64,
) -> anyhow::Result<consumer::pull::Ordered> {
    Ok(stream
        .create_consumer(consumer::pull::OrderedConfig {
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: start,
            },
            ..Default::default()
        })
        .await?
        .messages()
        .await?)
}

/// The old message's own headers (event type, trace context, message id), without the
/// publish expectations and batch markers it was written with; the copy expects to land
/// right after `previous`.
fn copied_headers(old: Option<&HeaderMap>, previous: u64) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Some(old) = old {
        for (name, values) in old.iter() {
            let text: &str = name.as_ref();
            let keep = !text.to_ascii_lowercase().starts_with("nats-")
                || text.eq_ignore_ascii_case("Nats-Msg-Id");
            if keep {
                for value in values {
                    headers.append(name.clone(), value.clone());
                }
            }
        }
    }
    headers.insert("Nats-Expected-Last-Sequence", previous.to_string().as_str());
    headers
}

/// Seals the stream: no message is added, changed or removed after this, for good.
async fn seal(js: &jetstream::Context, name: &str) -> anyhow::Result<()> {
    let stream = js.get_stream(name).await?;
    let mut config = stream.cached_info().config.clone();
    if config.sealed {
        return Ok(());
    }
    config.sealed = true;
    js.update_stream(config)
        .await
        .with_context(|| format!("sealing the old stream {name}"))?;
    Ok(())
}

/// Copies every key block of the old bucket that the new one does not hold. Never
/// replaces one: a block in the new bucket may have a slot destroyed that the old copy
/// still holds (an erasure copied, or made after the switch).
async fn copy_absent_blocks(js: &jetstream::Context, from: &str, to: &str) -> anyhow::Result<()> {
    let Ok(source) = js.get_key_value(from).await else {
        return Ok(()); // retired after a switch, or an old deployment without keys
    };
    let target = js.get_key_value(to).await?;
    let mut keys = source.keys().await?;
    while let Some(key) = keys.next().await {
        let key = key?;
        let Some(entry) = source.entry(&key).await? else {
            continue;
        };
        if entry.operation != kv::Operation::Put {
            continue;
        }
        if let Err(error) = target.create(&key, entry.value).await
            && error.kind() != kv::CreateErrorKind::AlreadyExists
        {
            return Err(error.into());
        }
    }
    Ok(())
}

/// Erases every message of a KV bucket (each overwritten on disk), then deletes it.
async fn retire_bucket(js: &jetstream::Context, bucket: &str) -> anyhow::Result<()> {
    let name = format!("KV_{bucket}");
    let Ok(mut stream) = js.get_stream(&name).await else {
        return Ok(());
    };
    let state = stream.info().await?.state.clone();
    for sequence in state.first_sequence..=state.last_sequence {
        match stream.delete_message(sequence).await {
            Ok(_) => {}
            Err(error) if error.to_string().contains("no message found") => {}
            Err(error) => {
                return Err(anyhow::anyhow!(error))
                    .with_context(|| format!("erasing message {sequence} of {name}"));
            }
        }
    }
    js.delete_stream(&name)
        .await
        .with_context(|| format!("deleting {name}"))?;
    Ok(())
}

/// Makes the new lease bucket's revisions continue above the old one's: each read-model
/// checkpoint records the lease revision that last wrote it, and refuses a lower one.
async fn continue_lease_revisions(
    js: &jetstream::Context,
    from: &StreamNames,
    to: &StreamNames,
) -> anyhow::Result<()> {
    let kv_stream = |names: &StreamNames| format!("KV_{}", names.projection_lease_bucket());
    let Ok(mut old) = js.get_stream(kv_stream(from)).await else {
        return Ok(());
    };
    let old_last = old.info().await?.state.last_sequence;
    let mut new = js.get_stream(kv_stream(to)).await?;
    let new_state = new.info().await?.state.clone();
    if new_state.messages == 0 && new_state.last_sequence <= old_last {
        // An empty stream purged up to a sequence starts there.
        new.purge().sequence(old_last + 1).await?;
    }
    Ok(())
}

/// Compares positions 1 through `last` of both streams; answers how many.
async fn verify(
    js: &jetstream::Context,
    from: &StreamNames,
    to: &StreamNames,
    old_reader: &EventReader,
    new_reader: &EventReader,
    last: u64,
    bar: &ProgressBar,
) -> anyhow::Result<u64> {
    if last == 0 {
        return Ok(0);
    }
    let mut old = ordered(&js.get_stream(from.event_stream()).await?, 1).await?;
    let mut new = ordered(&js.get_stream(to.event_stream()).await?, 1).await?;
    // Students whose names read as erased in the new stream, and those with an erasure.
    let mut read_as_erased = BTreeSet::new();
    let mut erased = BTreeSet::new();
    let mut opened = BTreeSet::new();
    let mut verified = 0;
    while verified < last {
        let (Some(old_message), Some(new_message)) = (old.next().await, new.next().await) else {
            bail!("a stream ended before position {last}");
        };
        let (old_message, new_message) = (old_message?, new_message?);
        let position = old_message
            .info()
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .stream_sequence;
        let new_position = new_message
            .info()
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .stream_sequence;
        ensure!(
            position == new_position,
            "position {position} of the old stream faces {new_position} of the new one"
        );
        let mismatch = |what: &str| anyhow::anyhow!("position {position}: {what}");
        match (
            old_reader.read(&old_message.payload).await,
            new_reader.read(&new_message.payload).await,
        ) {
            (Err(_), _) => {
                if old_message.payload != new_message.payload {
                    return Err(mismatch("undecodable bytes were not copied as they were"));
                }
            }
            (Ok(_), Err(error)) => {
                return Err(mismatch(&format!("the copy does not read: {error}")));
            }
            (Ok(old_event), Ok(new_event)) => {
                let student = old_event.event.metadata.aggregate_id;
                if matches!(old_event.event.payload, EventPayload::StudentErased(_)) {
                    erased.insert(student);
                }
                if matches!(new_event.personal, Personal::Opened) {
                    opened.insert(student);
                }
                if matches!(new_event.personal, Personal::Erased) {
                    read_as_erased.insert(student);
                    if old_event.event.metadata != new_event.event.metadata {
                        return Err(mismatch("the copy's metadata differ"));
                    }
                } else if without_key(old_event.event.clone())
                    != without_key(new_event.event.clone())
                {
                    return Err(mismatch("the copy reads differently"));
                }
                if matches!(
                    new_event.event.payload,
                    EventPayload::StudentRegistered(_) | EventPayload::StudentUpdated(_)
                ) && new_event.key.is_none()
                {
                    return Err(mismatch("names were copied in the clear"));
                }
            }
        }
        verified += 1;
        bar.set_position(verified);
    }
    if let Some(student) = read_as_erased.difference(&erased).next() {
        bail!("student {student}'s names read as erased in the copy, but it was never erased");
    }
    if let Some(student) = opened.intersection(&erased).next() {
        bail!("student {student} was erased, but names of it still open in the copy");
    }
    Ok(verified)
}

/// An erasure's named key may differ in the copy (it names the key its v1 names were
/// sealed with).
fn without_key(mut event: Event) -> Event {
    if let EventPayload::StudentErased(erasure) = &mut event.payload {
        erasure.key = None;
    }
    event
}
