//! THE mapping from proxy errors to HTTP and gRPC responses (STYLE.md §4; Linkerd's
//! `errors/respond.rs`, reference/linkerd.md §1.8).
//!
//! Every response the proxy makes itself is built here, carries `conduit-proxy-error: <reason>`
//! so clients and operators can tell the proxy answered rather than the app, and sets HTTP
//! status, `grpc-status` and connection closing together. gRPC callers (`content-type:
//! application/grpc*`) get HTTP 200 with `grpc-status`/`grpc-message` in a trailers-only
//! response, as gRPC requires. Responses from the app never pass through here.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use http::{HeaderValue, Response, StatusCode, header};

use crate::body::{self, Body, BoxError};

/// The header on every response the proxy synthesizes.
pub const PROXY_ERROR_HEADER: &str = "conduit-proxy-error";

/// gRPC status codes used here (grpc/doc/statuscodes.md).
/// nginx's status for a request whose client closed the connection first; not sent to anyone.
const CLIENT_CLOSED: StatusCode = match StatusCode::from_u16(499) {
    Ok(status) => status,
    Err(_) => StatusCode::BAD_REQUEST,
};

mod grpc {
    pub(super) const CANCELLED: u32 = 1;
    pub(super) const INVALID_ARGUMENT: u32 = 3;
    pub(super) const DEADLINE_EXCEEDED: u32 = 4;
    pub(super) const NOT_FOUND: u32 = 5;
    pub(super) const PERMISSION_DENIED: u32 = 7;
    pub(super) const RESOURCE_EXHAUSTED: u32 = 8;
    pub(super) const UNIMPLEMENTED: u32 = 12;
    pub(super) const UNAVAILABLE: u32 = 14;
}

/// Why the proxy answered a request itself.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// No endpoint of the service became ready within the fail-fast timeout.
    #[error("no ready endpoint for {authority} within the fail-fast timeout")]
    FailFast {
        /// The service.
        authority: String,
    },
    /// The service's request queue is full.
    #[error("load shed: the request queue for {authority} is full")]
    LoadShed {
        /// The service.
        authority: String,
    },
    /// Connecting to an endpoint took longer than the connect timeout.
    #[error("connect to {addr} timed out after {timeout:?}")]
    ConnectTimeout {
        /// The endpoint.
        addr: SocketAddr,
        /// The configured timeout.
        timeout: Duration,
    },
    /// Connecting to an endpoint failed (refused, unreachable).
    #[error("connect to {addr} failed: {source}")]
    Connect {
        /// The endpoint.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A meshed endpoint did not prove its identity over mTLS (its certificate is expired,
    /// for another name, or from another CA; the handshake failed), or this proxy holds no
    /// valid certificate to offer. The request never reached the endpoint in plaintext.
    #[error("mTLS to {addr} (identity {identity}) failed: {reason}")]
    Identity {
        /// The endpoint.
        addr: SocketAddr,
        /// The identity it must prove.
        identity: String,
        /// What failed.
        reason: String,
    },
    /// The local service's authorization policy refuses the client (inbound).
    #[error("unauthorized: {reason}")]
    Forbidden {
        /// Who was refused, and by which rule.
        reason: String,
    },
    /// The route's fault policy aborted the request on purpose (failure injection): no
    /// endpoint saw it.
    #[error("fault injected by the route's fault policy (abort with {status}, gRPC {grpc})")]
    FaultInjected {
        /// The HTTP status plain HTTP requests get.
        status: u16,
        /// The gRPC status code gRPC requests get.
        grpc: u32,
    },
    /// The endpoint is meshed, but this proxy has no certificate to offer it (no identity
    /// configured, or none certified yet, or the one held expired). Not the endpoint's fault:
    /// it is neither backed off nor tried again elsewhere (every meshed endpoint would refuse
    /// the same way).
    #[error("mTLS to {addr} (identity {identity}) impossible: {reason}")]
    NoIdentity {
        /// The endpoint.
        addr: SocketAddr,
        /// The identity it must prove.
        identity: String,
        /// Why this proxy cannot speak mTLS.
        reason: String,
    },
    /// The destination is not meshed and the proxy is configured to refuse unmeshed
    /// destinations (`outbound_require_identity`).
    #[error("{addr} is not meshed, and this proxy sends only mTLS (outbound_require_identity)")]
    Unmeshed {
        /// The endpoint.
        addr: SocketAddr,
    },
    /// The upstream connection failed: reset, closed early, or broke the protocol.
    #[error("upstream {addr} failed: {source}")]
    Upstream {
        /// The endpoint.
        addr: SocketAddr,
        /// What went wrong (an IO error, an invalid response, hyper's error for HTTP/2).
        #[source]
        source: BoxError,
    },
    /// The upstream sent no response headers within the response timeout after the request
    /// was handed to it. The connection is discarded; the client's connection is unaffected.
    #[error("upstream {addr} sent no response headers within {timeout:?}")]
    ResponseTimeout {
        /// The endpoint.
        addr: SocketAddr,
        /// The configured timeout.
        timeout: Duration,
    },
    /// The request's deadline passed: its route's request timeout, or the deadline its caller
    /// announced in `grpc-timeout`. Its upstream attempt is cancelled; the client's connection
    /// is unaffected.
    #[error("{} after {timeout:?}", if *propagated { "the caller's deadline (grpc-timeout) passed" } else { "request timed out" })]
    RequestTimeout {
        /// The time the request was given.
        timeout: Duration,
        /// The deadline was the caller's `grpc-timeout`, not the route's timeout.
        propagated: bool,
    },
    /// One attempt got no response headers within its route's attempt timeout.
    #[error("upstream {addr} sent no response headers within the attempt timeout of {timeout:?}")]
    AttemptTimeout {
        /// The endpoint.
        addr: SocketAddr,
        /// The route's attempt timeout.
        timeout: Duration,
    },
    /// The client closed its connection while its request waited for response headers; the
    /// request is abandoned (nginx's 499). Nothing reaches the client; the status is for
    /// metrics and logs.
    #[error("the client closed its connection before the response")]
    ClientClosed,
    /// The request's authority is not a service discovery knows.
    #[error("unknown authority {authority}: not in discovery")]
    UnknownAuthority {
        /// The authority as the client sent it (truncated).
        authority: String,
    },
    /// The request could not be parsed or lacks what the proxy needs (an authority).
    #[error("malformed request: {reason}")]
    Malformed {
        /// What is wrong.
        reason: String,
    },
    /// The request is valid but uses something the proxy does not implement (a transfer
    /// coding other than `chunked`).
    #[error("not implemented: {reason}")]
    NotImplemented {
        /// What.
        reason: String,
    },
    /// The request head is larger than the configured maximum.
    #[error("request headers exceed {limit} bytes")]
    HeadersTooLarge {
        /// The configured maximum.
        limit: usize,
    },
    /// The proxy cannot serve the request (shutting down, internal failure).
    #[error("proxy unavailable: {reason}")]
    Unavailable {
        /// Why.
        reason: String,
    },
}

/// What a synthesized response looks like, decided in one place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyntheticResponse {
    /// HTTP status for plain HTTP callers.
    pub http_status: StatusCode,
    /// `grpc-status` for gRPC callers.
    pub grpc_status: u32,
    /// Whether the connection to the client should close after this response.
    pub close_connection: bool,
    /// The reason, for the error header and `grpc-message`.
    pub message: String,
}

impl ProxyError {
    /// The response this error becomes.
    #[must_use]
    pub fn to_synthetic(&self) -> SyntheticResponse {
        let (http_status, grpc_status, close_connection) = match self {
            Self::FailFast { .. } => (StatusCode::GATEWAY_TIMEOUT, grpc::DEADLINE_EXCEEDED, true),
            Self::LoadShed { .. } => (StatusCode::SERVICE_UNAVAILABLE, grpc::UNAVAILABLE, true),
            Self::ConnectTimeout { .. } => {
                (StatusCode::GATEWAY_TIMEOUT, grpc::DEADLINE_EXCEEDED, true)
            }
            // Like Linkerd's route timeout: the upstream failed, not the client's connection.
            Self::ResponseTimeout { .. }
            | Self::RequestTimeout { .. }
            | Self::AttemptTimeout { .. } => {
                (StatusCode::GATEWAY_TIMEOUT, grpc::DEADLINE_EXCEEDED, false)
            }
            Self::Connect { .. }
            | Self::Identity { .. }
            | Self::NoIdentity { .. }
            | Self::Unmeshed { .. }
            | Self::Upstream { .. } => (StatusCode::BAD_GATEWAY, grpc::UNAVAILABLE, true),
            Self::UnknownAuthority { .. } => (StatusCode::NOT_FOUND, grpc::NOT_FOUND, false),
            // The decision is the connection's (its identity and address): it closes.
            Self::Forbidden { .. } => (StatusCode::FORBIDDEN, grpc::PERMISSION_DENIED, true),
            Self::ClientClosed => (CLIENT_CLOSED, grpc::CANCELLED, true),
            Self::Malformed { .. } => (StatusCode::BAD_REQUEST, grpc::INVALID_ARGUMENT, true),
            // The body cannot be read, so the connection closes after the answer.
            Self::NotImplemented { .. } => (StatusCode::NOT_IMPLEMENTED, grpc::UNIMPLEMENTED, true),
            Self::HeadersTooLarge { .. } => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                grpc::RESOURCE_EXHAUSTED,
                true,
            ),
            Self::Unavailable { .. } => (StatusCode::SERVICE_UNAVAILABLE, grpc::UNAVAILABLE, true),
            // As the route's policy says; the connection carries on.
            Self::FaultInjected { status, grpc } => (
                StatusCode::from_u16(*status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                *grpc,
                false,
            ),
        };
        SyntheticResponse {
            http_status,
            grpc_status,
            close_connection,
            message: self.to_string(),
        }
    }

    /// The HTTP or gRPC response for a request (`grpc` when the request's content type is
    /// gRPC; `http1` when the client speaks HTTP/1, where closing means `connection: close`).
    #[must_use]
    pub fn to_response(&self, grpc: bool, http1: bool) -> Response<Body> {
        self.to_synthetic().to_response(grpc, http1)
    }
}

impl SyntheticResponse {
    /// Builds the response.
    #[must_use]
    pub fn to_response(&self, grpc: bool, http1: bool) -> Response<Body> {
        let mut response = Response::new(body::empty());
        let headers = response.headers_mut();
        headers.insert(PROXY_ERROR_HEADER, header_value(&self.message));
        if grpc {
            // Trailers-only: status in the headers of a response with no body (gRPC over HTTP/2
            // spec, "Trailers-Only").
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            headers.insert("grpc-status", HeaderValue::from(self.grpc_status));
            headers.insert("grpc-message", header_value(&percent_encode(&self.message)));
        } else {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        }
        if self.close_connection && http1 {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if !grpc {
            *response.status_mut() = self.http_status;
        }
        response
    }
}

impl ProxyError {
    /// The trailers that end a gRPC response the proxy cuts short after its headers were
    /// forwarded (a request deadline passing mid-stream): the status a gRPC client reports,
    /// with the proxy error field.
    #[must_use]
    pub fn to_grpc_trailers(&self) -> http::HeaderMap {
        let synthetic = self.to_synthetic();
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from(synthetic.grpc_status));
        trailers.insert(
            "grpc-message",
            header_value(&percent_encode(&synthetic.message)),
        );
        trailers.insert(PROXY_ERROR_HEADER, header_value(&synthetic.message));
        trailers
    }
}

/// Serializes a synthesized response (empty body) as an HTTP/1.1 message into `out`, with
/// `connection` as its `connection` field (`None`: none; the response's own is replaced). The
/// one HTTP/1 serialization of the proxy's answers, for the HTTP/1 engine and for connections
/// rejected during detection.
pub(crate) fn write_http1(out: &mut Vec<u8>, response: &Response<Body>, connection: Option<&str>) {
    let status = response.status();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in response.headers() {
        if name == header::CONNECTION {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !response.headers().contains_key(header::CONTENT_LENGTH) {
        // A trailers-only gRPC answer over HTTP/1: no body either way.
        out.extend_from_slice(b"content-length: 0\r\n");
    }
    if let Some(connection) = connection {
        out.extend_from_slice(b"connection: ");
        out.extend_from_slice(connection.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Serializes a synthesized response as an HTTP/1.1 message that closes its connection, for
/// connections the proxy rejects before serving them (malformed or oversized first request).
#[must_use]
pub fn encode_http1(response: &Response<Body>) -> Vec<u8> {
    let mut out = Vec::new();
    write_http1(&mut out, response, Some("close"));
    out
}

/// A header value from free text: visible ASCII kept, anything else replaced by `?`.
fn header_value(text: &str) -> HeaderValue {
    let clean: String = text
        .chars()
        .take(512)
        .map(|c| {
            if c == ' ' || c.is_ascii_graphic() {
                c
            } else {
                '?'
            }
        })
        .collect();
    HeaderValue::from_str(&clean).unwrap_or_else(|_| HeaderValue::from_static("proxy error"))
}

/// gRPC's `grpc-message` encoding: percent-encode bytes outside printable ASCII and `%`.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if (0x20..0x7f).contains(&byte) && byte != b'%' {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<ProxyError> {
        let addr: SocketAddr = "10.0.0.1:8080".parse().unwrap();
        vec![
            ProxyError::FailFast {
                authority: "web.default:80".into(),
            },
            ProxyError::LoadShed {
                authority: "web.default:80".into(),
            },
            ProxyError::ConnectTimeout {
                addr,
                timeout: Duration::from_secs(1),
            },
            ProxyError::Connect {
                addr,
                source: io::ErrorKind::ConnectionRefused.into(),
            },
            ProxyError::ResponseTimeout {
                addr,
                timeout: Duration::from_secs(60),
            },
            ProxyError::RequestTimeout {
                timeout: Duration::from_millis(500),
                propagated: false,
            },
            ProxyError::RequestTimeout {
                timeout: Duration::from_millis(250),
                propagated: true,
            },
            ProxyError::AttemptTimeout {
                addr,
                timeout: Duration::from_millis(100),
            },
            ProxyError::ClientClosed,
            ProxyError::UnknownAuthority {
                authority: "nope.default".into(),
            },
            ProxyError::Malformed {
                reason: "missing authority".into(),
            },
            ProxyError::NotImplemented {
                reason: "transfer coding other than chunked".into(),
            },
            ProxyError::HeadersTooLarge { limit: 65536 },
            ProxyError::Unavailable {
                reason: "shutting down".into(),
            },
            ProxyError::Identity {
                addr,
                identity: "web.default.serviceaccount.identity.conduit.local".into(),
                reason: "invalid peer certificate: certificate expired".into(),
            },
            ProxyError::NoIdentity {
                addr,
                identity: "web.default.serviceaccount.identity.conduit.local".into(),
                reason: "this proxy has no identity configured (identity_name)".into(),
            },
            ProxyError::Unmeshed { addr },
            ProxyError::Forbidden {
                reason: "client without identity from 10.0.0.9 (default(all-authenticated))".into(),
            },
            ProxyError::FaultInjected {
                status: 418,
                grpc: 8,
            },
        ]
    }

    #[test]
    fn the_mapping_table() {
        let table: Vec<String> = all()
            .iter()
            .map(|e| {
                let s = e.to_synthetic();
                format!(
                    "{} | grpc {} | close {} | {}",
                    s.http_status.as_u16(),
                    s.grpc_status,
                    s.close_connection,
                    s.message
                )
            })
            .collect();
        insta::assert_snapshot!(table.join("\n"));
    }

    #[test]
    fn grpc_gets_trailers_only() {
        let err = ProxyError::FailFast {
            authority: "a".into(),
        };
        let r = err.to_response(true, false);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "4");
        assert!(r.headers().contains_key(PROXY_ERROR_HEADER));
        let r = err.to_response(false, true);
        assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(r.headers()["connection"], "close");
    }

    #[test]
    fn response_timeouts_are_deadline_exceeded_for_grpc() {
        let err = ProxyError::ResponseTimeout {
            addr: "10.0.0.1:8080".parse().unwrap(),
            timeout: Duration::from_millis(500),
        };
        let r = err.to_response(true, false);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "4");
        assert_eq!(
            r.headers()[PROXY_ERROR_HEADER],
            "upstream 10.0.0.1:8080 sent no response headers within 500ms"
        );
        let r = err.to_response(false, true);
        assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
        assert!(!r.headers().contains_key("connection"));
    }

    #[test]
    fn messages_are_sanitized() {
        assert_eq!(header_value("a\nb\u{e9}"), "a?b?");
        assert_eq!(percent_encode("50% é"), "50%25 %C3%A9");
    }
}
