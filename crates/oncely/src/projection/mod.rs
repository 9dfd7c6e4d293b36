//! Projection rebuilds: replay a topic into a parallel copy of a projection
//! with the consumer's **current** handler, side effects off; validate it
//! against the live one; swap it in atomically; swap back if need be.
//!
//! A [`Projection`] names the tables a consumer's handler writes (its
//! projection) and the statements that create them empty. A rebuild
//! ([`Projection::rebuild`]) runs the live consumer's builder, unchanged,
//! under another name (`<consumer>.rebuild.<target>`: its own inbox,
//! offsets, entity versions and dead letters), with:
//!
//! - the handler's unqualified SQL in the shadow schema `<target>`
//!   (`search_path` set per transaction);
//! - effects recorded as `suppressed` (replay mode) and `cx.publish`
//!   writing nothing, and no effect executor: a rebuild never calls anyone;
//! - every partition assigned without joining the live group (no rebalance
//!   of the live consumer);
//! - never past the live consumer's position: it catches up and follows,
//!   so a swap never moves the live consumer forward past events whose
//!   effects it has not recorded.
//!
//! Its offsets are in `oncely.offsets` like any consumer's: killed, it
//! resumes where its last batch committed.
//!
//! [`compare`] (and its audited form [`ops::diff`]) compares live and rebuilt tables (row counts, checksums, a
//! sample of differing rows). The swap ([`ops`]) is an operator action
//! (preview → confirm → execute, audited): in one PostgreSQL transaction
//! that holds every partition's offsets row of both consumers (the fence:
//! open batches finish first, new ones wait), the projection's tables are
//! exchanged between the live schema and the target, and the positions,
//! inbox rows, entity versions and dead letters between the live consumer
//! and the rebuild. The live consumer then goes on from the rebuild's positions
//! with the rebuild's inbox: no event is applied twice or skipped. The
//! target keeps the previous projection, and swap-back is the same exchange
//! again.
//!
//! ```no_run
//! # use oncely::{Consumer, Cx, Event, HandlerError};
//! # async fn on_order(ev: Event<serde_json::Value>, cx: &mut Cx) -> Result<(), HandlerError> { Ok(()) }
//! # async fn run(pool: sqlx::PgPool) -> oncely::Result<()> {
//! use oncely::projection::{Projection, RebuildFrom};
//! let billing = Projection::new("billing")
//!     .table("invoices")
//!     .create_sql("CREATE TABLE invoices (order_id text PRIMARY KEY, amount bigint, tax bigint)");
//! let consumer = || Consumer::builder("billing").bootstrap_servers("127.0.0.1:9092").pool(pool.clone())
//!     .topic("orders").handler(on_order);
//! // The rebuild, beside (not instead of) the live consumer:
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! billing.rebuild(consumer(), "billing_v2").from(RebuildFrom::Earliest).run(shutdown).await?;
//! # Ok(()) }
//! ```

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::consumer::ConsumerBuilder;
use crate::error::{Error, Result};
use crate::store;
pub use crate::store::projection::{Dropped, Exchanged, PartitionPositions, RebuildRow, RequestRow};

pub mod ops;

/// A consumer's projection: the tables its handler writes, and how to
/// create them empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Projection {
    name: String,
    schema: String,
    tables: Vec<String>,
    create_sql: String,
    diff_ignore: Vec<String>,
    shadow_topics: bool,
}

impl Projection {
    /// A projection named `name` (for people and `oncely projection
    /// swap-back <name>`), with its tables in schema `public`.
    pub fn new(name: impl Into<String>) -> Self {
        Projection {
            name: name.into(),
            schema: "public".into(),
            tables: Vec::new(),
            create_sql: String::new(),
            diff_ignore: Vec::new(),
            shadow_topics: false,
        }
    }

    /// The schema of the live tables. Default `public`. The handler must
    /// write them unqualified (a rebuild points `search_path` at its shadow
    /// schema); a table it writes and the projection does not declare
    /// fails in a rebuild instead of landing in the live schema.
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// A table of the projection (call again for more). At least one.
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.tables.push(table.into());
        self
    }

    /// The statements that create the tables empty, with unqualified names
    /// (they run with `search_path` set to the shadow schema). Required.
    pub fn create_sql(mut self, sql: impl Into<String>) -> Self {
        self.create_sql = sql.into();
        self
    }

    /// A column [`compare`] leaves out of its checksums and samples (a
    /// timestamp of when a row was written, which process wrote it).
    /// Default: none.
    pub fn diff_ignore(mut self, column: impl Into<String>) -> Self {
        self.diff_ignore.push(column.into());
        self
    }

    /// During a rebuild, `cx.publish` writes to the shadow topic
    /// `<topic>.rebuild.<target>` instead of writing nothing (the default),
    /// so that what the fixed code publishes can be checked downstream
    /// before the swap. The outbox relay publishes them like any row:
    /// create the shadow topics first (or let the broker auto-create them);
    /// a missing topic is set aside after librdkafka's propagation bound.
    /// Effects stay suppressed either way.
    pub fn publish_to_shadow_topics(mut self) -> Self {
        self.shadow_topics = true;
        self
    }

    /// The projection's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A rebuild of this projection into schema `target`, running
    /// `consumer` (the live consumer's builder, with its current handler)
    /// under the rebuild's name. See [`Rebuild::run`].
    pub fn rebuild<S: Send + Sync + 'static>(
        &self,
        consumer: ConsumerBuilder<S>,
        target: impl Into<String>,
    ) -> Rebuild<S> {
        Rebuild { projection: self.clone(), target: target.into(), consumer, from: RebuildFrom::Earliest }
    }

    /// Runs the rebuilds of this projection that an operator asks for
    /// (`oncely projection rebuild --consumer <name> --into <target>`: the
    /// command line cannot run the application's handler, the application
    /// can), and resumes the ones still rebuilding after a restart, until
    /// `shutdown` is cancelled. `consumer` makes the live consumer's builder,
    /// with the current handler, for each run.
    ///
    /// Several processes may serve the same projection: one process at a
    /// time runs a target (a PostgreSQL advisory lock), and another takes it
    /// over when that process dies. A run that fails is tried again after
    /// [`SERVE_RETRY`]; a rebuild swapped in stops, and runs again only if
    /// it is swapped back.
    pub fn serve<S, F>(
        &self,
        consumer: F,
        shutdown: CancellationToken,
    ) -> futures::future::BoxFuture<'static, Result<()>>
    where
        S: Send + Sync + 'static,
        F: Fn() -> Result<ConsumerBuilder<S>> + Send + Sync + 'static,
    {
        let projection = self.clone();
        Box::pin(async move { serve(projection, consumer, shutdown).await })
    }

    fn check(&self, target: &str) -> Result<()> {
        check_target(target, Some(&self.schema))?;
        let bad = |what: &str, v: &str| {
            Error::Config(format!(
                "{what} {v:?} is not an identifier oncely accepts (lower-case letters, digits and _, at most 48 bytes)"
            ))
        };
        if !store::projection::valid_identifier(&self.schema) {
            return Err(bad("schema", &self.schema));
        }
        if self.tables.is_empty() {
            return Err(Error::Config(format!("projection {} declares no table", self.name)));
        }
        if let Some(t) = self.tables.iter().find(|t| !store::projection::valid_identifier(t)) {
            return Err(bad("table", t));
        }
        if self.create_sql.trim().is_empty() {
            return Err(Error::Config(format!("projection {} has no create statements", self.name)));
        }
        Ok(())
    }
}

/// Whether `target` may be a rebuild's schema: an identifier oncely accepts,
/// not reserved, not the live schema (`public` when not known).
fn check_target(target: &str, live_schema: Option<&str>) -> Result<()> {
    if !store::projection::valid_identifier(target) {
        return Err(Error::Config(format!(
            "rebuild target {target:?} is not an identifier oncely accepts (lower-case letters, digits and _, at most 48 bytes)"
        )));
    }
    if target == live_schema.unwrap_or("public")
        || target == "public"
        || target == "oncely"
        || target.starts_with("pg_")
        || target.starts_with("oncely_")
    {
        return Err(Error::Config(format!("rebuild target {target:?} is a reserved or live schema")));
    }
    Ok(())
}

/// The consumer name a rebuild runs as: its inbox, offsets, entity versions
/// and dead letters (`<topic>.<consumer>.rebuild.<target>.dlt`).
pub fn rebuild_consumer_name(consumer: &str, target: &str) -> String {
    format!("{consumer}.rebuild.{target}")
}

/// Where a rebuild starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum RebuildFrom {
    /// The start of every partition's log (default): the whole history the
    /// topic still holds.
    #[default]
    Earliest,
    /// The first record at or after this time in each partition (the
    /// projection's tables must not need what came before).
    Time(DateTime<Utc>),
    /// The offsets of a stored offset snapshot (`oncely offsets snapshots`),
    /// for example the live group's position on the day the bug shipped;
    /// partitions the snapshot has no offset for start at the log start.
    /// Like [`RebuildFrom::Time`], for projections that do not need what
    /// came before.
    Snapshot(i64),
}

impl RebuildFrom {
    /// The stored form: `earliest`, an RFC 3339 time, or `snapshot:<id>`.
    pub fn spec(&self) -> String {
        match self {
            RebuildFrom::Earliest => "earliest".into(),
            RebuildFrom::Time(t) => t.to_rfc3339(),
            RebuildFrom::Snapshot(id) => format!("snapshot:{id}"),
        }
    }

    /// Parses what [`spec`](RebuildFrom::spec) writes, and what an operator
    /// types: `earliest`, an RFC 3339 time (`2026-11-14T00:00:00Z`), or a
    /// snapshot id (`snapshot:42` or `42`).
    pub fn parse(s: &str) -> Result<Self> {
        let s = s.trim();
        if s == "earliest" {
            return Ok(RebuildFrom::Earliest);
        }
        let id = s.strip_prefix("snapshot:").unwrap_or(s);
        if !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) {
            return id
                .parse()
                .map(RebuildFrom::Snapshot)
                .map_err(|_| Error::Config(format!("snapshot id {id:?} is out of range")));
        }
        DateTime::parse_from_rfc3339(s).map(|t| RebuildFrom::Time(t.with_timezone(&Utc))).map_err(|_| {
            Error::Config(format!(
                "a rebuild starts from `earliest`, an RFC 3339 time (2026-11-14T00:00:00Z) or a snapshot id, not {s:?}"
            ))
        })
    }
}

/// A rebuild about to run; see [`Projection::rebuild`].
pub struct Rebuild<S = ()> {
    projection: Projection,
    target: String,
    consumer: ConsumerBuilder<S>,
    from: RebuildFrom,
}

impl<S> std::fmt::Debug for Rebuild<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rebuild")
            .field("projection", &self.projection.name)
            .field("target", &self.target)
            .field("from", &self.from)
            .finish_non_exhaustive()
    }
}

/// How often a running rebuild checks that it was not swapped.
const STATE_POLL: Duration = Duration::from_millis(500);

impl<S: Send + Sync + 'static> Rebuild<S> {
    /// Where the rebuild starts. Default [`RebuildFrom::Earliest`]. Only the
    /// first run of a target uses it: a restarted rebuild resumes.
    pub fn from(mut self, from: RebuildFrom) -> Self {
        self.from = from;
        self
    }

    /// Creates the shadow schema and its empty tables (first run) and runs
    /// the rebuild until `shutdown` is cancelled, or until it is swapped in
    /// (then it returns `Ok`). It catches up with the live consumer and then
    /// follows it. Restarted after a crash (even SIGKILL) it resumes from
    /// its own offsets. Refused for a target that was swapped.
    pub fn run(self, shutdown: CancellationToken) -> futures::future::BoxFuture<'static, Result<()>> {
        Box::pin(async move {
            let target = self.target.clone();
            match self.run_inner(shutdown, None).await? {
                Ran::Done => Ok(()),
                Ran::Busy => Err(Error::Refused(format!(
                    "rebuild {target} is running in another process (one process at a time runs a target)"
                ))),
            }
        })
    }

    /// Runs the rebuild, holding `held` (the lock of
    /// [`store::projection::try_lock_running`], taken by the caller) or
    /// taking it; `Busy` when another process holds it.
    async fn run_inner(mut self, shutdown: CancellationToken, held: Option<sqlx::PgConnection>) -> Result<Ran> {
        self.projection.check(&self.target)?;
        let live = self.consumer.name().to_owned();
        let name = rebuild_consumer_name(&live, &self.target);
        let pool = self.consumer.resolve_pool().await?;
        store::migrate(&pool).await?;
        // One process at a time: two would process the same partitions
        // under one name. Held until this returns (or the process dies).
        let _running = match held {
            Some(lock) => lock,
            None => match store::projection::try_lock_running(&pool, &self.target).await? {
                Some(lock) => lock,
                None => return Ok(Ran::Busy),
            },
        };
        let p = &self.projection;
        let (row, created) = store::projection::prepare(
            pool.clone(),
            store::projection::NewRebuild {
                target: self.target.clone(),
                projection: p.name.clone(),
                consumer: live.clone(),
                rebuild_consumer: name.clone(),
                live_schema: p.schema.clone(),
                tables: p.tables.clone(),
                diff_ignore: p.diff_ignore.clone(),
                from_spec: self.from.spec(),
                create_sql: p.create_sql.clone(),
            },
        )
        .await?;
        if created {
            tracing::info!(projection = %p.name, target = %self.target, consumer = %live, from = %row.from_spec, "Created the rebuild's shadow schema.");
        } else {
            tracing::info!(projection = %p.name, target = %self.target, consumer = %live, "Resuming the rebuild.");
        }
        // From what the row says (a restart keeps its first start), every
        // time: seeding keeps a position already there, so a crash between
        // creating the schema and seeding is harmless.
        match RebuildFrom::parse(&row.from_spec)? {
            RebuildFrom::Earliest => {}
            RebuildFrom::Time(t) => self.seed_positions(&pool, &name, t).await?,
            RebuildFrom::Snapshot(id) => seed_from_snapshot(&pool, &name, id).await?,
        }
        let stop = shutdown.child_token();
        let watcher = tokio::spawn(watch_state(pool.clone(), self.target.clone(), stop.clone()));
        let shadow = self.projection.shadow_topics.then(|| format!(".rebuild.{}", self.target));
        self.consumer.make_rebuild(name, store::projection::quote_ident(&self.target), shadow);
        let result = self.consumer.run(stop.clone()).await;
        stop.cancel();
        watcher.abort();
        result.map(|()| Ran::Done)
    }

    /// Writes the rebuild's first positions: per partition, the first
    /// offset at or after `t` (the log end where there is none).
    async fn seed_positions(&self, pool: &PgPool, name: &str, t: DateTime<Utc>) -> Result<()> {
        use crate::kafka::admin::{KafkaAdmin, OffsetSpec};
        let connection = self
            .consumer
            .kafka_connection()
            .cloned()
            .ok_or_else(|| Error::Config("bootstrap_servers (or a connection) is required".into()))?;
        let admin = KafkaAdmin::new(&connection, &[])?.read_committed(true);
        let mut partitions = Vec::new();
        for topic in self.consumer.topics() {
            for p in admin.topic_partitions(topic).await? {
                partitions.push((topic.clone(), p));
            }
        }
        // The ends first: a record written between the two lookups is then
        // after the end taken, never skipped.
        let ends = admin.list_offsets(&partitions, OffsetSpec::Latest).await?;
        let at = admin.list_offsets(&partitions, OffsetSpec::Timestamp(t.timestamp_millis())).await?;
        let mut found = Vec::new();
        for (at, end) in at.into_iter().zip(ends) {
            // No record at or after `t` yet: the partition's end.
            let offset = at
                .offset()
                .or(end.offset())
                .ok_or_else(|| Error::Config(format!("no end offset for {} [{}]", end.topic, end.partition)))?;
            found.push((at.topic, at.partition, offset));
        }
        for (topic, partition, offset) in found {
            store::projection::seed_position(pool, name, &topic, partition, offset).await?;
        }
        Ok(())
    }
}

/// How often [`Projection::serve`] looks for requests.
const SERVE_POLL: Duration = Duration::from_secs(1);

/// How long [`Projection::serve`] waits before running a target again
/// whose run failed.
pub const SERVE_RETRY: Duration = Duration::from_secs(10);

async fn serve<S, F>(projection: Projection, consumer: F, shutdown: CancellationToken) -> Result<()>
where
    S: Send + Sync + 'static,
    F: Fn() -> Result<ConsumerBuilder<S>> + Send + Sync + 'static,
{
    use std::collections::HashMap;
    let mut first = consumer()?;
    let live = first.name().to_owned();
    let pool = first.resolve_pool().await?;
    drop(first);
    store::migrate(&pool).await?;
    tracing::info!(projection = %projection.name, consumer = %live, "Serving the projection's rebuild requests.");
    let mut running: HashMap<String, tokio::task::JoinHandle<Result<Ran>>> = HashMap::new();
    let mut not_before: HashMap<String, tokio::time::Instant> = HashMap::new();
    loop {
        let ended: Vec<String> = running.iter().filter(|(_, h)| h.is_finished()).map(|(t, _)| t.clone()).collect();
        for target in ended {
            let Some(handle) = running.remove(&target) else { continue };
            match handle.await {
                Ok(Ok(Ran::Done)) => tracing::info!(target = %target, "The rebuild stopped."),
                Ok(Ok(Ran::Busy)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(target = %target, error = %e, retry_in = ?SERVE_RETRY, "The rebuild failed.");
                    not_before.insert(target, tokio::time::Instant::now() + SERVE_RETRY);
                }
                Err(e) => {
                    tracing::error!(target = %target, error = %e, retry_in = ?SERVE_RETRY, "The rebuild's task ended abnormally.");
                    not_before.insert(target, tokio::time::Instant::now() + SERVE_RETRY);
                }
            }
        }
        if shutdown.is_cancelled() {
            for (_, handle) in running {
                let _ = handle.await;
            }
            return Ok(());
        }
        match store::projection::runnable(&pool, &live, &projection.name).await {
            Ok(requests) => {
                let now = tokio::time::Instant::now();
                for req in requests {
                    if running.contains_key(&req.target) || not_before.get(&req.target).is_some_and(|t| *t > now) {
                        continue;
                    }
                    // Another process runs it: nothing to build or start
                    // (asked again at the next poll, in case it died).
                    let lock = match store::projection::try_lock_running(&pool, &req.target).await {
                        Ok(Some(lock)) => lock,
                        Ok(None) => continue,
                        Err(e) => {
                            tracing::warn!(target = %req.target, error = %e, "Cannot take the rebuild's lock.");
                            continue;
                        }
                    };
                    let built = RebuildFrom::parse(&req.from_spec).and_then(|from| Ok((from, consumer()?)));
                    let (from, builder) = match built {
                        Ok(b) => b,
                        Err(e) => {
                            tracing::warn!(target = %req.target, error = %e, "Cannot start the requested rebuild.");
                            not_before.insert(req.target.clone(), now + SERVE_RETRY);
                            continue;
                        }
                    };
                    let rebuild = projection.rebuild(builder, req.target.clone()).from(from);
                    let run: futures::future::BoxFuture<'static, Result<Ran>> =
                        Box::pin(rebuild.run_inner(shutdown.child_token(), Some(lock)));
                    running.insert(req.target, tokio::spawn(run));
                }
            }
            Err(e) => tracing::warn!(projection = %projection.name, error = %e, "Cannot read the rebuild requests."),
        }
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = tokio::time::sleep(SERVE_POLL) => {}
        }
    }
}

/// How a run ended.
enum Ran {
    /// Stopped, or swapped in.
    Done,
    /// Another process runs the target.
    Busy,
}

/// Seeds a rebuild's positions from offset snapshot `id`.
async fn seed_from_snapshot(pool: &PgPool, name: &str, id: i64) -> Result<()> {
    let snap = crate::admin::snapshots::get(pool, id)
        .await?
        .ok_or_else(|| Error::Refused(format!("no offset snapshot {id}")))?;
    for ((topic, partition), offset) in snap.committed() {
        store::projection::seed_position(pool, name, &topic, partition, offset).await?;
    }
    Ok(())
}

/// Stops a running rebuild once it is swapped in (its schema then holds
/// the previous live projection, which it must not write), or dropped.
async fn watch_state(pool: PgPool, target: String, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(STATE_POLL) => {}
        }
        match store::projection::get(&pool, &target).await {
            Ok(Some(row)) if row.state != "rebuilding" => {
                tracing::info!(target = %target, "The rebuild was swapped in; stopping it.");
                stop.cancel();
                return;
            }
            Ok(None) => {
                tracing::info!(target = %target, "The rebuild was dropped; stopping it.");
                stop.cancel();
                return;
            }
            _ => {}
        }
    }
}

/// How far a rebuild is from the live consumer, from their positions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Lag {
    /// Records the rebuild still has to process to reach the live
    /// consumer's positions (sum over partitions).
    pub behind: i64,
    /// Records the rebuild processed that the live consumer has not
    /// (possible only if the live consumer was moved back).
    pub ahead: i64,
    /// Partitions the live consumer has a position on and the rebuild not.
    pub missing: Vec<(String, i32)>,
}

/// Computes the [`Lag`]. Pure.
pub fn lag_of(positions: &[PartitionPositions]) -> Lag {
    let mut lag = Lag::default();
    for p in positions {
        match (p.live, p.rebuild) {
            (Some(l), Some(r)) if l >= r => lag.behind += l - r,
            (Some(l), Some(r)) => lag.ahead += r - l,
            (Some(l), None) => {
                lag.behind += l;
                lag.missing.push((p.topic.clone(), p.partition));
            }
            (None, Some(r)) => lag.ahead += r,
            (None, None) => {}
        }
    }
    lag
}

/// Where a rebuild is: its row, the positions, the lag behind live, and
/// what it did besides applying events.
#[derive(Debug, Clone, Serialize)]
pub struct RebuildStatus {
    /// The rebuild's row (state, last diff, swaps).
    pub rebuild: RebuildRow,
    /// Per partition, the live consumer's and the rebuild's next offsets.
    pub partitions: Vec<PartitionPositions>,
    /// The lag behind the live consumer.
    pub lag: Lag,
    /// The rebuild's parked events (a swap is refused while it has any).
    pub parked: i64,
    /// The rebuild's dead-lettered records.
    pub dead_letters: i64,
    /// The rebuild's effect intents by status: all `suppressed`.
    pub effects: Vec<(String, i64)>,
}

/// Every rebuild, newest first.
pub async fn list(pool: &PgPool) -> Result<Vec<RebuildRow>> {
    store::projection::list(pool).await
}

/// The operator's request for rebuild `target` (`oncely projection
/// rebuild`), if any: it waits until an application serving the projection
/// ([`Projection::serve`]) starts it.
pub async fn request(pool: &PgPool, target: &str) -> Result<Option<RequestRow>> {
    store::projection::get_request(pool, target).await
}

impl RebuildStatus {
    /// The offsets the rebuild has passed and the live consumer's, each
    /// summed over partitions: its progress is the first over the second.
    pub fn offsets(&self) -> (i64, i64) {
        self.partitions.iter().fold((0, 0), |(r, l), p| (r + p.rebuild.unwrap_or(0), l + p.live.unwrap_or(0)))
    }
}

/// The status of rebuild `target`.
pub async fn status(pool: &PgPool, target: &str) -> Result<RebuildStatus> {
    let rebuild =
        store::projection::get(pool, target).await?.ok_or_else(|| Error::Refused(format!("no rebuild {target}")))?;
    let partitions = store::projection::positions(pool, &rebuild.consumer, &rebuild.rebuild_consumer).await?;
    let lag = lag_of(&partitions);
    let mut conn = pool.acquire().await?;
    let parked = store::projection::parked_count(&mut conn, &rebuild.rebuild_consumer).await?;
    drop(conn);
    let dead_letters = store::projection::dead_letter_count(pool, &rebuild.rebuild_consumer).await?;
    let effects = store::projection::effect_counts(pool, &rebuild.rebuild_consumer).await?;
    Ok(RebuildStatus { rebuild, partitions, lag, parked, dead_letters, effects })
}

/// One table, live against rebuilt.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TableDiff {
    /// Table name.
    pub table: String,
    /// Rows in the live table.
    pub live_rows: i64,
    /// Rows in the rebuilt table.
    pub rebuilt_rows: i64,
    /// Checksum of the live rows.
    pub live_checksum: String,
    /// Checksum of the rebuilt rows.
    pub rebuilt_checksum: String,
    /// Whether the tables hold the same rows (ignored columns aside).
    pub equal: bool,
    /// A sample of rows only the live table has.
    pub only_live: Vec<Value>,
    /// A sample of rows only the rebuilt table has.
    pub only_rebuilt: Vec<Value>,
}

/// The diff of a rebuild: each table, live against the target schema.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DiffReport {
    /// The rebuild target.
    pub target: String,
    /// Per table.
    pub tables: Vec<TableDiff>,
    /// Whether every table is equal.
    pub equal: bool,
}

/// Compares live and rebuilt tables of rebuild `target`: row counts,
/// checksums (MD5 over each row's JSON, ignored columns left out), and up
/// to `sample` differing rows each way. While the state is `swapped` the
/// target holds the previous projection, so this compares the new live
/// tables with the old.
///
/// Reads only: it is not the diff a swap requires. That one is
/// [`ops::diff`], which records in the audit log who compared what, when.
pub async fn compare(pool: &PgPool, target: &str, sample: i64) -> Result<DiffReport> {
    let row =
        store::projection::get(pool, target).await?.ok_or_else(|| Error::Refused(format!("no rebuild {target}")))?;
    let mut tables = Vec::new();
    for t in &row.tables {
        let (live_rows, live_checksum) =
            store::projection::table_checksum(pool, &row.live_schema, t, &row.diff_ignore).await?;
        let (rebuilt_rows, rebuilt_checksum) =
            store::projection::table_checksum(pool, &row.target, t, &row.diff_ignore).await?;
        let equal = live_rows == rebuilt_rows && live_checksum == rebuilt_checksum;
        let (only_live, only_rebuilt) = if equal {
            (Vec::new(), Vec::new())
        } else {
            let live = (row.live_schema.as_str(), t.as_str());
            let rebuilt = (row.target.as_str(), t.as_str());
            (
                store::projection::rows_only_in(pool, live, rebuilt, &row.diff_ignore, sample).await?,
                store::projection::rows_only_in(pool, rebuilt, live, &row.diff_ignore, sample).await?,
            )
        };
        tables.push(TableDiff {
            table: t.clone(),
            live_rows,
            rebuilt_rows,
            live_checksum,
            rebuilt_checksum,
            equal,
            only_live,
            only_rebuilt,
        });
    }
    let equal = tables.iter().all(|t| t.equal);
    Ok(DiffReport { target: target.to_owned(), tables, equal })
}

/// What is kept of a diff (on the rebuild's row and in the audit log):
/// per table the row counts and whether they are equal, and how far the
/// rebuild lagged behind live when it ran (`lag_behind`: a diff of a
/// rebuild far behind compares little of what a swap would bring in).
fn diff_summary(report: &DiffReport, lag_behind: i64) -> Value {
    serde_json::json!({
        "equal": report.equal,
        "lag_behind": lag_behind,
        "tables": report.tables.iter().map(|t| serde_json::json!({
            "table": t.table, "live_rows": t.live_rows, "rebuilt_rows": t.rebuilt_rows, "equal": t.equal,
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(p: i32, live: Option<i64>, rebuild: Option<i64>) -> PartitionPositions {
        PartitionPositions { topic: "t".into(), partition: p, live, rebuild }
    }

    #[test]
    fn lag_counts_what_the_rebuild_has_left_and_names_missing_partitions() {
        let lag = lag_of(&[pos(0, Some(10), Some(7)), pos(1, Some(5), None), pos(2, Some(3), Some(3))]);
        assert_eq!(lag.behind, 3 + 5);
        assert_eq!(lag.ahead, 0);
        assert_eq!(lag.missing, vec![("t".to_owned(), 1)]);
    }

    #[test]
    fn a_rebuild_past_the_live_position_is_ahead() {
        let lag = lag_of(&[pos(0, Some(4), Some(6)), pos(1, None, Some(2))]);
        assert_eq!((lag.behind, lag.ahead), (0, 4));
        assert!(lag.missing.is_empty());
    }

    #[test]
    fn where_a_rebuild_starts_round_trips_through_its_stored_form_and_bad_input_is_refused() {
        let t = DateTime::parse_from_rfc3339("2026-11-14T00:00:00Z").map(|t| t.with_timezone(&Utc)).ok();
        let t = t.map(RebuildFrom::Time).into_iter();
        for from in [RebuildFrom::Earliest, RebuildFrom::Snapshot(42)].into_iter().chain(t) {
            assert_eq!(RebuildFrom::parse(&from.spec()).ok(), Some(from), "{from:?}");
        }
        assert_eq!(RebuildFrom::parse("42").ok(), Some(RebuildFrom::Snapshot(42)));
        assert_eq!(
            RebuildFrom::parse("2026-11-14T01:00:00+01:00").ok(),
            RebuildFrom::parse("2026-11-14T00:00:00Z").ok()
        );
        for bad in ["", "latest", "snapshot:", "snapshot:x", "99999999999999999999", "2026-11-14", "yesterday"] {
            assert!(RebuildFrom::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn targets_must_be_plain_identifiers_and_not_the_live_schema() {
        let p = Projection::new("billing").table("invoices").create_sql("CREATE TABLE invoices (id int)");
        assert!(p.check("billing_v2").is_ok());
        for bad in ["", "Billing", "billing-v2", "public", "oncely", "pg_temp", "oncely_swap_1", "a\"b", "x;drop"] {
            assert!(p.check(bad).is_err(), "{bad:?} accepted");
        }
        assert!(Projection::new("b").create_sql("x").check("v2").is_err(), "no table");
        assert!(Projection::new("b").table("t").check("v2").is_err(), "no create statements");
        assert!(Projection::new("b").table("T").create_sql("x").check("v2").is_err(), "bad table name");
    }
}
