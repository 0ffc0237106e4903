//! `authorizer` runs the authorizer service. Configuration comes from the environment (see README).

/// mimalloc: per-thread free lists instead of glibc's arenas, for the small short-lived
/// allocations of every gRPC call (`scripts/bench check` measures both).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
