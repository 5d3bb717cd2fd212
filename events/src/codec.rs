//! Protobuf encoding of [`Event`]s, and decoding of every schema version ever written.

use chrono::{DateTime, Utc};
use prost::Message;
use uuid::Uuid;

use crate::model::{
    AggregateKind, CourseDetails, Enrollment, Event, EventMetadata, EventPayload, StudentDetails,
    TraceContext,
};
use crate::proto;
use crate::proto::event_envelope::Payload;

/// Schema version written by this build. Decoding accepts every version up to this one.
pub const SCHEMA_VERSION: u32 = 1;

/// Why bytes from the stream are not an event this build understands.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not a protobuf event envelope: {0}")]
    Protobuf(#[from] prost::DecodeError),
    #[error("envelope field `{0}` is missing")]
    MissingField(&'static str),
    #[error("envelope field `{field}` is not a UUID: {value:?}")]
    InvalidUuid { field: &'static str, value: String },
    #[error("unknown aggregate type {0:?}")]
    UnknownAggregateType(String),
    #[error("occurred_at is out of range")]
    InvalidTimestamp,
    #[error("schema version {0} is not supported (this build reads 1..={SCHEMA_VERSION})")]
    UnsupportedSchemaVersion(u32),
    #[error("event_type {envelope:?} does not match the payload {payload:?}")]
    EventTypeMismatch {
        envelope: String,
        payload: &'static str,
    },
}

/// Encodes an event as one protobuf `EventEnvelope` at the current schema version.
pub fn encode(event: &Event) -> Vec<u8> {
    let meta = &event.metadata;
    let envelope = proto::EventEnvelope {
        event_id: meta.event_id.to_string(),
        event_type: event.payload.event_type().to_owned(),
        schema_version: SCHEMA_VERSION,
        aggregate_type: meta.aggregate_kind.as_str().to_owned(),
        aggregate_id: meta.aggregate_id.to_string(),
        occurred_at: Some(prost_types::Timestamp {
            seconds: meta.occurred_at.timestamp(),
            nanos: meta.occurred_at.timestamp_subsec_nanos() as i32,
        }),
        correlation_id: meta.correlation_id.to_string(),
        causation_id: meta.causation_id.to_string(),
        trace_context: Some(proto::TraceContext {
            traceparent: meta.trace.traceparent.clone(),
            tracestate: meta.trace.tracestate.clone(),
        }),
        payload: Some(encode_payload(&event.payload)),
    };
    envelope.encode_to_vec()
}

fn encode_payload(payload: &EventPayload) -> Payload {
    match payload {
        EventPayload::StudentRegistered(d) => {
            Payload::StudentRegistered(proto::StudentRegistered {
                name: d.name.clone(),
                first_name: d.first_name.clone(),
                last_name: d.last_name.clone(),
            })
        }
        EventPayload::StudentUpdated(d) => Payload::StudentUpdated(proto::StudentUpdated {
            name: d.name.clone(),
            first_name: d.first_name.clone(),
            last_name: d.last_name.clone(),
        }),
        EventPayload::StudentDeleted => Payload::StudentDeleted(proto::StudentDeleted {}),
        EventPayload::CourseCreated(d) => Payload::CourseCreated(proto::CourseCreated {
            name: d.name.clone(),
            description: d.description.clone(),
            discipline: d.discipline.clone(),
            teacher: d.teacher.clone(),
        }),
        EventPayload::CourseUpdated(d) => Payload::CourseUpdated(proto::CourseUpdated {
            name: d.name.clone(),
            description: d.description.clone(),
            discipline: d.discipline.clone(),
            teacher: d.teacher.clone(),
        }),
        EventPayload::CourseDeleted => Payload::CourseDeleted(proto::CourseDeleted {}),
        EventPayload::StudentEnrolled(e) => Payload::StudentEnrolled(proto::StudentEnrolled {
            student_id: e.student_id.to_string(),
            course_id: e.course_id.to_string(),
        }),
        EventPayload::StudentUnenrolled(e) => {
            Payload::StudentUnenrolled(proto::StudentUnenrolled {
                student_id: e.student_id.to_string(),
                course_id: e.course_id.to_string(),
            })
        }
    }
}

/// Decodes one message from the event stream, whatever schema version wrote it.
pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    let envelope = proto::EventEnvelope::decode(bytes)?;
    if envelope.schema_version == 0 || envelope.schema_version > SCHEMA_VERSION {
        return Err(DecodeError::UnsupportedSchemaVersion(
            envelope.schema_version,
        ));
    }
    let payload = envelope
        .payload
        .ok_or(DecodeError::MissingField("payload"))?;
    let payload = decode_payload(payload)?;
    if envelope.event_type != payload.event_type() {
        return Err(DecodeError::EventTypeMismatch {
            envelope: envelope.event_type,
            payload: payload.event_type(),
        });
    }
    let occurred_at = envelope
        .occurred_at
        .ok_or(DecodeError::MissingField("occurred_at"))?;
    let occurred_at: DateTime<Utc> = u32::try_from(occurred_at.nanos)
        .ok()
        .and_then(|nanos| DateTime::from_timestamp(occurred_at.seconds, nanos))
        .ok_or(DecodeError::InvalidTimestamp)?;
    let trace = envelope.trace_context.unwrap_or_default();
    let metadata = EventMetadata {
        event_id: parse_uuid("event_id", &envelope.event_id)?,
        aggregate_kind: AggregateKind::parse(&envelope.aggregate_type)
            .ok_or(DecodeError::UnknownAggregateType(envelope.aggregate_type))?,
        aggregate_id: parse_uuid("aggregate_id", &envelope.aggregate_id)?,
        occurred_at,
        correlation_id: parse_uuid("correlation_id", &envelope.correlation_id)?,
        causation_id: parse_uuid("causation_id", &envelope.causation_id)?,
        trace: TraceContext {
            traceparent: trace.traceparent,
            tracestate: trace.tracestate,
        },
    };
    Ok(Event { metadata, payload })
}

fn decode_payload(payload: Payload) -> Result<EventPayload, DecodeError> {
    Ok(match payload {
        Payload::StudentRegistered(p) => EventPayload::StudentRegistered(StudentDetails {
            name: p.name,
            first_name: p.first_name,
            last_name: p.last_name,
        }),
        Payload::StudentUpdated(p) => EventPayload::StudentUpdated(StudentDetails {
            name: p.name,
            first_name: p.first_name,
            last_name: p.last_name,
        }),
        Payload::StudentDeleted(_) => EventPayload::StudentDeleted,
        Payload::CourseCreated(p) => EventPayload::CourseCreated(CourseDetails {
            name: p.name,
            description: p.description,
            discipline: p.discipline,
            teacher: p.teacher,
        }),
        Payload::CourseUpdated(p) => EventPayload::CourseUpdated(CourseDetails {
            name: p.name,
            description: p.description,
            discipline: p.discipline,
            teacher: p.teacher,
        }),
        Payload::CourseDeleted(_) => EventPayload::CourseDeleted,
        Payload::StudentEnrolled(p) => EventPayload::StudentEnrolled(Enrollment {
            student_id: parse_uuid("student_id", &p.student_id)?,
            course_id: parse_uuid("course_id", &p.course_id)?,
        }),
        Payload::StudentUnenrolled(p) => EventPayload::StudentUnenrolled(Enrollment {
            student_id: parse_uuid("student_id", &p.student_id)?,
            course_id: parse_uuid("course_id", &p.course_id)?,
        }),
    })
}

fn parse_uuid(field: &'static str, value: &str) -> Result<Uuid, DecodeError> {
    Uuid::parse_str(value).map_err(|_| DecodeError::InvalidUuid {
        field,
        value: value.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(kind: AggregateKind) -> EventMetadata {
        EventMetadata {
            event_id: Uuid::now_v7(),
            aggregate_kind: kind,
            aggregate_id: Uuid::now_v7(),
            occurred_at: Utc::now(),
            correlation_id: Uuid::now_v7(),
            causation_id: Uuid::now_v7(),
            trace: TraceContext {
                traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
                tracestate: "vendor=1".into(),
            },
        }
    }

    #[test]
    fn every_payload_survives_an_encode_decode_round_trip() {
        let student = StudentDetails {
            name: "Ada L".into(),
            first_name: "Ada".into(),
            last_name: "Lovelace".into(),
        };
        let course = CourseDetails {
            name: "Analysis".into(),
            description: "Engines and numbers".into(),
            discipline: "Mathematics".into(),
            teacher: "Babbage".into(),
        };
        let enrollment = Enrollment {
            student_id: Uuid::now_v7(),
            course_id: Uuid::now_v7(),
        };
        let payloads = [
            EventPayload::StudentRegistered(student.clone()),
            EventPayload::StudentUpdated(student),
            EventPayload::StudentDeleted,
            EventPayload::CourseCreated(course.clone()),
            EventPayload::CourseUpdated(course),
            EventPayload::CourseDeleted,
            EventPayload::StudentEnrolled(enrollment),
            EventPayload::StudentUnenrolled(enrollment),
        ];
        for payload in payloads {
            let event = Event {
                metadata: metadata(AggregateKind::Course),
                payload,
            };
            let decoded = decode(&encode(&event)).expect("decodes");
            assert_eq!(decoded, event);
        }
    }

    #[test]
    fn garbage_is_a_decode_error_not_a_panic() {
        for bytes in [&b""[..], b"\xff\xff\xff", b"hello world", &[0x0a, 0x80]] {
            assert!(decode(bytes).is_err(), "{bytes:?} decoded");
        }
    }

    #[test]
    fn a_future_schema_version_is_refused() {
        let event = Event {
            metadata: metadata(AggregateKind::Student),
            payload: EventPayload::StudentDeleted,
        };
        let mut envelope = proto::EventEnvelope::decode(&encode(&event)[..]).expect("decodes");
        envelope.schema_version = SCHEMA_VERSION + 1;
        let err = decode(&envelope.encode_to_vec()).expect_err("refused");
        assert!(matches!(err, DecodeError::UnsupportedSchemaVersion(v) if v == SCHEMA_VERSION + 1));
    }

    #[test]
    fn an_event_type_that_contradicts_the_payload_is_refused() {
        let event = Event {
            metadata: metadata(AggregateKind::Student),
            payload: EventPayload::StudentDeleted,
        };
        let mut envelope = proto::EventEnvelope::decode(&encode(&event)[..]).expect("decodes");
        envelope.event_type = "CourseDeleted".into();
        assert!(matches!(
            decode(&envelope.encode_to_vec()),
            Err(DecodeError::EventTypeMismatch { .. })
        ));
    }
}
