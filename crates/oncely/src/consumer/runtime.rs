//! The running consumer: start (checks, registration, the Kafka consumer and
//! its thread), the Kafka thread serving the main queue until shutdown, the
//! graceful stop, the inbox maintenance, the dead-letter topics and the
//! retention check.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer as _};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::builder::{pool_of, Parts, FORCED_KAFKA_SETTINGS};
use super::handler::{self, ErasedHandler};
use super::rebalance::{committed_positions, drain_lanes, spawn_lanes, Ctx};
use super::{guard, lane, KafkaConsumer, PartitionKey, Shared};
use crate::error::{Error, Result};
use crate::kafka::KafkaConnection;
use crate::store;

impl Parts {
    /// Starts the consumer and runs it until `shutdown` is cancelled, then
    /// drains its lanes and stops (behind [`ConsumerBuilder::run`](super::ConsumerBuilder::run)).
    pub(super) async fn run_inner(self, shutdown: CancellationToken) -> Result<()> {
        let connection =
            self.connection.ok_or_else(|| Error::Config("bootstrap_servers (or a connection) is required".into()))?;
        // A wrong password or an untrusted certificate fails here, naming the
        // cause, instead of librdkafka retrying it forever.
        connection.check_at_start().await?;
        if self.topics.is_empty() {
            return Err(Error::Config("at least one topic is required".into()));
        }
        let handler: Arc<dyn ErasedHandler> = match (self.handler, self.routes.is_empty()) {
            (Some(h), true) => h,
            (None, false) => Arc::new(handler::Router { routes: self.routes, unrouted: self.unrouted }),
            (Some(_), false) => {
                return Err(Error::Config("use either one handler or routes by CloudEvents type, not both".into()))
            }
            (None, true) => return Err(Error::Config("a handler (or a route) is required".into())),
        };
        let pool = pool_of(self.pool, self.database_url.as_deref()).await?;
        if self.migrate {
            store::migrate(&pool).await?;
        }
        let retention_days = self.inbox_retention.as_secs().div_ceil(86_400).max(1) as i32;
        check_retention(&connection, &self.topics, self.inbox_retention, self.force_inbox_retention, &self.name)
            .await?;
        if self.create_dlt_topics {
            ensure_dlt_topics(&connection, &self.topics, &self.name).await?;
        }
        let consumer_id = store::register_consumer(&pool, &self.name, retention_days).await?;
        store::inbox::ensure_days(&pool, 3).await?;

        let mut settings = self.settings;
        let mut cfg = connection.client_config()?;
        cfg.set("group.id", &self.name)
            // Each lane's partition queue is bounded by these (they apply per
            // partition to split queues): when a lane does not read, librdkafka
            // stops fetching its partition. That is oncely's backpressure.
            // 2 MB: with small records `queued.min.messages` binds first;
            // with 1 KB records 8 MB cost 90 MB more peak RSS and no
            // throughput (docs/benchmarks.md, 2026-12-02 RSS runs).
            .set("queued.max.messages.kbytes", "2048")
            .set("queued.min.messages", (settings.max_batch * 4).max(1000).to_string())
            // Once a partition's queue reaches those limits librdkafka stops
            // fetching it for `fetch.queue.backoff.ms` (1 s by default): with
            // queues this small a lane drains its queue in a fraction of that
            // and then waits for records (a duplicates-only replay spent
            // almost half its time there: 144k events/s, 205k/s at 10 ms).
            .set("fetch.queue.backoff.ms", "10");
        for (k, v) in &self.kafka {
            if k == "auto.offset.reset" {
                settings.initial = match v.as_str() {
                    "earliest" | "smallest" | "beginning" => Offset::Beginning,
                    "latest" | "largest" | "end" => Offset::End,
                    other => {
                        return Err(Error::Config(format!(
                            "auto.offset.reset = {other:?}: oncely takes earliest or latest (a position outside the log halts the partition)"
                        )))
                    }
                };
                continue;
            }
            cfg.set(k, v);
        }
        // A position outside the log is an error the lane reports and halts
        // on, never a silent jump (see `Lane::queue_error`).
        cfg.set("auto.offset.reset", "error");
        for (k, v) in FORCED_KAFKA_SETTINGS {
            if self.kafka.iter().any(|(kk, vv)| kk == k && vv != v) {
                tracing::warn!(setting = k, forced = v, "Ignoring a Kafka setting that oncely must force.");
            }
            cfg.set(*k, *v);
        }

        if let Some(addr) = self.metrics_addr {
            let bound = crate::metrics::serve(addr, shutdown.clone()).await?;
            tracing::info!(addr = %bound, "Serving metrics.");
        }

        let executor = crate::effects::Executor::new(pool.clone(), self.registry.clone()).lease(self.effect_lease);
        let effects_wake = executor.waker();
        let executor_task = self.run_effect_executor.then(|| tokio::spawn(executor.run(shutdown.clone())));
        // A manually assigned consumer takes every partition of its topics.
        let mut manual: Option<Vec<PartitionKey>> = None;
        if self.manual_assignment {
            let admin = crate::kafka::admin::KafkaAdmin::new(&connection, &[])?;
            let mut parts = Vec::new();
            for t in &self.topics {
                for p in admin.topic_partitions(t).await? {
                    parts.push((t.clone(), p));
                }
            }
            manual = Some(parts);
        }
        let shared = Arc::new(Shared {
            name: Arc::from(self.name.as_str()),
            consumer_id,
            pool: pool.clone(),
            handler,
            identity: self.identity,
            version: self.version,
            backoff: crate::backoff::Backoff::new(settings.backoff_base, settings.backoff_max),
            settings,
            rt: tokio::runtime::Handle::current(),
            consumer: OnceLock::new(),
            lanes: Mutex::new(HashMap::new()),
            queues: Mutex::new(HashMap::new()),
            bucket: self.rate.map(|r| guard::TokenBucket::new(r, r)),
            spike: self.spike.map(guard::SpikeState::new),
            shutdown: shutdown.clone(),
            registry: Arc::new(self.registry),
            effects_wake,
            fatal: Mutex::new(None),
        });
        let consumer: Arc<KafkaConsumer> = Arc::new(cfg.create_with_context(Ctx(shared.clone()))?);
        let _ = shared.consumer.set(Arc::downgrade(&consumer));
        if manual.is_none() {
            let topics: Vec<&str> = self.topics.iter().map(String::as_str).collect();
            consumer.subscribe(&topics)?;
        }

        if self.handle_sigterm {
            crate::signal::cancel_on_sigterm(shutdown.clone(), "SIGTERM: shutting down gracefully.");
        }

        let maintenance = tokio::spawn(maintain_inbox(pool.clone(), shutdown.clone()));

        // The main queue (rebalances, errors) is served on a thread of its own:
        // the rebalance callback blocks on the database and on draining lanes,
        // which must not happen on a runtime worker.
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let thread_shared = shared.clone();
        let thread_consumer = consumer.clone();
        drop(consumer);
        std::thread::Builder::new()
            .name(format!("oncely-{}", self.name))
            .spawn(move || {
                let r = kafka_thread(thread_shared, thread_consumer, manual);
                let _ = done_tx.send(r);
            })
            .map_err(Error::Io)?;
        let mut result = done_rx.await.unwrap_or_else(|_| Err(Error::Config("the consumer thread panicked".into())));
        if let Some(e) = shared.fatal.lock().ok().and_then(|mut f| f.take()) {
            result = Err(e);
        }
        maintenance.abort();
        if let Some(task) = executor_task {
            if let Ok(Err(e)) = task.await {
                tracing::warn!(error = %e, "The effect executor stopped with an error.");
            }
        }
        tracing::info!(consumer = %self.name, "Consumer stopped.");
        result
    }
}

/// The Kafka thread: serves the consumer's main queue, which carries the
/// rebalances (their callbacks run here) and errors; records go to the lanes'
/// own partition queues. A record arriving here means its partition's queue
/// was not split in time: its lane is told to read it again from its queue.
fn kafka_thread(shared: Arc<Shared>, consumer: Arc<KafkaConsumer>, manual: Option<Vec<PartitionKey>>) -> Result<()> {
    use futures::future::{select, Either};
    let token = shared.shutdown.clone();
    if let Some(parts) = manual {
        assign_manually(&shared, &consumer, &parts)?;
    }
    futures::executor::block_on(async {
        loop {
            let recv = consumer.recv();
            let stop = token.cancelled();
            futures::pin_mut!(recv);
            futures::pin_mut!(stop);
            match select(recv, stop).await {
                Either::Right(_) => break,
                Either::Left((Ok(m), _)) => {
                    use rdkafka::Message as _;
                    let key = (m.topic().to_owned(), m.partition());
                    tracing::error!(consumer = &*shared.name, topic = %key.0, partition = key.1, offset = m.offset(), "A record reached the consumer's main queue instead of its partition's queue.");
                    if let Ok(lanes) = shared.lanes.lock() {
                        if let Some(l) = lanes.get(&key) {
                            l.reseek.store(true, std::sync::atomic::Ordering::Release);
                        }
                    }
                }
                Either::Left((Err(KafkaError::PartitionEOF(_)), _)) => {}
                Either::Left((Err(e), _)) => {
                    tracing::warn!(consumer = &*shared.name, error = %e, "Kafka consumer error.");
                }
            }
        }
    });
    // Graceful stop: drain every lane, commit, then leave the group.
    let handles: Vec<lane::LaneHandle> = match shared.lanes.lock() {
        Ok(mut l) => l.drain().map(|(_, h)| h).collect(),
        Err(_) => Vec::new(),
    };
    let commit = drain_lanes(&shared, handles);
    if commit.count() > 0 {
        if let Err(e) = consumer.commit(&commit, CommitMode::Sync) {
            tracing::debug!(error = %e, "Final Kafka commit failed (database offsets are authoritative).");
        }
    }
    consumer.unsubscribe();
    // Serve the final revoke, then close when the last reference goes.
    futures::executor::block_on(async {
        let recv = consumer.recv();
        let t = futures_timer(Duration::from_millis(200));
        futures::pin_mut!(recv);
        futures::pin_mut!(t);
        futures::future::select(recv, t).await;
    });
    // The partition queues hold the consumer: let them go so it closes.
    if let Ok(mut q) = shared.queues.lock() {
        q.clear();
    }
    drop(consumer);
    Ok(())
}

/// Assigns `parts` without joining the group (a projection rebuild): the
/// lanes start as after a rebalance, from the database position or, for a
/// partition without one, where the consumer's own committed offset or
/// `auto.offset.reset` says.
fn assign_manually(shared: &Arc<Shared>, consumer: &KafkaConsumer, parts: &[PartitionKey]) -> Result<()> {
    let mut tpl = TopicPartitionList::new();
    for (t, p) in parts {
        tpl.add_partition(t, *p);
    }
    let kafka = committed_positions(consumer, &tpl).unwrap_or_else(|e| {
        tracing::warn!(consumer = &*shared.name, error = %e, "Could not read Kafka's committed offsets; starting from the database positions.");
        HashMap::new()
    });
    tracing::info!(consumer = &*shared.name, partitions = ?parts, "Assigning partitions manually (no group membership).");
    if !spawn_lanes(shared, parts, &mut tpl, &kafka) {
        return Err(Error::Config("the consumer is gone before its partitions were assigned".into()));
    }
    consumer.assign(&tpl)?;
    Ok(())
}

/// A timer future that needs no runtime (a thread sleeping then waking).
fn futures_timer(d: Duration) -> impl std::future::Future<Output = ()> {
    let (tx, rx) = futures::channel::oneshot::channel::<()>();
    std::thread::spawn(move || {
        std::thread::sleep(d);
        let _ = tx.send(());
    });
    async move {
        let _ = rx.await;
    }
}

/// Keeps the inbox's day partitions ahead of time and applies its retention.
/// Partition DDL gives up quickly when it cannot get its lock (it must never
/// make every claim queue behind it), so a failed pass is tried again soon.
async fn maintain_inbox(pool: PgPool, shutdown: CancellationToken) {
    loop {
        let mut ok = true;
        match store::inbox::ensure_days(&pool, 3).await {
            Ok(n) if n > 0 => tracing::info!(created = n, "Created inbox partitions."),
            Ok(_) => {}
            Err(e) => {
                ok = false;
                tracing::warn!(error = %e, "Creating inbox partitions failed; trying again in a minute.");
            }
        }
        match store::trim_inbox(&pool).await {
            Ok(t) => {
                if !t.dropped.is_empty() || t.deleted > 0 {
                    tracing::info!(dropped = ?t.dropped, deleted = t.deleted, "Applied the inbox retention.");
                }
                if !t.kept.is_empty() {
                    tracing::info!(kept = ?t.kept, "Kept inbox partitions past retention: they hold identities claimed recently (redriven events).");
                }
            }
            Err(e) => {
                ok = false;
                tracing::warn!(error = %e, "Applying the inbox retention failed; trying again in a minute.");
            }
        }
        let next = if ok { Duration::from_secs(3600) } else { Duration::from_secs(60) };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(next) => {}
        }
    }
}

/// Creates the missing dead-letter topics of `consumer` for `topics`
/// ([`failure::ensure_dlt_topic`](crate::failure::ensure_dlt_topic), as the
/// processor does).
fn ensure_dlt_topics<'a>(
    connection: &'a KafkaConnection,
    topics: &'a [String],
    consumer: &'a str,
) -> futures::future::BoxFuture<'a, Result<()>> {
    Box::pin(async move {
        let admin = crate::kafka::admin::KafkaAdmin::new(connection, &[])?;
        for topic in topics {
            crate::failure::ensure_dlt_topic(&admin, topic, &crate::failure::dlt_topic(topic, consumer), consumer)
                .await?;
        }
        Ok(())
    })
}

/// Refuses an inbox retention shorter than the time a topic's records stay
/// readable, `retention.ms + segment.ms` (Kafka deletes a segment only when
/// its newest record expires), or a topic kept forever / compacted, unless
/// forced.
fn check_retention<'a>(
    connection: &'a KafkaConnection,
    topics: &'a [String],
    inbox: Duration,
    force: bool,
    consumer: &'a str,
) -> futures::future::BoxFuture<'a, Result<()>> {
    Box::pin(check_retention_inner(connection, topics, inbox, force, consumer))
}

async fn check_retention_inner(
    connection: &KafkaConnection,
    topics: &[String],
    inbox: Duration,
    force: bool,
    consumer: &str,
) -> Result<()> {
    let admin = crate::kafka::admin::KafkaAdmin::new(connection, &[])?.request_timeout(Duration::from_secs(30));
    let configs = admin
        .describe_topic_configs(topics)
        .await
        .map_err(|e| Error::Config(format!("cannot read the configuration of topics {topics:?}: {e}")))?;
    for (topic, res) in topics.iter().zip(&configs) {
        let retention_ms: i64 = res.retention_ms().unwrap_or(-1);
        // Kafka's default segment.ms is 7 days; a topic config always reports
        // one, but assume the default if it does not parse.
        let segment_ms: i64 = res.number("segment.ms").unwrap_or(7 * 86_400_000);
        let readable_ms = retention_ms.saturating_add(segment_ms.max(0));
        let compact = res.entries.get("cleanup.policy").is_some_and(|v| v.contains("compact"));
        let problem = if compact {
            Some(format!("topic {topic} is compacted: its records are kept indefinitely"))
        } else if retention_ms < 0 {
            Some(format!("topic {topic} keeps records forever (retention.ms = -1)"))
        } else if Duration::from_millis(readable_ms as u64) >= inbox {
            Some(format!(
                "records of topic {topic} stay readable for up to {:.1} days (retention.ms = {retention_ms} plus segment.ms = {segment_ms}: a segment is deleted only when its newest record expires) but the inbox keeps identities for {:.1} days",
                readable_ms as f64 / 86_400_000.0,
                inbox.as_secs_f64() / 86_400.0
            ))
        } else {
            None
        };
        if let Some(p) = problem {
            if force {
                tracing::warn!(consumer, topic = %topic, "Inbox retention forced: {p}; a duplicate older than the inbox retention would be processed again.");
            } else {
                return Err(Error::Refused(format!(
                    "{p}. A duplicate that outlives its inbox row is processed again: raise inbox_retention above that, lower the topic's retention.ms or segment.ms, or force it"
                )));
            }
        }
    }
    Ok(())
}
