//! The cluster harness itself: leaders are found, and each fault does to JetStream what its
//! doc says. Needs root, `ip` and `tc` (prints SKIPPED without them, fails with `CI=true`),
//! and `NATS_SERVER_BIN`.

use std::future::Future;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use events::{AggregateKind, Projection};
use test_support::{NatsCluster, NatsClusterOptions, eventually};
use uuid::Uuid;

/// Longest any one test here may take; the helpers below are bounded well within it.
const TEST_TIMEOUT: Duration = Duration::from_secs(75);

async fn bounded(test: impl Future<Output = ()>) {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .unwrap_or_else(|_| panic!("the test took longer than {TEST_TIMEOUT:?}"));
}

fn subject(names: &events::StreamNames) -> String {
    names.aggregate_subject(AggregateKind::Student, Uuid::new_v4())
}

/// One publish, acked by the stream within `within`: the stream sequence, or why not.
async fn publish(
    jetstream: &jetstream::Context,
    subject: String,
    within: Duration,
) -> Result<u64, String> {
    let attempt = async {
        let ack = jetstream
            .publish(subject, "payload".into())
            .await
            .map_err(|e| e.to_string())?;
        ack.await.map(|ack| ack.sequence).map_err(|e| e.to_string())
    };
    tokio::time::timeout(within, attempt)
        .await
        .map_err(|_| format!("no ack within {within:?}"))?
}

/// Publishes until one is acked (leaders move, clients reconnect), for up to `seconds`.
async fn publish_eventually(jetstream: &jetstream::Context, subject: String, seconds: u64) -> u64 {
    eventually(seconds, "a publish to be acked", || {
        let subject = subject.clone();
        async move {
            publish(jetstream, subject, Duration::from_secs(2))
                .await
                .ok()
        }
    })
    .await
}

/// Every node except `node`.
fn others(cluster: &NatsCluster, node: usize) -> Vec<usize> {
    (0..cluster.node_count()).filter(|&i| i != node).collect()
}

fn netns_of(pid: u32) -> std::path::PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/net")).expect("reading a process's netns")
}

#[tokio::test]
async fn leaders_of_the_stream_and_its_consumer_are_found_on_distinct_nodes() {
    if NatsCluster::skip_if_unavailable() {
        return;
    }
    bounded(async {
        let cluster = NatsCluster::start(NatsClusterOptions::default()).await;
        assert_eq!(cluster.node_count(), 3);
        let mut urls = cluster.client_urls();
        urls.sort();
        urls.dedup();
        assert_eq!(urls.len(), 3, "every node has its own address: {urls:?}");
        let bin = std::fs::canonicalize(std::env::var("NATS_SERVER_BIN").expect("NATS_SERVER_BIN"))
            .expect("the nats-server binary exists");
        let own_netns = std::fs::read_link("/proc/self/ns/net").expect("our own netns");
        for i in 0..3 {
            let pid = cluster.pid(i).expect("a running node has a pid");
            // The pid held is the server's own, in a namespace of its own.
            assert_eq!(
                std::fs::read_link(format!("/proc/{pid}/exe")).expect("the node's executable"),
                bin
            );
            assert_ne!(
                netns_of(pid),
                own_netns,
                "node {i} runs in the root namespace"
            );
            assert_eq!(cluster.url(i), format!("nats://{}:4222", cluster.ip(i)));
        }

        let broker = cluster.broker().await;
        let stream = broker.names.event_stream();
        let leader = cluster
            .wait_stream_current(&broker.client, &stream, Duration::from_secs(20))
            .await;
        assert_eq!(
            cluster.stream_leader(&broker.client, &stream).await,
            Some(leader)
        );
        let consumer = broker.names.projection_consumer(Projection::Students);
        let consumer_leader = cluster
            .consumer_leader(&broker.client, &stream, &consumer)
            .await
            .expect("the consumer has a leader");
        assert!(consumer_leader < 3);
        assert_eq!(
            cluster
                .consumer_leader(&broker.client, &stream, "no-such-consumer")
                .await,
            None
        );

        let sequence = publish(
            &broker.jetstream,
            subject(&broker.names),
            Duration::from_secs(5),
        )
        .await
        .expect("a publish to a healthy cluster is acked");
        for i in 0..3 {
            eventually(10, "every node to store the message", || async {
                (cluster.stream_last_seq_on(i, &stream).await == Some(sequence)).then_some(())
            })
            .await;
        }
    })
    .await;
}

#[tokio::test]
async fn killing_the_stream_leader_elects_another_and_a_publish_is_then_acked() {
    if NatsCluster::skip_if_unavailable() {
        return;
    }
    bounded(async {
        let mut cluster = NatsCluster::start(NatsClusterOptions {
            sync_interval: Some("always".into()),
            ..Default::default()
        })
        .await;
        let broker = cluster.broker().await;
        let stream = broker.names.event_stream();
        let leader = cluster
            .wait_stream_current(&broker.client, &stream, Duration::from_secs(20))
            .await;
        publish(
            &broker.jetstream,
            subject(&broker.names),
            Duration::from_secs(5),
        )
        .await
        .expect("the first publish");

        let pid = cluster.pid(leader).expect("the leader runs");
        cluster.kill(leader);
        assert!(!cluster.is_running(leader));
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "the killed server is gone"
        );
        cluster.kill(leader); // idempotent

        let survivors = cluster.client_of(&others(&cluster, leader)).await;
        let killed_at = Instant::now();
        let new_leader = eventually(30, "a new stream leader", || async {
            cluster
                .stream_leader(&survivors, &stream)
                .await
                .filter(|&l| l != leader)
        })
        .await;
        eprintln!(
            "stream leader {} killed; {} elected after {:?}",
            cluster.server_name(leader),
            cluster.server_name(new_leader),
            killed_at.elapsed()
        );
        let sequence = publish_eventually(&broker.jetstream, subject(&broker.names), 20).await;
        assert_eq!(sequence, 2, "the second message follows the first");
    })
    .await;
}

#[tokio::test]
async fn a_restarted_node_rejoins_and_catches_up_with_what_it_missed() {
    if NatsCluster::skip_if_unavailable() {
        return;
    }
    bounded(async {
        let mut cluster = NatsCluster::start(NatsClusterOptions::default()).await;
        let broker = cluster.broker().await;
        let stream = broker.names.event_stream();
        let leader = cluster
            .wait_stream_current(&broker.client, &stream, Duration::from_secs(20))
            .await;
        let follower = (leader + 1) % 3;
        let ip = cluster.ip(follower);
        cluster.kill(follower);

        let mut last = 0;
        for _ in 0..5 {
            last = publish_eventually(&broker.jetstream, subject(&broker.names), 15).await;
        }
        assert_eq!(last, 5);
        assert_eq!(cluster.stream_last_seq_on(follower, &stream).await, None);

        let restarted_at = Instant::now();
        cluster.restart(follower).await;
        assert_eq!(cluster.ip(follower), ip, "same address after a restart");
        cluster
            .wait_stream_current(&broker.client, &stream, Duration::from_secs(30))
            .await;
        eventually(15, "the restarted node to hold every message", || async {
            (cluster.stream_last_seq_on(follower, &stream).await == Some(last)).then_some(())
        })
        .await;
        eprintln!(
            "{} restarted and current after {:?}",
            cluster.server_name(follower),
            restarted_at.elapsed()
        );
    })
    .await;
}

#[tokio::test]
async fn pausing_the_leader_past_the_election_timeout_elects_another_and_resuming_rejoins_it() {
    if NatsCluster::skip_if_unavailable() {
        return;
    }
    bounded(async {
        let mut cluster = NatsCluster::start(NatsClusterOptions::default()).await;
        let broker = cluster.broker().await;
        let stream = broker.names.event_stream();
        let leader = cluster
            .wait_stream_current(&broker.client, &stream, Duration::from_secs(20))
            .await;
        // A client of the paused node would wait on it (its kernel keeps the connection).
        let survivors = cluster.client_of(&others(&cluster, leader)).await;
        let survivors_js = jetstream::new(survivors.clone());

        cluster.pause(leader);
        cluster.pause(leader); // idempotent
        assert!(cluster.is_paused(leader) && cluster.is_running(leader));
        let paused_at = Instant::now();
        let new_leader = eventually(30, "a stream leader other than the paused one", || async {
            cluster
                .stream_leader(&survivors, &stream)
                .await
                .filter(|&l| l != leader)
        })
        .await;
        eprintln!(
            "stream leader {} paused; {} elected after {:?}",
            cluster.server_name(leader),
            cluster.server_name(new_leader),
            paused_at.elapsed()
        );
        let sequence = publish_eventually(&survivors_js, subject(&broker.names), 20).await;

        cluster.resume(leader);
        assert!(!cluster.is_paused(leader));
        let resumed_at = Instant::now();
        cluster
            .wait_stream_current(&survivors, &stream, Duration::from_secs(30))
            .await;
        eventually(
            15,
            "the resumed node to hold the message published without it",
            || async {
                (cluster.stream_last_seq_on(leader, &stream).await == Some(sequence)).then_some(())
            },
        )
        .await;
        eprintln!(
            "{} resumed and current after {:?}",
            cluster.server_name(leader),
            resumed_at.elapsed()
        );
    })
    .await;
}

#[tokio::test]
async fn a_partitioned_node_cannot_publish_while_the_others_can_and_catches_up_after_heal() {
    if NatsCluster::skip_if_unavailable() {
        return;
    }
    bounded(async {
        let mut cluster = NatsCluster::start(NatsClusterOptions::default()).await;
        let broker = cluster.broker().await;
        let stream = broker.names.event_stream();
        let leader = cluster
            .wait_stream_current(&broker.client, &stream, Duration::from_secs(20))
            .await;
        let cut = (leader + 1) % 3;
        let isolated = cluster.client_of(&[cut]).await;
        let isolated_js = jetstream::new(isolated.clone());
        let majority = cluster.client_of(&others(&cluster, cut)).await;
        let majority_js = jetstream::new(majority.clone());
        publish(&isolated_js, subject(&broker.names), Duration::from_secs(5))
            .await
            .expect("the node's client publishes before the partition");

        cluster.partition(cut);
        cluster.partition(cut); // idempotent
        assert!(cluster.is_partitioned(cut));
        let refused = publish(&isolated_js, subject(&broker.names), Duration::from_secs(3)).await;
        assert!(
            refused.is_err(),
            "a client of the partitioned node got an ack: {refused:?}"
        );
        // The harness closed nothing: the client still believes it is connected.
        assert_eq!(
            isolated.connection_state(),
            async_nats::connection::State::Connected
        );
        assert_eq!(
            cluster.stream_last_seq_on(cut, &stream).await,
            None,
            "the partitioned node is unreachable from the root namespace too"
        );
        let mut last = 0;
        for _ in 0..3 {
            last = publish_eventually(&majority_js, subject(&broker.names), 15).await;
        }

        cluster.heal(cut);
        cluster.heal(cut); // idempotent
        assert!(!cluster.is_partitioned(cut));
        let healed_at = Instant::now();
        cluster
            .wait_stream_current(&majority, &stream, Duration::from_secs(30))
            .await;
        // The refused publish still sits in the isolated client's socket and may land now,
        // so the healed node must match the leader, at least up to what was acked.
        let held = eventually(
            15,
            "the healed node to hold what the leader holds",
            || async {
                let leader = cluster.stream_leader(&majority, &stream).await?;
                let held = cluster.stream_last_seq_on(cut, &stream).await?;
                let on_leader = cluster.stream_last_seq_on(leader, &stream).await?;
                (held >= last && held == on_leader).then_some(held)
            },
        )
        .await;
        eprintln!(
            "{} healed and current (last sequence {held}, {last} acked) after {:?}",
            cluster.server_name(cut),
            healed_at.elapsed()
        );
    })
    .await;
}

/// What a cluster made that must be gone after it: namespaces, links, processes, files.
struct Footprint {
    namespaces: Vec<String>,
    links: Vec<String>,
    pids: Vec<u32>,
    dirs: Vec<std::path::PathBuf>,
}

impl Footprint {
    fn of(cluster: &NatsCluster) -> Footprint {
        Footprint {
            namespaces: cluster.namespaces(),
            links: cluster.links(),
            pids: (0..cluster.node_count())
                .filter_map(|i| cluster.pid(i))
                .collect(),
            dirs: (0..cluster.node_count())
                .map(|i| cluster.store_dir(i).to_owned())
                .collect(),
        }
    }

    fn assert_gone(&self, after: &str) {
        let namespaces = command_output("ip", &["netns", "list"]);
        let links = command_output("ip", &["-o", "link", "show"]);
        for namespace in &self.namespaces {
            assert!(
                !namespaces.split_whitespace().any(|n| n == namespace),
                "namespace {namespace} remains after {after}"
            );
        }
        for link in &self.links {
            assert!(
                !links.contains(&format!(" {link}:")) && !links.contains(&format!(" {link}@")),
                "link {link} remains after {after}"
            );
        }
        for pid in &self.pids {
            assert!(
                !std::path::Path::new(&format!("/proc/{pid}")).exists(),
                "nats-server {pid} still runs after {after}"
            );
        }
        for dir in &self.dirs {
            assert!(!dir.exists(), "{} remains after {after}", dir.display());
        }
    }
}

fn command_output(program: &str, args: &[&str]) -> String {
    let output = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program} ({e})"));
    assert!(output.status.success(), "{program} {args:?} failed");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test]
async fn dropping_the_cluster_leaves_nothing_behind_even_when_a_test_panics() {
    if NatsCluster::skip_if_unavailable() {
        return;
    }
    bounded(async {
        let mut cluster = NatsCluster::start(NatsClusterOptions::default()).await;
        cluster.pause(0);
        cluster.partition(1);
        let footprint = Footprint::of(&cluster);
        assert_eq!(footprint.namespaces.len(), 3);
        assert_eq!(footprint.links.len(), 4, "three veths and a bridge");
        let namespaces = command_output("ip", &["netns", "list"]);
        assert!(namespaces.contains(&footprint.namespaces[0]));
        drop(cluster);
        footprint.assert_gone("a drop");

        // A test that panics with a cluster: Drop runs on unwind.
        let (sender, receiver) = std::sync::mpsc::channel();
        let panicked = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the panicking thread");
            runtime.block_on(async {
                let cluster = NatsCluster::start(NatsClusterOptions::default()).await;
                sender
                    .send(Footprint::of(&cluster))
                    .expect("the test thread waits for the footprint");
                panic!("a test failing with a cluster up (on purpose)");
            })
        })
        .join();
        assert!(panicked.is_err(), "the thread panicked");
        receiver
            .recv()
            .expect("the cluster started before the panic")
            .assert_gone("a panic");
    })
    .await;
}
