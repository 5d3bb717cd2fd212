use anyhow::Context;
use clap::Parser;
use projectors::{Config, HealthState, PgStudents, ProjectionRunner};
use tokio::sync::watch;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    service_kit::logging::init();
    let nats = config.nats.connect("projectors").await?;
    let store = PgStudents::connect(&config.database_url)
        .await
        .context("connecting to DATABASE_URL and migrating")?;

    let listener = tokio::net::TcpListener::bind(config.listen_addr)
        .await
        .with_context(|| format!("binding LISTEN_ADDR {}", config.listen_addr))?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let health = axum::serve(
        listener,
        projectors::health_router(HealthState {
            nats: nats.clone(),
            store: store.clone(),
        }),
    )
    .with_graceful_shutdown(stopped(stop_rx.clone()));
    let health = tokio::spawn(async move { health.await });

    let runner = ProjectionRunner {
        jetstream: async_nats::jetstream::new(nats.clone()),
        names: config.stream_prefix.clone(),
        store,
        batch_size: usize::from(config.batch_size),
    };
    tracing::info!(addr = %config.listen_addr, "projectors running");
    let projection = tokio::spawn(runner.run(stopped(stop_rx)));

    service_kit::shutdown::signal().await;
    let _ = stop_tx.send(true);
    let result = projection.await.context("projection task panicked")?;
    health.await.context("health task panicked")??;
    // Acks are fire-and-forget publishes: flush them before exiting.
    nats.flush().await.context("flushing acks")?;
    result
}
