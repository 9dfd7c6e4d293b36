//! The one process supervisor of the workspace, for every program that runs
//! services as child processes: the demo (`payments-demo`), the torture run
//! of `oncely-bench`, and the tests' [`crate::process::TestConsumer`]. Start a
//! binary and wait for its `READY` line (noting `LISTEN <url>` and
//! `METRICS <url>` on the way), stop it (SIGTERM, then SIGKILL after a
//! grace), kill it (SIGKILL), signal it (SIGSTOP/SIGCONT), notice the ones
//! that exited on their own; and a few helpers around them (fresh
//! databases, topics, polling with a deadline, running a tool).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use sqlx::{Connection as _, PgConnection};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// How long a service may take to print `READY`.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running service of the reference application.
#[derive(Debug)]
pub struct Proc {
    /// The name it was started as.
    pub name: String,
    /// `payments` arguments after the common ones (to start it again).
    pub args: Vec<String>,
    child: Child,
    /// Its stderr.
    pub log: PathBuf,
    /// `LISTEN <url>`, if it printed one.
    pub url: Option<String>,
    /// `METRICS <url>`, if it printed one.
    pub metrics: Option<String>,
}

/// A process that exited without being asked to.
#[derive(Debug, Clone)]
pub struct Exited {
    /// Its name.
    pub name: String,
    /// Its arguments (to start it again).
    pub args: Vec<String>,
    /// How it ended.
    pub status: Option<ExitStatus>,
    /// Its log file.
    pub log: PathBuf,
}

/// Starts and stops the services, each `payments <args>` with the common
/// connection flags, stderr to a log file per start.
#[derive(Debug)]
pub struct Procs {
    bin: PathBuf,
    common: Vec<String>,
    dir: PathBuf,
    log_filter: String,
    running: BTreeMap<String, Proc>,
    starts: usize,
}

impl Procs {
    /// A supervisor running `bin` with `common` flags first, logs in `dir`,
    /// `RUST_LOG=log_filter`.
    pub fn new(bin: PathBuf, common: Vec<String>, dir: PathBuf, log_filter: &str) -> Self {
        Procs { bin, common, dir, log_filter: log_filter.to_owned(), running: BTreeMap::new(), starts: 0 }
    }

    /// The `payments` binary.
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// The common flags.
    pub fn common(&self) -> &[String] {
        &self.common
    }

    /// Starts `payments <args>` as `name` and waits for its `READY`.
    pub async fn start(&mut self, name: &str, args: &[String]) -> Result<()> {
        anyhow::ensure!(!self.running.contains_key(name), "{name} is already running");
        self.starts += 1;
        let log = self.dir.join(format!("{:03}-{name}.log", self.starts));
        let stderr = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = Command::new(&self.bin);
        cmd.args(&self.common).args(args).env("RUST_LOG", &self.log_filter).stderr(Stdio::from(stderr));
        let Ready { child, mut lines, url, metrics } = spawn_ready(cmd, name, Some(&log), START_TIMEOUT).await?;
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while lines.recv().await.is_some() {} });
        self.running
            .insert(name.to_owned(), Proc { name: name.to_owned(), args: args.to_vec(), child, log, url, metrics });
        Ok(())
    }

    /// Whether `name` is running (as far as the supervisor knows).
    pub fn is_running(&self, name: &str) -> bool {
        self.running.contains_key(name)
    }

    /// The `LISTEN` address of `name`.
    pub fn url(&self, name: &str) -> Result<String> {
        self.running.get(name).and_then(|p| p.url.clone()).with_context(|| format!("{name} has no address"))
    }

    /// The `METRICS` address of `name`.
    pub fn metrics_url(&self, name: &str) -> Result<String> {
        self.running.get(name).and_then(|p| p.metrics.clone()).with_context(|| format!("{name} serves no metrics"))
    }

    /// The arguments `name` was started with (to start it again).
    pub fn args_of(&self, name: &str) -> Result<Vec<String>> {
        self.running.get(name).map(|p| p.args.clone()).with_context(|| format!("{name} is not running"))
    }

    /// Stops `name` gracefully (SIGTERM), killing it if it does not exit
    /// within `grace`; returns its arguments.
    pub async fn stop(&mut self, name: &str, grace: Duration) -> Result<Vec<String>> {
        let mut p = self.running.remove(name).with_context(|| format!("{name} is not running"))?;
        stop_proc(&mut p, grace).await?;
        Ok(p.args)
    }

    /// Kills `name` with SIGKILL (a crash); returns its arguments, to restart it.
    pub async fn kill(&mut self, name: &str) -> Result<Vec<String>> {
        let mut p = self.running.remove(name).with_context(|| format!("{name} is not running"))?;
        signal(&p.child, "KILL")?;
        p.child.wait().await.with_context(|| format!("waiting for {name}"))?;
        Ok(p.args)
    }

    /// Sends `SIG<sig>` (`STOP`, `CONT`, …) to `name`, which keeps running
    /// as far as the supervisor is concerned.
    pub fn signal(&self, name: &str, sig: &str) -> Result<()> {
        let p = self.running.get(name).with_context(|| format!("{name} is not running"))?;
        signal(&p.child, sig)
    }

    /// The processes that exited on their own since the last call (they are
    /// forgotten: start them again with their arguments).
    pub fn reap(&mut self) -> Vec<Exited> {
        let mut gone = Vec::new();
        for (name, p) in &mut self.running {
            if let Ok(Some(status)) = p.child.try_wait() {
                gone.push(Exited {
                    name: name.clone(),
                    args: p.args.clone(),
                    status: Some(status),
                    log: p.log.clone(),
                });
            }
        }
        for e in &gone {
            self.running.remove(&e.name);
        }
        gone
    }

    /// Name and log file of every running process.
    pub fn logs(&self) -> Vec<(String, PathBuf)> {
        self.running.values().map(|p| (p.name.clone(), p.log.clone())).collect()
    }

    /// Stops everything, in the order given by `rank` (lowest first).
    pub async fn stop_all(&mut self, rank: impl Fn(&str) -> u8) {
        let mut names: Vec<String> = self.running.keys().cloned().collect();
        names.sort_by_key(|n| rank(n));
        for n in names {
            if let Err(e) = self.stop(&n, Duration::from_secs(20)).await {
                tracing::warn!(service = %n, error = %e, "Stopping a service failed.");
            }
        }
    }
}

/// A child that printed `READY`.
#[derive(Debug)]
pub struct Ready {
    /// The process (killed when dropped).
    pub child: Child,
    /// Its stdout lines after `READY`, read continuously so the pipe never
    /// fills (drain them, or drop the receiver).
    pub lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    /// `LISTEN <url>`, if it printed one.
    pub url: Option<String>,
    /// `METRICS <url>`, if it printed one.
    pub metrics: Option<String>,
}

/// Spawns `cmd` (stdin closed, stdout piped, killed on drop; stderr as the
/// caller set it) and waits up to `timeout` for its `READY` line. A child
/// that exits or does not get ready fails the call, with the end of `log`
/// when there is one.
pub async fn spawn_ready(cmd: Command, name: &str, log: Option<&Path>, timeout: Duration) -> Result<Ready> {
    let (child, lines) = spawn_piped(cmd, name)?;
    wait_ready(child, lines, name, log, timeout).await
}

/// The first half of [`spawn_ready`]: spawns `cmd` (stdin closed, stdout
/// piped and read into the returned lines, killed on drop). For a caller that
/// takes the child's stderr pipe before it waits for `READY`.
pub fn spawn_piped(mut cmd: Command, name: &str) -> Result<(Child, tokio::sync::mpsc::UnboundedReceiver<String>)> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    let stdout = child.stdout.take().context("the child's stdout")?;
    let (tx, lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        let mut r = BufReader::new(stdout).lines();
        while let Ok(Some(l)) = r.next_line().await {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    Ok((child, lines))
}

/// The second half of [`spawn_ready`]: waits for a child's `READY` line.
pub async fn wait_ready(
    mut child: Child,
    mut lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    name: &str,
    log: Option<&Path>,
    timeout: Duration,
) -> Result<Ready> {
    let end_of_log = || log.map(|l| format!(":\n{}", tail(l, 15))).unwrap_or_default();
    let (mut url, mut metrics) = (None, None);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, lines.recv()).await {
            Ok(Some(l)) if l == "READY" => return Ok(Ready { child, lines, url, metrics }),
            Ok(Some(l)) => {
                if let Some(u) = l.strip_prefix("LISTEN ") {
                    url = Some(u.trim().to_owned());
                } else if let Some(u) = l.strip_prefix("METRICS ") {
                    metrics = Some(u.trim().to_owned());
                }
            }
            Ok(None) => {
                let status = child.wait().await.ok();
                bail!("{name} exited before it was ready ({status:?}){}", end_of_log());
            }
            Err(_) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                bail!("{name} was not ready after {timeout:?}{}", end_of_log());
            }
        }
    }
}

async fn stop_proc(p: &mut Proc, grace: Duration) -> Result<()> {
    if let Ok(Some(_)) = p.child.try_wait() {
        return Ok(());
    }
    signal(&p.child, "TERM")?;
    match tokio::time::timeout(grace, p.child.wait()).await {
        Ok(r) => {
            r.with_context(|| format!("waiting for {}", p.name))?;
        }
        Err(_) => {
            signal(&p.child, "KILL")?;
            p.child.wait().await.with_context(|| format!("waiting for {}", p.name))?;
            bail!("{} did not stop within {grace:?} after SIGTERM; killed it", p.name);
        }
    }
    Ok(())
}

/// Sends `SIG<sig>` to the child (by its process id).
fn signal(child: &Child, sig: &str) -> Result<()> {
    let Some(pid) = child.id() else { return Ok(()) }; // already reaped
    let status = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status()
        .context("running kill")?;
    // The process may have exited between the check and the signal.
    if !status.success() && child.id().is_some() {
        tracing::debug!(pid, sig, "kill failed; the process has probably exited already.");
    }
    Ok(())
}

/// The last `n` lines of a log file, indented.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].iter().map(|l| format!("      {l}")).collect::<Vec<_>>().join("\n")
}

/// Polls `f` every `every` until it returns `Some`, failing after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, every: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last = match f().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => None,
            Err(e) => Some(e),
        };
        if Instant::now() > deadline {
            match last {
                Some(e) => bail!("timed out after {timeout:?} waiting for {what}: {e:#}"),
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        tokio::time::sleep(every).await;
    }
}

pub use crate::with_database;

/// `url` without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Creates database `name` on the server of `admin_url`.
pub async fn create_database(admin_url: &str, name: &str) -> Result<()> {
    let mut conn = tokio::time::timeout(Duration::from_secs(10), PgConnection::connect(admin_url))
        .await
        .map_err(|_| anyhow::anyhow!("connecting to PostgreSQL timed out"))?
        .with_context(|| format!("connecting to {}", redact(admin_url)))?;
    let r = sqlx::query(&format!("CREATE DATABASE \"{name}\"")).execute(&mut conn).await;
    let _ = conn.close().await;
    r.with_context(|| format!("creating database {name}"))?;
    Ok(())
}

/// Drops database `name` (closing its connections); logs failures.
pub async fn drop_database(admin_url: &str, name: &str) -> Result<()> {
    let mut c = PgConnection::connect(admin_url).await.context("connecting to drop the database")?;
    let r = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).execute(&mut c).await;
    let _ = c.close().await;
    r.with_context(|| format!("dropping database {name}"))?;
    Ok(())
}

/// Creates `names` with `partitions` partitions each and waits until they
/// show in the metadata.
pub async fn create_topics(bootstrap: &str, names: &[&str], partitions: i32) -> Result<()> {
    let kafka: AdminClient<DefaultClientContext> = oncely::kafka::KafkaConnection::new(bootstrap)
        .client_config()?
        .create()
        .context("creating a Kafka admin client")?;
    let topics: Vec<NewTopic<'_>> =
        names.iter().map(|n| NewTopic::new(n, partitions, TopicReplication::Fixed(1))).collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for r in kafka.create_topics(&topics, &opts).await.context("creating the topics")? {
        if let Err((t, e)) = r {
            bail!("creating topic {t}: {e}");
        }
    }
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let bootstrap = bootstrap.to_owned();
    wait_for("the topics to appear in the metadata", Duration::from_secs(30), Duration::from_millis(100), || {
        let (names, bootstrap) = (names.clone(), bootstrap.clone());
        async move {
            let all = topics_with_prefix(&bootstrap, "").await?;
            Ok(names.iter().all(|n| all.iter().any(|(t, p)| t == n && *p == partitions as usize)).then_some(()))
        }
    })
    .await
}

/// Topics whose name starts with `prefix`, with their partition counts.
pub async fn topics_with_prefix(bootstrap: &str, prefix: &str) -> Result<Vec<(String, usize)>> {
    let md: BaseConsumer =
        oncely::kafka::KafkaConnection::new(bootstrap).client_config()?.create().context("creating a Kafka client")?;
    let prefix = prefix.to_owned();
    tokio::task::spawn_blocking(move || -> Result<Vec<(String, usize)>> {
        let md = md.fetch_metadata(None, Duration::from_secs(10)).context("reading the Kafka metadata")?;
        Ok(md
            .topics()
            .iter()
            .filter(|t| t.name().starts_with(&prefix) && t.error().is_none())
            .map(|t| (t.name().to_owned(), t.partitions().len()))
            .collect())
    })
    .await
    .context("the metadata task")?
}

/// Deletes every topic whose name starts with `prefix` and the consumer
/// groups `groups` (a group that never committed does not exist: fine).
pub async fn delete_kafka_objects(bootstrap: &str, prefix: &str, groups: &[&str]) -> Result<()> {
    let kafka: AdminClient<DefaultClientContext> = oncely::kafka::KafkaConnection::new(bootstrap)
        .client_config()?
        .create()
        .context("creating a Kafka admin client")?;
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let mut problems = Vec::new();
    for r in kafka.delete_groups(groups, &opts).await.context("deleting the groups")? {
        if let Err((g, e)) = r {
            if e != rdkafka::types::RDKafkaErrorCode::GroupIdNotFound {
                problems.push(format!("group {g}: {e}"));
            }
        }
    }
    let topics = topics_with_prefix(bootstrap, prefix).await?;
    if !topics.is_empty() {
        let names: Vec<&str> = topics.iter().map(|(t, _)| t.as_str()).collect();
        for r in kafka.delete_topics(&names, &opts).await.context("deleting the topics")? {
            if let Err((t, e)) = r {
                problems.push(format!("topic {t}: {e}"));
            }
        }
    }
    anyhow::ensure!(problems.is_empty(), "{}", problems.join("; "));
    Ok(())
}

/// A file `rel` (e.g. `scripts/kafka-tool`) in a directory above `exe` (the
/// checkout a `target/<profile>/` binary was built in).
pub fn find_above(exe: &Path, rel: &str) -> Option<PathBuf> {
    exe.ancestors().skip(1).map(|d| d.join(rel)).find(|p| p.is_file())
}

/// Runs `program args` with a timeout; fails unless it exits 0. Returns its stdout.
pub async fn run_tool(program: &Path, args: &[&str], timeout: Duration) -> Result<String> {
    let out = tokio::time::timeout(
        timeout,
        Command::new(program).args(args).stdin(Stdio::null()).kill_on_drop(true).output(),
    )
    .await
    .map_err(|_| anyhow::anyhow!("{} {} did not finish in {timeout:?}", program.display(), args.join(" ")))?
    .with_context(|| format!("running {}", program.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "{} {} failed ({}): {}{}",
        program.display(),
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `program args` with a timeout, its output appended to `log` (not a
/// pipe: a daemon it starts may keep inherited descriptors open, and a pipe
/// would then never reach end-of-file); fails unless it exits 0.
pub async fn run_logged(program: &Path, args: &[&str], timeout: Duration, log: &Path) -> Result<()> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let err = file.try_clone().with_context(|| format!("opening {}", log.display()))?;
    let what = format!("{} {}", program.display(), args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(file))
        .stderr(Stdio::from(err))
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("running {what}"))?;
    let status = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(s) => s.with_context(|| format!("waiting for {what}"))?,
        Err(_) => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            bail!("{what} did not finish in {timeout:?}:\n{}", tail(log, 10));
        }
    };
    anyhow::ensure!(status.success(), "{what} failed ({status}):\n{}", tail(log, 10));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_urls_are_rewritten() {
        assert_eq!(with_database("postgres://u:p@h:5432/oncely", "x"), "postgres://u:p@h:5432/x");
        assert_eq!(with_database("postgres://u@h/db?sslmode=disable", "x"), "postgres://u@h/x?sslmode=disable");
    }
}
