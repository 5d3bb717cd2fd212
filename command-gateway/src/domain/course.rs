//! The course aggregate: the validated input of its commands, its state, `evolve`.

use std::collections::BTreeSet;

use events::{CourseDetails, EventPayload};
use uuid::Uuid;

use super::fields::{
    BoundedText, DESCRIPTION_MAX, InvalidField, MAX_STUDENTS_PER_COURSE, parse_id_set,
};

/// A validated course body, as `POST` and `PUT /api/courses` carry it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CourseDraft {
    pub name: BoundedText,
    pub description: BoundedText,
    pub discipline: BoundedText,
    pub teacher: BoundedText,
    pub student_ids: BTreeSet<Uuid>,
}

impl CourseDraft {
    /// Validates every field and reports every invalid one at once.
    pub fn parse(
        name: Option<&str>,
        description: Option<&str>,
        discipline: Option<&str>,
        teacher: Option<&str>,
        student_ids: &[String],
    ) -> Result<Self, Vec<InvalidField>> {
        let mut errors = Vec::new();
        let name = BoundedText::parse("name", name).map_err(|e| errors.push(e));
        let description = BoundedText::parse_up_to("description", description, DESCRIPTION_MAX)
            .map_err(|e| errors.push(e));
        let discipline = BoundedText::parse("discipline", discipline).map_err(|e| errors.push(e));
        let teacher = BoundedText::parse("teacher", teacher).map_err(|e| errors.push(e));
        let student_ids = parse_id_set("student_ids", student_ids, MAX_STUDENTS_PER_COURSE)
            .map_err(|e| errors.extend(e));
        match (name, description, discipline, teacher, student_ids) {
            (Ok(name), Ok(description), Ok(discipline), Ok(teacher), Ok(student_ids))
                if errors.is_empty() =>
            {
                Ok(CourseDraft {
                    name,
                    description,
                    discipline,
                    teacher,
                    student_ids,
                })
            }
            _ => Err(errors),
        }
    }

    pub fn details(&self) -> CourseDetails {
        CourseDetails {
            name: self.name.as_str().to_owned(),
            description: self.description.as_str().to_owned(),
            discipline: self.discipline.as_str().to_owned(),
            teacher: self.teacher.as_str().to_owned(),
        }
    }
}

/// What the command side knows of one course, folded from the events on its subject.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum CourseState {
    #[default]
    Absent,
    Active(ActiveCourse),
    Deleted,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveCourse {
    pub details: CourseDetails,
    pub student_ids: BTreeSet<Uuid>,
}

impl CourseState {
    pub fn active(&self) -> Option<&ActiveCourse> {
        match self {
            CourseState::Active(course) => Some(course),
            CourseState::Absent | CourseState::Deleted => None,
        }
    }
}

/// Folds one event of the course's subject into its state.
pub fn evolve(state: CourseState, event: &EventPayload) -> CourseState {
    match (state, event) {
        (_, EventPayload::CourseCreated(details)) => CourseState::Active(ActiveCourse {
            details: details.clone(),
            student_ids: BTreeSet::new(),
        }),
        (CourseState::Active(mut course), EventPayload::CourseUpdated(details)) => {
            course.details = details.clone();
            CourseState::Active(course)
        }
        (_, EventPayload::CourseDeleted) => CourseState::Deleted,
        (CourseState::Active(mut course), EventPayload::StudentEnrolled(e)) => {
            course.student_ids.insert(e.student_id);
            CourseState::Active(course)
        }
        (CourseState::Active(mut course), EventPayload::StudentUnenrolled(e)) => {
            course.student_ids.remove(&e.student_id);
            CourseState::Active(course)
        }
        (state, _) => state,
    }
}
