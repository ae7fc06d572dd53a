//! TLS on the wire: recognising a ClientHello and its SNI (so the inbound side terminates only
//! the TLS addressed to its own identity, and passes other TLS through), the upstream
//! connection that is TLS to meshed endpoints and plain TCP to others, and the table of which
//! endpoints are meshed.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The TLS record content type of a handshake message.
const HANDSHAKE: u8 = 0x16;

/// The largest TLS record payload (RFC 8446 §5.1: 2^14 bytes, plus 256 of expansion allowed for
/// ciphertext; a ClientHello is plaintext).
pub(crate) const MAX_RECORD: usize = 16_384;

/// What the first bytes of a connection say about TLS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Hello {
    /// Not enough bytes yet to tell.
    Incomplete,
    /// Not a TLS ClientHello.
    NotTls,
    /// A ClientHello, with the server name it asks for (lower case).
    Tls { sni: Option<String> },
}

/// Whether `buf` could begin a TLS connection (decided on its first byte).
pub(crate) fn may_be_tls(buf: &[u8]) -> bool {
    buf.first() == Some(&HANDSHAKE)
}

/// Parses the ClientHello at the start of `buf`: its first record must hold the whole
/// handshake message (every client we know of sends it so, well under the 16 KiB limit); a
/// ClientHello split across records counts as not TLS we terminate.
pub(crate) fn parse_client_hello(buf: &[u8]) -> Hello {
    if buf.len() < 5 {
        return if buf.is_empty() || may_be_tls(buf) {
            Hello::Incomplete
        } else {
            Hello::NotTls
        };
    }
    if buf[0] != HANDSHAKE || buf[1] != 0x03 {
        return Hello::NotTls;
    }
    let len = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
    if !(4..=MAX_RECORD).contains(&len) {
        return Hello::NotTls;
    }
    let Some(record) = buf.get(5..5 + len) else {
        return Hello::Incomplete;
    };
    match client_hello_sni(record) {
        Some(sni) => Hello::Tls { sni },
        None => Hello::NotTls,
    }
}

/// A cursor over a byte slice whose reads fail (`None`) past its end.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }

    /// A vector with a `width`-byte length prefix.
    fn vec(&mut self, width: usize) -> Option<&'a [u8]> {
        let len = match width {
            1 => usize::from(self.u8()?),
            2 => self.u16()?,
            _ => {
                let b = self.take(3)?;
                usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2])
            }
        };
        self.take(len)
    }
}

/// The SNI of a ClientHello handshake message (`Some(None)`: a ClientHello without one;
/// `None`: not a well-formed ClientHello).
fn client_hello_sni(record: &[u8]) -> Option<Option<String>> {
    let mut r = Reader(record);
    if r.u8()? != 0x01 {
        return None;
    }
    let mut hello = Reader(r.vec(3)?);
    hello.take(2 + 32)?; // legacy_version, random
    hello.vec(1)?; // legacy_session_id
    hello.vec(2)?; // cipher_suites
    hello.vec(1)?; // legacy_compression_methods
    if hello.0.is_empty() {
        return Some(None); // no extensions at all
    }
    let mut extensions = Reader(hello.vec(2)?);
    while !extensions.0.is_empty() {
        let kind = extensions.u16()?;
        let data = extensions.vec(2)?;
        if kind != 0 {
            continue;
        }
        let mut list = Reader(Reader(data).vec(2)?);
        while !list.0.is_empty() {
            let name_type = list.u8()?;
            let name = list.vec(2)?;
            if name_type == 0 {
                let name = std::str::from_utf8(name).ok()?;
                return Some(Some(name.to_ascii_lowercase()));
            }
        }
        return Some(None);
    }
    Some(None)
}

/// An upstream connection: TLS to a meshed endpoint, plain TCP otherwise.
#[derive(Debug)]
pub(crate) enum UpstreamIo<T> {
    /// Plain TCP.
    Plain(T),
    /// Mutual TLS (boxed: rustls' state is large, and most connections of a plain mesh are
    /// not TLS).
    Tls(Box<tokio_rustls::client::TlsStream<T>>),
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for UpstreamIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(io) => Pin::new(io).poll_read(cx, buf),
            Self::Tls(io) => Pin::new(&mut **io).poll_read(cx, buf),
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for UpstreamIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(io) => Pin::new(io).poll_write(cx, buf),
            Self::Tls(io) => Pin::new(&mut **io).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            Self::Tls(io) => Pin::new(&mut **io).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(io) => io.is_write_vectored(),
            Self::Tls(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(io) => Pin::new(io).poll_flush(cx),
            Self::Tls(io) => Pin::new(&mut **io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(io) => Pin::new(io).poll_shutdown(cx),
            Self::Tls(io) => Pin::new(&mut **io).poll_shutdown(cx),
        }
    }
}

/// Which endpoint addresses are meshed, and the identity each must prove: written from every
/// resolution before its endpoints reach a balancer (so no request can pick a meshed endpoint
/// the table does not know yet), read when a connection is opened. An address a later
/// resolution lists as unmeshed loses its entry; entries are otherwise kept (an endpoint's
/// identity does not go stale by being unused, and the table is bounded by what discovery
/// lists).
#[derive(Debug, Default)]
pub(crate) struct MeshedPeers(RwLock<BTreeMap<SocketAddr, Arc<str>>>);

impl MeshedPeers {
    /// Records what a resolution says about its endpoints.
    pub(crate) fn record(&self, endpoints: &[conduit_core::mesh::Endpoint]) {
        let mut table = self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for endpoint in endpoints {
            match &endpoint.identity {
                Some(identity) => {
                    if table
                        .get(&endpoint.addr)
                        .is_none_or(|known| **known != **identity)
                    {
                        table.insert(endpoint.addr, Arc::from(identity.as_str()));
                    }
                }
                None => {
                    table.remove(&endpoint.addr);
                }
            }
        }
    }

    /// The identity the endpoint at `addr` must prove, if it is meshed.
    pub(crate) fn identity(&self, addr: SocketAddr) -> Option<Arc<str>> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&addr)
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello as rustls writes it, for `sni`.
    fn client_hello(sni: &str) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(sni.to_owned()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn the_sni_of_a_real_client_hello_is_found_at_any_split() {
        let hello = client_hello("Web.Default.Serviceaccount.Identity.Conduit.Local");
        let want = Hello::Tls {
            sni: Some("web.default.serviceaccount.identity.conduit.local".into()),
        };
        assert_eq!(parse_client_hello(&hello), want);
        for cut in 0..hello.len() {
            assert_eq!(
                parse_client_hello(&hello[..cut]),
                Hello::Incomplete,
                "{cut}"
            );
        }
    }

    #[test]
    fn other_bytes_are_not_tls() {
        assert_eq!(parse_client_hello(b"GET / HTTP/1.1\r\n"), Hello::NotTls);
        assert_eq!(parse_client_hello(b"G"), Hello::NotTls);
        assert_eq!(
            parse_client_hello(&[0x16, 0x03, 0x01, 0x00, 0x04, 0x02, 0, 0, 0]),
            Hello::NotTls
        );
        // A record longer than TLS allows.
        assert_eq!(
            parse_client_hello(&[0x16, 0x03, 0x01, 0xff, 0xff]),
            Hello::NotTls
        );
    }

    #[test]
    fn a_client_hello_with_its_lengths_garbled_never_panics() {
        let hello = client_hello("a.b");
        for i in 5..hello.len() {
            for byte in [0x00, 0x01, 0x7f, 0xff] {
                let mut bad = hello.clone();
                bad[i] = byte;
                let _ = parse_client_hello(&bad);
            }
        }
    }
}
