//! Every SQL statement of the usage writer: batches of counts and call logs in one transaction
//! each, the quota counters it restores at start, the call logs' day partitions, and pruning.

use std::collections::HashMap;

use chrono::{DateTime, NaiveDate, Utc};
use deadpool_postgres::Pool;
use futures::pin_mut;
use keyshare_runtime::db::{DbError, GenericClient};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::Type;
use uuid::Uuid;

use super::Batch;
use crate::model::Granularity;
use crate::model::{KeyName, environment_number};

/// The stored daily counts of `day`: (key, environment number, used).
pub async fn key_days(c: &impl GenericClient, day: NaiveDate) -> Result<Vec<(Uuid, i16, i64)>, DbError> {
    let rows =
        c.query("SELECT key_id, environment, used FROM authorizer.key_daily_usage WHERE day = $1", &[&day]).await?;
    Ok(rows.iter().map(|row| (row.get(0), row.get(1), row.get(2))).collect())
}

/// The stored monthly counts of the month starting `month`: (project, environment number, used).
pub async fn project_months(c: &impl GenericClient, month: NaiveDate) -> Result<Vec<(Uuid, i16, i64)>, DbError> {
    let rows = c
        .query("SELECT project_id, environment, used FROM authorizer.project_monthly_usage WHERE month = $1", &[&month])
        .await?;
    Ok(rows.iter().map(|row| (row.get(0), row.get(1), row.get(2))).collect())
}

/// Makes the call-log partitions of `days` that are not there yet.
pub async fn ensure_partitions(c: &impl GenericClient, days: &[NaiveDate]) -> Result<(), DbError> {
    if !days.is_empty() {
        c.execute("SELECT authorizer.ensure_call_log_partition(day) FROM unnest($1::date[]) AS day", &[&days]).await?;
    }
    Ok(())
}

/// The days that have a call-log partition.
pub async fn partitions(c: &impl GenericClient) -> Result<Vec<NaiveDate>, DbError> {
    let rows = c
        .query(
            "SELECT child.relname FROM pg_inherits JOIN pg_class child ON child.oid = pg_inherits.inhrelid \
             WHERE pg_inherits.inhparent = 'authorizer.call_logs'::regclass",
            &[],
        )
        .await?;
    Ok(rows.iter().filter_map(|row| partition_day(row.get(0))).collect())
}

/// The day a partition named by `authorizer.call_log_partition_name` holds.
fn partition_day(name: &str) -> Option<NaiveDate> {
    NaiveDate::parse_from_str(name.strip_prefix("call_logs_")?, "%Y%m%d").ok()
}

/// Drops the call-log partition of `day`, waiting at most a few seconds for the lock (it is
/// tried again at the next pruning rather than holding up the writers).
pub async fn drop_partition(c: &mut deadpool_postgres::Client, day: NaiveDate) -> Result<(), DbError> {
    let transaction = c.transaction().await?;
    transaction.batch_execute("SET LOCAL lock_timeout = '5s'").await?;
    let name: String = transaction.query_one("SELECT authorizer.call_log_partition_name($1)", &[&day]).await?.get(0);
    // The name comes from the function above (digits and a fixed prefix), quoted besides.
    transaction.batch_execute(&format!("DROP TABLE IF EXISTS authorizer.\"{name}\"")).await?;
    transaction.commit().await?;
    Ok(())
}

/// Deletes the counts of `granularity` older than `before`; how many rows went.
pub async fn delete_counts(
    c: &impl GenericClient,
    granularity: Granularity,
    before: DateTime<Utc>,
) -> Result<u64, DbError> {
    let (table, column) = granularity.table();
    Ok(c.execute(&format!("DELETE FROM authorizer.{table} WHERE {column} < $1"), &[&before]).await?)
}

/// Forgets the ids of batches written before `before` (a retry comes long before that).
pub async fn forget_batches(c: &impl GenericClient, before: DateTime<Utc>) -> Result<(), DbError> {
    c.execute("DELETE FROM authorizer.usage_batches WHERE written_at < $1", &[&before]).await?;
    Ok(())
}

pub type Totals = (Vec<(Uuid, i16, NaiveDate, i64)>, Vec<(Uuid, i16, NaiveDate, i64)>);

/// Writes one batch in one transaction, making the call-log partitions of `new_days` first.
/// `None` when the batch had been written already.
pub async fn write_batch(
    pool: &Pool,
    batch: &Batch,
    new_days: &[NaiveDate],
    now: DateTime<Utc>,
) -> Result<Option<Totals>, DbError> {
    let mut client = pool.get().await?;
    let transaction = client.transaction().await?;
    let fresh = transaction
        .execute(
            "INSERT INTO authorizer.usage_batches (id, written_at) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&batch.id, &now],
        )
        .await?;
    if fresh == 0 {
        return Ok(None);
    }
    ensure_partitions(&transaction, new_days).await?;

    let sink = transaction
        .copy_in(
            "COPY authorizer.call_logs (time, project_id, key_id, environment, method, path, client_ip, outcome, \
             http_status) FROM STDIN BINARY",
        )
        .await?;
    let types = [
        Type::TIMESTAMPTZ,
        Type::UUID,
        Type::UUID,
        Type::INT2,
        Type::TEXT,
        Type::TEXT,
        Type::INET,
        Type::INT2,
        Type::INT2,
    ];
    let writer = BinaryCopyInWriter::new(sink, &types);
    pin_mut!(writer);
    for log in &batch.logs {
        let time = DateTime::from_timestamp_nanos(log.at_nanos);
        let status = log.outcome.http_status() as i16;
        writer
            .as_mut()
            .write(&[
                &time,
                &log.key.project,
                &log.key.key,
                &environment_number(log.environment),
                &log.method,
                &log.path,
                &log.client_ip,
                &log.outcome.number(),
                &status,
            ])
            .await?;
    }
    writer.finish().await?;

    for granularity in [Granularity::Minute, Granularity::Hour, Granularity::Day] {
        upsert_counts(&transaction, granularity, batch).await?;
    }

    let days = upsert_quota(
        &transaction,
        "INSERT INTO authorizer.key_daily_usage AS q (key_id, environment, day, used) \
         SELECT * FROM unnest($1::uuid[], $2::int2[], $3::date[], $4::int8[]) ORDER BY 1, 2, 3 \
         ON CONFLICT (key_id, environment, day) DO UPDATE SET used = q.used + excluded.used \
         RETURNING key_id, environment, day, used",
        batch.key_days(),
    )
    .await?;
    let months = upsert_quota(
        &transaction,
        "INSERT INTO authorizer.project_monthly_usage AS q (project_id, environment, month, used) \
         SELECT * FROM unnest($1::uuid[], $2::int2[], $3::date[], $4::int8[]) ORDER BY 1, 2, 3 \
         ON CONFLICT (project_id, environment, month) DO UPDATE SET used = q.used + excluded.used \
         RETURNING project_id, environment, month, used",
        batch.project_months(),
    )
    .await?;
    transaction.commit().await?;
    Ok(Some((days, months)))
}

/// Adds the batch's counts, in buckets of `granularity`, to what is stored.
async fn upsert_counts(
    transaction: &deadpool_postgres::Transaction<'_>,
    granularity: Granularity,
    batch: &Batch,
) -> Result<(), DbError> {
    let step = granularity.step().num_seconds();
    let mut buckets: HashMap<(i64, KeyName, i16, &'static str, i16), i64> = HashMap::new();
    for (count, calls) in &batch.counts {
        let start = (count.minute * 60).div_euclid(step) * step;
        *buckets
            .entry((start, count.key, environment_number(count.environment), count.method, count.outcome.number()))
            .or_default() += calls;
    }
    let n = buckets.len();
    let (mut starts, mut projects, mut keys, mut environments, mut methods, mut outcomes, mut calls) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for ((start, key, environment, method, outcome), n) in buckets {
        starts.push(DateTime::from_timestamp(start, 0).unwrap_or_default());
        projects.push(key.project);
        keys.push(key.key);
        environments.push(environment);
        methods.push(method);
        outcomes.push(outcome);
        calls.push(n);
    }
    let (table, column) = granularity.table();
    // Sorted like the primary key, so concurrent writers lock rows in one order.
    transaction
        .execute(
            &format!(
                "INSERT INTO authorizer.{table} AS u ({column}, project_id, key_id, environment, method, outcome, calls) \
                 SELECT * FROM unnest($1::timestamptz[], $2::uuid[], $3::uuid[], $4::int2[], $5::text[], $6::int2[], \
                 $7::int8[]) ORDER BY 3, 1, 4, 5, 6 \
                 ON CONFLICT (key_id, {column}, environment, method, outcome) DO UPDATE SET calls = u.calls + excluded.calls"
            ),
            &[&starts, &projects, &keys, &environments, &methods, &outcomes, &calls],
        )
        .await?;
    Ok(())
}

async fn upsert_quota(
    transaction: &deadpool_postgres::Transaction<'_>,
    statement: &str,
    rows: HashMap<(Uuid, i16, NaiveDate), i64>,
) -> Result<Vec<(Uuid, i16, NaiveDate, i64)>, DbError> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let (mut ids, mut environments, mut dates, mut used) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for ((id, environment, date), n) in rows {
        ids.push(id);
        environments.push(environment);
        dates.push(date);
        used.push(n);
    }
    let rows = transaction.query(statement, &[&ids, &environments, &dates, &used]).await?;
    Ok(rows.iter().map(|row| (row.get(0), row.get(1), row.get(2), row.get(3))).collect())
}
