//! Fault points: places in the proxy's code where a simulation run can make a rare thing
//! happen on purpose (in the spirit of FoundationDB's BUGGIFY): an upstream that answers 503,
//! a request head processed late, an upstream h2 stream reset just after its response head, a
//! pooled connection evicted as it is checked out, a discovery update applied late.
//!
//! Only the `fault-points` cargo feature (which the simulation crate turns on) compiles them
//! in. Without it, [`fire`] and [`delay`] are constant "no" and every call site folds away;
//! CI checks the release `conduit-proxy` and `conduit-controller` binaries for [`MARKER`],
//! which only the feature's code carries.
//!
//! A run arms them process-wide ([`arm`]: a seed and a per-mille rate for each point) and
//! disarms them when its chaos phase ends ([`disarm`]). Process-wide is right here: the
//! simulation runs one world per process on one thread, so the draws happen in the same order
//! for the same seed, and the same requests meet the same faults.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A place where a fault can be made to happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultPoint {
    /// An attempt fails before it is sent, as if the endpoint had refused it with a 503: the
    /// request was provably not processed, so it may go again.
    Upstream503,
    /// The proxy starts on a request head late (as after a slow header read), 1-20 ms.
    SlowRequestHead,
    /// An upstream HTTP/2 response is lost just after its head arrived (the stream is reset):
    /// the endpoint may have processed the request.
    StreamReset,
    /// A pooled HTTP/1.1 connection is closed as it is checked out (an eviction), so the
    /// request opens another.
    PoolEviction,
    /// A balancer applies a discovery update late, 1-50 ms.
    SlowDiscovery,
}

impl FaultPoint {
    /// Every fault point.
    pub const ALL: [Self; 5] = [
        Self::Upstream503,
        Self::SlowRequestHead,
        Self::StreamReset,
        Self::PoolEviction,
        Self::SlowDiscovery,
    ];

    /// The longest delay the point adds (zero for points that add none).
    #[must_use]
    pub const fn max_delay(self) -> Duration {
        match self {
            Self::SlowRequestHead => Duration::from_millis(20),
            Self::SlowDiscovery => Duration::from_millis(50),
            Self::Upstream503 | Self::StreamReset | Self::PoolEviction => Duration::ZERO,
        }
    }
}

impl std::fmt::Display for FaultPoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Upstream503 => "upstream_503",
            Self::SlowRequestHead => "slow_request_head",
            Self::StreamReset => "stream_reset",
            Self::PoolEviction => "pool_eviction",
            Self::SlowDiscovery => "slow_discovery",
        })
    }
}

#[cfg(feature = "fault-points")]
pub use armed::{MARKER, arm, disarm, fired};

/// Whether `point` fires now (never without the `fault-points` feature).
#[cfg(not(feature = "fault-points"))]
#[inline(always)]
pub(crate) fn fire(_point: FaultPoint) -> bool {
    false
}

/// The delay `point` adds now, if it fires (never without the `fault-points` feature).
#[cfg(not(feature = "fault-points"))]
#[inline(always)]
pub(crate) fn delay(_point: FaultPoint) -> Option<Duration> {
    None
}

#[cfg(feature = "fault-points")]
pub(crate) use armed::{delay, fire};

#[cfg(feature = "fault-points")]
mod armed {
    use std::collections::BTreeMap;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use conduit_core::rand::{DetRng, Rng};

    use super::FaultPoint;

    /// A string only builds with fault points carry (CI greps release binaries for it).
    pub const MARKER: &str = "conduit-fault-points-compiled-in";

    struct Armed {
        /// One stream per point: a point removed from a case (when shrinking) leaves the
        /// draws of the others as they were.
        rngs: BTreeMap<FaultPoint, DetRng>,
        /// Per mille of chances at which each point fires.
        rates: BTreeMap<FaultPoint, u32>,
        /// How often each fired.
        fired: BTreeMap<FaultPoint, u64>,
    }

    static ARMED: Mutex<Option<Armed>> = Mutex::new(None);

    /// Whether any point has a rate above zero: read without the lock on every request, so
    /// that a build with fault points compiled in but none armed (a workspace-wide build's
    /// proxy, the simulation's healthy runs) pays a plain load per point, not a lock.
    static ANY_RATE: AtomicBool = AtomicBool::new(false);

    fn armed() -> std::sync::MutexGuard<'static, Option<Armed>> {
        ARMED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Arms `points` (each with its per-mille rate) for this process, drawing from `seed`.
    /// Replaces whatever was armed, and its counts.
    pub fn arm(seed: u64, points: &[(FaultPoint, u32)]) {
        tracing::debug!(marker = MARKER, ?points, "fault points armed");
        let mut guard = armed();
        ANY_RATE.store(points.iter().any(|&(_, r)| r > 0), Ordering::Relaxed);
        *guard = Some(Armed {
            rngs: FaultPoint::ALL
                .into_iter()
                .zip(1u64..)
                .map(|(point, n)| {
                    (
                        point,
                        DetRng::new(seed ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
                    )
                })
                .collect(),
            rates: points.iter().copied().filter(|(_, r)| *r > 0).collect(),
            fired: BTreeMap::new(),
        });
    }

    /// Disarms every point (the counts stay readable through [`fired`]).
    pub fn disarm() {
        if let Some(armed) = armed().as_mut() {
            armed.rates.clear();
            ANY_RATE.store(false, Ordering::Relaxed);
        }
    }

    /// How often each point fired since [`arm`].
    #[must_use]
    pub fn fired() -> BTreeMap<FaultPoint, u64> {
        armed()
            .as_ref()
            .map(|a| a.fired.clone())
            .unwrap_or_default()
    }

    pub(crate) fn fire(point: FaultPoint) -> bool {
        // Arming happens before the traffic it is for (on the same thread in the simulation),
        // so a relaxed read sees it.
        if !ANY_RATE.load(Ordering::Relaxed) {
            return false;
        }
        let mut guard = armed();
        let Some(armed) = guard.as_mut() else {
            return false;
        };
        let Some(&rate) = armed.rates.get(&point) else {
            return false;
        };
        let Some(rng) = armed.rngs.get_mut(&point) else {
            return false;
        };
        if !rng.chance(u64::from(rate), 1000) {
            return false;
        }
        *armed.fired.entry(point).or_insert(0) += 1;
        tracing::debug!(marker = MARKER, %point, "fault point fired");
        true
    }

    pub(crate) fn delay(point: FaultPoint) -> Option<Duration> {
        if !fire(point) {
            return None;
        }
        let max = u64::try_from(point.max_delay().as_millis())
            .unwrap_or(1)
            .max(1);
        let ms = armed()
            .as_mut()
            .and_then(|a| a.rngs.get_mut(&point))
            .map_or(1, |rng| rng.between(1, max));
        Some(Duration::from_millis(ms))
    }
}
