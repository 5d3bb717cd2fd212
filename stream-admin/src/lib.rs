//! stream-admin, the initializer: declares the streams, consumers and KV buckets the system
//! needs and applies them idempotently. Services never create broker objects themselves.

pub mod apply;
pub mod topology;

pub use apply::{Change, Outcome, apply, summary};
pub use topology::{Topology, desired};
