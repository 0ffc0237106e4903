//! The authorizer's real binary as a process of its own, next to a [`World`]'s identity and
//! keyring: for what only a whole process shows (its memory, its signals), and for several
//! replicas behind one gateway.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use keyshare_runtime::testkit::{eventually, free_port};

use super::{AUTHORIZER_SECRET, World, metric_at, serving};

/// A running authorizer process; killed when dropped.
pub struct AuthorizerProcess {
    child: Option<Child>,
    /// The check port.
    pub addr: SocketAddr,
    pub management_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    env: Vec<(String, String)>,
}

impl AuthorizerProcess {
    /// Starts the binary against `w`'s database, identity and keyring, with `extra` on top of
    /// the usual settings, and waits until it reports SERVING.
    pub async fn start(w: &World, extra: &[(&str, String)]) -> Self {
        let loopback = || SocketAddr::from(([127, 0, 0, 1], free_port()));
        let (addr, management_addr, metrics_addr) = (loopback(), loopback(), loopback());
        let config = &w.authorizer_config;
        let mut env: Vec<(String, String)> = [
            ("DATABASE_URL", w.db_url.clone()),
            ("KEYSHARE_LISTEN_ADDR", addr.to_string()),
            ("KEYSHARE_MANAGEMENT_ADDR", management_addr.to_string()),
            ("KEYSHARE_METRICS_ADDR", metrics_addr.to_string()),
            ("KEYSHARE_IDENTITY_URL", config.identity_url.clone()),
            ("KEYSHARE_KEYRING_URL", config.keyring_url.clone()),
            ("KEYSHARE_CLIENT_ID", "authorizer".into()),
            ("KEYSHARE_CLIENT_SECRET", AUTHORIZER_SECRET.into()),
            ("KEYSHARE_USAGE_FLUSH_MILLIS", "100".into()),
            ("KEYSHARE_DRAIN_DELAY_SECS", "0".into()),
            ("KEYSHARE_DB_POOL_SIZE", "4".into()),
            ("RUST_LOG", "warn".into()),
        ]
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value))
        .collect();
        env.extend(extra.iter().map(|(key, value)| ((*key).to_owned(), value.clone())));
        let mut process = Self { child: None, addr, management_addr, metrics_addr, env };
        process.launch().await;
        process
    }

    async fn launch(&mut self) {
        let child = Command::new(env!("CARGO_BIN_EXE_authorizer"))
            .env_clear()
            .envs(self.env.iter().cloned())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        self.child = Some(child);
        serving(self.addr).await;
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("a running authorizer").id()
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
        let mut child = self.child.take().expect("a running authorizer");
        Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if start.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                panic!("the authorizer did not stop within 60 s of SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts a stopped process again on the same ports; waits until it reports SERVING.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "the authorizer is still running");
        // The old process's ports may take a moment to be free again.
        let addr = self.addr;
        eventually("the authorizer's port to be free", Duration::from_secs(30), || async move {
            std::net::TcpListener::bind(addr).ok().map(|_| ())
        })
        .await;
        self.launch().await;
    }
}

impl Drop for AuthorizerProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
