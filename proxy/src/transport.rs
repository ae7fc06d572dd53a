//! IO wrappers: byte counting for the `tcp_*` metrics, and replaying bytes read during
//! protocol detection.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::admin::metrics::ConnectionGuard;

/// An IO that counts bytes into its connection's metrics and settles them when dropped.
#[derive(Debug)]
pub struct CountingIo<T> {
    inner: T,
    guard: ConnectionGuard,
}

impl<T> CountingIo<T> {
    /// Wraps `inner`, counting into `guard`'s counters.
    pub fn new(inner: T, guard: ConnectionGuard) -> Self {
        Self { inner, guard }
    }

    /// The wrapped IO.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for CountingIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = poll {
            this.guard.tcp().read(buf.filled().len() - before);
        }
        poll
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CountingIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let poll = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = poll {
            this.guard.tcp().wrote(n);
        }
        poll
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let poll = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = poll {
            this.guard.tcp().wrote(n);
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// An IO whose first reads replay bytes already consumed (by protocol detection).
#[derive(Debug)]
pub struct PrefixedIo<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> PrefixedIo<T> {
    /// Reads return `prefix` first, then `inner`'s bytes.
    pub fn new(prefix: Bytes, inner: T) -> Self {
        Self { prefix, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for PrefixedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.prefix.has_remaining() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for PrefixedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// When an [`ActivityIo`] last moved bytes, shared with its idle watchdog.
#[derive(Clone, Debug)]
pub struct Activity(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl Activity {
    /// The last time bytes moved.
    #[must_use]
    pub fn last(&self, _clock: crate::clock::Clock) -> conduit_core::time::Instant {
        conduit_core::time::Instant::from_nanos(self.0.load(std::sync::atomic::Ordering::Relaxed))
    }

    fn touch(&self, clock: crate::clock::Clock) {
        self.0
            .store(clock.now().as_nanos(), std::sync::atomic::Ordering::Relaxed);
    }
}

/// Resolves once no byte has moved through `activity`'s IO for `idle`: race it against the
/// IO's work to close a connection that went quiet.
pub async fn idle_watchdog(
    activity: Activity,
    clock: crate::clock::Clock,
    idle: std::time::Duration,
) {
    loop {
        clock.sleep_until(activity.last(clock) + idle).await;
        if clock.now().saturating_duration_since(activity.last(clock)) >= idle {
            return;
        }
    }
}

/// An IO that records when bytes last moved in either direction, for idle timeouts.
#[derive(Debug)]
pub struct ActivityIo<T> {
    inner: T,
    clock: crate::clock::Clock,
    activity: Activity,
}

impl<T> ActivityIo<T> {
    /// Wraps `inner`; activity starts now.
    pub fn new(inner: T, clock: crate::clock::Clock) -> Self {
        let activity = Activity(std::sync::Arc::default());
        activity.touch(clock);
        Self {
            inner,
            clock,
            activity,
        }
    }

    /// A handle on the last-activity time.
    #[must_use]
    pub fn activity(&self) -> Activity {
        self.activity.clone()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ActivityIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if poll.is_ready() {
            self.activity.touch(self.clock);
        }
        poll
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ActivityIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if poll.is_ready() {
            self.activity.touch(self.clock);
        }
        poll
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
