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
//! Modules, from the bottom floor up:
//!
//! - [`kafka`]: the one [`kafka::KafkaConnection`] every client is built from,
//!   the forced settings and commit-metadata markers, the Admin API wrapper,
//!   header reading and writing as bytes;
//! - [`store`]: every SQL statement and the migrations, private to the
//!   library but for [`store::connect`] and [`store::migrate`];
//! - [`envelope`]: identity and CloudEvents headers, typed decoding,
//!   [`Publisher`];
//! - [`consumer`]: the runtime (builder, runtime, rebalance, lanes, the
//!   batch decisions; its module doc follows one record from the poll to the
//!   commit), with
//!   [`failure`] (parking, dead letters, redrive), [`effects`] (side-effect
//!   intents and their executor) and [`backoff`] (the one retry schedule);
//! - [`outbox`]: the transactional outbox and its relay;
//! - [`processor`]: Kafka → Kafka in Kafka transactions, for pipelines with
//!   no database in them;
//! - [`projection`]: rebuild a projection into a shadow schema with its
//!   effects off, diff it, swap it in (and back) in one transaction;
//! - [`admin`]: operator operations, each previewed, confirmed and audited
//!   in the library (offset resets, restores and undo; dead-letter redrive
//!   and key release; effect retry and resolve; outbox retry and discard;
//!   projection swaps in [`projection::ops`]), plus lag, snapshots and the
//!   audit log, for the CLI and the console;
//! - [`config`]: `oncely.toml` and `ONCELY_*` variables;
//! - [`metrics`] (Prometheus/OpenMetrics) and [`telemetry`] (spans after
//!   OpenTelemetry's messaging conventions, W3C trace context);
//! - `signal` (private): SIGTERM as a cancellation, for the consumer and the
//!   processor.

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
mod signal;
pub mod store;
pub mod telemetry;

pub use consumer::{Consumer, ConsumerBuilder, Cx, HandlerError, RewindPolicy, State, Unrouted};
pub use envelope::{Event, EventId, IdentitySource, Publisher};
pub use error::{Error, Result};
pub use processor::{Out, Processor, ProcessorBuilder};
