//! `bench`: measures every figure of SPEC §10 on this machine next to its raw ceiling,
//! measured the same way in the same run, and writes BENCHMARKS.md and a PNG chart.
//! Benchmarks are not tests: nothing here asserts a speed.
//!
//! Needs the local stack's NATS, Postgres and Redis (`scripts/dev bench` starts them and
//! builds in release mode). Each figure runs on streams and a database of its own, with the
//! services started as processes of their own from the release binaries next to this one.
//! The durability rows start 3-node JetStream clusters of their own (`cluster.rs`). The
//! MongoDB row runs on the server `--mongodb-url` names, when one is named (`mongo.rs`).

mod cluster;
mod figures;
mod hello;
mod load;
mod mongo;
mod peer;
mod report;
mod world;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

use figures::Run;
use report::{Compare, Row, median};
use world::{Process, World};

// The projection figures run the projector inside this process: with the allocator of the
// projectors binary, so they measure what it would do.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "bench",
    about = "Benchmarks of the school system next to raw ceilings"
)]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// Every figure of SPEC §10; writes BENCHMARKS.md and bench.png (not with --tiny).
    All(Args),
    /// The hello-world servers the read ceilings are measured against (started by `all`).
    #[command(hide = true)]
    HelloServer {
        #[arg(long)]
        http: SocketAddr,
        #[arg(long)]
        grpc: SocketAddr,
    },
    /// The cqrs-es + postgres-es peer (started by `all`).
    #[command(hide = true)]
    PeerServer {
        #[arg(long)]
        http: SocketAddr,
        #[arg(long)]
        database_url: String,
    },
}

#[derive(clap::Args, Clone)]
struct Args {
    /// A few seconds in all, to prove the command works (the test command runs this).
    #[arg(long)]
    tiny: bool,
    /// Seconds each load measurement lasts (after a 1 s warm-up).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Runs of every measurement (min/median/max are reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Concurrent requests in flight.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Events in the projection backlog.
    #[arg(long, default_value_t = 200_000)]
    projection_events: usize,
    /// Events in the replayed stream.
    #[arg(long, default_value_t = 1_000_000)]
    replay_events: usize,
    /// Directory holding the release binaries (default: next to this one).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Where the report goes.
    #[arg(long, default_value = "BENCHMARKS.md")]
    output: PathBuf,
    /// Where the chart goes.
    #[arg(long, default_value = "bench.png")]
    chart: PathBuf,
    /// Where the bench's 3-node clusters keep their JetStream stores (removed after each
    /// run). Its filesystem decides what an fsync costs: not tmpfs.
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    cluster_store: PathBuf,
    /// Measure only these parts (for profiling one figure; prints the table, writes nothing).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Part>,
    /// The MongoDB of the courses-projection row (`mongodb://…`); without one the row is not
    /// measured. Each run uses a database of its own there and drops it.
    #[arg(long, env = "MONGODB_URL", hide_env_values = true)]
    mongodb_url: Option<String>,
    /// The server of --mongodb-url is the wire-protocol stand-in, not MongoDB (`scripts/dev`
    /// sets it; the server's buildInfo is asked too): the row's name says so.
    #[arg(long, env = "MONGODB_STANDIN", value_parser = clap::builder::FalseyValueParser::new())]
    mongodb_standin: bool,
    /// Course events in the MongoDB row's backlog (default: 20 000; 2 000 on the stand-in,
    /// which is slow).
    #[arg(long)]
    mongo_events: Option<usize>,
}

/// The parts of a run that `--only` can pick.
#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq)]
enum Part {
    /// Create commands, their publish-with-ack ceiling, and accepted -> visible.
    Commands,
    /// Cached and uncached REST and gRPC reads, and the hello-world ceilings.
    Reads,
    /// The cqrs-es + postgres-es peer.
    Peer,
    /// The projector on a backlog, and the UNNEST ceiling.
    Projection,
    /// The full replay.
    Replay,
    /// Create commands and their publish-with-ack ceiling on 3-node clusters (R3), with the
    /// server's default sync_interval and with `always`.
    Cluster,
    /// The courses projection into MongoDB and its bulk-upsert ceiling (needs --mongodb-url).
    Mongo,
}

impl Args {
    fn effective(mut self) -> Self {
        if self.tiny {
            self.seconds = 1;
            self.runs = 1;
            self.concurrency = 4;
            self.projection_events = 2_000;
            self.replay_events = 5_000;
            // The stand-in writes a few hundred documents a second: 2 batches, ~2 s.
            self.mongo_events = Some(500);
        }
        self
    }

    fn measures(&self, part: Part) -> bool {
        self.only.is_empty() || self.only.contains(&part)
    }

    /// The MongoDB row's server, when the row is measured.
    fn mongodb_url(&self) -> anyhow::Result<Option<&str>> {
        let url = self.mongodb_url.as_deref().filter(|u| !u.trim().is_empty());
        if !self.measures(Part::Mongo) {
            return Ok(None);
        }
        if url.is_none() && self.only.contains(&Part::Mongo) {
            bail!("--only mongo needs a server: --mongodb-url (or MONGODB_URL)");
        }
        Ok(url)
    }

    fn duration(&self) -> Duration {
        Duration::from_secs(self.seconds)
    }

    fn warmup(&self) -> Duration {
        if self.tiny {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(1)
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Commands::All(args) => all(args.effective()).await,
        Commands::HelloServer { http, grpc } => hello::serve(http, grpc).await,
        Commands::PeerServer { http, database_url } => peer::serve(http, &database_url).await,
    }
}

fn say(text: &str) {
    eprintln!("==> {text}");
}

async fn start_hello() -> anyhow::Result<Process> {
    let (http, grpc) = (world::free_addr()?, world::free_addr()?);
    let child = Command::new(std::env::current_exe()?)
        .args([
            "hello-server",
            "--http",
            &http.to_string(),
            "--grpc",
            &grpc.to_string(),
        ])
        .stdout(Stdio::null())
        .spawn()?;
    let process = Process::adopt(child, http, Some(grpc));
    world::wait_until_listening(http).await?;
    world::wait_until_listening(grpc).await?;
    Ok(process)
}

async fn start_peer(database_url: &str) -> anyhow::Result<Process> {
    let http = world::free_addr()?;
    let child = Command::new(std::env::current_exe()?)
        .args([
            "peer-server",
            "--http",
            &http.to_string(),
            "--database-url",
            database_url,
        ])
        .stdout(Stdio::null())
        .spawn()?;
    let process = Process::adopt(child, http, None);
    world::wait_until_listening(http).await?;
    Ok(process)
}

/// Registers a student through the gateway and waits until the query side shows it.
async fn seed_student(system: &world::System) -> anyhow::Result<String> {
    let http = reqwest::Client::new();
    let created = http
        .post(format!("{}/api/students", system.gateway.url()))
        .header("x-api-key", world::WRITE_KEY)
        .json(&serde_json::json!({"name": "Ada L", "first_name": "Ada", "last_name": "Lovelace"}))
        .send()
        .await?;
    if !created.status().is_success() {
        bail!("the gateway refused the seed student: {}", created.status());
    }
    let token = created
        .headers()
        .get("x-consistency-token")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("0")
        .to_owned();
    let body: serde_json::Value = created.json().await?;
    let id = body["data"]["id"]
        .as_str()
        .context("the gateway answered no id")?
        .to_owned();
    // The command load before this left a backlog (the publish-with-ack ceiling writes
    // into the same stream), so each read with the token may answer 503 until the
    // projector has caught up. Waiting for it also keeps the projector idle while reads
    // are measured.
    let deadline = std::time::Instant::now() + Duration::from_secs(600);
    for query in [&system.query, &system.query_uncached] {
        loop {
            let seen = http
                .get(format!("{}/api/students/{id}", query.url()))
                .header("x-api-key", world::READ_KEY)
                .header("x-consistency-token", &token)
                .send()
                .await?;
            if seen.status().is_success() {
                break;
            }
            if seen.status() != reqwest::StatusCode::SERVICE_UNAVAILABLE
                || std::time::Instant::now() >= deadline
            {
                bail!(
                    "the seed student is not visible on the query side: {}",
                    seen.status()
                );
            }
        }
    }
    Ok(id)
}

async fn all(args: Args) -> anyhow::Result<()> {
    let bin_dir = world::bin_dir(args.bin_dir.as_ref())?;
    let (c, warmup, duration) = (args.concurrency, args.warmup(), args.duration());
    let mut commands = Vec::new();
    let mut unsealed_commands = Vec::new();
    let mut sealed_projection = Vec::new();
    let mut publish = Vec::new();
    let mut peer_runs = Vec::new();
    let mut projection = Vec::new();
    let mut unnest = Vec::new();
    let mut unnest_with_broker = Vec::new();
    let mut replay = Vec::new();
    let mut reads: [Vec<Run>; 6] = Default::default();
    let mut visible = Vec::new();
    let mut round_trip = Vec::new();
    let mut cluster_figures = cluster::ClusterFigures::default();
    let mut mongo_figures = mongo::MongoFigures::default();
    let nats_server = if args.measures(Part::Cluster) {
        Some(cluster::nats_server_bin()?)
    } else {
        None
    };
    let mongodb_url = args.mongodb_url()?;
    if mongodb_url.is_none() && args.measures(Part::Mongo) {
        say("no --mongodb-url (or MONGODB_URL): the MongoDB row is not measured");
    }

    let load_before = report::load_average();
    let hello = if args.measures(Part::Reads) {
        Some(start_hello().await?)
    } else {
        None
    };
    for run in 1..=args.runs {
        say(&format!("run {run} of {}", args.runs));
        // Commands, reads and visibility on the real services of one fresh world (only for
        // the parts that use them).
        if args.measures(Part::Commands) || args.measures(Part::Reads) {
            let world = World::new().await;
            let system = world.start_system(&bin_dir).await?;
            if args.measures(Part::Commands) {
                // Sealed and unsealed take turns going first, so neither always meets the
                // fresher stream.
                let unsealed = world.start_unsealed_gateway(&bin_dir).await?;
                for sealed in [run % 2 == 1, run % 2 == 0] {
                    if sealed {
                        say("create commands over HTTP (names sealed)");
                        commands.push(
                            figures::create_commands(&system.gateway, c, warmup, duration).await?,
                        );
                    } else {
                        say("create commands with the names not sealed (the cost of sealing)");
                        unsealed_commands
                            .push(figures::create_commands(&unsealed, c, warmup, duration).await?);
                    }
                }
                drop(unsealed);
                say("JetStream publish-with-ack");
                publish.push(figures::publish_with_ack(&world.broker, c, warmup, duration).await?);
            }

            let id = seed_student(&system).await?;
            let path = format!("/api/students/{id}");
            let read_servers = match &hello {
                Some(hello) => {
                    say("reads: REST and gRPC, cached and uncached, and hello-world ceilings");
                    vec![hello, &system.query, &system.query_uncached]
                }
                None => Vec::new(),
            };
            for (i, server) in read_servers.into_iter().enumerate() {
                let api_key = world::READ_KEY;
                reads[i].push(
                    figures::measured(Some(server), async || {
                        load::http_get(server.http, &path, api_key, c, warmup, duration).await
                    })
                    .await?,
                );
                let grpc = format!("http://{}", server.grpc.context("a gRPC port")?);
                reads[i + 3].push(
                    figures::measured(Some(server), async || {
                        load::grpc_get_student(&grpc, &id, api_key, c, 4, warmup, duration).await
                    })
                    .await?,
                );
            }

            if args.measures(Part::Commands) {
                say("command accepted -> visible, at half the measured command rate");
                let rate = (commands.last().map_or(100.0, |r| r.rate) / 2.0).max(10.0);
                visible.push(
                    figures::accepted_to_visible(&world, &system.gateway, rate, duration).await?,
                );
                round_trip.push(
                    figures::round_trip_ceiling(&world, if args.tiny { 50 } else { 1000 }).await?,
                );
            }
            drop(system);
            world.cleanup().await;
        }

        if let Some(nats_server) = &nats_server {
            for sync in cluster::ClusterFigures::SETTINGS {
                say(&format!(
                    "create commands and publish-with-ack on a 3-node cluster (R3), {}",
                    sync.describe()
                ));
                let runs = cluster::create_commands(
                    nats_server,
                    &args.cluster_store,
                    &bin_dir,
                    sync,
                    c,
                    warmup,
                    duration,
                )
                .await?;
                cluster_figures.push(sync, runs);
            }
        }

        if args.measures(Part::Peer) {
            say("the peer: cqrs-es + postgres-es");
            let peer_world = World::new().await;
            let peer = start_peer(&peer_world.db.url).await?;
            peer_runs.push(
                figures::measured(Some(&peer), async || {
                    load::http_load(
                        peer.http,
                        hyper::StatusCode::CREATED,
                        c,
                        warmup,
                        duration,
                        || load::HttpRequest {
                            method: hyper::Method::POST,
                            path: "/api/students".into(),
                            api_key: world::WRITE_KEY,
                            body: Some(hyper::body::Bytes::from_static(
                                br#"{"name":"Bench B","first_name":"Bench","last_name":"Student"}"#,
                            )),
                        },
                    )
                    .await
                })
                .await?,
            );
            drop(peer);
            peer_world.cleanup().await;
        }

        if args.measures(Part::Projection) {
            say(&format!(
                "projector on a backlog of {} events, and raw UNNEST upserts",
                args.projection_events
            ));
            // The sealed backlog goes first in every other run (as the commands above).
            if run % 2 == 0 {
                say("projector on the backlog with the names sealed");
                sealed_projection.push(figures::sealed_projection(args.projection_events).await?);
            }
            let runs = figures::projection(args.projection_events).await?;
            projection.push(runs.system);
            if run % 2 == 1 {
                say("projector on the same backlog with the names sealed");
                sealed_projection.push(figures::sealed_projection(args.projection_events).await?);
            }
            unnest.push(runs.ceiling);
            unnest_with_broker.push(runs.ceiling_with_broker);
        }

        if args.measures(Part::Replay) {
            say(&format!(
                "full replay of about {} events while reads are served",
                args.replay_events
            ));
            replay.push(figures::full_replay(args.replay_events).await?);
        }

        if let Some(url) = mongodb_url {
            say("courses projection into MongoDB, and its bulk-upsert ceiling");
            let batch = if args.tiny {
                250
            } else {
                figures::PROJECTOR_BATCH
            };
            mongo_figures.push(
                mongo::courses_projection(url, args.mongo_events, batch, args.mongodb_standin)
                    .await?,
            );
        }
    }
    drop(hello);

    let replay_notes: Vec<String> = replay.iter().map(|r| r.note.clone()).collect();
    let broker_notes: Vec<String> = unnest_with_broker.iter().map(|r| r.note.clone()).collect();
    let cluster_note = cluster_figures.note();
    let mongo_text = mongo_figures.measured().then(|| {
        format!(
            "{} Server: {}{}. Runs: {}.",
            mongo::REPORT_TEXT,
            mongo_figures.server.version,
            if mongo_figures.server.stand_in {
                " (the MongoDB wire-protocol stand-in of ../shared/mongo-standin, a Python \
                 server: its figures say nothing about MongoDB)"
            } else {
                ""
            },
            mongo_figures.notes.join("; ")
        )
    });
    let rows = rows(
        &args,
        [commands, unsealed_commands],
        publish,
        peer_runs,
        [projection, sealed_projection],
        [unnest, unnest_with_broker],
        replay,
        reads,
        visible,
        round_trip,
        cluster_figures,
        mongo_figures,
    );
    if !args.only.is_empty() {
        let measured: Vec<Row> = rows.into_iter().filter(|r| !r.runs.is_empty()).collect();
        println!("{}", report::table(&measured));
        say("--only: a partial run, nothing written");
        return Ok(());
    }
    let table = report::table(&rows);
    let cluster_store = format!(
        "{} ({})",
        args.cluster_store.display(),
        cluster::filesystem_of(&args.cluster_store)
    );
    println!("{table}");
    println!("Replay runs: {}.", replay_notes.join("; "));
    println!("Broker beside the ceiling: {}.", broker_notes.join("; "));
    println!(
        "Cluster runs, CPU s of the 3 NATS nodes during the commands / the ceiling: {cluster_note} (stores in {cluster_store})."
    );
    if let Some(text) = &mongo_text {
        println!("The MongoDB row: {text}");
    }
    if args.tiny {
        say("tiny run: nothing written");
        return Ok(());
    }
    let command_line = std::env::args().collect::<Vec<_>>().join(" ");
    let document = format!(
        "# Benchmarks\n\n\
         Measured by `scripts/dev bench all` (here: `{command_line}`) on {date}.\n\n\
         Machine: {machine}. Load generator, services, NATS, Postgres and Redis share it \
         (1-minute load average {load_before} at the start, {load_after} at the end).\n\
         Settings: {c} requests in flight, {secs} s per load measurement after a 1 s warm-up,\n\
         {runs} runs (median, min – max); projector backlog {pe} events; replay of about {re} events.\n\
         CPU columns: seconds used by the measured service process / by the bench process\n\
         (NATS, Postgres and Redis are not counted; 0 where the measured code runs inside\n\
         the bench process).\n\n{table}\nReplay runs: {notes}.\n\n\
         Broker beside the projector's ceiling (the bare consumer of the broker-busy row): {broker}.\n\n\
         The R3 rows: {cluster_text}\n\n\
         CPU s of the 3 NATS nodes in each cluster run (during the commands / during the ceiling): {cluster_note}.\n\n\
         {mongo}\
         ![throughput and latency](bench.png)\n",
        mongo = mongo_text.map_or_else(String::new, |t| format!("The MongoDB row: {t}\n\n")),
        cluster_text = cluster::REPORT_TEXT.replace("{store}", &cluster_store),
        notes = replay_notes.join("; "),
        broker = broker_notes.join("; "),
        date = chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
        machine = report::machine(),
        load_after = report::load_average(),
        secs = args.seconds,
        runs = args.runs,
        pe = args.projection_events,
        re = args.replay_events,
    );
    std::fs::write(&args.output, document)
        .with_context(|| format!("writing {}", args.output.display()))?;
    report::chart(&rows, &args.chart)?;
    say(&format!(
        "wrote {} and {}",
        args.output.display(),
        args.chart.display()
    ));
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn rows(
    args: &Args,
    [commands, unsealed_commands]: [Vec<Run>; 2],
    publish: Vec<Run>,
    peer: Vec<Run>,
    [projection, sealed_projection]: [Vec<Run>; 2],
    [unnest, unnest_with_broker]: [Vec<Run>; 2],
    replay: Vec<Run>,
    reads: [Vec<Run>; 6],
    visible: Vec<Run>,
    round_trip: Vec<Run>,
    cluster: cluster::ClusterFigures,
    mongo: mongo::MongoFigures,
) -> Vec<Row> {
    let rate = |runs: &[Run]| median(runs, |r| r.rate);
    let p99 = |runs: &[Run]| median(runs, |r| r.p99_ms);
    let ratio = |a: &[Run], b: &[Run]| rate(a) / rate(b).max(1e-9);
    let [
        hello_rest,
        rest,
        rest_uncached,
        hello_grpc,
        grpc,
        grpc_uncached,
    ] = reads;
    let replay_seconds = median(&replay, |r| r.p50_ms);
    let replay_failed: u64 = replay.iter().map(|r| r.errors).sum();
    let replay_ceiling: Vec<Run> = unnest
        .iter()
        .map(|r| Run {
            rate: r.rate,
            ..Run::default()
        })
        .collect();
    let commands_met =
        rate(&commands) >= 20_000.0 && p99(&commands) <= 10.0 && ratio(&commands, &publish) >= 0.5;
    let rest_met = rate(&rest) >= 30_000.0 && p99(&rest) <= 5.0 && ratio(&rest, &hello_rest) >= 0.6;
    let grpc_met = rate(&grpc) >= 20_000.0 && p99(&grpc) <= 5.0 && ratio(&grpc, &hello_grpc) >= 0.6;
    let peer_met = rate(&commands) > rate(&peer);
    let mut rows = vec![
        Row {
            label: "create commands",
            figure: "create commands over HTTP (expected sequence + Nats-Msg-Id)".into(),
            unit: "/s",
            met: Some(commands_met),
            runs: commands.clone(),
            ceiling_name: "JetStream publish-with-ack".into(),
            ceiling: publish,
            target: "≥ 20 000/s, p99 ≤ 10 ms, ≥ 50 %".into(),
            chart: true,
            compare: Compare::Rate,
        },
        Row {
            label: "create commands, names sealed",
            figure: "create commands over HTTP (as above), names sealed with the student's data key".into(),
            unit: "/s",
            met: Some(ratio(&commands, &unsealed_commands) >= 0.95),
            runs: commands.clone(),
            ceiling_name: "the same gateway storing names in the clear (UNSEALED_FOR_BENCHMARK)"
                .into(),
            ceiling: unsealed_commands,
            target: "≥ 95 % of the unsealed figure".into(),
            chart: false,
            compare: Compare::Rate,
        },
        Row {
            label: "projector",
            figure: "projector into Postgres, live (backlog)".into(),
            unit: "events/s",
            met: Some(rate(&projection) >= 40_000.0 && ratio(&projection, &unnest) >= 0.6),
            runs: projection.clone(),
            ceiling_name: format!(
                "INSERT … SELECT FROM UNNEST … ON CONFLICT, {} rows/tx",
                figures::PROJECTOR_BATCH
            ),
            ceiling: unnest,
            target: "≥ 40 000 events/s, ≥ 60 %".into(),
            chart: true,
            compare: Compare::Rate,
        },
        Row {
            label: "projector, names sealed",
            figure: "projector into Postgres, live (backlog), every name sealed (schema v2)"
                .into(),
            unit: "events/s",
            met: Some(ratio(&sealed_projection, &projection) >= 0.95),
            runs: sealed_projection,
            ceiling_name: "the same projector on plain (v1) events, above".into(),
            ceiling: projection.clone(),
            target: "≥ 95 % of the plain figure".into(),
            chart: false,
            compare: Compare::Rate,
        },
        Row {
            label: "projector, broker busy",
            figure: "projector into Postgres (as above), against the ceiling with the broker busy"
                .into(),
            unit: "events/s",
            met: None,
            runs: projection,
            ceiling_name: "the same UNNEST upserts while JetStream delivers the stream to a bare consumer at the projector's rate".into(),
            ceiling: unnest_with_broker,
            target: "— (shows the broker's share of the gap)".into(),
            chart: false,
            compare: Compare::Rate,
        },
        Row {
            label: "full replay",
            figure: format!(
                "full replay of {} events into a fresh model ({replay_seconds:.1} s median; {replay_failed} failed reads)",
                args.replay_events
            ),
            unit: "events/s",
            met: Some(
                replay_seconds <= 30.0 * args.replay_events as f64 / 1_000_000.0
                    && replay_failed == 0,
            ),
            runs: replay,
            ceiling_name: "the UNNEST ceiling".into(),
            ceiling: replay_ceiling,
            target: "1 M in ≤ 30 s, reads served".into(),
            chart: true,
            compare: Compare::Rate,
        },
        Row {
            label: "REST cached",
            figure: "cached GET /api/students/{id} (REST)".into(),
            unit: "req/s",
            met: Some(rest_met),
            runs: rest,
            ceiling_name: "hello-world axum".into(),
            ceiling: hello_rest,
            target: "≥ 30 000/s, p99 ≤ 5 ms, ≥ 60 %".into(),
            chart: true,
            compare: Compare::Rate,
        },
        Row {
            label: "gRPC cached",
            figure: "cached GetStudent (gRPC)".into(),
            unit: "req/s",
            met: Some(grpc_met),
            runs: grpc,
            ceiling_name: "hello-world tonic".into(),
            ceiling: hello_grpc,
            target: "≥ 20 000/s, p99 ≤ 5 ms, ≥ 60 %".into(),
            chart: true,
            compare: Compare::Rate,
        },
        Row {
            label: "REST uncached",
            figure: "uncached GET /api/students/{id} (no Redis)".into(),
            unit: "req/s",
            met: None,
            runs: rest_uncached,
            ceiling_name: String::new(),
            ceiling: Vec::new(),
            target: "—".into(),
            chart: false,
            compare: Compare::Rate,
        },
        Row {
            label: "gRPC uncached",
            figure: "uncached GetStudent (no Redis)".into(),
            unit: "req/s",
            met: None,
            runs: grpc_uncached,
            ceiling_name: String::new(),
            ceiling: Vec::new(),
            target: "—".into(),
            chart: false,
            compare: Compare::Rate,
        },
        Row {
            label: "accepted → visible",
            figure: "command accepted → visible on the query side (commands/s sent; latency from the 201, 0 when already visible)".into(),
            unit: "/s",
            met: Some(p99(&visible) <= 25.0),
            runs: visible,
            ceiling_name: "JetStream round trip + one Postgres commit".into(),
            ceiling: round_trip,
            target: "p99 ≤ 25 ms at half the max command rate".into(),
            chart: true,
            compare: Compare::P99,
        },
        Row {
            label: "peer (cqrs-es)",
            figure: "peer: the same create command on cqrs-es + postgres-es".into(),
            unit: "/s",
            met: Some(peer_met),
            runs: peer,
            ceiling_name: "ours (create commands above)".into(),
            ceiling: commands,
            target: "ours faster".into(),
            chart: true,
            compare: Compare::Rate,
        },
    ];
    // Next to the projector rows (after "projector, broker busy"), when measured.
    if mongo.measured() {
        let at = rows
            .iter()
            .position(|r| r.label == "projector, broker busy")
            .map_or(rows.len(), |i| i + 1);
        rows.insert(at, mongo_row(mongo));
    }
    // Next to the one-node create-commands rows.
    rows.splice(2..2, cluster_rows(cluster));
    rows
}

/// The courses projection into MongoDB against its bulk-upsert ceiling. No §10 target; on
/// the stand-in it is kept out of the chart (its scale is not MongoDB's).
fn mongo_row(mongo: mongo::MongoFigures) -> Row {
    let stand_in = mongo.server.stand_in;
    Row {
        label: "courses → MongoDB",
        figure: mongo.figure(),
        unit: "events/s",
        met: None,
        ceiling_name: mongo::CEILING.into(),
        runs: mongo.projection,
        ceiling: mongo.ceiling,
        target: "— (the store's share of the projector's work)".into(),
        chart: !stand_in,
        compare: Compare::Rate,
    }
}

/// Create commands on the 3-node cluster, per sync_interval, each against the
/// publish-with-ack ceiling of its own cluster.
fn cluster_rows(cluster: cluster::ClusterFigures) -> Vec<Row> {
    let cluster::ClusterFigures { commands, publish } = cluster;
    let labels = ["commands, R3", "commands, R3 always"];
    commands
        .into_iter()
        .zip(publish)
        .zip(cluster::ClusterFigures::SETTINGS)
        .zip(labels)
        .map(|(((runs, ceiling), sync), label)| Row {
            label,
            figure: format!(
                "create commands over HTTP, 3-node cluster, R3 streams, {}",
                sync.describe()
            ),
            unit: "/s",
            met: None,
            runs,
            ceiling_name: "JetStream publish-with-ack, same cluster".into(),
            ceiling,
            target: "— (the cost of durability; §10's target is the one-node row)".into(),
            chart: true,
            compare: Compare::Rate,
        })
        .collect()
}
