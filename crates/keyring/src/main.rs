//! `keyring` runs the keyring service. Configuration comes from the environment (see README).

/// mimalloc, as the authorizer: a snapshot for a watcher decodes and re-encodes a million keys
/// in small short-lived allocations (`scripts/bench cold-start`: 5.2 s to SERVING with glibc's
/// allocator, 3.5 s with mimalloc, at a million keys).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    keyshare_runtime::server::run("keyring", keyshare_keyring::Config::from_env, |config, clock, shutdown| async move {
        keyshare_keyring::start(config, clock, shutdown).await.map(|started| started.server)
    })
    .await
}
