//! The one place that knows stream, subject, consumer and bucket names.
//!
//! Every name derives from a prefix (`school` in production) so tests can run side by side
//! on one server with names of their own.

use uuid::Uuid;

use crate::model::AggregateKind;

/// A read model fed by one durable consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Projection {
    /// Students and their course ids, in Postgres.
    Students,
    /// Courses and their student ids, in MongoDB or a Postgres JSONB table.
    Courses,
}

impl Projection {
    pub const ALL: [Projection; 2] = [Projection::Students, Projection::Courses];

    /// Short name used in consumer names, checkpoints and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Projection::Students => "students",
            Projection::Courses => "courses",
        }
    }

    /// The aggregate whose subjects this projection consumes.
    pub fn source_aggregate(self) -> AggregateKind {
        match self {
            Projection::Students => AggregateKind::Student,
            Projection::Courses => AggregateKind::Course,
        }
    }
}

impl std::str::FromStr for Projection {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Projection::ALL
            .into_iter()
            .find(|p| p.as_str() == name)
            .ok_or_else(|| format!("unknown projection {name:?}; expected students or courses"))
    }
}

/// Names of the broker objects for one deployment (or one test).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamNames {
    prefix: String,
}

/// A prefix that cannot name streams and subjects.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid stream prefix {0:?}: use 1 to 32 ASCII letters, digits, '-' or '_'")]
pub struct InvalidPrefix(pub String);

impl std::str::FromStr for StreamNames {
    type Err = InvalidPrefix;

    fn from_str(prefix: &str) -> Result<Self, Self::Err> {
        StreamNames::parse(prefix)
    }
}

impl Default for StreamNames {
    fn default() -> Self {
        StreamNames::new("school")
    }
}

impl StreamNames {
    /// `prefix` must be a valid subject token and stream-name fragment: ASCII letters,
    /// digits, `-` and `_` only.
    ///
    /// # Panics
    /// On an invalid prefix; use [`StreamNames::parse`] for configured values.
    pub fn new(prefix: impl Into<String>) -> Self {
        match Self::parse(prefix) {
            Ok(names) => names,
            Err(error) => panic!("{error}"),
        }
    }

    /// Checks a configured prefix.
    pub fn parse(prefix: impl Into<String>) -> Result<Self, InvalidPrefix> {
        let prefix = prefix.into();
        let valid = !prefix.is_empty()
            && prefix.len() <= 32
            && prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if valid {
            Ok(StreamNames { prefix })
        } else {
            Err(InvalidPrefix(prefix))
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The event stream: the source of truth.
    pub fn event_stream(&self) -> String {
        format!("{}-events", self.prefix)
    }

    /// Subjects bound to the event stream.
    pub fn event_subjects(&self) -> String {
        format!("{}.events.>", self.prefix)
    }

    /// All subjects of one aggregate kind (a projection's filter).
    pub fn aggregate_kind_subjects(&self, kind: AggregateKind) -> String {
        format!("{}.events.{}.*", self.prefix, kind.as_str())
    }

    /// The subject of one aggregate instance: its events and nothing else.
    pub fn aggregate_subject(&self, kind: AggregateKind, id: Uuid) -> String {
        format!("{}.events.{}.{}", self.prefix, kind.as_str(), id)
    }

    /// Durable pull consumer feeding a projection.
    pub fn projection_consumer(&self, projection: Projection) -> String {
        format!("{}-projection-{}", self.prefix, projection.as_str())
    }

    /// Stream holding events a projection could not apply.
    pub fn dead_letter_stream(&self) -> String {
        format!("{}-dead-letters", self.prefix)
    }

    /// Subject a projection's dead letters are published on.
    pub fn dead_letter_subject(&self, projection: Projection) -> String {
        format!("{}.dead-letters.{}", self.prefix, projection.as_str())
    }

    /// Subjects bound to the dead-letter stream.
    pub fn dead_letter_subjects(&self) -> String {
        format!("{}.dead-letters.>", self.prefix)
    }

    /// Redis key of one aggregate's cached read-model entry. Projectors delete it after each
    /// commit that changed the aggregate; query-api fills it. `v1` is the entry's format.
    pub fn cache_key(&self, kind: AggregateKind, id: Uuid) -> String {
        format!("{}:v1:{}:{}", self.prefix, kind.as_str(), id)
    }

    /// KV bucket of first outcomes per `Idempotency-Key`.
    pub fn idempotency_bucket(&self) -> String {
        format!("{}-idempotency", self.prefix)
    }

    /// KV bucket of the projections' leases (which projectors replica is active), one key
    /// per projection.
    pub fn projection_lease_bucket(&self) -> String {
        format!("{}-projection-leases", self.prefix)
    }

    /// KV bucket of the students' wrapped data keys (crypto-shredding), one key per student.
    pub fn student_keys_bucket(&self) -> String {
        format!("{}-student-keys", self.prefix)
    }
}

/// Headers a dead letter carries (written by the projectors, read by `stream-admin dlq`).
pub mod dead_letter_headers {
    pub const REASON: &str = "School-Dead-Letter-Reason";
    pub const ORIGINAL_SEQUENCE: &str = "School-Original-Sequence";
    pub const ORIGINAL_SUBJECT: &str = "School-Original-Subject";
    pub const PROJECTION: &str = "School-Projection";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregate_subjects_are_inside_the_stream_and_the_kind_filter() {
        let names = StreamNames::default();
        let id = Uuid::nil();
        let subject = names.aggregate_subject(AggregateKind::Student, id);
        assert_eq!(
            subject,
            "school.events.student.00000000-0000-0000-0000-000000000000"
        );
        assert!(subject.starts_with(names.event_subjects().trim_end_matches('>')));
        assert!(
            subject.starts_with(
                names
                    .aggregate_kind_subjects(AggregateKind::Student)
                    .trim_end_matches('*')
            )
        );
    }

    #[test]
    fn dead_letters_are_outside_the_event_stream() {
        let names = StreamNames::new("t1");
        let dlq = names.dead_letter_subject(Projection::Students);
        assert!(!dlq.starts_with(names.event_subjects().trim_end_matches('>')));
    }

    #[test]
    #[should_panic(expected = "invalid stream prefix")]
    fn a_prefix_with_a_dot_is_refused() {
        StreamNames::new("a.b");
    }
}
