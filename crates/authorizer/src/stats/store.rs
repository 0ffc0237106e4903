//! Every SQL statement of the usage API: reads of the counts (`authorizer.usage_minutes`,
//! `usage_hours`, `usage_days`, one table per granularity) and of `authorizer.call_logs`
//! (written by [`crate::usage`]). Environments and outcomes are stored as
//! their `keyshare.authorizer.v1` enum numbers.

use chrono::{DateTime, Utc};
use keyshare_runtime::db::{DbError, GenericClient};
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::{Buckets, CallLog, Filter, LogFilter, Point};
use crate::model::{KeyName, Outcome, environment_from_number, environment_number};

type Result<T> = std::result::Result<T, DbError>;

/// Whose calls a series counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Key(KeyName),
    Project(Uuid),
}

/// Calls per bucket, environment and outcome (and key, with `per_key` or a key scope), ordered
/// by bucket, key, environment, outcome; at most `limit` points. A key is matched together with
/// its project, so a key name under another project reads nothing.
pub async fn series(
    c: &impl GenericClient,
    scope: Scope,
    buckets: &Buckets,
    filter: &Filter,
    per_key: bool,
    limit: usize,
) -> Result<Vec<Point>> {
    // Every granularity has a table of its own, so a series reads one row per bucket and key
    // (and environment, method and outcome) whatever its span.
    let (table, column) = buckets.granularity.table();
    let mut conditions = Conditions::default();
    let (start, end) = (conditions.param(buckets.start), conditions.param(buckets.end));
    conditions.push(format!("{column} >= {start} AND {column} < {end}"));
    let key_column = match scope {
        Scope::Key(key) => {
            conditions.eq("key_id", key.key);
            conditions.eq("project_id", key.project);
            "key_id"
        }
        Scope::Project(project) => {
            conditions.eq("project_id", project);
            // One constant key (the nil UUID) when the project's keys are counted together.
            if per_key { "key_id" } else { "'00000000-0000-0000-0000-000000000000'::uuid" }
        }
    };
    if let Some(environment) = filter.environment {
        conditions.eq("environment", environment_number(environment));
    }
    if let Some(method) = filter.method {
        conditions.eq("method", method);
    }
    if let Some(outcome) = filter.outcome {
        conditions.eq("outcome", outcome.number());
    }
    let limit = conditions.param(limit as i64);
    let sql = format!(
        "SELECT {column} AS bucket, project_id, {key_column} AS key, environment, outcome, sum(calls)::bigint
         FROM authorizer.{table}
         WHERE {conditions}
         GROUP BY 1, 2, 3, 4, 5
         ORDER BY 1, 3, 4, 5
         LIMIT {limit}",
        conditions = conditions.sql(),
    );
    let rows = c.query(&sql, &conditions.params()).await?;
    let show_key = matches!(scope, Scope::Project(_)) && per_key;
    Ok(rows
        .iter()
        .filter_map(|row| {
            let environment = environment_from_number(row.get(3))?;
            let outcome = Outcome::from_number(row.get(4))?;
            Some(Point {
                start: row.get(0),
                key: show_key.then(|| KeyName { project: row.get(1), key: row.get(2) }),
                environment,
                outcome,
                calls: row.get(5),
            })
        })
        .collect())
}

/// A key's call log, newest first (equal times: highest id first), after `after` (a time and id
/// of the previous page's last entry); at most `limit` entries.
pub async fn call_logs(
    c: &impl GenericClient,
    key: KeyName,
    filter: &LogFilter,
    after: Option<(DateTime<Utc>, i64)>,
    limit: i64,
) -> Result<Vec<CallLog>> {
    let mut conditions = Conditions::default();
    conditions.eq("key_id", key.key);
    conditions.eq("project_id", key.project);
    if let Some((at, id)) = after {
        let (at, id) = (conditions.param(at), conditions.param(id));
        // `time <= at` besides the row comparison lets PostgreSQL skip the newer day partitions.
        conditions.push(format!("time <= {at} AND (time, id) < ({at}, {id})"));
    }
    if let Some(environment) = filter.environment {
        conditions.eq("environment", environment_number(environment));
    }
    if let Some(outcome) = filter.outcome {
        conditions.eq("outcome", outcome.number());
    }
    let limit = conditions.param(limit);
    let sql = format!(
        "SELECT id, time, environment, method, path, client_ip, outcome, http_status
         FROM authorizer.call_logs
         WHERE {}
         ORDER BY time DESC, id DESC
         LIMIT {limit}",
        conditions.sql(),
    );
    let rows = c.query(&sql, &conditions.params()).await?;
    Ok(rows
        .iter()
        .filter_map(|row| {
            Some(CallLog {
                id: row.get(0),
                key,
                at: row.get(1),
                environment: environment_from_number(row.get(2))?,
                method: row.get(3),
                path: row.get(4),
                client_ip: row.get(5),
                outcome: Outcome::from_number(row.get(6))?,
                http_status: row.get(7),
            })
        })
        .collect())
}

/// A `WHERE` clause and its parameters, built up together so placeholders stay numbered right.
#[derive(Default)]
struct Conditions {
    params: Vec<Box<dyn ToSql + Sync + Send>>,
    conditions: Vec<String>,
}

impl Conditions {
    /// Adds a parameter; returns its placeholder (`$n`).
    fn param(&mut self, value: impl ToSql + Sync + Send + 'static) -> String {
        self.params.push(Box::new(value));
        format!("${}", self.params.len())
    }

    /// Adds `column = value`.
    fn eq(&mut self, column: &str, value: impl ToSql + Sync + Send + 'static) {
        let placeholder = self.param(value);
        self.conditions.push(format!("{column} = {placeholder}"));
    }

    /// Adds a condition written with placeholders from [`Conditions::param`].
    fn push(&mut self, condition: String) {
        self.conditions.push(condition);
    }

    fn sql(&self) -> String {
        self.conditions.join(" AND ")
    }

    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.params.iter().map(|p| &**p as &(dyn ToSql + Sync)).collect()
    }
}
