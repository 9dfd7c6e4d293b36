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
use rdkafka::ClientConfig;
use sqlx::{Connection, PgConnection, PgPool};

pub mod app;
pub mod gateway;
pub mod process;
pub mod processor;

/// Kafka bootstrap servers of the test broker (`ONCELY_KAFKA_BOOTSTRAP`, default `127.0.0.1:9092`).
pub fn bootstrap() -> String {
    std::env::var("ONCELY_KAFKA_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:9092".into())
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
    Ok(ClientConfig::new().set("bootstrap.servers", bootstrap()).create()?)
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
    let consumer: BaseConsumer = ClientConfig::new().set("bootstrap.servers", bootstrap()).create()?;
    let name = name.to_owned();
    wait_until_blocking(Duration::from_secs(30), "topic metadata", || {
        consumer
            .fetch_metadata(Some(&name), Duration::from_secs(5))
            .map(|m| m.topics().first().map(|t| t.partitions().len() as i32) == Some(partitions))
            .unwrap_or(false)
    })
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
        let name = unique("oncely_test").replace('-', "_");
        let admin_url = database_url();
        let mut conn = PgConnection::connect(&admin_url).await.context("connecting to the test server")?;
        sqlx::query(&format!("CREATE DATABASE \"{name}\"")).execute(&mut conn).await?;
        conn.close().await?;
        let url = with_database(&admin_url, &name);
        let pool = oncely::store::connect(&url, 20).await?;
        oncely::store::migrate(&pool).await?;
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
