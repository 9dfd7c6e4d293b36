//! Embedded migrations: plain SQL files applied in order, each in its own
//! transaction, under an advisory lock so that several processes starting at
//! once apply each migration exactly once.

use sqlx::{PgPool, Row};

use crate::error::{Error, Result};

/// `(version, name, sql)` of every migration, in order.
pub const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "core", include_str!("migrations/0001_core.sql")),
    (2, "outbox", include_str!("migrations/0002_outbox.sql")),
    (3, "operator", include_str!("migrations/0003_operator.sql")),
    (4, "effects", include_str!("migrations/0004_effects.sql")),
    (5, "failure", include_str!("migrations/0005_failure.sql")),
    (6, "outbox_bytes", include_str!("migrations/0006_outbox_bytes.sql")),
    (7, "bytes and inbox keys", include_str!("migrations/0007_bytes_and_inbox_keys.sql")),
    (8, "projections", include_str!("migrations/0008_projections.sql")),
    (9, "projection requests", include_str!("migrations/0009_projection_requests.sql")),
];

/// Key of the advisory lock held while migrating (`hashtext('oncely.migrate')` is
/// not stable across versions, so a fixed number).
const MIGRATE_LOCK: i64 = 0x6f6e_63656c79;

/// Applies the migrations that are missing; returns the versions applied now.
pub fn migrate(pool: &PgPool) -> futures::future::BoxFuture<'_, Result<Vec<i64>>> {
    // Boxed so callers can hold it across awaits in `Send` futures (see
    // ConsumerBuilder::run).
    Box::pin(migrate_inner(pool))
}

/// Applies the missing migrations up to `version` only: for tests of a
/// migration over data written by an older schema.
#[doc(hidden)]
pub async fn migrate_up_to(pool: &PgPool, version: i64) -> Result<Vec<i64>> {
    migrate_locked(pool, version).await
}

async fn migrate_inner(pool: &PgPool) -> Result<Vec<i64>> {
    migrate_locked(pool, i64::MAX).await
}

async fn migrate_locked(pool: &PgPool, up_to: i64) -> Result<Vec<i64>> {
    let mut conn = pool.acquire().await?;
    sqlx::query("SELECT pg_advisory_lock($1)").bind(MIGRATE_LOCK).execute(&mut *conn).await?;
    let result = apply(&mut conn, up_to).await;
    let unlock = sqlx::query("SELECT pg_advisory_unlock($1)").bind(MIGRATE_LOCK).execute(&mut *conn).await;
    let applied = result?;
    unlock?;
    Ok(applied)
}

async fn apply(conn: &mut sqlx::PgConnection, up_to: i64) -> Result<Vec<i64>> {
    sqlx::query("CREATE SCHEMA IF NOT EXISTS oncely").execute(&mut *conn).await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS oncely.schema_migrations (
            version bigint PRIMARY KEY,
            name text NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .execute(&mut *conn)
    .await?;
    let done: Vec<i64> = sqlx::query("SELECT version FROM oncely.schema_migrations")
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<std::result::Result<_, _>>()?;
    let mut applied = Vec::new();
    for (version, name, sql) in MIGRATIONS {
        if done.contains(version) || *version > up_to {
            continue;
        }
        // One simple-protocol query string runs as one implicit transaction:
        // the migration and its bookkeeping row commit together or not at all.
        let script = format!(
            "{sql}\n;INSERT INTO oncely.schema_migrations (version, name) VALUES ({version}, '{}');",
            name.replace('\'', "''")
        );
        if let Err(source) = sqlx::Executor::execute(&mut *conn, script.as_str()).await {
            return Err(Error::Migration { version: *version, name: (*name).to_owned(), error: source });
        }
        tracing::info!(version, name, "applied migration");
        applied.push(*version);
    }
    Ok(applied)
}
