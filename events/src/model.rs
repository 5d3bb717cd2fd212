//! Plain Rust types of the events, independent of their wire encoding.

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

/// The two kinds of aggregate; each has its own subject per instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AggregateKind {
    Student,
    Course,
}

impl AggregateKind {
    /// The name used in subjects and in the envelope's `aggregate_type`.
    pub fn as_str(self) -> &'static str {
        match self {
            AggregateKind::Student => "student",
            AggregateKind::Course => "course",
        }
    }

    /// Inverse of [`AggregateKind::as_str`].
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "student" => Some(AggregateKind::Student),
            "course" => Some(AggregateKind::Course),
            _ => None,
        }
    }
}

/// W3C trace context carried from the command into every event it produced.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TraceContext {
    pub traceparent: String,
    pub tracestate: String,
}

/// Everything about an event except its payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EventMetadata {
    /// UUID v7; doubles as `Nats-Msg-Id` so the broker drops a duplicate publish.
    pub event_id: Uuid,
    pub aggregate_kind: AggregateKind,
    pub aggregate_id: Uuid,
    pub occurred_at: DateTime<Utc>,
    pub correlation_id: Uuid,
    /// The command that produced this event.
    pub causation_id: Uuid,
    pub trace: TraceContext,
}

/// The descriptive fields of a student (validated by the command side before they get here).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StudentDetails {
    pub name: String,
    pub first_name: String,
    pub last_name: String,
}

/// The descriptive fields of a course.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CourseDetails {
    pub name: String,
    pub description: String,
    pub discipline: String,
    pub teacher: String,
}

/// One student in one course.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Enrollment {
    pub student_id: Uuid,
    pub course_id: Uuid,
}

/// What happened. Past tense; the aggregate is named by the metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", content = "data")]
pub enum EventPayload {
    StudentRegistered(StudentDetails),
    StudentUpdated(StudentDetails),
    StudentDeleted,
    CourseCreated(CourseDetails),
    CourseUpdated(CourseDetails),
    CourseDeleted,
    StudentEnrolled(Enrollment),
    StudentUnenrolled(Enrollment),
    /// The student's data key was destroyed, after its deletion: every sealed personal
    /// field of it is unreadable for good. Carries nothing personal.
    StudentErased(Erasure),
}

/// What an erasure records: where the destroyed key was, so whoever applies the event can
/// destroy it as well (destroying is idempotent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Erasure {
    pub key: Option<crate::personal::DataKeyRef>,
}

impl EventPayload {
    /// The event type name, as written in the envelope.
    pub fn event_type(&self) -> &'static str {
        match self {
            EventPayload::StudentRegistered(_) => "StudentRegistered",
            EventPayload::StudentUpdated(_) => "StudentUpdated",
            EventPayload::StudentDeleted => "StudentDeleted",
            EventPayload::CourseCreated(_) => "CourseCreated",
            EventPayload::CourseUpdated(_) => "CourseUpdated",
            EventPayload::CourseDeleted => "CourseDeleted",
            EventPayload::StudentEnrolled(_) => "StudentEnrolled",
            EventPayload::StudentUnenrolled(_) => "StudentUnenrolled",
            EventPayload::StudentErased(_) => "StudentErased",
        }
    }
}

/// One event as appended to the stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    pub metadata: EventMetadata,
    pub payload: EventPayload,
}
