//! relay: publishes the outbox (the order-service's and the payment-service's
//! events) to Kafka with oncely's relay. Several relay processes may run: the
//! outbox's lanes are shared among them, each key published by one at a time.

use anyhow::{Context, Result};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Runs a relay named `name` until `shutdown`; prints `READY` once it starts.
pub async fn run(common: &crate::Common, name: Option<&str>, pool: PgPool, shutdown: CancellationToken) -> Result<()> {
    let mut b = oncely::outbox::Relay::builder(pool, common.connection()?);
    if let Some(n) = name {
        b = b.name(n);
    }
    let relay = b.build().context("configuring the relay")?;
    tracing::info!(relay = relay.name(), "relay running.");
    crate::ready();
    relay.run(shutdown).await.context("running the relay")
}
