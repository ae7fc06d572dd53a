//! What both directions' HTTP/2 connections (the server and client modules beside this one)
//! share: their windows, keep-alive pings, socket reads and writes, the conversions between
//! header lists and header maps, and the queue an incoming body waits in for its reader.
//!
//! Both directions send keep-alive pings so a peer that vanished without closing (a partition,
//! a crashed host) is found: a ping every interval, and the connection ends when one goes
//! unanswered for [`PING_TIMEOUT`].

use std::collections::VecDeque;
use std::future::Future;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use conduit_h2::conn::HeaderList;
use conduit_h2::hpack::Field;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http_body::Frame;
use tokio::io::ReadBuf;

use crate::clock::Clock;
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

/// The data a PING carries; any answer counts.
pub(crate) const PING_DATA: [u8; 8] = *b"conduit!";

/// How much is read from a socket at once.
pub(crate) const READ_CHUNK: usize = 16 * 1024;

/// Output beyond which a connection stops reading: the peer is not reading what the proxy
/// writes, and everything it sends would only add to it.
pub(crate) const MAX_UNWRITTEN: usize = 1024 * 1024;

/// A timer a connection's task polls on every wake, polled itself only once it has woken the
/// task (or is new, or was changed through [`Gated::get_mut`]).
///
/// A connection's task is woken for everything that happens on it (twice a request at one
/// stream a connection: the request, then its response) and polls each of its timers every
/// time: some 150 instructions for a registered tokio `Sleep`, against a few to read a flag.
/// The inner future is polled with a waker of the gate's own, which sets the flag and wakes
/// the task; so it must wait only on what it registers that waker with (a `Sleep`, or a
/// future that awaits only timers). Once it has been ready it is not polled again until it is
/// changed: a caller rearms the timer, or stops polling it.
///
/// A closed gate costs its task one plain load per poll: the task's waker is handed to the
/// gate only when it changes (it is kept there, not taken by a wake), and the flag is cleared
/// with an atomic swap only when a load found it set. (Every atomic read-modify-write costs
/// some 20 cycles, and a connection's task polls each of its gates twice a request.)
pub(crate) struct Gated<F> {
    inner: F,
    gate: Arc<Gate>,
    /// Wakes `gate`: the waker the inner future registers.
    waker: Waker,
    /// The task's waker as last handed to the gate.
    registered: Option<Waker>,
}

struct Gate {
    /// The inner future has been woken (or changed) since it was last polled.
    open: AtomicBool,
    /// The task to wake: replaced when the task's waker changes, never taken.
    task: Mutex<Option<Waker>>,
}

impl Wake for Gate {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.open.store(true, Ordering::Release);
        let task = self.task.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(task) = &*task {
            task.wake_by_ref();
        }
    }
}

impl<F> Gated<F> {
    pub(crate) fn new(inner: F) -> Self {
        let gate = Arc::new(Gate {
            open: AtomicBool::new(true),
            task: Mutex::new(None),
        });
        Self {
            inner,
            waker: Waker::from(Arc::clone(&gate)),
            gate,
            registered: None,
        }
    }

    /// The inner future, to change (a timer to reset): it is polled on the next poll.
    pub(crate) fn get_mut(&mut self) -> &mut F {
        self.gate.open.store(true, Ordering::Release);
        &mut self.inner
    }
}

impl<F: Future + Unpin> Future for Gated<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        if !this
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            let waker = cx.waker().clone();
            *this
                .gate
                .task
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(waker.clone());
            this.registered = Some(waker);
        }
        // A wake after this load finds the task's waker in the gate and polls the task again.
        if !this.gate.open.load(Ordering::Acquire) || !this.gate.open.swap(false, Ordering::AcqRel)
        {
            return Poll::Pending;
        }
        Pin::new(&mut this.inner).poll(&mut Context::from_waker(&this.waker))
    }
}

impl<F> std::fmt::Debug for Gated<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gated")
            .field("open", &self.gate.open.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// Keep-alive pings on one connection: due every `interval`; a ping unanswered for
/// [`PING_TIMEOUT`] gives the connection up.
pub(crate) struct Keepalive {
    clock: Clock,
    interval: Duration,
    /// A ping is out, unanswered.
    sent: bool,
    /// The next ping, or the unanswered one's timeout.
    timer: Gated<Pin<Box<tokio::time::Sleep>>>,
}

impl Keepalive {
    pub(crate) fn new(clock: Clock, interval: Duration) -> Self {
        Self {
            clock,
            interval,
            sent: false,
            timer: Gated::new(Box::pin(tokio::time::sleep_until(
                clock.to_tokio(clock.now() + interval),
            ))),
        }
    }

    fn rearm(&mut self, after: Duration) {
        let at = self.clock.to_tokio(self.clock.now() + after);
        self.timer.get_mut().as_mut().reset(at);
    }

    /// Ready with `Ok` when a ping is due (the caller sends it; its answer is awaited from
    /// then on), with `Err` when the last one went unanswered for [`PING_TIMEOUT`].
    pub(crate) fn poll_due(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Duration>> {
        if Pin::new(&mut self.timer).poll(cx).is_pending() {
            return Poll::Pending;
        }
        if self.sent {
            return Poll::Ready(Err(PING_TIMEOUT));
        }
        self.sent = true;
        self.rearm(PING_TIMEOUT);
        Poll::Ready(Ok(()))
    }

    /// The peer answered: the next ping is due an interval from now.
    pub(crate) fn pong(&mut self) {
        if self.sent {
            self.sent = false;
            self.rearm(self.interval);
        }
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

/// Reads what `io` has into `buf` (at most [`READ_CHUNK`]): `Ready(Ok(0))` at the end of the
/// stream.
pub(crate) fn poll_read<I: Io>(
    io: &mut I,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<std::io::Result<usize>> {
    let mut stack = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
    let mut read = ReadBuf::uninit(&mut stack);
    ready!(Pin::new(io).poll_read(cx, &mut read))?;
    buf.extend_from_slice(read.filled());
    Poll::Ready(Ok(read.filled().len()))
}

/// Writes as much of `buf` as `io` takes now, then flushes (TLS holds what it encrypted until
/// flushed); whether anything was written.
pub(crate) fn write_some<I: Io>(
    io: &mut I,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> std::io::Result<bool> {
    let mut wrote = false;
    while !buf.is_empty() {
        match Pin::new(&mut *io).poll_write(cx, buf) {
            Poll::Ready(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
            Poll::Ready(Ok(n)) => {
                buf.advance(n);
                wrote = true;
            }
            Poll::Ready(Err(err)) => return Err(err),
            Poll::Pending => break,
        }
    }
    if wrote && let Poll::Ready(Err(err)) = Pin::new(io).poll_flush(cx) {
        return Err(err);
    }
    Ok(wrote)
}

/// A header map's fields for the HPACK encoder.
pub(crate) fn fields_of(headers: &HeaderMap) -> impl Iterator<Item = Field<'_>> {
    headers.iter().map(|(name, value)| Field {
        name: name.as_str().as_bytes(),
        value: value.as_bytes(),
        sensitive: value.is_sensitive(),
    })
}

/// The `http` crate's names of the HPACK static table's regular entries (indexes 15 to 61), in
/// order.
static STATIC_NAMES: [HeaderName; 47] = [
    header::ACCEPT_CHARSET,
    header::ACCEPT_ENCODING,
    header::ACCEPT_LANGUAGE,
    header::ACCEPT_RANGES,
    header::ACCEPT,
    header::ACCESS_CONTROL_ALLOW_ORIGIN,
    header::AGE,
    header::ALLOW,
    header::AUTHORIZATION,
    header::CACHE_CONTROL,
    header::CONTENT_DISPOSITION,
    header::CONTENT_ENCODING,
    header::CONTENT_LANGUAGE,
    header::CONTENT_LENGTH,
    header::CONTENT_LOCATION,
    header::CONTENT_RANGE,
    header::CONTENT_TYPE,
    header::COOKIE,
    header::DATE,
    header::ETAG,
    header::EXPECT,
    header::EXPIRES,
    header::FROM,
    header::HOST,
    header::IF_MATCH,
    header::IF_MODIFIED_SINCE,
    header::IF_NONE_MATCH,
    header::IF_RANGE,
    header::IF_UNMODIFIED_SINCE,
    header::LAST_MODIFIED,
    header::LINK,
    header::LOCATION,
    header::MAX_FORWARDS,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::RANGE,
    header::REFERER,
    header::REFRESH,
    header::RETRY_AFTER,
    header::SERVER,
    header::SET_COOKIE,
    header::STRICT_TRANSPORT_SECURITY,
    header::TRANSFER_ENCODING,
    header::USER_AGENT,
    header::VARY,
    header::VIA,
    header::WWW_AUTHENTICATE,
];

/// The first HPACK static index of a regular field name.
const FIRST_REGULAR: usize = 15;

/// `name` as the `http` crate's header name: a name of the HPACK static table (most that
/// arrive) by one hash and one comparison, any other by the crate's parser.
fn header_name(name: &[u8]) -> Result<HeaderName, header::InvalidHeaderName> {
    let known = conduit_h2::hpack::static_name_index(name)
        .and_then(|index| STATIC_NAMES.get(index.checked_sub(FIRST_REGULAR)?));
    match known {
        Some(known) => Ok(known.clone()),
        None => HeaderName::from_bytes(name),
    }
}

/// A decoded header list's regular fields as a header map. Values are slices of the list's
/// buffer (no copy); names the `http` crate knows cost nothing either.
pub(crate) fn header_map(fields: &HeaderList) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(fields.len());
    for (name, value, sensitive) in fields.iter() {
        // The state machine checked both already (RFC 9113 §8.2); these cannot fail, but a
        // field the `http` crate refuses is dropped rather than trusted.
        let (Ok(name), Ok(mut value)) = (header_name(name), HeaderValue::from_maybe_shared(value))
        else {
            continue;
        };
        value.set_sensitive(sensitive);
        headers.append(name, value);
    }
    headers
}

/// A stream's incoming body (a client's request, an upstream's response) as the connection
/// delivers it, waiting for its reader: data, then trailers, then the end, or the failure
/// that cut it short. `E` says how it failed.
#[derive(Debug)]
pub(crate) struct Incoming<E> {
    data: Chunks,
    trailers: Option<HeaderMap>,
    /// The peer has sent all of it.
    end: bool,
    failed: Option<E>,
    waker: Option<Waker>,
}

impl<E> Default for Incoming<E> {
    fn default() -> Self {
        Self {
            data: Chunks::default(),
            trailers: None,
            end: false,
            failed: None,
            waker: None,
        }
    }
}

impl<E: Clone> Incoming<E> {
    /// Data came (`end`: the last of it); the reader's waker, to call without the lock.
    pub(crate) fn push_data(&mut self, data: Bytes, end: bool) -> Option<Waker> {
        if !data.is_empty() {
            self.data.push_back(data);
        }
        self.end |= end;
        self.waker.take()
    }

    /// The trailers came, which end the body.
    pub(crate) fn push_trailers(&mut self, trailers: HeaderMap) -> Option<Waker> {
        self.trailers = Some(trailers);
        self.end = true;
        self.waker.take()
    }

    /// The stream ended short of the body's end (a body already whole keeps its end, and a
    /// body that already failed keeps its first reason).
    pub(crate) fn fail(&mut self, failed: E) -> Option<Waker> {
        if !self.end && self.failed.is_none() {
            self.failed = Some(failed);
        }
        self.waker.take()
    }

    /// The next frame, or `Pending` with the reader's waker kept. `None`: the body ended.
    pub(crate) fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, E>>> {
        if let Some(data) = self.data.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if let Some(trailers) = self.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        if self.end {
            return Poll::Ready(None);
        }
        if let Some(failed) = self.failed.clone() {
            return Poll::Ready(Some(Err(failed)));
        }
        if !self.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            self.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    /// Whether nothing is left to read.
    pub(crate) fn is_end(&self) -> bool {
        self.end && self.data.is_empty() && self.trailers.is_none()
    }

    /// Data delivered but never read: window to give back when the reader goes away.
    pub(crate) fn unread(&self) -> usize {
        self.data.len()
    }
}

/// Data waiting for its reader, oldest first: the first chunk inline, as a reader keeping up
/// has at most one waiting (a queue costs an allocation per body).
#[derive(Debug, Default)]
struct Chunks {
    /// The oldest; `None` only when `rest` is empty too.
    first: Option<Bytes>,
    rest: VecDeque<Bytes>,
}

impl Chunks {
    fn push_back(&mut self, data: Bytes) {
        if self.first.is_none() {
            self.first = Some(data);
        } else {
            self.rest.push_back(data);
        }
    }

    fn pop_front(&mut self) -> Option<Bytes> {
        let first = self.first.take()?;
        self.first = self.rest.pop_front();
        Some(first)
    }

    fn is_empty(&self) -> bool {
        self.first.is_none()
    }

    /// The bytes waiting.
    fn len(&self) -> usize {
        self.first.iter().chain(&self.rest).map(Bytes::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_table_names_map_to_the_http_crates() {
        for (offset, known) in STATIC_NAMES.iter().enumerate() {
            let name = known.as_str().as_bytes();
            assert_eq!(
                conduit_h2::hpack::static_name_index(name),
                Some(FIRST_REGULAR + offset),
                "{known}"
            );
            assert_eq!(header_name(name).unwrap(), known);
        }
        // Names outside the table, and pseudo-header names (never regular fields), parse.
        assert_eq!(header_name(b"grpc-status").unwrap(), "grpc-status");
        assert!(header_name(b":path").is_err());
        assert!(header_name(b"bad name").is_err());
    }

    /// Waits for the keep-alive's next event, failing (not hanging) if none comes in a day.
    async fn next(keepalive: &mut Keepalive) -> Result<(), Duration> {
        let due = std::future::poll_fn(|cx| keepalive.poll_due(cx));
        tokio::time::timeout(Duration::from_secs(86_400), due)
            .await
            .expect("the keep-alive timer never fired")
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn keepalive_pings_every_interval_and_gives_up_on_a_silent_peer() {
        let clock = Clock::new();
        let start = clock.now();
        let interval = Duration::from_secs(10);
        let mut keepalive = Keepalive::new(clock, interval);
        assert_eq!(next(&mut keepalive).await, Ok(()));
        assert_eq!(clock.now() - start, interval);
        keepalive.pong();
        assert_eq!(next(&mut keepalive).await, Ok(()));
        assert_eq!(clock.now() - start, interval * 2);
        // No answer to that one.
        assert_eq!(next(&mut keepalive).await, Err(PING_TIMEOUT));
        assert_eq!(clock.now() - start, interval * 2 + PING_TIMEOUT);
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_gated_timer_fires_at_its_deadline_and_again_once_reset() {
        let clock = Clock::new();
        let start = clock.now();
        let at = |ms| clock.to_tokio(start + Duration::from_millis(ms));
        let mut timer = Gated::new(Box::pin(tokio::time::sleep_until(at(50))));
        // Polled before its deadline it is pending, and stays so when polled again unwoken.
        for _ in 0..3 {
            assert!(futures_util::poll!(&mut timer).is_pending());
        }
        (&mut timer).await;
        assert_eq!(clock.now() - start, Duration::from_millis(50));
        timer.get_mut().as_mut().reset(at(80));
        (&mut timer).await;
        assert_eq!(clock.now() - start, Duration::from_millis(80));
    }
}
