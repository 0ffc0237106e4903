//! What every Keyshare service stands on.
//!
//! - [`env`] and [`config`]: settings from environment variables, checked at start;
//! - [`db`]: the PostgreSQL pool, migrations into the service's own schema, SQLSTATE mapping;
//! - [`server`]: the gRPC server with health, reflection, request ids, timeouts, a concurrency
//!   limit, authentication, metrics, tracing and graceful shutdown; [`start`]: why it could not
//!   start;
//! - [`email`]: email addresses as every service accepts them;
//! - [`error`]: the shared error model (`ErrorInfo`, `BadRequest`);
//! - [`auth`]: access tokens, their verification, and the caller a handler sees;
//! - [`sessions`] (part of [`auth`]): the sessions identity says have ended, whose tokens are
//!   refused;
//! - [`telemetry`] and [`metrics`]: logs, traces, Prometheus;
//! - [`mail`]: the transactional email outbox;
//! - [`jobs`]: what every durable queue shares: its backoff and the worker running its rounds;
//! - [`client`]: channels to other services, this service's own access token, and how a peer's
//!   failure reads for queued work (try again, or refused for good);
//! - [`tls`]: TLS and mutual TLS for servers and clients, certificates reloaded when renewed;
//! - [`credential`]: API-key credentials, their format and checksum;
//! - [`clock`], [`crypto`], [`page`], [`resource`]: time, secrets, pagination, resource names;
//! - [`wire`]: domain values as protobuf well-known types.

pub mod auth;
pub mod client;
pub mod clock;
pub mod config;
pub mod credential;
pub mod crypto;
pub mod db;
pub mod email;
pub mod env;
pub mod error;
pub mod jobs;
pub mod mail;
pub mod metrics;
pub mod page;
pub mod pg_tls;
pub mod resource;
pub mod server;
pub use auth::sessions;
pub mod start;
pub mod telemetry;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod tls;
pub mod wire;
