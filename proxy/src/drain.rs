//! Graceful shutdown: a signal every task watches, and a count of who still holds it.
//!
//! Each accept loop and connection holds a [`Drain`]. [`DrainSignal::drain`] tells them all to
//! stop accepting and finish in-flight work, then waits (up to a grace period) until every
//! `Drain` has been dropped.

use std::time::Duration;

use tokio::sync::watch;

/// The sending half: owned by `serve`.
#[derive(Debug)]
pub struct DrainSignal {
    tx: watch::Sender<bool>,
}

/// The watching half: cloned into every task that must finish before shutdown completes.
#[derive(Clone, Debug)]
pub struct Drain {
    rx: watch::Receiver<bool>,
}

/// A new signal and its first watcher.
#[must_use]
pub fn channel() -> (DrainSignal, Drain) {
    let (tx, rx) = watch::channel(false);
    (DrainSignal { tx }, Drain { rx })
}

impl DrainSignal {
    /// Signals every watcher and waits up to `grace` for all of them to finish.
    /// Returns whether they all finished in time.
    pub async fn drain(self, grace: Duration) -> bool {
        self.tx.send_replace(true);
        tokio::time::timeout(grace, self.tx.closed()).await.is_ok()
    }

    /// Whether the drain has started (for `/ready`).
    #[must_use]
    pub fn is_draining(&self) -> bool {
        *self.tx.borrow()
    }
}

impl Drain {
    /// Resolves once draining starts (at once if it has).
    pub async fn signaled(&mut self) {
        // An error means the signal was dropped without draining: treat it as a drain too.
        let _ = self.rx.wait_for(|draining| *draining).await;
    }

    /// Whether draining has started.
    #[must_use]
    pub fn is_draining(&self) -> bool {
        *self.rx.borrow()
    }
}
