//! The network seam: binding listeners and opening connections.
//!
//! Everything in the proxy is generic over [`Net`], so the same code runs on the kernel's TCP
//! stack ([`TokioNet`], the only production implementation and the only code in this crate that
//! names `tokio::net`) and inside the simulation, which implements [`Net`] over
//! `turmoil::net` (shared/reference/turmoil.md §6).

use std::future::Future;
use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncWrite};

/// A byte stream: one accepted or connected TCP connection.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// A bound listening socket.
pub trait Listener: Send + Sync + 'static {
    /// The connections it accepts.
    type Io: Io;

    /// Waits for the next connection and its peer's address.
    ///
    /// # Errors
    ///
    /// The operating system's accept error; callers log it, back off briefly and go on.
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Io, SocketAddr)>> + Send;

    /// The address actually bound (resolves port 0).
    ///
    /// # Errors
    ///
    /// The operating system's error for the socket.
    fn local_addr(&self) -> io::Result<SocketAddr>;
}

/// A network: somewhere to bind listeners and open connections.
pub trait Net: Clone + Send + Sync + 'static {
    /// Connections, accepted or connected.
    type Io: Io;
    /// Listening sockets.
    type Listener: Listener<Io = Self::Io>;

    /// Binds a listener at `addr`.
    ///
    /// # Errors
    ///
    /// The bind error (address in use, permission denied).
    fn bind(&self, addr: SocketAddr) -> impl Future<Output = io::Result<Self::Listener>> + Send;

    /// Opens a connection to `addr`. Callers bound it with their own connect timeout.
    ///
    /// # Errors
    ///
    /// The connect error (refused, unreachable).
    fn connect(&self, addr: SocketAddr) -> impl Future<Output = io::Result<Self::Io>> + Send;
}

/// The kernel's TCP stack through tokio.
#[derive(Clone, Copy, Debug, Default)]
pub struct TokioNet;

/// A tokio TCP listener.
#[derive(Debug)]
pub struct TokioListener(tokio::net::TcpListener);

impl Listener for TokioListener {
    type Io = tokio::net::TcpStream;

    async fn accept(&self) -> io::Result<(Self::Io, SocketAddr)> {
        let (stream, peer) = self.0.accept().await?;
        // Small writes (headers, h2 frames) must not wait on Nagle's algorithm.
        stream.set_nodelay(true)?;
        Ok((stream, peer))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }
}

impl Net for TokioNet {
    type Io = tokio::net::TcpStream;
    type Listener = TokioListener;

    async fn bind(&self, addr: SocketAddr) -> io::Result<Self::Listener> {
        tokio::net::TcpListener::bind(addr).await.map(TokioListener)
    }

    async fn connect(&self, addr: SocketAddr) -> io::Result<Self::Io> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}
