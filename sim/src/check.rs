//! Invariant checkers over a run's [`Trace`]. They read only what clients, backends and the
//! harness recorded (and the counters the proxies publish), never proxy internals.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::trace::{Outcome, Proto, RequestRecord, Trace, micros};

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
    /// After the last configuration change plus this bound, every response comes from an
    /// endpoint of the latest configuration.
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

/// Proxies converge on the latest configuration: requests sent `bound` after the last change
/// are served only by endpoints of the latest configuration.
#[must_use]
pub fn convergence(trace: &Trace, bound: Duration) -> Vec<Violation> {
    let Some(last) = trace.configs.last() else {
        return Vec::new();
    };
    let after = last.at_us + micros(bound);
    let v = trace
        .requests
        .iter()
        .filter(|r| r.start_us >= after)
        .filter_map(|r| {
            let host = r.served_by()?;
            let current = last.endpoints.get(&r.authority)?;
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
        })
        .collect();
    limit(v, 10, "convergence", |n| {
        Violation::new("convergence", format!("... and {n} more"))
    })
}

/// Configuration is never applied out of order: per client, among requests that do not
/// overlap in time, the configuration version each was served under (the newest version whose
/// endpoints include the serving host) never goes backwards. Meaningful when consecutive
/// versions have disjoint endpoint sets.
#[must_use]
pub fn monotonic_config(trace: &Trace) -> Vec<Violation> {
    let mut out = Vec::new();
    let version_of = |r: &RequestRecord| -> Option<u64> {
        let host = r.served_by()?;
        trace
            .configs
            .iter()
            .filter(|c| c.at_us <= r.end_us)
            .filter(|c| {
                c.endpoints
                    .get(&r.authority)
                    .is_some_and(|hosts| hosts.iter().any(|h| h == host))
            })
            .map(|c| c.version)
            .max()
    };
    let mut by_client: BTreeMap<usize, Vec<&RequestRecord>> = BTreeMap::new();
    for r in &trace.requests {
        by_client.entry(r.client).or_default().push(r);
    }
    for (client, mut requests) in by_client {
        requests.sort_by_key(|r| (r.start_us, r.id));
        let mut high: Option<(u64, u64, u64)> = None; // (version, end_us, id)
        for r in requests {
            let Some(v) = version_of(r) else { continue };
            if let Some((hv, hend, hid)) = high
                && v < hv
                && hend <= r.start_us
            {
                out.push(Violation::new(
                    "config-order",
                    format!(
                        "client-{client}: request {} was served under config v{v} after request {hid} had been served under v{hv}",
                        r.id
                    ),
                ));
            }
            if high.is_none_or(|(hv, _, _)| v >= hv) {
                high = Some((v, r.end_us, r.id));
            }
        }
    }
    out
}
