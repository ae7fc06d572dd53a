//! Accepting connections and serving them: detection, then HTTP/1 through the proxy's own
//! engine, HTTP/2 through h2 (both through the one request path), or opaque TCP forwarding.
//! Shared by the inbound and outbound listeners, which choose the target and the TLS seam.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

use crate::admin::metrics::{Direction, Peer};
use crate::clock::Clock;
use crate::config::Limits;
use crate::detect::{self, DetectError, DetectLimits, Detected};
use crate::drain::Drain;
use crate::errors::ProxyError;
use crate::errors::respond::encode_http1;
use crate::exchange;
use crate::exchange::gate::ProbeGate;
use crate::h1::conn::Parked;
use crate::http2::H2Service;
use crate::identity::LocalIdentity;
use crate::idle::IdleTimers;
use crate::net::{Io, Listener, Net};
use crate::pool::Pools;
use crate::transport::{ActivityIo, CountingIo, PrefixedIo};

/// How long to pause accepting after an accept error (EMFILE and friends), so a full fd table
/// does not become a busy loop.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// Everything a listener's connections need.
#[derive(Debug)]
pub(crate) struct ServeContext<N: Net> {
    /// The direction's request path.
    pub(crate) cx: Arc<exchange::Context>,
    /// Its upstream connections.
    pub(crate) pools: Arc<Pools<N>>,
    /// The HTTP/2 engine's service (the same context and pools).
    pub(crate) h2: Arc<H2Service<N>>,
    pub(crate) limits: Limits,
    pub(crate) clock: Clock,
    /// Where opaque TCP goes (`None`: close it).
    pub(crate) opaque_target: Option<SocketAddr>,
    /// The identity whose TLS this listener terminates (inbound, when the proxy has one).
    pub(crate) identity: Option<Arc<LocalIdentity>>,
    /// The request path for connections that arrive over mTLS (the same, counted with
    /// `tls="true"`), which each such connection copies with its client's identity; present
    /// with `identity`.
    tls: Option<Arc<exchange::Context>>,
    /// The idle deadlines of parked HTTP/1 connections.
    idle: Arc<IdleTimers>,
}

impl<N: Net> ServeContext<N> {
    pub(crate) fn new(
        cx: exchange::Context,
        pools: Pools<N>,
        limits: Limits,
        opaque_target: Option<SocketAddr>,
        identity: Option<Arc<LocalIdentity>>,
    ) -> Self {
        let (cx, pools) = (Arc::new(cx), Arc::new(pools));
        let tls = identity.as_ref().map(|_| Arc::new(cx.for_tls(None)));
        Self {
            tls,
            clock: cx.clock,
            idle: IdleTimers::new(cx.clock, limits.idle_timeout),
            h2: Arc::new(H2Service {
                cx: Arc::clone(&cx),
                pools: Arc::clone(&pools),
            }),
            cx,
            pools,
            limits,
            opaque_target,
            identity,
        }
    }

    fn direction(&self) -> Direction {
        self.cx.direction
    }
}

/// Accepts connections until draining starts, each served on its own task.
pub(crate) async fn accept_loop<N: Net>(
    listener: N::Listener,
    ctx: Arc<ServeContext<N>>,
    mut drain: Drain,
) {
    let permits = Arc::new(Semaphore::new(ctx.limits.max_connections));
    let direction = ctx.direction().as_str();
    // The listener's own address: a connection whose original destination is this address
    // was addressed to the proxy itself, and has no other destination.
    let own = listener.local_addr().ok();
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
            () = drain.signaled() => break,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = drain.signaled() => break,
        };
        let (io, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                tracing::warn!(direction, error = %err, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                continue;
            }
        };
        let original_dst = original_dst::<N>(ctx.direction(), &io, own);
        let span = tracing::debug_span!("conn", direction, peer = %peer);
        let guard = ctx.cx.metrics.connection(ctx.direction(), Peer::Src);
        let conn = Parked::new(CountingIo::new(io, guard), ctx.cx.clock.now());
        let serve = serve_connection(
            conn,
            peer.ip(),
            original_dst,
            Arc::clone(&ctx),
            drain.clone(),
            permit,
        );
        tokio::spawn(serve.instrument(span));
    }
    tracing::debug!(direction, "listener closed for drain");
}

/// Where an accepted outbound connection was headed before the pod's redirect sent it here
/// (`SO_ORIGINAL_DST`), read once per connection: HTTP for an authority discovery does not
/// know goes there (the exchange decides), and so does opaque TCP. `None` inbound (its traffic
/// goes to the app), when the connection was not redirected, and when it was headed to `own`,
/// the listener itself (a client of the proxy as an explicit proxy, on a network that reports
/// the address a connection reached): forwarding there would only come back.
fn original_dst<N: Net>(
    direction: Direction,
    io: &N::Io,
    own: Option<SocketAddr>,
) -> Option<SocketAddr> {
    match direction {
        Direction::Outbound => N::original_dst(io).filter(|original| Some(*original) != own),
        Direction::Inbound => None,
    }
}

// Not an `async fn`: its arguments would be stored twice in the task (as arguments, and as
// the locals they are moved into), and every idle connection pays for the task's size.
fn serve_connection<N: Net>(
    conn: Parked<CountingIo<N::Io>>,
    peer: IpAddr,
    original_dst: Option<SocketAddr>,
    ctx: Arc<ServeContext<N>>,
    drain: Drain,
    permit: OwnedSemaphorePermit,
) -> impl Future<Output = ()> + Send {
    // Taken by the protocol that needs the connection whole; HTTP/1 borrows it.
    let mut conn = Some(conn);
    async move {
        // The connection's task is sized for its largest state, which every idle kept-alive
        // connection then pays for in memory: the states that are not the HTTP/1 connection's
        // own (detection, TLS, HTTP/2, opaque forwarding) are boxed, once per
        // connection, and HTTP/1 boxes its busy periods.
        let detected = match conn.as_mut() {
            Some(parked) => Box::pin(detect_or_reject(parked, &ctx.limits)).await,
            None => return,
        };
        let Some(detected) = detected else { return };
        // Inbound, before discovery's first answer for the local service: its policy is not
        // known, so the connection waits for it (boxed: nearly always there is no wait).
        if let Some(known) = ctx.cx.until_local_known()
            && !Box::pin(known).await
        {
            if let Some(Parked { io, buf, .. }) = conn.take() {
                let err = ProxyError::Unavailable {
                    reason: "the local service's authorization policy is not known yet \
                             (discovery has not answered within the fail-fast timeout)"
                        .into(),
                };
                tracing::info!(
                    "connection refused: discovery has not answered for the local service, so its policy is unknown"
                );
                Box::pin(refuse(io, buf.freeze(), detected, err, &ctx)).await;
            }
            return;
        }
        // TLS is authorized once terminated (its client's identity is known then), or as the
        // opaque connection it is when passed through.
        // A plain fn returning the boxed refusal (or gated service): the denial and the
        // connection it takes are held in the box, not in every connection's task.
        if detected != Detected::Tls
            && let Some(screened) = screened(&mut conn, detected, peer, &ctx, &drain)
        {
            screened.await;
            return;
        }
        if detected == Detected::Http1 {
            let cx = &ctx.cx;
            crate::h1::conn::serve(&mut conn, cx, &ctx.pools, &ctx.idle, drain, original_dst).await;
        } else if let Some(whole) =
            whole_connection(&mut conn, detected, peer, original_dst, &ctx, drain)
        {
            whole.await;
        }
        drop(permit);
    }
}

/// The boxed service of a connection taken whole (HTTP/2, TLS, opaque TCP). A plain fn: the
/// parked state the connection is taken from is not held across the service's await, in
/// every connection's task. `original_dst`: where the connection was headed before a redirect
/// (outbound); its requests for authorities discovery does not know, or its non-HTTP bytes,
/// go there.
fn whole_connection<'a, N: Net>(
    conn: &mut Option<Parked<CountingIo<N::Io>>>,
    detected: Detected,
    peer: IpAddr,
    original_dst: Option<SocketAddr>,
    ctx: &'a Arc<ServeContext<N>>,
    drain: Drain,
) -> Option<std::pin::Pin<Box<dyn Future<Output = ()> + Send + 'a>>> {
    let mut take = || conn.take().map(|Parked { io, buf, .. }| (io, buf.freeze()));
    match detected {
        // Served in place: it borrows the parked state.
        Detected::Http1 => None,
        Detected::Http2 => {
            let (io, prefix) = take()?;
            let io = PrefixedIo::new(prefix, io);
            Some(Box::pin(serve_h2(io, &ctx.h2, ctx, drain, original_dst)))
        }
        Detected::Tls => {
            let (io, prefix) = take()?;
            Some(Box::pin(serve_tls(
                io,
                prefix,
                peer,
                ctx,
                drain,
                original_dst,
            )))
        }
        Detected::Opaque => {
            let (io, prefix) = take()?;
            Some(Box::pin(forward_opaque(io, prefix, ctx, original_dst)))
        }
    }
}

/// The service of a plaintext connection the policy does not simply allow (taking it): its
/// refusal, or, for HTTP under a policy that admits probes, the connection served with each
/// request decided on its own. `None` when it is allowed.
fn screened<'a, N: Net>(
    conn: &mut Option<Parked<CountingIo<N::Io>>>,
    detected: Detected,
    peer: IpAddr,
    ctx: &'a ServeContext<N>,
    drain: &Drain,
) -> Option<std::pin::Pin<Box<dyn Future<Output = ()> + Send + 'a>>> {
    let http = matches!(detected, Detected::Http1 | Detected::Http2);
    match authorize(ctx, None, peer, http) {
        Admission::Serve => None,
        Admission::Refuse(denied) => {
            let Parked { io, buf, .. } = conn.take()?;
            Some(Box::pin(refuse(io, buf.freeze(), detected, denied, ctx)))
        }
        Admission::Gate(gate) => {
            let cx = Arc::new(ctx.cx.gated(gate));
            let conn = conn.take()?;
            Some(Box::pin(serve_gated(
                conn,
                detected,
                cx,
                ctx,
                drain.clone(),
            )))
        }
    }
}

/// What the policy makes of an inbound connection.
#[derive(Debug)]
enum Admission {
    /// Served like any other.
    Serve,
    /// Refused: its requests (if it speaks HTTP) are answered with this error.
    Refuse(ProxyError),
    /// An HTTP connection the policy does not allow, under a policy that admits probes:
    /// served, its requests decided one by one by the gate (which counts them).
    Gate(Arc<ProbeGate>),
}

/// Authorizes an inbound connection against the local service's policy (outbound connections
/// are the local app's own and always allowed), counting the decision, except for a gated
/// connection, whose requests are counted instead.
fn authorize<N: Net>(
    ctx: &ServeContext<N>,
    client: Option<&str>,
    peer: IpAddr,
    http: bool,
) -> Admission {
    use conduit_core::policy::{Client, Verdict};
    if ctx.direction() != Direction::Inbound {
        return Admission::Serve;
    }
    let Some(policy) = ctx.cx.local_policy() else {
        ctx.cx.metrics.authorized(http, Verdict::Allow);
        return Admission::Serve;
    };
    let decision = conduit_core::policy::authorize(
        &policy,
        &Client {
            identity: client,
            addr: peer,
        },
    );
    let who = client.map_or_else(
        || format!("a client without identity at {peer}"),
        |id| format!("{id} at {peer}"),
    );
    if http && decision.verdict != Verdict::Allow && policy.admits_probes() {
        tracing::debug!(client = %who, rule = %decision.rule, "the policy does not allow this connection; deciding its requests, to admit probes");
        return Admission::Gate(Arc::new(ProbeGate::new(policy, decision, who)));
    }
    ctx.cx.metrics.authorized(http, decision.verdict);
    match decision.verdict {
        Verdict::Allow => Admission::Serve,
        Verdict::AuditDeny => {
            tracing::info!(client = %who, rule = %decision.rule, "the policy would deny this connection (audit only)");
            Admission::Serve
        }
        Verdict::Deny => {
            tracing::info!(client = %who, rule = %decision.rule, "connection denied by policy");
            Admission::Refuse(ProbeGate::refusal(&who, decision))
        }
    }
}

/// Serves an HTTP connection whose requests its gated request path `cx` decides one by one
/// (the exchange answers those the policy refuses).
async fn serve_gated<N: Net, I: Io>(
    conn: Parked<I>,
    detected: Detected,
    cx: Arc<exchange::Context>,
    ctx: &ServeContext<N>,
    drain: Drain,
) {
    // Inbound: there is no original destination.
    match detected {
        Detected::Http1 => {
            let mut conn = Some(conn);
            crate::h1::conn::serve(&mut conn, &cx, &ctx.pools, &ctx.idle, drain, None).await;
        }
        Detected::Http2 => {
            let Parked { io, buf, .. } = conn;
            let h2 = Arc::new(H2Service {
                cx,
                pools: Arc::clone(&ctx.pools),
            });
            serve_h2(PrefixedIo::new(buf.freeze(), io), &h2, ctx, drain, None).await;
        }
        // Never gated: there is no request to decide.
        Detected::Tls | Detected::Opaque => {}
    }
}

/// Refuses a connection the policy denied: HTTP/1 gets one 403 and the connection closes,
/// HTTP/2 gets 403 (gRPC `PERMISSION_DENIED`) on every stream until the client goes or the
/// idle timeout, opaque TCP is closed. The app never sees any of it.
async fn refuse<N: Net, I: Io>(
    io: I,
    prefix: Bytes,
    detected: Detected,
    denied: ProxyError,
    ctx: &ServeContext<N>,
) {
    match detected {
        Detected::Http1 => {
            let mut io = io;
            reject(&mut io, &denied).await;
        }
        Detected::Http2 => {
            let denied = &denied;
            let handle = |request: http::Request<crate::http2::server::RequestBody>| {
                let grpc = request
                    .headers()
                    .get(http::header::CONTENT_TYPE)
                    .is_some_and(|v| conduit_core::classify::is_grpc_content_type(v.as_bytes()));
                std::future::ready(denied.to_response(grpc, false))
            };
            let io = PrefixedIo::new(prefix, io);
            let serving = crate::http2::server::serve(io, &ctx.limits, ctx.clock, None, handle);
            let _ = tokio::time::timeout(ctx.limits.idle_timeout, serving).await;
        }
        Detected::Tls | Detected::Opaque => drop(io),
    }
}

/// Detects the connection's protocol; a request head that is malformed or too large gets its
/// answer here, and `None` means the connection is done.
async fn detect_or_reject<I: Io>(parked: &mut Parked<I>, limits: &Limits) -> Option<Detected> {
    let detect_limits = DetectLimits {
        detect_timeout: limits.detect_timeout,
        header_read_timeout: limits.header_read_timeout,
        max_header_bytes: limits.max_header_bytes,
    };
    match detect::detect(&mut parked.io, &mut parked.buf, detect_limits).await {
        Ok(detected) => Some(detected),
        Err(err) => {
            let err = match err {
                DetectError::TooLarge(limit) => ProxyError::HeadersTooLarge { limit },
                DetectError::Malformed(reason) => ProxyError::Malformed { reason },
                err => {
                    tracing::debug!(error = %err, "closing connection");
                    return None;
                }
            };
            reject(&mut parked.io, &err).await;
            None
        }
    }
}

/// A TLS connection: terminated when its SNI is this proxy's identity (the client must prove
/// one from the mesh's CA; the handshake must finish within the detect timeout), then served
/// like any other connection; passed through untouched otherwise.
async fn serve_tls<N: Net, I: Io>(
    io: I,
    hello: Bytes,
    peer: IpAddr,
    ctx: &Arc<ServeContext<N>>,
    mut drain: Drain,
    original: Option<SocketAddr>,
) {
    let sni = match crate::tls::parse_client_hello(&hello) {
        crate::tls::Hello::Tls { sni } => sni,
        _ => None,
    };
    let (Some(identity), Some(tls_cx)) = (
        ctx.identity
            .as_ref()
            .filter(|identity| sni.as_deref() == Some(identity.name())),
        ctx.tls.as_ref(),
    ) else {
        tracing::debug!(
            sni = sni.as_deref().unwrap_or(""),
            "TLS for another name; passing it through"
        );
        // Opaque: never gated, so anything but a plain allow closes it.
        if let admission @ (Admission::Refuse(_) | Admission::Gate(_)) =
            authorize(ctx, None, peer, false)
        {
            tracing::debug!(?admission, "closing");
            return;
        }
        forward_opaque(io, hello, ctx, original).await;
        return;
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(identity.server_config());
    let timeout = ctx.limits.detect_timeout;
    let handshake = acceptor.accept(PrefixedIo::new(hello, io));
    let tls = tokio::select! {
        accepted = tokio::time::timeout(timeout, handshake) => match accepted {
            Ok(Ok(tls)) => tls,
            Ok(Err(err)) => {
                let reason = crate::admin::metrics::tls_failure_reason(&err);
                ctx.cx.metrics.tls_handshake_failed(Direction::Inbound, reason);
                tracing::info!(error = %err, reason, "inbound mTLS handshake failed");
                return;
            }
            Err(_) => {
                ctx.cx.metrics.tls_handshake_failed(Direction::Inbound, "timeout");
                tracing::info!(?timeout, "inbound TLS handshake not finished in time; closing");
                return;
            }
        },
        () = drain.signaled() => return,
    };
    let client = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(crate::identity::peer_identity);
    tracing::debug!(
        client_id = client.as_deref().unwrap_or(""),
        "inbound mTLS accepted"
    );
    // The connection's own request path: counted under its client's identity.
    let mut tls_cx = Arc::new(tls_cx.for_tls(client.as_deref().map(Arc::from)));
    let mut conn = Some(Parked::new(tls, ctx.clock.now()));
    let detected = match conn.as_mut() {
        Some(parked) => detect_or_reject(parked, &ctx.limits).await,
        None => return,
    };
    if let Some(detected) = detected {
        let http = matches!(detected, Detected::Http1 | Detected::Http2);
        match authorize(ctx, client.as_deref(), peer, http) {
            Admission::Serve => {}
            Admission::Refuse(denied) => {
                if let Some(Parked { io, buf, .. }) = conn.take() {
                    refuse(io, buf.freeze(), detected, denied, ctx).await;
                }
                return;
            }
            // Served below like any other, each request decided by the gate.
            Admission::Gate(gate) => tls_cx = Arc::new(tls_cx.gated(gate)),
        }
    }
    match detected {
        None => {}
        Some(Detected::Http1) => {
            // Inside mTLS, the client named this proxy: there is no original destination.
            crate::h1::conn::serve(&mut conn, &tls_cx, &ctx.pools, &ctx.idle, drain, None).await;
        }
        Some(Detected::Http2) => {
            if let Some(Parked { io, buf, .. }) = conn.take() {
                let h2 = Arc::new(H2Service {
                    cx: tls_cx,
                    pools: Arc::clone(&ctx.pools),
                });
                serve_h2(PrefixedIo::new(buf.freeze(), io), &h2, ctx, drain, None).await;
            }
        }
        // Inside mTLS, the client named this proxy: there is no other destination.
        Some(Detected::Tls | Detected::Opaque) => {
            if let Some(Parked { io, buf, .. }) = conn.take() {
                forward_opaque(io, buf.freeze(), ctx, None).await;
            }
        }
    }
}

/// Answers a request hyper never saw (it failed detection) and closes.
async fn reject<I: Io>(io: &mut I, err: &ProxyError) {
    tracing::debug!(error = %err, "rejecting request");
    let bytes = encode_http1(&err.to_response(false, true));
    let _ = io.write_all(&bytes).await;
    let _ = io.shutdown().await;
}

/// Serves an HTTP/2 connection; each request carries the connection's `original_dst` into the
/// exchange.
async fn serve_h2<N: Net, I: Io>(
    io: I,
    http: &Arc<H2Service<N>>,
    ctx: &ServeContext<N>,
    drain: Drain,
    original_dst: Option<SocketAddr>,
) {
    // A connection with no stream open for the idle timeout is closed (gracefully), even if it
    // answers pings: an idle client cannot hold its connection forever.
    let handle = |request| Arc::clone(http).handle(request, original_dst);
    let served = crate::http2::server::serve(io, &ctx.limits, ctx.clock, Some(drain), handle).await;
    if let Err(err) = served {
        tracing::debug!(error = %err, "connection ended with error");
    }
}

/// Forwards an opaque connection to where it was headed before a redirect (`original`), else
/// to `ctx.opaque_target`, closing it when there is neither.
async fn forward_opaque<N: Net, I: Io>(
    io: I,
    prefix: Bytes,
    ctx: &ServeContext<N>,
    original: Option<SocketAddr>,
) {
    let Some(target) = original.or(ctx.opaque_target) else {
        tracing::debug!(
            "opaque TCP on the outbound listener with no original destination and no \
             outbound_default_target; closing"
        );
        return;
    };
    let upstream = match ctx.pools.connect(target).await {
        Ok(upstream) => upstream,
        Err(err) => {
            tracing::debug!(error = %err, "opaque connect failed; closing");
            return;
        }
    };
    let mut client = ActivityIo::new(PrefixedIo::new(prefix, io), ctx.clock);
    let watchdog =
        crate::transport::idle_watchdog(client.activity(), ctx.clock, ctx.limits.idle_timeout);
    let mut upstream = upstream;
    let idle = ctx.limits.idle_timeout;
    let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
    tokio::select! {
        result = copy => match result {
            Ok((up, down)) => tracing::debug!(%target, up, down, "opaque connection closed"),
            Err(err) => tracing::debug!(%target, error = %err, "opaque connection failed"),
        },
        () = watchdog => tracing::debug!(%target, ?idle, "opaque connection idle; closing"),
    }
}
