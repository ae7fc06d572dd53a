//! Graceful shutdown: a signal every task watches, and a count of who still holds it.
//!
//! Each accept loop and connection holds a [`Drain`]. [`DrainSignal::drain`] tells them all to
//! stop accepting and finish in-flight work, then waits (up to a grace period) until every
//! `Drain` has been dropped.
//!
//! Every idle kept-alive connection watches the signal, so watching is cheap: a `Drain` is a
//! pointer and a slot number, and a watcher's waker sits in one shared table (a few dozen
//! bytes each) rather than in a waiting future inside every connection's task.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::sync::Notify;

#[derive(Debug, Default)]
struct Shared {
    draining: AtomicBool,
    /// Live [`Drain`] handles.
    handles: AtomicUsize,
    /// Wakes [`DrainSignal::drain`] when the last handle goes.
    released: Notify,
    waiters: Mutex<Waiters>,
}

/// The wakers of handles waiting for the signal, by slot.
#[derive(Debug, Default)]
struct Waiters {
    slots: Vec<Option<Waker>>,
    free: Vec<usize>,
}

impl Shared {
    fn waiters(&self) -> MutexGuard<'_, Waiters> {
        self.waiters.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The sending half: owned by `serve`.
#[derive(Debug)]
pub struct DrainSignal {
    shared: Arc<Shared>,
}

/// The watching half: cloned into every task that must finish before shutdown completes.
#[derive(Debug)]
pub struct Drain {
    shared: Arc<Shared>,
    /// This handle's waker slot, once it has waited.
    slot: Option<usize>,
    /// The waker left in that slot: a task polling again with the same waker (a connection's,
    /// on every wake) finds it there without taking the lock.
    waker: Option<Waker>,
}

/// A new signal and its first watcher.
#[must_use]
pub fn channel() -> (DrainSignal, Drain) {
    let shared = Arc::new(Shared::default());
    let drain = Drain::new(Arc::clone(&shared));
    (DrainSignal { shared }, drain)
}

impl DrainSignal {
    /// Signals every watcher and waits up to `grace` for all of them to finish.
    /// Returns whether they all finished in time.
    pub async fn drain(self, grace: Duration) -> bool {
        self.shared.draining.store(true, Ordering::SeqCst);
        let woken: Vec<Waker> = {
            let mut waiters = self.shared.waiters();
            waiters.free.clear();
            waiters.slots.drain(..).flatten().collect()
        };
        woken.into_iter().for_each(Waker::wake);
        let released = async {
            loop {
                let notified = self.shared.released.notified();
                if self.shared.handles.load(Ordering::SeqCst) == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(grace, released).await.is_ok()
    }

    /// Whether the drain has started (for `/ready`).
    #[must_use]
    pub fn is_draining(&self) -> bool {
        self.shared.draining.load(Ordering::SeqCst)
    }
}

impl Drain {
    fn new(shared: Arc<Shared>) -> Self {
        shared.handles.fetch_add(1, Ordering::SeqCst);
        Self {
            shared,
            slot: None,
            waker: None,
        }
    }

    /// Resolves once draining starts (at once if it has).
    pub async fn signaled(&mut self) {
        std::future::poll_fn(|cx| self.poll_signaled(cx)).await;
    }

    /// Ready once draining has started; otherwise the task is woken when it starts.
    pub fn poll_signaled(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.is_draining() {
            return Poll::Ready(());
        }
        if self.slot.is_some()
            && self
                .waker
                .as_ref()
                .is_some_and(|held| held.will_wake(cx.waker()))
        {
            return Poll::Pending;
        }
        self.waker = Some(cx.waker().clone());
        {
            let mut waiters = self.shared.waiters();
            let waker = cx.waker();
            match self.slot {
                Some(slot) => match waiters.slots.get_mut(slot) {
                    Some(Some(held)) if held.will_wake(waker) => {}
                    Some(held) => *held = Some(waker.clone()),
                    // The table was emptied by the signal: checked below.
                    None => {}
                },
                None => {
                    let slot = match waiters.free.pop() {
                        Some(slot) => {
                            waiters.slots[slot] = Some(waker.clone());
                            slot
                        }
                        None => {
                            waiters.slots.push(Some(waker.clone()));
                            waiters.slots.len() - 1
                        }
                    };
                    self.slot = Some(slot);
                }
            }
        }
        // The signal sets the flag before it takes the table: seen here if the table was
        // taken before this waker went in.
        if self.is_draining() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Whether draining has started.
    #[must_use]
    pub fn is_draining(&self) -> bool {
        self.shared.draining.load(Ordering::SeqCst)
    }
}

impl Clone for Drain {
    fn clone(&self) -> Self {
        Self::new(Arc::clone(&self.shared))
    }
}

impl Drop for Drain {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take()
            && !self.is_draining()
        {
            let mut waiters = self.shared.waiters();
            if let Some(held) = waiters.slots.get_mut(slot) {
                *held = None;
                waiters.free.push(slot);
            }
        }
        if self.shared.handles.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.shared.released.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn waiters_wake_on_the_signal_and_the_signal_waits_for_every_handle() {
        let (signal, drain) = channel();
        let mut tasks = Vec::new();
        for _ in 0..3 {
            let mut drain = drain.clone();
            tasks.push(tokio::spawn(async move {
                drain.signaled().await;
                // Finishing takes a while after the signal.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }));
        }
        drop(drain);
        tokio::task::yield_now().await;
        assert!(!signal.is_draining());
        let clock = crate::clock::Clock::new();
        let start = clock.now();
        assert!(signal.drain(Duration::from_secs(5)).await);
        assert_eq!(clock.now() - start, Duration::from_secs(1));
        for task in tasks {
            task.await.unwrap();
        }
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_handle_kept_past_the_grace_period_makes_the_drain_late() {
        let (signal, drain) = channel();
        let kept = drain.clone();
        drop(drain);
        assert!(!signal.drain(Duration::from_secs(2)).await);
        drop(kept);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_watcher_polled_again_with_its_waker_is_still_woken_by_the_signal() {
        struct Count(AtomicUsize);
        impl std::task::Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let (signal, mut drain) = channel();
        let count = Arc::new(Count(0.into()));
        let waker = Waker::from(Arc::clone(&count));
        let mut cx = Context::from_waker(&waker);
        // The second and third polls find the waker already in its slot.
        for _ in 0..3 {
            assert!(drain.poll_signaled(&mut cx).is_pending());
        }
        let draining = tokio::spawn(signal.drain(Duration::from_secs(5)));
        tokio::task::yield_now().await;
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert!(drain.poll_signaled(&mut cx).is_ready());
        drop(drain);
        assert!(draining.await.unwrap());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn slots_of_dropped_handles_are_reused_and_a_late_watcher_sees_the_signal() {
        let (signal, drain) = channel();
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        for _ in 0..100 {
            let mut watcher = drain.clone();
            assert!(watcher.poll_signaled(&mut cx).is_pending());
        }
        assert_eq!(signal.shared.waiters().slots.len(), 1);
        let mut late = drain.clone();
        drop(drain);
        let draining = tokio::spawn(signal.drain(Duration::from_secs(5)));
        tokio::task::yield_now().await;
        assert!(late.poll_signaled(&mut cx).is_ready());
        drop(late);
        assert!(draining.await.unwrap());
    }
}
