//! A JetStream cluster of real nats-server processes that tests can hurt: each node runs in
//! its own network namespace with its own address, so a test can kill, restart, pause or
//! cut off one node and watch the stream and consumer leaders move, while the test itself
//! (and services it runs in-process) reach every node from the root namespace.
//!
//! Nothing is shared with the test stack's NATS: a cluster has its own subnet, store
//! directories and processes, and removes all of them on drop (also when a test panics).

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use events::StreamNames;
use futures::StreamExt;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::TestBroker;
use crate::netns::{self, Network, STORE_DIR_PREFIX};
use crate::unique_suffix;

const CLIENT_PORT: u16 = 4222;
const CLUSTER_PORT: u16 = 6222;
const MONITOR_PORT: u16 = 8222;
/// The route cluster's name (one per cluster; clusters never see each other anyway).
const CLUSTER_NAME: &str = "school-test";
/// How long one monitoring or JetStream API question may take before it counts as
/// unanswered (a partitioned or paused node never answers).
const ASK_TIMEOUT: Duration = Duration::from_secs(2);
/// After the first answer to a JetStream API request, how long to wait for more: a
/// leaderless group's members answer too, and a stale leader may still claim to lead.
const MORE_ANSWERS: Duration = Duration::from_millis(150);
/// How long a (re)started node may take to answer its monitoring port.
const NODE_START_TIMEOUT: Duration = Duration::from_secs(20);

/// The nats-server binary named by `NATS_SERVER_BIN`.
fn nats_server_bin() -> PathBuf {
    match std::env::var_os("NATS_SERVER_BIN") {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => panic!(
            "NATS_SERVER_BIN is not set: cluster tests start nats-servers of their own; run them with \
             `scripts/dev test`, or export NATS_SERVER_BIN=$PWD/.stack/tools/nats/bin/nats-server"
        ),
    }
}

/// How to start a [`NatsCluster`].
#[derive(Debug, Clone)]
pub struct NatsClusterOptions {
    /// Number of nodes (1 to 9).
    pub nodes: usize,
    /// `jetstream { sync_interval: … }`: `None` keeps the server default (fsync every 2
    /// minutes), `Some("always")` fsyncs every write.
    pub sync_interval: Option<String>,
    /// More top-level configuration for every node (e.g. a short `ping_interval`, so a
    /// test sees a cut route declared dead in seconds instead of minutes).
    pub extra_config: String,
}

impl Default for NatsClusterOptions {
    fn default() -> Self {
        NatsClusterOptions {
            nodes: 3,
            sync_interval: None,
            extra_config: String::new(),
        }
    }
}

struct Node {
    server_name: String,
    config: PathBuf,
    log: PathBuf,
    store_dir: PathBuf,
    child: Option<Child>,
    paused: bool,
}

/// A JetStream cluster, one nats-server per network namespace; node `i` listens on
/// `ip(i)`: clients on 4222, routes on 6222, monitoring on 8222.
///
/// Fault methods act on one node and return once the fault is in place; each is
/// idempotent (killing a dead node, healing a connected one do nothing).
pub struct NatsCluster {
    nodes: Vec<Node>,
    bin: PathBuf,
    dir: PathBuf,
    // Dropped after the processes are killed (fields drop after `Drop::drop`).
    network: Network,
}

impl NatsCluster {
    /// Why cluster tests cannot run on this machine (not root, no `ip`/`tc`, namespaces
    /// cannot be made), or `None` when they can.
    pub fn unavailable_reason() -> Option<String> {
        netns::unavailable_reason()
    }

    /// For a test that needs a cluster: `true` when it must skip. It then prints
    /// `SKIPPED: <reason>`; with `CI=true` it panics instead, since on CI a missing tool is
    /// a failure, not a reason to skip.
    pub fn skip_if_unavailable() -> bool {
        let Some(reason) = NatsCluster::unavailable_reason() else {
            return false;
        };
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("the NATS cluster tests cannot run on CI: {reason}");
        }
        eprintln!("SKIPPED: {reason}");
        true
    }

    /// Sets up the namespaces, starts every node and waits (up to 30 s) until they have
    /// formed a cluster with a JetStream meta leader.
    pub async fn start(options: NatsClusterOptions) -> NatsCluster {
        let bin = nats_server_bin();
        let network = Network::create(options.nodes);
        let dir = std::env::temp_dir().join(format!("{STORE_DIR_PREFIX}{}", network.tag()));
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("creating the cluster directory {} ({e})", dir.display()));
        let nodes = (0..options.nodes)
            .map(|i| {
                let server_name = format!("n{i}");
                let store_dir = dir.join(format!("{server_name}-store"));
                let config = dir.join(format!("{server_name}.conf"));
                let routes: Vec<String> = (0..options.nodes)
                    .filter(|&other| other != i)
                    .map(|other| {
                        format!("    \"nats-route://{}:{CLUSTER_PORT}\"", network.ip(other))
                    })
                    .collect();
                let text = server_config(
                    &server_name,
                    network.ip(i),
                    &store_dir,
                    options.sync_interval.as_deref(),
                    &routes,
                ) + &options.extra_config;
                std::fs::write(&config, text)
                    .unwrap_or_else(|e| panic!("writing {} ({e})", config.display()));
                Node {
                    log: dir.join(format!("{server_name}.log")),
                    server_name,
                    config,
                    store_dir,
                    child: None,
                    paused: false,
                }
            })
            .collect();
        let mut cluster = NatsCluster {
            nodes,
            bin,
            dir,
            network,
        };
        for i in 0..cluster.node_count() {
            cluster.spawn(i);
        }
        cluster.wait_ready(Duration::from_secs(30)).await;
        cluster
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// `nats://<ip>:4222` of node `i`.
    pub fn url(&self, i: usize) -> String {
        format!("nats://{}:{CLIENT_PORT}", self.ip(i))
    }

    /// Every node's URL: a client's server list.
    pub fn client_urls(&self) -> Vec<String> {
        (0..self.node_count()).map(|i| self.url(i)).collect()
    }

    pub fn ip(&self, i: usize) -> Ipv4Addr {
        self.network.ip(i)
    }

    /// The `server_name` of node `i`, as JetStream reports leaders and replicas.
    pub fn server_name(&self, i: usize) -> &str {
        &self.nodes[i].server_name
    }

    /// The node whose `server_name` is `name`.
    pub fn node_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.server_name == name)
    }

    /// The pid of node `i`'s nats-server, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].child.as_ref().map(Child::id)
    }

    /// Node `i`'s JetStream store directory (kept across restarts).
    pub fn store_dir(&self, i: usize) -> &Path {
        &self.nodes[i].store_dir
    }

    /// The network namespaces of the nodes, by node index.
    pub fn namespaces(&self) -> Vec<String> {
        self.network.namespaces()
    }

    /// The links the cluster made in the root namespace (veths and the bridge).
    pub fn links(&self) -> Vec<String> {
        self.network.links()
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
    }

    pub fn is_paused(&self, i: usize) -> bool {
        self.nodes[i].paused
    }

    pub fn is_partitioned(&self, i: usize) -> bool {
        self.network.is_partitioned(i)
    }

    /// Running, not paused and not partitioned: a node that can answer.
    fn is_reachable(&self, i: usize) -> bool {
        self.is_running(i) && !self.is_paused(i) && !self.is_partitioned(i)
    }

    /// A client with every node in its server list.
    pub async fn client(&self) -> async_nats::Client {
        async_nats::ConnectOptions::new()
            .connection_timeout(ASK_TIMEOUT)
            .connect(self.client_urls())
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "connecting to the NATS cluster {:?} ({e})",
                    self.client_urls()
                )
            })
    }

    /// A client of these nodes only: it does not move to the servers they tell it about,
    /// so it stays off the others (and stays with a node through a partition or a pause).
    pub async fn client_of(&self, nodes: &[usize]) -> async_nats::Client {
        let urls: Vec<String> = nodes.iter().map(|&i| self.url(i)).collect();
        async_nats::ConnectOptions::new()
            .connection_timeout(ASK_TIMEOUT)
            .ignore_discovered_servers()
            .connect(&urls)
            .await
            .unwrap_or_else(|e| panic!("connecting to nodes {nodes:?} at {urls:?} ({e})"))
    }

    /// A client of the whole cluster with a fresh prefix's streams, consumers and buckets
    /// applied at 3 replicas (or the node count, if smaller), as `stream-admin apply` does
    /// in production.
    pub async fn broker(&self) -> TestBroker {
        let client = self.client().await;
        let jetstream = jetstream::new(client.clone());
        let names = StreamNames::new(format!("t{}", unique_suffix()));
        let topology = stream_admin::desired(&names, self.node_count().min(3));
        stream_admin::apply(&jetstream, &topology, stream_admin::ApplyOptions::default())
            .await
            .expect("applying the topology on the NATS cluster");
        TestBroker {
            client,
            jetstream,
            names,
        }
    }

    /// Waits until every reachable node answers its monitoring port, they agree on a
    /// JetStream meta leader, and the leader sees each of them as a current peer (so a
    /// replicated stream can be placed). Panics with the nodes' last log lines after
    /// `timeout`, or as soon as a node that should run has exited.
    pub async fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_running();
            let why = match self.readiness().await {
                Ok(()) => return,
                Err(why) => why,
            };
            if Instant::now() >= deadline {
                panic!(
                    "the NATS cluster was not ready after {timeout:?}: {why}\n{}",
                    self.log_tails()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn readiness(&self) -> Result<(), String> {
        let reachable: Vec<usize> = (0..self.node_count())
            .filter(|&i| self.is_reachable(i))
            .collect();
        if reachable.is_empty() {
            return Err("no node is running and reachable".into());
        }
        let mut leader: Option<String> = None;
        for &i in &reachable {
            let jsz = self
                .monitor(i, "/jsz")
                .await
                .ok_or_else(|| format!("{} does not answer /jsz", self.server_name(i)))?;
            let seen = jsz["meta_cluster"]["leader"].as_str().unwrap_or_default();
            if seen.is_empty() {
                return Err(format!("{} sees no meta leader", self.server_name(i)));
            }
            match &leader {
                Some(first) if first != seen => {
                    return Err(format!(
                        "the nodes disagree on the meta leader: {first}, {seen}"
                    ));
                }
                _ => leader = Some(seen.to_owned()),
            }
        }
        let leader = leader.unwrap_or_default();
        let leader_index = self
            .node_of(&leader)
            .filter(|i| reachable.contains(i))
            .ok_or_else(|| format!("meta leader {leader} is not a reachable node"))?;
        let jsz = self
            .monitor(leader_index, "/jsz")
            .await
            .ok_or_else(|| format!("meta leader {leader} does not answer /jsz"))?;
        let peers = jsz["meta_cluster"]["replicas"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for &i in reachable.iter().filter(|&&i| i != leader_index) {
            let current = peers.iter().any(|peer| {
                peer["name"] == self.server_name(i)
                    && peer["current"] == true
                    && peer["offline"] != true
            });
            if !current {
                return Err(format!(
                    "meta leader {leader} does not see {} as a current peer",
                    self.server_name(i)
                ));
            }
        }
        Ok(())
    }

    /// The node that leads `stream`, as the answers to `$JS.API.STREAM.INFO.<stream>` say;
    /// `None` when nobody answers, a member says the group is leaderless, or answers
    /// disagree (a resumed old leader that still thinks it leads).
    pub async fn stream_leader(&self, client: &async_nats::Client, stream: &str) -> Option<usize> {
        let answers = api_answers(client, format!("$JS.API.STREAM.INFO.{stream}")).await;
        self.agreed_leader(&answers)
    }

    /// The node that leads durable `consumer` of `stream`
    /// (`$JS.API.CONSUMER.INFO.<stream>.<consumer>`), as [`NatsCluster::stream_leader`].
    pub async fn consumer_leader(
        &self,
        client: &async_nats::Client,
        stream: &str,
        consumer: &str,
    ) -> Option<usize> {
        let answers =
            api_answers(client, format!("$JS.API.CONSUMER.INFO.{stream}.{consumer}")).await;
        self.agreed_leader(&answers)
    }

    fn agreed_leader(&self, answers: &[Value]) -> Option<usize> {
        let mut leaders = answers
            .iter()
            .map(|answer| answer["cluster"]["leader"].as_str().unwrap_or_default());
        let first = leaders.next()?;
        if first.is_empty() || leaders.any(|other| other != first) {
            return None;
        }
        self.node_of(first)
    }

    /// Waits until `stream` has a leader and every one of its replicas is current (seen
    /// lately, not offline, no lag), and returns the leader. Panics after `timeout` with
    /// the last stream info.
    pub async fn wait_stream_current(
        &self,
        client: &async_nats::Client,
        stream: &str,
        timeout: Duration,
    ) -> usize {
        let deadline = Instant::now() + timeout;
        let mut last = Value::Null;
        loop {
            let answers = api_answers(client, format!("$JS.API.STREAM.INFO.{stream}")).await;
            if let Some(leader) = self.agreed_leader(&answers) {
                let info = &answers[0];
                if replicas_current(info) {
                    return leader;
                }
            }
            if let Some(answer) = answers.into_iter().next() {
                last = answer["cluster"].clone();
            }
            assert!(
                Instant::now() < deadline,
                "stream {stream} was not current on every replica after {timeout:?}; last cluster info: {last}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The last sequence of `stream` in node `i`'s own store, from its `/jsz` (what the
    /// node holds, not what the leader says); `None` when the node does not answer or has
    /// no such stream.
    pub async fn stream_last_seq_on(&self, i: usize, stream: &str) -> Option<u64> {
        let jsz = self.monitor(i, "/jsz?accounts=true&streams=true").await?;
        jsz["account_details"]
            .as_array()?
            .iter()
            .filter_map(|account| account["stream_detail"].as_array())
            .flatten()
            .find(|detail| detail["name"] == stream)?["state"]["last_seq"]
            .as_u64()
    }

    /// SIGKILLs node `i` and waits until the process is gone, as in a crash: its
    /// connections are closed by its kernel (peers see RST/FIN), nothing is flushed.
    pub fn kill(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        if let Some(mut child) = node.child.take() {
            // SIGKILL also ends a stopped process.
            let _ = child.kill();
            let _ = child.wait();
        }
        node.paused = false;
    }

    /// Starts node `i` again (SIGKILLing it first if it runs) with the same config, store
    /// directory and address, and waits until it answers its monitoring port (unless it is
    /// partitioned; then only until the process runs). It recovers its streams from the
    /// store and catches up from the others: see [`NatsCluster::wait_stream_current`].
    pub async fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
        if self.is_partitioned(i) {
            return;
        }
        let deadline = Instant::now() + NODE_START_TIMEOUT;
        while self.monitor(i, "/varz").await.is_none() {
            self.check_running();
            assert!(
                Instant::now() < deadline,
                "node {i} did not answer after a restart\n{}",
                self.log_tails()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGSTOPs node `i`: the process freezes, its kernel keeps the connections open and
    /// still ACKs what fits in the socket buffers, but nothing is answered or sent (no
    /// heartbeats, no pings), as in a long GC pause or a VM stall.
    pub fn pause(&mut self, i: usize) {
        let Some(pid) = self.pid(i) else { return };
        if self.nodes[i].paused {
            return;
        }
        netns::run("kill", &["-STOP", &pid.to_string()])
            .unwrap_or_else(|e| panic!("pausing node {i}: {e}"));
        let deadline = Instant::now() + Duration::from_secs(2);
        while process_state(pid) != Some('T') {
            assert!(
                Instant::now() < deadline,
                "node {i} (pid {pid}) did not stop"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        self.nodes[i].paused = true;
    }

    /// SIGCONTs a paused node `i`: it carries on from where it was frozen (stale timers
    /// fire, then it learns of the newer term and rejoins).
    pub fn resume(&mut self, i: usize) {
        let Some(pid) = self.pid(i) else { return };
        if !self.nodes[i].paused {
            return;
        }
        netns::run("kill", &["-CONT", &pid.to_string()])
            .unwrap_or_else(|e| panic!("resuming node {i}: {e}"));
        self.nodes[i].paused = false;
    }

    /// Cuts node `i` off from the other nodes and from the root namespace (clients, the
    /// test): every packet it sends or is sent is dropped by a zero-length queue on both
    /// ends of its veth. Links stay up and nothing is closed: open TCP connections stall
    /// (until keepalive, ping or write deadlines end them), new ones time out. The process
    /// runs on; it survives [`NatsCluster::restart`].
    pub fn partition(&mut self, i: usize) {
        self.network.partition(i);
    }

    /// Cuts node `i` off from the other nodes while clients still reach it (blackhole
    /// routes between it and each peer): it stays up and answers, but misses every write
    /// the others commit. Undo with [`NatsCluster::rejoin_peers`].
    pub fn isolate_from_peers(&mut self, i: usize) {
        self.network.isolate_from_peers(i);
    }

    /// Undoes [`NatsCluster::isolate_from_peers`].
    pub fn rejoin_peers(&mut self, i: usize) {
        self.network.rejoin_peers(i);
    }

    /// Undoes [`NatsCluster::partition`]: packets flow again, and stalled connections
    /// resume with their next retransmission.
    pub fn heal(&mut self, i: usize) {
        self.network.heal(i);
    }

    fn spawn(&mut self, i: usize) {
        let namespace = self.network.namespace(i);
        let node = &mut self.nodes[i];
        assert!(node.child.is_none(), "node {i} is already running");
        let log = File::options()
            .create(true)
            .append(true)
            .open(&node.log)
            .unwrap_or_else(|e| panic!("opening {} ({e})", node.log.display()));
        let log_err = log.try_clone().expect("cloning the log file handle");
        // `ip netns exec` enters the namespace and execs the server in place (no fork), so
        // the child's pid is the server's own: SIGKILL and SIGSTOP reach the server.
        let child = Command::new("ip")
            .args(["netns", "exec", &namespace])
            .arg(&self.bin)
            .arg("-c")
            .arg(&node.config)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting node {i} with `ip netns exec` ({e})"));
        let pid = child.id();
        node.child = Some(child);
        let bin = std::fs::canonicalize(&self.bin).unwrap_or_else(|_| self.bin.clone());
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read_link(format!("/proc/{pid}/exe"))
            .ok()
            .as_deref()
            != Some(&bin)
        {
            self.check_running();
            assert!(
                Instant::now() < deadline,
                "node {i} (pid {pid}) is not {} after `ip netns exec`",
                bin.display()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Panics (with the logs) if a node that should be running has exited.
    fn check_running(&mut self) {
        let exited: Vec<String> = self
            .nodes
            .iter_mut()
            .filter_map(|node| {
                let status = node.child.as_mut()?.try_wait().ok()??;
                Some(format!("{} exited ({status})", node.server_name))
            })
            .collect();
        if !exited.is_empty() {
            for node in &mut self.nodes {
                if matches!(node.child.as_mut().map(Child::try_wait), Some(Ok(Some(_)))) {
                    node.child = None;
                }
            }
            panic!("{}\n{}", exited.join(", "), self.log_tails());
        }
    }

    /// GET `path` from node `i`'s monitoring port, as JSON; `None` if it does not answer
    /// 200 within [`ASK_TIMEOUT`].
    async fn monitor(&self, i: usize, path: &str) -> Option<Value> {
        let ip = self.ip(i);
        let ask = async {
            let mut stream = tokio::net::TcpStream::connect((ip, MONITOR_PORT))
                .await
                .ok()?;
            let request = format!("GET {path} HTTP/1.0\r\nHost: {ip}\r\n\r\n");
            stream.write_all(request.as_bytes()).await.ok()?;
            let mut response = Vec::new();
            stream.read_to_end(&mut response).await.ok()?;
            let response = String::from_utf8(response).ok()?;
            let (head, body) = response.split_once("\r\n\r\n")?;
            if head.split_whitespace().nth(1) != Some("200") {
                return None;
            }
            serde_json::from_str(body).ok()
        };
        tokio::time::timeout(ASK_TIMEOUT, ask).await.ok().flatten()
    }

    /// The last lines of every node's log, for failure messages.
    fn log_tails(&self) -> String {
        let mut text = String::new();
        for node in &self.nodes {
            let log = std::fs::read_to_string(&node.log).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(25)..];
            text.push_str(&format!(
                "--- {} ({}) ---\n{}\n",
                node.server_name,
                node.log.display(),
                tail.join("\n")
            ));
        }
        text
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("NATS cluster logs at the failure:\n{}", self.log_tails());
        }
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                if node.paused {
                    let _ = netns::run("kill", &["-CONT", &child.id().to_string()]);
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        // `network` is dropped next: namespaces, veths, bridge.
    }
}

fn server_config(
    server_name: &str,
    ip: Ipv4Addr,
    store_dir: &Path,
    sync_interval: Option<&str>,
    routes: &[String],
) -> String {
    let sync = sync_interval
        .map(|interval| format!("  sync_interval: {interval}\n"))
        .unwrap_or_default();
    format!(
        "server_name: {server_name}\n\
         listen: \"{ip}:{CLIENT_PORT}\"\n\
         http: \"{ip}:{MONITOR_PORT}\"\n\
         jetstream {{\n  store_dir: \"{store}\"\n{sync}}}\n\
         cluster {{\n  name: {CLUSTER_NAME}\n  listen: \"{ip}:{CLUSTER_PORT}\"\n  routes: [\n{routes}\n  ]\n}}\n",
        store = store_dir.display(),
        routes = routes.join("\n"),
    )
}

/// Every answer without an `error` to a JetStream API request, collected until a moment
/// after the last one (several servers may answer one request).
async fn api_answers(client: &async_nats::Client, subject: String) -> Vec<Value> {
    let inbox = client.new_inbox();
    let Ok(mut answers) = client.subscribe(inbox.clone()).await else {
        return Vec::new();
    };
    if client
        .publish_with_reply(subject, inbox, Default::default())
        .await
        .is_err()
    {
        return Vec::new();
    }
    let deadline = tokio::time::Instant::now() + ASK_TIMEOUT;
    let mut answered = false;
    let mut good = Vec::new();
    loop {
        let until = if answered {
            deadline.min(tokio::time::Instant::now() + MORE_ANSWERS)
        } else {
            deadline
        };
        let Ok(Some(message)) = tokio::time::timeout_at(until, answers.next()).await else {
            break;
        };
        // Errors (no leader, not found) come late on purpose, after a leader's answer.
        answered = true;
        if let Ok(answer) = serde_json::from_slice::<Value>(&message.payload)
            && answer.get("error").is_none()
        {
            good.push(answer);
        }
    }
    let _ = answers.unsubscribe().await;
    good
}

/// Whether a stream info answer shows all its followers current and without lag.
fn replicas_current(info: &Value) -> bool {
    let replicas = info["config"]["num_replicas"].as_u64().unwrap_or(1) as usize;
    let followers = info["cluster"]["replicas"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    followers.len() + 1 == replicas
        && followers.iter().all(|peer| {
            peer["current"] == true
                && peer["offline"] != true
                && peer["lag"].as_u64().unwrap_or(0) == 0
        })
}

/// The state letter of `/proc/<pid>/stat` (`T` for stopped).
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces; the state follows it.
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}
