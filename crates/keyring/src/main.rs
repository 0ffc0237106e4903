//! `keyring` runs the keyring service. Configuration comes from the environment (see README).

#[tokio::main]
async fn main() -> std::process::ExitCode {
    keyshare_runtime::server::run("keyring", keyshare_keyring::Config::from_env, |config, clock, shutdown| async move {
        keyshare_keyring::start(config, clock, shutdown).await.map(|started| started.server)
    })
    .await
}
