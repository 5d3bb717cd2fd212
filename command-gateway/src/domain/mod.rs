//! The pure command-side domain: input validation ("parse, don't validate"), aggregate
//! state, `decide` and `evolve`. No I/O: no tokio, NATS, HTTP or clock in here; the caller
//! passes ids and loaded state in.

pub mod fields;
pub mod student;

pub use fields::{InvalidField, PersonName};
pub use student::{NewStudent, StudentCommand, StudentState};

/// Why a command was refused by the rules (not by bad input, not by a technical failure).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    #[error("the student already exists")]
    StudentAlreadyExists,
}
