//! The clock seam: the only code in the proxy that reads time.
//!
//! Time comes from `tokio::time`, which is virtual under turmoil and under
//! `#[tokio::test(start_paused = true)]`, and is converted into the core's
//! [`conduit_core::time::Instant`] against an epoch captured when the clock is made. Everything
//! else in the proxy asks a [`Clock`] for `now()` and sleeps through it.

use std::time::Duration;

use conduit_core::time::Instant;

/// A monotonic clock on `tokio::time`, converting to core instants.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    epoch: tokio::time::Instant,
}

impl Clock {
    /// A clock whose epoch (core `Instant::ZERO`) is now.
    #[must_use]
    #[expect(
        clippy::disallowed_methods,
        reason = "the clock seam is the one place that reads time"
    )]
    pub fn new() -> Self {
        Self {
            epoch: tokio::time::Instant::now(),
        }
    }

    /// The current time as a core instant.
    #[must_use]
    #[expect(
        clippy::disallowed_methods,
        reason = "the clock seam is the one place that reads time"
    )]
    pub fn now(&self) -> Instant {
        let elapsed = tokio::time::Instant::now().saturating_duration_since(self.epoch);
        Instant::from_nanos(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX))
    }

    /// The tokio instant matching a core instant, for `sleep_until` and hyper's timer.
    #[must_use]
    pub fn to_tokio(&self, instant: Instant) -> tokio::time::Instant {
        self.epoch + Duration::from_nanos(instant.as_nanos())
    }

    /// Sleeps until the core instant `deadline` (returns at once if it has passed).
    pub async fn sleep_until(&self, deadline: Instant) {
        tokio::time::sleep_until(self.to_tokio(deadline)).await;
    }
}

/// Wall-clock time from the system clock, for certificate validity: the production wall
/// clock of the proxy's identity (the simulation passes its own).
#[must_use]
#[expect(
    clippy::disallowed_methods,
    reason = "the clock seam is the one place that reads time"
)]
pub fn system_unix_time() -> conduit_core::time::UnixTime {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    conduit_core::time::UnixTime::from_secs(since.as_secs())
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn follows_tokio_time() {
        let clock = Clock::new();
        let t0 = clock.now();
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(clock.now() - t0, Duration::from_millis(250));
        let deadline = clock.now() + Duration::from_secs(1);
        clock.sleep_until(deadline).await;
        assert_eq!(clock.now(), deadline);
    }
}
