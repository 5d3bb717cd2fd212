use std::io::{BufRead, IsTerminal, Write};

use anyhow::Context;
use clap::{Parser, Subcommand};
use events::{Projection, StreamNames};
use service_kit::event_reader::EventReader;
use service_kit::nats::NatsArgs;
use stream_admin::dlq::{self, ReadModels};
use stream_admin::inspect::{self, TailFrom};
use stream_admin::read_models::ReadModel;
use stream_admin::replay::{self, ReplayOptions};
use stream_admin::status;

#[derive(Debug, Parser)]
#[command(
    name = "stream-admin",
    about = "Creates, inspects and repairs the school system's streams and read models"
)]
struct Cli {
    #[command(flatten)]
    nats: NatsArgs,
    /// Prefix of every stream, subject and bucket name.
    #[arg(long, env = "STREAM_PREFIX", default_value = "school", global = true)]
    stream_prefix: StreamNames,
    /// File of key-encryption keys (lines `<id>:<64 hex digits>`, the first wraps) that open
    /// the students' data keys: needed by `replay`, `dlq redrive` and `keys`; `events` shows
    /// sealed names with it and says they are sealed without it.
    #[arg(long, env = "KEK_FILE", global = true)]
    kek_file: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

/// Where the read models are (status, replay, dlq redrive).
#[derive(Debug, clap::Args)]
struct ReadModelArgs {
    /// Postgres of the students read model (and of the courses one by default).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// The courses read model: `postgres://…` or `mongodb://…` (default: DATABASE_URL).
    #[arg(long, env = "COURSES_STORE_URL", hide_env_values = true)]
    courses_store_url: Option<String>,
}

impl ReadModelArgs {
    async fn connect(&self, projection: Projection) -> anyhow::Result<ReadModel> {
        let database_url = self
            .database_url
            .as_deref()
            .context("DATABASE_URL (or --database-url) is needed to reach the read models")?;
        ReadModel::connect(projection, database_url, self.courses_store_url.as_deref()).await
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create or update streams, consumers and KV buckets to match the definition.
    Apply {
        /// Print what would change without changing anything.
        #[arg(long)]
        dry_run: bool,
        /// Carry out changes that lose messages or consumer state (refused otherwise).
        #[arg(long)]
        allow_destructive: bool,
        /// Stream and bucket replicas (3 in a cluster).
        #[arg(long, env = "STREAM_REPLICAS", default_value_t = 1)]
        replicas: usize,
        /// Keep retrying (with backoff) for up to this many seconds while NATS or JetStream
        /// is not reachable yet, e.g. a cluster still starting next to this Job. A server
        /// too old or a refused destructive change fails at once.
        #[arg(long, env = "APPLY_WAIT_SECONDS", default_value_t = 0)]
        wait_seconds: u64,
    },
    /// Streams, how far each projection has applied, its lag and dead letters.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        read_models: ReadModelArgs,
    },
    /// Rebuild a read model from the first event while the live one keeps serving, verify
    /// it against the live one, then switch over atomically.
    Replay {
        /// `students` or `courses`.
        projection: Projection,
        /// Switch even if the new model differs from the live one.
        #[arg(long)]
        force: bool,
        /// Keep the old model as `<table>__old` (`<collection>__old` in MongoDB) after the switch.
        #[arg(long)]
        keep_old: bool,
        /// Throw away a half-built model from an interrupted run and start over.
        #[arg(long)]
        restart: bool,
        /// Events per transaction.
        #[arg(long, default_value_t = 1000)]
        batch_size: usize,
        #[command(flatten)]
        read_models: ReadModelArgs,
    },
    /// Dead letters: events a projection set aside.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Stored events decoded to JSON.
    Events {
        #[command(subcommand)]
        command: EventsCommand,
    },
    /// Copy this deployment's stream to a new prefix with every version 1 student event's
    /// names sealed (they were written in the clear before names were sealed), keeping
    /// every position; resumable. With --switch: seal the old stream (commands answer 503
    /// until the services run with the new prefix), copy the rest and verify every
    /// position. Then run every service with STREAM_PREFIX=<new prefix> and delete the
    /// old stream, which still holds the names.
    Migrate {
        /// The prefix to copy to (streams, subjects, buckets, consumers are named after it).
        #[arg(long)]
        to_prefix: StreamNames,
        /// Seal the old stream, copy what is left and verify.
        #[arg(long)]
        switch: bool,
        /// Replicas of the new streams and buckets (3 in a cluster).
        #[arg(long, env = "STREAM_REPLICAS", default_value_t = 1)]
        replicas: usize,
    },
    /// The students' data keys (crypto-shredding).
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Re-wrap every key block with the first KEK of KEK_FILE. To rotate: put a new KEK first
    /// in the file (every service reads the file at start, so restart them), run this, then
    /// remove the old KEK. Events are not touched.
    Rewrap,
    /// Erase key-block revisions a crash left behind between a rewrite and its erasure (each
    /// may hold a destroyed key).
    Sweep,
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// List dead letters with their reason and original stream position.
    List {
        /// Only this projection's.
        #[arg(long)]
        projection: Option<Projection>,
        #[arg(long)]
        json: bool,
    },
    /// Rebuild the aggregates of dead letters in their read model (after fixing the cause),
    /// then delete the letters.
    Redrive {
        /// Dead-letter sequences (from `dlq list`).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        sequences: Vec<u64>,
        /// Every dead letter.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        read_models: ReadModelArgs,
    },
    /// Delete dead letters for good.
    Purge {
        /// Only this projection's.
        #[arg(long)]
        projection: Option<Projection>,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Debug, Subcommand)]
enum EventsCommand {
    /// Print events as JSON lines as they are stored.
    Tail {
        /// Only events on this subject (wildcards allowed), e.g. `school.events.student.>`.
        #[arg(long)]
        subject: Option<String>,
        /// Start with the last N stored events.
        #[arg(long, conflicts_with = "from_start")]
        last: Option<u64>,
        /// Start with the first stored event.
        #[arg(long)]
        from_start: bool,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Print the event at one stream position.
    Get { sequence: u64 },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Command::Apply {
        dry_run,
        allow_destructive,
        replicas,
        wait_seconds,
    } = cli.command
    {
        let topology = stream_admin::desired(&cli.stream_prefix, replicas);
        let options = stream_admin::ApplyOptions {
            dry_run,
            allow_destructive,
        };
        let changes = apply_with_retries(&cli.nats, &topology, options, wait_seconds).await?;
        for change in &changes {
            println!("{change}");
        }
        println!("{}", stream_admin::summary(&changes, dry_run));
        return Ok(());
    }
    let client = cli.nats.connect("stream-admin").await?;
    let jetstream = async_nats::jetstream::new(client.clone());
    let names = &cli.stream_prefix;
    // The one reading path for replay, redrive and `events`: with KEK_FILE sealed names are
    // opened (the data-key bucket is opened at the first sealed event), without it a sealed
    // event cannot be read.
    let reader = match &cli.kek_file {
        Some(path) => EventReader::lazy(
            jetstream.clone(),
            names.clone(),
            service_kit::event_reader::load_kek_ring(Some(path))?,
        ),
        None => EventReader::without_keys(),
    };
    // Without the KEK a replay or redrive could not open a single sealed name: refuse before
    // touching anything, rather than rebuild a model without them.
    if matches!(
        cli.command,
        Command::Replay { .. }
            | Command::Keys { .. }
            | Command::Migrate { .. }
            | Command::Dlq {
                command: DlqCommand::Redrive { .. }
            }
    ) {
        service_kit::event_reader::load_kek_ring(cli.kek_file.as_deref())?;
    }
    match cli.command {
        Command::Apply { .. } => unreachable!("handled above"),
        Command::Status { json, read_models } => {
            let mut models = Vec::new();
            for projection in Projection::ALL {
                let model = match read_models.database_url {
                    Some(_) => Some(read_models.connect(projection).await?),
                    None => None,
                };
                models.push((projection, model));
            }
            let status = status::status(&client, names, &models).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", status::render(&status));
            }
        }
        Command::Replay {
            projection,
            force,
            keep_old,
            restart,
            batch_size,
            read_models,
        } => {
            let options = ReplayOptions {
                force,
                keep_old,
                restart,
                batch_size,
                progress: std::io::stderr().is_terminal(),
            };
            let model = read_models.connect(projection).await?;
            let report = match model {
                ReadModel::Students(live) => {
                    replay::replay(&client, names, &reader, live, options).await?
                }
                ReadModel::Courses(live) => {
                    replay::replay(&client, names, &reader, live, options).await?
                }
            };
            if let Some(at) = report.resumed_at {
                println!("resumed an interrupted replay at position {at}");
            }
            println!(
                "replayed {} events in {:.1} s ({:.0} events/s); {} undecodable skipped",
                report.applied,
                report.elapsed.as_secs_f64(),
                report.events_per_second(),
                report.undecodable
            );
            println!(
                "verified at position {}: live {} = new {}; switched{}",
                report.switch.position,
                report.switch.live,
                report.switch.next,
                if report.switch.kept_old {
                    " (old model kept as <name>__old)"
                } else {
                    ", old model dropped"
                }
            );
        }
        Command::Dlq { command } => {
            dlq_command(&client, &jetstream, names, &reader, command).await?
        }
        Command::Events { command } => {
            events_command(&jetstream, names, &reader, command).await?;
        }
        Command::Migrate {
            to_prefix,
            switch,
            replicas,
        } => {
            let ring = service_kit::event_reader::load_kek_ring(cli.kek_file.as_deref())?;
            let options = stream_admin::migrate::MigrateOptions {
                replicas,
                switch,
                progress: std::io::stderr().is_terminal(),
                stop_after: None,
            };
            let report =
                stream_admin::migrate::migrate(&client, names, &to_prefix, ring, options).await?;
            println!(
                "copied {} events to {} in {:.1} s ({} were there from an earlier run): {} \
                 version 1 names sealed, {} erasures applied to them; {} positions verified",
                report.copied,
                to_prefix.event_stream(),
                report.elapsed.as_secs_f64(),
                report.resumed_at,
                report.sealed,
                report.erasures,
                report.verified
            );
            if report.switched {
                println!(
                    "switched: {} is sealed at position {}{}. Run every service with \
                     STREAM_PREFIX={}; then delete the old stream {} (it still holds names \
                     in the clear), e.g. `nats stream rm {}`",
                    names.event_stream(),
                    report.source_last,
                    if report.old_keys_retired {
                        "; the old key bucket is erased and deleted"
                    } else {
                        ""
                    },
                    to_prefix.prefix(),
                    names.event_stream(),
                    names.event_stream()
                );
            } else {
                println!(
                    "the old deployment keeps writing: run again to copy more, with --switch \
                     to finish ({} of {} positions copied)",
                    report.resumed_at + report.copied,
                    report.source_last
                );
            }
        }
        Command::Keys { command } => {
            let keys = reader
                .data_keys()
                .await
                .context("the data-key bucket (run `stream-admin apply` first)")?;
            match command {
                KeysCommand::Rewrap => {
                    let report = keys.rewrap_all().await?;
                    println!(
                        "{} key blocks re-wrapped with the first KEK, {} already were",
                        report.rewrapped, report.already_current
                    );
                }
                KeysCommand::Sweep => {
                    println!(
                        "{} left-behind key-block revisions erased",
                        keys.sweep().await?
                    );
                }
            }
        }
    }
    Ok(())
}

async fn events_command(
    jetstream: &async_nats::jetstream::Context,
    names: &StreamNames,
    reader: &EventReader,
    command: EventsCommand,
) -> anyhow::Result<()> {
    match command {
        EventsCommand::Get { sequence } => {
            let event = inspect::get(jetstream, names, reader, sequence).await?;
            println!("{}", serde_json::to_string_pretty(&event)?);
        }
        EventsCommand::Tail {
            subject,
            last,
            from_start,
            count,
        } => {
            let from = match (last, from_start) {
                (Some(n), _) => TailFrom::Last(n),
                (None, true) => TailFrom::Start,
                (None, false) => TailFrom::New,
            };
            inspect::tail(jetstream, names, reader, subject, from, count, |event| {
                println!("{event}");
            })
            .await?;
        }
    }
    Ok(())
}

async fn dlq_command(
    client: &async_nats::Client,
    jetstream: &async_nats::jetstream::Context,
    names: &StreamNames,
    reader: &EventReader,
    command: DlqCommand,
) -> anyhow::Result<()> {
    match command {
        DlqCommand::List { projection, json } => {
            let letters = dlq::list(jetstream, names, projection).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&letters)?);
                return Ok(());
            }
            println!(
                "{:>8}  {:<10} {:>10}  {:<18} REASON",
                "SEQ", "PROJECTION", "ORIG SEQ", "EVENT"
            );
            for letter in &letters {
                println!(
                    "{:>8}  {:<10} {:>10}  {:<18} {}",
                    letter.sequence,
                    letter.projection,
                    letter
                        .original_sequence
                        .map_or_else(|| "-".into(), |s| s.to_string()),
                    letter.event_type.as_deref().unwrap_or("(undecodable)"),
                    letter.reason
                );
            }
            println!("{} dead letters", letters.len());
        }
        DlqCommand::Redrive {
            sequences,
            all,
            read_models,
        } => {
            let letters = dlq::list(jetstream, names, None).await?;
            let sequences: Vec<u64> = if all {
                letters.iter().map(|l| l.sequence).collect()
            } else {
                sequences
            };
            let mut models = ReadModels {
                students: None,
                courses: None,
            };
            for letter in letters.iter().filter(|l| sequences.contains(&l.sequence)) {
                match letter.projection.parse::<Projection>() {
                    Ok(Projection::Students) if models.students.is_none() => {
                        models.students = Some(read_models.connect(Projection::Students).await?);
                    }
                    Ok(Projection::Courses) if models.courses.is_none() => {
                        models.courses = Some(read_models.connect(Projection::Courses).await?);
                    }
                    _ => {}
                }
            }
            for done in dlq::redrive(client, names, reader, &models, &sequences).await? {
                println!(
                    "dead letter {}: aggregate {} rebuilt from {} events; letter deleted",
                    done.sequence, done.aggregate, done.events_applied
                );
            }
        }
        DlqCommand::Purge { projection, yes } => {
            let scope = projection.map_or("every projection".to_owned(), |p| p.as_str().to_owned());
            if !yes && !confirm(&format!("Delete the dead letters of {scope} for good?"))? {
                println!("nothing deleted");
                return Ok(());
            }
            let purged = dlq::purge(jetstream, names, projection).await?;
            println!("{purged} dead letters deleted");
        }
    }
    Ok(())
}

/// Asks on the terminal; anything but `yes` is no.
fn confirm(question: &str) -> anyhow::Result<bool> {
    print!("{question} Type 'yes' to confirm: ");
    std::io::stdout().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(answer.trim() == "yes")
}

/// Why one apply attempt failed: worth another try (the server is not reachable or not
/// ready yet) or final.
enum ApplyFailure {
    Retry(anyhow::Error),
    Final(anyhow::Error),
}

async fn apply_once(
    nats: &service_kit::nats::NatsArgs,
    topology: &stream_admin::Topology,
    options: stream_admin::ApplyOptions,
) -> Result<Vec<stream_admin::Change>, ApplyFailure> {
    let client = nats
        .connect("stream-admin")
        .await
        .map_err(ApplyFailure::Retry)?;
    service_kit::nats::check_server_version(&client.server_info().version)
        .map_err(|line| ApplyFailure::Final(anyhow::anyhow!(line)))?;
    let jetstream = async_nats::jetstream::new(client);
    stream_admin::apply(&jetstream, topology, options)
        .await
        .map_err(|error| {
            if error.is::<stream_admin::DestructiveChanges>() {
                ApplyFailure::Final(error)
            } else {
                ApplyFailure::Retry(error)
            }
        })
}

/// `apply`, retried with backoff (0.5 s doubling to 5 s) for up to `wait_seconds`.
async fn apply_with_retries(
    nats: &service_kit::nats::NatsArgs,
    topology: &stream_admin::Topology,
    options: stream_admin::ApplyOptions,
    wait_seconds: u64,
) -> anyhow::Result<Vec<stream_admin::Change>> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(wait_seconds);
    let mut delay = std::time::Duration::from_millis(500);
    loop {
        match apply_once(nats, topology, options).await {
            Ok(changes) => return Ok(changes),
            Err(ApplyFailure::Final(error)) => return Err(error),
            Err(ApplyFailure::Retry(error)) => {
                if std::time::Instant::now() + delay > deadline {
                    return Err(error);
                }
                eprintln!(
                    "apply failed, retrying in {} ms: {error:#}",
                    delay.as_millis()
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(5));
            }
        }
    }
}
