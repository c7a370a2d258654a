//! One shutdown signal with one meaning, after mini-redis's `Shutdown`: a
//! [`ShutdownTrigger`] held by whoever may stop the process (the signal
//! handler of `run`, a test), and any number of [`Shutdown`] listeners.
//! Shutdown is requested when the trigger fires **or when it is dropped**: a
//! listener never mistakes a vanished trigger for "keep going", and never
//! spins on it either ([`Shutdown::requested`] stays resolved).
//!
//! Whoever holds the trigger must keep it for as long as the process should
//! run (the signal handler of `run` keeps it even when it cannot listen for a
//! signal).

use tokio::sync::watch;

/// Fires the shutdown; dropping it fires it too.
#[derive(Debug)]
pub struct ShutdownTrigger {
    tx: watch::Sender<bool>,
}

/// Listens for the shutdown. Clones listen to the same trigger.
#[derive(Debug, Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

impl ShutdownTrigger {
    /// A trigger and its first listener.
    pub fn new() -> (ShutdownTrigger, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (ShutdownTrigger { tx }, Shutdown { rx })
    }

    /// Requests the shutdown (idempotent).
    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }

    /// Another listener.
    pub fn subscribe(&self) -> Shutdown {
        Shutdown {
            rx: self.tx.subscribe(),
        }
    }
}

impl Shutdown {
    /// A listener whose trigger is already gone: shutdown is requested.
    /// For callers that run something once, without a way to stop it early.
    pub fn requested_now() -> Shutdown {
        let (_, rx) = watch::channel(true);
        Shutdown { rx }
    }

    /// Whether shutdown was requested (triggered, or the trigger dropped).
    pub fn is_requested(&self) -> bool {
        *self.rx.borrow() || self.rx.has_changed().is_err()
    }

    /// Resolves once shutdown is requested; at once if it already was.
    /// Cancel-safe, and cheap to poll again after it resolved.
    pub async fn requested(&mut self) {
        // `Err` means the trigger was dropped: that is a shutdown too.
        let _ = self.rx.wait_for(|stop| *stop).await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    async fn resolves(shutdown: &mut Shutdown) -> bool {
        tokio::time::timeout(Duration::from_millis(50), shutdown.requested())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn trigger_and_drop_mean_the_same() {
        let (trigger, mut a) = ShutdownTrigger::new();
        let mut b = trigger.subscribe();
        assert!(!a.is_requested());
        assert!(!resolves(&mut a).await, "resolved before the trigger");
        trigger.trigger();
        assert!(a.is_requested() && resolves(&mut a).await);
        // Already requested: resolves again at once, every time.
        assert!(resolves(&mut a).await);
        assert!(resolves(&mut b).await);

        let (trigger, mut c) = ShutdownTrigger::new();
        drop(trigger);
        assert!(c.is_requested(), "a dropped trigger is a shutdown");
        assert!(resolves(&mut c).await);
        assert!(resolves(&mut c).await, "and stays one");
        assert!(Shutdown::requested_now().is_requested());
    }
}
