//! A fake payment gateway and a fake merchant webhook endpoint, over real
//! HTTP on loopback. The gateway honours idempotency keys like Stripe (the
//! same `Idempotency-Key` returns the first result) and counts every call and
//! every distinct charge; the merchant counts deliveries per key. Both can be
//! told to fail, to hang, or to answer late.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use oncely::effects::EffectError;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

/// What the fake services have seen.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Stats {
    /// Every `POST /v1/charges`, including replays of a key and failures.
    pub charge_calls: u64,
    /// Distinct idempotency keys charged (distinct charges).
    pub distinct_charges: u64,
    /// Every `POST /webhooks` delivery.
    pub webhook_calls: u64,
    /// Distinct webhook keys delivered.
    pub distinct_webhooks: u64,
    /// Deliveries per webhook key that arrived more than once.
    pub duplicate_webhook_keys: u64,
}

/// Faults to inject into the next calls.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Control {
    /// Answer 503 to the next N charge calls.
    #[serde(default)]
    pub fail_next: u64,
    /// Accept (record) the next N charges, then never answer.
    #[serde(default)]
    pub hang_after_accept_next: u64,
    /// Delay every answer by this many milliseconds.
    #[serde(default)]
    pub delay_ms: u64,
    /// Answer 503 to the next N webhook deliveries.
    #[serde(default)]
    pub webhook_fail_next: u64,
}

#[derive(Debug, Default)]
struct GatewayState {
    charges: Mutex<HashMap<String, Value>>,
    charge_calls: AtomicU64,
    webhooks: Mutex<HashMap<String, u64>>,
    webhook_calls: AtomicU64,
    fail_next: AtomicU64,
    hang_after_accept_next: AtomicU64,
    delay_ms: AtomicU64,
    webhook_fail_next: AtomicU64,
    accepted: tokio::sync::Notify,
}

fn take_one(a: &AtomicU64) -> bool {
    a.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
}

impl GatewayState {
    fn stats(&self) -> Stats {
        let charges = self.charges.lock().map(|c| c.len() as u64).unwrap_or(0);
        let (distinct, dup) = self
            .webhooks
            .lock()
            .map(|w| (w.len() as u64, w.values().filter(|n| **n > 1).count() as u64))
            .unwrap_or((0, 0));
        Stats {
            charge_calls: self.charge_calls.load(Ordering::SeqCst),
            distinct_charges: charges,
            webhook_calls: self.webhook_calls.load(Ordering::SeqCst),
            distinct_webhooks: distinct,
            duplicate_webhook_keys: dup,
        }
    }
}

async fn charge(
    State(st): State<Arc<GatewayState>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> (StatusCode, HeaderMap, Json<Value>) {
    st.charge_calls.fetch_add(1, Ordering::SeqCst);
    let mut out = HeaderMap::new();
    let Some(key) = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).map(str::to_owned) else {
        return (StatusCode::BAD_REQUEST, out, Json(json!({"error": "Idempotency-Key header is required"})));
    };
    if take_one(&st.fail_next) {
        return (StatusCode::SERVICE_UNAVAILABLE, out, Json(json!({"error": "gateway unavailable (injected)"})));
    }
    let delay = st.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let (result, replayed) = {
        let Ok(mut charges) = st.charges.lock() else {
            return (StatusCode::INTERNAL_SERVER_ERROR, out, Json(json!({"error": "poisoned"})));
        };
        let n = charges.len() + 1;
        match charges.get(&key) {
            Some(first) => (first.clone(), true),
            None => {
                let ch = json!({"id": format!("ch_{n:06}"), "status": "succeeded", "amount": body.get("amount"), "request": body});
                charges.insert(key.clone(), ch.clone());
                (ch, false)
            }
        }
    };
    st.accepted.notify_waiters();
    if !replayed && take_one(&st.hang_after_accept_next) {
        // The charge is made; the answer never comes (the caller crashes or times out).
        std::future::pending::<()>().await;
    }
    if replayed {
        if let Ok(v) = "true".parse() {
            out.insert("idempotent-replayed", v);
        }
    }
    (StatusCode::OK, out, Json(result))
}

async fn webhook(State(st): State<Arc<GatewayState>>, headers: HeaderMap, Json(_body): Json<Value>) -> StatusCode {
    st.webhook_calls.fetch_add(1, Ordering::SeqCst);
    if take_one(&st.webhook_fail_next) {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    if let Ok(mut w) = st.webhooks.lock() {
        *w.entry(key).or_default() += 1;
    }
    StatusCode::OK
}

async fn stats(State(st): State<Arc<GatewayState>>) -> Json<Stats> {
    Json(st.stats())
}

async fn control(State(st): State<Arc<GatewayState>>, Json(c): Json<Control>) -> StatusCode {
    st.fail_next.store(c.fail_next, Ordering::SeqCst);
    st.hang_after_accept_next.store(c.hang_after_accept_next, Ordering::SeqCst);
    st.delay_ms.store(c.delay_ms, Ordering::SeqCst);
    st.webhook_fail_next.store(c.webhook_fail_next, Ordering::SeqCst);
    StatusCode::OK
}

async fn reset(State(st): State<Arc<GatewayState>>) -> StatusCode {
    if let Ok(mut c) = st.charges.lock() {
        c.clear();
    }
    if let Ok(mut w) = st.webhooks.lock() {
        w.clear();
    }
    st.charge_calls.store(0, Ordering::SeqCst);
    st.webhook_calls.store(0, Ordering::SeqCst);
    StatusCode::OK
}

/// A running fake gateway + merchant.
#[derive(Debug)]
pub struct FakeGateway {
    /// Its address.
    pub addr: SocketAddr,
    state: Arc<GatewayState>,
    shutdown: CancellationToken,
}

impl FakeGateway {
    /// Starts the server on `addr` (port 0 picks a free port).
    pub async fn start(addr: SocketAddr) -> Result<Self> {
        let state = Arc::new(GatewayState::default());
        let app = Router::new()
            .route("/v1/charges", post(charge))
            .route("/webhooks", post(webhook))
            .route("/stats", get(stats))
            .route("/control", post(control))
            .route("/reset", post(reset))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let s = shutdown.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).with_graceful_shutdown(async move { s.cancelled().await }).await;
        });
        Ok(FakeGateway { addr, state, shutdown })
    }

    /// Base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// What it has seen so far.
    pub fn stats(&self) -> Stats {
        self.state.stats()
    }

    /// Injects faults.
    pub fn control(&self, c: Control) {
        self.state.fail_next.store(c.fail_next, Ordering::SeqCst);
        self.state.hang_after_accept_next.store(c.hang_after_accept_next, Ordering::SeqCst);
        self.state.delay_ms.store(c.delay_ms, Ordering::SeqCst);
        self.state.webhook_fail_next.store(c.webhook_fail_next, Ordering::SeqCst);
    }
}

impl Drop for FakeGateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// An HTTP client for the fake services, mapping answers to effect outcomes:
/// refused connection and 5xx are transient, 4xx permanent, a timeout after
/// sending is ambiguous.
#[derive(Debug, Clone)]
pub struct GatewayClient {
    base: String,
    http: reqwest::Client,
}

impl GatewayClient {
    /// A client for `base` (`http://127.0.0.1:PORT`) with a per-call timeout.
    pub fn new(base: &str, timeout: Duration) -> Result<Self> {
        Ok(GatewayClient {
            base: base.trim_end_matches('/').to_owned(),
            http: reqwest::Client::builder().timeout(timeout).build()?,
        })
    }

    async fn post(&self, path: &str, key: &str, body: &Value) -> Result<Value, EffectError> {
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .header("Idempotency-Key", key)
            .json(body)
            .send()
            .await
            .map_err(|e| {
                if e.is_connect() {
                    EffectError::Transient(format!("connection failed: {e}"))
                } else {
                    EffectError::Ambiguous(format!("no answer: {e}"))
                }
            })?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            Ok(body)
        } else if status.is_server_error() {
            Err(EffectError::Transient(format!("{status}: {body}")))
        } else {
            Err(EffectError::Permanent(format!("{status}: {body}")))
        }
    }

    /// `POST /v1/charges` with the idempotency key.
    pub async fn charge(&self, key: &str, body: &Value) -> Result<Value, EffectError> {
        self.post("/v1/charges", key, body).await
    }

    /// `POST /webhooks` with the idempotency key.
    pub async fn webhook(&self, key: &str, body: &Value) -> Result<Value, EffectError> {
        self.post("/webhooks", key, body).await
    }

    /// `GET /stats`.
    pub async fn stats(&self) -> Result<Stats> {
        Ok(self.http.get(format!("{}/stats", self.base)).send().await?.json().await?)
    }

    /// `POST /control`.
    pub async fn control(&self, c: Control) -> Result<()> {
        self.http.post(format!("{}/control", self.base)).json(&c).send().await?.error_for_status()?;
        Ok(())
    }
}
