//! `identity [serve]` runs the service; `identity rotate-signing-key` rotates the token
//! signing key. Configuration comes from the environment (see README).

use std::process::ExitCode;
use std::sync::Arc;

use keyshare_identity::{Config, rotate_signing_key, start};
use keyshare_runtime::clock::SystemClock;
use keyshare_runtime::config::Env;
use keyshare_runtime::{server, telemetry};

#[tokio::main]
async fn main() -> ExitCode {
    let env = Env::process();
    let command = std::env::args().nth(1).unwrap_or_else(|| "serve".into());
    let _telemetry = match telemetry::init("identity", &env) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("identity: {e}");
            return ExitCode::from(2);
        }
    };
    let config = match Config::from_env(&env) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("identity: {e}");
            return ExitCode::from(2);
        }
    };
    match command.as_str() {
        "serve" => match start(config, Arc::new(SystemClock), server::shutdown_signal()).await {
            Ok(started) => match started.server.await {
                Ok(Ok(())) => {
                    tracing::info!("identity stopped");
                    ExitCode::SUCCESS
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "identity server failed");
                    ExitCode::FAILURE
                }
                Err(e) => {
                    tracing::error!(error = %e, "identity server task failed");
                    ExitCode::FAILURE
                }
            },
            Err(e) => {
                tracing::error!(error = %e, "identity could not start");
                ExitCode::FAILURE
            }
        },
        "rotate-signing-key" => match rotate_signing_key(&config, Arc::new(SystemClock)).await {
            Ok(kid) => {
                println!("new signing key: {kid}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("identity: rotating the signing key failed: {e}");
                ExitCode::FAILURE
            }
        },
        other => {
            eprintln!("identity: unknown command {other:?}; use `serve` (default) or `rotate-signing-key`");
            ExitCode::from(2)
        }
    }
}
