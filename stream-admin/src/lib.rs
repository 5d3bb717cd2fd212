//! stream-admin, the initializer and the operator's tool: declares the streams, consumers
//! and KV buckets the system needs (services never create broker objects themselves),
//! reports status, rebuilds read models, handles dead letters and decodes events.

pub mod apply;
pub mod dlq;
pub mod inspect;
pub mod migrate;
pub mod read_models;
pub mod replay;
pub mod status;
pub mod topology;

pub use apply::{ApplyOptions, Change, DestructiveChanges, Outcome, apply, summary};
pub use topology::{BucketSpec, Topology, desired};
