//! query-api: serves the read models over REST. It never writes anything.

pub mod config;
pub mod http;
pub mod pg_students;

use std::future::Future;

use anyhow::Context;
use tokio::net::TcpListener;

pub use config::Config;

/// Connects to the read models and builds the router from configuration.
pub async fn build(config: &Config) -> anyhow::Result<axum::Router> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(config.database_max_connections)
        .connect(&config.database_url)
        .await
        .context("connecting to DATABASE_URL")?;
    let state = http::AppState {
        students: pg_students::PgStudents::new(pool),
    };
    Ok(http::router(state, config.api_keys.clone()))
}

/// Serves `app` on `listener` until `shutdown` completes, then finishes in-flight requests.
pub async fn run(
    listener: TcpListener,
    app: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .context("serving HTTP")
}
