//! The course document (one per course, with its student ids) and the pure fold of course
//! events into it, shared by every course-store adapter.

use events::EventPayload;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A course as the courses read model stores and serves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CourseDocument {
    pub id: Uuid,
    pub name: String,
    pub description: String,
    pub discipline: String,
    pub teacher: String,
    /// Sorted, without duplicates.
    pub student_ids: Vec<Uuid>,
    /// Stream sequence of the last event applied (the per-document guard and the ETag).
    pub version: u64,
}

/// Folds one event of course `id`, at stream `sequence`, into its stored document (`None`:
/// no document). An event at or below the document's version was applied before and
/// changes nothing, which makes re-delivery harmless even without a transaction.
pub fn fold(
    document: Option<CourseDocument>,
    id: Uuid,
    sequence: u64,
    event: &EventPayload,
) -> Option<CourseDocument> {
    if document.as_ref().is_some_and(|d| d.version >= sequence) {
        return document;
    }
    match (document, event) {
        (_, EventPayload::CourseCreated(details)) => Some(CourseDocument {
            id,
            name: details.name.clone(),
            description: details.description.clone(),
            discipline: details.discipline.clone(),
            teacher: details.teacher.clone(),
            student_ids: Vec::new(),
            version: sequence,
        }),
        (Some(mut doc), EventPayload::CourseUpdated(details)) => {
            doc.name = details.name.clone();
            doc.description = details.description.clone();
            doc.discipline = details.discipline.clone();
            doc.teacher = details.teacher.clone();
            doc.version = sequence;
            Some(doc)
        }
        (_, EventPayload::CourseDeleted) => None,
        (Some(mut doc), EventPayload::StudentEnrolled(e)) => {
            if let Err(at) = doc.student_ids.binary_search(&e.student_id) {
                doc.student_ids.insert(at, e.student_id);
            }
            doc.version = sequence;
            Some(doc)
        }
        (Some(mut doc), EventPayload::StudentUnenrolled(e)) => {
            doc.student_ids.retain(|s| *s != e.student_id);
            doc.version = sequence;
            Some(doc)
        }
        // Student events never land on a course subject; an update of a missing course
        // (its creation was dead-lettered) has nothing to change.
        (document, _) => document,
    }
}

#[cfg(test)]
mod tests {
    use events::{CourseDetails, Enrollment};

    use super::*;

    fn created() -> EventPayload {
        EventPayload::CourseCreated(CourseDetails {
            name: "Algebra".into(),
            description: "Rings".into(),
            discipline: "Maths".into(),
            teacher: "Noether".into(),
        })
    }

    fn enrolled(n: u128) -> EventPayload {
        EventPayload::StudentEnrolled(Enrollment {
            student_id: Uuid::from_u128(n),
            course_id: Uuid::nil(),
        })
    }

    #[test]
    fn enrollments_keep_student_ids_sorted_and_unique() {
        let id = Uuid::nil();
        let mut doc = fold(None, id, 1, &created());
        for (seq, n) in [(2, 5), (3, 2), (4, 5), (5, 9)] {
            doc = fold(doc, id, seq, &enrolled(n));
        }
        let doc = doc.expect("exists");
        assert_eq!(doc.student_ids, [2, 5, 9].map(Uuid::from_u128));
        assert_eq!(doc.version, 5);
    }

    #[test]
    fn an_event_at_or_below_the_version_changes_nothing() {
        let id = Uuid::nil();
        let doc = fold(fold(None, id, 1, &created()), id, 7, &enrolled(1));
        assert_eq!(fold(doc.clone(), id, 7, &enrolled(2)), doc);
        assert_eq!(fold(doc.clone(), id, 3, &EventPayload::CourseDeleted), doc);
        assert_eq!(fold(doc, id, 8, &EventPayload::CourseDeleted), None);
    }
}
