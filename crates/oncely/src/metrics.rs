//! Counters, gauges and histograms in Prometheus/OpenMetrics form, through
//! [`prometheus-client`](https://docs.rs/prometheus-client) (the Prometheus
//! project's Rust client), and a small `GET /metrics` endpoint.
//!
//! Every notable runtime event is one struct in [`crate::consumer::events`]
//! that logs and counts through here. Hot paths hold a [`CounterHandle`] (or
//! [`HistogramHandle`]) made once, so a count is an atomic add: no lock and no
//! label allocation per event. An application that serves its own HTTP can
//! mount [`render`] on its router (`GET /metrics` → `render()`, content type
//! [`CONTENT_TYPE`]) or register oncely's metrics in its own registry with
//! [`encode_into`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, OnceLock, RwLock};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A metric's labels.
type Labels = Vec<(&'static str, String)>;
type Histograms = Family<Labels, Histogram, fn() -> Histogram>;
type Gauges = Family<Labels, Gauge<f64, AtomicU64>>;

/// Histogram buckets in seconds (batch and publish latencies).
const BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// The content type of [`render`]'s output (OpenMetrics text).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

fn histogram() -> Histogram {
    Histogram::new(BUCKETS.iter().copied())
}

#[derive(Default)]
struct Metrics {
    registry: Mutex<Registry>,
    counters: RwLock<HashMap<&'static str, Family<Labels, Counter>>>,
    gauges: RwLock<HashMap<&'static str, Gauges>>,
    histograms: RwLock<HashMap<&'static str, Histograms>>,
}

fn metrics() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(Metrics::default)
}

/// Label values escaped as the text format requires (prometheus-client 0.23
/// writes them as they are: a consumer name with a quote would break the page).
fn labels(l: &[(&'static str, &str)]) -> Labels {
    l.iter()
        .map(|(k, v)| {
            let v = if v.contains(['\\', '"', '\n']) {
                v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
            } else {
                (*v).to_owned()
            };
            (*k, v)
        })
        .collect()
}

/// The family of `name` in `map`, registered on first use. prometheus-client
/// appends `_total` to counters, so a counter is registered without it.
fn family<
    F: Clone
        + prometheus_client::metrics::TypedMetric
        + prometheus_client::encoding::EncodeMetric
        + Send
        + Sync
        + std::fmt::Debug
        + 'static,
>(
    map: &RwLock<HashMap<&'static str, F>>,
    name: &'static str,
    help: &'static str,
    new: impl FnOnce() -> F,
) -> F {
    if let Some(f) = map.read().ok().and_then(|m| m.get(name).cloned()) {
        return f;
    }
    let mut m = match map.write() {
        Ok(m) => m,
        Err(p) => p.into_inner(),
    };
    m.entry(name)
        .or_insert_with(|| {
            let f = new();
            let mut r = match metrics().registry.lock() {
                Ok(r) => r,
                Err(p) => p.into_inner(),
            };
            r.register(name.strip_suffix("_total").unwrap_or(name), help, f.clone());
            f
        })
        .clone()
}

fn counters(name: &'static str, help: &'static str) -> Family<Labels, Counter> {
    family(&metrics().counters, name, help, Family::default)
}

/// A counter with fixed labels, for hot paths: `inc` is an atomic add.
#[derive(Debug, Clone)]
pub struct CounterHandle(Counter);

impl CounterHandle {
    /// Adds `n`.
    pub fn inc(&self, n: u64) {
        if n > 0 {
            self.0.inc_by(n);
        }
    }
}

/// The counter `name{labels}` as a handle (registered on first use).
pub fn counter_handle(name: &'static str, help: &'static str, l: &[(&'static str, &str)]) -> CounterHandle {
    let f = counters(name, help);
    let c = f.get_or_create(&labels(l)).clone();
    CounterHandle(c)
}

/// A histogram with fixed labels, for hot paths.
#[derive(Debug, Clone)]
pub struct HistogramHandle(Histogram);

impl HistogramHandle {
    /// Records `seconds`.
    pub fn observe(&self, seconds: f64) {
        self.0.observe(seconds);
    }
}

/// The histogram `name{labels}` as a handle (registered on first use).
pub fn histogram_handle(name: &'static str, help: &'static str, l: &[(&'static str, &str)]) -> HistogramHandle {
    let f = family(&metrics().histograms, name, help, || Histograms::new_with_constructor(histogram));
    let h = f.get_or_create(&labels(l)).clone();
    HistogramHandle(h)
}

/// Adds `n` to counter `name{labels}` (rare events; hot paths hold a
/// [`CounterHandle`]).
pub fn inc(name: &'static str, help: &'static str, l: &[(&'static str, &str)], n: u64) {
    if n > 0 {
        counters(name, help).get_or_create(&labels(l)).inc_by(n);
    }
}

/// Sets gauge `name{labels}` to `v`.
pub fn set(name: &'static str, help: &'static str, l: &[(&'static str, &str)], v: f64) {
    let f = family(&metrics().gauges, name, help, Family::default);
    f.get_or_create(&labels(l)).set(v);
}

/// Records `seconds` in histogram `name{labels}`.
pub fn observe(name: &'static str, help: &'static str, l: &[(&'static str, &str)], seconds: f64) {
    histogram_handle(name, help, l).observe(seconds);
}

/// The current value of counter `name` with exactly these labels (0 if never counted).
pub fn counter(name: &'static str, l: &[(&'static str, &str)]) -> u64 {
    let Some(f) = metrics().counters.read().ok().and_then(|m| m.get(name).cloned()) else { return 0 };
    let v = f.get_or_create(&labels(l)).get();
    v
}

/// Every series in the OpenMetrics text format ([`CONTENT_TYPE`]).
pub fn render() -> String {
    let mut out = String::new();
    let r = match metrics().registry.lock() {
        Ok(r) => r,
        Err(p) => p.into_inner(),
    };
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &r);
    out
}

/// Encodes oncely's metrics into `out` (for an application that serves one
/// page of its own metrics and oncely's): the OpenMetrics text of oncely's
/// registry, without the final `# EOF` line.
pub fn encode_into(out: &mut String) {
    let text = render();
    out.push_str(text.strip_suffix("# EOF\n").unwrap_or(&text));
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
                let (status, ctype, body) = if req.starts_with("GET /metrics") {
                    ("200 OK", CONTENT_TYPE, render())
                } else {
                    ("404 Not Found", "text/plain", "try GET /metrics\n".to_owned())
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
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
    fn renders_counters_gauges_and_histograms() {
        inc("oncely_test_total", "a test counter", &[("consumer", "c\"1")], 3);
        let h = counter_handle("oncely_test_total", "a test counter", &[("consumer", "c2")]);
        h.inc(2);
        set("oncely_test_gauge", "a test gauge", &[("consumer", "c1")], 1.5);
        observe("oncely_test_seconds", "a test histogram", &[("consumer", "c1")], 0.02);
        let text = render();
        assert!(text.contains("# TYPE oncely_test counter"), "{text}");
        assert!(text.contains(r#"oncely_test_total{consumer="c\"1"} 3"#), "{text}");
        assert!(text.contains(r#"oncely_test_total{consumer="c2"} 2"#), "{text}");
        assert!(text.contains(r#"oncely_test_gauge{consumer="c1"} 1.5"#), "{text}");
        assert!(text.contains(r#"oncely_test_seconds_bucket{le="0.025",consumer="c1"} 1"#), "{text}");
        assert!(text.contains(r#"oncely_test_seconds_bucket{le="0.01",consumer="c1"} 0"#), "{text}");
        assert!(text.ends_with("# EOF\n"));
        assert_eq!(counter("oncely_test_total", &[("consumer", "c\"1")]), 3);
        assert_eq!(counter("oncely_test_total", &[("consumer", "c2")]), 2);
        let mut mine = String::new();
        encode_into(&mut mine);
        assert!(!mine.contains("# EOF"));
    }
}
