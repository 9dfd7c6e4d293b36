//! `oncely.toml`: named environments for the operator CLI and the services.
//!
//! ```toml
//! default_env = "local"
//!
//! [env.local]
//! bootstrap_servers = "127.0.0.1:9092"
//! database_url = "postgres://oncely:oncely@127.0.0.1:5432/oncely"
//! cluster_id = "5jiEa7STSMyBG16GMoU4SQ"   # expected; checked against the live cluster
//! protected = false
//!
//! [env.prod]
//! bootstrap_servers = "kafka-prod.internal:9092"
//! database_url = "postgres://oncely@db-prod.internal/oncely"
//! cluster_id = "Zq0m3yJxQ8e2kq1uQm9L0A"
//! protected = true
//!
//! [env.prod.kafka]                         # client properties, for every client
//! "security.protocol" = "SASL_SSL"
//! "sasl.mechanisms" = "SCRAM-SHA-512"
//! "sasl.username" = "oncely"
//! "sasl.password" = { env = "KAFKA_PASSWORD" }   # or { file = "/run/secrets/kafka" }
//! "ssl.ca.location" = "/etc/ssl/kafka-ca.pem"
//! ```
//!
//! The file is chosen by `--config FILE`, else `ONCELY_CONFIG`, else
//! `./oncely.toml`; the environment by `--env NAME`, else `ONCELY_ENV`, else
//! `default_env`. `ONCELY_BOOTSTRAP_SERVERS`, `ONCELY_DATABASE_URL`,
//! `ONCELY_CLUSTER_ID` and `ONCELY_PROTECTED` override the chosen
//! environment's values. Unknown keys are errors, so a typo such as
//! `protect = true` never silently leaves production unprotected.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};

/// The whole `oncely.toml`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// The environment used when neither `--env` nor `ONCELY_ENV` names one.
    #[serde(default)]
    pub default_env: Option<String>,
    /// Environments by name.
    #[serde(default, rename = "env")]
    pub envs: BTreeMap<String, EnvConfig>,
    /// Consumer settings by consumer name (`[consumer.payment-service]`).
    #[serde(default, rename = "consumer")]
    pub consumers: BTreeMap<String, ConsumerConfig>,
}

/// The words of a policy in files and variables.
fn parse_word<T: Copy>(field: &str, v: &str, words: &[(&str, T)]) -> Result<T> {
    words.iter().find(|(w, _)| w.eq_ignore_ascii_case(v.trim())).map(|(_, t)| *t).ok_or_else(|| {
        Error::Config(format!(
            "{field} = {v:?}: expected one of {}",
            words.iter().map(|(w, _)| *w).collect::<Vec<_>>().join(", ")
        ))
    })
}

macro_rules! consumer_config {
    ($( $(#[doc = $doc:literal])* $field:ident : $ty:ty, $env:literal, $parse:expr; )*) => {
        /// Every setting of a consumer, for `oncely.toml` (`[consumer.NAME]`)
        /// and `ONCELY_*` variables; applied with
        /// [`ConsumerBuilder::config`](crate::ConsumerBuilder::config). A
        /// setting left out keeps the builder's default (documented on the
        /// builder's setter of the same name). Unknown keys are errors.
        ///
        /// ```toml
        /// [consumer.payment-service]
        /// topics = ["orders"]
        /// max_batch = 500
        /// rewind_policy = "skip"
        /// session_timeout_ms = 10000
        /// ```
        #[derive(Debug, Clone, Default, PartialEq, Deserialize, serde::Serialize)]
        #[serde(deny_unknown_fields)]
        pub struct ConsumerConfig {
            $( $(#[doc = $doc])* #[serde(default, skip_serializing_if = "Option::is_none")] pub $field: Option<$ty>, )*
            /// Other librdkafka settings for the consumer only (e.g.
            /// `"fetch.max.bytes"`); connection properties belong to the
            /// environment's `kafka` table.
            #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
            pub kafka: BTreeMap<String, String>,
        }

        impl ConsumerConfig {
            /// The variable of each setting, in the order above.
            pub const VARIABLES: &'static [&'static str] = &[$($env),*];

            /// Overrides the settings named by variables (`ONCELY_MAX_BATCH=200`, ...).
            pub fn apply_vars(mut self, vars: &dyn Vars) -> Result<Self> {
                $(
                    if let Some(v) = vars.var($env) {
                        let parse: fn(&str) -> Result<$ty> = $parse;
                        self.$field = Some(parse(&v).map_err(|e| Error::Config(format!("{}: {e}", $env)))?);
                    }
                )*
                Ok(self)
            }
        }
    };
}

fn num<T: std::str::FromStr>(v: &str) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    v.trim().parse().map_err(|e| Error::Config(format!("{v:?} is not a number: {e}")))
}

fn boolean(v: &str) -> Result<bool> {
    parse_word("value", v, &[("true", true), ("false", false), ("1", true), ("0", false), ("yes", true), ("no", false)])
}

consumer_config! {
    /// Topics to subscribe to.
    topics: Vec<String>, "ONCELY_TOPICS", |v| Ok(v.split(',').map(|t| t.trim().to_owned()).filter(|t| !t.is_empty()).collect());
    /// Records per batch transaction.
    max_batch: usize, "ONCELY_MAX_BATCH", num;
    /// Bytes per batch.
    max_batch_bytes: usize, "ONCELY_MAX_BATCH_BYTES", num;
    /// Milliseconds a lane waits for more records before a partial batch.
    max_wait_ms: u64, "ONCELY_MAX_WAIT_MS", num;
    /// Milliseconds a revoke waits for in-flight batches.
    drain_timeout_ms: u64, "ONCELY_DRAIN_TIMEOUT_MS", num;
    /// Milliseconds a new owner waits for a previous owner's open batch.
    zombie_timeout_ms: u64, "ONCELY_ZOMBIE_TIMEOUT_MS", num;
    /// Kafka `session.timeout.ms` (heartbeats every sixth of it).
    session_timeout_ms: u64, "ONCELY_SESSION_TIMEOUT_MS", num;
    /// `skip`, `replay` or `halt`: when Kafka's offset is behind the database's.
    rewind_policy: RewindPolicyName, "ONCELY_REWIND_POLICY", |v| parse_word("rewind_policy", v, RewindPolicyName::WORDS);
    /// `skip`, `replay` or `halt`: when Kafka's offset is ahead of the database's.
    skip_forward_policy: RewindPolicyName, "ONCELY_SKIP_FORWARD_POLICY", |v| parse_word("skip_forward_policy", v, RewindPolicyName::WORDS);
    /// Attempts before a failing event is dead-lettered.
    max_attempts: u32, "ONCELY_MAX_ATTEMPTS", num;
    /// `continue` or `hold`: the events of a key behind a dead-lettered one.
    dead_key_policy: DeadKeyPolicyName, "ONCELY_DEAD_KEY_POLICY", |v| parse_word("dead_key_policy", v, DeadKeyPolicyName::WORDS);
    /// Retry backoff base, milliseconds.
    retry_backoff_base_ms: u64, "ONCELY_RETRY_BACKOFF_BASE_MS", num;
    /// Retry backoff cap, milliseconds.
    retry_backoff_max_ms: u64, "ONCELY_RETRY_BACKOFF_MAX_MS", num;
    /// Records larger than this are dead-lettered (`oversized-record`).
    max_record_bytes: usize, "ONCELY_MAX_RECORD_BYTES", num;
    /// Rate limit, events per second.
    max_events_per_second: f64, "ONCELY_MAX_EVENTS_PER_SECOND", num;
    /// Days inbox rows are kept.
    inbox_retention_days: u64, "ONCELY_INBOX_RETENTION_DAYS", num;
    /// Start even if the inbox retention is shorter than the topics'.
    force_inbox_retention: bool, "ONCELY_FORCE_INBOX_RETENTION", boolean;
    /// Serve Prometheus metrics here (`GET /metrics`).
    metrics_addr: std::net::SocketAddr, "ONCELY_METRICS_ADDR", |v| v.trim().parse().map_err(|e| Error::Config(format!("{v:?}: {e}")));
    /// Apply migrations at start.
    migrate: bool, "ONCELY_MIGRATE", boolean;
    /// Create the dead-letter topics at start.
    create_dlt_topics: bool, "ONCELY_CREATE_DLT_TOPICS", boolean;
    /// Stop gracefully on SIGTERM.
    handle_sigterm: bool, "ONCELY_HANDLE_SIGTERM", boolean;
    /// Side effects suppressed (recorded, never run).
    replay_mode: bool, "ONCELY_REPLAY_MODE", boolean;
    /// Milliseconds of an effect call's lease.
    effect_lease_ms: u64, "ONCELY_EFFECT_LEASE_MS", num;
    /// `skip` or `dead-letter`: events of a type no route takes.
    unrouted: UnroutedName, "ONCELY_UNROUTED", |v| parse_word("unrouted", v, UnroutedName::WORDS);
}

/// [`RewindPolicy`](crate::RewindPolicy) by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RewindPolicyName {
    /// Follow the database.
    Skip,
    /// Follow Kafka.
    Replay,
    /// Pause the partition.
    Halt,
}

impl RewindPolicyName {
    const WORDS: &'static [(&'static str, RewindPolicyName)] =
        &[("skip", RewindPolicyName::Skip), ("replay", RewindPolicyName::Replay), ("halt", RewindPolicyName::Halt)];
}

/// [`DeadKeyPolicy`](crate::failure::DeadKeyPolicy) by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeadKeyPolicyName {
    /// The next event of the key goes on.
    Continue,
    /// The key's events wait for an operator.
    Hold,
}

impl DeadKeyPolicyName {
    const WORDS: &'static [(&'static str, DeadKeyPolicyName)] =
        &[("continue", DeadKeyPolicyName::Continue), ("hold", DeadKeyPolicyName::Hold)];
}

/// [`Unrouted`](crate::Unrouted) by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum UnroutedName {
    /// Counted and skipped.
    Skip,
    /// Dead-lettered.
    DeadLetter,
}

impl UnroutedName {
    const WORDS: &'static [(&'static str, UnroutedName)] =
        &[("skip", UnroutedName::Skip), ("dead-letter", UnroutedName::DeadLetter)];
}

impl ConsumerConfig {
    /// The settings of consumer `name`: its `[consumer.NAME]` table in the
    /// file (if any), then the `ONCELY_*` variables over it.
    pub fn load(file: Option<&ConfigFile>, name: &str, vars: &dyn Vars) -> Result<Self> {
        let base = file.and_then(|f| f.consumers.get(name).cloned()).unwrap_or_default();
        base.apply_vars(vars)
    }
}

/// One environment: a Kafka cluster and the oncely database that goes with it.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EnvConfig {
    /// Kafka `bootstrap.servers`.
    pub bootstrap_servers: String,
    /// PostgreSQL URL of the database holding the `oncely` schema.
    pub database_url: String,
    /// The cluster id this environment must be talking to. Commands check the
    /// live id before they read or change anything that matters; leaving it
    /// out is allowed only for unprotected environments.
    #[serde(default)]
    pub cluster_id: Option<String>,
    /// Protected environments require a typed confirmation for changes and
    /// show a red banner.
    #[serde(default)]
    pub protected: bool,
    /// librdkafka client properties for every client of this environment
    /// (`security.protocol`, `sasl.*`, `ssl.*`, ...). A secret may come
    /// from a variable or a file: `"sasl.password" = { env = "KAFKA_PASSWORD" }`,
    /// `{ file = "/run/secrets/kafka" }`. Secrets are never printed.
    #[serde(default)]
    pub kafka: BTreeMap<String, crate::kafka::PropertyValue>,
}

impl EnvConfig {
    /// How to reach this environment's Kafka cluster.
    pub fn connection(&self) -> crate::kafka::KafkaConnection {
        crate::kafka::KafkaConnection::new(self.bootstrap_servers.clone()).properties(self.kafka.clone())
    }
}

/// The environment a command runs against, after overrides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Environment {
    /// Its name in the file (or `env` when it came from variables alone).
    pub name: String,
    /// Its settings.
    pub config: EnvConfig,
    /// The file it was read from, if any.
    pub source: Option<PathBuf>,
}

impl ConfigFile {
    /// Parses the text of a config file; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| Error::Config(format!("{origin}: {e}")))
    }

    /// Reads and parses a file.
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?;
        Self::parse(&text, &path.display().to_string())
    }
}

/// Something that reads variables: the process environment, or a map in tests.
pub trait Vars {
    /// The value of `name`, if set and not empty.
    fn var(&self, name: &str) -> Option<String>;
}

/// No variables at all (settings from a file alone).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoVars;

impl Vars for NoVars {
    fn var(&self, _name: &str) -> Option<String> {
        None
    }
}

/// The process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessVars;

impl Vars for ProcessVars {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

impl Vars for BTreeMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned().filter(|v| !v.is_empty())
    }
}

/// Resolves the environment to use, as the CLI does: `config` and `env` are
/// the `--config` and `--env` flags.
pub fn resolve(config: Option<&Path>, env: Option<&str>, vars: &dyn Vars) -> Result<Environment> {
    let explicit = config.map(Path::to_path_buf).or_else(|| vars.var("ONCELY_CONFIG").map(PathBuf::from));
    let path = explicit.clone().unwrap_or_else(|| PathBuf::from("oncely.toml"));
    let file = if path.exists() {
        Some(ConfigFile::load(&path)?)
    } else if explicit.is_some() {
        return Err(Error::Config(format!("config file {} does not exist", path.display())));
    } else {
        None
    };
    let wanted = env.map(str::to_owned).or_else(|| vars.var("ONCELY_ENV"));
    let (name, mut cfg, source) = match (&file, wanted) {
        (Some(f), Some(name)) => {
            let cfg = f.envs.get(&name).cloned().ok_or_else(|| {
                Error::Config(format!(
                    "environment `{name}` is not defined in {} (defined: {})",
                    path.display(),
                    f.envs.keys().cloned().collect::<Vec<_>>().join(", ")
                ))
            })?;
            (name, cfg, Some(path))
        }
        (Some(f), None) => {
            let name = match (&f.default_env, f.envs.len()) {
                (Some(d), _) => d.clone(),
                (None, 1) => f.envs.keys().next().cloned().unwrap_or_default(),
                _ => {
                    return Err(Error::Config(format!(
                        "{} defines several environments and no default_env: choose one with --env or ONCELY_ENV",
                        path.display()
                    )))
                }
            };
            let cfg =
                f.envs.get(&name).cloned().ok_or_else(|| {
                    Error::Config(format!("default_env `{name}` is not defined in {}", path.display()))
                })?;
            (name, cfg, Some(path))
        }
        (None, wanted) => {
            // No file: the environment comes from variables alone.
            let bootstrap = vars.var("ONCELY_BOOTSTRAP_SERVERS").or_else(|| vars.var("ONCELY_KAFKA_BOOTSTRAP"));
            let db = vars.var("ONCELY_DATABASE_URL").or_else(|| vars.var("DATABASE_URL"));
            match (bootstrap, db) {
                (Some(b), Some(d)) => (
                    wanted.unwrap_or_else(|| "env".into()),
                    EnvConfig {
                        bootstrap_servers: b,
                        database_url: d,
                        cluster_id: None,
                        protected: false,
                        kafka: BTreeMap::new(),
                    },
                    None,
                ),
                _ => {
                    return Err(Error::Config(
                        "no oncely.toml found and ONCELY_BOOTSTRAP_SERVERS / ONCELY_DATABASE_URL are not set".into(),
                    ))
                }
            }
        }
    };
    if let Some(b) = vars.var("ONCELY_BOOTSTRAP_SERVERS") {
        cfg.bootstrap_servers = b;
    }
    if let Some(d) = vars.var("ONCELY_DATABASE_URL") {
        cfg.database_url = d;
    }
    if let Some(c) = vars.var("ONCELY_CLUSTER_ID") {
        cfg.cluster_id = Some(c);
    }
    if let Some(p) = vars.var("ONCELY_PROTECTED") {
        cfg.protected = match p.to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" => true,
            "0" | "false" | "no" => false,
            other => return Err(Error::Config(format!("ONCELY_PROTECTED must be true or false, not `{other}`"))),
        };
    }
    if cfg.protected && cfg.cluster_id.is_none() {
        return Err(Error::Config(format!(
            "environment `{name}` is protected but has no cluster_id: a protected environment must name the cluster it expects"
        )));
    }
    Ok(Environment { name, config: cfg, source })
}

impl Environment {
    /// Refuses unless `live` is the cluster id this environment expects.
    pub fn check_cluster_id(&self, live: &str) -> Result<()> {
        match &self.config.cluster_id {
            Some(expected) if expected != live => Err(Error::Refused(format!(
                "environment `{}` expects Kafka cluster id {expected}, but {} answers with cluster id {live}: \
                 wrong cluster, nothing was read or changed",
                self.name, self.config.bootstrap_servers
            ))),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
default_env = "staging"
[env.staging]
bootstrap_servers = "s:9092"
database_url = "postgres://s/db"
cluster_id = "S"
[env.prod]
bootstrap_servers = "p:9092"
database_url = "postgres://p/db"
cluster_id = "P"
protected = true
"#;

    fn with_file(text: &str) -> (tempdir::Dir, PathBuf) {
        let d = tempdir::Dir::new();
        let p = d.0.join("oncely.toml");
        std::fs::write(&p, text).expect("write");
        (d, p)
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                let p = std::env::temp_dir().join(format!("oncely-cfg-{}", uuid::Uuid::new_v4()));
                std::fs::create_dir_all(&p).expect("mkdir");
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn picks_default_env_and_flag_overrides() {
        let (_d, p) = with_file(FILE);
        let vars = BTreeMap::new();
        let e = resolve(Some(&p), None, &vars).expect("default");
        assert_eq!(e.name, "staging");
        assert!(!e.config.protected);
        let e = resolve(Some(&p), Some("prod"), &vars).expect("prod");
        assert!(e.config.protected);
        assert_eq!(e.config.cluster_id.as_deref(), Some("P"));
    }

    #[test]
    fn env_vars_choose_and_override() {
        let (_d, p) = with_file(FILE);
        let vars: BTreeMap<String, String> = [
            ("ONCELY_CONFIG".to_string(), p.display().to_string()),
            ("ONCELY_ENV".into(), "prod".into()),
            ("ONCELY_BOOTSTRAP_SERVERS".into(), "other:9092".into()),
        ]
        .into_iter()
        .collect();
        let e = resolve(None, None, &vars).expect("env");
        assert_eq!(e.name, "prod");
        assert_eq!(e.config.bootstrap_servers, "other:9092");
    }

    #[test]
    fn unknown_keys_are_errors_that_name_the_key() {
        let err = ConfigFile::parse("[env.a]\nbootstrap_servers='x'\ndatabase_url='y'\nprotect=true\n", "t.toml")
            .expect_err("typo");
        assert!(err.to_string().contains("protect"), "{err}");
    }

    #[test]
    fn undefined_env_lists_the_defined_ones() {
        let (_d, p) = with_file(FILE);
        let err = resolve(Some(&p), Some("qa"), &BTreeMap::new()).expect_err("qa");
        let msg = err.to_string();
        assert!(msg.contains("qa") && msg.contains("prod") && msg.contains("staging"), "{msg}");
    }

    #[test]
    fn protected_env_needs_a_cluster_id() {
        let (_d, p) = with_file("[env.p]\nbootstrap_servers='x'\ndatabase_url='y'\nprotected=true\n");
        let err = resolve(Some(&p), None, &BTreeMap::new()).expect_err("no id");
        assert!(err.to_string().contains("cluster_id"), "{err}");
    }

    #[test]
    fn cluster_id_mismatch_shows_both_ids() {
        let (_d, p) = with_file(FILE);
        let e = resolve(Some(&p), Some("prod"), &BTreeMap::new()).expect("prod");
        e.check_cluster_id("P").expect("same id");
        let msg = e.check_cluster_id("S").expect_err("mismatch").to_string();
        assert!(msg.contains("expects Kafka cluster id P") && msg.contains("cluster id S"), "{msg}");
    }

    #[test]
    fn missing_explicit_file_is_an_error() {
        let err = resolve(Some(Path::new("/nonexistent/oncely.toml")), None, &BTreeMap::new()).expect_err("missing");
        assert!(err.to_string().contains("does not exist"));
    }

    #[test]
    fn consumer_settings_come_from_the_file_then_the_variables() {
        let f = ConfigFile::parse(
            r#"
[env.local]
bootstrap_servers = "b:1"
database_url = "postgres://x/db"
[consumer.billing]
topics = ["orders"]
max_batch = 200
rewind_policy = "replay"
kafka = { "fetch.max.bytes" = "1048576" }
"#,
            "test",
        )
        .expect("parse");
        let vars: BTreeMap<String, String> =
            [("ONCELY_MAX_BATCH", "50"), ("ONCELY_DEAD_KEY_POLICY", "hold"), ("ONCELY_TOPICS", "a, b")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
        let c = ConsumerConfig::load(Some(&f), "billing", &vars).expect("load");
        assert_eq!(c.max_batch, Some(50), "a variable wins over the file");
        assert_eq!(c.rewind_policy, Some(RewindPolicyName::Replay));
        assert_eq!(c.dead_key_policy, Some(DeadKeyPolicyName::Hold));
        assert_eq!(c.topics, Some(vec!["a".to_owned(), "b".to_owned()]));
        assert_eq!(c.kafka.get("fetch.max.bytes").map(String::as_str), Some("1048576"));
        let other = ConsumerConfig::load(Some(&f), "shipping", &BTreeMap::new()).expect("load");
        assert_eq!(other, ConsumerConfig::default(), "an unnamed consumer keeps the builder's defaults");
    }

    #[test]
    fn unknown_consumer_keys_and_bad_values_are_errors_that_name_them() {
        let err = ConfigFile::parse("[consumer.x]\nmax_bach = 3\n", "oncely.toml").expect_err("typo");
        assert!(err.to_string().contains("max_bach"), "{err}");
        let vars: BTreeMap<String, String> = [("ONCELY_REWIND_POLICY".to_owned(), "rewind".to_owned())].into();
        let err = ConsumerConfig::default().apply_vars(&vars).expect_err("bad word");
        assert!(err.to_string().contains("ONCELY_REWIND_POLICY") && err.to_string().contains("replay"), "{err}");
        let vars: BTreeMap<String, String> = [("ONCELY_MAX_BATCH".to_owned(), "many".to_owned())].into();
        assert!(ConsumerConfig::default().apply_vars(&vars).is_err());
    }

    #[test]
    fn every_variable_sets_its_setting() {
        for v in ConsumerConfig::VARIABLES {
            let value = match *v {
                "ONCELY_TOPICS" => "t",
                "ONCELY_METRICS_ADDR" => "127.0.0.1:1",
                "ONCELY_REWIND_POLICY" | "ONCELY_SKIP_FORWARD_POLICY" | "ONCELY_UNROUTED" => "skip",
                "ONCELY_DEAD_KEY_POLICY" => "hold",
                x if x.ends_with("RETENTION") || x.ends_with("MIGRATE") || x.ends_with("TOPICS") => "true",
                "ONCELY_CREATE_DLT_TOPICS" | "ONCELY_HANDLE_SIGTERM" | "ONCELY_REPLAY_MODE" => "true",
                _ => "7",
            };
            let vars: BTreeMap<String, String> = [((*v).to_owned(), value.to_owned())].into();
            let c = ConsumerConfig::default().apply_vars(&vars).unwrap_or_else(|e| panic!("{v}: {e}"));
            assert_ne!(c, ConsumerConfig::default(), "{v} changed nothing");
        }
    }
}
