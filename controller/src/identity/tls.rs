//! The controller's own mTLS: proxies reach the control plane over TLS.
//!
//! The controller certifies itself with its own CA as [`CONTROLLER_IDENTITY`] (a key made in
//! the process, a leaf renewed at 70 % of its life) and terminates TLS on its gRPC port: a
//! connection that opens with a TLS handshake record is TLS 1.3, with the proxy's client
//! certificate checked against the trust anchors when it presents one (a proxy's first
//! `Certify` comes before it holds a certificate); any other connection is served in plaintext
//! as before (the CLI, and proxies without an identity). Proxies with an identity verify that
//! the controller proves [`CONTROLLER_IDENTITY`] before they send anything.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use futures_util::{Stream, StreamExt as _};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

use super::ca::CertificateAuthority;

/// The identity the controller proves to proxies.
pub const CONTROLLER_IDENTITY: &str = "controller.conduit.serviceaccount.identity.conduit.local";

/// How long a client may take to send its first byte and to finish a TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress at once; accepting waits beyond that.
const MAX_HANDSHAKES: usize = 64;

/// The controller's certificate, replaced on renewal.
#[derive(Debug)]
struct Slot(RwLock<Option<Arc<CertifiedKey>>>);

impl rustls::server::ResolvesServerCert for Slot {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// The TLS configuration trusting `ca`'s anchors and offering the certificate in `slot`.
fn build_config(
    ca: &CertificateAuthority,
    slot: &Arc<Slot>,
) -> Result<Arc<ServerConfig>, ControllerTlsError> {
    let error = |e: &dyn std::fmt::Display| ControllerTlsError(e.to_string());
    let provider = Arc::clone(&ca.crypto().provider);
    let mut roots = RootCertStore::empty();
    for anchor in ca.trust_anchors() {
        roots.add(anchor).map_err(|e| error(&e))?;
    }
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
            .allow_unauthenticated()
            .build()
            .map_err(|e| error(&e))?;
    // Client certificates are checked at the CA's wall time (the simulated one in the
    // simulation), as the proxies check theirs.
    let time = Arc::new(CaTime(Arc::clone(ca.clock())));
    let config = ServerConfig::builder_with_details(provider, time)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| error(&e))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::clone(slot) as _);
    Ok(Arc::new(config))
}

/// rustls reads wall time from the CA's clock.
struct CaTime(super::WallClock);

impl std::fmt::Debug for CaTime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CaTime")
    }
}

impl rustls::time_provider::TimeProvider for CaTime {
    fn current_time(&self) -> Option<rustls::pki_types::UnixTime> {
        Some(rustls::pki_types::UnixTime::since_unix_epoch(
            Duration::from_secs((self.0)().as_secs()),
        ))
    }
}

/// The controller's TLS server side.
#[derive(Debug)]
pub struct ControllerTls {
    ca: Arc<CertificateAuthority>,
    slot: Arc<Slot>,
    /// The configuration, and the version of the CA's anchors it trusts (rebuilt when they
    /// change: an anchor rotation).
    config: RwLock<(u64, Arc<ServerConfig>)>,
}

/// Why the controller could not certify itself.
#[derive(Debug, thiserror::Error)]
#[error("the controller's own certificate: {0}")]
pub struct ControllerTlsError(String);

impl ControllerTls {
    /// Certifies the controller with `ca` and builds its TLS configuration.
    ///
    /// # Errors
    ///
    /// [`ControllerTlsError`] when a key, the certificate or the configuration cannot be made.
    pub fn new(ca: Arc<CertificateAuthority>) -> Result<Self, ControllerTlsError> {
        let slot = Arc::new(Slot(RwLock::new(None)));
        let version = ca.trust_anchors_version();
        let config = build_config(&ca, &slot)?;
        let this = Self {
            ca,
            slot,
            config: RwLock::new((version, config)),
        };
        this.renew()?;
        Ok(this)
    }

    /// The configuration on the CA's current anchors.
    fn config(&self) -> Arc<ServerConfig> {
        let version = self.ca.trust_anchors_version();
        {
            let config = self
                .config
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if config.0 == version {
                return Arc::clone(&config.1);
            }
        }
        let mut config = self
            .config
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match build_config(&self.ca, &self.slot) {
            Ok(rebuilt) => {
                tracing::info!(
                    "trust anchors changed: client certificates are checked against the new bundle"
                );
                *config = (version, rebuilt);
            }
            Err(err) => {
                // The CA parsed these anchors already; keep the old configuration if not.
                tracing::warn!(error = %err, "the new trust anchors are unusable for TLS; keeping the old ones");
                config.0 = version;
            }
        }
        Arc::clone(&config.1)
    }

    /// Issues the controller a fresh certificate; returns how long until it should renew (70 %
    /// of the new certificate's remaining life).
    ///
    /// # Errors
    ///
    /// [`ControllerTlsError`] when the key or the certificate cannot be made.
    pub fn renew(&self) -> Result<Duration, ControllerTlsError> {
        let error = |e: &dyn std::fmt::Display| ControllerTlsError(e.to_string());
        let crypto = self.ca.crypto();
        let key = crypto.new_key().map_err(|e| error(&e))?;
        let params = rcgen::CertificateParams::new(vec![CONTROLLER_IDENTITY.to_owned()])
            .map_err(|e| error(&e))?;
        let csr = params.serialize_request(&key).map_err(|e| error(&e))?;
        let token = self
            .ca
            .issue_token(CONTROLLER_IDENTITY)
            .map_err(|e| error(&e))?;
        let certified = self
            .ca
            .certify(CONTROLLER_IDENTITY, token.as_bytes(), csr.der())
            .map_err(|e| error(&e))?;
        let signing = crypto
            .provider
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                key.serialize_der(),
            )))
            .map_err(|e| error(&e))?;
        let mut chain = vec![certified.leaf];
        chain.extend(certified.intermediates);
        *self
            .slot
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some(Arc::new(CertifiedKey::new(chain, signing)));
        let now = self.ca.now().as_secs();
        let remaining = certified.valid_until.as_secs().saturating_sub(now);
        Ok(Duration::from_secs(remaining * 7 / 10).max(Duration::from_secs(10)))
    }

    /// Renews the controller's certificate on its schedule, forever (retrying a failure after
    /// 10 s); run it as a task.
    pub async fn keep_renewed(self: Arc<Self>, first: Duration) {
        let mut wait = first;
        loop {
            tokio::time::sleep(wait).await;
            wait = match self.renew() {
                Ok(next) => {
                    tracing::info!(identity = CONTROLLER_IDENTITY, renew_in = ?next, "controller certificate renewed");
                    next
                }
                Err(err) => {
                    tracing::warn!(error = %err, "renewing the controller's certificate failed; retrying");
                    Duration::from_secs(10)
                }
            };
        }
    }

    /// The connections of `incoming`, each TLS (terminated here) or plaintext, as its first
    /// byte says. Handshakes run concurrently (a slow one does not hold up the others) and are
    /// bounded by [`HANDSHAKE_TIMEOUT`]; a connection that fails its handshake is dropped.
    pub fn incoming<S, IO, E>(
        self: Arc<Self>,
        incoming: S,
    ) -> impl Stream<Item = Result<MaybeTls<IO>, io::Error>>
    where
        S: Stream<Item = Result<IO, E>>,
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        incoming
            .map(move |accepted| {
                let this = Arc::clone(&self);
                async move {
                    let io = match accepted {
                        Ok(io) => io,
                        Err(err) => {
                            let err: Box<dyn std::error::Error + Send + Sync> = err.into();
                            tracing::debug!(error = %err, "accept failed");
                            return None;
                        }
                    };
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, this.accept(io)).await {
                        Ok(Ok(io)) => Some(Ok(io)),
                        Ok(Err(err)) => {
                            tracing::info!(error = %err, "gRPC connection dropped before serving");
                            None
                        }
                        Err(_) => {
                            tracing::info!(timeout = ?HANDSHAKE_TIMEOUT, "gRPC client sent nothing or did not finish its TLS handshake in time");
                            None
                        }
                    }
                }
            })
            .buffer_unordered(MAX_HANDSHAKES)
            .filter_map(std::future::ready)
    }

    async fn accept<IO>(&self, mut io: IO) -> io::Result<MaybeTls<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let mut first = [0u8; 1];
        let n = io.read(&mut first).await?;
        let prefixed = Prefixed {
            prefix: Bytes::copy_from_slice(&first[..n]),
            io,
        };
        if n == 1 && first[0] == 0x16 {
            let acceptor = tokio_rustls::TlsAcceptor::from(self.config());
            Ok(MaybeTls::Tls(Box::new(acceptor.accept(prefixed).await?)))
        } else {
            Ok(MaybeTls::Plain(prefixed))
        }
    }
}

/// An IO with bytes already read from it put back in front.
#[derive(Debug)]
pub struct Prefixed<IO> {
    prefix: Bytes,
    io: IO,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Prefixed<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Prefixed<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A gRPC connection: TLS terminated by the controller, or plaintext.
#[derive(Debug)]
pub enum MaybeTls<IO> {
    /// Plaintext (the CLI, proxies without an identity).
    Plain(Prefixed<IO>),
    /// TLS 1.3 (boxed: rustls' state is large).
    Tls(Box<tokio_rustls::server::TlsStream<Prefixed<IO>>>),
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for MaybeTls<IO> {
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

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for MaybeTls<IO> {
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

impl<IO: Connected> Connected for MaybeTls<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        match self {
            Self::Plain(io) => io.io.connect_info(),
            Self::Tls(io) => io.get_ref().0.io.connect_info(),
        }
    }
}
