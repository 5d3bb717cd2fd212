//! Protobuf encoding of [`Event`]s, and decoding of every schema version ever written.

use chrono::{DateTime, Utc};
use prost::Message;
use uuid::Uuid;

use crate::model::{
    AggregateKind, CourseDetails, Enrollment, Erasure, Event, EventMetadata, EventPayload,
    StudentDetails, TraceContext,
};
use crate::personal::{self, DataKey, DataKeyRef, OpenError};
use crate::proto;
use crate::proto::event_envelope::Payload;

/// Newest schema version this build reads. Version 1: personal fields in the clear.
/// Version 2: a student's personal fields sealed with its data key, and `StudentErased`.
pub const SCHEMA_VERSION: u32 = 2;
/// The version [`encode`] writes (no sealing); [`encode_sealed`] writes [`SEALED_VERSION`].
pub const PLAINTEXT_VERSION: u32 = 1;
pub const SEALED_VERSION: u32 = 2;

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
    #[error("a version {version} {event_type} must {rule}")]
    VersionMismatch {
        version: u32,
        event_type: &'static str,
        rule: &'static str,
    },
    #[error("the sealed fields name a key slot beyond any key block")]
    InvalidKeySlot,
    /// [`decode`] met a sealed event: read it with [`decode_sealed`] and the student's key.
    #[error("the personal fields are sealed: read them with the student's data key")]
    Sealed,
}

/// Encodes an event as one protobuf `EventEnvelope`, personal fields in the clear (schema
/// version 1; `StudentErased`, which version 1 did not have, as version 2).
pub fn encode(event: &Event) -> Vec<u8> {
    let version = match event.payload {
        EventPayload::StudentErased(_) => SEALED_VERSION,
        _ => PLAINTEXT_VERSION,
    };
    envelope(event, version, encode_payload(&event.payload)).encode_to_vec()
}

/// Encodes an event at schema version 2: a student's personal fields sealed with `key`,
/// the student's data key (kept at `key_ref`, which the event names), bound to this event's
/// id and the field names. Events without personal fields are written as by [`encode`], at
/// version 2.
pub fn encode_sealed(event: &Event, key_ref: DataKeyRef, key: &DataKey) -> Vec<u8> {
    let event_id = event.metadata.event_id;
    let sealed = |d: &StudentDetails| proto::SealedStudentDetails {
        fields: personal::seal(
            key,
            event_id,
            &[
                (SEALED_FIELDS[0], &d.name),
                (SEALED_FIELDS[1], &d.first_name),
                (SEALED_FIELDS[2], &d.last_name),
            ],
        ),
        key_block: key_ref.block.to_string(),
        key_slot: u32::from(key_ref.slot),
    };
    let payload = match &event.payload {
        EventPayload::StudentRegistered(d) => {
            Payload::StudentRegistered(proto::StudentRegistered {
                sealed: Some(sealed(d)),
                ..Default::default()
            })
        }
        EventPayload::StudentUpdated(d) => Payload::StudentUpdated(proto::StudentUpdated {
            sealed: Some(sealed(d)),
            ..Default::default()
        }),
        other => encode_payload(other),
    };
    envelope(event, SEALED_VERSION, payload).encode_to_vec()
}

fn envelope(event: &Event, version: u32, payload: Payload) -> proto::EventEnvelope {
    let meta = &event.metadata;
    proto::EventEnvelope {
        event_id: meta.event_id.to_string(),
        event_type: event.payload.event_type().to_owned(),
        schema_version: version,
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
        payload: Some(payload),
    }
}

fn encode_payload(payload: &EventPayload) -> Payload {
    match payload {
        EventPayload::StudentRegistered(d) => {
            Payload::StudentRegistered(proto::StudentRegistered {
                name: d.name.clone(),
                first_name: d.first_name.clone(),
                last_name: d.last_name.clone(),
                sealed: None,
            })
        }
        EventPayload::StudentUpdated(d) => Payload::StudentUpdated(proto::StudentUpdated {
            name: d.name.clone(),
            first_name: d.first_name.clone(),
            last_name: d.last_name.clone(),
            sealed: None,
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
        EventPayload::StudentErased(erasure) => Payload::StudentErased(proto::StudentErased {
            key_block: erasure.key.map(|k| k.block.to_string()).unwrap_or_default(),
            key_slot: erasure.key.map_or(0, |k| u32::from(k.slot)),
        }),
    }
}

/// What the stream holds, decoded as far as it can be without a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// Nothing sealed: every field is here.
    Plain(Event),
    /// A version 2 student registration or update, its personal fields sealed.
    Sealed(SealedEvent),
}

/// A student event whose personal fields wait for the student's data key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedEvent {
    metadata: EventMetadata,
    updated: bool,
    key: DataKeyRef,
    fields: Vec<u8>,
}

/// The sealed field names, in the order they are sealed (also the associated data).
const SEALED_FIELDS: [&str; 3] = ["name", "first_name", "last_name"];

impl SealedEvent {
    pub fn metadata(&self) -> &EventMetadata {
        &self.metadata
    }

    /// The student whose data key opens it.
    pub fn student(&self) -> Uuid {
        self.metadata.aggregate_id
    }

    /// Where the data key that opens it is kept.
    pub fn key(&self) -> DataKeyRef {
        self.key
    }

    pub fn event_type(&self) -> &'static str {
        if self.updated {
            "StudentUpdated"
        } else {
            "StudentRegistered"
        }
    }

    /// The event with its fields, opened with the student's data key.
    pub fn open(self, key: &DataKey) -> Result<Event, OpenError> {
        let values = personal::open(key, self.metadata.event_id, &SEALED_FIELDS, &self.fields)?;
        let [name, first_name, last_name]: [String; 3] =
            values.try_into().map_err(|_| OpenError::Malformed)?;
        Ok(self.with(StudentDetails {
            name,
            first_name,
            last_name,
        }))
    }

    /// The event once its key is destroyed: the same event, every personal field empty.
    /// Consumers apply it as they apply any registration or update (the student is deleted
    /// before it is erased, so no read model keeps it); tools show it as erased.
    pub fn erased(self) -> Event {
        self.with(StudentDetails {
            name: String::new(),
            first_name: String::new(),
            last_name: String::new(),
        })
    }

    fn with(self, details: StudentDetails) -> Event {
        let payload = if self.updated {
            EventPayload::StudentUpdated(details)
        } else {
            EventPayload::StudentRegistered(details)
        };
        Event {
            metadata: self.metadata,
            payload,
        }
    }
}

/// Decodes one message from the event stream written without sealing (schema version 1, or
/// any event without personal fields); a sealed event is [`DecodeError::Sealed`].
pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    match decode_sealed(bytes)? {
        Decoded::Plain(event) => Ok(event),
        Decoded::Sealed(_) => Err(DecodeError::Sealed),
    }
}

/// Decodes one message from the event stream, whatever schema version wrote it, leaving
/// sealed personal fields for the student's data key.
pub fn decode_sealed(bytes: &[u8]) -> Result<Decoded, DecodeError> {
    let envelope = proto::EventEnvelope::decode(bytes)?;
    let version = envelope.schema_version;
    if version == 0 || version > SCHEMA_VERSION {
        return Err(DecodeError::UnsupportedSchemaVersion(version));
    }
    let payload = envelope
        .payload
        .ok_or(DecodeError::MissingField("payload"))?;
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
    let mismatch = |payload: &'static str| DecodeError::EventTypeMismatch {
        envelope: envelope.event_type.clone(),
        payload,
    };
    let sealed = |updated: bool, sealed: Option<proto::SealedStudentDetails>, clear: bool| {
        let event_type = if updated {
            "StudentUpdated"
        } else {
            "StudentRegistered"
        };
        if envelope.event_type != event_type {
            return Err(mismatch(event_type));
        }
        match (version, sealed) {
            (SEALED_VERSION, Some(s)) if clear => Ok(Decoded::Sealed(SealedEvent {
                metadata: metadata.clone(),
                updated,
                key: DataKeyRef {
                    block: parse_uuid("key_block", &s.key_block)?,
                    slot: u16::try_from(s.key_slot).map_err(|_| DecodeError::InvalidKeySlot)?,
                },
                fields: s.fields,
            })),
            (SEALED_VERSION, _) => Err(DecodeError::VersionMismatch {
                version,
                event_type,
                rule: "carry its personal fields sealed, and only sealed",
            }),
            (_, Some(_)) => Err(DecodeError::VersionMismatch {
                version,
                event_type,
                rule: "not carry sealed fields",
            }),
            (_, None) => Err(DecodeError::MissingField("sealed")),
        }
    };
    let payload = match payload {
        Payload::StudentRegistered(p) if version >= SEALED_VERSION => {
            let clear = p.name.is_empty() && p.first_name.is_empty() && p.last_name.is_empty();
            return sealed(false, p.sealed, clear);
        }
        Payload::StudentUpdated(p) if version >= SEALED_VERSION => {
            let clear = p.name.is_empty() && p.first_name.is_empty() && p.last_name.is_empty();
            return sealed(true, p.sealed, clear);
        }
        Payload::StudentRegistered(proto::StudentRegistered {
            sealed: Some(_), ..
        })
        | Payload::StudentUpdated(proto::StudentUpdated {
            sealed: Some(_), ..
        }) => {
            return Err(DecodeError::VersionMismatch {
                version,
                event_type: "StudentRegistered or StudentUpdated",
                rule: "not carry sealed fields",
            });
        }
        Payload::StudentErased(_) if version < SEALED_VERSION => {
            return Err(DecodeError::VersionMismatch {
                version,
                event_type: "StudentErased",
                rule: "not exist (it came with version 2)",
            });
        }
        payload => decode_payload(payload)?,
    };
    if envelope.event_type != payload.event_type() {
        return Err(mismatch(payload.event_type()));
    }
    Ok(Decoded::Plain(Event { metadata, payload }))
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
        Payload::StudentErased(p) => EventPayload::StudentErased(Erasure {
            key: if p.key_block.is_empty() {
                None
            } else {
                Some(DataKeyRef {
                    block: parse_uuid("key_block", &p.key_block)?,
                    slot: u16::try_from(p.key_slot).map_err(|_| DecodeError::InvalidKeySlot)?,
                })
            },
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

    fn student_event(payload: EventPayload) -> Event {
        Event {
            metadata: metadata(AggregateKind::Student),
            payload,
        }
    }

    fn ada() -> StudentDetails {
        StudentDetails {
            name: "Ada L".into(),
            first_name: "Ada".into(),
            last_name: "Lovelace".into(),
        }
    }

    #[test]
    fn a_sealed_student_event_opens_only_with_its_key_and_never_shows_the_names() {
        let key = DataKey::generate();
        let key_ref = DataKeyRef {
            block: Uuid::now_v7(),
            slot: 42,
        };
        for payload in [
            EventPayload::StudentRegistered(ada()),
            EventPayload::StudentUpdated(ada()),
        ] {
            let event = student_event(payload);
            let bytes = encode_sealed(&event, key_ref, &key);
            assert!(!bytes.windows(8).any(|w| w == b"Lovelace"), "in the clear");
            let Ok(Decoded::Sealed(sealed)) = decode_sealed(&bytes) else {
                panic!("not sealed");
            };
            assert_eq!(sealed.key(), key_ref);
            assert_eq!(sealed.clone().open(&key), Ok(event));
            assert!(sealed.open(&DataKey::generate()).is_err());
            assert!(matches!(decode(&bytes), Err(DecodeError::Sealed)));
        }
        // Nothing personal to seal: the same event as without a key, at version 2.
        let deleted = student_event(EventPayload::StudentDeleted);
        assert_eq!(
            decode_sealed(&encode_sealed(&deleted, key_ref, &key)).ok(),
            Some(Decoded::Plain(deleted))
        );
        let erased = student_event(EventPayload::StudentErased(Erasure::default()));
        assert_eq!(decode(&encode(&erased)).ok(), Some(erased));
    }

    #[test]
    fn each_version_carries_the_names_its_own_way_only() {
        let key = DataKey::generate();
        let key_ref = DataKeyRef {
            block: Uuid::now_v7(),
            slot: 0,
        };
        let event = student_event(EventPayload::StudentRegistered(ada()));
        let sealed =
            proto::EventEnvelope::decode(&encode_sealed(&event, key_ref, &key)[..]).expect("ok");
        let clear = proto::EventEnvelope::decode(&encode(&event)[..]).expect("ok");

        // Version 2 with the names in the clear as well, or without the sealed ones.
        let mut both = sealed.clone();
        if let Some(Payload::StudentRegistered(p)) = &mut both.payload {
            p.last_name = "Lovelace".into();
        }
        let mut unsealed = clear.clone();
        unsealed.schema_version = SEALED_VERSION;
        // Version 1 carrying sealed fields, or an erasure (which version 1 did not have).
        let mut early_seal = sealed.clone();
        early_seal.schema_version = PLAINTEXT_VERSION;
        let mut early_erasure = proto::EventEnvelope::decode(
            &encode(&student_event(EventPayload::StudentErased(
                Erasure::default(),
            )))[..],
        )
        .expect("ok");
        early_erasure.schema_version = PLAINTEXT_VERSION;
        for (what, envelope) in [
            ("v2 with clear names", both),
            ("v2 without sealed names", unsealed),
            ("v1 with sealed names", early_seal),
            ("v1 erasure", early_erasure),
        ] {
            assert!(
                matches!(
                    decode_sealed(&envelope.encode_to_vec()),
                    Err(DecodeError::VersionMismatch { .. })
                ),
                "{what} was accepted"
            );
        }
        // A sealed registration whose type says otherwise.
        let mut renamed = sealed;
        renamed.event_type = "StudentUpdated".into();
        assert!(matches!(
            decode_sealed(&renamed.encode_to_vec()),
            Err(DecodeError::EventTypeMismatch { .. })
        ));
    }
}
