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

/// What a store without transactions keeps per course id: the document, or the tombstone
/// of a deleted course. A tombstone's version (the deletion's stream sequence) guards it
/// like a document's, so no write of an older event (a redelivery after a lost checkpoint,
/// a fenced replica's late batch) can bring the course back. Readers skip tombstones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CourseRecord {
    Document(CourseDocument),
    Tombstone { id: Uuid, version: u64 },
}

impl CourseRecord {
    pub fn id(&self) -> Uuid {
        match self {
            CourseRecord::Document(doc) => doc.id,
            CourseRecord::Tombstone { id, .. } => *id,
        }
    }

    /// Stream sequence of the last event applied to the record.
    pub fn version(&self) -> u64 {
        match self {
            CourseRecord::Document(doc) => doc.version,
            CourseRecord::Tombstone { version, .. } => *version,
        }
    }

    /// The course as readers see it (`None` for a tombstone).
    pub fn into_document(self) -> Option<CourseDocument> {
        match self {
            CourseRecord::Document(doc) => Some(doc),
            CourseRecord::Tombstone { .. } => None,
        }
    }
}

/// [`fold`] over stored records: the same documents, but a deletion leaves a tombstone at
/// its sequence instead of nothing, and an event at or below a record's version (document
/// or tombstone) changes nothing. A tombstone behaves as no document for later events (a
/// course created again after its deletion gets a document again).
pub fn fold_record(
    record: Option<CourseRecord>,
    id: Uuid,
    sequence: u64,
    event: &EventPayload,
) -> Option<CourseRecord> {
    if record.as_ref().is_some_and(|r| r.version() >= sequence) {
        return record;
    }
    let document = record.clone().and_then(CourseRecord::into_document);
    match fold(document, id, sequence, event) {
        Some(doc) => Some(CourseRecord::Document(doc)),
        None if matches!(event, EventPayload::CourseDeleted) => Some(CourseRecord::Tombstone {
            id,
            version: sequence,
        }),
        // Nothing to change on a missing course (an update whose creation was
        // dead-lettered): the record stays as it was.
        None => record,
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

    fn updated(name: &str) -> EventPayload {
        EventPayload::CourseUpdated(CourseDetails {
            name: name.into(),
            description: "Fields".into(),
            discipline: "Maths".into(),
            teacher: "Artin".into(),
        })
    }

    /// One of every course event (two students, so enrolments differ).
    fn every_event() -> Vec<EventPayload> {
        vec![
            created(),
            updated("Galois"),
            EventPayload::CourseDeleted,
            enrolled(1),
            enrolled(2),
            EventPayload::StudentUnenrolled(Enrollment {
                student_id: Uuid::from_u128(1),
                course_id: Uuid::nil(),
            }),
        ]
    }

    /// Every sequence of `len` events drawn from [`every_event`].
    fn histories(len: u32) -> Vec<Vec<EventPayload>> {
        let events = every_event();
        let n = events.len();
        (0..n.pow(len))
            .map(|mut code| {
                (0..len)
                    .map(|_| {
                        let event = events[code % n].clone();
                        code /= n;
                        event
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn a_deletion_leaves_a_tombstone_at_its_sequence() {
        let id = Uuid::nil();
        let doc = fold_record(None, id, 1, &created());
        assert_eq!(
            fold_record(doc, id, 4, &EventPayload::CourseDeleted),
            Some(CourseRecord::Tombstone { id, version: 4 })
        );
        // Also for a course whose creation never arrived (dead-lettered).
        assert_eq!(
            fold_record(None, id, 2, &EventPayload::CourseDeleted),
            Some(CourseRecord::Tombstone { id, version: 2 })
        );
    }

    #[test]
    fn a_tombstone_never_goes_back_to_a_document_for_an_event_at_or_below_its_version() {
        let id = Uuid::nil();
        let tombstone = Some(CourseRecord::Tombstone { id, version: 12 });
        for event in every_event() {
            for sequence in [1, 11, 12] {
                assert_eq!(
                    fold_record(tombstone.clone(), id, sequence, &event),
                    tombstone,
                    "{event:?} at {sequence}"
                );
            }
        }
    }

    #[test]
    fn a_tombstone_is_no_document_for_later_events() {
        let id = Uuid::nil();
        let tombstone = Some(CourseRecord::Tombstone { id, version: 12 });
        assert_eq!(
            fold_record(tombstone.clone(), id, 13, &updated("x")),
            tombstone,
            "nothing to update"
        );
        assert_eq!(
            fold_record(tombstone.clone(), id, 13, &enrolled(1)),
            tombstone
        );
        assert_eq!(
            fold_record(tombstone, id, 13, &created()),
            fold(None, id, 13, &created()).map(CourseRecord::Document),
            "created again"
        );
    }

    #[test]
    fn records_fold_to_the_documents_fold_gives() {
        let id = Uuid::nil();
        for len in 1..=4 {
            for history in histories(len) {
                let (mut document, mut record) = (None, None);
                for (sequence, event) in (1..).zip(&history) {
                    document = fold(document, id, sequence, event);
                    record = fold_record(record, id, sequence, event);
                }
                assert_eq!(
                    record.clone().and_then(CourseRecord::into_document),
                    document,
                    "{history:?}"
                );
                if let Some(record) = &record {
                    assert_eq!(record.id(), id);
                }
            }
        }
    }

    /// What makes tombstones necessary: after the whole history, any of its events again
    /// (a redelivery, a fenced replica's late batch) leaves the record as it is, deletions
    /// included, where [`fold`] on no document would create the course again.
    #[test]
    fn redelivering_any_earlier_event_changes_no_record() {
        let id = Uuid::nil();
        for history in histories(4) {
            let mut record = None;
            for (sequence, event) in (1..).zip(&history) {
                record = fold_record(record, id, sequence, event);
            }
            for (sequence, event) in (1..).zip(&history) {
                assert_eq!(
                    fold_record(record.clone(), id, sequence, event),
                    record,
                    "{history:?}, again {sequence}"
                );
            }
        }
        let deleted = fold(
            fold(None, id, 1, &created()),
            id,
            2,
            &EventPayload::CourseDeleted,
        );
        assert!(
            fold(deleted, id, 1, &created()).is_some(),
            "documents alone resurrect"
        );
    }
}
