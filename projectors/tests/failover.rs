//! Active/standby projectors under command load: two replicas (each behind a TCP proxy of
//! its own to NATS, so the test can cut one off), and in turn the active one is killed
//! (SIGKILL), paused past its lease (SIGSTOP, then SIGCONT while events flow) and cut off
//! from NATS. Each time a standby must take every projection over within 10 s of the fault;
//! the replica paused across a takeover must write nothing once it resumes (fencing); and
//! at the end the read models must equal what the accepted commands produced.
//!
//! Short version (CI): each fault once. `FAULTS_LONG=1`: each three times.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{CommandLoad, Projectors, differences, long_version, mismatch, wait_for_read_models};
use events::Projection;
use read_models::{CourseStore, PgStudents};
use test_support::{TcpProxy, TestBroker, TestDatabase};

/// The bound the issue sets; the lease (5 s) plus polling, claim and resubscription.
const TAKEOVER_BOUND: Duration = Duration::from_secs(10);

struct Replica {
    name: String,
    proxy: TcpProxy,
    projectors: Projectors,
}

impl Replica {
    async fn start(name: &str, prefix: &str, db_url: &str) -> Replica {
        let proxy = TcpProxy::start(test_support::nats_addr()).await;
        let mut projectors = Projectors::start_with(
            prefix,
            db_url,
            &[
                ("NATS_URL", proxy.nats_url().as_str()),
                ("PROJECTOR_REPLICA_NAME", name),
            ],
        );
        projectors.wait_started().await;
        Replica {
            name: name.to_owned(),
            proxy,
            projectors,
        }
    }

    /// Whether this replica reports itself active for `projection` (`None`: no answer).
    async fn active(&self, http: &reqwest::Client, projection: Projection) -> Option<bool> {
        let label = format!("projection=\"{}\"", projection.as_str());
        self.projectors
            .metric(http, "projection_active", &label)
            .await
            .map(|value| value > 0.5)
    }

    async fn applied(&self, http: &reqwest::Client) -> Option<f64> {
        self.projectors
            .metric(http, "projection_events_applied_total", "projection=")
            .await
    }

    fn signal(&self, signal: &str) {
        let sent = std::process::Command::new("kill")
            .args([signal, &self.projectors.process.id().to_string()])
            .status()
            .expect("kill");
        assert!(sent.success(), "kill {signal} {}", self.name);
    }
}

/// Waits until every projection is active on one of `replicas`; how long that took.
async fn wait_for_takeover(
    http: &reqwest::Client,
    replicas: &[&Replica],
    since: Instant,
    what: &str,
) -> Duration {
    loop {
        let mut covered = 0;
        for projection in Projection::ALL {
            for replica in replicas {
                if replica.active(http, projection).await == Some(true) {
                    covered += 1;
                    break;
                }
            }
        }
        if covered == Projection::ALL.len() {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < TAKEOVER_BOUND + Duration::from_secs(5),
            "{what}: no standby took every projection over within {:?}",
            since.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn all_but(replicas: &[Replica], excluded: usize) -> Vec<&Replica> {
    replicas
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != excluded)
        .map(|(_, r)| r)
        .collect()
}

/// The replica active for the students projection: waits until exactly one says so (a
/// replica that just lost its lease may say so for a moment longer).
async fn active_replica(http: &reqwest::Client, replicas: &[Replica]) -> usize {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut active = Vec::new();
        for (index, replica) in replicas.iter().enumerate() {
            if replica.active(http, Projection::Students).await == Some(true) {
                active.push(index);
            }
        }
        if let [only] = active[..] {
            return only;
        }
        assert!(
            Instant::now() < deadline,
            "not exactly one active replica within 20 s: {active:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_within_10_s_and_a_paused_active_writes_nothing_after() {
    let rounds = if long_version() { 3 } else { 1 };
    let broker = TestBroker::start().await;
    let db = TestDatabase::create().await;
    let state = command_gateway::app_state(
        broker.client.clone(),
        broker.names.clone(),
        test_support::test_kek(),
    )
    .await
    .expect("command side");
    let commands = state.commands.clone();
    let http = reqwest::Client::new();
    let prefix = broker.names.prefix().to_owned();

    let mut replicas = vec![
        Replica::start("replica-0", &prefix, &db.url).await,
        Replica::start("replica-1", &prefix, &db.url).await,
    ];
    let mut next_name = 2;
    let load = CommandLoad::new(&commands, 18, 10).await;
    let stop = Arc::new(AtomicBool::new(false));
    let running = {
        let (commands, stop) = (commands.clone(), stop.clone());
        tokio::spawn(async move { load.run_until(&commands, 80, &stop).await })
    };
    let started = Instant::now();
    let mut takeovers: Vec<(&str, Duration)> = Vec::new();
    let mut fenced_checks = 0;

    for _ in 0..rounds {
        // SIGKILL: the lease is not released; the standby waits for it to expire.
        let victim = active_replica(&http, &replicas).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut killed = replicas.remove(victim);
        let at = Instant::now();
        killed.projectors.process.kill();
        let survivors: Vec<&Replica> = replicas.iter().collect();
        takeovers.push((
            "sigkill",
            wait_for_takeover(&http, &survivors, at, "SIGKILL").await,
        ));
        replicas.push(Replica::start(&format!("replica-{next_name}"), &prefix, &db.url).await);
        next_name += 1;

        // SIGSTOP past the lease, then SIGCONT while events flow: fenced.
        let victim = active_replica(&http, &replicas).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let at = Instant::now();
        replicas[victim].signal("-STOP");
        let others = all_but(&replicas, victim);
        takeovers.push((
            "sigstop",
            wait_for_takeover(&http, &others, at, "SIGSTOP").await,
        ));
        tokio::time::sleep(Duration::from_secs(1)).await;
        replicas[victim].signal("-CONT");
        // Let what was in flight at the pause settle (a commit that the server had made
        // before the takeover may still be counted), then watch it while events flow.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let resumed = &replicas[victim];
        let before = resumed
            .applied(&http)
            .await
            .expect("the resumed replica answers");
        tokio::time::sleep(Duration::from_secs(3)).await;
        let after = resumed
            .applied(&http)
            .await
            .expect("the resumed replica answers");
        assert_eq!(
            before, after,
            "the replica resumed after a takeover applied events ({before} → {after})"
        );
        for projection in Projection::ALL {
            assert_eq!(
                resumed.active(&http, projection).await,
                Some(false),
                "the resumed replica still reports itself active for {projection:?}"
            );
        }
        fenced_checks += 1;

        // Cut off from NATS: it cannot renew; a standby takes over.
        let victim = active_replica(&http, &replicas).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let at = Instant::now();
        replicas[victim].proxy.block().await;
        let others = all_but(&replicas, victim);
        takeovers.push((
            "nats-cut",
            wait_for_takeover(&http, &others, at, "NATS cut").await,
        ));
        replicas[victim].proxy.unblock();
    }

    stop.store(true, Ordering::Relaxed);
    let load = running.await.expect("load task");
    let students = PgStudents::with_pool(db.pool.clone())
        .await
        .expect("students store");
    let courses = CourseStore::connect(&db.url).await.expect("courses store");
    if let Err(model) = wait_for_read_models(&students, &courses, &load.expected, 60).await {
        panic!(
            "read models differ from the accepted commands:\n{}",
            differences(&model, &load.expected)
        );
    }
    let found = mismatch(
        &common::read_models(&students, &courses).await,
        &load.expected,
    );
    let dead_letters = broker.dead_letter_count().await;
    assert_eq!(
        dead_letters, 0,
        "no event may be dead-lettered by a failover"
    );
    let mut times: Vec<Duration> = takeovers.iter().map(|(_, t)| *t).collect();
    times.sort();
    let worst = times.last().copied().unwrap_or_default();
    assert!(
        worst <= TAKEOVER_BOUND,
        "a takeover took {worst:?}: {takeovers:?}"
    );
    let kinds: Vec<String> = takeovers
        .iter()
        .map(|(kind, took)| format!("{kind}:{}ms", took.as_millis()))
        .collect();
    println!(
        "RELIABILITY: scenario=projectors-failover commands_per_s={:.0} duration_s={:.1} \
         faults={} ({}) takeover_ms_min={} takeover_ms_median={} takeover_ms_max={} \
         fenced_resumes={fenced_checks} commands={} accepted={} lost={} unexpected={} dead_letters={dead_letters}",
        load.attempted as f64 / started.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64(),
        takeovers.len(),
        kinds.join(" "),
        times.first().map_or(0, Duration::as_millis),
        times[times.len() / 2].as_millis(),
        worst.as_millis(),
        load.attempted,
        load.accepted,
        found.lost,
        found.unexpected,
    );
    drop(replicas);
    db.cleanup().await;
    broker.cleanup().await;
}
