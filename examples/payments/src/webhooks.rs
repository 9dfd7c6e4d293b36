//! webhook-dispatcher: an oncely consumer of `payments` that tells the
//! merchant about each payment. The webhook is a `merchant-webhook` intent
//! recorded with the event's inbox claim, and sent after commit with the
//! idempotency key `<consumer>/merchant-webhook/<event identity>`: a
//! redelivered, replayed or rewound `PaymentSucceeded` sends nothing.

use anyhow::Result;
use oncely::effects::{EffectCall, EffectOptions};
use oncely::{Consumer, ConsumerBuilder, Cx, Event, HandlerError};
use oncely_testkit::gateway::GatewayClient;
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
        .connection(common.connection()?)
        .pool(pool)
        .topic(&common.payments_topic)
        // Other types on the topic are counted and skipped (the default
        // `Unrouted::Skip`); a `PaymentSucceeded` that does not decode is
        // dead-lettered `undecodable-payload`.
        .route(PAYMENT_SUCCEEDED, on_payment_succeeded)
        .effect_executor(MERCHANT_WEBHOOK, send, EffectOptions::default());
    Ok(opts.apply(b, &settings))
}

/// The handler: one webhook intent per `PaymentSucceeded`.
pub async fn on_payment_succeeded(ev: Event<PaymentSucceeded>, cx: &mut Cx) -> Result<(), HandlerError> {
    let p = ev.data;
    let body = WebhookBody {
        kind: "payment.succeeded".into(),
        order_id: p.order_id,
        amount_cents: p.amount_cents,
        currency: p.currency,
    };
    cx.effect(MERCHANT_WEBHOOK, &body)?;
    Ok(())
}
