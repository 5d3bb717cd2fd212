//! The properties every input to [`decode`] must keep, whatever its bytes: the body of the
//! `event_decoding` fuzz target (`fuzz/`) and of the replay of its corpus on stable Rust
//! (`tests/fuzz_corpus.rs`), so both check the same thing. Also the history both fuzz
//! corpora are seeded from ([`seed_history`]).

use chrono::{DateTime, TimeDelta, Utc};
use uuid::Uuid;

use crate::codec::{decode, encode};
use crate::model::{
    AggregateKind, CourseDetails, Enrollment, Event, EventMetadata, EventPayload, StudentDetails,
    TraceContext,
};

/// Decodes `bytes` as a message of the event stream and checks what must hold for any
/// input. Panics (which is how a fuzzer notices) when a property fails:
///
/// - `decode` answers an error rather than panicking on malformed input;
/// - an accepted event survives a re-encoding: `decode(encode(e)) == e`;
/// - the re-encoding is canonical: encoding the re-decoded event gives the same bytes, so a
///   normalised event (a UUID in braces, a missing trace context) never changes again.
///
/// Returns whether the input was accepted as an event.
pub fn assert_decoding_properties(bytes: &[u8]) -> bool {
    let Ok(event) = decode(bytes) else {
        return false;
    };
    let encoded = encode(&event);
    let again = match decode(&encoded) {
        Ok(again) => again,
        Err(error) => panic!("an accepted event no longer decodes after encoding: {error}"),
    };
    assert_eq!(
        again, event,
        "the event changed in an encode/decode round trip"
    );
    assert_eq!(
        encode(&again),
        encoded,
        "encoding is not stable after one round trip"
    );
    true
}

/// A short history of one student and one course that holds every event type, as the
/// gateway writes them (an enrollment lands on both aggregates), with fixed ids and times so
/// the seeds written from it do not change from run to run. The seeds of both fuzz corpora:
/// `FUZZ_WRITE_SEEDS=1 cargo test -p events --test fuzz_corpus` (and `-p projectors`).
pub fn seed_history() -> Vec<Event> {
    let student = Uuid::from_u128(0x0193a1c2_0000_7000_8000_000000000001);
    let course = Uuid::from_u128(0x0193a1c2_0000_7000_8000_000000000002);
    let start = DateTime::<Utc>::from_timestamp(1_795_939_200, 123_456_789).unwrap_or_default();
    let student_details = |name: &str| StudentDetails {
        name: name.to_owned(),
        first_name: "Ada".to_owned(),
        last_name: "Lovelace".to_owned(),
    };
    let course_details = |teacher: &str| CourseDetails {
        name: "Analytical Engines".to_owned(),
        description: "Notes on the engine, with non-ASCII: é, ü, 数学".to_owned(),
        discipline: "Mathematics".to_owned(),
        teacher: teacher.to_owned(),
    };
    let enrollment = Enrollment {
        student_id: student,
        course_id: course,
    };
    use AggregateKind::{Course, Student};
    let steps = [
        (
            Student,
            EventPayload::StudentRegistered(student_details("Ada L")),
        ),
        (
            Course,
            EventPayload::CourseCreated(course_details("Babbage")),
        ),
        (Student, EventPayload::StudentEnrolled(enrollment)),
        (Course, EventPayload::StudentEnrolled(enrollment)),
        (
            Student,
            EventPayload::StudentUpdated(student_details("Ada K")),
        ),
        (
            Course,
            EventPayload::CourseUpdated(course_details("Menabrea")),
        ),
        (Student, EventPayload::StudentUnenrolled(enrollment)),
        (Course, EventPayload::StudentUnenrolled(enrollment)),
        (Student, EventPayload::StudentDeleted),
        (Course, EventPayload::CourseDeleted),
    ];
    let command = Uuid::from_u128(0x0193a1c2_0000_7000_8000_0000000000c0);
    steps
        .into_iter()
        .zip(0u16..)
        .map(|((kind, payload), n)| Event {
            metadata: EventMetadata {
                event_id: Uuid::from_u128(0x0193a1c2_0000_7000_8000_0000000000a0 + u128::from(n)),
                aggregate_kind: kind,
                aggregate_id: if kind == Student { student } else { course },
                occurred_at: start + TimeDelta::seconds(i64::from(n)),
                correlation_id: command,
                causation_id: command,
                trace: TraceContext {
                    traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                        .to_owned(),
                    tracestate: "school=1".to_owned(),
                },
            },
            payload,
        })
        .collect()
}
