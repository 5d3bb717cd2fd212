use anyhow::Context;
use clap::Parser;
use command_gateway::Config;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    service_kit::logging::init();
    let exporting = service_kit::otlp::init("command-gateway")?;
    let app = command_gateway::build(&config).await?;
    if let Some(addr) = config.metrics_listen_addr {
        service_kit::metrics::serve_on_own_port(addr).await?;
    }
    let listener = tokio::net::TcpListener::bind(config.listen_addr)
        .await
        .with_context(|| format!("binding LISTEN_ADDR {}", config.listen_addr))?;
    tracing::info!(addr = %config.listen_addr, "command-gateway listening");
    let served = command_gateway::run(listener, app, service_kit::shutdown::signal()).await;
    if let Some(exporting) = exporting {
        exporting.shutdown().await;
    }
    served
}
