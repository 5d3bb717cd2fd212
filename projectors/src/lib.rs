//! projectors: durable JetStream consumers that keep the read models up to date, exactly
//! once in effect. The code here is also what `stream-admin replay` reuses.

pub mod config;
pub mod consumer;
pub mod dead_letters;
pub mod pg_students;

use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use service_kit::health;

pub use config::Config;
pub use consumer::ProjectionRunner;
pub use pg_students::PgStudents;

/// What the health endpoints look at.
#[derive(Clone)]
pub struct HealthState {
    pub nats: async_nats::Client,
    pub store: PgStudents,
}

/// `/healthz` and `/readyz` (NATS connected, Postgres answering).
pub fn health_router(state: HealthState) -> axum::Router {
    axum::Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(readyz))
        .fallback(service_kit::problem::route_not_found)
        .with_state(state)
}

async fn readyz(State(state): State<HealthState>) -> Response {
    let nats = match state.nats.connection_state() {
        async_nats::connection::State::Connected => Ok(()),
        other => Err(format!("nats connection is {other}")),
    };
    let postgres = sqlx::query("SELECT 1")
        .execute(state.store.pool())
        .await
        .map(|_| ())
        .map_err(|e| format!("postgres: {e}"));
    health::readiness(vec![("nats", nats), ("postgres", postgres)])
}
