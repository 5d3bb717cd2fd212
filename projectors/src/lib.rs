//! projectors: durable JetStream consumers that keep the read models up to date, exactly
//! once in effect. The code here is also what `stream-admin replay` reuses.

pub mod config;
pub mod consumer;
pub mod course_document;
pub mod course_store;
pub mod dead_letters;
pub mod generation;
pub mod mongo_courses;
pub mod pg_courses;
pub mod pg_students;
pub mod redis_cache;
pub mod store;
pub mod student_fold;

use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use service_kit::{health, metrics};

pub use config::Config;
pub use consumer::{ProjectionProgress, ProjectionRunner};
pub use course_store::CourseStore;
pub use pg_students::PgStudents;
pub use store::{BatchOutcome, ProjectionStore, StoreError};

/// What the health endpoints look at.
#[derive(Clone)]
pub struct HealthState {
    pub nats: async_nats::Client,
    pub students: PgStudents,
    pub courses: CourseStore,
    pub progress: Arc<ProjectionProgress>,
}

/// `/healthz`, `/readyz` (NATS connected, read models answering) and `/metrics`.
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
    let students = state.students.ping().await.map_err(|e| e.to_string());
    let courses = state.courses.ping().await.map_err(|e| e.to_string());
    health::readiness(vec![
        ("nats", nats),
        ("students_store", students),
        ("courses_store", courses),
    ])
}
