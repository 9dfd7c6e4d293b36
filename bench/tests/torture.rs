//! The short torture run of CI: `oncely-bench torture` with a few thousand
//! orders and every kind of fault at least once (SIGKILLs, group members
//! added and removed, rewinds with Kafka's own tool, a broker restart and a
//! PostgreSQL restart, members frozen with SIGSTOP past their session timeout,
//! hostile records, events copied into another partition), then its invariants.
//!
//! It restarts the shared broker and database server, so it must not run
//! beside other tests: it is ignored in the normal run and run alone, last,
//! by `scripts/test`:
//!
//! ```text
//! cargo build -p payments && cargo test -p oncely-bench --test torture -- --ignored --test-threads=1
//! ```
//!
//! It needs the `payments` binary of the same profile next to `oncely-bench`.

use std::path::PathBuf;
use std::process::Command;

#[test]
#[ignore = "restarts the shared Kafka broker and PostgreSQL: run alone (scripts/test does)"]
fn the_pipeline_survives_every_kind_of_fault() {
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_oncely-bench"));
    let payments = bench.with_file_name("payments");
    assert!(
        payments.is_file(),
        "{} is missing: run `cargo build -p payments` (same profile) first",
        payments.display()
    );
    let orders = std::env::var("ONCELY_TORTURE_ORDERS").unwrap_or_else(|_| "2000".into());
    let mut cmd = Command::new(&bench);
    cmd.args(["torture", "--orders", &orders, "--rate", "15", "--faults-min", "1", "--json"]);
    if let Ok(seed) = std::env::var("ONCELY_TORTURE_SEED") {
        cmd.args(["--seed", &seed]);
    }
    let out = match cmd.output() {
        Ok(o) => o,
        Err(e) => panic!("running {}: {e}", bench.display()),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    let last = stdout.lines().last().unwrap_or_default();
    let report: serde_json::Value = match serde_json::from_str(last) {
        Ok(v) => v,
        Err(e) => panic!("the last line is not the JSON report ({e}): {last}\nstderr:\n{stderr}"),
    };
    assert!(out.status.success(), "bench torture failed ({}): {report}\nstderr:\n{stderr}", out.status);
    assert_eq!(report["ok"], true, "{report}");
    for key in ["duplicate_charges", "duplicate_webhooks", "lost", "dead_letters", "order_violations"] {
        assert_eq!(report[key], 0, "{key} in {report}");
    }
    assert_eq!(report["orders"], report["payments"], "{report}");
    assert_eq!(report["orders"], report["distinct_charges"], "{report}");
    assert!(report["hostile_records"].as_u64().unwrap_or(0) >= 5, "{report}");
    assert_eq!(report["hostile_dead_letters"], report["hostile_records"], "{report}");
    assert_eq!(report["hostile_without_reason"], 0, "{report}");
    assert!(report["resent_copies"].as_u64().unwrap_or(0) >= 1, "no event copied into another partition: {report}");
    let faults = report["faults"].as_object().cloned().unwrap_or_default();
    for kind in [
        "kill-payment-service",
        "kill-webhook-dispatcher",
        "kill-relay",
        "add-member",
        "remove-member",
        "rewind-webhook-dispatcher",
        "rewind-payment-service",
        "restart-kafka",
        "restart-postgres",
        "freeze-payment-service",
        "freeze-webhook-dispatcher",
        "hostile-records",
        "resend-other-partition",
    ] {
        assert!(faults.get(kind).and_then(|v| v.as_u64()).unwrap_or(0) >= 1, "no {kind} fault in {report}");
    }
}
