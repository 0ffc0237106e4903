//! The stack the system tests and benchmarks run on, built with the test kit every crate's tests
//! share.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub use keyshare_testkit::*;

/// identity, keyring and an authorizer on a database of their own, on the system clock, with
/// mail written into the stack's spool. Email verification is not required, so accounts log in
/// at once. The authorizer may not be SERVING yet.
pub async fn stack() -> Stack {
    Stack::builder().authorizer().with(Kind::Identity, Setting::RequireVerifiedEmail(false)).start().await
}

/// A keyring client of `stack`'s first keyring.
pub async fn keyring(
    stack: &Stack,
) -> keyshare_proto::keyring::v1::keyring_service_client::KeyringServiceClient<tonic::transport::Channel> {
    keyshare_proto::keyring::v1::keyring_service_client::KeyringServiceClient::new(stack.channel(Kind::Keyring).await)
}

/// p-th percentile (0–100) of sorted samples.
pub fn percentile(sorted: &[std::time::Duration], p: f64) -> std::time::Duration {
    if sorted.is_empty() {
        return std::time::Duration::ZERO;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Starts the authorizer binary of this build's profile (the release one under `cargo bench`;
/// `scripts/bench` builds it), under `wrapper` (e.g. valgrind) when given, with `stack`'s
/// settings, logging as a deployment does (info, JSON, no trace export), on three consecutive
/// reserved ports: the check port (returned), management, metrics.
pub fn authorizer_binary(stack: &Stack, wrapper: &[String]) -> (std::process::Child, u16) {
    use std::process::{Command, Stdio};
    let base = keyshare_runtime::testkit::free_ports(3);
    let mut command = match wrapper.split_first() {
        Some((program, args)) => {
            let mut command = Command::new(program);
            command.args(args).arg(keyshare_testkit::process::binary(Kind::Authorizer));
            command
        }
        None => Command::new(keyshare_testkit::process::binary(Kind::Authorizer)),
    };
    let port = |offset: u16| std::net::SocketAddr::from(([127, 0, 0, 1], base + offset));
    let mut settings = stack.settings(Kind::Authorizer);
    settings.extend([
        Setting::Listen(port(0)),
        Setting::Management(port(1)),
        Setting::Metrics(port(2)),
        Setting::Log("info".into()),
        Setting::JsonLogs,
    ]);
    command.envs(settings.pairs()).stdout(Stdio::null()).stderr(Stdio::null());
    (command.spawn().expect("start the authorizer binary"), base)
}
