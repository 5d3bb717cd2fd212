//! The pure command-side domain: input validation ("parse, don't validate"), aggregate
//! state, `decide` and `evolve`. No I/O: no tokio, NATS, HTTP or clock in here; the caller
//! passes ids and loaded state in.

pub mod course;
pub mod decide;
pub mod fields;
pub mod student;

#[cfg(test)]
mod tests;

pub use course::{CourseDraft, CourseState};
pub use decide::{AggregateId, Change, Command, Snapshot, decide};
pub use fields::{BoundedText, InvalidField};
pub use student::{StudentDraft, StudentState};
use uuid::Uuid;

/// Why a command was refused by the rules (not by bad input, not by a technical failure).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    #[error("{} {} does not exist", .0.kind.as_str(), .0.id)]
    NotFound(AggregateId),
    #[error("{} {} already exists", .0.kind.as_str(), .0.id)]
    AlreadyExists(AggregateId),
    #[error("`{field}` names {id}, which does not exist")]
    UnknownReference { field: &'static str, id: Uuid },
    #[error(
        "student {student_id} is already enrolled in {} courses, the maximum",
        fields::MAX_COURSES_PER_STUDENT
    )]
    StudentCourseLimit { student_id: Uuid },
    #[error(
        "course {course_id} already has {} students, the maximum",
        fields::MAX_STUDENTS_PER_COURSE
    )]
    CourseFull { course_id: Uuid },
    #[error("student {student_id} is not enrolled in course {course_id}")]
    NotEnrolled { student_id: Uuid, course_id: Uuid },
}
