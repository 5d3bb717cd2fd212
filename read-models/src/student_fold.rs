//! The students projection as a pure fold: a batch's events are applied in memory to the
//! rows they touch, then written with a handful of set-based statements (see
//! `pg_students.rs`). The rules mirror what one SQL statement per event would do.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use events::{Event, EventPayload};
use uuid::Uuid;

/// One student as stored: its row and its enrollments (course id → enrolled at).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StudentRow {
    pub id: Uuid,
    pub name: String,
    pub first_name: String,
    pub last_name: String,
    /// Stream sequence of the last event applied to this student.
    pub version: u64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub courses: BTreeMap<Uuid, DateTime<Utc>>,
}

/// A student a batch touches: as loaded, and as the batch leaves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Touched {
    pub stored: Option<StudentRow>,
    pub current: Option<StudentRow>,
    /// The stored rows must be deleted before `current` is written (the student was
    /// deleted, or is rebuilt from scratch).
    pub replaced: bool,
}

impl Touched {
    pub fn new(stored: Option<StudentRow>) -> Self {
        Touched {
            current: stored.clone(),
            stored,
            replaced: false,
        }
    }

    /// Starts from nothing; the stored rows go (a rebuild from the full history).
    pub fn rebuilt(stored: Option<StudentRow>) -> Self {
        Touched {
            stored,
            current: None,
            replaced: true,
        }
    }

    /// Applies one event at stream position `sequence`.
    pub fn apply(&mut self, sequence: u64, event: &Event) {
        let at = event.metadata.occurred_at;
        match &event.payload {
            EventPayload::StudentRegistered(details) => {
                // A registration of a student that exists changes nothing.
                if self.current.is_none() {
                    self.current = Some(StudentRow {
                        id: event.metadata.aggregate_id,
                        name: details.name.clone(),
                        first_name: details.first_name.clone(),
                        last_name: details.last_name.clone(),
                        version: sequence,
                        created_at: at,
                        updated_at: at,
                        courses: BTreeMap::new(),
                    });
                }
            }
            EventPayload::StudentUpdated(details) => {
                if let Some(row) = &mut self.current {
                    row.name.clone_from(&details.name);
                    row.first_name.clone_from(&details.first_name);
                    row.last_name.clone_from(&details.last_name);
                    row.version = sequence;
                    row.updated_at = at;
                }
            }
            // An erasure follows the deletion; should the student still be here, it goes.
            EventPayload::StudentDeleted | EventPayload::StudentErased(_) => {
                if self.current.take().is_some() {
                    self.replaced = true;
                }
            }
            EventPayload::StudentEnrolled(enrollment) => {
                if let Some(row) = &mut self.current {
                    row.courses.entry(enrollment.course_id).or_insert(at);
                    row.version = sequence;
                    row.updated_at = at;
                }
            }
            EventPayload::StudentUnenrolled(enrollment) => {
                if let Some(row) = &mut self.current {
                    row.courses.remove(&enrollment.course_id);
                    row.version = sequence;
                    row.updated_at = at;
                }
            }
            // The students projection does not consume course subjects.
            EventPayload::CourseCreated(_)
            | EventPayload::CourseUpdated(_)
            | EventPayload::CourseDeleted => {}
        }
    }
}

/// The statements' inputs for a set of touched students.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Writes<'a> {
    /// Students whose stored rows (and enrollments) go first.
    pub deletes: Vec<Uuid>,
    /// Rows to insert or overwrite (borrowed: a batch of registrations is mostly these).
    pub upserts: Vec<&'a StudentRow>,
    /// Enrollments to add: (student, course, enrolled at).
    pub enroll: Vec<(Uuid, Uuid, DateTime<Utc>)>,
    /// Enrollments to remove: (student, course).
    pub unenroll: Vec<(Uuid, Uuid)>,
}

/// What to write so the tables hold every `current` state.
pub fn writes<'a>(touched: impl IntoIterator<Item = &'a Touched>) -> Writes<'a> {
    let mut writes = Writes::default();
    for t in touched {
        let stored = if t.replaced { None } else { t.stored.as_ref() };
        if let (true, Some(old)) = (t.replaced, &t.stored) {
            writes.deletes.push(old.id);
        }
        match &t.current {
            None => {
                if let Some(row) = stored {
                    writes.deletes.push(row.id);
                }
            }
            Some(row) => {
                if stored != Some(row) {
                    writes.upserts.push(row);
                }
                // An enrollment left and entered again within the batch has a new time:
                // it is removed and added (removals are written first).
                let before = stored.map(|s| &s.courses);
                for (course, at) in &row.courses {
                    if before.and_then(|b| b.get(course)) != Some(at) {
                        writes.enroll.push((row.id, *course, *at));
                    }
                }
                if let Some(before) = before {
                    for (course, at) in before {
                        if row.courses.get(course) != Some(at) {
                            writes.unenroll.push((row.id, *course));
                        }
                    }
                }
            }
        }
    }
    writes
}

#[cfg(test)]
mod tests {
    use super::*;
    use events::{AggregateKind, Enrollment, EventMetadata, StudentDetails};

    fn event(id: Uuid, payload: EventPayload) -> Event {
        Event {
            metadata: EventMetadata {
                event_id: Uuid::now_v7(),
                aggregate_kind: AggregateKind::Student,
                aggregate_id: id,
                occurred_at: Utc::now(),
                correlation_id: Uuid::nil(),
                causation_id: Uuid::nil(),
                trace: Default::default(),
            },
            payload,
        }
    }

    fn details(name: &str) -> StudentDetails {
        StudentDetails {
            name: name.into(),
            first_name: "First".into(),
            last_name: "Last".into(),
        }
    }

    fn enrollment(student_id: Uuid, course_id: Uuid) -> Enrollment {
        Enrollment {
            student_id,
            course_id,
        }
    }

    #[test]
    fn a_new_student_with_courses_is_one_upsert_and_its_enrollments() {
        let id = Uuid::now_v7();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let mut t = Touched::new(None);
        t.apply(
            1,
            &event(id, EventPayload::StudentRegistered(details("Ada L"))),
        );
        t.apply(
            2,
            &event(id, EventPayload::StudentEnrolled(enrollment(id, a))),
        );
        t.apply(
            3,
            &event(id, EventPayload::StudentEnrolled(enrollment(id, b))),
        );
        t.apply(
            4,
            &event(id, EventPayload::StudentUnenrolled(enrollment(id, a))),
        );
        let w = writes([&t]);
        assert!(w.deletes.is_empty());
        assert_eq!(w.upserts.len(), 1);
        assert_eq!(w.upserts[0].version, 4);
        assert_eq!(
            w.enroll.iter().map(|e| e.1).collect::<Vec<_>>(),
            vec![b],
            "a course left within the batch is never written"
        );
        assert!(w.unenroll.is_empty());
    }

    #[test]
    fn events_for_a_missing_student_change_nothing() {
        let id = Uuid::now_v7();
        let mut t = Touched::new(None);
        t.apply(
            5,
            &event(id, EventPayload::StudentUpdated(details("Ghost G"))),
        );
        t.apply(
            6,
            &event(
                id,
                EventPayload::StudentEnrolled(enrollment(id, Uuid::now_v7())),
            ),
        );
        t.apply(7, &event(id, EventPayload::StudentDeleted));
        assert_eq!(writes([&t]), Writes::default());
    }

    #[test]
    fn a_second_registration_keeps_the_first() {
        let id = Uuid::now_v7();
        let mut t = Touched::new(None);
        t.apply(
            1,
            &event(id, EventPayload::StudentRegistered(details("Ada L"))),
        );
        t.apply(
            2,
            &event(id, EventPayload::StudentRegistered(details("Other O"))),
        );
        let row = t.current.expect("registered");
        assert_eq!((row.name.as_str(), row.version), ("Ada L", 1));
    }

    #[test]
    fn a_stored_student_is_diffed_and_a_deleted_one_removed() {
        let id = Uuid::now_v7();
        let (kept, dropped, added) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let stored = StudentRow {
            id,
            name: "Ada L".into(),
            first_name: "First".into(),
            last_name: "Last".into(),
            version: 1,
            created_at: Utc::now(),
            updated_at: Utc::now(),
            courses: BTreeMap::from([(kept, Utc::now()), (dropped, Utc::now())]),
        };
        let mut t = Touched::new(Some(stored.clone()));
        t.apply(
            9,
            &event(id, EventPayload::StudentUnenrolled(enrollment(id, dropped))),
        );
        t.apply(
            10,
            &event(id, EventPayload::StudentEnrolled(enrollment(id, added))),
        );
        let w = writes([&t]);
        assert_eq!(w.upserts.len(), 1);
        assert_eq!(
            w.enroll.iter().map(|e| e.1).collect::<Vec<_>>(),
            vec![added]
        );
        assert_eq!(w.unenroll, vec![(id, dropped)]);

        let mut gone = Touched::new(Some(stored));
        gone.apply(11, &event(id, EventPayload::StudentDeleted));
        let w = writes([&gone]);
        assert_eq!(w.deletes, vec![id]);
        assert!(w.upserts.is_empty() && w.enroll.is_empty() && w.unenroll.is_empty());
    }

    #[test]
    fn leaving_and_entering_a_course_again_rewrites_the_enrollment() {
        let id = Uuid::now_v7();
        let course = Uuid::now_v7();
        let first = Utc::now() - chrono::Duration::hours(1);
        let stored = StudentRow {
            id,
            name: "Ada L".into(),
            first_name: "First".into(),
            last_name: "Last".into(),
            version: 1,
            created_at: first,
            updated_at: first,
            courses: BTreeMap::from([(course, first)]),
        };
        let mut t = Touched::new(Some(stored));
        t.apply(
            2,
            &event(id, EventPayload::StudentUnenrolled(enrollment(id, course))),
        );
        let again = event(id, EventPayload::StudentEnrolled(enrollment(id, course)));
        t.apply(3, &again);
        let w = writes([&t]);
        assert_eq!(w.unenroll, vec![(id, course)]);
        assert_eq!(w.enroll, vec![(id, course, again.metadata.occurred_at)]);
    }

    #[test]
    fn an_unchanged_student_writes_nothing() {
        let id = Uuid::now_v7();
        let mut t = Touched::new(None);
        t.apply(
            1,
            &event(id, EventPayload::StudentRegistered(details("Ada L"))),
        );
        let stored = t.current.clone();
        let mut again = Touched::new(stored);
        again.apply(1, &event(id, EventPayload::CourseDeleted));
        assert_eq!(writes([&again]), Writes::default());
    }
}
