//! Identity's settings, read from the environment at start.

use std::time::Duration;

use keyshare_runtime::auth::{Scope, Scopes, TokenPolicy};
use keyshare_runtime::config::{CommonConfig, ConfigError, Env};
use keyshare_runtime::crypto::Sealer;
use keyshare_runtime::mail::MailConfig;

/// Default gRPC port.
pub const PORT: u16 = 50051;

#[derive(Clone)]
pub struct Config {
    pub common: CommonConfig,
    pub tokens: TokenPolicy,
    /// Lifetime of access tokens (`KEYSHARE_ACCESS_TOKEN_TTL_SECS`, default 900).
    pub access_token_ttl: Duration,
    /// Lifetime of an unused refresh token (`KEYSHARE_REFRESH_TOKEN_TTL_SECS`, default 30 days).
    pub refresh_token_ttl: Duration,
    /// Whether login needs a verified email (`KEYSHARE_REQUIRE_VERIFIED_EMAIL`, default true).
    pub require_verified_email: bool,
    /// Base of links in emails (`KEYSHARE_PUBLIC_URL`); none: mails carry tokens, no links.
    pub public_url: Option<String>,
    /// Seals token signing keys at rest (`KEYSHARE_KEY_ENCRYPTION_KEYS`).
    pub sealer: Sealer,
    /// Keyshare's own services, their client secrets (`KEYSHARE_INTERNAL_CLIENTS`,
    /// `name:secret,…`) and the scopes each holds (`KEYSHARE_INTERNAL_CLIENT_SCOPES`).
    pub internal_clients: Vec<InternalClient>,
    pub mail: MailConfig,
    /// Login attempts for one email within `login_window` before it is locked out for
    /// `login_lockout` (`KEYSHARE_LOGIN_MAX_FAILURES`); a successful login clears the count.
    pub login_max_failures: i32,
    pub login_window: Duration,
    pub login_lockout: Duration,
    /// Where keyring is (`KEYSHARE_KEYRING_URL`): told when someone leaves an organization.
    pub keyring_url: String,
    /// Failed login attempts from one client address within `login_window` before it is
    /// locked out (`KEYSHARE_LOGIN_MAX_FAILURES_PER_ADDRESS`).
    pub login_max_failures_per_address: i32,
    /// Whether the client address is the last `x-forwarded-for` entry instead of the peer
    /// (`KEYSHARE_LOGIN_TRUST_FORWARDED_FOR`): only behind a proxy that appends it.
    pub trust_forwarded_for: bool,
    /// Passwords hashed at once (`KEYSHARE_PASSWORD_HASH_THREADS`, default half the cores).
    pub password_hash_threads: usize,
    /// Password checks waiting beyond those before new ones are answered UNAVAILABLE
    /// (`KEYSHARE_PASSWORD_HASH_QUEUE`).
    pub password_hash_queue: usize,
    /// Verification and reset mails to one address per `account_mail_window`
    /// (`KEYSHARE_ACCOUNT_MAILS_PER_ADDRESS`, `KEYSHARE_ACCOUNT_MAIL_WINDOW_SECS`).
    pub account_mails_per_address: i32,
    pub account_mail_window: Duration,
}

impl std::fmt::Debug for Config {
    // Internal clients' secrets are never printed; the other fields print their own redactions.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let internal_clients: Vec<String> =
            self.internal_clients.iter().map(|c| format!("{}:<redacted> {:?}", c.name, c.scopes)).collect();
        f.debug_struct("Config")
            .field("common", &self.common)
            .field("tokens", &self.tokens)
            .field("access_token_ttl", &self.access_token_ttl)
            .field("refresh_token_ttl", &self.refresh_token_ttl)
            .field("require_verified_email", &self.require_verified_email)
            .field("public_url", &self.public_url)
            .field("sealer", &self.sealer)
            .field("internal_clients", &internal_clients)
            .field("mail", &self.mail)
            .field("login_max_failures", &self.login_max_failures)
            .field("login_window", &self.login_window)
            .field("login_lockout", &self.login_lockout)
            .field("login_max_failures_per_address", &self.login_max_failures_per_address)
            .field("trust_forwarded_for", &self.trust_forwarded_for)
            .field("password_hash_threads", &self.password_hash_threads)
            .field("password_hash_queue", &self.password_hash_queue)
            .field("account_mails_per_address", &self.account_mails_per_address)
            .field("account_mail_window", &self.account_mail_window)
            .field("keyring_url", &self.keyring_url)
            .finish()
    }
}

impl Config {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let secrets = match env.get("KEYSHARE_INTERNAL_CLIENTS") {
            None => Vec::new(),
            Some(spec) => {
                parse_internal_clients(&spec).map_err(|reason| ConfigError::new("KEYSHARE_INTERNAL_CLIENTS", reason))?
            }
        };
        let scopes = parse_client_scopes(&env.get("KEYSHARE_INTERNAL_CLIENT_SCOPES").unwrap_or_default())
            .map_err(|reason| ConfigError::new("KEYSHARE_INTERNAL_CLIENT_SCOPES", reason))?;
        let internal_clients = internal_clients(secrets, &scopes)?;
        Ok(Self {
            common: CommonConfig::from_env(env, "identity", PORT)?,
            tokens: TokenPolicy::from_env(env),
            access_token_ttl: env.secs_or("KEYSHARE_ACCESS_TOKEN_TTL_SECS", 900)?,
            refresh_token_ttl: env.secs_or("KEYSHARE_REFRESH_TOKEN_TTL_SECS", 30 * 24 * 3600)?,
            require_verified_email: env.bool_or("KEYSHARE_REQUIRE_VERIFIED_EMAIL", true)?,
            public_url: keyshare_runtime::mail::public_url(env)?,
            sealer: Sealer::from_env(env)?,
            internal_clients,
            mail: MailConfig::from_env(env)?,
            login_max_failures: positive(env, "KEYSHARE_LOGIN_MAX_FAILURES", 5)?,
            login_window: env.secs_or("KEYSHARE_LOGIN_WINDOW_SECS", 900)?,
            login_lockout: env.secs_or("KEYSHARE_LOGIN_LOCKOUT_SECS", 900)?,
            keyring_url: env.get("KEYSHARE_KEYRING_URL").unwrap_or_else(|| "http://127.0.0.1:50052".into()),
            login_max_failures_per_address: positive(env, "KEYSHARE_LOGIN_MAX_FAILURES_PER_ADDRESS", 100)?,
            trust_forwarded_for: env.bool_or("KEYSHARE_LOGIN_TRUST_FORWARDED_FOR", false)?,
            password_hash_threads: positive(env, "KEYSHARE_PASSWORD_HASH_THREADS", default_hash_threads())?,
            password_hash_queue: env.parse_or("KEYSHARE_PASSWORD_HASH_QUEUE", 32)?,
            account_mails_per_address: positive(env, "KEYSHARE_ACCOUNT_MAILS_PER_ADDRESS", 5)?,
            account_mail_window: env.secs_or("KEYSHARE_ACCOUNT_MAIL_WINDOW_SECS", 3600)?,
        })
    }
}

/// Half the cores, at least one: the other half keeps answering every other call.
fn default_hash_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().div_ceil(2))
}

fn positive<T>(env: &Env, var: &str, default: T) -> Result<T, ConfigError>
where
    T: std::str::FromStr + PartialOrd + Default,
    T::Err: std::fmt::Display,
{
    let value = env.parse_or(var, default)?;
    if value <= T::default() {
        return Err(ConfigError::new(var, "must be at least 1"));
    }
    Ok(value)
}

/// One of Keyshare's own services, as identity knows it.
#[derive(Clone)]
pub struct InternalClient {
    pub name: String,
    pub secret: String,
    pub scopes: Scopes,
}

/// What each of Keyshare's services needs from the others, and nothing more.
pub fn default_scopes(name: &str) -> Option<Scopes> {
    use Scope::*;
    let scopes: &[Scope] = match name {
        // Follows the key feed; verifies callers' tokens.
        "authorizer" => &[KeysWatch, SessionsWatch],
        // Finds invitees, reads who may invite, grants and removes what invitations give.
        "invitation" => &[SessionsWatch, AccountsLookup, OrganizationsRead, MembershipsRead, MembershipsWrite],
        // Reads organization roles; counts, revokes and ends invitations.
        "keyring" => &[SessionsWatch, OrganizationsRead, InvitationsRead, InvitationsRevoke],
        _ => return None,
    };
    Some(scopes.iter().copied().collect())
}

/// `name=scope scope;name=scope …`: replaces a named client's default scopes.
fn parse_client_scopes(spec: &str) -> Result<Vec<(String, Scopes)>, String> {
    spec.split(';')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            let (name, list) = entry.split_once('=').ok_or("entries must look like name=scope scope")?;
            let scopes = list
                .split_ascii_whitespace()
                .map(|scope| {
                    Scope::parse(scope).ok_or_else(|| {
                        let known: Vec<&str> = Scope::ALL.iter().map(|s| s.as_str()).collect();
                        format!("unknown scope {scope:?} for {}; known scopes: {}", name.trim(), known.join(", "))
                    })
                })
                .collect::<Result<Scopes, String>>()?;
            Ok((name.trim().to_owned(), scopes))
        })
        .collect()
}

fn internal_clients(
    secrets: Vec<(String, String)>,
    scopes: &[(String, Scopes)],
) -> Result<Vec<InternalClient>, ConfigError> {
    if let Some((name, _)) = scopes.iter().find(|(name, _)| !secrets.iter().any(|(n, _)| n == name)) {
        return Err(ConfigError::new(
            "KEYSHARE_INTERNAL_CLIENT_SCOPES",
            format!("{name} is not a client of KEYSHARE_INTERNAL_CLIENTS"),
        ));
    }
    secrets
        .into_iter()
        .map(|(name, secret)| {
            let configured = scopes.iter().find(|(n, _)| *n == name).map(|(_, s)| *s);
            let scopes = configured.or_else(|| default_scopes(&name)).ok_or_else(|| {
                ConfigError::new(
                    "KEYSHARE_INTERNAL_CLIENT_SCOPES",
                    format!("internal client {name} has no default scopes; name them here"),
                )
            })?;
            Ok(InternalClient { name, secret, scopes })
        })
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn clients(secrets: &str, scopes: &str) -> Result<Vec<InternalClient>, ConfigError> {
        let secrets = parse_internal_clients(secrets).unwrap();
        internal_clients(secrets, &parse_client_scopes(scopes).unwrap())
    }

    #[test]
    fn each_service_gets_only_its_own_scopes_by_default() {
        let all = clients(&format!("authorizer:{SECRET},invitation:{SECRET},keyring:{SECRET}"), "").unwrap();
        let of = |name: &str| all.iter().find(|c| c.name == name).unwrap().scopes;
        assert!(of("authorizer").contains(Scope::KeysWatch));
        assert!(!of("authorizer").contains(Scope::MembershipsWrite));
        assert!(!of("authorizer").contains(Scope::OrganizationsRead));
        assert!(of("invitation").contains(Scope::MembershipsWrite));
        assert!(!of("invitation").contains(Scope::KeysWatch));
        assert!(of("keyring").contains(Scope::InvitationsRevoke));
        assert!(!of("keyring").contains(Scope::MembershipsWrite));
        assert!(!of("keyring").contains(Scope::MembershipsEnd));
    }

    #[test]
    fn configured_scopes_replace_the_defaults_and_are_checked() {
        let all = clients(&format!("authorizer:{SECRET},watcher:{SECRET}"), "watcher=keys.watch; authorizer=").unwrap();
        assert_eq!(all[0].scopes, Scopes::NONE);
        assert_eq!(all[1].scopes, [Scope::KeysWatch].into_iter().collect());
        assert!(parse_client_scopes("watcher=keys.watch admin").unwrap_err().contains("admin"));
        let unknown = clients(&format!("watcher:{SECRET}"), "").err().unwrap();
        assert!(unknown.to_string().contains("KEYSHARE_INTERNAL_CLIENT_SCOPES"), "{unknown}");
        let stray = clients(&format!("keyring:{SECRET}"), "ghost=keys.watch").err().unwrap();
        assert!(stray.to_string().contains("ghost"), "{stray}");
    }
}
