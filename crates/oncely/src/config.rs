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
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// The environment used when neither `--env` nor `ONCELY_ENV` names one.
    #[serde(default)]
    pub default_env: Option<String>,
    /// Environments by name.
    #[serde(default, rename = "env")]
    pub envs: BTreeMap<String, EnvConfig>,
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
}
