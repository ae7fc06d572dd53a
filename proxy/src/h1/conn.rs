//! Serving one HTTP/1 client connection: read a request head, hand it to the exchange (which
//! routes it, picks endpoints, enforces deadlines and settles it), move its bytes when asked,
//! and go on to the next request while the connection is kept alive.
//!
//! The whole exchange runs in the client connection's task: the upstream connection is
//! borrowed from the pool for the request and driven here, so a request costs no task
//! wake-ups or channel hand-offs between the two sides. Timers are per connection and lazily
//! re-armed ([`Deadline`]): a request does not register a timer of its own.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use conduit_core::route::RequestView;
use conduit_core::time::Instant;
use http::StatusCode;
use tokio::io::AsyncWriteExt;

use super::codec::{self, CodecError, Encoding, Framing, Persistence, RequestHead, ResponseHead};
use super::copy::{self, H1Copy, H1Hedged};
use super::io::{Pump, PumpError, Replay, Side, Upstream};
use super::upstream::{H1Response, Upload, checkout, connect_or_returned};
use crate::body::BodyEnd;
use crate::clock::Clock;
use crate::config::Limits;
use crate::drain::Drain;
use crate::errors::ProxyError;
use crate::exchange::{self, Attempt, Engine, Exchange, Facts, Failed, Sent, Settle};
use crate::idle::{IdleTimer, IdleTimers};
use crate::net::{Io, Net};
use crate::pool::Pools;
use crate::transport::ActivityIo;

/// A timer owned by a connection and re-armed lazily: waiting for a later deadline than the
/// one armed costs nothing until the armed one fires, so kept-alive requests, whose deadlines
/// only move forward, never touch the timer wheel. Only the connection's task polls it, so
/// once registered it wakes that task without being polled again.
#[derive(Debug)]
struct Deadline {
    /// Allocated on first use.
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    armed: Option<Instant>,
    /// Polled since it was last armed: the timer holds the task's waker.
    registered: bool,
}

impl Deadline {
    fn new() -> Self {
        Self {
            sleep: None,
            armed: None,
            registered: false,
        }
    }

    /// Ready once `deadline` has passed.
    fn poll_reached(&mut self, cx: &mut Context<'_>, clock: Clock, deadline: Instant) -> Poll<()> {
        loop {
            let sleep = self.sleep.get_or_insert_with(|| {
                Box::pin(tokio::time::sleep_until(clock.to_tokio(deadline)))
            });
            if self.armed.is_none_or(|armed| armed > deadline) {
                sleep.as_mut().reset(clock.to_tokio(deadline));
                self.armed = Some(deadline);
                self.registered = false;
            }
            if self.registered && !sleep.is_elapsed() {
                return Poll::Pending;
            }
            // Outside the task's cooperative budget: a poll refused for budget would leave
            // the timer without the waker while we count it as registered.
            let mut unconstrained = tokio::task::unconstrained(sleep.as_mut());
            if Pin::new(&mut unconstrained).poll(cx).is_pending() {
                self.registered = true;
                return Poll::Pending;
            }
            self.registered = false;
            if clock.now() >= deadline {
                return Poll::Ready(());
            }
            // Fired for an earlier deadline: re-arm for this one.
            self.armed = None;
        }
    }
}

/// What the connection does after a request.
enum Next<N: Net> {
    /// Read the next request.
    KeepAlive,
    /// Close the connection.
    Close,
    /// The request switched protocols: carry bytes both ways.
    Tunnel(Upstream<N>, SocketAddr),
}

/// What a kept-alive connection holds while it waits for its next request: the socket, its
/// idle timer and when its last response ended. Everything a request needs (buffers, the
/// request's own state, several KiB) lives in a box that exists only while the connection is
/// busy, so an idle connection costs little more than its socket and its task.
pub(crate) struct Parked<I> {
    pub(crate) io: I,
    /// The first bytes of the next request (detection's, or read while parked).
    pub(crate) buf: BytesMut,
    /// The idle deadline's entry in the listener's [`IdleTimers`], while parked.
    timer: Option<IdleTimer>,
    idle_since: Instant,
}

/// How a busy period ended.
enum Busy<I> {
    /// The connection waited long enough for its next request to give back its memory.
    Parked(Parked<I>),
    /// The connection is closed (or handed to a tunnel, which closed it).
    Done,
}

impl<I: Io> Parked<I> {
    /// A new client connection, idle since `now`.
    pub(crate) fn new(io: I, now: Instant) -> Self {
        Self {
            io,
            buf: BytesMut::new(),
            timer: None,
            idle_since: now,
        }
    }

    /// Waits, holding only the socket and its idle timer, for the first bytes of the next
    /// request (read into a stack buffer, then kept in `buf`). False: the connection should
    /// close (the client closed it or failed, the idle timeout passed, or the proxy is
    /// draining).
    fn poll_park(
        &mut self,
        cx: &mut Context<'_>,
        drain: &mut Drain,
        timers: &Arc<IdleTimers>,
        idle_timeout: Duration,
    ) -> Poll<bool> {
        let mut stack = [0u8; super::io::READ_CHUNK];
        let mut read = tokio::io::ReadBuf::new(&mut stack);
        match Pin::new(&mut self.io).poll_read(cx, &mut read) {
            Poll::Ready(Ok(())) if !read.filled().is_empty() => {
                self.buf.reserve(super::io::READ_CHUNK);
                self.buf.extend_from_slice(read.filled());
                return Poll::Ready(true);
            }
            Poll::Ready(_) => return Poll::Ready(false),
            Poll::Pending => {}
        }
        if drain.poll_signaled(cx).is_ready() {
            return Poll::Ready(false);
        }
        let deadline = self.idle_since + idle_timeout;
        if timers
            .poll_expired(cx, &mut self.timer, deadline)
            .is_ready()
        {
            tracing::debug!("idle; closing");
            return Poll::Ready(false);
        }
        Poll::Pending
    }
}

/// Serves the HTTP/1 connection in `conn`: busy periods (boxed, holding buffers and the
/// request's state) with parked waits between them (holding only the [`Parked`] state, in the
/// caller's slot, so the connection's task stores it once). `original_dst`: where the
/// connection was headed before a redirect sent it to the proxy, which each request carries
/// into the exchange.
//
// Not an `async fn`: its arguments would be stored twice in the connection's task (as
// arguments, and as the locals they are moved into), and every idle connection pays for the
// task's size.
pub(crate) fn serve<'a, N: Net, I: Io>(
    conn: &'a mut Option<Parked<I>>,
    cx: &'a exchange::Context,
    pools: &'a Arc<Pools<N>>,
    timers: &'a Arc<IdleTimers>,
    drain: Drain,
    original_dst: Option<SocketAddr>,
) -> impl Future<Output = ()> + Send + 'a {
    let mut drain = drain;
    async move {
        loop {
            // Boxed once per busy period (not per request: a box per request costs ~7 % more
            // instructions, its allocation and the move of the future into it, measured with
            // proxy/benches/loopback/instructions.sh). The box is made before the await, so
            // the connection's task never holds the parked state twice.
            let Some(parked) = conn.take() else { return };
            let busy = Box::pin(busy(parked, cx, pools, &mut drain, original_dst));
            let Busy::Parked(next) = busy.await else {
                return;
            };
            let parked = conn.insert(next);
            let came = std::future::poll_fn(|task| {
                parked.poll_park(task, &mut drain, timers, pools.limits.idle_timeout)
            })
            .await;
            if !came {
                let _ = parked.io.shutdown().await;
                return;
            }
        }
    }
}

/// Serves requests one after another until the connection closes, or has waited
/// [`RELEASE_AFTER`] for its next request (then it parks).
async fn busy<N: Net, I: Io>(
    parked: Parked<I>,
    cx: &exchange::Context,
    pools: &Arc<Pools<N>>,
    drain: &mut Drain,
    original_dst: Option<SocketAddr>,
) -> Busy<I> {
    let clock = cx.clock;
    let limits = &pools.limits;
    let Parked {
        io,
        buf,
        timer,
        idle_since,
    } = parked;
    // Busy: the parked deadline's slot is freed now, not when the busy period ends.
    drop(timer);
    let mut conn = Conn {
        cx,
        pools,
        clock,
        limits,
        client: Side::new(io, buf),
        drain,
        forward: Vec::new(),
        // A busy period's own timer (the parked one is a slot in the listener's table, freed
        // with `parked`), allocated when it first has to wait.
        idle: Deadline::new(),
        response: Deadline::new(),
        idle_since,
        draining: false,
        replay: Replay::default(),
        grpc_timeout: Vec::new(),
        original_dst,
    };
    loop {
        let head = match conn.read_head().await {
            Ok(Read::Head(head)) => head,
            Ok(Read::Park) => {
                return Busy::Parked(Parked {
                    io: conn.client.io,
                    buf: BytesMut::new(),
                    timer: None,
                    idle_since: conn.idle_since,
                });
            }
            Ok(Read::Close) => break,
            Err(err) => {
                Box::pin(conn.reject(&err)).await;
                break;
            }
        };
        match conn.request(head).await {
            Next::KeepAlive if !conn.draining => {}
            Next::KeepAlive | Next::Close => break,
            Next::Tunnel(upstream, addr) => {
                // Boxed: rare, and larger than a request.
                Box::pin(tunnel(
                    conn.client,
                    upstream,
                    addr,
                    clock,
                    limits.idle_timeout,
                ))
                .await;
                return Busy::Done;
            }
        }
    }
    let _ = conn.client.io.shutdown().await;
    Busy::Done
}

/// How one wait for request bytes ended.
enum Waited {
    Read(io::Result<usize>),
    /// The connection waited [`RELEASE_AFTER`] with nothing half-done.
    Park,
}

/// What waiting for a request head gave.
enum Read {
    Head(RequestHead),
    /// Nothing arrived for [`RELEASE_AFTER`]: park the connection.
    Park,
    /// Close quietly (client gone, idle, header-read timeout, draining).
    Close,
}

struct Conn<'a, N: Net, I> {
    cx: &'a exchange::Context,
    pools: &'a Arc<Pools<N>>,
    clock: Clock,
    limits: &'a Limits,
    client: Side<I>,
    /// The drain signal, watched between requests.
    drain: &'a mut Drain,
    /// The current request's head as forwarded upstream, without its framing fields.
    forward: Vec<u8>,
    /// Waiting for a request head (the idle and header-read timeouts), and for response body
    /// bytes to move (the idle timeout and the request's deadline).
    idle: Deadline,
    /// Waiting for response headers (the response timeout and the attempt's deadline).
    response: Deadline,
    /// When the last response ended.
    idle_since: Instant,
    draining: bool,
    /// The current request's body as sent upstream, while it fits the replay limit.
    replay: Replay,
    /// The current request's own `grpc-timeout` value (sent on when the exchange gives none).
    grpc_timeout: Vec<u8>,
    /// Where the connection was headed before a redirect (the exchange's to use).
    original_dst: Option<SocketAddr>,
}

/// How long a kept-alive connection waits for its next request before it parks, giving back
/// its buffers and its request state (a busy connection keeps them from one request to the
/// next). Short, because memory given back late is not given back at all: a burst of new
/// connections interleaves their long-lived allocations with the busy state of the ones just
/// before, and the allocator cannot return the holes those leave. Per idle connection after
/// 8,000 connections of one request each (`proxy/benches/loopback/idle_memory.py`): 3,372
/// bytes of RSS with 1 s, 1,340 with 50 ms, 1,190 when parking at once. Long enough that a
/// client sending requests back to back (closed-loop load up to ~1,000 connections) never
/// parks: parking and unparking costs ~850 instructions a request (callgrind, 12,137 -> 12,991).
const RELEASE_AFTER: Duration = Duration::from_millis(50);

/// A request head as the exchange reads it: ranges of the connection's read buffer.
struct H1Head<'a> {
    head: &'a RequestHead,
    buf: &'a [u8],
}

impl RequestView for H1Head<'_> {
    fn method(&self) -> &[u8] {
        &self.buf[self.head.method.clone()]
    }

    fn path(&self) -> &[u8] {
        match &self.buf[self.head.path.clone()] {
            [] => b"/",
            path => path,
        }
    }

    fn any_header(&self, name: &http::HeaderName, matches: &mut dyn FnMut(&[u8]) -> bool) -> bool {
        // Parsed again only for a route with header conditions: the head is valid, so this
        // cannot fail, and most requests never get here.
        let mut fields = [httparse::EMPTY_HEADER; codec::FIELD_SLOTS];
        let block = &self.buf[self.head.fields..self.head.len];
        let Ok(httparse::Status::Complete((_, fields))) =
            httparse::parse_headers(block, &mut fields)
        else {
            return false;
        };
        fields
            .iter()
            .filter(|f| f.name.eq_ignore_ascii_case(name.as_str()))
            .any(|f| matches(f.value))
    }
}

impl exchange::Head for H1Head<'_> {
    fn authority(&self) -> Option<&str> {
        self.head
            .authority
            .clone()
            .and_then(|range| std::str::from_utf8(&self.buf[range]).ok())
    }

    fn grpc(&self) -> bool {
        self.head.grpc
    }

    fn grpc_timeout(&self) -> Option<&[u8]> {
        self.head.grpc_timeout.clone().map(|range| &self.buf[range])
    }
}

impl<N: Net, I: Io> Conn<'_, N, I> {
    /// Waits for the next request head.
    async fn read_head(&mut self) -> Result<Read, ProxyError> {
        let mut head_started: Option<Instant> = None;
        loop {
            if !self.client.rbuf.is_empty() {
                match codec::parse_request(
                    &self.client.rbuf,
                    self.limits.max_header_bytes,
                    &mut self.forward,
                ) {
                    Ok(Some(head)) => {
                        // A pipelining or busy client never lets the wait below see the drain
                        // signal: its response must still say `connection: close`.
                        if !self.draining && self.drain.is_draining() {
                            self.draining = true;
                        }
                        return Ok(Read::Head(head));
                    }
                    Ok(None) => {
                        head_started.get_or_insert_with(|| self.clock.now());
                    }
                    Err(CodecError::TooLarge(limit)) => {
                        return Err(ProxyError::HeadersTooLarge { limit });
                    }
                    Err(CodecError::Malformed(reason)) => {
                        return Err(ProxyError::Malformed {
                            reason: reason.into(),
                        });
                    }
                    Err(CodecError::Unsupported(reason)) => {
                        return Err(ProxyError::NotImplemented {
                            reason: reason.into(),
                        });
                    }
                }
            }
            // The next head must arrive whole within the idle timeout of the last response,
            // and within the header-read timeout of its first bytes.
            let idle = self.idle_since + self.limits.idle_timeout;
            let deadline = match head_started {
                None => idle,
                Some(started) => idle.min(started + self.limits.header_read_timeout),
            };
            // A connection that waited RELEASE_AFTER with nothing half-read or unwritten parks:
            // an idle kept-alive connection costs little more than its socket.
            let park = (head_started.is_none() && !self.client.has_output())
                .then_some(self.idle_since + RELEASE_AFTER)
                .filter(|at| *at < deadline);
            let waited = std::future::poll_fn(|cx| {
                // Input first: a busy connection finds its next head without touching the
                // drain signal, whose registration is only needed before sleeping.
                if !self.draining
                    && let Poll::Ready(read) = self.client.poll_read_more(cx)
                {
                    return Poll::Ready(Waited::Read(read));
                }
                if !self.draining && self.drain.poll_signaled(cx).is_ready() {
                    self.draining = true;
                }
                if self.draining {
                    if head_started.is_none() {
                        return Poll::Ready(Waited::Read(Ok(0)));
                    }
                    if let Poll::Ready(read) = self.client.poll_read_more(cx) {
                        return Poll::Ready(Waited::Read(read));
                    }
                }
                let wake = park.unwrap_or(deadline);
                if self.idle.poll_reached(cx, self.clock, wake).is_ready() {
                    if park.is_some() {
                        return Poll::Ready(Waited::Park);
                    }
                    return Poll::Ready(Waited::Read(Err(io::ErrorKind::TimedOut.into())));
                }
                Poll::Pending
            })
            .await;
            match waited {
                Waited::Park => return Ok(Read::Park),
                Waited::Read(Ok(0)) => return Ok(Read::Close),
                Waited::Read(Ok(_)) => {}
                Waited::Read(Err(err)) => {
                    tracing::debug!(error = %err, "no complete request head; closing");
                    return Ok(Read::Close);
                }
            }
        }
    }

    /// Answers a request that could not be read, and leaves the connection to close.
    async fn reject(&mut self, err: &ProxyError) {
        tracing::debug!(error = %err, "rejecting request");
        let response = err.to_response(false, true);
        self.client.clear_output();
        write_synthetic(&mut self.client.wbuf, &response, Persistence::Close);
        let _ = self.write_client().await;
    }

    /// Serves one request whose head starts the read buffer.
    async fn request(&mut self, head: RequestHead) -> Next<N> {
        let start = self.clock.now();
        let mut exchange = {
            let view = H1Head {
                head: &head,
                buf: &self.client.rbuf,
            };
            Exchange::begin(self.cx, &view, start, self.original_dst).await
        };
        self.grpc_timeout.clear();
        if let Some(range) = head.grpc_timeout.clone() {
            self.grpc_timeout
                .extend_from_slice(&self.client.rbuf[range]);
        }
        self.client.rbuf.advance(head.len);
        self.replay.reset(self.limits.replay_body_limit);
        let mut engine = H1Exchange {
            conn: self,
            head: &head,
            start,
            response: None,
        };
        exchange.forward(&mut engine).await
    }

    /// Reads until the read buffer holds `n` bytes of request body, each read within the idle
    /// timeout. `None`: the client stopped sending or went away (the attempt then reports it).
    async fn read_body(&mut self, n: usize) -> Option<()> {
        let clock = self.clock;
        let idle = self.limits.idle_timeout;
        let client = &mut self.client;
        let deadline = &mut self.idle;
        let mut last = clock.now();
        std::future::poll_fn(|cx| {
            while client.rbuf.len() < n {
                match client.poll_read_more(cx) {
                    Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(None),
                    Poll::Ready(Ok(_)) => last = clock.now(),
                    Poll::Pending => {
                        return if deadline.poll_reached(cx, clock, last + idle).is_ready() {
                            Poll::Ready(None)
                        } else {
                            Poll::Pending
                        };
                    }
                }
            }
            Poll::Ready(Some(()))
        })
        .await
    }

    /// An idle pooled connection to `addr` that is still open.
    async fn checkout(&mut self, addr: SocketAddr, now: Instant) -> Option<Upstream<N>> {
        checkout(self.pools, addr, now).await
    }

    /// Writes the request (head and body) and reads the response head, forwarding interim
    /// (1xx) responses. Returns the final head and the request body's pump if the upstream
    /// answered before the body was sent whole (it keeps moving beside the response: an app
    /// may stream both ways, or answer early). `reused`: the connection came from the pool
    /// (closed before any response, it proves nothing was processed for a safe request).
    async fn exchange(
        &mut self,
        head: &RequestHead,
        upstream: &mut Upstream<N>,
        attempt: &Attempt,
        reused: bool,
    ) -> Result<(ResponseHead, Upload), Failed> {
        let addr = attempt.addr;
        upstream.clear_output();
        upstream.wbuf.extend_from_slice(&self.forward);
        let grpc_timeout = match (&attempt.grpc_timeout, self.grpc_timeout.is_empty()) {
            (Some(value), _) => Some(value.as_bytes()),
            (None, false) => Some(&self.grpc_timeout[..]),
            (None, true) => None,
        };
        codec::finish_request_head(&mut upstream.wbuf, head, grpc_timeout);
        // The body: read from the client (kept while it fits), or the kept copy again.
        let mut body = None;
        if head.body.has_body() {
            if self.replay.untouched() {
                body = Some(Pump::new(
                    head.body,
                    head.body == Framing::Chunked,
                    self.limits.max_header_bytes,
                ));
            } else if let Some(kept) = self.replay.complete() {
                upstream.wbuf.extend_from_slice(kept);
            } else {
                // The exchange resends only whole requests.
                return Err(Failed::new(ProxyError::Unavailable {
                    reason: "request body cannot be sent again".into(),
                }));
            }
        }
        // A safe request on a reused connection the app closed before any of a response went
        // out may go again (RFC 9112 §9.3.1), on its first attempt only: a request that itself
        // kills its endpoint must not take down the next.
        let resend_on_close = reused && attempt.first && head.safe;
        let clock = self.clock;
        let timeout = self.limits.response_timeout;
        let idle = self.limits.idle_timeout;
        let deadline = attempt.deadline;
        // The last moment the upstream was handed part of the request: the response timeout
        // counts from here, and an upload that stops moving for the idle timeout ends.
        let mut progress = if timeout.is_some() || body.is_some() {
            clock.now()
        } else {
            Instant::ZERO
        };
        let mut write_failed = false;
        let mut received = false;
        let max = self.limits.max_header_bytes;
        let interim_ok = !head.http10;
        let client = &mut self.client;
        let replay = &mut self.replay;
        let response_deadline = &mut self.response;
        let idle_deadline = &mut self.idle;
        std::future::poll_fn(|cx| {
            loop {
                // The request: head, then body, upstream.
                if let Some(pump) = body.as_mut() {
                    let polled = pump.poll_recording(cx, client, upstream, Some(&mut *replay));
                    if std::mem::take(&mut pump.moved) {
                        progress = clock.now();
                    }
                    match polled {
                        Poll::Ready(Ok(())) => body = None,
                        Poll::Ready(Err(PumpError::Write(err))) => {
                            // Keep reading: the upstream may have answered before closing.
                            tracing::debug!(endpoint = %addr, error = %err, "request body not sent");
                            body = None;
                            write_failed = true;
                        }
                        Poll::Ready(Err(err)) => {
                            let mut failed = Failed::new(ProxyError::Malformed {
                                reason: err.to_string(),
                            });
                            failed.client_broken = true;
                            return Poll::Ready(Err(failed));
                        }
                        Poll::Pending => {}
                    }
                } else if upstream.has_output() && !write_failed {
                    match upstream.poll_write_out(cx) {
                        Poll::Ready(Ok(())) | Poll::Pending => {}
                        Poll::Ready(Err(err)) => {
                            tracing::debug!(endpoint = %addr, error = %err, "request not sent");
                            write_failed = true;
                        }
                    }
                }
                // Interim responses already queued for the client; while they wait, nothing
                // more is read from the upstream, so they cannot pile up.
                if client.has_output()
                    && let Poll::Ready(Err(err)) = client.poll_write_out(cx)
                {
                    let mut failed = Failed::new(ProxyError::Malformed {
                        reason: format!("client connection failed: {err}"),
                    });
                    failed.client_broken = true;
                    return Poll::Ready(Err(failed));
                }
                if !client.has_output() {
                    // The response head.
                    let mark = client.wbuf.len();
                    match codec::parse_response(&upstream.rbuf, max, head, &mut client.wbuf) {
                        Ok(Some(response))
                            if (100..200).contains(&response.status) && response.status != 101 =>
                        {
                            upstream.rbuf.advance(response.len);
                            if interim_ok {
                                codec::finish_response_head(
                                    &mut client.wbuf,
                                    Encoding::Identity,
                                    None,
                                    Persistence::KeepAlive,
                                    false,
                                );
                            } else {
                                client.wbuf.truncate(mark);
                            }
                            continue;
                        }
                        Ok(Some(response)) if head.http10 && response.codings.is_some() => {
                            // Codings an HTTP/1.0 client cannot be told about: the body would
                            // arrive undeclared. Nothing of the response has been sent; the
                            // upstream connection is dropped with its unread body.
                            client.wbuf.truncate(mark);
                            return Poll::Ready(Err(Failed::new(ProxyError::Upstream {
                                addr,
                                source: "a transfer coding an HTTP/1.0 client cannot receive"
                                    .into(),
                            })));
                        }
                        Ok(Some(response)) => {
                            // The head may not even be written whole yet: then the body (and
                            // the rest of the head) keeps moving beside the response.
                            let upload = match body.take() {
                                Some(pump) => Upload::Moving(pump),
                                None if write_failed => Upload::Broken,
                                None if upstream.has_output() => {
                                    Upload::Moving(Pump::new(Framing::Empty, false, 0))
                                }
                                None => Upload::Done,
                            };
                            return Poll::Ready(Ok((response, upload)));
                        }
                        Ok(None) => {}
                        Err(err) => {
                            client.wbuf.truncate(mark);
                            return Poll::Ready(Err(Failed::new(ProxyError::Upstream {
                                addr,
                                source: format!("invalid response: {err}").into(),
                            })));
                        }
                    }
                    match upstream.poll_read_more(cx) {
                        Poll::Ready(Ok(0)) => {
                            // Closed before a response. On a reused connection, before any of
                            // it, the server most likely closed it as idle while we sent.
                            let mut failed = Failed::new(ProxyError::Upstream {
                                addr,
                                source: io::Error::new(
                                    io::ErrorKind::UnexpectedEof,
                                    "connection closed before response headers",
                                )
                                .into(),
                            });
                            failed.unprocessed = resend_on_close && !received;
                            failed.client_broken = body.is_some();
                            return Poll::Ready(Err(failed));
                        }
                        Poll::Ready(Ok(_)) => {
                            received = true;
                            continue;
                        }
                        Poll::Ready(Err(err)) => {
                            let mut failed = Failed::new(ProxyError::Upstream {
                                addr,
                                source: err.into(),
                            });
                            failed.unprocessed = resend_on_close && !received;
                            failed.client_broken = body.is_some();
                            return Poll::Ready(Err(failed));
                        }
                        Poll::Pending => {}
                    }
                }
                // Without a response timeout, a client that goes away is the last bound on a
                // wait for a silent upstream: once the request is sent whole, its end of the
                // connection is watched (a reset, or its close; with a response timeout a close
                // may be a half-close that still reads the answer, so only a reset counts). Not
                // watched otherwise: it would cost a read per request.
                if timeout.is_none()
                    && body.is_none()
                    && !client.has_output()
                    && client.rbuf.len() < max
                    && let Poll::Ready(read) = client.poll_read_more(cx)
                {
                    match read {
                        // Pipelined bytes of a later request: kept for it.
                        Ok(n) if n > 0 => continue,
                        _ => {
                            tracing::debug!(endpoint = %addr, "client went away while waiting for response headers");
                            let mut failed = Failed::new(ProxyError::ClientClosed);
                            failed.client_broken = true;
                            return Poll::Ready(Err(failed));
                        }
                    }
                }
                // Response headers are awaited until the response timeout (from the last
                // request progress) or the attempt's deadline, whichever is first.
                let wake = match (timeout.map(|t| progress + t), deadline) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                if let Some(wake) = wake
                    && response_deadline.poll_reached(cx, clock, wake).is_ready()
                {
                    // The request body may be half read.
                    let client_broken = body.is_some();
                    let mut failed = if deadline.is_some_and(|d| wake >= d) {
                        Failed::deadline()
                    } else {
                        let timeout = timeout.unwrap_or_default();
                        tracing::debug!(endpoint = %addr, ?timeout, "no response headers in time; discarding the connection");
                        Failed::new(ProxyError::ResponseTimeout { addr, timeout })
                    };
                    failed.client_broken = client_broken;
                    return Poll::Ready(Err(failed));
                }
                if body.is_some() && idle_deadline.poll_reached(cx, clock, progress + idle).is_ready() {
                    tracing::debug!(endpoint = %addr, ?idle, "request body stopped moving; closing");
                    let mut failed = Failed::new(ProxyError::Malformed {
                        reason: format!("request body stopped for {idle:?}"),
                    });
                    failed.client_broken = true;
                    return Poll::Ready(Err(failed));
                }
                return Poll::Pending;
            }
        })
        .await
    }

    /// Streams a response (its head is queued) to the client, and the rest of the request
    /// upstream beside it if the upstream answered early; no byte moving for the idle timeout,
    /// or the request's `deadline` passing, ends it. `upload` says at the end whether the
    /// request was sent whole.
    async fn pump_response(
        &mut self,
        pump: &mut Pump,
        upstream: &mut Upstream<N>,
        upload: &mut Upload,
        deadline: Option<Instant>,
    ) -> Result<(), PumpError> {
        let clock = self.clock;
        let idle = self.limits.idle_timeout;
        let client = &mut self.client;
        // The idle timer: its deadlines, like the wait for the next head's, only move forward.
        let timer = &mut self.idle;
        let mut last: Option<Instant> = None;
        std::future::poll_fn(|cx| {
            let mut moved = false;
            if let Upload::Moving(sending) = upload {
                let polled = sending.poll(cx, client, upstream);
                moved |= std::mem::take(&mut sending.moved);
                match polled {
                    Poll::Ready(Ok(())) => *upload = Upload::Done,
                    // The response may still complete, but neither connection can carry
                    // another request.
                    Poll::Ready(Err(err)) => {
                        tracing::debug!(error = %err, "request body ended early");
                        *upload = Upload::Broken;
                    }
                    Poll::Pending => {}
                }
            }
            if let Poll::Ready(ended) = pump.poll(cx, upstream, client) {
                return Poll::Ready(ended);
            }
            moved |= std::mem::take(&mut pump.moved);
            // Only a response that has to wait pays for the clock.
            if last.is_none() || moved {
                last = Some(clock.now());
            }
            let since = last.unwrap_or(Instant::ZERO);
            let wake = deadline.map_or(since + idle, |d| d.min(since + idle));
            if timer.poll_reached(cx, clock, wake).is_ready() {
                if deadline.is_some_and(|d| wake >= d) {
                    return Poll::Ready(Err(PumpError::Deadline));
                }
                return Poll::Ready(Err(PumpError::Read(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no bytes moved within the idle timeout",
                ))));
            }
            Poll::Pending
        })
        .await
    }

    /// Writes the queued client output; a client that reads nothing for the idle timeout is
    /// given up on.
    async fn write_client(&mut self) -> io::Result<()> {
        write_within(
            &mut self.client,
            &mut self.idle,
            self.clock,
            self.limits.idle_timeout,
        )
        .await
    }
}

/// Writes `side`'s queued output, failing once no byte has moved for `idle`.
async fn write_within<I: Io>(
    side: &mut Side<I>,
    deadline: &mut Deadline,
    clock: Clock,
    idle: Duration,
) -> io::Result<()> {
    let mut last: Option<Instant> = None;
    std::future::poll_fn(|cx| {
        let before = side.pending_output();
        if let Poll::Ready(written) = side.poll_write_out(cx) {
            return Poll::Ready(written);
        }
        if last.is_none() || side.pending_output() < before {
            last = Some(clock.now());
        }
        let since = last.unwrap_or(Instant::ZERO);
        if deadline.poll_reached(cx, clock, since + idle).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the peer read nothing within the idle timeout",
            )));
        }
        Poll::Pending
    })
    .await
}

/// The HTTP/1 engine's side of one exchange: the connection, the request's head, and what it
/// takes to send it (again) and stream its response.
struct H1Exchange<'c, 'a, N: Net, I> {
    conn: &'c mut Conn<'a, N, I>,
    head: &'c RequestHead,
    start: Instant,
    /// The response head and the connection it arrived on, kept here (not moved through the
    /// exchange) from [`Engine::send`] to [`Engine::respond`].
    response: Option<H1Response<N>>,
}

/// What the exchange holds of an HTTP/1 response: the engine keeps the response itself.
#[derive(Debug)]
struct H1Received;

impl<N: Net, I: Io> Engine for H1Exchange<'_, '_, N, I> {
    type Response = H1Received;
    type Output = Next<N>;
    const HTTP1: bool = true;

    async fn send(&mut self, attempt: &Attempt) -> Result<Sent<H1Received>, Failed> {
        let addr = attempt.addr;
        let conn = &mut *self.conn;
        let (mut upstream, reused) = match conn.checkout(addr, self.start).await {
            Some(upstream) => (upstream, true),
            // Boxed: a connect is rare on kept-alive traffic, and its future is large.
            None => match Box::pin(connect_or_returned(conn.pools, addr)).await {
                Ok(acquired) => acquired,
                Err(error) => return Err(Failed::unprocessed(error)),
            },
        };
        match conn
            .exchange(self.head, &mut upstream, attempt, reused)
            .await
        {
            Ok((head, upload)) => {
                // The copy of the body stays until the exchange decides whether to retry.
                self.response = Some(H1Response {
                    upstream,
                    head,
                    upload,
                    addr,
                });
                Ok(Sent {
                    response: H1Received,
                    connected: !reused,
                })
            }
            Err(mut failed) => {
                failed.connected = !reused;
                Err(failed)
            }
        }
    }

    fn replayable(&self) -> bool {
        self.conn.replay.untouched() || self.conn.replay.complete().is_some()
    }

    fn discard(&mut self, _: H1Received) {
        // The head was parsed only once the client had no output pending, so what is pending
        // now is that head (or part of it) and nothing else.
        self.conn.client.clear_output();
        // The connection goes with the response's unread body.
        if let Some(response) = self.response.take() {
            tracing::debug!(endpoint = %response.addr, status = response.head.status, "response discarded");
        }
    }

    fn facts<'r>(&'r self, _: &'r H1Received) -> Facts<'r> {
        let Some(response) = &self.response else {
            return Facts::NO_HEAD;
        };
        Facts {
            status: StatusCode::from_u16(response.head.status).unwrap_or(StatusCode::BAD_GATEWAY),
            grpc: response.head.grpc,
            grpc_status: response
                .head
                .grpc_status
                .clone()
                .map(|range| &response.upstream.rbuf[range]),
        }
    }

    /// Forwards the response head and body, settles the request, and pools the upstream
    /// connection when it can carry another request.
    async fn respond(&mut self, _: H1Received, settle: Settle) -> Next<N> {
        let Some(H1Response {
            mut upstream,
            head: response,
            mut upload,
            addr,
        }) = self.response.take()
        else {
            // `respond` follows a successful `send`.
            settle.end(BodyEnd::Error);
            return Next::Close;
        };
        let head = self.head;
        let conn = &mut *self.conn;
        // The caller gets this response: nobody sends the request again.
        conn.replay.release();
        upstream.rbuf.advance(response.len);
        let status = response.status;
        if (head.connect && (200..300).contains(&status)) || status == 101 {
            codec::finish_response_head(
                &mut conn.client.wbuf,
                Encoding::Identity,
                None,
                Persistence::KeepAlive,
                status == 101,
            );
            settle.end(BodyEnd::Switched);
            return Next::Tunnel(upstream, addr);
        }
        let encoding = match response.body {
            Framing::Chunked | Framing::Close if !head.http10 => Encoding::Chunked,
            _ => Encoding::Identity,
        };
        let mut close = !head.keep_alive
            || conn.draining
            || (head.http10 && matches!(response.body, Framing::Chunked | Framing::Close));
        // Whether the request will have been sent whole is known only at the end;
        // `connection: close` is decided now, so an unfinished upload closes.
        close |= !matches!(upload, Upload::Done);
        codec::finish_response_head(
            &mut conn.client.wbuf,
            encoding,
            response.codings.as_deref(),
            Persistence::new(close, head.http10),
            false,
        );
        let mut pump = Pump::new(
            response.body,
            encoding == Encoding::Chunked,
            conn.limits.max_header_bytes,
        );
        let ended = conn
            .pump_response(&mut pump, &mut upstream, &mut upload, settle.deadline())
            .await;
        let end = conn.clock.now();
        conn.idle_since = end;
        match ended {
            Ok(()) => {
                if response.reusable
                    && matches!(upload, Upload::Done)
                    && upstream.rbuf.is_empty()
                    && !upstream.has_output()
                {
                    upstream.shrink();
                    conn.pools.checkin_h1(addr, upstream, end);
                }
                conn.client.shrink();
                settle.end(BodyEnd::Complete {
                    trailers: pump.trailer_map(),
                });
                if close { Next::Close } else { Next::KeepAlive }
            }
            Err(PumpError::Deadline) => {
                tracing::debug!(endpoint = %addr, "request deadline passed mid-response; closing");
                settle.end(BodyEnd::TimedOut);
                Next::Close
            }
            Err(err) => {
                tracing::debug!(endpoint = %addr, error = %err, "response failed");
                settle.end(BodyEnd::Error);
                Next::Close
            }
        }
    }

    /// Sends the proxy's own response.
    async fn answer(
        &mut self,
        response: http::Response<crate::body::Body>,
        client_broken: bool,
    ) -> Next<N> {
        let head = self.head;
        let conn = &mut *self.conn;
        // A body the request still has unread cannot be skipped safely: close after this.
        let close = client_broken
            || !head.keep_alive
            || head.body.has_body()
            || conn.draining
            || response.headers().contains_key(http::header::CONNECTION);
        conn.client.clear_output();
        write_synthetic(
            &mut conn.client.wbuf,
            &response,
            Persistence::new(close, head.http10),
        );
        let written = conn.write_client().await;
        conn.idle_since = conn.clock.now();
        match written {
            Ok(()) if !close => Next::KeepAlive,
            _ => Next::Close,
        }
    }

    type Copy = H1Copy<N>;

    async fn copy(&mut self) -> Option<H1Copy<N>> {
        let head = self.head;
        if head.upgrade || head.connect || head.http10 {
            return None;
        }
        let conn = &mut *self.conn;
        let body = if !head.body.has_body() {
            Vec::new()
        } else if let Some(kept) = conn.replay.complete() {
            kept.to_vec()
        } else if conn.replay.untouched()
            && let Some(n) = copy::small_body(head, conn.limits.replay_body_limit)
        {
            // A body that fits the replay limit is read whole before the first attempt, so
            // every attempt sends the same copy and the client's connection is past the body
            // whichever attempt wins.
            conn.read_body(n).await?;
            let body = conn.client.rbuf[..n].to_vec();
            conn.replay.keep_whole(&body);
            conn.client.rbuf.advance(n);
            body
        } else {
            // A chunked or large body is streamed by the first attempt, and not hedged.
            return None;
        };
        Some(H1Copy::new(
            Arc::clone(conn.pools),
            head.clone(),
            conn.forward.clone(),
            conn.grpc_timeout.clone(),
            body,
        ))
    }

    fn adopt(&mut self, hedged: H1Hedged<N>) -> H1Received {
        // The hedge's head goes after whatever interim responses the engine's own attempt
        // forwarded.
        self.conn.client.wbuf.extend_from_slice(&hedged.client_head);
        self.response = Some(hedged.response);
        H1Received
    }
}

/// Serializes a response the proxy made (its body is always empty).
fn write_synthetic(
    out: &mut Vec<u8>,
    response: &http::Response<crate::body::Body>,
    persistence: Persistence,
) {
    crate::errors::respond::write_http1(out, response, persistence.field());
}

/// Carries a switched connection (WebSocket, CONNECT) both ways until either side closes, or
/// no byte has moved either way for `idle`: a tunnel to a vanished peer must not hold its
/// sockets forever. Bytes either side sent before the switch go first.
async fn tunnel<I: Io, U: Io>(
    mut client: Side<I>,
    mut upstream: Side<U>,
    addr: SocketAddr,
    clock: Clock,
    idle: Duration,
) {
    let early_up = client.rbuf.split();
    upstream.wbuf.extend_from_slice(&early_up);
    let early_down = upstream.rbuf.split();
    client.wbuf.extend_from_slice(&early_down);
    let mut deadline = Deadline::new();
    if let Err(err) = write_within(&mut client, &mut deadline, clock, idle).await {
        tracing::debug!(endpoint = %addr, error = %err, "tunnel failed");
        return;
    }
    if let Err(err) = write_within(&mut upstream, &mut deadline, clock, idle).await {
        tracing::debug!(endpoint = %addr, error = %err, "tunnel failed");
        return;
    }
    let mut client = ActivityIo::new(client.io, clock);
    let watchdog = crate::transport::idle_watchdog(client.activity(), clock, idle);
    let mut server = upstream.io;
    tokio::select! {
        result = tokio::io::copy_bidirectional(&mut client, &mut server) => match result {
            Ok((up, down)) => tracing::debug!(endpoint = %addr, up, down, "tunnel closed"),
            Err(err) => tracing::debug!(endpoint = %addr, error = %err, "tunnel failed"),
        },
        () = watchdog => tracing::debug!(endpoint = %addr, ?idle, "tunnel idle; closing"),
    }
}
