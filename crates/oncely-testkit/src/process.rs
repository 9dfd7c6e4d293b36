//! The test binaries (`test-consumer`, `test-billing`, `test-processor`) as
//! child processes a test can signal, started through
//! [`crate::supervisor::spawn_ready`] (or its two halves, when the test keeps
//! the child's stderr).

use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A running test binary (killed when dropped).
#[derive(Debug)]
pub struct TestProcess {
    /// The process.
    pub child: Child,
    /// Its stdout lines after `READY` (`HANGING <event id>`, ...), read
    /// continuously so the pipe never fills.
    pub lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    /// Its stderr lines, when they are kept ([`TestProcess::start`]).
    stderr: Option<Arc<Mutex<Vec<String>>>>,
}

/// A running `test-consumer` or `test-billing`.
pub type TestConsumer = TestProcess;

impl TestProcess {
    /// Starts `exe GROUP TOPIC` against `db_url` with extra variables, and
    /// waits for its `READY` line. Its logs go to stderr (`RUST_LOG`, default warn).
    pub async fn spawn(exe: &Path, db_url: &str, group: &str, topic: &str, envs: &[(&str, &str)]) -> Result<Self> {
        Self::spawn_args(exe, db_url, &[group, topic], envs).await
    }

    /// Starts `exe ARGS...` like [`spawn`](TestProcess::spawn) (for
    /// `test-billing MODE GROUP TOPIC`).
    pub async fn spawn_args(exe: &Path, db_url: &str, args: &[&str], envs: &[(&str, &str)]) -> Result<Self> {
        Self::spawn_logged(exe, db_url, args, envs, None).await
    }

    /// [`spawn_args`](TestProcess::spawn_args), its logs kept for
    /// [`stderr`](TestProcess::stderr) (and echoed with `[tag]` in front)
    /// when `keep_stderr` is `Some(tag)`.
    pub async fn spawn_logged(
        exe: &Path,
        db_url: &str,
        args: &[&str],
        envs: &[(&str, &str)],
        keep_stderr: Option<&str>,
    ) -> Result<Self> {
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
        Self::start(cmd, &name, keep_stderr).await
    }

    /// Starts `cmd` and waits for its `READY` line (90 s at most). With
    /// `keep_stderr = Some(tag)` its stderr is read from the start, kept for
    /// [`stderr`](TestProcess::stderr) and echoed with `[tag]` in front;
    /// otherwise it goes where `cmd` sends it.
    pub async fn start(mut cmd: Command, name: &str, keep_stderr: Option<&str>) -> Result<Self> {
        if keep_stderr.is_some() {
            cmd.stderr(Stdio::piped());
        }
        let (mut child, lines) = crate::supervisor::spawn_piped(cmd, name)?;
        let stderr = match keep_stderr {
            None => None,
            Some(tag) => {
                let pipe = child.stderr.take().context("the child's stderr")?;
                let kept = Arc::new(Mutex::new(Vec::new()));
                let keep = kept.clone();
                let tag = tag.to_owned();
                tokio::spawn(async move {
                    let mut r = BufReader::new(pipe).lines();
                    while let Ok(Some(l)) = r.next_line().await {
                        eprintln!("[{tag}] {l}");
                        if let Ok(mut k) = keep.lock() {
                            k.push(l);
                        }
                    }
                });
                Some(kept)
            }
        };
        let ready = crate::supervisor::wait_ready(child, lines, name, None, Duration::from_secs(90)).await?;
        Ok(TestProcess { child: ready.child, lines: ready.lines, stderr })
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
                None => anyhow::bail!("the process exited before printing {want}"),
            }
        }
    }

    /// The stderr lines so far (its logs), when they are kept.
    pub fn stderr(&self) -> Vec<String> {
        self.stderr.as_ref().and_then(|s| s.lock().ok().map(|l| l.clone())).unwrap_or_default()
    }

    /// Sends a signal (`-KILL`, `-TERM`, `-STOP`, `-CONT`) with the system's `kill`.
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

    /// SIGTERM (graceful stop), then wait for a successful exit.
    pub async fn terminate(mut self, timeout: Duration) -> Result<()> {
        self.signal("-TERM")?;
        let st = tokio::time::timeout(timeout, self.child.wait()).await.context("did not stop after SIGTERM")??;
        anyhow::ensure!(st.success(), "exited with {st} after SIGTERM");
        Ok(())
    }

    /// Waits for the process to exit on its own.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        Ok(tokio::time::timeout(timeout, self.child.wait()).await.context("the process did not exit")??)
    }
}
