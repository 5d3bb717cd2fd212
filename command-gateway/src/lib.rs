//! command-gateway: accepts commands over REST, decides them against the current aggregate
//! state and appends the resulting events to JetStream. It never writes a read model.

pub mod aggregates;
pub mod commands;
pub mod config;
pub mod domain;
pub mod event_store;
pub mod http;
pub mod idempotency;
pub mod locks;
pub mod openapi;
pub mod outcome;

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use events::StreamNames;
use tokio::net::TcpListener;

pub use config::Config;

/// The handlers' state on top of a JetStream connection. Nothing is opened yet: a stream or
/// bucket that does not exist (yet) makes `/readyz` fail and commands answer `503` until
/// `stream-admin apply` has created it; the gateway never exits for it.
///
/// `kek` wraps the students' data keys: personal fields are sealed with them before they
/// reach the stream.
pub async fn app_state(
    nats: async_nats::Client,
    names: StreamNames,
    kek: Arc<events::personal::KekRing>,
) -> anyhow::Result<http::AppState> {
    state_sealing(nats, names, kek, true).await
}

async fn state_sealing(
    nats: async_nats::Client,
    names: StreamNames,
    kek: Arc<events::personal::KekRing>,
    seal: bool,
) -> anyhow::Result<http::AppState> {
    let jetstream = async_nats::jetstream::new(nats.clone());
    let idempotency =
        idempotency::IdempotencyStore::new(jetstream.clone(), &names.idempotency_bucket());
    let mut store = event_store::EventStore::new(jetstream, names, kek);
    if !seal {
        store = store.unsealed_for_benchmark();
    }
    Ok(http::AppState {
        commands: Arc::new(commands::CommandService::new(aggregates::Aggregates::new(
            store,
        ))),
        idempotency,
        nats: Arc::new(nats),
    })
}

/// Connects to NATS and builds the router from configuration.
pub async fn build(config: &Config) -> anyhow::Result<axum::Router> {
    // Before anything else: without its KEK the gateway must not take a single command.
    let kek = service_kit::event_reader::load_kek_ring(config.kek_file.as_deref())?;
    if config.unsealed_for_benchmark {
        tracing::warn!(
            "UNSEALED_FOR_BENCHMARK is set: students' names are written to the stream in the \
             clear and can never be erased; this is for the benchmark only"
        );
    }
    // In the background: NATS may come up after the gateway (a first install); until then
    // `/readyz` fails and commands answer 503.
    let nats = config.nats.connect_in_background("command-gateway").await?;
    let state = state_sealing(
        nats,
        config.stream_prefix.clone(),
        kek,
        !config.unsealed_for_benchmark,
    )
    .await?;
    Ok(http::router(
        state,
        config.limited_api_keys(),
        config.body_limit_bytes,
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
