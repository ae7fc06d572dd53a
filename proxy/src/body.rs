//! The body type the proxy moves, and the response-body wrapper that settles a request.

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
    /// The upstream failed mid-body (reset, truncated).
    Error,
    /// The downstream went away before the end.
    Cancelled,
}

/// Called exactly once when a response body ends, however it ends.
pub(crate) trait OnBodyEnd: Send + 'static {
    fn on_end(self, end: BodyEnd);
}

/// A response body that reports its end (clean, failed or dropped) exactly once. The guard is
/// held inline (no allocation of its own): the body is boxed into [`Body`] once anyway.
pub(crate) struct GuardedBody<B, G: OnBodyEnd> {
    inner: B,
    guard: Option<G>,
    trailers: Option<http::HeaderMap>,
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
    /// never poll it.
    pub(crate) fn new(inner: B, guard: G) -> Self {
        let mut this = Self {
            inner,
            guard: Some(guard),
            trailers: None,
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
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
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
        self.inner.is_end_stream()
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

/// What a [`RecordingBody`] has yielded so far.
#[derive(Debug, Default)]
struct Recording {
    data: Vec<Bytes>,
    trailers: Option<http::HeaderMap>,
    len: usize,
    /// More than the limit went by: the copy was dropped and cannot be replayed.
    overflow: bool,
    /// The body reached its end.
    ended: bool,
}

/// A request body that keeps a copy of the frames it yields, up to a limit, so that a request
/// the upstream provably did not process (a refused h2 stream) can be sent again after its
/// body was already consumed. The copy shares the frames' memory (`Bytes` clones).
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
    /// The whole body again, if it ended within the limit.
    pub(crate) fn replay(&self) -> Option<Body> {
        let record = lock_recording(&self.0);
        if !record.ended || record.overflow {
            return None;
        }
        let frames: Vec<Frame<Bytes>> = record
            .data
            .iter()
            .cloned()
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
            Poll::Ready(Some(Ok(frame))) => {
                let mut record = lock_recording(&this.record);
                if let Some(data) = frame.data_ref() {
                    if !record.overflow {
                        if record.len + data.len() > this.limit {
                            record.overflow = true;
                            record.data = Vec::new();
                        } else {
                            record.len += data.len();
                            record.data.push(data.clone());
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
    async fn a_body_past_the_limit_or_unfinished_does_not_replay() {
        let (body, recorded) = recording(frames(&["abcd", "efgh"], false), 6);
        let _ = body.collect().await.unwrap();
        assert!(recorded.replay().is_none());

        let (mut body, recorded) = recording(frames(&["ab", "cd"], false), 16);
        let _ = body.frame().await;
        assert!(recorded.replay().is_none(), "half read");
    }
}
