//! Configuration: environment variables with `--flag` mirrors, validated at start.

use std::net::SocketAddr;

use events::StreamNames;
use service_kit::nats::NatsArgs;
use service_kit::{ApiKeys, RateLimitArgs};

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "command-gateway",
    about = "REST command side of the school system"
)]
pub struct Config {
    /// Address the HTTP API listens on.
    #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0:8080")]
    pub listen_addr: SocketAddr,
    /// Serve `/metrics` (and `/healthz`) on this address instead of the main port.
    #[arg(long, env = "METRICS_LISTEN_ADDR")]
    pub metrics_listen_addr: Option<SocketAddr>,
    /// API keys as `write:KEY,read:KEY,...`; writes need a write key.
    #[arg(long, env = "API_KEYS", hide_env_values = true)]
    pub api_keys: ApiKeys,
    #[command(flatten)]
    pub rate_limit: RateLimitArgs,
    /// Prefix of every stream, subject and bucket name.
    #[arg(long, env = "STREAM_PREFIX", default_value = "school")]
    pub stream_prefix: StreamNames,
    /// Largest accepted request body in bytes.
    #[arg(long, env = "BODY_LIMIT_BYTES", default_value_t = 64 * 1024)]
    pub body_limit_bytes: usize,
    /// File of key-encryption keys (lines `<id>:<64 hex digits>`, the first wraps new data
    /// keys): required, the gateway does not start without it.
    #[arg(long, env = "KEK_FILE")]
    pub kek_file: Option<std::path::PathBuf>,
    /// Writes students' names in the clear: only for the benchmark's figure without
    /// encryption, never in a deployment (hidden; logged loudly when set).
    #[arg(long, env = "UNSEALED_FOR_BENCHMARK", hide = true)]
    pub unsealed_for_benchmark: bool,
    #[command(flatten)]
    pub nats: NatsArgs,
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
