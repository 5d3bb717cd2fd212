//! Runs one command: load what it reads, decide, append with the versions it read, and on a
//! lost race reload and decide again, a bounded number of times.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use chrono::Utc;
use events::{Event, EventMetadata, TraceContext};
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram};
use service_kit::metrics;
use uuid::Uuid;

use crate::aggregates::Aggregates;
use crate::domain::{AggregateId, Command, DomainError, Snapshot, decide};
use crate::event_store::{AppendError, LoadError};
use crate::locks::AggregateLocks;

/// Decisions tried before a command is answered with a conflict.
pub const MAX_ATTEMPTS: u32 = 8;

/// Who asked, for the envelope of every event the command produces.
#[derive(Debug, Clone)]
pub struct CommandContext {
    pub command_id: Uuid,
    pub correlation_id: Uuid,
    pub trace: TraceContext,
}

/// A command that took effect (or asked for what already was).
#[derive(Debug, Clone)]
pub struct Accepted {
    /// Version of the addressed aggregate after the command (its ETag).
    pub target_version: u64,
    /// Stream position the query side must reach to show the effect.
    pub position: u64,
    /// States after the command.
    pub snapshot: Snapshot,
    /// Events appended (0 when the command changed nothing).
    pub appended: usize,
    /// Decisions made (1 unless races were lost).
    pub attempts: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Rule(#[from] DomainError),
    #[error("the aggregate is at version {current}, not one If-Match names")]
    PreconditionFailed { current: u64 },
    #[error("lost the race {MAX_ATTEMPTS} times")]
    Contention,
    #[error("reading the aggregates failed: {0}")]
    Load(#[from] LoadError),
    #[error("{0}")]
    Unavailable(String),
}

/// Instruments of the command path.
struct CommandMetrics {
    commands: Counter<u64>,
    conflicts: Counter<u64>,
    append_duration: Histogram<f64>,
}

impl CommandMetrics {
    fn new() -> Self {
        let meter = metrics::meter();
        let metrics = CommandMetrics {
            commands: meter
                .u64_counter("commands")
                .with_description("Commands handled, by command and result")
                .build(),
            conflicts: meter
                .u64_counter("command.conflicts")
                .with_description("Appends refused because an aggregate changed (each is retried)")
                .build(),
            append_duration: metrics::seconds_histogram(
                "command.append.duration",
                "Time for the broker to confirm an append, by single event or atomic batch",
            ),
        };
        // A series exists before the first conflict, so dashboards show 0, not "no data".
        for command in Command::NAMES {
            metrics
                .conflicts
                .add(0, &[KeyValue::new("command", command)]);
        }
        metrics
    }
}

impl CommandError {
    /// A bounded label for metrics.
    fn label(&self) -> &'static str {
        match self {
            CommandError::Rule(rule) => match rule {
                DomainError::NotFound(_) => "not_found",
                DomainError::AlreadyExists(_) => "already_exists",
                DomainError::UnknownReference { .. } => "unknown_reference",
                DomainError::StudentCourseLimit { .. } => "student_course_limit",
                DomainError::CourseFull { .. } => "course_full",
                DomainError::NotEnrolled { .. } => "not_enrolled",
            },
            CommandError::PreconditionFailed { .. } => "precondition_failed",
            CommandError::Contention => "contention",
            CommandError::Load(_) => "load_failed",
            CommandError::Unavailable(_) => "unavailable",
        }
    }
}

/// Executes commands against the event stream.
pub struct CommandService {
    aggregates: Aggregates,
    locks: AggregateLocks,
    metrics: CommandMetrics,
}

impl CommandService {
    pub fn new(aggregates: Aggregates) -> Self {
        CommandService {
            aggregates,
            locks: AggregateLocks::default(),
            metrics: CommandMetrics::new(),
        }
    }

    /// Executes `command` (see [`CommandService::decide_and_append`]) and counts its result.
    pub async fn execute(
        &self,
        command: &Command,
        context: &CommandContext,
        if_match: Option<&[u64]>,
    ) -> Result<Accepted, CommandError> {
        let result = self.decide_and_append(command, context, if_match).await;
        let label = match &result {
            Ok(accepted) if accepted.appended == 0 => "unchanged",
            Ok(_) => "accepted",
            Err(error) => error.label(),
        };
        self.metrics.commands.add(
            1,
            &[
                KeyValue::new("command", command.name()),
                KeyValue::new("result", label),
            ],
        );
        result
    }

    pub fn aggregates(&self) -> &Aggregates {
        &self.aggregates
    }

    /// What an earlier, unanswered create of `target` made, as its answer: the aggregate's
    /// current version, and a position at or after its last change and the last changes of
    /// the aggregates it relates to (the creating batch enrolled it in those).
    pub async fn made_earlier(&self, target: AggregateId) -> Result<Accepted, CommandError> {
        let mut snapshot = Snapshot::default();
        let mut versions = BTreeMap::new();
        self.aggregates
            .load(&[target], true, &mut snapshot, &mut versions)
            .await?;
        let related = snapshot.relations(target);
        self.aggregates
            .load(&related, true, &mut snapshot, &mut versions)
            .await?;
        Ok(Accepted {
            target_version: versions.get(&target).copied().unwrap_or(0),
            position: versions.values().copied().max().unwrap_or(0),
            snapshot,
            appended: 0,
            attempts: 1,
        })
    }

    /// Executes `command`. `if_match` holds the versions of the addressed aggregate the
    /// client accepts (`If-Match`), checked against the version the decision reads.
    /// Loads, decides and appends, deciding again after a lost race.
    async fn decide_and_append(
        &self,
        command: &Command,
        context: &CommandContext,
        if_match: Option<&[u64]>,
    ) -> Result<Accepted, CommandError> {
        let target = command.target();
        // An answer that appends nothing (a 412, a rule's refusal, a no-op) is given only
        // from state read from the stream: this replica's cache never sees other replicas'
        // writes, and no expected-sequence check catches a decision that writes nothing.
        // (One that appends is checked by the broker, so the cache is enough for it.)
        let mut verify = false;
        for attempt in 1..=MAX_ATTEMPTS {
            // Find what the command touches, wait for this process's other commands on those
            // aggregates (see `locks`), then read them again: a previous holder may have just
            // changed them. After a lost race, the second read catches up with the stream.
            let (snapshot, _) = self.read(command, false).await?;
            let held = self.locks.lock(touched(command, &snapshot)).await;
            let from_stream = attempt > 1 || verify;
            let (mut snapshot, mut versions) = self.read(command, from_stream).await?;
            if !held.covers(&touched(command, &snapshot)) {
                // The relations changed while we waited: lock the new set.
                continue;
            }
            let target_version = versions.get(&target).copied().unwrap_or(0);
            // Preconditions come before the rules; a missing aggregate is a 404 from decide.
            if let Some(expected) = if_match
                && target_version != 0
                && !expected.contains(&target_version)
            {
                if !from_stream {
                    verify = true;
                    continue;
                }
                return Err(CommandError::PreconditionFailed {
                    current: target_version,
                });
            }
            let changes = match decide(command, &snapshot) {
                Ok(changes) => changes,
                Err(_) if !from_stream => {
                    verify = true;
                    continue;
                }
                Err(refused) => return Err(refused.into()),
            };
            if changes.is_empty() && !from_stream {
                verify = true;
                continue;
            }
            if changes.is_empty() {
                return Ok(Accepted {
                    target_version,
                    position: target_version,
                    snapshot,
                    appended: 0,
                    attempts: attempt,
                });
            }
            let events: Vec<Event> = changes
                .iter()
                .map(|change| Event {
                    metadata: EventMetadata {
                        event_id: Uuid::now_v7(),
                        aggregate_kind: change.aggregate.kind,
                        aggregate_id: change.aggregate.id,
                        occurred_at: Utc::now(),
                        correlation_id: context.correlation_id,
                        causation_id: context.command_id,
                        trace: context.trace.clone(),
                    },
                    payload: change.payload.clone(),
                })
                .collect();
            let started = Instant::now();
            let appended = self.aggregates.store().append(&events, &versions).await;
            let kind = if events.len() == 1 { "single" } else { "batch" };
            self.metrics.append_duration.record(
                started.elapsed().as_secs_f64(),
                &[KeyValue::new("append", kind)],
            );
            match appended {
                Ok(sequences) => {
                    snapshot.apply(&changes);
                    for (change, sequence) in changes.iter().zip(&sequences) {
                        versions.insert(change.aggregate, *sequence);
                    }
                    self.aggregates.remember_all(&snapshot, &versions);
                    return Ok(Accepted {
                        target_version: versions.get(&target).copied().unwrap_or(0),
                        position: sequences.last().copied().unwrap_or(0),
                        snapshot,
                        appended: events.len(),
                        attempts: attempt,
                    });
                }
                Err(AppendError::Conflict) => {
                    drop(held);
                    self.metrics
                        .conflicts
                        .add(1, &[KeyValue::new("command", command.name())]);
                    tracing::debug!(attempt, aggregate = %target.id, "lost a race; deciding again");
                    // Spread competing retries out a little.
                    let jitter = u64::from(Uuid::new_v4().as_bytes()[0] % 8);
                    tokio::time::sleep(Duration::from_millis(jitter * u64::from(attempt))).await;
                }
                Err(AppendError::Unavailable(reason)) => {
                    return Err(CommandError::Unavailable(reason));
                }
            }
        }
        Err(CommandError::Contention)
    }
}

impl CommandService {
    /// The states and versions of the command's target and of every aggregate related to it.
    async fn read(
        &self,
        command: &Command,
        refresh: bool,
    ) -> Result<(Snapshot, BTreeMap<AggregateId, u64>), LoadError> {
        let target = command.target();
        let mut snapshot = Snapshot::default();
        let mut versions = BTreeMap::new();
        if is_creation(command) && !refresh {
            // A fresh id minted a moment ago has nothing on its subject. An id derived from an
            // `Idempotency-Key` may: then the append loses its race, and the second read
            // (`refresh`) loads what is there, so the decision says `AlreadyExists`.
            versions.insert(target, 0);
        } else {
            self.aggregates
                .load(&[target], refresh, &mut snapshot, &mut versions)
                .await?;
        }
        let related = command.related(&snapshot);
        self.aggregates
            .load(&related, refresh, &mut snapshot, &mut versions)
            .await?;
        Ok((snapshot, versions))
    }
}

/// The target and every related aggregate.
fn touched(command: &Command, snapshot: &Snapshot) -> BTreeSet<AggregateId> {
    let mut ids: BTreeSet<AggregateId> = command.related(snapshot).into_iter().collect();
    ids.insert(command.target());
    ids
}

fn is_creation(command: &Command) -> bool {
    matches!(
        command,
        Command::RegisterStudent { .. } | Command::CreateCourse { .. }
    )
}
