//! Helpers shared by the subcommands: environment banner, sessions, typed
//! confirmation, tables and JSON output.

use std::io::{BufRead, IsTerminal, Write};

use anyhow::Context;
use oncely::admin::session::Session;
use oncely::config::Environment;
use serde::Serialize;

use crate::{Cli, Output};

/// An error that makes `oncely` exit with code 2 (a refusal or a usage
/// error): main looks for `oncely::Error::Refused` in the chain.
pub(crate) fn refused(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(oncely::Error::Refused(msg.into()))
}

const RED_BG: &str = "\x1b[1;97;41m";
const GREEN_BG: &str = "\x1b[1;30;42m";
const RED: &str = "\x1b[1;31m";
const RESET: &str = "\x1b[0m";

/// Prints the environment banner to stderr: red for a protected
/// environment, green otherwise; colour only when stderr is a terminal.
pub(crate) fn banner(env: &Environment) {
    let text = format!(
        " oncely · environment {} · {} · cluster {} · {} ",
        env.name,
        env.config.bootstrap_servers,
        env.config.cluster_id.as_deref().unwrap_or("(not pinned)"),
        if env.config.protected { "PROTECTED" } else { "unprotected" }
    );
    let mut err = std::io::stderr().lock();
    let _ = if err.is_terminal() {
        writeln!(err, "{}{text}{RESET}", if env.config.protected { RED_BG } else { GREEN_BG })
    } else {
        writeln!(err, "[{}]", text.trim())
    };
}

/// Resolves the environment, shows the banner, then opens a session: the
/// live cluster id is checked before anything else is read.
pub(crate) async fn session(cli: &Cli) -> anyhow::Result<Session> {
    let env = crate::environment(cli)?;
    banner(&env);
    let name = env.name.clone();
    Session::open(env).await.with_context(|| format!("opening environment `{name}`"))
}

/// The typed confirmation to hand to the library, which checks it:
/// `--confirm` when given (checked even where none is required: a text for
/// another environment means the operator is not where they think);
/// otherwise, when the library asks for `asks_for`, what the operator types
/// at the terminal; `None` when nothing was asked or there is no terminal
/// (the library then refuses on a protected environment, and says how to
/// pass `--confirm`).
pub(crate) fn typed_confirmation(
    env: &str,
    asks_for: Option<&str>,
    given: Option<&str>,
) -> anyhow::Result<Option<String>> {
    if let Some(g) = given {
        return Ok(Some(g.to_owned()));
    }
    let Some(expected) = asks_for else { return Ok(None) };
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return Ok(None);
    }
    {
        let mut err = std::io::stderr().lock();
        let (on, off) = if err.is_terminal() { (RED, RESET) } else { ("", "") };
        write!(err, "{on}Environment `{env}` is protected. Type `{expected}` to go ahead:{off} ")?;
        err.flush()?;
    }
    let mut line = String::new();
    stdin.lock().read_line(&mut line).context("reading the confirmation")?;
    Ok(Some(line.trim_end_matches(['\n', '\r']).to_owned()))
}

/// Prints `value` as one line of JSON on stdout.
pub(crate) fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}

/// Whether the output is JSON.
pub(crate) fn json(cli: &Cli) -> bool {
    cli.output == Output::Json
}

/// `-` for `None`.
pub(crate) fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// A plain text table: columns padded to their widest cell; columns whose
/// cells are all numbers (or `-`) are right-aligned.
#[derive(Debug, Default)]
pub(crate) struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column titles.
    pub(crate) fn new(header: &[&str]) -> Self {
        Table { header: header.iter().map(|h| (*h).to_owned()).collect(), rows: Vec::new() }
    }

    /// Adds a row.
    pub(crate) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Renders it (no trailing newline).
    pub(crate) fn render(&self) -> String {
        let n = self.header.len();
        let mut width: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        let mut numeric = vec![true; n];
        for r in &self.rows {
            for (i, c) in r.iter().enumerate().take(n) {
                width[i] = width[i].max(c.chars().count());
                // Empty cells (a totals row) do not decide the alignment.
                if !c.is_empty() {
                    numeric[i] &= c == "-" || c.trim_start_matches(['+', '-']).chars().all(|ch| ch.is_ascii_digit());
                }
            }
        }
        let line = |cells: &[String], header: bool| {
            let mut s = String::new();
            for (i, c) in cells.iter().enumerate().take(n) {
                let pad = width[i].saturating_sub(c.chars().count());
                let last = i + 1 == n;
                if numeric[i] && !header {
                    s.push_str(&" ".repeat(pad));
                    s.push_str(c);
                } else {
                    s.push_str(c);
                    if !last {
                        s.push_str(&" ".repeat(pad));
                    }
                }
                if !last {
                    s.push_str("  ");
                }
            }
            s.trim_end().to_owned()
        };
        let mut out = vec![line(&self.header, true)];
        out.extend(self.rows.iter().map(|r| line(r, false)));
        out.join("\n")
    }

    /// Prints it to stdout.
    pub(crate) fn print(&self) {
        println!("{}", self.render());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_numbers_right() {
        let mut t = Table::new(&["TOPIC", "LAG"]);
        t.row(vec!["orders".into(), "5".into()]);
        t.row(vec!["o".into(), "120".into()]);
        assert_eq!(t.render(), "TOPIC   LAG\norders    5\no       120");
    }

    #[test]
    fn a_given_confirmation_is_handed_over_without_asking() {
        let t = typed_confirmation("prod", Some("RESET prod g"), Some("RESET staging g")).expect("no io");
        assert_eq!(t.as_deref(), Some("RESET staging g"));
        // Nothing asked, nothing given: nothing is read from the terminal.
        assert_eq!(typed_confirmation("prod", None, None).expect("no io"), None);
    }
}
