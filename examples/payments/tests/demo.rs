//! `payments-demo --json` end to end, against the real services started by
//! `scripts/services`: the reference application's processes, Kafka's own
//! `kafka-consumer-groups` tool, and `oncely offsets` on a protected
//! environment. The demo checks its own expectations; this test reads its
//! JSON verdict, so that a demo that stops proving what it claims fails CI.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{ensure, Context, Result};
use serde_json::Value;

/// The repository root (for `scripts/kafka-tool`).
fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Builds the operator command line next to `payments-demo` (same
/// profile): the demo runs `oncely` from there. A no-op when it is up to
/// date. (`payments` itself is built for this test by cargo.)
fn build_oncely(demo: &Path) -> Result<()> {
    let dir = demo.parent().context("the payments-demo binary has no directory")?;
    let profile = match dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev".to_owned(),
        Some(other) => other.to_owned(),
    };
    let status = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "-p", "oncely-cli", "--bin", "oncely", "--profile", &profile])
        .current_dir(repo_root())
        .status()
        .context("running cargo build -p oncely-cli")?;
    ensure!(status.success(), "cargo build -p oncely-cli failed ({status})");
    ensure!(dir.join("oncely").is_file(), "the oncely binary is not next to {}", demo.display());
    Ok(())
}

#[test]
fn the_demo_shows_no_duplicate_with_oncely_and_duplicates_without() -> Result<()> {
    let demo = PathBuf::from(env!("CARGO_BIN_EXE_payments-demo"));
    build_oncely(&demo)?;
    let out = Command::new(&demo)
        .args(["--json", "--payments", "200"])
        .env("ONCELY_KAFKA_TOOL", repo_root().join("scripts/kafka-tool"))
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("running payments-demo")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    let v: Value = serde_json::from_str(last).with_context(|| format!("the last line is not JSON:\n{stdout}"))?;
    let num = |k: &str| v.get(k).and_then(Value::as_u64);
    let flag = |k: &str| v.get(k).and_then(Value::as_bool);
    ensure!(out.status.success(), "payments-demo failed ({}):\n{}", out.status, stdout);
    ensure!(flag("ok") == Some(true), "the demo reports a failure:\n{}", stdout);
    ensure!(num("oncely_duplicate_webhooks") == Some(0), "oncely sent duplicate webhooks:\n{}", stdout);
    ensure!(num("duplicate_charges") == Some(0), "a card was charged twice:\n{}", stdout);
    // The naive dispatcher re-sends every record the rewind made it re-read.
    let naive = num("naive_duplicate_webhooks").unwrap_or(0);
    ensure!(naive > 0 && Some(naive) == num("naive_redelivered"), "naive duplicates {naive}:\n{}", stdout);
    ensure!(num("payments") == num("orders") && num("payments") >= Some(200), "payments != orders:\n{}", stdout);
    ensure!(flag("guard_refused") == Some(true), "the guard did not refuse:\n{}", stdout);
    ensure!(flag("undo_restored") == Some(true), "undo did not restore:\n{}", stdout);
    ensure!(num("rebuild_side_effects") == Some(0), "the rebuild fired side effects:\n{}", stdout);
    ensure!(flag("rebuild_corrected") == Some(true), "the rebuild did not correct the taxes:\n{}", stdout);
    ensure!(num("swap_lost") == Some(0), "orders lost across the swap:\n{}", stdout);
    ensure!(num("swap_duplicates") == Some(0), "orders applied twice across the swap:\n{}", stdout);
    Ok(())
}
