//! Counters, gauges and histograms, and a Prometheus text endpoint.
//!
//! A small process-wide registry keyed by metric name and labels: enough for
//! the handful of series oncely exports, with no dependency. Every notable
//! runtime event is one struct in [`crate::consumer::events`] that logs and
//! counts through here.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

type Labels = Vec<(&'static str, String)>;

#[derive(Debug, Default)]
struct Registry {
    counters: BTreeMap<(&'static str, Labels), f64>,
    gauges: BTreeMap<(&'static str, Labels), f64>,
    histograms: BTreeMap<(&'static str, Labels), Histogram>,
    help: BTreeMap<&'static str, &'static str>,
}

#[derive(Debug, Clone)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

/// Histogram buckets in seconds (batch and publish latencies).
const BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

fn registry() -> &'static Mutex<Registry> {
    static R: OnceLock<Mutex<Registry>> = OnceLock::new();
    R.get_or_init(|| Mutex::new(Registry::default()))
}

fn with<R>(f: impl FnOnce(&mut Registry) -> R) -> R {
    let mut g = match registry().lock() {
        Ok(g) => g,
        // A panic while holding the lock leaves plain numbers behind: still usable.
        Err(p) => p.into_inner(),
    };
    f(&mut g)
}

fn labels(l: &[(&'static str, &str)]) -> Labels {
    l.iter().map(|(k, v)| (*k, (*v).to_owned())).collect()
}

/// Adds `n` to counter `name{labels}`.
pub fn inc(name: &'static str, help: &'static str, l: &[(&'static str, &str)], n: u64) {
    with(|r| {
        r.help.entry(name).or_insert(help);
        *r.counters.entry((name, labels(l))).or_default() += n as f64;
    });
}

/// Sets gauge `name{labels}` to `v`.
pub fn set(name: &'static str, help: &'static str, l: &[(&'static str, &str)], v: f64) {
    with(|r| {
        r.help.entry(name).or_insert(help);
        r.gauges.insert((name, labels(l)), v);
    });
}

/// Records `seconds` in histogram `name{labels}`.
pub fn observe(name: &'static str, help: &'static str, l: &[(&'static str, &str)], seconds: f64) {
    with(|r| {
        r.help.entry(name).or_insert(help);
        let h = r.histograms.entry((name, labels(l))).or_insert_with(|| Histogram {
            counts: vec![0; BUCKETS.len()],
            sum: 0.0,
            count: 0,
        });
        for (i, b) in BUCKETS.iter().enumerate() {
            if seconds <= *b {
                h.counts[i] += 1;
            }
        }
        h.sum += seconds;
        h.count += 1;
    });
}

/// The current value of counter `name` with exactly these labels (0 if never counted).
pub fn counter(name: &'static str, l: &[(&'static str, &str)]) -> u64 {
    with(|r| r.counters.get(&(name, labels(l))).copied().unwrap_or(0.0) as u64)
}

fn fmt_labels(l: &Labels, extra: Option<(&str, String)>) -> String {
    let mut parts: Vec<String> =
        l.iter().map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""))).collect();
    if let Some((k, v)) = extra {
        parts.push(format!("{k}=\"{v}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

/// Renders every series in the Prometheus text exposition format.
pub fn render() -> String {
    with(|r| {
        let mut out = String::new();
        let mut last = "";
        for ((name, l), v) in &r.counters {
            if *name != last {
                let _ = writeln!(out, "# HELP {name} {}\n# TYPE {name} counter", r.help.get(name).unwrap_or(&""));
                last = name;
            }
            let _ = writeln!(out, "{name}{} {v}", fmt_labels(l, None));
        }
        last = "";
        for ((name, l), v) in &r.gauges {
            if *name != last {
                let _ = writeln!(out, "# HELP {name} {}\n# TYPE {name} gauge", r.help.get(name).unwrap_or(&""));
                last = name;
            }
            let _ = writeln!(out, "{name}{} {v}", fmt_labels(l, None));
        }
        last = "";
        for ((name, l), h) in &r.histograms {
            if *name != last {
                let _ = writeln!(out, "# HELP {name} {}\n# TYPE {name} histogram", r.help.get(name).unwrap_or(&""));
                last = name;
            }
            for (i, b) in BUCKETS.iter().enumerate() {
                let _ = writeln!(out, "{name}_bucket{} {}", fmt_labels(l, Some(("le", b.to_string()))), h.counts[i]);
            }
            let _ = writeln!(out, "{name}_bucket{} {}", fmt_labels(l, Some(("le", "+Inf".into()))), h.count);
            let _ = writeln!(out, "{name}_sum{} {}", fmt_labels(l, None), h.sum);
            let _ = writeln!(out, "{name}_count{} {}", fmt_labels(l, None), h.count);
        }
        out
    })
}

/// Serves `GET /metrics` on `addr` until `shutdown`. Returns the bound address
/// (pass port 0 to pick a free one).
pub async fn serve(addr: SocketAddr, shutdown: CancellationToken) -> crate::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => return,
                a = listener.accept() => a,
            };
            let Ok((mut sock, _)) = accepted else { continue };
            tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                let n = sock.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]);
                let (status, body) = if req.starts_with("GET /metrics") {
                    ("200 OK", render())
                } else {
                    ("404 Not Found", "try GET /metrics\n".to_owned())
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
            });
        }
    });
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histograms() {
        inc("oncely_test_total", "a test counter", &[("consumer", "c\"1")], 3);
        observe("oncely_test_seconds", "a test histogram", &[("consumer", "c1")], 0.02);
        let text = render();
        assert!(text.contains("# TYPE oncely_test_total counter"), "{text}");
        assert!(text.contains(r#"oncely_test_total{consumer="c\"1"} 3"#), "{text}");
        assert!(text.contains(r#"oncely_test_seconds_bucket{consumer="c1",le="0.025"} 1"#), "{text}");
        assert!(text.contains(r#"oncely_test_seconds_bucket{consumer="c1",le="0.01"} 0"#), "{text}");
        assert_eq!(counter("oncely_test_total", &[("consumer", "c\"1")]), 3);
    }
}
