//! Identity's settings, read from the environment at start.

use std::time::Duration;

use keyshare_runtime::auth::TokenPolicy;
use keyshare_runtime::config::{CommonConfig, ConfigError, Env};
use keyshare_runtime::crypto::Sealer;
use keyshare_runtime::mail::MailConfig;

/// Default gRPC port.
pub const PORT: u16 = 50051;

#[derive(Clone, Debug)]
pub struct Config {
    pub common: CommonConfig,
    pub tokens: TokenPolicy,
    /// Lifetime of access tokens (`KEYSHARE_ACCESS_TOKEN_TTL_SECS`, default 900).
    pub access_token_ttl: Duration,
    /// Lifetime of an unused refresh token (`KEYSHARE_REFRESH_TOKEN_TTL_SECS`, default 30 days).
    pub refresh_token_ttl: Duration,
    /// Whether login needs a verified email (`KEYSHARE_REQUIRE_VERIFIED_EMAIL`, default true).
    pub require_verified_email: bool,
    /// Base of links in emails (`KEYSHARE_PUBLIC_URL`).
    pub public_url: String,
    /// Seals token signing keys at rest (`KEYSHARE_KEY_ENCRYPTION_KEYS`).
    pub sealer: Sealer,
    /// Keyshare's own services and their client secrets (`KEYSHARE_INTERNAL_CLIENTS`,
    /// `name:secret,…`).
    pub internal_clients: Vec<(String, String)>,
    pub mail: MailConfig,
    /// Failed logins within `login_window` before an email is locked out for `login_lockout`.
    pub login_max_failures: i32,
    pub login_window: Duration,
    pub login_lockout: Duration,
    /// Where keyring is (`KEYSHARE_KEYRING_URL`): told when someone leaves an organization.
    pub keyring_url: String,
}

impl Config {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let internal_clients = match env.get("KEYSHARE_INTERNAL_CLIENTS") {
            None => Vec::new(),
            Some(spec) => {
                parse_internal_clients(&spec).map_err(|reason| ConfigError::new("KEYSHARE_INTERNAL_CLIENTS", reason))?
            }
        };
        Ok(Self {
            common: CommonConfig::from_env(env, "identity", PORT)?,
            tokens: TokenPolicy::from_env(env),
            access_token_ttl: env.secs_or("KEYSHARE_ACCESS_TOKEN_TTL_SECS", 900)?,
            refresh_token_ttl: env.secs_or("KEYSHARE_REFRESH_TOKEN_TTL_SECS", 30 * 24 * 3600)?,
            require_verified_email: env.bool_or("KEYSHARE_REQUIRE_VERIFIED_EMAIL", true)?,
            public_url: env
                .get("KEYSHARE_PUBLIC_URL")
                .unwrap_or_else(|| "http://localhost:8080".into())
                .trim_end_matches('/')
                .to_owned(),
            sealer: Sealer::from_env(env)?,
            internal_clients,
            mail: MailConfig::from_env(env)?,
            login_max_failures: env.parse_or("KEYSHARE_LOGIN_MAX_FAILURES", 5)?,
            login_window: env.secs_or("KEYSHARE_LOGIN_WINDOW_SECS", 900)?,
            login_lockout: env.secs_or("KEYSHARE_LOGIN_LOCKOUT_SECS", 900)?,
            keyring_url: env.get("KEYSHARE_KEYRING_URL").unwrap_or_else(|| "http://127.0.0.1:50052".into()),
        })
    }
}

fn parse_internal_clients(spec: &str) -> Result<Vec<(String, String)>, String> {
    spec.split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            let (name, secret) = entry.split_once(':').ok_or("entries must look like name:secret")?;
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_lowercase()) {
                return Err(format!("client name {name:?} must be lowercase letters"));
            }
            if secret.len() < 32 {
                return Err(format!("the secret of {name} must be at least 32 characters"));
            }
            Ok((name.to_owned(), secret.to_owned()))
        })
        .collect()
}
