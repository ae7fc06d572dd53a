//! The one request path: a request's whole life, for both HTTP engines.
//!
//! An engine (the proxy's own HTTP/1 engine, or hyper for HTTP/2) parses a request head, then
//! hands this module a read-only view of it ([`Head`]) and itself as an [`Engine`]: a byte
//! mover that can send an attempt to an address, send it again, stream a response back and
//! answer with the proxy's own response. Everything else happens here, once:
//!
//! 1. **route**: the authority's service through discovery (outbound) or the local service
//!    (inbound), then the request's route in that service's profile (`core::route`). An
//!    outbound authority discovery does not know (it answered `NotFound`) goes, on a
//!    connection that a redirect sent to the proxy, to where that connection was headed (its
//!    original destination, which the engines carry here): one plain endpoint, without a
//!    profile, counted under the request's authority (Linkerd's forwarding of traffic to hosts
//!    outside the mesh); without an original destination it gets 404. [`Context::resolve`]
//!    decides it, for both engines;
//! 2. **deadlines**: the route's request and attempt timeouts and the caller's `grpc-timeout`
//!    (`core::timeout`), enforced by the engine at the instants given here;
//! 3. **attempts**: an endpoint from the balancer (waiting in its queue, bounded by the
//!    fail-fast timeout and the request's deadline), the attempt, the balancer's feedback, and
//!    another attempt when the endpoint provably never processed the request and the request
//!    is still whole (`core::retry`);
//! 4. **retries** (outbound, on routes with a retry policy): a response head or an attempt
//!    failure of a retryable class goes again after a jittered backoff when the route's
//!    policy and budget allow it and the request is whole in hand (`core::retry::Retries`); the
//!    discarded response never reaches the caller, and each attempt is counted in the route's
//!    `route_actual_response_total`;
//! 5. **settling**: time to response headers and the response's class (the route's response
//!    classes) into the authority's and the route's metrics, the endpoint's RTT sample, and
//!    its in-flight count released when the response ends ([`Settle`]);
//! 6. **answers**: every error becomes the proxy's own response (`errors::respond`), counted
//!    and classified like any other.
//!
//! Before routing, a request on an inbound connection the local service's policy does not
//! allow, served because the policy admits its app's probes, is decided on its own
//! ([`gate`]): a probe goes on, anything else is answered 403 as the refused connection would
//! have been.
//!
//! Each request gets a `request` span (debug level) carrying its authority and route.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use conduit_core::balance::{InFlight, Picked};
use conduit_core::classify::Reason;
use conduit_core::classify::{ResponseClass, TransportError};
use conduit_core::retry::{
    Decision, HedgeDelay, Resend, Retries, Skip, Unprocessed, resend_unprocessed,
};
use conduit_core::route::{Profile, RequestView};
use conduit_core::time::Instant;
use conduit_core::timeout::{
    Deadlines, Expiry, GrpcTimeout, encode_grpc_timeout, parse_grpc_timeout,
};
use futures_util::FutureExt as _;
use http::StatusCode;
use tokio::sync::watch;
use tracing::Instrument as _;

use crate::admin::metrics::{AuthorityMetrics, Direction, Metrics};
use crate::balance::{RetryFailure, Router, ServiceBalancer};
use crate::body::{Body, BodyEnd, OnBodyEnd};
use crate::clock::Clock;
use crate::discover::{Discover, Resolution};
use crate::errors::ProxyError;
use crate::fault_points::FaultPoint;
use crate::observe::RequestKey;

pub(crate) mod gate;

use gate::ProbeGate;

/// The `authority` label for outbound requests discovery does not know.
const UNKNOWN_AUTHORITY: &str = "unknown";

/// A request head as the exchange reads it: what routing needs, through each engine's own head
/// type, without copies.
pub(crate) trait Head: RequestView {
    /// The authority: the target's (absolute form, `:authority`), else `Host`'s.
    fn authority(&self) -> Option<&str>;
    /// Whether the request's `content-type` is gRPC's.
    fn grpc(&self) -> bool;
    /// The caller's `grpc-timeout` value, if any.
    fn grpc_timeout(&self) -> Option<&[u8]>;
}

/// One attempt, as the exchange hands it to the engine.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Attempt {
    /// Where to send it.
    pub(crate) addr: SocketAddr,
    /// When to give up waiting for response headers (the request's and the attempt's
    /// timeouts; the engine's own response-headers timeout applies beside it).
    pub(crate) deadline: Option<Instant>,
    /// The `grpc-timeout` to send upstream, replacing the caller's.
    pub(crate) grpc_timeout: Option<GrpcTimeout>,
    /// The request's first attempt.
    pub(crate) first: bool,
}

/// What an engine's attempt returns when response headers arrived.
#[derive(Debug)]
pub(crate) struct Sent<R> {
    pub(crate) response: R,
    /// A new connection was established for this attempt.
    pub(crate) connected: bool,
}

/// How an attempt failed before response headers.
#[derive(Debug)]
pub(crate) enum AttemptError {
    /// The proxy's error for it.
    Proxy(ProxyError),
    /// The attempt's deadline ([`Attempt::deadline`]) passed; the exchange knows which
    /// timeout that was.
    Deadline,
}

/// An attempt that failed before response headers.
#[derive(Debug)]
pub(crate) struct Failed {
    pub(crate) error: AttemptError,
    /// The endpoint provably processed none of the request: it may be sent again.
    pub(crate) unprocessed: bool,
    /// The client's connection cannot carry on (part of its request body was read): the
    /// answer closes it.
    pub(crate) client_broken: bool,
    /// A new connection was established before the failure.
    pub(crate) connected: bool,
}

impl Failed {
    pub(crate) fn new(error: ProxyError) -> Self {
        Self {
            error: AttemptError::Proxy(error),
            unprocessed: false,
            client_broken: false,
            connected: false,
        }
    }

    /// A failure before any of the request reached the endpoint.
    pub(crate) fn unprocessed(error: ProxyError) -> Self {
        Self {
            unprocessed: true,
            ..Self::new(error)
        }
    }

    pub(crate) fn deadline() -> Self {
        Self {
            error: AttemptError::Deadline,
            unprocessed: false,
            client_broken: false,
            connected: false,
        }
    }
}

/// The facts of a response head the exchange classifies and counts.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Facts<'a> {
    pub(crate) status: StatusCode,
    /// `content-type` is gRPC's.
    pub(crate) grpc: bool,
    /// The `grpc-status` field, if the head carries one.
    pub(crate) grpc_status: Option<&'a [u8]>,
}

impl Facts<'_> {
    /// What an engine answers when asked for the facts of a head it does not hold (`facts`
    /// follows a successful `send`, so this is not expected): a bad gateway.
    pub(crate) const NO_HEAD: Facts<'static> = Facts {
        status: StatusCode::BAD_GATEWAY,
        grpc: false,
        grpc_status: None,
    };
}

/// What an HTTP engine does for the exchange: it moves bytes, and decides nothing.
pub(crate) trait Engine {
    /// A response head as the engine holds it, with what it needs to stream the body.
    type Response: Send;
    /// What serving the request leaves the engine with.
    type Output;
    /// Whether the client speaks HTTP/1 (closing the connection is then `connection: close`).
    const HTTP1: bool;

    /// Sends the request (again, after an attempt that failed unprocessed) and waits for its
    /// response head, until the attempt's deadline.
    fn send(
        &mut self,
        attempt: &Attempt,
    ) -> impl Future<Output = Result<Sent<Self::Response>, Failed>> + Send;

    /// Whether the whole request could be sent again now: its body unread, or kept whole.
    fn replayable(&self) -> bool;

    /// Drops a response head the caller will not see (the request is retried): nothing of it
    /// has been written to the client, and its connection or stream is given up.
    fn discard(&mut self, response: Self::Response);

    /// The facts of a response head (which the engine may keep itself, rather than in
    /// `response`, so a large head and its connection are not moved through the exchange).
    fn facts<'a>(&'a self, response: &'a Self::Response) -> Facts<'a>;

    /// Streams the response to the client and settles it through `settle` when it ends (at
    /// the latest at `settle`'s deadline).
    fn respond(
        &mut self,
        response: Self::Response,
        settle: Settle,
    ) -> impl Future<Output = Self::Output> + Send;

    /// Answers with the proxy's own response; `client_broken`: the client's connection must
    /// close after it.
    fn answer(
        &mut self,
        response: http::Response<Body>,
        client_broken: bool,
    ) -> impl Future<Output = Self::Output> + Send;

    /// A copy of the request that hedges send beside the engine's own attempt; made before the
    /// first attempt, on routes that hedge (a small body may be read whole first). `None`: the
    /// request cannot be copied (a body too large to keep, an upgrade), and it is not hedged.
    fn copy(&mut self) -> impl Future<Output = Option<Self::Copy>> + Send;

    /// A hedge's response head won: it becomes the response the engine streams.
    fn adopt(&mut self, response: <Self::Copy as RequestCopy>::Response) -> Self::Response;

    /// What [`copy`](Self::copy) makes.
    type Copy: RequestCopy;
}

/// A copy of a request that goes out on its own (a hedge), beside the engine's attempt: it
/// owns what it needs, so it sends while the engine is busy with the first attempt.
pub(crate) trait RequestCopy: Send + Sync + 'static {
    /// A response head as the copy holds it.
    type Response: Send + 'static;

    /// Whether the whole request is in hand now: no body, or its body read and kept whole
    /// (`None`: not yet, and it may be later).
    fn whole(&self) -> Option<bool>;

    /// Sends the copy and waits for its response head, until the attempt's deadline.
    fn send(&self, attempt: Attempt) -> BoxedSend<Self::Response>;

    /// The facts of a response head.
    fn facts(response: &Self::Response) -> Facts<'_>;
}

/// A copy's send in flight.
pub(crate) type BoxedSend<R> =
    std::pin::Pin<Box<dyn Future<Output = Result<Sent<R>, Failed>> + Send + 'static>>;

/// Where a direction's requests go.
#[derive(Clone, Debug)]
pub(crate) enum Target {
    /// Routed by authority through discovery and balanced (outbound).
    Balanced(Arc<Router>),
    /// Always the local app (inbound), under the local service's profile when known.
    Local {
        app: SocketAddr,
        /// The local service as discovery describes it: `None` until discovery has answered
        /// (then always `Some`, a service discovery does not know having no profile or
        /// policy).
        service: Option<watch::Receiver<Option<Arc<LocalService>>>>,
        /// How long a connection that arrives before that answer waits for it (the
        /// fail-fast timeout) before it is refused: its policy is not known yet.
        wait: Duration,
        /// The `authority` label while the local service is not resolved: its configured
        /// name, else the app's address. Never the client's `Host`, which a peer could vary
        /// to add series.
        label: Arc<str>,
    },
}

/// The service the local app serves, as discovery last described it.
#[derive(Debug)]
pub(crate) struct LocalService {
    label: Arc<str>,
    profile: Arc<Profile>,
    /// Who may call the service (its `policy`), when it has one.
    policy: Option<Arc<conduit_core::policy::ServerPolicy>>,
}

/// One direction's request path: where requests go and where they are counted.
#[derive(Clone, Debug)]
pub(crate) struct Context {
    pub(crate) direction: Direction,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) clock: Clock,
    target: Target,
    /// The profile of services without one: only the default route.
    no_profile: Arc<Profile>,
    /// Requests arrive over mTLS (counted with `tls="true"`).
    tls: bool,
    /// The identity the client proved over mTLS (counted as `client_id`).
    client: Option<Arc<str>>,
    /// The connection's policy decides each request ([`gate`]): an inbound connection the
    /// policy does not allow, admitted for its probes. `None` for every other connection.
    gate: Option<Arc<ProbeGate>>,
}

impl Context {
    pub(crate) fn new(
        direction: Direction,
        metrics: Arc<Metrics>,
        clock: Clock,
        target: Target,
    ) -> Self {
        Self {
            direction,
            metrics,
            clock,
            target,
            no_profile: Arc::new(Profile::default()),
            tls: false,
            client: None,
            gate: None,
        }
    }

    /// The authorization policy of the local service (inbound), as discovery last described
    /// it; `None` when it has none (everyone is allowed).
    pub(crate) fn local_policy(&self) -> Option<Arc<conduit_core::policy::ServerPolicy>> {
        match &self.target {
            Target::Local {
                service: Some(service),
                ..
            } => service.borrow().as_ref()?.policy.clone(),
            _ => None,
        }
    }

    /// While discovery has not answered for the local service (inbound, with one configured):
    /// a future that says, within the fail-fast timeout, whether it has; a connection must
    /// not be served before the policy that decides it is known. `None` when there is
    /// nothing to wait for, as nearly always: no future is built.
    pub(crate) fn until_local_known(
        &self,
    ) -> Option<impl Future<Output = bool> + Send + 'static + use<>> {
        let Target::Local {
            service: Some(service),
            wait,
            ..
        } = &self.target
        else {
            return None;
        };
        if service.borrow().is_some() {
            return None;
        }
        let (mut service, wait) = (service.clone(), *wait);
        Some(async move {
            matches!(
                tokio::time::timeout(wait, service.wait_for(Option::is_some)).await,
                Ok(Ok(_))
            )
        })
    }

    /// The same request path for requests that arrive over mTLS from `client` (the identity
    /// it proved, if its certificate names one).
    pub(crate) fn for_tls(&self, client: Option<Arc<str>>) -> Self {
        Self {
            tls: true,
            client,
            gate: None,
            ..self.clone()
        }
    }

    /// The same request path for one connection whose requests `gate` decides.
    pub(crate) fn gated(&self, gate: Arc<ProbeGate>) -> Self {
        Self {
            gate: Some(gate),
            ..self.clone()
        }
    }

    /// Follows the local service `authority` through `discovery` for inbound requests: its
    /// metrics label and profile, kept current by a task that ends when the returned receiver
    /// (and its clones) are dropped.
    pub(crate) fn follow_local(
        discovery: &dyn Discover,
        authority: &str,
    ) -> watch::Receiver<Option<Arc<LocalService>>> {
        fn local(resolution: &Resolution, authority: &str) -> Option<Arc<LocalService>> {
            match resolution {
                Resolution::Service { service, .. } => Some(Arc::new(LocalService {
                    label: Arc::from(format!("{}:{}", service.name, service.port)),
                    profile: Arc::new(service.profile.clone()),
                    policy: service.profile.policy().cloned().map(Arc::new),
                })),
                // No such service: known to have no profile and no policy.
                Resolution::NotFound => Some(Arc::new(LocalService {
                    label: Arc::from(authority),
                    profile: Arc::new(Profile::default()),
                    policy: None,
                })),
                Resolution::Unknown => None,
            }
        }
        let mut resolutions = discovery.resolve(authority);
        let (tx, rx) = watch::channel(local(&resolutions.borrow_and_update(), authority));
        let authority = authority.to_owned();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    changed = resolutions.changed() => if changed.is_err() {
                        // Discovery stopped following: keep the last answer.
                        tx.closed().await;
                        return;
                    },
                    () = tx.closed() => return,
                }
                let next = local(&resolutions.borrow_and_update(), &authority);
                tracing::debug!(service = %authority, known = next.is_some(), "local service updated");
                tx.send_replace(next);
            }
        });
        rx
    }

    /// Routes a request for `authority` that arrived at `start`: its series, its service's
    /// balancer (outbound) and its profile, waiting (bounded by the fail-fast timeout) until
    /// discovery has answered for the service. An outbound authority discovery says no service
    /// has goes to `original_dst` when the request's connection has one (a redirect sent it
    /// here), and is answered 404 otherwise.
    ///
    /// Only an answer decides: while discovery has not answered, the request waits (and fails
    /// fast) as for any authority, since the name may well be a meshed service, whose traffic
    /// must not leave in plaintext to wherever the client was headed.
    async fn resolve(
        &self,
        authority: Option<&str>,
        start: Instant,
        original_dst: Option<SocketAddr>,
    ) -> Result<Resolved, (Arc<AuthorityMetrics>, ProxyError)> {
        let series = |label: &str| {
            self.metrics
                .series_tls(self.direction, self.tls, self.client.as_ref(), label, start)
        };
        let (router, authority) = match (&self.target, authority) {
            (
                Target::Local {
                    app,
                    service,
                    label,
                    ..
                },
                _,
            ) => {
                let local = service.as_ref().and_then(|s| s.borrow().clone());
                let (series, profile) = match local {
                    Some(local) => (series(&local.label), Arc::clone(&local.profile)),
                    None => (series(label), Arc::clone(&self.no_profile)),
                };
                return Ok(Resolved {
                    series,
                    service: None,
                    fixed: Some(*app),
                    profile,
                });
            }
            (Target::Balanced(_), None) => {
                let err = ProxyError::Malformed {
                    reason: "missing authority (Host header)".into(),
                };
                return Err((series(UNKNOWN_AUTHORITY), err));
            }
            (Target::Balanced(router), Some(authority)) => (router, authority),
        };
        let service = match router.resolve(authority, start) {
            Ok(service) => service,
            Err(err) => return Err((series(UNKNOWN_AUTHORITY), err)),
        };
        // Once discovery has answered (nearly always), no future is built to wait for it;
        // the wait is boxed so its state does not weigh on every request's future.
        let resolved = match service.try_resolved(start) {
            Some(resolved) => resolved,
            None => Box::pin(service.resolved(start)).await,
        };
        match (resolved, original_dst) {
            (Ok((label, profile)), _) => Ok(Resolved {
                series: series(&label),
                service: Some(service),
                fixed: None,
                profile: profile.unwrap_or_else(|| Arc::clone(&self.no_profile)),
            }),
            // Not a service: the host the client was headed for, outside the mesh. Counted
            // under the authority (as the router keys it: bounded in length, and in number
            // by the router's table and the metrics' own bound on authorities).
            (Err(ProxyError::UnknownAuthority { .. }), Some(original_dst)) => {
                tracing::trace!(%original_dst, "not in discovery; to the original destination");
                Ok(Resolved {
                    series: series(service.authority()),
                    service: None,
                    fixed: Some(original_dst),
                    profile: Arc::clone(&self.no_profile),
                })
            }
            // Unresolved authorities share one label, so arbitrary names cannot grow the
            // metrics.
            (Err(err), _) => Err((series(UNKNOWN_AUTHORITY), err)),
        }
    }
}

/// A resolved request target.
struct Resolved {
    series: Arc<AuthorityMetrics>,
    service: Option<Arc<ServiceBalancer>>,
    fixed: Option<SocketAddr>,
    profile: Arc<Profile>,
}

/// What routing decided for a request.
struct Routed {
    /// The service's balancer: the request is balanced over its endpoints (outbound).
    service: Option<Arc<ServiceBalancer>>,
    /// Else the one fixed target: the local app (inbound), or the original destination of an
    /// outbound request for an authority discovery does not know.
    fixed: Option<SocketAddr>,
    profile: Arc<Profile>,
    /// The route's position in the profile (`None`: the default route).
    route: Option<usize>,
    /// The `route` label, when the service has a profile (route metrics are kept then only).
    route_label: Option<Arc<str>>,
    deadlines: Deadlines,
}

/// One request's exchange, from [`Exchange::begin`] (route it) to [`Exchange::forward`] (send
/// it and answer).
pub(crate) struct Exchange<'c> {
    cx: &'c Context,
    start: Instant,
    grpc: bool,
    series: Arc<AuthorityMetrics>,
    routed: Result<Routed, ProxyError>,
    span: tracing::Span,
    /// The observer's key for the request, when it follows the request's picks.
    observed: Option<RequestKey>,
    /// The request's retries, on a route with a retry policy (outbound only).
    retries: Option<Retries>,
}

impl<'c> Exchange<'c> {
    /// Routes the request whose head is `head`, arrived at `start` on a connection headed for
    /// `original_dst` before a redirect sent it to the proxy (`None`: not redirected, or
    /// inbound), and counts it. Errors are kept for [`forward`](Self::forward) to answer.
    pub(crate) async fn begin(
        cx: &'c Context,
        head: &impl Head,
        mut start: Instant,
        original_dst: Option<SocketAddr>,
    ) -> Self {
        if let Some(late) = crate::fault_points::delay(FaultPoint::SlowRequestHead) {
            start += late;
            cx.clock.sleep_until(start).await;
        }
        let grpc = head.grpc();
        let authority = head.authority();
        let observed = match &cx.target {
            Target::Balanced(router) => router.observer().request(head),
            Target::Local { .. } => None,
        };
        let mut retries = None;
        let resolved = cx.resolve(authority, start, original_dst).await;
        // On a connection the policy does not allow, admitted for its probes, this request is
        // decided on its own; every other connection pays this one branch. (Decided after the
        // await, so that no request's future holds the answer across it.)
        let refused = match &cx.gate {
            None => None,
            Some(gate) => gate.admit(&cx.metrics, head),
        };
        let (series, routed) = match (resolved, refused) {
            (Err((series, err)), _) => {
                series.request(start, None);
                (series, Err(err))
            }
            // Counted under the local service, without a route: the app never sees it.
            (Ok(resolved), Some(refused)) => {
                resolved.series.request(start, None);
                (resolved.series, Err(refused))
            }
            (Ok(resolved), None) => {
                let matched = resolved.profile.find(head);
                let route_label =
                    (!resolved.profile.is_empty()).then(|| Arc::clone(&matched.route().name));
                resolved.series.request(start, route_label.as_ref());
                let incoming = head.grpc_timeout().and_then(parse_grpc_timeout);
                let deadlines = Deadlines::new(start, &matched.policy().timeouts, incoming);
                let route = matched.index();
                // Retries are the client side's: only balanced (outbound) requests have them.
                if let (Some(policy), Some(service), Some(index)) =
                    (&matched.policy().retry, &resolved.service, route)
                {
                    service.deposit(&resolved.profile, index, start);
                    retries = Some(Retries::new(policy, head.method()));
                }
                (
                    resolved.series,
                    Ok(Routed {
                        service: resolved.service,
                        fixed: resolved.fixed,
                        route,
                        route_label,
                        deadlines,
                        profile: resolved.profile,
                    }),
                )
            }
        };
        let span = tracing::debug_span!(
            "request",
            direction = cx.direction.as_str(),
            authority = authority.unwrap_or(""),
            route = routed
                .as_ref()
                .ok()
                .and_then(|r| r.route_label.as_deref())
                .unwrap_or(""),
        );
        Self {
            cx,
            start,
            grpc,
            series,
            routed,
            span,
            observed,
            retries,
        }
    }

    /// Sends the request through `engine` (again, when an endpoint provably did not process
    /// it), then streams the response or answers with the proxy's own.
    ///
    /// The exchange stays where the engine keeps it (borrowed, not moved into the future), so
    /// a request does not pay for copies of it.
    pub(crate) fn forward<'e, E: Engine + Send>(
        &'e mut self,
        engine: &'e mut E,
    ) -> impl Future<Output = E::Output> + Send + 'e
    where
        'c: 'e,
    {
        // The span wraps the future only when it is on: wrapping moves the whole request's
        // future once more, which every request would pay for a span nobody reads.
        if self.span.is_disabled() {
            futures_util::future::Either::Left(self.run(engine))
        } else {
            let span = self.span.clone();
            futures_util::future::Either::Right(self.run(engine).instrument(span))
        }
    }

    async fn run<E: Engine>(&mut self, engine: &mut E) -> E::Output {
        let routed = match &self.routed {
            Ok(routed) => routed,
            Err(err) => return self.answer(engine, err, false).await,
        };
        let clock = self.cx.clock;
        // Held here, beside the borrowed route, for the decisions below.
        let mut retries = self.retries.take();
        let mut attempts = 0u32;
        let mut repicked: Option<Picked> = None;
        // A retry's endpoint: anywhere but the one whose attempt it follows, if another is
        // ready.
        let mut avoid: Option<SocketAddr> = None;
        let mut now = self.start;
        // The route's fault policy, applied where a balancer holds the service's seeded RNG
        // (outbound): a delay before the first attempt, an abort instead of any. Boxed: few
        // routes inject faults, and the wait would weigh on every request's future.
        if let (Some(service), Some(policy)) = (routed.service.as_deref(), routed.fault()) {
            match Box::pin(self.inject(routed, service, policy)).await {
                Ok(after) => now = after,
                Err(err) => return self.answer(engine, &err, false).await,
            }
        }
        loop {
            attempts += 1;
            if let Some(expiry) = routed.deadlines.expiry(now) {
                return self.answer(engine, &expired(expiry, None), false).await;
            }
            // The common case picks at once, reading no clock; a wait in the queue is boxed so
            // its state does not weigh on every request's future.
            let picked =
                match Self::pick_now(routed, repicked.take(), avoid.take(), now, self.observed) {
                    Some(picked) => picked.map(|(addr, in_flight)| (addr, in_flight, now)),
                    None => Box::pin(self.pick_wait(routed, now, routed.deadlines.request())).await,
                };
            let (mut addr, mut in_flight, mut dispatched) = match picked {
                Ok(picked) => picked,
                Err(err) => return self.answer(engine, &err, false).await,
            };
            // The attempt timeout counts from dispatch (after any wait in the queue).
            let budget = match routed.deadlines.attempt(dispatched) {
                Ok(budget) => budget,
                Err(expiry) => return self.answer(engine, &expired(expiry, None), false).await,
            };
            let attempt = Attempt {
                addr,
                deadline: budget.deadline,
                grpc_timeout: budget.propagate.map(encode_grpc_timeout),
                first: attempts == 1,
            };
            // On a route that hedges, the first attempt races its hedges (boxed: rare, and
            // its state would weigh on every request's future).
            let hedging = match retries.as_mut() {
                Some(retries) if attempts == 1 && retries.may_hedge() => {
                    Box::pin(self.hedging(routed, engine, dispatched))
                        .await
                        .map(|(copy, delay)| (retries, copy, delay))
                }
                _ => None,
            };
            let result = match hedging {
                None if crate::fault_points::fire(FaultPoint::Upstream503) => {
                    Err(Failed::unprocessed(ProxyError::Unavailable {
                        reason: "fault point: the endpoint refused the request (503)".into(),
                    }))
                }
                None => engine.send(&attempt).await,
                Some((retries, copy, delay)) => {
                    let first = Contender {
                        addr,
                        in_flight,
                        dispatched,
                    };
                    let race = Race {
                        routed,
                        copy,
                        delay,
                        retries,
                    };
                    let raced = Box::pin(self.race(engine, &attempt, first, race)).await;
                    (addr, in_flight, dispatched) = (
                        raced.winner.addr,
                        raced.winner.in_flight,
                        raced.winner.dispatched,
                    );
                    raced.result
                }
            };
            let failed = match result {
                Ok(sent) => {
                    let Some((after, outcome)) =
                        self.retry_response(&mut retries, engine, &sent, addr, in_flight.as_ref())
                    else {
                        let attempted = retries.is_some();
                        return self.respond(engine, sent, addr, in_flight, attempted).await;
                    };
                    // The caller never sees this response: the request goes again. The
                    // endpoint's breaker learns how the attempt went.
                    engine.discard(sent.response);
                    if let (Some(service), Some(in_flight)) = (routed.service.as_deref(), in_flight)
                    {
                        service.settle(self.cx.clock.now(), in_flight, outcome);
                    }
                    now = self.backoff(after).await;
                    avoid = Some(addr);
                    continue;
                }
                Err(failed) => failed,
            };
            #[cfg(feature = "planted-faults")]
            let failed = self.plant_resend(failed);
            let service = routed.service.as_deref();
            let error = self.failure(
                routed,
                addr,
                dispatched,
                in_flight,
                failed.connected,
                failed.error,
            );
            // This proxy's own lack of a certificate would fail the same way anywhere.
            if failed.unprocessed
                && !failed.client_broken
                && !matches!(error, ProxyError::NoIdentity { .. })
            {
                let decision = resend_unprocessed(
                    Unprocessed {
                        attempts,
                        connect_failed: matches!(
                            error,
                            ProxyError::Connect { .. }
                                | ProxyError::ConnectTimeout { .. }
                                | ProxyError::Identity { .. }
                                | ProxyError::Unmeshed { .. }
                        ),
                        replayable: engine.replayable(),
                    },
                    // A fixed target is tried again (on a new connection), never elsewhere.
                    routed.service.is_some(),
                );
                match (decision, service) {
                    (Resend::Elsewhere, Some(service)) => {
                        // Only an endpoint ready now: a request never waits in the queue twice.
                        now = clock.now();
                        if let Some(Ok(picked)) = service.acquire(now, self.observed).now_or_never()
                        {
                            tracing::debug!(endpoint = %addr, %error, next = %picked.addr, "request not processed; sending it again");
                            repicked = Some(picked);
                            continue;
                        }
                    }
                    (Resend::Again, _) => {
                        tracing::debug!(endpoint = %addr, %error, "request not processed; sending it again");
                        now = clock.now();
                        continue;
                    }
                    _ => {}
                }
            }
            if !failed.client_broken
                && let Some(after) =
                    self.retry_failure(&mut retries, engine.replayable(), addr, &error)
            {
                now = self.backoff(after).await;
                avoid = Some(addr);
                continue;
            }
            tracing::debug!(endpoint = %addr, %error, "proxy error");
            return self.answer(engine, &error, failed.client_broken).await;
        }
    }

    /// The planted [`ResendMaybeProcessed`](crate::observe::PlantedFault::ResendMaybeProcessed):
    /// an attempt whose upstream connection failed after the request was written counts as
    /// unprocessed, so it is sent again although the endpoint may have processed it.
    #[cfg(feature = "planted-faults")]
    fn plant_resend(&self, mut failed: Failed) -> Failed {
        if let Target::Balanced(router) = &self.cx.target
            && router.planted() == Some(crate::observe::PlantedFault::ResendMaybeProcessed)
            && matches!(
                failed.error,
                AttemptError::Proxy(ProxyError::Upstream { .. })
            )
        {
            failed.unprocessed = true;
        }
        failed
    }

    /// Settles an attempt to `addr` (dispatched at `dispatched`) that failed before response
    /// headers with `error`: the balancer's feedback, and the endpoint's breaker when the
    /// endpoint is to blame (no answer in time, a broken exchange). Returns the error.
    fn failure(
        &self,
        routed: &Routed,
        addr: SocketAddr,
        dispatched: Instant,
        in_flight: Option<InFlight>,
        connected: bool,
        error: AttemptError,
    ) -> ProxyError {
        let service = routed.service.as_deref();
        if connected && let Some(service) = service {
            service.connect_succeeded(addr);
        }
        let error =
            match error {
                AttemptError::Proxy(error) => error,
                AttemptError::Deadline => {
                    let now = self.cx.clock.now();
                    let expiry = routed.deadlines.attempt_expiry(dispatched, now).unwrap_or(
                        Expiry::Request {
                            // Woken early (not with a monotonic clock): the wait was the
                            // request's.
                            timeout: now.saturating_duration_since(self.start),
                            propagated: false,
                        },
                    );
                    expired(expiry, Some(addr))
                }
            };
        feedback(service, addr, in_flight.as_ref(), &error);
        // The endpoint's load settles before another pick; a failure the endpoint is to blame
        // for counts against its breaker.
        if let (Some(service), Some(in_flight)) = (service, in_flight)
            && matches!(
                error,
                ProxyError::Upstream { .. }
                    | ProxyError::ResponseTimeout { .. }
                    | ProxyError::AttemptTimeout { .. }
            )
        {
            service.settle(
                self.cx.clock.now(),
                in_flight,
                conduit_core::classify::Outcome::Failure,
            );
        }
        error
    }

    /// On a route that hedges: a copy of the request for its hedges, and how long after an
    /// attempt goes out a hedge follows it (`None`: no hedge for this request; a route that
    /// hedges after a latency quantile does not until it has seen enough responses).
    async fn hedging<E: Engine>(
        &self,
        routed: &Routed,
        engine: &mut E,
        now: Instant,
    ) -> Option<(E::Copy, Duration)> {
        let route = routed.route?;
        let hedge = routed
            .profile
            .route_at(Some(route))
            .policy
            .retry
            .as_ref()?
            .hedge?;
        let service = routed.service.as_ref()?;
        let delay = service.hedge_delay(&hedge, &routed.profile, route, now)?;
        Some((engine.copy().await?, delay))
    }

    /// The first attempt, `first`, raced by hedges: every `delay` without a response, another
    /// copy of the request goes to an endpoint the balancer offers at once, as long as the
    /// route's policy and budget allow. The first response head that is not a retryable
    /// failure wins; the other attempts are cancelled (dropped, which releases their in-flight
    /// counts) and their hedges counted `lost`. Failures while another attempt is still out
    /// are settled here; the last one (a retryable response rather than an error, when there
    /// is one) is returned unsettled, for the request's usual retry decision.
    async fn race<E: Engine>(
        &self,
        engine: &mut E,
        attempt: &Attempt,
        first: Contender,
        race: Race<'_, E::Copy>,
    ) -> Raced<E::Response> {
        let Race {
            routed,
            copy,
            delay,
            retries,
        } = race;
        let clock = self.cx.clock;
        let first_addr = first.addr;
        let mut out = Hedges::new();
        let mut next = Some(first.dispatched + delay);
        // Phase one: the engine's own attempt is out, and holds the engine.
        let ended = {
            let mut primary = std::pin::pin!(engine.send(attempt));
            loop {
                tokio::select! {
                    result = &mut primary => break Ok(result),
                    Some((i, result)) = futures_util::StreamExt::next(&mut out.futures), if !out.futures.is_empty() => {
                        let Some(hedge) = out.take(i) else { continue };
                        match self.hedge_ended::<E::Copy>(routed, hedge, result, true) {
                            HedgeEnd::Won(hedge, sent) => break Err((hedge, sent)),
                            HedgeEnd::Settled | HedgeEnd::Last(..) => {}
                        }
                    }
                    () = clock.sleep_until(next.unwrap_or(Instant::ZERO)), if next.is_some() => {
                        next = self.send_hedge(routed, &copy, delay, retries, &mut out, first_addr);
                    }
                }
            }
        };
        // The engine's attempt was dropped with its future if a hedge won.
        let held = match ended {
            Err((hedge, sent)) => {
                drop(first);
                return self.hedge_won(engine, routed, hedge, sent, &out);
            }
            Ok(Ok(sent)) => {
                let (retryable, ..) = self.head_class(routed, engine.facts(&sent.response));
                if !retryable || out.futures.is_empty() {
                    self.hedges_lost(routed, &out);
                    return Raced {
                        winner: first,
                        result: Ok(sent),
                    };
                }
                // A retryable failure while a hedge is out: kept, in case nothing better comes.
                Some((first, sent))
            }
            Ok(Err(failed)) => {
                if failed.client_broken || out.futures.is_empty() {
                    self.hedges_lost(routed, &out);
                    return Raced {
                        winner: first,
                        result: Err(failed),
                    };
                }
                self.attempt_failed(routed, first, failed);
                None
            }
        };
        // Phase two: only hedges are out.
        loop {
            tokio::select! {
                Some((i, result)) = futures_util::StreamExt::next(&mut out.futures), if !out.futures.is_empty() => {
                    let Some(hedge) = out.take(i) else { continue };
                    let others = !out.futures.is_empty() || held.is_some();
                    match self.hedge_ended::<E::Copy>(routed, hedge, result, others) {
                        HedgeEnd::Won(hedge, sent) => {
                            if let Some((first, sent)) = held {
                                let facts = engine.facts(&sent.response);
                                let (_, status, outcome) = self.head_class(routed, facts);
                                self.response_settled(routed, first, sent.connected, status, outcome);
                                engine.discard(sent.response);
                            }
                            return self.hedge_won(engine, routed, hedge, sent, &out);
                        }
                        HedgeEnd::Last(hedge, result) => {
                            return Raced {
                                winner: hedge,
                                result: result.map(|sent| Sent {
                                    response: engine.adopt(sent.response),
                                    connected: sent.connected,
                                }),
                            };
                        }
                        HedgeEnd::Settled => {
                            if out.futures.is_empty()
                                && let Some((first, sent)) = held
                            {
                                return Raced {
                                    winner: first,
                                    result: Ok(sent),
                                };
                            }
                        }
                    }
                }
                () = clock.sleep_until(next.unwrap_or(Instant::ZERO)), if next.is_some() => {
                    next = self.send_hedge(routed, &copy, delay, retries, &mut out, first_addr);
                }
            }
        }
    }

    /// Sends a hedge now, if the route's policy and budget allow and the balancer has an
    /// endpoint ready; returns when the next may go.
    fn send_hedge<C: RequestCopy>(
        &self,
        routed: &Routed,
        copy: &C,
        delay: Duration,
        retries: &mut Retries,
        out: &mut Hedges<C::Response>,
        first: SocketAddr,
    ) -> Option<Instant> {
        let (service, route, label) = (
            routed.service.as_ref()?,
            routed.route?,
            routed.route_label.as_ref()?,
        );
        let now = self.cx.clock.now();
        let budget = routed.deadlines.attempt(now).ok()?;
        let Some(whole) = copy.whole() else {
            // The body is still on its way to the first attempt: look again after a delay.
            return Some(now + delay);
        };
        // Elsewhere than the attempt it races, if another endpoint is ready.
        let Some(Ok(picked)) = service.try_pick_hedge(now, self.observed, first) else {
            tracing::debug!("no endpoint ready for a hedge");
            return None;
        };
        if let Err(skip) = service.hedge(retries, &routed.profile, route, whole, now) {
            tracing::debug!(reason = skip.as_str(), "not hedging");
            if skip != Skip::Attempts {
                self.series.retry_skipped(now, label, skip.as_str());
            }
            return None;
        }
        tracing::debug!(endpoint = %picked.addr, "hedging");
        let attempt = Attempt {
            addr: picked.addr,
            deadline: budget.deadline,
            grpc_timeout: budget.propagate.map(encode_grpc_timeout),
            first: false,
        };
        let i = out.contenders.len();
        out.contenders.push(Some(Contender {
            addr: picked.addr,
            in_flight: Some(picked.in_flight),
            dispatched: now,
        }));
        out.futures.push(
            copy.send(attempt)
                .map(Box::new(move |result| (i, result)) as Box<dyn FnOnce(_) -> _ + Send>),
        );
        retries.may_hedge().then_some(now + delay)
    }

    /// A hedge ended with `result`: it won (a response that is not a retryable failure), or
    /// it failed and is settled here when `others` are still out, or it is the race's last.
    fn hedge_ended<C: RequestCopy>(
        &self,
        routed: &Routed,
        hedge: Contender,
        result: Result<Sent<C::Response>, Failed>,
        others: bool,
    ) -> HedgeEnd<C::Response> {
        let now = self.cx.clock.now();
        let label = routed.route_label.as_ref();
        match result {
            Ok(sent) => {
                let (retryable, status, outcome) =
                    self.head_class(routed, C::facts(&sent.response));
                if !retryable {
                    return HedgeEnd::Won(hedge, sent);
                }
                if let Some(label) = label {
                    self.series.hedged(now, label, "failed");
                }
                if !others {
                    return HedgeEnd::Last(hedge, Ok(sent));
                }
                self.response_settled(routed, hedge, sent.connected, status, outcome);
                HedgeEnd::Settled
            }
            Err(failed) => {
                if let Some(label) = label {
                    self.series.hedged(now, label, "failed");
                }
                if !others {
                    return HedgeEnd::Last(hedge, Err(failed));
                }
                self.attempt_failed(routed, hedge, failed);
                HedgeEnd::Settled
            }
        }
    }

    /// A hedge's response won: the engine streams it, and the hedges still out are cancelled.
    fn hedge_won<E: Engine>(
        &self,
        engine: &mut E,
        routed: &Routed,
        hedge: Contender,
        sent: Sent<<E::Copy as RequestCopy>::Response>,
        out: &Hedges<<E::Copy as RequestCopy>::Response>,
    ) -> Raced<E::Response> {
        if let Some(label) = &routed.route_label {
            self.series.hedged(self.cx.clock.now(), label, "won");
        }
        tracing::debug!(endpoint = %hedge.addr, "the hedge answered first");
        self.hedges_lost(routed, out);
        Raced {
            winner: hedge,
            result: Ok(Sent {
                response: engine.adopt(sent.response),
                connected: sent.connected,
            }),
        }
    }

    /// Counts the hedges still out as `lost`: they are cancelled with the race.
    fn hedges_lost<R>(&self, routed: &Routed, out: &Hedges<R>) {
        let Some(label) = &routed.route_label else {
            return;
        };
        let now = self.cx.clock.now();
        for _ in out.contenders.iter().flatten() {
            self.series.hedged(now, label, "lost");
        }
    }

    /// Whether a response head's class is a retryable failure, its status and its outcome.
    fn head_class(
        &self,
        routed: &Routed,
        facts: Facts<'_>,
    ) -> (bool, u16, conduit_core::classify::Outcome) {
        let classifier = &routed.profile.route_at(routed.route).policy.classifier;
        let status = facts.status.as_u16();
        match classifier.classify_head(facts.status, facts.grpc, facts.grpc_status) {
            ResponseClass::Final(class) => (class.retryable, status, class.outcome),
            // Decided by trailers: not a failure the race can see.
            ResponseClass::Pending(_) => (false, status, conduit_core::classify::Outcome::Success),
        }
    }

    /// Settles an attempt whose response the caller will not see (it lost a race): counted as
    /// an attempt, an RTT sample, and the endpoint's breaker learns its outcome.
    fn response_settled(
        &self,
        routed: &Routed,
        contender: Contender,
        connected: bool,
        status: u16,
        outcome: conduit_core::classify::Outcome,
    ) {
        let now = self.cx.clock.now();
        if let Some(label) = &routed.route_label {
            self.series.attempt_end(now, status, outcome, label);
        }
        if let Some(service) = &routed.service {
            if connected {
                service.connect_succeeded(contender.addr);
            }
            if let Some(in_flight) = contender.in_flight {
                service.observe_at(now, &in_flight);
                service.settle(now, in_flight, outcome);
            }
        }
    }

    /// Settles an attempt that failed before response headers while another was still out.
    fn attempt_failed(&self, routed: &Routed, contender: Contender, failed: Failed) {
        let error = self.failure(
            routed,
            contender.addr,
            contender.dispatched,
            contender.in_flight,
            failed.connected,
            failed.error,
        );
        tracing::debug!(endpoint = %contender.addr, %error, "attempt failed while another is out");
        if let Some(label) = &routed.route_label {
            let status = error.to_synthetic().http_status.as_u16();
            self.series.attempt_end(
                self.cx.clock.now(),
                status,
                conduit_core::classify::Outcome::Failure,
                label,
            );
        }
    }

    /// On a route that retries: whether the response whose head is `sent` goes back to the
    /// caller (`None`) or the request goes again after the returned backoff. A retried
    /// response is counted as an attempt and teaches the balancer like any other.
    fn retry_response<E: Engine>(
        &self,
        retries: &mut Option<Retries>,
        engine: &E,
        sent: &Sent<E::Response>,
        addr: SocketAddr,
        in_flight: Option<&InFlight>,
    ) -> Option<(Duration, conduit_core::classify::Outcome)> {
        retries.as_ref()?;
        let routed = self.routed.as_ref().ok()?;
        let facts = engine.facts(&sent.response);
        let classifier = &routed.profile.route_at(routed.route).policy.classifier;
        // A class the head leaves open (a gRPC status in trailers) is known only once the
        // response has streamed to the caller: too late to retry.
        let ResponseClass::Final(class) =
            classifier.classify_head(facts.status, facts.grpc, facts.grpc_status)
        else {
            return None;
        };
        if !class.retryable {
            return None;
        }
        let status = facts.status.as_u16();
        let now = self.cx.clock.now();
        let after = self.decide(retries, now, engine.replayable(), class.reason)?;
        let route = routed.route_label.as_ref()?;
        self.series.attempt_end(now, status, class.outcome, route);
        if let Some(service) = &routed.service {
            if sent.connected {
                service.connect_succeeded(addr);
            }
            if let Some(in_flight) = in_flight {
                service.observe_at(now, in_flight);
            }
        }
        tracing::debug!(endpoint = %addr, status, ?after, "retryable response; sending the request again");
        Some((after, class.outcome))
    }

    /// On a route that retries: counts an attempt that failed before response headers with
    /// `error`, and whether the request goes again after the returned backoff.
    fn retry_failure(
        &self,
        retries: &mut Option<Retries>,
        replayable: bool,
        addr: SocketAddr,
        error: &ProxyError,
    ) -> Option<Duration> {
        retries.as_ref()?;
        let routed = self.routed.as_ref().ok()?;
        let route = routed.route_label.clone()?;
        let now = self.cx.clock.now();
        let status = error.to_synthetic().http_status.as_u16();
        self.series.attempt_end(
            now,
            status,
            conduit_core::classify::Outcome::Failure,
            &route,
        );
        let transport = transport_error(error)?;
        let classifier = &routed.profile.route_at(routed.route).policy.classifier;
        if !classifier.classify_error(transport).retryable {
            return None;
        }
        let after = self.decide(retries, now, replayable, Reason::Transport(transport))?;
        tracing::debug!(endpoint = %addr, %error, ?after, "retryable failure; sending the request again");
        Some(after)
    }

    /// Asks the route's retry policy and budget about a retryable failure at `now` (of kind
    /// `reason`), and counts the answer: the backoff before the retry, or why there is none.
    fn decide(
        &self,
        retries: &mut Option<Retries>,
        now: Instant,
        replayable: bool,
        reason: Reason,
    ) -> Option<Duration> {
        let retries = retries.as_mut()?;
        let routed = self.routed.as_ref().ok()?;
        let (service, index, route) = (
            routed.service.as_ref()?,
            routed.route?,
            routed.route_label.as_ref()?,
        );
        let failure = RetryFailure {
            retryable: true,
            replayable,
            remaining: routed
                .deadlines
                .request()
                .map(|deadline| deadline.saturating_duration_since(now)),
        };
        match service.retry(retries, &routed.profile, index, failure, now) {
            Decision::Retry { after } => {
                self.series.retried(now, route, retry_reason(reason));
                Some(after)
            }
            Decision::Skip(skip) => {
                if skip != Skip::NotRetryable {
                    tracing::debug!(reason = skip.as_str(), "not retrying");
                    self.series.retry_skipped(now, route, skip.as_str());
                }
                None
            }
        }
    }

    /// Waits out a retry's backoff; returns when it ended. The decision made sure the
    /// request's deadline is later.
    async fn backoff(&self, after: Duration) -> Instant {
        let clock = self.cx.clock;
        if !after.is_zero() {
            clock.sleep_until(clock.now() + after).await;
        }
        clock.now()
    }

    /// The endpoint for an attempt at `now` when one is at hand: `repicked` if a resend already
    /// chose one, else the balancer's ready pick, else the fixed target. `None`: the balancer has
    /// no ready endpoint, and [`pick_wait`](Self::pick_wait) waits for one.
    fn pick_now(
        routed: &Routed,
        repicked: Option<Picked>,
        avoid: Option<SocketAddr>,
        now: Instant,
        observed: Option<RequestKey>,
    ) -> Option<Result<(SocketAddr, Option<InFlight>), ProxyError>> {
        if let Some(picked) = repicked {
            return Some(Ok((picked.addr, Some(picked.in_flight))));
        }
        let Some(service) = &routed.service else {
            return Some(routed.fixed.map(|fixed| (fixed, None)).ok_or_else(|| {
                ProxyError::Unavailable {
                    reason: "no target for request".into(),
                }
            }));
        };
        let picked = match avoid {
            None => service.try_pick(now, observed)?,
            Some(avoid) => service.try_pick_avoiding(now, observed, avoid)?,
        };
        Some(picked.map(|picked| (picked.addr, Some(picked.in_flight))))
    }

    /// Waits in the balancer's queue for a ready endpoint, at most until the request's
    /// `deadline`; returns it and when it was picked.
    async fn pick_wait(
        &self,
        routed: &Routed,
        now: Instant,
        deadline: Option<Instant>,
    ) -> Result<(SocketAddr, Option<InFlight>, Instant), ProxyError> {
        let Some(service) = &routed.service else {
            return Err(ProxyError::Unavailable {
                reason: "no target for request".into(),
            });
        };
        let mut acquire = std::pin::pin!(service.acquire(now, self.observed));
        let picked = match deadline {
            None => acquire.await?,
            Some(deadline) => tokio::select! {
                picked = &mut acquire => picked?,
                () = self.cx.clock.sleep_until(deadline) => {
                    let expiry = routed.deadlines.expiry(deadline).unwrap_or(Expiry::Request {
                        timeout: deadline.saturating_duration_since(self.start),
                        propagated: false,
                    });
                    return Err(expired(expiry, None));
                }
            },
        };
        Ok((picked.addr, Some(picked.in_flight), self.cx.clock.now()))
    }

    /// Response headers arrived: counts them, teaches the balancer, and streams the response.
    async fn respond<E: Engine>(
        &mut self,
        engine: &mut E,
        sent: Sent<E::Response>,
        addr: SocketAddr,
        in_flight: Option<InFlight>,
        attempted: bool,
    ) -> E::Output {
        let routed = std::mem::replace(
            &mut self.routed,
            Err(ProxyError::Unavailable {
                reason: String::new(),
            }),
        );
        let Ok(routed) = routed else {
            // `respond` follows only a routed attempt.
            return engine
                .answer(
                    ProxyError::Unavailable {
                        reason: "unrouted response".into(),
                    }
                    .to_response(self.grpc, E::HTTP1),
                    false,
                )
                .await;
        };
        let now = self.cx.clock.now();
        let facts = engine.facts(&sent.response);
        let status = facts.status.as_u16();
        let latency = now.saturating_duration_since(self.start);
        self.series
            .response_headers(now, status, latency, routed.route_label.as_ref());
        if let Some(service) = &routed.service {
            if sent.connected {
                service.connect_succeeded(addr);
            }
            if let Some(in_flight) = &in_flight {
                service.observe_at(now, in_flight);
            }
        }
        tracing::trace!(endpoint = %addr, status, ?latency, "response headers");
        // A route that hedges after a quantile of its latency learns it here.
        if let (Some(service), Some(route)) = (&routed.service, routed.route)
            && routed
                .profile
                .route_at(Some(route))
                .policy
                .retry
                .as_ref()
                .and_then(|retry| retry.hedge)
                .is_some_and(|hedge| matches!(hedge.after, HedgeDelay::Quantile { .. }))
        {
            service.route_latency(&routed.profile, route, now, latency);
        }
        let classifier = &routed.profile.route_at(routed.route).policy.classifier;
        let class = classifier.classify_head(facts.status, facts.grpc, facts.grpc_status);
        let settle = Settle {
            series: Arc::clone(&self.series),
            route_label: routed.route_label,
            profile: routed.profile,
            route: routed.route,
            status,
            class,
            in_flight,
            service: routed.service,
            clock: self.cx.clock,
            deadlines: routed.deadlines,
            grpc: self.grpc,
            attempted,
        };
        engine.respond(sent.response, settle).await
    }

    /// The proxy's own response for `err`, counted and classified like any other.
    /// Applies `policy`, the route's fault policy, to this request: waits out an injected
    /// delay (the request's deadline cuts it short) and returns when the request goes on, or
    /// the error that answers it (the injected abort, or the deadline). Each injected fault is
    /// counted on the route.
    async fn inject(
        &self,
        routed: &Routed,
        service: &ServiceBalancer,
        policy: &conduit_core::fault::FaultPolicy,
    ) -> Result<Instant, ProxyError> {
        let injected = service.draw_fault(policy);
        let mut now = self.start;
        let count = |now: Instant, fault: &'static str| {
            if let Some(label) = &routed.route_label {
                self.series.fault_injected(now, label, fault);
            }
        };
        if let Some(delay) = injected.delay {
            count(now, "delay");
            let until = match routed.deadlines.request() {
                Some(deadline) => (now + delay).min(deadline),
                None => now + delay,
            };
            self.cx.clock.sleep_until(until).await;
            now = self.cx.clock.now();
            if let Some(expiry) = routed.deadlines.expiry(now) {
                return Err(expired(expiry, None));
            }
        }
        if let Some(abort) = injected.abort {
            count(now, "abort");
            return Err(ProxyError::FaultInjected {
                status: abort.status,
                grpc: abort.grpc,
            });
        }
        Ok(now)
    }

    async fn answer<E: Engine>(
        &self,
        engine: &mut E,
        err: &ProxyError,
        client_broken: bool,
    ) -> E::Output {
        let response = err.to_response(self.grpc, E::HTTP1);
        let status = response.status();
        let now = self.cx.clock.now();
        let routed = self.routed.as_ref().ok();
        let route = routed.and_then(|r| r.route_label.as_ref());
        let latency = now.saturating_duration_since(self.start);
        self.series
            .response_headers(now, status.as_u16(), latency, route);
        // Classified like any response, by the route's classes (by default Linkerd's: 5xx and
        // non-OK gRPC statuses are failures; the proxy's 400/404/431 blame the client, as an
        // app's would). A synthesized gRPC response is trailers-only, so its head decides.
        let profile = routed.map_or(&self.cx.no_profile, |r| &r.profile);
        let classifier = &profile
            .route_at(routed.and_then(|r| r.route))
            .policy
            .classifier;
        let outcome = match classifier.classify_response(status, response.headers()) {
            ResponseClass::Final(class) => class.outcome,
            ResponseClass::Pending(pending) => classifier.classify_eos(pending, None).outcome,
        };
        self.series
            .response_end(now, status.as_u16(), outcome, route);
        engine.answer(response, client_broken).await
    }
}

/// An attempt in a race: where it went, its in-flight count, and when it went out.
struct Contender {
    addr: SocketAddr,
    in_flight: Option<InFlight>,
    dispatched: Instant,
}

/// What a race needs beside the engine's attempt.
struct Race<'r, C> {
    routed: &'r Routed,
    copy: C,
    delay: Duration,
    retries: &'r mut Retries,
}

/// How a race ended: the attempt whose result it is, and the result.
struct Raced<R> {
    winner: Contender,
    result: Result<Sent<R>, Failed>,
}

/// How a hedge ended.
enum HedgeEnd<R> {
    /// Its response wins.
    Won(Contender, Sent<R>),
    /// It failed and was settled; other attempts are still out.
    Settled,
    /// It failed, and nothing else is out: the race's result, unsettled.
    Last(Contender, Result<Sent<R>, Failed>),
}

/// A hedge's send, tagged with its index in [`Hedges::contenders`].
type TaggedSend<R> = futures_util::future::Map<
    BoxedSend<R>,
    Box<dyn FnOnce(Result<Sent<R>, Failed>) -> (usize, Result<Sent<R>, Failed>) + Send>,
>;

/// The hedges a race sent.
struct Hedges<R> {
    futures: futures_util::stream::FuturesUnordered<TaggedSend<R>>,
    /// By index; taken when the hedge ends.
    contenders: Vec<Option<Contender>>,
}

impl<R> Hedges<R> {
    fn new() -> Self {
        Self {
            futures: futures_util::stream::FuturesUnordered::new(),
            contenders: Vec::new(),
        }
    }

    fn take(&mut self, i: usize) -> Option<Contender> {
        self.contenders.get_mut(i)?.take()
    }
}

/// The error for a deadline that passed (at `addr`, when an attempt was waiting).
impl Routed {
    /// The matched route's fault policy, if it has one.
    fn fault(&self) -> Option<&conduit_core::fault::FaultPolicy> {
        self.profile
            .routes()
            .get(self.route?)?
            .policy
            .fault
            .as_ref()
    }
}

fn expired(expiry: Expiry, addr: Option<SocketAddr>) -> ProxyError {
    match (expiry, addr) {
        (Expiry::Attempt { timeout }, Some(addr)) => ProxyError::AttemptTimeout { addr, timeout },
        (Expiry::Attempt { timeout }, None) => ProxyError::RequestTimeout {
            timeout,
            propagated: false,
        },
        (
            Expiry::Request {
                timeout,
                propagated,
            },
            _,
        ) => ProxyError::RequestTimeout {
            timeout,
            propagated,
        },
    }
}

/// The transport failure an attempt's error stands for, when it is one a retry may cure.
fn transport_error(error: &ProxyError) -> Option<TransportError> {
    match error {
        ProxyError::Connect { .. }
        | ProxyError::ConnectTimeout { .. }
        | ProxyError::Identity { .. }
        | ProxyError::Unmeshed { .. } => Some(TransportError::ConnectRefused),
        ProxyError::ResponseTimeout { .. } | ProxyError::AttemptTimeout { .. } => {
            Some(TransportError::Timeout)
        }
        ProxyError::Upstream { .. } => Some(TransportError::Reset),
        _ => None,
    }
}

/// The `reason` label of `route_retries_total`: what kind of failure was retried.
fn retry_reason(reason: Reason) -> &'static str {
    match reason {
        Reason::HttpStatus(_) => "http_status",
        Reason::GrpcStatus(_) | Reason::GrpcStatusMissing | Reason::GrpcStatusMalformed => {
            "grpc_status"
        }
        Reason::Transport(error) => error.as_str(),
        _ => "other",
    }
}

/// What an attempt's failure tells the balancer.
fn feedback(
    service: Option<&ServiceBalancer>,
    addr: SocketAddr,
    in_flight: Option<&InFlight>,
    error: &ProxyError,
) {
    let Some(service) = service else { return };
    match (in_flight, error) {
        // The endpoint refused the connection or failed its handshake: it backs off. (This
        // proxy's own refusals, `NoIdentity` and `Unmeshed`, say nothing about the endpoint.)
        (
            _,
            ProxyError::Connect { .. }
            | ProxyError::ConnectTimeout { .. }
            | ProxyError::Identity { .. },
        ) => {
            service.connect_failed(addr);
        }
        // PeakEWMA-consistent: an endpoint that did not answer in time looks as slow as the
        // wait, so P2C steers away from it until it answers again.
        (
            Some(in_flight),
            ProxyError::ResponseTimeout { .. }
            | ProxyError::AttemptTimeout { .. }
            | ProxyError::RequestTimeout { .. },
        ) => service.observe(in_flight),
        _ => {}
    }
}

/// Settles a response when it ends, however it ends: its class into the metrics, and the
/// endpoint's in-flight count released. Engines call [`end`](Self::end) (the HTTP/2 engine
/// through the response body's guard).
#[derive(Debug)]
pub(crate) struct Settle {
    series: Arc<AuthorityMetrics>,
    route_label: Option<Arc<str>>,
    profile: Arc<Profile>,
    route: Option<usize>,
    status: u16,
    /// The class as far as the head decided it.
    class: ResponseClass,
    in_flight: Option<InFlight>,
    service: Option<Arc<ServiceBalancer>>,
    clock: Clock,
    deadlines: Deadlines,
    grpc: bool,
    /// The route retries: the response is counted as its request's last attempt too.
    attempted: bool,
}

impl Settle {
    /// The instant the response must have ended by (the request's deadline).
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.deadlines.request()
    }

    /// The request is gRPC (the proxy's own answers are then gRPC errors).
    pub(crate) fn grpc(&self) -> bool {
        self.grpc
    }

    /// The error a response cut at its deadline stands for.
    pub(crate) fn timeout_error(&self) -> ProxyError {
        let expiry = self
            .deadline()
            .and_then(|d| self.deadlines.expiry(d))
            .unwrap_or(Expiry::Request {
                timeout: Duration::ZERO,
                propagated: false,
            });
        expired(expiry, None)
    }

    /// Records how the response ended.
    pub(crate) fn end(self, end: BodyEnd) {
        let classifier = &self.profile.route_at(self.route).policy.classifier;
        let outcome = match (end, self.class) {
            (BodyEnd::Complete { .. }, ResponseClass::Final(class)) => class.outcome,
            (BodyEnd::Complete { trailers }, ResponseClass::Pending(pending)) => {
                classifier.classify_eos(pending, trailers.as_ref()).outcome
            }
            (BodyEnd::Switched, _) => conduit_core::classify::Outcome::Success,
            (BodyEnd::TimedOut, _) => classifier.classify_error(TransportError::Timeout).outcome,
            // A stream that broke supersedes the head's class. The error is boxed past
            // recognition here, so it is counted as a reset: a failure either way.
            (BodyEnd::Error | BodyEnd::Cancelled, _) => {
                classifier.classify_error(TransportError::Reset).outcome
            }
        };
        let now = self.clock.now();
        match (&self.route_label, self.attempted) {
            (Some(route), true) => {
                self.series
                    .response_end_attempted(now, self.status, outcome, route);
            }
            (route, _) => self
                .series
                .response_end(now, self.status, outcome, route.as_ref()),
        }
        // The endpoint's breaker learns the outcome; the request stops counting as in flight.
        if let (Some(service), Some(in_flight)) = (self.service, self.in_flight) {
            service.settle(now, in_flight, outcome);
        }
    }
}

impl OnBodyEnd for Settle {
    fn on_end(self, end: BodyEnd) {
        self.end(end);
    }

    fn deadline(&self) -> Option<Instant> {
        Self::deadline(self)
    }

    fn expired(&self) -> Result<http::HeaderMap, crate::body::BoxError> {
        let error = self.timeout_error();
        if self.grpc {
            Ok(error.to_grpc_trailers())
        } else {
            Err(error.into())
        }
    }
}
