//! payment-service: an oncely consumer of `orders`, keyed by order id.
//!
//! On `OrderCreated`, in the batch's transaction: the payment row, a
//! `charge-card` intent (run after commit against the gateway with the
//! idempotency key `<consumer>/charge-card/<event identity>`), and
//! `PaymentSucceeded` through the outbox. A redelivered `OrderCreated` never
//! reaches the handler (the inbox holds its identity), so the card is charged
//! once however often the event arrives.
//!
//! On `OrderConfirmed`: the payment's order status. Per-key order means it is
//! applied after the order's `OrderCreated`; `history` records the order.

use anyhow::Result;
use oncely::effects::{EffectCall, EffectOptions};
use oncely::{Consumer, ConsumerBuilder, Cx, Event, HandlerError, State};
use oncely_testkit::gateway::GatewayClient;
use sqlx::PgPool;

use crate::events::{
    ChargeRequest, OrderConfirmed, OrderCreated, PaymentSucceeded, ORDER_CONFIRMED, ORDER_CREATED, PAYMENT_SUCCEEDED,
};

/// The effect that charges the card.
pub const CHARGE_CARD: &str = "charge-card";

/// The tax rate, in percent of the amount, that the payment row records.
pub const TAX_PERCENT: i64 = 20;

/// What the handler needs besides the transaction.
#[derive(Debug)]
pub struct Deps {
    /// Where `PaymentSucceeded` goes.
    pub payments_topic: String,
    /// The tax rate the handler applies: [`TAX_PERCENT`], or the wrong one
    /// of the demo's tax bug (`payment-service --tax-percent 2`).
    pub tax_percent: i64,
}

/// The tax on `amount_cents` at `percent`, rounded down.
pub fn tax(amount_cents: i64, percent: i64) -> i64 {
    amount_cents * percent / 100
}

/// The payments table, unqualified: the application's migration creates it
/// in `public`, a rebuild in its shadow schema.
pub const CREATE_PAYMENTS: &str = "CREATE TABLE IF NOT EXISTS payments (
    order_id       text        PRIMARY KEY,
    order_event_id text        NOT NULL,
    customer       text        NOT NULL,
    amount_cents   bigint      NOT NULL,
    currency       text        NOT NULL,
    tax_cents      bigint      NOT NULL DEFAULT 0,
    order_status   text        NOT NULL DEFAULT 'created',
    history        text[]      NOT NULL DEFAULT '{}',
    created_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at     timestamptz NOT NULL DEFAULT clock_timestamp()
)";

/// The payment-service's projection: the `payments` table, for
/// `oncely projection rebuild` (the handler writes it unqualified, so a
/// rebuild's rows land in its shadow schema).
pub fn projection() -> oncely::projection::Projection {
    oncely::projection::Projection::new("payments")
        .table("payments")
        .create_sql(CREATE_PAYMENTS)
        .diff_ignore("created_at")
        .diff_ignore("updated_at")
}

/// The payment-service consumer: group `group`, reading `orders_topic`,
/// publishing to `payments_topic`, charging through the gateway at
/// `gateway_url`, recording tax at `tax_percent`.
pub fn consumer(
    group: &str,
    common: &crate::Common,
    opts: &crate::ConsumerOpts,
    pool: PgPool,
    gateway_url: &str,
    tax_percent: i64,
) -> Result<ConsumerBuilder<Deps>> {
    let settings = opts.settings(group)?;
    opts.validate(&settings)?;
    let gateway = GatewayClient::new(gateway_url, opts.call_timeout())?;
    let charge = move |call: EffectCall| {
        let gateway = gateway.clone();
        async move { gateway.charge(&call.key, &call.payload).await }
    };
    let b = Consumer::builder(group)
        .connection(common.connection()?)
        .pool(pool)
        .topic(&common.orders_topic)
        .state(Deps { payments_topic: common.payments_topic.clone(), tax_percent })
        .route(ORDER_CREATED, on_order_created)
        .route(ORDER_CONFIRMED, on_order_confirmed)
        .effect_executor(CHARGE_CARD, charge, EffectOptions::default());
    Ok(opts.apply(b, &settings))
}

/// `OrderCreated`: the payment row, the charge intent and `PaymentSucceeded`,
/// in the batch's transaction. (Other types on the topic are not routed and
/// are skipped.)
pub async fn on_order_created(ev: Event<OrderCreated>, cx: &mut Cx, deps: State<Deps>) -> Result<(), HandlerError> {
    let o = ev.data.clone();
    if o.order_id != ev.key() {
        return Err(HandlerError::reject(format!("event key {:?} is not its order id {:?}", ev.key(), o.order_id)));
    }
    let inserted = sqlx::query(
        "INSERT INTO payments (order_id, order_event_id, customer, amount_cents, currency, tax_cents, history)
         VALUES ($1, $2, $3, $4, $5, $6, ARRAY['OrderCreated'])
         ON CONFLICT (order_id) DO NOTHING",
    )
    .bind(&o.order_id)
    .bind(ev.id.display())
    .bind(&o.customer)
    .bind(o.amount_cents)
    .bind(&o.currency)
    .bind(tax(o.amount_cents, deps.tax_percent))
    .execute(cx.db())
    .await?;
    if inserted.rows_affected() == 0 {
        // Not a redelivery (the inbox drops those before the handler): a
        // second, distinct OrderCreated for one order is an upstream bug.
        return Err(HandlerError::reject(format!(
            "order {} already has a payment; event {} is a second OrderCreated for it",
            o.order_id, ev.id
        )));
    }
    let charge = ChargeRequest {
        order_id: o.order_id.clone(),
        customer: o.customer,
        amount: o.amount_cents,
        currency: o.currency.clone(),
    };
    cx.effect(CHARGE_CARD, &charge)?;
    let paid = PaymentSucceeded {
        order_id: o.order_id.clone(),
        amount_cents: o.amount_cents,
        currency: o.currency,
        order_event_id: ev.id.to_string(),
    };
    cx.publish(&deps.payments_topic, &o.order_id, PAYMENT_SUCCEEDED, &paid).await?;
    Ok(())
}

/// `OrderConfirmed`: the payment's order status.
pub async fn on_order_confirmed(ev: Event<OrderConfirmed>, cx: &mut Cx) -> Result<(), HandlerError> {
    let o = ev.data;
    let updated = sqlx::query(
        "UPDATE payments SET order_status = 'confirmed', history = history || 'OrderConfirmed'::text,
                updated_at = clock_timestamp()
         WHERE order_id = $1",
    )
    .bind(&o.order_id)
    .execute(cx.db())
    .await?;
    if updated.rows_affected() == 0 {
        // Only possible if the order's OrderCreated was dead-lettered: park
        // the key (and what follows it) until an operator redrives it.
        return Err(HandlerError::retry(format!("order {} has no payment yet", o.order_id)));
    }
    Ok(())
}
