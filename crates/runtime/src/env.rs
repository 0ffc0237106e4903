//! Reading settings: environment variables (or a map, in tests), and the error that names the
//! variable an operator has to fix. Every other module reads its settings through this one.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

/// A missing or malformed configuration value.
#[derive(Debug, thiserror::Error)]
#[error("configuration: {var}: {reason}")]
pub struct ConfigError {
    /// The environment variable at fault.
    pub var: String,
    /// What is wrong with it (never its value: it may be a secret).
    pub reason: String,
}

impl ConfigError {
    pub fn new(var: &str, reason: impl Into<String>) -> Self {
        Self { var: var.to_owned(), reason: reason.into() }
    }
}

/// Reads configuration from a source of variables: the process environment, or a map in tests.
#[derive(Clone, Debug, Default)]
pub struct Env {
    overrides: Option<std::collections::HashMap<String, String>>,
}

impl Env {
    /// The process environment.
    pub fn process() -> Self {
        Self { overrides: None }
    }

    /// A fixed set of variables, for tests and tools; the process environment is not read.
    pub fn from_pairs<I, K, V>(pairs: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        Self { overrides: Some(pairs.into_iter().map(|(k, v)| (k.into(), v.into())).collect()) }
    }

    /// The raw value, if set and not empty.
    pub fn get(&self, var: &str) -> Option<String> {
        let value = match &self.overrides {
            Some(map) => map.get(var).cloned(),
            None => std::env::var(var).ok(),
        };
        value.filter(|v| !v.trim().is_empty())
    }

    /// A value that must be set.
    pub fn required(&self, var: &str) -> Result<String, ConfigError> {
        self.get(var).ok_or_else(|| ConfigError::new(var, "is required but not set"))
    }

    /// A value parsed with `FromStr`, or `default` when unset.
    pub fn parse_or<T>(&self, var: &str, default: T) -> Result<T, ConfigError>
    where
        T: FromStr,
        T::Err: std::fmt::Display,
    {
        match self.get(var) {
            None => Ok(default),
            Some(raw) => {
                raw.trim().parse().map_err(|e: T::Err| ConfigError::new(var, format!("cannot be parsed: {e}")))
            }
        }
    }

    /// A socket address such as `0.0.0.0:50051`.
    pub fn addr_or(&self, var: &str, default: &str) -> Result<SocketAddr, ConfigError> {
        let raw = self.get(var).unwrap_or_else(|| default.to_owned());
        raw.trim().parse().map_err(|_| ConfigError::new(var, "must be an address such as 0.0.0.0:50051"))
    }

    /// A duration given in whole seconds; zero is refused.
    pub fn secs_or(&self, var: &str, default: u64) -> Result<Duration, ConfigError> {
        let secs: u64 = self.parse_or(var, default)?;
        if secs == 0 {
            return Err(ConfigError::new(var, "must be a positive number of seconds"));
        }
        Ok(Duration::from_secs(secs))
    }

    /// `true`/`false` (also `1`/`0`, `yes`/`no`).
    pub fn bool_or(&self, var: &str, default: bool) -> Result<bool, ConfigError> {
        match self.get(var).map(|v| v.trim().to_ascii_lowercase()) {
            None => Ok(default),
            Some(v) if matches!(v.as_str(), "true" | "1" | "yes") => Ok(true),
            Some(v) if matches!(v.as_str(), "false" | "0" | "no") => Ok(false),
            Some(_) => Err(ConfigError::new(var, "must be true or false")),
        }
    }
}
