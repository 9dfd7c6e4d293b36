//! The Kafka → Kafka processor: consume, transform, produce, exactly once
//! for `read_committed` readers, in Kafka transactions.
//!
//! A handler reads one event and emits zero or more records to declared
//! output topics. Its outputs, the dead letters and the input offsets are
//! written in **one Kafka transaction** (`send_offsets_to_transaction` with
//! the consumer's group metadata: the group-based fencing of KIP-447, as
//! Kafka Streams' `exactly_once_v2`), so for a `read_committed` reader every
//! input's outputs appear exactly once, whatever crashes, aborts and
//! rebalances happen in between.
//!
//! ```no_run
//! use oncely::processor::{Out, Processor};
//! use oncely::{Event, HandlerError};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Deserialize)]
//! struct Payment { id: String, account: String, cents: i64 }
//! #[derive(Serialize)]
//! struct Processed { id: String, cents: i64, fee_cents: i64 }
//!
//! async fn process(ev: Event<Payment>, out: &mut Out) -> Result<(), HandlerError> {
//!     let p = &ev.data;
//!     let fee = p.cents / 100;
//!     out.send("payments-processed", &p.account, "com.example.payment.processed",
//!              &Processed { id: p.id.clone(), cents: p.cents, fee_cents: fee })?;
//!     out.send("audit-log", &p.id, "com.example.audit.entry", &serde_json::json!({"payment": p.id}))?;
//!     Ok(())
//! }
//!
//! # async fn run() -> oncely::Result<()> {
//! Processor::builder("payment-processor")
//!     .bootstrap_servers("127.0.0.1:9092")
//!     .input("payments")
//!     .output("payments-processed")
//!     .output("audit-log")
//!     .handler(process)
//!     .run(tokio_util::sync::CancellationToken::new())
//!     .await
//! # }
//! ```
//!
//! **Kafka's transaction covers Kafka only.** A handler that also writes a
//! database or calls an API does so outside it: after an abort or a crash
//! the write happens again. Use [`Consumer`](crate::Consumer) (database
//! state exactly once, outputs through the outbox) for that; see
//! `docs/processor.md` for the decision table.
//!
//! - **`transactional.id`**: `<name>/<instance>` ([`transactional_id`]),
//!   stable per instance, so a restarted instance aborts the transaction its
//!   previous run left open at once. Two instances with the same id: the
//!   newer one's `init_transactions` fences the older, which logs that it
//!   was fenced and why, drops its producer and never retries
//!   ([`FencedPolicy`]).
//! - **Batching**: a transaction commits after
//!   [`commit_every`](ProcessorBuilder::commit_every) inputs or
//!   [`commit_interval`](ProcessorBuilder::commit_interval).
//! - **Failures**: the handler's [`HandlerError`](crate::HandlerError)
//!   classes as in the consumer. A transient failure retries the event in
//!   place with backoff while its partition waits behind it (per-key order
//!   holds, other partitions go on); `reject`, `max_attempts` and bad input
//!   (undecodable payload, missing identity, a header name that is not
//!   UTF-8, an output larger than its topic's `max.message.bytes`) go to
//!   `<topic>.<name>.dlt` with Spring Kafka's `kafka_dlt-*` headers, inside
//!   the transaction that commits the offset past them.
//! - **Header names that are not UTF-8**: such a record is dead-lettered
//!   (`invalid-header-name`), byte for byte, headers included; keys,
//!   payloads and header values may hold any byte (NUL included): a
//!   [`raw_handler`](ProcessorBuilder::raw_handler) gets the payload as it
//!   is and [`Out::send_raw`] forwards bytes as they are.

mod builder;
mod clients;
pub mod events;
mod out;
mod runtime;
mod wire;

pub use builder::{
    default_instance_id, transactional_id, FencedPolicy, ProcessFn, Processor, ProcessorBuilder, DEFAULT_COMMIT_EVERY,
    DEFAULT_COMMIT_INTERVAL,
};
pub use clients::FORCED_CONSUMER_SETTINGS;
pub use out::{output_ce_id, Out};
pub use wire::RawHeader;
