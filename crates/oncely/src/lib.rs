//! # oncely
//!
//! Effectively-once event processing for Apache Kafka and PostgreSQL.
//!
//! Kafka delivers at least once: after a crash, a rebalance, an offset reset or a
//! producer retry, a consumer sees the same record again. oncely makes the second
//! copy harmless by construction. Every event has a stable identity (CloudEvents
//! `ce_source` + `ce_id` by default); a consumer claims identities in an inbox
//! table, runs the handler and advances its offset in **one** PostgreSQL
//! transaction, so the handler's writes commit exactly once per identity.
//!
//! ```no_run
//! use oncely::{Consumer, Cx, Event, HandlerError};
//! use serde::Deserialize;
//!
//! #[derive(Deserialize)]
//! struct OrderCreated { order_id: String, total_cents: i64 }
//!
//! async fn on_order_created(ev: Event<OrderCreated>, cx: &mut Cx) -> Result<(), HandlerError> {
//!     sqlx::query("INSERT INTO payments (order_id, amount_cents) VALUES ($1, $2)")
//!         .bind(&ev.data.order_id)
//!         .bind(ev.data.total_cents)
//!         .execute(cx.db())
//!         .await?;
//!     Ok(())
//! }
//!
//! # async fn run() -> oncely::Result<()> {
//! let pool = sqlx::PgPool::connect("postgres://oncely:oncely@127.0.0.1/oncely").await?;
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! Consumer::builder("payment-service")
//!     .bootstrap_servers("127.0.0.1:9092")
//!     .pool(pool)
//!     .topic("orders")
//!     .handler(on_order_created)
//!     .run(shutdown)
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! Modules: [`envelope`] (identity and CloudEvents headers), [`consumer`] (the
//! runtime), [`store`] (every SQL statement and the migrations), [`config`]
//! (`oncely.toml`), [`admin`] (offset tools over the Kafka Admin API),
//! [`processor`] (Kafka → Kafka in Kafka transactions, for pipelines with no
//! database in them).

#![warn(missing_docs)]

pub mod admin;
pub mod backoff;
pub mod config;
pub mod consumer;
pub mod effects;
pub mod envelope;
mod error;
pub mod failure;
pub mod kafka;
pub mod metrics;
pub mod outbox;
pub mod processor;
pub mod projection;
pub mod store;
pub mod telemetry;

pub use consumer::{Consumer, ConsumerBuilder, Cx, HandlerError, RewindPolicy, State, Unrouted};
pub use envelope::{Event, EventId, IdentitySource, Publisher};
pub use error::{Error, Result};
pub use processor::{Out, Processor, ProcessorBuilder};
