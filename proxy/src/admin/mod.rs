//! The admin server: `/metrics`, `/ready`, `/live` and `/shutdown` on their own port.
//!
//! The port is reachable by anyone who can reach the pod (probes and Prometheus need it), so
//! its cost is bounded whatever a peer does: at most [`MAX_CONNECTIONS`] connections are
//! served in full, each closed once no byte has moved for [`IDLE_TIMEOUT`] (a client that
//! pipelines scrapes and never reads them is cut off); beyond that, up to
//! [`MAX_PROBE_CONNECTIONS`] more are answered one request each, `/live` and `/ready` only
//! (everything else gets 503), so health probes keep answering while the full slots are
//! taken; beyond those, connections are closed at once. `/metrics` renders without holding
//! the lock requests take to find their series.

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
use crate::clock::Clock;
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
    pub(crate) clock: Clock,
    /// The proxy's identity: not ready until it holds a valid certificate.
    pub(crate) identity: Option<Arc<crate::identity::LocalIdentity>>,
    /// The local service (`service`) and its resolution: not ready until discovery has
    /// answered for it, so no client is sent here (a Kubernetes Service lists only ready
    /// pods) before the proxy knows the service's authorization policy and inbound profile.
    pub(crate) local_service: Option<(String, watch::Receiver<crate::discover::Resolution>)>,
}

/// Appends the identity's metrics (Prometheus text): `identity_certified{identity}` (1 while a
/// valid certificate is held) and, once one was received, its validity as
/// `identity_cert_not_before_timestamp_seconds` and `identity_cert_expiry_timestamp_seconds`
/// (what `conduit check` and `conduit identity show` read).
fn render_identity(identity: &crate::identity::LocalIdentity, out: &mut String) {
    use std::fmt::Write as _;
    let name = metrics::escape(identity.name());
    let _ = writeln!(
        out,
        "# HELP identity_certified Whether the proxy holds a valid certificate for its identity.\n# TYPE identity_certified gauge\nidentity_certified{{identity=\"{name}\"}} {}",
        u8::from(identity.is_certified())
    );
    if let Some((from, until)) = identity.validity() {
        let _ = writeln!(
            out,
            "# HELP identity_cert_not_before_timestamp_seconds The start of the held certificate's validity.\n# TYPE identity_cert_not_before_timestamp_seconds gauge\nidentity_cert_not_before_timestamp_seconds{{identity=\"{name}\"}} {}\n# HELP identity_cert_expiry_timestamp_seconds The end of the held certificate's validity.\n# TYPE identity_cert_expiry_timestamp_seconds gauge\nidentity_cert_expiry_timestamp_seconds{{identity=\"{name}\"}} {}",
            from.as_secs(),
            until.as_secs()
        );
    }
}

/// Connections served in full (every path, kept alive).
pub const MAX_CONNECTIONS: usize = 64;

/// Further connections answered one request each, for `/live` and `/ready` only.
pub const MAX_PROBE_CONNECTIONS: usize = 1024;

/// A connection on which no byte has moved for this long is closed.
pub const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// How long a probe-only connection may take, from accept to its answer written.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl Admin {
    /// The answer on a connection served only for probes.
    fn respond_probe(&self, request: &Request<Incoming>) -> Response<Body> {
        match (request.method(), request.uri().path()) {
            (&Method::GET, "/live" | "/ready") => self.respond(request, None),
            _ => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many admin connections; only /live and /ready are answered\n",
            ),
        }
    }

    fn respond(&self, request: &Request<Incoming>, peer: Option<SocketAddr>) -> Response<Body> {
        match (request.method(), request.uri().path()) {
            (&Method::GET, "/metrics") => {
                let mut extra = process::render();
                if let Some(identity) = &self.identity {
                    render_identity(identity, &mut extra);
                }
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
                if self.identity.as_ref().is_some_and(|id| !id.is_certified()) {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not ready: no valid certificate from the identity service yet\n",
                    )
                } else if let Some((service, resolution)) = &self.local_service
                    && matches!(*resolution.borrow(), crate::discover::Resolution::Unknown)
                {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!(
                            "not ready: discovery has not answered for the local service \
                             {service} yet (its policy is not known)\n"
                        ),
                    )
                } else if *self.ready.borrow() {
                    text(StatusCode::OK, "ready\n")
                } else {
                    text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                }
            }
            (&Method::POST, "/shutdown") => {
                // Anyone who can reach the admin port could otherwise stop the pod's traffic.
                if !peer.is_some_and(|peer| peer.ip().is_loopback()) {
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

fn text(status: StatusCode, body: impl Into<bytes::Bytes>) -> Response<Body> {
    let mut response = Response::new(body::full(body));
    *response.status_mut() = status;
    response
}

/// Serves the admin listener until the task is aborted.
pub(crate) async fn serve<N: Net>(listener: N::Listener, admin: Arc<Admin>) {
    let full = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let probes = Arc::new(tokio::sync::Semaphore::new(MAX_PROBE_CONNECTIONS));
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
        if let Ok(permit) = Arc::clone(&full).try_acquire_owned() {
            tokio::spawn(async move {
                serve_full(io, peer, &admin).await;
                drop(permit);
            });
        } else if let Ok(permit) = Arc::clone(&probes).try_acquire_owned() {
            tokio::spawn(async move {
                serve_probe(io, &admin).await;
                drop(permit);
            });
        } else {
            tracing::debug!(%peer, "admin connections exhausted; closing");
        }
    }
}

/// Serves a connection in full, until the client closes it or it goes idle.
async fn serve_full<I: crate::net::Io>(io: I, peer: SocketAddr, admin: &Admin) {
    let io = crate::transport::ActivityIo::new(io, admin.clock);
    let watchdog = crate::transport::idle_watchdog(io.activity(), admin.clock, IDLE_TIMEOUT);
    let service = service_fn(|request: Request<Incoming>| {
        let response = admin.respond(&request, Some(peer));
        async move { Ok::<_, Infallible>(response) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(admin.limits.header_read_timeout)
        .max_buf_size(admin.limits.max_header_bytes)
        .auto_date_header(false)
        .serve_connection(TokioIo::new(io), service);
    tokio::select! {
        result = connection => if let Err(err) = result {
            tracing::debug!(error = %err, "admin connection ended with error");
        },
        () = watchdog => tracing::debug!(%peer, "admin connection idle; closing"),
    }
}

/// Answers one request, `/live` and `/ready` only, then closes.
async fn serve_probe<I: crate::net::Io>(io: I, admin: &Admin) {
    let service = service_fn(|request: Request<Incoming>| {
        let response = admin.respond_probe(&request);
        async move { Ok::<_, Infallible>(response) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .keep_alive(false)
        .header_read_timeout(admin.limits.header_read_timeout.min(PROBE_TIMEOUT))
        .max_buf_size(8192)
        .auto_date_header(false)
        .serve_connection(TokioIo::new(io), service);
    let _ = tokio::time::timeout(PROBE_TIMEOUT, connection).await;
}
