//! Circuit breaking per endpoint: failure accrual, ejection with a growing penalty, and
//! probation.
//!
//! A [`Breaker`] watches the outcomes of one endpoint's requests and decides when the endpoint
//! should leave the balancer's rotation. Its states (Linkerd's, reference/linkerd.md §1.3, in
//! the usual electrical naming, where a *closed* breaker passes current):
//!
//! - **Closed**: the endpoint takes traffic and outcomes accrue under the configured policies:
//!   - *consecutive failures*: this many failures in a row ([`DEFAULT_CONSECUTIVE_FAILURES`]);
//!   - *success rate*: over a sliding window ([`DEFAULT_SUCCESS_RATE_WINDOW`]), once it holds at
//!     least [`DEFAULT_SUCCESS_RATE_MIN_REQUESTS`] outcomes, successes fall below a share of
//!     them ([`DEFAULT_SUCCESS_RATE_THRESHOLD_PER_MILLE`]; below, not at).
//!
//!   When a policy trips, the breaker says so ([`Verdict::Trip`]) but does not act alone: the
//!   owner (the balancer) knows how many of the service's endpoints are out already and ejects
//!   it with [`Breaker::eject`] only if that leaves enough in rotation
//!   ([`BreakerConfig::max_ejected`]). Otherwise the endpoint stays in rotation and accrual goes
//!   on: its next failure trips again.
//! - **Ejected** until a penalty ends: a capped, jittered exponential backoff
//!   ([`DEFAULT_PENALTY_MIN`] doubling up to [`DEFAULT_PENALTY_MAX`], jitter
//!   [`DEFAULT_PENALTY_JITTER_PER_MILLE`], as [`crate::backoff`] computes it).
//! - **Probation**: the endpoint may take exactly one request, the probe
//!   ([`Breaker::start_probe`]). Its outcome decides: a success closes the breaker and resets
//!   the penalty; a failure ejects the endpoint again for the next, doubled, penalty. A probe
//!   that ends without an outcome (its request was cancelled) decides nothing: the owner calls
//!   [`Breaker::abandon_probe`] and the endpoint admits another probe.
//!
//! Outcomes of requests that were sent before the breaker last closed are ignored (they
//! describe the endpoint as it was), as are outcomes that arrive while it is ejected or on
//! probation, except the probe's.
//!
//! Both policies are optional ([`BreakerConfig::disabled`] turns both off); by default both are
//! on, the consecutive-failure policy being checked first when both trip at once.
//!
//! # Drive loop
//!
//! One breaker per endpoint, owned by the balancer (`conduit_core::balance`), which also
//! enforces the service-wide maximum ejected share:
//!
//! 1. When a request's outcome is known (the response ended and was classified, or the
//!    attempt failed after dispatch): `breaker.handle_outcome(now, sent_at, outcome)` for a
//!    regular request, `breaker.handle_probe_outcome(now, outcome, &mut rng)` for the probe.
//! 2. On [`Verdict::Trip`]: eject with `breaker.eject(now, reason, &mut rng)` if the service
//!    can spare the endpoint, else leave it in rotation.
//! 3. Route requests only to endpoints whose breaker [`admits`](Breaker::admits); when a pick
//!    lands on one in probation, call `breaker.start_probe()` and treat that request as the
//!    probe.
//! 4. Wake at `breaker.poll_timeout()` and call `breaker.handle_timeout(now)`: the penalty
//!    ends and probation starts.
//!
//! ```
//! use conduit_core::breaker::{Breaker, BreakerConfig, Reason, State, Verdict};
//! use conduit_core::classify::Outcome;
//! use conduit_core::rand::DetRng;
//! use conduit_core::time::{Instant, ms};
//!
//! let t0 = Instant::ZERO;
//! let mut rng = DetRng::new(1);
//! let mut breaker = Breaker::new(&BreakerConfig::default(), t0);
//!
//! // Six failures in a row are not enough; the seventh trips the breaker.
//! for i in 1..7 {
//!     assert_eq!(breaker.handle_outcome(t0 + ms(i), t0, Outcome::Failure), Verdict::None);
//! }
//! let verdict = breaker.handle_outcome(t0 + ms(7), t0, Outcome::Failure);
//! assert_eq!(verdict, Verdict::Trip(Reason::ConsecutiveFailures));
//!
//! // The balancer can spare the endpoint: out for 1 s (give or take the jitter).
//! let until = breaker.eject(t0 + ms(7), Reason::ConsecutiveFailures, &mut rng);
//! assert!(until >= t0 + ms(1_007) && until <= t0 + ms(1_507));
//! assert_eq!(breaker.poll_timeout(), Some(until));
//!
//! // The penalty ends: one probe may go, and its success closes the breaker.
//! breaker.handle_timeout(until);
//! assert!(breaker.admits());
//! breaker.start_probe();
//! assert!(!breaker.admits(), "one probe at a time");
//! let verdict = breaker.handle_probe_outcome(until + ms(5), Outcome::Success, &mut rng);
//! assert_eq!(verdict, Verdict::Recovered);
//! assert_eq!(breaker.state(), State::Closed);
//! ```

use core::fmt;
use core::time::Duration;

use serde::Deserialize;

use crate::backoff::{Backoff, BackoffConfig, InvalidBackoff, MAX_JITTER_PER_MILLE};
use crate::classify::Outcome;
use crate::metrics::{RequestWindow, WindowConfig};
use crate::rand::Rng;
use crate::time::{Instant, parse_duration};

/// Failures in a row that eject an endpoint: Linkerd's default. Enough that a few unlucky
/// requests never eject a healthy endpoint; few enough that a dead one costs little.
pub const DEFAULT_CONSECUTIVE_FAILURES: u32 = 7;

/// The success rate, in thousandths, below which an endpoint is ejected: half its requests
/// failing is far from noise, and an endpoint that fails less than that is better left to
/// retries and to PeakEWMA than taken away from a service that may need its capacity.
pub const DEFAULT_SUCCESS_RATE_THRESHOLD_PER_MILLE: u32 = 500;

/// The window the success rate is measured over: long enough that a short burst of failures
/// across a deploy does not eject, short enough that a sick endpoint is out within a minute.
pub const DEFAULT_SUCCESS_RATE_WINDOW: Duration = Duration::from_secs(30);

/// The fewest outcomes in the window before the success rate counts, so that an endpoint with
/// little traffic is not ejected over two unlucky requests.
pub const DEFAULT_SUCCESS_RATE_MIN_REQUESTS: u32 = 20;

/// Slots of the success-rate window (Linkerd's ring has ten buckets too): outcomes leave the
/// window a tenth of it at a time, and each endpoint's window costs ten pairs of counters.
pub const SUCCESS_RATE_SLOTS: u32 = 10;

/// The shortest success-rate window accepted: a tenth of it is the window's resolution.
pub const MIN_SUCCESS_RATE_WINDOW: Duration = Duration::from_secs(1);

/// The longest success-rate window accepted: an hour-old failure says nothing about now.
pub const MAX_SUCCESS_RATE_WINDOW: Duration = Duration::from_secs(3600);

/// The first penalty: Linkerd's default. A transient fault (a restart) is over by then.
pub const DEFAULT_PENALTY_MIN: Duration = Duration::from_secs(1);

/// The longest penalty: Linkerd's default, and the longest an endpoint that recovered waits to
/// be tried again.
pub const DEFAULT_PENALTY_MAX: Duration = Duration::from_secs(60);

/// Jitter on each penalty, in thousandths either way: Linkerd's 0.5, so endpoints ejected
/// together (a bad deploy) are probed at different times.
pub const DEFAULT_PENALTY_JITTER_PER_MILLE: u32 = 500;

/// The longest penalty accepted: an endpoint that is still listed by discovery an hour later
/// deserves a probe.
pub const MAX_PENALTY: Duration = Duration::from_secs(3600);

/// The largest share of a service's endpoints that may be ejected at once, in thousandths:
/// half (Envoy's `max_ejection_percent` is 10 % by default, with "at least one"; half protects
/// small services, where one endpoint is already a large share, from losing most capacity to a
/// fault that is really the callers').
pub const DEFAULT_MAX_EJECTED_PER_MILLE: u32 = 500;

/// A denominator for every `_per_mille` value.
const PER_MILLE: u32 = 1000;

// === Configuration ===

/// The success-rate policy, validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SuccessRate {
    threshold_per_mille: u32,
    window: WindowConfig,
    min_requests: u32,
}

impl SuccessRate {
    /// Ejects when fewer than `threshold_per_mille` thousandths of the outcomes over `window`
    /// succeeded, once the window holds at least `min_requests` outcomes.
    ///
    /// # Errors
    ///
    /// [`InvalidBreaker`] for a threshold of 0 (which could never trip: leave the policy out
    /// instead) or above 1000, a window outside [`MIN_SUCCESS_RATE_WINDOW`]..=
    /// [`MAX_SUCCESS_RATE_WINDOW`], or `min_requests` of 0.
    pub fn try_new(
        threshold_per_mille: u32,
        window: Duration,
        min_requests: u32,
    ) -> Result<Self, InvalidBreaker> {
        if threshold_per_mille == 0 || threshold_per_mille > PER_MILLE {
            return Err(InvalidBreaker::new(
                "success_rate.threshold_per_mille",
                format!("{threshold_per_mille} is outside 1..=1000 (0 turns the policy off)"),
            ));
        }
        if !(MIN_SUCCESS_RATE_WINDOW..=MAX_SUCCESS_RATE_WINDOW).contains(&window) {
            return Err(InvalidBreaker::new(
                "success_rate.window",
                format!(
                    "{window:?} is outside {MIN_SUCCESS_RATE_WINDOW:?}..={MAX_SUCCESS_RATE_WINDOW:?}"
                ),
            ));
        }
        let window = WindowConfig::try_new(window, SUCCESS_RATE_SLOTS)
            .map_err(|e| InvalidBreaker::new("success_rate.window", e.to_string()))?;
        if min_requests == 0 {
            return Err(InvalidBreaker::new(
                "success_rate.min_requests",
                "must be at least 1",
            ));
        }
        Ok(Self {
            threshold_per_mille,
            window,
            min_requests,
        })
    }

    /// The threshold, in thousandths of the outcomes.
    #[must_use]
    pub fn threshold_per_mille(&self) -> u32 {
        self.threshold_per_mille
    }

    /// The window length.
    #[must_use]
    pub fn window(&self) -> Duration {
        self.window.window()
    }

    /// The fewest outcomes in the window before the rate counts.
    #[must_use]
    pub fn min_requests(&self) -> u32 {
        self.min_requests
    }

    /// Whether `successes` of `total` outcomes trip the policy.
    fn trips(&self, successes: u64, total: u64) -> bool {
        total >= u64::from(self.min_requests)
            && u128::from(successes) * u128::from(PER_MILLE)
                < u128::from(self.threshold_per_mille) * u128::from(total)
    }
}

impl Default for SuccessRate {
    fn default() -> Self {
        Self {
            threshold_per_mille: DEFAULT_SUCCESS_RATE_THRESHOLD_PER_MILLE,
            window: WindowConfig::try_new(DEFAULT_SUCCESS_RATE_WINDOW, SUCCESS_RATE_SLOTS)
                .unwrap_or_default(),
            min_requests: DEFAULT_SUCCESS_RATE_MIN_REQUESTS,
        }
    }
}

/// A service's circuit-breaking settings, validated: which accrual policies apply, the
/// penalty, and the most endpoints that may be out at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreakerConfig {
    consecutive_failures: Option<u32>,
    success_rate: Option<SuccessRate>,
    penalty: BackoffConfig,
    max_ejected_per_mille: u32,
}

impl BreakerConfig {
    /// Settings from their parts. `consecutive_failures` and `success_rate` are the two
    /// policies (`None`: off); `penalty` is the ejection backoff; `max_ejected_per_mille` is
    /// the largest share of a service's endpoints ejected at once, in thousandths.
    ///
    /// # Errors
    ///
    /// [`InvalidBreaker`] for `consecutive_failures` of 0 (leave the policy out instead), a
    /// penalty above [`MAX_PENALTY`], or a share above 1000.
    pub fn try_new(
        consecutive_failures: Option<u32>,
        success_rate: Option<SuccessRate>,
        penalty: BackoffConfig,
        max_ejected_per_mille: u32,
    ) -> Result<Self, InvalidBreaker> {
        if consecutive_failures == Some(0) {
            return Err(InvalidBreaker::new(
                "consecutive_failures",
                "must be at least 1 (0 turns the policy off)",
            ));
        }
        if penalty.max() > MAX_PENALTY {
            return Err(InvalidBreaker::new(
                "backoff.max",
                format!("{:?} is above the maximum {MAX_PENALTY:?}", penalty.max()),
            ));
        }
        if max_ejected_per_mille > PER_MILLE {
            return Err(InvalidBreaker::new(
                "max_ejected_per_mille",
                format!("{max_ejected_per_mille} is above 1000"),
            ));
        }
        Ok(Self {
            consecutive_failures,
            success_rate,
            penalty,
            max_ejected_per_mille,
        })
    }

    /// Circuit breaking off: no policy, so no endpoint is ever ejected.
    #[must_use]
    pub fn disabled() -> Self {
        Self {
            consecutive_failures: None,
            success_rate: None,
            ..Self::default()
        }
    }

    /// Whether any policy is on.
    #[must_use]
    pub fn is_enabled(&self) -> bool {
        self.consecutive_failures.is_some() || self.success_rate.is_some()
    }

    /// Failures in a row that eject (`None`: the policy is off).
    #[must_use]
    pub fn consecutive_failures(&self) -> Option<u32> {
        self.consecutive_failures
    }

    /// The success-rate policy (`None`: off).
    #[must_use]
    pub fn success_rate(&self) -> Option<&SuccessRate> {
        self.success_rate.as_ref()
    }

    /// The penalty backoff.
    #[must_use]
    pub fn penalty(&self) -> &BackoffConfig {
        &self.penalty
    }

    /// The largest share of endpoints ejected at once, in thousandths.
    #[must_use]
    pub fn max_ejected_per_mille(&self) -> u32 {
        self.max_ejected_per_mille
    }

    /// How many of a service's `endpoints` may be ejected at once: the configured share,
    /// rounded down, and never all of them (at least one always stays in rotation). A service
    /// with one endpoint never loses it; with two, at most one goes at the default share.
    #[must_use]
    pub fn max_ejected(&self, endpoints: usize) -> usize {
        let share = u128::try_from(endpoints).unwrap_or(u128::MAX)
            * u128::from(self.max_ejected_per_mille)
            / u128::from(PER_MILLE);
        usize::try_from(share)
            .unwrap_or(usize::MAX)
            .min(endpoints.saturating_sub(1))
    }
}

impl Default for BreakerConfig {
    /// Both policies on with their defaults, penalties of 1 s to 60 s with jitter 0.5, and at
    /// most half of a service's endpoints ejected.
    fn default() -> Self {
        Self {
            consecutive_failures: Some(DEFAULT_CONSECUTIVE_FAILURES),
            success_rate: Some(SuccessRate::default()),
            penalty: BackoffConfig::try_new(
                DEFAULT_PENALTY_MIN,
                DEFAULT_PENALTY_MAX,
                DEFAULT_PENALTY_JITTER_PER_MILLE,
            )
            .unwrap_or_default(),
            max_ejected_per_mille: DEFAULT_MAX_EJECTED_PER_MILLE,
        }
    }
}

/// Why a breaker configuration was rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct InvalidBreaker {
    /// The field at fault, in the mesh file's terms relative to `breaker`:
    /// `consecutive_failures`, `success_rate.window`, `backoff.min`, `max_ejected_per_mille`...
    pub field: &'static str,
    /// What is wrong.
    pub problem: String,
}

impl InvalidBreaker {
    fn new(field: &'static str, problem: impl Into<String>) -> Self {
        Self {
            field,
            problem: problem.into(),
        }
    }
}

impl From<InvalidBackoff> for InvalidBreaker {
    fn from(invalid: InvalidBackoff) -> Self {
        let field = match invalid {
            InvalidBackoff::MaxBelowMin { .. } => "backoff.max",
            InvalidBackoff::Jitter { .. } => "backoff.jitter_per_mille",
            // `ZeroMin`, and any case a later version adds.
            _ => "backoff.min",
        };
        Self::new(field, invalid.to_string())
    }
}

/// A service's circuit breaking as written in the mesh file. Every field is optional; absent
/// ones take the defaults, so an absent `breaker` means both policies on.
///
/// ```yaml
/// breaker:
///   enabled: true               # false: never eject this service's endpoints
///   consecutive_failures: 7     # failures in a row that eject; 0 turns the policy off
///   success_rate:
///     threshold_per_mille: 500  # eject below 50 % successes; 0 turns the policy off
///     window: 30s
///     min_requests: 20
///   backoff: { min: 1s, max: 60s, jitter_per_mille: 500 }   # the ejection penalty
///   max_ejected_per_mille: 500  # at most half the endpoints out at once (never all)
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, serde::Serialize))]
#[serde(default, deny_unknown_fields)]
pub struct RawBreaker {
    /// `false` turns both policies off.
    pub enabled: Option<bool>,
    /// See [`BreakerConfig::consecutive_failures`]; 0 turns the policy off.
    pub consecutive_failures: Option<u32>,
    /// The success-rate policy.
    pub success_rate: Option<RawSuccessRate>,
    /// The ejection penalty.
    pub backoff: Option<RawPenalty>,
    /// See [`BreakerConfig::max_ejected_per_mille`].
    pub max_ejected_per_mille: Option<u32>,
}

/// The success-rate policy as written.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, serde::Serialize))]
#[serde(default, deny_unknown_fields)]
pub struct RawSuccessRate {
    /// See [`SuccessRate::threshold_per_mille`]; 0 turns the policy off.
    pub threshold_per_mille: Option<u32>,
    /// The window, as a duration (`30s`).
    pub window: Option<String>,
    /// See [`SuccessRate::min_requests`].
    pub min_requests: Option<u32>,
}

/// The ejection penalty as written: durations such as `500ms`, `1s`, `1m`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, serde::Serialize))]
#[serde(default, deny_unknown_fields)]
pub struct RawPenalty {
    /// The first penalty.
    pub min: Option<String>,
    /// The longest penalty.
    pub max: Option<String>,
    /// Jitter, in thousandths of each penalty either way.
    pub jitter_per_mille: Option<u32>,
}

impl TryFrom<RawBreaker> for BreakerConfig {
    type Error = InvalidBreaker;

    fn try_from(raw: RawBreaker) -> Result<Self, InvalidBreaker> {
        let duration = |field: &'static str, text: Option<String>, default: Duration| match text {
            None => Ok(default),
            Some(text) => parse_duration(&text).ok_or_else(|| {
                InvalidBreaker::new(
                    field,
                    format!("`{text}` is not a duration (like 500ms, 2s, 1m)"),
                )
            }),
        };
        let raw_penalty = raw.backoff.unwrap_or_default();
        let penalty = BackoffConfig::try_new(
            duration("backoff.min", raw_penalty.min, DEFAULT_PENALTY_MIN)?,
            duration("backoff.max", raw_penalty.max, DEFAULT_PENALTY_MAX)?,
            raw_penalty
                .jitter_per_mille
                .unwrap_or(DEFAULT_PENALTY_JITTER_PER_MILLE),
        )?;
        let consecutive_failures = match raw
            .consecutive_failures
            .unwrap_or(DEFAULT_CONSECUTIVE_FAILURES)
        {
            0 => None,
            n => Some(n),
        };
        let raw_rate = raw.success_rate.unwrap_or_default();
        let success_rate = match raw_rate
            .threshold_per_mille
            .unwrap_or(DEFAULT_SUCCESS_RATE_THRESHOLD_PER_MILLE)
        {
            0 => None,
            threshold => Some(SuccessRate::try_new(
                threshold,
                duration(
                    "success_rate.window",
                    raw_rate.window,
                    DEFAULT_SUCCESS_RATE_WINDOW,
                )?,
                raw_rate
                    .min_requests
                    .unwrap_or(DEFAULT_SUCCESS_RATE_MIN_REQUESTS),
            )?),
        };
        let (consecutive_failures, success_rate) = if raw.enabled == Some(false) {
            (None, None)
        } else {
            (consecutive_failures, success_rate)
        };
        Self::try_new(
            consecutive_failures,
            success_rate,
            penalty,
            raw.max_ejected_per_mille
                .unwrap_or(DEFAULT_MAX_EJECTED_PER_MILLE),
        )
    }
}

// Keep the jitter bound visible next to the config that uses it.
const _: () = assert!(DEFAULT_PENALTY_JITTER_PER_MILLE <= MAX_JITTER_PER_MILLE);

// === The state machine ===

/// Where a breaker stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum State {
    /// In rotation; outcomes accrue.
    Closed,
    /// Out of rotation until the penalty ends.
    Ejected {
        /// When the penalty ends.
        until: Instant,
    },
    /// Back for one probe request, whose outcome decides.
    Probation {
        /// The probe is out (the endpoint takes no other request meanwhile).
        probing: bool,
    },
}

/// Which policy ejected an endpoint: the `reason` label of `endpoint_ejections_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// Too many failures in a row.
    ConsecutiveFailures,
    /// The success rate over the window fell below the threshold.
    SuccessRate,
}

impl Reason {
    /// Every reason, in label order.
    pub const ALL: [Self; 2] = [Self::ConsecutiveFailures, Self::SuccessRate];

    /// The metrics label: `consecutive_failures` or `success_rate`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::ConsecutiveFailures => "consecutive_failures",
            Self::SuccessRate => "success_rate",
        }
    }

    /// The position in [`Reason::ALL`], for counters kept as arrays.
    #[must_use]
    pub const fn index(self) -> usize {
        match self {
            Self::ConsecutiveFailures => 0,
            Self::SuccessRate => 1,
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a breaker asks of its owner after an outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Verdict {
    /// Nothing changed that the owner must act on.
    None,
    /// A policy tripped: eject with [`Breaker::eject`] if the service can spare the endpoint;
    /// otherwise it stays in rotation (and trips again on its next failure).
    Trip(Reason),
    /// The probe succeeded: the breaker is closed again (done; the owner updates rotation).
    Recovered,
    /// The probe failed: the endpoint is ejected again, for the next penalty (done).
    Reejected {
        /// When the new penalty ends.
        until: Instant,
    },
}

/// One endpoint's circuit breaker.
#[derive(Clone, Debug)]
pub struct Breaker {
    consecutive_limit: Option<u32>,
    success_rate: Option<SuccessRate>,
    state: State,
    /// The policy that ejected the endpoint, while it is out.
    reason: Option<Reason>,
    /// When the breaker last closed; outcomes of requests sent before are not accrued.
    closed_since: Instant,
    consecutive_failures: u32,
    /// The success-rate window (only when that policy is on).
    window: Option<RequestWindow>,
    penalty: Backoff,
}

impl Breaker {
    /// A closed breaker under `config`, accruing from `now`. Allocates the success-rate window
    /// when that policy is on; nothing else a breaker does allocates.
    #[must_use]
    pub fn new(config: &BreakerConfig, now: Instant) -> Self {
        let breaker = Self {
            consecutive_limit: config.consecutive_failures,
            success_rate: config.success_rate,
            state: State::Closed,
            reason: None,
            closed_since: now,
            consecutive_failures: 0,
            window: config
                .success_rate
                .map(|rate| RequestWindow::new(&rate.window, now)),
            penalty: Backoff::new(config.penalty),
        };
        breaker.assert_invariants();
        breaker
    }

    /// The current state.
    #[must_use]
    pub fn state(&self) -> State {
        self.state
    }

    /// Whether the endpoint may take a request now: closed, or on probation with no probe out.
    #[must_use]
    pub fn admits(&self) -> bool {
        matches!(
            self.state,
            State::Closed | State::Probation { probing: false }
        )
    }

    /// Whether the breaker has tripped and not closed again (ejected, or on probation).
    #[must_use]
    pub fn is_open(&self) -> bool {
        !matches!(self.state, State::Closed)
    }

    /// The policy that ejected the endpoint, while it is out.
    #[must_use]
    pub fn reason(&self) -> Option<Reason> {
        self.reason
    }

    /// Failures in a row so far (while closed).
    #[must_use]
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    /// Penalties served since the breaker last recovered.
    #[must_use]
    pub fn penalties(&self) -> u32 {
        self.penalty.failures()
    }

    /// The outcome of a regular request (not the probe) sent at `sent`, known at `now`.
    ///
    /// Accrues only while closed, and only for requests sent since the breaker last closed.
    /// Returns [`Verdict::Trip`] when a policy trips (the breaker stays closed until the owner
    /// ejects it) and [`Verdict::None`] otherwise. Allocates nothing.
    pub fn handle_outcome(&mut self, now: Instant, sent: Instant, outcome: Outcome) -> Verdict {
        if self.state != State::Closed || sent < self.closed_since {
            return Verdict::None;
        }
        if let Some(window) = &mut self.window {
            window.record(now, outcome);
        }
        if outcome == Outcome::Success {
            self.consecutive_failures = 0;
            return Verdict::None;
        }
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        if self
            .consecutive_limit
            .is_some_and(|limit| self.consecutive_failures >= limit)
        {
            return Verdict::Trip(Reason::ConsecutiveFailures);
        }
        if let (Some(rate), Some(window)) = (&self.success_rate, &self.window) {
            let stats = window.stats(now);
            if rate.trips(stats.successes, stats.total()) {
                return Verdict::Trip(Reason::SuccessRate);
            }
        }
        Verdict::None
    }

    /// Ejects the endpoint at `now` for the next penalty, because of `reason`, and returns when
    /// the penalty ends. Call it only after [`Verdict::Trip`]; a breaker that is not closed is
    /// left as it is (its current penalty end is returned).
    pub fn eject(&mut self, now: Instant, reason: Reason, rng: &mut impl Rng) -> Instant {
        debug_assert_eq!(self.state, State::Closed, "eject follows a trip");
        match self.state {
            State::Closed => {}
            State::Ejected { until } => return until,
            State::Probation { .. } => return now,
        }
        self.reason = Some(reason);
        let until = self.penalize(now, rng);
        tracing::debug!(%reason, penalty = ?(until - now), "endpoint ejected");
        until
    }

    fn penalize(&mut self, now: Instant, rng: &mut impl Rng) -> Instant {
        let until = now + self.penalty.next_delay(rng);
        self.state = State::Ejected { until };
        self.assert_invariants();
        until
    }

    /// The penalty end, while ejected.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Ejected { until } => Some(until),
            State::Closed | State::Probation { .. } => None,
        }
    }

    /// Starts probation once the penalty has ended; returns whether it did. Spurious calls are
    /// no-ops.
    pub fn handle_timeout(&mut self, now: Instant) -> bool {
        match self.state {
            State::Ejected { until } if until <= now => {
                self.state = State::Probation { probing: false };
                tracing::debug!("endpoint on probation");
                self.assert_invariants();
                true
            }
            _ => false,
        }
    }

    /// The probe request was sent; no other request goes until its outcome (or its
    /// abandonment). Returns false (and changes nothing) unless on probation without a probe.
    pub fn start_probe(&mut self) -> bool {
        if self.state == (State::Probation { probing: false }) {
            self.state = State::Probation { probing: true };
            true
        } else {
            false
        }
    }

    /// The probe ended without an outcome (cancelled): it decides nothing, and another probe
    /// may go. Spurious calls are no-ops.
    pub fn abandon_probe(&mut self) {
        if self.state == (State::Probation { probing: true }) {
            self.state = State::Probation { probing: false };
        }
    }

    /// The probe's outcome, known at `now`: success closes the breaker and forgets the
    /// penalties ([`Verdict::Recovered`]); failure ejects the endpoint again for the next,
    /// doubled, penalty ([`Verdict::Reejected`]). [`Verdict::None`] when no probe is out.
    pub fn handle_probe_outcome(
        &mut self,
        now: Instant,
        outcome: Outcome,
        rng: &mut impl Rng,
    ) -> Verdict {
        if self.state != (State::Probation { probing: true }) {
            return Verdict::None;
        }
        match outcome {
            Outcome::Success => {
                self.penalty.reset();
                self.close(now);
                tracing::debug!("probe succeeded; endpoint back in rotation");
                Verdict::Recovered
            }
            Outcome::Failure => {
                let until = self.penalize(now, rng);
                tracing::debug!(penalty = ?(until - now), "probe failed; endpoint ejected again");
                Verdict::Reejected { until }
            }
        }
    }

    /// Puts the endpoint back in rotation at `now` without a probe (the owner needs it: too
    /// many of the service's endpoints are out). Accrual starts afresh; the penalty is kept, so
    /// if it trips again its next ejection is longer. Allocates nothing.
    pub fn close(&mut self, now: Instant) {
        self.state = State::Closed;
        self.reason = None;
        self.closed_since = now;
        self.consecutive_failures = 0;
        if let Some(window) = &mut self.window {
            window.clear(now);
        }
        self.assert_invariants();
    }

    /// Checks the breaker's fields agree (debug builds only).
    ///
    /// # Panics
    ///
    /// If an open breaker has no reason or a closed one has one, or the window exists without
    /// its policy.
    pub fn assert_invariants(&self) {
        if !cfg!(debug_assertions) {
            return;
        }
        assert_eq!(
            self.reason.is_some(),
            self.is_open(),
            "a reason exactly while open"
        );
        assert_eq!(
            self.window.is_some(),
            self.success_rate.is_some(),
            "a window exactly with the success-rate policy"
        );
        if self.is_open() {
            assert!(
                self.penalty.failures() > 0,
                "an open breaker has served a penalty"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::rand::DetRng;
    use crate::time::ms;

    const T0: Instant = Instant::ZERO;

    fn consecutive_only(n: u32) -> BreakerConfig {
        BreakerConfig::try_new(Some(n), None, *BreakerConfig::default().penalty(), 500).unwrap()
    }

    fn rate_only(threshold: u32, window_ms: u64, min: u32) -> BreakerConfig {
        let rate = SuccessRate::try_new(threshold, ms(window_ms), min).unwrap();
        BreakerConfig::try_new(None, Some(rate), *BreakerConfig::default().penalty(), 500).unwrap()
    }

    fn trip_and_eject(b: &mut Breaker, now: Instant, rng: &mut DetRng) -> Instant {
        loop {
            if let Verdict::Trip(reason) = b.handle_outcome(now, now, Outcome::Failure) {
                return b.eject(now, reason, rng);
            }
        }
    }

    #[test]
    fn defaults_are_the_issue_s() {
        let config = BreakerConfig::default();
        assert_eq!(config.consecutive_failures(), Some(7));
        let rate = config.success_rate().unwrap();
        assert_eq!(
            (
                rate.threshold_per_mille(),
                rate.window(),
                rate.min_requests()
            ),
            (500, Duration::from_secs(30), 20)
        );
        assert_eq!(
            (
                config.penalty().min(),
                config.penalty().max(),
                config.penalty().jitter_per_mille()
            ),
            (Duration::from_secs(1), Duration::from_secs(60), 500)
        );
        assert_eq!(config.max_ejected_per_mille(), 500);
        assert!(config.is_enabled());
        assert!(!BreakerConfig::disabled().is_enabled());
        assert_eq!(
            BreakerConfig::try_from(RawBreaker::default()),
            Ok(config),
            "an empty `breaker:` is the default"
        );
    }

    #[test]
    fn max_ejected_is_the_share_rounded_down_and_never_all() {
        let half = BreakerConfig::default();
        let counts: Vec<usize> = (0..=5).map(|n| half.max_ejected(n)).collect();
        assert_eq!(counts, [0, 0, 1, 1, 2, 2]);
        let all = BreakerConfig::try_new(Some(7), None, *half.penalty(), 1000).unwrap();
        assert_eq!(all.max_ejected(1), 0, "the last endpoint always stays");
        assert_eq!(all.max_ejected(4), 3);
        let none = BreakerConfig::try_new(Some(7), None, *half.penalty(), 0).unwrap();
        assert_eq!(none.max_ejected(100), 0);
    }

    #[test]
    fn seventh_consecutive_failure_trips_and_a_success_resets_the_count() {
        let mut b = Breaker::new(&consecutive_only(7), T0);
        for _ in 0..6 {
            assert_eq!(b.handle_outcome(T0, T0, Outcome::Failure), Verdict::None);
        }
        assert_eq!(b.handle_outcome(T0, T0, Outcome::Success), Verdict::None);
        assert_eq!(b.consecutive_failures(), 0);
        for _ in 0..6 {
            assert_eq!(b.handle_outcome(T0, T0, Outcome::Failure), Verdict::None);
        }
        assert_eq!(
            b.handle_outcome(T0, T0, Outcome::Failure),
            Verdict::Trip(Reason::ConsecutiveFailures)
        );
        // Not ejected by its owner (no room): still closed, and the next failure trips again.
        assert_eq!(b.state(), State::Closed);
        assert_eq!(
            b.handle_outcome(T0, T0, Outcome::Failure),
            Verdict::Trip(Reason::ConsecutiveFailures)
        );
    }

    #[test]
    fn success_rate_trips_below_the_threshold_once_enough_requests() {
        // 50 % over 10 s, at least 20 requests; alternate failures never make 7 in a row.
        let mut b = Breaker::new(&rate_only(500, 10_000, 20), T0);
        let mut now = T0;
        // 19 outcomes, 9 successes (47 %): below the threshold but too few requests.
        for i in 0..19 {
            now += ms(10);
            let outcome = if i % 2 == 1 {
                Outcome::Success
            } else {
                Outcome::Failure
            };
            assert_eq!(b.handle_outcome(now, T0, outcome), Verdict::None, "{i}");
        }
        // The 20th, a failure: 9 of 20 succeeded.
        assert_eq!(
            b.handle_outcome(now, T0, Outcome::Failure),
            Verdict::Trip(Reason::SuccessRate)
        );
        // Exactly at the threshold does not trip: below, not at.
        let mut b = Breaker::new(&rate_only(500, 10_000, 4), T0);
        for outcome in [Outcome::Success, Outcome::Success, Outcome::Failure] {
            assert_eq!(b.handle_outcome(T0, T0, outcome), Verdict::None);
        }
        assert_eq!(b.handle_outcome(T0, T0, Outcome::Failure), Verdict::None);
        assert_eq!(
            b.handle_outcome(T0, T0, Outcome::Failure),
            Verdict::Trip(Reason::SuccessRate)
        );
    }

    #[test]
    fn old_failures_leave_the_window() {
        let mut b = Breaker::new(&rate_only(500, 10_000, 20), T0);
        for _ in 0..15 {
            assert_eq!(b.handle_outcome(T0, T0, Outcome::Success), Verdict::None);
            assert_eq!(b.handle_outcome(T0, T0, Outcome::Failure), Verdict::None);
        }
        // 15 failures in 30: not below 50 %. Twenty seconds later they are forgotten, and ten
        // new failures are too few requests to judge.
        let later = T0 + ms(20_000);
        for _ in 0..10 {
            assert_eq!(b.handle_outcome(later, T0, Outcome::Failure), Verdict::None);
            assert_eq!(b.handle_outcome(later, T0, Outcome::Success), Verdict::None);
        }
    }

    #[test]
    fn penalties_double_with_jitter_and_reset_on_recovery() {
        let config = BreakerConfig::try_new(
            Some(1),
            None,
            BackoffConfig::try_new(ms(1_000), ms(60_000), 0).unwrap(),
            500,
        )
        .unwrap();
        let mut rng = DetRng::new(1);
        let mut b = Breaker::new(&config, T0);
        let mut now = trip_and_eject(&mut b, T0, &mut rng);
        assert_eq!(now, T0 + ms(1_000));
        assert_eq!(b.reason(), Some(Reason::ConsecutiveFailures));
        let mut penalties = Vec::new();
        for _ in 0..8 {
            assert!(
                !b.handle_timeout(now - ms(1)),
                "not before the penalty ends"
            );
            assert!(b.handle_timeout(now));
            assert!(b.start_probe());
            let Verdict::Reejected { until } =
                b.handle_probe_outcome(now, Outcome::Failure, &mut rng)
            else {
                panic!("a failed probe ejects again");
            };
            penalties.push((until - now).as_secs());
            now = until;
        }
        assert_eq!(penalties, [2, 4, 8, 16, 32, 60, 60, 60]);
        assert!(b.handle_timeout(now));
        assert!(b.start_probe());
        assert_eq!(
            b.handle_probe_outcome(now, Outcome::Success, &mut rng),
            Verdict::Recovered
        );
        assert_eq!(
            (b.state(), b.reason(), b.penalties()),
            (State::Closed, None, 0)
        );
        let until = trip_and_eject(&mut b, now, &mut rng);
        assert_eq!(
            until - now,
            ms(1_000),
            "the penalty starts over after a recovery"
        );
    }

    #[test]
    fn one_probe_at_a_time_and_an_abandoned_probe_decides_nothing() {
        let mut rng = DetRng::new(2);
        let mut b = Breaker::new(&consecutive_only(1), T0);
        let until = trip_and_eject(&mut b, T0, &mut rng);
        assert!(!b.admits());
        assert!(!b.start_probe(), "no probe while ejected");
        assert!(b.handle_timeout(until));
        assert!(b.admits());
        assert!(b.start_probe());
        assert!(!b.admits());
        assert!(!b.start_probe(), "a second probe waits for the first");
        b.abandon_probe();
        assert_eq!(b.state(), State::Probation { probing: false });
        assert_eq!(b.penalties(), 1, "an abandoned probe is no failure");
        assert!(b.start_probe());
        // Outcomes of regular requests (sent before the ejection) decide nothing now.
        assert_eq!(b.handle_outcome(until, T0, Outcome::Success), Verdict::None);
        assert_eq!(b.state(), State::Probation { probing: true });
    }

    #[test]
    fn outcomes_from_before_the_breaker_closed_are_ignored() {
        let mut rng = DetRng::new(3);
        let mut b = Breaker::new(&consecutive_only(2), T0);
        let until = trip_and_eject(&mut b, T0 + ms(5), &mut rng);
        assert_eq!(
            b.handle_outcome(until, T0, Outcome::Failure),
            Verdict::None,
            "ignored while ejected"
        );
        assert!(b.handle_timeout(until));
        assert!(b.start_probe());
        assert_eq!(
            b.handle_probe_outcome(until + ms(1), Outcome::Success, &mut rng),
            Verdict::Recovered
        );
        // Two failures of requests sent before the recovery: not accrued.
        for _ in 0..2 {
            assert_eq!(
                b.handle_outcome(until + ms(2), T0 + ms(1), Outcome::Failure),
                Verdict::None
            );
        }
        assert_eq!(b.consecutive_failures(), 0);
    }

    #[test]
    fn forced_close_restarts_accrual_but_keeps_the_penalty() {
        let mut rng = DetRng::new(4);
        let no_jitter = BackoffConfig::try_new(ms(1_000), ms(60_000), 0).unwrap();
        let config = BreakerConfig::try_new(Some(3), None, no_jitter, 500).unwrap();
        let mut b = Breaker::new(&config, T0);
        let until = trip_and_eject(&mut b, T0, &mut rng);
        assert_eq!(until, T0 + ms(1_000));
        b.close(T0 + ms(10));
        assert_eq!(b.state(), State::Closed);
        assert_eq!(b.consecutive_failures(), 0);
        assert_eq!(b.penalties(), 1);
        // Accrual starts afresh: two failures do not trip; the third does, for 2 s.
        for _ in 0..2 {
            assert_eq!(
                b.handle_outcome(T0 + ms(20), T0 + ms(20), Outcome::Failure),
                Verdict::None
            );
        }
        let again = trip_and_eject(&mut b, T0 + ms(20), &mut rng);
        assert_eq!(again - (T0 + ms(20)), ms(2_000));
    }

    #[test]
    fn disabled_never_trips() {
        let mut b = Breaker::new(&BreakerConfig::disabled(), T0);
        for i in 0..1_000 {
            assert_eq!(
                b.handle_outcome(T0 + ms(i), T0, Outcome::Failure),
                Verdict::None
            );
        }
    }

    #[test]
    fn raw_configs_validate_naming_the_field() {
        let penalty = |min: &str, max: &str| RawBreaker {
            backoff: Some(RawPenalty {
                min: Some(min.into()),
                max: Some(max.into()),
                jitter_per_mille: None,
            }),
            ..RawBreaker::default()
        };
        let rate = |threshold: Option<u32>, window: &str, min: Option<u32>| RawBreaker {
            success_rate: Some(RawSuccessRate {
                threshold_per_mille: threshold,
                window: Some(window.into()),
                min_requests: min,
            }),
            ..RawBreaker::default()
        };
        let cases = [
            (penalty("0s", "1s"), "backoff.min"),
            (penalty("2s", "1s"), "backoff.max"),
            (penalty("1s", "2h"), "backoff.max"),
            (penalty("soon", "1s"), "backoff.min"),
            (
                RawBreaker {
                    backoff: Some(RawPenalty {
                        jitter_per_mille: Some(1001),
                        ..RawPenalty::default()
                    }),
                    ..RawBreaker::default()
                },
                "backoff.jitter_per_mille",
            ),
            (
                rate(Some(1001), "30s", None),
                "success_rate.threshold_per_mille",
            ),
            (rate(None, "500ms", None), "success_rate.window"),
            (rate(None, "2h", None), "success_rate.window"),
            (rate(None, "30", None), "success_rate.window"),
            (rate(None, "30s", Some(0)), "success_rate.min_requests"),
            (
                RawBreaker {
                    max_ejected_per_mille: Some(1001),
                    ..RawBreaker::default()
                },
                "max_ejected_per_mille",
            ),
        ];
        for (raw, field) in cases {
            let err = BreakerConfig::try_from(raw.clone()).unwrap_err();
            assert_eq!(err.field, field, "{raw:?}: {err}");
        }
    }

    #[test]
    fn raw_zeroes_and_enabled_turn_policies_off() {
        let config = BreakerConfig::try_from(RawBreaker {
            consecutive_failures: Some(0),
            ..RawBreaker::default()
        })
        .unwrap();
        assert_eq!(config.consecutive_failures(), None);
        assert!(config.success_rate().is_some());
        let config = BreakerConfig::try_from(RawBreaker {
            success_rate: Some(RawSuccessRate {
                threshold_per_mille: Some(0),
                // Not read when the policy is off.
                window: Some("1h".into()),
                min_requests: Some(0),
            }),
            ..RawBreaker::default()
        });
        assert_eq!(config.map(|c| c.success_rate().is_none()), Ok(true));
        let off = BreakerConfig::try_from(RawBreaker {
            enabled: Some(false),
            consecutive_failures: Some(3),
            ..RawBreaker::default()
        })
        .unwrap();
        assert!(!off.is_enabled());
        let custom = BreakerConfig::try_from(RawBreaker {
            consecutive_failures: Some(3),
            success_rate: Some(RawSuccessRate {
                threshold_per_mille: Some(800),
                window: Some("10s".into()),
                min_requests: Some(5),
            }),
            backoff: Some(RawPenalty {
                min: Some("100ms".into()),
                max: Some("2s".into()),
                jitter_per_mille: Some(0),
            }),
            max_ejected_per_mille: Some(1000),
            ..RawBreaker::default()
        })
        .unwrap();
        assert_eq!(custom.consecutive_failures(), Some(3));
        let rate = custom.success_rate().unwrap();
        assert_eq!(
            (
                rate.threshold_per_mille(),
                rate.window(),
                rate.min_requests()
            ),
            (800, ms(10_000), 5)
        );
        assert_eq!(
            (custom.penalty().min(), custom.penalty().max()),
            (ms(100), ms(2_000))
        );
        assert_eq!(custom.max_ejected_per_mille(), 1000);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Outcome { failure: bool, sent_back_ms: u64 },
        Probe,
        ProbeOutcome { failure: bool },
        Abandon,
        Advance(u64),
        Close,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (any::<bool>(), 0u64..3_000).prop_map(|(failure, sent_back_ms)| Op::Outcome { failure, sent_back_ms }),
            2 => Just(Op::Probe),
            2 => any::<bool>().prop_map(|failure| Op::ProbeOutcome { failure }),
            1 => Just(Op::Abandon),
            2 => (0u64..70_000).prop_map(Op::Advance),
            1 => Just(Op::Close),
        ]
    }

    fn config() -> impl Strategy<Value = BreakerConfig> {
        (
            prop_oneof![Just(None), (1u32..10).prop_map(Some)],
            prop_oneof![
                Just(None),
                (1u32..=1000, 1u64..60, 1u32..30).prop_map(|(t, w, m)| Some(
                    SuccessRate::try_new(t, Duration::from_secs(w), m).unwrap()
                ))
            ],
            1u64..5_000,
            0u64..60_000,
            0u32..=1000,
        )
            .prop_map(|(consecutive, rate, min_ms, extra_ms, jitter)| {
                let penalty =
                    BackoffConfig::try_new(ms(min_ms), ms(min_ms + extra_ms), jitter).unwrap();
                BreakerConfig::try_new(consecutive, rate, penalty, 500).unwrap()
            })
    }

    proptest! {
        /// Under any sequence of outcomes, probes and time: penalties stay within the
        /// configured bounds, an ejected breaker admits nothing, a probation admits at most
        /// one probe at a time, and a breaker only opens through a trip its owner acted on.
        #[test]
        fn breaker_transitions_stay_legal(
            config in config(),
            seed: u64,
            ops in proptest::collection::vec(op(), 1..300),
        ) {
            let mut rng = DetRng::new(seed);
            let mut b = Breaker::new(&config, T0);
            let mut now = T0;
            let mut probes_out = 0u32;
            for op in ops {
                match op {
                    Op::Outcome { failure, sent_back_ms } => {
                        let outcome = if failure { Outcome::Failure } else { Outcome::Success };
                        let was = b.state();
                        match b.handle_outcome(now, now - ms(sent_back_ms), outcome) {
                            Verdict::None => {}
                            Verdict::Trip(reason) => {
                                prop_assert!(failure, "only a failure trips");
                                prop_assert_eq!(was, State::Closed);
                                let until = b.eject(now, reason, &mut rng);
                                let penalty = until - now;
                                prop_assert!(penalty >= config.penalty().min() && penalty <= config.penalty().max());
                            }
                            other => prop_assert!(false, "regular outcome gave {:?}", other),
                        }
                    }
                    Op::Probe => {
                        let admitted = b.admits();
                        let started = b.start_probe();
                        if started {
                            probes_out += 1;
                            prop_assert!(admitted);
                        }
                    }
                    Op::ProbeOutcome { failure } => {
                        let outcome = if failure { Outcome::Failure } else { Outcome::Success };
                        match b.handle_probe_outcome(now, outcome, &mut rng) {
                            Verdict::None => prop_assert_eq!(probes_out, 0),
                            Verdict::Recovered => {
                                prop_assert!(!failure);
                                prop_assert_eq!(b.state(), State::Closed);
                                prop_assert_eq!(b.penalties(), 0);
                                probes_out -= 1;
                            }
                            Verdict::Reejected { until } => {
                                prop_assert!(failure);
                                let penalty = until - now;
                                prop_assert!(penalty >= config.penalty().min() && penalty <= config.penalty().max());
                                probes_out -= 1;
                            }
                            Verdict::Trip(_) => prop_assert!(false, "a probe never trips"),
                        }
                    }
                    Op::Abandon => {
                        if b.state() == (State::Probation { probing: true }) {
                            probes_out -= 1;
                        }
                        b.abandon_probe();
                    }
                    Op::Advance(by) => {
                        now += ms(by);
                        let due = b.poll_timeout().is_some_and(|t| t <= now);
                        prop_assert_eq!(b.handle_timeout(now), due);
                    }
                    Op::Close => {
                        if b.state() == (State::Probation { probing: true }) {
                            probes_out -= 1;
                        }
                        b.close(now);
                    }
                }
                prop_assert!(probes_out <= 1, "at most one probe at a time");
                prop_assert_eq!(probes_out == 1, b.state() == State::Probation { probing: true });
                if let State::Ejected { .. } = b.state() {
                    prop_assert!(!b.admits());
                }
                if !config.is_enabled() {
                    prop_assert_eq!(b.state(), State::Closed);
                }
                b.assert_invariants();
            }
        }

        /// Same seed and inputs, same penalties.
        #[test]
        fn penalties_are_deterministic(seed: u64, rounds in 1usize..20) {
            let run = || {
                let mut rng = DetRng::new(seed);
                let mut b = Breaker::new(&consecutive_only(1), T0);
                let mut now = trip_and_eject(&mut b, T0, &mut rng);
                let mut ends = vec![now];
                for _ in 0..rounds {
                    let _ = b.handle_timeout(now);
                    let _ = b.start_probe();
                    if let Verdict::Reejected { until } = b.handle_probe_outcome(now, Outcome::Failure, &mut rng) {
                        now = until;
                        ends.push(until);
                    }
                }
                ends
            };
            prop_assert_eq!(run(), run());
        }

        /// Without jitter, the n-th penalty in a row is exactly `min x 2^n`, capped at `max`;
        /// with jitter, it stays within the jitter of that base and inside `[min, max]`.
        #[test]
        fn penalty_doubles_up_to_max(
            seed: u64,
            min_ms in 1u64..10_000,
            extra_ms in 0u64..600_000,
            jitter in 0u32..=1000,
            rounds in 1usize..40,
        ) {
            let (min, max) = (ms(min_ms), ms(min_ms + extra_ms));
            for jitter in [0, jitter] {
                let penalty = BackoffConfig::try_new(min, max, jitter).unwrap();
                let config = BreakerConfig::try_new(Some(1), None, penalty, 500).unwrap();
                let mut rng = DetRng::new(seed);
                let mut b = Breaker::new(&config, T0);
                let mut now = trip_and_eject(&mut b, T0, &mut rng);
                let mut got = vec![now - T0];
                for _ in 1..rounds {
                    prop_assert!(b.handle_timeout(now));
                    prop_assert!(b.start_probe());
                    let Verdict::Reejected { until } =
                        b.handle_probe_outcome(now, Outcome::Failure, &mut rng)
                    else {
                        return Err(TestCaseError::fail("a failed probe ejects again"));
                    };
                    got.push(until - now);
                    now = until;
                }
                for (n, &penalty) in got.iter().enumerate() {
                    let doublings = u32::try_from(n).unwrap().min(31);
                    let base = min.saturating_mul(1 << doublings).min(max);
                    prop_assert!(min <= penalty && penalty <= max, "{:?} outside bounds", penalty);
                    if jitter == 0 {
                        prop_assert_eq!(penalty, base, "penalty {}", n);
                    } else {
                        let spread = base.as_nanos() * u128::from(jitter) / 1000;
                        let off = penalty.as_nanos().abs_diff(base.as_nanos());
                        prop_assert!(off <= spread, "penalty {} is {:?}, base {:?}", n, penalty, base);
                    }
                }
            }
        }

        /// An ejected endpoint takes nothing before its penalty ends and admits exactly one
        /// probe from then on, however late the timeout is handled.
        #[test]
        fn ejected_endpoint_is_probed_after_its_penalty(
            config in config(),
            seed: u64,
            early_ms in 1u64..120_000,
            late_ms in 0u64..120_000,
        ) {
            prop_assume!(config.is_enabled());
            let mut rng = DetRng::new(seed);
            let mut b = Breaker::new(&config, T0);
            let mut now = T0;
            let until = loop {
                now += ms(1);
                if let Verdict::Trip(reason) = b.handle_outcome(now, now, Outcome::Failure) {
                    break b.eject(now, reason, &mut rng);
                }
            };
            prop_assert_eq!(b.poll_timeout(), Some(until));
            let before = until - ms(early_ms);
            if before >= now {
                prop_assert!(!b.handle_timeout(before));
                prop_assert!(!b.admits());
                prop_assert!(!b.start_probe());
            }
            prop_assert!(b.handle_timeout(until + ms(late_ms)));
            prop_assert_eq!(b.poll_timeout(), None);
            prop_assert!(b.admits());
            prop_assert!(b.start_probe());
            prop_assert!(!b.admits(), "one probe at a time");
            prop_assert!(!b.start_probe());
        }
    }
}
