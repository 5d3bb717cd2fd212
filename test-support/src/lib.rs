//! Helpers shared by the integration tests of every crate. Tests run against the real NATS
//! and Postgres that `scripts/dev test` starts; each test gets its own stream names and its
//! own database, so tests run in parallel on one server without seeing each other.

use async_nats::jetstream;
use events::StreamNames;
use service_kit::ApiKeys;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

pub mod mongo;
mod nats_cluster;
mod nats_server;
mod netns;
mod old_nats;
mod postgres_server;
mod process;
mod tcp_proxy;
pub use nats_cluster::{NatsCluster, NatsClusterOptions};
pub use nats_server::{NatsServer, NatsStop};
pub use old_nats::NatsVersionStandIn;
pub use postgres_server::{PgStop, PostgresServer};
pub use process::ServiceProcess;
pub use tcp_proxy::TcpProxy;

/// Keys every in-process test server accepts.
pub const WRITE_KEY: &str = "test-write-key";
pub const READ_KEY: &str = "test-read-key";
/// The only key that may erase a student (and read); not a write key.
pub const ERASE_KEY: &str = "test-erase-key";

pub fn api_keys() -> ApiKeys {
    format!("write:{WRITE_KEY},read:{READ_KEY},erase:{ERASE_KEY}")
        .parse()
        .expect("test keys are valid")
}

/// NATS of the test stack (`scripts/dev services`), overridable with `NATS_URL`.
pub fn nats_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:14222".into())
}

/// [`nats_url`] as a socket address (for a proxy in front of it).
pub fn nats_addr() -> std::net::SocketAddr {
    nats_url()
        .trim_start_matches("nats://")
        .parse()
        .expect("NATS_URL is nats://<ip>:<port>")
}

/// Postgres of the test stack, overridable with `DATABASE_URL`.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:15432/school".into())
}

/// An event of `kind` on aggregate `id`, with fresh ids and the current time: what tests
/// that write to the stream or a store directly feed them.
pub fn event(
    kind: events::AggregateKind,
    id: Uuid,
    payload: events::EventPayload,
) -> events::Event {
    events::Event {
        metadata: events::EventMetadata {
            event_id: Uuid::now_v7(),
            aggregate_kind: kind,
            aggregate_id: id,
            occurred_at: chrono::Utc::now(),
            correlation_id: Uuid::now_v7(),
            causation_id: Uuid::now_v7(),
            trace: Default::default(),
        },
        payload,
    }
}

/// The key-encryption key of every test (never a real one): one line of a KEK file.
pub const TEST_KEK: &str =
    "test-kek:000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

/// [`TEST_KEK`] as services take it in process.
pub fn test_kek() -> std::sync::Arc<events::personal::KekRing> {
    std::sync::Arc::new(events::personal::KekRing::parse(TEST_KEK).expect("the test KEK"))
}

/// A file holding [`TEST_KEK`], for `KEK_FILE` of the service binaries a test starts.
pub fn test_kek_file() -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("school-test-kek-{}", std::process::id()));
    if !path.exists() {
        std::fs::write(&path, format!("{TEST_KEK}\n")).expect("writing the test KEK file");
    }
    path
}

/// Runs the service binary `binary` with `env`, first without `KEK_FILE`, then with a file
/// that holds no KEK: each time it must exit non-zero, its stderr saying what is missing or
/// wrong, before it reaches for any server.
pub fn assert_refuses_to_start_without_a_kek(binary: &str, env: &[(&str, &str)]) {
    let bad = std::env::temp_dir().join(format!("not-a-kek-{}", unique_suffix()));
    std::fs::write(&bad, "k1:0011\n").expect("write");
    for (kek, expected) in [(None, "KEK_FILE is not set"), (Some(&bad), "line 1")] {
        let mut command = std::process::Command::new(binary);
        command
            .envs(env.iter().copied())
            .env("LISTEN_ADDR", "127.0.0.1:0")
            .env_remove("KEK_FILE")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        if let Some(path) = kek {
            command.env("KEK_FILE", path);
        }
        let output = command.output().expect("the service ran");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "started without a KEK: {stderr}");
        assert!(stderr.contains(expected), "{stderr}");
    }
    let _ = std::fs::remove_file(&bad);
}

/// The one reading path with [`TEST_KEK`], for tests that read what a gateway wrote
/// (student names sealed with data keys in `names`' bucket).
pub fn test_reader(
    jetstream: &jetstream::Context,
    names: &StreamNames,
) -> service_kit::event_reader::EventReader {
    service_kit::event_reader::EventReader::lazy(jetstream.clone(), names.clone(), test_kek())
}

/// Seals events as the gateway does, for tests that write the stream directly: each
/// student gets a data key (a slot of a block this process writes) on its first sealed
/// event, and keeps it.
pub struct SealingKeys {
    keys: service_kit::data_keys::DataKeys,
    assigned: std::sync::Mutex<std::collections::HashMap<Uuid, events::personal::DataKeyRef>>,
}

impl SealingKeys {
    pub fn new(keys: service_kit::data_keys::DataKeys) -> Self {
        SealingKeys {
            keys,
            assigned: Default::default(),
        }
    }

    /// The data keys of `names`' bucket with [`TEST_KEK`].
    pub async fn bind(jetstream: &jetstream::Context, names: &StreamNames) -> Self {
        SealingKeys::new(
            service_kit::data_keys::DataKeys::bind(jetstream, names, test_kek())
                .await
                .expect("the data-key bucket"),
        )
    }

    pub fn data_keys(&self) -> &service_kit::data_keys::DataKeys {
        &self.keys
    }

    /// The student's key reference, allocated on first use.
    pub async fn key_of(&self, student: Uuid) -> events::personal::DataKeyRef {
        if let Some(key) = self.assigned.lock().expect("keys").get(&student) {
            return *key;
        }
        let (key, _) = self.keys.allocate().await.expect("a data key");
        *self
            .assigned
            .lock()
            .expect("keys")
            .entry(student)
            .or_insert(key)
    }

    /// `event` as the gateway stores it: a student's registration or update sealed with
    /// the student's key, anything else as it is.
    pub async fn encode(&self, event: &events::Event) -> Vec<u8> {
        use events::EventPayload::{StudentRegistered, StudentUpdated};
        if !matches!(event.payload, StudentRegistered(_) | StudentUpdated(_)) {
            return events::encode(event);
        }
        let key_ref = self.key_of(event.metadata.aggregate_id).await;
        let service_kit::data_keys::KeyLookup::Key(key) =
            self.keys.lookup(key_ref).await.expect("lookup")
        else {
            panic!(
                "student {} has no live data key",
                event.metadata.aggregate_id
            );
        };
        events::encode_sealed(event, key_ref, &key)
    }

    /// Destroys the student's data key (what an erasure does to it).
    pub async fn destroy(&self, student: Uuid) {
        let key = self.key_of(student).await;
        self.keys.destroy(key).await.expect("the key destroyed");
    }
}

/// Stored event bytes read as every consumer reads them (see [`test_reader`]).
pub async fn read_stored(
    jetstream: &jetstream::Context,
    names: &StreamNames,
    bytes: &[u8],
) -> events::Event {
    test_reader(jetstream, names)
        .read(bytes)
        .await
        .unwrap_or_else(|e| panic!("a stored event cannot be read: {e}"))
        .event
}

/// A short unique name fragment for one test.
pub fn unique_suffix() -> String {
    Uuid::new_v4().simple().to_string()[..12].to_owned()
}

/// A JetStream with this test's own streams, consumers and buckets already applied.
pub struct TestBroker {
    pub client: async_nats::Client,
    pub jetstream: jetstream::Context,
    pub names: StreamNames,
}

impl TestBroker {
    pub async fn start() -> TestBroker {
        let client = async_nats::connect(nats_url()).await.unwrap_or_else(|e| {
            panic!(
                "cannot reach NATS at {} ({e}); start the stack with `scripts/dev services`",
                nats_url()
            )
        });
        let jetstream = jetstream::new(client.clone());
        let names = StreamNames::new(format!("t{}", unique_suffix()));
        let topology = stream_admin::desired(&names, 1);
        stream_admin::apply(&jetstream, &topology, stream_admin::ApplyOptions::default())
            .await
            .expect("applying the test topology");
        TestBroker {
            client,
            jetstream,
            names,
        }
    }

    /// Deletes this test's streams (best effort: leftovers only cost disk).
    pub async fn cleanup(self) {
        delete_topology(&self.jetstream, &self.names).await;
    }

    /// Messages in this test's dead-letter stream.
    pub async fn dead_letter_count(&self) -> u64 {
        self.jetstream
            .get_stream(self.names.dead_letter_stream())
            .await
            .expect("dead-letter stream")
            .get_info()
            .await
            .expect("dead-letter stream info")
            .state
            .messages
    }
}

/// Deletes every stream and bucket `stream-admin apply` made for `names` (best effort).
pub async fn delete_topology(jetstream: &jetstream::Context, names: &StreamNames) {
    for stream in [
        names.event_stream(),
        names.dead_letter_stream(),
        format!("KV_{}", names.idempotency_bucket()),
        format!("KV_{}", names.projection_lease_bucket()),
        format!("KV_{}", names.student_keys_bucket()),
    ] {
        let _ = jetstream.delete_stream(stream).await;
    }
}

/// A new, empty database for one test, and its URL.
pub struct TestDatabase {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
}

impl TestDatabase {
    pub async fn create() -> TestDatabase {
        let admin_url = database_url();
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&admin_url)
            .await
            .unwrap_or_else(|e| {
                panic!("cannot reach Postgres at {admin_url} ({e}); start the stack with `scripts/dev services`")
            });
        let name = format!("test_{}", unique_suffix());
        // The name is generated here from hex digits only.
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await
            .expect("creating the test database");
        admin.close().await;
        let url = replace_database(&admin_url, &name);
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect(&url)
            .await
            .expect("connecting to the test database");
        TestDatabase { name, url, pool }
    }

    /// Drops the database (best effort).
    pub async fn cleanup(self) {
        self.pool.close().await;
        if let Ok(admin) = PgPoolOptions::new()
            .max_connections(1)
            .connect(&database_url())
            .await
        {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            )))
            .execute(&admin)
            .await;
        }
    }
}

/// `postgres://user@host:port/db?params` with `db` replaced.
fn replace_database(url: &str, database: &str) -> String {
    let (base, params) = match url.split_once('?') {
        Some((base, params)) => (base, Some(params)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[scheme_end..].find('/').map(|i| i + scheme_end);
    let host = path_start.map_or(base, |i| &base[..i]);
    match params {
        Some(params) => format!("{host}/{database}?{params}"),
        None => format!("{host}/{database}"),
    }
}

/// A free TCP port on loopback (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A private redis-server on its own port, for tests that stop and restart Redis; killed on
/// drop.
pub struct RedisServer {
    pub port: u16,
    child: Option<std::process::Child>,
}

impl RedisServer {
    pub fn start(port: u16) -> RedisServer {
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server on PATH (scripts/dev installs it)");
        RedisServer {
            port,
            child: Some(child),
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits until the server accepts commands.
    pub async fn ready(&self) {
        let address = ("127.0.0.1", self.port);
        eventually(10, "redis-server to accept connections", || async {
            tokio::net::TcpStream::connect(address)
                .await
                .ok()
                .map(|_| ())
        })
        .await;
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Polls `check` every 20 ms until it returns `Some`, or panics after `seconds`.
pub async fn eventually<T, F, Fut>(seconds: u64, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {seconds}s waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_name_is_replaced_and_parameters_kept() {
        assert_eq!(
            replace_database("postgres://postgres@127.0.0.1:15432/school", "t1"),
            "postgres://postgres@127.0.0.1:15432/t1"
        );
        assert_eq!(
            replace_database("postgres://u:p@h/school?sslmode=disable", "t1"),
            "postgres://u:p@h/t1?sslmode=disable"
        );
        assert_eq!(
            replace_database("postgres://h:1", "t1"),
            "postgres://h:1/t1"
        );
    }
}
