//! Configuration from environment variables, checked once at start.
//!
//! Every accessor names the variable in its error, so a misconfigured deployment stops with a
//! message an operator can act on.

use std::net::SocketAddr;
use std::time::Duration;

pub use crate::env::{ConfigError, Env};

/// Settings every service shares.
#[derive(Clone)]
pub struct CommonConfig {
    /// Service name, used in traces, metrics and logs.
    pub service: &'static str,
    /// gRPC listen address (`KEYSHARE_LISTEN_ADDR`).
    pub listen_addr: SocketAddr,
    /// Prometheus `/metrics` listen address (`KEYSHARE_METRICS_ADDR`).
    pub metrics_addr: SocketAddr,
    /// PostgreSQL connection string (`DATABASE_URL`).
    pub database_url: String,
    /// Connections in the pool (`KEYSHARE_DB_POOL_SIZE`).
    pub db_pool_size: usize,
    /// Longest a single call may run (`KEYSHARE_CALL_TIMEOUT_SECS`).
    pub call_timeout: Duration,
    /// Calls served at once before new ones wait (`KEYSHARE_MAX_CONCURRENT_CALLS`).
    pub max_concurrent_calls: usize,
    /// Longest a graceful shutdown waits for in-flight calls (`KEYSHARE_SHUTDOWN_GRACE_SECS`).
    pub shutdown_grace: Duration,
    /// How long a stopping service goes on answering after it reports NOT_SERVING, before it
    /// drains (`KEYSHARE_DRAIN_DELAY_SECS`, default 5: Kubernetes endpoints and gateways' health
    /// checks take a few seconds to notice).
    pub drain_delay: Duration,
    /// Authenticates page tokens (`KEYSHARE_PAGE_TOKEN_KEY`), the same in every service.
    pub page_token_key: crate::page::TokenKey,
    /// TLS for the gRPC servers and `https://` peers (`KEYSHARE_TLS_*`); plaintext when unset.
    pub tls: crate::tls::TlsSettings,
    /// A plaintext listener serving only `grpc.health.v1.Health` (`KEYSHARE_HEALTH_ADDR`), for
    /// probes that cannot speak TLS; none when unset.
    pub health_addr: Option<SocketAddr>,
}

impl std::fmt::Debug for CommonConfig {
    // The database URL may carry a password (in the user info or a parameter): never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommonConfig")
            .field("service", &self.service)
            .field("listen_addr", &self.listen_addr)
            .field("metrics_addr", &self.metrics_addr)
            .field("database_url", &"<redacted>")
            .field("db_pool_size", &self.db_pool_size)
            .field("call_timeout", &self.call_timeout)
            .field("max_concurrent_calls", &self.max_concurrent_calls)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("tls", &self.tls)
            .field("health_addr", &self.health_addr)
            .finish()
    }
}

impl CommonConfig {
    /// Reads the shared settings; `default_port` is the service's gRPC port.
    pub fn from_env(env: &Env, service: &'static str, default_port: u16) -> Result<Self, ConfigError> {
        let pool_size: usize = env.parse_or("KEYSHARE_DB_POOL_SIZE", 16)?;
        if pool_size == 0 {
            return Err(ConfigError::new("KEYSHARE_DB_POOL_SIZE", "must be at least 1"));
        }
        let max_calls: usize = env.parse_or("KEYSHARE_MAX_CONCURRENT_CALLS", 1024)?;
        if max_calls == 0 {
            return Err(ConfigError::new("KEYSHARE_MAX_CONCURRENT_CALLS", "must be at least 1"));
        }
        Ok(Self {
            service,
            listen_addr: env.addr_or("KEYSHARE_LISTEN_ADDR", &format!("0.0.0.0:{default_port}"))?,
            metrics_addr: env.addr_or("KEYSHARE_METRICS_ADDR", &format!("0.0.0.0:{}", default_port - 50051 + 9051))?,
            database_url: database_url(env)?,
            db_pool_size: pool_size,
            call_timeout: env.secs_or("KEYSHARE_CALL_TIMEOUT_SECS", 30)?,
            max_concurrent_calls: max_calls,
            shutdown_grace: env.secs_or("KEYSHARE_SHUTDOWN_GRACE_SECS", 30)?,
            drain_delay: Duration::from_secs_f64(drain_delay(env)?),
            page_token_key: crate::page::TokenKey::from_env(env)?,
            tls: tls_settings(env)?,
            health_addr: match env.get("KEYSHARE_HEALTH_ADDR") {
                Some(_) => Some(env.addr_or("KEYSHARE_HEALTH_ADDR", "")?),
                None => None,
            },
        })
    }
}

/// `DATABASE_URL`, with `KEYSHARE_DATABASE_CA` as its `sslrootcert` when it names none.
fn database_url(env: &Env) -> Result<String, ConfigError> {
    let url = env.required("DATABASE_URL")?;
    Ok(match env.get("KEYSHARE_DATABASE_CA") {
        Some(ca) => crate::pg_tls::with_root_cert(&url, ca.trim()),
        None => url,
    })
}

/// The TLS settings, with their files read once now, so a missing or bad file stops the
/// service at start, naming the variable.
fn tls_settings(env: &Env) -> Result<crate::tls::TlsSettings, ConfigError> {
    let tls = crate::tls::TlsSettings::from_env(env)?;
    tls.server_config()?;
    if tls.ca.is_some() || tls.identity.is_some() {
        tls.client_config()?;
    }
    Ok(tls)
}

/// `KEYSHARE_DRAIN_DELAY_SECS`: seconds (fractions allowed, 0 for none), at most an hour.
fn drain_delay(env: &Env) -> Result<f64, ConfigError> {
    const VAR: &str = "KEYSHARE_DRAIN_DELAY_SECS";
    let secs: f64 = env.parse_or(VAR, 5.0)?;
    if !(0.0..=3600.0).contains(&secs) {
        return Err(ConfigError::new(VAR, "must be between 0 and 3600 seconds"));
    }
    Ok(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_bad_values_name_the_variable() {
        let env = Env::from_pairs([("KEYSHARE_LISTEN_ADDR", "not-an-address")]);
        let err = CommonConfig::from_env(&env, "test", 50051).unwrap_err();
        assert_eq!(err.var, "KEYSHARE_LISTEN_ADDR");

        let env = Env::from_pairs::<_, String, String>([]);
        let err = CommonConfig::from_env(&env, "test", 50051).unwrap_err();
        assert_eq!(err.var, "DATABASE_URL");
        assert!(err.to_string().contains("DATABASE_URL"));

        let env = Env::from_pairs([("DATABASE_URL", "postgres://x"), ("KEYSHARE_CALL_TIMEOUT_SECS", "0")]);
        let err = CommonConfig::from_env(&env, "test", 50051).unwrap_err();
        assert_eq!(err.var, "KEYSHARE_CALL_TIMEOUT_SECS");
    }

    #[test]
    fn debug_hides_the_database_password() {
        let env = Env::from_pairs([("DATABASE_URL", "postgres://keyshare:hunter2-db-secret@db/keyshare")]);
        let printed = format!("{:?}", CommonConfig::from_env(&env, "test", 50051).unwrap());
        assert!(!printed.contains("hunter2-db-secret") && printed.contains("<redacted>"), "{printed}");
    }

    #[test]
    fn defaults_follow_the_service_port() {
        let env = Env::from_pairs([("DATABASE_URL", "postgres://x")]);
        let config = CommonConfig::from_env(&env, "test", 50053).unwrap();
        assert_eq!(config.listen_addr.port(), 50053);
        assert_eq!(config.metrics_addr.port(), 9053);
        assert_eq!(config.drain_delay, Duration::from_secs(5));
    }

    #[test]
    fn tls_settings_are_plaintext_unless_given() {
        let env = Env::from_pairs([("DATABASE_URL", "postgres://x")]);
        let config = CommonConfig::from_env(&env, "test", 50051).unwrap();
        assert!(!config.tls.serves_tls() && config.health_addr.is_none());
        assert_eq!(config.database_url, "postgres://x");

        let env = Env::from_pairs([
            ("DATABASE_URL", "postgres://db/k?sslmode=verify-full"),
            ("KEYSHARE_DATABASE_CA", "/ca/db.crt"),
            ("KEYSHARE_HEALTH_ADDR", "127.0.0.1:8081"),
        ]);
        let config = CommonConfig::from_env(&env, "test", 50051).unwrap();
        assert_eq!(config.database_url, "postgres://db/k?sslmode=verify-full&sslrootcert=/ca/db.crt");
        assert_eq!(config.health_addr, Some("127.0.0.1:8081".parse().unwrap()));

        let env = Env::from_pairs([("DATABASE_URL", "postgres://x"), ("KEYSHARE_HEALTH_ADDR", "port 8081")]);
        assert_eq!(CommonConfig::from_env(&env, "test", 50051).unwrap_err().var, "KEYSHARE_HEALTH_ADDR");
        let env = Env::from_pairs([("DATABASE_URL", "postgres://x"), ("KEYSHARE_TLS_CERT", "/nowhere/tls.crt")]);
        assert_eq!(CommonConfig::from_env(&env, "test", 50051).unwrap_err().var, "KEYSHARE_TLS_KEY");
        let env = Env::from_pairs([
            ("DATABASE_URL", "postgres://x"),
            ("KEYSHARE_TLS_CERT", "/nowhere/tls.crt"),
            ("KEYSHARE_TLS_KEY", "/nowhere/tls.key"),
        ]);
        assert_eq!(CommonConfig::from_env(&env, "test", 50051).unwrap_err().var, "KEYSHARE_TLS_CERT");
    }

    #[test]
    fn the_drain_delay_may_be_zero_but_not_negative() {
        let with = |value: &str| {
            let env = Env::from_pairs([("DATABASE_URL", "postgres://x"), ("KEYSHARE_DRAIN_DELAY_SECS", value)]);
            CommonConfig::from_env(&env, "test", 50051).map(|config| config.drain_delay)
        };
        assert_eq!(with("0").unwrap(), Duration::ZERO);
        assert_eq!(with("0.5").unwrap(), Duration::from_millis(500));
        for bad in ["-1", "NaN", "soon", "100000"] {
            assert_eq!(with(bad).unwrap_err().var, "KEYSHARE_DRAIN_DELAY_SECS", "{bad}");
        }
    }
}
