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
