//! HTTP/2 connections driven with `h2` directly, both ways.
//!
//! A client's connection ([`serve`]) runs every one of its streams on the connection's own
//! task: the request goes to the handler, the response head and body back, and h2 writes
//! what the streams queued when the task next polls the connection, so the frames of many
//! streams go out in one write. There is no task per stream and no channel between a stream
//! and its connection (hyper's server spawns one of each per request).
//!
//! Both directions send keep-alive pings ([`Keepalive`]) so a peer that vanished without
//! closing (a partition, a crashed host) is found: a ping every interval, and the connection
//! ends when one goes unanswered for the ping timeout.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use h2::server::SendResponse;
use h2::{Ping, PingPong};
use http::{Request, Response};

use super::stream::{RecvBody, send_body};
use crate::body::{Body, StreamGuard, Streams};
use crate::clock::Clock;
use crate::config::Limits;
use crate::drain::Drain;
use crate::net::Io;

/// How long a keep-alive ping may go unanswered before the connection is given up.
pub(crate) const PING_TIMEOUT: Duration = Duration::from_secs(20);

/// Each stream's receive window: what a peer may send on one stream before the proxy hands
/// it on. The connection's window bounds all streams together.
pub(crate) const STREAM_WINDOW: u32 = 256 * 1024;

/// Each connection's receive window: the most a peer can make the proxy hold for it.
pub(crate) const CONNECTION_WINDOW: u32 = 1024 * 1024;

/// The most a stream queues to send beyond what the peer's window takes.
pub(crate) const SEND_BUFFER: usize = 256 * 1024;

/// Why a connection ended other than by closing cleanly.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnError {
    #[error("{0}")]
    H2(#[from] h2::Error),
    #[error("the peer sent no HTTP/2 settings within {0:?}")]
    Handshake(Duration),
    #[error("no answer to a keep-alive ping within {0:?}")]
    PingTimeout(Duration),
}

/// Serves a client's HTTP/2 connection: each request to `handle`, its response back (a client
/// that resets the stream meanwhile drops the request's future). It closes gracefully once no
/// stream has been open for the idle timeout or `drain` is signaled, and abruptly when the
/// client stops answering pings.
///
/// # Errors
///
/// The connection failed (a protocol error, IO, an unanswered ping).
pub(crate) async fn serve<I, F, Fut>(
    io: I,
    limits: &Limits,
    clock: Clock,
    mut drain: Option<Drain>,
    handle: F,
) -> Result<(), ConnError>
where
    I: Io,
    F: Fn(Request<RecvBody>) -> Fut,
    Fut: Future<Output = Response<Body>> + Send,
{
    let handshake = h2::server::Builder::new()
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_send_buffer_size(SEND_BUFFER)
        .handshake::<_, Bytes>(io);
    let mut conn = tokio::time::timeout(limits.idle_timeout, handshake)
        .await
        .map_err(|_| ConnError::Handshake(limits.idle_timeout))??;
    let open = Streams::new(clock);
    let mut idle = std::pin::pin!(open.idle(limits.idle_timeout));
    let mut keepalive = Keepalive::new(conn.ping_pong(), clock, limits.idle_timeout / 4);
    let mut streams = FuturesUnordered::new();
    let mut closing = false;
    std::future::poll_fn(|cx| {
        if !closing {
            let drained = drain
                .as_mut()
                .is_some_and(|d| d.poll_signaled(cx).is_ready());
            if drained || idle.as_mut().poll(cx).is_ready() {
                tracing::debug!(drained, "h2 connection closing gracefully");
                conn.graceful_shutdown();
                closing = true;
            }
        }
        if keepalive.poll(cx).is_ready() {
            return Poll::Ready(Err(ConnError::PingTimeout(PING_TIMEOUT)));
        }
        loop {
            // The streams first: what they queue goes out as the connection is polled below.
            while let Poll::Ready(Some(())) = streams.poll_next_unpin(cx) {}
            match ready!(conn.poll_accept(cx)) {
                Some(Ok((request, respond))) => {
                    let (parts, stream) = request.into_parts();
                    let body = RecvBody::new(stream, &parts.headers);
                    // Boxed: the request's future (the exchange's whole state, several KB)
                    // is written once into its box; the stream's own future, which the set
                    // moves on each push, stays a few words.
                    let response = Box::pin(handle(Request::from_parts(parts, body)));
                    streams.push(serve_stream(respond, response, open.open()));
                }
                Some(Err(err)) => return Poll::Ready(Err(err.into())),
                None => return Poll::Ready(Ok(())),
            }
        }
    })
    .await
}

/// One stream of a client's connection: its response (unless the client resets the stream
/// first), then the response's body. The stream counts as open until its body is sent.
async fn serve_stream<Fut>(
    mut respond: SendResponse<Bytes>,
    mut response: Pin<Box<Fut>>,
    _open: StreamGuard,
) where
    Fut: Future<Output = Response<Body>>,
{
    let response = {
        let answered = std::future::poll_fn(|cx| {
            if let Poll::Ready(response) = response.as_mut().poll(cx) {
                return Poll::Ready(Some(response));
            }
            // The client gave up on the stream: dropping the request's future cancels it.
            respond.poll_reset(cx).map(|_| None)
        })
        .await;
        match answered {
            Some(response) => response,
            None => return,
        }
    };
    let (mut parts, body) = response.into_parts();
    // h2 refuses connection-specific fields (RFC 9113 §8.2.2).
    super::strip_hop_by_hop(&mut parts.headers);
    let end = http_body::Body::is_end_stream(&body);
    let stream = match respond.send_response(Response::from_parts(parts, ()), end) {
        Ok(stream) => stream,
        Err(err) => {
            tracing::debug!(error = %err, "sending response head");
            return;
        }
    };
    if !end && let Err(err) = send_body(body, stream).await {
        tracing::debug!(error = %err, "response body ended early");
    }
}

/// Keep-alive pings on one connection: a ping every `interval`, and the connection is given
/// up when one goes unanswered for [`PING_TIMEOUT`].
pub(crate) struct Keepalive {
    ping_pong: Option<PingPong>,
    clock: Clock,
    interval: Duration,
    /// A ping is out, unanswered.
    sent: bool,
    /// The next ping, or the unanswered one's timeout.
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl Keepalive {
    pub(crate) fn new(ping_pong: Option<PingPong>, clock: Clock, interval: Duration) -> Self {
        let at = clock.to_tokio(clock.now() + interval);
        Self {
            ping_pong,
            clock,
            interval,
            sent: false,
            timer: Box::pin(tokio::time::sleep_until(at)),
        }
    }

    /// Ready when a ping went unanswered for the timeout; pending otherwise (also once the
    /// connection can no longer ping: it is ending on its own).
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(ping_pong) = self.ping_pong.as_mut() else {
            return Poll::Pending;
        };
        loop {
            if self.sent {
                match ping_pong.poll_pong(cx) {
                    Poll::Ready(Ok(_)) => {
                        self.sent = false;
                        Self::rearm(&mut self.timer, self.clock, self.interval);
                        continue;
                    }
                    Poll::Ready(Err(_)) => {
                        self.ping_pong = None;
                        return Poll::Pending;
                    }
                    Poll::Pending => {}
                }
            }
            ready!(self.timer.as_mut().poll(cx));
            if self.sent {
                return Poll::Ready(());
            }
            if ping_pong.send_ping(Ping::opaque()).is_err() {
                self.ping_pong = None;
                return Poll::Pending;
            }
            self.sent = true;
            Self::rearm(&mut self.timer, self.clock, PING_TIMEOUT);
        }
    }

    fn rearm(timer: &mut Pin<Box<tokio::time::Sleep>>, clock: Clock, after: Duration) {
        timer.as_mut().reset(clock.to_tokio(clock.now() + after));
    }
}

impl std::fmt::Debug for Keepalive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keepalive")
            .field("interval", &self.interval)
            .field("sent", &self.sent)
            .finish_non_exhaustive()
    }
}

/// Drives an upstream connection until it ends, pinging it as [`Keepalive`] says; `closed`
/// is set when it has (the pool then stops offering it).
pub(crate) async fn drive_client<I: Io>(
    mut conn: h2::client::Connection<I, Bytes>,
    clock: Clock,
    interval: Duration,
    closed: Arc<std::sync::atomic::AtomicBool>,
) -> Result<(), ConnError> {
    let mut keepalive = Keepalive::new(conn.ping_pong(), clock, interval);
    let ended = std::future::poll_fn(|cx| {
        if keepalive.poll(cx).is_ready() {
            return Poll::Ready(Err(ConnError::PingTimeout(PING_TIMEOUT)));
        }
        Pin::new(&mut conn).poll(cx).map_err(ConnError::from)
    })
    .await;
    closed.store(true, std::sync::atomic::Ordering::Release);
    ended
}
