//! The write-up's billing consumer, for the projection rebuild tests: every
//! order becomes an invoice with a tax, a charge at the fake gateway (an
//! effect) and an `invoiced` event (published through the outbox). The tax
//! rate is the handler's code: a test runs it with the bug (the wrong rate),
//! then with the fix.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use oncely::projection::Projection;
use oncely::{Consumer, ConsumerBuilder, Cx, Event, HandlerError, Publisher, State};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

/// An order event.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Order {
    /// Order id (also the Kafka key).
    pub order_id: String,
    /// Amount in cents.
    pub amount: i64,
}

/// The handler's code and configuration.
#[derive(Debug, Clone)]
pub struct Billing {
    /// The tax rate the code applies, in percent.
    pub tax_percent: i64,
    /// Written with each row: which code (process) applied it.
    pub tag: String,
    /// Topic the `invoiced` events go to.
    pub invoiced_topic: String,
    /// Orders this code rejects (they are dead-lettered): a bug of another
    /// kind than the tax rate.
    pub reject_orders: Vec<String>,
}

/// The correct tax rate; the bug applies [`BUGGY_TAX_PERCENT`].
pub const TAX_PERCENT: i64 = 20;
/// The rate the buggy code applies.
pub const BUGGY_TAX_PERCENT: i64 = 2;

/// The tax of `amount` at `percent`.
pub fn tax(amount: i64, percent: i64) -> i64 {
    amount * percent / 100
}

/// The projection's tables, unqualified: `invoices` (one row per order) and
/// `invoice_log` (one row per application: a second application of an
/// event shows as a second row).
pub const CREATE: &str = "
    CREATE TABLE invoices (
        order_id text PRIMARY KEY,
        amount bigint NOT NULL,
        tax bigint NOT NULL,
        applied_by text NOT NULL);
    CREATE TABLE invoice_log (
        n bigserial PRIMARY KEY,
        order_id text NOT NULL,
        event_id text NOT NULL,
        applied_by text NOT NULL);";

/// The billing projection.
pub fn projection() -> Projection {
    Projection::new("billing")
        .table("invoices")
        .table("invoice_log")
        .create_sql(CREATE)
        .diff_ignore("applied_by")
        .diff_ignore("n")
}

/// Creates the live tables (in `public`).
pub async fn setup(pool: &PgPool) -> Result<()> {
    sqlx::raw_sql(CREATE).execute(pool).await?;
    Ok(())
}

/// The name of the charge effect.
pub const CHARGE: &str = "charge-card";

/// The handler: the invoice, the charge, the `invoiced` event.
pub async fn on_order(ev: Event<Order>, cx: &mut Cx, b: State<Billing>) -> Result<(), HandlerError> {
    let o = &ev.data;
    if b.reject_orders.contains(&o.order_id) {
        return Err(HandlerError::reject(format!("order {} is rejected by code {}", o.order_id, b.tag)));
    }
    let tax = tax(o.amount, b.tax_percent);
    sqlx::query("INSERT INTO invoices (order_id, amount, tax, applied_by) VALUES ($1, $2, $3, $4)")
        .bind(&o.order_id)
        .bind(o.amount)
        .bind(tax)
        .bind(&b.tag)
        .execute(cx.db())
        .await?;
    sqlx::query("INSERT INTO invoice_log (order_id, event_id, applied_by) VALUES ($1, $2, $3)")
        .bind(&o.order_id)
        .bind(ev.id.display())
        .bind(&b.tag)
        .execute(cx.db())
        .await?;
    cx.effect(CHARGE, &serde_json::json!({"order": o.order_id, "amount": o.amount + tax}))?;
    cx.publish(
        &b.invoiced_topic,
        &o.order_id,
        "billing.invoiced",
        &serde_json::json!({"order": o.order_id, "tax": tax}),
    )
    .await
    .map_err(|e| HandlerError::retry(e.to_string()))?;
    Ok(())
}

/// The billing consumer `group` of `topic` running `billing`'s code, its
/// charges going to the fake gateway at `gateway_url`.
pub fn consumer(
    group: &str,
    topic: &str,
    pool: PgPool,
    billing: Billing,
    gateway_url: &str,
) -> Result<ConsumerBuilder<Billing>> {
    let client = crate::gateway::GatewayClient::new(gateway_url, Duration::from_secs(5))?;
    let charge = move |call: oncely::effects::EffectCall| {
        let client = client.clone();
        async move { client.charge(&call.key, &call.payload).await }
    };
    let opts = oncely::effects::EffectOptions {
        backoff: (Duration::from_millis(50), Duration::from_millis(500)),
        ..Default::default()
    };
    Ok(Consumer::builder(group)
        .shared_state(Arc::new(billing))
        .bootstrap_servers(crate::bootstrap())
        .pool(pool)
        .topic(topic)
        .handler(on_order)
        .effect_executor(CHARGE, charge, opts)
        .handle_sigterm(false)
        .max_batch(50)
        .kafka("session.timeout.ms", "6000")
        .kafka("heartbeat.interval.ms", "500")
        .force_inbox_retention(true))
}

/// Publishes orders `from..to` (`o<n>`, amount `1000 + n`).
pub async fn publish_orders(topic: &str, from: usize, to: usize) -> Result<()> {
    let publisher = Publisher::new(crate::bootstrap(), "/tests/orders")?;
    let orders: Vec<Order> = (from..to).map(|n| Order { order_id: format!("o{n}"), amount: 1000 + n as i64 }).collect();
    for chunk in orders.chunks(200) {
        for r in
            futures::future::join_all(chunk.iter().map(|o| publisher.publish(topic, &o.order_id, "order", o))).await
        {
            r?;
        }
    }
    Ok(())
}

/// Invoices in `schema`: `(order_id, amount, tax)` by order id.
pub async fn invoices(pool: &PgPool, schema: &str) -> Result<Vec<(String, i64, i64)>> {
    Ok(sqlx::query_as(&format!("SELECT order_id, amount, tax FROM \"{schema}\".invoices ORDER BY order_id"))
        .fetch_all(pool)
        .await?)
}

/// Checks that `schema` holds exactly orders `0..n`, each applied once
/// (one invoice, one log row) with the correct tax. Returns the first
/// violation.
pub async fn check_corrected(pool: &PgPool, schema: &str, n: usize) -> Result<()> {
    let rows = invoices(pool, schema).await?;
    anyhow::ensure!(rows.len() == n, "{schema}.invoices has {} rows for {n} orders", rows.len());
    for (order, amount, t) in &rows {
        anyhow::ensure!(
            *t == tax(*amount, TAX_PERCENT),
            "{schema}: order {order} has tax {t}, not {}",
            tax(*amount, TAX_PERCENT)
        );
    }
    let twice: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM (SELECT order_id FROM \"{schema}\".invoice_log GROUP BY order_id HAVING count(*) > 1) x"
    ))
    .fetch_one(pool)
    .await?;
    anyhow::ensure!(twice == 0, "{schema}: {twice} orders applied more than once");
    let logged: i64 =
        sqlx::query_scalar(&format!("SELECT count(*) FROM \"{schema}\".invoice_log")).fetch_one(pool).await?;
    anyhow::ensure!(logged == n as i64, "{schema}.invoice_log has {logged} rows for {n} orders");
    Ok(())
}
