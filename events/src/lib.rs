//! The event schema of the school system and the names of everything on the broker.
//!
//! This is the only crate that knows protobuf: other crates work with the plain Rust types
//! of [`model`] and call [`encode`] / [`decode`]. It is also the one place that knows stream,
//! subject, consumer and bucket names ([`names`]).

pub mod codec;
pub mod decode_properties;
pub mod model;
pub mod names;
pub mod personal;

pub use codec::{DecodeError, Decoded, SealedEvent, decode, decode_sealed, encode, encode_sealed};
pub use model::{
    AggregateKind, CourseDetails, Enrollment, Erasure, Event, EventMetadata, EventPayload,
    StudentDetails, TraceContext,
};
pub use names::{Projection, StreamNames, dead_letter_headers};

/// Generated protobuf types. Private to this crate: the schema is an encoding detail.
mod proto {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/school.events.v1.rs"));
}
