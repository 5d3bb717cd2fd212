use clap::{Parser, Subcommand};
use events::StreamNames;
use service_kit::nats::NatsArgs;

#[derive(Debug, Parser)]
#[command(
    name = "stream-admin",
    about = "Creates and inspects the school system's streams"
)]
struct Cli {
    #[command(flatten)]
    nats: NatsArgs,
    /// Prefix of every stream, subject and bucket name.
    #[arg(long, env = "STREAM_PREFIX", default_value = "school", global = true)]
    stream_prefix: StreamNames,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create or update streams, consumers and KV buckets to match the definition.
    Apply {
        /// Print what would change without changing anything.
        #[arg(long)]
        dry_run: bool,
        /// Stream and bucket replicas (3 in a cluster).
        #[arg(long, env = "STREAM_REPLICAS", default_value_t = 1)]
        replicas: usize,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let client = cli.nats.connect("stream-admin").await?;
    let jetstream = async_nats::jetstream::new(client);
    match cli.command {
        Command::Apply { dry_run, replicas } => {
            let topology = stream_admin::desired(&cli.stream_prefix, replicas);
            let changes = stream_admin::apply(&jetstream, &topology, dry_run).await?;
            for change in &changes {
                println!("{change}");
            }
            println!("{}", stream_admin::summary(&changes, dry_run));
        }
    }
    Ok(())
}
