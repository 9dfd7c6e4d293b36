//! The effectively-once consumer runtime.
//!
//! Per assigned partition, one ordered **lane**. A lane takes up to
//! `max_batch` records (or what arrived within `max_wait`) and runs one
//! PostgreSQL transaction: claim the identities in the inbox (one statement),
//! run the handler for each new event, advance the partition's offset in
//! `oncely.offsets` with a compare-and-set (the fence), commit; then commit the
//! offset to Kafka asynchronously. PostgreSQL is the source of truth.
//!
//! Each lane reads its partition's own queue, split from the consumer's in the
//! rebalance callback before the partition is assigned; the consumer's main
//! queue carries only rebalances and errors. A lane takes its partition over
//! in the database (a new owner epoch) and starts at the database offset. If
//! Kafka's committed offset is behind it (someone rewound the group, e.g. with
//! `kafka-consumer-groups --reset-offsets`) or ahead of it, the
//! [`RewindPolicy`] decides. On revoke, lanes drain within the drain timeout
//! and the final offsets are committed inside the rebalance callback.
//!
//! # One record, from the poll to the commit
//!
//! The files, in the order a record meets them:
//!
//! 1. `builder.rs`: [`Consumer::builder`] collects the settings (each setter
//!    says its default and why); [`ConsumerBuilder::run`] hands them to
//!    the runtime.
//! 2. `runtime.rs`: checks the connection, topics and retention, registers
//!    the consumer, creates the Kafka consumer with the rebalance context,
//!    and serves its main queue on a thread of its own (the Kafka thread);
//!    it also keeps the inbox's day partitions and retention.
//! 3. `rebalance.rs`: on assignment, splits each partition's queue and
//!    spawns a lane for it (`spawn_lanes`); it also holds the start-offset
//!    decision (`decide_start`) the lane takes once it owns the partition.
//! 4. `lane.rs`: the lane takes the partition over in `oncely.offsets`,
//!    seeks, reads records from its own queue into a batch (through the
//!    rate limit and spike guard of `guard.rs`), and runs the batch in one
//!    transaction: fence and claim in the inbox, then per record the verdict
//!    of `decide.rs` (duplicate, stale, park behind, apply, dead-letter), the
//!    handler through `handler.rs` (the typed event and [`Cx`]), the offset
//!    advanced, the commit, and the asynchronous Kafka commit. What it
//!    notices is logged and counted by the structs of `events.rs`.
//! 5. `rebalance.rs` again: on revoke (or `runtime.rs` at shutdown),
//!    `drain_lanes` stops the lanes, waits for their batches and commits
//!    their final offsets to Kafka.
//!
//! Types every file shares (`Settings`, `Shared`, `PartitionKey`) are
//! below.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use rdkafka::consumer::StreamConsumer;
use rdkafka::Offset;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::envelope::{IdentitySource, VersionSource};
use crate::error::Error;

mod builder;
mod decide;
pub mod events;
mod guard;
mod handler;
mod lane;
mod rebalance;
mod runtime;

#[doc(hidden)]
pub use builder::Parts;
pub use builder::{Consumer, ConsumerBuilder, FORCED_KAFKA_SETTINGS};
pub use guard::SpikeGuard;
use handler::ErasedHandler;
pub use handler::{
    BatchHandlerFn, Cx, FailureClass, HandlerError, HandlerFn, IntoBatchHandler, IntoHandler, State,
    StatefulBatchHandlerFn, StatefulHandlerFn, Unrouted, WithState, WithoutState,
};
use rebalance::Ctx;

pub use crate::kafka::{COMMIT_METADATA, RESET_METADATA_PREFIX};

/// What a lane does when Kafka's committed offset and the database's differ at
/// assignment (someone moved the group's offsets behind oncely's back).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum RewindPolicy {
    /// Follow the database offset: the move costs nothing (default).
    #[default]
    Skip,
    /// Follow Kafka: re-read (rewind) or skip ahead (skip-forward). On a
    /// rewind the inbox still suppresses every duplicate.
    Replay,
    /// Pause the partition until an operator acts (restart with another policy).
    Halt,
}

/// The version guard's settings: where the version is read, and the entity
/// type under which versions are kept (entities are keyed by the Kafka key).
#[derive(Debug, Clone)]
pub struct VersionGuard {
    /// Where the version is.
    pub source: VersionSource,
    /// Entity type (defaults to the topic name).
    pub entity_type: Option<String>,
}

/// Settings that every lane reads.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub max_batch: usize,
    pub max_batch_bytes: usize,
    pub max_wait: Duration,
    pub drain_timeout: Duration,
    pub zombie_timeout: Duration,
    pub rewind: RewindPolicy,
    pub skip_forward: RewindPolicy,
    pub max_attempts: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub max_record_bytes: usize,
    pub replay: bool,
    /// `search_path` set in every batch transaction (a projection rebuild's
    /// shadow schema).
    pub search_path: Option<String>,
    /// Where `cx.publish` writes.
    pub publish: handler::PublishTo,
    /// The consumer whose database position this one never passes (a
    /// projection rebuild follows its live consumer).
    pub follow: Option<Arc<str>>,
    pub dead_key_policy: crate::failure::DeadKeyPolicy,
    /// Where a partition with no position at all starts (`auto.offset.reset`).
    pub initial: Offset,
}

/// A lane's partition queue.
pub(crate) type PartitionQueue = rdkafka::consumer::stream_consumer::StreamPartitionQueue<Ctx>;

/// State shared by the Kafka thread, the rebalance callback and the lanes.
pub(crate) struct Shared {
    pub name: Arc<str>,
    /// The consumer's number in `oncely.consumers` (its inbox rows carry it).
    pub consumer_id: i32,
    pub pool: PgPool,
    pub handler: Arc<dyn ErasedHandler>,
    pub identity: IdentitySource,
    pub version: Option<VersionGuard>,
    pub settings: Settings,
    pub backoff: crate::backoff::Backoff,
    pub rt: tokio::runtime::Handle,
    pub consumer: OnceLock<Weak<KafkaConsumer>>,
    pub lanes: Mutex<HashMap<PartitionKey, lane::LaneHandle>>,
    /// One queue per partition ever assigned, split once and kept for the
    /// consumer's life: librdkafka keeps a split queue split across
    /// re-assignments, and dropping a queue handle silences the reader of
    /// any newer handle of the same queue (its wake-up is per queue).
    pub queues: Mutex<HashMap<PartitionKey, Arc<PartitionQueue>>>,
    pub bucket: Option<guard::TokenBucket>,
    pub spike: Option<guard::SpikeState>,
    pub shutdown: CancellationToken,
    /// Effects this consumer may record (and run, when registered).
    pub registry: Arc<crate::effects::Registry>,
    /// Wakes the in-process effect executor after a commit.
    pub effects_wake: Arc<tokio::sync::Notify>,
    /// The error that stopped the consumer, if one did.
    pub fatal: Mutex<Option<Error>>,
}

impl Shared {
    /// Stops the consumer with `e` (a configuration error found while running).
    pub(crate) fn fail(&self, e: Error) {
        tracing::error!(consumer = &*self.name, error = %e, "Stopping the consumer.");
        if let Ok(mut f) = self.fatal.lock() {
            f.get_or_insert(e);
        }
        self.shutdown.cancel();
    }

    pub(crate) fn has_failed(&self) -> bool {
        self.fatal.lock().map(|f| f.is_some()).unwrap_or(true)
    }

    pub(crate) fn rules(&self) -> decide::Rules {
        decide::Rules { max_attempts: self.settings.max_attempts, dead_key: self.settings.dead_key_policy }
    }
}

pub(crate) type KafkaConsumer = StreamConsumer<Ctx>;

/// `(topic, partition)`.
pub(crate) type PartitionKey = (String, i32);
