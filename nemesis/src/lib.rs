//! The production shape under a nemesis, in the spirit of a Jepsen analysis: clients send
//! commands and reads through several gateways and query-apis while faults hit the R3
//! JetStream cluster and the projectors; afterwards the checker judges the history the
//! clients recorded against the final stream and the read models.
//!
//! The test itself is `tests/nemesis.rs`; this crate holds its parts: [`workload`] (the
//! clients), [`history`] (what they recorded), [`checker`] (pure, unit-tested) and
//! [`services`] (the real binaries as processes).

pub mod checker;
pub mod history;
pub mod services;
pub mod workload;
