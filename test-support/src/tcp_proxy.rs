//! A TCP proxy a fault test puts between a client and a server on loopback, to cut the
//! client's connections (as a TCP reset or a network fault would) and to refuse new ones
//! for a while (a server out of reach), without touching either end.
//!
//! Started with [`TcpProxy::start_nats`], it also reads the NATS protocol it forwards, so a
//! test can lose one kind of message while the connection keeps working: swallow the
//! broker's answers that contain some bytes (the ack of an append: stored, never
//! confirmed), or hold the client's publishes to one subject until the test releases them
//! (an append that lands late).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::OwnedWriteHalf;
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
    faults: Arc<NatsFaults>,
}

/// The server side of one proxied connection, shared by its forwarding task and the
/// release of held publishes.
type ServerWriter = Arc<Mutex<OwnedWriteHalf>>;

/// What a NATS-aware proxy does to the messages it forwards.
#[derive(Default)]
struct NatsFaults {
    /// Server → client `MSG`/`HMSG` frames containing these bytes are dropped.
    swallow: StdMutex<Option<Vec<u8>>>,
    swallowed: AtomicU64,
    /// Client → server `PUB`/`HPUB` frames to this subject are held back.
    hold_subject: StdMutex<Option<String>>,
    held: Mutex<Vec<(ServerWriter, Vec<u8>)>>,
    held_count: AtomicU64,
}

/// One NATS protocol frame: the control line, and the payload when the operation has one.
struct Frame {
    operation: String,
    subject: String,
    bytes: Vec<u8>,
}

impl TcpProxy {
    /// A proxy that forwards bytes as they come (any protocol).
    pub async fn start(upstream: std::net::SocketAddr) -> TcpProxy {
        TcpProxy::start_with(upstream, false).await
    }

    /// A proxy that forwards NATS frame by frame, so that
    /// [`swallow_server_messages_containing`](Self::swallow_server_messages_containing) and
    /// [`hold_publishes_to`](Self::hold_publishes_to) can act on single messages.
    pub async fn start_nats(upstream: std::net::SocketAddr) -> TcpProxy {
        TcpProxy::start_with(upstream, true).await
    }

    async fn start_with(upstream: std::net::SocketAddr, nats_aware: bool) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let blocked = Arc::new(AtomicBool::new(false));
        let faults = Arc::new(NatsFaults::default());
        let accepting = {
            let (connections, blocked, faults) =
                (connections.clone(), blocked.clone(), faults.clone());
            tokio::spawn(async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    if blocked.load(Ordering::SeqCst) {
                        drop(client); // refused: closed at once
                        continue;
                    }
                    let faults = faults.clone();
                    let forwarding = tokio::spawn(async move {
                        let Ok(mut server) = TcpStream::connect(upstream).await else {
                            return;
                        };
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        if nats_aware {
                            forward_nats(client, server, faults).await;
                        } else {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
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
            faults,
        }
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn nats_url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Drops every connection through the proxy now (both ends see it closed); new
    /// connections are accepted again at once. Held publishes are lost with them.
    pub async fn cut(&self) {
        for connection in self.connections.lock().await.drain(..) {
            connection.abort();
        }
        self.faults.held.lock().await.clear();
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

    /// From now on, drops every message the server sends whose frame contains `needle`
    /// (e.g. `"stream":"<name>"`, which only that stream's publish acks contain); `None`
    /// forwards everything again. Only for a proxy from [`start_nats`](Self::start_nats).
    pub fn swallow_server_messages_containing(&self, needle: Option<&str>) {
        if let Ok(mut swallow) = self.faults.swallow.lock() {
            *swallow = needle.map(|n| n.as_bytes().to_vec());
        }
    }

    /// Server messages dropped so far by
    /// [`swallow_server_messages_containing`](Self::swallow_server_messages_containing).
    pub fn swallowed(&self) -> u64 {
        self.faults.swallowed.load(Ordering::SeqCst)
    }

    /// From now on, holds back every message a client publishes to `subject` (everything
    /// else still flows) until [`release_held`](Self::release_held); `None` stops holding.
    /// Only for a proxy from [`start_nats`](Self::start_nats).
    pub fn hold_publishes_to(&self, subject: Option<&str>) {
        if let Ok(mut hold) = self.faults.hold_subject.lock() {
            *hold = subject.map(str::to_owned);
        }
    }

    /// Publishes held back so far (released ones included).
    pub fn held(&self) -> u64 {
        self.faults.held_count.load(Ordering::SeqCst)
    }

    /// Sends the held publishes on to the server, in the order they were held.
    pub async fn release_held(&self) {
        let held: Vec<_> = self.faults.held.lock().await.drain(..).collect();
        for (server, bytes) in held {
            let mut server = server.lock().await;
            let _ = server.write_all(&bytes).await;
            let _ = server.flush().await;
        }
    }
}

/// Forwards one NATS connection frame by frame in both directions, applying `faults`.
async fn forward_nats(client: TcpStream, server: TcpStream, faults: Arc<NatsFaults>) {
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let server_write = Arc::new(Mutex::new(server_write));
    let upstream = {
        let faults = faults.clone();
        async move {
            let mut reader = BufReader::new(client_read);
            while let Ok(Some(frame)) = next_frame(&mut reader).await {
                let hold = matches!(frame.operation.as_str(), "PUB" | "HPUB")
                    && faults
                        .hold_subject
                        .lock()
                        .is_ok_and(|s| s.as_deref() == Some(frame.subject.as_str()));
                if hold {
                    faults
                        .held
                        .lock()
                        .await
                        .push((server_write.clone(), frame.bytes));
                    faults.held_count.fetch_add(1, Ordering::SeqCst);
                    continue;
                }
                let mut server = server_write.lock().await;
                if server.write_all(&frame.bytes).await.is_err() {
                    break;
                }
            }
        }
    };
    let downstream = async move {
        let mut reader = BufReader::new(server_read);
        let mut client_write = client_write;
        while let Ok(Some(frame)) = next_frame(&mut reader).await {
            let swallow = matches!(frame.operation.as_str(), "MSG" | "HMSG")
                && faults.swallow.lock().is_ok_and(|needle| {
                    needle
                        .as_deref()
                        .is_some_and(|needle| contains(&frame.bytes, needle))
                });
            if swallow {
                faults.swallowed.fetch_add(1, Ordering::SeqCst);
                continue;
            }
            if client_write.write_all(&frame.bytes).await.is_err() {
                break;
            }
        }
    };
    // Either side closing ends the connection, as `copy_bidirectional` would.
    tokio::select! {
        () = upstream => {}
        () = downstream => {}
    }
}

/// Reads the next frame: a control line, plus its payload for `MSG`, `HMSG`, `PUB` and
/// `HPUB` (whose last field is the payload's length, headers included). `None` at the end.
async fn next_frame<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
) -> std::io::Result<Option<Frame>> {
    let mut bytes = Vec::new();
    if reader.read_until(b'\n', &mut bytes).await? == 0 {
        return Ok(None);
    }
    let line = String::from_utf8_lossy(&bytes).into_owned();
    let fields: Vec<&str> = line.split_whitespace().collect();
    let operation = fields
        .first()
        .map(|op| op.to_ascii_uppercase())
        .unwrap_or_default();
    let subject = fields.get(1).copied().unwrap_or_default().to_owned();
    if matches!(operation.as_str(), "MSG" | "HMSG" | "PUB" | "HPUB") {
        let length: usize = fields
            .last()
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad NATS control line {line:?}")))?;
        let start = bytes.len();
        bytes.resize(start + length + 2, 0); // the payload and its CRLF
        reader.read_exact(&mut bytes[start..]).await?;
    }
    Ok(Some(Frame {
        operation,
        subject,
        bytes,
    }))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty()
        && haystack
            .windows(needle.len())
            .any(|window| window == needle)
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
