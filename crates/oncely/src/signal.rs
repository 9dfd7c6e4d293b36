//! Stopping on SIGTERM, for the runtimes that offer it (the consumer and the
//! processor): the signal cancels the same token a caller would.

use tokio_util::sync::CancellationToken;

/// Spawns a task that cancels `token` on SIGTERM, logging `message`; the
/// task ends when the token is cancelled otherwise. Does nothing where there
/// is no SIGTERM (not Unix).
pub(crate) fn cancel_on_sigterm(token: CancellationToken, message: &'static str) {
    tokio::spawn(async move {
        #[cfg(unix)]
        if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {
                    tracing::info!("{message}");
                    token.cancel();
                }
                _ = token.cancelled() => {}
            }
        }
    });
}
