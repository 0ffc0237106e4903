//! Typed settings: what a test sets on a service, written as values rather than as environment
//! strings. Each renders to the variable an operator would set, and the service parses it with
//! its own `Config::from_env`, so a test goes through the same reading and validation as a
//! deployment. This module is the one place in the tests that spells the variables' names.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use keyshare_runtime::config::Env;
use keyshare_runtime::testkit::TestPki;
use keyshare_runtime::tls::CertFiles;

/// One setting of a Keyshare service. Durations are rendered in the unit the variable takes
/// (whole seconds for `…_SECS`, milliseconds for `…_MILLIS`).
#[derive(Clone, Debug, PartialEq)]
pub enum Setting {
    DatabaseUrl(String),
    /// The gRPC listener (the check port, for the authorizer).
    Listen(SocketAddr),
    Metrics(SocketAddr),
    /// The authorizer's second listener, UsageService.
    Management(SocketAddr),
    /// A separate plaintext health listener, for a service serving TLS.
    Health(SocketAddr),
    /// `id:base64` pairs, the first one sealing new secrets.
    KeyEncryptionKeys(String),
    SmtpUrl(String),
    /// Mail written as files into this directory rather than sent.
    MailSpool(PathBuf),
    MailPoll(Duration),
    MailRetryMax(Duration),
    MailLease(Duration),
    PoolSize(usize),
    DrainDelay(Duration),
    ShutdownGrace(Duration),
    IdentityUrl(String),
    KeyringUrl(String),
    InvitationUrl(String),
    /// identity: the internal clients it knows, as (client id, secret).
    InternalClients(Vec<(String, String)>),
    /// identity: the scopes of the internal clients that may not do everything, as
    /// (client id, space-separated scopes).
    InternalClientScopes(Vec<(String, String)>),
    /// The internal client a service authenticates to identity as.
    Client {
        id: String,
        secret: String,
    },
    /// identity: whether an account must verify its address before it logs in.
    RequireVerifiedEmail(bool),
    PasswordHashQueue(usize),
    LoginMaxFailuresPerAddress(u32),
    LoginTrustForwardedFor(bool),
    /// invitation: how long a failed call to a peer waits before its retry.
    CallRetry(Duration),
    /// authorizer: how often the usage writer writes what it holds.
    UsageFlush(Duration),
    UsageBufferBytes(usize),
    RedisUrl(String),
    TlsCert(PathBuf),
    TlsKey(PathBuf),
    TlsClientCa(PathBuf),
    TlsCa(PathBuf),
    DatabaseCa(PathBuf),
    /// The log filter (`RUST_LOG`), for a service run as a process.
    Log(String),
    /// Logs as JSON lines rather than text.
    JsonLogs,
    /// Where traces are exported (OTLP over gRPC).
    TraceEndpoint(String),
    /// How long the trace exporter batches spans before it sends them.
    TraceBatchDelay(Duration),
}

impl Setting {
    /// TLS on a service's listener with `files` (a certificate of `pki`), and on its calls to
    /// the others (trusting `pki`'s CA); with `require_client_certs`, mutual TLS.
    pub fn tls(pki: &TestPki, files: &CertFiles, require_client_certs: bool) -> Vec<Setting> {
        let mut settings = vec![
            Setting::TlsCert(files.cert.clone()),
            Setting::TlsKey(files.key.clone()),
            Setting::TlsCa(pki.ca_path()),
        ];
        if require_client_certs {
            settings.push(Setting::TlsClientCa(pki.ca_path()));
        }
        settings
    }
}

fn secs(duration: &Duration) -> String {
    duration.as_secs().to_string()
}

fn list(pairs: &[(String, String)], between: char) -> String {
    pairs.iter().map(|(k, v)| format!("{k}{between}{v}")).collect::<Vec<_>>().join(",")
}

impl Setting {
    /// The environment variables this setting stands for, with their values.
    pub fn render(&self) -> Vec<(&'static str, String)> {
        use Setting::*;
        let one = |name: &'static str, value: String| vec![(name, value)];
        match self {
            DatabaseUrl(url) => one("DATABASE_URL", url.clone()),
            Listen(addr) => one("KEYSHARE_LISTEN_ADDR", addr.to_string()),
            Metrics(addr) => one("KEYSHARE_METRICS_ADDR", addr.to_string()),
            Management(addr) => one("KEYSHARE_MANAGEMENT_ADDR", addr.to_string()),
            Health(addr) => one("KEYSHARE_HEALTH_ADDR", addr.to_string()),
            KeyEncryptionKeys(keys) => one("KEYSHARE_KEY_ENCRYPTION_KEYS", keys.clone()),
            SmtpUrl(url) => one("KEYSHARE_SMTP_URL", url.clone()),
            MailSpool(dir) => one("KEYSHARE_MAIL_SPOOL_DIR", dir.display().to_string()),
            MailPoll(every) => one("KEYSHARE_MAIL_POLL_SECS", secs(every)),
            MailRetryMax(at_most) => one("KEYSHARE_MAIL_RETRY_MAX_SECS", secs(at_most)),
            MailLease(lease) => one("KEYSHARE_MAIL_LEASE_SECS", secs(lease)),
            PoolSize(size) => one("KEYSHARE_DB_POOL_SIZE", size.to_string()),
            DrainDelay(delay) => one("KEYSHARE_DRAIN_DELAY_SECS", delay.as_secs_f64().to_string()),
            ShutdownGrace(grace) => one("KEYSHARE_SHUTDOWN_GRACE_SECS", secs(grace)),
            IdentityUrl(url) => one("KEYSHARE_IDENTITY_URL", url.clone()),
            KeyringUrl(url) => one("KEYSHARE_KEYRING_URL", url.clone()),
            InvitationUrl(url) => one("KEYSHARE_INVITATION_URL", url.clone()),
            InternalClients(clients) => one("KEYSHARE_INTERNAL_CLIENTS", list(clients, ':')),
            InternalClientScopes(scopes) => one("KEYSHARE_INTERNAL_CLIENT_SCOPES", list(scopes, '=')),
            Client { id, secret } => {
                vec![("KEYSHARE_CLIENT_ID", id.clone()), ("KEYSHARE_CLIENT_SECRET", secret.clone())]
            }
            RequireVerifiedEmail(required) => one("KEYSHARE_REQUIRE_VERIFIED_EMAIL", required.to_string()),
            PasswordHashQueue(length) => one("KEYSHARE_PASSWORD_HASH_QUEUE", length.to_string()),
            LoginMaxFailuresPerAddress(count) => one("KEYSHARE_LOGIN_MAX_FAILURES_PER_ADDRESS", count.to_string()),
            LoginTrustForwardedFor(trusted) => one("KEYSHARE_LOGIN_TRUST_FORWARDED_FOR", trusted.to_string()),
            CallRetry(after) => one("KEYSHARE_CALL_RETRY_SECS", secs(after)),
            UsageFlush(every) => one("KEYSHARE_USAGE_FLUSH_MILLIS", every.as_millis().to_string()),
            UsageBufferBytes(bytes) => one("KEYSHARE_USAGE_BUFFER_BYTES", bytes.to_string()),
            RedisUrl(url) => one("KEYSHARE_REDIS_URL", url.clone()),
            TlsCert(path) => one("KEYSHARE_TLS_CERT", path.display().to_string()),
            TlsKey(path) => one("KEYSHARE_TLS_KEY", path.display().to_string()),
            TlsClientCa(path) => one("KEYSHARE_TLS_CLIENT_CA", path.display().to_string()),
            TlsCa(path) => one("KEYSHARE_TLS_CA", path.display().to_string()),
            DatabaseCa(path) => one("KEYSHARE_DATABASE_CA", path.display().to_string()),
            Log(filter) => one("RUST_LOG", filter.clone()),
            JsonLogs => one("KEYSHARE_LOG_FORMAT", "json".into()),
            TraceEndpoint(url) => one("OTEL_EXPORTER_OTLP_ENDPOINT", url.clone()),
            TraceBatchDelay(delay) => one("OTEL_BSP_SCHEDULE_DELAY", delay.as_millis().to_string()),
        }
    }
}

/// A service's settings, in order: where two set the same variable, the later one wins.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Settings(Vec<Setting>);

impl Settings {
    pub fn new() -> Self {
        Self::default()
    }

    /// These settings with `setting` added last.
    #[must_use]
    pub fn with(mut self, setting: Setting) -> Self {
        self.0.push(setting);
        self
    }

    pub fn push(&mut self, setting: Setting) {
        self.0.push(setting);
    }

    /// Adds `more` after these settings, so theirs win.
    pub fn extend(&mut self, more: impl IntoIterator<Item = Setting>) {
        self.0.extend(more);
    }

    /// The environment variables, in order (a later duplicate wins, as with `Command::envs`).
    pub fn pairs(&self) -> Vec<(&'static str, String)> {
        self.0.iter().flat_map(Setting::render).collect()
    }

    /// The settings as the environment a service's `Config::from_env` reads.
    pub fn env(&self) -> Env {
        Env::from_pairs(self.pairs())
    }
}

impl FromIterator<Setting> for Settings {
    fn from_iter<I: IntoIterator<Item = Setting>>(settings: I) -> Self {
        Self(settings.into_iter().collect())
    }
}

impl IntoIterator for Settings {
    type Item = Setting;
    type IntoIter = std::vec::IntoIter<Setting>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<const N: usize> From<[Setting; N]> for Settings {
    fn from(settings: [Setting; N]) -> Self {
        Self(settings.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_later_setting_wins() {
        let settings = Settings::from([Setting::PoolSize(4), Setting::PoolSize(16)]);
        assert_eq!(settings.env().get("KEYSHARE_DB_POOL_SIZE").as_deref(), Some("16"));
    }

    #[test]
    fn settings_render_in_the_unit_their_variable_takes() {
        let settings = Settings::from([
            Setting::UsageFlush(Duration::from_millis(100)),
            Setting::MailPoll(Duration::from_secs(1)),
            Setting::DrainDelay(Duration::ZERO),
            Setting::Client { id: "keyring".into(), secret: "s".into() },
            Setting::InternalClients(vec![("a".into(), "x".into()), ("b".into(), "y".into())]),
        ]);
        let env = settings.env();
        assert_eq!(env.get("KEYSHARE_USAGE_FLUSH_MILLIS").as_deref(), Some("100"));
        assert_eq!(env.get("KEYSHARE_MAIL_POLL_SECS").as_deref(), Some("1"));
        assert_eq!(env.get("KEYSHARE_DRAIN_DELAY_SECS").as_deref(), Some("0"));
        assert_eq!(env.get("KEYSHARE_CLIENT_ID").as_deref(), Some("keyring"));
        assert_eq!(env.get("KEYSHARE_INTERNAL_CLIENTS").as_deref(), Some("a:x,b:y"));
    }
}
