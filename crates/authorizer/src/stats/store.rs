//! Every SQL statement of the usage API: reads of `authorizer.usage_minutes` and
//! `authorizer.call_logs` (written by [`crate::usage`]). Environments and outcomes are stored as
//! their `keyshare.authorizer.v1` enum numbers.

use chrono::{DateTime, Utc};
use keyshare_runtime::db::{DbError, GenericClient};
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::{Buckets, CallLog, Filter, LogFilter, Point};
use crate::check::{KeyName, Outcome};
use crate::usage::{environment_from_number, environment_number};

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
    let mut params: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
    let mut conditions = vec!["minute >= $1".to_owned(), "minute < $2".to_owned()];
    params.push(Box::new(buckets.start));
    params.push(Box::new(buckets.end));
    let mut condition =
        |params: &mut Vec<Box<dyn ToSql + Sync + Send>>, column: &str, value: Box<dyn ToSql + Sync + Send>| {
            params.push(value);
            conditions.push(format!("{column} = ${}", params.len()));
        };
    let key_column = match scope {
        Scope::Key(key) => {
            condition(&mut params, "key_id", Box::new(key.key));
            condition(&mut params, "project_id", Box::new(key.project));
            "key_id"
        }
        Scope::Project(project) => {
            condition(&mut params, "project_id", Box::new(project));
            // One constant key (the nil UUID) when the project's keys are counted together.
            if per_key { "key_id" } else { "'00000000-0000-0000-0000-000000000000'::uuid" }
        }
    };
    if let Some(environment) = filter.environment {
        condition(&mut params, "environment", Box::new(environment_number(environment)));
    }
    if let Some(method) = filter.method {
        condition(&mut params, "method", Box::new(method));
    }
    if let Some(outcome) = filter.outcome {
        condition(&mut params, "outcome", Box::new(outcome.number()));
    }
    params.push(Box::new(limit as i64));
    // date_trunc on the UTC wall time, so buckets are UTC whatever the session's time zone.
    let sql = format!(
        "SELECT date_trunc('{unit}', minute AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS bucket,
                project_id, {key_column} AS key, environment, outcome, sum(calls)::bigint
         FROM authorizer.usage_minutes
         WHERE {conditions}
         GROUP BY 1, 2, 3, 4, 5
         ORDER BY 1, 3, 4, 5
         LIMIT ${limit}",
        unit = buckets.granularity.sql_unit(),
        conditions = conditions.join(" AND "),
        limit = params.len(),
    );
    let params: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| &**p as &(dyn ToSql + Sync)).collect();
    let rows = c.query(&sql, &params).await?;
    let show_key = matches!(scope, Scope::Project(_)) && per_key;
    Ok(rows
        .iter()
        .filter_map(|row| {
            let environment = environment_from_number(row.get(3))?;
            let outcome = outcome_from_number(row.get(4))?;
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
    let mut params: Vec<Box<dyn ToSql + Sync + Send>> = vec![Box::new(key.key), Box::new(key.project)];
    let mut conditions = vec!["key_id = $1".to_owned(), "project_id = $2".to_owned()];
    if let Some((at, id)) = after {
        params.push(Box::new(at));
        params.push(Box::new(id));
        conditions.push(format!("(time, id) < (${}, ${})", params.len() - 1, params.len()));
    }
    if let Some(environment) = filter.environment {
        params.push(Box::new(environment_number(environment)));
        conditions.push(format!("environment = ${}", params.len()));
    }
    if let Some(outcome) = filter.outcome {
        params.push(Box::new(outcome.number()));
        conditions.push(format!("outcome = ${}", params.len()));
    }
    params.push(Box::new(limit));
    let sql = format!(
        "SELECT id, time, environment, method, path, client_ip, outcome, http_status
         FROM authorizer.call_logs
         WHERE {}
         ORDER BY time DESC, id DESC
         LIMIT ${}",
        conditions.join(" AND "),
        params.len(),
    );
    let params: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| &**p as &(dyn ToSql + Sync)).collect();
    let rows = c.query(&sql, &params).await?;
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
                outcome: outcome_from_number(row.get(6))?,
                http_status: row.get(7),
            })
        })
        .collect())
}

fn outcome_from_number(number: i16) -> Option<Outcome> {
    Outcome::ALL.into_iter().find(|outcome| outcome.number() == number)
}
