//! Per-service load balancing: the core's [`Balancer`] and [`Queue`] behind a mutex, driven by
//! discovery and the clock.
//!
//! A [`Router`] maps an authority to its service (through the latest discovery snapshot) and
//! keeps one [`ServiceBalancer`] per service in use, created on first request and dropped after
//! [`SERVICE_IDLE_TIMEOUT`] without requests. Each service balancer follows the drive loop of
//! `conduit_core::balance`: discovery snapshots become `Replace` updates, a driver task wakes at
//! the core's `poll_timeout`s, and readiness changes are told to the queue and wake waiting
//! requests. Every mesh decision (which endpoint, wait or shed or fail fast) is the core's.

use std::collections::BTreeMap;
use std::pin::pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use conduit_core::balance::{
    Admit, BalanceConfig, Balancer, Change, InFlight, Picked, Queue, QueueConfig, Update,
};
use conduit_core::mesh::Service;
use conduit_core::rand::DetRng;
use conduit_core::time::Instant;
use tokio::sync::{Notify, watch};

use crate::clock::Clock;
use crate::config::{BalancerSettings, QueueSettings};
use crate::discover::Snapshot;
use crate::errors::ProxyError;

/// A service balancer unused for this long is dropped (its endpoints' load estimates with it).
pub(crate) const SERVICE_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// How often idle services are looked for.
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

/// Authority → service balancer, fed by discovery.
#[derive(Debug)]
pub(crate) struct Router {
    discovery: watch::Receiver<Snapshot>,
    services: Mutex<BTreeMap<String, Arc<ServiceBalancer>>>,
    rng: Mutex<DetRng>,
    clock: Clock,
    balance: BalanceConfig,
    queue: QueueConfig,
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
        discovery: watch::Receiver<Snapshot>,
        rng: DetRng,
        clock: Clock,
        balancer: BalancerSettings,
        queue: QueueSettings,
    ) -> Arc<Self> {
        let balance = BalanceConfig {
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
        })
    }

    /// The balancer for the service `authority` names.
    ///
    /// # Errors
    ///
    /// [`ProxyError::UnknownAuthority`] when discovery does not know it.
    pub(crate) fn resolve(&self, authority: &str) -> Result<Arc<ServiceBalancer>, ProxyError> {
        let snapshot = self.discovery.borrow().clone();
        let Some(service) = snapshot.mesh.lookup(authority) else {
            let authority: String = authority.chars().take(256).collect();
            return Err(ProxyError::UnknownAuthority { authority });
        };
        let now = self.clock.now();
        let mut services = lock(&self.services);
        if let Some(existing) = services.get(&service.name) {
            lock(&existing.state).last_used = now;
            return Ok(Arc::clone(existing));
        }
        let rng = lock(&self.rng).child(&service.name);
        let balancer = ServiceBalancer::new(service, snapshot.version, rng, self, now);
        services.insert(service.name.clone(), Arc::clone(&balancer));
        tokio::spawn(drive(Arc::downgrade(&balancer)));
        Ok(balancer)
    }

    /// Feeds discovery changes to live balancers and drops idle ones, until `stop` fires.
    pub(crate) async fn run(self: Arc<Self>, mut stop: crate::drain::Drain) {
        let mut discovery = self.discovery.clone();
        let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
        let mut open = true;
        loop {
            tokio::select! {
                changed = discovery.changed(), if open => {
                    if changed.is_err() {
                        tracing::warn!("discovery ended; keeping the last known endpoints");
                        open = false;
                        continue;
                    }
                    let snapshot = discovery.borrow_and_update().clone();
                    self.apply(&snapshot);
                }
                _ = sweep.tick() => self.sweep(),
                () = stop.signaled() => return,
            }
        }
    }

    fn apply(&self, snapshot: &Snapshot) {
        let now = self.clock.now();
        let mut services = lock(&self.services);
        services.retain(|name, balancer| match snapshot.mesh.service(name) {
            Some(service) => {
                balancer.update(now, snapshot.version, service);
                true
            }
            None => {
                tracing::debug!(service = %name, "service left discovery");
                false
            }
        });
    }

    fn sweep(&self) {
        let now = self.clock.now();
        lock(&self.services).retain(|name, balancer| {
            let idle = now.saturating_duration_since(lock(&balancer.state).last_used);
            let keep = Arc::strong_count(balancer) > 1 || idle < SERVICE_IDLE_TIMEOUT;
            if !keep {
                tracing::debug!(service = %name, "dropping idle service balancer");
            }
            keep
        });
    }
}

#[derive(Debug)]
struct State {
    balancer: Balancer,
    queue: Queue,
    rng: DetRng,
    ready: bool,
    last_used: Instant,
}

/// One service's balancer, queue and readiness signal.
#[derive(Debug)]
pub(crate) struct ServiceBalancer {
    /// `name:port`, the metrics authority and the error messages' name.
    label: String,
    state: Mutex<State>,
    /// Woken when the service goes from no ready endpoint to some.
    ready: Notify,
    /// Woken when the driver's next deadline may have moved earlier.
    reschedule: Arc<Notify>,
    clock: Clock,
}

/// Leaves the queue when a waiting request stops waiting, however it stops.
struct Waiting<'a>(&'a ServiceBalancer);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        lock(&self.0.state).queue.leave();
    }
}

impl ServiceBalancer {
    fn new(
        service: &Service,
        version: u64,
        rng: DetRng,
        router: &Router,
        now: Instant,
    ) -> Arc<Self> {
        let state = State {
            balancer: Balancer::new(router.balance),
            queue: Queue::new(router.queue, now),
            rng,
            ready: false,
            last_used: now,
        };
        let this = Arc::new(Self {
            label: format!("{}:{}", service.name, service.port),
            state: Mutex::new(state),
            ready: Notify::new(),
            reschedule: Arc::new(Notify::new()),
            clock: router.clock,
        });
        this.update(now, version, service);
        this
    }

    /// The service's `name:port`.
    pub(crate) fn label(&self) -> &str {
        &self.label
    }

    fn update(&self, now: Instant, version: u64, service: &Service) {
        let change = if service.endpoints.is_empty() {
            Change::NoEndpoints
        } else {
            Change::Replace(service.endpoints.clone())
        };
        let mut state = lock(&self.state);
        match state
            .balancer
            .handle_update(now, Update { version, change })
        {
            Ok(()) => tracing::debug!(
                service = %self.label,
                version,
                endpoints = service.endpoints.len(),
                "endpoints updated"
            ),
            // A balancer created from this very snapshot already has it.
            Err(stale) => tracing::trace!(service = %self.label, %stale, "skipped update"),
        }
        self.sync(&mut state, now);
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
    /// [`ProxyError::LoadShed`] (503) when the queue is full.
    pub(crate) async fn acquire(&self) -> Result<Picked, ProxyError> {
        loop {
            let mut notified = pin!(self.ready.notified());
            // Register before looking, so a readiness change between the look and the wait
            // still wakes us.
            notified.as_mut().enable();
            let admit = {
                let mut state = lock(&self.state);
                let now = self.clock.now();
                state.last_used = now;
                let State { balancer, rng, .. } = &mut *state;
                if let Some(picked) = balancer.pick(now, rng) {
                    tracing::trace!(service = %self.label, endpoint = %picked.addr, "picked");
                    return Ok(picked);
                }
                state.queue.admit(now)
            };
            match admit {
                Admit::Wait { deadline } => {
                    let _waiting = Waiting(self);
                    tokio::select! {
                        () = notified => {}
                        () = self.clock.sleep_until(deadline) => {
                            return Err(ProxyError::FailFast { authority: self.label.clone() });
                        }
                    }
                }
                Admit::Shed => {
                    return Err(ProxyError::LoadShed {
                        authority: self.label.clone(),
                    });
                }
                Admit::FailFast => {
                    return Err(ProxyError::FailFast {
                        authority: self.label.clone(),
                    });
                }
            }
        }
    }

    /// Response headers arrived: an RTT sample for the endpoint.
    pub(crate) fn observe(&self, in_flight: &InFlight) {
        let now = self.clock.now();
        lock(&self.state).balancer.observe(now, in_flight);
    }

    /// A connection attempt to `addr` failed: it backs off.
    pub(crate) fn connect_failed(&self, addr: std::net::SocketAddr) {
        let now = self.clock.now();
        let mut state = lock(&self.state);
        let State { balancer, rng, .. } = &mut *state;
        balancer.handle_connect_error(now, addr, rng);
        self.sync(&mut state, now);
    }

    /// A connection to `addr` was established.
    pub(crate) fn connect_succeeded(&self, addr: std::net::SocketAddr) {
        let now = self.clock.now();
        let mut state = lock(&self.state);
        state.balancer.handle_connect_success(addr);
        self.sync(&mut state, now);
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

/// The service's timer task: wakes at the core's deadlines (backoffs ending, fail-fast
/// starting); ends when the service balancer is dropped.
async fn drive(weak: Weak<ServiceBalancer>) {
    loop {
        let Some(this) = weak.upgrade() else { return };
        let deadline = this.next_deadline();
        let reschedule = Arc::clone(&this.reschedule);
        let clock = this.clock;
        // Hold only a weak reference while asleep so an idle service can be dropped; check
        // liveness at least every sweep interval.
        drop(this);
        let wake = deadline.unwrap_or_else(|| clock.now() + SWEEP_INTERVAL);
        tokio::select! {
            () = reschedule.notified() => {}
            () = clock.sleep_until(wake) => {}
        }
        let Some(this) = weak.upgrade() else { return };
        if deadline.is_some_and(|d| clock.now() >= d) {
            this.handle_timeout();
        }
    }
}
