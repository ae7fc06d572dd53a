//! The body type the proxy moves, and the response-body wrapper that settles a request.

use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;

/// A boxed error at the HTTP boundary (STYLE.md §4).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The one body type the proxy's services exchange: streamed, never buffered whole.
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// Boxes any body into [`Body`].
pub fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// An empty body.
#[must_use]
pub fn empty() -> Body {
    boxed(http_body_util::Empty::new())
}

/// A body of one chunk.
#[must_use]
pub fn full(bytes: impl Into<Bytes>) -> Body {
    boxed(http_body_util::Full::new(bytes.into()))
}

/// How a response body ended, for the guard's bookkeeping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum BodyEnd {
    /// The stream ended cleanly, with its trailers if it had any (gRPC puts its status there).
    Complete {
        /// The trailers frame.
        trailers: Option<http::HeaderMap>,
    },
    /// The connection switched protocols (a WebSocket upgrade, a CONNECT tunnel): the
    /// response the client asked for.
    Switched,
    /// The upstream failed mid-body (reset, truncated).
    Error,
    /// The downstream went away before the end.
    Cancelled,
    /// The request's deadline passed before the end; the proxy cut the response.
    TimedOut,
}

/// Told exactly once when a response body ends, however it ends.
pub(crate) trait OnBodyEnd: Send + 'static {
    fn on_end(self, end: BodyEnd);

    /// When the body must have ended; `None`: no deadline.
    fn deadline(&self) -> Option<conduit_core::time::Instant> {
        None
    }

    /// How to end a body cut at its deadline: the trailers to end it with (gRPC: the status
    /// a client reports), or an error (the stream is reset).
    fn expired(&self) -> Result<http::HeaderMap, BoxError> {
        Err("response deadline passed".into())
    }
}

/// A response body that reports its end (clean, failed, dropped or cut at its deadline)
/// exactly once. The guard is held inline (no allocation of its own): the body is boxed into
/// [`Body`] once anyway. A deadline costs a timer only once the body has had to wait: most
/// responses are whole when first polled and never arm one.
pub(crate) struct GuardedBody<B, G: OnBodyEnd> {
    inner: B,
    guard: Option<G>,
    trailers: Option<http::HeaderMap>,
    deadline: Option<conduit_core::time::Instant>,
    clock: crate::clock::Clock,
    /// The body fails once no frame has come for this long (the idle timeout).
    idle: Option<std::time::Duration>,
    /// A frame came since the timer was last armed.
    moved: bool,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<B, G: OnBodyEnd> std::fmt::Debug for GuardedBody<B, G> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardedBody")
            .field("ended", &self.guard.is_none())
            .finish()
    }
}

impl<B: http_body::Body, G: OnBodyEnd> GuardedBody<B, G> {
    /// Wraps `inner`; an already-finished body (no content) settles at once, since hyper may
    /// never poll it. The body fails once no frame has come for `idle` (`None`: no bound).
    pub(crate) fn new(
        inner: B,
        guard: G,
        clock: crate::clock::Clock,
        idle: Option<std::time::Duration>,
    ) -> Self {
        let deadline = guard.deadline();
        let mut this = Self {
            inner,
            guard: Some(guard),
            trailers: None,
            deadline,
            clock,
            idle,
            moved: false,
            sleep: None,
        };
        if this.inner.is_end_stream() {
            this.end(BodyEnd::Complete { trailers: None });
        }
        this
    }
}

impl<B, G: OnBodyEnd> GuardedBody<B, G> {
    fn end(&mut self, end: BodyEnd) {
        if let Some(guard) = self.guard.take() {
            guard.on_end(end);
        }
    }
}

impl<B, G> http_body::Body for GuardedBody<B, G>
where
    G: OnBodyEnd + Unpin,
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.guard.is_none() {
            // Ended (cut at its deadline): nothing more.
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => {
                // The timer is armed (or moved) only when the body has had to wait, and only
                // after progress: bodies that are whole at once never touch it.
                if this.sleep.is_none() || std::mem::take(&mut this.moved) {
                    let now = this.clock.now();
                    let idle_at = this.idle.map(|idle| now + idle);
                    let at = match (this.deadline, idle_at) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    }
                    .map(|at| this.clock.to_tokio(at));
                    match (&mut this.sleep, at) {
                        (Some(sleep), Some(at)) => sleep.as_mut().reset(at),
                        (None, Some(at)) => {
                            this.sleep = Some(Box::pin(tokio::time::sleep_until(at)));
                        }
                        (_, None) => {}
                    }
                }
                if let Some(sleep) = &mut this.sleep
                    && sleep.as_mut().poll(cx).is_ready()
                {
                    if this.deadline.is_some_and(|d| this.clock.now() >= d) {
                        let expired = this.guard.as_ref().map(OnBodyEnd::expired);
                        this.end(BodyEnd::TimedOut);
                        return match expired {
                            Some(Ok(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
                            Some(Err(err)) => Poll::Ready(Some(Err(err))),
                            None => Poll::Ready(None),
                        };
                    }
                    this.end(BodyEnd::Error);
                    return Poll::Ready(Some(Err("the response body stopped moving".into())));
                }
                Poll::Pending
            }
            Poll::Ready(None) => {
                let trailers = this.trailers.take();
                this.end(BodyEnd::Complete { trailers });
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(err))) => {
                this.end(BodyEnd::Error);
                Poll::Ready(Some(Err(err.into())))
            }
            Poll::Ready(Some(Ok(frame))) => {
                this.moved = true;
                if let Some(trailers) = frame.trailers_ref() {
                    // Trailers are a few small fields; the copy lets the guard classify the
                    // response after the frame has gone downstream.
                    this.trailers = Some(trailers.clone());
                }
                if this.inner.is_end_stream() {
                    let trailers = this.trailers.take();
                    this.end(BodyEnd::Complete { trailers });
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.guard.is_none() || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B, G: OnBodyEnd> Drop for GuardedBody<B, G> {
    fn drop(&mut self) {
        self.end(BodyEnd::Cancelled);
    }
}

/// A body that fails once no frame has come for its idle timeout, so an upload that stops
/// moving cannot hold a stream (and the request's endpoint) forever. The timer is armed only
/// once the body has had to wait.
pub(crate) struct IdleBody<B> {
    inner: B,
    idle: std::time::Duration,
    clock: crate::clock::Clock,
    moved: bool,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<B> IdleBody<B> {
    pub(crate) fn new(inner: B, idle: std::time::Duration, clock: crate::clock::Clock) -> Self {
        Self {
            inner,
            idle,
            clock,
            moved: false,
            sleep: None,
        }
    }
}

impl<B> http_body::Body for IdleBody<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.moved = true;
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                // The clock is read only to (re)arm: after progress, or the first wait.
                let rearm = this.sleep.is_none() || std::mem::take(&mut this.moved);
                if rearm {
                    let at = this.clock.to_tokio(this.clock.now() + this.idle);
                    match &mut this.sleep {
                        Some(sleep) => sleep.as_mut().reset(at),
                        None => this.sleep = Some(Box::pin(tokio::time::sleep_until(at))),
                    }
                }
                let expired = this
                    .sleep
                    .as_mut()
                    .is_some_and(|sleep| sleep.as_mut().poll(cx).is_ready());
                if expired {
                    return Poll::Ready(Some(Err(format!(
                        "the request body stopped moving for {:?}",
                        this.idle
                    )
                    .into())));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Open streams of one connection, and since when it has had none: the connection is idle
/// (and closed after its idle timeout) only while no stream is open.
#[derive(Debug)]
pub(crate) struct Streams {
    open: std::sync::atomic::AtomicUsize,
    /// When the last stream ended (core-instant nanoseconds).
    idle_since: std::sync::atomic::AtomicU64,
    clock: crate::clock::Clock,
}

impl Streams {
    pub(crate) fn new(clock: crate::clock::Clock) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self {
            open: std::sync::atomic::AtomicUsize::new(0),
            idle_since: std::sync::atomic::AtomicU64::new(clock.now().as_nanos()),
            clock,
        })
    }

    /// A stream opened; it is open until the guard is dropped.
    pub(crate) fn open(self: &std::sync::Arc<Self>) -> StreamGuard {
        self.open.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        StreamGuard(std::sync::Arc::clone(self))
    }

    /// Streams open now.
    pub(crate) fn open_now(&self) -> usize {
        self.open.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// When the last stream ended (or the connection started), if none is open.
    pub(crate) fn idle_since(&self) -> conduit_core::time::Instant {
        conduit_core::time::Instant::from_nanos(
            self.idle_since.load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// Resolves once no stream has been open for `idle`.
    pub(crate) async fn idle(&self, idle: std::time::Duration) {
        loop {
            let since = conduit_core::time::Instant::from_nanos(
                self.idle_since.load(std::sync::atomic::Ordering::Relaxed),
            );
            self.clock.sleep_until(since + idle).await;
            let since_now = conduit_core::time::Instant::from_nanos(
                self.idle_since.load(std::sync::atomic::Ordering::Relaxed),
            );
            if self.open.load(std::sync::atomic::Ordering::Relaxed) == 0
                && self.clock.now().saturating_duration_since(since_now) >= idle
            {
                return;
            }
            if self.open.load(std::sync::atomic::Ordering::Relaxed) > 0 {
                // Busy: look again one idle period from now.
                self.idle_since.store(
                    self.clock.now().as_nanos(),
                    std::sync::atomic::Ordering::Relaxed,
                );
            }
        }
    }
}

/// Keeps a stream counted as open; dropped with the response body.
#[derive(Debug)]
pub(crate) struct StreamGuard(std::sync::Arc<Streams>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self
            .0
            .open
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed)
            == 1
        {
            self.0.idle_since.store(
                self.0.clock.now().as_nanos(),
                std::sync::atomic::Ordering::Relaxed,
            );
        }
    }
}

/// What a [`RecordingBody`] has yielded so far.
#[derive(Debug, Default)]
struct Recording {
    data: Vec<Bytes>,
    /// Data past [`MAX_RECORDED_FRAMES`] frames, copied together.
    tail: bytes::BytesMut,
    trailers: Option<http::HeaderMap>,
    len: usize,
    /// More than the limit went by: the copy was dropped and cannot be replayed.
    overflow: bool,
    /// The body reached its end.
    ended: bool,
}

/// The most frames a recording keeps before it merges them into one: a body sent as many tiny
/// frames would otherwise cost a `Bytes` handle per byte or two.
const MAX_RECORDED_FRAMES: usize = 16;

/// A request body that keeps a copy of the frames it yields, up to a limit, so that a request
/// the upstream provably did not process (a refused h2 stream) can be sent again after its
/// body was already consumed. The copy shares the frames' memory (`Bytes` clones) until there
/// are more than [`MAX_RECORDED_FRAMES`], then is merged into one buffer; it stops (and is
/// freed) once its [`Recorded`] handle is dropped, which the exchange does when response
/// headers arrive.
pub(crate) struct RecordingBody {
    inner: Body,
    record: std::sync::Arc<std::sync::Mutex<Recording>>,
    limit: usize,
}

/// The copy a [`RecordingBody`] keeps.
#[derive(Clone, Debug)]
pub(crate) struct Recorded(std::sync::Arc<std::sync::Mutex<Recording>>);

fn lock_recording(record: &std::sync::Mutex<Recording>) -> std::sync::MutexGuard<'_, Recording> {
    // Every update leaves the recording consistent.
    record
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Wraps `inner` to keep a copy of up to `limit` bytes of it.
pub(crate) fn recording(inner: Body, limit: usize) -> (Body, Recorded) {
    let record = std::sync::Arc::default();
    let body = RecordingBody {
        inner,
        record: std::sync::Arc::clone(&record),
        limit,
    };
    (boxed(body), Recorded(record))
}

impl Recorded {
    /// Whether [`replay`](Self::replay) would give the body: it ended within the limit.
    pub(crate) fn complete(&self) -> bool {
        let record = lock_recording(&self.0);
        record.ended && !record.overflow
    }

    /// Whether the body is kept whole: `Some(false)` once it outgrew the limit, `None` while
    /// it is still being read within it.
    pub(crate) fn whole(&self) -> Option<bool> {
        let record = lock_recording(&self.0);
        if record.overflow {
            Some(false)
        } else {
            record.ended.then_some(true)
        }
    }

    /// The whole body again, if it ended within the limit.
    pub(crate) fn replay(&self) -> Option<Body> {
        let record = lock_recording(&self.0);
        if !record.ended || record.overflow {
            return None;
        }
        let tail = (!record.tail.is_empty()).then(|| Bytes::copy_from_slice(&record.tail));
        let frames: Vec<Frame<Bytes>> = record
            .data
            .iter()
            .cloned()
            .chain(tail)
            .map(Frame::data)
            .chain(record.trailers.clone().map(Frame::trailers))
            .collect();
        let stream =
            futures_util::stream::iter(frames.into_iter().map(Ok::<_, std::convert::Infallible>));
        Some(boxed(http_body_util::StreamBody::new(stream)))
    }
}

impl http_body::Body for RecordingBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(_))) if std::sync::Arc::strong_count(&this.record) == 1 => {
                // Nobody can replay any more: stop recording, and free the copy.
                let mut record = lock_recording(&this.record);
                if !record.overflow {
                    record.overflow = true;
                    record.data = Vec::new();
                    record.tail = bytes::BytesMut::new();
                    record.trailers = None;
                }
            }
            Poll::Ready(Some(Ok(frame))) => {
                let mut record = lock_recording(&this.record);
                if let Some(data) = frame.data_ref() {
                    if !record.overflow {
                        if record.len + data.len() > this.limit {
                            record.overflow = true;
                            record.data = Vec::new();
                            record.tail = bytes::BytesMut::new();
                        } else {
                            record.len += data.len();
                            if record.data.len() < MAX_RECORDED_FRAMES {
                                record.data.push(data.clone());
                            } else {
                                // Past the frame bound, later frames are copied into one
                                // buffer (at most the limit, amortised once).
                                record.tail.extend_from_slice(data);
                            }
                        }
                    }
                } else if let Some(trailers) = frame.trailers_ref() {
                    record.trailers = Some(trailers.clone());
                }
                if this.inner.is_end_stream() {
                    record.ended = true;
                }
            }
            Poll::Ready(None) => lock_recording(&this.record).ended = true,
            Poll::Ready(Some(Err(_))) | Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt as _;

    use super::*;

    fn frames(chunks: &[&'static str], trailers: bool) -> Body {
        let mut frames: Vec<Frame<Bytes>> = chunks
            .iter()
            .map(|c| Frame::data(Bytes::from_static(c.as_bytes())))
            .collect();
        if trailers {
            let mut map = http::HeaderMap::new();
            map.insert("grpc-status", http::HeaderValue::from_static("0"));
            frames.push(Frame::trailers(map));
        }
        let stream =
            futures_util::stream::iter(frames.into_iter().map(Ok::<_, std::convert::Infallible>));
        boxed(http_body_util::StreamBody::new(stream))
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_body_read_whole_within_the_limit_replays_with_its_trailers() {
        let (body, recorded) = recording(frames(&["ab", "cd"], true), 16);
        assert!(recorded.replay().is_none(), "nothing read yet");
        let first = body.collect().await.unwrap();
        assert_eq!(first.trailers().unwrap()["grpc-status"], "0");
        assert_eq!(first.to_bytes(), "abcd");
        let again = recorded.replay().unwrap().collect().await.unwrap();
        assert_eq!(again.trailers().unwrap()["grpc-status"], "0");
        assert_eq!(again.to_bytes(), "abcd");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn many_tiny_frames_keep_few_handles_and_replay_whole() {
        let chunks: Vec<&'static str> = (0..1000).map(|_| "x").collect();
        let (body, recorded) = recording(frames(&chunks, false), 4096);
        assert_eq!(body.collect().await.unwrap().to_bytes().len(), 1000);
        assert!(lock_recording(&recorded.0).data.len() <= MAX_RECORDED_FRAMES);
        let again = recorded.replay().unwrap().collect().await.unwrap();
        assert_eq!(again.to_bytes(), "x".repeat(1000));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn recording_stops_once_nobody_can_replay() {
        let (mut body, recorded) = recording(frames(&["ab", "cd", "ef"], false), 16);
        let _ = body.frame().await;
        let weak = std::sync::Arc::downgrade(&recorded.0);
        drop(recorded);
        let _ = body.frame().await;
        let record = weak.upgrade().expect("the body holds it");
        let record = lock_recording(&record);
        assert!(
            record.overflow && record.data.is_empty(),
            "the copy is freed"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_body_past_the_limit_or_unfinished_does_not_replay() {
        let (body, recorded) = recording(frames(&["abcd", "efgh"], false), 6);
        let _ = body.collect().await.unwrap();
        assert!(recorded.replay().is_none());

        let (mut body, recorded) = recording(frames(&["ab", "cd"], false), 16);
        let _ = body.frame().await;
        assert!(recorded.replay().is_none(), "half read");
    }
}
