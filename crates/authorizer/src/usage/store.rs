//! Every SQL statement of the usage writer: batches of counts and call logs in one transaction
//! each, the quota counters it restores at start, the call logs' day partitions, and pruning.

use std::collections::HashMap;

use chrono::{DateTime, NaiveDate, Utc};
use deadpool_postgres::Pool;
use futures::{SinkExt as _, pin_mut};
use keyshare_runtime::db::{DbError, GenericClient};
use uuid::Uuid;

use super::{Batch, CallRecord};
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
        .copy_in::<_, bytes::Bytes>(
            "COPY authorizer.call_logs (time, project_id, key_id, environment, method, path, client_ip, outcome, \
             http_status) FROM STDIN BINARY",
        )
        .await?;
    pin_mut!(sink);
    let mut rows = CopyRows::new();
    for log in &batch.logs {
        rows.push(log);
        if rows.len() >= COPY_CHUNK_BYTES {
            sink.send(rows.take()).await?;
        }
    }
    sink.send(rows.finish()).await?;
    sink.finish().await?;

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

/// Bytes of encoded call-log rows sent to PostgreSQL at a time.
const COPY_CHUNK_BYTES: usize = 64 * 1024;

/// Call-log rows in PostgreSQL's binary COPY format, encoded straight into one buffer: a fixed
/// layout of nine fields (`COPY authorizer.call_logs (time, project_id, key_id, environment,
/// method, path, client_ip, outcome, http_status)`), where a generic row writer would check
/// and encode each value through a `ToSql` call. Every call of a known key writes one, so this
/// runs for each check.
struct CopyRows(Vec<u8>);

impl CopyRows {
    /// The signature, no flags, no header extension.
    const HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
    /// Microseconds from the Unix epoch to PostgreSQL's, 2000-01-01 UTC.
    const POSTGRES_EPOCH_MICROS: i64 = 946_684_800_000_000;

    fn new() -> Self {
        let mut buffer = Vec::with_capacity(COPY_CHUNK_BYTES + 512);
        buffer.extend_from_slice(Self::HEADER);
        Self(buffer)
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn field(&mut self, value: &[u8]) {
        // A path is at most MAX_PATH bytes; every other field is a few bytes.
        self.0.extend_from_slice(&(value.len() as i32).to_be_bytes());
        self.0.extend_from_slice(value);
    }

    fn push(&mut self, log: &CallRecord) {
        let micros = log.at_nanos.div_euclid(1_000) - Self::POSTGRES_EPOCH_MICROS;
        self.0.extend_from_slice(&9i16.to_be_bytes());
        self.field(&micros.to_be_bytes());
        self.field(log.key.project.as_bytes());
        self.field(log.key.key.as_bytes());
        self.field(&environment_number(log.environment).to_be_bytes());
        self.field(log.method.as_bytes());
        self.field(log.path.as_bytes());
        // inet: family (PostgreSQL's own numbers), prefix bits, not a cidr, address length.
        match log.client_ip {
            Some(std::net::IpAddr::V4(ip)) => {
                let [a, b, c, d] = ip.octets();
                self.field(&[2, 32, 0, 4, a, b, c, d]);
            }
            Some(std::net::IpAddr::V6(ip)) => {
                let mut inet = [0u8; 20];
                inet[..4].copy_from_slice(&[3, 128, 0, 16]);
                inet[4..].copy_from_slice(&ip.octets());
                self.field(&inet);
            }
            None => self.0.extend_from_slice(&(-1i32).to_be_bytes()),
        }
        self.field(&log.outcome.number().to_be_bytes());
        self.field(&(log.outcome.http_status() as i16).to_be_bytes());
    }

    /// The rows so far, leaving the buffer empty for more.
    fn take(&mut self) -> bytes::Bytes {
        bytes::Bytes::from(std::mem::replace(&mut self.0, Vec::with_capacity(COPY_CHUNK_BYTES + 512)))
    }

    /// The rows so far and the end of the data.
    fn finish(mut self) -> bytes::Bytes {
        self.0.extend_from_slice(&(-1i16).to_be_bytes());
        bytes::Bytes::from(self.0)
    }
}

#[cfg(test)]
mod tests {
    use keyshare_runtime::credential::Environment;
    use tokio_postgres::types::{ToSql, Type};

    use super::*;
    use crate::model::Outcome;

    /// What tokio-postgres' own encoder makes of `value` as `ty`: one field of a row.
    fn field(value: &(dyn ToSql + Sync), ty: &Type) -> Vec<u8> {
        let mut buffer = bytes::BytesMut::new();
        match value.to_sql_checked(ty, &mut buffer).unwrap() {
            tokio_postgres::types::IsNull::Yes => (-1i32).to_be_bytes().to_vec(),
            tokio_postgres::types::IsNull::No => [&(buffer.len() as i32).to_be_bytes()[..], &buffer[..]].concat(),
        }
    }

    #[test]
    fn call_log_rows_are_encoded_as_tokio_postgres_encodes_each_value() {
        let key = KeyName { project: Uuid::now_v7(), key: Uuid::now_v7() };
        let ips: [Option<std::net::IpAddr>; 3] =
            [Some("198.51.100.7".parse().unwrap()), Some("2001:db8::7".parse().unwrap()), None];
        let mut rows = CopyRows::new();
        let mut expected = CopyRows::HEADER.to_vec();
        for (n, client_ip) in ips.into_iter().enumerate() {
            let log = CallRecord {
                at_nanos: 1_796_619_187_611_953_123 + n as i64,
                key,
                environment: Environment::Production,
                method: "GET",
                path: format!("/v1/things/{n}"),
                client_ip,
                outcome: if n == 0 { Outcome::Valid } else { Outcome::RateLimited },
                logged: true,
            };
            rows.push(&log);
            let time = DateTime::from_timestamp_nanos(log.at_nanos);
            expected.extend_from_slice(&9i16.to_be_bytes());
            for (value, ty) in [
                (&time as &(dyn ToSql + Sync), Type::TIMESTAMPTZ),
                (&key.project, Type::UUID),
                (&key.key, Type::UUID),
                (&environment_number(log.environment), Type::INT2),
                (&log.method, Type::TEXT),
                (&log.path, Type::TEXT),
                (&log.client_ip, Type::INET),
                (&log.outcome.number(), Type::INT2),
                (&(log.outcome.http_status() as i16), Type::INT2),
            ] {
                expected.extend(field(value, &ty));
            }
        }
        expected.extend_from_slice(&(-1i16).to_be_bytes());
        assert_eq!(rows.finish().to_vec(), expected);
    }
}
