//! `oncely offsets | lag | watch | audit`: the operator's offset tools.

use std::process::ExitCode;

use clap::{Args, Subcommand};

use crate::Cli;

/// `oncely offsets ...`
#[derive(Debug, Subcommand)]
pub(crate) enum OffsetsCmd {
    /// Per partition: committed offset, oncely database offset, log start/end, lag.
    Show {
        /// Consumer group.
        #[arg(short = 'g', long)]
        group: String,
    },
}

/// `oncely lag`
#[derive(Debug, Args)]
pub(crate) struct LagArgs {
    /// Consumer group (default: all groups).
    #[arg(short = 'g', long)]
    group: Option<String>,
}

/// `oncely watch`
#[derive(Debug, Args)]
pub(crate) struct WatchArgs {}

/// `oncely audit`
#[derive(Debug, Args)]
pub(crate) struct AuditArgs {}

pub(crate) async fn run(_cli: &Cli, _cmd: &OffsetsCmd) -> anyhow::Result<ExitCode> {
    anyhow::bail!("oncely offsets is not built yet")
}

pub(crate) async fn lag(_cli: &Cli, _args: &LagArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("oncely lag is not built yet")
}

pub(crate) async fn watch(_cli: &Cli, _args: &WatchArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("oncely watch is not built yet")
}

pub(crate) async fn audit(_cli: &Cli, _args: &AuditArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("oncely audit is not built yet")
}
