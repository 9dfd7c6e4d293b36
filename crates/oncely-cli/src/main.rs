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
struct Cli {
    /// Config file (default ./oncely.toml, or ONCELY_CONFIG).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Environment from the config file (or ONCELY_ENV).
    #[arg(long, global = true, value_name = "NAME")]
    env: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Apply oncely's database migrations (schema `oncely`).
    Migrate,
    /// Show the environment this invocation would act on.
    Env,
    /// Run the guided demonstration against the services from scripts/services.
    Demo {
        /// Print one JSON object with the results as the last line.
        #[arg(long)]
        json: bool,
    },
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

fn environment(cli: &Cli) -> anyhow::Result<Environment> {
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
            match cli.output {
                Output::Json => println!(
                    "{}",
                    serde_json::json!({
                        "env": env.name,
                        "bootstrap_servers": env.config.bootstrap_servers,
                        "cluster_id": env.config.cluster_id,
                        "protected": env.config.protected,
                        "source": env.source.as_ref().map(|p| p.display().to_string()),
                    })
                ),
                Output::Table => {
                    println!("environment  {}", env.name);
                    println!("kafka        {}", env.config.bootstrap_servers);
                    println!("cluster id   {}", env.config.cluster_id.as_deref().unwrap_or("(not set)"));
                    println!("protected    {}", env.config.protected);
                }
            }
        }
        Command::Demo { json } => {
            println!("oncely demo: the guided demonstration is not built yet (issue: the proof).");
            if *json {
                println!("{}", serde_json::json!({ "demo": "not-built" }));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
