//! Routing and balancing a request, shared by both HTTP engines, and forwarding HTTP/2
//! requests through hyper.
//!
//! Outbound requests are routed by authority through discovery and balanced per request by
//! the core; inbound requests go to the local app. HTTP/1 requests are carried by the proxy's
//! own engine ([`crate::h1`]), which uses [`HttpProxy::route`], [`HttpProxy::pick`] and the
//! failure bookkeeping here; HTTP/2 requests go through hyper ([`HttpProxy::handle`]). Hop-by-hop
//! headers are removed per RFC 9110 §7.6.1, bodies and trailers stream through untouched, and
//! responses from the app pass through whatever their status. Everything the proxy answers
//! itself comes from `errors::respond`.

use std::net::SocketAddr;
use std::sync::Arc;

use conduit_core::balance::{InFlight, Picked};
use conduit_core::classify::{Classifier, ResponseClass, TransportError};
use conduit_core::time::Instant;
use futures_util::FutureExt as _;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{Request, Response, Version};
use hyper::body::Incoming;

use crate::admin::metrics::{AuthorityMetrics, Direction, Metrics};
use crate::balance::{Router, ServiceBalancer};
use crate::body::{self, Body, BodyEnd, GuardedBody, OnBodyEnd};
use crate::clock::Clock;
use crate::errors::ProxyError;
use crate::net::Net;
use crate::pool::{Failed, Pools};

/// Attempts for a request that failed before any of it was processed (refused connect, an h2
/// connection that closed first, a stream the server refused): the first and at most two more.
/// A draining endpoint can fail one request twice (its GOAWAY refuses the stream, then its
/// closed listener refuses the connect) before the balancer takes it out of rotation; beyond
/// that the service is broadly unreachable and the error is the answer.
pub(crate) const MAX_ATTEMPTS_UNSENT: u32 = 3;

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

/// A routed request: the metrics series its response goes into, and the service that
/// balances it (`None` inbound).
pub(crate) type Routed = (Arc<AuthorityMetrics>, Option<Arc<ServiceBalancer>>);

impl<N: Net> HttpProxy<N> {
    /// Routes a request for `authority` that arrived at `start`: counts it, and waits
    /// (bounded by the fail-fast timeout) until discovery has answered for its service.
    ///
    /// # Errors
    ///
    /// The error to answer with, and the series to count the answer in.
    pub(crate) async fn route(
        &self,
        authority: Option<&str>,
        start: Instant,
    ) -> Result<Routed, (Arc<AuthorityMetrics>, ProxyError)> {
        let counted = |authority: &str| self.metrics.request(self.direction, authority, start);
        let router = match (&self.target, authority) {
            (Target::Fixed(_), authority) => return Ok((counted(authority.unwrap_or("")), None)),
            (Target::Balanced(_), None) => {
                let err = ProxyError::Malformed {
                    reason: "missing authority (Host header)".into(),
                };
                return Err((counted(UNKNOWN_AUTHORITY), err));
            }
            (Target::Balanced(router), Some(authority)) => (router, authority),
        };
        let (router, authority) = router;
        let service = match router.resolve(authority, start) {
            Ok(service) => service,
            Err(err) => return Err((counted(UNKNOWN_AUTHORITY), err)),
        };
        match service.resolved(start).await {
            Ok(label) => Ok((counted(&label), Some(service))),
            // Unresolved authorities share one label, so arbitrary names cannot grow the
            // metrics.
            Err(err) => Err((counted(UNKNOWN_AUTHORITY), err)),
        }
    }

    /// The endpoint for an attempt: `repicked` if a retry already chose one, else the
    /// balancer's pick (waiting in its queue), else the fixed target.
    pub(crate) async fn pick(
        &self,
        service: Option<&Arc<ServiceBalancer>>,
        repicked: Option<Picked>,
        now: Instant,
    ) -> Result<(SocketAddr, Option<InFlight>), ProxyError> {
        match (&self.target, service, repicked) {
            (_, Some(_), Some(picked)) => Ok((picked.addr, Some(picked.in_flight))),
            (_, Some(service), None) => {
                let picked = service.acquire(now).await?;
                Ok((picked.addr, Some(picked.in_flight)))
            }
            (Target::Fixed(addr), None, _) => Ok((*addr, None)),
            (Target::Balanced(_), None, _) => Err(ProxyError::Unavailable {
                reason: "no service for request".into(),
            }),
        }
    }

    /// What an attempt's failure tells the balancer.
    pub(crate) fn failed(
        &self,
        service: Option<&Arc<ServiceBalancer>>,
        addr: SocketAddr,
        in_flight: Option<&InFlight>,
        error: &ProxyError,
    ) {
        match (service, in_flight, error) {
            (Some(service), _, ProxyError::Connect { .. } | ProxyError::ConnectTimeout { .. }) => {
                service.connect_failed(addr);
            }
            // PeakEWMA-consistent: an endpoint that did not answer in time looks as slow as
            // the wait, so P2C steers away from it until it answers again.
            (Some(service), Some(in_flight), ProxyError::ResponseTimeout { .. }) => {
                service.observe(in_flight);
            }
            _ => {}
        }
    }

    /// Another endpoint for a request `addr` never processed (connect refused or timed out, an
    /// h2 connection that closed before the stream opened, a stream the server refused, a
    /// reused HTTP/1.1 connection the server had closed): safe to send again whatever its
    /// method, to an endpoint the balancer offers right now (one backing off is not offered).
    /// It never waits in the queue a second time: with no endpoint ready, the error is the
    /// answer at once.
    pub(crate) fn retry(
        &self,
        service: Option<&Arc<ServiceBalancer>>,
        attempts: u32,
        error: &ProxyError,
        addr: SocketAddr,
    ) -> Option<Picked> {
        let service = service?;
        if attempts >= MAX_ATTEMPTS_UNSENT {
            return None;
        }
        let picked = service.acquire(self.clock.now()).now_or_never()?.ok()?;
        tracing::debug!(endpoint = %addr, %error, next = %picked.addr, "request not processed; sending it again");
        Some(picked)
    }

    /// Serves one HTTP/2 request; never fails (errors become responses).
    pub(crate) async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Response<Body> {
        let start = self.clock.now();
        let grpc = is_grpc(request.headers());
        let authority = request_authority(&request);
        let routed = self
            .route(authority.as_ref().map(Authority::as_str), start)
            .await;
        let (series, service) = match routed {
            Ok(routed) => routed,
            Err((series, err)) => return self.synthesize(&err, &series, start, grpc, false),
        };
        match self
            .forward(request, authority, service, &series, start)
            .await
        {
            Ok(response) => response,
            Err(err) => {
                tracing::debug!(error = %err, "proxy error");
                self.synthesize(&err, &series, start, grpc, false)
            }
        }
    }

    /// The proxy's own response for `err`, counted and classified like any other.
    pub(crate) fn synthesize(
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
        request: Request<Incoming>,
        authority: Option<Authority>,
        service: Option<Arc<ServiceBalancer>>,
        series: &Arc<AuthorityMetrics>,
        start: Instant,
    ) -> Result<Response<Body>, ProxyError> {
        let mut request = prepare_request(request, authority.as_ref())?;
        let service = service.as_ref();
        let mut attempts = 0;
        let mut repicked: Option<Picked> = None;
        let (addr, in_flight, sent) = loop {
            attempts += 1;
            let (addr, in_flight) = self.pick(service, repicked.take(), start).await?;
            let Failed { error, unsent } = match self.pools.send(addr, request).await {
                Ok(sent) => break (addr, in_flight, sent),
                Err(failed) => failed,
            };
            self.failed(service, addr, in_flight.as_ref(), &error);
            // The endpoint's load settles before another pick.
            drop(in_flight);
            let Some(unsent) = unsent else {
                return Err(error);
            };
            match self.retry(service, attempts, &error, addr) {
                Some(picked) => {
                    repicked = Some(picked);
                    request = unsent;
                }
                None => return Err(error),
            }
        };
        if let Some(service) = service {
            if sent.connected {
                service.connect_succeeded(addr);
            }
            if let Some(in_flight) = &in_flight {
                service.observe(in_flight);
            }
        }
        let response = sent.response;
        let status = response.status();
        let now = self.clock.now();
        let latency = now.saturating_duration_since(start);
        series.response_headers(now, status.as_u16(), latency);
        tracing::trace!(endpoint = %addr, status = status.as_u16(), ?latency, "response headers");

        let (mut parts, incoming) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let class = self.classifier.classify_response(status, &parts.headers);
        let guard = ResponseGuard {
            series: Arc::clone(series),
            clock: self.clock,
            status: status.as_u16(),
            classifier: Arc::clone(&self.classifier),
            class,
            in_flight,
        };
        let body = GuardedBody::new(incoming, guard);
        Ok(Response::from_parts(parts, body::boxed(body)))
    }
}

/// Settles a forwarded HTTP/2 response when its body ends: metrics and the endpoint's
/// in-flight count.
struct ResponseGuard {
    series: Arc<AuthorityMetrics>,
    clock: Clock,
    status: u16,
    classifier: Arc<Classifier>,
    /// The class as far as the head decided it.
    class: ResponseClass,
    in_flight: Option<InFlight>,
}

impl OnBodyEnd for ResponseGuard {
    fn on_end(self, end: BodyEnd) {
        let outcome = match (end, self.class) {
            (BodyEnd::Complete { .. }, ResponseClass::Final(class)) => class.outcome,
            (BodyEnd::Complete { trailers }, ResponseClass::Pending(pending)) => {
                self.classifier
                    .classify_eos(pending, trailers.as_ref())
                    .outcome
            }
            // A stream that broke supersedes the head's class. The body error is boxed past
            // recognition here, so it is counted as a reset: a failure either way.
            (BodyEnd::Error | BodyEnd::Cancelled, _) => {
                self.classifier
                    .classify_error(TransportError::Reset)
                    .outcome
            }
        };
        self.series
            .response_end(self.clock.now(), self.status, outcome);
        drop(self.in_flight);
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

/// Removes hop-by-hop fields (RFC 9110 §7.6.1): `Connection` and every field it names,
/// `Keep-Alive`, `Proxy-Connection`, `Transfer-Encoding`, `Upgrade`, and `TE` except
/// `TE: trailers`, which gRPC needs end to end.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none of these fields. One pass over the few names present is far
    // cheaper than the hashed lookups below, which every request and response would otherwise
    // pay twice.
    if !headers.keys().any(is_hop_by_hop) {
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
        if name != header::TE {
            headers.remove(name);
        }
    }
    headers.remove(header::CONNECTION);
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    headers.remove(header::TRANSFER_ENCODING);
    headers.remove(header::UPGRADE);
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

/// Rewrites the client's HTTP/2 request for the upstream connection.
fn prepare_request(
    request: Request<Incoming>,
    authority: Option<&Authority>,
) -> Result<Request<Body>, ProxyError> {
    let (mut parts, incoming) = request.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
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
    // A request that has no body (most do not) gets the empty body, which boxes without an
    // allocation; the client's `Incoming` would cost one per request for nothing to forward.
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
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h[header::TE], "trailers");
        assert_eq!(h["x-app"], "kept");
    }
}
