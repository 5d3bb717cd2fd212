//! A service binary that a fault test runs as a child process: waited for at start, sent
//! SIGTERM or SIGKILL, given a grace period to exit, and killed when dropped.

use std::future::Future;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

/// How long a service may take to become ready at start.
const START_TIMEOUT: Duration = Duration::from_secs(20);

pub struct ServiceProcess {
    name: String,
    child: Child,
}

impl ServiceProcess {
    /// Spawns `command`; `name` names the service in failure messages.
    pub fn spawn(name: &str, command: &mut Command) -> ServiceProcess {
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("starting the {name} binary: {e}"));
        ServiceProcess {
            name: name.to_owned(),
            child,
        }
    }

    /// Waits until `ready` says so, failing when the process exits first or takes longer
    /// than 20 s.
    pub async fn wait_until<F, Fut>(&mut self, mut ready: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let deadline = Instant::now() + START_TIMEOUT;
        while !ready().await {
            assert!(self.is_alive(), "{} exited at start", self.name);
            assert!(Instant::now() < deadline, "{} did not start", self.name);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The exit status, if the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("process status")
    }

    pub fn is_alive(&mut self) -> bool {
        self.exited().is_none()
    }

    pub fn sigterm(&self) {
        let sent = Command::new("kill")
            .args(["-TERM", &self.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(sent.success(), "SIGTERM delivered to {}", self.name);
    }

    /// SIGKILL, and waits until the process is gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The exit status, if the process exits within `grace`.
    pub async fn exit_within(&mut self, grace: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + grace;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
