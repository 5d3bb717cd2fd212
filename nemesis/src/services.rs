//! The services as the chart runs them: separate processes of the real binaries, configured
//! by environment, each with its own ports on loopback.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use test_support::{ServiceProcess, free_port};

/// The directory of the workspace's binaries: the test executable lives in
/// `target/<profile>/deps/`, the service binaries one level up (`scripts/dev test` builds
/// them before the tests; `cargo nextest run --workspace` builds them for their own crates'
/// tests).
/// `NEMESIS_BIN_DIR` names another directory (a release build, or an older build to show
/// that a test fails on it).
pub fn binary(name: &str) -> Result<PathBuf, String> {
    let dir = match std::env::var_os("NEMESIS_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let exe = std::env::current_exe().map_err(|e| format!("the test executable: {e}"))?;
            exe.parent()
                .and_then(|deps| deps.parent())
                .ok_or("the test executable has no target directory")?
                .to_path_buf()
        }
    };
    let path = dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "{} is not built (run `cargo build --workspace` or `scripts/dev test`)",
            path.display()
        ))
    }
}

/// What every service of one run shares.
#[derive(Debug, Clone)]
pub struct Shared {
    pub prefix: String,
    pub api_keys: String,
    pub database_url: String,
    pub redis_url: String,
    /// The courses' store when not the Postgres of `database_url` (a `mongodb://` URL).
    pub courses_store_url: Option<String>,
    /// Where each service writes its log (`<name>.log`, at debug level for this
    /// workspace's crates); `None`: logs only with `NEMESIS_SERVICE_LOG`, to the terminal.
    pub log_dir: Option<PathBuf>,
}

/// `RUST_LOG` of services whose logs a test reads: everything this workspace logs.
pub const VERBOSE_LOG: &str = "info,command_gateway=debug,projectors=debug,query_api=debug,service_kit=debug,read_models=debug,stream_admin=debug";

/// One running service.
pub struct Service {
    pub name: String,
    pub process: ServiceProcess,
    /// The HTTP port (API, `/readyz`, `/metrics`).
    pub port: u16,
    pub grpc_port: Option<u16>,
}

impl Service {
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Waits (bounded) until `/readyz` answers 200.
    pub async fn wait_ready(&mut self, http: &reqwest::Client) {
        let url = format!("{}/readyz", self.url());
        self.process
            .wait_until(|| {
                let request = http.get(&url).timeout(Duration::from_millis(500));
                async move { request.send().await.is_ok_and(|r| r.status().is_success()) }
            })
            .await;
    }

    /// SIGTERM, then SIGKILL after a grace period.
    pub async fn stop(&mut self) {
        self.process.sigterm();
        if self
            .process
            .exit_within(Duration::from_secs(10))
            .await
            .is_none()
        {
            self.process.kill();
        }
    }
}

fn spawn(
    name: &str,
    binary: &str,
    env: &[(&str, String)],
    log_dir: Option<&std::path::Path>,
) -> Result<Service, String> {
    let port = free_port();
    let mut command = Command::new(self::binary(binary)?);
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env(
            "RUST_LOG",
            std::env::var("NEMESIS_SERVICE_LOG").unwrap_or_else(|_| "error".into()),
        )
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    if let Some(dir) = log_dir {
        let log = std::fs::File::create(dir.join(format!("{name}.log")))
            .map_err(|e| format!("the log file of {name}: {e}"))?;
        let log_too = log
            .try_clone()
            .map_err(|e| format!("the log file of {name}: {e}"))?;
        command
            .env("RUST_LOG", VERBOSE_LOG)
            .stdout(log)
            .stderr(log_too);
    } else {
        // The services log JSON to stdout: shown only when a log level is asked for.
        command
            .stdout(if std::env::var_os("NEMESIS_SERVICE_LOG").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::inherit());
    }
    let mut service = Service {
        name: name.to_owned(),
        process: ServiceProcess::spawn(name, &mut command),
        port,
        grpc_port: None,
    };
    if let Some((_, grpc)) = env.iter().find(|(k, _)| *k == "GRPC_LISTEN_ADDR") {
        service.grpc_port = grpc.rsplit(':').next().and_then(|p| p.parse().ok());
    }
    Ok(service)
}

pub fn gateway(name: &str, nats_urls: &str, shared: &Shared) -> Result<Service, String> {
    spawn(
        name,
        "command-gateway",
        &[
            ("NATS_URL", nats_urls.to_owned()),
            ("STREAM_PREFIX", shared.prefix.clone()),
            ("API_KEYS", shared.api_keys.clone()),
            (
                "KEK_FILE",
                test_support::test_kek_file().display().to_string(),
            ),
        ],
        shared.log_dir.as_deref(),
    )
}

pub fn query_api(name: &str, nats_urls: &str, shared: &Shared) -> Result<Service, String> {
    spawn(
        name,
        "query-api",
        &[
            ("NATS_URL", nats_urls.to_owned()),
            ("STREAM_PREFIX", shared.prefix.clone()),
            ("API_KEYS", shared.api_keys.clone()),
            ("DATABASE_URL", shared.database_url.clone()),
            ("REDIS_URL", shared.redis_url.clone()),
            ("GRPC_LISTEN_ADDR", format!("127.0.0.1:{}", free_port())),
            ("COURSES_STORE_URL", courses_store_url(shared)),
        ],
        shared.log_dir.as_deref(),
    )
}

fn courses_store_url(shared: &Shared) -> String {
    shared
        .courses_store_url
        .clone()
        .unwrap_or_else(|| shared.database_url.clone())
}

pub fn projectors(name: &str, nats_urls: &str, shared: &Shared) -> Result<Service, String> {
    spawn(
        name,
        "projectors",
        &[
            ("NATS_URL", nats_urls.to_owned()),
            ("STREAM_PREFIX", shared.prefix.clone()),
            ("DATABASE_URL", shared.database_url.clone()),
            ("REDIS_URL", shared.redis_url.clone()),
            ("PROJECTOR_REPLICA_NAME", name.to_owned()),
            ("COURSES_STORE_URL", courses_store_url(shared)),
            (
                "KEK_FILE",
                test_support::test_kek_file().display().to_string(),
            ),
        ],
        shared.log_dir.as_deref(),
    )
}
