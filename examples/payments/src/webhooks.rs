//! webhook-dispatcher: an oncely consumer of `payments` that tells the
//! merchant about each payment. The webhook is a `merchant-webhook` intent
//! recorded with the event's inbox claim, and sent after commit with the
//! idempotency key `<consumer>/merchant-webhook/<event identity>`: a
//! redelivered, replayed or rewound `PaymentSucceeded` sends nothing.

use anyhow::Result;
use oncely::effects::{EffectCall, EffectOptions};
use oncely::{Consumer, ConsumerBuilder, Cx, Event, HandlerError};
use oncely_testkit::gateway::GatewayClient;
use serde_json::Value;
use sqlx::PgPool;

use crate::events::{PaymentSucceeded, WebhookBody, PAYMENT_SUCCEEDED};

/// The effect that calls the merchant.
pub const MERCHANT_WEBHOOK: &str = "merchant-webhook";

/// The webhook-dispatcher consumer: group `group`, reading the payments
/// topic, delivering to the merchant endpoint at `merchant_url` (`POST /webhooks`).
pub fn consumer(
    group: &str,
    common: &crate::Common,
    opts: &crate::ConsumerOpts,
    pool: PgPool,
    merchant_url: &str,
) -> Result<ConsumerBuilder> {
    let settings = opts.settings(group)?;
    opts.validate(&settings)?;
    let merchant = GatewayClient::new(merchant_url, opts.call_timeout())?;
    let send = move |call: EffectCall| {
        let merchant = merchant.clone();
        async move { merchant.webhook(&call.key, &call.payload).await }
    };
    let b = Consumer::builder(group)
        .bootstrap_servers(&common.bootstrap_servers)
        .pool(pool)
        .topic(&common.payments_topic)
        .handler(on_payment_event)
        .effect_executor(MERCHANT_WEBHOOK, send, EffectOptions::default());
    Ok(opts.apply(b, &settings))
}

/// The handler: one webhook intent per `PaymentSucceeded`.
pub async fn on_payment_event(ev: Event<Value>, cx: &mut Cx) -> Result<(), HandlerError> {
    if ev.attrs.ty != PAYMENT_SUCCEEDED {
        tracing::debug!(event_id = %ev.id, ce_type = %ev.attrs.ty, "Ignored an event of another type.");
        return Ok(());
    }
    let p: PaymentSucceeded = serde_json::from_value(ev.data).map_err(HandlerError::reject)?;
    let body = WebhookBody {
        kind: "payment.succeeded".into(),
        order_id: p.order_id,
        amount_cents: p.amount_cents,
        currency: p.currency,
    };
    cx.effect(MERCHANT_WEBHOOK, &body)?;
    Ok(())
}
