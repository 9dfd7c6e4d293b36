//! The processor's runtime: one thread that owns the consumer and the
//! transactional producer and runs the consume → handle → produce loop.
//!
//! One transaction at a time spans every assigned partition. It begins with
//! the first record after the previous commit and commits after
//! `commit_every` records or `commit_interval`, whichever comes first: the
//! handlers' outputs, the dead letters and the input offsets
//! (`send_offsets_to_transaction` with the consumer's group metadata, so the
//! group coordinator fences a member that lost its partitions, KIP-447)
//! become visible together or not at all.
//!
//! The rebalance callback runs on the same thread, inside `poll`, between
//! two records: on a revoke it commits the open transaction before the
//! partitions go (or aborts it when the assignment was lost).
//!
//! Failures, by class:
//! - **fenced** (`PRODUCER_FENCED`, `INVALID_PRODUCER_EPOCH`, librdkafka's
//!   `__FENCED`): the producer is dropped, its transaction never retried
//!   (the broker has aborted it); then [`FencedPolicy`](super::FencedPolicy).
//! - **abortable** (`txn_requires_abort`, a failed delivery): abort, seek every
//!   partition back to its first uncommitted record, retry after a backoff.
//! - **retriable** (a timed-out commit): the same call again, a few times.
//! - **fatal** (anything else librdkafka calls fatal): stop with the cause.

use std::collections::{HashMap, HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer as _, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaError;
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseRecord, Producer as _, ProducerContext, PurgeConfig};
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use super::builder::{ErasedProcess, FencedPolicy};
use super::clients::{self, Connection, Role};
use super::events::{self, DeadLettered};
use super::out::{Out, OutRecord};
use super::wire::{self, Input};
use crate::backoff::{Backoff, Retries};
use crate::consumer::{FailureClass, HandlerError};
use crate::envelope::{EventId, IdentitySource};
use crate::error::{Error, Result};
use crate::failure::{self, DeadLetter};

/// Bytes of record and batch framing allowed for when an output's size is
/// compared with its topic's `max.message.bytes` (a v2 batch header is 61
/// bytes; a record's varints at most ~40, plus ~10 per header).
pub(crate) const BATCH_MARGIN: usize = 1024;

/// The framing a record adds to its key, value and headers, at most.
fn framing(headers: usize) -> usize {
    61 + 40 + 10 * headers
}

/// Settings the runtime reads.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub commit_every: usize,
    pub commit_interval: Duration,
    pub max_attempts: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub on_fenced: FencedPolicy,
    pub op_timeout: Duration,
    pub liveness: Duration,
}

/// What every part of the runtime shares; fixed once running.
pub(crate) struct Shared {
    pub name: Arc<str>,
    pub transactional_id: String,
    pub conn: Connection,
    pub inputs: Vec<String>,
    /// Declared output topics and their `max.message.bytes`.
    pub outputs: Arc<HashMap<String, usize>>,
    /// Dead-letter topics and their `max.message.bytes`.
    pub dlt_limits: HashMap<String, usize>,
    pub batch_size: usize,
    pub message_max_bytes: usize,
    pub handler: Arc<dyn ErasedProcess>,
    pub identity: IdentitySource,
    pub source: Arc<str>,
    pub settings: Settings,
    pub state: Option<Arc<dyn std::any::Any + Send + Sync>>,
    pub rt: tokio::runtime::Handle,
    pub shutdown: CancellationToken,
}

/// Runs the processor on a thread of its own until it stops.
pub(crate) async fn run(shared: Arc<Shared>) -> Result<()> {
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let thread_shared = shared.clone();
    std::thread::Builder::new()
        .name(format!("oncely-proc-{}", shared.name))
        .spawn(move || {
            let _ = done_tx.send(run_thread(thread_shared));
        })
        .map_err(Error::Io)?;
    let result = done_rx.await.unwrap_or_else(|_| Err(Error::Config("the processor thread panicked".into())));
    tracing::info!(processor = %shared.name, "Processor stopped.");
    result
}

/// How one run of the loop ended.
enum Exit {
    /// Shut down on request.
    Stopped,
    /// The producer was fenced.
    Fenced(String),
}

fn run_thread(shared: Arc<Shared>) -> Result<()> {
    loop {
        match run_instance(&shared)? {
            Exit::Stopped => return Ok(()),
            Exit::Fenced(detail) => match shared.settings.on_fenced {
                FencedPolicy::Rejoin(after) => {
                    tracing::warn!(processor = %shared.name, transactional_id = %shared.transactional_id, after = ?after, "Rejoining after being fenced, with a new producer.");
                    let deadline = Instant::now() + after;
                    while Instant::now() < deadline {
                        if shared.shutdown.is_cancelled() {
                            return Ok(());
                        }
                        std::thread::sleep(Duration::from_millis(50).min(deadline - Instant::now()));
                    }
                }
                _ => return Err(Error::Fenced { transactional_id: shared.transactional_id.clone(), detail }),
            },
        }
    }
}

// ------------------------------------------------------------------ clients

/// Where an output came from: the input record whose handler emitted it
/// (the delivery report names it when the broker refuses the record).
struct Origin {
    txn: u64,
    topic: Arc<str>,
    partition: i32,
    offset: i64,
}

/// A delivery that failed inside a transaction.
struct Failed {
    txn: u64,
    input: (String, i32, i64),
    code: RDKafkaErrorCode,
}

/// The producer's context: records failed deliveries for the abort path.
#[derive(Default)]
struct ProducerCtx {
    failed: Mutex<Vec<Failed>>,
}

impl ClientContext for ProducerCtx {}

impl ProducerContext for ProducerCtx {
    type DeliveryOpaque = Box<Origin>;

    fn delivery(&self, result: &DeliveryResult<'_>, origin: Box<Origin>) {
        if let Err((e, _)) = result {
            let code = e.rdkafka_error_code().unwrap_or(RDKafkaErrorCode::Fail);
            // Purged records are the ones an abort discards: not a cause.
            if matches!(code, RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight) {
                return;
            }
            lock(&self.failed).push(Failed {
                txn: origin.txn,
                input: (origin.topic.to_string(), origin.partition, origin.offset),
                code,
            });
        }
    }
}

type TxnProducer = rdkafka::producer::BaseProducer<ProducerCtx>;
type Cons = BaseConsumer<ConsumerCtx>;

/// The consumer's context: runs the rebalance logic against the engine.
struct ConsumerCtx {
    engine: Arc<Mutex<Engine>>,
}

impl ClientContext for ConsumerCtx {}

impl ConsumerContext for ConsumerCtx {
    fn rebalance(&self, base: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let mut e = lock(&self.engine);
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => e.on_assign(base, tpl),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => e.on_revoke(base, tpl),
            other => tracing::error!(processor = %e.shared.name, error = ?other, "Rebalance failed."),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain state behind: still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One run: fresh producer (fencing any older holder of the id) and consumer.
fn run_instance(shared: &Arc<Shared>) -> Result<Exit> {
    let producer: TxnProducer = clients::client_config(
        &shared.conn,
        Role::Producer {
            transactional_id: &shared.transactional_id,
            batch_size: shared.batch_size,
            message_max_bytes: shared.message_max_bytes,
        },
    )?
    .create_with_context(ProducerCtx::default())?;
    init_transactions(shared, &producer)?;

    let engine = Arc::new(Mutex::new(Engine::new(shared.clone(), producer)));
    let consumer: Cons = clients::client_config(&shared.conn, Role::Consumer { group: &shared.name })?
        .create_with_context(ConsumerCtx { engine: engine.clone() })?;
    let topics: Vec<&str> = shared.inputs.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    tracing::info!(processor = %shared.name, transactional_id = %shared.transactional_id, inputs = ?shared.inputs, "Processor running.");

    let exit = run_loop(shared, &consumer, &engine);

    // Leave the group. A fenced or failed engine has no producer any more,
    // so the final revoke commits nothing.
    if matches!(exit, Ok(Exit::Fenced(_)) | Err(_)) {
        lock(&engine).producer = None;
    }
    consumer.unsubscribe();
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until && !consumer.assignment().map(|a| a.count() == 0).unwrap_or(true) {
        let _ = consumer.poll(Duration::from_millis(50));
    }
    drop(consumer);
    exit
}

/// `init_transactions`: fences every older producer with this id and aborts
/// the transaction it left open. Retried while the coordinator is not ready.
fn init_transactions(shared: &Shared, producer: &TxnProducer) -> Result<()> {
    let mut attempt = 0u32;
    let mut retries = Retries::new(Backoff::new(Duration::from_millis(200), Duration::from_secs(2)));
    loop {
        match producer.init_transactions(shared.settings.op_timeout) {
            Ok(()) => {
                tracing::info!(processor = %shared.name, transactional_id = %shared.transactional_id, "Initialised the transactional producer: any older producer with this transactional.id is fenced now, and the transaction it left open is aborted.");
                return Ok(());
            }
            Err(KafkaError::Transaction(e)) if e.is_retriable() && attempt < 10 && !shared.shutdown.is_cancelled() => {
                attempt += 1;
                tracing::warn!(processor = %shared.name, error = %e, attempt, "init_transactions failed; retrying.");
                std::thread::sleep(retries.next_delay());
            }
            Err(e) => {
                return Err(Error::ProducerFatal {
                    transactional_id: shared.transactional_id.clone(),
                    detail: format!("init_transactions failed: {e}"),
                })
            }
        }
    }
}

fn run_loop(shared: &Arc<Shared>, consumer: &Cons, engine: &Arc<Mutex<Engine>>) -> Result<Exit> {
    loop {
        let timeout = {
            let mut e = lock(engine);
            if let Some(stop) = e.stop.take() {
                return stop.into_exit(&mut e);
            }
            if shared.shutdown.is_cancelled() {
                let r = e.finish_txn(consumer, "shutdown");
                if let Some(stop) = e.stop.take().or(r.err().and_then(Fail::into_stop)) {
                    return stop.into_exit(&mut e);
                }
                return Ok(Exit::Stopped);
            }
            if let Some(at) = e.resume_at {
                // Backing off after an abort: no new transaction yet.
                let now = Instant::now();
                if now < at {
                    drop(e);
                    std::thread::sleep((at - now).min(Duration::from_millis(100)));
                    continue;
                }
                e.resume_at = None;
            }
            if let Some(p) = &e.producer {
                p.poll(Duration::ZERO);
            }
            let step = e.run_due_retries(consumer).and_then(|()| e.commit_due(consumer));
            e.handle(consumer, step);
            if e.stop.is_some() {
                continue;
            }
            e.poll_timeout()
        };
        match consumer.poll(timeout) {
            Some(Ok(m)) => {
                let input = wire::read_input(&m);
                drop(m);
                let mut e = lock(engine);
                let step = e.on_input(consumer, input);
                e.handle(consumer, step);
            }
            Some(Err(KafkaError::PartitionEOF(_))) | None => {}
            Some(Err(e)) => {
                tracing::warn!(processor = %shared.name, error = %e, "Kafka consumer error.");
            }
        }
    }
}

// ------------------------------------------------------------------ engine

/// Why a step failed.
#[derive(Debug)]
enum Fail {
    /// Abort the transaction and read its inputs again.
    Abort(String),
    /// The producer was fenced.
    Fenced(String),
    /// Stop with this error.
    Fatal(String),
}

impl Fail {
    fn into_stop(self) -> Option<Stop> {
        match self {
            Fail::Abort(_) => None,
            Fail::Fenced(d) => Some(Stop::Fenced(d)),
            Fail::Fatal(d) => Some(Stop::Fatal(d)),
        }
    }
}

/// Why the loop must end.
#[derive(Debug)]
enum Stop {
    Fenced(String),
    Fatal(String),
}

impl Stop {
    fn into_exit(self, e: &mut Engine) -> Result<Exit> {
        // The broker aborts (fenced) or times out (fatal) the open
        // transaction: nothing of it is ever committed from here.
        e.producer = None;
        e.txn = None;
        e.frozen = None;
        e.next = None;
        e.buffer.clear();
        match self {
            Stop::Fenced(d) => {
                let action = match e.shared.settings.on_fenced {
                    FencedPolicy::Rejoin(_) => "rejoin",
                    _ => "stop",
                };
                events::ProducerFenced {
                    processor: &e.shared.name,
                    transactional_id: &e.shared.transactional_id,
                    detail: &d,
                    action,
                }
                .emit();
                Ok(Exit::Fenced(d))
            }
            Stop::Fatal(d) => {
                tracing::error!(processor = %e.shared.name, transactional_id = %e.shared.transactional_id, error = %d, "The transactional producer failed fatally; the processor stops.");
                Err(Error::ProducerFatal { transactional_id: e.shared.transactional_id.clone(), detail: d })
            }
        }
    }
}

type Tp = (String, i32);

/// A partition's state.
#[derive(Default)]
struct Part {
    /// The first record consumed since the last commit: where an abort seeks back to.
    rewind_to: Option<i64>,
    /// The offset after the last record handled in the open transaction.
    next_in_txn: Option<i64>,
    /// The last offset received since the last seek: older deliveries are dropped.
    last_seen: Option<i64>,
    /// The offset this instance last committed for the partition.
    committed: Option<i64>,
    /// A record waiting for its retry, and the records of the partition behind it.
    blocked: Option<Blocked>,
    /// The frozen transaction's offset for the partition (see [`Engine::freeze`]).
    frozen_next: Option<i64>,
    /// The first record handled since the freeze: where the next transaction starts.
    after_freeze: Option<i64>,
}

/// A record handled while the transaction was frozen, sent into the next one.
struct Pending {
    origin: (String, i32, i64),
    topic: String,
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    headers: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

struct Blocked {
    head: Input,
    next_at: Instant,
    behind: VecDeque<Input>,
}

/// The open transaction.
struct Txn {
    seq: u64,
    started: Instant,
    inputs: u64,
    outputs: u64,
    dead: Vec<DeadLettered>,
    per_topic: HashMap<String, (u64, u64)>,
    /// Commit right after the current input (it runs alone).
    commit_now: bool,
}

impl Txn {
    fn empty(seq: u64) -> Self {
        Txn {
            seq,
            started: Instant::now(),
            inputs: 0,
            outputs: 0,
            dead: Vec::new(),
            per_topic: HashMap::new(),
            commit_now: false,
        }
    }
}

/// What handling one input decided.
enum Verdict {
    /// Send these outputs.
    Forward(Vec<OutRecord>),
    /// Dead-letter the input.
    DeadLetter { id: Option<EventId>, reason: String, error: String, class: String, attempts: i32 },
    /// Try again after `delay`.
    Retry { delay: Duration, error: String },
}

struct Engine {
    shared: Arc<Shared>,
    producer: Option<TxnProducer>,
    txn: Option<Txn>,
    txn_seq: u64,
    parts: HashMap<Tp, Part>,
    /// Set by the rebalance callback, which cannot return an error.
    stop: Option<Stop>,
    consecutive_aborts: u32,
    resume_at: Option<Instant>,
    /// Attempts made so far per `(partition, offset)`, across aborts.
    attempts: HashMap<(Tp, i64), u32>,
    /// Inputs whose output the broker refused as too large: dead-lettered
    /// (`oversized-output`) when read again.
    oversized: HashSet<(Tp, i64)>,
    /// Inputs that each run in a transaction of their own, to find which of
    /// them has an output the broker refuses.
    isolate: HashSet<(Tp, i64)>,
    limits: Arc<HashMap<String, usize>>,
    /// When the last transaction ended (or the engine started).
    last_txn_end: Instant,
    /// The offsets of the open transaction once it is frozen: due, waiting
    /// for its records' acknowledgements, no longer taking records.
    frozen: Option<TopicPartitionList>,
    /// Tallies of the inputs handled since the freeze.
    next: Option<Txn>,
    /// Their records, sent into the next transaction.
    buffer: Vec<Pending>,
}

impl Engine {
    fn new(shared: Arc<Shared>, producer: TxnProducer) -> Self {
        let limits = shared.outputs.clone();
        Engine {
            shared,
            producer: Some(producer),
            txn: None,
            txn_seq: 0,
            parts: HashMap::new(),
            stop: None,
            consecutive_aborts: 0,
            resume_at: None,
            attempts: HashMap::new(),
            oversized: HashSet::new(),
            isolate: HashSet::new(),
            limits,
            last_txn_end: Instant::now(),
            frozen: None,
            next: None,
            buffer: Vec::new(),
        }
    }

    /// Acts on a step's failure: abort (and seek back), or stop.
    fn handle(&mut self, c: &Cons, step: Result<(), Fail>) {
        match step {
            Ok(()) => {}
            Err(Fail::Abort(reason)) => {
                if let Err(f) = self.abort(c, &reason, &HashSet::new()) {
                    self.stop = f.into_stop().or(self.stop.take());
                }
            }
            Err(f) => self.stop = f.into_stop(),
        }
    }

    fn txn_due(&self) -> bool {
        self.txn.as_ref().is_some_and(|t| {
            t.commit_now
                || t.inputs as usize >= self.shared.settings.commit_every
                || t.started.elapsed() >= self.shared.settings.commit_interval
        })
    }

    /// How long `poll` may block: until the commit or the next retry is due.
    fn poll_timeout(&self) -> Duration {
        let now = Instant::now();
        if self.frozen.is_some() {
            // Check often whether the frozen transaction can commit.
            return Duration::from_millis(1);
        }
        let mut t = Duration::from_millis(100);
        if let Some(txn) = &self.txn {
            t = t.min((txn.started + self.shared.settings.commit_interval).saturating_duration_since(now));
        }
        for p in self.parts.values() {
            if let Some(b) = &p.blocked {
                t = t.min(b.next_at.saturating_duration_since(now));
            }
        }
        t
    }

    fn producer(&self) -> Result<&TxnProducer, Fail> {
        self.producer.as_ref().ok_or_else(|| Fail::Fatal("the producer is gone".into()))
    }

    fn ensure_txn(&mut self) -> Result<(), Fail> {
        if self.txn.is_some() {
            return Ok(());
        }
        self.producer()?.begin_transaction().map_err(|e| self.classify(&e))?;
        self.txn_seq += 1;
        self.txn = Some(Txn::empty(self.txn_seq));
        Ok(())
    }

    /// Classifies a Kafka error of a transactional call or a send.
    fn classify(&self, e: &KafkaError) -> Fail {
        let fatal_cause = || self.producer.as_ref().and_then(|p| p.client().fatal_error());
        match e {
            KafkaError::Transaction(rde) => {
                let code = rde.code();
                if is_fencing(code) {
                    return Fail::Fenced(rde.string());
                }
                if rde.is_fatal() {
                    return match fatal_cause() {
                        Some((code, reason)) if is_fencing(code) => Fail::Fenced(reason),
                        Some((_, reason)) => Fail::Fatal(reason),
                        None => Fail::Fatal(rde.string()),
                    };
                }
                Fail::Abort(rde.string())
            }
            KafkaError::MessageProduction(code) => {
                if is_fencing(*code) {
                    return Fail::Fenced(e.to_string());
                }
                match fatal_cause() {
                    Some((code, reason)) if is_fencing(code) => Fail::Fenced(reason),
                    Some((_, reason)) => Fail::Fatal(reason),
                    None => Fail::Abort(e.to_string()),
                }
            }
            other => Fail::Abort(other.to_string()),
        }
    }

    /// Runs a transactional call, again while it fails with a retriable error.
    fn retrying(&self, what: &str, f: impl Fn(&TxnProducer) -> rdkafka::error::KafkaResult<()>) -> Result<(), Fail> {
        let p = self.producer()?;
        let mut attempt = 0;
        loop {
            match f(p) {
                Ok(()) => return Ok(()),
                Err(KafkaError::Transaction(e)) if e.is_retriable() && !e.is_fatal() && attempt < 3 => {
                    attempt += 1;
                    tracing::warn!(processor = %self.shared.name, call = what, error = %e.string(), attempt, "A transactional call failed with a retriable error; calling it again.");
                }
                Err(e) => return Err(self.classify(&e)),
            }
        }
    }

    // -------------------------------------------------------------- records

    fn on_input(&mut self, c: &Cons, input: Input) -> Result<(), Fail> {
        let tp: Tp = (input.record.topic.to_string(), input.record.partition);
        let offset = input.record.offset;
        let part = self.parts.entry(tp.clone()).or_default();
        if part.last_seen.is_some_and(|l| offset <= l) {
            tracing::debug!(topic = %tp.0, partition = tp.1, offset, "Dropped a record delivered again before a seek took effect.");
            return Ok(());
        }
        part.last_seen = Some(offset);
        // Before anything can fail: an abort must find this record again.
        part.rewind_to.get_or_insert(offset);
        if self.frozen.is_some() {
            part.after_freeze.get_or_insert(offset);
        }
        if let Some(b) = &mut part.blocked {
            b.behind.push_back(input);
            return Ok(());
        }
        if self.isolate.contains(&(tp.clone(), offset)) && self.txn.as_ref().is_some_and(|t| t.inputs > 0) {
            // It must run alone: commit what came before it first.
            self.commit(c, "isolate")?;
            self.parts.entry(tp.clone()).or_default().rewind_to.get_or_insert(offset);
        }
        if let Some(b) = self.process(input)? {
            self.block(c, &tp, b);
        }
        Ok(())
    }

    /// Handles one input in the open transaction. `Some` when it must be
    /// retried later (the partition then waits behind it).
    fn process(&mut self, input: Input) -> Result<Option<Blocked>, Fail> {
        let tp: Tp = (input.record.topic.to_string(), input.record.partition);
        let offset = input.record.offset;
        let key = (tp.clone(), offset);
        match self.decide(&input, &key) {
            Verdict::Forward(records) => {
                self.ensure_txn()?;
                self.send_outputs(&input, &records)?;
                self.attempts.remove(&key);
                self.done(&tp, offset, records.len() as u64, false);
            }
            Verdict::DeadLetter { id, reason, error, class, attempts } => {
                self.ensure_txn()?;
                self.send_dead_letter(&input, id.as_ref(), &reason, &error, &class, attempts)?;
                self.attempts.remove(&key);
                self.done(&tp, offset, 0, true);
            }
            Verdict::Retry { delay, error } => {
                let n = self.attempts.get(&key).copied().unwrap_or(0);
                tracing::warn!(processor = %self.shared.name, topic = %tp.0, partition = tp.1, offset, attempt = n, retry_in = ?delay, error = %error, "Handler failed; retrying the event in place, its partition waits behind it.");
                return Ok(Some(Blocked { head: input, next_at: Instant::now() + delay, behind: VecDeque::new() }));
            }
        }
        if self.isolate.remove(&key) {
            if let Some(t) = &mut self.txn {
                t.commit_now = true;
            }
        }
        Ok(None)
    }

    /// Marks an input handled in the open transaction.
    fn done(&mut self, tp: &Tp, offset: i64, outputs: u64, dead: bool) {
        let frozen = self.frozen.is_some();
        if let Some(p) = self.parts.get_mut(tp) {
            p.next_in_txn = Some(offset + 1);
            if frozen {
                p.after_freeze.get_or_insert(offset);
            }
        }
        let tallies = if self.frozen.is_some() {
            Some(self.next.get_or_insert_with(|| Txn::empty(0)))
        } else {
            self.txn.as_mut()
        };
        if let Some(t) = tallies {
            t.inputs += 1;
            t.outputs += outputs;
            let e = t.per_topic.entry(tp.0.clone()).or_default();
            if dead {
                e.1 += 1;
            } else {
                e.0 += 1;
            }
        }
    }

    /// Runs the handler (or finds the input bad) and decides what to do.
    fn decide(&mut self, input: &Input, key: &(Tp, i64)) -> Verdict {
        let s = self.shared.clone();
        let rec = &input.record;
        let dead = |id: Option<EventId>, reason: &str, error: String, class: &str, attempts: u32| Verdict::DeadLetter {
            id,
            reason: reason.to_owned(),
            error,
            class: class.to_owned(),
            attempts: attempts as i32,
        };
        if let Some(name) = &input.bad_header_name {
            let msg = format!(
                "header name \"{}\" is not valid UTF-8; the record is dead-lettered byte for byte",
                crate::envelope::escape_bytes(name)
            );
            return dead(None, "invalid-header-name", msg, "oncely::DecodeError", 1);
        }
        let id = match s.identity.extract(rec) {
            Ok(id) => id,
            Err(e) => return dead(None, e.reason(), e.to_string(), "oncely::DecodeError", 1),
        };
        if self.oversized.remove(key) {
            let msg = "the broker refused an output of this event as larger than its topic's max.message.bytes";
            return dead(Some(id), "oversized-output", msg.into(), "oncely::OversizedOutput", 1);
        }
        let ev = match s.handler.decode(id.clone(), rec.clone()) {
            Ok(ev) => ev,
            Err(e) => return dead(Some(id), e.reason(), e.to_string(), "oncely::DecodeError", 1),
        };
        let mut out = Out {
            processor: s.name.clone(),
            source: s.source.clone(),
            outputs: s.outputs.clone(),
            input: rec.clone(),
            input_id: id.clone(),
            state: s.state.clone(),
            records: Vec::new(),
        };
        let result = {
            let fut = s.handler.call(ev, &mut out);
            match s.rt.block_on(AssertUnwindSafe(fut).catch_unwind()) {
                Ok(r) => r,
                Err(panic) => {
                    let msg = panic
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "non-string panic".into());
                    Err(HandlerError::retry(format!("handler panicked: {msg}")))
                }
            }
        };
        let attempts = self.attempts.get(key).copied().unwrap_or(0) + 1;
        match result {
            Ok(()) => {
                for (i, r) in out.records.iter().enumerate() {
                    let limit = self.limits.get(&r.topic).copied().unwrap_or(usize::MAX);
                    let size = r.size() + framing(r.headers.len());
                    if size > limit {
                        let msg = format!(
                            "output {i} to `{}` is {size} bytes with framing; the topic's max.message.bytes is {limit}",
                            r.topic
                        );
                        return dead(Some(id), "oversized-output", msg, "oncely::OversizedOutput", 1);
                    }
                }
                Verdict::Forward(out.records)
            }
            Err(e) if e.class() == FailureClass::Reject => {
                dead(Some(id), "rejected", e.to_string(), &e.class_name(), attempts)
            }
            Err(e) if attempts >= s.settings.max_attempts => {
                dead(Some(id), "max-attempts", e.to_string(), &e.class_name(), attempts)
            }
            Err(e) => {
                self.attempts.insert(key.clone(), attempts);
                let delay = match e.class() {
                    FailureClass::RetryAfter(d) => d,
                    _ => backoff(&s.settings, attempts - 1),
                };
                Verdict::Retry { delay, error: e.to_string() }
            }
        }
    }

    fn send_outputs(&mut self, input: &Input, records: &[OutRecord]) -> Result<(), Fail> {
        for r in records {
            self.send(input, &r.topic, r.key.as_deref(), r.payload.as_deref(), &r.headers)?;
        }
        Ok(())
    }

    /// Dead-letters `input` in the open transaction, with Spring Kafka's
    /// headers ([`DeadLetter::headers`]).
    fn send_dead_letter(
        &mut self,
        input: &Input,
        id: Option<&EventId>,
        reason: &str,
        error: &str,
        class: &str,
        attempts: i32,
    ) -> Result<(), Fail> {
        let rec = &input.record;
        let name = self.shared.name.clone();
        let dl =
            DeadLetter { record: rec, event_id: id.map(EventId::display), reason, error, error_class: class, attempts };
        // The record's own headers byte for byte, then the dead-letter ones.
        let headers = dl.headers(&name);
        let topic = failure::dlt_topic(&rec.topic, &name);
        let size = rec.key.as_ref().map_or(0, Vec::len)
            + rec.payload.as_ref().map_or(0, Vec::len)
            + headers.iter().map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len)).sum::<usize>()
            + framing(headers.len());
        let limit = self.shared.dlt_limits.get(&topic).copied().unwrap_or(usize::MAX);
        if size > limit {
            return Err(Fail::Fatal(format!(
                "the dead letter of {}[{}]@{} is {size} bytes, over the max.message.bytes ({limit}) of `{topic}`; \
                 raise the dead-letter topic's limit",
                rec.topic, rec.partition, rec.offset
            )));
        }
        self.send(input, &topic, rec.key.as_deref(), rec.payload.as_deref(), &headers)?;
        let tallies = if self.frozen.is_some() {
            Some(self.next.get_or_insert_with(|| Txn::empty(0)))
        } else {
            self.txn.as_mut()
        };
        if let Some(t) = tallies {
            t.dead.push(DeadLettered {
                topic: rec.topic.to_string(),
                partition: rec.partition,
                offset: rec.offset,
                event_id: id.map(|i| i.to_string()).unwrap_or_default(),
                reason: reason.to_owned(),
                attempts,
                error: error.to_owned(),
            });
        }
        Ok(())
    }

    /// Sends one record into the open transaction.
    fn send(
        &mut self,
        input: &Input,
        topic: &str,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: &[(Vec<u8>, Option<Vec<u8>>)],
    ) -> Result<(), Fail> {
        let origin = (&*input.record.topic, input.record.partition, input.record.offset);
        if self.frozen.is_some() {
            // The open transaction is frozen: this record goes into the next one.
            self.buffer.push(Pending {
                origin: (origin.0.to_owned(), origin.1, origin.2),
                topic: topic.to_owned(),
                key: key.map(<[u8]>::to_vec),
                payload: payload.map(<[u8]>::to_vec),
                headers: headers.to_vec(),
            });
            return Ok(());
        }
        self.send_record(origin, topic, key, payload, headers)
    }

    /// Sends one record into the producer's open transaction.
    fn send_record(
        &mut self,
        origin: (&str, i32, i64),
        topic: &str,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: &[(Vec<u8>, Option<Vec<u8>>)],
    ) -> Result<(), Fail> {
        let txn = self.txn.as_ref().map_or(0, |t| t.seq);
        let origin_of = || Box::new(Origin { txn, topic: Arc::from(origin.0), partition: origin.1, offset: origin.2 });
        let p = self.producer()?;
        let mut rec: BaseRecord<'_, [u8], [u8], Box<Origin>> = BaseRecord::with_opaque_to(topic, origin_of())
            .headers(crate::kafka::headers_with_nulls(headers).map_err(|e| Fail::Fatal(e.to_string()))?);
        if let Some(k) = key {
            rec = rec.key(k);
        }
        if let Some(v) = payload {
            rec = rec.payload(v);
        }
        loop {
            match p.send(rec) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    // The local queue is full: serve deliveries, then try again.
                    rec = back;
                    p.poll(Duration::from_millis(10));
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge), _)) => {
                    // Outputs of this input may already be in the transaction:
                    // abort, and dead-letter the input when it is read again.
                    self.oversized.insert(((origin.0.to_owned(), origin.1), origin.2));
                    return Err(Fail::Abort(format!("a record to `{topic}` is larger than message.max.bytes")));
                }
                Err((e, _)) => return Err(self.classify(&e)),
            }
        }
    }

    /// Pauses a partition behind a record that waits for its retry.
    ///
    /// Two layers keep the partition's order, each enough alone (the retry
    /// test passes with either removed, fails with both): librdkafka's pause
    /// discards the records of the partition it had queued and fetches them
    /// again from the position after the last delivered one on resume; and
    /// any record delivered before the pause took effect waits in the
    /// `behind` queue.
    fn block(&mut self, c: &Cons, tp: &Tp, b: Blocked) {
        if let Some(p) = self.parts.get_mut(tp) {
            p.blocked = Some(b);
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&tp.0, tp.1);
        if let Err(e) = c.pause(&tpl) {
            tracing::warn!(error = %e, "Cannot pause a partition behind a failing event.");
        }
    }

    /// Retries the heads whose time has come; on success, the records behind
    /// them follow in order and the partition resumes.
    fn run_due_retries(&mut self, c: &Cons) -> Result<(), Fail> {
        let now = Instant::now();
        let due: Vec<Tp> = self
            .parts
            .iter()
            .filter(|(_, p)| p.blocked.as_ref().is_some_and(|b| b.next_at <= now))
            .map(|(tp, _)| tp.clone())
            .collect();
        for tp in due {
            let Some(mut b) = self.parts.get_mut(&tp).and_then(|p| p.blocked.take()) else { continue };
            let mut next = Some(b.head);
            while let Some(input) = next.take() {
                match self.process(input) {
                    Ok(None) => next = b.behind.pop_front(),
                    Ok(Some(again)) => {
                        b.head = again.head;
                        b.next_at = again.next_at;
                        if let Some(p) = self.parts.get_mut(&tp) {
                            p.blocked = Some(b);
                        }
                        return Ok(());
                    }
                    Err(f) => {
                        // Whatever the failure, the abort seeks back to the head.
                        return Err(f);
                    }
                }
            }
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&tp.0, tp.1);
            if let Err(e) = c.resume(&tpl) {
                tracing::warn!(error = %e, "Cannot resume a partition after its retry.");
            }
        }
        Ok(())
    }

    // -------------------------------------------------------- transactions

    /// Commits what is due. A due transaction whose records are still being
    /// acknowledged is frozen instead ([`freeze`](Self::freeze)), and
    /// committed once they are, while the loop goes on handling inputs.
    fn commit_due(&mut self, c: &Cons) -> Result<(), Fail> {
        if self.frozen.is_some() {
            let full = self
                .next
                .as_ref()
                .is_some_and(|n| n.commit_now || n.inputs as usize >= self.shared.settings.commit_every);
            if full || acknowledged(self.producer()?) {
                drain(self.producer()?, self.shared.settings.op_timeout);
                return self.commit_frozen(c);
            }
            return Ok(());
        }
        if !self.txn_due() {
            return self.check_liveness(c);
        }
        let now = self.txn.as_ref().is_some_and(|t| t.commit_now);
        if now || acknowledged(self.producer()?) {
            return self.commit(c, "due");
        }
        self.freeze();
        Ok(())
    }

    /// Freezes the open transaction: its offsets are fixed now, records of
    /// inputs handled from here on wait in the buffer for the next one.
    /// This hides the wait for the acknowledgements (most of a commit at
    /// full speed: 51 ms per 9,500-input transaction, measured) behind
    /// useful work.
    fn freeze(&mut self) {
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), p) in self.parts.iter_mut() {
            if let Some(next) = p.next_in_txn.take() {
                p.frozen_next = Some(next);
                // A valid topic and offset: this cannot fail.
                let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(next));
            }
        }
        self.frozen = Some(tpl);
    }

    /// Commits the frozen transaction (its records are acknowledged), then
    /// begins the next one with the buffered records.
    fn commit_frozen(&mut self, c: &Cons) -> Result<(), Fail> {
        let Some(tpl) = self.frozen.take() else { return Ok(()) };
        if let Err(f) = self.end_txn(c, &tpl, "frozen") {
            // Keep the state frozen for the abort, which clears it.
            self.frozen = Some(tpl);
            return Err(f);
        }
        for p in self.parts.values_mut() {
            if let Some(n) = p.frozen_next.take() {
                p.committed = Some(n);
            }
            let head = p.blocked.as_ref().map(|b| b.head.record.offset);
            p.rewind_to = match (p.after_freeze.take(), head) {
                (Some(a), Some(h)) => Some(a.min(h)),
                (a, h) => a.or(h),
            };
        }
        let Some(next) = self.next.take() else {
            self.buffer.clear();
            return Ok(());
        };
        self.ensure_txn()?;
        if let Some(t) = &mut self.txn {
            t.started = next.started;
            t.inputs = next.inputs;
            t.outputs = next.outputs;
            t.dead = next.dead;
            t.per_topic = next.per_topic;
            t.commit_now = next.commit_now;
        }
        for r in std::mem::take(&mut self.buffer) {
            let origin = (r.origin.0.as_str(), r.origin.1, r.origin.2);
            self.send_record(origin, &r.topic, r.key.as_deref(), r.payload.as_deref(), &r.headers)?;
        }
        Ok(())
    }

    /// Commits everything now: a frozen transaction first, then the open one
    /// (the input offsets with the group's metadata, then the commit).
    fn commit(&mut self, c: &Cons, why: &str) -> Result<(), Fail> {
        if self.frozen.is_some() {
            drain(self.producer()?, self.shared.settings.op_timeout);
            self.commit_frozen(c)?;
        }
        if self.txn.is_none() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), p) in &self.parts {
            if let Some(next) = p.next_in_txn {
                tpl.add_partition_offset(topic, *partition, Offset::Offset(next))
                    .map_err(|e| Fail::Abort(format!("offset list: {e}")))?;
            }
        }
        self.end_txn(c, &tpl, why)?;
        for p in self.parts.values_mut() {
            if let Some(next) = p.next_in_txn.take() {
                p.committed = Some(next);
            }
            p.rewind_to = p.blocked.as_ref().map(|b| b.head.record.offset);
        }
        Ok(())
    }

    /// Ends the producer's open transaction with `offsets`: sends them with
    /// the group's metadata, waits for the records' acknowledgements,
    /// commits, and logs and counts it.
    fn end_txn(&mut self, c: &Cons, offsets: &TopicPartitionList, why: &str) -> Result<(), Fail> {
        let Some(txn) = &self.txn else { return Ok(()) };
        let t0 = Instant::now();
        let timeout = self.shared.settings.op_timeout;
        if offsets.count() > 0 {
            let cgm = c.group_metadata().ok_or_else(|| Fail::Abort("the consumer has no group metadata".into()))?;
            self.retrying("send_offsets_to_transaction", |p| p.send_offsets_to_transaction(offsets, &cgm, timeout))?;
        }
        drain(self.producer()?, timeout);
        self.retrying("commit_transaction", |p| p.commit_transaction(timeout))?;
        let seconds = t0.elapsed().as_secs_f64();
        let per_topic: Vec<(String, u64, u64)> = txn.per_topic.iter().map(|(t, (p, d))| (t.clone(), *p, *d)).collect();
        events::TransactionCommitted {
            processor: &self.shared.name,
            inputs: txn.inputs,
            outputs: txn.outputs,
            dead: txn.dead.len() as u64,
            seconds,
            per_topic: &per_topic,
        }
        .emit();
        for d in &txn.dead {
            d.emit(&self.shared.name);
        }
        tracing::trace!(processor = %self.shared.name, why, "Transaction committed.");
        self.txn = None;
        self.consecutive_aborts = 0;
        self.last_txn_end = Instant::now();
        let seq = self.txn_seq;
        lock(&self.producer()?.context().failed).retain(|f| f.txn > seq);
        Ok(())
    }

    /// Aborts the open transaction and seeks every partition (except those
    /// in `leaving`, being revoked) back to its first uncommitted record.
    fn abort(&mut self, c: &Cons, reason: &str, leaving: &HashSet<Tp>) -> Result<(), Fail> {
        let inputs = self.txn.as_ref().map_or(0, |t| t.inputs);
        let seq = self.txn.as_ref().map(|t| t.seq);
        if self.txn.is_some() {
            let timeout = self.shared.settings.op_timeout;
            // librdkafka's abort waits for the delivery reports of the
            // records it purges, which only a poll on this thread serves:
            // purge and serve them first (refusals among them are kept).
            let p = self.producer()?;
            p.purge(PurgeConfig::default().queue().inflight());
            drain(p, timeout);
            self.retrying("abort_transaction", |p| p.abort_transaction(timeout)).map_err(|f| match f {
                Fail::Abort(d) => Fail::Fatal(format!("abort_transaction failed: {d}")),
                other => other,
            })?;
        }
        self.txn = None;
        // Records buffered for the next transaction are dropped with it:
        // their inputs are read again from `rewind_to` like the rest.
        self.frozen = None;
        self.next = None;
        self.buffer.clear();
        events::TransactionAborted {
            processor: &self.shared.name,
            transactional_id: &self.shared.transactional_id,
            inputs,
            reason,
        }
        .emit();
        self.learn_from_refusals(seq);
        for (tp, p) in self.parts.iter_mut() {
            p.next_in_txn = None;
            p.frozen_next = None;
            p.after_freeze = None;
            let was_blocked = p.blocked.take().is_some();
            let Some(to) = p.rewind_to.take() else { continue };
            // Read again from `to`: a delivery from before the seek is dropped.
            p.last_seen = Some(to - 1);
            if leaving.contains(tp) {
                continue;
            }
            if let Err(e) = c.seek(&tp.0, tp.1, Offset::Offset(to), Duration::from_secs(10)) {
                // The partition cannot be read again from here: an error the
                // loop cannot repair (its records would be skipped).
                return Err(Fail::Fatal(format!("cannot seek {}[{}] back to {to} after an abort: {e}", tp.0, tp.1)));
            }
            if was_blocked {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition(&tp.0, tp.1);
                let _ = c.resume(&tpl);
            }
        }
        self.consecutive_aborts += 1;
        self.last_txn_end = Instant::now();
        let wait = backoff(&self.shared.settings, self.consecutive_aborts.saturating_sub(1));
        self.resume_at = Some(Instant::now() + wait);
        Ok(())
    }

    /// After an abort: which inputs had outputs the broker refused as too
    /// large? One alone is dead-lettered when read again; several run
    /// alone next time, to tell which.
    fn learn_from_refusals(&mut self, seq: Option<u64>) {
        let Some(p) = &self.producer else { return };
        // Serve the delivery reports still queued (the refusal may have
        // made the transaction abortable before its report was served).
        drain(p, Duration::from_secs(5));
        let failed = std::mem::take(&mut *lock(&p.context().failed));
        let mut suspects: HashSet<(Tp, i64)> = HashSet::new();
        for f in failed {
            if Some(f.txn) != seq {
                continue;
            }
            tracing::warn!(processor = %self.shared.name, topic = %f.input.0, partition = f.input.1, offset = f.input.2, error = %f.code, "A record of the aborted transaction was refused by the broker.");
            if matches!(f.code, RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidRecord) {
                suspects.insert(((f.input.0, f.input.1), f.input.2));
            }
        }
        match suspects.len() {
            0 => {}
            1 => self.oversized.extend(suspects),
            _ => self.isolate.extend(suspects),
        }
    }

    /// When idle for the liveness interval: a transaction that commits the
    /// offsets this instance committed last, again (a no-op for the group),
    /// so that the transaction coordinator checks the producer's epoch. A
    /// fenced instance without traffic learns it this way, within the
    /// interval, instead of holding its partitions as a silent zombie.
    fn check_liveness(&mut self, c: &Cons) -> Result<(), Fail> {
        if self.txn.is_some() || self.frozen.is_some() || self.last_txn_end.elapsed() < self.shared.settings.liveness {
            return Ok(());
        }
        self.last_txn_end = Instant::now();
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), p) in &self.parts {
            if let Some(o) = p.committed {
                tpl.add_partition_offset(topic, *partition, Offset::Offset(o))
                    .map_err(|e| Fail::Abort(format!("offset list: {e}")))?;
            }
        }
        if tpl.count() == 0 {
            return Ok(());
        }
        let Some(cgm) = c.group_metadata() else { return Ok(()) };
        let timeout = self.shared.settings.op_timeout;
        self.ensure_txn()?;
        self.retrying("send_offsets_to_transaction", |p| p.send_offsets_to_transaction(&tpl, &cgm, timeout))?;
        self.retrying("commit_transaction", |p| p.commit_transaction(timeout))?;
        self.txn = None;
        tracing::trace!(processor = %self.shared.name, "Liveness transaction committed.");
        Ok(())
    }

    /// Commits, or aborts when the commit fails: for a revoke and a shutdown.
    fn finish_txn(&mut self, c: &Cons, why: &str) -> Result<(), Fail> {
        self.finish_txn_leaving(c, why, &HashSet::new())
    }

    fn finish_txn_leaving(&mut self, c: &Cons, why: &str, leaving: &HashSet<Tp>) -> Result<(), Fail> {
        if self.txn.is_none() || self.producer.is_none() {
            return Ok(());
        }
        match self.commit(c, why) {
            Ok(()) => Ok(()),
            Err(Fail::Abort(reason)) => self.abort(c, &reason, leaving),
            Err(f) => Err(f),
        }
    }

    // ----------------------------------------------------------- rebalance

    fn on_assign(&mut self, base: &Cons, tpl: &TopicPartitionList) {
        let parts: Vec<Tp> = tpl.elements().iter().map(|e| (e.topic().to_owned(), e.partition())).collect();
        tracing::info!(processor = %self.shared.name, partitions = ?parts, "Partitions assigned.");
        for tp in parts {
            self.parts.insert(tp, Part::default());
        }
        let res = if matches!(base.rebalance_protocol(), RebalanceProtocol::Cooperative) {
            base.incremental_assign(tpl)
        } else {
            base.assign(tpl)
        };
        if let Err(e) = res {
            tracing::error!(processor = %self.shared.name, error = %e, "Assigning partitions failed.");
        }
    }

    fn on_revoke(&mut self, base: &Cons, tpl: &TopicPartitionList) {
        let leaving: HashSet<Tp> = tpl.elements().iter().map(|e| (e.topic().to_owned(), e.partition())).collect();
        let lost = base.assignment_lost();
        tracing::info!(processor = %self.shared.name, partitions = ?leaving, lost, "Partitions revoked.");
        if self.stop.is_none() {
            let r = if lost {
                // The group has moved on: our offsets would be refused.
                if self.txn.is_some() {
                    self.abort(base, "the assignment was lost", &leaving)
                } else {
                    Ok(())
                }
            } else {
                // Commit before the partitions go, so their new owner starts
                // right after what this transaction handled.
                self.finish_txn_leaving(base, "revoke", &leaving)
            };
            if let Err(f) = r {
                self.stop = f.into_stop();
            }
        }
        for tp in &leaving {
            self.parts.remove(tp);
        }
        let res = if matches!(base.rebalance_protocol(), RebalanceProtocol::Cooperative) {
            base.incremental_unassign(tpl)
        } else {
            base.unassign()
        };
        if let Err(e) = res {
            tracing::error!(processor = %self.shared.name, error = %e, "Unassigning partitions failed.");
        }
    }
}

/// Serves delivery reports until nothing is in flight, or `timeout`.
///
/// librdkafka's commit and abort need the reports served first, by a poll
/// on this thread. rdkafka's `BaseProducer::flush` does it in steps of
/// 100 ms (its `poll` blocks for its whole timeout), which added up to
/// 100 ms to every commit (measured: 105 ms per commit at 500 events/s);
/// this waits in steps of 1 ms. Whatever is left when it gives up, the
/// commit's own flush waits for.
fn drain(p: &TxnProducer, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while p.in_flight_count() > 0 && Instant::now() < deadline {
        p.poll(Duration::from_millis(1));
    }
}

/// Whether every record sent so far is acknowledged (the reports served).
fn acknowledged(p: &TxnProducer) -> bool {
    for _ in 0..16 {
        if p.in_flight_count() == 0 {
            return true;
        }
        p.poll(Duration::ZERO);
    }
    p.in_flight_count() == 0
}

/// Fencing, in its three spellings: the broker's `PRODUCER_FENCED` and
/// `INVALID_PRODUCER_EPOCH`, and librdkafka's normalised `__FENCED`.
fn is_fencing(code: RDKafkaErrorCode) -> bool {
    matches!(code, RDKafkaErrorCode::ProducerFenced | RDKafkaErrorCode::InvalidProducerEpoch | RDKafkaErrorCode::Fenced)
}

/// The wait before retry `attempt`: the one [`crate::backoff::Backoff`] of
/// lanes, effects and the relay (`base * 2^attempt`, capped at `max`, full
/// jitter above a tenth of the step).
fn backoff(s: &Settings, attempt: u32) -> Duration {
    crate::backoff::Backoff::new(s.backoff_base, s.backoff_max).delay(attempt)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            commit_every: 1,
            commit_interval: Duration::from_millis(100),
            max_attempts: 5,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
            on_fenced: FencedPolicy::Stop,
            op_timeout: Duration::from_secs(1),
            liveness: Duration::from_secs(5),
        }
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let s = settings();
        for _ in 0..200 {
            let d = backoff(&s, 0);
            assert!(d >= Duration::from_millis(10) && d <= Duration::from_millis(100), "{d:?}");
            let d = backoff(&s, 30);
            assert!(d >= Duration::from_millis(200) && d <= Duration::from_secs(2), "{d:?}");
        }
    }

    #[test]
    fn the_three_fencing_codes_are_fencing() {
        for c in [RDKafkaErrorCode::ProducerFenced, RDKafkaErrorCode::InvalidProducerEpoch, RDKafkaErrorCode::Fenced] {
            assert!(is_fencing(c), "{c:?}");
        }
        assert!(!is_fencing(RDKafkaErrorCode::MessageSizeTooLarge));
        assert!(!is_fencing(RDKafkaErrorCode::ConcurrentTransactions));
    }
}
