//! Configuration: environment variables with `--flag` mirrors, validated at start.

use std::net::SocketAddr;

use events::StreamNames;
use service_kit::nats::NatsArgs;
use service_kit::{ApiKeys, RateLimitArgs};

#[derive(Debug, Clone, clap::Parser)]
#[command(name = "query-api", about = "Read side of the school system")]
pub struct Config {
    /// Address the HTTP API listens on.
    #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0:8080")]
    pub listen_addr: SocketAddr,
    /// Serve `/metrics` (and `/healthz`) on this address instead of the main port.
    #[arg(long, env = "METRICS_LISTEN_ADDR")]
    pub metrics_listen_addr: Option<SocketAddr>,
    /// Address the gRPC API listens on.
    #[arg(long, env = "GRPC_LISTEN_ADDR", default_value = "0.0.0.0:9000")]
    pub grpc_listen_addr: SocketAddr,
    /// API keys as `write:KEY,read:KEY,...`; any key may read.
    #[arg(long, env = "API_KEYS", hide_env_values = true)]
    pub api_keys: ApiKeys,
    #[command(flatten)]
    pub rate_limit: RateLimitArgs,
    /// Postgres holding the students read model.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// The courses read model: `mongodb://…` or `postgres://…` (default: DATABASE_URL).
    #[arg(long, env = "COURSES_STORE_URL", hide_env_values = true)]
    pub courses_store_url: Option<String>,
    /// Redis for the cache; unset: every read goes to the databases.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// Prefix of every stream, subject, bucket and cache key.
    #[arg(long, env = "STREAM_PREFIX", default_value = "school")]
    pub stream_prefix: StreamNames,
    /// Connections to Postgres.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 16)]
    pub database_max_connections: u32,
    #[command(flatten)]
    pub nats: NatsArgs,
    /// Longest wait, in milliseconds, for a read carrying `X-Consistency-Token`.
    #[arg(long, env = "CONSISTENCY_WAIT_MS", default_value_t = 2000)]
    pub consistency_wait_ms: u64,
}

impl Config {
    /// The API keys with their per-key rate limit: build once and share the clones, so
    /// every route (and, in query-api, both protocols) spends the same budget.
    pub fn limited_api_keys(&self) -> ApiKeys {
        self.api_keys
            .clone()
            .with_rate_limit(self.rate_limit.limit())
    }
}
