//! NATS connection options shared by every service: URL, credentials or nkey, TLS, and
//! reconnection with capped exponential backoff.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

/// NATS settings, from environment variables or the mirrored `--flags`.
#[derive(Debug, Clone, clap::Args)]
pub struct NatsArgs {
    /// NATS server URL(s), comma-separated.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Credentials file (JWT + nkey seed) for decentralized auth.
    #[arg(long, env = "NATS_CREDS_FILE")]
    pub nats_creds_file: Option<PathBuf>,
    /// File holding an nkey seed.
    #[arg(long, env = "NATS_NKEY_FILE", conflicts_with = "nats_creds_file")]
    pub nats_nkey_file: Option<PathBuf>,
    /// CA certificate (PEM) to verify the server; implies TLS.
    #[arg(long, env = "NATS_TLS_CA_FILE")]
    pub nats_tls_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS; needs --nats-tls-key-file.
    #[arg(long, env = "NATS_TLS_CERT_FILE", requires = "nats_tls_key_file")]
    pub nats_tls_cert_file: Option<PathBuf>,
    /// Client private key (PEM) for mutual TLS.
    #[arg(long, env = "NATS_TLS_KEY_FILE", requires = "nats_tls_cert_file")]
    pub nats_tls_key_file: Option<PathBuf>,
    /// Refuse a plaintext connection.
    #[arg(long, env = "NATS_REQUIRE_TLS", default_value_t = false)]
    pub nats_require_tls: bool,
}

impl NatsArgs {
    /// Connects, naming the connection after the service so it shows in server monitoring.
    pub async fn connect(&self, connection_name: &str) -> anyhow::Result<async_nats::Client> {
        self.connect_with(connection_name, false).await
    }

    /// Like [`connect`](Self::connect), but returns at once and keeps connecting in the
    /// background, for services that can do useful work without NATS.
    pub async fn connect_in_background(
        &self,
        connection_name: &str,
    ) -> anyhow::Result<async_nats::Client> {
        self.connect_with(connection_name, true).await
    }

    async fn connect_with(
        &self,
        connection_name: &str,
        in_background: bool,
    ) -> anyhow::Result<async_nats::Client> {
        let mut options = async_nats::ConnectOptions::new()
            .name(connection_name)
            .connection_timeout(Duration::from_secs(5))
            .reconnect_delay_callback(reconnect_delay)
            .event_callback(|event| async move {
                tracing::info!(%event, "nats connection event");
            });
        if let Some(path) = &self.nats_creds_file {
            options = options
                .credentials_file(path)
                .await
                .with_context(|| format!("reading NATS_CREDS_FILE {}", path.display()))?;
        }
        if let Some(path) = &self.nats_nkey_file {
            let seed = std::fs::read_to_string(path)
                .with_context(|| format!("reading NATS_NKEY_FILE {}", path.display()))?;
            options = options.nkey(seed.trim().to_owned());
        }
        if let Some(path) = &self.nats_tls_ca_file {
            options = options
                .add_root_certificates(path.clone())
                .require_tls(true);
        }
        if let (Some(cert), Some(key)) = (&self.nats_tls_cert_file, &self.nats_tls_key_file) {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        if self.nats_require_tls {
            options = options.require_tls(true);
        }
        if in_background {
            options = options.retry_on_initial_connect();
        }
        options
            .connect(self.nats_url.as_str())
            .await
            .with_context(|| format!("connecting to NATS at {}", self.nats_url))
    }
}

/// The newest message on `subjects` (wildcards allowed) of a stream, by JetStream direct
/// get (`last_by_subj`, answered by any replica; the stream needs `allow_direct`).
/// `Ok(None)`: the stream holds no such message.
pub async fn last_sequence_on(
    client: &async_nats::Client,
    stream: &str,
    subjects: &str,
    timeout: Duration,
) -> anyhow::Result<Option<u64>> {
    let request = serde_json::json!({ "last_by_subj": subjects }).to_string();
    let message = tokio::time::timeout(
        timeout,
        client.request(format!("$JS.API.DIRECT.GET.{stream}"), request.into()),
    )
    .await
    .with_context(|| format!("direct get on {stream} timed out"))?
    .with_context(|| format!("direct get on {stream}"))?;
    if message.status == Some(async_nats::StatusCode::NOT_FOUND) {
        return Ok(None);
    }
    let sequence = message
        .headers
        .as_ref()
        .and_then(|headers| headers.get("Nats-Sequence"))
        .and_then(|value| value.as_str().parse::<u64>().ok())
        .with_context(|| format!("direct get on {stream} answered no sequence"))?;
    Ok(Some(sequence))
}

/// 100 ms doubling per attempt, capped at 5 s.
fn reconnect_delay(attempt: usize) -> Duration {
    let exponent = u32::try_from(attempt.min(6)).unwrap_or(6);
    Duration::from_millis(100 * 2u64.pow(exponent)).min(Duration::from_secs(5))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_backoff_grows_and_is_capped() {
        assert_eq!(reconnect_delay(0), Duration::from_millis(100));
        assert_eq!(reconnect_delay(3), Duration::from_millis(800));
        assert_eq!(reconnect_delay(1000), Duration::from_secs(5));
    }
}
