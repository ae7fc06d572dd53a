//! Sliding windows over explicit time: request outcomes and latencies over the last N seconds.

use core::time::Duration;

use super::{Counter, LatencyHistogram};
use crate::classify::Outcome;
use crate::time::Instant;

/// The default window length: 10 s, the window of Linkerd's success-rate failure accrual (a
/// ten-bucket ring), long enough to smooth single slow requests and short enough to show a
/// change within seconds.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(10);

/// The default number of slots: one per second of [`DEFAULT_WINDOW`] (Linkerd's success-rate
/// ring has ten buckets too), so data leaves the window at most 1 s late.
pub const DEFAULT_SLOTS: u32 = 10;

/// The validated shape of a sliding window: its length, cut into equal slots.
///
/// A window is a ring of `slots` slots, each covering `window / slots` of time (rounded down to
/// the nanosecond). Data is forgotten a whole slot at a time: a sample of age `a` is always
/// counted while `a < window - slot`, never once `a >= window`, and in between it is counted
/// until its slot rotates out. More slots make the edge sharper and cost memory, one
/// [`LatencyHistogram`] (224 bytes) or two counters per slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WindowConfig {
    slot_nanos: u64,
    slots: u32,
}

impl WindowConfig {
    /// The most slots a window may have. Each is allocated up front; 1,024 gives a 10 s window
    /// 10 ms resolution and caps a [`LatencyWindow`] at 224 KiB.
    pub const MAX_SLOTS: u32 = 1_024;

    /// The shortest slot allowed. Sub-millisecond slots buy no accuracy for request metrics
    /// and would make every rotation touch many slots.
    pub const MIN_SLOT: Duration = Duration::from_millis(1);

    /// The longest window allowed: 30 days, the longest SLO window in common use (the SRE
    /// workbook's), far below where nanosecond slot arithmetic could overflow `u64`.
    pub const MAX_WINDOW: Duration = Duration::from_secs(30 * 24 * 60 * 60);

    /// A window of length `window` cut into `slots` slots.
    ///
    /// # Errors
    ///
    /// [`InvalidWindow`] if `window` is zero or longer than [`MAX_WINDOW`](Self::MAX_WINDOW),
    /// if `slots` is outside `1..=`[`MAX_SLOTS`](Self::MAX_SLOTS), or if the slots would be
    /// shorter than [`MIN_SLOT`](Self::MIN_SLOT).
    pub fn try_new(window: Duration, slots: u32) -> Result<Self, InvalidWindow> {
        if window.is_zero() {
            return Err(InvalidWindow::ZeroWindow);
        }
        if window > Self::MAX_WINDOW {
            return Err(InvalidWindow::WindowTooLong {
                window,
                max: Self::MAX_WINDOW,
            });
        }
        if !(1..=Self::MAX_SLOTS).contains(&slots) {
            return Err(InvalidWindow::SlotsOutOfRange {
                slots,
                max: Self::MAX_SLOTS,
            });
        }
        let window_nanos =
            u64::try_from(window.as_nanos()).map_err(|_| InvalidWindow::WindowTooLong {
                window,
                max: Self::MAX_WINDOW,
            })?;
        let slot_nanos = window_nanos / u64::from(slots);
        let slot = Duration::from_nanos(slot_nanos);
        if slot < Self::MIN_SLOT {
            return Err(InvalidWindow::SlotTooShort {
                slots,
                slot,
                min: Self::MIN_SLOT,
            });
        }
        Ok(Self { slot_nanos, slots })
    }

    /// The effective window length: `slots * slot`, which is the requested length rounded
    /// down to a whole number of nanoseconds per slot.
    #[must_use]
    pub const fn window(&self) -> Duration {
        Duration::from_nanos(self.slot_nanos * self.slots as u64)
    }

    /// The length of one slot.
    #[must_use]
    pub const fn slot(&self) -> Duration {
        Duration::from_nanos(self.slot_nanos)
    }

    /// The number of slots.
    #[must_use]
    pub const fn slots(&self) -> u32 {
        self.slots
    }
}

impl Default for WindowConfig {
    /// [`DEFAULT_WINDOW`] in [`DEFAULT_SLOTS`] slots of one second.
    fn default() -> Self {
        let slot_nanos = 1_000_000_000;
        debug_assert_eq!(DEFAULT_WINDOW, Duration::from_nanos(slot_nanos * 10));
        Self {
            slot_nanos,
            slots: DEFAULT_SLOTS,
        }
    }
}

/// Why a [`WindowConfig`] was rejected. Each message starts with the offending field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidWindow {
    /// The window length was zero.
    #[error("window: must be greater than zero")]
    ZeroWindow,
    /// The window was longer than [`WindowConfig::MAX_WINDOW`].
    #[error("window: {window:?} exceeds the maximum of {max:?}")]
    WindowTooLong {
        /// The requested length.
        window: Duration,
        /// The maximum.
        max: Duration,
    },
    /// The slot count was zero or above [`WindowConfig::MAX_SLOTS`].
    #[error("slots: {slots} is outside 1..={max}")]
    SlotsOutOfRange {
        /// The requested slot count.
        slots: u32,
        /// The maximum.
        max: u32,
    },
    /// The slots would be shorter than [`WindowConfig::MIN_SLOT`].
    #[error("slots: {slots} slots would each last {slot:?}, under the minimum of {min:?}")]
    SlotTooShort {
        /// The requested slot count.
        slots: u32,
        /// The slot length it implies.
        slot: Duration,
        /// The minimum slot length.
        min: Duration,
    },
}

/// What a ring slot holds.
trait Slot: Default {
    /// Checks the slot's own consistency (see the `assert_invariants` functions).
    fn assert_invariants(&self);
}

/// The ring buffer both windows share: `slots` slots indexed by *epoch*, the number of whole
/// slot lengths since the time origin. Epoch `e` lives at index `e % slots`.
///
/// Rotation is lazy: nothing happens between inputs, and each mutation first clears the slots
/// whose epochs have passed (at most all of them, so it is bounded). Reads compute which slots
/// are still inside the window without rotating, so they take `&self`.
#[derive(Clone, Debug)]
struct Ring<T> {
    slots: Box<[T]>,
    /// `slots.len()` as a `u64`, for epoch arithmetic.
    len: u64,
    slot_nanos: u64,
    /// The epoch of `last`: the newest slot.
    head: u64,
    /// The latest time seen. Earlier inputs are treated as arriving at this time.
    last: Instant,
}

impl<T: Slot> Ring<T> {
    fn new(config: &WindowConfig, now: Instant) -> Self {
        let slots: Box<[T]> = (0..config.slots).map(|_| T::default()).collect();
        Self {
            slots,
            len: u64::from(config.slots),
            slot_nanos: config.slot_nanos,
            head: now.as_nanos() / config.slot_nanos,
            last: now,
        }
    }

    /// `now`, or the latest time already seen if the caller's clock stepped back.
    fn clamp(&self, now: Instant) -> Instant {
        now.max(self.last)
    }

    fn epoch(&self, time: Instant) -> u64 {
        time.as_nanos() / self.slot_nanos
    }

    fn index(&self, epoch: u64) -> usize {
        #[expect(
            clippy::cast_possible_truncation,
            reason = "the remainder is below the slot count, at most MAX_SLOTS"
        )]
        let index = (epoch % self.len) as usize;
        index
    }

    /// Moves the head to `now`, clearing every slot that left the window, and returns the
    /// head slot. After a gap of a whole window or more, everything is cleared.
    fn advance(&mut self, now: Instant) -> &mut T {
        let now = self.clamp(now);
        let epoch = self.epoch(now);
        if epoch - self.head >= self.len {
            self.slots.fill_with(T::default);
        } else {
            for passed in self.head + 1..=epoch {
                let index = self.index(passed);
                self.slots[index] = T::default();
            }
        }
        self.head = epoch;
        self.last = now;
        let index = self.index(epoch);
        &mut self.slots[index]
    }

    /// The slots inside the window at `now`, oldest first, without rotating.
    ///
    /// The window at `now` holds epochs `epoch(now) - slots + 1 ..= epoch(now)`; the ring
    /// stores `head - slots + 1 ..= head`, and `head <= epoch(now)`, so the live slots are the
    /// stored ones from the later of the two starts.
    fn live(&self, now: Instant) -> impl Iterator<Item = &T> {
        let oldest = (self.epoch(self.clamp(now)) + 1).saturating_sub(self.len);
        (oldest..=self.head).map(|epoch| &self.slots[self.index(epoch)])
    }

    /// The nanosecond at which the oldest slot of the window at `now` starts (clamped `now`).
    fn window_start_nanos(&self, now: Instant) -> u64 {
        (self.epoch(now) + 1).saturating_sub(self.len) * self.slot_nanos
    }

    /// Checks the ring's structure and its head slot.
    ///
    /// Only the head is checked: it is the only slot mutations write, apart from clearing,
    /// and every other slot was checked while it was the head or has been cleared since.
    fn assert_invariants(&self) {
        assert_eq!(
            u64::try_from(self.slots.len()).ok(),
            Some(self.len),
            "ring length drifted"
        );
        assert!((1..=u64::from(WindowConfig::MAX_SLOTS)).contains(&self.len));
        assert!(Duration::from_nanos(self.slot_nanos) >= WindowConfig::MIN_SLOT);
        assert_eq!(
            self.head,
            self.epoch(self.last),
            "head must be the slot of the latest time"
        );
        self.slots[self.index(self.head)].assert_invariants();
    }
}

/// Success and failure counts in one slot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct OutcomeCounts {
    successes: Counter,
    failures: Counter,
}

impl Slot for OutcomeCounts {
    fn assert_invariants(&self) {
        // Two independent saturating counters: nothing can be inconsistent.
    }
}

impl Slot for LatencyHistogram {
    fn assert_invariants(&self) {
        Self::assert_invariants(self);
    }
}

/// Counts of successful and failed requests over a sliding window, for success rate and
/// requests per second "over the last 10 s".
///
/// Feed it one [`Outcome`] per finished request ([`record`](Self::record)) and read
/// [`stats`](Self::stats) when needed; see the [module docs](super) for the drive loop. Time
/// only moves forwards: an input earlier than one already seen is treated as happening at
/// that latest time.
#[derive(Clone, Debug)]
pub struct RequestWindow {
    ring: Ring<OutcomeCounts>,
    /// When the window started counting, so that rates are not diluted by time before it
    /// existed.
    origin: Instant,
}

impl RequestWindow {
    /// An empty window that starts counting at `now`.
    #[must_use]
    pub fn new(config: &WindowConfig, now: Instant) -> Self {
        let window = Self {
            ring: Ring::new(config, now),
            origin: now,
        };
        #[cfg(debug_assertions)]
        window.assert_invariants();
        window
    }

    /// Counts one finished request with the given outcome at `now`.
    pub fn record(&mut self, now: Instant, outcome: Outcome) {
        let slot = self.ring.advance(now);
        match outcome {
            Outcome::Success => slot.successes.incr(),
            Outcome::Failure => slot.failures.incr(),
        }
        #[cfg(debug_assertions)]
        self.assert_invariants();
    }

    /// Forgets every count: the window starts counting afresh at `now` (a later time than any
    /// seen, or the latest seen). Allocates nothing.
    pub fn clear(&mut self, now: Instant) {
        let now = self.ring.clamp(now);
        self.ring.slots.fill_with(OutcomeCounts::default);
        self.ring.head = self.ring.epoch(now);
        self.ring.last = now;
        self.origin = now;
        #[cfg(debug_assertions)]
        self.assert_invariants();
    }

    /// The counts inside the window at `now`, and the time span they cover.
    ///
    /// The span is what a rate should divide by: from the later of the window's oldest slot
    /// start and the window's creation, to `now`, but at least one slot. Dividing by the time
    /// actually covered, rather than the full window length, keeps a steady load reading
    /// steady instead of dipping by up to one slot's share after every rotation, and keeps
    /// rates honest in the first seconds after creation.
    #[must_use]
    pub fn stats(&self, now: Instant) -> RequestStats {
        let now = self.ring.clamp(now);
        let (successes, failures) = self.ring.live(now).fold((0u64, 0u64), |(s, f), slot| {
            (
                s.saturating_add(slot.successes.value()),
                f.saturating_add(slot.failures.value()),
            )
        });
        let start = self
            .ring
            .window_start_nanos(now)
            .max(self.origin.as_nanos());
        let covered = now
            .as_nanos()
            .saturating_sub(start)
            .max(self.ring.slot_nanos);
        RequestStats {
            successes,
            failures,
            span: Duration::from_nanos(covered),
        }
    }

    /// The fraction of requests in the window at `now` that succeeded, or `None` if there
    /// were none. Shorthand for `self.stats(now).success_rate()`.
    #[must_use]
    pub fn success_rate(&self, now: Instant) -> Option<f64> {
        self.stats(now).success_rate()
    }

    /// Requests per second over the window at `now`. Shorthand for
    /// `self.stats(now).requests_per_second()`.
    #[must_use]
    pub fn requests_per_second(&self, now: Instant) -> f64 {
        self.stats(now).requests_per_second()
    }

    /// The effective window length.
    #[must_use]
    pub fn window(&self) -> Duration {
        Duration::from_nanos(self.ring.slot_nanos * self.ring.len)
    }

    /// Checks the window's internal consistency; called after every mutation in debug builds.
    ///
    /// # Panics
    ///
    /// If the ring's head does not match the latest time seen, its size drifted, or the
    /// window claims to have started after the latest input.
    pub fn assert_invariants(&self) {
        self.ring.assert_invariants();
        assert!(
            self.origin <= self.ring.last,
            "the window cannot start after its latest input"
        );
    }
}

/// Request counts over a window, as plain data (see [`RequestWindow::stats`]).
///
/// Decisions (a breaker's success-rate threshold) should compare the integer counts; the
/// float accessors are for display.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RequestStats {
    /// Requests classified as successes.
    pub successes: u64,
    /// Requests classified as failures.
    pub failures: u64,
    /// The time the counts cover; never zero (at least one slot).
    pub span: Duration,
}

impl RequestStats {
    /// All requests counted (saturating).
    #[must_use]
    pub const fn total(&self) -> u64 {
        self.successes.saturating_add(self.failures)
    }

    /// Successes over all requests, in `0.0..=1.0`, or `None` if there were no requests.
    #[must_use]
    pub fn success_rate(&self) -> Option<f64> {
        let total = self.total();
        (total > 0).then(|| self.successes as f64 / total as f64)
    }

    /// All requests divided by the covered span, in requests per second.
    #[must_use]
    pub fn requests_per_second(&self) -> f64 {
        let seconds = self.span.as_secs_f64();
        if seconds > 0.0 {
            self.total() as f64 / seconds
        } else {
            0.0
        }
    }
}

/// Latency histograms over a sliding window, for "p50/p95/p99 over the last 10 s".
///
/// A ring of [`LatencyHistogram`]s, one per slot; [`snapshot`](Self::snapshot) merges the
/// slots still inside the window. Time handling is as for [`RequestWindow`].
#[derive(Clone, Debug)]
pub struct LatencyWindow {
    ring: Ring<LatencyHistogram>,
}

impl LatencyWindow {
    /// An empty window that starts at `now`.
    #[must_use]
    pub fn new(config: &WindowConfig, now: Instant) -> Self {
        let window = Self {
            ring: Ring::new(config, now),
        };
        #[cfg(debug_assertions)]
        window.assert_invariants();
        window
    }

    /// Records the latency of a request that finished at `now`.
    pub fn record(&mut self, now: Instant, latency: Duration) {
        self.ring.advance(now).record(latency);
        #[cfg(debug_assertions)]
        self.assert_invariants();
    }

    /// All latencies recorded inside the window at `now`, merged into one histogram.
    ///
    /// Costs one merge (26 additions) per slot; no allocation.
    #[must_use]
    pub fn snapshot(&self, now: Instant) -> LatencyHistogram {
        self.ring
            .live(now)
            .fold(LatencyHistogram::new(), |mut merged, slot| {
                merged.merge(slot);
                merged
            })
    }

    /// The effective window length.
    #[must_use]
    pub fn window(&self) -> Duration {
        Duration::from_nanos(self.ring.slot_nanos * self.ring.len)
    }

    /// Checks the window's internal consistency; called after every mutation in debug builds.
    ///
    /// # Panics
    ///
    /// If the ring's head does not match the latest time seen, its size drifted, or the
    /// histogram being written is inconsistent.
    pub fn assert_invariants(&self) {
        self.ring.assert_invariants();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::ms;
    use proptest::prelude::*;

    const T0: Instant = Instant::ZERO;

    fn ten_by_ten() -> WindowConfig {
        WindowConfig::try_new(ms(10_000), 10).unwrap()
    }

    #[test]
    fn config_rejects_bad_shapes_naming_the_field() {
        let cases = [
            (
                WindowConfig::try_new(Duration::ZERO, 10),
                "window: must be greater than zero",
            ),
            (
                WindowConfig::try_new(Duration::from_secs(31 * 24 * 3600), 10),
                "window: 2678400s exceeds the maximum of 2592000s",
            ),
            (
                WindowConfig::try_new(ms(10_000), 0),
                "slots: 0 is outside 1..=1024",
            ),
            (
                WindowConfig::try_new(ms(10_000), 1_025),
                "slots: 1025 is outside 1..=1024",
            ),
            (
                WindowConfig::try_new(ms(100), 1_000),
                "slots: 1000 slots would each last 100µs, under the minimum of 1ms",
            ),
        ];
        for (result, message) in cases {
            assert_eq!(result.unwrap_err().to_string(), message);
        }
    }

    #[test]
    fn config_rounds_slots_down_to_whole_nanoseconds() {
        let config = WindowConfig::try_new(ms(10_000), 3).unwrap();
        assert_eq!(config.slot(), Duration::from_nanos(3_333_333_333));
        assert_eq!(config.window(), Duration::from_nanos(9_999_999_999));
        assert_eq!(config.slots(), 3);
        let config = WindowConfig::default();
        assert_eq!(
            (config.window(), config.slot()),
            (DEFAULT_WINDOW, ms(1_000))
        );
        assert_eq!(
            WindowConfig::try_new(ms(1), 1).unwrap().slot(),
            WindowConfig::MIN_SLOT
        );
    }

    #[test]
    fn clear_forgets_everything_and_restarts_the_span() {
        let mut w = RequestWindow::new(&ten_by_ten(), T0);
        for i in 0..50 {
            w.record(T0 + ms(i * 100), Outcome::Failure);
        }
        w.clear(T0 + ms(5_000));
        let stats = w.stats(T0 + ms(5_500));
        assert_eq!((stats.successes, stats.failures), (0, 0));
        assert_eq!(
            stats.span,
            ms(1_000),
            "the span restarts (at least one slot)"
        );
        w.record(T0 + ms(5_600), Outcome::Success);
        assert_eq!(w.stats(T0 + ms(5_600)).successes, 1);
        // A clear at an earlier time than already seen happens at the latest time seen.
        w.clear(T0);
        assert_eq!(w.stats(T0 + ms(5_600)).total(), 0);
    }

    #[test]
    fn counts_outcomes_and_rates() {
        let mut w = RequestWindow::new(&ten_by_ten(), T0);
        for i in 1..=2_000 {
            let outcome = if i % 10 == 0 {
                Outcome::Failure
            } else {
                Outcome::Success
            };
            w.record(T0 + ms(i), outcome);
        }
        let now = T0 + ms(2_000);
        let stats = w.stats(now);
        assert_eq!(
            (stats.successes, stats.failures, stats.total()),
            (1_800, 200, 2_000)
        );
        assert_eq!(stats.success_rate(), Some(0.9));
        // The window is two seconds old: 2,000 requests in 2 s, not in 10 s.
        assert_eq!(stats.span, ms(2_000));
        assert_eq!(stats.requests_per_second(), 1_000.0);
        assert_eq!(w.success_rate(now), Some(0.9));
        assert_eq!(w.requests_per_second(now), 1_000.0);
        // Within the first slot the span is one slot: rates start low, never spike.
        let mut young = RequestWindow::new(&ten_by_ten(), T0);
        young.record(T0 + ms(1), Outcome::Success);
        assert_eq!(young.stats(T0 + ms(1)).span, ms(1_000));
        assert_eq!(young.requests_per_second(T0 + ms(1)), 1.0);
    }

    #[test]
    fn empty_window_has_no_success_rate_and_zero_rate() {
        let w = RequestWindow::new(&ten_by_ten(), T0 + ms(5));
        let stats = w.stats(T0 + ms(5));
        assert_eq!(stats.success_rate(), None);
        assert_eq!(stats.requests_per_second(), 0.0);
        assert_eq!(stats.span, ms(1_000), "the span is at least one slot");
    }

    #[test]
    fn steady_load_reads_steady_across_rotations() {
        let mut w = RequestWindow::new(&ten_by_ten(), T0);
        // 100 requests per second for a minute.
        for i in 1..=6_000 {
            w.record(T0 + ms(i * 10), Outcome::Success);
            if i > 1_500 && i % 7 == 0 {
                let rps = w.requests_per_second(T0 + ms(i * 10));
                assert!((99.0..=101.2).contains(&rps), "at {} ms: {rps}", i * 10);
            }
        }
    }

    #[test]
    fn data_leaves_a_slot_at_a_time() {
        let mut w = RequestWindow::new(&ten_by_ten(), T0);
        w.record(T0 + ms(500), Outcome::Success);
        assert_eq!(
            w.stats(T0 + ms(9_999)).total(),
            1,
            "slot 0 is still inside at 9.999 s"
        );
        assert_eq!(
            w.stats(T0 + ms(10_000)).total(),
            0,
            "slot 0 rotates out at 10 s"
        );
        // Reads do not rotate: an earlier read still sees the sample.
        assert_eq!(w.stats(T0 + ms(600)).total(), 1);
    }

    #[test]
    fn time_going_backwards_counts_as_the_latest_time() {
        let mut w = RequestWindow::new(&ten_by_ten(), T0);
        w.record(T0 + ms(5_000), Outcome::Success);
        w.record(T0 + ms(3_000), Outcome::Failure);
        w.assert_invariants();
        // A read from "before" the latest input is read at the latest input.
        assert_eq!(w.stats(T0 + ms(1_000)), w.stats(T0 + ms(5_000)));
        // Both samples sit in the 5 s slot, so both leave together at 15 s.
        assert_eq!(w.stats(T0 + ms(14_999)).total(), 2);
        assert_eq!(w.stats(T0 + ms(15_000)).total(), 0);
    }

    #[test]
    fn long_gap_clears_everything() {
        let mut w = RequestWindow::new(&ten_by_ten(), T0);
        for i in 0..10 {
            w.record(T0 + ms(i * 1_000), Outcome::Failure);
        }
        w.record(T0 + ms(3_600_000), Outcome::Success);
        let stats = w.stats(T0 + ms(3_600_000));
        assert_eq!((stats.successes, stats.failures), (1, 0));
        // The window has existed all along: nine whole slots plus the one just begun.
        assert_eq!(stats.span, ms(9_000));
    }

    #[test]
    fn single_slot_window_is_a_tumbling_window() {
        let config = WindowConfig::try_new(ms(1_000), 1).unwrap();
        let mut w = RequestWindow::new(&config, T0);
        w.record(T0 + ms(10), Outcome::Success);
        w.record(T0 + ms(999), Outcome::Success);
        assert_eq!(w.stats(T0 + ms(999)).total(), 2);
        w.record(T0 + ms(1_000), Outcome::Success);
        assert_eq!(w.stats(T0 + ms(1_000)).total(), 1);
        assert_eq!(w.stats(T0 + ms(1_500)).requests_per_second(), 1.0);
    }

    #[test]
    fn latency_window_shows_recent_quantiles() {
        let mut w = LatencyWindow::new(&ten_by_ten(), T0);
        // A slow first ten seconds, then a fast ten seconds.
        for i in 0..1_000 {
            w.record(T0 + ms(i * 10), ms(400));
        }
        let early = w.snapshot(T0 + ms(9_990));
        assert_eq!(early.count(), 1_000);
        assert_eq!(early.quantile(0.5), Some(ms(350)));
        for i in 1_000..2_000 {
            w.record(T0 + ms(i * 10), ms(4) + Duration::from_micros(i % 1_000));
        }
        let late = w.snapshot(T0 + ms(19_990));
        assert_eq!(late.count(), 1_000);
        let p99 = late.quantile(0.99).unwrap();
        assert!(p99 <= ms(5), "only fast samples remain: {p99:?}");
        assert!(w.snapshot(T0 + ms(30_000)).is_empty());
        assert_eq!(w.window(), ms(10_000));
    }

    /// One input to a window in the property tests: a time (in ms, possibly earlier than the
    /// previous one) and what happened.
    fn events() -> impl Strategy<Value = Vec<(u64, bool, u64)>> {
        prop::collection::vec((0u64..20_000, any::<bool>(), 0u64..200), 0..120)
    }

    /// `(slots, slot_ms)`: windows from 1 ms to 5 s.
    fn shapes() -> impl Strategy<Value = (u32, u64)> {
        (1u32..=10, 1u64..=500)
    }

    /// Replays `events` into a reference model: the effective time of each (clamped to the
    /// latest so far) and the final latest time.
    fn effective_times(events: &[(u64, bool, u64)]) -> (Vec<(u64, bool, u64)>, u64) {
        let mut last = 0;
        let effective = events
            .iter()
            .map(|&(t, ok, latency)| {
                last = last.max(t);
                (last, ok, latency)
            })
            .collect();
        (effective, last)
    }

    fn outcome(ok: bool) -> Outcome {
        if ok {
            Outcome::Success
        } else {
            Outcome::Failure
        }
    }

    proptest! {
        /// The window agrees exactly with a model that keeps every sample and counts those
        /// whose slot is one of the last `slots` at the query time.
        #[test]
        fn request_window_matches_model(
            (slots, slot_ms) in shapes(),
            events in events(),
            query in 0u64..40_000,
        ) {
            let config = WindowConfig::try_new(ms(slot_ms * u64::from(slots)), slots).unwrap();
            let mut w = RequestWindow::new(&config, T0);
            for &(t, ok, _) in &events {
                w.record(T0 + ms(t), outcome(ok));
            }
            let (effective, last) = effective_times(&events);
            let now = query.max(last);
            let live = |t: u64| t / slot_ms + u64::from(slots) > now / slot_ms;
            let successes = effective.iter().filter(|e| e.1 && live(e.0)).count() as u64;
            let failures = effective.iter().filter(|e| !e.1 && live(e.0)).count() as u64;
            let stats = w.stats(T0 + ms(query));
            prop_assert_eq!((stats.successes, stats.failures), (successes, failures));
            prop_assert!(stats.span >= config.slot() && stats.span <= config.window());
        }

        /// Whatever the inputs, a sample at least a window old is never counted, and a sample
        /// less than `window - slot` old always is.
        #[test]
        fn windows_forget_data_older_than_the_window(
            (slots, slot_ms) in shapes(),
            events in events(),
            query in 0u64..40_000,
        ) {
            let config = WindowConfig::try_new(ms(slot_ms * u64::from(slots)), slots).unwrap();
            let window_ms = slot_ms * u64::from(slots);
            let mut requests = RequestWindow::new(&config, T0);
            let mut latencies = LatencyWindow::new(&config, T0);
            for &(t, ok, latency) in &events {
                requests.record(T0 + ms(t), outcome(ok));
                latencies.record(T0 + ms(t), ms(latency));
            }
            let (effective, last) = effective_times(&events);
            let now = query.max(last);
            let younger_than = |age: u64| effective.iter().filter(|e| now - e.0 < age).count();
            let must_keep = younger_than(window_ms - slot_ms) as u64;
            let may_keep = younger_than(window_ms) as u64;
            let counted = requests.stats(T0 + ms(query)).total();
            prop_assert!((must_keep..=may_keep).contains(&counted), "{counted} not in {must_keep}..={may_keep}");
            let recorded = latencies.snapshot(T0 + ms(query)).count();
            prop_assert_eq!(recorded, counted);
            // One window after the latest input, everything is gone.
            let later = T0 + ms(last + window_ms);
            prop_assert_eq!(requests.stats(later).total(), 0);
            prop_assert!(latencies.snapshot(later).is_empty());
        }

        /// The latency window's snapshot is exactly the histogram of the live samples.
        #[test]
        fn latency_window_matches_model(
            (slots, slot_ms) in shapes(),
            events in events(),
            query in 0u64..40_000,
        ) {
            let config = WindowConfig::try_new(ms(slot_ms * u64::from(slots)), slots).unwrap();
            let mut w = LatencyWindow::new(&config, T0);
            for &(t, _, latency) in &events {
                w.record(T0 + ms(t), ms(latency));
                w.assert_invariants();
            }
            let (effective, last) = effective_times(&events);
            let now = query.max(last);
            let mut expected = LatencyHistogram::new();
            for &(t, _, latency) in &effective {
                if t / slot_ms + u64::from(slots) > now / slot_ms {
                    expected.record(ms(latency));
                }
            }
            prop_assert_eq!(w.snapshot(T0 + ms(query)), expected);
        }
    }
}
