//! PostgreSQL access shared by every service: the connection pool, embedded migrations applied
//! at start (safe with several replicas starting at once), transactions that are run again when
//! they lose a race, and SQLSTATE classification.
//! Connections use TLS when `DATABASE_URL` asks for it (`sslmode=require`, `verify-ca`,
//! `verify-full`; see [`crate::pg_tls`]).

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::error::SqlState;

pub use deadpool_postgres::{GenericClient, Object as Connection, PoolError, Transaction};
pub use tokio_postgres::Error as PostgresError;

/// A database failure, classified so stores can map it to a domain error.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("database: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("database migration: {0}")]
    Migration(#[from] refinery::Error),
    #[error("database configuration: {0}")]
    Config(String),
    #[error("database configuration: {0}")]
    TlsOptions(#[from] crate::pg_tls::TlsOptionsError),
    /// The TLS handshake with the database failed (an unknown CA, a certificate for another
    /// host, a server without TLS).
    #[error("DATABASE_URL: TLS with the database failed: {0}")]
    Tls(String),
}

/// A write a unique constraint refused: the row it would have made is there already.
#[derive(Debug)]
pub struct Taken(DbError);

impl Taken {
    /// The constraint that refused the write.
    pub fn constraint(&self) -> &str {
        self.0.unique_violation().unwrap_or_default()
    }

    /// The failure as it was, for a constraint the store does not expect.
    pub fn into_error(self) -> DbError {
        self.0
    }
}

/// A statement's result with a unique violation set apart as [`Taken`], so a store says "taken"
/// in its own type and no use case reads a SQLSTATE.
pub fn unless_taken<T>(result: Result<T, PostgresError>) -> Result<Result<T, Taken>, DbError> {
    match result {
        Ok(value) => Ok(Ok(value)),
        Err(e) => {
            let e = DbError::Postgres(e);
            if e.unique_violation().is_some() { Ok(Err(Taken(e))) } else { Err(e) }
        }
    }
}

/// Implements `From<deadpool_postgres::PoolError>` and `From<tokio_postgres::Error>` for a
/// service's error enum that has `From<DbError>`: both go through [`DbError`], so each service
/// decides in one place what a database failure means to its callers, and `?` works on pool and
/// statement results alike.
///
/// With `contended: Variant`, it also implements [`Contention`] for the enum: an error is
/// contention when it is that variant, which its `From<DbError>` makes of a
/// [`DbError::is_contention`] failure.
#[macro_export]
macro_rules! from_database_errors {
    ($error:ty, contended: $variant:ident) => {
        $crate::from_database_errors!($error);

        impl $crate::db::Contention for $error {
            fn is_contention(&self) -> bool {
                matches!(self, Self::$variant(_))
            }
        }
    };
    ($error:ty) => {
        impl From<$crate::db::PoolError> for $error {
            fn from(e: $crate::db::PoolError) -> Self {
                $crate::db::DbError::Pool(e).into()
            }
        }

        impl From<$crate::db::PostgresError> for $error {
            fn from(e: $crate::db::PostgresError) -> Self {
                $crate::db::DbError::Postgres(e).into()
            }
        }
    };
}

impl DbError {
    /// The SQLSTATE, when the server returned one.
    pub fn sql_state(&self) -> Option<&SqlState> {
        match self {
            DbError::Postgres(e) => e.code(),
            _ => None,
        }
    }

    /// The constraint a unique violation hit, if that is what happened.
    pub fn unique_violation(&self) -> Option<&str> {
        match self {
            DbError::Postgres(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                e.as_db_error().and_then(|db| db.constraint())
            }
            _ => None,
        }
    }

    /// Whether the database aborted this transaction in favour of a concurrent one (a
    /// serialization failure or a deadlock): the same work run again may well succeed.
    pub fn is_contention(&self) -> bool {
        matches!(self.sql_state(), Some(state) if *state == SqlState::T_R_SERIALIZATION_FAILURE || *state == SqlState::T_R_DEADLOCK_DETECTED)
    }

    /// Whether the database could not be reached at all (as opposed to refusing a statement).
    pub fn is_unavailable(&self) -> bool {
        match self {
            DbError::Pool(_) | DbError::Tls(_) => true,
            DbError::Postgres(e) => e.is_closed() || e.code().is_none(),
            _ => false,
        }
    }
}

/// A service error that can say whether it is a [`DbError::is_contention`] failure, kept apart
/// from other database failures so that [`in_transaction!`] knows what to run again.
pub trait Contention {
    fn is_contention(&self) -> bool;
}

impl Contention for DbError {
    fn is_contention(&self) -> bool {
        DbError::is_contention(self)
    }
}

/// How many times [`in_transaction!`] runs work that keeps losing races, in all.
pub const TRANSACTION_ATTEMPTS: u32 = 3;

/// Runs a block in one transaction on a connection of a pool and commits it:
/// `in_transaction!(pool, |tx| -> Result<T> { ..; Ok(value) })`, where the block reads the
/// transaction as `tx` and answers the `Result` (of the type named) that the whole answers.
///
/// When the database aborts the transaction for a serialization failure or a deadlock, it is
/// rolled back and the block runs again from the start, on a fresh transaction, after a short
/// randomised wait; [`TRANSACTION_ATTEMPTS`] runs in all, then the failure is the caller's. Any
/// other error rolls back and is answered at once. The block answers like a function body, by its
/// last expression or by `return`, and `?` answers its error; `Ok` commits. So the
/// block does database work only (no mail sent, no peer called): whatever follows the commit
/// goes after the macro. A block that must commit and still answer an error answers
/// `Ok(Err(..))`.
///
/// A macro rather than a function taking a closure: an async closure over a borrowed
/// transaction would be the natural form, but tonic's handlers need `Send` futures, which the
/// compiler cannot yet prove for such closures (nor for boxed futures borrowing the caller's
/// locals).
#[macro_export]
macro_rules! in_transaction {
    ($pool:expr, |$tx:ident| -> $answer:ty $body:block) => {{
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result: $answer = async {
                let mut client = $pool.get().await?;
                #[allow(unused_mut)]
                let mut $tx = client.transaction().await?;
                // An inner block, so that a `return` in the body ends the body only.
                let answer: $answer = async { $body }.await;
                let value = match answer {
                    Ok(value) => value,
                    Err(e) => return Err(e),
                };
                $tx.commit().await?;
                Ok(value)
            }
            .await;
            match result {
                Err(e) if $crate::db::run_again(&e, attempt).await => continue,
                result => break result,
            }
        }
    }};
}

/// Whether [`in_transaction!`] runs its block again after attempt `attempt` failed with `error`;
/// waits first when it does.
pub async fn run_again<E: Contention>(error: &E, attempt: u32) -> bool {
    if !error.is_contention() || attempt >= TRANSACTION_ATTEMPTS {
        return false;
    }
    tracing::info!(attempt, "transaction lost a race with a concurrent one; running it again");
    // 5-10 ms, then 20-40 ms: long enough for the winner to commit, and spread so that two
    // losers do not meet again.
    let base = 5u64 << (2 * (attempt - 1));
    let wait = base + rand::Rng::gen_range(&mut rand::thread_rng(), 0..=base);
    tokio::time::sleep(Duration::from_millis(wait)).await;
    true
}

/// Builds the connection pool. Connections are made lazily, so a database that is briefly down
/// at start only delays the first call.
pub fn pool(database_url: &str, max_size: usize) -> Result<Pool, DbError> {
    let (config, tls) = crate::pg_tls::prepare(database_url)?;
    let manager = Manager::from_config(config, tls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
    Pool::builder(manager)
        .max_size(max_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(5)))
        .create_timeout(Some(Duration::from_secs(5)))
        .recycle_timeout(Some(Duration::from_secs(5)))
        .build()
        .map_err(|e| DbError::Config(e.to_string()))
}

/// A database connection made outside the pool, plain or TLS as `DATABASE_URL` says.
pub type DirectConnection =
    tokio_postgres::Connection<tokio_postgres::Socket, crate::pg_tls::RustlsStream<tokio_postgres::Socket>>;

/// Opens a connection outside the pool (for migrations and `LISTEN`). A TLS failure is a
/// [`DbError::Tls`], naming `DATABASE_URL`.
pub async fn connect(database_url: &str) -> Result<(tokio_postgres::Client, DirectConnection), DbError> {
    let (config, tls) = crate::pg_tls::prepare(database_url)?;
    config.connect(tls).await.map_err(|e| match crate::pg_tls::tls_failure(&e) {
        Some(reason) => DbError::Tls(reason),
        None => DbError::Postgres(e),
    })
}

/// Applies the service's embedded migrations to its own schema.
///
/// A session-level advisory lock keyed by the schema serialises replicas that start together:
/// the first applies the migrations, the others wait and then find nothing left to do.
pub async fn migrate(database_url: &str, schema: &str, runner: refinery::Runner) -> Result<(), DbError> {
    if !schema.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
        return Err(DbError::Config(format!("schema name {schema:?} is not a plain identifier")));
    }
    let (mut client, connection) = connect(database_url).await?;
    let connection = tokio::spawn(connection);
    let lock_key = advisory_key(schema);
    client.execute("SELECT pg_advisory_lock($1)", &[&lock_key]).await?;
    let result = async {
        client.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema}; SET search_path TO {schema}")).await?;
        runner.run_async(&mut client).await?;
        Ok::<_, DbError>(())
    }
    .await;
    // Closing the connection releases the lock even if unlocking fails.
    let _ = client.execute("SELECT pg_advisory_unlock($1)", &[&lock_key]).await;
    drop(client);
    let _ = connection.await;
    result
}

/// Listens for `NOTIFY <channel>` on a connection of its own and counts the notifications, so
/// waiters wake on `changed()`; also wakes them after every (re)connection, in case one was
/// missed meanwhile. Reconnects with backoff; ends when every receiver is gone.
pub fn listen(database_url: String, channel: &'static str) -> tokio::sync::watch::Receiver<u64> {
    let (tx, rx) = tokio::sync::watch::channel(0u64);
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        while !tx.is_closed() {
            if let Err(e) = listen_once(&database_url, channel, &tx).await {
                tracing::warn!(error = %e, channel, "database listener lost its connection; reconnecting");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    });
    rx
}

async fn listen_once(database_url: &str, channel: &str, tx: &tokio::sync::watch::Sender<u64>) -> Result<(), String> {
    use futures::StreamExt as _;
    let (client, mut connection) = connect(database_url).await.map_err(|e| e.to_string())?;
    let (notify_tx, mut notify_rx) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(tokio_postgres::AsyncMessage::Notification(_)) => {
                    let _ = notify_tx.send(Ok(()));
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = notify_tx.send(Err(e));
                    return;
                }
            }
        }
    });
    let result = async {
        client.batch_execute(&format!("LISTEN {channel}")).await.map_err(|e| e.to_string())?;
        tx.send_modify(|count| *count += 1);
        loop {
            match notify_rx.recv().await {
                Some(Ok(())) if tx.is_closed() => return Ok(()),
                Some(Ok(())) => tx.send_modify(|count| *count += 1),
                Some(Err(e)) => return Err(e.to_string()),
                None => return Err("connection closed".to_owned()),
            }
        }
    }
    .await;
    driver.abort();
    result
}

/// A stable 64-bit key for an advisory lock (FNV-1a of the name).
pub fn advisory_key(name: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in b"keyshare:".iter().chain(name.as_bytes()) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash as i64
}
