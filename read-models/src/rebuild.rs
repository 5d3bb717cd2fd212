//! The port `stream-admin replay` and `dlq redrive` go through, implemented by every store,
//! so both are written once: a replay builds the next generation of a read model with the
//! store's own `apply_batch`, pauses the live projection, catches up, verifies and switches;
//! a redrive rebuilds one aggregate from its history, serialised with the live projection.

use std::future::Future;

use events::Event;
use uuid::Uuid;

use crate::store::{ProjectionStore, StoreError};

/// Row (document) count and an order-independent checksum of a generation's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    pub rows: i64,
    pub checksum: String,
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} rows, checksum {}", self.rows, self.checksum)
    }
}

/// Why a switch did not happen. The live generation is left as it was.
#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    #[error("the new model is at position {next}, the live one at {live}: catch up first")]
    NotCaughtUp { next: u64, live: u64 },
    #[error("the new model differs from the live one (live: {live}; new: {next})")]
    Mismatch {
        live: Fingerprint,
        next: Fingerprint,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for SwitchError {
    fn from(error: sqlx::Error) -> Self {
        SwitchError::Store(error.into())
    }
}

/// What a switch compared and did.
#[derive(Debug, Clone)]
pub struct SwitchReport {
    pub position: u64,
    pub live: Fingerprint,
    pub next: Fingerprint,
    /// The old generation is kept (`<table>__old`, `<collection>__old`).
    pub kept_old: bool,
    /// Records left out of the comparison because a live batch in flight when the pause
    /// began wrote them past the switch position (MongoDB, which has no transaction to
    /// wait for). That batch is redone on the new generation.
    pub uncompared: u64,
}

/// A read model that can be rebuilt: a replay's generations and a redrive's rebuild.
pub trait Rebuildable: ProjectionStore {
    type Switch: GenerationSwitch;

    /// The same store, writing the generation a replay builds (`Next`).
    fn next_generation(&self) -> Self;

    /// Creates the next generation (same schema and indexes as the live one) unless it
    /// exists. `true` when it existed: an interrupted replay resumes from its checkpoint.
    fn prepare_next(&self) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Drops the next generation (a replay started over, or abandoned).
    fn drop_next(&self) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Pauses the live projection at its checkpoint (a batch in flight finishes or fails
    /// first) until the switch is finished or aborted.
    fn begin_switch(&self) -> impl Future<Output = Result<Self::Switch, StoreError>> + Send;

    /// Replaces one aggregate by the fold of its history (every event of its subject up to
    /// the checkpoint), serialised with the live projection so that an event applied
    /// meanwhile is never overwritten by older state. Returns the events applied.
    fn rebuild_aggregate(
        &self,
        id: Uuid,
        history: impl AggregateHistory,
    ) -> impl Future<Output = Result<usize, StoreError>> + Send;
}

/// A switch in progress: the live projection is paused at [`Self::live_checkpoint`].
pub trait GenerationSwitch: Send {
    fn live_checkpoint(&self) -> u64;

    /// Compares the generations (the next one must be at exactly the live checkpoint) and,
    /// when they match (or `force`), makes the next one live and resumes the projection on
    /// it. The old one is dropped unless `keep_old`.
    fn finish(
        self,
        force: bool,
        keep_old: bool,
    ) -> impl Future<Output = Result<SwitchReport, SwitchError>> + Send;

    /// Resumes the live projection on the live generation, switching nothing.
    fn abort(self) -> impl Future<Output = ()> + Send;
}

/// An aggregate's history as a rebuild reads it: only once the rebuild is serialised with
/// the live projection, and up to its checkpoint. `Clone`: a rebuild that loses a race to the
/// live projection (MongoDB) reads it again.
pub trait AggregateHistory: Send + Clone {
    /// Every event of the aggregate's subject at or below `checkpoint`, in stream order.
    fn read_through(
        self,
        checkpoint: u64,
    ) -> impl Future<Output = Result<Vec<(u64, Event)>, StoreError>> + Send;
}

/// A history read earlier. Complete only if nothing was appended to the aggregate's subject
/// since: read it through [`AggregateHistory::read_through`] wherever events may still come.
impl AggregateHistory for &[(u64, Event)] {
    async fn read_through(self, checkpoint: u64) -> Result<Vec<(u64, Event)>, StoreError> {
        Ok(self
            .iter()
            .filter(|(sequence, _)| *sequence <= checkpoint)
            .cloned()
            .collect())
    }
}
