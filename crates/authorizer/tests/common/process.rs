//! The authorizer's real binary as a process of its own, next to a [`World`]'s identity and
//! keyring: for what only a whole process shows (its memory, its signals), and for several
//! replicas behind one gateway.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::process::ExitStatus;
use std::time::Duration;

use keyshare_testkit::{Kind, Output, Process, Setting, eventually, free_port};

use super::{World, metric_at, serving};

/// A running authorizer process; killed when dropped.
pub struct AuthorizerProcess {
    process: Process,
    /// The check port.
    pub addr: SocketAddr,
    pub management_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
}

impl AuthorizerProcess {
    /// Starts the binary against `w`'s database, identity and keyring, with `extra` on top of
    /// the usual settings, and waits until it reports SERVING.
    pub async fn start(w: &World, extra: impl IntoIterator<Item = Setting>) -> Self {
        let loopback = || SocketAddr::from(([127, 0, 0, 1], free_port()));
        let (addr, management_addr, metrics_addr) = (loopback(), loopback(), loopback());
        let mut settings = w.stack.settings(Kind::Authorizer);
        settings.extend([
            Setting::Listen(addr),
            Setting::Management(management_addr),
            Setting::Metrics(metrics_addr),
            Setting::UsageFlush(Duration::from_millis(100)),
            Setting::PoolSize(4),
            Setting::Log("warn".into()),
        ]);
        settings.extend(extra);
        let process = Process::spawn(Kind::Authorizer, settings, Output::Discard);
        let authorizer = Self { process, addr, management_addr, metrics_addr };
        serving(addr).await;
        authorizer
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// A `kB` field of `/proc/PID/status` (`VmRSS`, `VmHWM`), in bytes.
    pub fn memory(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = status.lines().find(|line| line.starts_with(&format!("{field}:"))).unwrap();
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
    }

    /// The process's metric `name` (summed over its labels), if exported.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        metric_at(self.metrics_addr, name).await
    }

    /// SIGTERM, as Kubernetes sends it; waits until the process has exited.
    pub async fn terminate(&mut self) -> ExitStatus {
        self.process.terminate(Duration::from_secs(60)).await
    }

    /// Starts a stopped process again on the same ports; waits until it reports SERVING.
    pub async fn restart(&mut self) {
        // The old process's ports may take a moment to be free again.
        let addr = self.addr;
        eventually("the authorizer's port to be free", Duration::from_secs(30), || async move {
            std::net::TcpListener::bind(addr).ok().map(|_| ())
        })
        .await;
        self.process.respawn();
        serving(self.addr).await;
    }
}
