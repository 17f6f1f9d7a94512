//! Process-wide signals: shutdown (SIGINT, SIGTERM) and reload (SIGHUP).

use std::future::Future;

use tokio::signal::unix::{Signal, SignalKind, signal as unix_signal};

/// A future that resolves on the first SIGINT (Ctrl-C) or SIGTERM.
///
/// The handlers are installed when this is called, not when the future is first polled: a
/// signal that arrives while the process is still starting (before anything awaits the
/// future) must not fall through to the default action, which kills the process without
/// letting it stop its children or drain requests. Call it from within the runtime, at start.
///
/// If a handler cannot be installed (only possible without a signal driver), that signal is
/// ignored here rather than treated as an immediate shutdown.
pub fn signal() -> impl Future<Output = ()> + Send + 'static {
    let interrupt = unix_signal(SignalKind::interrupt()).ok();
    let terminate = unix_signal(SignalKind::terminate()).ok();
    async move {
        let interrupt = async {
            match interrupt {
                Some(mut stream) => stream.recv().await,
                None => std::future::pending().await,
            }
        };
        let terminate = async {
            match terminate {
                Some(mut stream) => stream.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = interrupt => tracing::info!("SIGINT received, shutting down"),
            _ = terminate => tracing::info!("SIGTERM received, shutting down"),
        }
    }
}

/// SIGHUP, the conventional "reload your configuration" (nginx, HAProxy, systemd's
/// `ExecReload`): each [`Hangups::recv`] resolves on the next one.
///
/// Installed when created, like [`signal`]: until then SIGHUP's default action ends the
/// process at once. Signals that arrive while nobody waits are coalesced into one.
pub struct Hangups(Option<Signal>);

/// Installs the SIGHUP handler. Call it from within the runtime, at start.
pub fn hangups() -> Hangups {
    Hangups(unix_signal(SignalKind::hangup()).ok())
}

impl Hangups {
    /// Waits for the next SIGHUP; `false` if none can come (no handler could be installed).
    pub async fn recv(&mut self) -> bool {
        match &mut self.0 {
            Some(stream) => stream.recv().await.is_some(),
            None => false,
        }
    }
}
