//! `oncely dlq`: Dead letters.

use std::process::ExitCode;

use clap::Subcommand;

use crate::Cli;

/// `oncely dlq ...`
#[derive(Debug, Subcommand)]
pub(crate) enum DlqCmd {
    /// List.
    List,
}

pub(crate) async fn run(_cli: &Cli, _cmd: &DlqCmd) -> anyhow::Result<ExitCode> {
    anyhow::bail!("oncely dlq is not built yet")
}
