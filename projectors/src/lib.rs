//! projectors: durable JetStream consumers that keep the read models (the `read-models`
//! crate) up to date, exactly once in effect: the consume loop, the lease, dead letters and
//! cache invalidation.

pub mod config;
pub mod consumer;
pub mod dead_letters;
pub mod in_memory_batch;
pub mod lease;
pub mod redis_cache;

use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use read_models::{CourseStore, PgStudents, ProjectionStore, StoreError};
use service_kit::{health, metrics};

pub use config::Config;
pub use consumer::{ProjectionProgress, ProjectionRunner};

/// What the health endpoints look at.
#[derive(Clone)]
pub struct HealthState {
    pub nats: async_nats::Client,
    pub students: PgStudents,
    pub courses: CourseStore,
    pub progress: Arc<ProjectionProgress>,
}

/// How long `/readyz` waits for a store to answer. A pool whose database is down keeps
/// retrying the connection until its acquire timeout (30 s), and a probe that hangs is no
/// answer: past this the store counts as unavailable.
const READINESS_PING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

async fn bounded_ping(
    ping: impl std::future::Future<Output = Result<(), StoreError>>,
) -> Result<(), String> {
    match tokio::time::timeout(READINESS_PING_TIMEOUT, ping).await {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(_) => Err(format!(
            "no answer within {} ms",
            READINESS_PING_TIMEOUT.as_millis()
        )),
    }
}

/// `/healthz`, `/readyz` (NATS connected, read models answering, both projections
/// subscribed and consuming) and `/metrics`.
pub fn health_router(state: HealthState) -> axum::Router {
    axum::Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics::metrics_handler))
        .fallback(service_kit::problem::route_not_found)
        .with_state(state)
}

async fn readyz(State(state): State<HealthState>) -> Response {
    let nats = match state.nats.connection_state() {
        async_nats::connection::State::Connected => Ok(()),
        other => Err(format!("nats connection is {other}")),
    };
    // Concurrently, so the answer comes within one timeout (the chart's probe allows 2 s).
    let (students, courses) = tokio::join!(
        bounded_ping(state.students.ping()),
        bounded_ping(state.courses.ping())
    );
    health::readiness(vec![
        ("nats", nats),
        ("students_store", students),
        ("courses_store", courses),
        (
            "students_projection",
            state.progress.consuming(events::Projection::Students),
        ),
        (
            "courses_projection",
            state.progress.consuming(events::Projection::Courses),
        ),
    ])
}
