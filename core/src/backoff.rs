//! Capped, jittered exponential backoff: how long to wait before the next attempt.
//!
//! Used wherever something is retried after a failure that may persist: a proxy reconnecting to
//! the controller, a stream resubscribing. The `n`-th consecutive failure (counting from 0)
//! waits around `min x 2^n`, capped at `max`, spread by up to `jitter_per_mille` thousandths
//! of that either way and then clamped back into `[min, max]`, so many clients that failed
//! together (a controller restart) do not come back in lockstep (the "exponential backoff and
//! jitter" of AWS's architecture blog; Linkerd's `exp-backoff` crate has the same shape). A
//! success [`resets`](Backoff::reset) the sequence.
//!
//! # Drive loop
//!
//! 1. After a failed attempt, `let delay = backoff.next_delay(&mut rng);` and schedule the
//!    next attempt at `now + delay`.
//! 2. After a success, `backoff.reset()`.
//!
//! ```
//! use conduit_core::backoff::{Backoff, BackoffConfig};
//! use conduit_core::rand::DetRng;
//! use core::time::Duration;
//!
//! let config = BackoffConfig::try_new(Duration::from_millis(100), Duration::from_secs(10), 500)
//!     .unwrap();
//! let mut backoff = Backoff::new(config);
//! let mut rng = DetRng::new(1);
//! let first = backoff.next_delay(&mut rng);
//! assert!(first >= Duration::from_millis(100) && first <= Duration::from_millis(150));
//! for _ in 0..20 {
//!     assert!(backoff.next_delay(&mut rng) <= Duration::from_secs(10));
//! }
//! backoff.reset();
//! assert!(backoff.next_delay(&mut rng) <= Duration::from_millis(150));
//! ```

use core::time::Duration;

use crate::rand::Rng;

/// The first wait after a failure: long enough not to spin on a refusing peer, short enough
/// that a brief blip (a controller pod rolling) costs little.
pub const DEFAULT_MIN: Duration = Duration::from_millis(100);

/// The longest wait: the worst-case delay before a recovered peer is noticed.
pub const DEFAULT_MAX: Duration = Duration::from_secs(10);

/// Jitter, in thousandths of the current base delay, either way: 50 %.
pub const DEFAULT_JITTER_PER_MILLE: u32 = 500;

/// The largest jitter accepted: 100 % (a delay anywhere in `[0, 2 x base]` before clamping).
pub const MAX_JITTER_PER_MILLE: u32 = 1000;

/// Doublings after which the base delay stops growing: `2^31` times any useful minimum is
/// beyond any useful maximum (and `1 << 31` is the largest shift a `u32` holds).
const MAX_DOUBLINGS: u32 = 31;

/// A backoff's validated settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackoffConfig {
    min: Duration,
    max: Duration,
    jitter_per_mille: u32,
}

/// A backoff configuration that cannot work.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidBackoff {
    /// `min` is zero, so the first retry would not wait at all.
    #[error("the minimum backoff must be positive")]
    ZeroMin,
    /// `max` is below `min`.
    #[error("the maximum backoff {max:?} is below the minimum {min:?}")]
    MaxBelowMin {
        /// The minimum given.
        min: Duration,
        /// The maximum given.
        max: Duration,
    },
    /// The jitter is above [`MAX_JITTER_PER_MILLE`].
    #[error("jitter {jitter_per_mille}‰ is above {MAX_JITTER_PER_MILLE}‰")]
    Jitter {
        /// The jitter given.
        jitter_per_mille: u32,
    },
}

impl BackoffConfig {
    /// Validates a backoff between `min` and `max` with `jitter_per_mille` thousandths of
    /// jitter either way.
    ///
    /// # Errors
    ///
    /// [`InvalidBackoff`] for a zero `min`, a `max` below `min`, or jitter above
    /// [`MAX_JITTER_PER_MILLE`].
    pub fn try_new(
        min: Duration,
        max: Duration,
        jitter_per_mille: u32,
    ) -> Result<Self, InvalidBackoff> {
        if min.is_zero() {
            return Err(InvalidBackoff::ZeroMin);
        }
        if max < min {
            return Err(InvalidBackoff::MaxBelowMin { min, max });
        }
        if jitter_per_mille > MAX_JITTER_PER_MILLE {
            return Err(InvalidBackoff::Jitter { jitter_per_mille });
        }
        Ok(Self {
            min,
            max,
            jitter_per_mille,
        })
    }

    /// The shortest delay.
    #[must_use]
    pub fn min(&self) -> Duration {
        self.min
    }

    /// The longest delay.
    #[must_use]
    pub fn max(&self) -> Duration {
        self.max
    }

    /// The jitter, in thousandths of the base delay either way.
    #[must_use]
    pub fn jitter_per_mille(&self) -> u32 {
        self.jitter_per_mille
    }
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self {
            min: DEFAULT_MIN,
            max: DEFAULT_MAX,
            jitter_per_mille: DEFAULT_JITTER_PER_MILLE,
        }
    }
}

/// The state of one backoff sequence: how many consecutive failures so far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backoff {
    config: BackoffConfig,
    failures: u32,
}

impl Backoff {
    /// A sequence that has seen no failure yet.
    #[must_use]
    pub fn new(config: BackoffConfig) -> Self {
        Self {
            config,
            failures: 0,
        }
    }

    /// Records a failure and returns how long to wait before the next attempt: always within
    /// `[min, max]`.
    pub fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let BackoffConfig {
            min,
            max,
            jitter_per_mille,
        } = self.config;
        let doublings = self.failures.min(MAX_DOUBLINGS);
        self.failures = self.failures.saturating_add(1);
        let base = min.saturating_mul(1_u32 << doublings).min(max);
        let base_ns = u64::try_from(base.as_nanos()).unwrap_or(u64::MAX);
        let spread = base_ns / 1000 * u64::from(jitter_per_mille);
        let low = base_ns.saturating_sub(spread);
        let high = base_ns.saturating_add(spread);
        let delay = Duration::from_nanos(rng.between(low, high));
        let delay = delay.clamp(min, max);
        debug_assert!(min <= delay && delay <= max);
        delay
    }

    /// An attempt succeeded: the next failure starts again from `min`.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// Consecutive failures since the last success.
    #[must_use]
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// The settings.
    #[must_use]
    pub fn config(&self) -> &BackoffConfig {
        &self.config
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::rand::DetRng;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn doubles_up_to_the_cap_then_resets() {
        let config = BackoffConfig::try_new(ms(100), ms(1000), 0).unwrap();
        let mut backoff = Backoff::new(config);
        let mut rng = DetRng::new(3);
        let delays: Vec<u64> = (0..6)
            .map(|_| u64::try_from(backoff.next_delay(&mut rng).as_millis()).unwrap())
            .collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(backoff.failures(), 6);
        backoff.reset();
        assert_eq!(backoff.next_delay(&mut rng), ms(100));
    }

    #[test]
    fn jitter_spreads_delays_at_the_cap() {
        let config = BackoffConfig::try_new(ms(100), ms(1000), 500).unwrap();
        let mut rng = DetRng::new(9);
        let mut distinct = std::collections::BTreeSet::new();
        for _ in 0..50 {
            let mut backoff = Backoff::new(config);
            for _ in 0..10 {
                let _ = backoff.next_delay(&mut rng);
            }
            distinct.insert(backoff.next_delay(&mut rng));
        }
        assert!(distinct.len() > 10, "{distinct:?}");
        assert!(distinct.iter().all(|d| *d >= ms(500) && *d <= ms(1000)));
    }

    #[test]
    fn invalid_configs_are_rejected() {
        assert_eq!(
            BackoffConfig::try_new(Duration::ZERO, ms(1), 0),
            Err(InvalidBackoff::ZeroMin)
        );
        assert!(matches!(
            BackoffConfig::try_new(ms(2), ms(1), 0),
            Err(InvalidBackoff::MaxBelowMin { .. })
        ));
        assert!(matches!(
            BackoffConfig::try_new(ms(1), ms(2), 1001),
            Err(InvalidBackoff::Jitter { .. })
        ));
    }

    proptest! {
        #[test]
        fn backoff_stays_within_min_and_max(
            min_us in 1u64..10_000_000,
            extra_us in 0u64..100_000_000,
            jitter in 0u32..=MAX_JITTER_PER_MILLE,
            failures in 0usize..80,
            seed: u64,
        ) {
            let min = Duration::from_micros(min_us);
            let max = Duration::from_micros(min_us + extra_us);
            let config = BackoffConfig::try_new(min, max, jitter).unwrap();
            let mut backoff = Backoff::new(config);
            let mut rng = DetRng::new(seed);
            for _ in 0..failures {
                let delay = backoff.next_delay(&mut rng);
                prop_assert!(min <= delay && delay <= max, "{delay:?} outside [{min:?}, {max:?}]");
            }
        }

        #[test]
        fn same_seed_same_delays(seed: u64, failures in 1usize..40) {
            let run = || {
                let mut backoff = Backoff::new(BackoffConfig::default());
                let mut rng = DetRng::new(seed);
                (0..failures).map(|_| backoff.next_delay(&mut rng)).collect::<Vec<_>>()
            };
            prop_assert_eq!(run(), run());
        }
    }
}
