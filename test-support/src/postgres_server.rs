//! A private PostgreSQL cluster for fault tests: `initdb` into its own directory, its own
//! port, so a test can stop it and bring it back without touching the shared server of the
//! test stack. Postgres refuses to run as root: as root every command runs as the
//! `postgres` user (`runuser`), like `start_postgres` in `scripts/dev`. Stopped and deleted
//! on drop.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::{free_port, unique_suffix};

/// The directory of `initdb`/`pg_ctl` named by `PG_BIN_DIR` (the test command exports it).
fn pg_bin_dir() -> PathBuf {
    match std::env::var_os("PG_BIN_DIR") {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => panic!(
            "PG_BIN_DIR is not set: fault tests start a PostgreSQL cluster of their own; run them \
             with `scripts/dev test`, or export PG_BIN_DIR=/usr/lib/postgresql/<version>/bin"
        ),
    }
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
}

/// How the cluster is taken down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgStop {
    /// `pg_ctl stop -m fast`: sessions are cut, the cluster shuts down cleanly.
    Fast,
    /// `pg_ctl stop -m immediate`: as in a crash; the restart replays the WAL.
    Immediate,
}

/// A PostgreSQL cluster on `127.0.0.1:port`, data in `data_dir`.
pub struct PostgresServer {
    pub port: u16,
    pub data_dir: PathBuf,
    bin_dir: PathBuf,
    as_root: bool,
    running: bool,
}

impl PostgresServer {
    /// Creates a cluster (trust authentication, superuser `postgres`) and starts it.
    pub fn start() -> PostgresServer {
        let bin_dir = pg_bin_dir();
        assert!(
            bin_dir.join("initdb").exists(),
            "PG_BIN_DIR={} holds no initdb",
            bin_dir.display()
        );
        // Under the system temp directory: the `postgres` user must reach it when we are root.
        let data_dir = std::env::temp_dir().join(format!("school-pg-{}", unique_suffix()));
        std::fs::create_dir_all(&data_dir).expect("creating the cluster directory");
        let mut server = PostgresServer {
            port: free_port(),
            data_dir,
            bin_dir,
            as_root: running_as_root(),
            running: false,
        };
        if server.as_root {
            let owned = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&server.data_dir)
                .status()
                .expect("chown");
            assert!(owned.success(), "chown postgres of the cluster directory");
        }
        let data = server.data_dir.clone();
        server.run_checked(
            "initdb",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "--auth=trust".as_ref(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "-E".as_ref(),
                "UTF8".as_ref(),
                "--locale=C.UTF-8".as_ref(),
                "--no-sync".as_ref(),
            ],
        );
        server.restart();
        server
    }

    /// `postgres://postgres@127.0.0.1:port/<database>`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    pub fn is_running(&self) -> bool {
        self.running
    }

    /// Starts the cluster (again) on the same port and data, waiting until it accepts
    /// connections.
    pub fn restart(&mut self) {
        let data = self.data_dir.clone();
        let log = data.join("server.log");
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c max_connections=100 -c fsync=off",
            self.port,
            data.display()
        );
        self.run_checked(
            "pg_ctl",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-w".as_ref(),
                "-t".as_ref(),
                "60".as_ref(),
                "-l".as_ref(),
                log.as_os_str(),
                "-o".as_ref(),
                options.as_ref(),
                "start".as_ref(),
            ],
        );
        self.running = true;
    }

    /// Stops the cluster and waits until it is down.
    pub fn stop(&mut self, how: PgStop) {
        if !self.running {
            return;
        }
        let mode = match how {
            PgStop::Fast => "fast",
            PgStop::Immediate => "immediate",
        };
        let data = self.data_dir.clone();
        self.run_checked(
            "pg_ctl",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-m".as_ref(),
                mode.as_ref(),
                "-w".as_ref(),
                "stop".as_ref(),
            ],
        );
        self.running = false;
    }

    fn run(&self, tool: &str, args: &[&std::ffi::OsStr]) -> std::io::Result<Output> {
        let program = self.bin_dir.join(tool);
        let mut command = if self.as_root {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(&program);
            command
        } else {
            Command::new(&program)
        };
        // The `postgres` user may not be able to enter the test's working directory.
        command
            .args(args)
            .current_dir(Path::new("/"))
            .stdin(Stdio::null())
            .output()
    }

    fn run_checked(&self, tool: &str, args: &[&std::ffi::OsStr]) {
        let output = self
            .run(tool, args)
            .unwrap_or_else(|e| panic!("running {tool} from {} ({e})", self.bin_dir.display()));
        if !output.status.success() {
            let log = std::fs::read_to_string(self.data_dir.join("server.log")).unwrap_or_default();
            panic!(
                "{tool} failed ({}):\n{}{}\n--- server.log:\n{log}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        if self.running {
            let data = self.data_dir.clone();
            let _ = self.run(
                "pg_ctl",
                &[
                    "-D".as_ref(),
                    data.as_os_str(),
                    "-m".as_ref(),
                    "immediate".as_ref(),
                    "-w".as_ref(),
                    "stop".as_ref(),
                ],
            );
        }
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}
