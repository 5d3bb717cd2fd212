//! query-api: serves the read models over REST through a Redis cache. It never writes a
//! read model (it only fills the cache).

pub mod cache;
pub mod config;
pub mod consistency;
pub mod grpc;
pub mod http;
pub mod models;
pub mod openapi;
pub mod queries;

use std::future::Future;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;

pub use config::Config;
pub use queries::Queries;

/// Connects to the read models, Redis and NATS (the latter two lazily: reads work without
/// them) and builds the lookups from configuration.
pub async fn queries(config: &Config) -> anyhow::Result<Queries> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(config.database_max_connections)
        .connect(&config.database_url)
        .await
        .context("connecting to DATABASE_URL")?;
    let courses_url = config
        .courses_store_url
        .as_deref()
        .unwrap_or(&config.database_url);
    // The same database as the students: share the pool rather than open a second one.
    let shared_pool = (courses_url == config.database_url).then(|| pool.clone());
    let courses = read_models::CourseStore::connect_reader(courses_url, shared_pool)
        .await
        .context("connecting to COURSES_STORE_URL")?;
    let models = models::ReadModels {
        students: read_models::StudentReader::new(pool),
        courses,
    };
    let cache = cache::Cache::new(config.redis_url.as_deref()).context("REDIS_URL")?;
    let nats = config.nats.connect_in_background("query-api").await?;
    let consistency = consistency::Consistency::new(
        models.clone(),
        Some(nats),
        config.stream_prefix.clone(),
        Duration::from_millis(config.consistency_wait_ms),
    );
    Ok(Queries::new(
        models,
        cache,
        config.stream_prefix.clone(),
        consistency,
    ))
}

/// Serves `app` on `listener` until `shutdown` completes, then drains and finishes in-flight
/// requests without cutting one a client had sent (`service_kit::shutdown::serve_http`).
pub async fn run(
    listener: TcpListener,
    app: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    service_kit::shutdown::serve_http(listener, app, shutdown)
        .await
        .context("serving HTTP")
}
