//! Buffered connection halves and the body pump of the HTTP/1 engine.

use std::future::Future;
use std::io;
use std::pin::{Pin, pin};
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use tokio::io::AsyncReadExt;

use super::codec::{self, ChunkedDecoder, CodecError, Decoded, Framing};
use crate::net::Io;

/// An upstream HTTP/1.1 connection as the pool keeps it.
pub(crate) type Upstream<N> = Side<crate::pool::Conn<N>>;

/// Room made for a read when the buffer is short of it, at first: a request head fits, so a
/// kept-alive connection of small exchanges holds a small buffer (memory per connection), and
/// reads that fill it double it, up to [`MAX_READ_CHUNK`], for bodies.
pub(crate) const READ_CHUNK: usize = 1024;

/// The most room made for one read: a connection moving a large body reads (and writes) in
/// pieces that grow up to this while reads keep filling the buffer, so bulk transfers take
/// few system calls and small exchanges keep small buffers.
const MAX_READ_CHUNK: usize = 256 * 1024;

/// The most output a pump queues before writing it.
const MAX_PENDING_OUT: usize = MAX_READ_CHUNK;

/// A buffer larger than this is released once empty, so a connection that once carried a
/// large body does not keep its memory while idle.
const KEEP_BUFFER: usize = 64 * 1024;

/// One connection with its read buffer (unconsumed input) and write buffer (output not yet
/// written). Both buffers live as long as the connection, so a kept-alive connection moves
/// messages without allocating.
#[derive(Debug)]
pub(crate) struct Side<I> {
    pub(crate) io: I,
    pub(crate) rbuf: BytesMut,
    pub(crate) wbuf: Vec<u8>,
    written: usize,
    /// Room to make for the next read.
    read_size: usize,
}

impl<I: Io> Side<I> {
    pub(crate) fn new(io: I, rbuf: BytesMut) -> Self {
        Self {
            io,
            rbuf,
            wbuf: Vec::new(),
            written: 0,
            read_size: READ_CHUNK,
        }
    }

    /// Reads once into the read buffer; `Ok(0)` at end of stream.
    pub(crate) fn poll_read_more(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let want = self.read_size;
        if self.rbuf.capacity() - self.rbuf.len() < want / 4 {
            self.rbuf.reserve(want);
        }
        let room = self.rbuf.capacity() - self.rbuf.len();
        let read = ready!(pin!(self.io.read_buf(&mut self.rbuf)).poll(cx));
        if let Ok(n) = read {
            if n == room && want < MAX_READ_CHUNK {
                self.read_size = want * 2;
            } else if n < want / 8 && want > READ_CHUNK {
                self.read_size = want / 2;
            }
        }
        Poll::Ready(read)
    }

    /// Releases buffers grown by a large body, once they are empty.
    pub(crate) fn shrink(&mut self) {
        if self.rbuf.is_empty() && self.rbuf.capacity() > KEEP_BUFFER {
            self.rbuf = BytesMut::new();
            self.read_size = READ_CHUNK;
        }
        if !self.has_output() && self.wbuf.capacity() > KEEP_BUFFER {
            self.wbuf = Vec::new();
        }
    }

    /// Whether output is waiting to be written.
    pub(crate) fn has_output(&self) -> bool {
        self.written < self.wbuf.len()
    }

    /// Bytes waiting to be written.
    pub(crate) fn pending_output(&self) -> usize {
        self.wbuf.len() - self.written
    }

    /// Drops output not yet written.
    pub(crate) fn clear_output(&mut self) {
        self.wbuf.clear();
        self.written = 0;
    }

    /// Writes the queued output.
    pub(crate) fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.wbuf.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.wbuf[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.wbuf.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }
}

/// A copy of a request body as it was written upstream (framed), kept so the request can be
/// sent again whole; bounded by its limit, beyond which the copy is dropped for good.
#[derive(Debug, Default)]
pub(crate) struct Replay {
    buf: Vec<u8>,
    limit: usize,
    state: ReplayState,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum ReplayState {
    /// No body has been read yet.
    #[default]
    Untouched,
    /// Part of the body has been read and kept.
    Partial,
    /// The whole body has been read and kept.
    Complete,
    /// More than the limit went by, or the body was read without a copy.
    Lost,
}

impl Replay {
    /// Starts over for a new request, keeping at most `limit` bytes. The buffer's memory is
    /// kept for the next request unless a large body grew it.
    pub(crate) fn reset(&mut self, limit: usize) {
        self.buf.clear();
        if self.buf.capacity() > limit.max(4096) {
            self.buf = Vec::new();
        }
        self.limit = limit;
        self.state = ReplayState::Untouched;
    }

    fn record(&mut self, bytes: &[u8]) {
        match self.state {
            ReplayState::Untouched | ReplayState::Partial => {
                if self.buf.len() + bytes.len() > self.limit {
                    self.lose();
                } else {
                    self.buf.extend_from_slice(bytes);
                    self.state = ReplayState::Partial;
                }
            }
            ReplayState::Complete | ReplayState::Lost => {}
        }
    }

    fn finish(&mut self) {
        if self.state != ReplayState::Lost {
            self.state = ReplayState::Complete;
        }
    }

    /// Nobody will send the request again (its response headers arrived): drop the copy, and
    /// its memory unless it is small.
    pub(crate) fn release(&mut self) {
        self.lose();
        if self.buf.capacity() > 4096 {
            self.buf = Vec::new();
        }
    }

    /// The body was (or will be) read without a copy.
    pub(crate) fn lose(&mut self) {
        self.state = ReplayState::Lost;
        self.buf.clear();
    }

    /// Keeps `body`, the request's whole body, read from the client before any attempt.
    pub(crate) fn keep_whole(&mut self, body: &[u8]) {
        self.buf.clear();
        self.buf.extend_from_slice(body);
        self.state = ReplayState::Complete;
    }

    /// No body byte has been read yet: the request can be sent as it was.
    pub(crate) fn untouched(&self) -> bool {
        self.state == ReplayState::Untouched
    }

    /// The whole body, framed, when it was kept whole.
    pub(crate) fn complete(&self) -> Option<&[u8]> {
        (self.state == ReplayState::Complete).then_some(&self.buf[..])
    }
}

/// Why a body stopped moving.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PumpError {
    /// Reading the sender failed.
    #[error("reading the body: {0}")]
    Read(#[source] io::Error),
    /// The sender closed before the body's end.
    #[error("connection closed before the end of the body")]
    Truncated,
    /// The sender's framing is invalid.
    #[error("invalid body framing: {0}")]
    Framing(#[source] CodecError),
    /// Writing to the receiver failed.
    #[error("writing the body: {0}")]
    Write(#[source] io::Error),
    /// The request's deadline passed.
    #[error("the request's deadline passed")]
    Deadline,
}

#[derive(Debug)]
enum Decode {
    Length(u64),
    Chunked(ChunkedDecoder),
    Close,
}

/// Moves one message body from one side to the other, re-framed as the receiver needs:
/// identity (a length, or until close) or chunked.
#[derive(Debug)]
pub(crate) struct Pump {
    decode: Decode,
    chunked_out: bool,
    finished: bool,
    /// Set whenever bytes were written; the caller clears it.
    pub(crate) moved: bool,
}

impl Pump {
    /// A pump for a body framed as `framing` (which has a body), written chunked when
    /// `chunked_out`.
    pub(crate) fn new(framing: Framing, chunked_out: bool, max_trailers: usize) -> Self {
        let decode = match framing {
            Framing::Length(n) => Decode::Length(n),
            Framing::Chunked => Decode::Chunked(ChunkedDecoder::new(max_trailers)),
            Framing::Close | Framing::Empty => Decode::Close,
        };
        Self {
            decode,
            chunked_out,
            finished: framing == Framing::Empty,
            moved: false,
        }
    }

    /// The body's trailers as fields (chunked bodies that had some).
    pub(crate) fn trailer_map(&self) -> Option<http::HeaderMap> {
        match &self.decode {
            Decode::Chunked(decoder) => decoder.trailer_map(),
            _ => None,
        }
    }

    /// Moves bytes until the body has been written whole.
    pub(crate) fn poll<A: Io, B: Io>(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut Side<A>,
        dst: &mut Side<B>,
    ) -> Poll<Result<(), PumpError>> {
        self.poll_recording(cx, src, dst, None)
    }

    /// [`poll`](Self::poll), keeping a copy of the body as written (framed for the receiver)
    /// in `replay` while it fits.
    pub(crate) fn poll_recording<A: Io, B: Io>(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut Side<A>,
        dst: &mut Side<B>,
        mut replay: Option<&mut Replay>,
    ) -> Poll<Result<(), PumpError>> {
        loop {
            // Decode what is buffered first, so a head queued before the body goes out in the
            // same write as the body's first bytes.
            if !self.finished && !src.rbuf.is_empty() && dst.wbuf.len() < MAX_PENDING_OUT {
                let before = dst.wbuf.len();
                self.decode_into(&mut src.rbuf, &mut dst.wbuf)
                    .map_err(PumpError::Framing)?;
                if let Some(replay) = replay.as_deref_mut() {
                    replay.record(&dst.wbuf[before..]);
                }
            }
            if dst.has_output() {
                let pending = dst.wbuf.len() - dst.written;
                match dst.poll_write_out(cx) {
                    Poll::Ready(Ok(())) => self.moved |= pending > 0,
                    Poll::Ready(Err(err)) => return Poll::Ready(Err(PumpError::Write(err))),
                    Poll::Pending => {
                        self.moved |= dst.wbuf.len() - dst.written < pending;
                        return Poll::Pending;
                    }
                }
            }
            if self.finished {
                if let Some(replay) = replay.as_deref_mut() {
                    replay.finish();
                }
                return Poll::Ready(Ok(()));
            }
            if !src.rbuf.is_empty() {
                // Decoding stopped at the output bound: more after the write.
                continue;
            }
            match ready!(src.poll_read_more(cx)) {
                Err(err) => return Poll::Ready(Err(PumpError::Read(err))),
                Ok(0) => {
                    if !matches!(self.decode, Decode::Close) {
                        return Poll::Ready(Err(PumpError::Truncated));
                    }
                    if self.chunked_out {
                        codec::encode_last_chunk(&mut dst.wbuf, b"");
                    }
                    self.finished = true;
                }
                Ok(_) => {}
            }
        }
    }

    /// Writes body bytes, as a chunk when the receiver gets chunks.
    fn data(chunked_out: bool, out: &mut Vec<u8>, data: &[u8]) {
        if chunked_out {
            codec::encode_chunk_size(out, data.len());
            out.extend_from_slice(data);
            out.extend_from_slice(b"\r\n");
        } else {
            out.extend_from_slice(data);
        }
    }

    fn decode_into(&mut self, input: &mut BytesMut, out: &mut Vec<u8>) -> Result<(), CodecError> {
        let room = MAX_PENDING_OUT.saturating_sub(out.len()).max(1);
        match &mut self.decode {
            Decode::Length(left) => {
                let n = usize::try_from(*left)
                    .unwrap_or(usize::MAX)
                    .min(input.len())
                    .min(room);
                *left -= n as u64;
                let done = *left == 0;
                Self::data(self.chunked_out, out, &input[..n]);
                input.advance(n);
                self.finished = done;
            }
            Decode::Close => {
                let n = input.len().min(room);
                Self::data(self.chunked_out, out, &input[..n]);
                input.advance(n);
            }
            Decode::Chunked(decoder) => loop {
                let (used, found) = decoder.decode(&input[..input.len().min(room)])?;
                match found {
                    Decoded::Data(range) => {
                        Self::data(self.chunked_out, out, &input[range]);
                        input.advance(used);
                        if out.len() >= MAX_PENDING_OUT || input.is_empty() {
                            return Ok(());
                        }
                    }
                    Decoded::More => {
                        input.advance(used);
                        return Ok(());
                    }
                    Decoded::Done => {
                        input.advance(used);
                        if self.chunked_out {
                            codec::encode_last_chunk(out, decoder.trailers());
                        }
                        self.finished = true;
                        return Ok(());
                    }
                }
            },
        }
        Ok(())
    }
}
