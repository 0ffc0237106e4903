//! `authorizer` runs the authorizer service. Configuration comes from the environment (see README).

use std::process::ExitCode;
use std::sync::Arc;

use keyshare_authorizer::{Config, start};
use keyshare_runtime::clock::SystemClock;
use keyshare_runtime::config::Env;
use keyshare_runtime::{server, telemetry};

#[tokio::main]
async fn main() -> ExitCode {
    let env = Env::process();
    let (_telemetry, config) = match telemetry::init("authorizer", &env).and_then(|t| Ok((t, Config::from_env(&env)?)))
    {
        Ok(ready) => ready,
        Err(e) => {
            eprintln!("keyring: {e}");
            return ExitCode::from(2);
        }
    };
    match start(config, Arc::new(SystemClock), server::shutdown_signal()).await {
        Ok(started) => match started.server.await {
            Ok(Ok(())) => {
                tracing::info!("authorizer stopped");
                ExitCode::SUCCESS
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "authorizer server failed");
                ExitCode::FAILURE
            }
            Err(e) => {
                tracing::error!(error = %e, "authorizer server task failed");
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            tracing::error!(error = %e, "authorizer could not start");
            ExitCode::FAILURE
        }
    }
}
