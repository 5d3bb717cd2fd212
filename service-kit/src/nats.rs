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
        let servers = server_list(&self.nats_url)?;
        options
            .connect(servers)
            .await
            .with_context(|| format!("connecting to NATS at {}", self.nats_url))
    }
}

/// `NATS_URL` as a server list: one URL or several separated by commas (a cluster's nodes,
/// tried in turn). async-nats parses a `&str` as a single URL, so the list is split here.
fn server_list(urls: &str) -> anyhow::Result<Vec<async_nats::ServerAddr>> {
    let servers = urls
        .split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(|url| {
            url.parse::<async_nats::ServerAddr>()
                .with_context(|| format!("NATS_URL: `{url}` is not a NATS server URL"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    anyhow::ensure!(!servers.is_empty(), "NATS_URL names no server");
    Ok(servers)
}

/// The stream sequence of the newest message on `subjects` (wildcards allowed), as the
/// stream's leader knows it (`STREAM.MSG.GET` with `last_by_subj`). Not a direct get: with
/// `allow_direct` any replica answers those, and a follower may not have applied the newest
/// appends yet, while every caller decides something on this answer (a read-your-writes
/// wait, where a copy or a history ends). `Ok(None)`: the stream holds no such message.
pub async fn last_sequence_on(
    client: &async_nats::Client,
    stream: &str,
    subjects: &str,
    timeout: Duration,
) -> anyhow::Result<Option<u64>> {
    let request = serde_json::json!({ "last_by_subj": subjects }).to_string();
    let message = tokio::time::timeout(
        timeout,
        client.request(format!("$JS.API.STREAM.MSG.GET.{stream}"), request.into()),
    )
    .await
    .with_context(|| format!("asking {stream}'s leader for its last message timed out"))?
    .with_context(|| format!("asking {stream}'s leader for its last message"))?;
    parse_last_message_sequence(&message.payload)
        .with_context(|| format!("the last message of {stream}"))
}

/// JetStream's error code for "no message found".
const NO_MESSAGE_FOUND: u64 = 10037;

/// The `seq` of a `STREAM.MSG.GET` answer, `None` for "no message found".
fn parse_last_message_sequence(payload: &[u8]) -> anyhow::Result<Option<u64>> {
    #[derive(serde::Deserialize)]
    struct Answer {
        message: Option<Stored>,
        error: Option<ApiError>,
    }
    #[derive(serde::Deserialize)]
    struct Stored {
        seq: u64,
    }
    #[derive(serde::Deserialize)]
    struct ApiError {
        #[serde(default)]
        err_code: u64,
        #[serde(default)]
        description: String,
    }
    let answer: Answer = serde_json::from_slice(payload).context("unreadable answer")?;
    match (answer.message, answer.error) {
        (Some(stored), _) => Ok(Some(stored.seq)),
        (None, Some(error)) if error.err_code == NO_MESSAGE_FOUND => Ok(None),
        (None, Some(error)) => anyhow::bail!("{} ({})", error.description, error.err_code),
        (None, None) => anyhow::bail!("an answer with neither message nor error"),
    }
}

/// The oldest nats-server this system runs on: 2.14.0 is the first with consumer reset
/// (`$JS.API.CONSUMER.RESET`, ADR-60), which every projection subscription starts with.
/// Older servers answer it as a bad request, so a projection would retry forever.
pub const MIN_SERVER_VERSION: ServerVersion = ServerVersion {
    major: 2,
    minor: 14,
    patch: 0,
    pre_release: false,
};

/// A nats-server version as its `INFO` reports it (`2.15.1`, `2.14.0-RC.2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerVersion {
    pub major: u64,
    pub minor: u64,
    pub patch: u64,
    /// A release candidate or beta of `major.minor.patch`: older than the release itself.
    pub pre_release: bool,
}

impl ServerVersion {
    pub fn parse(text: &str) -> Option<ServerVersion> {
        let text = text.trim().trim_start_matches('v');
        let (core, pre) = match text.split_once('-') {
            Some((core, pre)) => (core, !pre.is_empty()),
            None => (text, false),
        };
        let mut parts = core.split('.').map(|part| part.parse::<u64>().ok());
        let (major, minor, patch) = (parts.next()??, parts.next()??, parts.next()??);
        if parts.next().is_some() {
            return None;
        }
        Some(ServerVersion {
            major,
            minor,
            patch,
            pre_release: pre,
        })
    }

    fn key(&self) -> (u64, u64, u64, bool) {
        (self.major, self.minor, self.patch, !self.pre_release)
    }
}

impl PartialOrd for ServerVersion {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ServerVersion {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key().cmp(&other.key())
    }
}

impl std::fmt::Display for ServerVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// `Err` with one line naming the version found and the version needed when the server is
/// older than [`MIN_SERVER_VERSION`] (or reports a version that cannot be read).
pub fn check_server_version(reported: &str) -> Result<(), String> {
    match ServerVersion::parse(reported) {
        Some(version) if version >= MIN_SERVER_VERSION => Ok(()),
        Some(_) => Err(format!(
            "nats-server {reported} is too old: {MIN_SERVER_VERSION} or newer is needed \
             (consumer reset, ADR-60); upgrade the server"
        )),
        None => Err(format!(
            "nats-server reports version {reported:?}, which is not a version number; \
             {MIN_SERVER_VERSION} or newer is needed"
        )),
    }
}

/// [`check_server_version`] for the server `client` is connected to now. `Ok(false)`: not
/// connected yet, nothing to check.
pub fn check_connected_server(client: &async_nats::Client) -> Result<bool, String> {
    if client.connection_state() != async_nats::connection::State::Connected {
        return Ok(false);
    }
    check_server_version(&client.server_info().version).map(|()| true)
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
    fn nats_url_is_one_url_or_a_comma_separated_list() {
        assert_eq!(server_list("nats://127.0.0.1:4222").expect("one").len(), 1);
        let three = server_list("nats://10.0.0.1:4222, nats://10.0.0.2:4222,nats://n3:4222")
            .expect("three");
        assert_eq!(three.len(), 3);
        assert!(server_list("nats://a:1,nats://b:notaport").is_err());
        assert!(server_list(" , ").is_err());
    }

    #[test]
    fn a_last_message_answer_gives_its_sequence_and_no_message_gives_none() {
        let found = br#"{"type":"io.nats.jetstream.api.v1.stream_msg_get_response","message":{"subject":"a.b","seq":42,"data":"","time":"2026-12-03T00:00:00Z"}}"#;
        assert_eq!(parse_last_message_sequence(found).expect("found"), Some(42));
        let none = br#"{"type":"x","error":{"code":404,"err_code":10037,"description":"no message found"}}"#;
        assert_eq!(parse_last_message_sequence(none).expect("none"), None);
        let other = br#"{"type":"x","error":{"code":503,"err_code":10008,"description":"JetStream system temporarily unavailable"}}"#;
        assert!(parse_last_message_sequence(other).is_err());
        assert!(parse_last_message_sequence(b"not json").is_err());
    }

    #[test]
    fn servers_older_than_2_14_are_refused_with_both_versions_named() {
        for old in ["2.12.3", "2.11.10", "2.14.0-RC.1", "1.9.0"] {
            let error = check_server_version(old).expect_err(old);
            assert!(error.contains(old) && error.contains("2.14.0"), "{error}");
        }
        for new in ["2.14.0", "2.15.1", "v2.15.1", "2.16.0-beta.2", "3.0.0"] {
            assert_eq!(check_server_version(new), Ok(()), "{new}");
        }
        assert!(check_server_version("").is_err());
        assert!(check_server_version("2.15").is_err());
        assert!(check_server_version("2.15.1.4").is_err());
    }

    #[test]
    fn reconnect_backoff_grows_and_is_capped() {
        assert_eq!(reconnect_delay(0), Duration::from_millis(100));
        assert_eq!(reconnect_delay(3), Duration::from_millis(800));
        assert_eq!(reconnect_delay(1000), Duration::from_secs(5));
    }
}
