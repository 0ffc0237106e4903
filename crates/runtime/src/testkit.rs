//! Test support: a fresh PostgreSQL database per test, a real SMTP server (aiosmtpd) that keeps
//! what it receives, a test certificate authority writing certificate files (rcgen), lookup of
//! the tools `scripts/test` installs, and the calls every service's tests make through the real
//! API ([`authed`], [`sign_up`], [`client_token`], [`reason`], [`bad_fields`]).
//!
//! Failures here panic with a message saying what is missing: tests never skip silently.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("workspace root")
}

/// A tool installed by `scripts/test` (grpcurl, buf, the venv's python).
pub fn tool(name: &str) -> PathBuf {
    let dir =
        std::env::var_os("KEYSHARE_TOOLS_DIR").map(PathBuf::from).unwrap_or_else(|| workspace_root().join(".venv/bin"));
    let path = dir.join(name);
    assert!(path.exists(), "{} is missing: run scripts/test, which installs the test tools", path.display());
    path
}

/// A port for a test's server to listen on, which no other test of this machine is handed.
///
/// A port the kernel chose for a moment (`bind` to port 0, then close) can be taken again by
/// any outgoing connection before the server binds it, and tests open thousands. So the port
/// comes from below the kernel's ephemeral range, where neither port-0 listeners nor outgoing
/// connections land, and a lock file held for the life of the process keeps other test
/// processes from picking it too.
pub fn free_port() -> u16 {
    free_ports(1)
}

/// The first of `count` consecutive ports, reserved as [`free_port`] reserves one.
pub fn free_ports(count: u16) -> u16 {
    use rand::Rng as _;
    use std::sync::Mutex;

    // The lock files of this process's ports: held until the process exits.
    static HELD: Mutex<Vec<std::fs::File>> = Mutex::new(Vec::new());

    assert!((1..=100).contains(&count), "free_ports({count}): between 1 and 100 ports");
    let (low, high) = reservable_range();
    let dir = std::env::temp_dir().join("keyshare-test-ports");
    std::fs::create_dir_all(&dir).unwrap();
    let mut rng = rand::thread_rng();
    for _ in 0..1000 {
        let first = rng.gen_range(low..=high - count);
        let mut locks = Vec::with_capacity(usize::from(count));
        let all = (first..first + count).all(|port| {
            let Ok(file) =
                std::fs::OpenOptions::new().create(true).write(true).truncate(false).open(dir.join(port.to_string()))
            else {
                return false;
            };
            if file.try_lock().is_err() || TcpListener::bind(("127.0.0.1", port)).is_err() {
                return false;
            }
            locks.push(file);
            true
        });
        if all {
            HELD.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).extend(locks);
            return first;
        }
    }
    panic!("no {count} free consecutive ports in {low}-{high}");
}

/// Ports that no port-0 bind or outgoing connection is given: outside the ephemeral range
/// (`net.ipv4.ip_local_port_range`) and above the well-known and common service ports.
fn reservable_range() -> (u16, u16) {
    let (low, high) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut bounds = text.split_whitespace().map(|bound| bound.parse::<u16>().ok());
            Some((bounds.next()??, bounds.next()??))
        })
        .unwrap_or((32768, 60999));
    if low > 21_000 {
        (20_000, low - 1)
    } else if high < 64_000 {
        (high + 1, 65_000)
    } else {
        // No room outside the range: the lock files still keep tests apart.
        (low.max(20_000), high.min(65_000))
    }
}

/// `GET /metrics` of a service's metrics endpoint over plain HTTP/1.1; the body, after checking
/// the answer is a 200.
pub async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: metrics\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    assert!(head.starts_with("HTTP/1.1 200"), "scraping {addr}: {head}");
    body.to_owned()
}

/// Polls `probe` until it returns `Some`, or panics after `deadline` naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(start.elapsed() < deadline, "timed out after {deadline:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn admin_url() -> String {
    std::env::var("KEYSHARE_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A database created for one test and dropped when the value is dropped.
#[derive(Debug)]
pub struct TestDatabase {
    pub url: String,
    name: String,
}

impl TestDatabase {
    pub async fn create() -> Self {
        let admin = admin_url();
        let name = format!("ks_test_{}", uuid::Uuid::new_v4().simple());
        let (client, connection) = tokio_postgres::connect(&admin, tokio_postgres::NoTls).await.unwrap_or_else(|e| {
            panic!("PostgreSQL is not reachable at KEYSHARE_TEST_DATABASE_URL ({e}); scripts/test starts it")
        });
        tokio::spawn(connection);
        client.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap();
        let mut config: tokio_postgres::Config = admin.parse().unwrap();
        config.dbname(&name);
        let url = rebuild_url(&admin, &name);
        Self { url, name }
    }
}

fn rebuild_url(admin: &str, dbname: &str) -> String {
    // postgres://user@host:port/db?params → same with another db.
    let (base, query) = admin.split_once('?').map_or((admin, None), |(b, q)| (b, Some(q)));
    let prefix = base.rsplit_once('/').map_or(base, |(p, _)| p);
    match query {
        Some(q) => format!("{prefix}/{dbname}?{q}"),
        None => format!("{prefix}/{dbname}"),
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        let admin = admin_url();
        // Drop runs outside any runtime guarantee; use a private one on a plain thread.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            runtime.block_on(async move {
                let (client, connection) = tokio_postgres::connect(&admin, tokio_postgres::NoTls).await.ok()?;
                tokio::spawn(connection);
                client.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await.ok()
            })
        })
        .join();
    }
}

/// A mail as the SMTP server received it.
#[derive(Clone, Debug)]
pub struct ReceivedMail {
    pub to: String,
    pub subject: String,
    pub body: String,
}

/// A real SMTP server (aiosmtpd) that stores every mail in a maildir. Recipients whose address
/// starts with `refused` are refused for good (550), as a real server refuses unknown mailboxes.
#[derive(Debug)]
pub struct SmtpServer {
    child: Option<Child>,
    pub port: u16,
    maildir: tempfile::TempDir,
    /// How long the server takes to accept each mail.
    delay: Duration,
}

/// aiosmtpd's Mailbox handler, slowed down by a delay per mail and refusing `refused…`
/// recipients.
const HANDLER: &str = r#"
import asyncio
from aiosmtpd.handlers import Mailbox


class KeyshareTestMailbox(Mailbox):
    def __init__(self, mail_dir, delay):
        super().__init__(mail_dir)
        self.delay = float(delay)

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.lower().startswith("refused"):
            return "550 5.1.1 no such mailbox"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        await asyncio.sleep(self.delay)
        return await super().handle_DATA(server, session, envelope)

    @classmethod
    def from_cli(cls, parser, *args):
        return cls(args[0], args[1])
"#;

impl SmtpServer {
    pub async fn start() -> Self {
        Self::start_slow(Duration::ZERO).await
    }

    /// A server that takes `delay` to accept each mail, as a loaded or distant one does.
    pub async fn start_slow(delay: Duration) -> Self {
        let maildir = tempfile::tempdir().unwrap();
        std::fs::write(maildir.path().join("keyshare_test_smtp.py"), HANDLER).unwrap();
        let mut server = Self { child: None, port: free_port(), maildir, delay };
        server.launch().await;
        server
    }

    async fn launch(&mut self) {
        let child = Command::new(tool("python"))
            .env("PYTHONPATH", self.maildir.path())
            .args([
                "-m",
                "aiosmtpd",
                "-n",
                "-l",
                &format!("127.0.0.1:{}", self.port),
                "-c",
                "keyshare_test_smtp.KeyshareTestMailbox",
            ])
            .arg(self.maildir.path().join("mail"))
            .arg(self.delay.as_secs_f64().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start aiosmtpd");
        self.child = Some(child);
        let port = self.port;
        eventually("the SMTP server to listen", Duration::from_secs(20), || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok().map(|_| ())
        })
        .await;
    }

    /// `smtp://127.0.0.1:PORT` for `KEYSHARE_SMTP_URL`.
    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    /// Stops the server (mail already received stays readable).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port.
    pub async fn restart(&mut self) {
        self.stop();
        self.launch().await;
    }

    /// Every mail received so far.
    pub fn received(&self) -> Vec<ReceivedMail> {
        let mut mails = Vec::new();
        for sub in ["new", "cur"] {
            let Ok(entries) = std::fs::read_dir(self.maildir.path().join("mail").join(sub)) else {
                continue;
            };
            for entry in entries.flatten() {
                if let Ok(raw) = std::fs::read_to_string(entry.path()) {
                    mails.push(parse_mail(&raw));
                }
            }
        }
        mails
    }

    /// Waits until at least `count` mails to `to` arrived, and returns them.
    pub async fn wait_for(&self, to: &str, count: usize) -> Vec<ReceivedMail> {
        let to = to.to_ascii_lowercase();
        eventually(&format!("{count} mail(s) to {to}"), Duration::from_secs(30), || {
            let mails: Vec<_> =
                self.received().into_iter().filter(|m| m.to.to_ascii_lowercase().contains(&to)).collect();
            async move { (mails.len() >= count).then_some(mails) }
        })
        .await
    }
}

impl SmtpServer {
    /// Waits for a mail to `to` whose subject contains `subject`, and returns the newest.
    pub async fn wait_for_mail(&self, to: &str, subject: &str) -> ReceivedMail {
        let to = to.to_ascii_lowercase();
        eventually(&format!("a mail to {to} about {subject:?}"), Duration::from_secs(30), || {
            let found = self
                .received()
                .into_iter()
                .rfind(|m| m.to.to_ascii_lowercase().contains(&to) && m.subject.contains(subject));
            async move { found }
        })
        .await
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn parse_mail(raw: &str) -> ReceivedMail {
    let raw = raw.replace("\r\n", "\n");
    let (head, body) = raw.split_once("\n\n").unwrap_or((&raw, ""));
    // Unfold continuation lines before reading headers.
    let head = head.replace("\n ", " ").replace("\n\t", " ");
    let header = |name: &str| {
        head.lines()
            .find_map(|line| {
                let (key, value) = line.split_once(':')?;
                key.eq_ignore_ascii_case(name).then(|| value.trim().to_owned())
            })
            .unwrap_or_default()
    };
    let body = match header("Content-Transfer-Encoding").to_ascii_lowercase().as_str() {
        "quoted-printable" => decode_quoted_printable(body),
        "base64" => {
            let compact: String = body.split_whitespace().collect();
            String::from_utf8_lossy(&base64::engine::general_purpose::STANDARD.decode(compact).unwrap_or_default())
                .into_owned()
        }
        _ => body.to_owned(),
    };
    ReceivedMail { to: header("To"), subject: header("Subject"), body }
}

fn decode_quoted_printable(text: &str) -> String {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'=' if bytes.get(i + 1) == Some(&b'\n') => i += 2,
            b'=' if i + 2 < bytes.len() => {
                match u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(byte) => out.push(byte),
                    Err(_) => out.extend_from_slice(&bytes[i..i + 3]),
                }
                i += 3;
            }
            byte => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One h2load run against a gRPC method: its requests per second and, when asked, every
/// request's latency in µs, sorted. Panics when h2load reports a failed or errored request.
#[derive(Clone, Debug, Default)]
pub struct H2loadRun {
    pub requests_per_second: f64,
    pub latencies_us: Vec<u64>,
}

impl H2loadRun {
    /// The `p`-th percentile (0–100) of the latencies, 0 without any.
    pub fn percentile_us(&self, p: f64) -> u64 {
        let sorted = &self.latencies_us;
        if sorted.is_empty() {
            return 0;
        }
        sorted[(((sorted.len() - 1) as f64) * p / 100.0).round() as usize]
    }
}

/// A gRPC request body as h2load sends it: the message in a gRPC frame, in a file.
pub fn grpc_body(dir: &Path, name: &str, message: &[u8]) -> PathBuf {
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(message);
    let path = dir.join(name);
    std::fs::write(&path, framed).expect("write the request body");
    path
}

/// Runs h2load (Debian's `nghttp2-client`) with `args` against `url` (a gRPC method), posting
/// `body` (see [`grpc_body`]); with `latencies`, keeps every request's latency.
pub fn h2load(url: &str, body: &Path, args: &[&str], latencies: bool) -> H2loadRun {
    let log =
        latencies.then(|| std::env::temp_dir().join(format!("h2load-{}-{}.log", std::process::id(), rand_suffix())));
    let mut command = Command::new("h2load");
    command.args(args).args(["-H", "content-type: application/grpc", "-H", "te: trailers", "-d"]).arg(body).arg(url);
    if let Some(log) = &log {
        command.arg("--log-file").arg(log);
    }
    let out = command.output().expect("h2load is installed (scripts/bench installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("0 failed, 0 errored"), "h2load reported failures:\n{text}");
    let requests_per_second = text
        .lines()
        .find(|l| l.starts_with("finished in"))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|r| r.parse().ok())
        .unwrap_or(0.0);
    let mut latencies_us: Vec<u64> = log
        .as_ref()
        .map(|log| std::fs::read_to_string(log).unwrap_or_default())
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split('\t').nth(2).and_then(|d| d.trim().parse().ok()))
        .collect();
    if let Some(log) = log {
        let _ = std::fs::remove_file(log);
    }
    latencies_us.sort_unstable();
    H2loadRun { requests_per_second, latencies_us }
}

fn rand_suffix() -> u64 {
    use rand::Rng as _;
    rand::thread_rng().r#gen()
}

#[cfg(test)]
mod tests {
    #[test]
    fn urls_keep_their_parameters() {
        assert_eq!(super::rebuild_url("postgres://u@h:1/postgres", "x"), "postgres://u@h:1/x");
        assert_eq!(
            super::rebuild_url("postgres://u@h/postgres?sslmode=disable", "x"),
            "postgres://u@h/x?sslmode=disable"
        );
    }
}

/// A PostgreSQL server of the test's own (initdb into a temporary directory, on a free port), for
/// tests that stop and start the database while services run. Stopped when dropped.
#[derive(Debug)]
pub struct PrivateCluster {
    dir: tempfile::TempDir,
    bindir: PathBuf,
    pub port: u16,
}

impl PrivateCluster {
    /// Creates and starts the cluster. As root, runs the server as the `postgres` user, since
    /// initdb refuses root.
    pub fn start() -> Self {
        Self::start_maybe_tls(None)
    }

    /// [`PrivateCluster::start`] with `ssl = on`, serving this certificate and key (PEM).
    pub fn start_with_tls(cert_pem: &str, key_pem: &str) -> Self {
        Self::start_maybe_tls(Some((cert_pem, key_pem)))
    }

    fn start_maybe_tls(tls: Option<(&str, &str)>) -> Self {
        let bindir = postgres_bindir();
        let dir = tempfile::Builder::new().prefix("keyshare-pg-").tempdir().unwrap();
        if running_as_root() {
            let status = Command::new("chown").arg("postgres:postgres").arg(dir.path()).status().unwrap();
            assert!(status.success(), "chown of the cluster directory failed");
        }
        let cluster = Self { dir, bindir, port: free_port() };
        let data = cluster.data_dir();
        cluster.run("initdb", &["-D", &data, "--auth=trust", "--username=postgres", "--encoding=UTF8", "--no-locale"]);
        if let Some((cert_pem, key_pem)) = tls {
            use std::io::Write as _;
            use std::os::unix::fs::PermissionsExt as _;
            let data = Path::new(&data);
            std::fs::write(data.join("server.crt"), cert_pem).unwrap();
            std::fs::write(data.join("server.key"), key_pem).unwrap();
            // The server refuses a key others may read.
            std::fs::set_permissions(data.join("server.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
            if running_as_root() {
                for file in ["server.crt", "server.key"] {
                    let status = Command::new("chown").arg("postgres:postgres").arg(data.join(file)).status().unwrap();
                    assert!(status.success(), "chown of {file} failed");
                }
            }
            let mut conf = std::fs::OpenOptions::new().append(true).open(data.join("postgresql.conf")).unwrap();
            writeln!(conf, "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'").unwrap();
        }
        cluster.start_server();
        cluster
    }

    fn data_dir(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    /// One of the server's programs, run as `postgres` when we are root (initdb and the server
    /// refuse root).
    fn command(&self, program: &str) -> Command {
        let program = self.bindir.join(program);
        let mut command = if running_as_root() {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(program);
            command
        } else {
            Command::new(program)
        };
        command.current_dir("/");
        command
    }

    fn run(&self, program: &str, args: &[&str]) {
        let output = self.command(program).args(args).output().unwrap();
        assert!(output.status.success(), "{program} failed: {}", String::from_utf8_lossy(&output.stderr));
    }

    /// Starts the server (again) and waits until it accepts connections.
    pub fn start_server(&self) {
        let (data, log) = (self.data_dir(), self.dir.path().join("log").display().to_string());
        let options = format!("-p {} -k {} -c listen_addresses=127.0.0.1", self.port, self.dir.path().display());
        self.run("pg_ctl", &["-D", &data, "-l", &log, "-w", "-t", "30", "-o", &options, "start"]);
    }

    /// Stops the server (fast shutdown: open connections are closed) and waits until it has.
    pub fn stop_server(&self) {
        self.run("pg_ctl", &["-D", &self.data_dir(), "-m", "fast", "-w", "-t", "30", "stop"]);
    }

    /// The URL of database `postgres` on this server.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let _ = self.command("pg_ctl").args(["-D", &self.data_dir(), "-m", "immediate", "stop"]).output();
    }
}

fn running_as_root() -> bool {
    static ROOT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ROOT.get_or_init(|| Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n")))
}

/// The newest installed PostgreSQL's programs, or those on PATH.
fn postgres_bindir() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|dirs| {
            dirs.filter_map(|d| d.ok()).map(|d| d.path().join("bin")).filter(|b| b.join("initdb").exists()).collect()
        })
        .unwrap_or_default();
    versions.sort_by_key(|path| {
        path.parent().and_then(|v| v.file_name()).and_then(|v| v.to_str()).and_then(|v| v.parse::<u32>().ok())
    });
    if let Some(newest) = versions.pop() {
        return newest;
    }
    let on_path = Command::new("sh").args(["-c", "command -v initdb"]).output().expect("a shell");
    let initdb = String::from_utf8_lossy(&on_path.stdout).trim().to_owned();
    assert!(!initdb.is_empty(), "initdb is not installed (install the postgresql package)");
    PathBuf::from(initdb).parent().expect("initdb's directory").to_path_buf()
}

/// A Redis server of the test's own, listening only on a unix socket in a temporary directory
/// (no TCP port at all, so nothing can collide), which the test may stop and start again at the
/// same address. Keeps nothing on disk. Stopped when dropped.
#[derive(Debug)]
pub struct RedisServer {
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts `redis-server` and waits until it answers.
    pub fn start() -> Self {
        let dir = tempfile::Builder::new().prefix("keyshare-redis-").tempdir().unwrap();
        let mut server = Self { dir, child: None };
        server.start_server();
        server
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("redis.sock")
    }

    /// `unix://` URL of the server, for `KEYSHARE_REDIS_URL`.
    pub fn url(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    /// Starts the server (again) and waits until it answers PING.
    pub fn start_server(&mut self) {
        assert!(self.child.is_none(), "the Redis server is running already");
        let child = Command::new("redis-server")
            .args(["--port", "0", "--unixsocket"])
            .arg(self.socket())
            .args(["--unixsocketperm", "700", "--save", "", "--appendonly", "no", "--dir"])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is missing: scripts/test installs it");
        self.child = Some(child);
        let start = Instant::now();
        loop {
            if let Ok(mut stream) = std::os::unix::net::UnixStream::connect(self.socket()) {
                use std::io::{Read, Write};
                let mut answer = [0u8; 7];
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                if stream.write_all(b"PING\r\n").is_ok()
                    && stream.read_exact(&mut answer).is_ok()
                    && &answer == b"+PONG\r\n"
                {
                    return;
                }
            }
            assert!(start.elapsed() < Duration::from_secs(30), "redis-server did not answer within 30 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server (as a crash would) and waits until it has exited.
    pub fn stop_server(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(self.socket());
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop_server();
    }
}

/// A certificate authority of the test's own, issuing certificates into PEM files in a
/// temporary directory (removed when dropped).
pub struct TestPki {
    dir: tempfile::TempDir,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    ca_pem: String,
}

impl std::fmt::Debug for TestPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestPki").field("dir", &self.dir.path()).finish_non_exhaustive()
    }
}

/// A certificate and key [`TestPki`] issued, as PEM text.
#[derive(Clone, Debug)]
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
    /// The certificate, DER-encoded (to compare with what a server presents).
    pub cert_der: Vec<u8>,
}

impl TestPki {
    /// A new CA named `name`.
    pub fn new(name: &str) -> Self {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
        let ca = params.self_signed(&key).unwrap();
        let dir = tempfile::Builder::new().prefix("keyshare-pki-").tempdir().unwrap();
        std::fs::write(dir.path().join("ca.crt"), ca.pem()).unwrap();
        Self { dir, issuer: rcgen::Issuer::new(params, key), ca_pem: ca.pem() }
    }

    /// The CA certificate's PEM file.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Issues a certificate for these DNS names / IP addresses, for servers and clients alike.
    pub fn issue(&self, names: &[&str]) -> IssuedCert {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, names.first().copied().unwrap_or("test"));
        params.extended_key_usages =
            vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        IssuedCert { cert_pem: cert.pem(), key_pem: key.serialize_pem(), cert_der: cert.der().to_vec() }
    }

    /// Issues a certificate and writes it to `{stem}.crt` and `{stem}.key`, replacing each file
    /// at once (as a Kubernetes secret volume does), so a reader never sees half a file.
    pub fn issue_files(&self, stem: &str, names: &[&str]) -> (crate::tls::CertFiles, IssuedCert) {
        let issued = self.issue(names);
        let files = crate::tls::CertFiles {
            cert: self.dir.path().join(format!("{stem}.crt")),
            key: self.dir.path().join(format!("{stem}.key")),
        };
        for (path, content) in [(&files.key, &issued.key_pem), (&files.cert, &issued.cert_pem)] {
            let partial = path.with_extension("partial");
            std::fs::write(&partial, content).unwrap();
            std::fs::rename(&partial, path).unwrap();
        }
        (files, issued)
    }

    /// Settings for a service presenting `files`, trusting this CA as clients and, with
    /// `require_client_certs`, requiring client certificates it signed.
    pub fn settings(&self, files: &crate::tls::CertFiles, require_client_certs: bool) -> Vec<(String, String)> {
        let mut settings = vec![
            (crate::tls::CERT_VAR.to_owned(), files.cert.display().to_string()),
            (crate::tls::KEY_VAR.to_owned(), files.key.display().to_string()),
            (crate::tls::CA_VAR.to_owned(), self.ca_path().display().to_string()),
        ];
        if require_client_certs {
            settings.push((crate::tls::CLIENT_CA_VAR.to_owned(), self.ca_path().display().to_string()));
        }
        settings
    }
}

/// The leaf certificate (DER) a TLS server at `addr` presents, verified against `ca_path` for
/// `server_name`, over a new connection presenting `client` when given.
pub async fn served_certificate(
    addr: std::net::SocketAddr,
    server_name: &str,
    ca_path: &Path,
    client: Option<&crate::tls::CertFiles>,
) -> std::io::Result<Vec<u8>> {
    let settings = crate::tls::TlsSettings { identity: client.cloned(), client_ca: None, ca: Some(ca_path.into()) };
    let config = settings.client_config().map_err(std::io::Error::other)?;
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls_pki_types::ServerName::try_from(server_name.to_owned()).map_err(std::io::Error::other)?;
    let tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?;
    let chain = tls.get_ref().1.peer_certificates().ok_or_else(|| std::io::Error::other("no certificate"))?;
    Ok(chain.first().ok_or_else(|| std::io::Error::other("empty chain"))?.to_vec())
}

/// A connected plaintext channel to the gRPC server at `addr`.
pub async fn channel(addr: std::net::SocketAddr) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap()
}

/// `message` as a caller holding `token` sends it: `authorization: Bearer <token>`.
pub fn authed<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

/// The `ErrorInfo.reason` of a status, empty when it has none.
pub fn reason(status: &tonic::Status) -> String {
    use tonic_types::StatusExt as _;
    status.get_details_error_info().map(|i| i.reason).unwrap_or_default()
}

/// The fields a status's `BadRequest` names, in its order.
pub fn bad_fields(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt as _;
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

/// The token of a mail's link or grpcurl line (`token=…`).
pub fn token_from_mail(body: &str) -> String {
    body.lines()
        .find_map(|line| line.split("token=").nth(1))
        .map(|t| t.trim().to_owned())
        .expect("the mail carries a token")
}

/// A person as a test signed them up: the account's name (`accounts/{id}`) and their tokens.
#[derive(Clone, Debug)]
pub struct TestAccount {
    pub name: String,
    pub token: String,
    pub refresh_token: String,
}

/// Signs `email` up through identity's API (display name: the address) and logs in. With
/// `verify_through`, the verification mail that SMTP server received is followed first.
pub async fn sign_up(
    identity: tonic::transport::Channel,
    email: &str,
    password: &str,
    verify_through: Option<&SmtpServer>,
) -> TestAccount {
    use keyshare_proto::identity::v1 as pb;
    let mut client = pb::identity_service_client::IdentityServiceClient::new(identity.clone());
    let account = client
        .create_account(pb::CreateAccountRequest {
            email: email.into(),
            display_name: email.into(),
            password: password.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .account
        .unwrap();
    if let Some(smtp) = verify_through {
        let mail = smtp.wait_for_mail(email, "Verify").await;
        client.verify_email(pb::VerifyEmailRequest { token: token_from_mail(&mail.body) }).await.unwrap();
    }
    let grant = login(identity, email, password).await.unwrap();
    TestAccount { name: account.name, token: grant.access_token, refresh_token: grant.refresh_token }
}

/// Logs `email` in with `password`.
pub async fn login(
    identity: tonic::transport::Channel,
    email: &str,
    password: &str,
) -> Result<keyshare_proto::identity::v1::TokenGrant, tonic::Status> {
    use keyshare_proto::identity::v1 as pb;
    pb::identity_service_client::IdentityServiceClient::new(identity)
        .login(pb::LoginRequest { email: email.into(), password: password.into() })
        .await
        .map(|r| r.into_inner().grant.unwrap())
}

/// An access token of the internal client `client_id`, as that service obtains it.
pub async fn client_token(identity: tonic::transport::Channel, client_id: &str, client_secret: &str) -> String {
    use keyshare_proto::identity::v1 as pb;
    pb::identity_service_client::IdentityServiceClient::new(identity)
        .issue_service_account_token(pb::IssueServiceAccountTokenRequest {
            client_id: client_id.into(),
            client_secret: client_secret.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .grant
        .unwrap()
        .access_token
}

/// Where a test points Envoy's configuration (`deploy/envoy/envoy.yaml`, or one of its shape):
/// its listener and admin ports, the upstream, the authorizer replicas (check ports, each with
/// its load-balancing weight), and the project the gateway checks keys for.
#[derive(Clone, Debug)]
pub struct EnvoySite<'a> {
    pub listen: u16,
    pub admin: u16,
    pub upstream: u16,
    pub authorizers: &'a [(u16, u32)],
    pub project: &'a str,
}

/// The configuration Keyshare ships for Envoy.
pub fn shipped_envoy_yaml() -> String {
    std::fs::read_to_string(workspace_root().join("deploy/envoy/envoy.yaml")).unwrap()
}

/// `shipped` pointed at `site`. Every placeholder must be there, so that a change to the shipped
/// file stops the test rather than have it try something else.
pub fn envoy_config(shipped: &str, site: &EnvoySite<'_>) -> String {
    const AUTHORIZER: &str = "address: authorizer, port_value: 50054";
    let endpoint = shipped
        .lines()
        .find(|line| line.contains(AUTHORIZER))
        .unwrap_or_else(|| panic!("the Envoy configuration no longer contains `{AUTHORIZER}`"));
    let indent = " ".repeat(endpoint.len() - endpoint.trim_start().len() + 2);
    let endpoints: Vec<String> = site
        .authorizers
        .iter()
        .map(|(port, weight)| {
            let line = endpoint.replace(AUTHORIZER, &format!("address: 127.0.0.1, port_value: {port}"));
            format!("{line}\n{indent}load_balancing_weight: {weight}")
        })
        .collect();
    [
        (endpoint.to_owned(), endpoints.join("\n")),
        ("port_value: 8080".to_owned(), format!("port_value: {}", site.listen)),
        ("port_value: 9901".to_owned(), format!("port_value: {}", site.admin)),
        (
            "address: upstream, port_value: 8000".to_owned(),
            format!("address: 127.0.0.1, port_value: {}", site.upstream),
        ),
        ("projects/REPLACE-WITH-YOUR-PROJECT-ID".to_owned(), site.project.to_owned()),
    ]
    .iter()
    .fold(shipped.to_owned(), |config, (from, to)| {
        assert!(config.contains(from.as_str()), "the Envoy configuration no longer contains `{from}`");
        config.replace(from.as_str(), to)
    })
}

/// A real Envoy (`tool("envoy")`), its stderr kept in a file; killed when dropped.
pub struct Envoy {
    pub port: u16,
    pub name: String,
    child: Child,
    log: PathBuf,
}

impl Envoy {
    /// Starts Envoy with `config` (written into `dir` as `<name>.yaml`) listening on `port`.
    pub fn start(name: &str, config: &str, port: u16, dir: &Path) -> Self {
        let path = dir.join(format!("{name}.yaml"));
        std::fs::write(&path, config).unwrap();
        let log = dir.join(format!("{name}.stderr"));
        let child = Command::new(tool("envoy"))
            .arg("-c")
            .arg(&path)
            .args(["--base-id", &port.to_string(), "--log-level", "warn", "--disable-hot-restart"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Self { port, name: name.to_owned(), child, log }
    }

    /// What Envoy wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `ready` says yes, at most a minute; fails with Envoy's log if it exits or the
    /// minute passes.
    pub async fn wait_until<F, Fut>(&mut self, what: &str, mut ready: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if ready().await {
                return;
            }
            assert!(matches!(self.child.try_wait(), Ok(None)), "{} exited; its log:\n{}", self.name, self.log());
            assert!(Instant::now() < deadline, "{}: {what} not within 60 s; its log:\n{}", self.name, self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request to `127.0.0.1:port` (`Host: api.example`, connection closed after):
/// (status, response head in lower case, body), or `None` if nothing whole came back.
pub async fn http_call(port: u16, method: &str, path: &str, headers: &[(&str, &str)]) -> Option<(u16, String, String)> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: api.example\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if method == "POST" {
        request.push_str("Content-Length: 0\r\n");
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, head.to_ascii_lowercase(), body.to_owned()))
}
