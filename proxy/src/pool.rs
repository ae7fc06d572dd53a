//! Upstream connections: per-endpoint pools over the [`Net`] seam.
//!
//! HTTP/1.1 connections are pooled here idle (at most `pool_max_idle_per_endpoint` per
//! endpoint, closed after `pool_idle_timeout`) and driven by the HTTP/1 engine
//! ([`crate::h1`]), which checks one out per request and back in once its response has ended
//! cleanly. HTTP/2 requests share one multiplexed hyper connection per endpoint, re-established
//! when it closes. Upstream speaks the protocol the client spoke (h1 for h1, h2 for h2: gRPC
//! needs h2 end to end); upgrading h1 to h2 between proxies is a later optimisation.
//!
//! Every wait for response headers is bounded by the response timeout (when configured),
//! counted from the last moment the proxy handed the upstream part of the request: the dispatch,
//! then each request body frame, so an upload in progress is never cut off. A peer that stops
//! answering (dead, or partitioned: segments dropped with nobody to retransmit them) then costs
//! one 504 per request caught on it instead of a hang, and its connection is discarded: an
//! HTTP/1.1 connection is never returned to the pool, and an HTTP/2 connection is replaced for
//! later requests (its other streams keep their own timeouts).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use conduit_core::time::Instant;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::admin::metrics::{Direction, Metrics, Peer};
use crate::body::{self, Body, BoxError};
use crate::clock::Clock;
use crate::config::Limits;
use crate::errors::ProxyError;
use crate::h1::conn::Upstream;
use crate::net::Net;
use crate::transport::CountingIo;

/// The most request body an h2 request keeps to be sent again after a refused stream.
const REPLAY_LIMIT: usize = 64 * 1024;

/// How long an upstream h2 connection may leave a keep-alive ping unanswered (as the server
/// side allows its clients).
const H2_PING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Pool state is a list of connections; a panic elsewhere cannot leave it half-updated.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// An idle HTTP/1.1 connection.
struct Idle<N: Net> {
    conn: Upstream<N>,
    since: Instant,
}

impl<N: Net> std::fmt::Debug for Idle<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idle").field("since", &self.since).finish()
    }
}

#[derive(Debug, Default)]
struct H2Slot {
    sender: Option<http2::SendRequest<Body>>,
    /// Which connection `sender` is, so a request that timed out on one replaces only that one.
    generation: u64,
}

#[derive(Debug)]
struct Endpoint {
    h2: tokio::sync::Mutex<H2Slot>,
    last_used: Mutex<Instant>,
}

/// When the proxy last handed the upstream part of a request (core-instant nanoseconds): the
/// response timeout counts from here.
#[derive(Clone, Debug)]
struct Progress(Arc<AtomicU64>);

impl Progress {
    fn new(clock: Clock) -> Self {
        Self(Arc::new(AtomicU64::new(clock.now().as_nanos())))
    }

    fn last(&self) -> Instant {
        Instant::from_nanos(self.0.load(Ordering::Relaxed))
    }
}

/// A request body that records each frame it yields in its [`Progress`].
struct ProgressBody {
    inner: Body,
    progress: Progress,
    clock: Clock,
}

impl http_body::Body for ProgressBody {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, BoxError>>> {
        let poll = Pin::new(&mut self.inner).poll_frame(cx);
        if poll.is_ready() {
            self.progress
                .0
                .store(self.clock.now().as_nanos(), Ordering::Relaxed);
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// An HTTP/2 response.
#[derive(Debug)]
pub(crate) struct Sent {
    pub(crate) response: Response<Incoming>,
    /// A new connection was established for this request.
    pub(crate) connected: bool,
}

/// Why [`Pools::send`] failed, with the request handed back when none of it reached the
/// upstream (the connect was refused or timed out, or an HTTP/2 connection closed before the
/// stream was opened): such a request is safe to send elsewhere, whatever its method.
#[derive(Debug)]
pub(crate) struct Failed {
    pub(crate) error: ProxyError,
    pub(crate) unsent: Option<Request<Body>>,
}

impl From<ProxyError> for Failed {
    fn from(error: ProxyError) -> Self {
        Self {
            error,
            unsent: None,
        }
    }
}

/// A copy of a request's head, to send again if the server refuses its stream before
/// processing it. Extensions are not copied: the proxy sets none.
fn replayable_head(request: &Request<Body>) -> Request<()> {
    let mut head = Request::new(());
    head.method_mut().clone_from(request.method());
    head.uri_mut().clone_from(request.uri());
    *head.version_mut() = request.version();
    head.headers_mut().clone_from(request.headers());
    head
}

/// Whether the server said it did not process the stream (RFC 9113 §8.7): it reset it with
/// `REFUSED_STREAM`, or a graceful `GOAWAY` (`NO_ERROR`) excluded it (h2 fails exactly the
/// streams above the GOAWAY's last stream id with that error; streams the server kept are cut
/// by a connection error or EOF instead). Such a request is safe to send again, whatever its
/// method.
fn never_processed(err: &hyper::Error) -> bool {
    use std::error::Error as _;
    let Some(h2) = err.source().and_then(|e| e.downcast_ref::<h2::Error>()) else {
        return false;
    };
    h2.is_remote()
        && match h2.reason() {
            Some(h2::Reason::REFUSED_STREAM) => h2.is_reset(),
            Some(h2::Reason::NO_ERROR) => h2.is_go_away(),
            _ => false,
        }
}

/// Every endpoint's connections, for one direction.
#[derive(Debug)]
pub(crate) struct Pools<N: Net> {
    net: N,
    clock: Clock,
    limits: Limits,
    metrics: Arc<Metrics>,
    direction: Direction,
    endpoints: Mutex<BTreeMap<SocketAddr, Arc<Endpoint>>>,
    /// Idle HTTP/1.1 connections per endpoint, most recently used last.
    idle: Mutex<BTreeMap<SocketAddr, Vec<Idle<N>>>>,
}

impl<N: Net> Pools<N> {
    pub(crate) fn new(
        net: N,
        clock: Clock,
        limits: Limits,
        metrics: Arc<Metrics>,
        direction: Direction,
    ) -> Self {
        Self {
            net,
            clock,
            limits,
            metrics,
            direction,
            endpoints: Mutex::default(),
            idle: Mutex::default(),
        }
    }

    /// An idle HTTP/1.1 connection to `addr` not past the pool idle timeout at `now`, most
    /// recently used first. The caller checks that it is still open.
    pub(crate) fn checkout_h1(&self, addr: SocketAddr, now: Instant) -> Option<Upstream<N>> {
        let mut idle = lock(&self.idle);
        let conns = idle.get_mut(&addr)?;
        while let Some(conn) = conns.pop() {
            if now.saturating_duration_since(conn.since) < self.limits.pool_idle_timeout {
                return Some(conn.conn);
            }
        }
        None
    }

    /// Returns an HTTP/1.1 connection whose last response ended cleanly at `now` (dropped,
    /// and so closed, when the endpoint has `pool_max_idle_per_endpoint` idle already).
    pub(crate) fn checkin_h1(&self, addr: SocketAddr, conn: Upstream<N>, now: Instant) {
        let mut idle = lock(&self.idle);
        let conns = idle.entry(addr).or_default();
        if conns.len() < self.limits.pool_max_idle_per_endpoint {
            conns.push(Idle { conn, since: now });
        }
    }

    fn endpoint(&self, addr: SocketAddr) -> Arc<Endpoint> {
        let now = self.clock.now();
        let endpoint = Arc::clone(lock(&self.endpoints).entry(addr).or_insert_with(|| {
            Arc::new(Endpoint {
                h2: tokio::sync::Mutex::default(),
                last_used: Mutex::new(now),
            })
        }));
        *lock(&endpoint.last_used) = now;
        endpoint
    }

    /// Opens a counted connection, bounded by the connect timeout.
    pub(crate) async fn connect(&self, addr: SocketAddr) -> Result<CountingIo<N::Io>, ProxyError> {
        let timeout = self.limits.connect_timeout;
        match tokio::time::timeout(timeout, self.net.connect(addr)).await {
            Err(_) => Err(ProxyError::ConnectTimeout { addr, timeout }),
            Ok(Err(source)) => Err(ProxyError::Connect { addr, source }),
            Ok(Ok(io)) => {
                tracing::debug!(endpoint = %addr, "connected");
                Ok(CountingIo::new(
                    io,
                    self.metrics.connection(self.direction, Peer::Dst),
                ))
            }
        }
    }

    /// Sends an HTTP/2 `request` to `addr` over the endpoint's shared connection.
    ///
    /// # Errors
    ///
    /// Connect failures and timeouts, upstream failures before response headers, and
    /// [`ProxyError::ResponseTimeout`]; with the request when it was never sent.
    pub(crate) async fn send(
        &self,
        addr: SocketAddr,
        request: Request<Body>,
    ) -> Result<Sent, Failed> {
        let (request, progress) = self.track(request);
        self.send_http2(addr, request, progress.as_ref()).await
    }

    /// Wraps a request body that is still to be sent so its frames push the response deadline
    /// back. Requests without a body (or without a response timeout) are left alone.
    fn track(&self, request: Request<Body>) -> (Request<Body>, Option<Progress>) {
        use http_body::Body as _;
        if self.limits.response_timeout.is_none() || request.body().is_end_stream() {
            return (request, None);
        }
        let progress = Progress::new(self.clock);
        let request = request.map(|inner| {
            body::boxed(ProgressBody {
                inner,
                progress: progress.clone(),
                clock: self.clock,
            })
        });
        (request, Some(progress))
    }

    /// Waits for `response` (an upstream's response headers) within the response timeout,
    /// counted from now or from the request's last body frame, whichever is later.
    async fn headers<T>(
        &self,
        addr: SocketAddr,
        progress: Option<&Progress>,
        response: impl Future<Output = T>,
    ) -> Result<T, ProxyError> {
        let Some(timeout) = self.limits.response_timeout else {
            return Ok(response.await);
        };
        let mut response = pin!(response);
        let mut deadline = self.clock.now() + timeout;
        loop {
            tokio::select! {
                biased;
                out = &mut response => return Ok(out),
                () = self.clock.sleep_until(deadline) => {
                    let resumed = progress.map_or(deadline, |p| p.last() + timeout);
                    if resumed > deadline {
                        // The request body was still moving: wait from its last frame.
                        deadline = resumed;
                        continue;
                    }
                    tracing::debug!(
                        endpoint = %addr,
                        ?timeout,
                        "no response headers in time; discarding the connection"
                    );
                    return Err(ProxyError::ResponseTimeout { addr, timeout });
                }
            }
        }
    }

    async fn send_http2(
        &self,
        addr: SocketAddr,
        request: Request<Body>,
        progress: Option<&Progress>,
    ) -> Result<Sent, Failed> {
        let endpoint = self.endpoint(addr);
        // A request the server refuses unprocessed can be rebuilt: its head is copied, and a
        // body's frames are kept as they are sent (up to `REPLAY_LIMIT`, shared with the sent
        // frames), so a unary gRPC call whose body went out whole can go again.
        // A body known to be larger than the limit could never be replayed: nothing is kept.
        let replayable = http_body::Body::size_hint(request.body()).lower()
            <= u64::try_from(REPLAY_LIMIT).unwrap_or(u64::MAX);
        let replay = replayable.then(|| replayable_head(&request));
        let (request, recorded) = if !replayable || http_body::Body::is_end_stream(request.body()) {
            (request, None)
        } else {
            let (parts, inner) = request.into_parts();
            let (body, recorded) = body::recording(inner, REPLAY_LIMIT);
            (Request::from_parts(parts, body), Some(recorded))
        };
        let (mut sender, connected, generation) = {
            // Held across the connect so concurrent requests share one new connection.
            let mut slot = endpoint.h2.lock().await;
            match slot.sender.as_ref() {
                Some(sender) if !sender.is_closed() => (sender.clone(), false, slot.generation),
                _ => {
                    let io = match self.connect(addr).await {
                        Ok(io) => io,
                        Err(error) => {
                            return Err(Failed {
                                error,
                                unsent: Some(request),
                            });
                        }
                    };
                    let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                        .timer(TokioTimer::new())
                        .max_header_list_size(
                            u32::try_from(self.limits.max_header_bytes).unwrap_or(u32::MAX),
                        )
                        .adaptive_window(true)
                        // Pings find a peer that vanished without closing (a partition, a
                        // crashed host), whether or not streams are open; hyper then closes
                        // the connection and the next request opens another.
                        .keep_alive_interval(self.limits.idle_timeout / 4)
                        .keep_alive_timeout(H2_PING_TIMEOUT)
                        .keep_alive_while_idle(true)
                        .handshake::<_, Body>(TokioIo::new(io))
                        .await
                        .map_err(|source| ProxyError::Upstream {
                            addr,
                            source: source.into(),
                        })?;
                    tokio::spawn(async move {
                        if let Err(err) = connection.await {
                            tracing::debug!(endpoint = %addr, error = %err, "upstream h2 connection ended");
                        }
                    });
                    slot.generation = slot.generation.wrapping_add(1);
                    slot.sender = Some(sender.clone());
                    (sender, true, slot.generation)
                }
            }
        };
        let response = match self
            .headers(addr, progress, sender.try_send_request(request))
            .await
        {
            Ok(Ok(response)) => response,
            Ok(Err(mut err)) => {
                let unsent = err.take_message().or_else(|| {
                    if !never_processed(err.error()) {
                        return None;
                    }
                    let body = match &recorded {
                        None => body::empty(),
                        Some(recorded) => recorded.replay()?,
                    };
                    Some(replay?.map(|()| body))
                });
                if unsent.is_some() {
                    // The connection closed before the stream opened, or the server refused
                    // the stream (going away, or at its stream limit): later requests get a new
                    // connection, and this one may be sent on it or elsewhere.
                    Self::forget_h2(&endpoint, generation).await;
                }
                return Err(Failed {
                    error: ProxyError::Upstream {
                        addr,
                        source: err.into_error().into(),
                    },
                    unsent,
                });
            }
            Err(timeout) => {
                // Later requests get a new connection; this one closes when its last stream
                // ends (each keeps its own timeout) and the last handle is dropped.
                Self::forget_h2(&endpoint, generation).await;
                return Err(timeout.into());
            }
        };
        Ok(Sent {
            response,
            connected,
        })
    }

    /// Stops offering the endpoint's h2 connection `generation` to new requests.
    async fn forget_h2(endpoint: &Endpoint, generation: u64) {
        let mut slot = endpoint.h2.lock().await;
        if slot.generation == generation {
            slot.sender = None;
        }
    }

    /// Closes idle connections past the idle timeout and forgets unused endpoints.
    pub(crate) fn sweep(&self) {
        let now = self.clock.now();
        let timeout = self.limits.pool_idle_timeout;
        lock(&self.idle).retain(|_, conns| {
            conns.retain(|conn| now.saturating_duration_since(conn.since) < timeout);
            !conns.is_empty()
        });
        lock(&self.endpoints).retain(|_, endpoint| {
            let idle_for = now.saturating_duration_since(*lock(&endpoint.last_used));
            if idle_for >= timeout
                && let Ok(mut h2) = endpoint.h2.try_lock()
            {
                // Dropping the last sender closes the connection once its streams end.
                h2.sender = None;
            }
            let h2_open = endpoint
                .h2
                .try_lock()
                .map_or(true, |h2| h2.sender.is_some());
            Arc::strong_count(endpoint) > 1 || h2_open
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::ProxyConfig;
    use crate::net::TokioNet;

    fn pools(clock: Clock, timeout: Duration) -> Pools<TokioNet> {
        let config =
            ProxyConfig::with_discovery(crate::config::DiscoveryConfig::File("unused".into()));
        let mut limits = config.limits;
        limits.response_timeout = Some(timeout);
        let metrics = Arc::new(Metrics::new(clock, config.metrics));
        Pools::new(TokioNet, clock, limits, metrics, Direction::Outbound)
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn the_response_timeout_counts_from_the_last_request_body_frame() {
        let clock = Clock::new();
        let pools = pools(clock, Duration::from_millis(100));
        let addr: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let progress = Progress::new(clock);
        // The request body keeps moving until 160 ms (frames at 80 and 160 ms).
        let body = {
            let progress = progress.clone();
            async move {
                for _ in 0..2 {
                    tokio::time::sleep(Duration::from_millis(80)).await;
                    progress.0.store(clock.now().as_nanos(), Ordering::Relaxed);
                }
            }
        };
        tokio::spawn(body);
        let start = clock.now();
        let waited = pools
            .headers(addr, Some(&progress), std::future::pending::<()>())
            .await;
        assert!(matches!(waited, Err(ProxyError::ResponseTimeout { .. })));
        assert_eq!(clock.now() - start, Duration::from_millis(260));
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn without_a_body_the_response_timeout_counts_from_dispatch() {
        let clock = Clock::new();
        let pools = pools(clock, Duration::from_millis(100));
        let addr: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let start = clock.now();
        let waited = pools
            .headers(addr, None, std::future::pending::<()>())
            .await;
        assert!(matches!(waited, Err(ProxyError::ResponseTimeout { .. })));
        assert_eq!(clock.now() - start, Duration::from_millis(100));
        let answered = pools.headers(addr, None, async { 7 }).await;
        assert!(matches!(answered, Ok(7)));
    }
}
