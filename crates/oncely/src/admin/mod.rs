//! Operator tools over the Kafka Admin API (whose safe wrapper,
//! [`crate::kafka::admin`], is on the Kafka floor): offset-reset plans ([`plan`]), operator actions as typed
//! operations, preview → confirm → execute ([`ops`]; offsets resets,
//! restores and undo in [`reset`], decisions on side-effect intents in
//! [`effects`], dead-letter redrive and held-key release in [`dlq`]),
//! snapshots, the audit log, and lag with Burrow's statuses ([`lag`]), all
//! run through a [`session::Session`] that checks the live cluster id first.

pub mod audit;
pub mod dlq;
pub mod effects;
pub mod lag;
pub mod ops;
pub mod outbox;
pub mod parse;
pub mod plan;
pub mod records;
pub mod reset;
pub mod session;
pub mod snapshots;

pub use crate::kafka::admin::{AdminError, KafkaAdmin};
