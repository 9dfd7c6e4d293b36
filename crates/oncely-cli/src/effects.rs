//! `oncely effects`: Side-effect intents.

use std::process::ExitCode;

use clap::Subcommand;

use crate::Cli;

/// `oncely effects ...`
#[derive(Debug, Subcommand)]
pub(crate) enum EffectsCmd {
    /// List.
    List,
}

pub(crate) async fn run(_cli: &Cli, _cmd: &EffectsCmd) -> anyhow::Result<ExitCode> {
    anyhow::bail!("oncely effects is not built yet")
}
