use anyhow::Context;
use clap::Parser;
use query_api::Config;
use tokio::sync::watch;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    service_kit::logging::init();
    let exporting = service_kit::otlp::init("query-api")?;
    let queries = query_api::queries(&config).await?;
    let keys = config.limited_api_keys();
    let app = query_api::http::router(queries.clone(), keys.clone());
    if let Some(addr) = config.metrics_listen_addr {
        service_kit::metrics::serve_on_own_port(addr).await?;
    }
    let http_listener = tokio::net::TcpListener::bind(config.listen_addr)
        .await
        .with_context(|| format!("binding LISTEN_ADDR {}", config.listen_addr))?;
    let grpc_listener = tokio::net::TcpListener::bind(config.grpc_listen_addr)
        .await
        .with_context(|| format!("binding GRPC_LISTEN_ADDR {}", config.grpc_listen_addr))?;
    tracing::info!(
        http = %config.listen_addr,
        grpc = %config.grpc_listen_addr,
        "query-api listening"
    );
    // One signal stops both servers; each finishes its in-flight requests.
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let http = tokio::spawn(query_api::run(http_listener, app, stopped(stop_rx.clone())));
    let grpc = tokio::spawn(query_api::grpc::run(
        grpc_listener,
        queries,
        keys,
        stopped(stop_rx),
    ));
    service_kit::shutdown::signal().await;
    let _ = stop_tx.send(true);
    let http = http.await.context("HTTP server panicked")?;
    let grpc = grpc.await.context("gRPC server panicked")?;
    if let Some(exporting) = exporting {
        exporting.shutdown().await;
    }
    http.and(grpc)
}
