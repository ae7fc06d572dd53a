//! The HTTP/2 engine: h2 serves the client's connection ([`conn::serve`], every stream on the
//! connection's task), and each request goes through the one request path ([`Exchange`]) with
//! this module moving its bytes: the request (and a copy
//! of its body, within the replay limit) to an endpoint's shared HTTP/2 connection, the
//! response back with a body that settles the exchange when it ends.
//!
//! Hop-by-hop fields are removed per RFC 9110 §7.6.1, bodies and trailers stream through
//! untouched, and responses from the app pass through whatever their status. A request is
//! routed and forwarded by its `:authority`; a `host` field that says otherwise is dropped, so
//! the upstream sees the authority the request was routed by.

use std::net::SocketAddr;
use std::sync::Arc;

use conduit_core::route::RequestView;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{Request, Response, Version};

use crate::body::{self, Body, BodyEnd, GuardedBody, Recorded};
use crate::clock::Clock;
use crate::errors::ProxyError;
use crate::exchange::{
    self, Attempt, BoxedSend, Engine, Exchange, Facts, Failed, RequestCopy, Sent, Settle,
};
use crate::fault_points::FaultPoint;
use crate::net::Net;
use crate::pool::Pools;
use crate::pool::h2::H2Failed;

pub(crate) mod client;
pub(crate) mod conn;
pub(crate) mod server;

use client::{RecvBody, RequestHead};
use server::RequestBody;

const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// One direction's HTTP/2 requests.
#[derive(Debug)]
pub(crate) struct H2Service<N: Net> {
    pub(crate) cx: Arc<exchange::Context>,
    pub(crate) pools: Arc<Pools<N>>,
}

impl<N: Net> H2Service<N> {
    /// Serves one HTTP/2 request that came on a connection headed for `original_dst` before a
    /// redirect sent it to the proxy; never fails (errors become responses).
    pub(crate) async fn handle(
        self: Arc<Self>,
        request: Request<RequestBody>,
        original_dst: Option<SocketAddr>,
    ) -> Response<Body> {
        let start = self.cx.clock.now();
        let (parts, incoming) = request.into_parts();
        let mut exchange = Exchange::begin(&self.cx, &H2Head(&parts), start, original_dst).await;
        let mut engine = H2Exchange::new(&self.pools, self.cx.clock, parts, incoming);
        exchange.forward(&mut engine).await
    }
}

/// A request head as the exchange reads it.
struct H2Head<'a>(&'a Parts);

impl RequestView for H2Head<'_> {
    fn method(&self) -> &[u8] {
        self.0.method.as_str().as_bytes()
    }

    fn path(&self) -> &[u8] {
        self.0.uri.path().as_bytes()
    }

    fn any_header(&self, name: &HeaderName, matches: &mut dyn FnMut(&[u8]) -> bool) -> bool {
        self.0
            .headers
            .get_all(name)
            .iter()
            .any(|value| matches(value.as_bytes()))
    }
}

impl exchange::Head for H2Head<'_> {
    fn authority(&self) -> Option<&str> {
        match self.0.uri.authority() {
            Some(authority) => Some(authority.as_str()),
            None => self.0.headers.get(header::HOST)?.to_str().ok(),
        }
    }

    fn grpc(&self) -> bool {
        self.0
            .headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| conduit_core::classify::is_grpc_content_type(v.as_bytes()))
    }

    fn grpc_timeout(&self) -> Option<&[u8]> {
        self.0.headers.get(GRPC_TIMEOUT).map(HeaderValue::as_bytes)
    }
}

/// The HTTP/2 engine's side of one exchange.
struct H2Exchange<'p, N: Net> {
    pools: &'p Arc<Pools<N>>,
    clock: Clock,
    /// The head as forwarded, or why it cannot be.
    head: Result<Parts, Option<ProxyError>>,
    /// The client's body, until an attempt takes it (or gets it back unsent).
    body: Option<Body>,
    /// The request has no body.
    empty: bool,
    /// The body has been wrapped to keep a copy.
    recording: bool,
    /// The copy of the body sent so far, while it fits the replay limit.
    recorded: Option<Recorded>,
    /// The response head of the last attempt, kept here and not moved through the exchange
    /// (see [`H2Received`]).
    response: Option<Response<RecvBody>>,
}

/// A response head the engine holds (in [`H2Exchange`]'s `response`). The head and its body
/// handle are some 150 bytes, and the exchange kept each value it moved through its own
/// future at a new place: five copies a request into memory that is cold once thousands of
/// requests are in flight (some fifteen cache misses a request at 1,000 connections, under
/// callgrind's cache model). The HTTP/1 engine does the same with its own head.
#[derive(Debug)]
pub(crate) struct H2Received;

impl<'p, N: Net> H2Exchange<'p, N> {
    fn new(pools: &'p Arc<Pools<N>>, clock: Clock, parts: Parts, incoming: RequestBody) -> Self {
        // A request that has no body (most do not) gets the empty body, which boxes without
        // an allocation; the client's stream would cost one per request for nothing.
        let empty = http_body::Body::is_end_stream(&incoming);
        // An upload that stops moving fails after the idle timeout, as on HTTP/1.
        let body = if empty {
            body::empty()
        } else {
            body::boxed(body::IdleBody::new(
                incoming,
                pools.limits.idle_timeout,
                clock,
            ))
        };
        Self {
            pools,
            clock,
            head: prepare(parts).map_err(Some),
            body: Some(body),
            empty,
            recording: false,
            recorded: None,
            response: None,
        }
    }

    /// The body for the next attempt: the client's (kept while it fits the replay limit), or
    /// the kept copy again.
    fn take_body(&mut self) -> Option<Body> {
        if self.empty {
            return Some(body::empty());
        }
        if let Some(body) = self.body.take() {
            if self.recording {
                return Some(body);
            }
            self.recording = true;
            let limit = self.pools.limits.replay_body_limit;
            // A body known to be larger than the limit could never be replayed: no copy.
            let fits = http_body::Body::size_hint(&body).lower()
                <= u64::try_from(limit).unwrap_or(u64::MAX);
            if limit == 0 || !fits {
                return Some(body);
            }
            let (body, recorded) = body::recording(body, limit);
            self.recorded = Some(recorded);
            return Some(body);
        }
        self.recorded.as_ref().and_then(Recorded::replay)
    }
}

impl<N: Net> Engine for H2Exchange<'_, N> {
    type Response = H2Received;
    type Output = Response<Body>;
    const HTTP1: bool = false;

    async fn send(&mut self, attempt: &Attempt) -> Result<Sent<H2Received>, Failed> {
        if let Err(err) = &mut self.head {
            return Err(Failed::new(err.take().unwrap_or(ProxyError::Malformed {
                reason: "invalid request".into(),
            })));
        }
        let Some(body) = self.take_body() else {
            // The exchange sends again only whole requests.
            return Err(Failed::new(ProxyError::Unavailable {
                reason: "request body cannot be sent again".into(),
            }));
        };
        let Ok(head) = &mut self.head else {
            unreachable!("checked above")
        };
        if let Some(value) = attempt.grpc_timeout
            && let Ok(value) = HeaderValue::from_bytes(value.as_bytes())
        {
            head.headers.insert(GRPC_TIMEOUT, value);
        }
        // The head is encoded from here when the stream opens, and stays to be sent again
        // if the server refuses the stream unprocessed: no copy.
        let head = RequestHead {
            method: &head.method,
            uri: &head.uri,
            headers: &head.headers,
        };
        match self
            .pools
            .send_h2(attempt.addr, head, body, attempt.deadline)
            .await
        {
            Ok(sent) if crate::fault_points::fire(FaultPoint::StreamReset) => {
                // Dropping the response resets its stream.
                drop(sent);
                Err(Failed::new(ProxyError::Upstream {
                    addr: attempt.addr,
                    source: "fault point: the stream was reset after its response head".into(),
                }))
            }
            // The copy of the body stays until the exchange decides whether to retry.
            Ok(sent) => {
                self.response = Some(sent.response);
                Ok(Sent {
                    response: H2Received,
                    connected: sent.connected,
                })
            }
            Err(H2Failed { failed, unsent }) => {
                if let Some(unsent) = unsent {
                    self.body = Some(unsent);
                }
                Err(failed)
            }
        }
    }

    fn replayable(&self) -> bool {
        self.empty || self.body.is_some() || self.recorded.as_ref().is_some_and(Recorded::complete)
    }

    fn discard(&mut self, _: H2Received) {
        // Dropping the body resets the stream; the connection carries on.
        self.response = None;
    }

    fn facts<'a>(&'a self, _: &'a H2Received) -> Facts<'a> {
        match &self.response {
            Some(response) => facts(response),
            None => Facts::NO_HEAD,
        }
    }

    async fn respond(&mut self, _: H2Received, settle: Settle) -> Response<Body> {
        // The caller gets this response: nobody sends the request again.
        self.recorded = None;
        let Some(response) = self.response.take() else {
            // `respond` follows a successful `send`.
            let grpc = settle.grpc();
            settle.end(BodyEnd::Error);
            return ProxyError::Unavailable {
                reason: "no response head to forward".into(),
            }
            .to_response(grpc, false);
        };
        let (mut parts, incoming) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let body = GuardedBody::new(
            incoming,
            settle,
            self.clock,
            Some(self.pools.limits.idle_timeout),
        );
        // The upstream stream counts as open (for the pool's choice of connection) until the
        // body the client reads is dropped: the body holds the pool's guard.
        Response::from_parts(parts, body::boxed(body))
    }

    async fn answer(&mut self, response: Response<Body>, _client_broken: bool) -> Response<Body> {
        response
    }

    type Copy = H2Copy<N>;

    async fn copy(&mut self) -> Option<H2Copy<N>> {
        let head = self.head.as_ref().ok()?;
        let body = if self.empty {
            None
        } else if self.recording {
            // An attempt already took the body: only its kept copy can go again.
            Some(self.recorded.clone()?)
        } else {
            // Kept from the start, so a hedge can send it once it is whole.
            let body = self.body.take()?;
            self.recording = true;
            let limit = self.pools.limits.replay_body_limit;
            let fits = http_body::Body::size_hint(&body).lower()
                <= u64::try_from(limit).unwrap_or(u64::MAX);
            if limit == 0 || !fits {
                self.body = Some(body);
                return None;
            }
            let (body, recorded) = body::recording(body, limit);
            self.body = Some(body);
            self.recorded = Some(recorded.clone());
            Some(recorded)
        };
        Some(H2Copy {
            pools: Arc::clone(self.pools),
            method: head.method.clone(),
            uri: head.uri.clone(),
            headers: head.headers.clone(),
            body,
        })
    }

    fn adopt(&mut self, response: Response<RecvBody>) -> H2Received {
        self.response = Some(response);
        H2Received
    }
}

/// The facts of an HTTP/2 response head.
fn facts(response: &Response<RecvBody>) -> Facts<'_> {
    let headers = response.headers();
    let grpc = headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| conduit_core::classify::is_grpc_content_type(v.as_bytes()));
    Facts {
        status: response.status(),
        grpc,
        // Read only for gRPC, whose classification it decides (a hashed lookup saved on every
        // other response).
        grpc_status: grpc
            .then(|| headers.get(GRPC_STATUS).map(HeaderValue::as_bytes))
            .flatten(),
    }
}

/// A copy of an HTTP/2 request for hedges: its head as forwarded, and its body's kept copy.
pub(crate) struct H2Copy<N: Net> {
    pools: Arc<Pools<N>>,
    method: http::Method,
    uri: Uri,
    headers: HeaderMap,
    /// `None`: the request has no body.
    body: Option<Recorded>,
}

impl<N: Net> RequestCopy for H2Copy<N> {
    type Response = Response<RecvBody>;

    fn whole(&self) -> Option<bool> {
        match &self.body {
            None => Some(true),
            Some(recorded) => recorded.whole(),
        }
    }

    fn send(&self, attempt: Attempt) -> BoxedSend<Response<RecvBody>> {
        let body = match &self.body {
            None => body::empty(),
            Some(recorded) => match recorded.replay() {
                Some(body) => body,
                None => {
                    return Box::pin(std::future::ready(Err(Failed::new(
                        ProxyError::Unavailable {
                            reason: "request body cannot be sent again".into(),
                        },
                    ))));
                }
            },
        };
        // A hedge's future outlives this borrow: it owns its copy of the head.
        let method = self.method.clone();
        let uri = self.uri.clone();
        let mut headers = self.headers.clone();
        if let Some(value) = attempt.grpc_timeout
            && let Ok(value) = HeaderValue::from_bytes(value.as_bytes())
        {
            headers.insert(GRPC_TIMEOUT, value);
        }
        let pools = Arc::clone(&self.pools);
        Box::pin(async move {
            let head = RequestHead {
                method: &method,
                uri: &uri,
                headers: &headers,
            };
            pools
                .send_h2(attempt.addr, head, body, attempt.deadline)
                .await
                .map_err(|failed| failed.failed)
        })
    }

    fn facts(response: &Response<RecvBody>) -> Facts<'_> {
        facts(response)
    }
}

/// The code to reset a stream with when the body it carried failed: the reset an upstream or a
/// client sent, passed on (found anywhere in the error's chain), else `INTERNAL_ERROR`.
pub(crate) fn reset_code(err: &(dyn std::error::Error + 'static)) -> conduit_h2::ErrorCode {
    let mut source = Some(err);
    while let Some(err) = source {
        if let Some(reset) = err.downcast_ref::<server::StreamReset>() {
            return reset.code;
        }
        if let Some(failed) = err.downcast_ref::<client::StreamFailed>() {
            return failed.code();
        }
        source = err.source();
    }
    conduit_h2::ErrorCode::INTERNAL_ERROR
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

/// The client's request head as forwarded upstream: hop-by-hop fields removed, the authority
/// in the URI (from `:authority`, else `Host`) and no `host` field beside it.
fn prepare(mut parts: Parts) -> Result<Parts, ProxyError> {
    strip_hop_by_hop(&mut parts.headers);
    parts.version = Version::HTTP_2;
    let whole = parts.uri.scheme().is_some()
        && parts.uri.authority().is_some()
        && parts.uri.path_and_query().is_some();
    if whole {
        // What h2 hands over for every request with `:authority`: forwarded as it is.
        if parts.headers.contains_key(header::HOST) {
            parts.headers.remove(header::HOST);
        }
        return Ok(parts);
    }
    let authority = match parts.uri.authority() {
        Some(authority) => authority.clone(),
        None => parts
            .headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .and_then(|host| host.parse::<Authority>().ok())
            .ok_or_else(|| ProxyError::Malformed {
                reason: "missing :authority".into(),
            })?,
    };
    if parts.headers.contains_key(header::HOST) {
        // The request is routed by this authority; the upstream must not see another.
        parts.headers.remove(header::HOST);
    }
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let scheme = parts.uri.scheme().cloned().unwrap_or(Scheme::HTTP);
    parts.uri = Uri::builder()
        .scheme(scheme)
        .authority(authority)
        .path_and_query(path)
        .build()
        .map_err(|err| ProxyError::Malformed {
            reason: err.to_string(),
        })?;
    parts.version = Version::HTTP_2;
    Ok(parts)
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

    #[test]
    fn the_upstream_sees_the_authority_the_request_was_routed_by() {
        let request = Request::builder()
            .uri("http://web.test:80/x?y")
            .header(header::HOST, "other.test")
            .body(())
            .unwrap();
        let (parts, ()) = request.into_parts();
        let parts = prepare(parts).unwrap();
        assert_eq!(parts.uri.authority().unwrap().as_str(), "web.test:80");
        assert!(!parts.headers.contains_key(header::HOST));
        assert_eq!(parts.uri.path_and_query().unwrap().as_str(), "/x?y");
    }
}
