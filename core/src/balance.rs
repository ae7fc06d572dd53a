//! Per-request load balancing: the endpoint set, PeakEWMA load, power-of-two-choices, and the
//! queue that decides whether a request may wait for an endpoint.
//!
//! A [`Balancer`] owns one service's endpoints as discovery reports them ([`Update`]s, which
//! carry versions and never go backwards) and answers one question per request: which ready
//! endpoint should take it ([`Balancer::pick`]). The answer comes with an [`InFlight`] handle that
//! counts the request against its endpoint until the handle is dropped, so a cancelled request
//! can never leak load. When the response headers arrive the caller reports the round-trip time
//! ([`Balancer::observe`]), which feeds the endpoint's [`PeakEwma`] estimate.
//!
//! # The algorithm
//!
//! The default policy is Finagle's and Linkerd's: P2C over PeakEWMA (reference/linkerd.md §1.7;
//! Mitzenmacher, "The Power of Two Choices in Randomized Load Balancing", 2001). Two distinct
//! ready endpoints are drawn at random, weighted by their configured weights, and the one with
//! the lower cost wins (the first on a tie). Cost is `rtt_estimate x (in_flight + 1)`: the
//! estimate jumps to any slower observation at once (the peak) and otherwise moves toward new
//! observations with weight `exp(-elapsed / decay)`, decaying toward zero while idle so an
//! endpoint that was once slow is probed again. Defaults: [`DEFAULT_RTT`] and [`DEFAULT_DECAY`].
//!
//! Endpoint weights decide how often an endpoint is *considered*, not how the comparison goes:
//! among many endpoints of equal health, traffic leans toward the heavier ones, but latency and
//! load still decide, and with only two endpoints both are always considered, so there a weight
//! only drains (0) or not. Exact traffic splits belong to route-level backend weights.
//!
//! [`Policy::LeastLoaded`] picks the ready endpoint with the fewest requests in flight, with
//! ties broken at random by weight. It suits backends whose latency says little about their
//! load (long polls, streams).
//!
//! An endpoint is *ready* unless its weight is 0 (drained) or a connection attempt to it failed
//! recently: [`Balancer::handle_connect_error`] takes it out of rotation for an exponential,
//! jittered backoff ([`DEFAULT_CONNECT_BACKOFF_MIN`]..[`DEFAULT_CONNECT_BACKOFF_MAX`]).
//!
//! # Circuit breaking
//!
//! Each endpoint has a [`Breaker`] (`conduit_core::breaker`) under the balancer's
//! [`BreakerConfig`] ([`Balancer::set_breaker`]). The caller reports each request's outcome
//! with [`Balancer::handle_outcome`], which settles its [`InFlight`] handle. When a breaker
//! trips and the service can spare the endpoint (at most [`BreakerConfig::max_ejected`] of the
//! service's endpoints out at once, and never the last one), the endpoint is *ejected*: it
//! leaves the ready set for its penalty, then comes back on *probation*, a candidate for
//! exactly one request at a time (the probe, marked by [`InFlight::is_probe`]), whose outcome
//! readmits it or ejects it again. A probe dropped without an outcome (cancelled) decides
//! nothing: the endpoint becomes a candidate for another probe.
//!
//! **When the maximum share bites.** A tripped breaker whose endpoint cannot be spared leaves
//! it in rotation (reported as [`BreakerEvent::Spared`]): callers keep reaching the failing
//! endpoint, and see its failures, rather than piling onto too few healthy ones. If discovery
//! shrinks the service so that more endpoints are out than the share allows, the ones whose
//! penalty ends soonest are readmitted without a probe. And the breaker never makes the
//! balancer refuse a request: when every endpoint that could take one is ejected or has its
//! probe out (the others being drained or backing off after connection failures), picks fall
//! back to all of them, as if there were no breaker.
//!
//! # The queue
//!
//! When no endpoint is ready a request asks the [`Queue`] whether it may wait
//! ([`Queue::admit`]). It may, up to [`QueueConfig::capacity`] waiters (beyond that, load is
//! shed), until the balancer has been without a ready endpoint for
//! [`QueueConfig::failfast_timeout`]; from then on the queue *fails fast*: every waiter and every
//! new request is refused at once, until an endpoint becomes ready again. This is Linkerd's
//! behaviour (a 504 for fail-fast and a 503 for load shedding at the proxy).
//!
//! # Drive loop
//!
//! The caller owns sharing (a mutex around one balancer and its queue), reads the clock, and
//! turns decisions into IO:
//!
//! 1. Feed discovery: `balancer.handle_update(now, update)`.
//! 2. Per request: `balancer.pick(now, &mut rng)`. On `Some(picked)`, send the request to
//!    `picked.addr`; when response headers arrive call `balancer.observe(now, &picked.in_flight)`;
//!    when the response ends and is classified, settle the handle with
//!    `balancer.handle_outcome(now, picked.in_flight, outcome, &mut rng)` (or just drop it when
//!    the request is abandoned without an outcome).
//! 3. On `None`: `queue.admit(now)`; on [`Admit::Wait`] wait until an endpoint becomes ready or
//!    the deadline passes, then call `queue.leave()` and pick again or fail.
//! 4. Whenever `balancer.ready_len()` moves between zero and non-zero, tell the queue with
//!    [`Queue::handle_readiness`].
//! 5. Wake at the earliest of `balancer.poll_timeout()` and `queue.poll_timeout()` and call the
//!    matching `handle_timeout(now)`.
//!
//! ```
//! use conduit_core::balance::{Balancer, BalanceConfig, Change, Update};
//! use conduit_core::mesh::Endpoint;
//! use conduit_core::rand::DetRng;
//! use conduit_core::time::{Instant, ms};
//!
//! let t0 = Instant::ZERO;
//! let mut rng = DetRng::new(7);
//! let mut balancer = Balancer::new(BalanceConfig::default());
//! let endpoints = vec![
//!     Endpoint::new("10.0.0.1:80".parse().unwrap()),
//!     Endpoint::new("10.0.0.2:80".parse().unwrap()),
//! ];
//! balancer.handle_update(t0, Update { version: 1, change: Change::Replace(endpoints) }).unwrap();
//!
//! let picked = balancer.pick(t0, &mut rng).expect("two ready endpoints");
//! assert_eq!(balancer.in_flight(picked.addr), Some(1));
//! balancer.observe(t0 + ms(12), &picked.in_flight); // response headers after 12 ms
//! drop(picked);                                       // response body finished
//! assert_eq!(balancer.in_flight_total(), 0);
//! ```

use core::net::SocketAddr;
use core::time::Duration;
use std::collections::BTreeMap;
use std::sync::Arc;

use crate::breaker::{Breaker, BreakerConfig, Reason, State, Verdict};
use crate::classify::Outcome;
use crate::mesh::Endpoint;
use crate::rand::Rng;
use crate::time::Instant;

/// The RTT an endpoint is assumed to have before anything is observed: Linkerd's default.
///
/// High enough that a fresh endpoint is not flooded before it has answered once, low enough
/// that it is tried soon.
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);

/// How quickly old RTT observations fade: Linkerd's default time constant.
pub const DEFAULT_DECAY: Duration = Duration::from_secs(10);

/// The floor under any configured default RTT (Linkerd's `MIN_DEFAULT_RTT`): a zero estimate
/// would make every fresh endpoint look free.
pub const MIN_DEFAULT_RTT: Duration = Duration::from_millis(1);

/// First wait after a failed connection attempt before the endpoint is tried again.
pub const DEFAULT_CONNECT_BACKOFF_MIN: Duration = Duration::from_millis(100);

/// Longest wait between connection attempts to a failing endpoint. Short, because discovery, not
/// the balancer, decides whether an endpoint exists; the backoff only stops a refusing endpoint
/// from taking every request in the meantime.
pub const DEFAULT_CONNECT_BACKOFF_MAX: Duration = Duration::from_millis(500);

/// Jitter added to each connect backoff, in thousandths of the backoff: 10 %, so endpoints that
/// failed together are not retried in lockstep.
pub const DEFAULT_CONNECT_BACKOFF_JITTER_PER_MILLE: u64 = 100;

/// How many requests may wait for an endpoint before load is shed: the Linkerd policy
/// controller's default.
pub const DEFAULT_QUEUE_CAPACITY: usize = 100;

/// How long the balancer may be without a ready endpoint before requests fail fast: Linkerd's
/// outbound default.
pub const DEFAULT_FAILFAST_TIMEOUT: Duration = Duration::from_secs(3);

/// How endpoints are chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Policy {
    /// Power of two choices over PeakEWMA cost (latency-aware). The default.
    #[default]
    PeakEwma,
    /// The ready endpoint with the fewest requests in flight.
    LeastLoaded,
    /// Ready endpoints in turn, each as often as its weight (spread out: smooth weighted
    /// round robin), whatever their latency or load:
    /// the baseline the latency-aware policies are measured against (a red-line comparison),
    /// not a policy to run in production.
    RoundRobin,
}

impl Policy {
    /// The policy named `peak_ewma`, `least_loaded` or `round_robin`.
    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "peak_ewma" => Some(Self::PeakEwma),
            "least_loaded" => Some(Self::LeastLoaded),
            "round_robin" => Some(Self::RoundRobin),
            _ => None,
        }
    }
}

/// A balancer's settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BalanceConfig {
    /// How endpoints are chosen.
    pub policy: Policy,
    /// The RTT assumed for an endpoint before any observation (floored at [`MIN_DEFAULT_RTT`]).
    pub default_rtt: Duration,
    /// The time constant with which RTT observations fade.
    pub decay: Duration,
    /// First backoff after a failed connection attempt.
    pub connect_backoff_min: Duration,
    /// Longest backoff after repeated failed connection attempts.
    pub connect_backoff_max: Duration,
    /// Circuit breaking (both policies on by default; [`Balancer::set_breaker`] changes it
    /// later).
    pub breaker: BreakerConfig,
}

impl Default for BalanceConfig {
    fn default() -> Self {
        Self {
            policy: Policy::default(),
            default_rtt: DEFAULT_RTT,
            decay: DEFAULT_DECAY,
            connect_backoff_min: DEFAULT_CONNECT_BACKOFF_MIN,
            connect_backoff_max: DEFAULT_CONNECT_BACKOFF_MAX,
            breaker: BreakerConfig::default(),
        }
    }
}

/// A discovery update for one service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Update {
    /// Strictly increasing per service; an update at or below the current version is stale.
    pub version: u64,
    /// What changed.
    pub change: Change,
}

/// What a discovery update changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// These endpoints exist (new ones are added, known ones updated in place).
    Add(Vec<Endpoint>),
    /// These endpoints are gone (unknown addresses are ignored).
    Remove(Vec<SocketAddr>),
    /// The endpoint set is exactly this (a snapshot).
    Replace(Vec<Endpoint>),
    /// The service exists and has no endpoints.
    NoEndpoints,
}

/// What is known about the service's endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Discovery {
    /// Discovery has not answered yet.
    Unknown,
    /// Discovery says the service has no endpoints.
    NoEndpoints,
    /// Discovery has listed at least one endpoint.
    Endpoints,
}

/// An update that would move the endpoint set backwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("stale discovery update: version {got} is not newer than {current}")]
pub struct StaleUpdate {
    /// The version already applied.
    pub current: u64,
    /// The version offered.
    pub got: u64,
}

/// A request's claim on an endpoint: counts as in flight until dropped.
///
/// Hold it until the response ends. Dropping it is the only way to settle it, so a request
/// whose future is cancelled at any point settles too.
#[derive(Debug)]
#[must_use = "the request counts as in flight until this handle is dropped"]
pub struct InFlight {
    addr: SocketAddr,
    started: Instant,
    // The endpoint incarnation's counter: the strong count minus the balancer's own reference
    // is the number of requests in flight. Tower's PeakEwma counts the same way. An atomic
    // reference count is the one piece of shared state in the core; it is what makes settling
    // on drop correct by construction, and it involves no lock and no clock.
    token: Arc<()>,
    // For the probe of an endpoint on probation: the endpoint's probe token, counted the same
    // way, so a probe dropped without an outcome is noticed (and another may go).
    probe: Option<Arc<()>>,
}

impl InFlight {
    /// The endpoint the request went to.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// When the endpoint was picked.
    #[must_use]
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Whether this request is the probe of an endpoint on probation: its outcome decides
    /// whether the endpoint returns to rotation.
    #[must_use]
    pub fn is_probe(&self) -> bool {
        self.probe.is_some()
    }
}

/// What a request's outcome did to its endpoint's breaker, for metrics and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum BreakerEvent {
    /// The endpoint was ejected from rotation.
    Ejected {
        /// The endpoint.
        addr: SocketAddr,
        /// The policy that tripped.
        reason: Reason,
        /// When its penalty ends.
        until: Instant,
    },
    /// A policy tripped but the endpoint stays in rotation: ejecting it would put more than the
    /// maximum share of the service's endpoints out.
    Spared {
        /// The endpoint.
        addr: SocketAddr,
        /// The policy that tripped.
        reason: Reason,
    },
    /// The endpoint's probe succeeded: it is back in rotation.
    Readmitted {
        /// The endpoint.
        addr: SocketAddr,
    },
    /// The endpoint's probe failed: it is ejected again, for a longer penalty.
    Reejected {
        /// The endpoint.
        addr: SocketAddr,
        /// When the new penalty ends.
        until: Instant,
    },
}

/// The outcome of a successful pick.
#[derive(Debug)]
#[must_use = "dropping the pick settles it at once"]
pub struct Picked {
    /// Where to send the request.
    pub addr: SocketAddr,
    /// The request's claim on the endpoint.
    pub in_flight: InFlight,
}

/// A read-only view of one endpoint, for metrics and debugging.
#[derive(Clone, Debug, PartialEq)]
pub struct EndpointView<'a> {
    /// The endpoint as discovery described it.
    pub endpoint: &'a Endpoint,
    /// Whether it is a candidate for picks now.
    pub ready: bool,
    /// Whether it is backing off after failed connection attempts.
    pub backing_off: bool,
    /// Requests in flight to it.
    pub in_flight: u32,
    /// Its current (decayed) RTT estimate.
    pub rtt_estimate: Duration,
    /// Consecutive failed connection attempts.
    pub connect_failures: u32,
    /// Its circuit breaker's state.
    pub breaker: State,
}

/// Counts describing a balancer, as plain data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BalanceStats {
    /// Endpoints known.
    pub endpoints: usize,
    /// Endpoints ready for picks.
    pub ready: usize,
    /// Requests in flight across all endpoints.
    pub in_flight: u64,
    /// Discovery updates applied.
    pub updates: u64,
    /// Stale discovery updates refused.
    pub stale_updates: u64,
    /// Endpoints out of rotation by their breaker now (ejected, or on probation).
    pub ejected: usize,
    /// Ejections from rotation so far, by [`Reason::index`] (a failed probe's re-ejection is
    /// not counted again).
    pub ejections: [u64; 2],
    /// Trips that left their endpoint in rotation because of the maximum ejected share.
    pub spared: u64,
    /// Whether picks are falling back to endpoints the breaker has taken out (see the module
    /// docs).
    pub breaker_fallback: bool,
}

/// PeakEWMA: a latency estimate that rises at once and falls slowly.
///
/// Finagle's and tower's algorithm with time passed in. Reading the estimate decays it toward
/// zero (as an observation of 0 would) without mutating, so a read-only pick needs no `&mut`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PeakEwma {
    estimate_ns: f64,
    stamp: Instant,
    decay_ns: f64,
}

impl PeakEwma {
    /// A fresh estimate of `initial` at `now`, fading with time constant `decay`.
    #[must_use]
    pub fn new(now: Instant, initial: Duration, decay: Duration) -> Self {
        Self {
            estimate_ns: duration_ns(initial),
            stamp: now,
            // A zero decay would divide by zero; one nanosecond means "forget at once".
            decay_ns: duration_ns(decay).max(1.0),
        }
    }

    /// Folds in one RTT observation made at `now`.
    pub fn observe(&mut self, now: Instant, rtt: Duration) {
        let rtt_ns = duration_ns(rtt);
        let decayed = self.decayed_ns(now);
        self.estimate_ns = if rtt_ns > decayed {
            // The peak: a slower observation replaces the estimate at once.
            rtt_ns
        } else {
            // `decayed` is the old estimate already weighted by `exp(-elapsed / decay)`; the
            // new observation fills the rest.
            decayed + rtt_ns * (1.0 - self.weight(now))
        };
        if now > self.stamp {
            self.stamp = now;
        }
    }

    /// The estimate at `now`, decayed toward zero since the last observation.
    #[must_use]
    pub fn estimate(&self, now: Instant) -> Duration {
        ns_duration(self.decayed_ns(now))
    }

    fn decayed_ns(&self, now: Instant) -> f64 {
        self.estimate_ns * self.weight(now)
    }

    /// `exp(-elapsed / decay)`: 1 for no elapsed time, approaching 0 as time passes.
    fn weight(&self, now: Instant) -> f64 {
        let elapsed = duration_ns(now.saturating_duration_since(self.stamp));
        (-elapsed / self.decay_ns).exp()
    }
}

#[expect(
    clippy::cast_precision_loss,
    reason = "estimates need no sub-nanosecond precision"
)]
fn duration_ns(duration: Duration) -> f64 {
    duration.as_nanos() as f64
}

fn ns_duration(ns: f64) -> Duration {
    // Saturating float-to-int conversion (NaN becomes 0) is exactly the behaviour wanted.
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "saturating"
    )]
    Duration::from_nanos(ns as u64)
}

#[derive(Debug)]
struct Slot {
    endpoint: Endpoint,
    ewma: PeakEwma,
    token: Arc<()>,
    connect_failures: u32,
    /// While set, the endpoint is backing off after a failed connection attempt.
    backoff_until: Option<Instant>,
    breaker: Breaker,
    /// Counts the probe out, as `token` counts requests: one reference while none is.
    probe: Arc<()>,
    /// Round robin's running credit (smooth weighted round robin).
    credit: i64,
}

impl Slot {
    fn in_flight(&self) -> u32 {
        // Never negative: the slot holds one reference itself.
        u32::try_from(Arc::strong_count(&self.token) - 1).unwrap_or(u32::MAX)
    }

    /// Able to take requests, whatever its breaker says: not drained, not backing off.
    fn is_eligible(&self) -> bool {
        self.endpoint.weight > 0 && self.backoff_until.is_none()
    }

    /// A candidate for picks while the breaker's word is followed.
    fn is_ready(&self) -> bool {
        self.is_eligible() && self.breaker.admits()
    }

    /// The breaker's probe is out (its handle not yet settled or dropped).
    fn probe_out(&self) -> bool {
        Arc::strong_count(&self.probe) > 1
    }

    /// PeakEWMA cost: `estimate x (in_flight + 1)`.
    fn cost(&self, now: Instant) -> f64 {
        self.ewma.decayed_ns(now) * (f64::from(self.in_flight()) + 1.0)
    }
}

/// One service's endpoints and the decision of which takes the next request.
#[derive(Debug)]
pub struct Balancer {
    config: BalanceConfig,
    discovery: Discovery,
    version: Option<u64>,
    slots: Vec<Slot>,
    by_addr: BTreeMap<SocketAddr, usize>,
    /// Indices of ready slots, and the running sum of their weights (same length).
    ready: Vec<usize>,
    ready_weights: Vec<u64>,
    /// The ready set ignores the breaker: no endpoint it admits is eligible.
    fallback: bool,
    /// Endpoints whose probe was handed out and not yet settled; checked for probes dropped
    /// without an outcome. At most one entry per endpoint.
    probing: Vec<SocketAddr>,
    ejections: [u64; 2],
    spared: u64,
    updates: u64,
    stale_updates: u64,
}

impl Balancer {
    /// An empty balancer that has heard nothing from discovery yet.
    #[must_use]
    pub fn new(config: BalanceConfig) -> Self {
        let config = BalanceConfig {
            default_rtt: config.default_rtt.max(MIN_DEFAULT_RTT),
            connect_backoff_max: config.connect_backoff_max.max(config.connect_backoff_min),
            ..config
        };
        Self {
            config,
            discovery: Discovery::Unknown,
            version: None,
            slots: Vec::new(),
            by_addr: BTreeMap::new(),
            ready: Vec::new(),
            ready_weights: Vec::new(),
            fallback: false,
            probing: Vec::new(),
            ejections: [0; 2],
            spared: 0,
            updates: 0,
            stale_updates: 0,
        }
    }

    /// The balancer's settings (after flooring).
    #[must_use]
    pub fn config(&self) -> &BalanceConfig {
        &self.config
    }

    /// Applies a discovery update.
    ///
    /// Endpoints that survive an update keep their load estimate and backoff; an endpoint whose
    /// weight, identity or labels changed is updated in place. Requests in flight to a removed
    /// endpoint stay valid and settle normally; their observations are ignored.
    ///
    /// # Errors
    ///
    /// [`StaleUpdate`] when `update.version` is not newer than the last applied version; the
    /// balancer is unchanged.
    pub fn handle_update(&mut self, now: Instant, update: Update) -> Result<(), StaleUpdate> {
        if let Some(current) = self.version
            && update.version <= current
        {
            self.stale_updates += 1;
            tracing::debug!(
                current,
                got = update.version,
                "ignoring stale discovery update"
            );
            return Err(StaleUpdate {
                current,
                got: update.version,
            });
        }
        self.version = Some(update.version);
        self.updates += 1;
        match update.change {
            Change::Add(endpoints) => {
                for endpoint in endpoints {
                    self.upsert(now, endpoint);
                }
            }
            Change::Remove(addrs) => {
                for addr in addrs {
                    self.remove(addr);
                }
            }
            Change::Replace(endpoints) => {
                let keep: BTreeMap<SocketAddr, ()> =
                    endpoints.iter().map(|e| (e.addr, ())).collect();
                let gone: Vec<SocketAddr> = self
                    .by_addr
                    .keys()
                    .filter(|a| !keep.contains_key(a))
                    .copied()
                    .collect();
                for addr in gone {
                    self.remove(addr);
                }
                for endpoint in endpoints {
                    self.upsert(now, endpoint);
                }
            }
            Change::NoEndpoints => {
                self.slots.clear();
                self.by_addr.clear();
                self.probing.clear();
            }
        }
        self.discovery = if self.slots.is_empty() {
            Discovery::NoEndpoints
        } else {
            Discovery::Endpoints
        };
        self.enforce_max_ejected(now);
        self.rebuild_ready();
        self.assert_invariants();
        Ok(())
    }

    fn upsert(&mut self, now: Instant, endpoint: Endpoint) {
        if let Some(&index) = self.by_addr.get(&endpoint.addr) {
            self.slots[index].endpoint = endpoint;
            return;
        }
        self.by_addr.insert(endpoint.addr, self.slots.len());
        self.slots.push(Slot {
            endpoint,
            ewma: PeakEwma::new(now, self.config.default_rtt, self.config.decay),
            token: Arc::new(()),
            connect_failures: 0,
            backoff_until: None,
            breaker: Breaker::new(&self.config.breaker, now),
            probe: Arc::new(()),
            credit: 0,
        });
    }

    fn remove(&mut self, addr: SocketAddr) {
        let Some(index) = self.by_addr.remove(&addr) else {
            return;
        };
        self.slots.swap_remove(index);
        if let Some(moved) = self.slots.get(index) {
            self.by_addr.insert(moved.endpoint.addr, index);
        }
        self.probing.retain(|probing| *probing != addr);
    }

    /// Readmits endpoints without a probe while more are out than the breaker's maximum share
    /// of the current endpoints allows (discovery removed others): on probation first, then
    /// those whose penalty ends soonest, ties by address.
    fn enforce_max_ejected(&mut self, now: Instant) {
        let max = self.config.breaker.max_ejected(self.slots.len());
        let mut open: Vec<(Option<Instant>, SocketAddr, usize)> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, slot)| slot.breaker.is_open())
            .map(|(index, slot)| (slot.breaker.poll_timeout(), slot.endpoint.addr, index))
            .collect();
        if open.len() <= max {
            return;
        }
        // `None` (probation) sorts first.
        open.sort_unstable();
        for &(_, addr, index) in &open[..open.len() - max] {
            tracing::debug!(endpoint.addr = %addr, "too many endpoints out; readmitting without a probe");
            self.slots[index].breaker.close(now);
        }
    }

    /// Changes the circuit-breaking settings at `now`. A change starts every endpoint's breaker
    /// afresh (closed, no penalty served); the same settings again change nothing.
    pub fn set_breaker(&mut self, now: Instant, config: BreakerConfig) {
        if config == self.config.breaker {
            return;
        }
        self.config.breaker = config;
        for slot in &mut self.slots {
            slot.breaker = Breaker::new(&config, now);
            // Probes out under the old settings become regular requests of the new breaker.
            slot.probe = Arc::new(());
        }
        self.probing.clear();
        self.rebuild_ready();
        self.assert_invariants();
    }

    fn rebuild_ready(&mut self) {
        self.fallback = false;
        self.collect_ready(Slot::is_ready);
        if self.ready.is_empty() {
            // Never refuse because of the breaker: fall back to every eligible endpoint.
            self.collect_ready(Slot::is_eligible);
            self.fallback = !self.ready.is_empty();
            if self.fallback {
                tracing::debug!(
                    endpoints = self.ready.len(),
                    "every eligible endpoint is out by its breaker; picking among them"
                );
            }
        }
    }

    fn collect_ready(&mut self, candidate: fn(&Slot) -> bool) {
        self.ready.clear();
        self.ready_weights.clear();
        let mut total = 0u64;
        for (index, slot) in self.slots.iter().enumerate() {
            if candidate(slot) {
                total += u64::from(slot.endpoint.weight);
                self.ready.push(index);
                self.ready_weights.push(total);
            }
        }
    }

    /// What discovery has said about the service.
    #[must_use]
    pub fn discovery(&self) -> Discovery {
        self.discovery
    }

    /// The last applied discovery version.
    #[must_use]
    pub fn version(&self) -> Option<u64> {
        self.version
    }

    /// How many endpoints are candidates for picks.
    #[must_use]
    pub fn ready_len(&self) -> usize {
        self.ready.len()
    }

    /// How many endpoints are known.
    #[must_use]
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether no endpoints are known.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Chooses the endpoint for one request, or `None` when no endpoint is ready.
    ///
    /// A pick that lands on an endpoint on probation is its probe ([`InFlight::is_probe`]):
    /// the endpoint takes no other request until the probe settles.
    pub fn pick(&mut self, now: Instant, rng: &mut impl Rng) -> Option<Picked> {
        self.pick_avoiding(now, rng, None)
    }

    /// [`pick`](Self::pick), but never `avoid` while another endpoint is ready: a retry goes
    /// elsewhere than the attempt that just failed (an endpoint that fails fast can look like
    /// the cheapest, and would otherwise draw its own retries).
    pub fn pick_avoiding(
        &mut self,
        now: Instant,
        rng: &mut impl Rng,
        avoid: Option<SocketAddr>,
    ) -> Option<Picked> {
        if !self.probing.is_empty() {
            self.reap_abandoned_probes();
        }
        let index = match self.ready.len() {
            0 => return None,
            1 => self.ready[0],
            _ => match self.config.policy {
                Policy::PeakEwma => self.pick_p2c(now, rng, avoid),
                Policy::LeastLoaded => self.pick_least_loaded(rng, avoid),
                Policy::RoundRobin => self.pick_round_robin(avoid),
            },
        };
        let slot = &mut self.slots[index];
        let addr = slot.endpoint.addr;
        let probe = slot.breaker.start_probe().then(|| Arc::clone(&slot.probe));
        let in_flight = InFlight {
            addr,
            started: now,
            token: Arc::clone(&slot.token),
            probe,
        };
        tracing::trace!(endpoint.addr = %addr, in_flight = slot.in_flight(), probe = in_flight.is_probe(), "picked endpoint");
        if in_flight.is_probe() {
            // The endpoint takes nothing else until its probe settles.
            self.probing.push(addr);
            self.rebuild_ready();
            self.assert_invariants();
        }
        Some(Picked { addr, in_flight })
    }

    /// Probes dropped without an outcome decide nothing: their endpoints may be probed again.
    fn reap_abandoned_probes(&mut self) {
        let mut changed = false;
        let (slots, by_addr) = (&mut self.slots, &self.by_addr);
        self.probing.retain(|addr| {
            let Some(slot) = by_addr.get(addr).map(|&index| &mut slots[index]) else {
                return false;
            };
            if slot.breaker.state() != (State::Probation { probing: true }) {
                return false;
            }
            if slot.probe_out() {
                return true;
            }
            tracing::debug!(endpoint.addr = %addr, "probe abandoned without an outcome");
            slot.breaker.abandon_probe();
            changed = true;
            false
        });
        if changed {
            self.rebuild_ready();
        }
    }

    /// Two distinct ready endpoints drawn by weight; the cheaper wins, the first on a tie.
    fn pick_p2c(&self, now: Instant, rng: &mut impl Rng, avoid: Option<SocketAddr>) -> usize {
        let (a, b) = self.draw_two(rng);
        // The two are distinct: when one is to be avoided, the other goes.
        let avoided = |i: usize| avoid == Some(self.slots[i].endpoint.addr);
        if !avoided(a) && (avoided(b) || self.slots[a].cost(now) <= self.slots[b].cost(now)) {
            a
        } else {
            b
        }
    }

    /// Positions (in `ready`) of two distinct endpoints, drawn without replacement by weight.
    fn draw_two(&self, rng: &mut impl Rng) -> (usize, usize) {
        let total = self.ready_weights.last().copied().unwrap_or(0);
        let n = self.ready.len();
        if total == 0 {
            // Unreachable while weight-0 endpoints are never ready; kept total for safety.
            let first = index_of(rng.below(n as u64));
            let mut second = index_of(rng.below(n as u64 - 1));
            if second >= first {
                second += 1;
            }
            return (self.ready[first], self.ready[second]);
        }
        let first = self.position_of_weight(rng.below(total));
        let first_low = if first == 0 {
            0
        } else {
            self.ready_weights[first - 1]
        };
        let first_weight = self.ready_weights[first] - first_low;
        // Draw from the other endpoints' weights by skipping over the first one's span.
        let mut point = rng.below(total - first_weight);
        if point >= first_low {
            point += first_weight;
        }
        let second = self.position_of_weight(point);
        debug_assert_ne!(first, second);
        (self.ready[first], self.ready[second])
    }

    /// The position in `ready` whose weight span contains `point` (`point < total`).
    fn position_of_weight(&self, point: u64) -> usize {
        self.ready_weights
            .partition_point(|&cumulative| cumulative <= point)
    }

    /// Smooth weighted round robin (as nginx does it): every ready endpoint gains its weight in
    /// credit, the one with the most (the first on a tie, never `avoid`) is picked and pays
    /// the total. Each endpoint takes turns in proportion to its weight, spread out rather
    /// than in runs.
    fn pick_round_robin(&mut self, avoid: Option<SocketAddr>) -> usize {
        let mut total = 0i64;
        let mut best: Option<(usize, i64)> = None;
        for &index in &self.ready {
            let slot = &mut self.slots[index];
            let weight = i64::from(slot.endpoint.weight);
            slot.credit = slot.credit.saturating_add(weight);
            total = total.saturating_add(weight);
            if avoid != Some(slot.endpoint.addr)
                && best.is_none_or(|(_, credit)| slot.credit > credit)
            {
                best = Some((index, slot.credit));
            }
        }
        let best = best.map(|(index, _)| index);
        // Called with two or more ready: one that is not avoided is always there.
        let best = best.unwrap_or(self.ready[0]);
        self.slots[best].credit = self.slots[best].credit.saturating_sub(total);
        best
    }

    /// Fewest in flight; ties broken at random in proportion to weight.
    fn pick_least_loaded(&self, rng: &mut impl Rng, avoid: Option<SocketAddr>) -> usize {
        let mut best = self.ready[0];
        let mut best_load = u32::MAX;
        let mut tied_weight = 0u64;
        for &index in &self.ready {
            let slot = &self.slots[index];
            // Called with two or more ready: another is always there.
            if avoid == Some(slot.endpoint.addr) {
                continue;
            }
            let load = slot.in_flight();
            let weight = u64::from(slot.endpoint.weight);
            if load < best_load {
                best = index;
                best_load = load;
                tied_weight = weight;
            } else if load == best_load {
                // Weighted reservoir sampling over the tied endpoints.
                tied_weight += weight;
                if rng.below(tied_weight) < weight {
                    best = index;
                }
            }
        }
        best
    }

    /// Records the round-trip time of the request holding `in_flight`, measured at `now`.
    ///
    /// Observations for endpoints that have since been removed (or removed and re-added) are
    /// ignored.
    pub fn observe(&mut self, now: Instant, in_flight: &InFlight) {
        if let Some(slot) = self.slot_of(in_flight) {
            let rtt = now.saturating_duration_since(in_flight.started);
            slot.ewma.observe(now, rtt);
        }
    }

    /// Settles the request holding `in_flight`, whose outcome became known at `now`: its
    /// endpoint's breaker accrues it (or, for a probe, decides on it), and the endpoint leaves
    /// or rejoins rotation as the breaker says, within the maximum ejected share.
    ///
    /// Returns what changed, if anything. Outcomes for endpoints that have since been removed
    /// (or removed and re-added) are ignored. Allocates nothing.
    pub fn handle_outcome(
        &mut self,
        now: Instant,
        in_flight: InFlight,
        outcome: Outcome,
        rng: &mut impl Rng,
    ) -> Option<BreakerEvent> {
        let addr = in_flight.addr;
        let index = *self.by_addr.get(&addr)?;
        let slot = &mut self.slots[index];
        if !Arc::ptr_eq(&slot.token, &in_flight.token) {
            return None;
        }
        let probe = in_flight
            .probe
            .as_ref()
            .is_some_and(|probe| Arc::ptr_eq(probe, &slot.probe));
        let verdict = if probe {
            slot.breaker.handle_probe_outcome(now, outcome, rng)
        } else {
            slot.breaker.handle_outcome(now, in_flight.started, outcome)
        };
        // Counted only on a trip (rare), so a settle costs no scan of the endpoints.
        let room = |slots: &[Slot]| {
            let open = slots.iter().filter(|s| s.breaker.is_open()).count();
            (open, open < self.config.breaker.max_ejected(slots.len()))
        };
        let event = match verdict {
            Verdict::None => None,
            Verdict::Trip(reason) => match room(&self.slots) {
                (_, true) => {
                    let until = self.slots[index].breaker.eject(now, reason, rng);
                    tracing::debug!(endpoint.addr = %addr, %reason, ?until, "endpoint ejected");
                    self.ejections[reason.index()] += 1;
                    Some(BreakerEvent::Ejected {
                        addr,
                        reason,
                        until,
                    })
                }
                (open, false) => {
                    tracing::debug!(endpoint.addr = %addr, %reason, open, "breaker tripped; too many endpoints out to eject");
                    self.spared += 1;
                    Some(BreakerEvent::Spared { addr, reason })
                }
            },
            Verdict::Recovered => Some(BreakerEvent::Readmitted { addr }),
            Verdict::Reejected { until } => Some(BreakerEvent::Reejected { addr, until }),
        };
        // Settled: the request no longer counts, and its probe is over.
        drop(in_flight);
        if probe {
            self.probing.retain(|probing| *probing != addr);
        }
        if matches!(
            event,
            Some(BreakerEvent::Ejected { .. } | BreakerEvent::Readmitted { .. })
        ) || probe
        {
            self.rebuild_ready();
        }
        self.assert_invariants();
        event
    }

    fn slot_of(&mut self, in_flight: &InFlight) -> Option<&mut Slot> {
        let index = *self.by_addr.get(&in_flight.addr)?;
        let slot = &mut self.slots[index];
        Arc::ptr_eq(&slot.token, &in_flight.token).then_some(slot)
    }

    /// A connection attempt to `addr` failed: take it out of rotation for a backoff.
    ///
    /// The backoff doubles with each consecutive failure from
    /// [`BalanceConfig::connect_backoff_min`] up to [`BalanceConfig::connect_backoff_max`], with
    /// up to [`DEFAULT_CONNECT_BACKOFF_JITTER_PER_MILLE`] of jitter. Unknown addresses are ignored.
    pub fn handle_connect_error(&mut self, now: Instant, addr: SocketAddr, rng: &mut impl Rng) {
        let Some(&index) = self.by_addr.get(&addr) else {
            return;
        };
        let (min, max) = (
            self.config.connect_backoff_min,
            self.config.connect_backoff_max,
        );
        let slot = &mut self.slots[index];
        let exponent = slot.connect_failures.min(20);
        slot.connect_failures = slot.connect_failures.saturating_add(1);
        let base = min.saturating_mul(1 << exponent).min(max);
        let base_ms = u64::try_from(base.as_millis()).unwrap_or(u64::MAX);
        let jitter_ms = rng.below(base_ms * DEFAULT_CONNECT_BACKOFF_JITTER_PER_MILLE / 1000 + 1);
        let until = now + base + Duration::from_millis(jitter_ms);
        tracing::debug!(endpoint.addr = %addr, failures = slot.connect_failures, backoff = ?(until - now), "endpoint backing off");
        slot.backoff_until = Some(until);
        self.rebuild_ready();
        self.assert_invariants();
    }

    /// A connection to `addr` was established: forget its failures.
    pub fn handle_connect_success(&mut self, addr: SocketAddr) {
        let Some(&index) = self.by_addr.get(&addr) else {
            return;
        };
        let slot = &mut self.slots[index];
        slot.connect_failures = 0;
        if slot.backoff_until.take().is_some() {
            self.rebuild_ready();
        }
        self.assert_invariants();
    }

    /// The next instant at which an endpoint's connect backoff or breaker penalty ends.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.slots
            .iter()
            .flat_map(|slot| [slot.backoff_until, slot.breaker.poll_timeout()])
            .flatten()
            .min()
    }

    /// Returns endpoints whose connect backoff has ended to rotation, and puts those whose
    /// breaker penalty has ended on probation. Spurious calls are no-ops.
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut changed = false;
        for slot in &mut self.slots {
            if slot.backoff_until.is_some_and(|until| until <= now) {
                slot.backoff_until = None;
                changed = true;
            }
            changed |= slot.breaker.handle_timeout(now);
        }
        if !self.probing.is_empty() {
            self.reap_abandoned_probes();
        }
        if changed {
            self.rebuild_ready();
        }
        self.assert_invariants();
    }

    /// Requests in flight to `addr`, or `None` for an unknown endpoint.
    #[must_use]
    pub fn in_flight(&self, addr: SocketAddr) -> Option<u32> {
        self.by_addr
            .get(&addr)
            .map(|&index| self.slots[index].in_flight())
    }

    /// Requests in flight across all current endpoints.
    #[must_use]
    pub fn in_flight_total(&self) -> u64 {
        self.slots
            .iter()
            .map(|slot| u64::from(slot.in_flight()))
            .sum()
    }

    /// Every endpoint, ordered by address.
    pub fn endpoints(&self, now: Instant) -> impl Iterator<Item = EndpointView<'_>> {
        self.by_addr.values().map(move |&index| {
            let slot = &self.slots[index];
            EndpointView {
                endpoint: &slot.endpoint,
                ready: slot.is_ready() || (self.fallback && slot.is_eligible()),
                backing_off: slot.backoff_until.is_some(),
                in_flight: slot.in_flight(),
                rtt_estimate: slot.ewma.estimate(now),
                connect_failures: slot.connect_failures,
                breaker: slot.breaker.state(),
            }
        })
    }

    /// Counts describing the balancer.
    #[must_use]
    pub fn stats(&self) -> BalanceStats {
        BalanceStats {
            endpoints: self.slots.len(),
            ready: self.ready.len(),
            in_flight: self.in_flight_total(),
            updates: self.updates,
            stale_updates: self.stale_updates,
            ejected: self.ejected_len(),
            ejections: self.ejections,
            spared: self.spared,
            breaker_fallback: self.fallback,
        }
    }

    /// How many endpoints their breaker has out of rotation now (ejected, or on probation).
    #[must_use]
    pub fn ejected_len(&self) -> usize {
        self.slots
            .iter()
            .filter(|slot| slot.breaker.is_open())
            .count()
    }

    /// Checks the internal indexes agree (debug builds only).
    pub fn assert_invariants(&self) {
        if !cfg!(debug_assertions) {
            return;
        }
        assert_eq!(self.slots.len(), self.by_addr.len(), "index size");
        for (addr, &index) in &self.by_addr {
            assert_eq!(
                self.slots[index].endpoint.addr, *addr,
                "index points at its slot"
            );
        }
        assert_eq!(self.ready.len(), self.ready_weights.len());
        let ready_count = self.slots.iter().filter(|slot| slot.is_ready()).count();
        let eligible_count = self.slots.iter().filter(|slot| slot.is_eligible()).count();
        if self.fallback {
            assert_eq!(ready_count, 0, "fallback only without a ready endpoint");
            assert_eq!(self.ready.len(), eligible_count, "fallback list is current");
        } else {
            assert_eq!(self.ready.len(), ready_count, "ready list is current");
            assert!(
                ready_count > 0 || eligible_count == 0,
                "never refuse for the breaker"
            );
        }
        assert!(
            self.ejected_len() <= self.config.breaker.max_ejected(self.slots.len()),
            "no more endpoints ejected than the maximum share"
        );
        for slot in &self.slots {
            slot.breaker.assert_invariants();
            if slot.breaker.state() == (State::Probation { probing: true }) {
                assert!(
                    self.probing.contains(&slot.endpoint.addr),
                    "an outstanding probe is tracked"
                );
            }
        }
        assert!(
            self.ready_weights.windows(2).all(|w| w[0] < w[1]),
            "weights strictly grow"
        );
        match self.discovery {
            Discovery::Endpoints => assert!(!self.slots.is_empty()),
            Discovery::Unknown | Discovery::NoEndpoints => assert!(self.slots.is_empty()),
        }
    }
}

fn index_of(value: u64) -> usize {
    usize::try_from(value).unwrap_or(usize::MAX)
}

// === Queue ===

/// Settings for the wait for a ready endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueConfig {
    /// How many requests may wait at once; more are shed.
    pub capacity: usize,
    /// How long the balancer may be without a ready endpoint before requests fail fast.
    pub failfast_timeout: Duration,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            capacity: DEFAULT_QUEUE_CAPACITY,
            failfast_timeout: DEFAULT_FAILFAST_TIMEOUT,
        }
    }
}

/// The queue's answer to a request that found no ready endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Admit {
    /// Wait for an endpoint until `deadline`, then give up with a fail-fast error. The caller
    /// must call [`Queue::leave`] when it stops waiting, whatever the reason.
    Wait {
        /// When waiting ends.
        deadline: Instant,
    },
    /// The queue is full: shed the request (503).
    Shed,
    /// The balancer has had no ready endpoint for the fail-fast timeout: fail now (504).
    FailFast,
}

/// Counts describing a queue, as plain data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Requests waiting now.
    pub waiting: usize,
    /// Requests shed since creation.
    pub shed: u64,
    /// Requests refused because the queue was failing fast.
    pub failed_fast: u64,
    /// Times the queue entered fail-fast.
    pub failfast_entered: u64,
}

/// Whether requests may wait for an endpoint: load shedding and fail-fast.
#[derive(Debug)]
pub struct Queue {
    config: QueueConfig,
    waiting: usize,
    /// Since when no endpoint has been ready; `None` while one is.
    unready_since: Option<Instant>,
    failing_fast: bool,
    stats: QueueStats,
}

impl Queue {
    /// A queue that starts without a ready endpoint (discovery has not answered) at `now`.
    #[must_use]
    pub fn new(config: QueueConfig, now: Instant) -> Self {
        Self {
            config,
            waiting: 0,
            unready_since: Some(now),
            failing_fast: false,
            stats: QueueStats::default(),
        }
    }

    /// Tells the queue whether the balancer has at least one ready endpoint.
    pub fn handle_readiness(&mut self, now: Instant, ready: bool) {
        if ready {
            if self.failing_fast {
                tracing::info!("endpoint ready again; leaving fail-fast");
            }
            self.unready_since = None;
            self.failing_fast = false;
        } else if self.unready_since.is_none() {
            self.unready_since = Some(now);
        }
        self.handle_timeout(now);
    }

    /// Decides whether a request that found no ready endpoint may wait.
    pub fn admit(&mut self, now: Instant) -> Admit {
        self.handle_timeout(now);
        if self.failing_fast {
            self.stats.failed_fast += 1;
            return Admit::FailFast;
        }
        if self.waiting >= self.config.capacity {
            self.stats.shed += 1;
            return Admit::Shed;
        }
        self.waiting += 1;
        self.stats.waiting = self.waiting;
        let since = self.unready_since.unwrap_or(now);
        Admit::Wait {
            deadline: since + self.config.failfast_timeout,
        }
    }

    /// A request admitted with [`Admit::Wait`] stopped waiting.
    pub fn leave(&mut self) {
        debug_assert!(self.waiting > 0, "leave without a matching admit");
        self.waiting = self.waiting.saturating_sub(1);
        self.stats.waiting = self.waiting;
    }

    /// Whether the queue refuses requests outright now.
    #[must_use]
    pub fn is_failing_fast(&self) -> bool {
        self.failing_fast
    }

    /// When the queue will enter fail-fast, if nothing becomes ready before then.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.failing_fast {
            return None;
        }
        self.unready_since
            .map(|since| since + self.config.failfast_timeout)
    }

    /// Enters fail-fast once the balancer has been unready for the timeout. Spurious calls are
    /// no-ops.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(deadline) = self.poll_timeout()
            && now >= deadline
        {
            tracing::warn!(
                waiting = self.waiting,
                "no ready endpoint within the fail-fast timeout; failing fast"
            );
            self.failing_fast = true;
            self.stats.failfast_entered += 1;
        }
    }

    /// Counts describing the queue.
    #[must_use]
    pub fn stats(&self) -> QueueStats {
        self.stats
    }
}

#[cfg(test)]
mod tests;
