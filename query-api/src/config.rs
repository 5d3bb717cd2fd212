//! Configuration: environment variables with `--flag` mirrors, validated at start.

use std::net::SocketAddr;

use service_kit::ApiKeys;

#[derive(Debug, Clone, clap::Parser)]
#[command(name = "query-api", about = "Read side of the school system")]
pub struct Config {
    /// Address the HTTP API listens on.
    #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0:8080")]
    pub listen_addr: SocketAddr,
    /// API keys as `write:KEY,read:KEY,...`; any key may read.
    #[arg(long, env = "API_KEYS", hide_env_values = true)]
    pub api_keys: ApiKeys,
    /// Postgres holding the students read model.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// Connections to Postgres.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 16)]
    pub database_max_connections: u32,
}
