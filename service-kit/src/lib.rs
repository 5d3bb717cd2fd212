//! Plumbing every service shares: API-key auth, RFC 9457 problem responses, JSON body
//! extraction that never answers 5xx for bad input, health endpoints, structured logging, W3C trace context,
//! the NATS connection and graceful shutdown. No domain knowledge lives here.

pub mod auth;
pub mod data_keys;
pub mod event_reader;
pub mod health;
pub mod http_metrics;
pub mod json;
pub mod logging;
pub mod metrics;
pub mod nats;
pub mod observe;
pub mod openapi;
pub mod otlp;
pub mod problem;
pub mod shutdown;
pub mod trace;

pub use auth::{ApiKeys, RateLimit, RateLimitArgs, Scope};
pub use problem::{FieldError, Problem};
