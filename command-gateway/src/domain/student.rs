//! The student aggregate: its state, the commands it accepts, `decide` and `evolve`.

use std::collections::BTreeSet;

use events::{EventPayload, StudentDetails};
use uuid::Uuid;

use super::DomainError;
use super::fields::{InvalidField, MAX_COURSES_PER_STUDENT, PersonName, parse_id_set};

/// A validated registration: what `POST /api/students` carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewStudent {
    pub name: PersonName,
    pub first_name: PersonName,
    pub last_name: PersonName,
    pub course_ids: BTreeSet<Uuid>,
}

impl NewStudent {
    /// Validates every field and reports every invalid one at once.
    pub fn parse(
        name: Option<&str>,
        first_name: Option<&str>,
        last_name: Option<&str>,
        course_ids: &[String],
    ) -> Result<Self, Vec<InvalidField>> {
        let mut errors = Vec::new();
        let name = PersonName::parse("name", name).map_err(|e| errors.push(e));
        let first_name = PersonName::parse("first_name", first_name).map_err(|e| errors.push(e));
        let last_name = PersonName::parse("last_name", last_name).map_err(|e| errors.push(e));
        let course_ids = parse_id_set("course_ids", course_ids, MAX_COURSES_PER_STUDENT)
            .map_err(|e| errors.extend(e));
        match (name, first_name, last_name, course_ids) {
            (Ok(name), Ok(first_name), Ok(last_name), Ok(course_ids)) if errors.is_empty() => {
                Ok(NewStudent {
                    name,
                    first_name,
                    last_name,
                    course_ids,
                })
            }
            _ => Err(errors),
        }
    }

    fn details(&self) -> StudentDetails {
        StudentDetails {
            name: self.name.as_str().to_owned(),
            first_name: self.first_name.as_str().to_owned(),
            last_name: self.last_name.as_str().to_owned(),
        }
    }
}

/// What the command side knows of one student, folded from its events.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum StudentState {
    /// No event on the student's subject.
    #[default]
    Absent,
    Active {
        details: StudentDetails,
        course_ids: BTreeSet<Uuid>,
    },
    Deleted,
}

/// Imperative: what a client asks of a student.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StudentCommand {
    Register(NewStudent),
}

/// Decides which events a command produces against the current state, or why it may not.
pub fn decide(
    state: &StudentState,
    command: &StudentCommand,
) -> Result<Vec<EventPayload>, DomainError> {
    match command {
        StudentCommand::Register(new) => match state {
            StudentState::Absent => Ok(vec![EventPayload::StudentRegistered(new.details())]),
            StudentState::Active { .. } | StudentState::Deleted => {
                Err(DomainError::StudentAlreadyExists)
            }
        },
    }
}

/// Folds one event of this student's subject into its state.
pub fn evolve(state: StudentState, event: &EventPayload) -> StudentState {
    match (state, event) {
        (_, EventPayload::StudentRegistered(details)) => StudentState::Active {
            details: details.clone(),
            course_ids: BTreeSet::new(),
        },
        (StudentState::Active { course_ids, .. }, EventPayload::StudentUpdated(details)) => {
            StudentState::Active {
                details: details.clone(),
                course_ids,
            }
        }
        (_, EventPayload::StudentDeleted) => StudentState::Deleted,
        (
            StudentState::Active {
                details,
                mut course_ids,
            },
            EventPayload::StudentEnrolled(e),
        ) => {
            course_ids.insert(e.course_id);
            StudentState::Active {
                details,
                course_ids,
            }
        }
        (
            StudentState::Active {
                details,
                mut course_ids,
            },
            EventPayload::StudentUnenrolled(e),
        ) => {
            course_ids.remove(&e.course_id);
            StudentState::Active {
                details,
                course_ids,
            }
        }
        // Course events never land on a student's subject; an event that does not fit the
        // state changes nothing rather than inventing one.
        (state, _) => state,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ada() -> NewStudent {
        NewStudent::parse(Some("Ada L"), Some("Ada"), Some("Lovelace"), &[]).expect("valid")
    }

    fn given(events: &[EventPayload]) -> StudentState {
        events.iter().fold(StudentState::Absent, evolve)
    }

    #[test]
    fn given_no_student_when_registered_then_student_registered() {
        let events = decide(&given(&[]), &StudentCommand::Register(ada())).expect("accepted");
        assert_eq!(
            events,
            vec![EventPayload::StudentRegistered(StudentDetails {
                name: "Ada L".into(),
                first_name: "Ada".into(),
                last_name: "Lovelace".into(),
            })]
        );
    }

    #[test]
    fn given_a_registered_student_when_registered_again_then_refused() {
        let registered = decide(&given(&[]), &StudentCommand::Register(ada())).expect("first");
        assert_eq!(
            decide(&given(&registered), &StudentCommand::Register(ada())),
            Err(DomainError::StudentAlreadyExists)
        );
    }

    #[test]
    fn given_a_deleted_student_when_registered_again_then_refused() {
        let mut history = decide(&given(&[]), &StudentCommand::Register(ada())).expect("first");
        history.push(EventPayload::StudentDeleted);
        assert_eq!(
            decide(&given(&history), &StudentCommand::Register(ada())),
            Err(DomainError::StudentAlreadyExists)
        );
    }

    #[test]
    fn parse_reports_every_invalid_field_at_once() {
        let errors =
            NewStudent::parse(Some("ab"), None, Some("   "), &["x".into()]).expect_err("invalid");
        let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["name", "first_name", "last_name", "course_ids[0]"]);
    }
}
