//! A consumer running in the test's process, and the conditions tests wait on.

use std::time::Duration;

use anyhow::{Context, Result};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// How long tests wait for a condition by default.
pub const WAIT: Duration = Duration::from_secs(90);

/// A consumer running in this process until [`Running::stop`].
#[derive(Debug)]
pub struct Running {
    token: CancellationToken,
    join: tokio::task::JoinHandle<oncely::Result<()>>,
}

impl Running {
    /// Stops it and returns what its run returned.
    pub async fn stop(self) -> Result<()> {
        self.token.cancel();
        tokio::time::timeout(Duration::from_secs(60), self.join).await.context("consumer did not stop")???;
        Ok(())
    }

    /// Whether its run has ended (an error, or a panic inside it).
    pub fn is_finished(&self) -> bool {
        self.join.is_finished()
    }
}

/// Runs `builder` in this process.
pub fn start<S: Send + Sync + 'static>(builder: oncely::ConsumerBuilder<S>) -> Running {
    let token = CancellationToken::new();
    let join = tokio::spawn(builder.run(token.clone()));
    Running { token, join }
}

/// The sum of a consumer's database offsets.
pub async fn offsets_sum(pool: &PgPool, group: &str) -> Result<i64> {
    Ok(sqlx::query_scalar::<_, i64>(
        "SELECT coalesce(sum(next_offset), 0)::bigint FROM oncely.offsets WHERE consumer = $1",
    )
    .bind(group)
    .fetch_one(pool)
    .await?)
}

/// Waits until the database offsets of `group` add up to `total` (every
/// partition read to its end, for topics whose partitions start at 0).
pub async fn wait_offsets(pool: &PgPool, group: &str, total: i64) -> Result<()> {
    crate::wait_until(WAIT, &format!("database offsets of {group} to reach {total}"), || async {
        Ok(offsets_sum(pool, group).await? >= total)
    })
    .await
}

/// Waits until `sql` (a count) reaches `n`.
pub async fn wait_count(pool: &PgPool, sql: &str, n: i64) -> Result<()> {
    crate::wait_until(WAIT, &format!("`{sql}` to reach {n}"), || async { Ok(crate::count(pool, sql).await? >= n) })
        .await
}
