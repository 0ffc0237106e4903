//! Invitation's settings, read from the environment at start.

use std::time::Duration;

use keyshare_runtime::auth::TokenPolicy;
use keyshare_runtime::client::ClientCredentials;
use keyshare_runtime::config::{CommonConfig, ConfigError, Env};
use keyshare_runtime::mail::MailConfig;

/// Default gRPC port.
pub const PORT: u16 = 50053;

#[derive(Clone, Debug)]
pub struct Config {
    pub common: CommonConfig,
    pub tokens: TokenPolicy,
    /// identity's address (`KEYSHARE_IDENTITY_URL`).
    pub identity_url: String,
    /// keyring's address (`KEYSHARE_KEYRING_URL`).
    pub keyring_url: String,
    /// This service's internal client (`KEYSHARE_CLIENT_ID`, `KEYSHARE_CLIENT_SECRET`).
    pub credentials: ClientCredentials,
    pub mail: MailConfig,
    /// Base of acceptance links (`KEYSHARE_PUBLIC_URL`); none: mails carry tokens, no links.
    pub public_url: Option<String>,
    /// How long an invitation stays acceptable after a send (`KEYSHARE_INVITATION_VALIDITY_SECS`,
    /// default 7 days).
    pub validity: Duration,
    /// How often pending grants and removals are retried (`KEYSHARE_CALL_RETRY_SECS`).
    pub call_retry: Duration,
}

impl Config {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        Ok(Self {
            common: CommonConfig::from_env(env, "invitation", PORT)?,
            tokens: TokenPolicy::from_env(env),
            identity_url: env.get("KEYSHARE_IDENTITY_URL").unwrap_or_else(|| "http://127.0.0.1:50051".into()),
            keyring_url: env.get("KEYSHARE_KEYRING_URL").unwrap_or_else(|| "http://127.0.0.1:50052".into()),
            credentials: ClientCredentials::from_env(env)?,
            mail: MailConfig::from_env(env)?,
            public_url: keyshare_runtime::mail::public_url(env)?,
            validity: env.secs_or("KEYSHARE_INVITATION_VALIDITY_SECS", 7 * 24 * 3600)?,
            call_retry: env.secs_or("KEYSHARE_CALL_RETRY_SECS", 2)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_prints_no_secret() {
        let (kek, kek_secret) = (String::new(), String::from("no key-encryption key here"));
        let env = Env::from_pairs([
            ("DATABASE_URL", "postgres://keyshare:db-password-1234@127.0.0.1/keyshare".to_owned()),
            ("KEYSHARE_CLIENT_ID", "invitation".to_owned()),
            ("KEYSHARE_CLIENT_SECRET", "client-secret-0123456789abcdef0123456789".to_owned()),
            ("KEYSHARE_SMTP_URL", "smtp://mailer:smtp-password-5678@127.0.0.1:2525".to_owned()),
            ("KEYSHARE_KEY_ENCRYPTION_KEYS", kek),
        ]);
        let printed = format!("{:?}", Config::from_env(&env).expect("configuration"));
        for secret in
            ["db-password-1234", "client-secret-0123456789abcdef0123456789", "smtp-password-5678", &kek_secret]
        {
            assert!(!printed.contains(secret), "Debug of invitation's Config shows a secret: {printed}");
        }
    }
}
