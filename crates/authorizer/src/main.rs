//! `authorizer` runs the authorizer service. Configuration comes from the environment (see README).

#[tokio::main]
async fn main() -> std::process::ExitCode {
    keyshare_runtime::server::run(
        "authorizer",
        keyshare_authorizer::Config::from_env,
        |config, clock, shutdown| async move {
            keyshare_authorizer::start(config, clock, shutdown).await.map(|started| started.server)
        },
    )
    .await
}
