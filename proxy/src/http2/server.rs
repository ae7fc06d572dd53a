//! A client's HTTP/2 connection, served on our own engine: the sans-IO state machine of
//! `conduit-h2` ([`conduit_h2::conn::Connection`]) driven by one task that owns the socket,
//! the state machine and every stream's work.
//!
//! Each stream is the request's future (the shared exchange) and then its response body,
//! polled on the connection's task with a waker of its own, so a wake-up polls only the
//! stream that was woken, and the frames that many streams queue in one pass leave in one
//! write. Request bodies are read elsewhere (by the upstream connection the exchange sends
//! them to), so they are the one thing shared with other tasks: a queue per stream behind
//! one lock per connection, from which their readers also hand back the windows the
//! connection then gives to the client.
//!
//! Keep-alive pings, the idle timeout and drain work as on the client side
//! ([`super::conn`]): a ping every quarter idle timeout (the connection fails when one goes
//! unanswered for [`super::conn::PING_TIMEOUT`]), and a graceful GOAWAY once no stream has
//! been open for the idle timeout or draining starts; open streams then finish.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use conduit_h2::conn::{Config, Connection, Event, HeaderList, Role, StreamMap};
use conduit_h2::frame::StreamId;
use conduit_h2::hpack::Field;
use conduit_h2::message::Pseudo;
use conduit_h2::{Error as H2Error, ErrorCode};
use http::header::HeaderMap;
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{Method, Request, Response, Version};
use http_body::{Body as _, Frame, SizeHint};

use super::conn::{
    CONNECTION_WINDOW, Incoming, Keepalive, MAX_UNWRITTEN, PING_DATA, READ_CHUNK, SEND_BUFFER,
    STREAM_WINDOW, fields_of, header_map,
};
use crate::body::{Body, StreamGuard, Streams};
use crate::clock::Clock;
use crate::config::Limits;
use crate::drain::Drain;
use crate::net::Io;

/// Stream polls per wake-up before the task yields to others.
const POLL_BUDGET: usize = 256;

/// Why a connection ended other than by closing cleanly.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ServeError {
    #[error("{0}")]
    Protocol(H2Error),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("no answer to a keep-alive ping within {0:?}")]
    PingTimeout(Duration),
}

/// How a request body's stream failed.
#[derive(Debug, thiserror::Error)]
#[error("the client reset the stream ({code})")]
pub(crate) struct StreamReset {
    pub(crate) code: ErrorCode,
}

/// What the connection's task shares with stream wakers and request body readers.
#[derive(Debug, Default)]
struct Inner {
    /// Streams woken since the task last polled them.
    ready: Vec<u32>,
    bodies: StreamMap<Incoming<ErrorCode>>,
    /// Data handed on by body readers: window to give back.
    released: Vec<(u32, usize)>,
    /// The connection's task.
    waker: Option<Waker>,
}

#[derive(Debug, Default)]
struct Shared {
    inner: Mutex<Inner>,
    /// `ready` or `released` may hold something: set under the lock by whoever adds to them,
    /// cleared under it by the task as it takes them. The task reads it without the lock and
    /// takes the lock only when it is set; a stream woken just after that read wakes the task
    /// again, so nothing waits unseen. (A lock costs two atomic read-modify-writes, some 20
    /// cycles each; the task passes here several times a request.)
    pending: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind: carry on with it.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Something was added to `ready` or `released` (called holding the lock).
    fn mark_pending(&self) {
        self.pending.store(true, Ordering::Release);
    }
}

/// Wakes one stream: it is polled on the connection's next pass.
struct StreamWaker {
    id: u32,
    shared: Arc<Shared>,
}

impl Wake for StreamWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let mut inner = self.shared.lock();
        inner.ready.push(self.id);
        self.shared.mark_pending();
        if let Some(waker) = &inner.waker {
            waker.wake_by_ref();
        }
    }
}

/// A client's request body, as the stream delivers it.
#[derive(Debug)]
pub(crate) struct RequestBody {
    shared: Option<Arc<Shared>>,
    id: u32,
    /// What `content-length` said is still to come.
    remaining: Option<u64>,
    /// Nothing more will come.
    done: bool,
}

impl RequestBody {
    fn empty() -> Self {
        Self {
            shared: None,
            id: 0,
            remaining: Some(0),
            done: true,
        }
    }
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = StreamReset;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, StreamReset>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let Some(shared) = self.shared.clone() else {
            return Poll::Ready(None);
        };
        let id = self.id;
        let mut inner = shared.lock();
        let Inner {
            bodies,
            released,
            waker,
            ..
        } = &mut *inner;
        let Some(incoming) = bodies.get_mut(&id) else {
            self.done = true;
            return Poll::Ready(Some(Err(StreamReset {
                code: ErrorCode::CANCEL,
            })));
        };
        let frame = match ready!(incoming.poll_next(cx)) {
            Some(Ok(frame)) => frame,
            Some(Err(code)) => {
                drop(inner);
                self.done = true;
                return Poll::Ready(Some(Err(StreamReset { code })));
            }
            None => {
                drop(inner);
                self.done = true;
                return Poll::Ready(None);
            }
        };
        let Some(data) = frame.data_ref() else {
            // The trailers, which end the body.
            drop(inner);
            self.done = true;
            return Poll::Ready(Some(Ok(frame)));
        };
        // Handed on: the client may send as much again.
        let len = data.len();
        if released.is_empty()
            && let Some(waker) = waker
        {
            waker.wake_by_ref();
        }
        released.push((id, len));
        shared.mark_pending();
        drop(inner);
        if let Some(remaining) = &mut self.remaining {
            *remaining = remaining.saturating_sub(len as u64);
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        if self.done {
            return true;
        }
        let Some(shared) = &self.shared else {
            return true;
        };
        let inner = shared.lock();
        inner.bodies.get(&self.id).is_some_and(Incoming::is_end)
    }

    fn size_hint(&self) -> SizeHint {
        if self.done {
            return SizeHint::with_exact(0);
        }
        match self.remaining {
            Some(remaining) => SizeHint::with_exact(remaining),
            None => SizeHint::default(),
        }
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        let Some(shared) = &self.shared else {
            return;
        };
        let mut inner = shared.lock();
        if let Some(incoming) = inner.bodies.remove(&self.id) {
            // What was never read is the connection's window again.
            let unread = incoming.unread();
            if unread > 0 {
                inner.released.push((self.id, unread));
                shared.mark_pending();
                if let Some(waker) = &inner.waker {
                    waker.wake_by_ref();
                }
            }
        }
    }
}

/// One stream's work on the connection's task.
struct Task<Fut> {
    waker: Waker,
    /// The request has a body still arriving (its end must be told if the stream ends first).
    body: bool,
    state: TaskState<Fut>,
    _open: StreamGuard,
}

enum TaskState<Fut> {
    /// The exchange, until it answers.
    Respond(Pin<Box<Fut>>),
    /// The response body, sent as the client's windows allow.
    Send(Body),
}

thread_local! {
    /// The events of one read, between the connection's state machine and the streams: one
    /// buffer for every connection this thread serves, not one each. Warm in cache however
    /// many connections there are, where a connection's own (some 150 bytes an event) was
    /// written to cold memory at every request once connections number in the thousands.
    static EVENTS: std::cell::Cell<Vec<Event>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Serves a client's HTTP/2 connection: each request to `handle`, its response back (a
/// client that resets the stream meanwhile drops the request's future). It closes gracefully
/// once no stream has been open for the idle timeout or `drain` is signaled, and abruptly when
/// the client stops answering pings.
///
/// # Errors
///
/// The connection failed (a protocol error, IO, an unanswered ping).
pub(crate) async fn serve<I, F, Fut>(
    io: I,
    limits: &Limits,
    clock: Clock,
    drain: Option<Drain>,
    handle: F,
) -> Result<(), ServeError>
where
    I: Io,
    F: Fn(Request<RequestBody>) -> Fut,
    Fut: Future<Output = Response<Body>> + Send,
{
    let config = Config {
        role: Role::Server,
        max_concurrent_streams: limits.max_concurrent_streams,
        stream_window: STREAM_WINDOW,
        connection_window: CONNECTION_WINDOW,
        max_header_list_size: u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX),
        send_buffer: SEND_BUFFER,
        max_abuse: 1000,
    };
    let open = Streams::new(clock);
    let mut server = Server {
        io,
        conn: Connection::new(config),
        read: BytesMut::with_capacity(READ_CHUNK),
        read_closed: false,
        shared: Arc::new(Shared::default()),
        registered: None,
        polling: Vec::new(),
        woken: Vec::new(),
        tasks: StreamMap::default(),
        keepalive: Keepalive::new(clock, limits.idle_timeout / 4),
        drain,
        handle,
        open: Arc::clone(&open),
        closing: false,
    };
    // Boxed to be polled through its gate (only when its timer has fired).
    let mut idle = super::conn::Gated::new(Box::pin(open.idle(limits.idle_timeout)));
    std::future::poll_fn(|cx| {
        if !server.closing {
            let drained = server
                .drain
                .as_mut()
                .is_some_and(|d| d.poll_signaled(cx).is_ready());
            if drained || Pin::new(&mut idle).poll(cx).is_ready() {
                tracing::debug!(drained, "h2 connection closing gracefully");
                server.conn.go_away(ErrorCode::NO_ERROR);
                server.closing = true;
            }
        }
        server.poll(cx)
    })
    .await
}

struct Server<I, F, Fut> {
    io: I,
    conn: Connection,
    read: BytesMut,
    /// The client closed its side: nothing more to read.
    read_closed: bool,
    shared: Arc<Shared>,
    /// The waker last left in `shared` for others to wake the task with.
    registered: Option<Waker>,
    /// The woken streams being polled (kept to reuse its allocation).
    polling: Vec<u32>,
    /// Streams the task itself found ready (a new request, room to send): polled on its next
    /// pass, without the shared lock.
    woken: Vec<u32>,
    tasks: StreamMap<Task<Fut>>,
    keepalive: Keepalive,
    drain: Option<Drain>,
    handle: F,
    open: Arc<Streams>,
    closing: bool,
}

impl<I, F, Fut> Drop for Server<I, F, Fut> {
    fn drop(&mut self) {
        // Readers of request bodies elsewhere must not wait for a connection that is gone.
        let mut inner = self.shared.lock();
        inner.waker = None;
        let mut wakers = Vec::new();
        for incoming in inner.bodies.values_mut() {
            wakers.extend(incoming.fail(ErrorCode::CANCEL));
        }
        drop(inner);
        for waker in wakers {
            waker.wake();
        }
    }
}

impl<I, F, Fut> Server<I, F, Fut>
where
    I: Io,
    F: Fn(Request<RequestBody>) -> Fut,
    Fut: Future<Output = Response<Body>> + Send,
{
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ServeError>> {
        // Left in `shared` only when the task's waker changed (once, in practice).
        if !self
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            let waker = cx.waker().clone();
            self.shared.lock().waker = Some(waker.clone());
            self.registered = Some(waker);
        }
        while let Poll::Ready(due) = self.keepalive.poll_due(cx) {
            if let Err(timeout) = due {
                return Poll::Ready(Err(ServeError::PingTimeout(timeout)));
            }
            self.conn.ping(PING_DATA);
        }
        let mut budget = POLL_BUDGET;
        loop {
            let mut progress = false;
            match self.poll_read(cx) {
                Ok(read) => progress |= read,
                Err(err) => {
                    // Write the GOAWAY that says why, if the socket takes it.
                    let _ = self.poll_write(cx);
                    return Poll::Ready(Err(err));
                }
            }
            progress |= self.poll_streams(&mut budget);
            match self.poll_write(cx) {
                Ok(wrote) => progress |= wrote,
                Err(err) => return Poll::Ready(Err(err)),
            }
            if self.conn.is_done() && self.tasks.is_empty() && !self.conn.wants_write() {
                return Poll::Ready(Ok(()));
            }
            if self.read_closed && self.tasks.is_empty() {
                // The client is gone and nothing is left to answer.
                return Poll::Ready(Ok(()));
            }
            if !progress {
                return Poll::Pending;
            }
            if budget == 0 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
        }
    }

    /// Reads what the socket has and hands it to the state machine; whether anything came.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Result<bool, ServeError> {
        if self.read_closed || self.conn.output().len() > MAX_UNWRITTEN {
            return Ok(false);
        }
        let read = match super::conn::poll_read(&mut self.io, cx, &mut self.read) {
            Poll::Pending => return Ok(false),
            Poll::Ready(read) => read?,
        };
        if read == 0 {
            self.read_closed = true;
            // Streams still answering are cancelled: the client cannot read their answers.
            self.tasks.clear();
            return Ok(true);
        }
        let mut events = EVENTS.take();
        let received = self
            .conn
            .recv(&mut self.read, &mut |event| events.push(event));
        for event in events.drain(..) {
            self.on_event(event);
        }
        EVENTS.set(events);
        received.map_err(ServeError::Protocol)?;
        Ok(true)
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Headers {
                stream,
                fields,
                end_stream,
            } => self.accept(stream, &fields, end_stream),
            Event::Data {
                stream,
                data,
                end_stream,
            } => {
                let id = stream.value();
                let mut inner = self.shared.lock();
                match inner.bodies.get_mut(&id) {
                    Some(incoming) => {
                        let waker = incoming.push_data(data, end_stream);
                        // Woken without the lock: the reader may be one of this
                        // connection's own streams, whose waker takes it.
                        drop(inner);
                        if let Some(waker) = waker {
                            waker.wake();
                        }
                    }
                    None => {
                        // Nobody reads it any more.
                        drop(inner);
                        self.conn.release(stream, data.len());
                    }
                }
            }
            Event::Trailers { stream, fields } => {
                let trailers = header_map(&fields);
                let mut inner = self.shared.lock();
                let waker = inner
                    .bodies
                    .get_mut(&stream.value())
                    .and_then(|incoming| incoming.push_trailers(trailers));
                drop(inner);
                if let Some(waker) = waker {
                    waker.wake();
                }
            }
            Event::Reset { stream, code, .. } => {
                let id = stream.value();
                // The client gave up: dropping the request's future cancels it.
                // The body's reader may outlive the task (a response that ended first), so it
                // is told whatever became of the task.
                self.tasks.remove(&id);
                self.end_body(id, code);
            }
            Event::SendReady { stream } => self.woken.push(stream.value()),
            Event::Pong { .. } => self.keepalive.pong(),
            Event::GoAway { .. } | Event::Settings => {}
        }
    }

    /// The request body of `id` ends with the stream, short of its end.
    fn end_body(&self, id: u32, code: ErrorCode) {
        let mut inner = self.shared.lock();
        let waker = inner
            .bodies
            .get_mut(&id)
            .and_then(|incoming| incoming.fail(code));
        drop(inner);
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// A new request: its exchange starts on this task.
    fn accept(&mut self, stream: StreamId, fields: &HeaderList, end_stream: bool) {
        let id = stream.value();
        let Some(parts) = request_parts(fields) else {
            self.conn.reset(stream, ErrorCode::PROTOCOL_ERROR);
            return;
        };
        let body = if end_stream {
            RequestBody::empty()
        } else {
            self.shared.lock().bodies.insert(id, Incoming::default());
            RequestBody {
                shared: Some(Arc::clone(&self.shared)),
                id,
                remaining: fields.content_length(),
                done: false,
            }
        };
        let mut request = Request::new(body);
        *request.method_mut() = parts.method;
        *request.uri_mut() = parts.uri;
        *request.version_mut() = Version::HTTP_2;
        *request.headers_mut() = parts.headers;
        // Boxed: the request's future (the exchange's whole state, several KB) is written
        // once into its box, built in place rather than on the stack and copied.
        let respond = Box::into_pin(Box::write(Box::new_uninit(), (self.handle)(request)));
        let waker = Waker::from(Arc::new(StreamWaker {
            id,
            shared: Arc::clone(&self.shared),
        }));
        self.tasks.insert(
            id,
            Task {
                waker,
                body: !end_stream,
                state: TaskState::Respond(respond),
                _open: self.open.open(),
            },
        );
        self.woken.push(id);
    }

    /// Gives back window for what body readers handed on, then polls the streams that were
    /// woken; whether any was.
    fn poll_streams(&mut self, budget: &mut usize) -> bool {
        // A list kept for the purpose, so that it keeps its capacity.
        let mut ready = std::mem::take(&mut self.polling);
        if self.shared.pending.load(Ordering::Acquire) {
            let mut inner = self.shared.lock();
            ready.append(&mut inner.ready);
            let released = std::mem::take(&mut inner.released);
            self.shared.pending.store(false, Ordering::Relaxed);
            drop(inner);
            for (id, len) in released {
                self.conn.release(StreamId::new(id), len);
            }
        }
        // Woken from elsewhere first (most of them before this pass began), then what this
        // pass found.
        ready.append(&mut self.woken);
        if ready.is_empty() {
            self.polling = ready;
            return false;
        }
        for id in ready.drain(..) {
            if *budget == 0 {
                // Polled on the next pass.
                self.woken.push(id);
                continue;
            }
            *budget -= 1;
            let Some(task) = self.tasks.get_mut(&id) else {
                continue;
            };
            if poll_task(&mut self.conn, StreamId::new(id), task).is_ready() {
                let body = task.body;
                self.tasks.remove(&id);
                if body && !self.conn.is_open(StreamId::new(id)) {
                    // The response ended before the request body did (or the stream was
                    // reset): its reader must not wait for the rest.
                    self.end_body(id, ErrorCode::CANCEL);
                }
            }
        }
        self.polling = ready;
        true
    }

    /// Writes what the state machine has to say; whether anything was written.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Result<bool, ServeError> {
        Ok(super::conn::write_some(
            &mut self.io,
            cx,
            self.conn.output(),
        )?)
    }
}

/// Polls one stream's work: its exchange, then its response body as far as the client's
/// windows allow. Ready when the stream needs nothing more from this task.
fn poll_task<Fut>(conn: &mut Connection, id: StreamId, task: &mut Task<Fut>) -> Poll<()>
where
    Fut: Future<Output = Response<Body>>,
{
    let mut cx = Context::from_waker(&task.waker);
    if let TaskState::Respond(respond) = &mut task.state {
        let Poll::Ready(response) = respond.as_mut().poll(&mut cx) else {
            return Poll::Pending;
        };
        let (mut parts, body) = response.into_parts();
        // HTTP/2 forbids connection-specific fields (RFC 9113 §8.2.2).
        super::strip_hop_by_hop(&mut parts.headers);
        let end = http_body::Body::is_end_stream(&body);
        let status = [Field::new(b":status", parts.status.as_str().as_bytes())];
        let fields = status.into_iter().chain(fields_of(&parts.headers));
        conn.send_headers(id, fields, end);
        if end {
            return Poll::Ready(());
        }
        task.state = TaskState::Send(body);
    }
    let TaskState::Send(body) = &mut task.state else {
        return Poll::Ready(());
    };
    loop {
        if conn.send_capacity(id) == 0 {
            if !conn.is_open(id) {
                return Poll::Ready(());
            }
            // Polled again on SendReady.
            return Poll::Pending;
        }
        let frame = match Pin::new(&mut *body).poll_frame(&mut cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => {
                conn.send_data(id, Bytes::new(), true);
                return Poll::Ready(());
            }
            Poll::Ready(Some(Err(err))) => {
                tracing::debug!(error = %err, "response body ended early");
                conn.reset(id, super::reset_code(&*err));
                return Poll::Ready(());
            }
            Poll::Ready(Some(Ok(frame))) => frame,
        };
        match frame.into_data() {
            Ok(data) => {
                let end = http_body::Body::is_end_stream(&*body);
                conn.send_data(id, data, end);
                if end {
                    return Poll::Ready(());
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    conn.send_trailers(id, fields_of(&trailers));
                    return Poll::Ready(());
                }
            }
        }
    }
}

/// A request head as the `http` crate holds it.
struct RequestParts {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
}

/// The request head of a checked header list; `None` for a head the `http` crate cannot
/// hold (the stream is then reset).
fn request_parts(fields: &HeaderList) -> Option<RequestParts> {
    let method = Method::from_bytes(fields.method()?).ok()?;
    let mut uri = http::uri::Parts::default();
    if let Some(scheme) = fields.scheme() {
        uri.scheme = Some(match scheme {
            b"http" => Scheme::HTTP,
            b"https" => Scheme::HTTPS,
            other => Scheme::try_from(other).ok()?,
        });
    }
    if let Some(authority) = fields.pseudo_bytes(Pseudo::Authority) {
        uri.authority = Some(Authority::from_maybe_shared(authority).ok()?);
    }
    if let Some(path) = fields.pseudo_bytes(Pseudo::Path) {
        uri.path_and_query = Some(PathAndQuery::from_maybe_shared(path).ok()?);
    }
    if uri.scheme.is_some() && uri.authority.is_none() {
        // A request without `:authority` (its `Host` field names the target): the URI keeps
        // the path only, and the exchange reads `Host`.
        uri.scheme = None;
    }
    let uri = Uri::from_parts(uri).ok()?;
    Some(RequestParts {
        method,
        uri,
        headers: header_map(fields),
    })
}
