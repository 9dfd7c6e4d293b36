//! Fixtures for oncely's tests, against the real services that
//! `scripts/services up` starts: fresh random topic, group and database names
//! so tests run in parallel and never see each other's data.

use std::future::Future;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use sqlx::{Connection, PgConnection, PgPool};

pub mod app;
pub mod billing;
pub mod gateway;
pub mod process;
pub mod processor;
pub mod run;
pub mod supervisor;
pub mod wire;

/// Whether a reader's poll error is one librdkafka recovers from by itself:
/// a dropped connection (it reconnects), reported as an error event. A
/// reader of a test topic waits it out (until its deadline) instead of
/// failing the test on a busy machine.
pub fn is_transient_read_error(e: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(e, rdkafka::error::KafkaError::MessageConsumption(C::AllBrokersDown | C::BrokerTransportFailure))
}

/// The operator binary `exe` run on environment `prod`, **protected**, of
/// cluster `cluster` and database `db_url`: no config file, no terminal on
/// stdin (so a typed confirmation can only come from `--confirm`).
pub fn protected_cli(exe: &str, cluster: &str, db_url: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new(exe);
    cmd.current_dir(std::env::temp_dir())
        .env_remove("ONCELY_CONFIG")
        .env("ONCELY_ENV", "prod")
        .env("ONCELY_PROTECTED", "true")
        .env("ONCELY_CLUSTER_ID", cluster)
        .env("ONCELY_BOOTSTRAP_SERVERS", bootstrap())
        .env("ONCELY_DATABASE_URL", db_url)
        .stdin(std::process::Stdio::null());
    cmd
}

/// Kafka bootstrap servers of the test broker (`ONCELY_KAFKA_BOOTSTRAP`, default `127.0.0.1:9092`).
pub fn bootstrap() -> String {
    std::env::var("ONCELY_KAFKA_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// The plaintext listener as a connection.
pub fn connection() -> oncely::kafka::KafkaConnection {
    oncely::kafka::KafkaConnection::new(bootstrap())
}

/// A required variable of `scripts/services env`.
fn service_var(name: &str) -> Result<String> {
    std::env::var(name).with_context(|| format!("{name} is not set: run `eval \"$(scripts/services env)\"`"))
}

/// The test broker's SASL_SSL listener (SCRAM-SHA-512) with the test user,
/// its password and the local CA, from `scripts/services env`.
pub fn secure_connection() -> Result<oncely::kafka::KafkaConnection> {
    secure_connection_with(&service_var("ONCELY_KAFKA_SECURE_PASSWORD")?, &service_var("ONCELY_KAFKA_SECURE_CA")?)
}

/// [`secure_connection`] with another password or CA (to see them refused).
pub fn secure_connection_with(password: &str, ca: &str) -> Result<oncely::kafka::KafkaConnection> {
    Ok(oncely::kafka::KafkaConnection::new(service_var("ONCELY_KAFKA_SECURE_BOOTSTRAP")?)
        .property("security.protocol", "SASL_SSL")
        .property("sasl.mechanisms", "SCRAM-SHA-512")
        .property("sasl.username", service_var("ONCELY_KAFKA_SECURE_USER")?)
        .property("sasl.password", password)
        .property("ssl.ca.location", ca))
}

/// URL of the test server's `oncely` database (`DATABASE_URL`).
pub fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://oncely:oncely@127.0.0.1:5432/oncely".into())
}

/// The repository root (for `scripts/`).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A fresh name: `prefix-<random>`, valid as a topic, group or database name.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{:012x}", fastrand::u64(..) & 0xffff_ffff_ffff)
}

/// Installs a test subscriber for `tracing` once (`RUST_LOG` filters; default warn).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,oncely=info")),
        )
        .with_test_writer()
        .try_init();
}

/// Installs a `tracing` subscriber writing to stderr (for test binaries,
/// whose stdout is a protocol the test reads).
pub fn init_tracing_stderr() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,oncely=info")),
        )
        .with_writer(std::io::stderr)
        .try_init();
}

/// An admin client for the test broker.
pub fn admin() -> Result<AdminClient<DefaultClientContext>> {
    Ok(oncely::kafka::KafkaConnection::new(bootstrap()).client_config()?.create()?)
}

/// Creates `name` with `partitions` partitions and waits until its metadata is visible.
pub async fn create_topic(name: &str, partitions: i32) -> Result<()> {
    create_topic_with(name, partitions, &[]).await
}

/// Creates a topic with extra topic configs (`retention.ms`, ...).
pub async fn create_topic_with(name: &str, partitions: i32, configs: &[(&str, &str)]) -> Result<()> {
    let admin = admin()?;
    let mut topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    for (k, v) in configs {
        topic = topic.set(k, v);
    }
    let res =
        admin.create_topics([&topic], &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)))).await?;
    for r in res {
        if let Err((t, e)) = r {
            bail!("creating topic {t}: {e}");
        }
    }
    let consumer: BaseConsumer = oncely::kafka::KafkaConnection::new(bootstrap()).client_config()?.create()?;
    let name = name.to_owned();
    wait_until_blocking(Duration::from_secs(30), "topic metadata", || {
        consumer
            .fetch_metadata(Some(&name), Duration::from_secs(5))
            .map(|m| m.topics().first().map(|t| t.partitions().len() as i32) == Some(partitions))
            .unwrap_or(false)
    })
}

/// Deletes `name` and waits until the broker no longer lists it.
pub async fn delete_topic(name: &str) -> Result<()> {
    let admin = admin()?;
    let res =
        admin.delete_topics(&[name], &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)))).await?;
    for r in res {
        if let Err((t, e)) = r {
            bail!("deleting topic {t}: {e}");
        }
    }
    let consumer: BaseConsumer = oncely::kafka::KafkaConnection::new(bootstrap()).client_config()?.create()?;
    let name = name.to_owned();
    wait_until_blocking(Duration::from_secs(60), "the topic to be gone", || {
        consumer
            .fetch_metadata(None, Duration::from_secs(5))
            .map(|m| !m.topics().iter().any(|t| t.name() == name))
            .unwrap_or(false)
    })
}

/// Sets topic configs (`max.message.bytes`, ...) with the Admin API and
/// waits until the broker reports them.
pub async fn alter_topic_config(name: &str, configs: &[(&str, &str)]) -> Result<()> {
    use rdkafka::admin::{AlterConfig, ResourceSpecifier};
    let admin = admin()?;
    let mut change = AlterConfig::new(ResourceSpecifier::Topic(name));
    for (k, v) in configs {
        change = change.set(k, v);
    }
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(30)));
    for r in admin.alter_configs([&change], &opts).await? {
        if let Err((res, e)) = r {
            bail!("altering {res:?}: {e}");
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let described = admin.describe_configs([&ResourceSpecifier::Topic(name)], &opts).await?;
        let applied = described.iter().all(|r| match r {
            Ok(res) => configs.iter().all(|(k, v)| res.get(k).and_then(|e| e.value.as_deref()) == Some(*v)),
            Err(_) => false,
        });
        if applied {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the configs of topic {name} did not change to {configs:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A fresh database on the test server with oncely's migrations applied.
/// Dropped (best effort) when the value is dropped.
#[derive(Debug)]
pub struct TestDb {
    /// Pool to the fresh database.
    pub pool: PgPool,
    /// Its URL, for child processes.
    pub url: String,
    /// Its name.
    pub name: String,
}

impl TestDb {
    /// Creates the database and migrates it.
    pub async fn new() -> Result<Self> {
        let db = Self::empty().await?;
        oncely::store::migrate(&db.pool).await?;
        Ok(db)
    }

    /// Creates the database without oncely's schema (tests of a migration).
    pub async fn empty() -> Result<Self> {
        let name = unique("oncely_test").replace('-', "_");
        let admin_url = database_url();
        let mut conn = PgConnection::connect(&admin_url).await.context("connecting to the test server")?;
        sqlx::query(&format!("CREATE DATABASE \"{name}\"")).execute(&mut conn).await?;
        conn.close().await?;
        let url = with_database(&admin_url, &name);
        let pool = oncely::store::connect(&url, 20).await?;
        Ok(TestDb { pool, url, name })
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let url = database_url();
        // Dropping needs a fresh connection and the runtime may be shutting
        // down: do it on a thread of its own with its own small runtime.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            rt.block_on(async move {
                if let Ok(mut c) = PgConnection::connect(&url).await {
                    let _ =
                        sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).execute(&mut c).await;
                }
            });
        })
        .join();
    }
}

/// `url` with its database path replaced by `db`.
pub fn with_database(url: &str, db: &str) -> String {
    oncely::store::with_database(url, db)
}

/// Runs one of Kafka's own tools (`kafka-consumer-groups`, ...) through
/// `scripts/kafka-tool`, as an operator would; returns its stdout, fails with
/// its stderr.
pub fn kafka_tool(name: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(repo_root().join("scripts/kafka-tool"))
        .arg(name)
        .args(args)
        .output()
        .with_context(|| format!("running scripts/kafka-tool {name}"))?;
    if !out.status.success() {
        bail!(
            "kafka-tool {name} {args:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `scripts/services <cmd>` (`stop-kafka`, `start-postgres`, ...) with
/// this process's environment, so a private instance (`ONCELY_CACHE`, ports)
/// is the one acted on. Its output goes to a file, not to a pipe:
/// `start-kafka` leaves a shell (the broker's parent) holding its stdout and
/// stderr, and a pipe would stay open until the broker stops.
pub fn services(cmd: &str) -> Result<()> {
    let log = std::env::temp_dir().join(format!("{}.log", unique("services")));
    let file = std::fs::File::create(&log)?;
    let status = Command::new(repo_root().join("scripts/services"))
        .arg(cmd)
        .stdin(std::process::Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .status()
        .with_context(|| format!("running scripts/services {cmd}"))?;
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    if !status.success() {
        bail!("scripts/services {cmd} failed: {status}\n{output}");
    }
    Ok(())
}

/// A stopped service (`kafka` or `postgres`), started again when dropped,
/// also when the test fails.
#[derive(Debug)]
pub struct Stopped(&'static str);

impl Stopped {
    /// Stops `service` (`kafka` or `postgres`).
    pub fn stop(service: &'static str) -> Result<Self> {
        services(&format!("stop-{service}"))?;
        Ok(Stopped(service))
    }

    /// Starts it again now.
    pub fn start(self) -> Result<()> {
        let s = self.0;
        std::mem::forget(self);
        services(&format!("start-{s}"))
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        if let Err(e) = services(&format!("start-{}", self.0)) {
            eprintln!("could not start {} again: {e:#}", self.0);
        }
    }
}

/// Waits until `cond` returns true, polling every 50 ms; fails after `timeout`
/// naming `what`.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut cond: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Blocking form of [`wait_until`].
pub fn wait_until_blocking(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The sum of the offsets `group` has committed to Kafka, and whether every
/// one of them carries oncely's commit metadata.
pub async fn kafka_committed_sum(group: &str) -> Result<(i64, bool)> {
    let admin = oncely::kafka::KafkaAdmin::new(connection(), &[])?;
    let offsets = admin.list_consumer_group_offsets(group, None).await?;
    let ours = offsets.iter().all(|o| o.metadata == oncely::kafka::COMMIT_METADATA);
    Ok((offsets.iter().filter_map(|o| o.offset).sum(), ours))
}

/// Counts a query's single bigint result.
pub async fn count(pool: &PgPool, sql: &str) -> Result<i64> {
    Ok(sqlx::query_scalar::<_, i64>(sql).fetch_one(pool).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_database_replaces_the_path() {
        assert_eq!(with_database("postgres://u:p@h:5432/oncely", "x"), "postgres://u:p@h:5432/x");
        assert_eq!(with_database("postgres://u@h/db?sslmode=disable", "x"), "postgres://u@h/x?sslmode=disable");
    }
}
