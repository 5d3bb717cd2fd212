//! Decodes event bytes written by earlier builds, one committed fixture per event type and
//! schema version. A schema change that would break replay of stored events fails here.
//!
//! Fixtures are written once, when a schema version is introduced:
//! `WRITE_EVENT_FIXTURES=1 cargo test -p events --test schema_fixtures`, then committed and
//! never rewritten (a new version gets a new folder).

use std::path::PathBuf;

use chrono::{DateTime, Utc};
use events::{
    AggregateKind, CourseDetails, Enrollment, Event, EventMetadata, EventPayload, StudentDetails,
    TraceContext, decode, encode,
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
