//! Operator tools over the Kafka Admin API.
