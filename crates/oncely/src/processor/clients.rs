//! Every Kafka client the processor creates, configured in one place
//! ([`client_config`]) from the caller's connection settings, and the topic
//! limits it looks up at start (through the Kafka floor's [`KafkaAdmin`]).

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::ClientConfig;

use crate::error::{Error, Result};
use crate::kafka::KafkaAdmin;

/// How the processor reaches Kafka: the connection every client is built
/// from (bootstrap servers, security settings), and the caller's properties
/// for one role.
#[derive(Debug, Clone, Default)]
pub(crate) struct Connection {
    /// For every client (consumer, producer, admin).
    pub kafka: crate::kafka::KafkaConnection,
    /// Properties for the consumer only.
    pub consumer: Vec<(String, String)>,
    /// Properties for the transactional producer only.
    pub producer: Vec<(String, String)>,
}

/// Which client to configure.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Role<'a> {
    /// The input consumer of group `group`.
    Consumer { group: &'a str },
    /// The transactional producer: `transactional.id`, and the batch and
    /// message size limits the runtime derived from the topics' limits
    /// (used unless the caller set them).
    Producer { transactional_id: &'a str, batch_size: usize, message_max_bytes: usize },
}

/// Settings the processor forces on its consumer, whatever the caller says
/// (the Kafka floor's, shared with the consumer runtime).
pub const FORCED_CONSUMER_SETTINGS: &[(&str, &str)] = crate::kafka::FORCED_CONSUMER_SETTINGS;

/// The only place the processor builds a [`ClientConfig`]: the connection,
/// the role's defaults, the caller's properties for the role, then the
/// forced settings.
pub(crate) fn client_config(conn: &Connection, role: Role<'_>) -> Result<ClientConfig> {
    let mut cfg = conn.kafka.client_config()?;
    let mut forced: Vec<(&str, String)> = Vec::new();
    let own: &[(String, String)] = match role {
        Role::Consumer { group } => {
            // Defaults the caller may change: start a new group at the
            // beginning (nothing skipped unseen), and bound librdkafka's
            // prefetch per partition as the consumer runtime does.
            cfg.set("auto.offset.reset", "earliest").set("queued.max.messages.kbytes", "16384");
            forced.push(("group.id", group.to_owned()));
            forced.extend(FORCED_CONSUMER_SETTINGS.iter().map(|(k, v)| (*k, (*v).to_owned())));
            &conn.consumer
        }
        Role::Producer { transactional_id, batch_size, message_max_bytes } => {
            cfg.set("batch.size", batch_size.to_string()).set("message.max.bytes", message_max_bytes.to_string());
            forced.push(("transactional.id", transactional_id.to_owned()));
            forced.push(("enable.idempotence", "true".to_owned()));
            &conn.producer
        }
    };
    for (k, v) in own {
        cfg.set(k, v);
    }
    for (k, v) in forced {
        if own.iter().any(|(kk, vv)| kk == k && *vv != v) {
            tracing::warn!(setting = k, forced = %v, "Ignoring a Kafka setting that the processor must force.");
        }
        cfg.set(k, v);
    }
    Ok(cfg)
}

/// The admin client of a connection (the Kafka floor's: the connection,
/// and a metadata lookup never creates a topic).
pub(crate) fn admin(conn: &Connection) -> Result<KafkaAdmin> {
    Ok(KafkaAdmin::new(conn.kafka.clone(), &[])?.request_timeout(Duration::from_secs(30)))
}

/// `max.message.bytes` of each topic, asked for up to 15 s (a topic
/// created a moment ago may not show its configuration yet), then an error
/// that names the topics.
pub(crate) async fn topic_limits(admin: &KafkaAdmin, topics: &[String]) -> Result<HashMap<String, usize>> {
    let limits = admin
        .max_message_bytes(topics, Duration::from_secs(15))
        .await
        .map_err(|e| Error::Config(format!("cannot read the configuration of topics {topics:?}: {e}")))?;
    Ok(topics.iter().cloned().zip(limits).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(cfg: &ClientConfig, k: &str) -> Option<String> {
        cfg.get(k).map(str::to_owned)
    }

    #[test]
    fn the_caller_settings_reach_every_client_and_forced_ones_win() {
        let conn = Connection {
            kafka: crate::kafka::KafkaConnection::new("b:9092")
                .property("security.protocol", "SASL_SSL")
                .property("isolation.level", "read_uncommitted"),
            consumer: vec![("session.timeout.ms".into(), "30000".into())],
            producer: vec![("linger.ms".into(), "1".into()), ("transactional.id".into(), "mine".into())],
        };
        let c = client_config(&conn, Role::Consumer { group: "g" }).expect("consumer");
        let p = client_config(&conn, Role::Producer { transactional_id: "p/1", batch_size: 10, message_max_bytes: 20 })
            .expect("producer");
        for cfg in [&c, &p] {
            assert_eq!(get(cfg, "bootstrap.servers").as_deref(), Some("b:9092"));
            assert_eq!(get(cfg, "security.protocol").as_deref(), Some("SASL_SSL"));
        }
        assert_eq!(get(&c, "isolation.level").as_deref(), Some("read_committed"));
        assert_eq!(get(&c, "group.id").as_deref(), Some("g"));
        assert_eq!(get(&c, "session.timeout.ms").as_deref(), Some("30000"));
        assert_eq!(get(&p, "session.timeout.ms"), None, "consumer settings stay on the consumer");
        assert_eq!(get(&p, "transactional.id").as_deref(), Some("p/1"), "the derived id wins");
        assert_eq!(get(&p, "linger.ms").as_deref(), Some("1"));
        assert_eq!(get(&p, "batch.size").as_deref(), Some("10"));
    }
}
