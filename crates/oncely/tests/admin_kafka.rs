//! The safe Admin API layer against the real broker: every call answers what
//! Kafka's own tools and a real consumer see, and the broker's refusal to
//! move an active group's offsets comes back as `GroupActive`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use oncely::kafka::admin::{AdminError, GroupDescription, KafkaAdmin, ListedPosition, OffsetSpec};
use oncely_testkit as kit;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

const WAIT: Duration = Duration::from_secs(60);

fn admin() -> anyhow::Result<KafkaAdmin> {
    Ok(KafkaAdmin::new(kit::bootstrap(), &[])?)
}

fn now_ms() -> anyhow::Result<i64> {
    Ok(i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis())?)
}

/// Produces one record per timestamp to `topic`/`partition`; returns their offsets.
async fn produce(topic: &str, partition: i32, timestamps: &[i64]) -> anyhow::Result<Vec<i64>> {
    let producer: FutureProducer = oncely::kafka::KafkaConnection::new(kit::bootstrap()).client_config()?.create()?;
    let mut offsets = Vec::new();
    for (i, ts) in timestamps.iter().enumerate() {
        let payload = format!("record-{i}");
        let rec = FutureRecord::to(topic).partition(partition).key("k").payload(&payload).timestamp(*ts);
        let d = producer.send(rec, Duration::from_secs(30)).await.map_err(|(e, _)| e)?;
        offsets.push(d.offset);
    }
    Ok(offsets)
}

fn consumer_config(group: &str) -> anyhow::Result<ClientConfig> {
    let mut c = oncely::kafka::KafkaConnection::new(kit::bootstrap()).client_config()?;
    c.set("group.id", group).set("enable.auto.commit", "false").set("auto.offset.reset", "earliest");
    Ok(c)
}

/// A group member that stays active (subscribed and polling) on a thread of
/// its own until stopped; dropping it stops it too, leaving the group.
struct ActiveMember {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ActiveMember {
    fn start(group: &str, topic: &str, client_id: &str) -> anyhow::Result<Self> {
        Self::start_with(consumer_config(group)?.set("client.id", client_id), topic)
    }

    fn start_with(config: &ClientConfig, topic: &str) -> anyhow::Result<Self> {
        let consumer: BaseConsumer = config.create()?;
        consumer.subscribe(&[topic])?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                // Records and transient errors alike: the point is to poll.
                let _ = consumer.poll(Duration::from_millis(100));
            }
            // Dropping the consumer closes it: it leaves the group.
            drop(consumer);
        });
        Ok(ActiveMember { stop, thread: Some(thread) })
    }

    fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ActiveMember {
    fn drop(&mut self) {
        self.halt();
    }
}

async fn describe(admin: &KafkaAdmin, group: &str) -> anyhow::Result<GroupDescription> {
    admin.describe_consumer_groups(&[group]).await?.into_iter().next().context("no description")
}

/// `CURRENT-OFFSET` of `topic`/`partition` as Kafka's own
/// `kafka-consumer-groups --describe` prints it.
async fn tool_current_offset(group: &str, topic: &str, partition: i32) -> anyhow::Result<String> {
    let (group, topic) = (group.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let out = kit::kafka_tool(
            "kafka-consumer-groups",
            &["--bootstrap-server", &kit::bootstrap(), "--describe", "--group", &group],
        )?;
        for line in out.lines() {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() >= 4 && cols[0] == group && cols[1] == topic && cols[2] == partition.to_string() {
                return Ok(cols[3].to_owned());
            }
        }
        bail!("no row for {topic}[{partition}] in:\n{out}")
    })
    .await?
}

#[tokio::test(flavor = "multi_thread")]
async fn describe_cluster_reports_the_id_kafka_tools_print() -> anyhow::Result<()> {
    kit::init_tracing();
    let info = admin()?.describe_cluster().await?;
    let out = tokio::task::spawn_blocking(|| {
        kit::kafka_tool("kafka-cluster", &["cluster-id", "--bootstrap-server", &kit::bootstrap()])
    })
    .await??;
    let printed = out
        .lines()
        .find_map(|l| l.strip_prefix("Cluster ID:"))
        .map(str::trim)
        .with_context(|| format!("no cluster id in {out:?}"))?;
    assert_eq!(info.cluster_id, printed);
    assert!(!info.nodes.is_empty(), "the brokers are listed");
    assert!(info.nodes.iter().all(|n| n.port > 0 && !n.host.is_empty()), "{:?}", info.nodes);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn list_offsets_by_timestamp_lands_on_the_first_record_at_or_after() -> anyhow::Result<()> {
    kit::init_tracing();
    let topic = kit::unique("admin-ts");
    kit::create_topic(&topic, 2).await?;
    // Ten minutes ago, one record a second; partition 1 stays empty.
    let base = (now_ms()? - 600_000) / 1000 * 1000;
    let timestamps: Vec<i64> = (0..5).map(|i| base + i * 1000).collect();
    assert_eq!(produce(&topic, 0, &timestamps).await?, vec![0, 1, 2, 3, 4]);

    let admin = admin()?;
    let both = [(topic.clone(), 0), (topic.clone(), 1)];
    let at = |ts| {
        let admin = admin.clone();
        let p0 = [(topic.clone(), 0)];
        async move { anyhow::Ok(admin.list_offsets(&p0, OffsetSpec::Timestamp(ts)).await?.remove(0).position) }
    };
    let found = |offset: i64, ts: i64| ListedPosition::Offset { offset, timestamp: Some(ts) };

    assert_eq!(at(base).await?, found(0, base), "a record exactly at the timestamp");
    assert_eq!(at(base + 1).await?, found(1, base + 1000), "the first record after it");
    assert_eq!(at(base + 2999).await?, found(3, base + 3000));
    assert_eq!(at(base - 86_400_000).await?, found(0, base), "before everything: the first record");
    assert_eq!(at(base + 4000).await?, found(4, base + 4000), "the last record");
    assert_eq!(at(base + 4001).await?, ListedPosition::LogEnd, "after every record: the log end");

    let after_all = admin.list_offsets(&both, OffsetSpec::Timestamp(base)).await?;
    assert_eq!(
        after_all.iter().map(|l| (l.partition, l.position)).collect::<Vec<_>>(),
        [(0, found(0, base)), (1, ListedPosition::LogEnd)]
    );
    let earliest = admin.list_offsets(&both, OffsetSpec::Earliest).await?;
    assert_eq!(earliest.iter().map(|l| (l.partition, l.offset())).collect::<Vec<_>>(), [(0, Some(0)), (1, Some(0))]);
    let latest = admin.list_offsets(&both, OffsetSpec::Latest).await?;
    assert_eq!(latest.iter().map(|l| (l.partition, l.offset())).collect::<Vec<_>>(), [(0, Some(5)), (1, Some(0))]);
    assert!(latest.iter().all(|l| l.topic == topic));

    // A partition that does not exist fails, named, even beside one that does.
    let err = admin.list_offsets(&[(topic.clone(), 0), (topic.clone(), 7)], OffsetSpec::Latest).await;
    match err {
        Err(AdminError::Partitions { failures, .. }) => {
            assert_eq!(
                failures.iter().map(|f| (f.topic.as_str(), f.partition)).collect::<Vec<_>>(),
                [(topic.as_str(), 7)]
            )
        }
        other => bail!("expected a partition error, got {other:?}"),
    }
    // Alone, librdkafka fails the whole request: it found no leader at all.
    let err = admin.list_offsets(&[(topic.clone(), 7)], OffsetSpec::Latest).await;
    assert!(matches!(err, Err(AdminError::Request { .. })), "{err:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn committed_offsets_of_a_real_consumer_are_listed_with_their_metadata() -> anyhow::Result<()> {
    kit::init_tracing();
    let topic = kit::unique("admin-commit");
    let group = kit::unique("admin-commit-g");
    kit::create_topic(&topic, 3).await?;
    produce(&topic, 0, &[now_ms()?; 4]).await?;
    produce(&topic, 1, &[now_ms()?; 2]).await?;

    let consumer: BaseConsumer = consumer_config(&group)?.create()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 0, Offset::Offset(3))?;
    tpl.add_partition_offset(&topic, 1, Offset::Offset(1))?;
    for mut e in tpl.elements() {
        e.set_metadata(format!("app:{}", e.partition()));
    }
    consumer.commit(&tpl, CommitMode::Sync)?;
    drop(consumer);

    let admin = admin()?;
    let all = admin.list_consumer_group_offsets(&group, None).await?;
    let got: Vec<_> = all.iter().map(|o| (o.topic.as_str(), o.partition, o.offset, o.metadata.as_str())).collect();
    assert_eq!(got, [(topic.as_str(), 0, Some(3), "app:0"), (topic.as_str(), 1, Some(1), "app:1")]);

    // Asked for by name, a partition without a commit has no offset.
    let asked = [(topic.clone(), 2), (topic.clone(), 0)];
    let some = admin.list_consumer_group_offsets(&group, Some(&asked)).await?;
    let got: Vec<_> = some.iter().map(|o| (o.partition, o.offset)).collect();
    assert_eq!(got, [(0, Some(3)), (2, None)]);

    assert_eq!(tool_current_offset(&group, &topic, 0).await?, "3", "kafka-consumer-groups agrees");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn altering_an_inactive_groups_offsets_reads_back_and_a_consumer_resumes_there() -> anyhow::Result<()> {
    kit::init_tracing();
    let topic = kit::unique("admin-alter");
    let group = kit::unique("admin-alter-g");
    kit::create_topic(&topic, 2).await?;
    produce(&topic, 0, &[now_ms()?; 5]).await?;

    let admin = admin()?;
    let meta = "oncely:reset:test".to_owned();
    let altered = admin
        .alter_consumer_group_offsets(
            &group,
            &[(topic.clone(), 0, 2, meta.clone()), (topic.clone(), 1, 0, meta.clone())],
        )
        .await?;
    assert_eq!(altered.iter().map(|o| (o.partition, o.offset)).collect::<Vec<_>>(), [(0, Some(2)), (1, Some(0))]);

    let read = admin.list_consumer_group_offsets(&group, None).await?;
    let got: Vec<_> = read.iter().map(|o| (o.topic.as_str(), o.partition, o.offset, o.metadata.as_str())).collect();
    assert_eq!(got, [(topic.as_str(), 0, Some(2), meta.as_str()), (topic.as_str(), 1, Some(0), meta.as_str())]);
    assert_eq!(tool_current_offset(&group, &topic, 0).await?, "2", "kafka-consumer-groups agrees");

    // A consumer of the group resumes at the altered offset.
    let consumer: BaseConsumer = consumer_config(&group)?.create()?;
    consumer.subscribe(&[&topic])?;
    let deadline = Instant::now() + WAIT;
    let first = loop {
        anyhow::ensure!(Instant::now() < deadline, "no record within {WAIT:?}");
        if let Some(m) = consumer.poll(Duration::from_millis(200)) {
            let m = m?;
            break (m.partition(), m.offset());
        }
    };
    assert_eq!(first, (0, 2));
    drop(consumer);

    // Rejected before anything is sent.
    let bad = admin.alter_consumer_group_offsets(&group, &[(topic.clone(), 0, -1, String::new())]).await;
    assert!(matches!(bad, Err(AdminError::InvalidArgument(_))), "{bad:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_active_group_refuses_alter_and_describes_its_member() -> anyhow::Result<()> {
    kit::init_tracing();
    let topic = kit::unique("admin-active");
    let group = kit::unique("admin-active-g");
    kit::create_topic(&topic, 2).await?;
    produce(&topic, 0, &[now_ms()?; 3]).await?;
    let admin = admin()?;
    let meta = "oncely:reset:test".to_owned();
    admin.alter_consumer_group_offsets(&group, &[(topic.clone(), 0, 1, meta.clone())]).await?;

    let member = ActiveMember::start(&group, &topic, "oncely-admin-test")?;
    kit::wait_until(WAIT, "the member to own both partitions", || {
        let (admin, group) = (admin.clone(), group.clone());
        async move {
            let d = describe(&admin, &group).await?;
            Ok(d.state == "Stable" && d.members.len() == 1 && d.members[0].assignment.len() == 2)
        }
    })
    .await?;

    let d = describe(&admin, &group).await?;
    assert_eq!(d.group_id, group);
    assert_eq!(d.protocol_type, "consumer");
    assert!(!d.is_simple && !d.is_inactive());
    assert!(!d.partition_assignor.is_empty(), "an assignor is reported");
    assert!(d.coordinator.is_some());
    let m = &d.members[0];
    assert_eq!(m.client_id, "oncely-admin-test");
    assert!(!m.member_id.is_empty() && !m.host.is_empty(), "{m:?}");
    let mut assigned = m.assignment.clone();
    assigned.sort();
    assert_eq!(assigned, [(topic.clone(), 0), (topic.clone(), 1)]);

    let listed = admin.list_consumer_groups().await?;
    let l = listed.iter().find(|g| g.group_id == group).context("the group is listed")?;
    assert_eq!(l.state, "Stable");

    let refused = admin.alter_consumer_group_offsets(&group, &[(topic.clone(), 0, 0, meta.clone())]).await;
    match &refused {
        Err(AdminError::GroupActive { group: g, code, .. }) => {
            assert_eq!(g, &group);
            assert!(code.means_group_active(), "{code}");
        }
        other => bail!("expected GroupActive, got {other:?}"),
    }
    let after = admin.list_consumer_group_offsets(&group, Some(&[(topic.clone(), 0)])).await?;
    assert_eq!(after[0].offset, Some(1), "the refused alter changed nothing");

    member.stop();
    kit::wait_until(WAIT, "the group to empty", || {
        let (admin, group) = (admin.clone(), group.clone());
        async move { Ok(describe(&admin, &group).await?.is_inactive()) }
    })
    .await?;
    let listed = admin.list_consumer_groups().await?;
    assert_eq!(listed.iter().find(|g| g.group_id == group).map(|g| g.state.as_str()), Some("Empty"));
    admin.alter_consumer_group_offsets(&group, &[(topic.clone(), 0, 0, meta)]).await?;
    let after = admin.list_consumer_group_offsets(&group, Some(&[(topic.clone(), 0)])).await?;
    assert_eq!(after[0].offset, Some(0), "once the member left, the alter applies");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_group_is_dead_and_has_no_offsets() -> anyhow::Result<()> {
    kit::init_tracing();
    let group = kit::unique("admin-nobody");
    let admin = admin()?;
    let d = describe(&admin, &group).await?;
    assert_eq!((d.group_id.as_str(), d.state.as_str()), (group.as_str(), "Dead"));
    assert!(d.members.is_empty() && d.is_inactive());
    assert!(admin.list_consumer_group_offsets(&group, None).await?.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn topic_partitions_and_retention_come_from_metadata_and_configs() -> anyhow::Result<()> {
    kit::init_tracing();
    let topic = kit::unique("admin-meta");
    kit::create_topic_with(&topic, 3, &[("retention.ms", "3600000")]).await?;
    let admin = admin()?;
    assert_eq!(admin.topic_partitions(&topic).await?, [0, 1, 2]);
    let configs = admin.describe_topic_configs(&[&topic]).await?;
    assert_eq!(configs.len(), 1);
    assert_eq!(configs[0].topic, topic);
    assert_eq!(configs[0].retention_ms(), Some(3_600_000));

    // A mistyped topic is an error, and looking it up does not create it.
    let missing = kit::unique("admin-missing");
    let err = admin.topic_partitions(&missing).await;
    assert!(matches!(err, Err(AdminError::Target { .. })), "{err:?}");
    let err = admin.topic_partitions(&missing).await;
    assert!(matches!(err, Err(AdminError::Target { .. })), "still missing: {err:?}");
    let err = admin.describe_topic_configs(&[&topic, &missing]).await;
    assert!(matches!(err, Err(AdminError::Target { ref target, .. }) if *target == missing), "{err:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kip848_consumer_group_refuses_alter_while_active_too() -> anyhow::Result<()> {
    kit::init_tracing();
    let topic = kit::unique("admin-848");
    let group = kit::unique("admin-848-g");
    kit::create_topic(&topic, 2).await?;
    let admin = admin()?;
    let member = ActiveMember::start_with(
        consumer_config(&group)?.set("group.protocol", "consumer").set("client.id", "oncely-admin-848"),
        &topic,
    )?;
    kit::wait_until(WAIT, "the member to own both partitions", || {
        let (admin, group) = (admin.clone(), group.clone());
        async move {
            let d = describe(&admin, &group).await?;
            Ok(d.members.len() == 1 && d.members[0].assignment.len() == 2)
        }
    })
    .await?;
    let d = describe(&admin, &group).await?;
    assert_eq!(d.group_type, "Consumer");
    assert_eq!(d.members[0].client_id, "oncely-admin-848");

    let refused =
        admin.alter_consumer_group_offsets(&group, &[(topic.clone(), 0, 0, "oncely:reset:test".into())]).await;
    assert!(refused.as_ref().is_err_and(AdminError::is_group_active), "{refused:?}");

    member.stop();
    kit::wait_until(WAIT, "the group to empty", || {
        let (admin, group) = (admin.clone(), group.clone());
        async move { Ok(describe(&admin, &group).await?.is_inactive()) }
    })
    .await?;
    admin.alter_consumer_group_offsets(&group, &[(topic.clone(), 0, 0, "oncely:reset:test".into())]).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_cluster_is_a_timeout_error() -> anyhow::Result<()> {
    kit::init_tracing();
    // Nothing listens on port 1.
    let admin = KafkaAdmin::new("127.0.0.1:1", &[])?.request_timeout(Duration::from_secs(2));
    let started = Instant::now();
    let err = admin.describe_cluster().await;
    assert!(matches!(err, Err(AdminError::Timeout { .. })), "{err:?}");
    let err = admin.list_consumer_group_offsets("g", None).await;
    assert!(matches!(err, Err(AdminError::Timeout { .. })), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(20));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_offsets_leaves_no_commit_and_is_refused_while_a_member_subscribes() -> anyhow::Result<()> {
    kit::init_tracing();
    let topic = kit::unique("admin-delete");
    let group = kit::unique("admin-delete-g");
    kit::create_topic(&topic, 2).await?;
    produce(&topic, 0, &[now_ms()?; 3]).await?;
    let admin = admin()?;
    let meta = "oncely:reset:test".to_owned();
    admin
        .alter_consumer_group_offsets(&group, &[(topic.clone(), 0, 2, meta.clone()), (topic.clone(), 1, 0, meta)])
        .await?;

    admin.delete_consumer_group_offsets(&group, &[(topic.clone(), 1)]).await?;
    let both = [(topic.clone(), 0), (topic.clone(), 1)];
    let after = admin.list_consumer_group_offsets(&group, Some(&both)).await?;
    assert_eq!(after.iter().map(|o| (o.partition, o.offset)).collect::<Vec<_>>(), [(0, Some(2)), (1, None)]);
    assert_eq!(tool_current_offset(&group, &topic, 0).await?, "2", "kafka-consumer-groups agrees");
    assert!(tool_current_offset(&group, &topic, 1).await.is_err(), "and lists no offset for partition 1");
    // Deleting where there is no commit is not an error.
    admin.delete_consumer_group_offsets(&group, &[(topic.clone(), 1)]).await?;

    let member = ActiveMember::start(&group, &topic, "oncely-admin-delete")?;
    kit::wait_until(WAIT, "the member to join", || {
        let (admin, group) = (admin.clone(), group.clone());
        async move { Ok(describe(&admin, &group).await?.state == "Stable") }
    })
    .await?;
    let refused = admin.delete_consumer_group_offsets(&group, &[(topic.clone(), 0)]).await;
    assert!(refused.as_ref().is_err_and(AdminError::is_group_active), "{refused:?}");
    let still = admin.list_consumer_group_offsets(&group, Some(&both[..1])).await?;
    assert_eq!(still[0].offset, Some(2), "the refused delete changed nothing");

    member.stop();
    kit::wait_until(WAIT, "the group to empty", || {
        let (admin, group) = (admin.clone(), group.clone());
        async move { Ok(describe(&admin, &group).await?.is_inactive()) }
    })
    .await?;
    admin.delete_consumer_group_offsets(&group, &[(topic.clone(), 0)]).await?;
    assert!(admin.list_consumer_group_offsets(&group, None).await?.is_empty(), "no commit left");

    let bad = admin.delete_consumer_group_offsets(&group, &[]).await;
    assert!(matches!(bad, Err(AdminError::InvalidArgument(_))), "{bad:?}");
    Ok(())
}
