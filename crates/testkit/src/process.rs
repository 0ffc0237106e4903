//! Keyshare's service binaries as processes of their own, for what only a whole process shows:
//! its signals, its memory, its logs, its process-wide trace exporter. A process gets exactly
//! the [`Settings`] it is given as its environment (nothing is inherited), and is killed when
//! dropped.
//!
//! The binaries are not built here: `cargo build --workspace --bins` first (scripts/test does;
//! a crate's own binary is built for its integration tests by cargo).

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::settings::Settings;
use crate::stack::Kind;

impl Kind {
    /// The name of the service's binary.
    pub fn binary_name(self) -> &'static str {
        match self {
            Kind::Identity => "identity",
            Kind::Keyring => "keyring",
            Kind::Invitation => "invitation",
            Kind::Authorizer => "authorizer",
        }
    }
}

/// Where cargo put the service's binary: `target/<profile>/`, next to the test's own
/// `deps/` directory.
pub fn binary(kind: Kind) -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    let profile = exe.parent().and_then(|deps| deps.parent()).expect("target/<profile>/deps/<test>");
    let path = profile.join(kind.binary_name());
    assert!(path.exists(), "{} is missing: run `cargo build --workspace --bins` first", path.display());
    path
}

/// What becomes of a process's standard output (its log).
pub enum Output {
    /// The test's own output, where a failing test shows it.
    Inherit,
    Discard,
    /// Into this file, for the test to read.
    File(PathBuf),
}

/// A service binary running (or stopped) as a process.
pub struct Process {
    pub kind: Kind,
    /// Its whole environment.
    pub settings: Settings,
    output: Output,
    child: Option<Child>,
}

impl Process {
    /// Starts the binary of `kind` with `settings` as its whole environment; does not wait.
    pub fn spawn(kind: Kind, settings: Settings, output: Output) -> Self {
        let mut process = Self { kind, settings, output, child: None };
        process.respawn();
        process
    }

    /// Starts the stopped process again with the same settings (the same addresses).
    pub fn respawn(&mut self) {
        assert!(self.child.is_none(), "{:?} is still running", self.kind);
        let stdout = match &self.output {
            Output::Inherit => Stdio::inherit(),
            Output::Discard => Stdio::null(),
            Output::File(path) => Stdio::from(
                std::fs::OpenOptions::new().create(true).append(true).open(path).expect("the log file opens"),
            ),
        };
        let child = Command::new(binary(self.kind))
            .env_clear()
            .envs(self.settings.pairs())
            .stdout(stdout)
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {:?}: {e}", self.kind));
        self.child = Some(child);
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap_or_else(|| panic!("{:?} is not running", self.kind)).id()
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Waits (at most `within`) until the health service at `health` says SERVING; fails at
    /// once if the process exits first.
    pub async fn until_serving(&mut self, health: Channel, within: Duration) {
        let health = HealthClient::new(health);
        let start = Instant::now();
        loop {
            let child = self.child.as_mut().unwrap_or_else(|| panic!("{:?} is not running", self.kind));
            if let Some(status) = child.try_wait().ok().flatten() {
                panic!("{:?} exited during startup ({status}); its log is above", self.kind);
            }
            let answer = health.clone().check(HealthCheckRequest { service: String::new() }).await;
            if answer.is_ok_and(|answer| answer.into_inner().status == ServingStatus::Serving as i32) {
                return;
            }
            assert!(start.elapsed() < within, "{:?} did not report SERVING within {within:?}", self.kind);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends SIGTERM, as Kubernetes does, without waiting.
    pub fn signal_terminate(&self) {
        let status = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status().expect("kill runs");
        assert!(status.success(), "kill -TERM {} failed", self.pid());
    }

    /// Sends SIGTERM and waits (at most `within`, then kills it and fails) until the process
    /// has exited; returns how it exited.
    pub async fn terminate(&mut self, within: Duration) -> ExitStatus {
        self.signal_terminate();
        self.wait(within).await
    }

    /// Waits (at most `within`, then kills it and fails) until the process exits by itself.
    pub async fn wait(&mut self, within: Duration) -> ExitStatus {
        let mut child = self.child.take().unwrap_or_else(|| panic!("{:?} is not running", self.kind));
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("the process can be waited on") {
                return status;
            }
            if start.elapsed() > within {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{:?} did not exit within {within:?}", self.kind);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
