//! Counters, latency histograms and sliding windows: the numbers behind top-line metrics.
//!
//! Everything here is plain data that the caller owns and feeds; the core never touches a
//! metrics registry. The proxy renders these types as Prometheus text on its admin port, the
//! demo and `conduit top` read success rate, requests per second and latency quantiles from
//! the windows, and the breaker and SLO logic read the windows' integer counts.
//!
//! - [`Counter`]: a saturating `u64` count.
//! - [`LatencyHistogram`]: counts in Linkerd's millisecond buckets
//!   ([`LATENCY_BUCKET_BOUNDS_MS`]), with Prometheus's cumulative `le` rendering and its
//!   `histogram_quantile` estimate ([`LatencyHistogram::quantile`]).
//! - [`RequestWindow`] and [`LatencyWindow`]: the same figures over a sliding window of
//!   explicit [`Instant`](crate::time::Instant)s, shaped by a validated [`WindowConfig`].
//!
//! No operation allocates except creating a window (its ring of slots, once).
//!
//! # Drive loop
//!
//! Windows have no timers: they rotate lazily, on the next input, so there is no
//! `poll_timeout`. The owner (a proxy layer, the simulation) only feeds facts and reads:
//!
//! 1. when a response finishes at `now`, classify it ([`crate::classify`]) and call
//!    `requests.record(now, class.outcome)` and `latencies.record(now, latency)`;
//! 2. whenever a figure is wanted (a scrape, a demo tick), call `requests.stats(now)` and
//!    `latencies.snapshot(now).quantile(q)`. Reads take `&self` and never rotate.
//!
//! Time must come from one monotonic clock; an input earlier than one already seen is treated
//! as arriving at the latest time seen, and after a silence of a whole window or more the
//! window is simply empty.
//!
//! ```
//! use conduit_core::classify::Outcome;
//! use conduit_core::metrics::{LatencyWindow, RequestWindow, WindowConfig};
//! use conduit_core::time::{Instant, ms};
//!
//! // "Over the last 10 s", forgetting a second at a time.
//! let config = WindowConfig::try_new(ms(10_000), 10)?;
//! let t0 = Instant::ZERO;
//! let mut requests = RequestWindow::new(&config, t0);
//! let mut latencies = LatencyWindow::new(&config, t0);
//!
//! // Twenty seconds of traffic: one response every 10 ms, every 25th one failing, each
//! // taking 5 ms, except every 100th, which takes 250 ms.
//! for i in 0..2_000u64 {
//!     let now = t0 + ms(i * 10);
//!     let outcome = if i % 25 == 0 { Outcome::Failure } else { Outcome::Success };
//!     let latency = if i % 100 == 0 { ms(250) } else { ms(5) };
//!     requests.record(now, outcome);
//!     latencies.record(now, latency);
//! }
//!
//! // Only the last ten one-second slots count: the 1,000 responses since t0 + 10 s.
//! let now = t0 + ms(19_999);
//! let stats = requests.stats(now);
//! assert_eq!((stats.successes, stats.failures), (960, 40));
//! assert_eq!(stats.success_rate(), Some(0.96));
//! assert!((100.0..100.2).contains(&stats.requests_per_second()));
//! let recent = latencies.snapshot(now);
//! let (p50, p999) = (recent.quantile(0.5).unwrap(), recent.quantile(0.999).unwrap());
//! assert!(ms(4) < p50 && p50 <= ms(5), "interpolated inside the 4..=5 ms bucket");
//! assert!(ms(200) < p999 && p999 <= ms(300), "the slow 1 % shows in the tail");
//!
//! // A minute of silence later, the windows are empty.
//! let later = now + ms(60_000);
//! assert_eq!(requests.stats(later).total(), 0);
//! assert_eq!(latencies.snapshot(later).quantile(0.5), None);
//! # Ok::<(), conduit_core::metrics::InvalidWindow>(())
//! ```

mod histogram;
mod window;

pub use histogram::{
    CumulativeBucket, CumulativeBuckets, LATENCY_BUCKET_BOUNDS_MS, LATENCY_BUCKETS,
    LatencyHistogram,
};
pub use window::{
    DEFAULT_SLOTS, DEFAULT_WINDOW, InvalidWindow, LatencyWindow, RequestStats, RequestWindow,
    WindowConfig,
};

/// A monotonically increasing count of events.
///
/// Additions saturate at `u64::MAX` rather than wrap. A Prometheus counter that wraps to a
/// small number reads as a process restart and turns into a huge negative-then-positive rate;
/// one that sticks at its maximum is merely flat, which is the less wrong answer. At a
/// billion events a second, reaching the limit takes 584 years, so in practice it never
/// happens; saturation guards against nonsense such as merging a counter into itself forever.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Counter(u64);

impl Counter {
    /// A counter at zero.
    #[must_use]
    pub const fn new() -> Self {
        Self(0)
    }

    /// Counts one event.
    #[inline]
    pub fn incr(&mut self) {
        self.add(1);
    }

    /// Counts `n` events.
    #[inline]
    pub fn add(&mut self, n: u64) {
        self.0 = self.0.saturating_add(n);
    }

    /// Adds another counter's events to this one (for aggregating across endpoints).
    pub fn merge(&mut self, other: Self) {
        self.add(other.0);
    }

    /// The number of events counted.
    #[must_use]
    pub const fn value(self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn counter_counts_and_saturates() {
        let mut c = Counter::new();
        c.incr();
        c.add(41);
        assert_eq!(c.value(), 42);
        c.merge(Counter(u64::MAX - 1));
        assert_eq!(c.value(), u64::MAX);
        c.incr();
        assert_eq!(c.value(), u64::MAX, "saturates instead of wrapping");
    }

    proptest! {
        #[test]
        fn counter_never_decreases(adds in prop::collection::vec(any::<u64>(), 0..20)) {
            let mut c = Counter::default();
            let mut exact: u128 = 0;
            for n in adds {
                let before = c.value();
                c.add(n);
                exact += u128::from(n);
                prop_assert!(c.value() >= before);
                prop_assert_eq!(u128::from(c.value()), exact.min(u128::from(u64::MAX)));
            }
        }
    }
}
