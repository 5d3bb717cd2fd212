//! command-gateway: accepts commands over REST, decides them against the current aggregate
//! state and appends the resulting events to JetStream. It never writes a read model.

pub mod config;
pub mod domain;
pub mod event_store;
pub mod http;

use std::future::Future;

use anyhow::Context;
use tokio::net::TcpListener;

pub use config::Config;

/// Connects to NATS and builds the router from configuration.
pub async fn build(config: &Config) -> anyhow::Result<axum::Router> {
    let nats = config.nats.connect("command-gateway").await?;
    let jetstream = async_nats::jetstream::new(nats.clone());
    let store = event_store::EventStore::new(jetstream, config.stream_prefix.clone());
    let state = http::AppState { store, nats };
    Ok(http::router(
        state,
        config.api_keys.clone(),
        config.body_limit_bytes,
    ))
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
