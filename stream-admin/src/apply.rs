//! Makes the broker match a [`Topology`]: creates what is missing, updates what differs,
//! and reports each object's outcome. Idempotent.

use std::fmt;

use anyhow::Context as _;
use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::context::{ConsumerInfoErrorKind, GetStreamErrorKind};
use async_nats::jetstream::{self, consumer, kv, stream};

use crate::topology::{BucketSpec, ConsumerSpec, Topology};

/// What happened (or, in a dry run, would happen) to one broker object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Created,
    Updated(Vec<String>),
    /// Deleted and created again: the server cannot change these fields in place.
    Recreated(Vec<String>),
    Unchanged,
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub object: String,
    pub outcome: Outcome,
    /// Why this change loses data or state (empty: it does not).
    pub destructive: Vec<String>,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.outcome {
            Outcome::Created => write!(f, "{}: created", self.object)?,
            Outcome::Unchanged => write!(f, "{}: unchanged", self.object)?,
            Outcome::Updated(diffs) => {
                write!(f, "{}: updated ({})", self.object, diffs.join(", "))?
            }
            Outcome::Recreated(diffs) => write!(
                f,
                "{}: deleted and created again ({})",
                self.object,
                diffs.join(", ")
            )?,
        }
        if !self.destructive.is_empty() {
            write!(f, " [destructive: {}]", self.destructive.join("; "))?;
        }
        Ok(())
    }
}

/// How to apply.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApplyOptions {
    /// Only report what would change.
    pub dry_run: bool,
    /// Carry out changes that lose data or consumer state.
    pub allow_destructive: bool,
}

/// The definition asks for changes that lose data, and they were not allowed.
#[derive(Debug, thiserror::Error)]
#[error(
    "refusing destructive changes (nothing was changed):\n{}\nrun again with --allow-destructive to carry them out",
    .0.iter().map(|c| format!("  {c}")).collect::<Vec<_>>().join("\n")
)]
pub struct DestructiveChanges(pub Vec<Change>);

/// Applies `topology`. Plans every change first; if any is destructive and not allowed,
/// changes nothing and fails with [`DestructiveChanges`].
pub async fn apply(
    jetstream: &jetstream::Context,
    topology: &Topology,
    options: ApplyOptions,
) -> anyhow::Result<Vec<Change>> {
    let plan = run(jetstream, topology, true).await?;
    let destructive: Vec<Change> = plan
        .iter()
        .filter(|c| !c.destructive.is_empty())
        .cloned()
        .collect();
    if !destructive.is_empty() && !options.allow_destructive {
        return Err(DestructiveChanges(destructive).into());
    }
    if options.dry_run {
        return Ok(plan);
    }
    run(jetstream, topology, false).await
}

async fn run(
    jetstream: &jetstream::Context,
    topology: &Topology,
    dry_run: bool,
) -> anyhow::Result<Vec<Change>> {
    let mut changes = Vec::new();
    for config in &topology.streams {
        changes.push(apply_stream(jetstream, config, dry_run).await?);
    }
    for bucket in &topology.buckets {
        changes.push(apply_bucket(jetstream, bucket, dry_run).await?);
    }
    for spec in &topology.consumers {
        changes.push(apply_consumer(jetstream, spec, dry_run).await?);
    }
    Ok(changes)
}

async fn existing_stream(
    jetstream: &jetstream::Context,
    name: &str,
) -> anyhow::Result<Option<stream::Config>> {
    match jetstream.get_stream(name).await {
        Ok(mut stream) => Ok(Some(stream.info().await?.config.clone())),
        Err(error) => match error.kind() {
            GetStreamErrorKind::JetStream(inner)
                if inner.error_code() == ErrorCode::STREAM_NOT_FOUND =>
            {
                Ok(None)
            }
            _ => Err(error).with_context(|| format!("reading stream {name}")),
        },
    }
}

async fn apply_stream(
    jetstream: &jetstream::Context,
    desired: &stream::Config,
    dry_run: bool,
) -> anyhow::Result<Change> {
    let object = format!("stream {}", desired.name);
    let Some(current) = existing_stream(jetstream, &desired.name).await? else {
        if !dry_run {
            jetstream
                .create_stream(desired.clone())
                .await
                .with_context(|| format!("creating {object}"))?;
        }
        return Ok(Change {
            object,
            outcome: Outcome::Created,
            destructive: Vec::new(),
        });
    };
    let diffs = stream_diffs(&current, desired);
    if diffs.is_empty() {
        return Ok(Change {
            object,
            outcome: Outcome::Unchanged,
            destructive: Vec::new(),
        });
    }
    let mut destructive = Vec::new();
    // The server cannot change these in place; the stream (and every message) goes.
    let recreate = current.storage != desired.storage || current.retention != desired.retention;
    if recreate {
        destructive.push("the stream is deleted with every message it holds".to_owned());
    }
    if shortens(current.max_age, desired.max_age) {
        destructive.push("a shorter max_age deletes older messages".to_owned());
    }
    let removed: Vec<&String> = current
        .subjects
        .iter()
        .filter(|s| !desired.subjects.contains(s))
        .collect();
    if !removed.is_empty() {
        destructive.push(format!(
            "messages on {removed:?} can no longer be published"
        ));
    }
    if !dry_run {
        if recreate {
            jetstream
                .delete_stream(&desired.name)
                .await
                .with_context(|| format!("deleting {object}"))?;
            jetstream
                .create_stream(desired.clone())
                .await
                .with_context(|| format!("creating {object}"))?;
        } else {
            jetstream
                .update_stream(desired.clone())
                .await
                .with_context(|| format!("updating {object}"))?;
        }
    }
    let outcome = if recreate {
        Outcome::Recreated(diffs)
    } else {
        Outcome::Updated(diffs)
    };
    Ok(Change {
        object,
        outcome,
        destructive,
    })
}

/// Whether a maximum age (`0`: unlimited) gets shorter.
fn shortens(current: std::time::Duration, desired: std::time::Duration) -> bool {
    !desired.is_zero() && (current.is_zero() || desired < current)
}

/// Differences in the fields the topology declares (the server fills in the rest).
fn stream_diffs(current: &stream::Config, desired: &stream::Config) -> Vec<String> {
    let mut diffs = Vec::new();
    diff(&mut diffs, "subjects", &current.subjects, &desired.subjects);
    diff(&mut diffs, "storage", &current.storage, &desired.storage);
    diff(
        &mut diffs,
        "replicas",
        &current.num_replicas,
        &desired.num_replicas,
    );
    diff(
        &mut diffs,
        "retention",
        &current.retention,
        &desired.retention,
    );
    diff(&mut diffs, "discard", &current.discard, &desired.discard);
    diff(
        &mut diffs,
        "duplicate_window",
        &current.duplicate_window,
        &desired.duplicate_window,
    );
    diff(&mut diffs, "max_age", &current.max_age, &desired.max_age);
    diff(
        &mut diffs,
        "allow_atomic_publish",
        &current.allow_atomic_publish,
        &desired.allow_atomic_publish,
    );
    diff(
        &mut diffs,
        "allow_direct",
        &current.allow_direct,
        &desired.allow_direct,
    );
    diff(
        &mut diffs,
        "deny_delete",
        &current.deny_delete,
        &desired.deny_delete,
    );
    diff(
        &mut diffs,
        "deny_purge",
        &current.deny_purge,
        &desired.deny_purge,
    );
    diff(
        &mut diffs,
        "description",
        &current.description,
        &desired.description,
    );
    diffs
}

async fn apply_bucket(
    jetstream: &jetstream::Context,
    spec: &BucketSpec,
    dry_run: bool,
) -> anyhow::Result<Change> {
    let desired = &spec.config;
    let object = format!("kv bucket {}", desired.bucket);
    // A bucket is a stream named KV_<bucket>; reading that stream shows its settings.
    let backing = format!("KV_{}", desired.bucket);
    let Some(current) = existing_stream(jetstream, &backing).await? else {
        if !dry_run {
            if spec.erasable {
                jetstream
                    .create_stream(erasable_bucket_stream(desired))
                    .await
                    .map(|_| ())
                    .with_context(|| format!("creating {object}"))?;
            } else {
                jetstream
                    .create_key_value(desired.clone())
                    .await
                    .map(|_| ())
                    .with_context(|| format!("creating {object}"))?;
            }
        }
        return Ok(Change {
            object,
            outcome: Outcome::Created,
            destructive: Vec::new(),
        });
    };
    let mut diffs = Vec::new();
    diff(
        &mut diffs,
        "history",
        &current.max_messages_per_subject,
        &desired.history,
    );
    diff(&mut diffs, "max_age", &current.max_age, &desired.max_age);
    diff(&mut diffs, "storage", &current.storage, &desired.storage);
    diff(
        &mut diffs,
        "replicas",
        &current.num_replicas,
        &desired.num_replicas,
    );
    diff(
        &mut diffs,
        "deny_delete",
        &current.deny_delete,
        &!spec.erasable,
    );
    if diffs.is_empty() {
        return Ok(Change {
            object,
            outcome: Outcome::Unchanged,
            destructive: Vec::new(),
        });
    }
    let mut destructive = Vec::new();
    if shortens(current.max_age, desired.max_age) {
        destructive.push("a shorter max_age deletes older entries".to_owned());
    }
    if current.max_messages_per_subject > desired.history {
        destructive.push("a shorter history deletes older revisions".to_owned());
    }
    if !dry_run {
        if spec.erasable {
            // The server refuses to turn `deny_delete` off on an existing stream: a bucket
            // made before it was erasable must be recreated (this error says so).
            jetstream
                .update_stream(erasable_bucket_stream(desired))
                .await
                .map(|_| ())
                .with_context(|| format!("updating {object}"))?;
        } else {
            jetstream
                .update_key_value(desired.clone())
                .await
                .map(|_| ())
                .with_context(|| format!("updating {object}"))?;
        }
    }
    Ok(Change {
        object,
        outcome: Outcome::Updated(diffs),
        destructive,
    })
}

/// The stream behind a KV bucket whose single messages may be erased: the layout every KV
/// client expects (`$KV.<bucket>.>`, one message per key and revision, rollups for purges,
/// direct gets, discard new), with `deny_delete` off, which `create_key_value` always sets
/// and the server never lets an update turn off.
fn erasable_bucket_stream(config: &kv::Config) -> stream::Config {
    stream::Config {
        name: format!("KV_{}", config.bucket),
        description: Some(config.description.clone()),
        subjects: vec![format!("$KV.{}.>", config.bucket)],
        max_messages_per_subject: config.history.max(1),
        max_age: config.max_age,
        storage: config.storage,
        num_replicas: config.num_replicas.max(1),
        allow_rollup: true,
        deny_delete: false,
        deny_purge: false,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    }
}

async fn apply_consumer(
    jetstream: &jetstream::Context,
    spec: &ConsumerSpec,
    dry_run: bool,
) -> anyhow::Result<Change> {
    let name = spec.config.durable_name.clone().unwrap_or_default();
    let object = format!("consumer {}/{}", spec.stream, name);
    let stream = jetstream.get_stream_no_info(&spec.stream).await?;
    let current = match stream.consumer_info(&name).await {
        Ok(info) => Some(info.config),
        Err(error) => match error.kind() {
            ConsumerInfoErrorKind::NotFound => None,
            // In a dry run the stream itself may not exist yet.
            ConsumerInfoErrorKind::StreamNotFound if dry_run => None,
            _ => return Err(error).with_context(|| format!("reading {object}")),
        },
    };
    let desired = &spec.config;
    let Some(current) = current else {
        if !dry_run {
            stream
                .create_consumer(desired.clone())
                .await
                .with_context(|| format!("creating {object}"))?;
        }
        return Ok(Change {
            object,
            outcome: Outcome::Created,
            destructive: Vec::new(),
        });
    };
    let mut diffs = Vec::new();
    diff(
        &mut diffs,
        "filter_subject",
        &current.filter_subject,
        &desired.filter_subject,
    );
    diff(
        &mut diffs,
        "deliver_policy",
        &current.deliver_policy,
        &desired.deliver_policy,
    );
    diff(
        &mut diffs,
        "ack_policy",
        &current.ack_policy,
        &desired.ack_policy,
    );
    diff(&mut diffs, "ack_wait", &current.ack_wait, &desired.ack_wait);
    diff(
        &mut diffs,
        "max_deliver",
        &current.max_deliver,
        &desired.max_deliver,
    );
    diff(
        &mut diffs,
        "max_ack_pending",
        &current.max_ack_pending,
        &desired.max_ack_pending,
    );
    diff(
        &mut diffs,
        "description",
        &current.description,
        &desired.description,
    );
    if diffs.is_empty() {
        return Ok(Change {
            object,
            outcome: Outcome::Unchanged,
            destructive: Vec::new(),
        });
    }
    // The server cannot change these in place: the consumer, and its delivery state, goes.
    // Not destructive: every consumer here feeds a projection, and a projector resets its
    // consumer to just after its own checkpoint whenever it (re)subscribes, so the delivery
    // state is rebuilt from the read model. (Explicit -> All acks came this way.)
    let recreate = current.deliver_policy != desired.deliver_policy
        || current.ack_policy != desired.ack_policy;
    let destructive = Vec::new();
    if !dry_run {
        if recreate {
            stream
                .delete_consumer(&name)
                .await
                .with_context(|| format!("deleting {object}"))?;
            stream
                .create_consumer(desired.clone())
                .await
                .with_context(|| format!("creating {object}"))?;
        } else {
            stream
                .update_consumer(desired.clone())
                .await
                .with_context(|| format!("updating {object}"))?;
        }
    }
    let outcome = if recreate {
        Outcome::Recreated(diffs)
    } else {
        Outcome::Updated(diffs)
    };
    Ok(Change {
        object,
        outcome,
        destructive,
    })
}

fn diff<A, B>(diffs: &mut Vec<String>, field: &str, current: &A, desired: &B)
where
    A: fmt::Debug + PartialEq<B>,
    B: fmt::Debug,
{
    if current != desired {
        diffs.push(format!("{field}: {current:?} -> {desired:?}"));
    }
}

/// A summary line such as `no changes` or `1 created, 2 unchanged`.
pub fn summary(changes: &[Change], dry_run: bool) -> String {
    let count = |pred: fn(&Outcome) -> bool| changes.iter().filter(|c| pred(&c.outcome)).count();
    let created = count(|o| matches!(o, Outcome::Created));
    let updated = count(|o| matches!(o, Outcome::Updated(_) | Outcome::Recreated(_)));
    let unchanged = count(|o| matches!(o, Outcome::Unchanged));
    let verb = if dry_run { "would be " } else { "" };
    if created + updated == 0 {
        format!("no changes ({unchanged} objects up to date)")
    } else {
        format!("{created} {verb}created, {updated} {verb}updated, {unchanged} unchanged")
    }
}

/// Re-exported so callers need not know async-nats' module layout.
pub use consumer::pull::Config as PullConsumerConfig;
