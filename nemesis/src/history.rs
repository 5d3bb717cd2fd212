//! What the clients did and what they were told: the history the checker judges.

use events::AggregateKind;
use uuid::Uuid;

/// The aggregate a command or read addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Target {
    pub kind: AggregateKind,
    pub id: Uuid,
}

/// The commands the clients send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandKind {
    CreateStudent,
    CreateCourse,
    ReplaceStudent,
    Enroll,
    Unenroll,
    DeleteStudent,
    DeleteCourse,
}

impl CommandKind {
    pub fn is_create(self) -> bool {
        matches!(self, CommandKind::CreateStudent | CommandKind::CreateCourse)
    }
}

/// How a command ended, after every retry its client made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx: the command took effect (or asked for what already was). `version` is the
    /// target's version after it (ETag), `token` the stream position to read at.
    Accepted { version: u64, token: u64 },
    /// 4xx from a rule or a precondition: nothing was appended.
    Refused { status: u16, problem: String },
    /// Never answered with anything but 5xx or a transport error before the client gave up
    /// (only commands sent without an `Idempotency-Key` are given up on).
    Unknown { last_error: String },
}

/// One logical command: every attempt shares its correlation id and `Idempotency-Key`.
#[derive(Debug, Clone)]
pub struct CommandRecord {
    pub correlation_id: Uuid,
    pub kind: CommandKind,
    pub target: Target,
    pub keyed: bool,
    /// Status of each attempt (0: no HTTP answer).
    pub attempts: Vec<u16>,
    pub outcome: Outcome,
}

impl CommandRecord {
    /// Whether an attempt was answered 503 (or not at all) before the final answer.
    pub fn was_retried_after_failure(&self) -> bool {
        self.attempts.len() > 1
    }
}

/// A read a client made right after its own accepted write, with that write's token.
#[derive(Debug, Clone)]
pub struct ReadRecord {
    pub target: Target,
    pub protocol: &'static str,
    pub token: u64,
    /// The write's result the read must reflect: `Some(version)` at least this version,
    /// `None` the aggregate is gone.
    pub must_see: Option<u64>,
    /// What the read returned: `Some(version)`, `None` not found.
    pub saw: Result<Option<u64>, String>,
}
