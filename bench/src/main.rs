//! `bench`: measures the system on this machine next to raw ceilings measured the same way,
//! in the same run. Benchmarks are not tests: nothing here asserts a speed.
//!
//! `bench reads` needs the local stack (`scripts/dev up`, release build): it writes one
//! student through the gateway, starts two query-api processes of its own (with and without
//! Redis) and a hello-world server, and drives each with the same load generator.

mod hello;
mod load;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

use load::LoadResult;

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
    /// Cached and uncached `GET /api/students/{id}` and gRPC `GetStudent` next to
    /// hello-world axum and tonic handlers.
    Reads(ReadsArgs),
    /// The hello-world servers the read ceilings are measured against (started by `reads`).
    #[command(hide = true)]
    HelloServer {
        #[arg(long)]
        http: SocketAddr,
        #[arg(long)]
        grpc: SocketAddr,
    },
}

#[derive(clap::Args)]
struct ReadsArgs {
    /// Seconds each measurement lasts (after a 1 s warm-up).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Runs of every measurement (min/median/max are reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Concurrent requests in flight.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// HTTP/2 connections the gRPC load shares.
    #[arg(long, default_value_t = 4)]
    grpc_connections: usize,
    /// The gateway of the running stack.
    #[arg(
        long,
        env = "BENCH_GATEWAY_URL",
        default_value = "http://127.0.0.1:18081"
    )]
    gateway: String,
    #[arg(long, env = "BENCH_WRITE_KEY", default_value = "dev-write-key")]
    write_key: String,
    /// Directory holding the `query-api` binary (default: next to this one).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Commands::Reads(args) => reads(args).await,
        Commands::HelloServer { http, grpc } => hello::serve(http, grpc).await,
    }
}

const READ_KEY: &str = "bench-read-key";

/// A child process killed on drop, with its CPU time readable from /proc.
struct Server {
    child: Child,
    http: SocketAddr,
    grpc: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn cpu_seconds(&self) -> f64 {
        cpu_seconds(&format!("/proc/{}/stat", self.child.id()))
    }
}

/// User plus system CPU time of a process (`/proc/<pid>/stat`, in USER_HZ = 100 ticks/s).
fn cpu_seconds(stat_path: &str) -> f64 {
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

fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

async fn wait_until_listening(addr: SocketAddr) -> anyhow::Result<()> {
    for _ in 0..300 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("nothing listens on {addr} after 6 s")
}

async fn start_query_api(bin_dir: &std::path::Path, with_redis: bool) -> anyhow::Result<Server> {
    let (http, grpc) = (free_addr()?, free_addr()?);
    let mut command = Command::new(bin_dir.join("query-api"));
    command
        .env("LISTEN_ADDR", http.to_string())
        .env("GRPC_LISTEN_ADDR", grpc.to_string())
        .env("API_KEYS", format!("read:{READ_KEY}"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null());
    if !with_redis {
        command.env_remove("REDIS_URL");
    }
    let child = command
        .spawn()
        .with_context(|| format!("starting {}/query-api", bin_dir.display()))?;
    let server = Server { child, http, grpc };
    wait_until_listening(http).await?;
    wait_until_listening(grpc).await?;
    Ok(server)
}

async fn start_hello() -> anyhow::Result<Server> {
    let (http, grpc) = (free_addr()?, free_addr()?);
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
    let server = Server { child, http, grpc };
    wait_until_listening(http).await?;
    wait_until_listening(grpc).await?;
    Ok(server)
}

/// Registers a student and waits until the query side shows it.
async fn seed_student(args: &ReadsArgs, query: &Server) -> anyhow::Result<String> {
    let http = reqwest::Client::new();
    let created = http
        .post(format!("{}/api/students", args.gateway))
        .header("x-api-key", &args.write_key)
        .json(&serde_json::json!({"name": "Ada L", "first_name": "Ada", "last_name": "Lovelace"}))
        .send()
        .await
        .context("the gateway of the local stack (scripts/dev up)")?;
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
    let seen = http
        .get(format!("http://{}/api/students/{id}", query.http))
        .header("x-api-key", READ_KEY)
        .header("x-consistency-token", token)
        .send()
        .await?;
    if !seen.status().is_success() {
        bail!(
            "the seed student is not visible on the query side: {}",
            seen.status()
        );
    }
    Ok(id)
}

/// One figure over several runs.
struct Figure {
    name: &'static str,
    runs: Vec<(LoadResult, f64, f64)>,
}

impl Figure {
    fn sorted(&self, value: impl Fn(&(LoadResult, f64, f64)) -> f64) -> Vec<f64> {
        let mut values: Vec<f64> = self.runs.iter().map(value).collect();
        values.sort_by(f64::total_cmp);
        values
    }

    fn median(&self, value: impl Fn(&(LoadResult, f64, f64)) -> f64) -> f64 {
        let values = self.sorted(value);
        values.get(values.len() / 2).copied().unwrap_or(0.0)
    }
}

async fn measure(
    server: &Server,
    run: impl AsyncFn() -> anyhow::Result<LoadResult>,
) -> anyhow::Result<(LoadResult, f64, f64)> {
    let server_before = server.cpu_seconds();
    let own_before = cpu_seconds("/proc/self/stat");
    let result = run().await?;
    let server_cpu = server.cpu_seconds() - server_before;
    let own_cpu = cpu_seconds("/proc/self/stat") - own_before;
    Ok((result, server_cpu, own_cpu))
}

async fn reads(args: ReadsArgs) -> anyhow::Result<()> {
    let bin_dir = match &args.bin_dir {
        Some(dir) => dir.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("the bench binary has no directory")?
            .to_path_buf(),
    };
    let hello = start_hello().await?;
    let cached = start_query_api(&bin_dir, true).await?;
    let uncached = start_query_api(&bin_dir, false).await?;
    let id = seed_student(&args, &cached).await?;
    let path = format!("/api/students/{id}");
    let warmup = Duration::from_secs(1);
    let duration = Duration::from_secs(args.seconds);
    let c = args.concurrency;
    let grpc_url = |s: &Server| format!("http://{}", s.grpc);

    let mut figures: Vec<Figure> = [
        "REST hello-world axum (ceiling)",
        "REST GET /api/students/{id}, cached",
        "REST GET /api/students/{id}, uncached (no Redis)",
        "gRPC hello-world tonic (ceiling)",
        "gRPC GetStudent, cached",
        "gRPC GetStudent, uncached (no Redis)",
    ]
    .into_iter()
    .map(|name| Figure {
        name,
        runs: Vec::new(),
    })
    .collect();
    for run in 0..args.runs {
        eprintln!("run {} of {}", run + 1, args.runs);
        for (i, server) in [&hello, &cached, &uncached].into_iter().enumerate() {
            let http = measure(server, async || {
                load::http_get(server.http, &path, READ_KEY, c, warmup, duration).await
            })
            .await?;
            figures[i].runs.push(http);
            let grpc = measure(server, async || {
                load::grpc_get_student(
                    &grpc_url(server),
                    &id,
                    READ_KEY,
                    c,
                    args.grpc_connections,
                    warmup,
                    duration,
                )
                .await
            })
            .await?;
            figures[i + 3].runs.push(grpc);
        }
    }

    println!(
        "Reads: {c} requests in flight, {} s per run after 1 s warm-up, {} runs; load generator and servers share the machine.\n",
        args.seconds, args.runs
    );
    println!(
        "| figure | req/s min / median / max | p50 ms | p99 ms | errors | server CPU s | load generator CPU s |"
    );
    println!("|---|---|---|---|---|---|---|");
    for figure in &figures {
        let rates = figure.sorted(|(r, _, _)| r.per_second());
        println!(
            "| {} | {:.0} / {:.0} / {:.0} | {:.2} | {:.2} | {} | {:.1} | {:.1} |",
            figure.name,
            rates.first().copied().unwrap_or(0.0),
            figure.median(|(r, _, _)| r.per_second()),
            rates.last().copied().unwrap_or(0.0),
            figure.median(|(r, _, _)| r.p50_ms()),
            figure.median(|(r, _, _)| r.p99_ms()),
            figure.runs.iter().map(|(r, _, _)| r.errors).sum::<u64>(),
            figure.median(|(_, server, _)| *server),
            figure.median(|(_, _, own)| *own),
        );
    }
    let ratio = |system: usize, ceiling: usize| {
        100.0 * figures[system].median(|(r, _, _)| r.per_second())
            / figures[ceiling].median(|(r, _, _)| r.per_second()).max(1.0)
    };
    println!(
        "\nCached REST is {:.0} % of the axum ceiling; cached gRPC is {:.0} % of the tonic ceiling (medians).",
        ratio(1, 0),
        ratio(4, 3)
    );
    Ok(())
}
