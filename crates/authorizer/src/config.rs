//! The authorizer's settings, read from the environment at start.

use keyshare_runtime::auth::TokenPolicy;
use keyshare_runtime::client::ClientCredentials;
use keyshare_runtime::config::{CommonConfig, ConfigError, Env};

/// Default gRPC port: the check port, for gateways (CheckKey, Envoy ext_authz).
pub const PORT: u16 = 50054;

/// Default management port: UsageService, for people and their tools.
pub const MANAGEMENT_PORT: u16 = 50055;

#[derive(Clone, Debug)]
pub struct Config {
    /// `listen_addr` is the check port.
    pub common: CommonConfig,
    /// The management port's listen address (`KEYSHARE_MANAGEMENT_ADDR`): UsageService, apart
    /// from the checks, so NetworkPolicies can keep gateways and people apart.
    pub management_addr: std::net::SocketAddr,
    pub tokens: TokenPolicy,
    /// identity's address (`KEYSHARE_IDENTITY_URL`).
    pub identity_url: String,
    /// keyring's address (`KEYSHARE_KEYRING_URL`), whose change feed the authorizer follows.
    pub keyring_url: String,
    /// This service's internal client (`KEYSHARE_CLIENT_ID`, `KEYSHARE_CLIENT_SECRET`).
    pub credentials: ClientCredentials,
    pub ext_authz: crate::ext_authz::ExtAuthzConfig,
    pub usage: crate::usage::UsageConfig,
    pub shared_limits: crate::shared_limits::SharedLimitsConfig,
}

impl Config {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        Ok(Self {
            common: CommonConfig::from_env(env, "authorizer", PORT)?,
            management_addr: env.addr_or("KEYSHARE_MANAGEMENT_ADDR", &format!("0.0.0.0:{MANAGEMENT_PORT}"))?,
            tokens: TokenPolicy::from_env(env),
            identity_url: env.get("KEYSHARE_IDENTITY_URL").unwrap_or_else(|| "http://127.0.0.1:50051".into()),
            keyring_url: env.get("KEYSHARE_KEYRING_URL").unwrap_or_else(|| "http://127.0.0.1:50052".into()),
            credentials: ClientCredentials::from_env(env)?,
            ext_authz: crate::ext_authz::ExtAuthzConfig {
                credential_header: env
                    .get("KEYSHARE_CREDENTIAL_HEADER")
                    .unwrap_or_else(|| "x-api-key".into())
                    .to_ascii_lowercase(),
                trust_forwarded_for: env.bool_or("KEYSHARE_TRUST_FORWARDED_FOR", false)?,
            },
            usage: {
                let defaults = crate::usage::UsageConfig::default();
                crate::usage::UsageConfig {
                    flush_interval: std::time::Duration::from_millis(
                        env.parse_or("KEYSHARE_USAGE_FLUSH_MILLIS", 1000u64)?.max(10),
                    ),
                    channel: env.parse_or("KEYSHARE_USAGE_CHANNEL", defaults.channel)?,
                    buffer: env.parse_or("KEYSHARE_USAGE_BUFFER", defaults.buffer)?,
                    buffer_bytes: env.parse_or("KEYSHARE_USAGE_BUFFER_BYTES", defaults.buffer_bytes)?,
                    counts_bytes: env.parse_or("KEYSHARE_USAGE_COUNTS_BYTES", defaults.counts_bytes)?,
                    call_log_retention_days: env
                        .parse_or("KEYSHARE_CALL_LOG_RETENTION_DAYS", defaults.call_log_retention_days)?
                        .max(1),
                    minute_retention_days: env
                        .parse_or("KEYSHARE_USAGE_MINUTES_RETENTION_DAYS", defaults.minute_retention_days)?,
                    hour_retention_days: env
                        .parse_or("KEYSHARE_USAGE_HOURS_RETENTION_DAYS", defaults.hour_retention_days)?,
                    day_retention_days: env
                        .parse_or("KEYSHARE_USAGE_DAYS_RETENTION_DAYS", defaults.day_retention_days)?,
                    call_log_sample: sample(env)?,
                }
            },
            shared_limits: {
                let defaults = crate::shared_limits::SharedLimitsConfig::default();
                crate::shared_limits::SharedLimitsConfig {
                    redis_url: env.get("KEYSHARE_REDIS_URL").filter(|url| !url.trim().is_empty()),
                    prefix: env.get("KEYSHARE_REDIS_PREFIX").unwrap_or(defaults.prefix),
                    sync_interval: std::time::Duration::from_millis(
                        env.parse_or("KEYSHARE_LIMITS_SYNC_MILLIS", 20u64)?.clamp(1, 1000),
                    ),
                    timeout: std::time::Duration::from_millis(
                        env.parse_or("KEYSHARE_REDIS_TIMEOUT_MILLIS", 250u64)?.clamp(1, 10_000),
                    ),
                }
            },
        })
    }
}

/// `KEYSHARE_CALL_LOG_SAMPLE`: a share from 0 to 1.
fn sample(env: &Env) -> Result<f64, ConfigError> {
    let share: f64 = env.parse_or("KEYSHARE_CALL_LOG_SAMPLE", 1.0)?;
    if !(0.0..=1.0).contains(&share) {
        return Err(ConfigError::new(
            "KEYSHARE_CALL_LOG_SAMPLE",
            format!("must be a share from 0 to 1 (0.1 logs one VALID call in ten), not {share}"),
        ));
    }
    Ok(share)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_prints_no_secret() {
        let (kek, kek_secret) = (String::new(), String::from("no key-encryption key here"));
        let env = Env::from_pairs([
            ("DATABASE_URL", "postgres://keyshare:db-password-1234@127.0.0.1/keyshare".to_owned()),
            ("KEYSHARE_CLIENT_ID", "authorizer".to_owned()),
            ("KEYSHARE_CLIENT_SECRET", "client-secret-0123456789abcdef0123456789".to_owned()),
            ("KEYSHARE_SMTP_URL", "smtp://mailer:smtp-password-5678@127.0.0.1:2525".to_owned()),
            ("KEYSHARE_KEY_ENCRYPTION_KEYS", kek),
        ]);
        let printed = format!("{:?}", Config::from_env(&env).expect("configuration"));
        for secret in
            ["db-password-1234", "client-secret-0123456789abcdef0123456789", "smtp-password-5678", &kek_secret]
        {
            assert!(!printed.contains(secret), "Debug of authorizer's Config shows a secret: {printed}");
        }
    }
}
