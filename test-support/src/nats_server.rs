//! A private nats-server with JetStream for fault tests: its own port and store directory,
//! so a test can kill it and bring it back (same port, same store) without touching the
//! shared server of the test stack. Killed and its store deleted on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use async_nats::jetstream;
use events::StreamNames;

use crate::{TestBroker, eventually, free_port, unique_suffix};

/// The nats-server binary named by `NATS_SERVER_BIN` (the test command exports it).
fn nats_server_bin() -> PathBuf {
    match std::env::var_os("NATS_SERVER_BIN") {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => panic!(
            "NATS_SERVER_BIN is not set: fault tests start a nats-server of their own; run them with \
             `scripts/dev test`, or export NATS_SERVER_BIN=$PWD/.stack/tools/nats/bin/nats-server"
        ),
    }
}

/// How the server is taken down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatsStop {
    /// SIGTERM: nats-server shuts down cleanly.
    Graceful,
    /// SIGKILL: the process dies at once, as in a crash.
    Kill,
}

/// A nats-server process on `127.0.0.1:port` with JetStream in `store_dir`.
pub struct NatsServer {
    pub port: u16,
    pub store_dir: PathBuf,
    bin: PathBuf,
    /// A configuration file the server also reads (limits a test needs), if any.
    config: Option<PathBuf>,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts a server on a free port with a fresh store directory and waits until
    /// JetStream answers.
    pub async fn start() -> NatsServer {
        Self::start_with_config("").await
    }

    /// As [`start`](Self::start), with `config` (nats-server configuration syntax) in a
    /// file the server reads; the command line still sets address, port and store.
    pub async fn start_with_config(config: &str) -> NatsServer {
        let store_dir = std::env::temp_dir().join(format!("school-nats-{}", unique_suffix()));
        std::fs::create_dir_all(&store_dir).expect("creating the nats store directory");
        let config = (!config.is_empty()).then(|| {
            let path = store_dir.with_extension("conf");
            std::fs::write(&path, config).expect("writing the nats-server configuration");
            path
        });
        let mut server = NatsServer {
            port: free_port(),
            store_dir,
            bin: nats_server_bin(),
            config,
            child: None,
        };
        server.spawn();
        server.ready().await;
        server
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "nats-server is already running");
        let mut command = Command::new(&self.bin);
        if let Some(config) = &self.config {
            command.arg("-c").arg(config);
        }
        let child = command
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&self.store_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {} ({e})", self.bin.display()));
        self.child = Some(child);
    }

    /// Takes the server down and waits until the process is gone (SIGKILL after 10 s).
    pub fn stop(&mut self, how: NatsStop) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if how == NatsStop::Graceful {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while std::time::Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts the server again on the same port and store, and waits until JetStream
    /// answers (it recovers the streams from the store first).
    pub async fn restart(&mut self) {
        self.spawn();
        self.ready().await;
    }

    /// Waits (up to 30 s) until a client can connect and JetStream answers.
    pub async fn ready(&self) {
        let url = self.url();
        eventually(30, "the private nats-server to serve JetStream", || {
            let url = url.clone();
            async move {
                let client = async_nats::ConnectOptions::new()
                    .connection_timeout(Duration::from_millis(500))
                    .connect(url)
                    .await
                    .ok()?;
                let ready = jetstream::new(client.clone()).query_account().await.is_ok();
                let _ = client.drain().await;
                ready.then_some(())
            }
        })
        .await;
    }

    /// A broker on this server: a client of it, with a fresh prefix's streams, consumers
    /// and buckets applied (as `stream-admin apply` would).
    pub async fn broker(&self) -> TestBroker {
        let client = async_nats::connect(self.url())
            .await
            .unwrap_or_else(|e| panic!("cannot reach the private nats-server ({e})"));
        let jetstream = jetstream::new(client.clone());
        let names = StreamNames::new(format!("t{}", unique_suffix()));
        let topology = stream_admin::desired(&names, 1);
        stream_admin::apply(&jetstream, &topology, stream_admin::ApplyOptions::default())
            .await
            .expect("applying the topology on the private nats-server");
        TestBroker {
            client,
            jetstream,
            names,
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop(NatsStop::Kill);
        let _ = std::fs::remove_dir_all(&self.store_dir);
        if let Some(config) = &self.config {
            let _ = std::fs::remove_file(config);
        }
    }
}
