//! A TCP proxy a fault test puts between a client and a server on loopback, to cut the
//! client's connections (as a TCP reset or a network fault would) and to refuse new ones
//! for a while (a server out of reach), without touching either end.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

/// Forwards `127.0.0.1:port` to `upstream` until dropped.
pub struct TcpProxy {
    pub port: u16,
    accepting: JoinHandle<()>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
    blocked: Arc<AtomicBool>,
    cuts: AtomicU64,
}

impl TcpProxy {
    pub async fn start(upstream: std::net::SocketAddr) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let blocked = Arc::new(AtomicBool::new(false));
        let accepting = {
            let (connections, blocked) = (connections.clone(), blocked.clone());
            tokio::spawn(async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    if blocked.load(Ordering::SeqCst) {
                        drop(client); // refused: closed at once
                        continue;
                    }
                    let forwarding = tokio::spawn(async move {
                        let Ok(mut server) = TcpStream::connect(upstream).await else {
                            return;
                        };
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    });
                    let mut connections = connections.lock().await;
                    connections.retain(|c| !c.is_finished());
                    connections.push(forwarding);
                }
            })
        };
        TcpProxy {
            port,
            accepting,
            connections,
            blocked,
            cuts: AtomicU64::new(0),
        }
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn nats_url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Drops every connection through the proxy now (both ends see it closed); new
    /// connections are accepted again at once.
    pub async fn cut(&self) {
        for connection in self.connections.lock().await.drain(..) {
            connection.abort();
        }
        self.cuts.fetch_add(1, Ordering::Relaxed);
    }

    /// Cuts every connection and refuses new ones until [`unblock`](Self::unblock).
    pub async fn block(&self) {
        self.blocked.store(true, Ordering::SeqCst);
        self.cut().await;
    }

    pub fn unblock(&self) {
        self.blocked.store(false, Ordering::SeqCst);
    }

    /// How many times connections were cut.
    pub fn cuts(&self) -> u64 {
        self.cuts.load(Ordering::Relaxed)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accepting.abort();
        if let Ok(mut connections) = self.connections.try_lock() {
            for connection in connections.drain(..) {
                connection.abort();
            }
        }
    }
}
