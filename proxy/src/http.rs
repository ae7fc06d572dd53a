//! Forwarding one HTTP request: route, balance, send, and settle.
//!
//! Shared by both directions: outbound requests are routed by authority through discovery and
//! balanced per request by the core; inbound requests go to the local app. Hop-by-hop headers
//! are removed per RFC 9110 §7.6.1, HTTP/1.1 upgrades (WebSocket) are tunnelled, bodies and
//! trailers stream through untouched, and responses from the app pass through whatever their
//! status. Everything the proxy answers itself comes from `errors::respond`.

use std::net::SocketAddr;
use std::sync::Arc;

use conduit_core::balance::{InFlight, Picked};
use conduit_core::classify::{Classifier, Outcome, ResponseClass, TransportError};
use conduit_core::time::Instant;
use futures_util::FutureExt as _;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::admin::metrics::{AuthorityMetrics, Direction, Metrics};
use crate::balance::{Router, ServiceBalancer};
use crate::body::{self, Body, BodyEnd, GuardedBody, OnBodyEnd};
use crate::clock::Clock;
use crate::errors::ProxyError;
use crate::net::Net;
use crate::pool::{Checkin, Failed, Pools, Proto};
use crate::transport::ActivityIo;

/// Attempts for a request that failed before any of it was processed (refused connect, an h2
/// connection that closed first, a stream the server refused): the first and at most two more.
/// A draining endpoint can fail one request twice (its GOAWAY refuses the stream, then its
/// closed listener refuses the connect) before the balancer takes it out of rotation; beyond
/// that the service is broadly unreachable and the error is the answer.
const MAX_ATTEMPTS_UNSENT: u32 = 3;

/// The `authority` label for outbound requests discovery does not know.
const UNKNOWN_AUTHORITY: &str = "unknown";

/// Where requests go.
#[derive(Debug)]
pub(crate) enum Target {
    /// Routed by authority and balanced (outbound).
    Balanced(Arc<Router>),
    /// Always this address (inbound: the local app).
    Fixed(SocketAddr),
}

/// One direction's HTTP forwarding.
#[derive(Debug)]
pub(crate) struct HttpProxy<N: Net> {
    pub(crate) direction: Direction,
    pub(crate) pools: Arc<Pools<N>>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) clock: Clock,
    pub(crate) target: Target,
    /// Response classes (success or failure) for metrics: the core's, Linkerd's defaults.
    pub(crate) classifier: Arc<Classifier>,
}

impl<N: Net> HttpProxy<N> {
    /// Serves one request from a client speaking `proto`; never fails (errors become responses).
    pub(crate) async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        proto: Proto,
    ) -> Response<Body> {
        let start = self.clock.now();
        let grpc = is_grpc(request.headers());
        let http1 = proto == Proto::Http1;
        let authority = request_authority(&request);
        let span = tracing::trace_span!(
            "request",
            method = %request.method(),
            authority = authority.as_ref().map_or("", Authority::as_str),
            path = request.uri().path(),
        );
        let routed = {
            let _entered = span.enter();
            match (&self.target, &authority) {
                (Target::Balanced(router), Some(authority)) => {
                    Some(router.resolve(authority.as_str(), start))
                }
                _ => None,
            }
        };
        let counted = |authority: &str| self.metrics.request(self.direction, authority, start);
        let (series, service) = match (&self.target, &authority, routed) {
            (Target::Balanced(_), None, _) => {
                let series = counted(UNKNOWN_AUTHORITY);
                let err = ProxyError::Malformed {
                    reason: "missing authority (Host header)".into(),
                };
                return self.synthesize(&err, &series, start, grpc, http1);
            }
            (Target::Balanced(_), Some(_), Some(Ok(service))) => {
                // Waits (bounded by the fail-fast timeout) until discovery has answered.
                match service.resolved(start).await {
                    Ok(label) => (counted(&label), Some(service)),
                    Err(err) => {
                        // Unresolved authorities share one label, so arbitrary names cannot
                        // grow the metrics.
                        let series = counted(UNKNOWN_AUTHORITY);
                        return self.synthesize(&err, &series, start, grpc, http1);
                    }
                }
            }
            (Target::Balanced(_), Some(_), Some(Err(err))) => {
                let series = counted(UNKNOWN_AUTHORITY);
                return self.synthesize(&err, &series, start, grpc, http1);
            }
            (Target::Balanced(_), Some(_), None) => {
                let err = ProxyError::Unavailable {
                    reason: "no route for request".into(),
                };
                let series = counted(UNKNOWN_AUTHORITY);
                return self.synthesize(&err, &series, start, grpc, http1);
            }
            (Target::Fixed(_), authority, _) => (
                counted(authority.as_ref().map_or("", Authority::as_str)),
                None,
            ),
        };
        match self
            .forward(request, proto, authority, service, &series, start)
            .await
        {
            Ok(response) => response,
            Err(err) => {
                tracing::debug!(error = %err, "proxy error");
                self.synthesize(&err, &series, start, grpc, http1)
            }
        }
    }

    fn synthesize(
        &self,
        err: &ProxyError,
        series: &AuthorityMetrics,
        start: Instant,
        grpc: bool,
        http1: bool,
    ) -> Response<Body> {
        let response = err.to_response(grpc, http1);
        let status = response.status().as_u16();
        let now = self.clock.now();
        let latency = now.saturating_duration_since(start);
        series.response_headers(now, status, latency);
        // Classified like any response (Linkerd's default classes): 5xx and non-OK gRPC
        // statuses are failures; the proxy's 400/404/431 blame the client, as an app's would.
        // A synthesized gRPC response is trailers-only, so its head decides.
        let outcome = match self
            .classifier
            .classify_response(response.status(), response.headers())
        {
            ResponseClass::Final(class) => class.outcome,
            ResponseClass::Pending(pending) => self.classifier.classify_eos(pending, None).outcome,
        };
        series.response_end(now, status, outcome);
        response
    }

    async fn forward(
        &self,
        mut request: Request<Incoming>,
        proto: Proto,
        authority: Option<Authority>,
        service: Option<Arc<ServiceBalancer>>,
        series: &Arc<AuthorityMetrics>,
        start: Instant,
    ) -> Result<Response<Body>, ProxyError> {
        let upgrade = proto == Proto::Http1 && is_upgrade(request.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));
        let mut request = prepare_request(request, proto, authority.as_ref(), upgrade)?;

        let mut attempts = 0;
        let mut repicked: Option<Picked> = None;
        let (addr, in_flight, sent) = loop {
            attempts += 1;
            let (addr, in_flight) = match (&self.target, &service, repicked.take()) {
                (_, Some(_), Some(picked)) => (picked.addr, Some(picked.in_flight)),
                (_, Some(service), None) => {
                    let picked = service.acquire().await?;
                    (picked.addr, Some(picked.in_flight))
                }
                (Target::Fixed(addr), None, _) => (*addr, None),
                (Target::Balanced(_), None, _) => {
                    return Err(ProxyError::Unavailable {
                        reason: "no service for request".into(),
                    });
                }
            };
            let Failed { error, unsent } =
                match self.pools.send(addr, proto, request, upgrade).await {
                    Ok(sent) => break (addr, in_flight, sent),
                    Err(failed) => failed,
                };
            match (&service, &in_flight, &error) {
                (
                    Some(service),
                    _,
                    ProxyError::Connect { .. } | ProxyError::ConnectTimeout { .. },
                ) => service.connect_failed(addr),
                // PeakEWMA-consistent: an endpoint that did not answer in time looks as slow
                // as the wait, so P2C steers away from it until it answers again.
                (Some(service), Some(in_flight), ProxyError::ResponseTimeout { .. }) => {
                    service.observe(in_flight);
                }
                _ => {}
            }
            // The endpoint's load settles before another pick.
            drop(in_flight);
            // The endpoint never processed the request (connect refused or timed out, an h2
            // connection that closed before the stream opened, a stream the server refused), so
            // it is safe to send again whatever its method: to an endpoint the balancer offers
            // right now (one backing off is not offered). It never waits in the queue a second
            // time: with no other endpoint ready, the error is the answer at once.
            let (Some(unsent), Some(service)) = (unsent, &service) else {
                return Err(error);
            };
            if attempts >= MAX_ATTEMPTS_UNSENT {
                return Err(error);
            }
            match service.acquire().now_or_never() {
                Some(Ok(picked)) => {
                    tracing::debug!(endpoint = %addr, %error, next = %picked.addr, "request not processed; sending it again");
                    repicked = Some(picked);
                    request = unsent;
                }
                _ => return Err(error),
            }
        };
        if let Some(service) = &service {
            if sent.connected {
                service.connect_succeeded(addr);
            }
            if let Some(in_flight) = &in_flight {
                service.observe(in_flight);
            }
        }
        let mut response = sent.response;
        let status = response.status();
        let now = self.clock.now();
        let latency = now.saturating_duration_since(start);
        series.response_headers(now, status.as_u16(), latency);
        tracing::trace!(endpoint = %addr, status = status.as_u16(), ?latency, "response headers");

        if let Some(client_upgrade) = client_upgrade
            && status == StatusCode::SWITCHING_PROTOCOLS
        {
            {
                let server_upgrade = hyper::upgrade::on(&mut response);
                let idle = self.pools.limits().idle_timeout;
                tokio::spawn(tunnel(
                    client_upgrade,
                    server_upgrade,
                    addr,
                    self.clock,
                    idle,
                ));
                // A completed upgrade is the response the client asked for.
                series.response_end(now, status.as_u16(), Outcome::Success);
                let (parts, _) = response.into_parts();
                return Ok(Response::from_parts(parts, body::empty()));
            }
        }

        let (mut parts, incoming) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers, false);
        let class = self.classifier.classify_response(status, &parts.headers);
        let guard = ResponseGuard {
            series: Arc::clone(series),
            clock: self.clock,
            status: status.as_u16(),
            classifier: Arc::clone(&self.classifier),
            class,
            in_flight,
            checkin: sent.checkin,
        };
        let body = GuardedBody::new(incoming, guard);
        Ok(Response::from_parts(parts, body::boxed(body)))
    }
}

/// Settles a forwarded response when its body ends: metrics, the endpoint's in-flight count,
/// and the connection's return to the pool.
struct ResponseGuard {
    series: Arc<AuthorityMetrics>,
    clock: Clock,
    status: u16,
    classifier: Arc<Classifier>,
    /// The class as far as the head decided it.
    class: ResponseClass,
    in_flight: Option<InFlight>,
    checkin: Option<Checkin>,
}

impl OnBodyEnd for ResponseGuard {
    fn on_end(self, end: BodyEnd) {
        let (outcome, reuse) = match (end, self.class) {
            (BodyEnd::Complete { .. }, ResponseClass::Final(class)) => (class.outcome, true),
            (BodyEnd::Complete { trailers }, ResponseClass::Pending(pending)) => {
                let class = self.classifier.classify_eos(pending, trailers.as_ref());
                (class.outcome, true)
            }
            // A stream that broke supersedes the head's class. The body error is boxed past
            // recognition here, so it is counted as a reset: a failure either way.
            (BodyEnd::Error | BodyEnd::Cancelled, _) => (
                self.classifier
                    .classify_error(TransportError::Reset)
                    .outcome,
                false,
            ),
        };
        self.series
            .response_end(self.clock.now(), self.status, outcome);
        drop(self.in_flight);
        if reuse && let Some(checkin) = self.checkin {
            checkin.checkin();
        }
    }
}

/// Carries an upgraded connection (WebSocket) both ways until either side closes, or no byte
/// has moved either way for `idle` (the accepted-connection idle timeout, as for opaque TCP):
/// a tunnel to a vanished peer must not hold its sockets forever.
async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    server: hyper::upgrade::OnUpgrade,
    addr: SocketAddr,
    clock: Clock,
    idle: std::time::Duration,
) {
    let (client, server) = match tokio::try_join!(client, server) {
        Ok(upgraded) => upgraded,
        Err(err) => {
            tracing::debug!(endpoint = %addr, error = %err, "upgrade failed");
            return;
        }
    };
    let mut client = ActivityIo::new(TokioIo::new(client), clock);
    let activity = client.activity();
    let mut server = TokioIo::new(server);
    let watchdog = async {
        loop {
            clock.sleep_until(activity.last(clock) + idle).await;
            if clock.now().saturating_duration_since(activity.last(clock)) >= idle {
                return;
            }
        }
    };
    tokio::select! {
        result = tokio::io::copy_bidirectional(&mut client, &mut server) => match result {
            Ok((up, down)) => tracing::debug!(endpoint = %addr, up, down, "upgrade tunnel closed"),
            Err(err) => tracing::debug!(endpoint = %addr, error = %err, "upgrade tunnel failed"),
        },
        () = watchdog => tracing::debug!(endpoint = %addr, ?idle, "upgrade tunnel idle; closing"),
    }
}

/// Whether the request is gRPC (`content-type: application/grpc` or `application/grpc+...`).
pub(crate) fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// The request's authority: the URI's (absolute-form or h2 `:authority`), else `Host`.
fn request_authority(request: &Request<Incoming>) -> Option<Authority> {
    if let Some(authority) = request.uri().authority() {
        return Some(authority.clone());
    }
    let host = request.headers().get(header::HOST)?.to_str().ok()?;
    host.parse().ok()
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// Removes hop-by-hop fields (RFC 9110 §7.6.1): `Connection` and every field it names,
/// `Keep-Alive`, `Proxy-Connection`, `Transfer-Encoding`, `Upgrade` (kept when tunnelling an
/// upgrade), and `TE` except `TE: trailers`, which gRPC needs end to end.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // Most messages carry none of these fields (keep-alive is HTTP/1.1's default). One pass
    // over the few names present is far cheaper than the hashed lookups below, which every
    // request and response would otherwise pay twice.
    if !upgrade && !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    for name in named {
        if !(upgrade && name == header::UPGRADE) && name != header::TE {
            headers.remove(name);
        }
    }
    headers.remove(header::CONNECTION);
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    headers.remove(header::TRANSFER_ENCODING);
    let te_trailers = headers
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    headers.remove(header::TE);
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// Whether `name` is one of the fixed hop-by-hop fields. Fields named by `Connection` are
/// hop-by-hop too, but only when `Connection` itself is present, which this catches.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TE
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        // No constants in `http::header`; names are stored lower-case.
        || matches!(name.as_str(), "keep-alive" | "proxy-connection")
}

/// Rewrites the client's request for the upstream connection.
fn prepare_request(
    request: Request<Incoming>,
    proto: Proto,
    authority: Option<&Authority>,
    upgrade: bool,
) -> Result<Request<Body>, ProxyError> {
    let (mut parts, incoming) = request.into_parts();
    strip_hop_by_hop(&mut parts.headers, upgrade);
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    match proto {
        Proto::Http1 => {
            if parts.method != http::Method::CONNECT && parts.uri.authority().is_some() {
                // Absolute-form from the client: origin-form upstream, authority in Host.
                if let Some(authority) = authority
                    && let Ok(host) = HeaderValue::from_str(authority.as_str())
                {
                    parts.headers.insert(header::HOST, host);
                }
                parts.uri = Uri::from(path);
            }
            if parts.version != Version::HTTP_10 {
                parts.version = Version::HTTP_11;
            }
        }
        Proto::Http2 => {
            let Some(authority) = authority else {
                return Err(ProxyError::Malformed {
                    reason: "missing :authority".into(),
                });
            };
            let scheme = parts.uri.scheme().cloned().unwrap_or(Scheme::HTTP);
            parts.uri = Uri::builder()
                .scheme(scheme)
                .authority(authority.clone())
                .path_and_query(path)
                .build()
                .map_err(|err| ProxyError::Malformed {
                    reason: err.to_string(),
                })?;
            parts.version = Version::HTTP_2;
        }
    }
    // A request that has no body (most do not) gets the empty body, which boxes without an
    // allocation; the client's `Incoming` would cost one per request for nothing to forward.
    // Both are at their end and say so, so the upstream request is framed the same way.
    let body = if http_body::Body::is_end_stream(&incoming) {
        body::empty()
    } else {
        body::boxed(incoming)
    };
    Ok(Request::from_parts(parts, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_fields_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers, deflate"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-app", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h[header::TE], "trailers");
        assert_eq!(h["x-app"], "kept");
    }

    #[test]
    fn upgrades_keep_their_fields() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h[header::CONNECTION], "upgrade");
    }
}
