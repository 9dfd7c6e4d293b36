//! The operator CLI against the test broker's SASL_SSL listener (SCRAM-SHA-512):
//! `offsets show | reset | undo` and `lag` through an `oncely.toml`
//! environment with client properties; the password never shows in output.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use oncely::kafka::admin::KafkaAdmin;
use oncely_testkit as kit;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

fn var(name: &str) -> Result<String> {
    std::env::var(name).with_context(|| format!("{name} is not set (scripts/services env)"))
}

/// Runs `oncely --config CONFIG ARGS`; returns (exit code, stdout, stderr).
async fn oncely(config: &std::path::Path, args: &[&str]) -> Result<(i32, String, String)> {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_oncely"))
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(Stdio::null())
        .env_remove("ONCELY_CONFIG")
        .env_remove("ONCELY_ENV")
        // The environment's password is read from this variable (see the file).
        .env("ONCELY_TEST_KAFKA_PASSWORD", var("ONCELY_KAFKA_SECURE_PASSWORD")?)
        .output()
        .await?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Writes an `oncely.toml` with one environment, `secure`, on the SASL_SSL
/// listener: `password` is the TOML value of `sasl.password`, `ca` the CA file.
fn write_config(config: &std::path::Path, db_url: &str, cluster: &str, password: &str, ca: &str) -> Result<()> {
    std::fs::write(
        config,
        format!(
            "[env.secure]\nbootstrap_servers = \"{}\"\ndatabase_url = \"{db_url}\"\ncluster_id = \"{cluster}\"\nprotected = false\n\n\
             [env.secure.kafka]\n\"security.protocol\" = \"SASL_SSL\"\n\"sasl.mechanisms\" = \"SCRAM-SHA-512\"\n\
             \"sasl.username\" = \"{}\"\n\"sasl.password\" = {password}\n\"ssl.ca.location\" = \"{ca}\"\n",
            var("ONCELY_KAFKA_SECURE_BOOTSTRAP")?,
            var("ONCELY_KAFKA_SECURE_USER")?,
        ),
    )?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_password_or_an_untrusted_certificate_fails_the_cli_in_seconds_and_names_the_cause() -> Result<()> {
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    let cluster = KafkaAdmin::new(kit::secure_connection()?, &[])?.describe_cluster().await?.cluster_id;
    let dir = std::env::temp_dir().join(kit::unique("oncely-secure-cli-bad"));
    std::fs::create_dir_all(&dir)?;
    let cases = [
        ("\"not-the-password\"", var("ONCELY_KAFKA_SECURE_CA")?, "authentication"),
        ("{ env = \"ONCELY_TEST_KAFKA_PASSWORD\" }", var("ONCELY_KAFKA_UNTRUSTED_CA")?, "certificate"),
    ];
    for (i, (password, ca, cause)) in cases.iter().enumerate() {
        let config = dir.join(format!("oncely-{i}.toml"));
        write_config(&config, &db.url, &cluster, password, ca)?;
        let started = std::time::Instant::now();
        let (code, out, err) =
            tokio::time::timeout(Duration::from_secs(60), oncely(&config, &["offsets", "show", "-g", "any-group"]))
                .await
                .with_context(|| format!("the CLI hung with a bad {cause}"))??;
        ensure!(code != 0, "a bad {cause} must fail: {out}\n{err}");
        ensure!(err.to_lowercase().contains(cause), "stderr names the {cause}: {err}");
        ensure!(started.elapsed() < Duration::from_secs(30), "failed after {:?}", started.elapsed());
        ensure!(!err.contains("not-the-password"), "the password appeared: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn offsets_and_lag_work_over_sasl_ssl_and_never_show_the_password() -> Result<()> {
    kit::init_tracing();
    let conn = kit::secure_connection()?;
    let password = var("ONCELY_KAFKA_SECURE_PASSWORD")?;
    let db = kit::TestDb::new().await?;
    let (topic, group) = (kit::unique("secure-cli"), kit::unique("secure-cli-g"));
    // The topic, its records and the group's commit, all over SASL_SSL.
    let admin = KafkaAdmin::new(conn.clone(), &[])?;
    let raw: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> = conn.client_config()?.create()?;
    let t = rdkafka::admin::NewTopic::new(&topic, 1, rdkafka::admin::TopicReplication::Fixed(1));
    for r in raw.create_topics([&t], &rdkafka::admin::AdminOptions::new()).await? {
        r.map_err(|(t, e)| anyhow::anyhow!("creating {t}: {e}"))?;
    }
    kit::wait_until(Duration::from_secs(30), "the topic", || async {
        Ok(admin.topic_partitions(&topic).await.map(|p| p.len() == 1).unwrap_or(false))
    })
    .await?;
    let producer: FutureProducer = conn.client_config()?.create()?;
    for i in 0..10 {
        let payload = format!("r{i}");
        producer
            .send(FutureRecord::to(&topic).key("k").payload(&payload), Duration::from_secs(30))
            .await
            .map_err(|(e, _)| e)?;
    }
    {
        let (conn, group, topic) = (conn.clone(), group.clone(), topic.clone());
        tokio::task::spawn_blocking(move || -> Result<()> {
            let c: BaseConsumer =
                conn.client_config()?.set("group.id", &group).set("enable.auto.commit", "false").create()?;
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&topic, 0, Offset::Offset(8))?;
            c.commit(&tpl, CommitMode::Sync)?;
            Ok(())
        })
        .await??;
    }
    let cluster = admin.describe_cluster().await?.cluster_id;
    let dir = std::env::temp_dir().join(kit::unique("oncely-secure-cli"));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("oncely.toml");
    write_config(
        &config,
        &db.url,
        &cluster,
        "{ env = \"ONCELY_TEST_KAFKA_PASSWORD\" }",
        &var("ONCELY_KAFKA_SECURE_CA")?,
    )?;

    let mut all = String::new();
    let (code, out, err) = oncely(&config, &["-o", "json", "offsets", "show", "-g", &group]).await?;
    ensure!(code == 0, "show: {code}\n{out}\n{err}");
    ensure!(out.contains("\"offset\":8") || out.contains("\"committed\":8"), "show: {out}");
    all.push_str(&out);
    all.push_str(&err);
    let (code, out, err) =
        oncely(&config, &["offsets", "reset", "-g", &group, "-t", &topic, "--to-earliest", "--execute"]).await?;
    ensure!(code == 0, "reset: {code}\n{out}\n{err}");
    all.push_str(&out);
    all.push_str(&err);
    let committed = admin.list_consumer_group_offsets(&group, Some(&[(topic.clone(), 0)])).await?;
    ensure!(committed.first().and_then(|o| o.offset) == Some(0), "reset to earliest: {committed:?}");
    let (code, out, err) = oncely(&config, &["offsets", "undo", "-g", &group, "--execute"]).await?;
    ensure!(code == 0, "undo: {code}\n{out}\n{err}");
    all.push_str(&out);
    all.push_str(&err);
    let committed = admin.list_consumer_group_offsets(&group, Some(&[(topic.clone(), 0)])).await?;
    ensure!(committed.first().and_then(|o| o.offset) == Some(8), "undo restored 8: {committed:?}");
    let (code, out, err) = oncely(&config, &["-o", "json", "lag", "-g", &group]).await?;
    ensure!(code == 0, "lag: {code}\n{out}\n{err}");
    all.push_str(&out);
    all.push_str(&err);
    let (code, out, err) = oncely(&config, &["env"]).await?;
    ensure!(code == 0 && out.contains("sasl.password = ***"), "env masks the password: {out}\n{err}");
    all.push_str(&out);
    ensure!(!all.contains(&password), "the password appeared in the CLI's output");
    // Audit records never carry it either.
    let audit: Vec<String> =
        sqlx::query_scalar("SELECT row_to_json(a)::text FROM oncely.audit_log a").fetch_all(&db.pool).await?;
    ensure!(!audit.is_empty() && audit.iter().all(|a| !a.contains(&password)), "{audit:?}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
