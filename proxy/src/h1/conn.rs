//! Serving one HTTP/1 client connection: read a request head, route and balance it, send it
//! over a pooled upstream connection, stream both bodies, settle, and go on to the next
//! request while the connection is kept alive.
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
use conduit_core::balance::{InFlight, Picked};
use conduit_core::classify::{Outcome, ResponseClass, TransportError};
use conduit_core::time::Instant;
use http::{HeaderMap, HeaderValue, StatusCode};
use tokio::io::AsyncWriteExt;

use super::codec::{self, CodecError, Encoding, Framing, Persistence, RequestHead, ResponseHead};
use super::io::{Pump, PumpError, Side};
use crate::admin::metrics::AuthorityMetrics;
use crate::balance::ServiceBalancer;
use crate::clock::Clock;
use crate::drain::Drain;
use crate::errors::ProxyError;
use crate::http::{HttpProxy, MAX_ATTEMPTS_UNSENT};
use crate::net::{Io, Net};
use crate::transport::{ActivityIo, CountingIo};

/// An upstream HTTP/1.1 connection as the pool keeps it.
pub(crate) type Upstream<N> = Side<CountingIo<<N as Net>::Io>>;

/// A timer owned by a connection and re-armed lazily: waiting for a later deadline than the
/// one armed costs nothing until the armed one fires, so kept-alive requests, whose deadlines
/// only move forward, never touch the timer wheel. Only the connection's task polls it, so
/// once registered it wakes that task without being polled again.
#[derive(Debug)]
struct Deadline {
    sleep: Pin<Box<tokio::time::Sleep>>,
    armed: Option<Instant>,
    /// Polled since it was last armed: the timer holds the task's waker.
    registered: bool,
}

impl Deadline {
    fn new(clock: Clock) -> Self {
        Self {
            sleep: Box::pin(tokio::time::sleep_until(clock.to_tokio(Instant::ZERO))),
            armed: None,
            registered: false,
        }
    }

    /// Ready once `deadline` has passed.
    fn poll_reached(&mut self, cx: &mut Context<'_>, clock: Clock, deadline: Instant) -> Poll<()> {
        loop {
            if self.armed.is_none_or(|armed| armed > deadline) {
                self.sleep.as_mut().reset(clock.to_tokio(deadline));
                self.armed = Some(deadline);
                self.registered = false;
            }
            if self.registered && !self.sleep.is_elapsed() {
                return Poll::Pending;
            }
            // Outside the task's cooperative budget: a poll refused for budget would leave
            // the timer without the waker while we count it as registered.
            let mut unconstrained = tokio::task::unconstrained(self.sleep.as_mut());
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

/// Serves an HTTP/1 connection whose first bytes (at least one whole request head, checked
/// by detection) are in `buf`.
pub(crate) async fn serve<N: Net, I: Io>(
    io: I,
    buf: BytesMut,
    http: &Arc<HttpProxy<N>>,
    limits: Limits,
    mut drain: Drain,
) {
    let clock = http.clock;
    let mut conn = Conn {
        http,
        clock,
        limits,
        client: Side::new(io, buf),
        drain: drain.clone(),
        forward: Vec::new(),
        idle: Deadline::new(clock),
        response: Deadline::new(clock),
        idle_since: clock.now(),
        draining: false,
    };
    let mut drained = std::pin::pin!(drain.signaled());
    loop {
        let head = match conn.read_head(drained.as_mut()).await {
            Ok(Some(head)) => head,
            Ok(None) => break,
            Err(err) => {
                conn.reject(&err).await;
                break;
            }
        };
        match conn.request(head).await {
            Next::KeepAlive if !conn.draining => {}
            Next::KeepAlive | Next::Close => break,
            Next::Tunnel(upstream, addr) => {
                tunnel(conn.client, upstream, addr, clock, limits.idle_timeout).await;
                return;
            }
        }
    }
    let _ = conn.client.io.shutdown().await;
}

/// The limits the engine applies.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub(crate) max_header_bytes: usize,
    pub(crate) header_read_timeout: Duration,
    pub(crate) idle_timeout: Duration,
    pub(crate) response_timeout: Option<Duration>,
}

struct Conn<'a, N: Net, I> {
    http: &'a Arc<HttpProxy<N>>,
    clock: Clock,
    limits: Limits,
    client: Side<I>,
    /// For a look at the drain signal between requests of a busy connection.
    drain: Drain,
    /// The current request's head as forwarded upstream.
    forward: Vec<u8>,
    /// Waiting for a request head (the idle and header-read timeouts), and for response body
    /// bytes to move (the idle timeout).
    idle: Deadline,
    /// Waiting for response headers (the response timeout).
    response: Deadline,
    /// When the last response ended.
    idle_since: Instant,
    draining: bool,
}

/// How an exchange with the upstream failed before response headers.
struct Failed {
    error: ProxyError,
    /// Nothing of the request was processed: safe to send again.
    unsent: bool,
    /// The client's connection cannot carry another request.
    client_broken: bool,
}

impl Failed {
    fn upstream(addr: SocketAddr, source: impl Into<crate::body::BoxError>) -> Self {
        Self {
            error: ProxyError::Upstream {
                addr,
                source: source.into(),
            },
            unsent: false,
            client_broken: false,
        }
    }
}

impl<N: Net, I: Io> Conn<'_, N, I> {
    /// Waits for the next request head. `Ok(None)`: the connection should close quietly
    /// (client gone, idle, header-read timeout, draining).
    async fn read_head(
        &mut self,
        mut drained: Pin<&mut impl Future<Output = ()>>,
    ) -> Result<Option<RequestHead>, ProxyError> {
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
                        return Ok(Some(head));
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
            let waited = std::future::poll_fn(|cx| {
                // Input first: a busy connection finds its next head without touching the
                // drain signal, whose registration is only needed before sleeping.
                if !self.draining
                    && let Poll::Ready(read) = self.client.poll_read_more(cx)
                {
                    return Poll::Ready(read);
                }
                if !self.draining && drained.as_mut().poll(cx).is_ready() {
                    self.draining = true;
                }
                if self.draining {
                    if head_started.is_none() {
                        return Poll::Ready(Ok(0));
                    }
                    if let Poll::Ready(read) = self.client.poll_read_more(cx) {
                        return Poll::Ready(read);
                    }
                }
                if self.idle.poll_reached(cx, self.clock, deadline).is_ready() {
                    return Poll::Ready(Err(io::ErrorKind::TimedOut.into()));
                }
                Poll::Pending
            })
            .await;
            match waited {
                Ok(0) => return Ok(None),
                Ok(_) => {}
                Err(err) => {
                    tracing::debug!(error = %err, "no complete request head; closing");
                    return Ok(None);
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
        let http = self.http;
        let start = self.clock.now();
        let routed = {
            let authority = head
                .authority
                .clone()
                .and_then(|range| std::str::from_utf8(&self.client.rbuf[range]).ok());
            http.route(authority, start).await
        };
        self.client.rbuf.advance(head.len);
        codec::finish_request_head(&mut self.forward, &head);
        let (series, service) = match routed {
            Ok(routed) => routed,
            Err((series, err)) => return self.answer(&head, &series, start, &err).await,
        };
        match self.forward(&head, &series, service.as_ref(), start).await {
            Ok(next) => next,
            Err(err) => {
                tracing::debug!(error = %err.error, "proxy error");
                let next = self.answer(&head, &series, start, &err.error).await;
                if err.client_broken { Next::Close } else { next }
            }
        }
    }

    /// Sends the proxy's own response for `err`.
    async fn answer(
        &mut self,
        head: &RequestHead,
        series: &AuthorityMetrics,
        start: Instant,
        err: &ProxyError,
    ) -> Next<N> {
        let response = self.http.synthesize(err, series, start, head.grpc, true);
        // A body the request still has unread cannot be skipped safely: close after this.
        let close = !head.keep_alive
            || head.body.has_body()
            || self.draining
            || response.headers().contains_key(http::header::CONNECTION);
        self.client.clear_output();
        write_synthetic(
            &mut self.client.wbuf,
            &response,
            Persistence::new(close, head.http10),
        );
        let written = self.write_client().await;
        self.idle_since = self.clock.now();
        match written {
            Ok(()) if !close => Next::KeepAlive,
            _ => Next::Close,
        }
    }

    /// Sends the request upstream (again on another endpoint if it was provably not
    /// processed), then streams the response back.
    async fn forward(
        &mut self,
        head: &RequestHead,
        series: &Arc<AuthorityMetrics>,
        service: Option<&Arc<ServiceBalancer>>,
        start: Instant,
    ) -> Result<Next<N>, Failed> {
        let http = self.http;
        let mut attempts = 0;
        let mut repicked: Option<Picked> = None;
        loop {
            attempts += 1;
            let (addr, in_flight) =
                http.pick(service, repicked.take(), start)
                    .await
                    .map_err(|error| Failed {
                        error,
                        unsent: false,
                        client_broken: false,
                    })?;
            // A reused connection the app closed just as the request went out: a safe request
            // without a body may go again on a new one, on its first attempt only (a request
            // that itself kills its endpoint must not take down the next).
            let resend_on_close = attempts == 1 && head.safe && !head.body.has_body();
            let exchanged = match self.checkout(addr, start).await {
                Some(mut upstream) => self
                    .exchange(head, &mut upstream, addr, resend_on_close)
                    .await
                    .map(|response| (upstream, response)),
                None => match http.pools.connect(addr).await {
                    Ok(io) => {
                        if let Some(service) = service {
                            service.connect_succeeded(addr);
                        }
                        let mut upstream = Side::new(io, BytesMut::new());
                        self.exchange(head, &mut upstream, addr, false)
                            .await
                            .map(|response| (upstream, response))
                    }
                    Err(error) => Err(Failed {
                        error,
                        unsent: true,
                        client_broken: false,
                    }),
                },
            };
            let failed = match exchanged {
                Ok((upstream, (response, upload))) => {
                    return Ok(self
                        .respond(Respond {
                            head,
                            series,
                            service,
                            start,
                            addr,
                            in_flight,
                            upstream,
                            response,
                            upload,
                        })
                        .await);
                }
                Err(failed) => failed,
            };
            http.failed(service, addr, in_flight.as_ref(), &failed.error);
            // The endpoint's load settles before another pick.
            drop(in_flight);
            if failed.unsent && !failed.client_broken {
                if service.is_none() {
                    // The fixed target (the local app): a reused connection it had closed is
                    // worth one more try on a new connection; a refused connect is not.
                    if matches!(failed.error, ProxyError::Upstream { .. })
                        && attempts < MAX_ATTEMPTS_UNSENT
                    {
                        tracing::debug!(endpoint = %addr, error = %failed.error, "request not processed; sending it again");
                        continue;
                    }
                    return Err(failed);
                }
                repicked = http.retry(service, attempts, &failed.error, addr);
                if repicked.is_some() {
                    continue;
                }
            }
            return Err(failed);
        }
    }

    /// An idle pooled connection to `addr` that is still open.
    async fn checkout(&mut self, addr: SocketAddr, now: Instant) -> Option<Upstream<N>> {
        while let Some(mut upstream) = self.http.pools.checkout_h1(addr, now) {
            // An idle connection has nothing to say: input (or its end) means the server
            // closed it or broke protocol. Polling costs no syscall while nothing arrived.
            let alive =
                std::future::poll_fn(|cx| Poll::Ready(upstream.poll_read_more(cx).is_pending()))
                    .await;
            if alive {
                return Some(upstream);
            }
            tracing::trace!(endpoint = %addr, "pooled connection closed while idle");
        }
        None
    }

    /// Writes the request (head and body) and reads the response head, forwarding interim
    /// (1xx) responses. Returns the final head and the request body's pump if the upstream
    /// answered before the body was sent whole (it keeps moving beside the response: an app
    /// may stream both ways, or answer early).
    async fn exchange(
        &mut self,
        head: &RequestHead,
        upstream: &mut Upstream<N>,
        addr: SocketAddr,
        resend_on_close: bool,
    ) -> Result<(ResponseHead, Upload), Failed> {
        upstream.clear_output();
        upstream.wbuf.extend_from_slice(&self.forward);
        let mut body = head.body.has_body().then(|| {
            Pump::new(
                head.body,
                head.body == Framing::Chunked,
                self.limits.max_header_bytes,
            )
        });
        let clock = self.clock;
        let timeout = self.limits.response_timeout;
        let idle = self.limits.idle_timeout;
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
        let response_deadline = &mut self.response;
        let idle_deadline = &mut self.idle;
        std::future::poll_fn(|cx| {
            loop {
                // The request: head, then body, upstream.
                if let Some(pump) = body.as_mut() {
                    let polled = pump.poll(cx, client, upstream);
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
                            return Poll::Ready(Err(Failed {
                                error: ProxyError::Malformed {
                                    reason: err.to_string(),
                                },
                                unsent: false,
                                client_broken: true,
                            }));
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
                        return Poll::Ready(Err(Failed {
                            error: ProxyError::Malformed {
                                reason: format!("client connection failed: {err}"),
                            },
                            unsent: false,
                            client_broken: true,
                        }));
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
                            return Poll::Ready(Err(Failed::upstream(
                                addr,
                                format!("invalid response: {err}"),
                            )));
                        }
                    }
                    match upstream.poll_read_more(cx) {
                        Poll::Ready(Ok(0)) => {
                            // Closed before a response. On a reused connection, before any of
                            // it, the server most likely closed it as idle while we sent: an
                            // idempotent request without a body may go again (RFC 9112
                            // §9.3.1), once.
                            let mut failed = Failed::upstream(
                                addr,
                                io::Error::new(
                                    io::ErrorKind::UnexpectedEof,
                                    "connection closed before response headers",
                                ),
                            );
                            failed.unsent = resend_on_close && !received;
                            return Poll::Ready(Err(failed));
                        }
                        Poll::Ready(Ok(_)) => {
                            received = true;
                            continue;
                        }
                        Poll::Ready(Err(err)) => {
                            let mut failed = Failed::upstream(addr, err);
                            failed.unsent = resend_on_close && !received;
                            return Poll::Ready(Err(failed));
                        }
                        Poll::Pending => {}
                    }
                }
                if let Some(timeout) = timeout
                    && response_deadline
                        .poll_reached(cx, clock, progress + timeout)
                        .is_ready()
                {
                    tracing::debug!(endpoint = %addr, ?timeout, "no response headers in time; discarding the connection");
                    return Poll::Ready(Err(Failed {
                        error: ProxyError::ResponseTimeout { addr, timeout },
                        unsent: false,
                        // The request body may be half read.
                        client_broken: body.is_some(),
                    }));
                }
                if body.is_some() && idle_deadline.poll_reached(cx, clock, progress + idle).is_ready() {
                    tracing::debug!(endpoint = %addr, ?idle, "request body stopped moving; closing");
                    return Poll::Ready(Err(Failed {
                        error: ProxyError::Malformed {
                            reason: format!("request body stopped for {idle:?}"),
                        },
                        unsent: false,
                        client_broken: true,
                    }));
                }
                return Poll::Pending;
            }
        })
        .await
    }

    /// Forwards the response head and body, settles the request, and pools the upstream
    /// connection when it can carry another request. Returns what the client connection does
    /// next.
    async fn respond(&mut self, r: Respond<'_, N>) -> Next<N> {
        let Respond {
            head,
            series,
            service,
            start,
            addr,
            in_flight,
            mut upstream,
            response,
            mut upload,
        } = r;
        let http = self.http;
        if head.http10 && response.codings.is_some() {
            // Codings an HTTP/1.0 client cannot be told about: the body would arrive
            // undeclared. Nothing of the response has been sent; the upstream connection is
            // dropped with its unread body.
            drop(in_flight);
            let err = ProxyError::Upstream {
                addr,
                source: "a transfer coding an HTTP/1.0 client cannot receive".into(),
            };
            return self.answer(head, series, start, &err).await;
        }
        let now = self.clock.now();
        let status = response.status;
        series.response_headers(now, status, now.saturating_duration_since(start));
        if let (Some(service), Some(in_flight)) = (service, &in_flight) {
            service.observe_at(now, in_flight);
        }
        let class = classify(http, &response, &upstream.rbuf);
        upstream.rbuf.advance(response.len);

        if (head.connect && (200..300).contains(&status)) || status == 101 {
            codec::finish_response_head(
                &mut self.client.wbuf,
                Encoding::Identity,
                None,
                Persistence::KeepAlive,
                status == 101,
            );
            // A completed switch is the response the client asked for.
            series.response_end(now, status, Outcome::Success);
            return Next::Tunnel(upstream, addr);
        }
        let encoding = match response.body {
            Framing::Chunked | Framing::Close if !head.http10 => Encoding::Chunked,
            _ => Encoding::Identity,
        };
        let mut close = !head.keep_alive
            || self.draining
            || (head.http10 && matches!(response.body, Framing::Chunked | Framing::Close));
        // Whether the request will have been sent whole is known only at the end;
        // `connection: close` is decided now, so an unfinished upload closes.
        close |= !matches!(upload, Upload::Done);
        codec::finish_response_head(
            &mut self.client.wbuf,
            encoding,
            response.codings.as_deref(),
            Persistence::new(close, head.http10),
            false,
        );
        let mut pump = Pump::new(
            response.body,
            encoding == Encoding::Chunked,
            self.limits.max_header_bytes,
        );
        let ended = self
            .pump_response(&mut pump, &mut upstream, &mut upload)
            .await;
        let trailers = pump.trailer_map();
        let end = self.clock.now();
        self.idle_since = end;
        let (outcome, next) = match ended {
            Ok(()) => {
                let outcome = match class {
                    ResponseClass::Final(class) => class.outcome,
                    ResponseClass::Pending(pending) => {
                        http.classifier
                            .classify_eos(pending, trailers.as_ref())
                            .outcome
                    }
                };
                if response.reusable
                    && matches!(upload, Upload::Done)
                    && upstream.rbuf.is_empty()
                    && !upstream.has_output()
                {
                    upstream.shrink();
                    http.pools.checkin_h1(addr, upstream, end);
                }
                self.client.shrink();
                (outcome, if close { Next::Close } else { Next::KeepAlive })
            }
            Err(err) => {
                tracing::debug!(endpoint = %addr, error = %err, "response failed");
                let outcome = http
                    .classifier
                    .classify_error(TransportError::Reset)
                    .outcome;
                (outcome, Next::Close)
            }
        };
        series.response_end(end, status, outcome);
        drop(in_flight);
        next
    }

    /// Streams a response (its head is queued) to the client, and the rest of the request
    /// upstream beside it if the upstream answered early; no byte moving for the idle timeout
    /// ends it. `upload` says at the end whether the request was sent whole.
    async fn pump_response(
        &mut self,
        pump: &mut Pump,
        upstream: &mut Upstream<N>,
        upload: &mut Upload,
    ) -> Result<(), PumpError> {
        let clock = self.clock;
        let idle = self.limits.idle_timeout;
        let client = &mut self.client;
        // The idle timer: its deadlines, like the wait for the next head's, only move forward.
        let deadline = &mut self.idle;
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
            if deadline.poll_reached(cx, clock, since + idle).is_ready() {
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

/// Everything [`Conn::respond`] needs.
struct Respond<'a, N: Net> {
    head: &'a RequestHead,
    series: &'a Arc<AuthorityMetrics>,
    service: Option<&'a Arc<ServiceBalancer>>,
    start: Instant,
    addr: SocketAddr,
    in_flight: Option<InFlight>,
    upstream: Upstream<N>,
    response: ResponseHead,
    /// The rest of the request, when the upstream answered before it was sent whole.
    upload: Upload,
}

/// Where the request stands when its response head arrives.
#[derive(Debug)]
enum Upload {
    /// Sent whole.
    Done,
    /// Still moving (full-duplex streaming, or an early answer).
    Moving(Pump),
    /// Sending it failed: neither connection can carry another request.
    Broken,
}

/// The response's class as far as its head tells (gRPC needs the trailers too).
fn classify<N: Net>(http: &HttpProxy<N>, response: &ResponseHead, buf: &[u8]) -> ResponseClass {
    let status = StatusCode::from_u16(response.status).unwrap_or(StatusCode::BAD_GATEWAY);
    if !response.grpc {
        return http.classifier.classify_response(status, &HeaderMap::new());
    }
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    if let Some(value) = response
        .grpc_status
        .clone()
        .and_then(|range| HeaderValue::from_bytes(&buf[range]).ok())
    {
        headers.insert("grpc-status", value);
    }
    http.classifier.classify_response(status, &headers)
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
    let mut deadline = Deadline::new(clock);
    if let Err(err) = write_within(&mut client, &mut deadline, clock, idle).await {
        tracing::debug!(endpoint = %addr, error = %err, "tunnel failed");
        return;
    }
    if let Err(err) = write_within(&mut upstream, &mut deadline, clock, idle).await {
        tracing::debug!(endpoint = %addr, error = %err, "tunnel failed");
        return;
    }
    let mut client = ActivityIo::new(client.io, clock);
    let activity = client.activity();
    let mut server = upstream.io;
    let watchdog = async {
        loop {
            clock.sleep_until(activity.last(clock) + idle).await;
            if clock.now().saturating_duration_since(activity.last(clock)) >= idle {
                return;
            }
        }
    };
    tokio::select! {
        result = tokio::io::copy_bidirectional(&mut client, &mut server) => match result {
            Ok((up, down)) => tracing::debug!(endpoint = %addr, up, down, "tunnel closed"),
            Err(err) => tracing::debug!(endpoint = %addr, error = %err, "tunnel failed"),
        },
        () = watchdog => tracing::debug!(endpoint = %addr, ?idle, "tunnel idle; closing"),
    }
}
