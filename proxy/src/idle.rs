//! Idle deadlines for parked connections: one coarse sweep per listener instead of a timer per
//! connection.
//!
//! Every kept-alive HTTP/1 connection waiting for its next request must close at its idle
//! timeout, and there can be tens of thousands of them. A tokio timer per connection costs an
//! allocation of its own (the timer entry, about 100 bytes, boxed because it is pinned) on
//! top of the connection's task. Here a parked connection's deadline is an entry in one shared
//! table (its deadline and its task's waker, 24 bytes), and one sweep task per table wakes the
//! connections whose deadline has passed. The sweep runs every [`IdleTimers::resolution`] (an
//! eighth of the idle timeout, between 10 ms and 1 s) and only while the table holds an entry,
//! so a connection closes at most one resolution after its idle timeout and an idle proxy does
//! not wake at all. The deadlines of busy connections (header reads, stalled bodies) keep
//! their exact timers: those wait on a peer and are few.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use conduit_core::time::Instant;

use crate::clock::Clock;

/// The finest and coarsest sweep periods.
const RESOLUTION: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));

/// The idle deadlines of one listener's parked connections.
#[derive(Debug)]
pub(crate) struct IdleTimers {
    clock: Clock,
    resolution: Duration,
    table: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    slots: Vec<Slot>,
    /// Indexes of free slots, reused before the table grows.
    free: Vec<u32>,
    /// Occupied slots.
    live: usize,
    /// A sweep task is running.
    sweeping: bool,
}

#[derive(Debug)]
struct Slot {
    deadline: Instant,
    /// The task to wake at the deadline; taken when the sweep wakes it.
    waker: Option<Waker>,
}

/// A connection's entry in the table; dropping it frees the slot.
#[derive(Debug)]
pub(crate) struct IdleTimer {
    timers: Arc<IdleTimers>,
    slot: u32,
}

impl IdleTimers {
    /// A table for connections with the given idle timeout.
    pub(crate) fn new(clock: Clock, idle_timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            clock,
            resolution: (idle_timeout / 8).clamp(RESOLUTION.0, RESOLUTION.1),
            table: Mutex::new(Table::default()),
        })
    }

    /// How late after its deadline a parked connection may be woken.
    #[cfg(test)]
    pub(crate) fn resolution(&self) -> Duration {
        self.resolution
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Ready once `deadline` has passed. Otherwise the task's waker goes into `entry` (made on
    /// first use), and the sweep wakes the task once the deadline has passed. The entry is
    /// released when ready.
    pub(crate) fn poll_expired(
        self: &Arc<Self>,
        cx: &mut Context<'_>,
        entry: &mut Option<IdleTimer>,
        deadline: Instant,
    ) -> Poll<()> {
        if self.clock.now() >= deadline {
            *entry = None;
            return Poll::Ready(());
        }
        let mut table = self.table();
        match entry {
            Some(timer) => {
                let slot = &mut table.slots[timer.slot as usize];
                slot.deadline = deadline;
                match &mut slot.waker {
                    Some(held) if held.will_wake(cx.waker()) => {}
                    held => *held = Some(cx.waker().clone()),
                }
            }
            None => {
                let waker = Some(cx.waker().clone());
                let slot = match table.free.pop() {
                    Some(slot) => {
                        table.slots[slot as usize] = Slot { deadline, waker };
                        slot
                    }
                    None => {
                        let slot = u32::try_from(table.slots.len())
                            .expect("fewer idle connections than u32::MAX");
                        table.slots.push(Slot { deadline, waker });
                        slot
                    }
                };
                table.live += 1;
                *entry = Some(IdleTimer {
                    timers: Arc::clone(self),
                    slot,
                });
            }
        }
        if !table.sweeping {
            table.sweeping = true;
            tokio::spawn(sweep(Arc::clone(self)));
        }
        Poll::Pending
    }
}

impl Drop for IdleTimer {
    fn drop(&mut self) {
        let mut table = self.timers.table();
        table.slots[self.slot as usize].waker = None;
        table.free.push(self.slot);
        table.live -= 1;
    }
}

/// Wakes the connections whose deadline has passed, every resolution, until the table is
/// empty.
async fn sweep(timers: Arc<IdleTimers>) {
    let mut due = Vec::new();
    loop {
        tokio::time::sleep(timers.resolution).await;
        let now = timers.clock.now();
        {
            let mut table = timers.table();
            if table.live == 0 {
                table.sweeping = false;
                // Give back a table grown by a burst of connections.
                table.slots = Vec::new();
                table.free = Vec::new();
                return;
            }
            due.extend(
                table
                    .slots
                    .iter_mut()
                    .filter(|slot| slot.deadline <= now)
                    .filter_map(|slot| slot.waker.take()),
            );
        }
        // Woken outside the lock: a woken task may poll (and lock) at once.
        due.drain(..).for_each(Waker::wake);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn poll(
        timers: &Arc<IdleTimers>,
        entry: &mut Option<IdleTimer>,
        deadline: Instant,
    ) -> Poll<()> {
        let waker = futures_util::task::noop_waker();
        timers.poll_expired(&mut Context::from_waker(&waker), entry, deadline)
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_parked_connection_wakes_within_one_resolution_of_its_deadline() {
        let clock = Clock::new();
        let timers = IdleTimers::new(clock, Duration::from_secs(120));
        assert_eq!(timers.resolution(), Duration::from_secs(1));
        let deadline = clock.now() + Duration::from_millis(2_500);
        let mut entry = None;
        let woken = std::future::poll_fn(|cx| timers.poll_expired(cx, &mut entry, deadline));
        woken.await;
        let late = clock.now() - deadline;
        assert!(
            late <= timers.resolution(),
            "woken {late:?} after the deadline"
        );
        assert!(
            entry.is_none(),
            "the entry is released once the deadline has passed"
        );
        assert_eq!(timers.table().live, 0);
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn slots_are_reused_and_the_sweep_stops_when_the_table_empties() {
        let clock = Clock::new();
        let timers = IdleTimers::new(clock, Duration::from_millis(80));
        assert_eq!(timers.resolution(), Duration::from_millis(10));
        let far = clock.now() + Duration::from_secs(60);
        for _ in 0..100 {
            let mut entry = None;
            assert!(poll(&timers, &mut entry, far).is_pending());
            assert!(poll(&timers, &mut entry, far).is_pending(), "polled again");
        }
        assert_eq!(
            timers.table().slots.len(),
            1,
            "dropped entries free their slot"
        );
        assert_eq!(timers.table().live, 0);
        // The sweep notices the empty table and ends, giving the table's memory back.
        tokio::time::sleep(timers.resolution() * 2).await;
        let table = timers.table();
        assert!(!table.sweeping);
        assert_eq!(table.slots.capacity(), 0);
    }

    /// Counts its wakes.
    struct Count(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn only_connections_past_their_deadline_are_woken() {
        let clock = Clock::new();
        let timers = IdleTimers::new(clock, Duration::from_secs(8));
        let (soon, late) = (Arc::new(Count(0.into())), Arc::new(Count(0.into())));
        let (mut soon_entry, mut late_entry) = (None, None);
        for (count, entry, after) in [(&soon, &mut soon_entry, 1), (&late, &mut late_entry, 10)] {
            let waker = Waker::from(Arc::clone(count));
            let deadline = clock.now() + Duration::from_secs(after);
            let polled = timers.poll_expired(&mut Context::from_waker(&waker), entry, deadline);
            assert!(polled.is_pending());
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        let woken = |count: &Count| count.0.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!((woken(&soon), woken(&late)), (1, 0));
        // Moving the later deadline further keeps it asleep past its first deadline.
        let waker = Waker::from(Arc::clone(&late));
        let further = clock.now() + Duration::from_secs(20);
        let polled =
            timers.poll_expired(&mut Context::from_waker(&waker), &mut late_entry, further);
        assert!(polled.is_pending());
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(woken(&late), 0);
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert_eq!(woken(&late), 1);
    }
}
