//! An upstream HTTP/2 connection on our own engine: the sans-IO state machine of `conduit-h2`
//! shared by every request sent on the connection, and one task ([`drive`]) that owns the
//! socket.
//!
//! Requests come from many tasks (every client connection's exchanges), so the state machine
//! sits behind one lock per connection. A request opens its stream and writes its head under
//! the lock, its body's frames are written as the peer's windows allow, and the driver is
//! woken to write what was queued; the driver reads, hands what it read to the state machine,
//! and wakes whoever waits on a stream (its response head, its body, room to send). Wakers are
//! always called after the lock is released.
//!
//! Dropping a response before its body ends (or the wait for a response head) resets the
//! stream with `CANCEL`; the connection carries on. When the last [`Handle`] is dropped the
//! connection closes gracefully once its streams end.
//!
//! Resets of streams the server has not answered are paced ([`Resets`]). Servers defend
//! against reset floods (CVE-2023-44487): the `h2` crate under hyper and tonic closes a
//! connection once more than 20 streams are reset before its accept loop took them up, failing
//! every other stream on it. One upstream connection carries many clients' requests, so a
//! crowd of clients leaving at once (a client restarting, a load balancer draining, lost
//! hedges) would otherwise cost the clients who stay. At most [`RESET_BUDGET`] resets of
//! unanswered streams are in doubt at a time; a response head on a later stream shows that
//! the server has taken up the earlier ones (servers accept streams in order), which clears
//! the doubt. Past the budget a stream is left open and reset once the server answers it or
//! the budget has room; its response is discarded. A stream the server has answered is reset
//! at once (it is no longer pending), and so is one whose request is still sending (left
//! open, the server would wait for the rest).
//!
//! The response timeout of a stream whose request was whole when it opened is kept here, not
//! by a timer per request: every such stream's deadline is its opening plus the one timeout,
//! so deadlines come in stream order, and the connection keeps them in a queue ([`Awaiting`])
//! behind one timer. The timer is not moved as heads arrive: when it fires at a deadline
//! whose stream has since been answered, it is set again for the oldest stream still waiting.
//! On a healthy connection it fires about once a timeout, however many requests pass; a
//! stream still without its head at its deadline fails with
//! [`StreamFailed::ResponseTimeout`] and is reset with `CANCEL`, exactly on time.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use conduit_core::time::Instant;
use conduit_h2::conn::{Config, Connection, Event, OpenError, Role, StreamMap};
use conduit_h2::frame::StreamId;
use conduit_h2::hpack::Field;
use conduit_h2::{Error as H2Error, ErrorCode};
use http::header::HeaderMap;
use http::{Response, StatusCode, Version};
use http_body::{Body as _, Frame, SizeHint};

use super::conn::{
    CONNECTION_WINDOW, Incoming, Keepalive, MAX_UNWRITTEN, PING_DATA, READ_CHUNK, SEND_BUFFER,
    STREAM_WINDOW, fields_of, header_map,
};

use crate::body::{Body, BoxError, StreamGuard};
use crate::clock::Clock;
use crate::net::Io;

/// Why a stream failed.
#[derive(Clone, Debug, thiserror::Error)]
pub(crate) enum StreamFailed {
    /// The server reset it (or its GOAWAY excluded it: `unprocessed`).
    #[error("the server reset the stream ({code})")]
    Reset {
        code: ErrorCode,
        /// The server did not process it (RFC 9113 §8.7): safe to send again.
        unprocessed: bool,
    },
    /// The connection ended.
    #[error("the connection ended: {0}")]
    Connection(Arc<str>),
    /// No response head within the connection's response timeout of the stream opening
    /// (streams opened `timed`); the stream was reset with `CANCEL`.
    #[error("no response head within {0:?}")]
    ResponseTimeout(Duration),
}

impl StreamFailed {
    /// Whether the server provably did nothing with the request.
    pub(crate) fn unprocessed(&self) -> bool {
        matches!(
            self,
            Self::Reset {
                unprocessed: true,
                ..
            }
        )
    }

    /// The code to reset a downstream stream with, passing the upstream's on.
    pub(crate) fn code(&self) -> ErrorCode {
        match self {
            Self::Reset { code, .. } => *code,
            Self::Connection(_) | Self::ResponseTimeout(_) => ErrorCode::INTERNAL_ERROR,
        }
    }
}

/// Why a request could not be opened on the connection.
#[derive(Debug, thiserror::Error)]
#[error("the upstream HTTP/2 connection is closed: {0}")]
pub(crate) struct Closed(Arc<str>);

/// One stream's response side, waiting for its reader.
#[derive(Debug, Default)]
struct Slot {
    head: Option<Result<Response<()>, StreamFailed>>,
    /// The response head has come (it may have been taken since).
    head_arrived: bool,
    /// The response head has come with `END_STREAM` (no body).
    head_end: bool,
    content_length: Option<u64>,
    head_waker: Option<Waker>,
    body: Incoming<StreamFailed>,
    /// Its response timeout passed and the stream was given up ([`Resets::give_up`]); what
    /// the server still sends on it is discarded.
    given_up: bool,
}

#[derive(Debug)]
struct Inner {
    conn: Connection,
    /// Boxed: a slot is some 360 bytes, and the map's entries are spread over a table that a
    /// connection with hundreds of streams holds cold. A new box is the allocator's most
    /// recently freed (warm) block; written in place in the table, each stream's opening and
    /// its removal touched six cold cache lines (the loopback benchmark at 1,000 h2
    /// connections, under callgrind's cache model).
    slots: StreamMap<Box<Slot>>,
    /// Request bodies waiting for room to send.
    send_wakers: StreamMap<Waker>,
    /// Requests waiting for a stream under the server's limit.
    open_wakers: Vec<Waker>,
    driver: Option<Waker>,
    ended: Option<Arc<str>>,
    /// Streams waiting for their head under the connection's response timeout.
    awaiting: Awaiting,
    /// Streams given up, their resets paced under the server's reset-flood defence.
    resets: Resets,
}

/// How many resets of streams the server has not answered may be in doubt at once: half the
/// `h2` crate's limit of 20 pending-accept resets, the strictest among common servers.
const RESET_BUDGET: usize = 10;

/// The pacing of resets of streams given up before the server answered them (the module's
/// docs say why).
#[derive(Debug, Default)]
struct Resets {
    /// Streams reset before their response head came, which the server may not yet have
    /// taken up: at most [`RESET_BUDGET`].
    doubt: Vec<u32>,
    /// Streams given up and left open, waiting for room in the budget or for their answer.
    deferred: VecDeque<u32>,
}

impl Resets {
    /// Gives up stream `id` (its caller left, or its response timeout passed): resets it now
    /// if the server has answered it (`answered`), its request is not whole, or the budget has
    /// room, else later.
    fn give_up(&mut self, conn: &mut Connection, id: u32, answered: bool) {
        let stream = StreamId::new(id);
        if !conn.is_open(stream) {
            return;
        }
        if answered {
            conn.reset(stream, ErrorCode::CANCEL);
        } else if !conn.is_send_whole(stream) {
            // Left open, a request still sending would keep the server waiting for the rest.
            conn.reset(stream, ErrorCode::CANCEL);
            if self.doubt.len() < RESET_BUDGET {
                self.doubt.push(id);
            }
        } else if self.doubt.len() < RESET_BUDGET {
            conn.reset(stream, ErrorCode::CANCEL);
            self.doubt.push(id);
        } else {
            self.deferred.push_back(id);
        }
    }

    /// The server answered stream `id` with a response head: it has taken up every stream
    /// opened before it. Their resets are no longer in doubt, and streams deferred up to `id`
    /// are reset (or have ended); then deferred streams take the budget's room, oldest first.
    fn answered(&mut self, conn: &mut Connection, id: u32) {
        if self.doubt.is_empty() && self.deferred.is_empty() {
            return;
        }
        self.doubt.retain(|&doubted| doubted > id);
        self.deferred.retain(|&deferred| {
            if deferred > id {
                return true;
            }
            // Answered or taken up: not pending at the server any more.
            conn.reset(StreamId::new(deferred), ErrorCode::CANCEL);
            false
        });
        while self.doubt.len() < RESET_BUDGET
            && let Some(deferred) = self.deferred.pop_front()
        {
            self.give_up(conn, deferred, false);
        }
    }

    /// Stream `id` was reset by the server: nothing left to do for it.
    fn ended(&mut self, id: u32) {
        if !self.deferred.is_empty() {
            self.deferred.retain(|&deferred| deferred != id);
        }
    }

    /// Streams given up but still open: they count against the server's stream limit.
    fn held(&self) -> usize {
        self.deferred.len()
    }
}

#[derive(Debug)]
struct Shared {
    inner: Mutex<Inner>,
    /// Live [`Handle`]s: at 0, the connection closes once its streams end.
    handles: AtomicUsize,
    clock: Clock,
    /// The response timeout of streams opened `timed`.
    response_timeout: Option<Duration>,
}

/// The streams opened `timed` whose response head has not come, with their deadlines, in
/// stream order, which is deadline order (one timeout, counted from each opening, and streams
/// open in order under the connection's lock). A stream leaves when its head comes, it is
/// reset or cancelled, or its deadline passes; so the queue holds at most the streams open.
#[derive(Debug, Default)]
struct Awaiting(VecDeque<(u32, Instant)>);

impl Awaiting {
    fn push(&mut self, id: u32, deadline: Instant) {
        debug_assert!(self.0.back().is_none_or(|&(last, _)| last < id));
        self.0.push_back((id, deadline));
    }

    /// Stream `id` no longer waits (most often the oldest, answered first).
    fn remove(&mut self, id: u32) {
        match self.0.front() {
            Some(&(front, _)) if front == id => {
                self.0.pop_front();
            }
            None => {}
            Some(_) => {
                if let Ok(i) = self.0.binary_search_by_key(&id, |&(id, _)| id) {
                    self.0.remove(i);
                }
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.0.front().map(|&(_, deadline)| deadline)
    }

    /// The oldest stream, if its deadline is at or before `now`.
    fn pop_due(&mut self, now: Instant) -> Option<u32> {
        let &(id, deadline) = self.0.front()?;
        (deadline <= now).then(|| {
            self.0.pop_front();
            id
        })
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Wakers to call once the lock is released.
#[derive(Default)]
struct Wake(Vec<Waker>);

impl Wake {
    fn add(&mut self, waker: Option<Waker>) {
        self.0.extend(waker);
    }

    fn run(self) {
        for waker in self.0 {
            waker.wake();
        }
    }
}

impl Inner {
    /// Stream `id` failed: its waiters learn why.
    fn fail(&mut self, id: u32, failed: &StreamFailed, wake: &mut Wake) {
        if let Some(slot) = self.slots.get_mut(&id) {
            if !slot.head_arrived && slot.head.is_none() {
                slot.head = Some(Err(failed.clone()));
            }
            wake.add(slot.head_waker.take());
            wake.add(slot.body.fail(failed.clone()));
        }
    }

    /// Fails every stream whose response deadline is at or before `now`, resetting it; whether
    /// there was one.
    fn expire(&mut self, now: Instant, timeout: Duration, wake: &mut Wake) -> bool {
        let mut expired = false;
        while let Some(id) = self.awaiting.pop_due(now) {
            expired = true;
            self.fail(id, &StreamFailed::ResponseTimeout(timeout), wake);
            if let Some(slot) = self.slots.get_mut(&id) {
                slot.given_up = true;
            }
            self.resets.give_up(&mut self.conn, id, false);
            wake.add(self.send_wakers.remove(&id));
        }
        if expired {
            // Streams fewer: requests waiting for room may open theirs.
            wake.0.append(&mut self.open_wakers);
        }
        expired
    }

    /// The driver has something to write.
    fn driver_if_output(&mut self, wake: &mut Wake) {
        if self.conn.wants_write() {
            wake.add(self.driver.clone());
        }
    }
}

/// A handle to send requests on one connection; cheap to clone.
#[derive(Debug)]
pub(crate) struct Handle {
    shared: Arc<Shared>,
}

impl Clone for Handle {
    fn clone(&self) -> Self {
        self.shared.handles.fetch_add(1, Ordering::Relaxed);
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        if self.shared.handles.fetch_sub(1, Ordering::AcqRel) == 1 {
            let driver = self.shared.lock().driver.clone();
            if let Some(driver) = driver {
                driver.wake();
            }
        }
    }
}

/// A request's head, as sent: borrowed, as it is encoded when the stream opens, and the
/// caller keeps it to send again if the stream is refused.
#[derive(Clone, Copy)]
pub(crate) struct RequestHead<'a> {
    pub(crate) method: &'a http::Method,
    pub(crate) uri: &'a http::Uri,
    pub(crate) headers: &'a HeaderMap,
}

impl Handle {
    /// How many streams the server allows now; 0 once the connection is going away.
    pub(crate) fn max_streams(&self) -> usize {
        let inner = self.shared.lock();
        if inner.ended.is_some() || inner.conn.is_going_away() {
            return 0;
        }
        // Streams given up but not yet reset still take up the server's limit.
        usize::try_from(inner.conn.peer_max_streams())
            .unwrap_or(usize::MAX)
            .saturating_sub(inner.resets.held())
    }

    /// Opens a stream with `head` (`end`: the request has no body), waiting for room under
    /// the server's stream limit. `timed`: the connection fails the stream with
    /// [`StreamFailed::ResponseTimeout`] if its response head has not come within the
    /// connection's response timeout of its opening (for a request whose body, if any, is
    /// whole; the caller times one still sending itself, from its last frame).
    ///
    /// # Errors
    ///
    /// The connection is closed or going away: no stream was opened, the request may go
    /// elsewhere.
    pub(crate) async fn open(
        &self,
        head: RequestHead<'_>,
        end: bool,
        timed: bool,
    ) -> Result<StreamId, Closed> {
        std::future::poll_fn(|cx| self.poll_open(cx, &head, end, timed)).await
    }

    /// Whether streams opened `timed` have a response timeout here.
    pub(crate) fn times_responses(&self) -> bool {
        self.shared.response_timeout.is_some()
    }

    fn poll_open(
        &self,
        cx: &mut Context<'_>,
        head: &RequestHead<'_>,
        end: bool,
        timed: bool,
    ) -> Poll<Result<StreamId, Closed>> {
        let mut inner = self.shared.lock();
        if let Some(reason) = &inner.ended {
            return Poll::Ready(Err(Closed(Arc::clone(reason))));
        }
        let scheme = head.uri.scheme_str().unwrap_or("http");
        let authority = head.uri.authority().map_or("", |a| a.as_str());
        let path = head.uri.path_and_query().map_or("/", |p| p.as_str());
        let pseudo = [
            Field::new(b":method", head.method.as_str().as_bytes()),
            Field::new(b":scheme", scheme.as_bytes()),
            Field::new(b":authority", authority.as_bytes()),
            Field::new(b":path", path.as_bytes()),
        ];
        // A request without an authority sends none (its `Host` field stays).
        let pseudo = pseudo
            .into_iter()
            .filter(|f| !(f.name == b":authority" && f.value.is_empty()));
        let regular = fields_of(head.headers);
        match inner.conn.open(pseudo.chain(regular), end) {
            Ok(id) => {
                inner.slots.insert(id.value(), Box::default());
                if timed && let Some(timeout) = self.shared.response_timeout {
                    let deadline = self.shared.clock.now() + timeout;
                    inner.awaiting.push(id.value(), deadline);
                }
                let driver = inner.driver.clone();
                drop(inner);
                if let Some(driver) = driver {
                    driver.wake();
                }
                Poll::Ready(Ok(id))
            }
            Err(OpenError::Full) => {
                inner.open_wakers.push(cx.waker().clone());
                Poll::Pending
            }
            Err(OpenError::Closed) => {
                Poll::Ready(Err(Closed("the connection is going away".into())))
            }
        }
    }

    /// The response to stream `id`: a future that resets the stream if dropped first.
    pub(crate) fn response(&self, id: StreamId) -> ResponseFuture {
        ResponseFuture {
            shared: Arc::clone(&self.shared),
            id: id.value(),
            done: false,
        }
    }

    /// Sends `body` on stream `id` (a future): each frame once the server's windows have
    /// room for it, then the end (or the trailers). A body that fails resets the stream with
    /// the reason its error carries; a stream the server reset stops it at once.
    pub(crate) fn send_body(&self, id: StreamId, body: Body) -> BodyPump {
        BodyPump {
            shared: Arc::clone(&self.shared),
            id,
            body,
        }
    }
}

/// How a request body stopped early.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SendEnd {
    #[error("the stream ended before the request body did")]
    Gone,
    #[error("the body failed: {0}")]
    Body(BoxError),
}

/// A request body being sent; the pump owns the body (the stream may outlive the exchange's
/// wait for its head).
pub(crate) struct BodyPump {
    shared: Arc<Shared>,
    id: StreamId,
    body: Body,
}

impl Future for BodyPump {
    type Output = Result<(), SendEnd>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), SendEnd>> {
        let this = &mut *self;
        this.pump(cx)
    }
}

impl BodyPump {
    fn pump(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), SendEnd>> {
        loop {
            {
                let mut inner = self.shared.lock();
                if inner.conn.send_capacity(self.id) == 0 {
                    if !inner.conn.is_open(self.id) {
                        return Poll::Ready(Err(SendEnd::Gone));
                    }
                    inner
                        .send_wakers
                        .insert(self.id.value(), cx.waker().clone());
                    return Poll::Pending;
                }
            }
            let frame = match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(frame) => frame,
            };
            // Asked before the lock: the body may be a client's, behind its own lock.
            let end = self.body.is_end_stream();
            let mut wake = Wake::default();
            let mut inner = self.shared.lock();
            let done = match frame {
                None => {
                    inner.conn.send_data(self.id, Bytes::new(), true);
                    Some(Ok(()))
                }
                Some(Err(err)) => {
                    let code = super::reset_code(&*err);
                    inner.conn.reset(self.id, code);
                    // Whoever waits for the response learns that it will not come.
                    let failed = StreamFailed::Reset {
                        code,
                        unprocessed: false,
                    };
                    inner.fail(self.id.value(), &failed, &mut wake);
                    Some(Err(SendEnd::Body(err)))
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        inner.conn.send_data(self.id, data, end);
                        end.then_some(Ok(()))
                    }
                    Err(frame) => match frame.into_trailers() {
                        Ok(trailers) => {
                            inner.conn.send_trailers(self.id, fields_of(&trailers));
                            Some(Ok(()))
                        }
                        Err(_) => None,
                    },
                },
            };
            inner.driver_if_output(&mut wake);
            drop(inner);
            wake.run();
            if let Some(done) = done {
                return Poll::Ready(done);
            }
        }
    }
}

/// The wait for a stream's response head.
#[derive(Debug)]
pub(crate) struct ResponseFuture {
    shared: Arc<Shared>,
    id: u32,
    done: bool,
}

impl Future for ResponseFuture {
    type Output = Result<Response<RecvBody>, StreamFailed>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Self { shared, id, done } = &mut *self;
        let mut inner = shared.lock();
        let Some(slot) = inner.slots.get_mut(id) else {
            *done = true;
            return Poll::Ready(Err(StreamFailed::Connection("the stream is gone".into())));
        };
        let Some(head) = slot.head.take() else {
            if !slot
                .head_waker
                .as_ref()
                .is_some_and(|w| w.will_wake(cx.waker()))
            {
                slot.head_waker = Some(cx.waker().clone());
            }
            return Poll::Pending;
        };
        let (end, remaining) = (slot.head_end, slot.content_length);
        if head.is_err() {
            inner.slots.remove(id);
        }
        drop(inner);
        *done = true;
        let head = head?;
        let body = RecvBody {
            shared: Arc::clone(shared),
            id: *id,
            remaining,
            done: end,
            end_at_head: end,
            guard: None,
        };
        Poll::Ready(Ok(head.map(|()| body)))
    }
}

impl Drop for ResponseFuture {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // Nobody wants the response any more.
        cancel(&self.shared, self.id);
    }
}

/// Gives up stream `id` (if still open: reset now or paced, [`Resets`]) and forgets its
/// response side.
fn cancel(shared: &Shared, id: u32) {
    let mut wake = Wake::default();
    let mut inner = shared.lock();
    // Without its slot the stream failed or was given up already.
    let mut give_up = None;
    if let Some(slot) = inner.slots.remove(&id) {
        let unread = slot.body.unread();
        inner.conn.release(StreamId::new(id), unread);
        if !slot.given_up {
            give_up = Some(slot.head_arrived);
        }
    }
    inner.awaiting.remove(id);
    if let Some(answered) = give_up {
        let Inner { conn, resets, .. } = &mut *inner;
        resets.give_up(conn, id, answered);
    }
    wake.add(inner.send_wakers.remove(&id));
    inner.driver_if_output(&mut wake);
    // A stream fewer: a request waiting for room may open one.
    wake.0.append(&mut inner.open_wakers);
    drop(inner);
    wake.run();
}

/// A response's body as the stream delivers it.
#[derive(Debug)]
pub(crate) struct RecvBody {
    shared: Arc<Shared>,
    id: u32,
    remaining: Option<u64>,
    done: bool,
    /// The head ended the stream: the body is empty.
    end_at_head: bool,
    /// The pool's count of the stream, held until the body is dropped.
    guard: Option<StreamGuard>,
}

impl RecvBody {
    /// Keeps the pool's count of this stream (its connection's load) until the body is
    /// dropped: the stream is open upstream until the client has read the response.
    pub(crate) fn hold(&mut self, guard: StreamGuard) {
        self.guard = Some(guard);
    }
}

impl http_body::Body for RecvBody {
    type Data = Bytes;
    type Error = StreamFailed;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, StreamFailed>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let mut wake = Wake::default();
        let mut inner = self.shared.lock();
        let id = self.id;
        let Inner { slots, conn, .. } = &mut *inner;
        let Some(slot) = slots.get_mut(&id) else {
            drop(inner);
            self.done = true;
            return Poll::Ready(Some(Err(StreamFailed::Connection(
                "the stream is gone".into(),
            ))));
        };
        let frame = match ready!(slot.body.poll_next(cx)) {
            Some(Ok(frame)) => frame,
            end => {
                drop(inner);
                self.done = true;
                return Poll::Ready(end);
            }
        };
        let Some(data) = frame.data_ref() else {
            // The trailers, which end the body.
            drop(inner);
            self.done = true;
            return Poll::Ready(Some(Ok(frame)));
        };
        // Handed on: the server may send as much again.
        let len = data.len();
        // The last of it: the body answers `is_end_stream` from here on without the lock.
        let at_end = slot.body.is_end();
        conn.release(StreamId::new(id), len);
        inner.driver_if_output(&mut wake);
        drop(inner);
        wake.run();
        self.done = at_end;
        if let Some(remaining) = &mut self.remaining {
            *remaining = remaining.saturating_sub(len as u64);
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        if self.done || self.end_at_head {
            return true;
        }
        let inner = self.shared.lock();
        inner
            .slots
            .get(&self.id)
            .is_some_and(|slot| slot.body.is_end())
    }

    fn size_hint(&self) -> SizeHint {
        if self.done || self.end_at_head {
            return SizeHint::with_exact(0);
        }
        match self.remaining {
            Some(remaining) => SizeHint::with_exact(remaining),
            None => SizeHint::default(),
        }
    }
}

impl Drop for RecvBody {
    fn drop(&mut self) {
        let mut inner = self.shared.lock();
        let finished = inner
            .slots
            .get(&self.id)
            .is_none_or(|slot| slot.body.is_end())
            && !inner.conn.is_open(StreamId::new(self.id));
        if finished {
            inner.slots.remove(&self.id);
        } else {
            drop(inner);
            // Dropped before its end: the stream is reset; the connection carries on.
            cancel(&self.shared, self.id);
        }
    }
}

/// Why the connection ended.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Ended {
    #[error("{0}")]
    Protocol(H2Error),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("no answer to a keep-alive ping within {0:?}")]
    PingTimeout(Duration),
}

/// Starts a client connection on `io`: its handle, and the future that drives it (spawn it).
/// The connection ends when the server closes it, fails, stops answering pings (one every
/// `interval`), or when every handle is gone and its streams have ended.
///
/// `response_timeout`: how long a stream opened `timed` may wait for its response head.
pub(crate) fn handshake<I: Io>(
    io: I,
    clock: Clock,
    interval: Duration,
    max_header_list_size: u32,
    response_timeout: Option<Duration>,
) -> (Handle, impl Future<Output = Result<(), Ended>> + Send) {
    let config = Config {
        role: Role::Client,
        max_concurrent_streams: 0,
        stream_window: STREAM_WINDOW,
        connection_window: CONNECTION_WINDOW,
        max_header_list_size,
        send_buffer: SEND_BUFFER,
        max_abuse: 1000,
    };
    let shared = Arc::new(Shared {
        inner: Mutex::new(Inner {
            conn: Connection::new(config),
            slots: StreamMap::default(),
            send_wakers: StreamMap::default(),
            open_wakers: Vec::new(),
            driver: None,
            ended: None,
            awaiting: Awaiting::default(),
            resets: Resets::default(),
        }),
        handles: AtomicUsize::new(1),
        clock,
        response_timeout,
    });
    let handle = Handle {
        shared: Arc::clone(&shared),
    };
    let keepalive = Keepalive::new(clock, interval);
    let mut driver = Driver {
        io,
        shared,
        read: BytesMut::with_capacity(READ_CHUNK),
        write: BytesMut::new(),
        keepalive,
        closing: false,
        deadline: response_timeout.map(|_| ResponseDeadline {
            timer: Box::pin(tokio::time::sleep_until(clock.to_tokio(clock.now()))),
            armed: false,
        }),
    };
    let driving = async move {
        let ended = std::future::poll_fn(|cx| driver.poll(cx)).await;
        driver.end(match &ended {
            Ok(()) => "the connection closed".into(),
            Err(err) => err.to_string().into(),
        });
        ended
    };
    (handle, driving)
}

struct Driver<I> {
    io: I,
    shared: Arc<Shared>,
    read: BytesMut,
    /// Taken from the state machine, not yet written.
    write: BytesMut,
    keepalive: Keepalive,
    closing: bool,
    /// The timer of the oldest response deadline (with a response timeout).
    deadline: Option<ResponseDeadline>,
}

/// The one timer behind a connection's [`Awaiting`] streams.
struct ResponseDeadline {
    timer: Pin<Box<tokio::time::Sleep>>,
    /// Set for some deadline at or before the oldest waiting stream's; not moved as heads
    /// arrive (see the module's docs).
    armed: bool,
}

impl<I: Io> Driver<I> {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Ended>> {
        {
            let mut inner = self.shared.lock();
            if !inner
                .driver
                .as_ref()
                .is_some_and(|w| w.will_wake(cx.waker()))
            {
                inner.driver = Some(cx.waker().clone());
            }
        }
        loop {
            let mut progress = false;
            // Keep-alive.
            while let Poll::Ready(due) = self.keepalive.poll_due(cx) {
                if let Err(timeout) = due {
                    return Poll::Ready(Err(Ended::PingTimeout(timeout)));
                }
                self.shared.lock().conn.ping(PING_DATA);
                progress = true;
            }
            // Response deadlines (their resets are written below).
            progress |= self.poll_deadlines(cx);
            // Read.
            if self.write.len() < MAX_UNWRITTEN {
                match super::conn::poll_read(&mut self.io, cx, &mut self.read) {
                    Poll::Pending => {}
                    Poll::Ready(Err(err)) => return Poll::Ready(Err(err.into())),
                    Poll::Ready(Ok(0)) => return Poll::Ready(Ok(())),
                    Poll::Ready(Ok(_)) => {
                        if let Err(err) = self.receive() {
                            let _ = self.poll_write(cx);
                            return Poll::Ready(Err(Ended::Protocol(err)));
                        }
                        progress = true;
                    }
                }
            }
            // Close once nobody can send and nothing is open.
            if !self.closing && self.shared.handles.load(Ordering::Acquire) == 0 {
                let mut inner = self.shared.lock();
                if inner.conn.open_streams() == 0 {
                    inner.conn.go_away(ErrorCode::NO_ERROR);
                    self.closing = true;
                }
            }
            // Write.
            match self.poll_write(cx) {
                Ok(wrote) => progress |= wrote,
                Err(err) => return Poll::Ready(Err(err)),
            }
            let done = {
                let inner = self.shared.lock();
                inner.conn.is_done() && !inner.conn.wants_write()
            };
            if done && self.write.is_empty() {
                return Poll::Ready(Ok(()));
            }
            if !progress {
                return Poll::Pending;
            }
        }
    }

    /// Fails the streams whose response deadline has passed, and keeps the timer set for the
    /// oldest still waiting; whether any failed.
    fn poll_deadlines(&mut self, cx: &mut Context<'_>) -> bool {
        let (Some(deadline), Some(timeout)) = (&mut self.deadline, self.shared.response_timeout)
        else {
            return false;
        };
        let clock = self.shared.clock;
        let mut expired = false;
        loop {
            let mut wake = Wake::default();
            let next = if deadline.armed {
                if deadline.timer.as_mut().poll(cx).is_pending() {
                    return expired;
                }
                deadline.armed = false;
                let mut inner = self.shared.lock();
                expired |= inner.expire(clock.now(), timeout, &mut wake);
                inner.awaiting.next_deadline()
            } else {
                self.shared.lock().awaiting.next_deadline()
            };
            wake.run();
            let Some(next) = next else {
                return expired;
            };
            deadline.timer.as_mut().reset(clock.to_tokio(next));
            deadline.armed = true;
        }
    }

    /// Hands what was read to the state machine and tells the streams.
    fn receive(&mut self) -> Result<(), H2Error> {
        let mut wake = Wake::default();
        let mut pong = false;
        let mut inner = self.shared.lock();
        let Inner {
            conn,
            slots,
            send_wakers,
            open_wakers,
            awaiting,
            resets,
            ..
        } = &mut *inner;
        let mut release = Vec::new();
        // The latest stream the server answered in what was read.
        let mut answered = None;
        let received = conn.recv(&mut self.read, &mut |event| match event {
            Event::Headers {
                stream,
                fields,
                end_stream,
            } => {
                answered = answered.max(Some(stream.value()));
                // A stream given up: its answer is discarded ([`Resets::answered`]).
                let Some(slot) = slots.get_mut(&stream.value()).filter(|slot| !slot.given_up)
                else {
                    return;
                };
                if !slot.head_arrived {
                    awaiting.remove(stream.value());
                }
                let mut response = Response::new(());
                *response.status_mut() = fields
                    .status()
                    .and_then(|s| StatusCode::from_u16(s).ok())
                    .unwrap_or(StatusCode::BAD_GATEWAY);
                *response.version_mut() = Version::HTTP_2;
                *response.headers_mut() = header_map(&fields);
                slot.head = Some(Ok(response));
                slot.head_arrived = true;
                slot.head_end = end_stream;
                if end_stream {
                    wake.add(slot.body.push_data(Bytes::new(), true));
                }
                slot.content_length = fields.content_length();
                wake.add(slot.head_waker.take());
            }
            Event::Data {
                stream,
                data,
                end_stream,
            } => match slots.get_mut(&stream.value()).filter(|slot| !slot.given_up) {
                Some(slot) => wake.add(slot.body.push_data(data, end_stream)),
                None => release.push((stream, data.len())),
            },
            Event::Trailers { stream, fields } => {
                if let Some(slot) = slots.get_mut(&stream.value()) {
                    wake.add(slot.body.push_trailers(header_map(&fields)));
                }
            }
            Event::Reset {
                stream,
                code,
                unprocessed,
                ..
            } => {
                let failed = StreamFailed::Reset { code, unprocessed };
                awaiting.remove(stream.value());
                resets.ended(stream.value());
                if let Some(slot) = slots.get_mut(&stream.value()) {
                    if !slot.head_arrived && slot.head.is_none() {
                        slot.head = Some(Err(failed.clone()));
                    }
                    wake.add(slot.head_waker.take());
                    wake.add(slot.body.fail(failed));
                }
                wake.add(send_wakers.remove(&stream.value()));
                wake.0.append(open_wakers);
            }
            Event::SendReady { stream } => wake.add(send_wakers.remove(&stream.value())),
            Event::Pong { .. } => pong = true,
            Event::GoAway { .. } | Event::Settings => wake.0.append(open_wakers),
        });
        for (stream, len) in release {
            conn.release(stream, len);
        }
        if let Some(answered) = answered {
            resets.answered(conn, answered);
        }
        // Streams that ended make room for requests waiting under the limit.
        if !open_wakers.is_empty() && conn.can_open() {
            wake.0.append(open_wakers);
        }
        drop(inner);
        wake.run();
        if pong {
            self.keepalive.pong();
        }
        received
    }

    fn poll_write(&mut self, cx: &mut Context<'_>) -> Result<bool, Ended> {
        let mut wrote = false;
        loop {
            if self.write.is_empty() {
                let mut inner = self.shared.lock();
                if !inner.conn.wants_write() {
                    return Ok(wrote);
                }
                self.write = inner.conn.output().split();
            }
            if !super::conn::write_some(&mut self.io, cx, &mut self.write)? {
                return Ok(wrote);
            }
            wrote = true;
        }
    }

    /// The connection is over: every stream still waiting learns why.
    fn end(&self, reason: Arc<str>) {
        let mut wake = Wake::default();
        let mut inner = self.shared.lock();
        inner.ended = Some(Arc::clone(&reason));
        inner.driver = None;
        inner.awaiting = Awaiting::default();
        let Inner {
            slots,
            send_wakers,
            open_wakers,
            ..
        } = &mut *inner;
        for slot in slots.values_mut() {
            let failed = StreamFailed::Connection(Arc::clone(&reason));
            // A stream that already failed keeps its own reason (an unprocessed one stays
            // safe to send again).
            if !slot.head_arrived && slot.head.is_none() {
                slot.head = Some(Err(failed.clone()));
            }
            wake.add(slot.head_waker.take());
            wake.add(slot.body.fail(failed));
        }
        wake.0.extend(send_wakers.drain().map(|(_, w)| w));
        wake.0.append(open_wakers);
        drop(inner);
        wake.run();
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    const TIMEOUT: Duration = Duration::from_millis(100);

    /// An h2 server on `io` that answers requests to `/answer` at once, holds every other
    /// unanswered, and reports each held stream's reset code.
    fn server(io: tokio::io::DuplexStream) -> tokio::sync::mpsc::UnboundedReceiver<h2::Reason> {
        let (resets, reported) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut conn = h2::server::handshake(io).await.unwrap();
            while let Some(Ok((request, mut respond))) = conn.accept().await {
                if request.uri().path() == "/answer" {
                    respond.send_response(Response::new(()), true).unwrap();
                    continue;
                }
                let resets = resets.clone();
                tokio::spawn(async move {
                    if let Ok(reason) = std::future::poll_fn(|cx| respond.poll_reset(cx)).await {
                        let _ = resets.send(reason);
                    }
                });
            }
        });
        reported
    }

    fn connect(clock: Clock) -> (Handle, tokio::sync::mpsc::UnboundedReceiver<h2::Reason>) {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let resets = server(theirs);
        let (handle, driving) = handshake(
            ours,
            clock,
            Duration::from_secs(3600),
            16 * 1024,
            Some(TIMEOUT),
        );
        tokio::spawn(driving);
        (handle, resets)
    }

    async fn open(handle: &Handle, path: &'static str, timed: bool) -> ResponseFuture {
        let uri = http::Uri::from_static(path);
        let uri = http::Uri::builder()
            .scheme("http")
            .authority("upstream")
            .path_and_query(uri.path())
            .build()
            .unwrap();
        let head = RequestHead {
            method: &http::Method::GET,
            uri: &uri,
            headers: &HeaderMap::new(),
        };
        let id = handle.open(head, true, timed).await.unwrap();
        handle.response(id)
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn each_timed_stream_fails_at_its_own_deadline_while_others_are_answered() {
        let clock = Clock::new();
        let (handle, mut resets) = connect(clock);
        let start = clock.now();
        let first = tokio::spawn(open(&handle, "/hold", true).await);
        tokio::time::sleep(Duration::from_millis(30)).await;
        // Streams answered in between move the oldest deadline on; the timer is not moved
        // with it, and must still fire for each held stream at its own deadline.
        for _ in 0..50 {
            let answered = open(&handle, "/answer", true).await.await.unwrap();
            assert_eq!(answered.status(), StatusCode::OK);
        }
        let second = tokio::spawn(open(&handle, "/hold", true).await);

        let failed = first.await.unwrap().unwrap_err();
        assert!(
            matches!(failed, StreamFailed::ResponseTimeout(TIMEOUT)),
            "{failed:?}"
        );
        assert_eq!(clock.now() - start, TIMEOUT);
        assert_eq!(resets.recv().await, Some(h2::Reason::CANCEL));

        let failed = second.await.unwrap().unwrap_err();
        assert!(
            matches!(failed, StreamFailed::ResponseTimeout(TIMEOUT)),
            "{failed:?}"
        );
        assert_eq!(clock.now() - start, Duration::from_millis(130));
        assert_eq!(resets.recv().await, Some(h2::Reason::CANCEL));

        // The connection carries on.
        let answered = open(&handle, "/answer", true).await.await.unwrap();
        assert_eq!(answered.status(), StatusCode::OK);
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn an_untimed_stream_is_left_to_its_caller() {
        let clock = Clock::new();
        let (handle, _resets) = connect(clock);
        let untimed = open(&handle, "/hold", false).await;
        // A timed stream behind it expires; the untimed one is still waiting well after.
        let timed = open(&handle, "/hold", true).await;
        assert!(matches!(
            timed.await,
            Err(StreamFailed::ResponseTimeout(TIMEOUT))
        ));
        let waited = tokio::time::timeout(TIMEOUT * 10, untimed).await;
        assert!(waited.is_err(), "the untimed stream ended: {waited:?}");
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_cancelled_wait_leaves_the_queue() {
        let clock = Clock::new();
        let (handle, mut resets) = connect(clock);
        let start = clock.now();
        drop(open(&handle, "/hold", true).await);
        assert_eq!(resets.recv().await, Some(h2::Reason::CANCEL));
        assert!(handle.shared.lock().awaiting.0.is_empty());
        // A later stream still times out at its own deadline.
        tokio::time::sleep(Duration::from_millis(10)).await;
        let timed = open(&handle, "/hold", true).await;
        assert!(matches!(
            timed.await,
            Err(StreamFailed::ResponseTimeout(TIMEOUT))
        ));
        assert_eq!(clock.now() - start, Duration::from_millis(110));
    }

    /// An h2-crate server (as under hyper and tonic) with its defence against reset floods:
    /// it closes the connection once more than 20 streams are reset before its accept loop
    /// took them up. Its accept loop is starved until `go`, then answers every stream, and
    /// reports how the connection ended.
    fn starved_server(
        io: tokio::io::DuplexStream,
        go: tokio::sync::oneshot::Receiver<()>,
    ) -> tokio::task::JoinHandle<Result<(), h2::Error>> {
        tokio::spawn(async move {
            let mut conn = h2::server::Builder::new()
                .max_pending_accept_reset_streams(20)
                .max_concurrent_streams(150)
                .handshake::<_, Bytes>(io)
                .await?;
            let _ = go.await;
            while let Some(accepted) = conn.accept().await {
                let (_, mut respond) = accepted?;
                // A stream already reset refuses the answer.
                let _ = respond.send_response(Response::new(()), true);
            }
            Ok(())
        })
    }

    fn connect_starved() -> (
        Handle,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<Result<(), h2::Error>>,
    ) {
        let (ours, theirs) = tokio::io::duplex(1024 * 1024);
        let (go, starved) = tokio::sync::oneshot::channel();
        let server = starved_server(theirs, starved);
        let (handle, driving) = handshake(
            ours,
            Clock::new(),
            Duration::from_secs(3600),
            16 * 1024,
            Some(TIMEOUT),
        );
        tokio::spawn(driving);
        (handle, go, server)
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_crowd_of_callers_leaving_does_not_trip_the_servers_reset_flood_defence() {
        let (handle, go, server) = connect_starved();
        let mut waits = Vec::new();
        for _ in 0..100 {
            waits.push(open(&handle, "/x", true).await);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
        // Every caller leaves while the server has taken up none of their streams: only
        // RESET_BUDGET of them are reset; the rest stay open, still counted against the
        // server's limit of 150.
        drop(waits);
        tokio::time::sleep(Duration::from_millis(1)).await;
        {
            let inner = handle.shared.lock();
            assert_eq!(inner.resets.doubt.len(), RESET_BUDGET);
            assert_eq!(inner.resets.held(), 100 - RESET_BUDGET);
        }
        assert_eq!(handle.max_streams(), 150 - (100 - RESET_BUDGET));

        // The server comes back and takes them up; the connection carries on for the caller
        // who stays, and every stream given up has ended by the time it is answered.
        go.send(()).unwrap();
        let answered = open(&handle, "/stays", true).await.await.unwrap();
        assert_eq!(answered.status(), StatusCode::OK);
        let inner = handle.shared.lock();
        assert!(inner.resets.doubt.is_empty(), "{:?}", inner.resets);
        assert_eq!(inner.resets.held(), 0);
        assert_eq!(inner.conn.open_streams(), 0);
        drop(inner);
        assert!(!server.is_finished());
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_request_still_sending_is_reset_at_once_even_past_the_budget() {
        let (handle, _go, _server) = connect_starved();
        let mut waits = Vec::new();
        for _ in 0..RESET_BUDGET {
            waits.push(open(&handle, "/x", true).await);
        }
        drop(waits);
        let uri = http::Uri::from_static("http://upstream/upload");
        let head = RequestHead {
            method: &http::Method::POST,
            uri: &uri,
            headers: &HeaderMap::new(),
        };
        let id = handle.open(head, false, false).await.unwrap();
        drop(handle.response(id));
        let inner = handle.shared.lock();
        assert_eq!(inner.resets.doubt.len(), RESET_BUDGET);
        assert_eq!(inner.resets.held(), 0);
        assert!(!inner.conn.is_open(id));
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_crowd_of_response_timeouts_does_not_trip_the_servers_reset_flood_defence() {
        let (handle, go, server) = connect_starved();
        let clock = handle.shared.clock;
        let start = clock.now();
        let mut waits = Vec::new();
        for _ in 0..60 {
            waits.push(tokio::spawn(open(&handle, "/x", true).await));
        }
        // Each fails at its deadline, as it would without the pacing.
        for wait in waits {
            let failed = wait.await.unwrap().unwrap_err();
            assert!(
                matches!(failed, StreamFailed::ResponseTimeout(TIMEOUT)),
                "{failed:?}"
            );
        }
        assert_eq!(clock.now() - start, TIMEOUT);
        assert_eq!(handle.shared.lock().resets.held(), 60 - RESET_BUDGET);

        go.send(()).unwrap();
        let answered = open(&handle, "/stays", true).await.await.unwrap();
        assert_eq!(answered.status(), StatusCode::OK);
        assert_eq!(handle.shared.lock().conn.open_streams(), 0);
        assert!(!server.is_finished());
    }
}
