//! The run's trace: every request the workload sent and how it ended, every request a backend
//! saw, every fault and every configuration version, and what each proxy reported through its
//! observer (`conduit_proxy::observe`): every discovery state it applied and every endpoint it
//! picked for a request, all stamped with simulated time.
//!
//! The trace is the checkers' only input (they never look inside the proxy: what they know of
//! a proxy's state, the proxy reported) and its
//! [`Trace::hash`] is the run's fingerprint: the same seed gives the same hash, in any process.
//! The hash is SHA-256 over [`Trace::render`], a canonical text form.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The protocol a request is sent with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Proto {
    /// HTTP/1.1 over a pooled keep-alive connection.
    Http1,
    /// HTTP/2 (prior knowledge) over one multiplexed connection.
    Http2,
    /// Unary gRPC over HTTP/2: length-prefixed message, status in trailers.
    Grpc,
}

/// How a request ended, as the client saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Response headers arrived (and the body was read to its end, or failed: see fields).
    Response {
        /// HTTP status.
        status: u16,
        /// `x-served-by`: the backend host that answered (absent on proxy-made responses).
        served_by: Option<String>,
        /// `x-request-id` as echoed by the backend.
        echoed_id: Option<String>,
        /// `conduit-proxy-error`: the proxy answered itself, and why.
        proxy_error: Option<String>,
        /// `grpc-status` (headers or trailers), for gRPC.
        grpc_status: Option<u32>,
        /// Body bytes received.
        body_bytes: u64,
        /// The body matched what the backend promised for this request (identity line,
        /// streamed pattern, or gRPC message), or the body was not the backend's.
        body_ok: bool,
        /// The body failed mid-stream (reset, connection closed), after the headers.
        body_error: Option<String>,
    },
    /// No response: the connection or request failed before headers.
    TransportError {
        /// `connect`, `handshake` or `send`.
        stage: String,
        /// The error.
        message: String,
    },
    /// The client's deadline passed with the request still open.
    DeadlineExceeded {
        /// What the request was waiting for: `connect`, `headers` or `body`.
        stage: String,
    },
}

impl Outcome {
    /// A complete, successful response from a backend (2xx, gRPC OK, body intact).
    #[must_use]
    pub fn is_success(&self) -> bool {
        matches!(self, Self::Response { status, grpc_status, body_ok, body_error, proxy_error, .. }
            if (200..300).contains(status) && grpc_status.is_none_or(|g| g == 0)
                && *body_ok && body_error.is_none() && proxy_error.is_none())
    }

    /// A short class for summaries: `ok`, `5xx-proxy`, `transport`, ...
    #[must_use]
    pub fn class(&self) -> String {
        match self {
            Self::Response {
                status,
                proxy_error,
                grpc_status,
                body_error,
                ..
            } => {
                if self.is_success() {
                    return "ok".into();
                }
                let by = if proxy_error.is_some() {
                    "proxy"
                } else {
                    "app"
                };
                if body_error.is_some() {
                    return format!("{status}-{by}-body-error");
                }
                match grpc_status {
                    Some(code) if *code != 0 => format!("grpc{code}-{by}"),
                    _ => format!("{status}-{by}"),
                }
            }
            Self::TransportError { stage, .. } => format!("transport-{stage}"),
            Self::DeadlineExceeded { stage } => format!("deadline-{stage}"),
        }
    }
}

/// One request of the workload, planned and then observed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// Unique per run; sent as `x-request-id`.
    pub id: u64,
    /// The client host's index.
    pub client: usize,
    /// The destination authority (`web.default`).
    pub authority: String,
    /// The protocol.
    pub proto: Proto,
    /// `GET` or `POST`. POSTs are not retryable.
    pub method: String,
    /// The request path.
    pub path: String,
    /// Request body bytes.
    pub request_bytes: u64,
    /// Sim time (µs since the run started) it was due, sent and ended.
    pub start_us: u64,
    /// When response headers arrived, if they did.
    pub headers_us: Option<u64>,
    /// When the request ended (body read, error, or deadline).
    pub end_us: u64,
    /// The deadline, µs after `start_us`.
    pub deadline_us: u64,
    /// How it ended.
    pub outcome: Outcome,
    /// Every endpoint the client's proxy picked for it, in order (a request sent again after
    /// an endpoint provably did not process it has several), each with the discovery state it
    /// was picked under.
    #[serde(default)]
    pub picks: Vec<PickRecord>,
}

impl RequestRecord {
    /// The backend host that answered, if one did.
    #[must_use]
    pub fn served_by(&self) -> Option<&str> {
        match &self.outcome {
            Outcome::Response { served_by, .. } => served_by.as_deref(),
            _ => None,
        }
    }
}

/// A request reaching a backend app.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Arrival {
    /// The request id from `x-request-id` (`None` when absent: never sent by our workload).
    pub id: Option<u64>,
    /// The backend host.
    pub host: String,
    /// The service the backend belongs to.
    pub service: String,
    /// Sim time, µs.
    pub at_us: u64,
    /// The `grpc-timeout` the request arrived with, in µs (the deadline the proxies passed on).
    pub grpc_timeout_us: Option<u64>,
}

/// One published configuration: each service's endpoints, by backend host name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigVersion {
    /// The harness's version counter (1 = the initial mesh).
    pub version: u64,
    /// Sim time of publication, µs.
    pub at_us: u64,
    /// Service authority -> endpoint hosts.
    pub endpoints: BTreeMap<String, Vec<String>>,
}

/// The label the world puts on every endpoint it publishes: the configuration version at which
/// the endpoint's service last changed its endpoints. It travels with the endpoints through
/// discovery (static, or the controller's Destination stream), so what a proxy reports applying
/// names the configuration it came from exactly, even when versions share endpoints.
pub const CONFIG_LABEL: &str = "conduit.sim/config";

/// A discovery state a proxy reported applying for an authority.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedRecord {
    /// Sim time, µs.
    pub at_us: u64,
    /// The proxy's host.
    pub proxy: String,
    /// Which incarnation of the host's proxy (0 first; a bounced host runs a new one).
    pub incarnation: u64,
    /// The authority, as the proxy keys it.
    pub authority: String,
    /// The proxy's own version of the resolution (per authority, independent of the
    /// configuration's); `None` when discovery said no service has the name.
    pub version: Option<u64>,
    /// The endpoints in force, by host, each with its [`CONFIG_LABEL`] (`None`: unlabelled),
    /// sorted.
    pub endpoints: Vec<(String, Option<u64>)>,
}

impl AppliedRecord {
    /// The configuration this state comes from: the newest label among its endpoints (a state
    /// between two configurations, as the controller's add-then-remove diffs pass through,
    /// holds the newer one's endpoints and leftovers of the older); `None` without endpoints.
    #[must_use]
    pub fn config(&self) -> Option<u64> {
        self.endpoints.iter().filter_map(|(_, label)| *label).max()
    }
}

/// An endpoint a proxy picked for a request, and the state it was picked under.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PickRecord {
    /// Sim time, µs.
    pub at_us: u64,
    /// The proxy's host.
    pub proxy: String,
    /// Which incarnation of the host's proxy.
    pub incarnation: u64,
    /// The authority, as the proxy keys it.
    pub authority: String,
    /// The proxy's version of the resolution in force at the pick.
    pub version: u64,
    /// The configuration of that state ([`AppliedRecord::config`]), when the proxy had reported
    /// applying a state with that version.
    pub config: Option<u64>,
    /// The endpoint's host.
    pub endpoint: String,
    /// A hedge's pick: the attempt before it may still have answered instead.
    #[serde(default)]
    pub hedge: bool,
}

/// A client proxy's outbound counters, scraped from its admin `/metrics` at the end of the run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyCounters {
    /// `request_total{direction="outbound"}` by authority label.
    pub requests: BTreeMap<String, u64>,
    /// `response_total{direction="outbound"}` by (authority label, status code).
    pub responses: BTreeMap<String, BTreeMap<u16, u64>>,
    /// `route_response_total{direction="outbound"}` by (authority label, route, status code).
    pub routes: BTreeMap<String, BTreeMap<String, BTreeMap<u16, u64>>>,
    /// Why the scrape failed, if it did.
    pub error: Option<String>,
}

/// A replica proxy's inbound request counters, scraped from its admin `/metrics` at the end of
/// a run whose world asks for them (`WorldSpec::scrape_inbound`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboundCounters {
    /// `request_total{direction="inbound",tls="true"}`, summed over authorities: requests that
    /// arrived over mTLS.
    pub tls: u64,
    /// `request_total{direction="inbound"}` without `tls="true"`: requests that arrived in
    /// plaintext.
    pub plain: u64,
    /// The mTLS requests by the identity their client proved (`client_id`).
    #[serde(default)]
    pub clients: BTreeMap<String, u64>,
    /// Why the scrape failed, if it did.
    pub error: Option<String>,
}

/// A certificate a proxy was seen holding (a meshed world that watches certificates,
/// `MtlsSpec::watch_certificates`): the harness reads each proxy's
/// `LocalIdentity::valid_until` (what its `identity_cert_expiry_timestamp_seconds` reports)
/// every [`CERTIFICATE_WATCH_INTERVAL`] and records each change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateRecord {
    /// Sim time it was first seen, µs (at most one watch interval after it was installed).
    pub at_us: u64,
    /// The proxy's host.
    pub proxy: String,
    /// Which incarnation of the host's proxy.
    pub incarnation: u64,
    /// The end of its validity, in seconds of simulated time since the run started (the
    /// certificate's `notAfter` minus the pinned epoch): the proxy offers it while the
    /// simulated wall clock, in whole seconds, is below this.
    pub valid_until_s: u64,
    /// The first 16 hex digits of the leaf's SHA-256: the key, serial and CA signature in it
    /// come from the world's seeded crypto, so the same seed gives the same certificate.
    #[serde(default)]
    pub fingerprint: String,
    /// The same for the issuer's certificate that came with it (changes when the CA's
    /// issuer rotates).
    #[serde(default)]
    pub issuer: String,
}

impl CertificateRecord {
    /// The end of its validity in sim time, µs.
    #[must_use]
    pub fn valid_until_us(&self) -> u64 {
        self.valid_until_s.saturating_mul(1_000_000)
    }
}

/// How often a watched proxy's certificate is read (see [`CertificateRecord`]).
pub const CERTIFICATE_WATCH_INTERVAL: Duration = Duration::from_millis(10);

/// Everything a run recorded.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Trace {
    /// The scenario.
    pub scenario: String,
    /// The seed.
    pub seed: u64,
    /// Requests, by id once the run is over.
    pub requests: Vec<RequestRecord>,
    /// Backend arrivals, in order.
    pub arrivals: Vec<Arrival>,
    /// Faults and harness actions applied, `(µs, description)`.
    pub events: Vec<(u64, String)>,
    /// Configuration versions, in publication order.
    pub configs: Vec<ConfigVersion>,
    /// Discovery states the proxies reported applying, in order.
    #[serde(default)]
    pub applied: Vec<AppliedRecord>,
    /// Each client proxy's counters, by client index.
    pub counters: BTreeMap<usize, ProxyCounters>,
    /// Each replica proxy's inbound counters, by host (only when the world scrapes them).
    #[serde(default)]
    pub inbound: BTreeMap<String, InboundCounters>,
    /// The certificates each watched proxy held, in the order they were seen (only when the
    /// world watches them).
    #[serde(default)]
    pub certificates: Vec<CertificateRecord>,
    /// Sim time when the run ended, µs.
    pub end_us: u64,
    /// The simulation's own error, if it stopped abnormally (a host failed, time ran out).
    pub sim_error: Option<String>,
}

impl Trace {
    /// The canonical text form the hash covers: one line per record, in a fixed order.
    #[must_use]
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "scenario {} seed {}", self.scenario, self.seed);
        for (at, event) in &self.events {
            let _ = writeln!(out, "event {at} {event}");
        }
        for config in &self.configs {
            let _ = writeln!(
                out,
                "config v{} {} {:?}",
                config.version, config.at_us, config.endpoints
            );
        }
        for a in &self.applied {
            let _ = writeln!(
                out,
                "applied {} {}#{} {} {:?} {:?}",
                a.at_us, a.proxy, a.incarnation, a.authority, a.version, a.endpoints
            );
        }
        for r in &self.requests {
            let _ = writeln!(
                out,
                "req {} c{} {} {:?} {} {} {}B start {} headers {:?} end {} {:?}",
                r.id,
                r.client,
                r.authority,
                r.proto,
                r.method,
                r.path,
                r.request_bytes,
                r.start_us,
                r.headers_us,
                r.end_us,
                r.outcome
            );
            for p in &r.picks {
                let _ = writeln!(
                    out,
                    "  pick {} {}#{} {} v{} {:?} {}",
                    p.at_us, p.proxy, p.incarnation, p.authority, p.version, p.config, p.endpoint
                );
            }
        }
        for a in &self.arrivals {
            let _ = writeln!(
                out,
                "arrival {} {:?} {} {} {:?}",
                a.at_us, a.id, a.host, a.service, a.grpc_timeout_us
            );
        }
        for (client, c) in &self.counters {
            let _ = writeln!(
                out,
                "counters c{client} {:?} {:?} {:?} {:?}",
                c.requests, c.responses, c.routes, c.error
            );
        }
        for (host, c) in &self.inbound {
            let _ = writeln!(
                out,
                "inbound {host} tls {} plain {} {:?} {:?}",
                c.tls, c.plain, c.clients, c.error
            );
        }
        for c in &self.certificates {
            let _ = writeln!(
                out,
                "certificate {} {}#{} until {}s {} issuer {}",
                c.at_us, c.proxy, c.incarnation, c.valid_until_s, c.fingerprint, c.issuer
            );
        }
        let _ = writeln!(out, "end {} {:?}", self.end_us, self.sim_error);
        out
    }

    /// SHA-256 of [`Self::render`], in hex.
    #[must_use]
    pub fn hash(&self) -> String {
        let digest = Sha256::digest(self.render().as_bytes());
        digest.iter().fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
    }

    /// How many backend arrivals each request id had.
    #[must_use]
    pub fn attempts(&self) -> BTreeMap<u64, u64> {
        let mut out = BTreeMap::new();
        for arrival in &self.arrivals {
            if let Some(id) = arrival.id {
                *out.entry(id).or_insert(0) += 1;
            }
        }
        out
    }

    /// The certificates each watched proxy incarnation held, in order, by `(host, incarnation)`.
    #[must_use]
    pub fn certificates_by_proxy(&self) -> BTreeMap<(String, u64), Vec<&CertificateRecord>> {
        let mut out: BTreeMap<(String, u64), Vec<&CertificateRecord>> = BTreeMap::new();
        for c in &self.certificates {
            out.entry((c.proxy.clone(), c.incarnation))
                .or_default()
                .push(c);
        }
        out
    }

    /// Share of successful responses per backend host for `authority`.
    #[must_use]
    pub fn served_counts(&self, authority: &str) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for r in self.requests.iter().filter(|r| r.authority == authority) {
            if let Some(host) = r.served_by() {
                *out.entry(host.to_owned()).or_insert(0) += 1;
            }
        }
        out
    }
}

/// The trace while the run records it, shared by every host (all run on one thread, but tokio
/// tasks must be `Send`).
#[derive(Clone, Debug, Default)]
pub struct Recorder(Arc<Mutex<Recording>>);

/// What a recorder holds: the trace, the picks of requests that have not ended yet, and the
/// hosts by address (to name endpoints).
#[derive(Debug, Default)]
struct Recording {
    trace: Trace,
    picks: BTreeMap<u64, Vec<PickRecord>>,
    hosts: BTreeMap<IpAddr, String>,
}

/// The most picks kept per request: far above what the proxy's resend rules allow (one resend
/// after a connect failure, one after an unprocessed failure), so a runaway loop is visible as
/// a truncated list rather than unbounded memory.
const MAX_PICKS_PER_REQUEST: usize = 16;

impl Recorder {
    /// An empty trace for `scenario` at `seed`.
    #[must_use]
    pub fn new(scenario: &str, seed: u64) -> Self {
        Self(Arc::new(Mutex::new(Recording {
            trace: Trace {
                scenario: scenario.to_owned(),
                seed,
                ..Trace::default()
            },
            ..Recording::default()
        })))
    }

    /// Edits the trace.
    pub fn with<R>(&self, f: impl FnOnce(&mut Trace) -> R) -> R {
        f(&mut self.lock().trace)
    }

    fn lock(&self) -> MutexGuard<'_, Recording> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Names the hosts by address (the world's name table), for [`host_of`](Self::host_of).
    pub fn set_hosts(&self, hosts: BTreeMap<IpAddr, String>) {
        self.lock().hosts = hosts;
    }

    /// The host at `addr`, or the address itself when no host has it.
    #[must_use]
    pub fn host_of(&self, addr: std::net::SocketAddr) -> String {
        self.lock()
            .hosts
            .get(&addr.ip())
            .cloned()
            .unwrap_or_else(|| addr.to_string())
    }

    /// Records a pick for request `id`; it joins the request's record when the request ends.
    pub fn pick(&self, id: u64, pick: PickRecord) {
        let mut recording = self.lock();
        let picks = recording.picks.entry(id).or_default();
        if picks.len() < MAX_PICKS_PER_REQUEST {
            picks.push(pick);
        }
    }

    /// The finished trace (requests sorted by id, each with its picks).
    #[must_use]
    pub fn finish(&self) -> Trace {
        let recording = self.lock();
        let mut trace = recording.trace.clone();
        trace.requests.sort_by_key(|r| r.id);
        for r in &mut trace.requests {
            if let Some(picks) = recording.picks.get(&r.id) {
                r.picks.clone_from(picks);
            }
        }
        trace
    }
}

/// Simulated time since the run started, in µs (0 outside a simulation).
#[must_use]
pub fn now_us() -> u64 {
    turmoil::sim_elapsed().map_or(0, micros)
}

/// A duration in whole µs.
#[must_use]
pub fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}
