//! Judges a run: folds the final stream on its own (every event checked against the state
//! it lands on), then holds the clients' history and the read models against that fold.
//! Each check returns the violations it found, as sentences; an empty list is a pass.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use command_gateway::domain::fields::{MAX_COURSES_PER_STUDENT, MAX_STUDENTS_PER_COURSE};
use events::{AggregateKind, Event, EventPayload};
use uuid::Uuid;

use crate::history::{CommandKind, CommandRecord, Outcome, ReadRecord, Target};

/// One stored event and its stream sequence.
#[derive(Debug, Clone)]
pub struct Stored {
    pub sequence: u64,
    pub event: Event,
}

/// A student or course as the fold (or a read model) has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// The student's `name` or the course's `name`.
    pub name: String,
    /// Course ids of a student, student ids of a course.
    pub related: BTreeSet<Uuid>,
    /// Stream sequence of the last event on its subject.
    pub version: u64,
}

/// The world the stream describes: live aggregates and the ids that were deleted.
#[derive(Debug, Default, Clone)]
pub struct Fold {
    pub students: BTreeMap<Uuid, Row>,
    pub courses: BTreeMap<Uuid, Row>,
    pub deleted: BTreeSet<Target>,
    /// Last sequence of every subject, deleted ones included.
    pub versions: HashMap<Target, u64>,
    pub violations: Vec<String>,
}

impl Fold {
    fn rows(&mut self, kind: AggregateKind) -> &mut BTreeMap<Uuid, Row> {
        match kind {
            AggregateKind::Student => &mut self.students,
            AggregateKind::Course => &mut self.courses,
        }
    }
}

/// Folds `events` (in stream order), recording every event that does not fit the state it
/// lands on and every invariant the result breaks.
pub fn fold(events: &[Stored]) -> Fold {
    let mut fold = Fold::default();
    let mut event_ids = HashSet::new();
    for stored in events {
        let meta = &stored.event.metadata;
        let target = Target {
            kind: meta.aggregate_kind,
            id: meta.aggregate_id,
        };
        let at = stored.sequence;
        if !event_ids.insert(meta.event_id) {
            fold.violations
                .push(format!("event id {} stored twice (at {at})", meta.event_id));
        }
        fold.versions.insert(target, at);
        let deleted = fold.deleted.contains(&target);
        let rows = fold.rows(target.kind);
        let exists = rows.contains_key(&target.id);
        let mut misfit = None;
        match &stored.event.payload {
            EventPayload::StudentRegistered(details) => {
                if exists || deleted {
                    misfit = Some("a second creation");
                }
                rows.insert(target.id, row(&details.name, at));
            }
            EventPayload::CourseCreated(details) => {
                if exists || deleted {
                    misfit = Some("a second creation");
                }
                rows.insert(target.id, row(&details.name, at));
            }
            EventPayload::StudentUpdated(details) => match rows.get_mut(&target.id) {
                Some(existing) => existing.name = details.name.clone(),
                None => misfit = Some("an update of no live aggregate"),
            },
            EventPayload::CourseUpdated(details) => match rows.get_mut(&target.id) {
                Some(existing) => existing.name = details.name.clone(),
                None => misfit = Some("an update of no live aggregate"),
            },
            EventPayload::StudentDeleted | EventPayload::CourseDeleted => {
                if !exists {
                    misfit = Some("a deletion of no live aggregate");
                }
                // The deleted side keeps its relations in its last state; the other sides
                // forget it in the same append, which the end check of relations between
                // live aggregates proves.
                rows.remove(&target.id);
                fold.deleted.insert(target);
            }
            // The workload erases nobody; an erasure must follow its student's deletion.
            EventPayload::StudentErased(_) => {
                if exists || !deleted {
                    misfit = Some("an erasure of no deleted student");
                }
            }
            EventPayload::StudentEnrolled(e) | EventPayload::StudentUnenrolled(e) => {
                let other = match target.kind {
                    AggregateKind::Student => e.course_id,
                    AggregateKind::Course => e.student_id,
                };
                let enrolled = matches!(stored.event.payload, EventPayload::StudentEnrolled(_));
                match rows.get_mut(&target.id) {
                    Some(existing) if enrolled => {
                        if !existing.related.insert(other) {
                            misfit = Some("an enrollment that already was");
                        }
                    }
                    Some(existing) => {
                        if !existing.related.remove(&other) {
                            misfit = Some("an unenrollment of no enrollment");
                        }
                    }
                    None => misfit = Some("an enrollment change of no live aggregate"),
                }
            }
        }
        if let Some(row) = fold.rows(target.kind).get_mut(&target.id) {
            row.version = at;
        }
        if let Some(what) = misfit {
            fold.violations.push(format!(
                "event {at} ({}) on {target:?} is {what}",
                stored.event.payload.event_type()
            ));
        }
    }
    check_relations(&mut fold);
    fold
}

fn row(name: &str, version: u64) -> Row {
    Row {
        name: name.to_owned(),
        related: BTreeSet::new(),
        version,
    }
}

/// Limits, and both sides of every enrollment naming each other (live aggregates only).
fn check_relations(fold: &mut Fold) {
    let mut violations = Vec::new();
    for (id, student) in &fold.students {
        if student.related.len() > MAX_COURSES_PER_STUDENT {
            violations.push(format!(
                "student {id} is in {} courses",
                student.related.len()
            ));
        }
        for course in &student.related {
            if !fold
                .courses
                .get(course)
                .is_some_and(|c| c.related.contains(id))
            {
                violations.push(format!(
                    "student {id} lists course {course}, which does not list it"
                ));
            }
        }
    }
    for (id, course) in &fold.courses {
        if course.related.len() > MAX_STUDENTS_PER_COURSE {
            violations.push(format!("course {id} has {} students", course.related.len()));
        }
        for student in &course.related {
            if !fold
                .students
                .get(student)
                .is_some_and(|s| s.related.contains(id))
            {
                violations.push(format!(
                    "course {id} lists student {student}, which does not list it"
                ));
            }
        }
    }
    fold.violations.extend(violations);
}

/// Every accepted command is in the stream (its answered version names an event of its
/// target; a create's names the creation it asked for) and no command took effect twice
/// (all events of one correlation id come from one attempt).
pub fn check_commands(commands: &[CommandRecord], events: &[Stored]) -> Vec<String> {
    let by_sequence: HashMap<u64, &Event> = events.iter().map(|s| (s.sequence, &s.event)).collect();
    let mut attempts_of: HashMap<Uuid, BTreeSet<Uuid>> = HashMap::new();
    for stored in events {
        let meta = &stored.event.metadata;
        attempts_of
            .entry(meta.correlation_id)
            .or_default()
            .insert(meta.causation_id);
    }
    let mut violations = Vec::new();
    for command in commands {
        if let Some(attempts) = attempts_of.get(&command.correlation_id)
            && attempts.len() > 1
        {
            violations.push(format!(
                "{:?} {:?} (correlation {}) took effect {} times",
                command.kind,
                command.target,
                command.correlation_id,
                attempts.len()
            ));
        }
        let Outcome::Accepted { version, .. } = command.outcome else {
            continue;
        };
        let Some(event) = by_sequence.get(&version) else {
            violations.push(format!(
                "{:?} {:?} was answered with version {version}, which the stream does not hold (lost)",
                command.kind, command.target
            ));
            continue;
        };
        let meta = &event.metadata;
        let on_target =
            meta.aggregate_kind == command.target.kind && meta.aggregate_id == command.target.id;
        let its_own = meta.correlation_id == command.correlation_id;
        if !on_target || (command.kind.is_create() && !its_own) {
            violations.push(format!(
                "{:?} {:?} was answered with version {version}, but event {version} is {} of {}:{}",
                command.kind,
                command.target,
                event.payload.event_type(),
                meta.aggregate_kind.as_str(),
                meta.aggregate_id
            ));
        }
        if command.kind == CommandKind::DeleteStudent || command.kind == CommandKind::DeleteCourse {
            // A deletion's version is its own event, or a deletion that already was.
            if !matches!(
                event.payload,
                EventPayload::StudentDeleted | EventPayload::CourseDeleted
            ) {
                violations.push(format!(
                    "{:?} {:?} answered version {version}, not a deletion",
                    command.kind, command.target
                ));
            }
        }
    }
    violations
}

/// Every read made with a write's token reflected that write: it found the aggregate at
/// the write's version or a newer one, or found it gone after a deletion. Other clients
/// write the same aggregates, so "gone" is also right when the final stream deletes the
/// aggregate after the write (another client's deletion may land before the read is
/// served); it is stale only when no deletion followed.
pub fn check_reads(reads: &[ReadRecord], fold: &Fold) -> Vec<String> {
    let deleted_after = |target: &Target, version: u64| {
        fold.deleted.contains(target) && fold.versions.get(target).is_some_and(|&at| at > version)
    };
    reads
        .iter()
        .filter_map(|read| {
            let fine = match (&read.saw, read.must_see) {
                (Ok(Some(seen)), Some(wanted)) => *seen >= wanted,
                (Ok(None), Some(wanted)) => deleted_after(&read.target, wanted),
                (Ok(None), None) => true,
                _ => false,
            };
            (!fine).then(|| {
                format!(
                    "{} read of {:?} with token {} saw {:?}, the write left {:?}",
                    read.protocol, read.target, read.token, read.saw, read.must_see
                )
            })
        })
        .collect()
}

/// Differences between a read model's rows and the fold's.
pub fn compare(
    what: &str,
    model: &BTreeMap<Uuid, Row>,
    folded: &BTreeMap<Uuid, Row>,
) -> Vec<String> {
    let mut differences = Vec::new();
    for (id, row) in folded {
        match model.get(id) {
            None => differences.push(format!("{what} {id} is missing from the read model")),
            Some(seen) if seen != row => {
                differences.push(format!("{what} {id}: read model {seen:?}, stream {row:?}"))
            }
            Some(_) => {}
        }
    }
    for id in model.keys().filter(|id| !folded.contains_key(id)) {
        differences.push(format!(
            "{what} {id} is in the read model but not live in the stream"
        ));
    }
    differences
}

#[cfg(test)]
mod tests {
    use events::{CourseDetails, Enrollment, StudentDetails};

    use super::*;

    fn stored(sequence: u64, kind: AggregateKind, id: Uuid, payload: EventPayload) -> Stored {
        Stored {
            sequence,
            event: test_support::event(kind, id, payload),
        }
    }

    fn student(n: &str) -> EventPayload {
        EventPayload::StudentRegistered(StudentDetails {
            name: n.into(),
            first_name: "F".into(),
            last_name: "L".into(),
        })
    }

    fn course() -> EventPayload {
        EventPayload::CourseCreated(CourseDetails {
            name: "Algebra".into(),
            description: "d".into(),
            discipline: "Maths".into(),
            teacher: "Noether".into(),
        })
    }

    fn enrollment(student_id: Uuid, course_id: Uuid) -> Enrollment {
        Enrollment {
            student_id,
            course_id,
        }
    }

    #[test]
    fn a_consistent_stream_folds_without_violations() {
        let (s, c) = (Uuid::now_v7(), Uuid::now_v7());
        let events = vec![
            stored(1, AggregateKind::Student, s, student("Ada")),
            stored(2, AggregateKind::Course, c, course()),
            stored(
                3,
                AggregateKind::Student,
                s,
                EventPayload::StudentEnrolled(enrollment(s, c)),
            ),
            stored(
                4,
                AggregateKind::Course,
                c,
                EventPayload::StudentEnrolled(enrollment(s, c)),
            ),
        ];
        let folded = fold(&events);
        assert!(folded.violations.is_empty(), "{:?}", folded.violations);
        assert_eq!(folded.students[&s].related, BTreeSet::from([c]));
        assert_eq!(folded.students[&s].version, 3);
        assert_eq!(folded.courses[&c].version, 4);

        // A deletion with its cascade: the course forgets the student in the same append.
        let mut events = events;
        events.push(stored(
            5,
            AggregateKind::Student,
            s,
            EventPayload::StudentDeleted,
        ));
        events.push(stored(
            6,
            AggregateKind::Course,
            c,
            EventPayload::StudentUnenrolled(enrollment(s, c)),
        ));
        let folded = fold(&events);
        assert!(folded.violations.is_empty(), "{:?}", folded.violations);
        assert!(folded.courses[&c].related.is_empty());
        assert!(!folded.students.contains_key(&s));
    }

    #[test]
    fn one_sided_enrollments_deletions_without_cascade_and_late_events_are_violations() {
        let (s, c) = (Uuid::now_v7(), Uuid::now_v7());
        let events = vec![
            stored(1, AggregateKind::Student, s, student("Ada")),
            stored(2, AggregateKind::Course, c, course()),
            stored(
                3,
                AggregateKind::Student,
                s,
                EventPayload::StudentEnrolled(enrollment(s, c)),
            ),
            stored(4, AggregateKind::Course, c, EventPayload::CourseDeleted),
            stored(
                5,
                AggregateKind::Course,
                c,
                EventPayload::StudentEnrolled(enrollment(s, c)),
            ),
        ];
        let violations = fold(&events).violations.join("\n");
        assert!(violations.contains("event 5"), "{violations}");
        assert!(violations.contains("does not list it"), "{violations}");
    }

    #[test]
    fn more_than_60_students_in_a_course_is_a_violation() {
        let c = Uuid::now_v7();
        let mut events = vec![stored(1, AggregateKind::Course, c, course())];
        for n in 0..=MAX_STUDENTS_PER_COURSE as u64 {
            let s = Uuid::now_v7();
            let enrolled = EventPayload::StudentEnrolled(enrollment(s, c));
            events.push(stored(2 + 3 * n, AggregateKind::Student, s, student("Kid")));
            events.push(stored(
                3 + 3 * n,
                AggregateKind::Student,
                s,
                enrolled.clone(),
            ));
            events.push(stored(4 + 3 * n, AggregateKind::Course, c, enrolled));
        }
        let violations = fold(&events).violations.join("\n");
        assert!(violations.contains("has 61 students"), "{violations}");
    }

    #[test]
    fn an_accepted_command_missing_from_the_stream_or_applied_twice_is_reported() {
        let s = Uuid::now_v7();
        let mut first = stored(1, AggregateKind::Student, s, student("Ada"));
        let correlation = first.event.metadata.correlation_id;
        let mut again = stored(
            2,
            AggregateKind::Student,
            s,
            EventPayload::StudentUpdated(StudentDetails {
                name: "Ada B".into(),
                first_name: "F".into(),
                last_name: "L".into(),
            }),
        );
        again.event.metadata.correlation_id = correlation;
        first.event.metadata.causation_id = Uuid::now_v7();
        let record = |version| CommandRecord {
            correlation_id: correlation,
            kind: CommandKind::CreateStudent,
            target: Target {
                kind: AggregateKind::Student,
                id: s,
            },
            keyed: true,
            attempts: vec![503, 201],
            outcome: Outcome::Accepted {
                version,
                token: version,
            },
        };
        let violations = check_commands(&[record(9)], &[first, again]).join("\n");
        assert!(violations.contains("took effect 2 times"), "{violations}");
        assert!(violations.contains("does not hold (lost)"), "{violations}");
    }

    #[test]
    fn a_read_with_a_token_that_misses_its_write_is_stale() {
        let target = Target {
            kind: AggregateKind::Student,
            id: Uuid::now_v7(),
        };
        let read = |must_see, saw| ReadRecord {
            target,
            protocol: "rest",
            token: 7,
            must_see,
            saw,
        };
        let live = Fold::default();
        assert!(check_reads(&[read(Some(7), Ok(Some(7))), read(None, Ok(None))], &live).is_empty());
        assert_eq!(check_reads(&[read(Some(7), Ok(Some(5)))], &live).len(), 1);
        assert_eq!(check_reads(&[read(Some(7), Ok(None))], &live).len(), 1);
        assert_eq!(check_reads(&[read(None, Ok(Some(9)))], &live).len(), 1);
    }

    #[test]
    fn gone_is_right_only_when_a_deletion_followed_the_write() {
        let target = Target {
            kind: AggregateKind::Student,
            id: Uuid::now_v7(),
        };
        let read = ReadRecord {
            target,
            protocol: "grpc",
            token: 8,
            must_see: Some(7),
            saw: Ok(None),
        };
        let deleted_at = |at| {
            let mut fold = Fold::default();
            fold.deleted.insert(target);
            fold.versions.insert(target, at);
            fold
        };
        // Another client deleted it at 9, after the write at 7.
        assert!(check_reads(std::slice::from_ref(&read), &deleted_at(9)).is_empty());
        // A deletion can only be the aggregate's last event: one at or before the write's
        // version does not excuse the read.
        assert_eq!(
            check_reads(std::slice::from_ref(&read), &deleted_at(7)).len(),
            1
        );
        assert_eq!(check_reads(&[read], &Fold::default()).len(), 1);
    }
}
