//! The proxy's metrics registry and its Prometheus text rendering.
//!
//! Names and labels follow Linkerd's legacy families (reference/linkerd.md §1.1) so viz-style
//! queries work unchanged: `request_total`, `response_total`, `response_latency_ms` (Linkerd's
//! millisecond buckets, from [`conduit_core::metrics::LatencyHistogram`]) and the `tcp_*`
//! families, plus `process_*`. Requests to a service with a route profile are also counted per
//! route: `route_request_total`, `route_response_total` and `route_response_latency_ms`, with
//! the same labels plus `route` (a route name of the profile, or `default` for requests no
//! route matched), so the label takes only the values the profile names.
//!
//! Label sets are bounded: at most `max_authorities` distinct `authority` values are tracked;
//! requests for further authorities are counted under `authority="overflow"`. Series not
//! updated for `retain_idle` (10 minutes by default, like Linkerd) are dropped at the next
//! scrape, which also frees their authority slot.
//!
//! Cost per request: [`Metrics::series`] finds the request's [`AuthorityMetrics`] by name
//! once, under the registry lock; the request, its route and its response are then recorded
//! into that handle under its own lock (the route's series beside the authority's, found by a
//! binary search among the profile's few names), with no further lookup in the registry.
//! Callers pass the time they already read.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use conduit_core::classify::Outcome;
use conduit_core::metrics::{Counter, LatencyHistogram};
use conduit_core::time::Instant;

use crate::clock::Clock;
use crate::config::MetricsSettings;

/// The `authority` label for authorities beyond the tracked bound.
pub const OVERFLOW_AUTHORITY: &str = "overflow";

/// Traffic direction, the `direction` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// From other proxies to the local app.
    Inbound,
    /// From the local app to other services.
    Outbound,
}

impl Direction {
    /// The label value.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Inbound => "inbound",
            Self::Outbound => "outbound",
        }
    }
}

/// Whether a TCP connection was accepted (`peer="src"`) or opened upstream (`peer="dst"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// An accepted connection.
    Src,
    /// An upstream connection.
    Dst,
}

/// Counters for one (direction, peer) class of TCP connections, updated lock-free by IO.
#[derive(Debug, Default)]
pub struct TcpMetrics {
    open_total: AtomicU64,
    close_total: AtomicU64,
    read_bytes: AtomicU64,
    write_bytes: AtomicU64,
}

impl TcpMetrics {
    pub(crate) fn opened(&self) {
        self.open_total.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn closed(&self) {
        self.close_total.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn read(&self, n: usize) {
        self.read_bytes
            .fetch_add(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
    }
    pub(crate) fn wrote(&self, n: usize) {
        self.write_bytes
            .fetch_add(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
    }
}

/// A resolved authority label, cheap to clone into per-request state.
pub type AuthorityLabel = Arc<str>;

#[derive(Debug)]
struct Series<T> {
    value: T,
    updated: Instant,
}

impl<T> Series<T> {
    /// The series in `slot`, created empty at `now` if absent, marked updated at `now`.
    fn touch(slot: &mut Option<Self>, now: Instant, empty: impl FnOnce() -> T) -> &mut T {
        let series = slot.get_or_insert_with(|| Self {
            value: empty(),
            updated: now,
        });
        series.updated = now;
        &mut series.value
    }
}

#[derive(Debug, Default)]
struct Registry {
    /// Tracked authorities by label (the overflow label too, which takes no slot).
    authorities: BTreeMap<AuthorityLabel, Tracked>,
}

impl Registry {
    /// Authority slots in use (the overflow label takes none).
    fn slots_used(&self) -> usize {
        self.authorities.len() - usize::from(self.authorities.contains_key(OVERFLOW_AUTHORITY))
    }
}

/// One tracked authority label: when it was last used and its series per direction.
#[derive(Debug)]
struct Tracked {
    label: AuthorityLabel,
    used: Instant,
    /// Indexed by [`series_index`].
    directions: [Option<Arc<AuthorityMetrics>>; 4],
    /// Inbound series of requests over mTLS from a client that proved an identity, by that
    /// identity (`client_id`); at most [`MAX_CLIENT_IDS`], further ones under
    /// [`OVERFLOW_AUTHORITY`].
    clients: BTreeMap<Arc<str>, Arc<AuthorityMetrics>>,
}

/// The most `client_id` values counted per authority: identities come from certificates the
/// mesh's CA signed, but a mesh can have many workloads.
pub const MAX_CLIENT_IDS: usize = 100;

impl Tracked {
    /// The series of `direction`, created if absent.
    fn series(
        &mut self,
        direction: Direction,
        tls: bool,
        client: Option<&Arc<str>>,
        now: Instant,
    ) -> Arc<AuthorityMetrics> {
        self.used = now;
        if let (Direction::Inbound, true, Some(client)) = (direction, tls, client) {
            if let Some(metrics) = self.clients.get(client) {
                return Arc::clone(metrics);
            }
            let key = if self.clients.len() < MAX_CLIENT_IDS {
                Arc::clone(client)
            } else {
                Arc::from(OVERFLOW_AUTHORITY)
            };
            let label = &self.label;
            return Arc::clone(
                self.clients
                    .entry(key)
                    .or_insert_with(|| Arc::new(AuthorityMetrics::new(Arc::clone(label)))),
            );
        }
        let metrics = self.directions[series_index(direction, tls)]
            .get_or_insert_with(|| Arc::new(AuthorityMetrics::new(Arc::clone(&self.label))));
        Arc::clone(metrics)
    }
}

/// A series' slot: by direction, then by whether its requests arrived over mTLS (`tls="true"`;
/// inbound only: outbound requests are counted before an endpoint, and so a connection, is
/// chosen).
const fn series_index(direction: Direction, tls: bool) -> usize {
    let direction = match direction {
        Direction::Inbound => 0,
        Direction::Outbound => 2,
    };
    direction + tls as usize
}

const fn outcome_index(outcome: Outcome) -> usize {
    match outcome {
        Outcome::Success => 0,
        Outcome::Failure => 1,
    }
}

/// The series of one (direction, authority): where a request and its response are recorded.
///
/// [`Metrics::series`] hands one out per request; the request is then counted with
/// [`request`](Self::request) and the response recorded with
/// [`response_headers`](Self::response_headers) and [`response_end`](Self::response_end)
/// under this authority's own lock, without looking the authority up again. Each takes the
/// request's route when its service has a profile, and records the route's series in the same
/// critical section. A handle still held (a response in flight) keeps its series from being
/// retired.
#[derive(Debug)]
pub struct AuthorityMetrics {
    label: AuthorityLabel,
    series: Mutex<AuthoritySeries>,
}

#[derive(Debug, Default)]
struct AuthoritySeries {
    requests: Option<Series<Counter>>,
    /// Sorted by status code; an authority answers with a handful of codes.
    statuses: Vec<StatusSeries>,
    /// Per route, sorted by name; only for services with a route profile.
    routes: Vec<RouteSeries>,
    /// Where the last route looked up is in `routes`: a request's route is looked up three
    /// times (request, headers, end), and requests on one route come in runs.
    last_route: usize,
}

/// One route's series: the same shape as an authority's.
#[derive(Debug)]
struct RouteSeries {
    route: Arc<str>,
    requests: Option<Series<Counter>>,
    statuses: Vec<StatusSeries>,
    /// Every attempt's response on a route that retries (the responses above are the ones
    /// callers got): Linkerd's `route_actual_response_total`. No latency is kept.
    actual: Vec<StatusSeries>,
    /// Retries sent, by what failed (a few static names).
    retries: Vec<(&'static str, Series<Counter>)>,
    /// Retryable failures not retried, by why not (`core::retry::Skip` names).
    skipped: Vec<(&'static str, Series<Counter>)>,
    /// Hedges sent, by how each ended (`won`, `lost`, `failed`).
    hedges: Vec<(&'static str, Series<Counter>)>,
    /// Failures injected by the route's fault policy, by kind (`abort`, `delay`).
    faults: Vec<(&'static str, Series<Counter>)>,
}

/// The counter named `name` in `counters`, created if absent.
fn named_counter<'a>(
    counters: &'a mut Vec<(&'static str, Series<Counter>)>,
    name: &'static str,
    now: Instant,
) -> &'a mut Counter {
    let i = match counters.iter().position(|(n, _)| *n == name) {
        Some(i) => i,
        None => {
            counters.push((
                name,
                Series {
                    value: Counter::new(),
                    updated: now,
                },
            ));
            counters.sort_by_key(|(n, _)| *n);
            counters
                .iter()
                .position(|(n, _)| *n == name)
                .unwrap_or_default()
        }
    };
    let series = &mut counters[i].1;
    series.updated = now;
    &mut series.value
}

#[derive(Debug)]
struct StatusSeries {
    status: u16,
    latency: Option<Series<LatencyHistogram>>,
    /// Indexed by [`outcome_index`].
    responses: [Option<Series<Counter>>; 2],
}

/// The `status_code` a response is counted under: its own when HTTP defines it (100 to 599
/// with a registered reason phrase), else [`OTHER_STATUS`], so a peer cannot add a series per
/// made-up code.
fn status_key(status: u16) -> u16 {
    match http::StatusCode::from_u16(status) {
        Ok(code) if status <= 599 && code.canonical_reason().is_some() => status,
        // nginx's "client closed request", which the proxy records for abandoned requests.
        Ok(_) if status == 499 => status,
        _ => OTHER_STATUS,
    }
}

/// The series of responses with a status HTTP does not define, rendered `status_code="other"`.
const OTHER_STATUS: u16 = 0;

/// The series of `status` in `statuses` (sorted by status), created if absent.
fn status_series(statuses: &mut Vec<StatusSeries>, status: u16) -> &mut StatusSeries {
    let status = status_key(status);
    let i = match statuses.binary_search_by_key(&status, |s| s.status) {
        Ok(i) => i,
        Err(i) => {
            statuses.insert(
                i,
                StatusSeries {
                    status,
                    latency: None,
                    responses: [None, None],
                },
            );
            i
        }
    };
    &mut statuses[i]
}

/// Drops the series of `statuses` last updated when `keep` says no; returns whether the
/// request counter and every status are gone.
fn retire_series(
    requests: &mut Option<Series<Counter>>,
    statuses: &mut Vec<StatusSeries>,
    keep: &impl Fn(Instant) -> bool,
) -> bool {
    fn fresh<T>(slot: &mut Option<Series<T>>, keep: &impl Fn(Instant) -> bool) {
        if slot.as_ref().is_some_and(|series| !keep(series.updated)) {
            *slot = None;
        }
    }
    fresh(requests, keep);
    statuses.retain_mut(|status| {
        fresh(&mut status.latency, keep);
        for slot in &mut status.responses {
            fresh(slot, keep);
        }
        status.latency.is_some() || status.responses.iter().any(Option::is_some)
    });
    requests.is_none() && statuses.is_empty()
}

impl AuthoritySeries {
    /// The series of `route`, created if absent.
    fn route(&mut self, route: &Arc<str>) -> &mut RouteSeries {
        let i = match self.routes.binary_search_by(|r| (*r.route).cmp(&**route)) {
            Ok(i) => i,
            Err(i) => {
                self.routes.insert(
                    i,
                    RouteSeries {
                        route: Arc::clone(route),
                        requests: None,
                        statuses: Vec::new(),
                        actual: Vec::new(),
                        retries: Vec::new(),
                        skipped: Vec::new(),
                        hedges: Vec::new(),
                        faults: Vec::new(),
                    },
                );
                i
            }
        };
        self.last_route = i;
        &mut self.routes[i]
    }

    /// Drops the series idle for `retain_idle` at `now`; returns whether none is left.
    fn retire(&mut self, keep: impl Fn(Instant) -> bool) -> bool {
        self.routes.retain_mut(|route| {
            let mut none = None;
            let actual_gone = retire_series(&mut none, &mut route.actual, &keep);
            route.retries.retain(|(_, series)| keep(series.updated));
            route.skipped.retain(|(_, series)| keep(series.updated));
            route.hedges.retain(|(_, series)| keep(series.updated));
            route.faults.retain(|(_, series)| keep(series.updated));
            let gone = retire_series(&mut route.requests, &mut route.statuses, &keep);
            !(gone
                && actual_gone
                && route.retries.is_empty()
                && route.skipped.is_empty()
                && route.hedges.is_empty()
                && route.faults.is_empty())
        });
        retire_series(&mut self.requests, &mut self.statuses, &keep) && self.routes.is_empty()
    }
}

impl AuthorityMetrics {
    fn new(label: AuthorityLabel) -> Self {
        Self {
            label,
            series: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, AuthoritySeries> {
        // Every update is a single assignment; a poisoned lock still holds usable counters.
        self.series
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The `authority` label value (the overflow label when the bound was reached).
    #[must_use]
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Counts a request (and its route's, when it has one) arriving at `now`.
    pub fn request(&self, now: Instant, route: Option<&Arc<str>>) {
        let mut series = self.lock();
        Series::touch(&mut series.requests, now, Counter::new).incr();
        if let Some(route) = route {
            Series::touch(&mut series.route(route).requests, now, Counter::new).incr();
        }
    }

    /// Records the time to response headers, at `now`.
    pub fn response_headers(
        &self,
        now: Instant,
        status: u16,
        latency: Duration,
        route: Option<&Arc<str>>,
    ) {
        let mut series = self.lock();
        Series::touch(
            &mut status_series(&mut series.statuses, status).latency,
            now,
            LatencyHistogram::new,
        )
        .record(latency);
        if let Some(route) = route {
            let route = series.route(route);
            Series::touch(
                &mut status_series(&mut route.statuses, status).latency,
                now,
                LatencyHistogram::new,
            )
            .record(latency);
        }
    }

    /// Counts a finished response under its `classification` (the core classifier's
    /// [`Outcome`], whose label values are Linkerd's `success` and `failure`), at `now`.
    pub fn response_end(
        &self,
        now: Instant,
        status: u16,
        class: Outcome,
        route: Option<&Arc<str>>,
    ) {
        self.end(now, status, class, route, false);
    }

    /// [`response_end`](Self::response_end) for the last attempt of a request on a route that
    /// retries: counted as the caller's response and as an attempt's.
    pub fn response_end_attempted(
        &self,
        now: Instant,
        status: u16,
        class: Outcome,
        route: &Arc<str>,
    ) {
        self.end(now, status, class, Some(route), true);
    }

    fn end(
        &self,
        now: Instant,
        status: u16,
        class: Outcome,
        route: Option<&Arc<str>>,
        actual: bool,
    ) {
        let mut series = self.lock();
        let slot = &mut status_series(&mut series.statuses, status).responses[outcome_index(class)];
        Series::touch(slot, now, Counter::new).incr();
        if let Some(route) = route {
            let route = series.route(route);
            let slot =
                &mut status_series(&mut route.statuses, status).responses[outcome_index(class)];
            Series::touch(slot, now, Counter::new).incr();
            if actual {
                let slot =
                    &mut status_series(&mut route.actual, status).responses[outcome_index(class)];
                Series::touch(slot, now, Counter::new).incr();
            }
        }
    }

    /// Counts an attempt that is not the request's last (its response was discarded for a
    /// retry, or it failed before one) on `route`, at `now`.
    pub fn attempt_end(&self, now: Instant, status: u16, class: Outcome, route: &Arc<str>) {
        let mut series = self.lock();
        let route = series.route(route);
        let slot = &mut status_series(&mut route.actual, status).responses[outcome_index(class)];
        Series::touch(slot, now, Counter::new).incr();
    }

    /// Counts a retry on `route` after a failure of kind `reason`, at `now`.
    pub fn retried(&self, now: Instant, route: &Arc<str>, reason: &'static str) {
        let mut series = self.lock();
        named_counter(&mut series.route(route).retries, reason, now).incr();
    }

    /// Counts a retryable failure on `route` that was not retried, and why (`skip`), at `now`.
    pub fn retry_skipped(&self, now: Instant, route: &Arc<str>, skip: &'static str) {
        let mut series = self.lock();
        named_counter(&mut series.route(route).skipped, skip, now).incr();
    }

    /// Counts a hedge on `route` that ended with `outcome` (`won`: its response went to the
    /// caller; `lost`: another attempt answered first and it was cancelled; `failed`), at `now`.
    pub fn hedged(&self, now: Instant, route: &Arc<str>, outcome: &'static str) {
        let mut series = self.lock();
        named_counter(&mut series.route(route).hedges, outcome, now).incr();
    }

    /// Counts a failure of kind `fault` (`abort`, `delay`) injected into a request on `route`
    /// by its fault policy, at `now`.
    pub fn fault_injected(&self, now: Instant, route: &Arc<str>, fault: &'static str) {
        let mut series = self.lock();
        named_counter(&mut series.route(route).faults, fault, now).incr();
    }
}

/// The proxy's metrics; one per proxy, shared by every connection.
#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    clock: Clock,
    settings: MetricsSettings,
    /// Indexed by `tcp_index`.
    tcp: [Arc<TcpMetrics>; 4],
    /// Open connections per `tcp_index`, as a gauge.
    open: [Arc<AtomicU64>; 4],
    /// Inbound authorization decisions, per connection: HTTP then opaque TCP, each by
    /// verdict (allow, deny, audit_deny).
    authz: [[AtomicU64; 3]; 2],
    /// Failed mTLS handshakes: inbound then outbound, by [`TLS_FAILURE_REASONS`].
    tls_failures: [[AtomicU64; TLS_FAILURE_REASONS.len()]; 2],
}

/// The `reason` label of `tls_handshake_failures_total`, from [`tls_failure_reason`].
pub const TLS_FAILURE_REASONS: [&str; 7] = [
    "expired",
    "not_yet_valid",
    "unknown_issuer",
    "wrong_name",
    "no_certificate",
    "timeout",
    "other",
];

/// Why a TLS handshake failed, as a [`TLS_FAILURE_REASONS`] label: the certificate the peer
/// presented (expired, not yet valid, from another CA or self-signed, for another name), or
/// none at all, read from rustls' error inside the IO error (a refusal the peer sent us is
/// read from its alert).
#[must_use]
pub fn tls_failure_reason(error: &std::io::Error) -> &'static str {
    use rustls::{AlertDescription, CertificateError, Error};
    let Some(error) = error.get_ref().and_then(|e| e.downcast_ref::<Error>()) else {
        return if error.kind() == std::io::ErrorKind::TimedOut {
            "timeout"
        } else {
            "other"
        };
    };
    match error {
        Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        )
        | Error::AlertReceived(AlertDescription::CertificateExpired) => "expired",
        Error::InvalidCertificate(
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
        ) => "not_yet_valid",
        Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        )
        | Error::AlertReceived(AlertDescription::UnknownCA | AlertDescription::BadCertificate) => {
            "unknown_issuer"
        }
        Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => "wrong_name",
        Error::NoCertificatesPresented
        | Error::AlertReceived(AlertDescription::CertificateRequired) => "no_certificate",
        _ => "other",
    }
}

const fn tcp_index(direction: Direction, peer: Peer) -> usize {
    (match direction {
        Direction::Inbound => 0,
        Direction::Outbound => 2,
    }) + match peer {
        Peer::Src => 0,
        Peer::Dst => 1,
    }
}

/// Settles one open connection on drop (the `tcp_open_connections` gauge and `tcp_close_total`).
#[derive(Debug)]
pub struct ConnectionGuard {
    tcp: Arc<TcpMetrics>,
    open: Arc<AtomicU64>,
}

impl ConnectionGuard {
    /// The counters the connection's IO should add to.
    #[must_use]
    pub fn tcp(&self) -> &Arc<TcpMetrics> {
        &self.tcp
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.tcp.closed();
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    /// An empty registry.
    #[must_use]
    pub fn new(clock: Clock, settings: MetricsSettings) -> Self {
        Self {
            registry: Mutex::default(),
            clock,
            settings,
            tcp: Default::default(),
            open: Default::default(),
            authz: Default::default(),
            tls_failures: Default::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        // A panic while holding this lock leaves counters consistent (every update is a
        // single assignment), so a poisoned lock is still safe to use.
        self.registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts an inbound authorization decision for a connection (`http`: it speaks HTTP,
    /// else opaque TCP), or for a request on a connection the policy decides request by
    /// request (`exchange::gate`).
    pub fn authorized(&self, http: bool, verdict: conduit_core::policy::Verdict) {
        use conduit_core::policy::Verdict;
        let i = match verdict {
            Verdict::Allow => 0,
            Verdict::Deny => 1,
            Verdict::AuditDeny => 2,
        };
        self.authz[usize::from(!http)][i].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a failed mTLS handshake (`reason` from [`tls_failure_reason`], or `timeout`).
    pub fn tls_handshake_failed(&self, direction: Direction, reason: &str) {
        let i = TLS_FAILURE_REASONS
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(TLS_FAILURE_REASONS.len() - 1);
        let d = usize::from(direction == Direction::Outbound);
        self.tls_failures[d][i].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a new TCP connection; the guard settles it when dropped.
    #[must_use]
    pub fn connection(&self, direction: Direction, peer: Peer) -> ConnectionGuard {
        let i = tcp_index(direction, peer);
        self.tcp[i].opened();
        self.open[i].fetch_add(1, Ordering::Relaxed);
        ConnectionGuard {
            tcp: Arc::clone(&self.tcp[i]),
            open: Arc::clone(&self.open[i]),
        }
    }

    /// The series a request for `authority` arriving at `now` is recorded into (bounded; see
    /// the module doc). The caller counts the request with [`AuthorityMetrics::request`].
    pub fn series(
        &self,
        direction: Direction,
        authority: &str,
        now: Instant,
    ) -> Arc<AuthorityMetrics> {
        self.series_tls(direction, false, None, authority, now)
    }

    /// [`Self::series`] for requests that arrived over mTLS (`tls` true), counted with
    /// `tls="true"` and, inbound, the identity the client proved (`client_id`).
    pub fn series_tls(
        &self,
        direction: Direction,
        tls: bool,
        client: Option<&Arc<str>>,
        authority: &str,
        now: Instant,
    ) -> Arc<AuthorityMetrics> {
        let mut registry = self.lock();
        if let Some(tracked) = registry.authorities.get_mut(authority) {
            return tracked.series(direction, tls, client, now);
        }
        let label = if registry.slots_used() < self.settings.max_authorities {
            authority
        } else {
            OVERFLOW_AUTHORITY
        };
        let label: AuthorityLabel = Arc::from(label);
        registry
            .authorities
            .entry(Arc::clone(&label))
            .or_insert_with(|| Tracked {
                label,
                used: now,
                directions: [None, None, None, None],
                clients: BTreeMap::new(),
            })
            .series(direction, tls, client, now)
    }

    /// Drops series idle longer than `retain_idle` now; the proxy calls it periodically, so
    /// idle series go whether or not anyone scrapes.
    pub fn retire_idle(&self) {
        let now = self.clock.now();
        self.retire(&mut self.lock(), now);
    }

    /// Drops series idle longer than `retain_idle`, and authorities left with none (unless a
    /// request in flight still holds their handle).
    fn retire(&self, registry: &mut Registry, now: Instant) {
        let keep =
            |updated: Instant| now.saturating_duration_since(updated) < self.settings.retain_idle;
        registry.authorities.retain(|_, tracked| {
            for slot in &mut tracked.directions {
                if let Some(metrics) = slot
                    && metrics.lock().retire(keep)
                    && Arc::strong_count(metrics) == 1
                {
                    *slot = None;
                }
            }
            tracked.clients.retain(|_, metrics| {
                !(metrics.lock().retire(keep) && Arc::strong_count(metrics) == 1)
            });
            keep(tracked.used)
                || tracked.directions.iter().any(Option::is_some)
                || !tracked.clients.is_empty()
        });
    }

    /// Renders every family in the Prometheus text exposition format (version 0.0.4).
    #[must_use]
    pub fn render(&self, process: &str) -> String {
        let now = self.clock.now();
        let mut out = String::with_capacity(4096);
        // The registry lock (which every request takes to find its series) is held only to
        // retire idle series and list the rest; each series is then rendered under its own
        // lock, held for its few lines.
        let series: Vec<SeriesRef> = {
            let mut registry = self.lock();
            self.retire(&mut registry, now);
            each_series(&registry)
        };
        render_registry(&series, &mut out);
        self.render_tcp(&mut out);
        self.render_authz(&mut out);
        self.render_tls(&mut out);
        out.push_str(process);
        out
    }

    /// `tls_handshake_failures_total`, by direction and reason (only those seen).
    fn render_tls(&self, out: &mut String) {
        let name = "tls_handshake_failures_total";
        let _ = writeln!(
            out,
            "# HELP {name} mTLS handshakes that failed, by direction and reason.\n# TYPE {name} counter"
        );
        for (d, direction) in [Direction::Inbound, Direction::Outbound].iter().enumerate() {
            for (r, reason) in TLS_FAILURE_REASONS.iter().enumerate() {
                let value = self.tls_failures[d][r].load(Ordering::Relaxed);
                if value > 0 {
                    let _ = writeln!(
                        out,
                        "{name}{{direction=\"{}\",reason=\"{reason}\"}} {value}",
                        direction.as_str()
                    );
                }
            }
        }
    }

    /// Linkerd's inbound policy families (`inbound_{http,tcp}_authz_{allow,deny}_total`), plus
    /// `..._audit_deny_total` for connections an audit-mode policy let through that it would
    /// have refused. Counted per connection: the decision rests on the connection's identity
    /// and address. Except on a port whose policy lists probe paths: there an HTTP connection
    /// the policy does not allow is decided request by request (a probe is allowed, anything
    /// else keeps the connection's verdict), and each request is counted.
    fn render_authz(&self, out: &mut String) {
        for (p, protocol) in ["http", "tcp"].iter().enumerate() {
            let per_request = if p == 0 {
                " (requests, on a connection it does not allow on a port that admits probes)"
            } else {
                ""
            };
            for (v, verdict) in ["allow", "deny", "audit_deny"].iter().enumerate() {
                let name = format!("inbound_{protocol}_authz_{verdict}_total");
                let _ = writeln!(
                    out,
                    "# HELP {name} Inbound {protocol} connections the authorization policy decided {verdict}{per_request}.\n# TYPE {name} counter\n{name} {}",
                    self.authz[p][v].load(Ordering::Relaxed)
                );
            }
        }
    }

    fn render_tcp(&self, out: &mut String) {
        let classes = [
            (Direction::Inbound, Peer::Src),
            (Direction::Inbound, Peer::Dst),
            (Direction::Outbound, Peer::Src),
            (Direction::Outbound, Peer::Dst),
        ];
        let families: [(&str, &str, &str); 5] = [
            ("tcp_open_total", "counter", "Total TCP connections opened."),
            (
                "tcp_close_total",
                "counter",
                "Total TCP connections closed.",
            ),
            (
                "tcp_open_connections",
                "gauge",
                "TCP connections currently open.",
            ),
            (
                "tcp_read_bytes_total",
                "counter",
                "Bytes read from TCP connections.",
            ),
            (
                "tcp_write_bytes_total",
                "counter",
                "Bytes written to TCP connections.",
            ),
        ];
        for (family, (name, kind, help)) in families.iter().enumerate() {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (direction, peer) in classes {
                let i = tcp_index(direction, peer);
                let tcp = &self.tcp[i];
                let value = match family {
                    0 => tcp.open_total.load(Ordering::Relaxed),
                    1 => tcp.close_total.load(Ordering::Relaxed),
                    2 => self.open[i].load(Ordering::Relaxed),
                    3 => tcp.read_bytes.load(Ordering::Relaxed),
                    _ => tcp.write_bytes.load(Ordering::Relaxed),
                };
                let peer = match peer {
                    Peer::Src => "src",
                    Peer::Dst => "dst",
                };
                let _ = writeln!(
                    out,
                    "{name}{{direction=\"{}\",peer=\"{peer}\"}} {value}",
                    direction.as_str()
                );
            }
        }
    }
}

/// One series to render: its direction, whether over mTLS, the client's identity (inbound
/// mTLS), and its counts.
type SeriesRef = (Direction, bool, Option<Arc<str>>, Arc<AuthorityMetrics>);

/// Every series in label order: direction first, then plaintext before mTLS (without a client
/// identity, then by client identity), then authority.
fn each_series(registry: &Registry) -> Vec<SeriesRef> {
    let mut out = Vec::new();
    for (direction, tls) in [
        (Direction::Inbound, false),
        (Direction::Inbound, true),
        (Direction::Outbound, false),
        (Direction::Outbound, true),
    ] {
        for tracked in registry.authorities.values() {
            if let Some(metrics) = &tracked.directions[series_index(direction, tls)] {
                out.push((direction, tls, None, Arc::clone(metrics)));
            }
        }
        if (direction, tls) == (Direction::Inbound, true) {
            let mut clients: Vec<SeriesRef> = registry
                .authorities
                .values()
                .flat_map(|tracked| {
                    tracked.clients.iter().map(|(client, metrics)| {
                        (
                            direction,
                            tls,
                            Some(Arc::clone(client)),
                            Arc::clone(metrics),
                        )
                    })
                })
                .collect();
            clients.sort_by(|a, b| (&a.2, &a.3.label).cmp(&(&b.2, &b.3.label)));
            out.extend(clients);
        }
    }
    out
}

/// A `status_code` label value.
struct StatusLabel(u16);

impl std::fmt::Display for StatusLabel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            OTHER_STATUS => f.write_str("other"),
            status => write!(f, "{status}"),
        }
    }
}

/// The text of the three families of one kind (per authority, or per route), filled row by
/// row and joined under their headers at the end.
#[derive(Default)]
struct Families {
    requests: String,
    responses: String,
    latency: String,
}

impl Families {
    /// Appends one row: its labels, its request counter and its status series.
    fn row(
        &mut self,
        prefix: &str,
        labels: &str,
        requests: Option<&Series<Counter>>,
        statuses: &[StatusSeries],
    ) {
        if let Some(requests) = requests {
            let _ = writeln!(
                self.requests,
                "{prefix}request_total{{{labels}}} {}",
                requests.value.value()
            );
        }
        for status in statuses {
            for (class, series) in [Outcome::Success, Outcome::Failure]
                .into_iter()
                .zip(&status.responses)
            {
                let Some(series) = series else { continue };
                let _ = writeln!(
                    self.responses,
                    "{prefix}response_total{{{labels},status_code=\"{}\",classification=\"{}\"}} {}",
                    StatusLabel(status.status),
                    class.as_str(),
                    series.value.value()
                );
            }
            let Some(series) = &status.latency else {
                continue;
            };
            let labels = format!("{labels},status_code=\"{}\"", StatusLabel(status.status));
            for bucket in series.value.cumulative_buckets() {
                let le = bucket
                    .le_ms
                    .map_or_else(|| "+Inf".to_owned(), |ms| ms.to_string());
                let _ = writeln!(
                    self.latency,
                    "{prefix}response_latency_ms_bucket{{{labels},le=\"{le}\"}} {}",
                    bucket.count
                );
            }
            let sum_micros = series.value.sum_micros();
            let _ = writeln!(
                self.latency,
                "{prefix}response_latency_ms_sum{{{labels}}} {}.{:03}",
                sum_micros / 1000,
                sum_micros % 1000
            );
            let _ = writeln!(
                self.latency,
                "{prefix}response_latency_ms_count{{{labels}}} {}",
                series.value.count()
            );
        }
    }

    /// Appends the three families, with their headers, to `out`.
    fn finish(self, out: &mut String, prefix: &str, what: &str) {
        let _ = writeln!(
            out,
            "# HELP {prefix}request_total Total count of {what} requests.\n# TYPE {prefix}request_total counter"
        );
        out.push_str(&self.requests);
        let _ = writeln!(
            out,
            "# HELP {prefix}response_total Total count of {what} responses.\n# TYPE {prefix}response_total counter"
        );
        out.push_str(&self.responses);
        let _ = writeln!(
            out,
            "# HELP {prefix}response_latency_ms Elapsed times between a request's headers being received and its response's headers being received.\n# TYPE {prefix}response_latency_ms histogram"
        );
        out.push_str(&self.latency);
    }
}

/// The retry families: every attempt's responses, retries and retries not taken, per route
/// (only routes that retry have rows; a family without rows is left out).
#[derive(Default)]
struct RetryFamilies {
    actual: String,
    retries: String,
    skipped: String,
    exhausted: String,
    hedges: String,
    faults: String,
}

impl RetryFamilies {
    fn row(&mut self, labels: &str, route: &RouteSeries) {
        for status in &route.actual {
            for (class, series) in [Outcome::Success, Outcome::Failure]
                .into_iter()
                .zip(&status.responses)
            {
                let Some(series) = series else { continue };
                let _ = writeln!(
                    self.actual,
                    "route_actual_response_total{{{labels},status_code=\"{}\",classification=\"{}\"}} {}",
                    StatusLabel(status.status),
                    class.as_str(),
                    series.value.value()
                );
            }
        }
        for (reason, series) in &route.retries {
            let _ = writeln!(
                self.retries,
                "route_retries_total{{{labels},reason=\"{reason}\"}} {}",
                series.value.value()
            );
        }
        for (reason, series) in &route.skipped {
            let _ = writeln!(
                self.skipped,
                "route_retry_skipped_total{{{labels},reason=\"{reason}\"}} {}",
                series.value.value()
            );
            if *reason == conduit_core::retry::Skip::Budget.as_str() {
                let _ = writeln!(
                    self.exhausted,
                    "route_retry_budget_exhausted_total{{{labels}}} {}",
                    series.value.value()
                );
            }
        }
        for (outcome, series) in &route.hedges {
            let _ = writeln!(
                self.hedges,
                "route_hedges_total{{{labels},outcome=\"{outcome}\"}} {}",
                series.value.value()
            );
        }
        for (fault, series) in &route.faults {
            let _ = writeln!(
                self.faults,
                "route_fault_injections_total{{{labels},fault=\"{fault}\"}} {}",
                series.value.value()
            );
        }
    }

    fn finish(self, out: &mut String) {
        for (name, help, rows) in [
            (
                "route_actual_response_total",
                "Total count of HTTP responses per route and attempt, retried attempts included.",
                self.actual,
            ),
            (
                "route_retries_total",
                "Total count of retries per route, by what failed.",
                self.retries,
            ),
            (
                "route_retry_skipped_total",
                "Total count of retryable failures not retried per route, by why not.",
                self.skipped,
            ),
            (
                "route_retry_budget_exhausted_total",
                "Total count of retries refused because the route's retry budget was spent.",
                self.exhausted,
            ),
            (
                "route_hedges_total",
                "Total count of hedges (speculative retries) per route, by how each ended.",
                self.hedges,
            ),
            (
                "route_fault_injections_total",
                "Total count of failures injected on purpose by the route's fault policy, by kind.",
                self.faults,
            ),
        ] {
            if rows.is_empty() {
                continue;
            }
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            out.push_str(&rows);
        }
    }
}

fn render_registry(series: &[SeriesRef], out: &mut String) {
    let mut authorities = Families::default();
    let mut routes = Families::default();
    let mut retries = RetryFamilies::default();
    for (direction, tls, client, metrics) in series {
        let client = client
            .as_ref()
            .map(|c| format!("client_id=\"{}\",", escape(c)))
            .unwrap_or_default();
        let labels = format!(
            "direction=\"{}\",{}{client}authority=\"{}\"",
            direction.as_str(),
            if *tls { "tls=\"true\"," } else { "" },
            escape(&metrics.label)
        );
        let locked = metrics.lock();
        authorities.row("", &labels, locked.requests.as_ref(), &locked.statuses);
        for route in &locked.routes {
            let labels = format!("{labels},route=\"{}\"", escape(&route.route));
            routes.row("route_", &labels, route.requests.as_ref(), &route.statuses);
            retries.row(&labels, route);
        }
    }
    authorities.finish(out, "", "HTTP");
    routes.finish(out, "route_", "HTTP per route");
    retries.finish(out);
}

/// Escapes a label value (backslash, quote, newline) per the exposition format.
pub(crate) fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_failures_are_named_by_what_was_wrong() {
        use rustls::{AlertDescription, CertificateError, Error};
        let io = |e: Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        let cases = [
            (
                io(Error::InvalidCertificate(CertificateError::Expired)),
                "expired",
            ),
            (
                io(Error::InvalidCertificate(CertificateError::NotValidYet)),
                "not_yet_valid",
            ),
            (
                io(Error::InvalidCertificate(CertificateError::UnknownIssuer)),
                "unknown_issuer",
            ),
            (
                io(Error::AlertReceived(AlertDescription::UnknownCA)),
                "unknown_issuer",
            ),
            (
                io(Error::InvalidCertificate(CertificateError::NotValidForName)),
                "wrong_name",
            ),
            (io(Error::NoCertificatesPresented), "no_certificate"),
            (
                io(Error::AlertReceived(AlertDescription::CertificateRequired)),
                "no_certificate",
            ),
            (std::io::ErrorKind::TimedOut.into(), "timeout"),
            (std::io::ErrorKind::ConnectionReset.into(), "other"),
        ];
        for (error, want) in cases {
            assert_eq!(tls_failure_reason(&error), want, "{error}");
        }
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn requests_over_mtls_are_counted_apart_with_tls_true() {
        let clock = Clock::new();
        let metrics = Metrics::new(
            clock,
            MetricsSettings {
                retain_idle: Duration::from_secs(60),
                max_authorities: 1,
            },
        );
        for tls in [true, true, false] {
            let series = metrics.series_tls(Direction::Inbound, tls, None, "a.svc:80", clock.now());
            series.request(clock.now(), None);
        }
        let text = metrics.render("");
        let plain = text.find("request_total{direction=\"inbound\",authority=\"a.svc:80\"} 1");
        let tls =
            text.find("request_total{direction=\"inbound\",tls=\"true\",authority=\"a.svc:80\"} 2");
        assert!(plain.is_some() && tls.is_some() && plain < tls, "{text}");
        // One authority, whichever the transport: the bound counts authorities, not series.
        let other = metrics.series_tls(Direction::Inbound, true, None, "b.svc:80", clock.now());
        assert_eq!(other.label(), OVERFLOW_AUTHORITY);
        // A client's proved identity labels its own series; a flood of identities is bounded.
        let web: Arc<str> = Arc::from("web.ns.serviceaccount.identity.conduit.local");
        metrics
            .series_tls(
                Direction::Inbound,
                true,
                Some(&web),
                "a.svc:80",
                clock.now(),
            )
            .request(clock.now(), None);
        for i in 0..MAX_CLIENT_IDS + 5 {
            let id: Arc<str> = Arc::from(format!("c{i}.ns.serviceaccount.identity.conduit.local"));
            metrics
                .series_tls(Direction::Inbound, true, Some(&id), "a.svc:80", clock.now())
                .request(clock.now(), None);
        }
        let text = metrics.render("");
        assert!(
            text.contains("request_total{direction=\"inbound\",tls=\"true\",client_id=\"web.ns.serviceaccount.identity.conduit.local\",authority=\"a.svc:80\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("request_total{direction=\"inbound\",tls=\"true\",client_id=\"overflow\",authority=\"a.svc:80\"} 6"),
            "{text}"
        );
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn authorities_are_bounded_and_idle_series_retire() {
        let clock = Clock::new();
        let metrics = Metrics::new(
            clock,
            MetricsSettings {
                retain_idle: Duration::from_secs(60),
                max_authorities: 2,
            },
        );
        let request = |direction, authority| {
            let series = metrics.series(direction, authority, clock.now());
            series.request(clock.now(), None);
            series
        };
        let a = request(Direction::Outbound, "a.svc:80");
        request(Direction::Outbound, "b.svc:80");
        let c = request(Direction::Outbound, "c.svc:80");
        assert_eq!(c.label(), OVERFLOW_AUTHORITY);
        a.response_headers(clock.now(), 200, Duration::from_millis(3), None);
        a.response_end(clock.now(), 200, Outcome::Success, None);
        request(Direction::Inbound, "a.svc:80");
        let text = metrics.render("");
        assert!(
            text.contains("request_total{direction=\"outbound\",authority=\"overflow\"} 1"),
            "{text}"
        );
        assert!(text.contains("response_latency_ms_bucket{direction=\"outbound\",authority=\"a.svc:80\",status_code=\"200\",le=\"3\"} 1"), "{text}");
        assert!(
            text.contains("response_total{direction=\"outbound\",authority=\"a.svc:80\",status_code=\"200\",classification=\"success\"} 1"),
            "{text}"
        );
        let inbound = text.find("request_total{direction=\"inbound\",authority=\"a.svc:80\"} 1");
        let outbound = text.find("request_total{direction=\"outbound\",authority=\"a.svc:80\"} 1");
        assert!(
            inbound.is_some() && inbound < outbound,
            "direction first: {text}"
        );
        drop((a, c));
        tokio::time::sleep(Duration::from_secs(61)).await;
        let text = metrics.render("");
        assert!(!text.contains("a.svc"), "{text}");
        let d = request(Direction::Outbound, "d.svc:80");
        assert_eq!(
            d.label(),
            "d.svc:80",
            "retired authorities free their slots"
        );
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_response_in_flight_outlives_retirement() {
        let clock = Clock::new();
        let settings = MetricsSettings {
            retain_idle: Duration::from_secs(60),
            max_authorities: 1,
        };
        let metrics = Metrics::new(clock, settings);
        let slow = metrics.series(Direction::Outbound, "a.svc:80", clock.now());
        slow.request(clock.now(), None);
        tokio::time::sleep(Duration::from_secs(61)).await;
        let text = metrics.render("");
        assert!(!text.contains("a.svc"), "idle series retire: {text}");
        slow.response_end(clock.now(), 200, Outcome::Failure, None);
        let text = metrics.render("");
        assert!(
            text.contains("response_total{direction=\"outbound\",authority=\"a.svc:80\",status_code=\"200\",classification=\"failure\"} 1"),
            "the held handle still records into the registry: {text}"
        );
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn routes_are_counted_beside_their_authority() {
        let clock = Clock::new();
        let settings = MetricsSettings {
            retain_idle: Duration::from_secs(60),
            max_authorities: 10,
        };
        let metrics = Metrics::new(clock, settings);
        let items: Arc<str> = Arc::from("items");
        let series = metrics.series(Direction::Inbound, "api.svc:80", clock.now());
        for status in [200, 500] {
            series.request(clock.now(), Some(&items));
            series.response_headers(clock.now(), status, Duration::from_millis(7), Some(&items));
            let class = if status == 200 {
                Outcome::Success
            } else {
                Outcome::Failure
            };
            series.response_end(clock.now(), status, class, Some(&items));
        }
        series.request(clock.now(), None);
        let text = metrics.render("");
        for line in [
            "request_total{direction=\"inbound\",authority=\"api.svc:80\"} 3",
            "route_request_total{direction=\"inbound\",authority=\"api.svc:80\",route=\"items\"} 2",
            "route_response_total{direction=\"inbound\",authority=\"api.svc:80\",route=\"items\",status_code=\"500\",classification=\"failure\"} 1",
            "route_response_latency_ms_bucket{direction=\"inbound\",authority=\"api.svc:80\",route=\"items\",status_code=\"200\",le=\"10\"} 1",
            "route_response_latency_ms_count{direction=\"inbound\",authority=\"api.svc:80\",route=\"items\",status_code=\"200\"} 1",
        ] {
            assert!(text.contains(line), "{line}\n{text}");
        }
        drop(series);
        tokio::time::sleep(Duration::from_secs(61)).await;
        assert!(
            !metrics.render("").contains("route=\"items\""),
            "route series retire too"
        );
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn made_up_status_codes_share_one_series_and_idle_series_go_without_scrapes() {
        let clock = Clock::new();
        let settings = MetricsSettings {
            retain_idle: Duration::from_secs(60),
            max_authorities: 10,
        };
        let metrics = Metrics::new(clock, settings);
        let series = metrics.series(Direction::Inbound, "api.svc:80", clock.now());
        for status in [200, 299, 599, 600, 999, 799] {
            series.response_end(clock.now(), status, Outcome::Success, None);
        }
        let text = metrics.render("");
        let statuses: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("response_total"))
            .filter_map(|l| l.split("status_code=\"").nth(1)?.split('"').next())
            .collect();
        assert_eq!(statuses, ["other", "200"], "{text}");
        assert!(
            text.contains("status_code=\"other\",classification=\"success\"} 5"),
            "{text}"
        );
        drop(series);
        tokio::time::sleep(Duration::from_secs(61)).await;
        metrics.retire_idle();
        assert!(
            metrics.lock().authorities.is_empty(),
            "retired without a scrape"
        );
    }
}
