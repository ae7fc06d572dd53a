//! The admin port: `/metrics` (Prometheus text), `/ready` and `/live`.
//!
//! [`respond`] decides every answer from plain inputs; [`serve_admin`] is the HTTP/1 glue over
//! whatever connections the caller's listener yields (tokio's in production, turmoil's in the
//! simulation). The `date` header is off: the admin answers need none, and hyper would read
//! the real clock for it (turmoil.md §4.1).

use core::future::Future;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt as _};
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinSet;

use crate::discovery::Discovery;
use crate::metrics::Metrics;

/// The most admin connections served at once; more are closed on accept. Scrapers and probes
/// need a handful.
pub const MAX_ADMIN_CONNECTIONS: usize = 64;

/// How long a client may take to send its request headers: bounds idle and slow clients.
pub const ADMIN_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// What the admin endpoints report on.
#[derive(Clone)]
pub struct AdminState {
    /// The controller's metrics.
    pub metrics: Arc<Metrics>,
    /// The discovery backend (ready once it has a complete view).
    pub discovery: Arc<dyn Discovery>,
    /// Set once the gRPC server is accepting connections.
    pub serving: Arc<AtomicBool>,
}

impl core::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("AdminState")
            .field("serving", &self.serving)
            .finish_non_exhaustive()
    }
}

impl AdminState {
    /// Whether the controller can answer discovery: the backend has a complete view and the
    /// gRPC server is accepting.
    #[must_use]
    pub fn is_ready(&self) -> bool {
        self.serving.load(Ordering::Relaxed) && self.discovery.is_ready()
    }
}

/// The answer to one admin request.
#[must_use]
pub fn respond(state: &AdminState, method: &Method, path: &str) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        response
    };
    if method != Method::GET && method != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n".into());
    }
    match path {
        "/live" => text(StatusCode::OK, "live\n".into()),
        "/ready" if state.is_ready() => text(StatusCode::OK, "ready\n".into()),
        "/ready" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into()),
        "/metrics" => {
            let mut response = text(StatusCode::OK, state.metrics.render());
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /ready or /live\n".into(),
        ),
    }
}

/// Serves the admin endpoints on every connection `incoming` yields, until `shutdown`
/// completes or `incoming` ends. Accept errors are logged and skipped.
pub async fn serve_admin<I, IO, IE>(
    incoming: I,
    state: AdminState,
    shutdown: impl Future<Output = ()>,
) where
    I: Stream<Item = Result<IO, IE>>,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    IE: core::fmt::Display,
{
    let mut incoming = core::pin::pin!(incoming);
    let mut shutdown = core::pin::pin!(shutdown);
    let mut connections = JoinSet::new();
    loop {
        let io = tokio::select! {
            () = &mut shutdown => break,
            next = incoming.next() => match next {
                None => break,
                Some(Err(err)) => {
                    tracing::debug!(error = %err, "admin accept failed");
                    continue;
                }
                Some(Ok(io)) => io,
            },
        };
        while connections.try_join_next().is_some() {}
        if connections.len() >= MAX_ADMIN_CONNECTIONS {
            tracing::warn!(
                max = MAX_ADMIN_CONNECTIONS,
                "too many admin connections; closing a new one"
            );
            continue;
        }
        let state = state.clone();
        connections.spawn(async move {
            let service =
                hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                    let response = respond(&state, request.method(), request.uri().path());
                    async move { Ok::<_, Infallible>(response) }
                });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(ADMIN_HEADER_READ_TIMEOUT)
                .auto_date_header(false)
                .serve_connection(TokioIo::new(io), service)
                .await;
            if let Err(err) = served {
                tracing::debug!(error = %err, "admin connection ended with an error");
            }
        });
    }
    // Dropping the set aborts connections still open.
}

#[cfg(test)]
mod tests {
    use conduit_core::mesh::Mesh;

    use super::*;
    use crate::discovery::file::FileDiscovery;

    fn state(serving: bool) -> AdminState {
        AdminState {
            metrics: Arc::new(Metrics::new(0)),
            discovery: Arc::new(FileDiscovery::new(Mesh::new())),
            serving: Arc::new(AtomicBool::new(serving)),
        }
    }

    #[test]
    fn endpoints_answer() {
        let ready = state(true);
        assert_eq!(
            respond(&ready, &Method::GET, "/live").status(),
            StatusCode::OK
        );
        assert_eq!(
            respond(&ready, &Method::GET, "/ready").status(),
            StatusCode::OK
        );
        assert_eq!(
            respond(&ready, &Method::GET, "/metrics").status(),
            StatusCode::OK
        );
        assert_eq!(
            respond(&ready, &Method::GET, "/nope").status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            respond(&ready, &Method::POST, "/live").status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            respond(&state(false), &Method::GET, "/ready").status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
