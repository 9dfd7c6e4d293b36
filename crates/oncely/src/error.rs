use std::time::Duration;

/// Everything that can go wrong in the oncely library.
///
/// Each message includes its cause's message, once: the wrapped errors are
/// not also exposed as `source()`, so a chain printer (`anyhow`'s `{:#}`)
/// does not print the same words two or three times.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A record's envelope could not be decoded (bad header, missing identity, bad payload).
    #[error(transparent)]
    Decode(#[from] crate::envelope::DecodeError),
    /// A PostgreSQL statement failed.
    #[error("database error: {0}")]
    Db(sqlx::Error),
    /// A Kafka client call failed.
    #[error("kafka error: {0}")]
    Kafka(rdkafka::error::KafkaError),
    /// A Kafka Admin API request failed or was refused
    /// ([`AdminError::GroupActive`](crate::kafka::admin::AdminError::GroupActive):
    /// the group has active members).
    #[error(transparent)]
    Admin(#[from] crate::kafka::admin::AdminError),
    /// The configuration is invalid (file, environment or builder).
    #[error("configuration error: {0}")]
    Config(String),
    /// A safety check refused an operation; the message says which and why.
    #[error("refused: {0}")]
    Refused(String),
    /// An operation did not finish in time.
    #[error("{what} timed out after {after:?}")]
    Timeout {
        /// What did not finish.
        what: String,
        /// How long it was given.
        after: Duration,
    },
    /// A migration failed to apply.
    #[error("migration {version} ({name}) failed: {error}")]
    Migration {
        /// The migration's number.
        version: i64,
        /// Its name.
        name: String,
        /// What PostgreSQL said.
        error: sqlx::Error,
    },
    /// JSON (de)serialisation of a payload or a stored value failed.
    #[error("json error: {0}")]
    Json(serde_json::Error),
    /// An I/O error (metrics endpoint, config file).
    #[error("i/o error: {0}")]
    Io(std::io::Error),
    /// A processor's transactional producer was fenced: another producer
    /// initialised the same `transactional.id`. Never retried.
    #[error("fenced: another instance started with transactional.id `{transactional_id}`: {detail}")]
    Fenced {
        /// The processor's `transactional.id`.
        transactional_id: String,
        /// librdkafka's description.
        detail: String,
    },
    /// A processor's transactional producer failed fatally (not fenced).
    #[error("the transactional producer `{transactional_id}` failed fatally: {detail}")]
    ProducerFatal {
        /// The processor's `transactional.id`.
        transactional_id: String,
        /// The cause.
        detail: String,
    },
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        Error::Db(e)
    }
}

impl From<rdkafka::error::KafkaError> for Error {
    fn from(e: rdkafka::error::KafkaError) -> Self {
        Error::Kafka(e)
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::Json(e)
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e)
    }
}

impl Error {
    /// Whether this is PostgreSQL's "current transaction is aborted": an
    /// earlier statement of the transaction failed.
    pub fn is_aborted_transaction(&self) -> bool {
        matches!(self, Error::Db(e) if crate::store::is_aborted_transaction(e))
    }
}

/// `Result` with oncely's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;
    use crate::kafka::admin::AdminError;
    use rdkafka::error::KafkaError;

    /// A chain printer (`anyhow`'s `{:#}`, the CLI's output) prints the
    /// message and then every `source()`: a cause that is in the message and
    /// also a source is printed twice.
    #[test]
    fn a_wrapped_cause_is_in_the_message_and_not_also_its_source() {
        let task = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(async { tokio::spawn(async { panic!("boom") }).await.expect_err("it panicked") });
        let errors: Vec<(Error, &str)> = vec![
            (std::io::Error::other("disk full").into(), "disk full"),
            (serde_json::from_str::<u8>("x").expect_err("not json").into(), "expected value"),
            (KafkaError::Subscription("no such topic".into()).into(), "no such topic"),
            (sqlx::Error::PoolTimedOut.into(), "pool timed out"),
            (AdminError::Client(KafkaError::Subscription("no such topic".into())).into(), "no such topic"),
            (AdminError::Task { op: "ListOffsets", error: task }.into(), "panic"),
        ];
        for (e, cause) in errors {
            let text = e.to_string();
            assert!(text.to_lowercase().contains(cause), "the message names the cause: {text}");
            assert!(e.source().is_none(), "{text}: the cause is also its source {:?}", e.source());
        }
    }
}
