//! Operator tools over the Kafka Admin API.

pub mod kafka;

pub use kafka::KafkaAdmin;
