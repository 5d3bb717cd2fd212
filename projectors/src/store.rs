//! The port every read model implements for the consume loop: apply a batch of events with
//! the checkpoint, exactly once in effect.

use std::future::Future;

use events::{Event, Projection};

/// How a batch went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BatchOutcome {
    /// Events whose effect was written now.
    pub applied: usize,
    /// Events at or below the checkpoint: already applied before (re-delivery).
    pub skipped: usize,
    /// The checkpoint after the batch.
    pub checkpoint: u64,
}

/// Why a store could not apply a batch.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store is unreachable or overloaded; the same batch will succeed later.
    #[error("read model unavailable: {0}")]
    Unavailable(String),
    /// The store refused the data itself; retrying the same events fails the same way.
    #[error("read model refused the batch: {0}")]
    Refused(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        match error {
            // Constraint violations, bad data, a schema that does not fit: not transient.
            sqlx::Error::Database(_)
            | sqlx::Error::ColumnDecode { .. }
            | sqlx::Error::Decode(_)
            | sqlx::Error::TypeNotFound { .. }
            | sqlx::Error::ColumnNotFound(_) => StoreError::Refused(error.to_string()),
            other => StoreError::Unavailable(other.to_string()),
        }
    }
}

/// A read model fed by one projection.
///
/// Implementations keep the checkpoint (last applied stream sequence) with the data, in the
/// same transaction or behind per-record version guards, and skip what is at or below it.
pub trait ProjectionStore: Clone + Send + Sync + 'static {
    fn projection(&self) -> Projection;

    /// Last stream sequence applied (0 before the first event).
    fn checkpoint(&self) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Applies `(stream sequence, event)` pairs in stream order and moves the checkpoint to
    /// `through_sequence` (the batch may end with events dead-lettered instead of applied).
    fn apply_batch(
        &self,
        batch: &[(u64, Event)],
        through_sequence: u64,
    ) -> impl Future<Output = Result<BatchOutcome, StoreError>> + Send;

    /// Whether the store answers (for `/readyz`).
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
}
