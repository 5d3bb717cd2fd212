use anyhow::Context;
use clap::Parser;
use query_api::Config;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    service_kit::logging::init();
    let app = query_api::build(&config).await?;
    let listener = tokio::net::TcpListener::bind(config.listen_addr)
        .await
        .with_context(|| format!("binding LISTEN_ADDR {}", config.listen_addr))?;
    tracing::info!(addr = %config.listen_addr, "query-api listening");
    query_api::run(listener, app, service_kit::shutdown::signal()).await
}
