//! `auto_setup = true`: what `setup` does, run by the session and the
//! publication watch, one at a time (its own file so neither imports the
//! other).

use futures_util::future::BoxFuture;

use crate::error::CliError;

/// What `setup` does, for `auto_setup = true`: called when the slot turns out
/// missing or lost during a session (the CLI layer owns `setup`).
pub type AutoSetup = Box<dyn Fn() -> BoxFuture<'static, Result<(), CliError>> + Send + Sync>;

/// [`AutoSetup`], run by one caller at a time: the session (slot or
/// publication missing while streaming) and the publication watch (the
/// publication missing, which PostgreSQL 18 streams past) may both need it.
pub(super) struct SerialSetup {
    setup: AutoSetup,
    running: tokio::sync::Mutex<()>,
}

impl SerialSetup {
    /// Wraps `setup` so that one caller runs it at a time.
    pub(super) fn new(setup: AutoSetup) -> Self {
        SerialSetup {
            setup,
            running: tokio::sync::Mutex::new(()),
        }
    }

    /// Runs `setup` once the other caller's run, if any, finished.
    pub(super) async fn run(&self) -> Result<(), CliError> {
        let _one = self.running.lock().await;
        (self.setup)().await
    }
}
