//! `identity [serve]` runs the service; `identity rotate-signing-key` rotates the token
//! signing key. Configuration comes from the environment (see README).

use std::process::ExitCode;
use std::sync::Arc;

use keyshare_identity::{Config, rotate_signing_key, start};
use keyshare_runtime::clock::SystemClock;
use keyshare_runtime::config::Env;

#[tokio::main]
async fn main() -> ExitCode {
    match std::env::args().nth(1).as_deref() {
        None | Some("serve") => {
            keyshare_runtime::server::run("identity", Config::from_env, |config, clock, shutdown| async move {
                start(config, clock, shutdown).await.map(|started| started.server)
            })
            .await
        }
        Some("rotate-signing-key") => {
            let config = match Config::from_env(&Env::process()) {
                Ok(config) => config,
                Err(e) => {
                    eprintln!("identity: {e}");
                    return ExitCode::from(2);
                }
            };
            match rotate_signing_key(&config, Arc::new(SystemClock)).await {
                Ok(kid) => {
                    println!("new signing key: {kid}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("identity: rotating the signing key failed: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Some(other) => {
            eprintln!("identity: unknown command {other:?}; use `serve` (default) or `rotate-signing-key`");
            ExitCode::from(2)
        }
    }
}
