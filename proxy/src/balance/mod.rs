//! Per-service load balancing: the core's [`Balancer`] and [`Queue`] behind a mutex, driven by
//! discovery and the clock.
//!
//! A [`Router`] keeps one [`ServiceBalancer`] per authority in use (host lower-cased, port as
//! the request gave it), created on the first request, which asks discovery to
//! [`resolve`](crate::discover::Discover::resolve) the authority, and dropped after the
//! configured discovery idle timeout without requests, which drops the resolution and lets the
//! backend stop following it. Each service balancer follows the drive loop of
//! `conduit_core::balance`: resolutions become `Replace` updates, a driver task wakes at the
//! core's `poll_timeout`s, and readiness changes are told to the queue and wake waiting
//! requests. While the resolution is still unknown, requests wait in the core's queue like
//! requests for a service without ready endpoints, so they fail fast (504) or are shed (503)
//! by the same rules. Every mesh decision (which endpoint, wait or shed or fail fast) is the
//! core's.
//!
//! Circuit breaking is the core balancer's too: each resolution applies the service profile's
//! breaker settings ([`Profile::breaker`]), the exchange reports each response's outcome
//! ([`ServiceBalancer::settle`]), and the driver wakes when a penalty ends. Ejections are
//! counted per service in `endpoint_ejections_total{authority, reason}` (kept by the router,
//! so they outlive an idle service's balancer), and the endpoints out now are the gauge
//! `balancer_endpoints{authority, state="ejected"}`.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use conduit_core::balance::{
    Admit, BalanceConfig, Balancer, BreakerEvent, Change, InFlight, Picked, Queue, QueueConfig,
    Update,
};
use conduit_core::breaker::Reason;
use conduit_core::classify::Outcome;
use conduit_core::metrics::{LatencyWindow, WindowConfig};
use conduit_core::rand::DetRng;
use conduit_core::retry::{Budget, Decision, HedgeDelay, HedgePolicy, Retries, Skip};
use conduit_core::route::Profile;
use conduit_core::time::Instant;
use tokio::sync::{Notify, oneshot, watch};

use crate::clock::Clock;
use crate::config::{BalancerSettings, QueueSettings};
use crate::discover::{Discover, Resolution};
use crate::errors::ProxyError;
use crate::fault_points::FaultPoint;
use crate::observe::{Hooks, Pick, RequestKey};

/// The longest pause between looks for idle authorities.
const SWEEP_INTERVAL_MAX: Duration = Duration::from_secs(10);

/// The most authorities followed at once: a bound on the table (and on what discovery
/// follows), far above what one app talks to. Beyond it, requests for new authorities get 503
/// until idle ones are dropped.
pub(crate) const MAX_AUTHORITIES: usize = 10_000;

/// The longest authority kept as a table key; longer ones are refused as malformed by hyper
/// long before, but the bound keeps the table's memory predictable regardless.
const MAX_AUTHORITY_BYTES: usize = 512;

/// Authority → service balancer, fed by discovery.
pub(crate) struct Router {
    discovery: Arc<dyn Discover>,
    services: Mutex<BTreeMap<String, Arc<ServiceBalancer>>>,
    rng: Mutex<DetRng>,
    clock: Clock,
    balance: BalanceConfig,
    queue: QueueConfig,
    idle_timeout: Duration,
    hooks: Hooks,
    ejections: Arc<Ejections>,
    /// Which endpoints are meshed, written from every resolution before its endpoints are
    /// balanced (the outbound pools read it to open mTLS).
    meshed: Arc<crate::tls::MeshedPeers>,
}

/// Ejections per service label and [`Reason::index`]: `endpoint_ejections_total`. At most
/// [`MAX_AUTHORITIES`] services are counted (labels come from discovery, not from requests).
#[derive(Debug, Default)]
struct Ejections(Mutex<BTreeMap<Arc<str>, [u64; 2]>>);

impl Ejections {
    fn count(&self, label: &Arc<str>, reason: Reason) {
        let mut counts = lock(&self.0);
        if let Some(count) = counts.get_mut(label) {
            count[reason.index()] += 1;
        } else if counts.len() < MAX_AUTHORITIES {
            let mut count = [0; 2];
            count[reason.index()] = 1;
            counts.insert(Arc::clone(label), count);
        }
    }
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("authorities", &lock(&self.services).len())
            .field("idle_timeout", &self.idle_timeout)
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section below leaves its state consistent before anything can panic (the
    // core asserts its own invariants), so a poisoned lock holds usable state.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Router {
    pub(crate) fn new(
        discovery: Arc<dyn Discover>,
        rng: DetRng,
        clock: Clock,
        balancer: BalancerSettings,
        queue: QueueSettings,
        idle_timeout: Duration,
        hooks: Hooks,
    ) -> Arc<Self> {
        let balance = BalanceConfig {
            policy: balancer.policy,
            default_rtt: balancer.default_rtt,
            decay: balancer.decay,
            ..BalanceConfig::default()
        };
        let queue = QueueConfig {
            capacity: queue.capacity,
            failfast_timeout: queue.failfast_timeout,
        };
        Arc::new(Self {
            discovery,
            services: Mutex::default(),
            rng: Mutex::new(rng),
            clock,
            balance,
            queue,
            idle_timeout,
            hooks,
            ejections: Arc::default(),
            meshed: Arc::default(),
        })
    }

    /// Which endpoints are meshed, as discovery said.
    pub(crate) fn meshed(&self) -> &Arc<crate::tls::MeshedPeers> {
        &self.meshed
    }

    /// What the balancers report to.
    pub(crate) fn observer(&self) -> &dyn crate::observe::Observer {
        &*self.hooks.observer
    }

    /// The defect planted in this proxy, if any.
    #[cfg(feature = "planted-faults")]
    pub(crate) fn planted(&self) -> Option<crate::observe::PlantedFault> {
        self.hooks.planted
    }

    /// The balancer for `authority`, created (and its resolution started) on first use, as of
    /// `now` (the request's arrival). The caller then waits for the resolution with
    /// [`ServiceBalancer::resolved`].
    ///
    /// # Errors
    ///
    /// [`ProxyError::Unavailable`] when [`MAX_AUTHORITIES`] authorities are in use.
    pub(crate) fn resolve(
        &self,
        authority: &str,
        now: Instant,
    ) -> Result<Arc<ServiceBalancer>, ProxyError> {
        let key = authority_key(authority);
        let mut services = lock(&self.services);
        if let Some(existing) = services.get(key.as_ref()) {
            lock(&existing.state).last_used = now;
            return Ok(Arc::clone(existing));
        }
        if services.len() >= MAX_AUTHORITIES {
            drop(services);
            self.sweep();
            services = lock(&self.services);
            if services.len() >= MAX_AUTHORITIES {
                tracing::warn!(limit = MAX_AUTHORITIES, "too many authorities in use");
                return Err(ProxyError::Unavailable {
                    reason: format!("more than {MAX_AUTHORITIES} authorities in use"),
                });
            }
        }
        let key = key.into_owned();
        let resolutions = self.discovery.resolve(&key);
        let rng = lock(&self.rng).child(&key);
        let (balancer, stop) = ServiceBalancer::new(key.clone(), rng, self, now, &resolutions);
        tracing::debug!(authority = %key, "resolving authority");
        services.insert(key, Arc::clone(&balancer));
        tokio::spawn(drive(Arc::downgrade(&balancer), resolutions, stop));
        Ok(balancer)
    }

    /// Drops idle authorities until `stop` fires.
    pub(crate) async fn run(self: Arc<Self>, mut stop: crate::drain::Drain) {
        let interval = (self.idle_timeout / 2).clamp(Duration::from_millis(1), SWEEP_INTERVAL_MAX);
        let mut sweep = tokio::time::interval(interval);
        loop {
            tokio::select! {
                _ = sweep.tick() => self.sweep(),
                () = stop.signaled() => return,
            }
        }
    }

    /// Appends the balancers' metrics (Prometheus text): per service, its endpoints (all,
    /// ready to take requests, and ejected by their circuit breaker), its requests in flight to
    /// them, and its ejections so far.
    pub(crate) fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        // Authorities naming one service (`web` and `web:80`) share its label.
        let mut by_label: BTreeMap<Arc<str>, (usize, usize, u64, usize)> = BTreeMap::new();
        for balancer in lock(&self.services).values() {
            let state = lock(&balancer.state);
            if let Status::Found { label, .. } = &state.status {
                let entry = by_label.entry(Arc::clone(label)).or_default();
                entry.0 = entry.0.max(state.balancer.len());
                entry.1 = entry.1.max(state.balancer.ready_len());
                entry.2 += state.balancer.in_flight_total();
                entry.3 = entry.3.max(state.balancer.ejected_len());
            }
        }
        let _ = writeln!(
            out,
            "# HELP balancer_endpoints Endpoints of each outbound service, by state (ejected: out of rotation by their circuit breaker).\n# TYPE balancer_endpoints gauge"
        );
        for (label, (total, ready, _, ejected)) in &by_label {
            let label = crate::admin::metrics::escape(label);
            let _ = writeln!(
                out,
                "balancer_endpoints{{authority=\"{label}\",state=\"ejected\"}} {ejected}\nbalancer_endpoints{{authority=\"{label}\",state=\"ready\"}} {ready}\nbalancer_endpoints{{authority=\"{label}\",state=\"total\"}} {total}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP endpoint_ejections_total Endpoints of each outbound service ejected by their circuit breaker, by the policy that tripped.\n# TYPE endpoint_ejections_total counter"
        );
        for (label, counts) in lock(&self.ejections.0).iter() {
            let label = crate::admin::metrics::escape(label);
            for reason in Reason::ALL {
                let _ = writeln!(
                    out,
                    "endpoint_ejections_total{{authority=\"{label}\",reason=\"{reason}\"}} {}",
                    counts[reason.index()]
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP balancer_requests_in_flight Requests sent to each outbound service's endpoints and not yet settled.\n# TYPE balancer_requests_in_flight gauge"
        );
        for (label, (_, _, in_flight, _)) in &by_label {
            let _ = writeln!(
                out,
                "balancer_requests_in_flight{{authority=\"{}\"}} {in_flight}",
                crate::admin::metrics::escape(label)
            );
        }
    }

    fn sweep(&self) {
        let now = self.clock.now();
        lock(&self.services).retain(|name, balancer| {
            let idle = now.saturating_duration_since(lock(&balancer.state).last_used);
            let keep = Arc::strong_count(balancer) > 1 || idle < self.idle_timeout;
            if !keep {
                tracing::debug!(authority = %name, "dropping idle authority");
            }
            keep
        });
    }
}

/// The table key for an authority: lower-cased, without a trailing dot on the host, bounded.
/// Borrowed when the authority is already in that form, as nearly every request's is: the
/// lookup on each request then allocates nothing.
fn authority_key(authority: &str) -> Cow<'_, str> {
    let bytes = authority.as_bytes();
    let normal = bytes.len() <= MAX_AUTHORITY_BYTES
        && !bytes.iter().any(u8::is_ascii_uppercase)
        && bytes.last() != Some(&b'.')
        && !bytes.windows(2).any(|pair| pair == b".:");
    if normal {
        return Cow::Borrowed(authority);
    }
    let mut key: String = authority
        .chars()
        .take(MAX_AUTHORITY_BYTES)
        .collect::<String>()
        .to_ascii_lowercase();
    if let Some(dot) = key.find(".:") {
        key.remove(dot);
    } else if key.ends_with('.') {
        key.pop();
    }
    Cow::Owned(key)
}

/// An attempt's failure, as a retry decision sees it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RetryFailure {
    /// Its class may be retried.
    pub(crate) retryable: bool,
    /// The request is whole in hand.
    pub(crate) replayable: bool,
    /// The time left before the request's deadline (`None`: none).
    pub(crate) remaining: Option<Duration>,
}

/// What the balancer's resolution says, as far as requests care.
#[derive(Debug)]
enum Status {
    /// Discovery has not answered.
    Unknown,
    /// No such service.
    NotFound,
    /// The service, labelled `name:port` for metrics, with its route profile (`None`: it has
    /// none).
    Found {
        label: Arc<str>,
        profile: Option<Arc<Profile>>,
    },
}

#[derive(Debug)]
struct State {
    balancer: Balancer,
    queue: Queue,
    rng: DetRng,
    ready: bool,
    last_used: Instant,
    status: Status,
    /// The version of the last resolution applied (stale ones are ignored).
    resolution_version: Option<u64>,
    /// Versions of the updates fed to the core balancer: one per applied resolution.
    updates: u64,
    /// The retry budgets of the profile in force, when any of its routes retries.
    budgets: Option<Budgets>,
}

/// One retry budget per route with a retry policy, for the profile they were made for: a
/// profile that changes gets fresh budgets; one that stays the same across resolutions (an
/// endpoint change) keeps them. Routes that hedge after a latency quantile keep their recent
/// latencies here too.
#[derive(Debug)]
struct Budgets {
    profile: Arc<Profile>,
    /// By route index; `None` for routes that do not retry.
    routes: Vec<Option<Budget>>,
    /// By route index; `Some` for routes that hedge after a quantile of their latency.
    latencies: Vec<Option<LatencyWindow>>,
}

impl Budgets {
    fn new(profile: &Arc<Profile>, now: Instant) -> Option<Self> {
        let routes: Vec<Option<Budget>> = profile
            .routes()
            .iter()
            .map(|route| {
                route
                    .policy
                    .retry
                    .as_ref()
                    .map(|retry| Budget::new(retry.budget, now))
            })
            .collect();
        let latencies = profile
            .routes()
            .iter()
            .map(|route| {
                let hedge = route.policy.retry.as_ref().and_then(|r| r.hedge)?;
                matches!(hedge.after, HedgeDelay::Quantile { .. })
                    .then(|| LatencyWindow::new(&WindowConfig::default(), now))
            })
            .collect();
        routes.iter().any(Option::is_some).then(|| Self {
            profile: Arc::clone(profile),
            routes,
            latencies,
        })
    }

    /// The budget of route `route` of `profile`, if that profile is still the one in force.
    fn get(&mut self, profile: &Arc<Profile>, route: usize) -> Option<&mut Budget> {
        if !Arc::ptr_eq(&self.profile, profile) {
            return None;
        }
        self.routes.get_mut(route)?.as_mut()
    }

    /// The latency window of route `route` of `profile`, if it keeps one and that profile is
    /// still the one in force.
    fn latencies(&mut self, profile: &Arc<Profile>, route: usize) -> Option<&mut LatencyWindow> {
        if !Arc::ptr_eq(&self.profile, profile) {
            return None;
        }
        self.latencies.get_mut(route)?.as_mut()
    }
}

/// What a resolved authority names: the service's metrics label and its route profile (`None`:
/// it has none), or why there is no service.
pub(crate) type Resolved = Result<(Arc<str>, Option<Arc<Profile>>), ProxyError>;

/// One authority's resolution, balancer, queue and readiness signal.
#[derive(Debug)]
pub(crate) struct ServiceBalancer {
    /// The authority (the router's key), for error messages.
    authority: String,
    state: Mutex<State>,
    /// Woken when the service goes from no ready endpoint to some, and when the resolution
    /// changes.
    ready: Notify,
    /// Woken when the driver's next deadline may have moved earlier.
    reschedule: Arc<Notify>,
    clock: Clock,
    /// Told what this balancer applies and picks.
    hooks: Hooks,
    ejections: Arc<Ejections>,
    meshed: Arc<crate::tls::MeshedPeers>,
    /// The service's circuit breaking is on: outcomes are worth the lock. Off, a settle only
    /// releases the request's in-flight count, as before breakers existed.
    breaker_on: AtomicBool,
    /// Dropped with the balancer: stops its driver task (and so its resolution) at once.
    _stop: oneshot::Sender<()>,
}

/// Leaves the queue when a waiting request stops waiting, however it stops.
struct Waiting<'a>(&'a ServiceBalancer);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        lock(&self.0.state).queue.leave();
    }
}

impl ServiceBalancer {
    /// A balancer for `authority` that applies `resolutions`' current value at once. The
    /// returned sender stops the driver task when the balancer is dropped.
    fn new(
        authority: String,
        rng: DetRng,
        router: &Router,
        now: Instant,
        resolutions: &watch::Receiver<Resolution>,
    ) -> (Arc<Self>, oneshot::Receiver<()>) {
        let (stop_tx, stop_rx) = oneshot::channel();
        let state = State {
            balancer: Balancer::new(router.balance),
            queue: Queue::new(router.queue, now),
            rng,
            ready: false,
            last_used: now,
            status: Status::Unknown,
            resolution_version: None,
            updates: 0,
            budgets: None,
        };
        let this = Arc::new(Self {
            authority,
            state: Mutex::new(state),
            ready: Notify::new(),
            reschedule: Arc::new(Notify::new()),
            clock: router.clock,
            hooks: router.hooks.clone(),
            ejections: Arc::clone(&router.ejections),
            meshed: Arc::clone(&router.meshed),
            breaker_on: AtomicBool::new(false),
            _stop: stop_tx,
        });
        let first = resolutions.borrow().clone();
        this.apply(&first);
        (this, stop_rx)
    }

    /// Applies a resolution: the service's endpoints go to the core balancer; `NotFound`
    /// empties it; `Unknown` changes nothing (what was known stays in force).
    fn apply(&self, resolution: &Resolution) {
        let now = self.clock.now();
        let mut state = lock(&self.state);
        let change = match resolution {
            Resolution::Unknown => return,
            Resolution::NotFound => {
                tracing::debug!(authority = %self.authority, "authority not found");
                state.status = Status::NotFound;
                Change::NoEndpoints
            }
            Resolution::Service { version, service } => {
                if state
                    .resolution_version
                    .is_some_and(|last| *version <= last)
                {
                    tracing::debug!(authority = %self.authority, version, "ignoring stale resolution");
                    return;
                }
                state.resolution_version = Some(*version);
                // An unchanged profile stays the same value, so its retry budgets carry on.
                let profile = match &state.status {
                    _ if service.profile.is_empty() => None,
                    Status::Found {
                        profile: Some(profile),
                        ..
                    } if **profile == service.profile => Some(Arc::clone(profile)),
                    _ => Some(Arc::new(service.profile.clone())),
                };
                let kept = match (&profile, &state.budgets) {
                    (Some(profile), Some(budgets)) => Arc::ptr_eq(profile, &budgets.profile),
                    _ => false,
                };
                if !kept {
                    state.budgets = profile.as_ref().and_then(|p| Budgets::new(p, now));
                }
                state.balancer.set_breaker(now, *service.profile.breaker());
                self.breaker_on
                    .store(service.profile.breaker().is_enabled(), Ordering::Relaxed);
                state.status = Status::Found {
                    label: Arc::from(format!("{}:{}", service.name, service.port)),
                    profile,
                };
                tracing::debug!(
                    authority = %self.authority,
                    version,
                    endpoints = service.endpoints.len(),
                    "endpoints updated"
                );
                if service.endpoints.is_empty() {
                    Change::NoEndpoints
                } else {
                    // Before the balancer can pick them: a meshed endpoint is never reached
                    // in plaintext because its identity was not known yet.
                    self.meshed.record(&service.endpoints);
                    Change::Replace(service.endpoints.clone())
                }
            }
        };
        state.updates += 1;
        let version = state.updates;
        if let Err(stale) = state
            .balancer
            .handle_update(now, Update { version, change })
        {
            // Unreachable: the versions are this balancer's own counter.
            tracing::warn!(authority = %self.authority, %stale, "balancer refused an update");
        }
        self.sync(&mut state, now);
        drop(state);
        // Requests waiting for the resolution itself look again.
        self.ready.notify_waiters();
        self.hooks.observer.applied(&self.authority, resolution);
    }

    /// Waits until discovery has answered for the authority, in the core's queue, and returns
    /// the metrics label of the service it names and its route profile, if it has one. `now`
    /// is the request's arrival; the clock is read again only after a wait.
    ///
    /// # Errors
    ///
    /// [`ProxyError::UnknownAuthority`] (404) when no service has the name,
    /// [`ProxyError::FailFast`] (504) when discovery does not answer in time,
    /// [`ProxyError::LoadShed`] (503) when the queue is full.
    /// What discovery said of the authority at `now`, if it has answered (then [`resolved`]
    /// would not wait).
    ///
    /// [`resolved`]: Self::resolved
    pub(crate) fn try_resolved(&self, now: Instant) -> Option<Resolved> {
        let mut state = lock(&self.state);
        state.last_used = now;
        match &state.status {
            Status::Found { label, profile } => Some(Ok((Arc::clone(label), profile.clone()))),
            Status::NotFound => Some(Err(self.not_found())),
            Status::Unknown => None,
        }
    }

    pub(crate) async fn resolved(&self, mut now: Instant) -> Resolved {
        loop {
            // Look first: once discovery has answered, a request never registers for wake-ups.
            {
                let mut state = lock(&self.state);
                state.last_used = now;
                match &state.status {
                    Status::Found { label, profile } => {
                        return Ok((Arc::clone(label), profile.clone()));
                    }
                    Status::NotFound => return Err(self.not_found()),
                    Status::Unknown => {}
                }
            }
            let mut notified = pin!(self.ready.notified());
            // Register, then look again, so an answer between the looks still wakes us.
            notified.as_mut().enable();
            let admit = {
                let mut state = lock(&self.state);
                match &state.status {
                    Status::Found { label, profile } => {
                        return Ok((Arc::clone(label), profile.clone()));
                    }
                    Status::NotFound => return Err(self.not_found()),
                    Status::Unknown => state.queue.admit(now),
                }
            };
            self.wait(admit, notified).await?;
            now = self.clock.now();
        }
    }

    /// Waits as the queue admitted, until woken or the deadline.
    async fn wait(
        &self,
        admit: Admit,
        notified: std::pin::Pin<&mut tokio::sync::futures::Notified<'_>>,
    ) -> Result<(), ProxyError> {
        match admit {
            Admit::Wait { deadline } => {
                let _waiting = Waiting(self);
                tokio::select! {
                    () = notified => Ok(()),
                    () = self.clock.sleep_until(deadline) => Err(ProxyError::FailFast {
                        authority: self.authority.clone(),
                    }),
                }
            }
            Admit::Shed => Err(ProxyError::LoadShed {
                authority: self.authority.clone(),
            }),
            Admit::FailFast => Err(ProxyError::FailFast {
                authority: self.authority.clone(),
            }),
        }
    }

    /// The authority as the router keys it (lower-cased, bounded): the metrics label of its
    /// requests when it names no service and they go to their original destination.
    pub(crate) fn authority(&self) -> &str {
        &self.authority
    }

    fn not_found(&self) -> ProxyError {
        ProxyError::UnknownAuthority {
            authority: self.authority.chars().take(256).collect(),
        }
    }

    /// Tells the queue about readiness changes and wakes waiters when endpoints are ready.
    fn sync(&self, state: &mut State, now: Instant) {
        let ready = state.balancer.ready_len() > 0;
        if ready != state.ready {
            state.ready = ready;
            state.queue.handle_readiness(now, ready);
        }
        if ready {
            self.ready.notify_waiters();
        }
        self.reschedule.notify_one();
    }

    /// Picks an endpoint, waiting in the queue while none is ready.
    ///
    /// # Errors
    ///
    /// [`ProxyError::FailFast`] (504) when no endpoint is ready in time,
    /// [`ProxyError::LoadShed`] (503) when the queue is full,
    /// [`ProxyError::UnknownAuthority`] (404) when the service left discovery meanwhile.
    pub(crate) async fn acquire(
        &self,
        mut now: Instant,
        request: Option<RequestKey>,
    ) -> Result<Picked, ProxyError> {
        loop {
            // Look first: the common case finds a ready endpoint and never registers for
            // wake-ups.
            if let Some(picked) = self.try_pick(now, request) {
                return picked;
            }
            let mut notified = pin!(self.ready.notified());
            // Register, then look again, so a readiness change between the looks still wakes
            // us.
            notified.as_mut().enable();
            if let Some(picked) = self.try_pick(now, request) {
                return picked;
            }
            let admit = lock(&self.state).queue.admit(now);
            self.wait(admit, notified).await?;
            now = self.clock.now();
        }
    }

    /// Picks a ready endpoint at `now` for the request the observer knows as `request` (the
    /// pick is reported when it follows the request); `None` when none is ready (then
    /// [`acquire`] waits).
    ///
    /// [`acquire`]: Self::acquire
    pub(crate) fn try_pick(
        &self,
        now: Instant,
        request: Option<RequestKey>,
    ) -> Option<Result<Picked, ProxyError>> {
        self.pick_reported(now, request, false, None)
    }

    /// [`try_pick`](Self::try_pick) for a retry or a hedge: never `avoid` (the endpoint of the
    /// attempt before) while another endpoint is ready.
    pub(crate) fn try_pick_avoiding(
        &self,
        now: Instant,
        request: Option<RequestKey>,
        avoid: SocketAddr,
    ) -> Option<Result<Picked, ProxyError>> {
        self.pick_reported(now, request, false, Some(avoid))
    }

    /// [`try_pick`](Self::try_pick) for a hedge: reported as one, since an earlier attempt of
    /// the request may still answer.
    pub(crate) fn try_pick_hedge(
        &self,
        now: Instant,
        request: Option<RequestKey>,
        avoid: SocketAddr,
    ) -> Option<Result<Picked, ProxyError>> {
        self.pick_reported(now, request, true, Some(avoid))
    }

    fn pick_reported(
        &self,
        now: Instant,
        request: Option<RequestKey>,
        hedge: bool,
        avoid: Option<SocketAddr>,
    ) -> Option<Result<Picked, ProxyError>> {
        let mut state = lock(&self.state);
        state.last_used = now;
        if matches!(state.status, Status::NotFound) {
            return Some(Err(self.not_found()));
        }
        let State { balancer, rng, .. } = &mut *state;
        let picked = balancer.pick_avoiding(now, rng, avoid)?;
        let version = state.resolution_version.unwrap_or(0);
        drop(state);
        tracing::trace!(authority = %self.authority, endpoint = %picked.addr, "picked");
        if let Some(request) = request {
            self.hooks.observer.picked(&Pick {
                request,
                authority: &self.authority,
                version,
                endpoint: picked.addr,
                hedge,
            });
        }
        Some(Ok(picked))
    }

    /// A request on route `route` of `profile` arrived at `now`: it adds to the route's retry
    /// budget.
    pub(crate) fn deposit(&self, profile: &Arc<Profile>, route: usize, now: Instant) {
        let mut state = lock(&self.state);
        if let Some(budget) = state.budgets.as_mut().and_then(|b| b.get(profile, route)) {
            budget.deposit(now);
        }
    }

    /// Decides whether a request on route `route` of `profile` whose attempt failed at `now`
    /// goes again ([`Retries::after_failure`], paid from the route's budget and jittered with
    /// the balancer's RNG). A profile replaced since the request was routed retries no more.
    pub(crate) fn retry(
        &self,
        retries: &mut Retries,
        profile: &Arc<Profile>,
        route: usize,
        failure: RetryFailure,
        now: Instant,
    ) -> Decision {
        let mut state = lock(&self.state);
        let State { budgets, rng, .. } = &mut *state;
        match budgets.as_mut().and_then(|b| b.get(profile, route)) {
            Some(budget) => retries.after_failure(
                failure.retryable,
                failure.replayable,
                failure.remaining,
                budget,
                now,
                rng,
            ),
            None => Decision::Skip(Skip::Budget),
        }
    }

    /// The failures `policy` (a route's fault policy) injects into one request, drawn from
    /// the balancer's seeded RNG, so a simulation replays them.
    pub(crate) fn draw_fault(
        &self,
        policy: &conduit_core::fault::FaultPolicy,
    ) -> conduit_core::fault::Injected {
        policy.draw(&mut lock(&self.state).rng)
    }

    /// How long a request on route `route` of `profile` (hedging by `hedge`) waits at `now`
    /// before a hedge goes out: the fixed delay, or the route's latency quantile over its
    /// recent window (`None` until the window holds enough samples, or once the profile was
    /// replaced).
    pub(crate) fn hedge_delay(
        &self,
        hedge: &HedgePolicy,
        profile: &Arc<Profile>,
        route: usize,
        now: Instant,
    ) -> Option<Duration> {
        match hedge.after {
            HedgeDelay::Fixed(_) => hedge.delay(&conduit_core::metrics::LatencyHistogram::new()),
            HedgeDelay::Quantile { .. } => {
                let mut state = lock(&self.state);
                let window = state.budgets.as_mut()?.latencies(profile, route)?;
                hedge.delay(&window.snapshot(now))
            }
        }
    }

    /// A response head on route `route` of `profile` arrived `latency` after its request:
    /// a sample for the route's hedge delay, when it hedges after a quantile.
    pub(crate) fn route_latency(
        &self,
        profile: &Arc<Profile>,
        route: usize,
        now: Instant,
        latency: Duration,
    ) {
        let mut state = lock(&self.state);
        if let Some(window) = state
            .budgets
            .as_mut()
            .and_then(|b| b.latencies(profile, route))
        {
            window.record(now, latency);
        }
    }

    /// Whether a hedge of a request on route `route` of `profile` may go out at `now`
    /// ([`Retries::hedge`], paid from the route's budget).
    ///
    /// # Errors
    ///
    /// Why not.
    pub(crate) fn hedge(
        &self,
        retries: &mut Retries,
        profile: &Arc<Profile>,
        route: usize,
        replayable: bool,
        now: Instant,
    ) -> Result<(), Skip> {
        let mut state = lock(&self.state);
        match state.budgets.as_mut().and_then(|b| b.get(profile, route)) {
            Some(budget) => retries.hedge(replayable, budget, now),
            None => Err(Skip::Budget),
        }
    }

    /// Response headers arrived: an RTT sample for the endpoint.
    pub(crate) fn observe(&self, in_flight: &InFlight) {
        self.observe_at(self.clock.now(), in_flight);
    }

    /// Response headers arrived at `now`: an RTT sample for the endpoint.
    pub(crate) fn observe_at(&self, now: Instant, in_flight: &InFlight) {
        lock(&self.state).balancer.observe(now, in_flight);
    }

    /// The response of the request holding `in_flight` ended with `outcome` at `now`: the
    /// endpoint's breaker accrues it (or decides on its probe), and the request stops counting
    /// as in flight.
    pub(crate) fn settle(&self, now: Instant, in_flight: InFlight, outcome: Outcome) {
        if !self.breaker_on.load(Ordering::Relaxed) {
            // No breaker to teach (set under the state lock, read without it: an outcome
            // that races a change of setting is one outcome more or less).
            drop(in_flight);
            return;
        }
        let mut state = lock(&self.state);
        let State { balancer, rng, .. } = &mut *state;
        let Some(event) = balancer.handle_outcome(now, in_flight, outcome, rng) else {
            return;
        };
        match event {
            BreakerEvent::Ejected {
                addr,
                reason,
                until,
            } => {
                tracing::info!(authority = %self.authority, endpoint = %addr, %reason, penalty = ?until.saturating_duration_since(now), "endpoint ejected");
                if let Status::Found { label, .. } = &state.status {
                    self.ejections.count(label, reason);
                }
            }
            BreakerEvent::Spared { addr, reason } => {
                tracing::debug!(authority = %self.authority, endpoint = %addr, %reason, "breaker tripped, but too many endpoints are out to eject it");
            }
            BreakerEvent::Readmitted { addr } => {
                tracing::info!(authority = %self.authority, endpoint = %addr, "endpoint readmitted after a successful probe");
            }
            BreakerEvent::Reejected { addr, until } => {
                tracing::debug!(authority = %self.authority, endpoint = %addr, penalty = ?until.saturating_duration_since(now), "probe failed; endpoint ejected again");
            }
            _ => {}
        }
        // The ready set and the next penalty's end may have moved.
        self.sync(&mut state, now);
    }

    /// A connection attempt to `addr` failed: it backs off.
    pub(crate) fn connect_failed(&self, addr: SocketAddr) {
        let now = self.clock.now();
        let mut state = lock(&self.state);
        let State { balancer, rng, .. } = &mut *state;
        balancer.handle_connect_error(now, addr, rng);
        self.sync(&mut state, now);
    }

    /// A connection to `addr` was established.
    pub(crate) fn connect_succeeded(&self, addr: SocketAddr) {
        let now = self.clock.now();
        let mut state = lock(&self.state);
        state.balancer.handle_connect_success(addr);
        self.sync(&mut state, now);
    }

    /// [`PlantedFault::StaleResolution`]: after `current` replaced `previous`, applies
    /// `previous`'s endpoints again under `current`'s version when the two sets overlap, and
    /// reports it.
    ///
    /// [`PlantedFault::StaleResolution`]: crate::observe::PlantedFault::StaleResolution
    #[cfg(feature = "planted-faults")]
    fn plant_stale(&self, previous: &Resolution, current: &Resolution) {
        let (
            Resolution::Service { service: old, .. },
            Resolution::Service {
                version,
                service: new,
            },
        ) = (previous, current)
        else {
            return;
        };
        let overlap = old
            .endpoints
            .iter()
            .any(|e| new.endpoints.iter().any(|n| n.addr == e.addr));
        if self.hooks.planted != Some(crate::observe::PlantedFault::StaleResolution)
            || !overlap
            || old.endpoints == new.endpoints
            || lock(&self.state).resolution_version != Some(*version)
        {
            return;
        }
        let now = self.clock.now();
        let mut state = lock(&self.state);
        state.updates += 1;
        let update = Update {
            version: state.updates,
            change: Change::Replace(old.endpoints.clone()),
        };
        let _ = state.balancer.handle_update(now, update);
        self.sync(&mut state, now);
        drop(state);
        let stale = Resolution::Service {
            version: *version,
            service: Arc::clone(old),
        };
        self.hooks.observer.applied(&self.authority, &stale);
    }

    fn next_deadline(&self) -> Option<Instant> {
        let state = lock(&self.state);
        match (state.balancer.poll_timeout(), state.queue.poll_timeout()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn handle_timeout(&self) {
        let now = self.clock.now();
        let mut state = lock(&self.state);
        state.balancer.handle_timeout(now);
        state.queue.handle_timeout(now);
        self.sync(&mut state, now);
    }
}

/// The authority's driver task: applies resolutions as they change and wakes at the core's
/// deadlines (backoffs ending, fail-fast starting). Ends when the balancer is dropped, which
/// drops the resolution receiver and tells discovery the authority is no longer used.
async fn drive(
    weak: Weak<ServiceBalancer>,
    mut resolutions: watch::Receiver<Resolution>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut following = true;
    #[cfg(feature = "planted-faults")]
    let mut previous = resolutions.borrow().clone();
    loop {
        let Some(this) = weak.upgrade() else { return };
        let deadline = this.next_deadline();
        let reschedule = Arc::clone(&this.reschedule);
        let clock = this.clock;
        // Hold only a weak reference while asleep so an idle balancer can be dropped.
        drop(this);
        tokio::select! {
            _ = &mut stop => return,
            changed = resolutions.changed(), if following => {
                if changed.is_err() {
                    tracing::debug!("discovery stopped following; keeping the last resolution");
                    following = false;
                    continue;
                }
                let resolution = resolutions.borrow_and_update().clone();
                if let Some(late) = crate::fault_points::delay(FaultPoint::SlowDiscovery) {
                    clock.sleep_until(clock.now() + late).await;
                }
                let Some(this) = weak.upgrade() else { return };
                this.apply(&resolution);
                #[cfg(feature = "planted-faults")]
                {
                    this.plant_stale(&previous, &resolution);
                    previous = resolution;
                }
                continue;
            }
            () = reschedule.notified() => {}
            () = sleep_until_opt(clock, deadline) => {}
        }
        let Some(this) = weak.upgrade() else { return };
        if deadline.is_some_and(|d| clock.now() >= d) {
            this.handle_timeout();
        }
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until_opt(clock: Clock, deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => clock.sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::authority_key;

    #[test]
    fn authority_keys_are_normalised() {
        assert_eq!(authority_key("Web.Test"), "web.test");
        assert_eq!(authority_key("web.test.:8080"), "web.test:8080");
        assert_eq!(authority_key("web.test."), "web.test");
        assert_eq!(authority_key(&"a".repeat(2000)).len(), 512);
    }
}
