//! `in_transaction!` against a real PostgreSQL: a block that loses a race with a concurrent
//! transaction runs again and commits; one that keeps losing gives up after
//! `TRANSACTION_ATTEMPTS` runs; any other failure is answered at once and leaves nothing behind.

use keyshare_runtime::db::{self, DbError, TRANSACTION_ATTEMPTS};
use keyshare_runtime::in_transaction;
use keyshare_runtime::testkit::TestDatabase;

async fn counter_table() -> (TestDatabase, deadpool_postgres::Pool) {
    let database = TestDatabase::create().await;
    let pool = db::pool(&database.url, 4).expect("pool");
    let client = pool.get().await.expect("connection");
    client
        .batch_execute("CREATE TABLE counter (id int PRIMARY KEY, n int NOT NULL); INSERT INTO counter VALUES (1, 0)")
        .await
        .expect("table");
    (database, pool)
}

async fn counter(pool: &deadpool_postgres::Pool) -> i32 {
    pool.get()
        .await
        .expect("connection")
        .query_one("SELECT n FROM counter WHERE id = 1", &[])
        .await
        .expect("row")
        .get(0)
}

/// Reads the counter in a REPEATABLE READ transaction and, while `concurrent` says so, lets
/// another connection add 100 to it and commit before this transaction writes: that write then
/// fails with a serialization failure (SQLSTATE 40001).
async fn increment(
    pool: &deadpool_postgres::Pool,
    runs: &mut u32,
    concurrent: impl Fn(u32) -> bool,
) -> Result<i32, DbError> {
    in_transaction!(pool, |tx| -> Result<i32, DbError> {
        *runs += 1;
        tx.batch_execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ").await?;
        let n: i32 = tx.query_one("SELECT n FROM counter WHERE id = 1", &[]).await?.get(0);
        if concurrent(*runs) {
            let other = pool.get().await?;
            other.execute("UPDATE counter SET n = n + 100 WHERE id = 1", &[]).await?;
        }
        tx.execute("UPDATE counter SET n = $1 WHERE id = 1", &[&(n + 1)]).await?;
        Ok(n + 1)
    })
}

#[tokio::test]
async fn a_transaction_that_loses_a_race_runs_again_and_commits() {
    let (_database, pool) = counter_table().await;
    let mut runs = 0;
    let answer = increment(&pool, &mut runs, |run| run == 1).await.expect("the second run commits");
    assert_eq!(runs, 2, "the first run lost the race and the block ran once more");
    assert_eq!(answer, 101, "the second run read what the winner committed");
    assert_eq!(counter(&pool).await, 101);
}

#[tokio::test]
async fn a_transaction_that_keeps_losing_gives_up_after_the_last_attempt() {
    let (_database, pool) = counter_table().await;
    let mut runs = 0;
    let error = increment(&pool, &mut runs, |_| true).await.expect_err("every run loses");
    assert!(error.is_contention(), "the caller is told it was contention: {error}");
    assert_eq!(runs, TRANSACTION_ATTEMPTS);
    assert_eq!(counter(&pool).await, 100 * TRANSACTION_ATTEMPTS as i32, "only the winners' writes are there");
}

#[tokio::test]
async fn any_other_failure_is_answered_at_once_and_rolled_back() {
    let (_database, pool) = counter_table().await;
    let mut runs = 0;
    let result = in_transaction!(pool, |tx| -> Result<(), DbError> {
        runs += 1;
        tx.execute("UPDATE counter SET n = 7 WHERE id = 1", &[]).await?;
        tx.execute("INSERT INTO counter VALUES (1, 0)", &[]).await?;
        Ok(())
    });
    let error = result.expect_err("the insert hits the primary key");
    assert!(error.unique_violation().is_some(), "{error}");
    assert!(!error.is_contention());
    assert_eq!(runs, 1, "a failure that is not contention is not run again");
    assert_eq!(counter(&pool).await, 0, "the update before the failure was rolled back");
}
