//! Configuration: environment variables with `--flag` mirrors, validated at start.

use std::net::SocketAddr;

use events::StreamNames;
use service_kit::nats::NatsArgs;

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "projectors",
    about = "Projects school events into the read models"
)]
pub struct Config {
    /// Address of the health and metrics endpoints.
    #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0:8080")]
    pub listen_addr: SocketAddr,
    /// Serve `/metrics` (and `/healthz`) on this address instead of the main port.
    #[arg(long, env = "METRICS_LISTEN_ADDR")]
    pub metrics_listen_addr: Option<SocketAddr>,
    /// Postgres holding the students read model.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// The courses read model: `mongodb://…` or `postgres://…` (default: DATABASE_URL).
    #[arg(long, env = "COURSES_STORE_URL", hide_env_values = true)]
    pub courses_store_url: Option<String>,
    /// Redis whose cached entries are deleted after each commit; unset: no invalidation.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// Prefix of every stream, subject and bucket name.
    #[arg(long, env = "STREAM_PREFIX", default_value = "school")]
    pub stream_prefix: StreamNames,
    /// Most events applied in one transaction.
    #[arg(long, env = "BATCH_SIZE", default_value_t = 1000, value_parser = clap::value_parser!(u16).range(1..=5000))]
    pub batch_size: u16,
    /// Active/standby: a standby takes a projection over when the active replica has not
    /// renewed its lease for this long (milliseconds).
    #[arg(long, env = "PROJECTION_LEASE_MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(500..=60_000))]
    pub projection_lease_ms: u64,
    /// This replica's name in the projection leases (default: `HOSTNAME`, the pod name).
    /// Two replicas must not share it; a restarted replica keeping it takes its leases
    /// back without waiting for them to expire.
    #[arg(long, env = "PROJECTOR_REPLICA_NAME")]
    pub projector_replica_name: Option<String>,
    /// File of key-encryption keys (lines `<id>:<64 hex digits>`) that open the students'
    /// data keys, for events whose personal fields are sealed: required, the projectors do
    /// not start without it.
    #[arg(long, env = "KEK_FILE")]
    pub kek_file: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub nats: NatsArgs,
}
