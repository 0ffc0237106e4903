//! The authorizer's vocabulary, shared by every other module and depending on none of them:
//! what a check is asked and answers ([`CheckInput`], [`Decision`], [`Outcome`]), the names it
//! speaks of ([`KeyName`]), and how caller-controlled text is made safe to count and keep
//! ([`method_label`], [`log_path`]) and stored ([`environment_number`]), and the buckets usage
//! is counted in ([`Granularity`]).

use std::net::IpAddr;

use chrono::{DateTime, TimeDelta, Utc};
use keyshare_runtime::credential::Environment;
use keyshare_runtime::error::InvalidInput;
use uuid::Uuid;

/// Why a check passed or failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    Valid,
    Malformed,
    NotFound,
    Expired,
    Disabled,
    WrongEnvironment,
    MethodNotAllowed,
    SourceNotAllowed,
    RateLimited,
    QuotaExceeded,
}

impl Outcome {
    pub const ALL: [Outcome; 10] = [
        Outcome::Valid,
        Outcome::Malformed,
        Outcome::NotFound,
        Outcome::Expired,
        Outcome::Disabled,
        Outcome::WrongEnvironment,
        Outcome::MethodNotAllowed,
        Outcome::SourceNotAllowed,
        Outcome::RateLimited,
        Outcome::QuotaExceeded,
    ];

    /// Position in [`Outcome::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The outcome stored as `number` (see [`Outcome::number`]).
    pub fn from_number(number: i16) -> Option<Outcome> {
        Outcome::ALL.into_iter().find(|outcome| outcome.number() == number)
    }

    /// The HTTP status a gateway answers with.
    pub fn http_status(self) -> i32 {
        match self {
            Outcome::Valid => 200,
            Outcome::Malformed | Outcome::NotFound | Outcome::Expired | Outcome::WrongEnvironment => 401,
            Outcome::Disabled | Outcome::MethodNotAllowed | Outcome::SourceNotAllowed => 403,
            Outcome::RateLimited | Outcome::QuotaExceeded => 429,
        }
    }

    /// The `keyshare.authorizer.v1.Outcome` number, as stored in usage tables.
    pub fn number(self) -> i16 {
        match self {
            Outcome::Valid => 1,
            Outcome::Malformed => 2,
            Outcome::NotFound => 3,
            Outcome::Expired => 4,
            Outcome::Disabled => 5,
            Outcome::WrongEnvironment => 6,
            Outcome::MethodNotAllowed => 7,
            Outcome::SourceNotAllowed => 8,
            Outcome::RateLimited => 9,
            Outcome::QuotaExceeded => 10,
        }
    }

    /// Lowercase name, for metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Valid => "valid",
            Outcome::Malformed => "malformed",
            Outcome::NotFound => "not_found",
            Outcome::Expired => "expired",
            Outcome::Disabled => "disabled",
            Outcome::WrongEnvironment => "wrong_environment",
            Outcome::MethodNotAllowed => "method_not_allowed",
            Outcome::SourceNotAllowed => "source_not_allowed",
            Outcome::RateLimited => "rate_limited",
            Outcome::QuotaExceeded => "quota_exceeded",
        }
    }
}

/// What the gateway asks about.
#[derive(Clone, Copy, Debug)]
pub struct CheckInput<'a> {
    pub credential: &'a str,
    /// `projects/{project}` or empty for any.
    pub project: &'a str,
    pub method: &'a str,
    pub client_ip: Option<IpAddr>,
    /// The environment the gateway serves, if it says.
    pub environment: Option<Environment>,
}

/// A key by its identifiers; displays as `projects/{project}/keys/{key}`.
pub use keyshare_runtime::resource::KeyName;

/// The answer, with what is known of the credential.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub outcome: Outcome,
    pub key: Option<KeyName>,
    pub environment: Option<Environment>,
    /// With a rate or quota refusal: seconds until a retry can succeed.
    pub retry_after: i64,
}

/// `projects/{project}/keys/{key}`.
pub fn parse_key(raw: &str, field: &str) -> Result<KeyName, InvalidInput> {
    KeyName::parse(raw, field)
}

/// `projects/{project}`.
pub fn parse_project(raw: &str, field: &str) -> Result<Uuid, InvalidInput> {
    keyshare_runtime::resource::ProjectName::parse(raw, field).map(|name| name.0)
}

/// Longest path kept in a call log, in bytes.
pub const MAX_PATH: usize = 1024;

/// The method as counted: an upper-case standard method, or `OTHER`, so a caller cannot grow
/// the counters with made-up methods.
pub fn method_label(method: &str) -> &'static str {
    METHOD_LABELS.iter().find(|label| label.eq_ignore_ascii_case(method)).copied().unwrap_or("OTHER")
}

/// Every method label: the standard HTTP methods, then `OTHER` for any other.
pub const METHOD_LABELS: [&str; 10] =
    ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE", "OTHER"];

/// Makes a request path fit for a call log: no query string or fragment, at most [`MAX_PATH`]
/// bytes, in an allocation of about its own size. A path that was cut is copied out, so the
/// caller's (possibly huge) buffer is freed rather than kept behind a short string.
pub fn log_path(mut path: String) -> String {
    if let Some(end) = path.find(['?', '#']) {
        path.truncate(end);
    }
    if path.len() > MAX_PATH {
        let mut end = MAX_PATH;
        while !path.is_char_boundary(end) {
            end -= 1;
        }
        path.truncate(end);
    }
    if path.capacity() > path.len() + PATH_SLACK {
        path = path.as_str().to_owned();
    }
    path
}

/// Spare capacity a kept path may have before it is copied into a tight allocation.
const PATH_SLACK: usize = 64;

/// The `keyshare.authorizer.v1.Environment` number, as stored.
pub fn environment_number(environment: Environment) -> i16 {
    // 1 or 2: always fits.
    environment.number() as i16
}

/// `None` for a number no version of the writer stores; such rows are skipped.
pub fn environment_from_number(number: i16) -> Option<Environment> {
    Environment::from_number(i32::from(number))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_index_their_counters_and_round_trip_their_numbers() {
        for (position, outcome) in Outcome::ALL.iter().enumerate() {
            assert_eq!(outcome.index(), position, "{outcome:?}");
            assert_eq!(Outcome::from_number(outcome.number()), Some(*outcome));
        }
        assert_eq!(Outcome::from_number(0), None);
    }

    #[test]
    fn methods_and_paths_are_bounded() {
        assert_eq!(method_label("get"), "GET");
        assert_eq!(method_label("BREW"), "OTHER");
        assert_eq!(log_path("/v1/things?api_key=secret#x".into()), "/v1/things");
        let long = format!("/{}", "é".repeat(MAX_PATH));
        let kept = log_path(long);
        assert!(kept.len() <= MAX_PATH && kept.is_char_boundary(kept.len()));
        // A cut path does not keep the caller's allocation alive.
        let huge = format!("/{}", "a".repeat(60_000));
        let kept = log_path(huge);
        assert_eq!(kept.len(), MAX_PATH);
        assert!(kept.capacity() <= MAX_PATH + PATH_SLACK, "{}", kept.capacity());
        let with_query = log_path(format!("/v1/things?{}", "q".repeat(60_000)));
        assert_eq!(with_query, "/v1/things");
        assert!(with_query.capacity() <= with_query.len() + PATH_SLACK, "{}", with_query.capacity());
    }
}

/// The width of a series' time buckets, aligned to UTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Granularity {
    Minute,
    Hour,
    Day,
}

impl Granularity {
    /// The width of one bucket. UTC days have no daylight saving: every one is 24 hours.
    pub fn step(self) -> TimeDelta {
        match self {
            Granularity::Minute => TimeDelta::minutes(1),
            Granularity::Hour => TimeDelta::hours(1),
            Granularity::Day => TimeDelta::days(1),
        }
    }

    /// How far back a series reaches when the caller gives no start.
    pub fn default_span(self) -> TimeDelta {
        match self {
            Granularity::Minute => TimeDelta::hours(1),
            Granularity::Hour => TimeDelta::days(1),
            Granularity::Day => TimeDelta::days(30),
        }
    }

    /// The table its counts are kept in (`authorizer` schema), and that table's time column.
    pub fn table(self) -> (&'static str, &'static str) {
        match self {
            Granularity::Minute => ("usage_minutes", "minute"),
            Granularity::Hour => ("usage_hours", "hour"),
            Granularity::Day => ("usage_days", "day"),
        }
    }

    /// The `date_trunc` field name.
    pub fn sql_unit(self) -> &'static str {
        match self {
            Granularity::Minute => "minute",
            Granularity::Hour => "hour",
            Granularity::Day => "day",
        }
    }

    /// Start of the bucket holding `at`.
    pub fn floor(self, at: DateTime<Utc>) -> DateTime<Utc> {
        let step = self.step().num_microseconds().unwrap_or(i64::MAX);
        let micros = at.timestamp_micros();
        DateTime::from_timestamp_micros(micros - micros.rem_euclid(step)).unwrap_or(at)
    }
}
