//! Bodies on HTTP/2 streams, both ways: a stream's incoming data as a body the proxy hands on
//! ([`RecvBody`]), and a body sent on a stream ([`send_body`]), each within the peer's flow
//! control. The proxy gives a stream's window back only as it hands the data on, so a peer can
//! never make it buffer more than the connection's window.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream};
use http::HeaderMap;
use http_body::{Frame, SizeHint};

use crate::body::{Body, BoxError};

/// A stream's incoming body: its data frames as they come (each one's window given back to
/// the peer as it is yielded), then its trailers.
#[derive(Debug)]
pub(crate) struct RecvBody {
    stream: RecvStream,
    /// The data frames have ended; trailers (if any) come next.
    data_done: bool,
    /// What `content-length` said is still to come, for the size hint.
    remaining: Option<u64>,
}

impl RecvBody {
    /// The body of `stream`, whose head carried `headers`.
    pub(crate) fn new(stream: RecvStream, headers: &HeaderMap) -> Self {
        let remaining = headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        Self {
            stream,
            data_done: false,
            remaining,
        }
    }
}

impl http_body::Body for RecvBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if !self.data_done {
            match ready!(self.stream.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Handed on: the peer may send as much again. (h2 has checked the data
                    // against `content-length` already.)
                    let _ = self.stream.flow_control().release_capacity(data.len());
                    if let Some(remaining) = &mut self.remaining {
                        *remaining = remaining.saturating_sub(data.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(err)) => return Poll::Ready(Some(Err(err))),
                None => self.data_done = true,
            }
        }
        match ready!(self.stream.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(err) => Poll::Ready(Some(Err(err))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.stream.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.stream.is_end_stream() {
            return SizeHint::with_exact(0);
        }
        match self.remaining {
            Some(remaining) => SizeHint::with_exact(remaining),
            None => SizeHint::default(),
        }
    }
}

/// How a body sent on a stream ended early.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SendEnd {
    /// The peer reset the stream (it no longer wants the rest).
    #[error("the peer reset the stream ({0})")]
    Reset(Reason),
    /// The body failed; the stream was reset with the reason it carried.
    #[error("the body failed: {0}")]
    Body(BoxError),
    /// The stream or its connection failed.
    #[error("{0}")]
    Stream(h2::Error),
}

/// Sends `body` on `stream`: each data frame once the peer's window has room for it (the last
/// one carrying the end of the stream), then the trailers. A peer that resets the stream stops
/// it at once, without reading the rest of the body; a body that fails resets the stream with
/// the reason its error carries (an upstream's own reset passes through), else
/// `INTERNAL_ERROR`.
pub(crate) async fn send_body(
    mut body: Body,
    mut stream: SendStream<Bytes>,
) -> Result<(), SendEnd> {
    std::future::poll_fn(|cx| poll_send_body(&mut body, &mut stream, cx)).await
}

fn poll_send_body(
    body: &mut Body,
    stream: &mut SendStream<Bytes>,
    cx: &mut Context<'_>,
) -> Poll<Result<(), SendEnd>> {
    use http_body::Body as _;
    loop {
        // Room for at least a byte before the next chunk is read: h2 then holds the whole
        // chunk and sends it as the window opens, and the body is read no faster than the peer
        // takes it (the capacity h2 reports counts what it still holds).
        stream.reserve_capacity(1);
        if stream.capacity() == 0 {
            loop {
                match ready!(stream.poll_capacity(cx)) {
                    Some(Ok(0)) => {}
                    Some(Ok(_)) => break,
                    Some(Err(err)) => return Poll::Ready(Err(SendEnd::Stream(err))),
                    None => return Poll::Ready(Err(reset_or_closed(stream, cx))),
                }
            }
        } else if let Poll::Ready(reset) = stream.poll_reset(cx) {
            return Poll::Ready(Err(match reset {
                Ok(reason) => SendEnd::Reset(reason),
                Err(err) => SendEnd::Stream(err),
            }));
        }
        let frame = match ready!(Pin::new(&mut *body).poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            Some(Err(err)) => {
                stream.send_reset(reason_of(&*err));
                return Poll::Ready(Err(SendEnd::Body(err)));
            }
            None => {
                stream.reserve_capacity(0);
                return Poll::Ready(
                    stream
                        .send_data(Bytes::new(), true)
                        .map_err(SendEnd::Stream),
                );
            }
        };
        match frame.into_data() {
            Ok(data) => {
                let end = body.is_end_stream();
                stream.send_data(data, end).map_err(SendEnd::Stream)?;
                if end {
                    return Poll::Ready(Ok(()));
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    stream.reserve_capacity(0);
                    return Poll::Ready(stream.send_trailers(trailers).map_err(SendEnd::Stream));
                }
            }
        }
    }
}

/// Why a stream's send capacity went away: the peer's reset, else a closed stream.
fn reset_or_closed(stream: &mut SendStream<Bytes>, cx: &mut Context<'_>) -> SendEnd {
    match stream.poll_reset(cx) {
        Poll::Ready(Ok(reason)) => SendEnd::Reset(reason),
        Poll::Ready(Err(err)) => SendEnd::Stream(err),
        Poll::Pending => SendEnd::Reset(Reason::CANCEL),
    }
}

/// The reset reason a failed body's error carries (an h2 error anywhere in its chain), else
/// `INTERNAL_ERROR`.
pub(crate) fn reason_of(err: &(dyn std::error::Error + 'static)) -> Reason {
    let mut source = Some(err);
    while let Some(err) = source {
        if let Some(h2) = err.downcast_ref::<h2::Error>()
            && let Some(reason) = h2.reason()
        {
            return reason;
        }
        source = err.source();
    }
    Reason::INTERNAL_ERROR
}
