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

    /// Resolves a host name to the addresses to try, in order.
    ///
    /// # Errors
    ///
    /// The resolver's error (unknown name, no resolver answer).
    fn resolve(
        &self,
        host: &str,
        port: u16,
    ) -> impl Future<Output = io::Result<Vec<SocketAddr>>> + Send;

    /// Where an accepted connection was headed before a transparent redirect sent it to us
    /// (iptables `REDIRECT`, as `conduit-init` sets up: `SO_ORIGINAL_DST`), or `None` when it
    /// was not redirected (it was addressed to us) or the network cannot tell.
    fn original_dst(io: &Self::Io) -> Option<SocketAddr> {
        let _ = io;
        None
    }
}

/// Where a peer is: a socket address, or a host name and port resolved through the [`Net`] at
/// every connect (so a peer that moves, such as a controller rescheduled onto another pod, is
/// followed).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PeerAddr {
    /// An IP address and port.
    Socket(SocketAddr),
    /// A host name and port.
    Name {
        /// The DNS name.
        host: String,
        /// The port.
        port: u16,
    },
}

impl From<SocketAddr> for PeerAddr {
    fn from(addr: SocketAddr) -> Self {
        Self::Socket(addr)
    }
}

impl std::fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Socket(addr) => addr.fmt(f),
            Self::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// Why a text is not a [`PeerAddr`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is neither IP:PORT nor HOST:PORT")]
pub struct InvalidPeerAddr(String);

impl std::str::FromStr for PeerAddr {
    type Err = InvalidPeerAddr;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Ok(Self::Socket(addr));
        }
        let invalid = || InvalidPeerAddr(text.to_owned());
        let (host, port) = text.rsplit_once(':').ok_or_else(invalid)?;
        let port: u16 = port.parse().map_err(|_| invalid())?;
        // RFC 1123 host names: dot-separated labels of letters, digits and hyphens.
        let valid_label = |label: &str| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        };
        let host = host.strip_suffix('.').unwrap_or(host);
        if host.is_empty() || host.len() > 253 || !host.split('.').all(valid_label) {
            return Err(invalid());
        }
        Ok(Self::Name {
            host: host.to_owned(),
            port,
        })
    }
}

impl PeerAddr {
    /// Connects to the peer: a socket address directly, a name through each address it
    /// resolves to, in order, until one accepts.
    ///
    /// # Errors
    ///
    /// The resolver's error, or the last connect error.
    pub async fn connect<N: Net>(&self, net: &N) -> io::Result<N::Io> {
        let (host, port) = match self {
            Self::Socket(addr) => return net.connect(*addr).await,
            Self::Name { host, port } => (host, *port),
        };
        let mut last = io::Error::new(
            io::ErrorKind::NotFound,
            format!("{host} resolved to no address"),
        );
        for addr in net.resolve(host, port).await? {
            match net.connect(addr).await {
                Ok(io) => return Ok(io),
                Err(err) => last = err,
            }
        }
        Err(last)
    }
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

    #[cfg(target_os = "linux")]
    fn original_dst(io: &Self::Io) -> Option<SocketAddr> {
        use rustix::net::sockopt;
        let local = io.local_addr().ok()?;
        let original = match local {
            SocketAddr::V4(_) => sockopt::ip_original_dst(io).ok().map(SocketAddr::V4),
            SocketAddr::V6(_) => sockopt::ipv6_original_dst(io).ok().map(SocketAddr::V6),
        }?;
        // Without a redirect the kernel reports the address the connection reached: us.
        (original != local).then_some(original)
    }

    async fn bind(&self, addr: SocketAddr) -> io::Result<Self::Listener> {
        tokio::net::TcpListener::bind(addr).await.map(TokioListener)
    }

    async fn connect(&self, addr: SocketAddr) -> io::Result<Self::Io> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    async fn resolve(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        Ok(tokio::net::lookup_host((host, port)).await?.collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_addresses_parse() {
        assert_eq!(
            "10.0.0.1:8086".parse::<PeerAddr>(),
            Ok(PeerAddr::Socket("10.0.0.1:8086".parse().unwrap()))
        );
        assert_eq!(
            "conduit-controller.conduit.svc.cluster.local.:8086".parse::<PeerAddr>(),
            Ok(PeerAddr::Name {
                host: "conduit-controller.conduit.svc.cluster.local".into(),
                port: 8086
            })
        );
        for bad in [
            "controller",
            "controller:",
            ":80",
            "a b:80",
            "-x:80",
            "x:99999",
            "a..b:1",
        ] {
            assert!(bad.parse::<PeerAddr>().is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn names_resolve_through_the_net() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let peer: PeerAddr = format!("localhost:{port}").parse().unwrap();
        let accept = tokio::spawn(async move { listener.accept().await.map(|_| ()) });
        peer.connect(&TokioNet).await.unwrap();
        accept.await.unwrap().unwrap();
    }
}
