//! The application's own tables, next to oncely's schema.
//!
//! - `orders`: written by the order-service.
//! - `payments`: written by the payment-service, one row per order; `history`
//!   lists the order events in the order they were applied, which makes
//!   per-key order visible. It is the payment-service's projection
//!   ([`crate::payment::projection`]): rebuilt with `oncely projection`.
//! - `naive_processed`: the naive dispatcher's "processed" table, written
//!   *after* the webhook is sent (the pattern of the incident).

use anyhow::{Context, Result};
use sqlx::PgPool;

/// Advisory lock key serializing concurrent migrations (several processes
/// start at once; `CREATE TABLE IF NOT EXISTS` alone races on the catalog).
const MIGRATION_LOCK: i64 = 0x7061_796d_656e_7473; // "payments"

/// In schema `public`, named explicitly: with the default search path
/// (`"$user", public`) and a role named `oncely`, an unqualified name would
/// land in oncely's own schema.
const TABLES: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS public.orders (
        id           text        PRIMARY KEY,
        customer     text        NOT NULL,
        amount_cents bigint      NOT NULL CHECK (amount_cents > 0),
        currency     text        NOT NULL,
        status       text        NOT NULL DEFAULT 'created' CHECK (status IN ('created', 'confirmed')),
        created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
        confirmed_at timestamptz
    )",
    "CREATE TABLE IF NOT EXISTS public.naive_processed (
        event_id     text        PRIMARY KEY,
        topic        text        NOT NULL,
        partition    integer     NOT NULL,
        kafka_offset bigint      NOT NULL,
        processed_at timestamptz NOT NULL DEFAULT clock_timestamp()
    )",
];

/// Applies oncely's migrations and creates the application's tables.
/// Idempotent and safe to run from several processes at once.
pub async fn migrate(pool: &PgPool) -> Result<()> {
    oncely::store::migrate(pool).await.context("applying oncely's migrations")?;
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(MIGRATION_LOCK).execute(&mut *tx).await?;
    for ddl in TABLES {
        sqlx::query(ddl).execute(&mut *tx).await.context("creating the application's tables")?;
    }
    // The payment-service's projection, from the statement its rebuilds
    // create it with (unqualified: in `public` here).
    sqlx::query("SET LOCAL search_path TO public").execute(&mut *tx).await?;
    sqlx::query(crate::payment::CREATE_PAYMENTS).execute(&mut *tx).await.context("creating the payments table")?;
    // Databases created before the tax column.
    sqlx::query("ALTER TABLE public.payments ADD COLUMN IF NOT EXISTS tax_cents bigint NOT NULL DEFAULT 0")
        .execute(&mut *tx)
        .await?;
    // The inbox's daily partitions too, while the lock is held (on another
    // connection of the pool): consumers create them at start without a
    // lock, and two starting at once on a fresh day race on the catalog.
    oncely::store::inbox::ensure_days(pool, 3).await.context("creating the inbox partitions")?;
    tx.commit().await?;
    Ok(())
}

/// Connects to `url` with a pool of `max` connections.
pub async fn connect(url: &str, max: u32) -> Result<PgPool> {
    oncely::store::connect(url, max).await.with_context(|| format!("connecting to {}", redact(url)))
}

/// `url` without its password, for messages.
pub use oncely_testkit::supervisor::redact;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_hides_the_password_only() {
        assert_eq!(redact("postgres://u:secret@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("postgres://h/db"), "postgres://h/db");
    }
}
