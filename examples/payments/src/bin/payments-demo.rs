//! `payments-demo`: oncely's guided demonstration on the reference
//! application (run by `scripts/demo`; see `docs/demo.md`).

use std::process::ExitCode;

use clap::Parser;
use payments::demo::{self, DemoArgs};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = DemoArgs::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("payments-demo: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(demo::run(&args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("payments-demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}
