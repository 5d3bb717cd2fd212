//! The system under measurement: the release binaries started as processes of their own on
//! streams and a database of their own (on the local stack's NATS, Postgres and Redis), so a
//! benchmark never touches the stack's data and every run starts empty.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use test_support::{TestBroker, TestDatabase};

pub const WRITE_KEY: &str = "bench-write-key";
pub const READ_KEY: &str = "bench-read-key";

/// Streams and a database of one measurement.
pub struct World {
    pub broker: TestBroker,
    pub db: TestDatabase,
}

impl World {
    pub async fn new() -> World {
        World {
            broker: TestBroker::start().await,
            db: TestDatabase::create().await,
        }
    }

    pub async fn cleanup(self) {
        self.db.cleanup().await;
        self.broker.cleanup().await;
    }

    /// Environment every service of this world gets.
    fn environment(&self, with_redis: bool) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("NATS_URL", test_support::nats_url()),
            ("DATABASE_URL", self.db.url.clone()),
            ("STREAM_PREFIX", self.broker.names.prefix().to_owned()),
            ("API_KEYS", format!("write:{WRITE_KEY},read:{READ_KEY}")),
            // One key drives every load: a limit that never bites, so the limiter's cost is
            // measured but not its refusals.
            ("RATE_LIMIT_PER_SECOND", "1000000000".to_owned()),
            ("RUST_LOG", "warn".to_owned()),
            (
                "KEK_FILE",
                test_support::test_kek_file().display().to_string(),
            ),
        ];
        if with_redis {
            env.push(("REDIS_URL", redis_url()));
        }
        env
    }

    /// Another gateway on this world that stores students' names in the clear
    /// (`UNSEALED_FOR_BENCHMARK`), for the cost of sealing them, measured beside the real one.
    pub async fn start_unsealed_gateway(&self, bin_dir: &Path) -> anyhow::Result<Process> {
        let mut env = self.environment(false);
        env.push(("UNSEALED_FOR_BENCHMARK", "true".to_owned()));
        Process::start(&bin_dir.join("command-gateway"), &env, None).await
    }

    /// Starts the three services on this world (projectors first: they create the tables).
    pub async fn start_system(&self, bin_dir: &Path) -> anyhow::Result<System> {
        let projectors =
            Process::start(&bin_dir.join("projectors"), &self.environment(true), None).await?;
        let gateway = Process::start(
            &bin_dir.join("command-gateway"),
            &self.environment(false),
            None,
        )
        .await?;
        let query = Process::start(
            &bin_dir.join("query-api"),
            &self.environment(true),
            Some(free_addr()?),
        )
        .await?;
        let query_uncached = Process::start(
            &bin_dir.join("query-api"),
            &self.environment(false),
            Some(free_addr()?),
        )
        .await?;
        Ok(System {
            gateway,
            projectors,
            query,
            query_uncached,
        })
    }
}

pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:16379".into())
}

/// The running services of one world.
pub struct System {
    pub gateway: Process,
    /// Held so the process lives as long as the system.
    #[allow(dead_code)]
    pub projectors: Process,
    pub query: Process,
    pub query_uncached: Process,
}

/// A child process, killed on drop, with its CPU time readable from /proc.
pub struct Process {
    child: Child,
    pub http: SocketAddr,
    pub grpc: Option<SocketAddr>,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Process {
    /// Starts `binary` listening on a free port (and on `grpc`, if given) and waits until
    /// it answers `/healthz`.
    pub async fn start(
        binary: &Path,
        env: &[(&'static str, String)],
        grpc: Option<SocketAddr>,
    ) -> anyhow::Result<Process> {
        let http = free_addr()?;
        // Service logs go to files, for when a measurement looks wrong.
        let logs = std::env::temp_dir().join("school-bench-logs");
        std::fs::create_dir_all(&logs)?;
        let name = binary
            .file_name()
            .map_or("service".into(), |n| n.to_string_lossy().into_owned());
        let log = std::fs::File::create(logs.join(format!("{name}-{}.log", http.port())))?;
        let mut command = Command::new(binary);
        command
            .env("LISTEN_ADDR", http.to_string())
            .env_remove("REDIS_URL")
            .stdout(Stdio::from(log));
        for (key, value) in env {
            command.env(key, value);
        }
        if let Some(grpc) = grpc {
            command.env("GRPC_LISTEN_ADDR", grpc.to_string());
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let process = Process { child, http, grpc };
        wait_until_healthy(http).await?;
        Ok(process)
    }

    /// A process that is not an HTTP service with `/healthz` (the hello-world servers).
    pub fn adopt(child: Child, http: SocketAddr, grpc: Option<SocketAddr>) -> Process {
        Process { child, http, grpc }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.http)
    }

    pub fn cpu_seconds(&self) -> f64 {
        cpu_seconds(&format!("/proc/{}/stat", self.child.id()))
    }
}

/// User plus system CPU time of a process (`/proc/<pid>/stat`, in USER_HZ = 100 ticks/s).
pub fn cpu_seconds(stat_path: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(stat_path) else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let Some(after_name) = stat.rsplit_once(')').map(|(_, rest)| rest) else {
        return 0.0;
    };
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// CPU seconds of this process (the load generator).
pub fn own_cpu_seconds() -> f64 {
    cpu_seconds("/proc/self/stat")
}

pub fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

pub async fn wait_until_listening(addr: SocketAddr) -> anyhow::Result<()> {
    for _ in 0..500 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("nothing listens on {addr} after 10 s")
}

async fn wait_until_healthy(addr: SocketAddr) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    for _ in 0..500 {
        if let Ok(response) = http.get(format!("http://{addr}/healthz")).send().await
            && response.status().is_success()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("no healthy service on {addr} after 10 s")
}

/// Where the release binaries are: next to this one.
pub fn bin_dir(given: Option<&PathBuf>) -> anyhow::Result<PathBuf> {
    match given {
        Some(dir) => Ok(dir.clone()),
        None => Ok(std::env::current_exe()?
            .parent()
            .context("the bench binary has no directory")?
            .to_path_buf()),
    }
}
