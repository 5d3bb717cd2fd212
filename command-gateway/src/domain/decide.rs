//! Commands and the one `decide` function: given the states a command reads, which events
//! it produces on which aggregates, or which rule it would break.

use std::collections::BTreeMap;

use events::{AggregateKind, Enrollment, EventPayload};
use uuid::Uuid;

use super::DomainError;
use super::course::{self, CourseDraft, CourseState};
use super::fields::{MAX_COURSES_PER_STUDENT, MAX_STUDENTS_PER_COURSE};
use super::student::{self, StudentDraft, StudentState};

/// One aggregate instance: the unit of consistency, one subject on the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AggregateId {
    pub kind: AggregateKind,
    pub id: Uuid,
}

impl AggregateId {
    pub fn student(id: Uuid) -> Self {
        AggregateId {
            kind: AggregateKind::Student,
            id,
        }
    }

    pub fn course(id: Uuid) -> Self {
        AggregateId {
            kind: AggregateKind::Course,
            id,
        }
    }
}

/// Imperative: what a client asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    RegisterStudent {
        student_id: Uuid,
        draft: StudentDraft,
    },
    ReplaceStudent {
        student_id: Uuid,
        draft: StudentDraft,
    },
    DeleteStudent {
        student_id: Uuid,
    },
    /// Deletes the student as `DeleteStudent` does (if it is not deleted yet) and records
    /// that its personal data is erased; the gateway then destroys its data key.
    EraseStudent {
        student_id: Uuid,
    },
    CreateCourse {
        course_id: Uuid,
        draft: CourseDraft,
    },
    ReplaceCourse {
        course_id: Uuid,
        draft: CourseDraft,
    },
    DeleteCourse {
        course_id: Uuid,
    },
    Enroll {
        student_id: Uuid,
        course_id: Uuid,
    },
    Unenroll {
        student_id: Uuid,
        course_id: Uuid,
    },
}

impl Command {
    /// A short name, for metrics and logs.
    /// Every value of [`Command::name`], so metrics can show each command at zero.
    pub const NAMES: [&'static str; 9] = [
        "register_student",
        "replace_student",
        "delete_student",
        "erase_student",
        "create_course",
        "replace_course",
        "delete_course",
        "enroll",
        "unenroll",
    ];

    pub fn name(&self) -> &'static str {
        match self {
            Command::RegisterStudent { .. } => "register_student",
            Command::ReplaceStudent { .. } => "replace_student",
            Command::DeleteStudent { .. } => "delete_student",
            Command::EraseStudent { .. } => "erase_student",
            Command::CreateCourse { .. } => "create_course",
            Command::ReplaceCourse { .. } => "replace_course",
            Command::DeleteCourse { .. } => "delete_course",
            Command::Enroll { .. } => "enroll",
            Command::Unenroll { .. } => "unenroll",
        }
    }

    /// The aggregate the command is addressed to (the one in the URL).
    pub fn target(&self) -> AggregateId {
        match self {
            Command::RegisterStudent { student_id, .. }
            | Command::ReplaceStudent { student_id, .. }
            | Command::DeleteStudent { student_id }
            | Command::EraseStudent { student_id }
            | Command::Enroll { student_id, .. }
            | Command::Unenroll { student_id, .. } => AggregateId::student(*student_id),
            Command::CreateCourse { course_id, .. }
            | Command::ReplaceCourse { course_id, .. }
            | Command::DeleteCourse { course_id } => AggregateId::course(*course_id),
        }
    }

    /// Every other aggregate the decision reads, given the target's current state (a delete
    /// must touch the courses the student is in now).
    pub fn related(&self, snapshot: &Snapshot) -> Vec<AggregateId> {
        let mut related: Vec<AggregateId> = match self {
            Command::RegisterStudent { draft, .. } => draft
                .course_ids
                .iter()
                .copied()
                .map(AggregateId::course)
                .collect(),
            Command::ReplaceStudent { student_id, draft } => {
                let current = snapshot.student_course_ids(*student_id);
                draft
                    .course_ids
                    .iter()
                    .chain(current.iter())
                    .copied()
                    .map(AggregateId::course)
                    .collect()
            }
            Command::DeleteStudent { student_id } | Command::EraseStudent { student_id } => {
                snapshot
                    .student_course_ids(*student_id)
                    .into_iter()
                    .map(AggregateId::course)
                    .collect()
            }
            Command::CreateCourse { draft, .. } => draft
                .student_ids
                .iter()
                .copied()
                .map(AggregateId::student)
                .collect(),
            Command::ReplaceCourse { course_id, draft } => {
                let current = snapshot.course_student_ids(*course_id);
                draft
                    .student_ids
                    .iter()
                    .chain(current.iter())
                    .copied()
                    .map(AggregateId::student)
                    .collect()
            }
            Command::DeleteCourse { course_id } => snapshot
                .course_student_ids(*course_id)
                .into_iter()
                .map(AggregateId::student)
                .collect(),
            Command::Enroll { course_id, .. } | Command::Unenroll { course_id, .. } => {
                vec![AggregateId::course(*course_id)]
            }
        };
        related.sort();
        related.dedup();
        related
    }
}

/// The states a decision reads. Aggregates not loaded count as absent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub students: BTreeMap<Uuid, StudentState>,
    pub courses: BTreeMap<Uuid, CourseState>,
}

static ABSENT_STUDENT: StudentState = StudentState::Absent;
static ABSENT_COURSE: CourseState = CourseState::Absent;

impl Snapshot {
    pub fn student(&self, id: Uuid) -> &StudentState {
        self.students.get(&id).unwrap_or(&ABSENT_STUDENT)
    }

    pub fn course(&self, id: Uuid) -> &CourseState {
        self.courses.get(&id).unwrap_or(&ABSENT_COURSE)
    }

    /// The aggregates `id` is related to: a student's courses, a course's students.
    pub fn relations(&self, id: AggregateId) -> Vec<AggregateId> {
        match id.kind {
            AggregateKind::Student => self
                .student_course_ids(id.id)
                .into_iter()
                .map(AggregateId::course)
                .collect(),
            AggregateKind::Course => self
                .course_student_ids(id.id)
                .into_iter()
                .map(AggregateId::student)
                .collect(),
        }
    }

    fn student_course_ids(&self, id: Uuid) -> Vec<Uuid> {
        self.student(id)
            .active()
            .map(|s| s.course_ids.iter().copied().collect())
            .unwrap_or_default()
    }

    fn course_student_ids(&self, id: Uuid) -> Vec<Uuid> {
        self.course(id)
            .active()
            .map(|c| c.student_ids.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Folds decided changes in, as the stream will once they are appended.
    pub fn apply(&mut self, changes: &[Change]) {
        for change in changes {
            let id = change.aggregate.id;
            match change.aggregate.kind {
                AggregateKind::Student => {
                    let state = self.students.remove(&id).unwrap_or_default();
                    self.students
                        .insert(id, student::evolve(state, &change.payload));
                }
                AggregateKind::Course => {
                    let state = self.courses.remove(&id).unwrap_or_default();
                    self.courses
                        .insert(id, course::evolve(state, &change.payload));
                }
            }
        }
    }
}

/// One event for one aggregate's subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub aggregate: AggregateId,
    pub payload: EventPayload,
}

/// Both sides of one enrollment change: the same event on the student and on the course.
fn both_sides(changes: &mut Vec<Change>, enrollment: Enrollment, enrolled: bool) {
    let payload = if enrolled {
        EventPayload::StudentEnrolled(enrollment)
    } else {
        EventPayload::StudentUnenrolled(enrollment)
    };
    changes.push(Change {
        aggregate: AggregateId::student(enrollment.student_id),
        payload: payload.clone(),
    });
    changes.push(Change {
        aggregate: AggregateId::course(enrollment.course_id),
        payload,
    });
}

/// The student's deletion: the student's event, and the courses forgetting it, in the same
/// atomic append.
fn delete_student(changes: &mut Vec<Change>, student_id: Uuid, student: &student::ActiveStudent) {
    changes.push(Change {
        aggregate: AggregateId::student(student_id),
        payload: EventPayload::StudentDeleted,
    });
    for &course_id in &student.course_ids {
        changes.push(Change {
            aggregate: AggregateId::course(course_id),
            payload: EventPayload::StudentUnenrolled(Enrollment {
                student_id,
                course_id,
            }),
        });
    }
}

/// Decides the events a command produces against the states it reads, or why it may not.
/// An empty list means the command changes nothing (it asks for what already is).
pub fn decide(command: &Command, snapshot: &Snapshot) -> Result<Vec<Change>, DomainError> {
    let target = command.target();
    let mut changes = Vec::new();
    match command {
        Command::RegisterStudent { student_id, draft } => {
            if snapshot.student(*student_id) != &StudentState::Absent {
                return Err(DomainError::AlreadyExists(target));
            }
            changes.push(Change {
                aggregate: target,
                payload: EventPayload::StudentRegistered(draft.details()),
            });
            for &course_id in &draft.course_ids {
                enroll_from_student(snapshot, &mut changes, *student_id, course_id)?;
            }
        }
        Command::ReplaceStudent { student_id, draft } => {
            let student = snapshot
                .student(*student_id)
                .active()
                .ok_or(DomainError::NotFound(target))?;
            let details = draft.details();
            if details != student.details {
                changes.push(Change {
                    aggregate: target,
                    payload: EventPayload::StudentUpdated(details),
                });
            }
            for &course_id in student.course_ids.difference(&draft.course_ids) {
                let enrollment = Enrollment {
                    student_id: *student_id,
                    course_id,
                };
                both_sides(&mut changes, enrollment, false);
            }
            for &course_id in draft.course_ids.difference(&student.course_ids) {
                enroll_from_student(snapshot, &mut changes, *student_id, course_id)?;
            }
        }
        Command::DeleteStudent { student_id } => {
            let student = snapshot
                .student(*student_id)
                .active()
                .ok_or(DomainError::NotFound(target))?;
            delete_student(&mut changes, *student_id, student);
        }
        Command::EraseStudent { student_id } => {
            match snapshot.student(*student_id) {
                StudentState::Absent => return Err(DomainError::NotFound(target)),
                // Erased already: nothing more to record (the key is destroyed again, which
                // changes nothing either).
                StudentState::Erased => return Ok(changes),
                StudentState::Active(student) => {
                    delete_student(&mut changes, *student_id, student);
                }
                StudentState::Deleted => {}
            }
            // Which key the erasure destroys is the event store's to fill in: the domain
            // knows no keys.
            changes.push(Change {
                aggregate: target,
                payload: EventPayload::StudentErased(Default::default()),
            });
        }
        Command::CreateCourse { course_id, draft } => {
            if snapshot.course(*course_id) != &CourseState::Absent {
                return Err(DomainError::AlreadyExists(target));
            }
            changes.push(Change {
                aggregate: target,
                payload: EventPayload::CourseCreated(draft.details()),
            });
            for &student_id in &draft.student_ids {
                enroll_from_course(snapshot, &mut changes, student_id, *course_id)?;
            }
        }
        Command::ReplaceCourse { course_id, draft } => {
            let course = snapshot
                .course(*course_id)
                .active()
                .ok_or(DomainError::NotFound(target))?;
            let details = draft.details();
            if details != course.details {
                changes.push(Change {
                    aggregate: target,
                    payload: EventPayload::CourseUpdated(details),
                });
            }
            for &student_id in course.student_ids.difference(&draft.student_ids) {
                let enrollment = Enrollment {
                    student_id,
                    course_id: *course_id,
                };
                both_sides(&mut changes, enrollment, false);
            }
            for &student_id in draft.student_ids.difference(&course.student_ids) {
                enroll_from_course(snapshot, &mut changes, student_id, *course_id)?;
            }
        }
        Command::DeleteCourse { course_id } => {
            let course = snapshot
                .course(*course_id)
                .active()
                .ok_or(DomainError::NotFound(target))?;
            changes.push(Change {
                aggregate: target,
                payload: EventPayload::CourseDeleted,
            });
            for &student_id in &course.student_ids {
                changes.push(Change {
                    aggregate: AggregateId::student(student_id),
                    payload: EventPayload::StudentUnenrolled(Enrollment {
                        student_id,
                        course_id: *course_id,
                    }),
                });
            }
        }
        Command::Enroll {
            student_id,
            course_id,
        } => {
            let student = snapshot
                .student(*student_id)
                .active()
                .ok_or(DomainError::NotFound(target))?;
            let course = snapshot
                .course(*course_id)
                .active()
                .ok_or(DomainError::NotFound(AggregateId::course(*course_id)))?;
            if student.course_ids.contains(course_id) {
                return Ok(changes);
            }
            if student.course_ids.len() >= MAX_COURSES_PER_STUDENT {
                return Err(DomainError::StudentCourseLimit {
                    student_id: *student_id,
                });
            }
            if course.student_ids.len() >= MAX_STUDENTS_PER_COURSE {
                return Err(DomainError::CourseFull {
                    course_id: *course_id,
                });
            }
            let enrollment = Enrollment {
                student_id: *student_id,
                course_id: *course_id,
            };
            both_sides(&mut changes, enrollment, true);
        }
        Command::Unenroll {
            student_id,
            course_id,
        } => {
            let student = snapshot
                .student(*student_id)
                .active()
                .ok_or(DomainError::NotFound(target))?;
            if !student.course_ids.contains(course_id) {
                return Err(DomainError::NotEnrolled {
                    student_id: *student_id,
                    course_id: *course_id,
                });
            }
            let enrollment = Enrollment {
                student_id: *student_id,
                course_id: *course_id,
            };
            both_sides(&mut changes, enrollment, false);
        }
    }
    Ok(changes)
}

/// Enrolls `student_id` (being registered or replaced, so its own limit is already checked
/// by validation) into a course named in its body.
fn enroll_from_student(
    snapshot: &Snapshot,
    changes: &mut Vec<Change>,
    student_id: Uuid,
    course_id: Uuid,
) -> Result<(), DomainError> {
    let course = snapshot
        .course(course_id)
        .active()
        .ok_or(DomainError::UnknownReference {
            field: "course_ids",
            id: course_id,
        })?;
    if course.student_ids.len() >= MAX_STUDENTS_PER_COURSE {
        return Err(DomainError::CourseFull { course_id });
    }
    both_sides(
        changes,
        Enrollment {
            student_id,
            course_id,
        },
        true,
    );
    Ok(())
}

/// Enrolls a student named in a course's body into that course (whose own limit is already
/// checked by validation).
fn enroll_from_course(
    snapshot: &Snapshot,
    changes: &mut Vec<Change>,
    student_id: Uuid,
    course_id: Uuid,
) -> Result<(), DomainError> {
    let student = snapshot
        .student(student_id)
        .active()
        .ok_or(DomainError::UnknownReference {
            field: "student_ids",
            id: student_id,
        })?;
    if student.course_ids.len() >= MAX_COURSES_PER_STUDENT {
        return Err(DomainError::StudentCourseLimit { student_id });
    }
    both_sides(
        changes,
        Enrollment {
            student_id,
            course_id,
        },
        true,
    );
    Ok(())
}
