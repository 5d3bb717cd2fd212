//! The student aggregate: the validated input of its commands, its state, `evolve`.

use std::collections::BTreeSet;

use events::{EventPayload, StudentDetails};
use uuid::Uuid;

use super::fields::{BoundedText, InvalidField, MAX_COURSES_PER_STUDENT, parse_id_set};

/// A validated student body, as `POST` and `PUT /api/students` carry it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StudentDraft {
    pub name: BoundedText,
    pub first_name: BoundedText,
    pub last_name: BoundedText,
    pub course_ids: BTreeSet<Uuid>,
}

impl StudentDraft {
    /// Validates every field and reports every invalid one at once.
    pub fn parse(
        name: Option<&str>,
        first_name: Option<&str>,
        last_name: Option<&str>,
        course_ids: &[String],
    ) -> Result<Self, Vec<InvalidField>> {
        let mut errors = Vec::new();
        let name = BoundedText::parse("name", name).map_err(|e| errors.push(e));
        let first_name = BoundedText::parse("first_name", first_name).map_err(|e| errors.push(e));
        let last_name = BoundedText::parse("last_name", last_name).map_err(|e| errors.push(e));
        let course_ids = parse_id_set("course_ids", course_ids, MAX_COURSES_PER_STUDENT)
            .map_err(|e| errors.extend(e));
        match (name, first_name, last_name, course_ids) {
            (Ok(name), Ok(first_name), Ok(last_name), Ok(course_ids)) if errors.is_empty() => {
                Ok(StudentDraft {
                    name,
                    first_name,
                    last_name,
                    course_ids,
                })
            }
            _ => Err(errors),
        }
    }

    pub fn details(&self) -> StudentDetails {
        StudentDetails {
            name: self.name.as_str().to_owned(),
            first_name: self.first_name.as_str().to_owned(),
            last_name: self.last_name.as_str().to_owned(),
        }
    }
}

/// What the command side knows of one student, folded from the events on its subject.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum StudentState {
    /// No event on the student's subject.
    #[default]
    Absent,
    Active(ActiveStudent),
    Deleted,
    /// Deleted, and its personal data erased (its data key destroyed).
    Erased,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveStudent {
    pub details: StudentDetails,
    pub course_ids: BTreeSet<Uuid>,
}

impl StudentState {
    pub fn active(&self) -> Option<&ActiveStudent> {
        match self {
            StudentState::Active(student) => Some(student),
            StudentState::Absent | StudentState::Deleted | StudentState::Erased => None,
        }
    }
}

/// Folds one event of the student's subject into its state.
pub fn evolve(state: StudentState, event: &EventPayload) -> StudentState {
    match (state, event) {
        (_, EventPayload::StudentRegistered(details)) => StudentState::Active(ActiveStudent {
            details: details.clone(),
            course_ids: BTreeSet::new(),
        }),
        (StudentState::Active(mut student), EventPayload::StudentUpdated(details)) => {
            student.details = details.clone();
            StudentState::Active(student)
        }
        (_, EventPayload::StudentDeleted) => StudentState::Deleted,
        // An erasure follows the deletion (in the same append, or a later one).
        (_, EventPayload::StudentErased(_)) => StudentState::Erased,
        (StudentState::Active(mut student), EventPayload::StudentEnrolled(e)) => {
            student.course_ids.insert(e.course_id);
            StudentState::Active(student)
        }
        (StudentState::Active(mut student), EventPayload::StudentUnenrolled(e)) => {
            student.course_ids.remove(&e.course_id);
            StudentState::Active(student)
        }
        // Course events never land on a student's subject; an event that does not fit the
        // state changes nothing rather than inventing one.
        (state, _) => state,
    }
}
