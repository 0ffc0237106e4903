//! What every Keyshare service stands on.
//!
//! - [`config`]: settings from environment variables, checked at start;
//! - [`db`]: the PostgreSQL pool, migrations into the service's own schema, SQLSTATE mapping;
//! - [`server`]: the gRPC server with health, reflection, request ids, timeouts, a concurrency
//!   limit, authentication, metrics, tracing and graceful shutdown;
//! - [`error`]: the shared error model (`ErrorInfo`, `BadRequest`);
//! - [`auth`]: access tokens, their verification, and the caller a handler sees;
//! - [`telemetry`] and [`metrics`]: logs, traces, Prometheus;
//! - [`mail`]: the transactional email outbox;
//! - [`clock`], [`crypto`], [`page`]: time, secrets, pagination.

pub mod auth;
pub mod clock;
pub mod config;
pub mod crypto;
pub mod db;
pub mod error;
pub mod mail;
pub mod metrics;
pub mod page;
pub mod server;
pub mod telemetry;
#[cfg(feature = "testkit")]
pub mod testkit;
