//! The gateway binary at start: without its key-encryption key it could seal no student's
//! names, so it does not start, and says which variable is missing or what is wrong with
//! the file (before it even tries NATS).

use std::process::{Command, Stdio};

#[test]
fn without_a_kek_file_the_gateway_does_not_start_and_says_why() {
    let bad = std::env::temp_dir().join(format!("not-a-kek-{}", test_support::unique_suffix()));
    std::fs::write(&bad, "k1:0011\n").expect("write");
    for (kek, expected) in [(None, "KEK_FILE is not set"), (Some(&bad), "line 1")] {
        let mut command = Command::new(env!("CARGO_BIN_EXE_command-gateway"));
        command
            .env("NATS_URL", "nats://127.0.0.1:1")
            .env("API_KEYS", "write:some-write-key")
            .env("LISTEN_ADDR", "127.0.0.1:0")
            .env_remove("KEK_FILE")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(path) = kek {
            command.env("KEK_FILE", path);
        }
        let output = command.output().expect("the gateway ran");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "started without a KEK: {stderr}");
        assert!(stderr.contains(expected), "{stderr}");
    }
    let _ = std::fs::remove_file(&bad);
}
