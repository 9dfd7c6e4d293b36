//! The events of the pipeline: their CloudEvents types and JSON data.
//!
//! Every event is keyed by its order id, so all the events of one order land
//! in one partition and are applied in the order they were written.

use serde::{Deserialize, Serialize};

/// `ce_type` of [`OrderCreated`].
pub const ORDER_CREATED: &str = "com.example.order.created";
/// `ce_type` of [`OrderConfirmed`].
pub const ORDER_CONFIRMED: &str = "com.example.order.confirmed";
/// `ce_type` of [`PaymentSucceeded`].
pub const PAYMENT_SUCCEEDED: &str = "com.example.payment.succeeded";

/// An order was placed (topic `orders`, written by the order-service).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderCreated {
    /// The order id (also the Kafka key).
    pub order_id: String,
    /// Who pays.
    pub customer: String,
    /// Amount in cents.
    pub amount_cents: i64,
    /// ISO currency code.
    pub currency: String,
}

/// The customer confirmed an order (topic `orders`, after [`OrderCreated`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderConfirmed {
    /// The order id (also the Kafka key).
    pub order_id: String,
}

/// The payment of an order was taken (topic `payments`, written by the
/// payment-service in the transaction that records the charge intent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentSucceeded {
    /// The order id (also the Kafka key).
    pub order_id: String,
    /// Amount in cents.
    pub amount_cents: i64,
    /// ISO currency code.
    pub currency: String,
    /// Identity of the `OrderCreated` event the payment was made for.
    pub order_event_id: String,
}

/// The body of a charge request to the payment gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChargeRequest {
    /// The order paid for.
    pub order_id: String,
    /// Who pays.
    pub customer: String,
    /// Amount in cents (the fake gateway reads `amount`).
    pub amount: i64,
    /// ISO currency code.
    pub currency: String,
}

/// The body of a merchant webhook.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WebhookBody {
    /// `payment.succeeded`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The order paid for.
    pub order_id: String,
    /// Amount in cents.
    pub amount_cents: i64,
    /// ISO currency code.
    pub currency: String,
}
