//! Runs one command: load what it reads, decide, append with the versions it read, and on a
//! lost race reload and decide again, a bounded number of times.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::{Duration, Instant};

use chrono::Utc;
use events::{Event, EventMetadata, TraceContext};
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram};
use serde::{Deserialize, Serialize};
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
    /// An earlier attempt of the same request (see [`AppendJournal::earlier`]) is in the
    /// stream: the command took effect then, and is not decided again.
    #[error("earlier attempt {} of this request is stored", .0.index)]
    EarlierAttemptStored(StoredAttempt),
}

/// An append as it is sent, with what it takes to find it in the stream later and to say
/// which versions it made: with an `Idempotency-Key` it is recorded before it is sent, so a
/// retry can tell whether it was stored even when no answer ever came back.
///
/// If the broker stores it, its first event is the first message on that aggregate's
/// subject after `expected_version` (the broker checks that version), and its events get
/// consecutive sequences (one message or one atomic batch).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SentAppend {
    /// `student` or `course`: the aggregate of the first event.
    pub aggregate_kind: String,
    pub aggregate_id: Uuid,
    pub expected_version: u64,
    /// Its event id, which is also its `Nats-Msg-Id`.
    pub first_event_id: Uuid,
    pub event_count: u64,
    /// Position in the append of the addressed aggregate's last event; `None` when the
    /// append does not touch it (then its version stays `target_version_read`).
    pub target_event: Option<u64>,
    pub target_version_read: u64,
}

impl SentAppend {
    fn new(events: &[Event], target: AggregateId, versions: &BTreeMap<AggregateId, u64>) -> Self {
        let aggregate = |event: &Event| AggregateId {
            kind: event.metadata.aggregate_kind,
            id: event.metadata.aggregate_id,
        };
        let first = events.first().map(aggregate).unwrap_or(target);
        SentAppend {
            aggregate_kind: first.kind.as_str().to_owned(),
            aggregate_id: first.id,
            expected_version: versions.get(&first).copied().unwrap_or(0),
            first_event_id: events.first().map_or(Uuid::nil(), |e| e.metadata.event_id),
            event_count: events.len() as u64,
            target_event: events
                .iter()
                .rposition(|event| aggregate(event) == target)
                .map(|index| index as u64),
            target_version_read: versions.get(&target).copied().unwrap_or(0),
        }
    }

    fn first_aggregate(&self) -> Option<AggregateId> {
        Some(AggregateId {
            kind: events::AggregateKind::parse(&self.aggregate_kind)?,
            id: self.aggregate_id,
        })
    }

    /// The addressed aggregate's version and the command's position, had the append been
    /// stored with its first event at `first_sequence`: what its answer would have said.
    pub fn versions_at(&self, first_sequence: u64) -> (u64, u64) {
        let target_version = self
            .target_event
            .map_or(self.target_version_read, |index| first_sequence + index);
        let position = first_sequence + self.event_count.saturating_sub(1);
        (target_version, position)
    }
}

/// Sequence and `Nats-Msg-Id` of a message.
type FirstMessage = (u64, Option<String>);

/// Which earlier attempt is stored, and where its first event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredAttempt {
    /// Index into [`AppendJournal::earlier`].
    pub index: usize,
    pub first_sequence: u64,
}

/// What a command records about its appends, for an `Idempotency-Key`.
pub trait AppendJournal: Send {
    /// Appends that earlier requests of this same command sent and never saw confirmed;
    /// any of them may be stored, or land still. Before deciding, after a lost race and
    /// before an answer that appends nothing, the command looks for them in the stream.
    fn earlier(&self) -> Vec<SentAppend>;

    /// Records `append` before it is sent; `accepted` is the answer it makes if stored,
    /// with both positions 0 (see [`SentAppend::versions_at`]). An error means nothing is
    /// sent and the command is answered as unavailable.
    fn before_append(
        &mut self,
        append: SentAppend,
        accepted: &Accepted,
    ) -> impl Future<Output = Result<(), String>> + Send;
}

/// For commands without an `Idempotency-Key`: records nothing.
pub struct NoJournal;

impl AppendJournal for NoJournal {
    fn earlier(&self) -> Vec<SentAppend> {
        Vec::new()
    }

    async fn before_append(&mut self, _: SentAppend, _: &Accepted) -> Result<(), String> {
        Ok(())
    }
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
            CommandError::EarlierAttemptStored(_) => "earlier_attempt_stored",
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
        self.execute_recorded(command, context, if_match, &mut NoJournal)
            .await
    }

    /// [`execute`](Self::execute), telling `journal` about each append before it is sent
    /// and first looking for the appends of its earlier attempts.
    pub async fn execute_recorded(
        &self,
        command: &Command,
        context: &CommandContext,
        if_match: Option<&[u64]>,
        journal: &mut impl AppendJournal,
    ) -> Result<Accepted, CommandError> {
        let earlier = journal.earlier();
        let result = match self.find_stored(&earlier).await {
            Ok(Some(stored)) => Err(CommandError::EarlierAttemptStored(stored)),
            Ok(None) => {
                let result = self
                    .decide_and_append(command, context, if_match, &earlier, journal)
                    .await;
                self.unless_stored_earlier(result, &earlier).await
            }
            Err(error) => Err(error.into()),
        };
        let result = match (command, result) {
            // The erasure is recorded (now, by an earlier attempt, or before): destroy the
            // key. An erasure is answered only once its key is gone; a failure here is a
            // 503, and the retry (which finds the erasure recorded) destroys it again.
            (
                Command::EraseStudent { student_id },
                result @ (Ok(_) | Err(CommandError::EarlierAttemptStored(_))),
            ) => match self.aggregates.destroy_student_keys(*student_id).await {
                Ok(()) => result,
                Err(reason) => Err(CommandError::Unavailable(reason)),
            },
            (_, result) => result,
        };
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

    /// An earlier attempt that lands after this one read the stream makes every later
    /// decision moot: this one then finds its work done (an answer that appends nothing) or
    /// loses the race for the same version. Either way the earlier attempt is the answer.
    async fn unless_stored_earlier(
        &self,
        result: Result<Accepted, CommandError>,
        earlier: &[SentAppend],
    ) -> Result<Accepted, CommandError> {
        let appended_nothing = match &result {
            Ok(accepted) => accepted.appended == 0,
            Err(CommandError::Rule(_) | CommandError::PreconditionFailed { .. }) => true,
            Err(CommandError::Contention) => true,
            Err(_) => false,
        };
        if !appended_nothing || earlier.is_empty() {
            return result;
        }
        match self.find_stored(earlier).await {
            Ok(Some(stored)) => Err(CommandError::EarlierAttemptStored(stored)),
            Ok(None) => result,
            Err(error) => Err(error.into()),
        }
    }

    /// The first of `appends` that is in the stream. Each is looked for where it can only
    /// be: the first message after its expected version on its first aggregate's subject,
    /// read from the stream leader (a follower may not have it yet).
    pub async fn find_stored(
        &self,
        appends: &[SentAppend],
    ) -> Result<Option<StoredAttempt>, LoadError> {
        // Attempts that expected the same version of the same aggregate compete for one
        // place: one read answers for all of them.
        let mut read: BTreeMap<(AggregateId, u64), Option<FirstMessage>> = BTreeMap::new();
        for (index, append) in appends.iter().enumerate() {
            let Some(aggregate) = append.first_aggregate() else {
                continue;
            };
            let place = (aggregate, append.expected_version);
            let first = match read.get(&place) {
                Some(first) => first.clone(),
                None => {
                    let first = self
                        .aggregates
                        .store()
                        .first_after(aggregate, append.expected_version)
                        .await?;
                    read.insert(place, first.clone());
                    first
                }
            };
            if let Some((sequence, Some(id))) = first
                && id == append.first_event_id.to_string()
            {
                return Ok(Some(StoredAttempt {
                    index,
                    first_sequence: sequence,
                }));
            }
        }
        Ok(None)
    }

    /// Executes `command`. `if_match` holds the versions of the addressed aggregate the
    /// client accepts (`If-Match`), checked against the version the decision reads.
    /// Loads, decides and appends, deciding again after a lost race. Each append is shown
    /// to `journal` before it is sent; a lost race first looks for `earlier` appends.
    async fn decide_and_append(
        &self,
        command: &Command,
        context: &CommandContext,
        if_match: Option<&[u64]>,
        earlier: &[SentAppend],
        journal: &mut impl AppendJournal,
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
            // The answer this append makes if stored, for the journal to keep with it. The
            // snapshot is not needed for the append, and is read again after a lost race.
            snapshot.apply(&changes);
            let planned = Accepted {
                target_version: 0,
                position: 0,
                snapshot,
                appended: events.len(),
                attempts: attempt,
            };
            journal
                .before_append(SentAppend::new(&events, target, &versions), &planned)
                .await
                .map_err(CommandError::Unavailable)?;
            let snapshot = planned.snapshot;
            let started = Instant::now();
            let appended = self.aggregates.append(&events, &versions).await;
            let kind = if events.len() == 1 { "single" } else { "batch" };
            self.metrics.append_duration.record(
                started.elapsed().as_secs_f64(),
                &[KeyValue::new("append", kind)],
            );
            match appended {
                Ok((sequences, keys)) => {
                    for (change, sequence) in changes.iter().zip(&sequences) {
                        versions.insert(change.aggregate, *sequence);
                    }
                    self.aggregates.remember_all(&snapshot, &versions, &keys);
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
                    // Perhaps to an earlier attempt of this very request, landing late.
                    if let Some(stored) = self.find_stored(earlier).await? {
                        return Err(CommandError::EarlierAttemptStored(stored));
                    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use events::EventPayload;

    fn event(aggregate: AggregateId) -> Event {
        Event {
            metadata: EventMetadata {
                event_id: Uuid::now_v7(),
                aggregate_kind: aggregate.kind,
                aggregate_id: aggregate.id,
                occurred_at: Utc::now(),
                correlation_id: Uuid::nil(),
                causation_id: Uuid::nil(),
                trace: TraceContext::default(),
            },
            payload: EventPayload::StudentDeleted,
        }
    }

    #[test]
    fn a_sent_append_answers_the_versions_its_stored_events_got() {
        let (student, course) = (
            AggregateId::student(Uuid::from_u128(1)),
            AggregateId::course(Uuid::from_u128(2)),
        );
        let versions = BTreeMap::from([(student, 4), (course, 9)]);
        // Enrollment: the student's event first, then the course's.
        let events = [event(student), event(course)];
        let sent = SentAppend::new(&events, student, &versions);
        assert_eq!(sent.first_aggregate(), Some(student));
        assert_eq!(sent.expected_version, 4);
        assert_eq!(sent.first_event_id, events[0].metadata.event_id);
        assert_eq!(sent.versions_at(20), (20, 21));
        // A course deletion forgetting the student: the target's event is the first.
        let sent = SentAppend::new(&[event(course), event(student)], course, &versions);
        assert_eq!(sent.versions_at(30), (30, 31));
        // An append that does not touch the target leaves its version as read.
        let sent = SentAppend::new(&[event(course)], student, &versions);
        assert_eq!(sent.versions_at(40), (4, 40));
    }
}
