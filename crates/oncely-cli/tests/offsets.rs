//! `oncely offsets | lag | watch | audit` as an operator runs them: the built
//! binary against the real broker and a fresh database, each test with its
//! own topic, group, database and `oncely.toml` (environments `local`,
//! `prod` (protected) and `staging`, whose expected cluster id is another
//! cluster's).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use chrono::{DateTime, FixedOffset, Utc};
use oncely::consumer::events;
use oncely::kafka::admin::KafkaAdmin;
use oncely_testkit::{self as kit, app};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(60);
const STAGING_CLUSTER: &str = "StagingCluster00000000";

/// One test's world: topic, group, database, config file.
struct World {
    dir: PathBuf,
    config: PathBuf,
    db: kit::TestDb,
    topic: String,
    group: String,
    cluster_id: String,
    admin: KafkaAdmin,
}

/// What a run of the binary did.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn ok(self) -> Result<Self> {
        ensure!(
            self.code == 0,
            "expected success, got exit {}:\nstdout:\n{}\nstderr:\n{}",
            self.code,
            self.stdout,
            self.stderr
        );
        Ok(self)
    }

    fn refused(self) -> Result<Self> {
        ensure!(
            self.code == 2,
            "expected a refusal (exit 2), got exit {}:\nstdout:\n{}\nstderr:\n{}",
            self.code,
            self.stdout,
            self.stderr
        );
        Ok(self)
    }

    /// The JSON document on the last line of stdout.
    fn json(&self) -> Result<Value> {
        let line = self.stdout.lines().last().with_context(|| format!("no output; stderr: {}", self.stderr))?;
        serde_json::from_str(line).with_context(|| format!("not JSON: {line}"))
    }
}

impl World {
    async fn new(prefix: &str, partitions: i32) -> Result<Self> {
        kit::init_tracing();
        let topic = kit::unique(prefix);
        let group = kit::unique(&format!("{prefix}-g"));
        kit::create_topic(&topic, partitions).await?;
        let db = kit::TestDb::new().await?;
        let admin = KafkaAdmin::new(kit::bootstrap(), &[])?;
        let cluster_id = admin.describe_cluster().await?.cluster_id;
        let dir = std::env::temp_dir().join(kit::unique("oncely-cli-test"));
        std::fs::create_dir_all(&dir)?;
        let config = dir.join("oncely.toml");
        let env = |name: &str, cluster: &str, protected: bool| {
            format!(
                "[env.{name}]\nbootstrap_servers = \"{}\"\ndatabase_url = \"{}\"\ncluster_id = \"{cluster}\"\nprotected = {protected}\n\n",
                kit::bootstrap(),
                db.url
            )
        };
        let text = format!(
            "default_env = \"local\"\n\n{}{}{}",
            env("local", &cluster_id, false),
            env("prod", &cluster_id, true),
            env("staging", STAGING_CLUSTER, false)
        );
        std::fs::write(&config, text)?;
        Ok(World { dir, config, db, topic, group, cluster_id, admin })
    }

    /// Runs `oncely --config <ours> ARGS` with no terminal on stdin.
    async fn oncely(&self, args: &[&str]) -> Result<Run> {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_oncely"));
        cmd.arg("--config").arg(&self.config).args(args).stdin(Stdio::null());
        for v in [
            "ONCELY_CONFIG",
            "ONCELY_ENV",
            "ONCELY_BOOTSTRAP_SERVERS",
            "ONCELY_DATABASE_URL",
            "ONCELY_CLUSTER_ID",
            "ONCELY_PROTECTED",
        ] {
            cmd.env_remove(v);
        }
        let out = cmd.output().await.context("running oncely")?;
        Ok(Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// The group's committed offsets of our topic, by partition: `(offset, metadata)`.
    async fn committed(&self) -> Result<Vec<(i32, Option<i64>, String)>> {
        let parts = self.admin.topic_partitions(&self.topic).await?;
        let asked: Vec<(String, i32)> = parts.iter().map(|p| (self.topic.clone(), *p)).collect();
        let got = self.admin.list_consumer_group_offsets(&self.group, Some(&asked)).await?;
        Ok(got.into_iter().map(|o| (o.partition, o.offset, o.metadata)).collect())
    }

    async fn offsets(&self) -> Result<Vec<Option<i64>>> {
        Ok(self.committed().await?.into_iter().map(|(_, o, _)| o).collect())
    }

    /// Commits offsets for the group as a plain client would (no member).
    async fn commit(&self, offsets: &[(i32, i64)]) -> Result<()> {
        let (group, topic, offsets) = (self.group.clone(), self.topic.clone(), offsets.to_vec());
        tokio::task::spawn_blocking(move || -> Result<()> {
            let consumer: BaseConsumer = oncely::kafka::KafkaConnection::new(kit::bootstrap())
                .client_config()?
                .set("group.id", &group)
                .set("enable.auto.commit", "false")
                .create()?;
            let mut tpl = TopicPartitionList::new();
            for (p, o) in offsets {
                tpl.add_partition_offset(&topic, p, Offset::Offset(o))?;
            }
            consumer.commit(&tpl, CommitMode::Sync)?;
            Ok(())
        })
        .await?
    }

    /// Produces one record per timestamp to `partition`.
    async fn produce(&self, partition: i32, timestamps: &[i64]) -> Result<()> {
        let producer: FutureProducer =
            oncely::kafka::KafkaConnection::new(kit::bootstrap()).client_config()?.create()?;
        for (i, ts) in timestamps.iter().enumerate() {
            let payload = format!("record-{i}");
            let rec = FutureRecord::to(&self.topic).partition(partition).key("k").payload(&payload).timestamp(*ts);
            producer.send(rec, Duration::from_secs(30)).await.map_err(|(e, _)| e)?;
        }
        Ok(())
    }

    async fn produce_now(&self, partition: i32, n: usize) -> Result<()> {
        self.produce(partition, &vec![Utc::now().timestamp_millis(); n]).await
    }

    async fn audit(&self) -> Result<Vec<Value>> {
        let v = self.oncely(&["-o", "json", "audit", "-g", &self.group]).await?.ok()?.json()?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn offsets_of(v: &Value) -> Vec<(i64, Option<i64>)> {
    v.as_array()
        .map(|a| a.iter().map(|o| (o["partition"].as_i64().unwrap_or(-1), o["offset"].as_i64())).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_incident_replayed_is_refused_and_the_dry_run_counts_the_exact_replay() -> Result<()> {
    let w = World::new("payment.completed", 3).await?;
    let (g, t) = (w.group.as_str(), w.topic.as_str());
    for (p, n) in [(0, 10), (1, 12), (2, 15)] {
        w.produce_now(p, n).await?;
    }
    w.commit(&[(0, 10), (1, 12), (2, 15)]).await?;
    let before = w.committed().await?;

    // The profile points at another cluster: refused, both ids shown, nothing read.
    let r = w.oncely(&["--env", "staging", "offsets", "reset", "-g", g, "-t", t, "--to-earliest", "--execute"]).await?;
    let r = r.refused()?;
    ensure!(r.stderr.contains(STAGING_CLUSTER) && r.stderr.contains(&w.cluster_id), "{}", r.stderr);
    assert_eq!(w.committed().await?, before);

    // Protected, no terminal, no confirmation: refused.
    let r = w.oncely(&["--env", "prod", "offsets", "reset", "-g", g, "-t", t, "--to-earliest", "--execute"]).await?;
    let r = r.refused()?;
    let expected = format!("RESET prod {g}");
    ensure!(r.stderr.contains("protected") && r.stderr.contains(&expected), "{}", r.stderr);
    assert_eq!(w.committed().await?, before);

    // The confirmation of another environment: refused.
    let wrong = format!("RESET staging {g}");
    let args =
        ["--env", "prod", "offsets", "reset", "-g", g, "-t", t, "--to-earliest", "--execute", "--confirm", &wrong];
    w.oncely(&args).await?.refused()?;
    assert_eq!(w.committed().await?, before);

    // Confirmed, but more than --max-replay: refused.
    let args = [
        "--env",
        "prod",
        "offsets",
        "reset",
        "-g",
        g,
        "-t",
        t,
        "--to-earliest",
        "--execute",
        "--confirm",
        &expected,
        "--max-replay",
        "36",
    ];
    let r = w.oncely(&args).await?.refused()?;
    ensure!(r.stderr.contains("37 records would be re-delivered"), "{}", r.stderr);
    assert_eq!(w.committed().await?, before, "nothing changed");

    // The dry run shows the exact replay, per partition and in total.
    let r = w.oncely(&["--env", "prod", "offsets", "reset", "-g", g, "-t", t, "--to-earliest"]).await?.ok()?;
    ensure!(r.stdout.contains("37 record(s) will be re-delivered"), "{}", r.stdout);
    ensure!(r.stdout.contains("DRY RUN") && r.stdout.contains("NOT an oncely consumer"), "{}", r.stdout);
    let v = w.oncely(&["--env", "prod", "-o", "json", "offsets", "reset", "-g", g, "-t", t, "--to-earliest"]).await?;
    let v = v.ok()?.json()?;
    assert_eq!(v["dry_run"], true);
    assert_eq!(v["plan"]["totals"]["redelivered"], 37);
    assert_eq!(v["plan"]["totals"]["changed"], 3);
    let per: Vec<(i64, i64, i64)> = v["plan"]["partitions"]
        .as_array()
        .context("partitions")?
        .iter()
        .map(|p| {
            (
                p["current"].as_i64().unwrap_or(-1),
                p["new"].as_i64().unwrap_or(-1),
                p["redelivered"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    assert_eq!(per, vec![(10, 0, 10), (12, 0, 12), (15, 0, 15)]);
    let oldest = v["oldest_replayed_ms"].as_i64().context("the oldest replayed record is read")?;
    ensure!(oldest <= Utc::now().timestamp_millis() && oldest > Utc::now().timestamp_millis() - 600_000);
    assert_eq!(v["oncely"]["consumer"], false);
    assert_eq!(v["confirmation"], expected.as_str());
    assert_eq!(w.committed().await?, before, "a dry run changes nothing");

    // The attempts on prod are in the audit log as refused; nothing succeeded.
    let audit = w.audit().await?;
    let results: Vec<&str> = audit.iter().filter_map(|a| a["result"].as_str()).collect();
    assert_eq!(results, vec!["refused", "refused", "refused"], "{audit:?}");
    ensure!(audit.iter().all(|a| a["environment"] == "prod" && a["action"] == "offsets.reset"));
    ensure!(audit[0]["os_user"].as_str().is_some_and(|u| !u.is_empty()) && audit[0]["host"].is_string());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_executed_reset_is_undone_exactly_and_both_are_audited() -> Result<()> {
    let w = World::new("undo", 2).await?;
    let g = w.group.as_str();
    w.produce_now(0, 20).await?;
    w.produce_now(1, 30).await?;
    w.commit(&[(0, 7), (1, 30)]).await?;
    let confirm = format!("RESET prod {g}");

    let args = [
        "--env",
        "prod",
        "-o",
        "json",
        "offsets",
        "reset",
        "-g",
        g,
        "--all-topics",
        "--to-earliest",
        "--execute",
        "--confirm",
        &confirm,
    ];
    let v = w.oncely(&args).await?.ok()?.json()?;
    assert_eq!(v["dry_run"], false);
    let reset_id = v["executed"]["audit_id"].as_i64().context("audit id")?;
    let meta = format!("oncely:reset:{reset_id}");
    assert_eq!(w.committed().await?, vec![(0, Some(0), meta.clone()), (1, Some(0), meta)]);

    // The group committed since: undo refuses, and changes nothing.
    w.commit(&[(0, 3)]).await?;
    let r = w.oncely(&["--env", "prod", "offsets", "undo", "-g", g, "--execute", "--confirm", &confirm]).await?;
    let r = r.refused()?;
    ensure!(r.stderr.contains("committed since") && r.stderr.contains("--force"), "{}", r.stderr);
    assert_eq!(w.offsets().await?, vec![Some(3), Some(0)]);

    // --force: back exactly where the reset found them.
    let args =
        ["--env", "prod", "-o", "json", "offsets", "undo", "-g", g, "--execute", "--force", "--confirm", &confirm];
    let v = w.oncely(&args).await?.ok()?.json()?;
    assert_eq!(v["undoes"], reset_id);
    assert_eq!(w.offsets().await?, vec![Some(7), Some(30)]);

    let audit = w.audit().await?;
    let done: Vec<&Value> = audit.iter().filter(|a| a["result"] == "succeeded").collect();
    assert_eq!(done.len(), 2, "{audit:?}");
    assert_eq!(done[0]["action"], "offsets.reset");
    assert_eq!(offsets_of(&done[0]["before"]), vec![(0, Some(7)), (1, Some(30))]);
    assert_eq!(offsets_of(&done[0]["after"]), vec![(0, Some(0)), (1, Some(0))]);
    ensure!(done[0]["details"]["snapshot_id"].is_i64(), "{}", done[0]);
    assert_eq!(done[1]["action"], "offsets.undo");
    assert_eq!(done[1]["details"]["undoes"], reset_id);
    assert_eq!(offsets_of(&done[1]["before"]), vec![(0, Some(3)), (1, Some(0))]);
    assert_eq!(offsets_of(&done[1]["after"]), vec![(0, Some(7)), (1, Some(30))]);
    ensure!(audit.iter().any(|a| a["action"] == "offsets.undo" && a["result"] == "refused"), "{audit:?}");
    for a in &done {
        ensure!(a["command_line"].as_str().is_some_and(|c| c.contains("--execute")), "{a}");
        assert_eq!(a["cluster_id"], w.cluster_id.as_str());
        ensure!(a["finished_at"].is_string());
    }
    // The human view says the same.
    let r = w.oncely(&["audit", "-g", g]).await?.ok()?;
    ensure!(r.stdout.contains("offsets.reset") && r.stdout.contains("offsets.undo"), "{}", r.stdout);
    Ok(())
}

/// A group member that polls on a thread of its own until dropped.
struct ActiveMember {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ActiveMember {
    fn start(group: &str, topic: &str) -> Result<Self> {
        let consumer: BaseConsumer = oncely::kafka::KafkaConnection::new(kit::bootstrap())
            .client_config()?
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .create()?;
        consumer.subscribe(&[topic])?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = consumer.poll(Duration::from_millis(100));
            }
        });
        Ok(ActiveMember { stop, thread: Some(thread) })
    }
}

impl Drop for ActiveMember {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reset_is_refused_while_the_group_has_an_active_member() -> Result<()> {
    let w = World::new("active", 1).await?;
    let (g, t) = (w.group.as_str(), w.topic.as_str());
    w.produce_now(0, 5).await?;
    w.commit(&[(0, 5)]).await?;
    let member = ActiveMember::start(g, t)?;
    kit::wait_until(WAIT, "the member to join", || async {
        let d = w.admin.describe_consumer_groups(&[g]).await?;
        Ok(d.first().is_some_and(|d| d.state == "Stable" && !d.members.is_empty()))
    })
    .await?;

    let r = w.oncely(&["offsets", "reset", "-g", g, "-t", t, "--to-earliest", "--execute"]).await?.refused()?;
    ensure!(r.stderr.contains("is active") && r.stderr.contains("stop its consumers first"), "{}", r.stderr);
    assert_eq!(w.offsets().await?, vec![Some(5)]);
    // The preview says so too, and is a refusal for scripts.
    let r = w.oncely(&["offsets", "reset", "-g", g, "-t", t, "--to-earliest"]).await?.refused()?;
    ensure!(r.stdout.contains("REFUSED: group") && r.stdout.contains("1 member(s)"), "{}", r.stdout);
    let audit = w.audit().await?;
    ensure!(audit.len() == 1 && audit[0]["result"] == "refused", "{audit:?}");

    // Once it has left, the same command goes through.
    drop(member);
    kit::wait_until(WAIT, "the member to leave", || async {
        let d = w.admin.describe_consumer_groups(&[g]).await?;
        Ok(d.first().is_some_and(|d| d.is_inactive()))
    })
    .await?;
    w.oncely(&["offsets", "reset", "-g", g, "-t", t, "--to-earliest", "--execute"]).await?.ok()?;
    assert_eq!(w.offsets().await?, vec![Some(0)]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn to_datetime_lands_on_the_first_offset_at_or_after_the_time() -> Result<()> {
    let w = World::new("datetime", 2).await?;
    let (g, t) = (w.group.as_str(), w.topic.as_str());
    // Ten minutes ago, one record a second; partition 1 half a second later.
    let base = (Utc::now().timestamp_millis() - 600_000) / 1000 * 1000;
    w.produce(0, &(0..6).map(|i| base + i * 1000).collect::<Vec<_>>()).await?;
    w.produce(1, &(0..6).map(|i| base + 500 + i * 1000).collect::<Vec<_>>()).await?;
    w.commit(&[(0, 6), (1, 6)]).await?;

    // base + 2.5 s, written in another zone: partition 0 lands on base+3s
    // (offset 3), partition 1 exactly on base+2.5s (offset 2).
    let zone = FixedOffset::east_opt(2 * 3600).context("zone")?;
    let at = DateTime::<Utc>::from_timestamp_millis(base + 2500).context("time")?.with_timezone(&zone).to_rfc3339();
    let v =
        w.oncely(&["-o", "json", "offsets", "reset", "-g", g, "-t", t, "--to-datetime", &at]).await?.ok()?.json()?;
    let firsts: Vec<(i64, Option<i64>)> = v["plan"]["partitions"]
        .as_array()
        .context("partitions")?
        .iter()
        .map(|p| (p["new"].as_i64().unwrap_or(-1), p["first_replayed_ms"].as_i64()))
        .collect();
    assert_eq!(firsts, vec![(3, Some(base + 3000)), (2, Some(base + 2500))]);
    assert_eq!(v["oldest_replayed_ms"], base + 2500);
    assert_eq!(v["plan"]["totals"]["redelivered"], 3 + 4);

    w.oncely(&["offsets", "reset", "-g", g, "-t", t, "--to-datetime", &at, "--execute"]).await?.ok()?;
    assert_eq!(w.offsets().await?, vec![Some(3), Some(2)]);

    // A time without a zone is a usage error.
    let r =
        w.oncely(&["offsets", "reset", "-g", g, "-t", t, "--to-datetime", "2026-03-21T02:44:00"]).await?.refused()?;
    ensure!(r.stderr.contains("no time zone"), "{}", r.stderr);
    // After the last record: the log end.
    let later = DateTime::<Utc>::from_timestamp_millis(base + 3_600_000).context("time")?.to_rfc3339();
    let v =
        w.oncely(&["-o", "json", "offsets", "reset", "-g", g, "-t", t, "--to-datetime", &later]).await?.ok()?.json()?;
    assert_eq!(v["plan"]["partitions"][0]["new"], 6);
    // --by-duration counts back from now.
    for (d, new) in [("15m", 0), ("PT9M", 6)] {
        let v =
            w.oncely(&["-o", "json", "offsets", "reset", "-g", g, "-t", t, "--by-duration", d]).await?.ok()?.json()?;
        assert_eq!(v["plan"]["partitions"][0]["new"], new, "{d}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replay_older_than_the_inbox_retention_is_not_promised_to_run_once() -> Result<()> {
    let w = World::new("retention", 1).await?;
    let (g, t) = (w.group.as_str(), w.topic.as_str());
    // An oncely consumer whose inbox keeps identities 8 days; records 10 and 2 days old.
    sqlx::query("INSERT INTO oncely.consumers (name, inbox_retention_days) VALUES ($1, 8)")
        .bind(g)
        .execute(&w.db.pool)
        .await?;
    let day = 86_400_000;
    let now = Utc::now().timestamp_millis();
    w.produce(0, &[now - 10 * day, now - 10 * day + 1000, now - 2 * day, now - 2 * day + 1000]).await?;
    w.commit(&[(0, 4)]).await?;
    let meaning = |v: &Value| v["oncely"]["meaning"].as_str().unwrap_or_default().to_owned();
    let v = w.oncely(&["-o", "json", "offsets", "reset", "-g", g, "-t", t, "--to-earliest"]).await?.ok()?.json()?;
    assert_eq!(v["oncely"]["consumer"], true);
    let m = meaning(&v);
    ensure!(m.contains("WOULD BE APPLIED AGAIN") && !m.contains("no handler runs twice"), "{m}");
    // Back only to the records the inbox still remembers: the usual promise.
    let v = w.oncely(&["-o", "json", "offsets", "reset", "-g", g, "-t", t, "--to-offset", "2"]).await?.ok()?.json()?;
    let m = meaning(&v);
    ensure!(m.contains("no handler runs twice") && !m.contains("WOULD BE APPLIED AGAIN"), "{m}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_snapshots_then_restore_to_a_past_snapshot() -> Result<()> {
    let w = World::new("watch", 2).await?;
    let g = w.group.as_str();
    w.produce_now(0, 10).await?;
    w.produce_now(1, 10).await?;

    w.commit(&[(0, 4), (1, 6)]).await?;
    let r = w.oncely(&["-o", "json", "watch", "--once", "-g", g]).await?.ok()?.json()?;
    let first = r["snapshots"][0]["id"].as_i64().context("a snapshot")?;
    w.commit(&[(0, 9), (1, 10)]).await?;
    w.oncely(&["watch", "--once", "-g", g]).await?.ok()?;

    let list = w.oncely(&["-o", "json", "offsets", "snapshots", "-g", g]).await?.ok()?.json()?;
    let list = list.as_array().context("list")?;
    assert_eq!(list.len(), 2);
    assert_eq!(list[1]["id"], first, "newest first");
    assert_eq!(offsets_of(&list[1]["offsets"]), vec![(0, Some(4)), (1, Some(6))]);
    let taken = |i: usize| -> Result<DateTime<Utc>> {
        Ok(list[i]["taken_at"].as_str().context("taken_at")?.parse::<DateTime<Utc>>()?)
    };
    let (t1, t2) = (taken(1)?, taken(0)?);
    let between = t1 + (t2 - t1) / 2;

    // "Where were we at T?": the last snapshot at or before T.
    let at = between.to_rfc3339();
    let v = w.oncely(&["-o", "json", "offsets", "reset", "-g", g, "--to-snapshot-at", &at]).await?.ok()?.json()?;
    assert_eq!(v["source_snapshot"]["id"], first);
    let news: Vec<i64> =
        v["plan"]["partitions"].as_array().context("p")?.iter().filter_map(|p| p["new"].as_i64()).collect();
    assert_eq!(news, vec![4, 6]);

    let id = first.to_string();
    w.oncely(&["offsets", "restore", &id, "--execute"]).await?.ok()?;
    assert_eq!(w.offsets().await?, vec![Some(4), Some(6)]);
    let audit = w.audit().await?;
    ensure!(audit.iter().any(|a| a["action"] == "offsets.restore" && a["result"] == "succeeded"), "{audit:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn lag_shows_rewind_after_a_rewind_of_a_caught_up_group_even_at_zero_lag() -> Result<()> {
    let w = World::new("lag", 2).await?;
    let (g, t) = (w.group.as_str(), w.topic.as_str());
    w.produce_now(0, 8).await?;
    w.produce_now(1, 8).await?;
    w.commit(&[(0, 8), (1, 8)]).await?;
    w.oncely(&["watch", "--once", "-g", g]).await?.ok()?;
    let lag = |v: &Value| -> (String, i64) {
        (v[0]["status"].as_str().unwrap_or("?").to_owned(), v[0]["total_lag"].as_i64().unwrap_or(-1))
    };
    let v = w.oncely(&["-o", "json", "lag", "-g", g]).await?.ok()?.json()?;
    assert_eq!(lag(&v), ("OK".into(), 0));

    // Someone rewinds the caught-up group with Kafka's own tool.
    let (group, topic) = (g.to_owned(), t.to_owned());
    tokio::task::spawn_blocking(move || {
        kit::kafka_tool(
            "kafka-consumer-groups",
            &[
                "--bootstrap-server",
                &kit::bootstrap(),
                "--group",
                &group,
                "--topic",
                &topic,
                "--reset-offsets",
                "--to-earliest",
                "--execute",
            ],
        )
    })
    .await??;
    let v = w.oncely(&["-o", "json", "lag", "-g", g]).await?.ok()?.json()?;
    assert_eq!(lag(&v), ("REWIND".into(), 16), "REWIND, not STOP: {v}");

    // It re-reads everything and catches up: lag 0 again, the rewind still shows.
    w.oncely(&["watch", "--once", "-g", g]).await?.ok()?;
    w.commit(&[(0, 8), (1, 8)]).await?;
    let v = w.oncely(&["-o", "json", "lag", "-g", g]).await?.ok()?.json()?;
    assert_eq!(lag(&v), ("REWIND".into(), 0), "{v}");
    let statuses: Vec<&str> =
        v[0]["partitions"].as_array().context("p")?.iter().filter_map(|p| p["status"].as_str()).collect();
    assert_eq!(statuses, vec!["REWIND", "REWIND"]);
    let r = w.oncely(&["lag", "-g", g]).await?.ok()?;
    ensure!(r.stdout.contains("REWIND") && r.stdout.contains("went back from 8 to 0"), "{}", r.stdout);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oncely_consumer_follows_an_oncely_reset_and_applies_nothing_twice() -> Result<()> {
    let w = World::new("oncely", 2).await?;
    let (g, t) = (w.group.as_str(), w.topic.as_str());
    app::setup(&w.db.pool).await?;
    let published = app::publish_seq(t, 4, 5).await?;
    let run = |tag: &str| {
        let token = CancellationToken::new();
        let join = tokio::spawn(app::consumer(g, t, w.db.pool.clone(), app::Behaviour::tagged(tag)).run(token.clone()));
        (token, join)
    };
    let caught_up = |n: i64| {
        let sql = format!("SELECT coalesce(sum(next_offset), 0)::bigint FROM oncely.offsets WHERE consumer = '{g}'");
        let pool = w.db.pool.clone();
        async move {
            kit::wait_until(WAIT, "the consumer to catch up", || async { Ok(kit::count(&pool, &sql).await? >= n) })
                .await
        }
    };
    let stop = |(token, join): (CancellationToken, tokio::task::JoinHandle<oncely::Result<()>>)| async move {
        token.cancel();
        tokio::time::timeout(WAIT, join).await.context("consumer did not stop")???;
        Ok::<_, anyhow::Error>(())
    };
    let c = run("first");
    caught_up(20).await?;
    kit::wait_until(WAIT, "Kafka commits", || async { Ok(w.offsets().await?.iter().flatten().sum::<i64>() >= 20) })
        .await?;
    stop(c).await?;
    kit::wait_until(WAIT, "the group to be empty", || async {
        Ok(w.admin.describe_consumer_groups(&[g]).await?.first().is_some_and(|d| d.is_inactive()))
    })
    .await?;

    let v = w.oncely(&["-o", "json", "offsets", "show", "-g", g]).await?.ok()?.json()?;
    assert_eq!(v["oncely_consumer"], true);
    let v = w
        .oncely(&["-o", "json", "offsets", "reset", "-g", g, "-t", t, "--to-earliest", "--execute"])
        .await?
        .ok()?
        .json()?;
    assert_eq!(v["oncely"]["consumer"], true);
    ensure!(v["oncely"]["meaning"].as_str().is_some_and(|m| m.contains("dropped as duplicates")), "{v}");
    assert_eq!(v["plan"]["totals"]["redelivered"], 20);

    // Restarted, it follows the reset (a replay, whatever its rewind policy)
    // and its inbox drops all 20 as duplicates.
    let c = run("second");
    kit::wait_until(WAIT, "the replay to be skipped as duplicates", || async {
        Ok(events::events_counted(g, t, "duplicate") >= 20)
    })
    .await?;
    ensure!(events::rewinds_counted(g, t, "replay") >= 1, "the consumer followed the reset");
    stop(c).await?;
    app::check_exactly_once_in_order(&w.db.pool, &published).await?;
    if app::applied(&w.db.pool).await?.len() != 20 {
        bail!("events were applied twice");
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Undo of changes that did not end `succeeded`, partitions without a commit,
// and Kafka's own flags (`--to-current`, `--export`).

impl World {
    /// Starts `oncely --config <ours> ARGS` without waiting for it (no
    /// terminal on stdin); killed if dropped.
    fn spawn_oncely(&self, args: &[&str]) -> Result<tokio::process::Child> {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_oncely"));
        cmd.arg("--config")
            .arg(&self.config)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for v in ["ONCELY_CONFIG", "ONCELY_ENV", "ONCELY_BOOTSTRAP_SERVERS", "ONCELY_DATABASE_URL"] {
            cmd.env_remove(v);
        }
        Ok(cmd.spawn()?)
    }

    /// The id of the group's newest audit record of `action` with `result`.
    async fn audit_id(&self, action: &str, result: &str) -> Result<Option<i64>> {
        Ok(sqlx::query_scalar(
            "SELECT max(id) FROM oncely.audit_log WHERE group_id = $1 AND action = $2 AND result = $3",
        )
        .bind(&self.group)
        .bind(action)
        .bind(result)
        .fetch_one(&self.db.pool)
        .await?)
    }

    /// Whether a session of this database waits on a lock in `UPDATE oncely.audit_log`.
    async fn outcome_update_blocked(&self) -> Result<bool> {
        Ok(sqlx::query_scalar(
            "SELECT count(*) > 0 FROM pg_stat_activity
              WHERE datname = current_database() AND wait_event_type = 'Lock'
                AND query LIKE 'UPDATE oncely.audit_log%'",
        )
        .fetch_one(&self.db.pool)
        .await?)
    }

    /// Kafka's own `kafka-consumer-groups` with these arguments.
    async fn kafka_groups(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["--bootstrap-server".to_owned(), kit::bootstrap()];
        all.extend(args.iter().map(|a| (*a).to_owned()));
        tokio::task::spawn_blocking(move || {
            let refs: Vec<&str> = all.iter().map(String::as_str).collect();
            kit::kafka_tool("kafka-consumer-groups", &refs)
        })
        .await?
    }
}

/// The `topic,partition,offset` lines of a CSV export, sorted.
fn csv_lines(text: &str) -> Vec<String> {
    let mut lines: Vec<String> = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned).collect();
    lines.sort();
    lines
}

/// `partition -> new` of an `-o json` preview.
fn planned(v: &Value) -> Vec<(i64, Option<i64>)> {
    v["plan"]["partitions"]
        .as_array()
        .map(|a| a.iter().map(|p| (p["partition"].as_i64().unwrap_or(-1), p["new"].as_i64())).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn undo_leaves_partitions_that_had_no_commit_without_one_again() -> Result<()> {
    let w = World::new("nocommit", 2).await?;
    let (g, t) = (w.group.as_str(), w.topic.as_str());
    w.produce_now(0, 10).await?;
    w.produce_now(1, 6).await?;
    w.commit(&[(0, 5)]).await?; // partition 1 was never committed
    w.oncely(&["offsets", "reset", "-g", g, "-t", t, "--to-earliest", "--execute"]).await?.ok()?;
    assert_eq!(w.offsets().await?, vec![Some(0), Some(0)]);

    // The preview says partition 1 goes back to no commit.
    let v = w.oncely(&["-o", "json", "offsets", "undo", "-g", g]).await?.ok()?.json()?;
    assert_eq!(planned(&v), vec![(0, Some(5)), (1, None)]);
    assert_eq!(v["plan"]["totals"]["uncommitted"], 1);
    let r = w.oncely(&["offsets", "undo", "-g", g]).await?.ok()?;
    ensure!(r.stdout.contains("no commit") && r.stdout.contains("auto.offset.reset"), "{}", r.stdout);

    w.oncely(&["offsets", "undo", "-g", g, "--execute"]).await?.ok()?;
    assert_eq!(w.offsets().await?, vec![Some(5), None], "exactly as the reset found them");
    // Kafka's own tool agrees: the group has a committed offset for partition 0 only.
    let out = w.kafka_groups(&["--describe", "--group", g]).await?;
    let rows: Vec<(String, String)> = out
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|c| c.len() >= 4 && c[0] == g && c[1] == t)
        .map(|c| (c[2].to_owned(), c[3].to_owned()))
        .collect();
    ensure!(
        rows.iter().any(|r| r == &("0".to_owned(), "5".to_owned())) && rows.iter().all(|(p, o)| p != "1" || o == "-"),
        "{out}"
    );

    // A group that had never committed anything: nothing committed again.
    let fresh = kit::unique("nocommit-fresh-g");
    w.oncely(&["offsets", "reset", "-g", &fresh, "-t", t, "--to-offset", "2", "--execute"]).await?.ok()?;
    assert_eq!(w.admin.list_consumer_group_offsets(&fresh, None).await?.len(), 2);
    w.oncely(&["offsets", "undo", "-g", &fresh, "--execute"]).await?.ok()?;
    let left = w.admin.list_consumer_group_offsets(&fresh, None).await?;
    ensure!(left.is_empty(), "the undo left commits behind: {left:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reset_killed_between_its_audit_record_and_its_outcome_is_undone() -> Result<()> {
    let w = World::new("killed", 2).await?;
    let g = w.group.as_str();
    w.produce_now(0, 20).await?;
    w.produce_now(1, 20).await?;
    w.commit(&[(0, 7), (1, 9)]).await?;

    // Hold the reset right after its audit record: its snapshot insert waits
    // for this table lock.
    let mut hold_snapshot = w.db.pool.begin().await?;
    sqlx::query("LOCK TABLE oncely.offset_snapshots IN SHARE MODE").execute(&mut *hold_snapshot).await?;
    let mut child = w.spawn_oncely(&["offsets", "reset", "-g", g, "--all-topics", "--to-earliest", "--execute"])?;
    kit::wait_until(WAIT, "the reset's audit record", || async {
        Ok(w.audit_id("offsets.reset", "started").await?.is_some())
    })
    .await?;
    let id = w.audit_id("offsets.reset", "started").await?.context("audit id")?;
    // Then let it go as far as recording its outcome, and hold it there: the
    // outcome update waits for this row lock (NO KEY UPDATE, so the
    // snapshot's foreign key check does not).
    let mut hold_outcome = w.db.pool.begin().await?;
    sqlx::query("SELECT id FROM oncely.audit_log WHERE id = $1 FOR NO KEY UPDATE")
        .bind(id)
        .execute(&mut *hold_outcome)
        .await?;
    hold_snapshot.commit().await?;
    let meta = format!("oncely:reset:{id}");
    kit::wait_until(WAIT, "the offsets to change and the outcome to wait", || async {
        let moved = w.committed().await?.iter().all(|(_, o, m)| *o == Some(0) && *m == meta);
        Ok(moved && w.outcome_update_blocked().await?)
    })
    .await?;
    // The operator's terminal dies: SIGKILL. Its outcome update already
    // reached the server and would run once the row is free (a server does
    // not notice a dead client while a statement waits), so end that
    // backend too, as the server does when it notices: nothing is recorded
    // after the change.
    let waiting: Vec<i32> = sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'
            AND query LIKE 'UPDATE oncely.audit_log%'",
    )
    .fetch_all(&w.db.pool)
    .await?;
    assert_eq!(waiting.len(), 1, "one outcome update waits");
    child.kill().await?;
    let ended: bool =
        sqlx::query_scalar("SELECT pg_terminate_backend($1)").bind(waiting[0]).fetch_one(&w.db.pool).await?;
    ensure!(ended, "the dead command's backend was ended");
    kit::wait_until(WAIT, "the dead command's backend to go", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE pid = $1")
            .bind(waiting[0])
            .fetch_one(&w.db.pool)
            .await?;
        Ok(n == 0)
    })
    .await?;
    hold_outcome.rollback().await?;
    let result: String =
        sqlx::query_scalar("SELECT result FROM oncely.audit_log WHERE id = $1").bind(id).fetch_one(&w.db.pool).await?;
    assert_eq!(result, "started", "the outcome was never recorded");
    assert_eq!(w.offsets().await?, vec![Some(0), Some(0)], "but the offsets changed");

    // Undo finds it and puts the offsets back.
    let v = w.oncely(&["-o", "json", "offsets", "undo", "-g", g]).await?.ok()?.json()?;
    assert_eq!(v["undoes"], id);
    assert_eq!(v["undoes_result"], "started");
    assert_eq!(planned(&v), vec![(0, Some(7)), (1, Some(9))]);
    w.oncely(&["offsets", "undo", "-g", g, "--execute"]).await?.ok()?;
    assert_eq!(w.offsets().await?, vec![Some(7), Some(9)]);
    let audit = w.audit().await?;
    ensure!(
        audit
            .iter()
            .any(|a| a["action"] == "offsets.undo" && a["result"] == "succeeded" && a["details"]["undoes"] == id),
        "{audit:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reset_that_failed_midway_is_undone_where_it_changed_and_refused_if_the_group_committed_since() -> Result<()>
{
    let w = World::new("midway", 2).await?;
    let (g, t) = (w.group.as_str(), w.topic.as_str());
    let doomed = kit::unique("midway-doomed");
    kit::create_topic(&doomed, 1).await?;
    w.produce_now(0, 20).await?;
    w.produce_now(1, 20).await?;
    w.commit(&[(0, 7), (1, 9)]).await?;

    // The reset is held after its checks and audit record, and one of its
    // topics is deleted meanwhile: the broker changes the other's partitions
    // and refuses that one's.
    let mut hold_snapshot = w.db.pool.begin().await?;
    sqlx::query("LOCK TABLE oncely.offset_snapshots IN SHARE MODE").execute(&mut *hold_snapshot).await?;
    let child = w.spawn_oncely(&["offsets", "reset", "-g", g, "-t", t, "-t", &doomed, "--to-earliest", "--execute"])?;
    kit::wait_until(WAIT, "the reset's audit record", || async {
        Ok(w.audit_id("offsets.reset", "started").await?.is_some())
    })
    .await?;
    let deleted = kit::admin()?.delete_topics(&[doomed.as_str()], &rdkafka::admin::AdminOptions::new()).await?;
    ensure!(deleted.iter().all(Result::is_ok), "{deleted:?}");
    kit::wait_until(WAIT, "the topic to be gone", || async { Ok(w.admin.topic_partitions(&doomed).await.is_err()) })
        .await?;
    hold_snapshot.commit().await?;
    let out = tokio::time::timeout(WAIT, child.wait_with_output()).await.context("the reset did not end")??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "a failure, not a refusal: {stderr}");
    let id = w.audit_id("offsets.reset", "failed").await?.context("the reset is recorded as failed")?;
    assert_eq!(w.offsets().await?, vec![Some(0), Some(0)], "it changed the partitions of {t}: {stderr}");

    // The group committed since: undo refuses and changes nothing.
    w.commit(&[(1, 4)]).await?;
    let r = w.oncely(&["offsets", "undo", "-g", g, "--execute"]).await?.refused()?;
    ensure!(r.stderr.contains("committed since") && r.stderr.contains(&format!("#{id}")), "{}", r.stderr);
    assert_eq!(w.offsets().await?, vec![Some(0), Some(4)]);

    // --force restores what the failed reset found, where it changed.
    let v = w.oncely(&["-o", "json", "offsets", "undo", "-g", g, "--execute", "--force"]).await?.ok()?.json()?;
    assert_eq!(v["undoes"], id);
    assert_eq!(v["undoes_result"], "failed");
    assert_eq!(w.offsets().await?, vec![Some(7), Some(9)]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn plans_and_exports_match_kafkas_own_tool_and_read_back_with_from_file() -> Result<()> {
    let w = World::new("kafka-flags", 3).await?;
    let (g, t) = (w.group.as_str(), w.topic.as_str());
    w.produce_now(0, 10).await?;
    w.produce_now(1, 8).await?;
    w.produce_now(2, 5).await?;
    w.commit(&[(0, 4), (1, 8)]).await?; // partition 2: no commit

    // Each target as Kafka's tool plans it (its --export CSV) and as oncely
    // does (the -o json preview and its own --export).
    let all = t.to_owned();
    let committed = format!("{t}:0,1");
    for (topics, target) in [
        (&all, vec!["--to-current"]),
        (&all, vec!["--to-earliest"]),
        (&all, vec!["--to-latest"]),
        (&all, vec!["--to-offset", "3"]),
        (&committed, vec!["--shift-by", "-2"]),
    ] {
        let mut kafka = vec!["--group", g, "--topic", topics.as_str(), "--reset-offsets", "--dry-run", "--export"];
        kafka.extend(&target);
        let theirs = csv_lines(&w.kafka_groups(&kafka).await?);
        ensure!(!theirs.is_empty(), "Kafka's tool planned nothing for {target:?}");

        let mut ours = vec!["offsets", "reset", "-g", g, "-t", topics.as_str(), "--export"];
        ours.extend(&target);
        let r = w.oncely(&ours).await?.ok()?;
        assert_eq!(csv_lines(&r.stdout), theirs, "--export {target:?}");

        let mut json = vec!["-o", "json", "offsets", "reset", "-g", g, "-t", topics.as_str()];
        json.extend(&target);
        let v = w.oncely(&json).await?.ok()?.json()?;
        let ours: Vec<String> = planned(&v).into_iter().map(|(p, n)| format!("{t},{p},{}", n.unwrap_or(-1))).collect();
        assert_eq!(csv_lines(&ours.join("\n")), theirs, "plan {target:?}");
    }
    // --to-current is where the group is, and the log end without a commit.
    let r = w.oncely(&["offsets", "reset", "-g", g, "-t", t, "--to-current", "--export"]).await?.ok()?;
    assert_eq!(csv_lines(&r.stdout), vec![format!("{t},0,4"), format!("{t},1,8"), format!("{t},2,5")]);

    // Out of range: Kafka's tool moves the target into the log with a
    // warning; oncely refuses and exports nothing.
    let theirs = w
        .kafka_groups(&["--group", g, "--topic", t, "--reset-offsets", "--dry-run", "--export", "--to-offset", "100"])
        .await?;
    assert_eq!(csv_lines(&theirs), vec![format!("{t},0,10"), format!("{t},1,8"), format!("{t},2,5")]);
    let r = w.oncely(&["offsets", "reset", "-g", g, "-t", t, "--to-offset", "100", "--export"]).await?.refused()?;
    ensure!(r.stdout.trim().is_empty() && r.stderr.contains("outside the log"), "{r:?}");
    // --export is a dry run, and Kafka's CSV has no place for JSON.
    w.oncely(&["offsets", "reset", "-g", g, "-t", t, "--to-current", "--export", "--execute"]).await?.refused()?;
    w.oncely(&["-o", "json", "offsets", "reset", "-g", g, "-t", t, "--to-current", "--export"]).await?.refused()?;

    // Export where the group is, move it, and read the file back: with
    // oncely, and with Kafka's tool, which plans the same from it.
    let file = w.dir.join("plan.csv");
    let r = w.oncely(&["offsets", "reset", "-g", g, "-t", t, "--to-current", "--export"]).await?.ok()?;
    std::fs::write(&file, &r.stdout)?;
    let path = file.to_string_lossy().into_owned();
    let theirs =
        w.kafka_groups(&["--group", g, "--reset-offsets", "--dry-run", "--export", "--from-file", &path]).await?;
    assert_eq!(csv_lines(&theirs), csv_lines(&r.stdout), "Kafka's tool reads oncely's export");
    w.oncely(&["offsets", "reset", "-g", g, "-t", t, "--to-earliest", "--execute"]).await?.ok()?;
    assert_eq!(w.offsets().await?, vec![Some(0), Some(0), Some(0)]);
    w.oncely(&["offsets", "reset", "-g", g, "--from-file", &path, "--execute"]).await?.ok()?;
    assert_eq!(w.offsets().await?, vec![Some(4), Some(8), Some(5)]);
    Ok(())
}
