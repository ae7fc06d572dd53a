//! Sending a request again: resends of requests nobody processed, route retry policies, the
//! retry budget, and speculative retries (hedging).
//!
//! # Resends of unprocessed requests
//!
//! A request an endpoint provably never processed may be sent again, whatever its method and
//! whatever its route says, because no work can be repeated (Linkerd's and every HTTP
//! client's rule). Proof comes from the transport: a connect that was refused or timed out,
//! an HTTP/2 stream the server refused (`REFUSED_STREAM`) or excluded with a graceful
//! `GOAWAY`, a reused HTTP/1.1 connection the server closed before any byte of a response
//! (RFC 9112 §9.3.1; only safe methods, since the server may have read the request before
//! closing). The request must still be whole: its body not yet read, or kept whole in the
//! replay buffer. These resends are free: they spend no budget ([`resend_unprocessed`]).
//!
//! # Retries
//!
//! A route with a [`RetryPolicy`] retries requests whose attempt failed in a way its response
//! classes call retryable (by default `500`, `502`, `503`, `504`, gRPC `UNAVAILABLE` and its
//! kin, and attempt timeouts; see `classify`). A retry needs all of:
//!
//! - the method is idempotent (RFC 9110 §9.2.2: `GET`, `HEAD`, `OPTIONS`, `TRACE`, `PUT`,
//!   `DELETE`), or the route says its other methods may be repeated too
//!   ([`RetryPolicy::non_idempotent`]);
//! - attempts left ([`RetryPolicy::max_attempts`], the first one and any hedges included);
//! - the request whole in hand: no body, or a body kept whole in the replay buffer (a larger
//!   body is streamed through without a copy and cannot be sent again);
//! - time left: the backoff before the retry ends before the request's deadline;
//! - the route's [`Budget`] has a retry to give.
//!
//! [`Retries`] makes that decision for one request, in that order, and says which condition
//! refused a retry ([`Skip`]) so the proxy can count it.
//!
//! # The budget
//!
//! Retries under failure multiply load exactly when a service can least take it. Each route
//! has one [`Budget`] (Linkerd's and Finagle's shape): every request deposits
//! [`BudgetConfig::ratio`] of a retry, which stays spendable for [`BudgetConfig::ttl`]; on top,
//! a reserve refills at [`BudgetConfig::min_per_second`] retries a second, holding at most one
//! second's worth, so a quiet route can still retry. A retry or a hedge withdraws one. Over any
//! run of length `T` that admits `n` requests, a budget therefore grants at most
//! `ratio x n + min_per_second x (T + 1 s)` retries (the property test below checks exactly
//! that), and a hard-failing service sees at most `1 + ratio` times its offered load plus the
//! reserve's trickle, never `max_attempts` times.
//!
//! # Hedging
//!
//! A route may send a *hedge*, a second copy of a request that is taking long, after a fixed
//! delay or after the route's observed latency quantile ([`HedgeDelay`]); the first response
//! wins and the others are cancelled. Hedges obey the same conditions as retries (an
//! idempotent method or the route's leave, a whole request, attempts left) and spend the same
//! budget, so a slow service is not flooded with copies.
//!
//! ```
//! use conduit_core::retry::{Budget, BudgetConfig, Decision, Retries, RetryPolicy, Skip};
//! use conduit_core::rand::DetRng;
//! use conduit_core::time::{Instant, ms};
//!
//! let policy = RetryPolicy::default(); // 2 attempts, 25-250 ms backoff, 0.2/10/10s budget
//! let mut budget = Budget::new(policy.budget, Instant::ZERO);
//! let mut rng = DetRng::new(1);
//! let now = Instant::ZERO + ms(5);
//!
//! budget.deposit(now); // a GET arrives
//! let mut retries = Retries::new(&policy, b"GET");
//! // Its first attempt got a 503: retried after a short backoff, from the reserve.
//! let Decision::Retry { after } = retries.after_failure(true, true, None, &mut budget, now, &mut rng)
//! else { panic!("a GET is retried") };
//! assert!(after >= ms(25) && after <= ms(250));
//! // The second failed too: two attempts were all the route allows.
//! let later = now + after;
//! assert_eq!(
//!     retries.after_failure(true, true, None, &mut budget, later, &mut rng),
//!     Decision::Skip(Skip::Attempts),
//! );
//! // A POST is not retried unless the route says so.
//! let mut post = Retries::new(&policy, b"POST");
//! assert_eq!(
//!     post.after_failure(true, true, None, &mut budget, later, &mut rng),
//!     Decision::Skip(Skip::Method),
//! );
//! ```

use core::fmt;
use core::time::Duration;

use serde::Deserialize;

use crate::backoff::{Backoff, BackoffConfig};
use crate::metrics::LatencyHistogram;
use crate::rand::Rng;
use crate::time::{Instant, parse_duration};

// === Resends of unprocessed requests ===

/// Attempts for a request that failed before any of it was processed: the first and at most
/// two more. A draining endpoint can fail one request twice (its `GOAWAY` refuses the stream,
/// then its closed listener refuses the connect) before the balancer takes it out of rotation;
/// beyond that the service is broadly unreachable and the error is the answer.
pub const MAX_UNPROCESSED_ATTEMPTS: u32 = 3;

/// What is known of an attempt that failed before the endpoint processed any of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unprocessed {
    /// Attempts made so far, this one included.
    pub attempts: u32,
    /// It failed to connect (refused, unreachable, timed out), as opposed to a refused stream
    /// or a closed reused connection.
    pub connect_failed: bool,
    /// The request can be sent again whole (its body unread, or kept whole).
    pub replayable: bool,
}

/// Whether and where to send a request again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resend {
    /// Answer with the error.
    No,
    /// To an endpoint the balancer offers now (never after a second wait in its queue).
    Elsewhere,
    /// To the same fixed target, on a new connection.
    Again,
}

/// Decides about a request that failed unprocessed. `balanced`: the request is balanced over
/// a service's endpoints (outbound); otherwise it has one fixed target (inbound: the local
/// app), for which only a refused stream or a closed reused connection is worth another try:
/// a refused connect would be refused again.
///
/// ```
/// use conduit_core::retry::{Resend, Unprocessed, resend_unprocessed};
///
/// let refused = Unprocessed { attempts: 1, connect_failed: true, replayable: true };
/// // A balanced request goes to another endpoint; the local app would refuse again.
/// assert_eq!(resend_unprocessed(refused, true), Resend::Elsewhere);
/// assert_eq!(resend_unprocessed(refused, false), Resend::No);
/// ```
#[must_use]
pub fn resend_unprocessed(failure: Unprocessed, balanced: bool) -> Resend {
    if !failure.replayable || failure.attempts >= MAX_UNPROCESSED_ATTEMPTS {
        return Resend::No;
    }
    match (balanced, failure.connect_failed) {
        (true, _) => Resend::Elsewhere,
        (false, false) => Resend::Again,
        (false, true) => Resend::No,
    }
}

// === Policies ===

/// Attempts a retryable route allows when its policy does not say: the first and one retry
/// (Linkerd's default retry limit of 1).
pub const DEFAULT_MAX_ATTEMPTS: u32 = 2;

/// The most attempts a policy may allow. Beyond a handful, retries only add load.
pub const MAX_ATTEMPTS: u32 = 10;

/// The shortest backoff between a failed attempt and its retry, by default: Linkerd's.
pub const DEFAULT_BACKOFF_MIN: Duration = Duration::from_millis(25);

/// The longest backoff between attempts, by default: Linkerd's.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_millis(250);

/// Backoff jitter, by default: 100 % either way (Linkerd's jitter ratio of 1), so retries of
/// requests that failed together spread out.
pub const DEFAULT_BACKOFF_JITTER_PER_MILLE: u32 = 1000;

/// The share of requests retries may add, by default, in thousandths: 20 % (Linkerd's).
pub const DEFAULT_BUDGET_RATIO_PERMILLE: u32 = 200;

/// The largest ratio accepted, in thousandths: 1,000 retries per request (Linkerd's bound).
pub const MAX_BUDGET_RATIO_PERMILLE: u32 = 1_000_000;

/// Retries a second a budget allows whatever the request rate, by default (Linkerd's).
pub const DEFAULT_MIN_RETRIES_PER_SECOND: u32 = 10;

/// The largest reserve rate accepted.
pub const MAX_MIN_RETRIES_PER_SECOND: u32 = 100_000;

/// How long a request's deposit stays spendable, by default (Linkerd's).
pub const DEFAULT_BUDGET_TTL: Duration = Duration::from_secs(10);

/// The shortest TTL accepted (Linkerd's bound).
pub const MIN_BUDGET_TTL: Duration = Duration::from_secs(1);

/// The longest TTL accepted (Linkerd's bound).
pub const MAX_BUDGET_TTL: Duration = Duration::from_secs(60);

/// Hedges a hedging route sends at most per request, by default.
pub const DEFAULT_MAX_HEDGES: u32 = 1;

/// The most hedges a policy may allow per request.
pub const MAX_HEDGES: u32 = 4;

/// Latency samples a route needs in its window before a quantile may set the hedge delay:
/// fewer say too little about the tail, and the route does not hedge until it has them.
pub const MIN_HEDGE_SAMPLES: u64 = 20;

/// The shortest hedge delay: below it a hedge is nearly a duplicate of every request.
pub const MIN_HEDGE_DELAY: Duration = Duration::from_millis(1);

/// The slots a budget's deposits are kept in: a deposit is forgotten between `ttl x 9/10`
/// and `ttl` after it was made.
const BUDGET_SLOTS: usize = 10;

/// A retry, in the budget's unit (thousandths of a retry).
const RETRY: u64 = 1000;

/// How a route retries its failed requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first and any hedges included (`2..=`[`MAX_ATTEMPTS`]).
    pub max_attempts: u32,
    /// The wait between a failed attempt and the next.
    pub backoff: BackoffConfig,
    /// Methods that are not idempotent (`POST`, `PATCH`, ...) may be retried too: the route's
    /// owner vouches that repeating them is harmless.
    pub non_idempotent: bool,
    /// The route's budget.
    pub budget: BudgetConfig,
    /// Speculative retries, when the route sends them.
    pub hedge: Option<HedgePolicy>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            backoff: default_backoff(),
            non_idempotent: false,
            budget: BudgetConfig::default(),
            hedge: None,
        }
    }
}

fn default_backoff() -> BackoffConfig {
    BackoffConfig::try_new(
        DEFAULT_BACKOFF_MIN,
        DEFAULT_BACKOFF_MAX,
        DEFAULT_BACKOFF_JITTER_PER_MILLE,
    )
    .unwrap_or_default()
}

/// A retry budget's settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BudgetConfig {
    ratio_permille: u32,
    min_per_second: u32,
    ttl: Duration,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            ratio_permille: DEFAULT_BUDGET_RATIO_PERMILLE,
            min_per_second: DEFAULT_MIN_RETRIES_PER_SECOND,
            ttl: DEFAULT_BUDGET_TTL,
        }
    }
}

impl BudgetConfig {
    /// A budget that lets retries add `ratio_permille` thousandths of the requests, each
    /// deposit spendable for `ttl`, plus `min_per_second` retries a second.
    ///
    /// # Errors
    ///
    /// A field out of its bounds, named as the file names it (`ratio`, `min_per_second`,
    /// `ttl`).
    pub fn try_new(
        ratio_permille: u32,
        min_per_second: u32,
        ttl: Duration,
    ) -> Result<Self, InvalidRetry> {
        if ratio_permille > MAX_BUDGET_RATIO_PERMILLE {
            return Err(InvalidRetry::new(
                "budget.ratio",
                format!("at most {}", MAX_BUDGET_RATIO_PERMILLE / 1000),
            ));
        }
        if min_per_second > MAX_MIN_RETRIES_PER_SECOND {
            return Err(InvalidRetry::new(
                "budget.min_per_second",
                format!("at most {MAX_MIN_RETRIES_PER_SECOND}"),
            ));
        }
        if !(MIN_BUDGET_TTL..=MAX_BUDGET_TTL).contains(&ttl) {
            return Err(InvalidRetry::new(
                "budget.ttl",
                format!("between {MIN_BUDGET_TTL:?} and {MAX_BUDGET_TTL:?}"),
            ));
        }
        Ok(Self {
            ratio_permille,
            min_per_second,
            ttl,
        })
    }

    /// The share of requests retries may add, in thousandths.
    #[must_use]
    pub fn ratio_permille(&self) -> u32 {
        self.ratio_permille
    }

    /// The share of requests retries may add.
    #[must_use]
    pub fn ratio(&self) -> f64 {
        f64::from(self.ratio_permille) / 1000.0
    }

    /// Retries a second allowed whatever the request rate.
    #[must_use]
    pub fn min_per_second(&self) -> u32 {
        self.min_per_second
    }

    /// How long a request's deposit stays spendable.
    #[must_use]
    pub fn ttl(&self) -> Duration {
        self.ttl
    }
}

/// When a hedge goes out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HedgeDelay {
    /// This long after the previous attempt went out.
    Fixed(Duration),
    /// After the route's latency quantile `permille / 1000` (p95 is 950) over its recent
    /// window, once the window holds [`MIN_HEDGE_SAMPLES`] samples.
    Quantile {
        /// The quantile, in thousandths (`1..=999`).
        permille: u32,
    },
}

impl fmt::Display for HedgeDelay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fixed(delay) => write!(f, "{delay:?}"),
            Self::Quantile { permille } if permille % 10 == 0 => write!(f, "p{}", permille / 10),
            Self::Quantile { permille } => write!(f, "p{}.{}", permille / 10, permille % 10),
        }
    }
}

/// How a route hedges.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HedgePolicy {
    /// When a hedge goes out.
    pub after: HedgeDelay,
    /// Hedges per request at most (`1..=`[`MAX_HEDGES`]).
    pub max: u32,
}

impl HedgePolicy {
    /// The delay before a hedge given the route's recent latencies (`None`: not enough samples
    /// for a quantile, and no hedge). Never below [`MIN_HEDGE_DELAY`].
    #[must_use]
    pub fn delay(&self, latencies: &LatencyHistogram) -> Option<Duration> {
        let delay = match self.after {
            HedgeDelay::Fixed(delay) => delay,
            HedgeDelay::Quantile { permille } => {
                if latencies.count() < MIN_HEDGE_SAMPLES {
                    return None;
                }
                latencies.quantile(f64::from(permille) / 1000.0)?
            }
        };
        Some(delay.max(MIN_HEDGE_DELAY))
    }
}

// === As written ===

/// A route's retry policy as written.
///
/// ```yaml
/// retry:
///   max_attempts: 3                 # default 2: the first and one retry
///   backoff: { min: 25ms, max: 250ms }
///   non_idempotent: false           # true: POST, PATCH, ... may be repeated too
///   budget: { ratio: 0.2, min_per_second: 10, ttl: 10s }
///   hedge: { after: p95, max: 1 }   # or after: 50ms
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, serde::Serialize))]
#[serde(default, deny_unknown_fields)]
pub struct RawRetry {
    /// See [`RetryPolicy::max_attempts`].
    pub max_attempts: Option<u32>,
    /// See [`RetryPolicy::backoff`].
    pub backoff: RawRetryBackoff,
    /// See [`RetryPolicy::non_idempotent`].
    pub non_idempotent: bool,
    /// See [`RetryPolicy::budget`].
    pub budget: RawBudget,
    /// See [`RetryPolicy::hedge`].
    pub hedge: Option<RawHedge>,
}

/// A retry backoff as written (durations like `25ms`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, serde::Serialize))]
#[serde(default, deny_unknown_fields)]
pub struct RawRetryBackoff {
    /// The shortest wait (default [`DEFAULT_BACKOFF_MIN`]).
    pub min: Option<String>,
    /// The longest wait (default [`DEFAULT_BACKOFF_MAX`]).
    pub max: Option<String>,
}

/// A budget as written.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, serde::Serialize))]
#[serde(default, deny_unknown_fields)]
pub struct RawBudget {
    /// The share of requests retries may add (`0.2`).
    pub ratio: Option<Ratio>,
    /// Retries a second allowed whatever the request rate.
    pub min_per_second: Option<u32>,
    /// How long a deposit stays spendable (`10s`).
    pub ttl: Option<String>,
}

/// A non-negative decimal as written (`0.2`), compared by its bits so that the raw types stay
/// `Eq`.
#[derive(Clone, Copy, Debug, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, serde::Serialize))]
#[serde(transparent)]
pub struct Ratio(pub f64);

impl PartialEq for Ratio {
    fn eq(&self, other: &Self) -> bool {
        self.0.to_bits() == other.0.to_bits()
    }
}

impl Eq for Ratio {}

/// A hedging policy as written.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, serde::Serialize))]
#[serde(default, deny_unknown_fields)]
pub struct RawHedge {
    /// A duration (`50ms`) or a latency quantile of the route (`p95`, `p99.9`). Required.
    pub after: Option<String>,
    /// Hedges per request at most (default [`DEFAULT_MAX_HEDGES`]).
    pub max: Option<u32>,
}

/// Why a retry policy was rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct InvalidRetry {
    /// The field at fault, below `retry` (`budget.ttl`).
    pub field: &'static str,
    /// What is wrong.
    pub problem: String,
}

impl InvalidRetry {
    fn new(field: &'static str, problem: impl Into<String>) -> Self {
        Self {
            field,
            problem: problem.into(),
        }
    }
}

fn duration(field: &'static str, text: Option<&str>) -> Result<Option<Duration>, InvalidRetry> {
    text.map(|text| {
        parse_duration(text).ok_or_else(|| {
            InvalidRetry::new(
                field,
                format!("`{text}` is not a duration (like 25ms, 2s, 1m)"),
            )
        })
    })
    .transpose()
}

impl RetryPolicy {
    /// Validates a policy.
    ///
    /// # Errors
    ///
    /// Attempts outside `2..=`[`MAX_ATTEMPTS`], a backoff with a zero or inverted range, a
    /// hedge with a zero delay or more than [`MAX_HEDGES`] hedges, or a budget out of bounds.
    pub fn try_new(
        max_attempts: u32,
        backoff: BackoffConfig,
        non_idempotent: bool,
        budget: BudgetConfig,
        hedge: Option<HedgePolicy>,
    ) -> Result<Self, InvalidRetry> {
        if !(2..=MAX_ATTEMPTS).contains(&max_attempts) {
            return Err(InvalidRetry::new(
                "max_attempts",
                format!("between 2 and {MAX_ATTEMPTS} (the first attempt included)"),
            ));
        }
        if let Some(hedge) = hedge {
            if !(1..=MAX_HEDGES).contains(&hedge.max) {
                return Err(InvalidRetry::new(
                    "hedge.max",
                    format!("between 1 and {MAX_HEDGES}"),
                ));
            }
            match hedge.after {
                HedgeDelay::Fixed(delay) if delay < MIN_HEDGE_DELAY => {
                    return Err(InvalidRetry::new(
                        "hedge.after",
                        format!("at least {MIN_HEDGE_DELAY:?}"),
                    ));
                }
                HedgeDelay::Quantile { permille } if !(1..=999).contains(&permille) => {
                    return Err(InvalidRetry::new(
                        "hedge.after",
                        "a quantile between p0.1 and p99.9",
                    ));
                }
                _ => {}
            }
        }
        Ok(Self {
            max_attempts,
            backoff,
            non_idempotent,
            budget,
            hedge,
        })
    }
}

/// Parses a hedge delay: a duration (`50ms`) or a quantile (`p95`, `p99.9`).
fn hedge_delay(text: &str) -> Result<HedgeDelay, InvalidRetry> {
    let bad = || {
        InvalidRetry::new(
            "hedge.after",
            format!("`{text}` is neither a duration (50ms) nor a quantile (p95, p99.9)"),
        )
    };
    let Some(quantile) = text.trim().strip_prefix('p') else {
        return parse_duration(text).map(HedgeDelay::Fixed).ok_or_else(bad);
    };
    let (whole, tenth) = quantile.split_once('.').unwrap_or((quantile, "0"));
    if whole.is_empty()
        || whole.len() > 2
        || tenth.len() != 1
        || !whole
            .bytes()
            .chain(tenth.bytes())
            .all(|b| b.is_ascii_digit())
    {
        return Err(bad());
    }
    let whole: u32 = whole.parse().map_err(|_| bad())?;
    let tenth: u32 = tenth.parse().map_err(|_| bad())?;
    Ok(HedgeDelay::Quantile {
        permille: whole * 10 + tenth,
    })
}

impl TryFrom<RawRetry> for RetryPolicy {
    type Error = InvalidRetry;

    fn try_from(raw: RawRetry) -> Result<Self, InvalidRetry> {
        let min = duration("backoff.min", raw.backoff.min.as_deref())?;
        let max = duration("backoff.max", raw.backoff.max.as_deref())?;
        let (min, max) = match (min, max) {
            (None, None) => (DEFAULT_BACKOFF_MIN, DEFAULT_BACKOFF_MAX),
            (Some(min), None) => (min, min.max(DEFAULT_BACKOFF_MAX)),
            (None, Some(max)) => (DEFAULT_BACKOFF_MIN.min(max), max),
            (Some(min), Some(max)) => (min, max),
        };
        let backoff = BackoffConfig::try_new(min, max, DEFAULT_BACKOFF_JITTER_PER_MILLE)
            .map_err(|e| InvalidRetry::new("backoff", e.to_string()))?;
        let ratio_permille = match raw.budget.ratio {
            None => DEFAULT_BUDGET_RATIO_PERMILLE,
            Some(Ratio(ratio)) if ratio.is_finite() && ratio >= 0.0 => {
                let permille = (ratio * 1000.0).round();
                if permille > f64::from(MAX_BUDGET_RATIO_PERMILLE) {
                    return Err(InvalidRetry::new(
                        "budget.ratio",
                        format!("at most {}", MAX_BUDGET_RATIO_PERMILLE / 1000),
                    ));
                }
                // In range: 0 ..= MAX_BUDGET_RATIO_PERMILLE.
                #[expect(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    reason = "checked above"
                )]
                let permille = permille as u32;
                permille
            }
            Some(Ratio(ratio)) => {
                return Err(InvalidRetry::new(
                    "budget.ratio",
                    format!("`{ratio}` is not a non-negative number"),
                ));
            }
        };
        let ttl = duration("budget.ttl", raw.budget.ttl.as_deref())?.unwrap_or(DEFAULT_BUDGET_TTL);
        let budget = BudgetConfig::try_new(
            ratio_permille,
            raw.budget
                .min_per_second
                .unwrap_or(DEFAULT_MIN_RETRIES_PER_SECOND),
            ttl,
        )?;
        let hedge = raw
            .hedge
            .map(|raw| {
                let after = raw
                    .after
                    .ok_or_else(|| InvalidRetry::new("hedge.after", "required"))?;
                Ok(HedgePolicy {
                    after: hedge_delay(&after)?,
                    max: raw.max.unwrap_or(DEFAULT_MAX_HEDGES),
                })
            })
            .transpose()?;
        Self::try_new(
            raw.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS),
            backoff,
            raw.non_idempotent,
            budget,
            hedge,
        )
    }
}

// === The budget ===

/// One route's retry budget: deposits from requests, withdrawals by retries and hedges.
///
/// Amounts are kept in thousandths of a retry, so ratios need no floating point and the bound
/// is exact.
#[derive(Clone, Debug)]
pub struct Budget {
    config: BudgetConfig,
    slot_nanos: u64,
    /// Deposits by slot: `(slot number, thousandths left)`; a slot's deposits are spendable
    /// until the ring comes round to it again.
    slots: [(u64, u64); BUDGET_SLOTS],
    /// The reserve, in thousandths, and the instant it was last topped up to.
    reserve: u64,
    refilled: Instant,
}

impl Budget {
    /// A budget with a full reserve (one second of `min_per_second`) and no deposits.
    #[must_use]
    pub fn new(config: BudgetConfig, now: Instant) -> Self {
        let ttl = u64::try_from(config.ttl.as_nanos()).unwrap_or(u64::MAX);
        Self {
            config,
            slot_nanos: (ttl / BUDGET_SLOTS as u64).max(1),
            slots: [(0, 0); BUDGET_SLOTS],
            reserve: Self::reserve_cap(config),
            refilled: now,
        }
    }

    fn reserve_cap(config: BudgetConfig) -> u64 {
        u64::from(config.min_per_second) * RETRY
    }

    /// The settings.
    #[must_use]
    pub fn config(&self) -> &BudgetConfig {
        &self.config
    }

    fn slot_of(&self, now: Instant) -> u64 {
        now.as_nanos() / self.slot_nanos
    }

    /// A request arrived: it adds `ratio` of a retry, spendable for the TTL.
    pub fn deposit(&mut self, now: Instant) {
        let slot = self.slot_of(now);
        let entry = &mut self.slots[index(slot)];
        if entry.0 != slot {
            *entry = (slot, 0);
        }
        entry.1 = entry
            .1
            .saturating_add(u64::from(self.config.ratio_permille));
    }

    /// Takes one retry from the budget if it has one: deposits first, oldest first, then the
    /// reserve. `false`: the budget is exhausted, and nothing was taken.
    pub fn try_withdraw(&mut self, now: Instant) -> bool {
        self.refill(now);
        let current = self.slot_of(now);
        let oldest = current.saturating_sub(BUDGET_SLOTS as u64 - 1);
        let deposits: u64 = self
            .slots
            .iter()
            .filter(|(slot, _)| (oldest..=current).contains(slot))
            .map(|(_, left)| left)
            .sum();
        if deposits.saturating_add(self.reserve) < RETRY {
            return false;
        }
        let mut owed = RETRY;
        for slot in oldest..=current {
            let entry = &mut self.slots[index(slot)];
            if entry.0 == slot {
                let take = entry.1.min(owed);
                entry.1 -= take;
                owed -= take;
            }
            if owed == 0 {
                return true;
            }
        }
        self.reserve -= owed;
        true
    }

    /// Whole retries the budget could give at `now`.
    #[must_use]
    pub fn available(&self, now: Instant) -> u64 {
        let mut copy = self.clone();
        copy.refill(now);
        let current = copy.slot_of(now);
        let oldest = current.saturating_sub(BUDGET_SLOTS as u64 - 1);
        let deposits: u64 = copy
            .slots
            .iter()
            .filter(|(slot, _)| (oldest..=current).contains(slot))
            .map(|(_, left)| left)
            .sum();
        (deposits + copy.reserve) / RETRY
    }

    /// Tops the reserve up by `min_per_second` for the time since the last top-up, up to one
    /// second's worth. Fractions of a thousandth are carried, not lost.
    fn refill(&mut self, now: Instant) {
        let cap = Self::reserve_cap(self.config);
        let rate = u128::from(self.config.min_per_second);
        if self.reserve >= cap || rate == 0 {
            self.refilled = self.refilled.max(now);
            return;
        }
        let elapsed = now.saturating_duration_since(self.refilled).as_nanos();
        // `rate` retries a second are `rate` thousandths a millisecond.
        let added = elapsed * rate / 1_000_000;
        let added = u64::try_from(added).unwrap_or(u64::MAX);
        if self.reserve.saturating_add(added) >= cap {
            self.reserve = cap;
            self.refilled = now;
        } else if added > 0 {
            self.reserve += added;
            // Exactly the time the whole thousandths took; the remainder stays to be counted.
            let used = u128::from(added) * 1_000_000 / rate;
            let used = u64::try_from(used).unwrap_or(u64::MAX);
            self.refilled = Instant::from_nanos(self.refilled.as_nanos().saturating_add(used));
        }
    }
}

fn index(slot: u64) -> usize {
    // The remainder is below BUDGET_SLOTS.
    usize::try_from(slot % BUDGET_SLOTS as u64).unwrap_or(0)
}

// === One request's retries ===

/// Whether `method` may be repeated without changing the outcome (RFC 9110 §9.2.2).
#[must_use]
pub fn idempotent(method: &[u8]) -> bool {
    matches!(
        method,
        b"GET" | b"HEAD" | b"OPTIONS" | b"TRACE" | b"PUT" | b"DELETE"
    )
}

/// Why a failed attempt was not retried, or a hedge not sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Skip {
    /// The failure is not of a retryable class (a `404`, a reset after the request was sent).
    NotRetryable,
    /// The method is not idempotent and the route does not allow repeating it.
    Method,
    /// The route's attempts are used up.
    Attempts,
    /// The request's body is not kept whole (too large to replay, or still streaming).
    Body,
    /// The request's deadline would pass before the retry could go.
    Deadline,
    /// The route's budget is exhausted.
    Budget,
}

impl Skip {
    /// A stable name for the `reason` metric label.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::NotRetryable => "not_retryable",
            Self::Method => "method",
            Self::Attempts => "attempts",
            Self::Body => "body_too_large",
            Self::Deadline => "deadline",
            Self::Budget => "budget",
        }
    }
}

/// What to do about a failed attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Send the request again after this backoff (the budget has paid for it).
    Retry {
        /// The wait before the retry.
        after: Duration,
    },
    /// Answer with the failure.
    Skip(Skip),
}

/// One request's retries: what its route allows it, and what it has used.
#[derive(Clone, Debug)]
pub struct Retries {
    max_attempts: u32,
    allowed: bool,
    hedges_left: u32,
    attempts: u32,
    backoff: Backoff,
}

impl Retries {
    /// The retries a request with `method` may have under `policy`; it has made its first
    /// attempt.
    #[must_use]
    pub fn new(policy: &RetryPolicy, method: &[u8]) -> Self {
        Self {
            max_attempts: policy.max_attempts,
            allowed: policy.non_idempotent || idempotent(method),
            hedges_left: policy.hedge.map_or(0, |h| h.max),
            attempts: 1,
            backoff: Backoff::new(policy.backoff),
        }
    }

    /// Whether the request may be hedged at all: its route hedges and its method may be
    /// repeated. (Each hedge is still decided by [`hedge`](Self::hedge).)
    #[must_use]
    pub fn may_hedge(&self) -> bool {
        self.hedges_left > 0 && self.allowed
    }

    /// Attempts so far, hedges included.
    #[must_use]
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Decides about an attempt that failed at `now`: `retryable`, its class says it may be
    /// retried; `replayable`, the request is whole in hand; `remaining`, the time left before
    /// the request's deadline (`None`: no deadline). A retry is paid for from `budget`.
    pub fn after_failure(
        &mut self,
        retryable: bool,
        replayable: bool,
        remaining: Option<Duration>,
        budget: &mut Budget,
        now: Instant,
        rng: &mut impl Rng,
    ) -> Decision {
        if let Err(skip) = self.check(retryable, replayable) {
            return Decision::Skip(skip);
        }
        let after = self.backoff.next_delay(rng);
        if remaining.is_some_and(|left| left <= after) {
            return Decision::Skip(Skip::Deadline);
        }
        if !budget.try_withdraw(now) {
            return Decision::Skip(Skip::Budget);
        }
        self.attempts += 1;
        Decision::Retry { after }
    }

    /// Whether a hedge may go out at `now` (a route with a hedging policy only); a hedge that
    /// may is counted and paid for.
    ///
    /// # Errors
    ///
    /// Why not.
    pub fn hedge(
        &mut self,
        replayable: bool,
        budget: &mut Budget,
        now: Instant,
    ) -> Result<(), Skip> {
        if self.hedges_left == 0 {
            return Err(Skip::Attempts);
        }
        self.check(true, replayable)?;
        if !budget.try_withdraw(now) {
            return Err(Skip::Budget);
        }
        self.hedges_left -= 1;
        self.attempts += 1;
        Ok(())
    }

    fn check(&self, retryable: bool, replayable: bool) -> Result<(), Skip> {
        if !retryable {
            Err(Skip::NotRetryable)
        } else if !self.allowed {
            Err(Skip::Method)
        } else if self.attempts >= self.max_attempts {
            Err(Skip::Attempts)
        } else if !replayable {
            Err(Skip::Body)
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests;
