//! `oncely outbox`: The transactional outbox.

use std::process::ExitCode;

use clap::Subcommand;

use crate::Cli;

/// `oncely outbox ...`
#[derive(Debug, Subcommand)]
pub(crate) enum OutboxCmd {
    /// List.
    List,
}

pub(crate) async fn run(_cli: &Cli, _cmd: &OutboxCmd) -> anyhow::Result<ExitCode> {
    anyhow::bail!("oncely outbox is not built yet")
}
