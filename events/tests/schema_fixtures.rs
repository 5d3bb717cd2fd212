//! Decodes event bytes written by earlier builds, one committed fixture per event type and
//! schema version. A schema change that would break replay of stored events fails here.
//!
//! Fixtures are written once, when a schema version is introduced:
//! `WRITE_EVENT_FIXTURES=1 cargo test -p events --test schema_fixtures`, then committed and
//! never rewritten (a new version gets a new folder).

use std::path::PathBuf;

use chrono::{DateTime, Utc};
use events::personal::{DataKey, DataKeyRef, KEY_LEN};
use events::{
    AggregateKind, CourseDetails, Decoded, Enrollment, Event, EventMetadata, EventPayload,
    StudentDetails, TraceContext, decode, decode_sealed, encode, encode_sealed,
};
use uuid::Uuid;

fn uuid(text: &str) -> Uuid {
    Uuid::parse_str(text).expect("fixture uuid")
}

/// The events the v1 fixtures hold, with fixed ids and times.
fn expected_v1_events() -> Vec<(&'static str, Event)> {
    let student = uuid("0193a1c2-0000-7000-8000-000000000001");
    let course = uuid("0193a1c2-0000-7000-8000-000000000002");
    let occurred_at: DateTime<Utc> = "2026-11-25T08:00:00.123456789Z".parse().expect("time");
    let metadata = |n: u128, kind, aggregate_id| EventMetadata {
        event_id: Uuid::from_u128(0x0193a1c2_0000_7000_8000_0000000000a0 + n),
        aggregate_kind: kind,
        aggregate_id,
        occurred_at,
        correlation_id: uuid("0193a1c2-0000-7000-8000-0000000000c0"),
        causation_id: uuid("0193a1c2-0000-7000-8000-0000000000c1"),
        trace: TraceContext {
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
            tracestate: "school=1".into(),
        },
    };
    let student_details = StudentDetails {
        name: "Ada L".into(),
        first_name: "Ada".into(),
        last_name: "Lovelace".into(),
    };
    let course_details = CourseDetails {
        name: "Analytical Engines".into(),
        description: "Notes on the engine, with non-ASCII: é, ü, 数学".into(),
        discipline: "Mathematics".into(),
        teacher: "Babbage".into(),
    };
    let enrollment = Enrollment {
        student_id: student,
        course_id: course,
    };
    use AggregateKind::{Course, Student};
    vec![
        (
            "student_registered",
            Event {
                metadata: metadata(1, Student, student),
                payload: EventPayload::StudentRegistered(student_details.clone()),
            },
        ),
        (
            "student_updated",
            Event {
                metadata: metadata(2, Student, student),
                payload: EventPayload::StudentUpdated(student_details),
            },
        ),
        (
            "student_deleted",
            Event {
                metadata: metadata(3, Student, student),
                payload: EventPayload::StudentDeleted,
            },
        ),
        (
            "course_created",
            Event {
                metadata: metadata(4, Course, course),
                payload: EventPayload::CourseCreated(course_details.clone()),
            },
        ),
        (
            "course_updated",
            Event {
                metadata: metadata(5, Course, course),
                payload: EventPayload::CourseUpdated(course_details),
            },
        ),
        (
            "course_deleted",
            Event {
                metadata: metadata(6, Course, course),
                payload: EventPayload::CourseDeleted,
            },
        ),
        (
            "student_enrolled",
            Event {
                metadata: metadata(7, Student, student),
                payload: EventPayload::StudentEnrolled(enrollment),
            },
        ),
        (
            "student_unenrolled",
            Event {
                metadata: metadata(8, Course, course),
                payload: EventPayload::StudentUnenrolled(enrollment),
            },
        ),
    ]
}

fn fixture_path(version: &str, name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(version)
        .join(format!("{name}.bin"))
}

#[test]
fn every_v1_fixture_decodes_to_the_event_that_was_written() {
    let writing = std::env::var_os("WRITE_EVENT_FIXTURES").is_some();
    for (name, expected) in expected_v1_events() {
        let path = fixture_path("v1", name);
        if writing && !path.exists() {
            std::fs::write(&path, encode(&expected)).expect("write fixture");
        }
        let bytes = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("fixture {} is missing: {e}", path.display()));
        let decoded = decode(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(decoded, expected, "fixture {name} decoded differently");
    }
}

#[test]
fn there_is_a_v1_fixture_for_every_event_type() {
    let names: Vec<_> = expected_v1_events()
        .into_iter()
        .map(|(_, event)| event.payload.event_type())
        .collect();
    for event_type in [
        "StudentRegistered",
        "StudentUpdated",
        "StudentDeleted",
        "CourseCreated",
        "CourseUpdated",
        "CourseDeleted",
        "StudentEnrolled",
        "StudentUnenrolled",
    ] {
        assert!(names.contains(&event_type), "no fixture for {event_type}");
    }
}

/// Where the v2 fixtures say their student's data key is kept.
fn v2_key_ref() -> DataKeyRef {
    DataKeyRef {
        block: uuid("0193a1c2-0000-7000-8000-0000000000d0"),
        slot: 3,
    }
}

/// The data key of the v2 fixtures' student, committed next to them (hex, 32 bytes).
fn v2_student_key() -> DataKey {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v2/student-data-key.hex");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{} is missing: {e}", path.display()));
    let digits = text.trim().as_bytes();
    assert_eq!(
        digits.len(),
        2 * KEY_LEN,
        "{}: not 64 hex digits",
        path.display()
    );
    let mut key = [0u8; KEY_LEN];
    for (byte, pair) in key.iter_mut().zip(digits.chunks_exact(2)) {
        let pair = std::str::from_utf8(pair).expect("ascii");
        *byte = u8::from_str_radix(pair, 16).expect("hex digit");
    }
    DataKey::from_bytes(key)
}

/// Version 2 changed the student events only: the registration and the update seal their
/// personal fields, and the erasure is new. Same ids and times as v1 (new event ids).
fn expected_v2_events() -> Vec<(&'static str, Event)> {
    let v1 = expected_v1_events();
    let pick = |name: &str| {
        v1.iter()
            .find(|(n, _)| *n == name)
            .map(|(_, e)| e.clone())
            .expect("a v1 event")
    };
    let renumbered = |mut event: Event, n: u128| {
        event.metadata.event_id = Uuid::from_u128(0x0193a1c2_0000_7000_8000_0000000000b0 + n);
        event
    };
    let mut erased = pick("student_deleted");
    erased.payload = EventPayload::StudentErased(events::Erasure {
        key: Some(v2_key_ref()),
    });
    vec![
        (
            "student_registered",
            renumbered(pick("student_registered"), 1),
        ),
        ("student_updated", renumbered(pick("student_updated"), 2)),
        ("student_erased", renumbered(erased, 3)),
    ]
}

#[test]
fn every_v2_fixture_opens_with_its_students_key_and_reads_as_erased_without_it() {
    let writing = std::env::var_os("WRITE_EVENT_FIXTURES").is_some();
    let key = v2_student_key();
    for (name, expected) in expected_v2_events() {
        let path = fixture_path("v2", name);
        if writing && !path.exists() {
            std::fs::write(&path, encode_sealed(&expected, v2_key_ref(), &key))
                .expect("write fixture");
        }
        let bytes = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("fixture {} is missing: {e}", path.display()));
        for plaintext in ["Ada L", "Lovelace"] {
            assert!(
                !bytes
                    .windows(plaintext.len())
                    .any(|w| w == plaintext.as_bytes()),
                "{name}: {plaintext:?} is in the clear"
            );
        }
        match decode_sealed(&bytes).unwrap_or_else(|e| panic!("{name}: {e}")) {
            Decoded::Plain(event) => {
                assert_eq!(event, expected, "fixture {name} decoded differently");
                assert_eq!(decode(&bytes).ok(), Some(expected), "{name} without a key");
            }
            Decoded::Sealed(sealed) => {
                assert_eq!(sealed.student(), expected.metadata.aggregate_id, "{name}");
                assert_eq!(sealed.key(), v2_key_ref(), "{name}");
                assert_eq!(sealed.event_type(), expected.payload.event_type(), "{name}");
                let opened = sealed
                    .clone()
                    .open(&key)
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
                assert_eq!(opened, expected, "fixture {name} opened differently");
                assert!(sealed.clone().open(&DataKey::generate()).is_err(), "{name}");
                let erased = sealed.erased();
                assert_eq!(erased.metadata, expected.metadata, "{name}");
                assert!(
                    matches!(&erased.payload,
                        EventPayload::StudentRegistered(d) | EventPayload::StudentUpdated(d)
                            if d.name.is_empty() && d.first_name.is_empty() && d.last_name.is_empty()),
                    "{name}: erased still holds {:?}",
                    erased.payload
                );
                assert!(decode(&bytes).is_err(), "{name}: decoded without its key");
            }
        }
    }
}

#[test]
fn v1_fixtures_read_the_same_through_the_sealed_path() {
    for (name, expected) in expected_v1_events() {
        let bytes = std::fs::read(fixture_path("v1", name)).expect("fixture");
        assert_eq!(
            decode_sealed(&bytes).ok(),
            Some(Decoded::Plain(expected)),
            "{name}"
        );
    }
}
