//! The test binaries (`test-consumer`, `test-billing`) as child processes a
//! test can signal, started through [`crate::supervisor::spawn_ready`].

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::process::{Child, Command};

/// A running `test-consumer` (killed when dropped).
#[derive(Debug)]
pub struct TestConsumer {
    /// The process.
    pub child: Child,
    /// Its stdout lines (`READY`, `HANGING <event id>`), read continuously so the pipe never fills.
    pub lines: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl TestConsumer {
    /// Starts `exe GROUP TOPIC` against `db_url` with extra variables, and
    /// waits for its `READY` line. Its logs go to stderr (`RUST_LOG`, default warn).
    pub async fn spawn(exe: &Path, db_url: &str, group: &str, topic: &str, envs: &[(&str, &str)]) -> Result<Self> {
        Self::spawn_args(exe, db_url, &[group, topic], envs).await
    }

    /// Starts `exe ARGS...` like [`spawn`](TestConsumer::spawn) (for
    /// `test-billing MODE GROUP TOPIC`).
    pub async fn spawn_args(exe: &Path, db_url: &str, args: &[&str], envs: &[(&str, &str)]) -> Result<Self> {
        let mut cmd = Command::new(exe);
        cmd.args(args)
            .env("DATABASE_URL", db_url)
            .env("ONCELY_KAFKA_BOOTSTRAP", crate::bootstrap())
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .stderr(Stdio::inherit());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let name = exe.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let ready = crate::supervisor::spawn_ready(cmd, &name, None, Duration::from_secs(90)).await?;
        Ok(TestConsumer { child: ready.child, lines: ready.lines })
    }

    /// Waits for a stdout line equal to `want`.
    pub async fn wait_line(&mut self, want: &str, timeout: Duration) -> Result<()> {
        self.wait_line_where(want, timeout, |l| l == want).await.map(drop)
    }

    /// Waits for a stdout line starting with `prefix`; returns the rest of it.
    pub async fn wait_prefix(&mut self, prefix: &str, timeout: Duration) -> Result<String> {
        let line = self.wait_line_where(prefix, timeout, |l| l.starts_with(prefix)).await?;
        Ok(line[prefix.len()..].to_owned())
    }

    async fn wait_line_where(&mut self, want: &str, timeout: Duration, hit: impl Fn(&str) -> bool) -> Result<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let line =
                tokio::time::timeout_at(deadline, self.lines.recv()).await.with_context(|| format!("no {want}"))?;
            match line {
                Some(l) if hit(&l) => return Ok(l),
                Some(_) => {}
                None => anyhow::bail!("the consumer exited before printing {want}"),
            }
        }
    }

    /// Sends a signal (`-KILL`, `-TERM`) with the system's `kill`.
    pub fn signal(&self, sig: &str) -> Result<()> {
        let pid = self.child.id().context("the process has exited")?;
        let st = std::process::Command::new("kill").args([sig, &pid.to_string()]).status()?;
        anyhow::ensure!(st.success(), "kill {sig} {pid} failed");
        Ok(())
    }

    /// SIGKILL, then reap.
    pub async fn kill9(mut self) -> Result<()> {
        self.signal("-KILL")?;
        self.child.wait().await?;
        Ok(())
    }

    /// SIGTERM (graceful stop), then wait for the exit.
    pub async fn terminate(mut self, timeout: Duration) -> Result<()> {
        self.signal("-TERM")?;
        tokio::time::timeout(timeout, self.child.wait()).await.context("did not stop after SIGTERM")??;
        Ok(())
    }
}
