//! Keyshare's services started for tests, the one way every crate's tests and the system tests
//! start them: [`Stack::builder`] for the services in this process, typed [`Setting`]s instead
//! of environment strings, the binaries as processes ([`Process`]), typed results ([`TestAccount`], [`TestKey`]). The lower-level kit
//! (test databases, SMTP, PostgreSQL and Redis servers of a test's own, Envoy, h2load, the
//! request helpers) is `keyshare_runtime::testkit`, re-exported here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod authorization;
pub mod process;
pub mod settings;
pub mod stack;

pub use authorization::serve_authorization;
pub use keyshare_runtime::testkit::*;
pub use process::{Output, Process};
pub use settings::{Setting, Settings};
pub use stack::{Kind, PASSWORD, Service, Stack, StackBuilder, Store, TestKey, secrets, serving};
