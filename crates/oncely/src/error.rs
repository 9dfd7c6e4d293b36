use std::time::Duration;

/// Everything that can go wrong in the oncely library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A record's envelope could not be decoded (bad header, missing identity, bad payload).
    #[error(transparent)]
    Decode(#[from] crate::envelope::DecodeError),
    /// A PostgreSQL statement failed.
    #[error("database error: {0}")]
    Db(#[source] sqlx::Error),
    /// A Kafka client call failed.
    #[error("kafka error: {0}")]
    Kafka(#[source] rdkafka::error::KafkaError),
    /// A Kafka Admin API request failed or was refused
    /// ([`AdminError::GroupActive`](crate::admin::kafka::AdminError::GroupActive):
    /// the group has active members).
    #[error(transparent)]
    Admin(#[from] crate::admin::kafka::AdminError),
    /// The configuration is invalid (file, environment or builder).
    #[error("configuration error: {0}")]
    Config(String),
    /// A safety check refused an operation; the message says which and why.
    #[error("refused: {0}")]
    Refused(String),
    /// An operation did not finish in time.
    #[error("{what} timed out after {after:?}")]
    Timeout { what: String, after: Duration },
    /// A migration failed to apply.
    #[error("migration {version} ({name}) failed: {source}")]
    Migration {
        version: i64,
        name: String,
        #[source]
        source: sqlx::Error,
    },
    /// JSON (de)serialisation of a payload or a stored value failed.
    #[error("json error: {0}")]
    Json(#[from] serde_json::Error),
    /// An I/O error (metrics endpoint, config file).
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
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

/// `Result` with oncely's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
