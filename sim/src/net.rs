//! The simulated network seam: [`SimNet`] implements the proxy's [`Net`] over `turmoil::net`,
//! and [`incoming`] turns a turmoil listener into the connection stream the controller's
//! `serve_grpc` takes.
//!
//! turmoil's stream gets a newtype ([`SimStream`], turmoil.md §4.3) so it can carry the traits
//! the libraries ask for (tonic's `Connected` on the server side) without touching the proxy or
//! the controller: only the seam differs from production.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use conduit_proxy::net::{Listener, Net};
use futures_util::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The proxy's network inside a turmoil host.
#[derive(Clone, Copy, Debug, Default)]
pub struct SimNet;

/// A turmoil listening socket.
pub struct SimListener(turmoil::net::TcpListener);

impl std::fmt::Debug for SimListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("SimListener")
            .field(&self.0.local_addr().ok())
            .finish()
    }
}

/// A turmoil TCP connection.
#[derive(Debug)]
pub struct SimStream(turmoil::net::TcpStream);

impl SimStream {
    /// Connects to `addr` (an `IP:port`, or `host:port` resolved through the sim's table).
    ///
    /// # Errors
    ///
    /// turmoil's connect error (refused, or the SYN lost to a partition).
    pub async fn connect(addr: impl turmoil::ToSocketAddrs) -> io::Result<Self> {
        turmoil::net::TcpStream::connect(addr).await.map(Self)
    }
}

impl Listener for SimListener {
    type Io = SimStream;

    async fn accept(&self) -> io::Result<(SimStream, SocketAddr)> {
        let (stream, peer) = self.0.accept().await?;
        Ok((SimStream(stream), peer))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }
}

impl Net for SimNet {
    type Io = SimStream;
    type Listener = SimListener;

    async fn bind(&self, addr: SocketAddr) -> io::Result<SimListener> {
        turmoil::net::TcpListener::bind(addr).await.map(SimListener)
    }

    async fn connect(&self, addr: SocketAddr) -> io::Result<SimStream> {
        SimStream::connect(addr).await
    }

    async fn resolve(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        // turmoil's DNS: the simulation's host names.
        Ok(turmoil::net::lookup_host((host, port)).await?.collect())
    }
}

/// Binds `addr` on the current host.
///
/// # Errors
///
/// turmoil's bind error (port in use).
pub async fn bind(addr: SocketAddr) -> io::Result<turmoil::net::TcpListener> {
    turmoil::net::TcpListener::bind(addr).await
}

/// The connections `listener` accepts, as the stream tonic's `serve_with_incoming` takes.
pub fn incoming(
    listener: turmoil::net::TcpListener,
) -> impl Stream<Item = io::Result<SimStream>> + Send {
    futures_util::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| SimStream(stream));
        Some((accepted, listener))
    })
}

impl AsyncRead for SimStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for SimStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for SimStream {
    type ConnectInfo = Option<SocketAddr>;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.peer_addr().ok()
    }
}
