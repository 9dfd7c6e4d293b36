//! One way to reach a Kafka cluster, applied to every client oncely creates.
//!
//! A [`KafkaConnection`] is the bootstrap servers plus librdkafka client
//! properties (`security.protocol`, `sasl.*`, `ssl.*`, anything librdkafka
//! accepts). The consumer, its admin and metadata clients, the dead-letter
//! and outbox producers, the CLI, the test kit and the benchmarks all build
//! their clients from one, so a secured cluster (SASL_SSL, SCRAM) works
//! everywhere once it works anywhere.
//!
//! Secrets (any property whose name says password, secret, key or jaas) are
//! never shown: `Debug`, [`KafkaConnection::describe`] and logs mask them. A
//! value can also come from an environment variable or a file, so it need
//! not be written in `oncely.toml` at all:
//!
//! ```toml
//! [env.prod.kafka]
//! "security.protocol" = "SASL_SSL"
//! "sasl.mechanisms" = "SCRAM-SHA-512"
//! "sasl.username" = "billing"
//! "sasl.password" = { env = "KAFKA_PASSWORD" }
//! "ssl.ca.location" = "/etc/ssl/kafka-ca.pem"
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer as _, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientConfig;
use serde::Deserialize;

use crate::error::{Error, Result};

/// A client property's value: text, or where to read it (for secrets).
/// Its `Debug` never shows text (it does not know whether it is a secret).
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum PropertyValue {
    /// The value itself.
    Text(String),
    /// The value of an environment variable (read when a client is built).
    Env {
        /// The variable's name.
        env: String,
    },
    /// The contents of a file, without a trailing newline (read when a
    /// client is built).
    File {
        /// The file's path.
        file: PathBuf,
    },
}

impl fmt::Debug for PropertyValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PropertyValue::Text(_) => f.write_str("Text(..)"),
            PropertyValue::Env { env } => write!(f, "Env({env})"),
            PropertyValue::File { file } => write!(f, "File({})", file.display()),
        }
    }
}

impl PropertyValue {
    fn resolve(&self, key: &str) -> Result<String> {
        match self {
            PropertyValue::Text(t) => Ok(t.clone()),
            PropertyValue::Env { env } => std::env::var(env).map_err(|_| {
                Error::Config(format!("Kafka property {key} comes from environment variable {env}, which is not set"))
            }),
            PropertyValue::File { file } => {
                std::fs::read_to_string(file).map(|s| s.trim_end_matches(['\n', '\r']).to_owned()).map_err(|e| {
                    Error::Config(format!(
                        "Kafka property {key} comes from file {}, which cannot be read: {e}",
                        file.display()
                    ))
                })
            }
        }
    }
}

impl From<&str> for PropertyValue {
    fn from(s: &str) -> Self {
        PropertyValue::Text(s.to_owned())
    }
}

impl From<String> for PropertyValue {
    fn from(s: String) -> Self {
        PropertyValue::Text(s)
    }
}

/// Whether a librdkafka property holds a secret (never printed).
pub fn is_secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    ["password", "secret", "jaas", "token"].iter().any(|w| k.contains(w))
        || k.ends_with(".key")
        || k.ends_with(".key.pem")
        || k == "ssl.key.location"
}

/// Bootstrap servers and client properties: how to reach one cluster.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConnection {
    bootstrap_servers: String,
    #[serde(default)]
    properties: BTreeMap<String, PropertyValue>,
}

impl fmt::Debug for KafkaConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaConnection")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("properties", &self.describe())
            .finish()
    }
}

impl From<&str> for KafkaConnection {
    fn from(bootstrap: &str) -> Self {
        KafkaConnection::new(bootstrap)
    }
}

impl From<String> for KafkaConnection {
    fn from(bootstrap: String) -> Self {
        KafkaConnection::new(bootstrap)
    }
}

impl From<&String> for KafkaConnection {
    fn from(bootstrap: &String) -> Self {
        KafkaConnection::new(bootstrap.as_str())
    }
}

impl From<&KafkaConnection> for KafkaConnection {
    fn from(c: &KafkaConnection) -> Self {
        c.clone()
    }
}

impl KafkaConnection {
    /// A connection to `bootstrap_servers` with no other property (a
    /// plaintext listener).
    pub fn new(bootstrap_servers: impl Into<String>) -> Self {
        KafkaConnection { bootstrap_servers: bootstrap_servers.into(), properties: BTreeMap::new() }
    }

    /// Sets a client property (`security.protocol`, `sasl.password`, ...).
    /// `bootstrap.servers` here replaces the bootstrap servers.
    pub fn property(mut self, key: impl Into<String>, value: impl Into<PropertyValue>) -> Self {
        let key = key.into();
        match value.into() {
            PropertyValue::Text(v) if key == "bootstrap.servers" => self.bootstrap_servers = v,
            v => {
                self.properties.insert(key, v);
            }
        }
        self
    }

    /// Sets several client properties.
    pub fn properties<K: Into<String>, V: Into<PropertyValue>>(
        mut self,
        props: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        for (k, v) in props {
            self = self.property(k, v);
        }
        self
    }

    /// The bootstrap servers.
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap_servers
    }

    /// The properties for people: name and value, secrets masked.
    pub fn describe(&self) -> Vec<(String, String)> {
        self.properties
            .iter()
            .map(|(k, v)| {
                let shown = match v {
                    _ if is_secret(k) => "***".to_owned(),
                    PropertyValue::Text(t) => t.clone(),
                    PropertyValue::Env { env } => format!("${env}"),
                    PropertyValue::File { file } => format!("@{}", file.display()),
                };
                (k.clone(), shown)
            })
            .collect()
    }

    /// A librdkafka configuration with the bootstrap servers and every
    /// property (values read from their variables and files now). Callers
    /// add their own settings on top.
    pub fn client_config(&self) -> Result<ClientConfig> {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap_servers);
        for (k, v) in &self.properties {
            c.set(k, v.resolve(k)?);
        }
        Ok(c)
    }

    /// Connects once and asks for the cluster's metadata, within `timeout`.
    /// librdkafka retries a failed authentication or TLS handshake forever;
    /// this turns the first such failure into an error that names the cause
    /// (authentication, certificate, unreachable), so a misconfigured client
    /// fails at start within seconds instead of hanging.
    pub fn check(&self, timeout: Duration) -> Result<()> {
        let seen = Arc::new(Mutex::new(Vec::<(RDKafkaErrorCode, String)>::new()));
        let consumer: BaseConsumer<Recorder> =
            self.client_config()?.create_with_context(Recorder(seen.clone())).map_err(|e| self.explain(e, &[]))?;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let step = left.min(Duration::from_millis(500));
            let res = consumer.fetch_metadata(None, step);
            // Error events are delivered by polling.
            let _ = consumer.poll(Duration::ZERO);
            match res {
                Ok(_) => return Ok(()),
                Err(e) => {
                    let errors = seen.lock().map(|s| s.clone()).unwrap_or_default();
                    let fatal = errors.iter().any(|(c, _)| {
                        matches!(
                            c,
                            RDKafkaErrorCode::Authentication
                                | RDKafkaErrorCode::SaslAuthenticationFailed
                                | RDKafkaErrorCode::SSL
                        )
                    });
                    if fatal || left.is_zero() {
                        return Err(self.explain(e, &errors));
                    }
                }
            }
        }
    }

    /// [`check`](Self::check) with the 15 s every oncely client gives it at
    /// start, on a blocking thread: what the consumer, the processor, the
    /// relay and the CLI session call before anything else, so a wrong
    /// password or an untrusted certificate fails there, naming the cause.
    pub async fn check_at_start(&self) -> Result<()> {
        let check = self.clone();
        tokio::task::spawn_blocking(move || check.check(Duration::from_secs(15)))
            .await
            .map_err(|e| Error::Io(std::io::Error::other(e.to_string())))?
    }

    fn explain(&self, e: KafkaError, errors: &[(RDKafkaErrorCode, String)]) -> Error {
        let detail: Vec<&str> = errors.iter().map(|(_, m)| m.as_str()).collect();
        let all = format!("{e}; {}", detail.join("; "));
        let low = all.to_ascii_lowercase();
        let cause = if errors
            .iter()
            .any(|(c, _)| matches!(c, RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed))
            || low.contains("authentication")
        {
            "authentication failed (check sasl.username / sasl.password and sasl.mechanisms)"
        } else if low.contains("certificate") || low.contains("ssl") || low.contains("handshake") {
            "the TLS handshake failed: the broker's certificate is not trusted (check ssl.ca.location) or TLS is misconfigured"
        } else {
            "the cluster did not answer (check bootstrap.servers and security.protocol)"
        };
        Error::Config(format!(
            "cannot connect to Kafka at {}: {cause}: {}",
            self.bootstrap_servers,
            all.trim_end_matches("; ")
        ))
    }
}

/// Records the client's error events (authentication and TLS failures come
/// only as events: the requests just time out).
struct Recorder(Arc<Mutex<Vec<(RDKafkaErrorCode, String)>>>);

impl ClientContext for Recorder {
    fn error(&self, error: KafkaError, reason: &str) {
        if let Some(code) = error.rdkafka_error_code() {
            if let Ok(mut s) = self.0.lock() {
                s.push((code, reason.to_owned()));
            }
        }
    }

    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        if matches!(level, L::Emerg | L::Alert | L::Critical | L::Error | L::Warning) {
            let low = message.to_ascii_lowercase();
            let code = if low.contains("authentication") || low.contains("sasl") {
                Some(RDKafkaErrorCode::Authentication)
            } else if low.contains("ssl") || low.contains("certificate") {
                Some(RDKafkaErrorCode::SSL)
            } else {
                None
            };
            if let (Some(code), Ok(mut s)) = (code, self.0.lock()) {
                s.push((code, message.to_owned()));
            }
        }
        tracing::debug!(facility = fac, "librdkafka: {message}");
    }
}

impl ConsumerContext for Recorder {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_masked_everywhere_they_are_shown() {
        let c = KafkaConnection::new("b:9094")
            .property("security.protocol", "SASL_SSL")
            .property("sasl.username", "billing")
            .property("sasl.password", "hunter2")
            .property("ssl.key.password", PropertyValue::Env { env: "X".into() })
            .property("sasl.oauthbearer.client.secret", "s3");
        let shown = format!("{c:?} {:?}", c.describe());
        assert!(!shown.contains("hunter2") && !shown.contains("s3\""), "{shown}");
        assert!(shown.contains("billing") && shown.contains("SASL_SSL"));
        assert!(is_secret("sasl.jaas.config") && is_secret("ssl.key.pem") && !is_secret("ssl.ca.location"));
    }

    #[test]
    fn values_come_from_variables_and_files_and_a_missing_one_is_a_clear_error() {
        let dir = std::env::temp_dir().join(format!("oncely-conn-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).expect("dir");
        let f = dir.join("pw");
        std::fs::write(&f, "from-file\n").expect("write");
        let c = KafkaConnection::new("b:1").property("sasl.password", PropertyValue::File { file: f.clone() });
        assert!(c.client_config().is_ok());
        assert_eq!(PropertyValue::File { file: f }.resolve("k").expect("read"), "from-file");
        let missing = KafkaConnection::new("b:1")
            .property("sasl.password", PropertyValue::Env { env: "ONCELY_TEST_SURELY_UNSET_VAR".into() });
        let err = missing.client_config().expect_err("unset").to_string();
        assert!(err.contains("ONCELY_TEST_SURELY_UNSET_VAR") && err.contains("sasl.password"), "{err}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn parses_from_toml_with_plain_env_and_file_values() {
        let c: KafkaConnection = toml::from_str(
            r#"bootstrap_servers = "b:9094"
               [properties]
               "security.protocol" = "SASL_SSL"
               "sasl.password" = { env = "PW" }
               "ssl.key.password" = { file = "/x" }"#,
        )
        .expect("toml");
        assert_eq!(c.bootstrap_servers(), "b:9094");
        assert_eq!(c.properties.get("sasl.password"), Some(&PropertyValue::Env { env: "PW".into() }));
    }
}
