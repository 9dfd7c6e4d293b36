//! The `test-consumer` binary as a child process a test can signal.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A running `test-consumer` (killed when dropped).
#[derive(Debug)]
pub struct TestConsumer {
    /// The process.
    pub child: Child,
    /// Its stdout lines (`READY`, `HANGING`), read continuously so the pipe never fills.
    pub lines: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl TestConsumer {
    /// Starts `exe GROUP TOPIC` against `db_url` with extra variables, and
    /// waits for its `READY` line. Its logs go to stderr (`RUST_LOG`, default warn).
    pub async fn spawn(exe: &Path, db_url: &str, group: &str, topic: &str, envs: &[(&str, &str)]) -> Result<Self> {
        let mut cmd = Command::new(exe);
        cmd.arg(group)
            .arg(topic)
            .env("DATABASE_URL", db_url)
            .env("ONCELY_KAFKA_BOOTSTRAP", crate::bootstrap())
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()));
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).kill_on_drop(true).spawn()?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut r = BufReader::new(stdout).lines();
            while let Ok(Some(l)) = r.next_line().await {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let first = tokio::time::timeout(Duration::from_secs(90), lines.recv()).await.context("no READY")?;
        anyhow::ensure!(first.as_deref() == Some("READY"), "unexpected first line {first:?}");
        Ok(TestConsumer { child, lines })
    }

    /// Waits for a stdout line equal to `want`.
    pub async fn wait_line(&mut self, want: &str, timeout: Duration) -> Result<()> {
        loop {
            let line = tokio::time::timeout(timeout, self.lines.recv()).await.with_context(|| format!("no {want}"))?;
            match line {
                Some(l) if l == want => return Ok(()),
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
