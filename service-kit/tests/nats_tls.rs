//! The NATS connection options against a real nats-server that demands TLS with client
//! certificates and nkey authentication, started by this test with certificates it makes
//! (openssl) and an nkey it generates: only a client with the CA, its certificate and the
//! nkey seed gets in; leaving out any one of them is refused, and a plaintext server is
//! refused when TLS is required.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures::StreamExt;
use service_kit::nats::NatsArgs;

/// A directory of its own, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .subsec_nanos();
        let dir = std::env::temp_dir().join(format!("nats-tls-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The nats-server process, killed on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl on PATH (scripts/dev installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA.
fn make_certificates(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=school test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
    );
    for (name, extensions) in [
        (
            "server",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        ),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ] {
        std::fs::write(dir.join(format!("{name}.ext")), extensions).expect("ext file");
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN={name}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "1",
                "-extfile",
                &format!("{name}.ext"),
                "-out",
                &format!("{name}.pem"),
            ],
        );
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Starts nats-server requiring TLS, a client certificate and the nkey `user`.
async fn start_server(dir: &Scratch, user: &str) -> (Server, String) {
    let bin = std::env::var("NATS_SERVER_BIN")
        .expect("NATS_SERVER_BIN names the nats-server binary (scripts/dev test exports it)");
    let port = free_port();
    let config = format!(
        "listen: 127.0.0.1:{port}\n\
         tls {{\n  cert_file: \"{server_cert}\"\n  key_file: \"{server_key}\"\n  ca_file: \"{ca}\"\n  verify: true\n  timeout: 2\n}}\n\
         authorization {{\n  users = [ {{ nkey: {user} }} ]\n}}\n",
        server_cert = dir.path("server.pem").display(),
        server_key = dir.path("server.key").display(),
        ca = dir.path("ca.pem").display(),
    );
    std::fs::write(dir.path("nats.conf"), config).expect("config");
    let child = Command::new(bin)
        .arg("-c")
        .arg(dir.path("nats.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting nats-server");
    let server = Server(child);
    for _ in 0..250 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return (server, format!("nats://127.0.0.1:{port}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("nats-server did not listen on {port} within 5 s");
}

fn args(url: &str) -> NatsArgs {
    NatsArgs {
        nats_url: url.to_owned(),
        nats_creds_file: None,
        nats_nkey_file: None,
        nats_tls_ca_file: None,
        nats_tls_cert_file: None,
        nats_tls_key_file: None,
        nats_require_tls: false,
    }
}

/// A message goes through the server and comes back.
async fn round_trip(client: &async_nats::Client) {
    let mut subscriber = client.subscribe("tls.check").await.expect("subscribe");
    client
        .publish("tls.check", "over tls".into())
        .await
        .expect("publish");
    client.flush().await.expect("flush");
    let message = tokio::time::timeout(Duration::from_secs(5), subscriber.next())
        .await
        .expect("the message within 5 s")
        .expect("a message");
    assert_eq!(&message.payload[..], b"over tls");
}

#[tokio::test]
async fn only_a_client_with_the_ca_its_certificate_and_the_nkey_gets_in() {
    let dir = Scratch::new();
    make_certificates(&dir.0);
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().expect("a user seed");
    std::fs::write(dir.path("user.nk"), format!("{seed}\n")).expect("seed file");
    let intruder = nkeys::KeyPair::new_user();
    std::fs::write(dir.path("intruder.nk"), intruder.seed().expect("a seed")).expect("seed file");
    let (_server, url) = start_server(&dir, &user.public_key()).await;

    let complete = NatsArgs {
        nats_nkey_file: Some(dir.path("user.nk")),
        nats_tls_ca_file: Some(dir.path("ca.pem")),
        nats_tls_cert_file: Some(dir.path("client.pem")),
        nats_tls_key_file: Some(dir.path("client.key")),
        nats_require_tls: true,
        ..args(&url)
    };
    let client = complete
        .connect("tls-test")
        .await
        .expect("the complete client connects");
    round_trip(&client).await;

    let cases = [
        (
            "without the CA",
            NatsArgs {
                nats_tls_ca_file: None,
                ..complete.clone()
            },
        ),
        (
            "without a client certificate",
            NatsArgs {
                nats_tls_cert_file: None,
                nats_tls_key_file: None,
                ..complete.clone()
            },
        ),
        (
            "without the nkey",
            NatsArgs {
                nats_nkey_file: None,
                ..complete.clone()
            },
        ),
        (
            "with another nkey",
            NatsArgs {
                nats_nkey_file: Some(dir.path("intruder.nk")),
                ..complete.clone()
            },
        ),
    ];
    for (what, args) in cases {
        let refused = tokio::time::timeout(Duration::from_secs(15), args.connect("tls-test"))
            .await
            .unwrap_or_else(|_| panic!("a client {what} neither connected nor failed in 15 s"));
        assert!(refused.is_err(), "a client {what} got in");
    }
}

#[tokio::test]
async fn requiring_tls_refuses_a_plaintext_server() {
    // The test stack's server speaks plaintext.
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:14222".into());
    let plain = args(&url).connect("plain-test").await;
    assert!(
        plain.is_ok(),
        "the plaintext server is reachable: {plain:?}"
    );
    let required = NatsArgs {
        nats_require_tls: true,
        ..args(&url)
    }
    .connect("plain-test")
    .await;
    assert!(
        required.is_err(),
        "connected in plaintext although TLS was required"
    );
}
