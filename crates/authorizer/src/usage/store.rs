//! Every SQL statement of the usage writer: batches of counts and call logs in one transaction
//! each, the quota counters it restores at start, and pruning.

use std::collections::HashMap;

use chrono::{DateTime, NaiveDate, Utc};
use deadpool_postgres::Pool;
use futures::pin_mut;
use keyshare_runtime::db::{DbError, GenericClient};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::Type;
use uuid::Uuid;

use super::Batch;
use crate::model::environment_number;

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

/// Deletes the call logs older than `before`; how many went.
pub async fn delete_call_logs(c: &impl GenericClient, before: DateTime<Utc>) -> Result<u64, DbError> {
    Ok(c.execute("DELETE FROM authorizer.call_logs WHERE time < $1", &[&before]).await?)
}

/// Forgets the ids of batches written before `before` (a retry comes long before that).
pub async fn forget_batches(c: &impl GenericClient, before: DateTime<Utc>) -> Result<(), DbError> {
    c.execute("DELETE FROM authorizer.usage_batches WHERE written_at < $1", &[&before]).await?;
    Ok(())
}

pub type Totals = (Vec<(Uuid, i16, NaiveDate, i64)>, Vec<(Uuid, i16, NaiveDate, i64)>);

/// Writes one batch in one transaction. `None` when the batch had been written already.
pub async fn write_batch(pool: &Pool, batch: &Batch, now: DateTime<Utc>) -> Result<Option<Totals>, DbError> {
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

    let n = batch.counts.len();
    let (mut minutes, mut projects, mut keys, mut environments, mut methods, mut outcomes, mut calls) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for (count, n) in &batch.counts {
        minutes.push(DateTime::from_timestamp(count.minute * 60, 0).unwrap_or_default());
        projects.push(count.key.project);
        keys.push(count.key.key);
        environments.push(environment_number(count.environment));
        methods.push(count.method);
        outcomes.push(count.outcome.number());
        calls.push(*n);
    }
    transaction
        .execute(
            "INSERT INTO authorizer.usage_minutes AS u (minute, project_id, key_id, environment, method, outcome, calls) \
             SELECT * FROM unnest($1::timestamptz[], $2::uuid[], $3::uuid[], $4::int2[], $5::text[], $6::int2[], $7::int8[]) \
             ORDER BY 3, 1, 4, 5, 6 \
             ON CONFLICT (key_id, minute, environment, method, outcome) DO UPDATE SET calls = u.calls + excluded.calls",
            &[&minutes, &projects, &keys, &environments, &methods, &outcomes, &calls],
        )
        .await?;

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
