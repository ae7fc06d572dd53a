//! The admin server: `/metrics`, `/ready`, `/live` and `/shutdown` on their own port.

pub mod metrics;
mod process;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::watch;

use crate::body::{self, Body};
use crate::config::Limits;
use crate::discover::Discover;
use crate::net::{Listener, Net};

/// What the admin server reads and controls.
pub(crate) struct Admin {
    pub(crate) metrics: Arc<metrics::Metrics>,
    /// Discovery, for its `control_*` metric families.
    pub(crate) discovery: Arc<dyn Discover>,
    /// The outbound balancers, for their `balancer_*` gauges.
    pub(crate) router: Arc<crate::balance::Router>,
    /// True while the proxy serves; false once draining starts (then `/ready` says 503).
    pub(crate) ready: watch::Receiver<bool>,
    /// Set by `/shutdown` to start a graceful drain.
    pub(crate) shutdown: watch::Sender<bool>,
    pub(crate) limits: Limits,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl Admin {
    fn respond(&self, request: &Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        match (request.method(), request.uri().path()) {
            (&Method::GET, "/metrics") => {
                let mut extra = process::render();
                self.router.render_metrics(&mut extra);
                self.discovery.render_metrics(&mut extra);
                let text = self.metrics.render(&extra);
                let mut response = Response::new(body::full(text));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                response
            }
            (&Method::GET, "/live") => text(StatusCode::OK, "live\n"),
            (&Method::GET, "/ready") => {
                if *self.ready.borrow() {
                    text(StatusCode::OK, "ready\n")
                } else {
                    text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                }
            }
            (&Method::POST, "/shutdown") => {
                // Anyone who can reach the admin port could otherwise stop the pod's traffic.
                if !peer.ip().is_loopback() {
                    return text(
                        StatusCode::FORBIDDEN,
                        "shutdown is only accepted from localhost\n",
                    );
                }
                tracing::info!("shutdown requested via the admin server");
                self.shutdown.send_replace(true);
                text(StatusCode::OK, "shutdown\n")
            }
            (_, "/shutdown" | "/metrics" | "/live" | "/ready") => {
                text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
            }
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut response = Response::new(body::full(body));
    *response.status_mut() = status;
    response
}

/// Serves the admin listener until the task is aborted.
pub(crate) async fn serve<N: Net>(listener: N::Listener, admin: Arc<Admin>) {
    loop {
        let (io, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                tracing::warn!(error = %err, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let admin = Arc::clone(&admin);
        tokio::spawn(async move {
            let service = service_fn(|request: Request<Incoming>| {
                let response = admin.respond(&request, peer);
                async move { Ok::<_, Infallible>(response) }
            });
            let result = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(admin.limits.header_read_timeout)
                .max_buf_size(admin.limits.max_header_bytes)
                .auto_date_header(false)
                .serve_connection(TokioIo::new(io), service)
                .await;
            if let Err(err) = result {
                tracing::debug!(error = %err, "admin connection ended with error");
            }
        });
    }
}
