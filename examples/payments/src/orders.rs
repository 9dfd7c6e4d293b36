//! order-service: an HTTP API that writes the order and its event in one
//! transaction, through the transactional outbox (no dual write: either both
//! the row and the event exist, or neither).
//!
//! - `POST /orders` `{"orderId"?, "customer", "amountCents", "currency"?}` →
//!   `201 {"orderId", "status": "created"}`; `409` if the id exists.
//! - `POST /orders/{id}/confirm` → `200 {"orderId", "status": "confirmed"}`;
//!   `404` unknown order, `409` already confirmed.
//! - `GET /orders/{id}` → the order and, once the payment-service has seen
//!   it, its payment.
//! - `GET /health` → `ok`.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::events::{OrderConfirmed, OrderCreated, ORDER_CONFIRMED, ORDER_CREATED};

/// `ce_source` of the events the order-service writes.
pub const SOURCE: &str = "/payments/order-service";

/// What `POST /orders` takes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewOrder {
    /// The order id; a UUIDv7 is assigned when absent.
    #[serde(default)]
    pub order_id: Option<String>,
    /// Who pays.
    pub customer: String,
    /// Amount in cents, positive.
    pub amount_cents: i64,
    /// ISO currency code (default `EUR`).
    #[serde(default)]
    pub currency: Option<String>,
}

#[derive(Debug)]
struct AppState {
    pool: PgPool,
    orders_topic: String,
}

/// An API error: a status and a message.
#[derive(Debug)]
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        tracing::error!(error = %e, "Database error.");
        ApiError(StatusCode::SERVICE_UNAVAILABLE, format!("database error: {e}"))
    }
}

impl From<oncely::Error> for ApiError {
    fn from(e: oncely::Error) -> Self {
        tracing::error!(error = %e, "Writing to the outbox failed.");
        ApiError(StatusCode::SERVICE_UNAVAILABLE, format!("outbox error: {e}"))
    }
}

/// The service's routes over `pool`, writing events for `orders_topic`.
pub fn router(pool: PgPool, orders_topic: &str) -> Router {
    let state = Arc::new(AppState { pool, orders_topic: orders_topic.to_owned() });
    Router::new()
        .route("/orders", post(create_order))
        .route("/orders/{id}", get(get_order))
        .route("/orders/{id}/confirm", post(confirm_order))
        .route("/health", get(|| async { "ok" }))
        .with_state(state)
}

/// Serves the API on `listen` until `shutdown`; prints `LISTEN` and `READY`.
pub async fn serve(pool: PgPool, orders_topic: &str, listen: SocketAddr, shutdown: CancellationToken) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, topic = orders_topic, "order-service listening.");
    crate::listening(&format!("http://{addr}"));
    crate::ready();
    axum::serve(listener, router(pool, orders_topic))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .context("serving HTTP")
}

async fn create_order(
    State(st): State<Arc<AppState>>,
    Json(req): Json<NewOrder>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    if req.customer.trim().is_empty() {
        return Err(ApiError(StatusCode::UNPROCESSABLE_ENTITY, "customer is required".into()));
    }
    if req.amount_cents <= 0 {
        return Err(ApiError(StatusCode::UNPROCESSABLE_ENTITY, "amountCents must be positive".into()));
    }
    let order_id = req.order_id.filter(|s| !s.is_empty()).unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let currency = req.currency.unwrap_or_else(|| "EUR".into());
    let mut tx = st.pool.begin().await?;
    let inserted: Option<String> = sqlx::query_scalar(
        "INSERT INTO orders (id, customer, amount_cents, currency) VALUES ($1, $2, $3, $4)
         ON CONFLICT (id) DO NOTHING RETURNING id",
    )
    .bind(&order_id)
    .bind(&req.customer)
    .bind(req.amount_cents)
    .bind(&currency)
    .fetch_optional(&mut *tx)
    .await?;
    if inserted.is_none() {
        return Err(ApiError(StatusCode::CONFLICT, format!("order {order_id} already exists")));
    }
    let ev =
        OrderCreated { order_id: order_id.clone(), customer: req.customer, amount_cents: req.amount_cents, currency };
    let event_id = enqueue(&mut tx, &st.orders_topic, &order_id, ORDER_CREATED, &ev).await?;
    tx.commit().await?;
    tracing::debug!(order_id = %order_id, event_id = %event_id, "Order created.");
    Ok((StatusCode::CREATED, Json(json!({ "orderId": order_id, "status": "created", "eventId": event_id }))))
}

async fn confirm_order(State(st): State<Arc<AppState>>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let mut tx = st.pool.begin().await?;
    let status: Option<String> = sqlx::query_scalar("SELECT status FROM orders WHERE id = $1 FOR UPDATE")
        .bind(&id)
        .fetch_optional(&mut *tx)
        .await?;
    match status.as_deref() {
        None => return Err(ApiError(StatusCode::NOT_FOUND, format!("order {id} does not exist"))),
        Some("created") => {}
        Some(other) => return Err(ApiError(StatusCode::CONFLICT, format!("order {id} is already {other}"))),
    }
    sqlx::query("UPDATE orders SET status = 'confirmed', confirmed_at = clock_timestamp() WHERE id = $1")
        .bind(&id)
        .execute(&mut *tx)
        .await?;
    let event_id =
        enqueue(&mut tx, &st.orders_topic, &id, ORDER_CONFIRMED, &OrderConfirmed { order_id: id.clone() }).await?;
    tx.commit().await?;
    Ok(Json(json!({ "orderId": id, "status": "confirmed", "eventId": event_id })))
}

async fn get_order(State(st): State<Arc<AppState>>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let order: Option<(String, i64, String, String)> =
        sqlx::query_as("SELECT customer, amount_cents, currency, status FROM orders WHERE id = $1")
            .bind(&id)
            .fetch_optional(&st.pool)
            .await?;
    let Some((customer, amount_cents, currency, status)) = order else {
        return Err(ApiError(StatusCode::NOT_FOUND, format!("order {id} does not exist")));
    };
    let payment: Option<(String, Vec<String>)> =
        sqlx::query_as("SELECT order_status, history FROM payments WHERE order_id = $1")
            .bind(&id)
            .fetch_optional(&st.pool)
            .await?;
    Ok(Json(json!({
        "orderId": id,
        "customer": customer,
        "amountCents": amount_cents,
        "currency": currency,
        "status": status,
        "payment": payment.map(|(s, h)| json!({ "orderStatus": s, "history": h })),
    })))
}

/// Writes `data` as an event of type `ty` for `key` into the outbox, in the
/// caller's transaction; returns its `ce_id`.
async fn enqueue<T: Serialize>(
    conn: &mut PgConnection,
    topic: &str,
    key: &str,
    ty: &str,
    data: &T,
) -> Result<String, ApiError> {
    let ev = oncely::outbox::OutgoingEvent::json(ty, data)?.source(SOURCE);
    Ok(oncely::outbox::enqueue(conn, topic, key, &ev).await?.ce_id)
}
