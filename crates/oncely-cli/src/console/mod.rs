//! `oncely console`: the operator's web page. One process over the same
//! [`Session`] and library calls as the CLI: every page renders what the
//! library returns, every action is an `oncely::admin::ops` preview that the
//! library confirms and executes (the console only turns a form into the
//! operator's typed text and names the operator in the `Origin`).
//!
//! Safety of the web side lives in [`guard`]: loopback by default, sign-in
//! required elsewhere, a Host check against DNS rebinding, CSRF tokens on
//! every POST, a read-only mode, and a strict Content-Security-Policy.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use oncely::admin::lag::LagHistory;
use oncely::admin::session::Session;
use tokio::sync::Mutex;

use crate::common;
use crate::Cli;

mod assets;
mod guard;
mod pages;
mod view;

/// `oncely console`
#[derive(Debug, Args)]
#[command(after_help = "\
Loopback by default. Listening on any other address requires --users: a file of
`name:secret` lines (HTTP Basic sign-in, or `Authorization: Bearer <secret>`); the name is
the operator recorded in the audit log. Every change is a POST with a CSRF token;
--read-only refuses them all.

Examples:
  oncely console
  oncely --env prod console --listen 127.0.0.1:8080 --read-only
  oncely --env prod console --listen 0.0.0.0:8080 --users /etc/oncely/console-users")]
pub(crate) struct ConsoleArgs {
    /// Address to listen on (port 0: any free port; the address is printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Operators who may sign in: `name:secret` per line (`#` comments). Required unless the
    /// address is loopback; on loopback, without it, the operator is the OS user running the console.
    #[arg(long, value_name = "FILE", env = "ONCELY_CONSOLE_USERS")]
    users: Option<PathBuf>,
    /// Show everything, change nothing: every POST is refused.
    #[arg(long)]
    read_only: bool,
}

/// What every request shares.
#[derive(Debug)]
pub(crate) struct Console {
    session: Session,
    read_only: bool,
    guard: guard::Guard,
    /// Live lag values kept between refreshes (Burrow's window needs history).
    history: Mutex<LagHistory>,
    /// The same for one group's page (its own, so that a page never waits
    /// for the background round over every group).
    group_history: Mutex<LagHistory>,
    /// The last round of every group's lag, refreshed in the background: a
    /// cluster may have hundreds of groups, and a page (or many open tabs)
    /// must not each evaluate them all.
    groups: tokio::sync::RwLock<Option<GroupsRound>>,
    /// Redrives started from the console (the last [`KEPT_JOBS`]).
    jobs: std::sync::Mutex<std::collections::BTreeMap<u64, Arc<pages::RedriveJob>>>,
}

/// How many finished or running redrives the console remembers.
const KEPT_JOBS: usize = 100;

impl Console {
    fn add_job(&self, job: Arc<pages::RedriveJob>) -> u64 {
        let mut jobs = self.jobs.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let id = jobs.keys().next_back().map_or(1, |k| k + 1);
        jobs.insert(id, job);
        while jobs.len() > KEPT_JOBS {
            jobs.pop_first();
        }
        id
    }

    fn job(&self, id: u64) -> Option<Arc<pages::RedriveJob>> {
        self.jobs.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&id).cloned()
    }
}

/// One evaluation of every group's lag.
#[derive(Debug, Clone)]
pub(crate) struct GroupsRound {
    pub(crate) at: chrono::DateTime<chrono::Utc>,
    pub(crate) groups: Vec<oncely::admin::lag::GroupLag>,
    pub(crate) error: Option<String>,
}

/// How long the background refresh waits between rounds.
const GROUPS_REFRESH: std::time::Duration = std::time::Duration::from_secs(5);

/// Evaluates every group's lag, round after round, for the groups page.
async fn refresh_groups(c: Arc<Console>) {
    loop {
        let round = {
            let mut history = c.history.lock().await;
            c.session.lag(None, oncely::admin::lag::LagOptions::default(), &mut history).await
        };
        let round = match round {
            Ok(groups) => GroupsRound { at: chrono::Utc::now(), groups, error: None },
            Err(e) => {
                tracing::warn!(error = %e, "Could not evaluate the groups' lag.");
                let last = c.groups.read().await.clone();
                GroupsRound {
                    at: chrono::Utc::now(),
                    groups: last.map(|l| l.groups).unwrap_or_default(),
                    error: Some(c.guard.scrub(&e.to_string())),
                }
            }
        };
        *c.groups.write().await = Some(round);
        tokio::time::sleep(GROUPS_REFRESH).await;
    }
}

pub(crate) async fn run(cli: &Cli, a: &ConsoleArgs) -> anyhow::Result<ExitCode> {
    let users = match &a.users {
        Some(path) => Some(guard::Users::load(path)?),
        None => None,
    };
    if !a.listen.ip().is_loopback() && users.is_none() {
        return Err(common::refused(format!(
            "{} is not a loopback address: the console listens there only with --users (operators who sign in)",
            a.listen
        )));
    }
    let session = common::session(cli).await?;
    let listener =
        tokio::net::TcpListener::bind(a.listen).await.with_context(|| format!("listening on {}", a.listen))?;
    let addr = listener.local_addr()?;
    let secrets = vec![session.env().config.database_url.clone()];
    let state = Arc::new(Console {
        guard: guard::Guard::new(users, addr, secrets),
        session,
        read_only: a.read_only,
        history: Mutex::new(LagHistory::default()),
        group_history: Mutex::new(LagHistory::default()),
        groups: tokio::sync::RwLock::new(None),
        jobs: std::sync::Mutex::new(Default::default()),
    });
    let refresher = tokio::spawn(refresh_groups(state.clone()));
    let app = pages::router(state.clone());
    // The first line on stdout is the address (scripts and tests read it).
    println!("oncely console listening on http://{addr}/");
    eprintln!(
        "Environment `{}`{}{}. Ctrl-C to stop.",
        state.session.env().name,
        if state.session.env().config.protected { " (PROTECTED)" } else { "" },
        if a.read_only { ", read-only" } else { "" }
    );
    axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(crate::offsets::interrupted())
        .await
        .context("serving the console")?;
    refresher.abort();
    Ok(ExitCode::SUCCESS)
}
