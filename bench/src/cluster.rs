//! The durability rows: a 3-node JetStream cluster of real nats-server processes on
//! loopback, started by the bench itself (once per fsync setting and run, so every row starts
//! empty), with the event stream and buckets at 3 replicas as the chart runs them, and a
//! command-gateway in front of it. The nodes, the gateway and the load generator share the
//! machine's cores with everything else.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_nats::jetstream;
use events::StreamNames;
use test_support::TestBroker;

use crate::figures::{self, Run};
use crate::world::{self, Process};

/// What BENCHMARKS.md says about the R3 rows (`{store}`: where the stores were).
pub const REPORT_TEXT: &str = "the same create-command load as the one-node row, on a \
    3-node JetStream cluster the bench starts itself (three nats-server processes on \
    loopback, routes between them), the event stream and the KV buckets at 3 replicas; a \
    fresh cluster per setting and run, its stores in {store}. The gateway and the \
    ceiling's client both connect to node 1; every publish is acknowledged once a majority \
    of the 3 replicas has it. The 3 nodes, the gateway and the load generator share the 2 \
    cores (with the stack's idle NATS, Postgres and Redis).";

const NODES: usize = 3;
const REPLICAS: usize = 3;
/// How long a fresh cluster may take to elect its JetStream meta leader and take the
/// streams (seconds on an idle machine; more while a build shares the cores).
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// `jetstream { sync_interval }` of a cluster.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Sync {
    /// Not set: the server's default, an fsync every 2 minutes.
    ServerDefault,
    /// `sync_interval: always`: an fsync of every write before it is acknowledged.
    Always,
}

impl Sync {
    pub fn describe(self) -> &'static str {
        match self {
            Sync::ServerDefault => "sync_interval default (fsync every 2 min)",
            Sync::Always => "sync_interval: always (fsync every write)",
        }
    }
}

/// What one cluster run measured.
pub struct ClusterRuns {
    pub commands: Run,
    pub publish: Run,
}

/// Every cluster run, per setting: `[ServerDefault, Always]`.
#[derive(Default)]
pub struct ClusterFigures {
    pub commands: [Vec<Run>; 2],
    pub publish: [Vec<Run>; 2],
}

impl ClusterFigures {
    pub const SETTINGS: [Sync; 2] = [Sync::ServerDefault, Sync::Always];

    pub fn push(&mut self, sync: Sync, runs: ClusterRuns) {
        let i = usize::from(sync == Sync::Always);
        self.commands[i].push(runs.commands);
        self.publish[i].push(runs.publish);
    }

    /// The nodes' CPU seconds of each run, for the report.
    pub fn note(&self) -> String {
        Self::SETTINGS
            .iter()
            .enumerate()
            .filter(|(i, _)| !self.commands[*i].is_empty())
            .map(|(i, sync)| {
                let runs: Vec<String> = self.commands[i]
                    .iter()
                    .zip(&self.publish[i])
                    .map(|(c, p)| format!("{} / {}", c.note, p.note))
                    .collect();
                format!("{}: {}", sync.describe(), runs.join(", "))
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// The nats-server to start: `NATS_SERVER_BIN` (the test command and `scripts/dev bench`
/// export it), else `.stack/tools/nats/bin/nats-server` of the working directory or of a
/// directory above this binary (the repository's, when target/ lives in it).
pub fn nats_server_bin() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("NATS_SERVER_BIN").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    let relative = Path::new(".stack/tools/nats/bin/nats-server");
    let exe = std::env::current_exe()?;
    let candidates = std::iter::once(std::env::current_dir()?)
        .chain(exe.ancestors().skip(1).map(Path::to_path_buf))
        .map(|dir| dir.join(relative));
    for candidate in candidates {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "no nats-server for the cluster rows: set NATS_SERVER_BIN or run `scripts/dev services` \
         (it installs one at {})",
        relative.display()
    )
}

/// A running loopback cluster; its processes are killed and its store removed on drop.
struct Cluster {
    nodes: Vec<Child>,
    client_addrs: Vec<SocketAddr>,
    monitor_addrs: Vec<SocketAddr>,
    dir: PathBuf,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            let _ = node.kill();
            let _ = node.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Cluster {
    fn start(binary: &Path, sync: Sync, store_root: &Path) -> anyhow::Result<Cluster> {
        let dir = store_root.join(format!(
            "school-bench-cluster-{}-{}",
            std::process::id(),
            test_support::unique_suffix()
        ));
        let mut ports = Vec::new();
        // Bound together so no two of them are the same free port.
        let listeners: Vec<_> = (0..3 * NODES)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
            .collect::<Result<_, _>>()?;
        for listener in &listeners {
            ports.push(listener.local_addr()?);
        }
        drop(listeners);
        let (client_addrs, rest) = ports.split_at(NODES);
        let (route_addrs, monitor_addrs) = rest.split_at(NODES);
        let routes: Vec<String> = route_addrs
            .iter()
            .map(|a| format!("nats-route://{a}"))
            .collect();
        let mut cluster = Cluster {
            nodes: Vec::new(),
            client_addrs: client_addrs.to_vec(),
            monitor_addrs: monitor_addrs.to_vec(),
            dir,
        };
        for i in 0..NODES {
            let node_dir = cluster.dir.join(format!("n{}", i + 1));
            std::fs::create_dir_all(&node_dir)
                .with_context(|| format!("creating {}", node_dir.display()))?;
            let sync_line = match sync {
                Sync::ServerDefault => "",
                Sync::Always => "  sync_interval: always\n",
            };
            let config = format!(
                "server_name: bench-n{n}\n\
                 listen: {client}\n\
                 http: {monitor}\n\
                 max_payload: 1MB\n\
                 jetstream {{\n  store_dir: \"{store}\"\n  max_memory_store: 256MB\n  max_file_store: 20GB\n{sync_line}}}\n\
                 cluster {{\n  name: school-bench\n  listen: {route}\n  routes: [{routes}]\n}}\n",
                n = i + 1,
                client = client_addrs[i],
                monitor = monitor_addrs[i],
                store = node_dir.join("data").display(),
                route = route_addrs[i],
                routes = routes.join(", "),
            );
            let config_path = node_dir.join("nats.conf");
            std::fs::write(&config_path, config)?;
            let log = File::create(node_dir.join("nats.log"))?;
            let child = Command::new(binary)
                .arg("-c")
                .arg(&config_path)
                .stdout(Stdio::from(log.try_clone()?))
                .stderr(Stdio::from(log))
                .spawn()
                .with_context(|| format!("starting {}", binary.display()))?;
            cluster.nodes.push(child);
        }
        Ok(cluster)
    }

    fn url(&self, i: usize) -> String {
        format!("nats://{}", self.client_addrs[i])
    }

    /// Waits until every node answers `/healthz` (JetStream on, meta leader known), then
    /// applies the topology at 3 replicas, retrying while the cluster cannot place it yet.
    async fn broker(&self) -> anyhow::Result<TestBroker> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let http = reqwest::Client::new();
        for monitor in &self.monitor_addrs {
            loop {
                let healthy = http
                    .get(format!("http://{monitor}/healthz"))
                    .timeout(Duration::from_secs(2))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                if healthy {
                    break;
                }
                if Instant::now() >= deadline {
                    bail!(
                        "the cluster node with monitoring on {monitor} is not healthy after {} s (logs in {})",
                        READY_TIMEOUT.as_secs(),
                        self.dir.display()
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let client = async_nats::connect(self.url(0))
            .await
            .with_context(|| format!("connecting to the cluster at {}", self.url(0)))?;
        let jetstream = jetstream::new(client.clone());
        let names = StreamNames::new(format!("b{}", test_support::unique_suffix()));
        let topology = stream_admin::desired(&names, REPLICAS);
        loop {
            let applied =
                stream_admin::apply(&jetstream, &topology, stream_admin::ApplyOptions::default())
                    .await;
            match applied {
                Ok(_) => break,
                Err(error) if Instant::now() >= deadline => {
                    return Err(error.context("applying the R3 topology on the bench cluster"));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
        Ok(TestBroker {
            client,
            jetstream,
            names,
        })
    }

    /// CPU seconds of all nodes so far.
    fn cpu_seconds(&self) -> f64 {
        self.nodes
            .iter()
            .map(|n| world::cpu_seconds(&format!("/proc/{}/stat", n.id())))
            .sum()
    }
}

/// Waits until the gateway answers `/readyz` (its stream and bucket found), so no
/// measured second goes to its start.
async fn wait_ready(gateway: &Process) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let ready = http
            .get(format!("{}/readyz", gateway.url()))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ready {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("the gateway on the bench cluster is not ready");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Create commands over HTTP and the publish-with-ack ceiling on a fresh 3-node cluster with
/// `sync`. The gateway and the ceiling's client both connect to node 1, so both take the
/// same path to the stream leader (wherever the cluster placed it). Each run's `note` holds
/// the nodes' CPU seconds during its measurement.
pub async fn create_commands(
    nats_server: &Path,
    store_root: &Path,
    bin_dir: &Path,
    sync: Sync,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<ClusterRuns> {
    let cluster = Cluster::start(nats_server, sync, store_root)?;
    let broker = cluster.broker().await?;
    let env = vec![
        // One URL: async-nats 0.51 cannot parse a comma-separated list; the client learns
        // the other nodes from the server (INFO connect_urls) and fails over to them.
        ("NATS_URL", cluster.url(0)),
        ("STREAM_PREFIX", broker.names.prefix().to_owned()),
        (
            "API_KEYS",
            format!("write:{},read:{}", world::WRITE_KEY, world::READ_KEY),
        ),
        ("RATE_LIMIT_PER_SECOND", "1000000000".to_owned()),
        ("RUST_LOG", "warn".to_owned()),
        (
            "KEK_FILE",
            test_support::test_kek_file().display().to_string(),
        ),
    ];
    let gateway = Process::start(&bin_dir.join("command-gateway"), &env, None).await?;
    wait_ready(&gateway).await?;

    let nats_cpu = cluster.cpu_seconds();
    let mut commands = figures::create_commands(&gateway, concurrency, warmup, duration).await?;
    commands.note = format!("{:.1}", cluster.cpu_seconds() - nats_cpu);
    drop(gateway);
    let nats_cpu = cluster.cpu_seconds();
    let mut publish = figures::publish_with_ack(&broker, concurrency, warmup, duration).await?;
    publish.note = format!("{:.1}", cluster.cpu_seconds() - nats_cpu);
    drop(broker);
    drop(cluster);
    Ok(ClusterRuns { commands, publish })
}

/// The filesystem holding `path` (from /proc/mounts), for the report: an fsync on tmpfs
/// costs nothing, so the `always` row would mean nothing there.
pub fn filesystem_of(path: &Path) -> String {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let Ok(mounts) = std::fs::read_to_string("/proc/mounts") else {
        return "unknown filesystem".into();
    };
    mounts
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields.as_slice() {
                [device, mount_point, fs_type, ..] if path.starts_with(mount_point) => {
                    Some((mount_point.len(), format!("{fs_type} on {device}")))
                }
                _ => None,
            }
        })
        .max_by_key(|(length, _)| *length)
        .map_or_else(|| "unknown filesystem".into(), |(_, fs)| fs)
}
