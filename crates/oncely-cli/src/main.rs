//! `oncely`: the operator command line. Thin: parsing, printing and exit codes;
//! the logic lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use oncely::config::{self, Environment, ProcessVars};

/// Exit code for usage errors and refusals (ripgrep's convention).
const EXIT_REFUSED: u8 = 2;

#[derive(Debug, Parser)]
#[command(name = "oncely", version, about = "Effectively-once Kafka + PostgreSQL: operator tools")]
pub(crate) struct Cli {
    /// Config file (default ./oncely.toml, or ONCELY_CONFIG).
    #[arg(long, global = true, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// Environment from the config file (or ONCELY_ENV).
    #[arg(long, global = true, value_name = "NAME")]
    pub(crate) env: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    pub(crate) output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Output {
    Table,
    Json,
}

mod common;
mod console;
mod dlq;
mod effects;
mod offsets;
mod outbox;
mod projection;

#[derive(Debug, Subcommand)]
enum Command {
    /// Consumer group offsets: show, reset (with preview), snapshots, restore, undo.
    #[command(subcommand)]
    Offsets(offsets::OffsetsCmd),
    /// Offset and time lag per partition, with Burrow's statuses.
    Lag(offsets::LagArgs),
    /// Record every group's committed offsets periodically (oncely.offset_snapshots).
    Watch(offsets::WatchArgs),
    /// The audit log of operator actions.
    Audit(offsets::AuditArgs),
    /// The transactional outbox: status, relay.
    #[command(subcommand)]
    Outbox(outbox::OutboxCmd),
    /// Side-effect intents: list, retry, resolve.
    #[command(subcommand)]
    Effects(effects::EffectsCmd),
    /// Dead letters: list, inspect, redrive.
    #[command(subcommand)]
    Dlq(dlq::DlqCmd),
    /// Projection rebuilds: rebuild into a copy with side effects off, status, diff, swap, swap-back.
    #[command(subcommand)]
    Projection(projection::ProjectionCmd),
    /// The operator console: the same views and guarded actions as a web page (loopback by default).
    Console(console::ConsoleArgs),
    /// Apply oncely's database migrations (schema `oncely`).
    Migrate,
    /// Show the environment this invocation would act on.
    Env,
    /// Check a config file: every environment and consumer it defines, with
    /// secrets masked; unknown keys and bad values are errors (exit 2).
    #[command(subcommand)]
    Config(ConfigCmd),
}

#[derive(Debug, Subcommand)]
enum ConfigCmd {
    /// Validate the file (--config, ONCELY_CONFIG or ./oncely.toml) and print
    /// the effective settings: file, then the ONCELY_* variables.
    Check,
}

/// `oncely config check`.
fn config_check(cli: &Cli) -> anyhow::Result<()> {
    let path = cli
        .config
        .clone()
        .or_else(|| std::env::var_os("ONCELY_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("oncely.toml"));
    let file = config::ConfigFile::load(&path)?;
    let mut envs = serde_json::Map::new();
    for (name, e) in &file.envs {
        let props: std::collections::BTreeMap<String, String> = e.connection().describe().into_iter().collect();
        envs.insert(
            name.clone(),
            serde_json::json!({
                "bootstrap_servers": e.bootstrap_servers,
                "cluster_id": e.cluster_id,
                "protected": e.protected,
                "kafka_properties": props,
            }),
        );
    }
    let mut consumers = serde_json::Map::new();
    for name in file.consumers.keys() {
        let c = config::ConsumerConfig::load(Some(&file), name, &ProcessVars)?;
        consumers.insert(name.clone(), serde_json::to_value(&c)?);
    }
    if let Some(d) = &file.default_env {
        anyhow::ensure!(file.envs.contains_key(d), "default_env `{d}` is not defined in {}", path.display());
    }
    match cli.output {
        Output::Json => println!(
            "{}",
            serde_json::json!({"file": path.display().to_string(), "default_env": file.default_env, "env": envs, "consumer": consumers})
        ),
        Output::Table => {
            println!("{}: valid", path.display());
            for (name, v) in &envs {
                println!(
                    "\nenvironment {name}{}",
                    if file.default_env.as_deref() == Some(name) { " (default)" } else { "" }
                );
                println!("  kafka        {}", v["bootstrap_servers"].as_str().unwrap_or(""));
                println!("  cluster id   {}", v["cluster_id"].as_str().unwrap_or("(not set)"));
                println!("  protected    {}", v["protected"]);
                if let Some(p) = v["kafka_properties"].as_object() {
                    for (k, val) in p {
                        println!("  {k} = {}", val.as_str().unwrap_or(""));
                    }
                }
            }
            for (name, v) in &consumers {
                println!("\nconsumer {name} (settings not listed keep their defaults)");
                if let Some(o) = v.as_object() {
                    for (k, val) in o {
                        println!("  {k} = {val}");
                    }
                }
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("oncely: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("oncely: {e:#}");
            let refused = e.chain().any(|c| {
                matches!(c.downcast_ref::<oncely::Error>(), Some(oncely::Error::Refused(_) | oncely::Error::Config(_)))
            });
            ExitCode::from(if refused { EXIT_REFUSED } else { 1 })
        }
    }
}

pub(crate) fn environment(cli: &Cli) -> anyhow::Result<Environment> {
    Ok(config::resolve(cli.config.as_deref(), cli.env.as_deref(), &ProcessVars)?)
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::Migrate => {
            let env = environment(&cli)?;
            let pool = oncely::store::connect(&env.config.database_url, 2)
                .await
                .with_context(|| format!("connecting to the database of environment `{}`", env.name))?;
            let applied = oncely::store::migrate(&pool).await?;
            match cli.output {
                Output::Json => println!("{}", serde_json::json!({ "env": env.name, "applied": applied })),
                Output::Table if applied.is_empty() => println!("schema oncely is up to date"),
                Output::Table => println!("applied migrations {applied:?}"),
            }
        }
        Command::Env => {
            let env = environment(&cli)?;
            // Secrets are masked (KafkaConnection::describe); the database
            // URL is not shown at all: it may carry a password.
            let kafka: Vec<(String, String)> = env.config.connection().describe();
            match cli.output {
                Output::Json => println!(
                    "{}",
                    serde_json::json!({
                        "env": env.name,
                        "bootstrap_servers": env.config.bootstrap_servers,
                        "cluster_id": env.config.cluster_id,
                        "protected": env.config.protected,
                        "kafka_properties": kafka.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
                        "source": env.source.as_ref().map(|p| p.display().to_string()),
                    })
                ),
                Output::Table => {
                    println!("environment  {}", env.name);
                    println!("kafka        {}", env.config.bootstrap_servers);
                    println!("cluster id   {}", env.config.cluster_id.as_deref().unwrap_or("(not set)"));
                    println!("protected    {}", env.config.protected);
                    for (k, v) in &kafka {
                        println!("  {k} = {v}");
                    }
                }
            }
        }
        Command::Config(ConfigCmd::Check) => config_check(&cli)?,
        Command::Offsets(c) => return offsets::run(&cli, c).await,
        Command::Lag(a) => return offsets::lag(&cli, a).await,
        Command::Watch(a) => return offsets::watch(&cli, a).await,
        Command::Audit(a) => return offsets::audit(&cli, a).await,
        Command::Outbox(c) => return outbox::run(&cli, c).await,
        Command::Effects(c) => return effects::run(&cli, c).await,
        Command::Dlq(c) => return dlq::run(&cli, c).await,
        Command::Projection(c) => return projection::run(&cli, c).await,
        Command::Console(a) => return console::run(&cli, a).await,
    }
    Ok(ExitCode::SUCCESS)
}
