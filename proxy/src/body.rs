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
