//! Invariant checkers over a run's [`Trace`]. They read only what clients, backends and the
//! harness recorded, the counters the proxies publish, and what the proxies reported through
//! their observers (each discovery state applied, each endpoint picked); never proxy internals,
//! and never a guess at a proxy's state from which backend answered.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::trace::{AppliedRecord, ConfigVersion, Outcome, Proto, RequestRecord, Trace, micros};

/// A broken invariant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Violation {
    /// Which invariant.
    pub check: String,
    /// What happened (request ids, times).
    pub message: String,
}

impl Violation {
    /// A violation of `check`.
    #[must_use]
    pub fn new(check: &str, message: impl Into<String>) -> Self {
        Self {
            check: check.to_owned(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}] {}", self.check, self.message)
    }
}

/// Which generic invariants a run is held to, with their bounds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checks {
    /// Every request ends in a response or a reported error before its deadline.
    pub deadline: bool,
    /// How long after a configuration replaced an endpoint a proxy may still use it (the
    /// propagation allowance; zero for static discovery beyond one tick).
    pub routing_grace: Duration,
    /// Proxy counters must equal what each client observed.
    pub metrics: bool,
    /// After this sim time (the last fault healed plus the recovery bound), every request
    /// succeeds.
    pub healthy_after: Option<Duration>,
    /// After the last configuration change plus this bound, every proxy has applied the latest
    /// configuration (and every response comes from one of its endpoints).
    pub converge_within: Option<Duration>,
}

impl Default for Checks {
    fn default() -> Self {
        Self {
            deadline: true,
            routing_grace: Duration::from_millis(2),
            metrics: true,
            healthy_after: Some(Duration::ZERO),
            converge_within: Some(Duration::from_millis(100)),
        }
    }
}

/// Runs every generic checker.
#[must_use]
pub fn check_all(trace: &Trace, checks: &Checks, planned: usize) -> Vec<Violation> {
    let mut out = Vec::new();
    if let Some(err) = &trace.sim_error {
        out.push(Violation::new(
            "simulation",
            format!("the simulation stopped: {err}"),
        ));
    }
    if trace.requests.len() != planned {
        out.push(Violation::new(
            "lost",
            format!(
                "{planned} requests planned, {} recorded an outcome",
                trace.requests.len()
            ),
        ));
    }
    if checks.deadline {
        out.extend(deadlines(trace));
    }
    out.extend(no_mixing(trace));
    out.extend(valid_endpoint(trace, checks.routing_grace));
    out.extend(picked_endpoints(trace));
    out.extend(monotonic_config(trace));
    out.extend(at_most_once(trace));
    if checks.metrics {
        out.extend(metrics_agree(trace));
    }
    if let Some(after) = checks.healthy_after {
        out.extend(liveness(trace, after));
    }
    if let Some(bound) = checks.converge_within {
        out.extend(convergence(trace, bound));
    }
    out
}

fn limit<T>(mut v: Vec<T>, max: usize, check: &str, more: impl Fn(usize) -> T) -> Vec<T> {
    let n = v.len();
    if n > max {
        v.truncate(max);
        v.push(more(n - max));
    }
    let _ = check;
    v
}

/// Every request ends in a response or a reported error within its deadline.
#[must_use]
pub fn deadlines(trace: &Trace) -> Vec<Violation> {
    let v = trace
        .requests
        .iter()
        .filter_map(|r| match &r.outcome {
            Outcome::DeadlineExceeded { stage } => Some(Violation::new(
                "deadline",
                format!(
                    "request {} ({:?} to {}) got neither a response nor an error within {} ms (waiting for {stage}; sent at {} ms)",
                    r.id,
                    r.proto,
                    r.authority,
                    r.deadline_us / 1000,
                    r.start_us / 1000
                ),
            )),
            _ if r.end_us.saturating_sub(r.start_us) > r.deadline_us + 2_000 => Some(Violation::new(
                "deadline",
                format!("request {} ended {} us after its start, past its deadline", r.id, r.end_us - r.start_us),
            )),
            _ => None,
        })
        .collect();
    limit(v, 10, "deadline", |n| {
        Violation::new("deadline", format!("... and {n} more"))
    })
}

/// No response reaches the wrong request: echoed id and body must be this request's.
#[must_use]
pub fn no_mixing(trace: &Trace) -> Vec<Violation> {
    let mut out = Vec::new();
    for r in &trace.requests {
        if let Outcome::Response {
            served_by,
            echoed_id,
            body_ok,
            proxy_error,
            body_error,
            ..
        } = &r.outcome
        {
            if served_by.is_some() && echoed_id.as_deref() != Some(r.id.to_string().as_str()) {
                out.push(Violation::new(
                    "mixing",
                    format!("request {} got the response for {:?}", r.id, echoed_id),
                ));
            } else if !body_ok && body_error.is_none() {
                out.push(Violation::new(
                    "mixing",
                    format!(
                        "request {}: body does not match (served by {served_by:?}, proxy error {proxy_error:?})",
                        r.id
                    ),
                ));
            }
        }
    }
    out
}

/// Each response comes from an endpoint that was valid for its destination during the request
/// (within `grace` of a configuration that replaced it).
#[must_use]
pub fn valid_endpoint(trace: &Trace, grace: Duration) -> Vec<Violation> {
    let grace = micros(grace);
    let mut out = Vec::new();
    for r in &trace.requests {
        let Some(host) = r.served_by() else { continue };
        let ok = trace.configs.iter().enumerate().any(|(i, c)| {
            let from = c.at_us;
            let until = trace
                .configs
                .get(i + 1)
                .map_or(u64::MAX, |next| next.at_us.saturating_add(grace));
            let overlaps = from <= r.end_us && r.start_us <= until;
            overlaps
                && c.endpoints
                    .get(&r.authority)
                    .is_some_and(|hosts| hosts.iter().any(|h| h == host))
        });
        if !ok {
            out.push(Violation::new(
                "routing",
                format!(
                    "request {} for {} was served by {host}, not an endpoint of {} between {} and {} us",
                    r.id, r.authority, r.authority, r.start_us, r.end_us
                ),
            ));
        }
    }
    out
}

/// A non-retryable request (POST, gRPC) reaches a backend at most once; nothing reaches a
/// backend that the workload did not send.
#[must_use]
pub fn at_most_once(trace: &Trace) -> Vec<Violation> {
    let mut out = Vec::new();
    let by_id: BTreeMap<u64, &RequestRecord> = trace.requests.iter().map(|r| (r.id, r)).collect();
    for (id, n) in trace.attempts() {
        match by_id.get(&id) {
            None => out.push(Violation::new(
                "at-most-once",
                format!("backend saw request id {id}, which was never sent"),
            )),
            Some(r) if n > 1 && (r.method == "POST" || r.proto == Proto::Grpc) => {
                out.push(Violation::new(
                    "at-most-once",
                    format!("non-retryable request {id} reached backends {n} times"),
                ));
            }
            Some(_) => {}
        }
    }
    if trace.arrivals.iter().any(|a| a.id.is_none()) {
        out.push(Violation::new(
            "at-most-once",
            "a backend saw a request without an id",
        ));
    }
    out
}

/// Proxy metrics agree with what clients observed: per client proxy and status code, the
/// proxy's `response_total` equals the responses the client received. Counted only for clients
/// whose every request completed (a request the client abandoned may still be counted by the
/// proxy a moment later).
#[must_use]
pub fn metrics_agree(trace: &Trace) -> Vec<Violation> {
    let mut out = Vec::new();
    let mut seen: BTreeMap<usize, BTreeMap<u16, u64>> = BTreeMap::new();
    let mut clean: BTreeMap<usize, bool> = BTreeMap::new();
    for r in &trace.requests {
        let entry = clean.entry(r.client).or_insert(true);
        match &r.outcome {
            Outcome::Response {
                status, body_error, ..
            } => {
                if body_error.is_some() {
                    *entry = false;
                }
                *seen
                    .entry(r.client)
                    .or_default()
                    .entry(*status)
                    .or_insert(0) += 1;
            }
            _ => *entry = false,
        }
    }
    for (client, counters) in &trace.counters {
        if let Some(err) = &counters.error {
            out.push(Violation::new(
                "metrics",
                format!("client-{client}: scraping its proxy failed: {err}"),
            ));
            continue;
        }
        if !clean.get(client).copied().unwrap_or(true) {
            continue;
        }
        let mut proxy: BTreeMap<u16, u64> = BTreeMap::new();
        for by_status in counters.responses.values() {
            for (status, n) in by_status {
                *proxy.entry(*status).or_insert(0) += n;
            }
        }
        let client_view = seen.get(client).cloned().unwrap_or_default();
        if proxy != client_view {
            out.push(Violation::new(
                "metrics",
                format!(
                    "client-{client}: proxy counted responses {proxy:?}, client saw {client_view:?}"
                ),
            ));
        }
        let requests: u64 = counters.requests.values().sum();
        let sent: u64 = client_view.values().sum();
        if requests != sent {
            out.push(Violation::new(
                "metrics",
                format!("client-{client}: proxy counted {requests} requests, client got {sent} responses"),
            ));
        }
    }
    out
}

/// In a meshed world, every request that reached a server-side proxy arrived over mTLS: per
/// replica, its proxy's inbound counters (read at the end of the run, `Trace::inbound`) show no
/// plaintext request and as many mTLS requests as its app recorded arrivals (every arrival came
/// through the proxy over mTLS, and the proxy answered none itself). Fails when no replica's
/// counters were read (the world must scrape them: `WorldSpec::scrape_inbound`).
#[must_use]
pub fn inbound_over_mtls(trace: &Trace) -> Vec<Violation> {
    let mut out = inbound_never_plaintext(trace);
    let mut arrivals: BTreeMap<&str, u64> = BTreeMap::new();
    for a in &trace.arrivals {
        *arrivals.entry(a.host.as_str()).or_insert(0) += 1;
    }
    for (host, counters) in &trace.inbound {
        if counters.error.is_some() {
            continue;
        }
        let seen = arrivals.get(host.as_str()).copied().unwrap_or(0);
        if counters.tls != seen {
            out.push(Violation::new(
                "mtls",
                format!(
                    "{host}: its proxy counted {} inbound requests over mTLS, its app saw {seen}",
                    counters.tls
                ),
            ));
        }
    }
    for host in arrivals.keys() {
        if !trace.inbound.contains_key(*host) {
            out.push(Violation::new(
                "mtls",
                format!("{host}: its app saw requests, and its proxy's counters were not read"),
            ));
        }
    }
    out
}

/// The part of [`inbound_over_mtls`] that holds under chaos: every replica proxy's counters were
/// read at the end and show no request that arrived in plaintext. A replica that crashed and
/// restarted began its counters again, and a request its app reset is counted by the proxy as
/// it sees it, so the count of mTLS requests is not compared with the app's arrivals here.
#[must_use]
pub fn inbound_never_plaintext(trace: &Trace) -> Vec<Violation> {
    let mut out = Vec::new();
    if trace.inbound.is_empty() {
        out.push(Violation::new(
            "mtls",
            "no replica proxy's inbound counters were read",
        ));
    }
    for (host, counters) in &trace.inbound {
        if let Some(err) = &counters.error {
            out.push(Violation::new(
                "mtls",
                format!("{host}: scraping its proxy failed: {err}"),
            ));
            continue;
        }
        if counters.plain > 0 {
            out.push(Violation::new(
                "mtls",
                format!(
                    "{host}: {} inbound requests arrived in plaintext ({} over mTLS)",
                    counters.plain, counters.tls
                ),
            ));
        }
    }
    out
}

/// In a meshed world, the servers saw the clients they should: every request that reached a
/// replica proxy over mTLS carries a client identity (`client_id`) in `expected`, and every
/// identity in `expected` was seen. Reads the same counters as [`inbound_over_mtls`] (whose
/// violations it does not repeat).
#[must_use]
pub fn inbound_client_identities(trace: &Trace, expected: &[String]) -> Vec<Violation> {
    let mut out = Vec::new();
    let mut seen: BTreeMap<&str, u64> = BTreeMap::new();
    for (host, counters) in trace.inbound.iter().filter(|(_, c)| c.error.is_none()) {
        let proven: u64 = counters.clients.values().sum();
        if proven != counters.tls {
            out.push(Violation::new(
                "mtls-identity",
                format!(
                    "{host}: {} requests over mTLS, {proven} of them with a client identity",
                    counters.tls
                ),
            ));
        }
        for (client, n) in &counters.clients {
            if !expected.iter().any(|e| e == client) {
                out.push(Violation::new(
                    "mtls-identity",
                    format!("{host}: {n} requests from the unexpected client identity `{client}`"),
                ));
            }
            *seen.entry(client.as_str()).or_insert(0) += n;
        }
    }
    for identity in expected {
        if !seen.contains_key(identity.as_str()) {
            out.push(Violation::new(
                "mtls-identity",
                format!("no replica saw a request from `{identity}`"),
            ));
        }
    }
    out
}

/// In a meshed world that watches certificates (`MtlsSpec::watch_certificates`), every proxy
/// of `proxies` (host names) renewed its certificate at least `renewals` times, and each time
/// before the one it held expired (it never went without a valid certificate once it had one):
/// each new certificate lasts longer than the one before and was seen before that one's end.
/// Every incarnation of a host is held to it.
#[must_use]
pub fn certificates_renewed(trace: &Trace, proxies: &[String], renewals: usize) -> Vec<Violation> {
    let mut out = Vec::new();
    let by_proxy = trace.certificates_by_proxy();
    for proxy in proxies {
        if !by_proxy.keys().any(|(host, _)| host == proxy) {
            out.push(Violation::new(
                "renewal",
                format!("{proxy}: no certificate was seen"),
            ));
        }
    }
    for ((host, incarnation), certs) in by_proxy
        .iter()
        .filter(|((host, _), _)| proxies.contains(host))
    {
        let renewed = certs.len().saturating_sub(1);
        if renewed < renewals {
            out.push(Violation::new(
                "renewal",
                format!(
                    "{host}#{incarnation}: renewed {renewed} times, at least {renewals} expected (certificates seen at {:?} ms)",
                    certs.iter().map(|c| c.at_us / 1000).collect::<Vec<_>>()
                ),
            ));
        }
        for pair in certs.windows(2) {
            let (old, new) = (pair[0], pair[1]);
            if new.valid_until_s <= old.valid_until_s || new.at_us >= old.valid_until_us() {
                out.push(Violation::new(
                    "renewal",
                    format!(
                        "{host}#{incarnation}: the certificate valid until {} s was replaced at {} ms by one valid until {} s (a renewal comes before expiry and lasts longer)",
                        old.valid_until_s,
                        new.at_us / 1000,
                        new.valid_until_s
                    ),
                ));
            }
        }
    }
    out.truncate(10);
    out
}

/// A request record as a route lookup reads it (method and path; the workload sends no header
/// a route could match on).
struct RecordView<'a>(&'a RequestRecord);

impl conduit_core::route::RequestView for RecordView<'_> {
    fn method(&self) -> &[u8] {
        self.0.method.as_bytes()
    }

    fn path(&self) -> &[u8] {
        let path = self.0.path.as_bytes();
        path.iter()
            .position(|b| *b == b'?')
            .map_or(path, |query| &path[..query])
    }

    fn any_header(
        &self,
        _name: &http::HeaderName,
        _matches: &mut dyn FnMut(&[u8]) -> bool,
    ) -> bool {
        false
    }
}

/// The route `record` takes in its service's profile (`profiles` by authority), if the service
/// has one.
#[must_use]
pub fn route_of<'a>(
    record: &RequestRecord,
    profiles: &'a BTreeMap<String, conduit_core::route::Profile>,
) -> Option<&'a str> {
    Some(
        profiles
            .get(&record.authority)?
            .find(&RecordView(record))
            .name(),
    )
}

/// Per-route metrics agree with what clients observed: per client proxy, route and status
/// code, the proxy's `route_response_total` equals the responses the client received on that
/// route (the route each request takes is worked out from its method and path by the same
/// lookup the proxy uses, `core::route`, over `profiles`). Counted only for clients whose every
/// request completed, as [`metrics_agree`] does.
#[must_use]
pub fn route_metrics_agree(
    trace: &Trace,
    profiles: &BTreeMap<String, conduit_core::route::Profile>,
) -> Vec<Violation> {
    type ByRoute = BTreeMap<(String, String), BTreeMap<u16, u64>>;
    let mut out = Vec::new();
    let mut seen: BTreeMap<usize, ByRoute> = BTreeMap::new();
    let mut clean: BTreeMap<usize, bool> = BTreeMap::new();
    for r in &trace.requests {
        let entry = clean.entry(r.client).or_insert(true);
        match &r.outcome {
            Outcome::Response {
                status, body_error, ..
            } => {
                if body_error.is_some() {
                    *entry = false;
                }
                if let Some(route) = route_of(r, profiles) {
                    *seen
                        .entry(r.client)
                        .or_default()
                        .entry((r.authority.clone(), route.to_owned()))
                        .or_default()
                        .entry(*status)
                        .or_insert(0) += 1;
                }
            }
            _ => *entry = false,
        }
    }
    for (client, counters) in &trace.counters {
        if counters.error.is_some() || !clean.get(client).copied().unwrap_or(true) {
            continue;
        }
        let mut proxy: ByRoute = BTreeMap::new();
        for (label, routes) in &counters.routes {
            // Labels are `name:port`; records carry the name clients address.
            let authority = label
                .rsplit_once(':')
                .map_or(label.as_str(), |(name, _)| name);
            for (route, by_status) in routes {
                let slot = proxy
                    .entry((authority.to_owned(), route.clone()))
                    .or_default();
                for (status, n) in by_status {
                    *slot.entry(*status).or_insert(0) += n;
                }
            }
        }
        let client_view = seen.remove(client).unwrap_or_default();
        if proxy != client_view {
            out.push(Violation::new(
                "route-metrics",
                format!(
                    "client-{client}: proxy counted per route {proxy:?}, client saw {client_view:?}"
                ),
            ));
        }
    }
    out
}

/// After faults heal (`after`), every request succeeds.
#[must_use]
pub fn liveness(trace: &Trace, after: Duration) -> Vec<Violation> {
    let after = micros(after);
    let v = trace
        .requests
        .iter()
        .filter(|r| r.start_us >= after && !r.outcome.is_success())
        .map(|r| {
            Violation::new(
                "liveness",
                format!(
                    "request {} sent at {} ms (after recovery was due at {} ms) failed: {}",
                    r.id,
                    r.start_us / 1000,
                    after / 1000,
                    r.outcome.class()
                ),
            )
        })
        .collect();
    limit(v, 10, "liveness", |n| {
        Violation::new("liveness", format!("... and {n} more"))
    })
}

/// The service an authority names: the authority without its `:port`.
fn service_of(authority: &str) -> &str {
    match authority.rsplit_once(':') {
        Some((name, port)) if port.parse::<u16>().is_ok() => name,
        _ => authority,
    }
}

/// One service's endpoints in one configuration version.
#[derive(Debug)]
struct Published<'t> {
    version: u64,
    at_us: u64,
    /// The version at which the service's endpoints last changed: what they are labelled with.
    changed: u64,
    /// `None`: the service is not in this configuration.
    hosts: Option<&'t [String]>,
}

/// The harness's configurations, per service, as the world published (and labelled) them.
#[derive(Debug)]
struct History<'t> {
    services: BTreeMap<&'t str, Vec<Published<'t>>>,
}

impl<'t> History<'t> {
    fn new(configs: &'t [ConfigVersion]) -> Self {
        let mut names: Vec<&str> = configs
            .iter()
            .flat_map(|c| c.endpoints.keys().map(String::as_str))
            .collect();
        names.sort_unstable();
        names.dedup();
        let mut services = BTreeMap::new();
        for name in names {
            let mut list: Vec<Published<'t>> = Vec::with_capacity(configs.len());
            for c in configs {
                let hosts = c.endpoints.get(name).map(Vec::as_slice);
                let changed = match list.last() {
                    Some(prev) if prev.hosts == hosts => prev.changed,
                    _ => c.version,
                };
                list.push(Published {
                    version: c.version,
                    at_us: c.at_us,
                    changed,
                    hosts,
                });
            }
            services.insert(name, list);
        }
        Self { services }
    }

    fn of(&self, service: &str) -> &[Published<'t>] {
        self.services.get(service).map_or(&[], Vec::as_slice)
    }

    /// The configuration `state` comes from, as far as its content tells: `Ok(Some(v))` for
    /// the endpoints labelled `v` (exactly version `v`'s, plus leftovers of older versions, as
    /// a state between two configurations holds), `Ok(None)` for a state without endpoints
    /// (its version is told by [`empty_versions`](Self::empty_versions)), `Err` for a state
    /// no published configuration explains.
    fn config_of(&self, state: &AppliedRecord) -> Result<Option<u64>, String> {
        let published = self.of(service_of(&state.authority));
        if let Some((host, _)) = state.endpoints.iter().find(|(_, label)| label.is_none()) {
            return Err(format!("endpoint {host} carries no configuration label"));
        }
        let Some(top) = state.config() else {
            return Ok(None);
        };
        let hosts_of = |label: u64| {
            published
                .iter()
                .find(|p| p.version == label && p.changed == label)
                .and_then(|p| p.hosts)
        };
        let Some(expected) = hosts_of(top) else {
            return Err(format!("no configuration v{top} changed these endpoints"));
        };
        let mut newest: Vec<&str> = state
            .endpoints
            .iter()
            .filter(|(_, label)| *label == Some(top))
            .map(|(host, _)| host.as_str())
            .collect();
        let mut expected: Vec<&str> = expected.iter().map(String::as_str).collect();
        newest.sort_unstable();
        expected.sort_unstable();
        if newest != expected {
            return Err(format!(
                "its v{top} endpoints {newest:?} are not v{top}'s {expected:?}"
            ));
        }
        for (host, label) in &state.endpoints {
            let label = label.unwrap_or(0);
            if label != top && !hosts_of(label).is_some_and(|hosts| hosts.contains(host)) {
                return Err(format!(
                    "{host} is labelled v{label}, which did not list it"
                ));
            }
        }
        Ok(Some(top))
    }

    /// The configurations (by the version their endpoints changed at) published by `at_us` in
    /// which the service of a state without endpoints had none (`found`) or was absent.
    fn empty_versions(&self, authority: &str, found: bool, at_us: u64) -> Vec<u64> {
        self.of(service_of(authority))
            .iter()
            .filter(|p| p.at_us <= at_us)
            .filter(|p| match p.hosts {
                Some(hosts) => found && hosts.is_empty(),
                None => !found,
            })
            .map(|p| p.changed)
            .collect()
    }
}

/// A proxy incarnation's view of one authority: (host, incarnation, authority).
type StateKey<'t> = (&'t str, u64, &'t str);

/// Applied states per proxy incarnation and authority, in the order they were applied.
fn applied_by_key(trace: &Trace) -> BTreeMap<StateKey<'_>, Vec<&AppliedRecord>> {
    let mut out: BTreeMap<StateKey<'_>, Vec<&AppliedRecord>> = BTreeMap::new();
    for a in &trace.applied {
        out.entry((a.proxy.as_str(), a.incarnation, a.authority.as_str()))
            .or_default()
            .push(a);
    }
    out
}

/// Each request went where its proxy said it picked, under a state the proxy said it applied:
/// a served request has picks, the last of them (or, for a hedged request, one of the last
/// attempt's and the hedges raced beside it) names the backend that answered, and every
/// pick names an endpoint of the state (reported applied by that proxy, at or before the pick)
/// whose version it was picked under.
#[must_use]
pub fn picked_endpoints(trace: &Trace) -> Vec<Violation> {
    let applied = applied_by_key(trace);
    let mut out = Vec::new();
    for r in &trace.requests {
        if let Some(host) = r.served_by() {
            match r.picks.last() {
                None => out.push(Violation::new(
                    "picks",
                    format!(
                        "request {} was served by {host}, but its proxy reported no pick",
                        r.id
                    ),
                )),
                // The last attempt answered, or one of the hedges raced beside it.
                Some(last)
                    if !r.picks[r.picks.iter().rposition(|p| !p.hedge).unwrap_or(0)..]
                        .iter()
                        .any(|p| p.endpoint == host) =>
                {
                    out.push(Violation::new(
                        "picks",
                        format!(
                            "request {} was served by {host}, but its proxy last picked {}",
                            r.id, last.endpoint
                        ),
                    ));
                }
                Some(_) => {}
            }
        }
        for p in &r.picks {
            let state = applied
                .get(&(p.proxy.as_str(), p.incarnation, p.authority.as_str()))
                .and_then(|states| {
                    states
                        .iter()
                        .rev()
                        .find(|a| a.at_us <= p.at_us && a.version == Some(p.version))
                });
            let problem = match state {
                None => Some(format!(
                    "under version {} of {}, which {} never reported applying",
                    p.version, p.authority, p.proxy
                )),
                Some(state) if !state.endpoints.iter().any(|(h, _)| *h == p.endpoint) => {
                    Some(format!(
                        "{} under version {} of {} (config {:?}), whose endpoints are {:?}",
                        p.endpoint,
                        p.version,
                        p.authority,
                        state.config(),
                        state.endpoints
                    ))
                }
                Some(_) if p.config.is_none() => Some(format!(
                    "under version {} of {}, which its observer had not seen applied last",
                    p.version, p.authority
                )),
                Some(_) => None,
            };
            if let Some(problem) = problem {
                out.push(Violation::new(
                    "picks",
                    format!("request {} was picked at {} us {problem}", r.id, p.at_us),
                ));
            }
        }
    }
    limit(out, 10, "picks", |n| {
        Violation::new("picks", format!("... and {n} more"))
    })
}

/// Configuration is never applied out of order, as the proxies report it:
/// - per proxy and authority, the proxy's own resolution versions strictly increase;
/// - every state applied is one the harness published (its endpoints' configuration labels
///   name versions that listed them; the newest label's endpoints are exactly that version's);
/// - per proxy and authority, the configuration of successive states never decreases (it
///   strictly increases between complete states; a state on the way between two, as the
///   controller's add-then-remove diffs make, carries the newer one's version);
/// - per client and authority, in the order its proxy picked their endpoints, the
///   configuration each request was picked under never decreases.
///
/// Sound whatever endpoints successive versions share: versions are read from what the proxy
/// applied, never from which backend answered.
#[must_use]
pub fn monotonic_config(trace: &Trace) -> Vec<Violation> {
    let history = History::new(&trace.configs);
    let mut out = Vec::new();
    for ((proxy, incarnation, authority), states) in applied_by_key(trace) {
        let who = if incarnation == 0 {
            proxy.to_owned()
        } else {
            format!("{proxy} (incarnation {incarnation})")
        };
        let mut last_version: Option<u64> = None;
        let mut floor: Option<(u64, u64)> = None; // (config, at_us)
        for state in states {
            if let Some(version) = state.version {
                if let Some(last) = last_version
                    && version <= last
                {
                    out.push(Violation::new(
                        "config-order",
                        format!(
                            "{who} applied resolution version {version} of {authority} at {} us, after version {last}",
                            state.at_us
                        ),
                    ));
                }
                last_version = Some(version);
            }
            let config = match history.config_of(state) {
                Err(why) => {
                    out.push(Violation::new(
                        "config-order",
                        format!(
                            "{who} applied a state of {authority} at {} us that no configuration published: {why}",
                            state.at_us
                        ),
                    ));
                    continue;
                }
                Ok(Some(config)) => config,
                Ok(None) => {
                    let candidates = history.empty_versions(
                        &state.authority,
                        state.version.is_some(),
                        state.at_us,
                    );
                    let low = floor.map_or(0, |(config, _)| config);
                    match (
                        candidates.iter().filter(|c| **c >= low).min(),
                        candidates.iter().max(),
                    ) {
                        (Some(config), _) => *config,
                        // Only older configurations were empty: the order check reports it.
                        (None, Some(config)) => *config,
                        (None, None) => {
                            out.push(Violation::new(
                                "config-order",
                                format!(
                                    "{who} applied an empty state of {authority} at {} us, which no configuration published by then had",
                                    state.at_us
                                ),
                            ));
                            continue;
                        }
                    }
                }
            };
            if let Some((high, high_at)) = floor
                && config < high
            {
                out.push(Violation::new(
                    "config-order",
                    format!(
                        "{who} applied config v{config} of {authority} at {} ms after it had applied v{high} at {} ms",
                        state.at_us / 1000,
                        high_at / 1000
                    ),
                ));
            }
            if floor.is_none_or(|(high, _)| config > high) {
                floor = Some((config, state.at_us));
            }
        }
    }

    // What clients see: per client and service, in pick order, the configurations requests
    // were picked under never decrease.
    // Per (client, service): (pick time, request id, configuration).
    type Picks<'t> = BTreeMap<(usize, &'t str), Vec<(u64, u64, u64)>>;
    let mut by_client: Picks<'_> = BTreeMap::new();
    for r in &trace.requests {
        if let Some(last) = r.picks.last()
            && let Some(config) = last.config
        {
            by_client
                .entry((r.client, service_of(&r.authority)))
                .or_default()
                .push((last.at_us, r.id, config));
        }
    }
    for ((client, service), mut picks) in by_client {
        picks.sort_unstable();
        let mut high: Option<(u64, u64)> = None; // (config, id)
        for (_, id, config) in picks {
            if let Some((hv, hid)) = high
                && config < hv
            {
                out.push(Violation::new(
                    "config-order",
                    format!(
                        "client-{client}: request {id} for {service} was picked under config v{config} after request {hid} had been picked under v{hv}"
                    ),
                ));
            }
            if high.is_none_or(|(hv, _)| config > hv) {
                high = Some((config, id));
            }
        }
    }
    limit(out, 10, "config-order", |n| {
        Violation::new("config-order", format!("... and {n} more"))
    })
}

/// Which hosts are running at `at_us`, as far as crashes and bounces in the trace tell
/// (hosts never crashed are running).
fn down_at(trace: &Trace, at_us: u64) -> BTreeMap<&str, bool> {
    let mut down = BTreeMap::new();
    for (at, event) in trace.events.iter().filter(|(at, _)| *at <= at_us) {
        let _ = at;
        if let Some(host) = event.strip_prefix("crash ") {
            down.insert(host, true);
        } else if let Some(host) = event.strip_prefix("bounce ") {
            down.insert(host, false);
        }
    }
    down
}

/// Proxies converge on the latest configuration: `bound` after the last change, every running
/// proxy that follows a service has applied the latest configuration's endpoints for it (the
/// state in force then, and every state applied later, is exactly that configuration's), and
/// every request sent from then on is served by one of those endpoints.
#[must_use]
pub fn convergence(trace: &Trace, bound: Duration) -> Vec<Violation> {
    let Some(last) = trace.configs.last() else {
        return Vec::new();
    };
    let history = History::new(&trace.configs);
    let after = last.at_us + micros(bound);
    let down = down_at(trace, after);
    let mut out = Vec::new();
    let applied = applied_by_key(trace);
    let latest_incarnation: BTreeMap<&str, u64> =
        applied
            .keys()
            .fold(BTreeMap::new(), |mut m, (proxy, incarnation, _)| {
                let e = m.entry(*proxy).or_insert(0);
                *e = (*e).max(*incarnation);
                m
            });
    for ((proxy, incarnation, authority), states) in &applied {
        if latest_incarnation.get(proxy) != Some(incarnation)
            || down.get(proxy).copied().unwrap_or(false)
        {
            continue;
        }
        let service = service_of(authority);
        let Some(expected) = last.endpoints.get(service) else {
            continue;
        };
        let changed = history
            .of(service)
            .last()
            .map_or(last.version, |p| p.changed);
        let mut expected: Vec<&str> = expected.iter().map(String::as_str).collect();
        expected.sort_unstable();
        let is_latest = |state: &AppliedRecord| {
            let hosts: Vec<&str> = state.endpoints.iter().map(|(h, _)| h.as_str()).collect();
            state.version.is_some()
                && hosts == expected
                && state.endpoints.iter().all(|(_, l)| *l == Some(changed))
        };
        let in_force = states.iter().rev().find(|s| s.at_us <= after);
        let later = states.iter().filter(|s| s.at_us > after);
        for state in in_force.into_iter().chain(later) {
            if !is_latest(state) {
                out.push(Violation::new(
                    "convergence",
                    format!(
                        "{proxy} had config {:?} of {authority} ({:?}, applied at {} ms) in force at or after {} ms, not v{changed} {expected:?} (the last config, v{}, was published at {} ms)",
                        state.config(),
                        state.endpoints,
                        state.at_us / 1000,
                        after / 1000,
                        last.version,
                        last.at_us / 1000
                    ),
                ));
            }
        }
    }
    let requests = trace
        .requests
        .iter()
        .filter(|r| r.start_us >= after)
        .filter_map(|r| {
            let host = r.served_by()?;
            let current = last.endpoints.get(service_of(&r.authority))?;
            (!current.iter().any(|h| h == host)).then(|| {
                Violation::new(
                    "convergence",
                    format!(
                        "request {} sent at {} ms was served by {host}, not in config v{} (published at {} ms)",
                        r.id,
                        r.start_us / 1000,
                        last.version,
                        last.at_us / 1000
                    ),
                )
            })
        });
    out.extend(requests);
    limit(out, 10, "convergence", |n| {
        Violation::new("convergence", format!("... and {n} more"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::PickRecord;

    const WEB: &str = "web.default";

    fn config(version: u64, at_ms: u64, hosts: &[&str]) -> ConfigVersion {
        ConfigVersion {
            version,
            at_us: at_ms * 1000,
            endpoints: BTreeMap::from([(
                WEB.to_owned(),
                hosts.iter().map(|h| (*h).to_owned()).collect(),
            )]),
        }
    }

    fn applied(at_ms: u64, version: u64, endpoints: &[(&str, u64)]) -> AppliedRecord {
        let mut endpoints: Vec<(String, Option<u64>)> = endpoints
            .iter()
            .map(|(h, l)| ((*h).to_owned(), Some(*l)))
            .collect();
        endpoints.sort();
        AppliedRecord {
            at_us: at_ms * 1000,
            proxy: "client-0".into(),
            incarnation: 0,
            authority: WEB.into(),
            version: Some(version),
            endpoints,
        }
    }

    /// A request sent at `start_ms`, picked then under the proxy's `version` (configuration
    /// `config`) for `host`, and served by `host`.
    fn request(id: u64, start_ms: u64, version: u64, config: u64, host: &str) -> RequestRecord {
        RequestRecord {
            id,
            client: 0,
            authority: WEB.into(),
            proto: Proto::Http1,
            method: "GET".into(),
            path: "/echo".into(),
            request_bytes: 0,
            start_us: start_ms * 1000,
            headers_us: Some(start_ms * 1000 + 6000),
            end_us: start_ms * 1000 + 6000,
            deadline_us: 10_000_000,
            outcome: Outcome::Response {
                status: 200,
                served_by: Some(host.into()),
                echoed_id: Some(id.to_string()),
                proxy_error: None,
                grpc_status: None,
                body_bytes: 10,
                body_ok: true,
                body_error: None,
            },
            picks: vec![PickRecord {
                at_us: start_ms * 1000,
                proxy: "client-0".into(),
                incarnation: 0,
                authority: WEB.into(),
                version,
                config: Some(config),
                endpoint: host.into(),
                hedge: false,
            }],
        }
    }

    /// v1 lists four replicas, v2 (at 500 ms) only `web-1`.
    fn overlapping() -> Trace {
        Trace {
            configs: vec![
                config(1, 0, &["web-0", "web-1", "web-2", "web-3"]),
                config(2, 500, &["web-1"]),
            ],
            applied: vec![
                applied(
                    0,
                    1,
                    &[("web-0", 1), ("web-1", 1), ("web-2", 1), ("web-3", 1)],
                ),
                applied(503, 2, &[("web-1", 2)]),
            ],
            ..Trace::default()
        }
    }

    #[test]
    fn a_request_on_an_endpoint_both_versions_share_does_not_look_newer_than_it_was() {
        // The seed 5189: request 40 picked web-1 under v1 before v2 arrived, request
        // 41 picked web-3 under v1 too (inside the propagation delay), request 42 under v2.
        let mut trace = overlapping();
        trace.requests = vec![
            request(40, 494, 1, 1, "web-1"),
            request(41, 502, 1, 1, "web-3"),
            request(42, 516, 2, 2, "web-1"),
        ];
        assert_eq!(monotonic_config(&trace), vec![]);
        assert_eq!(picked_endpoints(&trace), vec![]);
        assert_eq!(convergence(&trace, Duration::from_millis(100)), vec![]);
    }

    #[test]
    fn a_proxy_that_applies_an_older_overlapping_version_again_is_caught() {
        let mut trace = overlapping();
        // After v2, the old endpoints again (under a fresh version of the proxy's own).
        trace.applied.push(applied(
            504,
            3,
            &[("web-0", 1), ("web-1", 1), ("web-2", 1), ("web-3", 1)],
        ));
        trace.requests = vec![
            request(42, 503, 2, 2, "web-1"),
            request(43, 510, 3, 1, "web-3"),
        ];
        let checks: Vec<String> = monotonic_config(&trace)
            .into_iter()
            .map(|v| v.message)
            .collect();
        assert_eq!(
            checks,
            vec![
                "client-0 applied config v1 of web.default at 504 ms after it had applied v2 at 503 ms",
                "client-0: request 43 for web.default was picked under config v1 after request 42 had been picked under v2",
            ]
        );
        // Still on v1 at 600 ms (500 ms + the bound): not converged.
        assert_eq!(convergence(&trace, Duration::from_millis(100)).len(), 1);
    }

    #[test]
    fn the_proxys_own_versions_must_increase() {
        let mut trace = overlapping();
        trace.applied[1].version = Some(1);
        let violations = monotonic_config(&trace);
        assert_eq!(violations.len(), 1, "{violations:?}");
        assert!(violations[0].message.contains("after version 1"));
    }

    #[test]
    fn a_state_between_two_versions_counts_as_the_newer() {
        // The controller's diff adds before it removes: the proxy holds v2's endpoints and
        // v1's leftovers for a moment.
        let mut trace = overlapping();
        trace.applied.insert(
            1,
            applied(
                502,
                2,
                &[("web-0", 1), ("web-1", 2), ("web-2", 1), ("web-3", 1)],
            ),
        );
        trace.applied[2].version = Some(3);
        trace.requests = vec![request(41, 502, 2, 2, "web-3")];
        assert_eq!(monotonic_config(&trace), vec![]);
        assert_eq!(picked_endpoints(&trace), vec![]);
    }

    #[test]
    fn a_state_no_configuration_published_is_caught() {
        let mut trace = overlapping();
        // web-2 labelled v2, which listed only web-1.
        trace
            .applied
            .push(applied(520, 3, &[("web-1", 2), ("web-2", 2)]));
        let violations = monotonic_config(&trace);
        assert_eq!(violations.len(), 1, "{violations:?}");
        assert!(violations[0].message.contains("no configuration published"));
    }

    #[test]
    fn empty_states_take_the_version_that_emptied_the_service() {
        let mut trace = overlapping();
        trace.configs.push(config(3, 800, &[]));
        trace.configs.push(config(4, 900, &["web-0"]));
        let mut empty = applied(801, 3, &[]);
        empty.endpoints.clear();
        trace.applied.push(empty);
        trace.applied.push(applied(902, 4, &[("web-0", 4)]));
        assert_eq!(monotonic_config(&trace), vec![]);
        assert_eq!(convergence(&trace, Duration::from_millis(100)), vec![]);
        // An empty state after v4 goes back to v3.
        let mut stale = applied(950, 5, &[]);
        stale.endpoints.clear();
        trace.applied.push(stale);
        assert_eq!(monotonic_config(&trace).len(), 1);
        assert_eq!(convergence(&trace, Duration::from_millis(10)).len(), 1);
    }

    #[test]
    fn a_hedged_request_may_be_answered_by_the_attempt_its_hedge_raced() {
        let mut trace = overlapping();
        // Picked web-1, then a hedge to web-2 (both under v1); web-1 answered first.
        let mut r = request(42, 400, 1, 1, "web-1");
        let mut hedge = r.picks[0].clone();
        hedge.endpoint = "web-2".into();
        hedge.hedge = true;
        r.picks.push(hedge);
        trace.requests = vec![r.clone()];
        assert_eq!(picked_endpoints(&trace), vec![]);
        // Without the hedge mark, the second pick was a later attempt: web-1 cannot answer.
        r.picks[1].hedge = false;
        trace.requests = vec![r];
        assert_eq!(picked_endpoints(&trace).len(), 1);
    }

    #[test]
    fn a_response_from_another_endpoint_than_the_one_picked_is_caught() {
        let mut trace = overlapping();
        let mut r = request(42, 516, 2, 2, "web-1");
        if let Outcome::Response { served_by, .. } = &mut r.outcome {
            *served_by = Some("web-2".into());
        }
        // And a pick of an endpoint the state in force does not list.
        let mut outside = request(43, 520, 2, 2, "web-3");
        outside.picks[0].endpoint = "web-3".into();
        trace.requests = vec![r, outside];
        let violations = picked_endpoints(&trace);
        assert_eq!(violations.len(), 2, "{violations:?}");
        assert!(violations[0].message.contains("last picked web-1"));
        assert!(violations[1].message.contains("web-3 under version 2"));
    }

    #[test]
    fn inbound_requests_must_all_arrive_over_mtls_and_match_the_apps() {
        use crate::trace::{Arrival, InboundCounters};
        let arrival = |id: u64, host: &str| Arrival {
            id: Some(id),
            host: host.into(),
            service: "web.default".into(),
            at_us: 1000 * id,
            grpc_timeout_us: None,
        };
        let counters = |tls: u64, plain: u64| InboundCounters {
            tls,
            plain,
            clients: BTreeMap::from([("c.id".to_owned(), tls)]),
            error: None,
        };
        let mut trace = Trace {
            arrivals: vec![
                arrival(1, "web-0"),
                arrival(2, "web-1"),
                arrival(3, "web-0"),
            ],
            inbound: BTreeMap::from([
                ("web-0".to_owned(), counters(2, 0)),
                ("web-1".to_owned(), counters(1, 0)),
            ]),
            ..Trace::default()
        };
        assert_eq!(inbound_over_mtls(&trace), vec![]);
        let expected = ["c.id".to_owned()];
        assert_eq!(inbound_client_identities(&trace, &expected), vec![]);
        let violations = inbound_client_identities(&trace, &["c.id".into(), "d.id".into()]);
        assert_eq!(violations.len(), 1, "{violations:?}");
        assert!(
            violations[0]
                .message
                .contains("no replica saw a request from `d.id`")
        );
        trace
            .inbound
            .get_mut("web-0")
            .unwrap()
            .clients
            .insert("e.id".into(), 1);
        let violations = inbound_client_identities(&trace, &expected);
        assert_eq!(violations.len(), 2, "{violations:?}");
        assert!(violations[0].message.contains("with a client identity"));
        assert!(
            violations[1]
                .message
                .contains("unexpected client identity `e.id`")
        );
        // One in plaintext (the app saw it too).
        trace.inbound.insert("web-1".into(), counters(1, 1));
        trace.arrivals.push(arrival(4, "web-1"));
        let violations = inbound_over_mtls(&trace);
        assert_eq!(violations.len(), 2, "{violations:?}");
        assert!(
            violations[0]
                .message
                .contains("1 inbound requests arrived in plaintext")
        );
        assert!(violations[1].message.contains("its app saw 2"));
        // Counters never read.
        trace.inbound.clear();
        let violations = inbound_over_mtls(&trace);
        assert_eq!(violations.len(), 3, "{violations:?}");
    }

    #[test]
    fn renewals_are_counted_and_must_come_before_expiry() {
        let cert = |at_ms: u64, proxy: &str, until_s: u64| crate::trace::CertificateRecord {
            at_us: at_ms * 1000,
            proxy: proxy.into(),
            incarnation: 0,
            valid_until_s: until_s,
            fingerprint: format!("{until_s:016x}"),
            issuer: String::new(),
        };
        let mut trace = Trace {
            certificates: vec![
                cert(10, "web-0", 30),
                cert(20, "client-0", 30),
                cert(21_010, "web-0", 51),
                cert(21_020, "client-0", 51),
                cert(42_010, "web-0", 72),
            ],
            ..Trace::default()
        };
        let proxies = ["web-0".to_owned(), "client-0".to_owned()];
        assert_eq!(certificates_renewed(&trace, &proxies, 1), vec![]);
        let violations = certificates_renewed(&trace, &proxies, 2);
        assert_eq!(violations.len(), 1, "{violations:?}");
        assert!(
            violations[0]
                .message
                .contains("client-0#0: renewed 1 times")
        );
        // A proxy never seen, and a renewal after the certificate had expired.
        trace.certificates.push(cert(51_500, "client-0", 81));
        let violations = certificates_renewed(&trace, &[proxies[1].clone(), "web-1".to_owned()], 2);
        assert_eq!(violations.len(), 2, "{violations:?}");
        assert!(
            violations[0]
                .message
                .contains("web-1: no certificate was seen")
        );
        assert!(violations[1].message.contains("replaced at 51500 ms"));
    }
}
