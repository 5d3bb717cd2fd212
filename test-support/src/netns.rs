//! Network namespaces joined by a bridge, for [`crate::NatsCluster`]: one namespace per node,
//! each with its own address on a private /24 that the root namespace (the test and the
//! services it runs in-process) and the other nodes reach, and a way to cut one node off
//! without closing its connections.
//!
//! Every name carries the subnet and the pid of the process that made it
//! (`nc<subnet>n<node>-<pid>` for a namespace, `…v<node>-…` for its veth, `…br-…` for the
//! bridge), so a later run removes what a crashed run left behind: anything of ours whose
//! pid no longer exists.

use std::collections::HashSet;
use std::fs::File;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// Every name of ours starts with this.
const PREFIX: &str = "nc";
/// The /16 the clusters' /24s are taken from: `10.213.<subnet>.0/24`, subnet 1..=254.
const BASE: [u8; 2] = [10, 213];
/// The linux limit on interface names (IFNAMSIZ 16, less the NUL).
const MAX_LINK_NAME: usize = 15;
/// Setting a subnet up fails this often (a collision we could not see) before giving up.
const MAX_ATTEMPTS: usize = 4;

/// Runs `program args…`, returning stdout, or a message with stderr when it fails.
pub(crate) fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("`{program}` could not be run ({e})"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// Why namespaces cannot be made here, if they cannot (computed once per process).
pub(crate) fn unavailable_reason() -> Option<String> {
    static REASON: OnceLock<Option<String>> = OnceLock::new();
    REASON.get_or_init(probe).clone()
}

fn probe() -> Option<String> {
    if effective_uid() != Some(0) {
        return Some("not running as root (network namespaces need CAP_NET_ADMIN)".into());
    }
    for tool in ["ip", "tc"] {
        if let Err(e) = run(tool, &["-V"]) {
            return Some(format!("no usable `{tool}` (iproute2): {e}"));
        }
    }
    // Everything a cluster needs, once, on throwaway names of ours.
    let pid = std::process::id();
    let namespace = name(0, "pn", pid);
    let veth = name(0, "pv", pid);
    let bridge = name(0, "pb", pid);
    let result = run("ip", &["netns", "add", &namespace])
        .and_then(|_| run("ip", &["link", "add", &bridge, "type", "bridge"]))
        .and_then(|_| {
            run(
                "ip",
                &[
                    "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns",
                    &namespace,
                ],
            )
        })
        .and_then(|_| run("ip", &["link", "set", &veth, "master", &bridge]))
        .and_then(|_| {
            run(
                "tc",
                &[
                    "-n", &namespace, "qdisc", "replace", "dev", "eth0", "root", "pfifo", "limit",
                    "0",
                ],
            )
        });
    let _ = run("ip", &["link", "del", &veth]);
    let _ = run("ip", &["link", "del", &bridge]);
    let _ = run("ip", &["netns", "del", &namespace]);
    result
        .err()
        .map(|e| format!("cannot set up network namespaces: {e}"))
}

/// The effective uid, from `/proc/self/status` (no libc in this crate).
fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// `nc<subnet:03><kind>-<pid>`.
fn name(subnet: u8, kind: &str, pid: u32) -> String {
    let name = format!("{PREFIX}{subnet:03}{kind}-{pid}");
    assert!(
        name.len() <= MAX_LINK_NAME,
        "network name {name} is longer than {MAX_LINK_NAME} characters"
    );
    name
}

/// The pid that made `name`, if it is one of ours.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?;
    let (head, pid) = rest.rsplit_once('-')?;
    let (subnet, kind) = head.split_at_checked(3)?;
    let ours = subnet.bytes().all(|b| b.is_ascii_digit())
        && (1..=2).contains(&kind.len())
        && kind
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if !ours || pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Whether `name` is ours and its maker is gone.
fn is_leftover(name: &str) -> bool {
    owner_pid(name).is_some_and(|pid| !process_exists(pid))
}

/// Serialises subnet choice and setup between the clusters of every process on the machine.
fn lock() -> File {
    let path = std::env::temp_dir().join("school-nats-cluster.lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("opening the cluster lock {} ({e})", path.display()));
    file.lock()
        .unwrap_or_else(|e| panic!("locking {} ({e})", path.display()));
    file
}

/// Processes still inside namespace `namespace`, SIGKILLed (a crashed run's servers).
fn kill_processes_in(namespace: &str) {
    if let Ok(pids) = run("ip", &["netns", "pids", namespace]) {
        for pid in pids.split_whitespace() {
            let _ = run("kill", &["-KILL", pid]);
        }
    }
}

/// Removes namespaces, links and store directories of runs whose process is gone.
fn remove_leftovers() {
    for namespace in namespace_names() {
        if is_leftover(&namespace) {
            kill_processes_in(&namespace);
            let _ = run("ip", &["netns", "del", &namespace]);
        }
    }
    for link in link_names() {
        if is_leftover(&link) {
            let _ = run("ip", &["link", "del", &link]);
        }
    }
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for entry in entries.flatten() {
            let file_name = entry.file_name();
            let Some(tag) = file_name
                .to_str()
                .and_then(|n| n.strip_prefix(STORE_DIR_PREFIX))
            else {
                continue;
            };
            if is_leftover(&format!("{PREFIX}{tag}")) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// A cluster keeps configs, logs and stores in `<tmp>/school-nats-cluster-<subnet>d-<pid>`.
pub(crate) const STORE_DIR_PREFIX: &str = "school-nats-cluster-";

/// Names of the links in the root namespace.
fn link_names() -> Vec<String> {
    run("ip", &["-o", "link", "show"])
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let name = line.split(": ").nth(1)?;
            Some(name.split('@').next().unwrap_or(name).to_owned())
        })
        .collect()
}

/// Names of the network namespaces.
fn namespace_names() -> Vec<String> {
    run("ip", &["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// Subnets `10.213.<s>.0/24` that an address or a route of the root namespace overlaps.
fn used_subnets() -> HashSet<u8> {
    let mut networks = Vec::new();
    for args in [
        &["-o", "-4", "addr", "show"][..],
        &["-4", "route", "show", "table", "all"][..],
    ] {
        for token in run("ip", args).unwrap_or_default().split_whitespace() {
            let (address, prefix) = token.split_once('/').unwrap_or((token, "32"));
            if let (Ok(address), Ok(prefix)) = (address.parse::<Ipv4Addr>(), prefix.parse::<u32>())
            {
                // A default route overlaps everything and says nothing about use.
                if (1..=32).contains(&prefix) {
                    networks.push((u32::from(address), prefix));
                }
            }
        }
    }
    (1..=254)
        .filter(|&subnet| {
            let candidate = u32::from(subnet_address(subnet, 0));
            networks.iter().any(|&(network, prefix)| {
                let common = prefix.min(24);
                let mask = u32::MAX << (32 - common);
                candidate & mask == network & mask
            })
        })
        .collect()
}

fn subnet_address(subnet: u8, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(BASE[0], BASE[1], subnet, host)
}

/// The namespaces, veth pairs and bridge of one cluster; removed on drop.
pub(crate) struct Network {
    subnet: u8,
    pid: u32,
    nodes: usize,
    partitioned: Vec<bool>,
}

impl Network {
    /// Sets up `nodes` namespaces on an unused /24, first removing leftovers of crashed runs.
    pub(crate) fn create(nodes: usize) -> Network {
        assert!(
            (1..=9).contains(&nodes),
            "a cluster has 1 to 9 nodes, not {nodes}"
        );
        let _lock = lock();
        remove_leftovers();
        let used = used_subnets();
        let pid = std::process::id();
        let first = (pid % 254) as u8;
        let mut failures = Vec::new();
        for step in 0..254u8 {
            let subnet = 1 + first.wrapping_add(step) % 254;
            if used.contains(&subnet) {
                continue;
            }
            match Network::try_create(subnet, pid, nodes) {
                Ok(network) => return network,
                Err(e) => failures.push(e),
            }
            if failures.len() >= MAX_ATTEMPTS {
                break;
            }
        }
        panic!(
            "no /24 under {}.{}.0.0/16 could be set up for a NATS cluster (used: {used:?}): {failures:?}",
            BASE[0], BASE[1]
        )
    }

    fn try_create(subnet: u8, pid: u32, nodes: usize) -> Result<Network, String> {
        // Made first so that a failure half-way removes what was made (on drop).
        let network = Network {
            subnet,
            pid,
            nodes,
            partitioned: vec![false; nodes],
        };
        let bridge = network.bridge();
        let gateway = format!("{}/24", subnet_address(subnet, 1));
        run("ip", &["link", "add", &bridge, "type", "bridge"])?;
        run("ip", &["addr", "add", &gateway, "dev", &bridge])?;
        run("ip", &["link", "set", &bridge, "up"])?;
        for node in 0..nodes {
            let namespace = network.namespace(node);
            let veth = network.veth(node);
            let address = format!("{}/24", network.ip(node));
            run("ip", &["netns", "add", &namespace])?;
            // The peer is born inside the namespace, so every node can call it eth0.
            run(
                "ip",
                &[
                    "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns",
                    &namespace,
                ],
            )?;
            run("ip", &["link", "set", &veth, "master", &bridge, "up"])?;
            run("ip", &["-n", &namespace, "link", "set", "lo", "up"])?;
            run(
                "ip",
                &["-n", &namespace, "addr", "add", &address, "dev", "eth0"],
            )?;
            run("ip", &["-n", &namespace, "link", "set", "eth0", "up"])?;
        }
        Ok(network)
    }

    /// `<subnet>-<pid>`: what names of this network's other resources carry.
    pub(crate) fn tag(&self) -> String {
        format!("{:03}d-{}", self.subnet, self.pid)
    }

    pub(crate) fn ip(&self, node: usize) -> Ipv4Addr {
        subnet_address(self.subnet, 10 + node as u8)
    }

    pub(crate) fn namespace(&self, node: usize) -> String {
        name(self.subnet, &format!("n{node}"), self.pid)
    }

    fn veth(&self, node: usize) -> String {
        name(self.subnet, &format!("v{node}"), self.pid)
    }

    fn bridge(&self) -> String {
        name(self.subnet, "br", self.pid)
    }

    /// The links this network made in the root namespace (the bridge and every veth).
    pub(crate) fn links(&self) -> Vec<String> {
        let mut links: Vec<String> = (0..self.nodes).map(|n| self.veth(n)).collect();
        links.push(self.bridge());
        links
    }

    pub(crate) fn namespaces(&self) -> Vec<String> {
        (0..self.nodes).map(|n| self.namespace(n)).collect()
    }

    pub(crate) fn is_partitioned(&self, node: usize) -> bool {
        self.partitioned[node]
    }

    /// Drops every packet node `node` sends or is sent: a `pfifo` queue of length 0 as the
    /// root qdisc of both ends of its veth (in its namespace for what it sends, in the root
    /// namespace for what the bridge forwards to it). The links stay up and nobody sends a
    /// FIN or RST, so open TCP connections stall and new ones time out, as behind a cut
    /// cable. (netem is not in every kernel; a zero-length pfifo is.)
    pub(crate) fn partition(&mut self, node: usize) {
        if self.partitioned[node] {
            return;
        }
        let namespace = self.namespace(node);
        let veth = self.veth(node);
        let drop_all = |netns: Option<&str>, device: &str| {
            let mut args = Vec::new();
            if let Some(netns) = netns {
                args.extend(["-n", netns]);
            }
            args.extend([
                "qdisc", "replace", "dev", device, "root", "pfifo", "limit", "0",
            ]);
            run("tc", &args).unwrap_or_else(|e| panic!("partitioning node {node}: {e}"));
        };
        drop_all(Some(&namespace), "eth0");
        drop_all(None, &veth);
        self.partitioned[node] = true;
    }

    /// Cuts node `node` off from the other nodes only: a blackhole route to each peer in its
    /// namespace and to it in each peer's. The root namespace (clients) still reaches it, so
    /// a client connected to it talks to a node that falls behind the cluster.
    pub(crate) fn isolate_from_peers(&mut self, node: usize) {
        self.peer_routes(node, "add");
    }

    /// Undoes [`Network::isolate_from_peers`].
    pub(crate) fn rejoin_peers(&mut self, node: usize) {
        self.peer_routes(node, "del");
    }

    fn peer_routes(&self, node: usize, action: &str) {
        for peer in (0..self.nodes).filter(|peer| *peer != node) {
            for (from, to) in [(node, peer), (peer, node)] {
                let (namespace, address) = (self.namespace(from), format!("{}/32", self.ip(to)));
                run(
                    "ip",
                    &["-n", &namespace, "route", action, "blackhole", &address],
                )
                .unwrap_or_else(|e| panic!("route {action} between n{from} and n{to}: {e}"));
            }
        }
    }

    /// Takes the dropping queues of [`Network::partition`] away again.
    pub(crate) fn heal(&mut self, node: usize) {
        if !self.partitioned[node] {
            return;
        }
        let namespace = self.namespace(node);
        let veth = self.veth(node);
        run(
            "tc",
            &["-n", &namespace, "qdisc", "del", "dev", "eth0", "root"],
        )
        .and_then(|_| run("tc", &["qdisc", "del", "dev", &veth, "root"]))
        .unwrap_or_else(|e| panic!("healing node {node}: {e}"));
        self.partitioned[node] = false;
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        // Every name carries our pid, so nothing of another live process is touched.
        for node in 0..self.nodes {
            let namespace = self.namespace(node);
            kill_processes_in(&namespace);
            // Deleting one end of a veth deletes both.
            let _ = run("ip", &["link", "del", &self.veth(node)]);
            let _ = run("ip", &["netns", "del", &namespace]);
        }
        let _ = run("ip", &["link", "del", &self.bridge()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_an_interface_name_and_carry_their_pid() {
        let longest = name(254, "br", 4_194_304);
        assert!(longest.len() <= MAX_LINK_NAME, "{longest}");
        assert_eq!(owner_pid(&longest), Some(4_194_304));
        assert_eq!(owner_pid(&name(7, "n2", 42)), Some(42));
        assert_eq!(owner_pid(&format!("{PREFIX}017d-99")), Some(99));
    }

    #[test]
    fn names_of_others_are_not_taken_for_leftovers() {
        for other in [
            "eth0",
            "lo",
            "nc",
            "nc017-1",
            "ncabcn0-12",
            "nc017n0-",
            "nc017n0-1x",
        ] {
            assert_eq!(owner_pid(other), None, "{other}");
        }
    }
}
