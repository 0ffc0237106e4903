//! `invitation` runs the invitation service. Configuration comes from the environment (see README).

#[tokio::main]
async fn main() -> std::process::ExitCode {
    keyshare_runtime::server::run(
        "invitation",
        keyshare_invitation::Config::from_env,
        |config, clock, shutdown| async move {
            keyshare_invitation::start(config, clock, shutdown).await.map(|started| started.server)
        },
    )
    .await
}
