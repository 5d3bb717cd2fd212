//! A stand-in for a nats-server of another version: it speaks just enough of the NATS
//! client protocol (`INFO`, then `PONG` to every `PING`) for a client to connect and read
//! the version it reports, and answers nothing else. Tests of the "server too old"
//! refusals use it, since only one real server version is installed.

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// Listens on a free loopback port until dropped.
pub struct NatsVersionStandIn {
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl NatsVersionStandIn {
    /// Starts a stand-in that reports `version` in its `INFO`.
    pub async fn start(version: &str) -> NatsVersionStandIn {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the stand-in");
        let port = listener.local_addr().expect("local address").port();
        let info = serde_json::json!({
            "server_id": "NVERSIONSTANDIN",
            "server_name": "version-stand-in",
            "version": version,
            "proto": 1,
            "go": "go1.22",
            "host": "127.0.0.1",
            "port": port,
            "headers": true,
            "max_payload": 1_048_576,
            "jetstream": true,
        });
        let info = format!("INFO {info}\r\n");
        let task = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let info = info.clone();
                tokio::spawn(async move {
                    let (read, mut write) = socket.into_split();
                    if write.write_all(info.as_bytes()).await.is_err() {
                        return;
                    }
                    let mut lines = BufReader::new(read).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        if line.starts_with("PING") && write.write_all(b"PONG\r\n").await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        NatsVersionStandIn { port, task }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for NatsVersionStandIn {
    fn drop(&mut self) {
        self.task.abort();
    }
}
