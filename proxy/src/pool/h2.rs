//! Upstream HTTP/2: multiplexed connections per endpoint (our own engine,
//! [`crate::http2::client`]), shared by every request to that endpoint. A request takes the first connection with a stream free under the peer's
//! `SETTINGS_MAX_CONCURRENT_STREAMS` (a stream counts until its response body ends); when every
//! connection is full another is opened (up to [`MAX_H2_CONNECTIONS`]), so a busy endpoint is
//! never limited to one connection's streams while streams queue in the proxy. Connections
//! beyond the first close once they have had no stream for the idle timeout.
//!
//! Every wait for response headers is bounded by the response timeout (when configured),
//! counted from the last moment the proxy handed the upstream part of the request: the dispatch,
//! then each request body frame, so an upload in progress is never cut off; and by the
//! attempt's deadline from the exchange (route timeouts, the caller's `grpc-timeout`). A peer
//! that stops answering (dead, or partitioned) then costs one 504 per request caught on it
//! instead of a hang, and its connection is replaced for later requests (its other streams
//! keep their own timeouts).
//!
//! A request whose body is whole when its stream opens (most: every one without a body) has
//! its response timeout kept by the connection, one timer for all its streams
//! ([`client`]'s `Awaiting`); only a request still sending its body, or with a deadline of its
//! own, arms a timer of its own here.

use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use conduit_core::time::Instant;
use http::Response;

use super::Pools;
use crate::body::{self, Body, BoxError, Streams};
use crate::clock::Clock;
use crate::errors::ProxyError;
use crate::exchange::{Failed, Sent};
use crate::http2::client::{self, Handle, RecvBody, RequestHead};
use crate::net::Net;

/// The most HTTP/2 connections kept to one endpoint. Beyond, streams wait in the proxy for
/// room on the least loaded connection (h2 opens them as others end).
const MAX_H2_CONNECTIONS: usize = 64;

/// One upstream HTTP/2 connection.
struct H2Conn {
    sender: Handle,
    /// Which connection this is, so a request that timed out on one replaces only that one.
    generation: u64,
    /// Streams open on it: counted from dispatch until the response body ends.
    streams: Arc<Streams>,
    /// The task driving the connection has ended.
    closed: Arc<AtomicBool>,
}

impl std::fmt::Debug for H2Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Conn")
            .field("generation", &self.generation)
            .field("streams", &self.streams.open_now())
            .finish_non_exhaustive()
    }
}

impl H2Conn {
    fn has_room(&self) -> bool {
        // The peer's current `SETTINGS_MAX_CONCURRENT_STREAMS`.
        self.streams.open_now() < self.sender.max_streams()
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

#[derive(Debug, Default)]
struct H2Slot {
    conns: Vec<H2Conn>,
    generation: u64,
}

impl H2Slot {
    /// Which connection a new stream should use: the first open one with room, else (all
    /// full, and no more may be opened) the least loaded. `None`: open another.
    fn choose(&mut self) -> Option<usize> {
        self.conns.retain(|conn| !conn.is_closed());
        if let Some(i) = self.conns.iter().position(H2Conn::has_room) {
            return Some(i);
        }
        if self.conns.len() < MAX_H2_CONNECTIONS {
            return None;
        }
        (0..self.conns.len()).min_by_key(|&i| self.conns[i].streams.open_now())
    }
}

/// One endpoint's HTTP/2 connections.
#[derive(Debug)]
pub(crate) struct Endpoint {
    h2: tokio::sync::Mutex<H2Slot>,
    /// When a request last picked the endpoint (core-instant nanoseconds): written on every
    /// request, so a plain store rather than a lock.
    last_used: AtomicU64,
}

impl Endpoint {
    pub(super) fn new(now: Instant) -> Self {
        Self {
            h2: tokio::sync::Mutex::default(),
            last_used: AtomicU64::new(now.as_nanos()),
        }
    }

    pub(super) fn used(&self, now: Instant) {
        self.last_used.store(now.as_nanos(), Ordering::Relaxed);
    }

    /// Closes the connection of an endpoint unused for `timeout` at `now`; whether to keep
    /// the endpoint (in use, or its connection still open).
    pub(super) fn sweep(self: &Arc<Self>, now: Instant, timeout: Duration) -> bool {
        let last_used = Instant::from_nanos(self.last_used.load(Ordering::Relaxed));
        let idle_for = now.saturating_duration_since(last_used);
        if let Ok(mut h2) = self.h2.try_lock() {
            if idle_for >= timeout {
                // Dropping the last sender closes a connection once its streams end.
                h2.conns.clear();
            } else {
                // Connections opened for a peak close once they have been without a stream
                // for the idle timeout; the first stays while the endpoint is in use.
                let mut first = true;
                h2.conns.retain(|conn| {
                    let keep = first || conn.streams.open_now() > 0 || {
                        let since = conn.streams.idle_since();
                        now.saturating_duration_since(since) < timeout
                    };
                    first = false;
                    keep
                });
            }
        }
        let h2_open = self.h2.try_lock().map_or(true, |h2| !h2.conns.is_empty());
        Arc::strong_count(self) > 1 || h2_open
    }
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
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
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

/// An HTTP/2 attempt that failed before response headers, with the request's body handed
/// back when no stream was opened for it (the connection had closed).
#[derive(Debug)]
pub(crate) struct H2Failed {
    pub(crate) failed: Failed,
    pub(crate) unsent: Option<Body>,
}

impl From<Failed> for H2Failed {
    fn from(failed: Failed) -> Self {
        Self {
            failed,
            unsent: None,
        }
    }
}

/// How a wait for response headers ended without them.
#[derive(Debug)]
enum Waited {
    /// The response timeout (no request progress for it).
    ResponseTimeout(Duration),
    /// The attempt's deadline.
    Deadline,
}

impl<N: Net> Pools<N> {
    /// Sends an HTTP/2 `request` to `addr` over the endpoint's shared connection and waits
    /// for its response headers, until `deadline` at the latest.
    ///
    /// # Errors
    ///
    /// Connect failures and timeouts, upstream failures before response headers,
    /// [`ProxyError::ResponseTimeout`] and the deadline; marked unprocessed when the endpoint
    /// provably did nothing with the request, with the request's body when no stream was opened.
    pub(crate) async fn send_h2(
        &self,
        addr: SocketAddr,
        head: RequestHead<'_>,
        body: Body,
        deadline: Option<Instant>,
    ) -> Result<Sent<Response<RecvBody>>, H2Failed> {
        let (body, progress) = self.track(body);
        let now = self.clock.now();
        let endpoint = self.endpoint(addr, now);
        let (sender, stream, connected, generation) = {
            // Held across the connect so concurrent requests share one new connection, and
            // while the stream is counted so concurrent requests see each other's.
            let mut slot = endpoint.h2.lock().await;
            let (i, connected) = match slot.choose() {
                Some(i) => (i, false),
                // Boxed: a connect's state (some 1.5 KB) would sit in every request's future,
                // and the few requests that connect pay one allocation for it.
                None => match Box::pin(self.connect_h2(addr)).await {
                    Ok(conn) => {
                        slot.generation = slot.generation.wrapping_add(1);
                        let generation = slot.generation;
                        let (sender, closed) = conn;
                        slot.conns.push(H2Conn {
                            sender,
                            generation,
                            streams: Streams::new(self.clock),
                            closed,
                        });
                        (slot.conns.len() - 1, true)
                    }
                    Err(failed) => {
                        return Err(H2Failed {
                            failed,
                            unsent: Some(body),
                        });
                    }
                },
            };
            let conn = &slot.conns[i];
            (
                conn.sender.clone(),
                conn.streams.open(),
                connected,
                conn.generation,
            )
        };
        let end = http_body::Body::is_end_stream(&body);
        // The connection times the response from the stream's opening unless the body is still
        // to be sent (its frames push the deadline back: timed here).
        let timed = progress.is_none() && sender.times_responses();
        let opened = sender.open(head, end, timed).await;
        let id = match opened {
            Ok(id) => id,
            Err(err) => {
                // No stream was opened: the request is whole, and may go on another
                // connection.
                Self::forget_h2(&endpoint, generation).await;
                let mut failed = Failed::unprocessed(ProxyError::Upstream {
                    addr,
                    source: err.into(),
                });
                failed.connected = connected;
                return Err(H2Failed {
                    failed,
                    unsent: Some(body),
                });
            }
        };
        // The request body goes out while the response head is awaited; a body still going
        // when the head comes (a stream both ways, an early answer) carries on in a task of its
        // own.
        let mut pump = (!end).then(|| sender.send_body(id, body));
        let mut response = sender.response(id);
        let waited = self
            .headers(
                if timed {
                    None
                } else {
                    self.limits.response_timeout
                },
                progress.as_ref(),
                deadline,
                std::future::poll_fn(|cx| {
                    if let Some(sending) = pump.as_mut()
                        && let Poll::Ready(sent) = Pin::new(sending).poll(cx)
                    {
                        if let Err(err) = sent {
                            tracing::debug!(endpoint = %addr, error = %err, "request body ended early");
                        }
                        pump = None;
                    }
                    Pin::new(&mut response).poll(cx)
                }),
            )
            .await;
        let response = match waited {
            Ok(Ok(response)) => response,
            Ok(Err(client::StreamFailed::ResponseTimeout(timeout))) => {
                // As below: later requests get a new connection.
                Self::forget_h2(&endpoint, generation).await;
                tracing::debug!(endpoint = %addr, ?timeout, "no response headers in time; discarding the connection");
                let mut failed = Failed::new(ProxyError::ResponseTimeout { addr, timeout });
                failed.connected = connected;
                return Err(failed.into());
            }
            Ok(Err(err)) => {
                // The server said it did not process the stream (RFC 9113 §8.7): it reset it
                // with `REFUSED_STREAM`, or its GOAWAY excluded it. Safe to send again,
                // whatever the method.
                let unprocessed = err.unprocessed();
                if unprocessed {
                    // The server refused the stream (going away, or at its stream limit):
                    // later requests get a new connection, and this one may be sent on it or
                    // elsewhere.
                    Self::forget_h2(&endpoint, generation).await;
                }
                let mut failed = Failed::new(ProxyError::Upstream {
                    addr,
                    source: err.into(),
                });
                failed.unprocessed = unprocessed;
                failed.connected = connected;
                return Err(failed.into());
            }
            Err(waited) => {
                // Later requests get a new connection; this one closes when its last stream
                // ends (each keeps its own timeout) and the last handle is dropped.
                Self::forget_h2(&endpoint, generation).await;
                let mut failed = match waited {
                    Waited::ResponseTimeout(timeout) => {
                        tracing::debug!(endpoint = %addr, ?timeout, "no response headers in time; discarding the connection");
                        Failed::new(ProxyError::ResponseTimeout { addr, timeout })
                    }
                    Waited::Deadline => Failed::deadline(),
                };
                failed.connected = connected;
                return Err(failed.into());
            }
        };
        if let Some(sending) = pump {
            tokio::spawn(async move {
                if let Err(err) = sending.await {
                    tracing::debug!(error = %err, "request body ended early");
                }
            });
        }
        let mut response = response;
        response.body_mut().hold(stream);
        Ok(Sent {
            response,
            connected,
        })
    }

    /// Opens an HTTP/2 connection to `addr` and starts the task that drives it; its handle,
    /// and the flag that task sets when the connection has ended.
    async fn connect_h2(&self, addr: SocketAddr) -> Result<(Handle, Arc<AtomicBool>), Failed> {
        let io = self.connect(addr).await.map_err(Failed::unprocessed)?;
        // Pings find a peer that vanished without closing (a partition, a crashed host),
        // whether or not streams are open; the connection then ends and the next request
        // opens another. Requests go out at once, before the server's SETTINGS (RFC 9113
        // §3.4 allows it): a server that does not speak HTTP/2 fails them.
        let (handle, driving) = client::handshake(
            io,
            self.clock,
            self.limits.idle_timeout / 4,
            u32::try_from(self.limits.max_header_bytes).unwrap_or(u32::MAX),
            self.limits.response_timeout,
        );
        let closed = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&closed);
        tokio::spawn(async move {
            if let Err(err) = driving.await {
                tracing::debug!(endpoint = %addr, error = %err, "upstream h2 connection ended");
            }
            flag.store(true, Ordering::Release);
        });
        Ok((handle, closed))
    }

    /// Wraps a request body that is still to be sent so its frames push the response deadline
    /// back. Requests without a body (or without a response timeout) are left alone.
    fn track(&self, body: Body) -> (Body, Option<Progress>) {
        use http_body::Body as _;
        if self.limits.response_timeout.is_none() || body.is_end_stream() {
            return (body, None);
        }
        let progress = Progress::new(self.clock);
        let body = body::boxed(ProgressBody {
            inner: body,
            progress: progress.clone(),
            clock: self.clock,
        });
        (body, Some(progress))
    }

    /// Waits for `response` (an upstream's response headers) within `timeout` (the response
    /// timeout, when this request's connection does not keep it), counted from now or from
    /// the request's last body frame, whichever is later, and until `deadline` at the latest.
    async fn headers<T>(
        &self,
        timeout: Option<Duration>,
        progress: Option<&Progress>,
        deadline: Option<Instant>,
        response: impl Future<Output = T>,
    ) -> Result<T, Waited> {
        if timeout.is_none() && deadline.is_none() {
            return Ok(response.await);
        }
        let mut response = pin!(response);
        let mut idle = timeout.map(|t| self.clock.now() + t);
        loop {
            let wake = match (idle, deadline) {
                (Some(a), Some(b)) => a.min(b),
                (a, b) => a.or(b).unwrap_or(Instant::ZERO),
            };
            tokio::select! {
                biased;
                out = &mut response => return Ok(out),
                () = self.clock.sleep_until(wake) => {
                    if deadline.is_some_and(|d| self.clock.now() >= d) {
                        return Err(Waited::Deadline);
                    }
                    let (Some(timeout), Some(at)) = (timeout, idle) else { continue };
                    let resumed = progress.map_or(at, |p| p.last() + timeout);
                    if resumed > at {
                        // The request body was still moving: wait from its last frame.
                        idle = Some(resumed);
                        continue;
                    }
                    return Err(Waited::ResponseTimeout(timeout));
                }
            }
        }
    }

    /// Stops offering the endpoint's h2 connection `generation` to new requests.
    async fn forget_h2(endpoint: &Endpoint, generation: u64) {
        let mut slot = endpoint.h2.lock().await;
        slot.conns.retain(|conn| conn.generation != generation);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::metrics::{Direction, Metrics};
    use crate::config::ProxyConfig;
    use crate::net::TokioNet;

    fn pools(clock: Clock, timeout: Duration) -> Pools<TokioNet> {
        let config =
            ProxyConfig::with_discovery(crate::config::DiscoveryConfig::File("unused".into()));
        let mut limits = config.limits;
        limits.response_timeout = Some(timeout);
        let metrics = Arc::new(Metrics::new(clock, config.metrics));
        Pools::new(
            TokioNet,
            clock,
            limits,
            metrics,
            Direction::Outbound,
            crate::pool::Security::default(),
        )
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn the_response_timeout_counts_from_the_last_request_body_frame() {
        let clock = Clock::new();
        let pools = pools(clock, Duration::from_millis(100));
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
            .headers(
                pools.limits.response_timeout,
                Some(&progress),
                None,
                std::future::pending::<()>(),
            )
            .await;
        assert!(matches!(waited, Err(Waited::ResponseTimeout(_))));
        assert_eq!(clock.now() - start, Duration::from_millis(260));
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn without_a_body_the_response_timeout_counts_from_dispatch() {
        let clock = Clock::new();
        let pools = pools(clock, Duration::from_millis(100));
        let start = clock.now();
        let waited = pools
            .headers(
                pools.limits.response_timeout,
                None,
                None,
                std::future::pending::<()>(),
            )
            .await;
        assert!(matches!(waited, Err(Waited::ResponseTimeout(_))));
        assert_eq!(clock.now() - start, Duration::from_millis(100));
        let answered = pools
            .headers(pools.limits.response_timeout, None, None, async { 7 })
            .await;
        assert!(matches!(answered, Ok(7)));
        // An earlier deadline wins over the response timeout.
        let start = clock.now();
        let waited = pools
            .headers(
                pools.limits.response_timeout,
                None,
                Some(start + Duration::from_millis(30)),
                std::future::pending::<()>(),
            )
            .await;
        assert!(matches!(waited, Err(Waited::Deadline)));
        assert_eq!(clock.now() - start, Duration::from_millis(30));
    }
}
