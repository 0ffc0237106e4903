//! The read side of usage: time series of a key's or a project's calls, and a key's call log,
//! from what the usage writer ([`crate::usage`]) stored.
//!
//! Who may read what is keyring's roles matrix (PRODUCT §3), asked with the caller's own token
//! on every call ([`access`]); answers are not cached, so a member who is removed loses access
//! on the very next call. [`store`] holds every SQL statement. Plain Rust: the gRPC adapter is
//! [`crate::usage_grpc`].

pub mod access;
pub mod store;

use chrono::{DateTime, TimeDelta, Utc};
use deadpool_postgres::Pool;
use keyshare_runtime::clock::SharedClock;
use keyshare_runtime::credential::Environment;
use keyshare_runtime::error::InvalidInput;
use keyshare_runtime::page::{self, PageRequest};
use uuid::Uuid;

use crate::error::{Error, Result};
pub use crate::model::Granularity;
use crate::model::{KeyName, METHOD_LABELS, Outcome};
use access::{Access, ProjectStanding};

/// Most buckets one series may span (a day of minutes, 60 days of hours, about 4 years of days).
pub const MAX_BUCKETS: i64 = 1440;
/// Most points one series may hold. A key's series never reaches it (1440 buckets × 2
/// environments × 10 outcomes); a project's series per key can.
pub const MAX_POINTS: usize = 30_000;

/// The whole buckets a series covers: from `start` (inclusive) to `end` (exclusive), both on
/// bucket boundaries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buckets {
    pub granularity: Granularity,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

impl Buckets {
    /// The buckets overlapping `[start, end)`, with the defaults of an unset granularity (hour),
    /// end (now) and start (end minus the granularity's default span). At most [`MAX_BUCKETS`].
    pub fn parse(
        granularity: Option<Granularity>,
        start: Option<DateTime<Utc>>,
        end: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Result<Self, InvalidInput> {
        let granularity = granularity.unwrap_or(Granularity::Hour);
        let end = end.unwrap_or(now);
        let start = start.unwrap_or(end - granularity.default_span());
        if start >= end {
            return Err(InvalidInput::field("end_time", "must be after start_time (an unset end_time means now)"));
        }
        let first = granularity.floor(start);
        let after_last = granularity.floor(end - TimeDelta::microseconds(1)) + granularity.step();
        let count = (after_last - first).num_seconds() / granularity.step().num_seconds();
        if count > MAX_BUCKETS {
            return Err(InvalidInput::field(
                "start_time",
                format!(
                    "the range spans {count} {} buckets, more than {MAX_BUCKETS}; move start_time later or use a \
                     coarser granularity",
                    granularity.sql_unit()
                ),
            ));
        }
        Ok(Self { granularity, start: first, end: after_last })
    }
}

/// A method filter: empty means every method; otherwise one of the [`METHOD_LABELS`] counted
/// (see [`crate::model::method_label`]), in any case.
pub fn parse_method(raw: &str, field: &str) -> Result<Option<&'static str>, InvalidInput> {
    if raw.is_empty() {
        return Ok(None);
    }
    METHOD_LABELS
        .iter()
        .find(|method| method.eq_ignore_ascii_case(raw))
        .map(|method| Some(*method))
        .ok_or_else(|| InvalidInput::field(field, format!("must be empty or one of {}", METHOD_LABELS.join(", "))))
}

/// Which calls a series counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    pub environment: Option<Environment>,
    /// One of the counted method labels.
    pub method: Option<&'static str>,
    pub outcome: Option<Outcome>,
}

/// Calls in one bucket, environment and outcome (and key, in a project's series per key).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Point {
    pub start: DateTime<Utc>,
    pub key: Option<KeyName>,
    pub environment: Environment,
    pub outcome: Outcome,
    pub calls: i64,
}

/// A time series, with its totals.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Series {
    pub buckets: Buckets,
    /// Non-zero counts only, ordered by bucket, key, environment, outcome.
    pub points: Vec<Point>,
    /// Calls per outcome over the whole series, in outcome order, non-zero only.
    pub totals: Vec<(Outcome, i64)>,
    pub total_calls: i64,
}

impl Series {
    fn new(buckets: Buckets, points: Vec<Point>) -> Self {
        let totals: Vec<(Outcome, i64)> = Outcome::ALL
            .iter()
            .map(|outcome| (*outcome, points.iter().filter(|p| p.outcome == *outcome).map(|p| p.calls).sum()))
            .filter(|(_, calls)| *calls > 0)
            .collect();
        let total_calls = totals.iter().map(|(_, calls)| calls).sum();
        Self { buckets, points, totals, total_calls }
    }
}

/// One checked call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallLog {
    /// Its id in the log (ids grow in the order calls were written).
    pub id: i64,
    pub key: KeyName,
    pub at: DateTime<Utc>,
    pub environment: Environment,
    pub method: String,
    pub path: String,
    pub client_ip: Option<std::net::IpAddr>,
    pub outcome: Outcome,
    pub http_status: i16,
}

/// Which calls a call log lists.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogFilter {
    pub environment: Option<Environment>,
    pub outcome: Option<Outcome>,
}

/// One page of a listing.
#[derive(Clone, Debug)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_page_token: String,
}

/// The scope of a call-log page token: the key and the filters, so a token is not replayed
/// against another listing.
pub fn call_log_scope(key: KeyName, filter: LogFilter) -> String {
    format!(
        "callLogs:{key}:{}:{}",
        filter.environment.map_or("", |e| e.as_str()),
        filter.outcome.map_or("", |o| o.as_str())
    )
}

/// The use cases of the usage API.
pub struct Stats {
    pool: Pool,
    access: Access,
    clock: SharedClock,
}

impl std::fmt::Debug for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stats").finish_non_exhaustive()
    }
}

impl Stats {
    /// `keyring` is asked what callers may see, with their own tokens.
    pub fn new(pool: Pool, access: Access, clock: SharedClock) -> Self {
        Self { pool, access, clock }
    }

    /// Now, on the service clock (the default end of a series).
    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    /// A key's series. Visible to whoever may see the key, and (a deleted key's too) to
    /// project and organization owners.
    pub async fn key_usage(
        &self,
        caller_token: &str,
        key: KeyName,
        buckets: Buckets,
        filter: Filter,
    ) -> Result<Series> {
        if !self.access.may_read_key(caller_token, key).await? {
            return Err(Error::NotFound("key"));
        }
        self.series(store::Scope::Key(key), buckets, filter, false).await
    }

    /// A project's series, its keys together or each apart. Visible to project and
    /// organization owners; other project members are denied.
    pub async fn project_usage(
        &self,
        caller_token: &str,
        project: Uuid,
        buckets: Buckets,
        filter: Filter,
        per_key: bool,
    ) -> Result<Series> {
        match self.access.project_standing(caller_token, project).await? {
            ProjectStanding::Manager => {}
            ProjectStanding::Member => {
                return Err(Error::PermissionDenied("only project and organization owners see project usage"));
            }
            ProjectStanding::Stranger => return Err(Error::NotFound("project")),
        }
        self.series(store::Scope::Project(project), buckets, filter, per_key).await
    }

    async fn series(&self, scope: store::Scope, buckets: Buckets, filter: Filter, per_key: bool) -> Result<Series> {
        let client = self.pool.get().await?;
        let points = store::series(&client, scope, &buckets, &filter, per_key, MAX_POINTS + 1).await?;
        if points.len() > MAX_POINTS {
            return Err(InvalidInput::field(
                "start_time",
                format!(
                    "the series would hold more than {MAX_POINTS} points; shorten the range, use a coarser \
                     granularity or filter"
                ),
            )
            .into());
        }
        Ok(Series::new(buckets, points))
    }

    /// A key's call log, newest first. `page` must have been parsed with [`call_log_scope`].
    pub async fn call_logs(
        &self,
        caller_token: &str,
        key: KeyName,
        filter: LogFilter,
        page: PageRequest,
    ) -> Result<Page<CallLog>> {
        let after = page.after.as_deref().map(parse_cursor).transpose()?;
        if !self.access.may_read_key(caller_token, key).await? {
            return Err(Error::NotFound("key"));
        }
        let client = self.pool.get().await?;
        let mut items = store::call_logs(&client, key, &filter, after, page.size as i64 + 1).await?;
        let next_page_token =
            page::next_token(&mut items, page.size, &call_log_scope(key, filter), |log| cursor(log.at, log.id));
        Ok(Page { items, next_page_token })
    }
}

/// A call-log position: the time in microseconds (the precision PostgreSQL stores) and the id,
/// which orders calls of equal time.
fn cursor(at: DateTime<Utc>, id: i64) -> String {
    format!("{}_{id}", at.timestamp_micros())
}

fn parse_cursor(cursor: &str) -> Result<(DateTime<Utc>, i64), InvalidInput> {
    let bad = || InvalidInput::field("page_token", "is not a page token of this listing");
    let (micros, id) = cursor.split_once('_').ok_or_else(bad)?;
    let at = micros.parse().ok().and_then(DateTime::from_timestamp_micros).ok_or_else(bad)?;
    Ok((at, id.parse().map_err(|_| bad())?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn buckets_are_whole_and_aligned() {
        let now = at("2026-03-04T10:20:30Z");
        let b = Buckets::parse(
            Some(Granularity::Minute),
            Some(at("2026-03-04T10:00:30Z")),
            Some(at("2026-03-04T10:01:10Z")),
            now,
        )
        .unwrap();
        assert_eq!((b.start, b.end), (at("2026-03-04T10:00:00Z"), at("2026-03-04T10:02:00Z")));
        // An end on a boundary is exclusive.
        let b = Buckets::parse(
            Some(Granularity::Hour),
            Some(at("2026-03-04T08:00:00Z")),
            Some(at("2026-03-04T10:00:00Z")),
            now,
        )
        .unwrap();
        assert_eq!((b.start, b.end), (at("2026-03-04T08:00:00Z"), at("2026-03-04T10:00:00Z")));
        // Defaults: an hour of minutes, a day of hours, 30 days of days, ending now.
        let b = Buckets::parse(None, None, None, now).unwrap();
        assert_eq!(
            (b.granularity, b.start, b.end),
            (Granularity::Hour, at("2026-03-03T10:00:00Z"), at("2026-03-04T11:00:00Z"))
        );
        let b = Buckets::parse(Some(Granularity::Day), None, None, now).unwrap();
        assert_eq!((b.start, b.end), (at("2026-02-02T00:00:00Z"), at("2026-03-05T00:00:00Z")));
    }

    #[test]
    fn bucket_limits() {
        let now = at("2026-03-04T10:20:30Z");
        let fields =
            |r: Result<Buckets, InvalidInput>| r.unwrap_err().0.into_iter().map(|v| v.field).collect::<Vec<_>>();
        assert_eq!(fields(Buckets::parse(None, Some(now), Some(now), now)), ["end_time"]);
        assert_eq!(fields(Buckets::parse(None, Some(now), None, now - TimeDelta::hours(1))), ["end_time"]);
        let day_of_minutes = Buckets::parse(
            Some(Granularity::Minute),
            Some(at("2026-03-04T00:00:00Z")),
            Some(at("2026-03-05T00:00:00Z")),
            now,
        );
        assert!(day_of_minutes.is_ok());
        let too_many = Buckets::parse(
            Some(Granularity::Minute),
            Some(at("2026-03-04T00:00:00Z")),
            Some(at("2026-03-05T00:00:01Z")),
            now,
        );
        assert_eq!(fields(too_many), ["start_time"]);
    }

    #[test]
    fn names_and_methods() {
        use crate::model::parse_key;
        let key = parse_key(
            "projects/5f0c1f4e-8a5e-4c39-9b43-1c2b0a8f7e61/keys/0b1d2c3e-4f50-4a61-8b72-9c8d7e6f5a40",
            "name",
        );
        assert!(key.is_ok());
        for bad in [
            "",
            "projects/x/keys/y",
            "projects/5f0c1f4e-8a5e-4c39-9b43-1c2b0a8f7e61",
            "keys/5f0c1f4e-8a5e-4c39-9b43-1c2b0a8f7e61",
        ] {
            assert!(parse_key(bad, "name").is_err(), "{bad}");
        }
        assert_eq!(parse_method("get", "method").unwrap(), Some("GET"));
        assert_eq!(parse_method("", "method").unwrap(), None);
        assert!(parse_method("FETCH", "method").is_err());
    }

    #[test]
    fn cursors_round_trip() {
        let now = at("2026-03-04T10:20:30.123456Z");
        assert_eq!(parse_cursor(&cursor(now, 42)).unwrap(), (now, 42));
        assert!(parse_cursor("nonsense").is_err());
        assert!(parse_cursor("1_x").is_err());
    }
}
