//! Keyring's settings, read from the environment at start.

use std::time::Duration;

use keyshare_runtime::auth::TokenPolicy;
use keyshare_runtime::client::ClientCredentials;
use keyshare_runtime::config::{CommonConfig, ConfigError, Env};
use keyshare_runtime::crypto::Sealer;

/// Default gRPC port.
pub const PORT: u16 = 50052;

#[derive(Clone, Debug)]
pub struct Config {
    pub common: CommonConfig,
    pub tokens: TokenPolicy,
    /// Seals credentials at rest (`KEYSHARE_KEY_ENCRYPTION_KEYS`).
    pub sealer: Sealer,
    /// identity's address (`KEYSHARE_IDENTITY_URL`).
    pub identity_url: String,
    /// The invitation service's address (`KEYSHARE_INVITATION_URL`).
    pub invitation_url: String,
    /// This service's internal client (`KEYSHARE_CLIENT_ID`, `KEYSHARE_CLIENT_SECRET`).
    pub credentials: ClientCredentials,
    /// How long feed entries are kept (`KEYSHARE_FEED_RETENTION_SECS`, default 7 days); a
    /// watcher further behind gets a snapshot.
    pub feed_retention: Duration,
}

impl Config {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        Ok(Self {
            common: CommonConfig::from_env(env, "keyring", PORT)?,
            tokens: TokenPolicy::from_env(env),
            sealer: Sealer::from_env(env)?,
            identity_url: env.get("KEYSHARE_IDENTITY_URL").unwrap_or_else(|| "http://127.0.0.1:50051".into()),
            invitation_url: env.get("KEYSHARE_INVITATION_URL").unwrap_or_else(|| "http://127.0.0.1:50053".into()),
            credentials: ClientCredentials::from_env(env)?,
            feed_retention: env.secs_or("KEYSHARE_FEED_RETENTION_SECS", 7 * 24 * 3600)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_prints_no_secret() {
        let (_, kek) = keyshare_runtime::crypto::Sealer::generate("k1");
        let kek_secret = kek.split_once(':').map(|(_, key)| key.to_owned()).unwrap_or_default();
        let env = Env::from_pairs([
            ("DATABASE_URL", "postgres://keyshare:db-password-1234@127.0.0.1/keyshare".to_owned()),
            ("KEYSHARE_CLIENT_ID", "keyring".to_owned()),
            ("KEYSHARE_CLIENT_SECRET", "client-secret-0123456789abcdef0123456789".to_owned()),
            ("KEYSHARE_SMTP_URL", "smtp://mailer:smtp-password-5678@127.0.0.1:2525".to_owned()),
            ("KEYSHARE_KEY_ENCRYPTION_KEYS", kek),
        ]);
        let printed = format!("{:?}", Config::from_env(&env).expect("configuration"));
        for secret in
            ["db-password-1234", "client-secret-0123456789abcdef0123456789", "smtp-password-5678", &kek_secret]
        {
            assert!(!printed.contains(secret), "Debug of keyring's Config shows a secret: {printed}");
        }
    }
}
