//! The proxy's workload identity: a private key made at start that never leaves the process,
//! a leaf certificate for it from the controller's CA (renewed on the core's schedule,
//! `conduit_core::identity`), and the TLS configurations built on both.
//!
//! - Outbound, to an endpoint discovery marks as meshed, the proxy speaks TLS 1.3 with its
//!   certificate as the client certificate and checks that the server proves the endpoint's
//!   identity (the SNI and the name checked are that identity) against the trust anchors.
//! - Inbound, a ClientHello whose SNI is this proxy's identity is terminated here, and the
//!   client must present a certificate that chains to the trust anchors; the name it proves is
//!   the request's client identity. Other TLS passes through untouched.
//!
//! Certificates are checked at the wall time of the injected [`WallClock`], so the simulation
//! controls expiry. The one crypto provider is ring (the workspace's `Cargo.toml` says why).

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use conduit_core::identity::{Refresh, RefreshConfig};
use conduit_core::rand::DetRng;
use conduit_core::time::UnixTime;
pub use conduit_proto::crypto::Crypto;
use conduit_proto::pb::identity::CertifyRequest;
use conduit_proto::pb::identity::identity_client::IdentityClient;
use hyper_util::rt::TokioIo;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::{CertifiedKey, SigningKey};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::sync::watch;
use tonic::transport::Endpoint as TonicEndpoint;

use crate::clock::Clock;
use crate::drain::Drain;
use crate::net::{Net, PeerAddr};

/// Wall-clock time for certificate validity: the system clock in production
/// ([`crate::clock::system_unix_time`]), the simulated one in the simulation.
pub type WallClock = fn() -> UnixTime;

/// How often the trust anchors file is checked for a new bundle (anchor rotation).
const ANCHORS_POLL_INTERVAL: Duration = Duration::from_secs(5);

/// How long one certify request may take before it counts as failed.
const CERTIFY_TIMEOUT: Duration = Duration::from_secs(10);

/// The identity settings (`identity_*` keys): who the proxy is, its proof, and whom it trusts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentitySettings {
    /// The identity asked for (a DNS-like name).
    pub name: String,
    /// The token that proves it: the controller's (`conduit identity token NAME`), or in
    /// Kubernetes the pod's projected ServiceAccount token.
    pub token: TokenSource,
    /// The trust anchors.
    pub trust_anchors: TrustAnchors,
}

/// Where the trust anchors come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TrustAnchors {
    /// A PEM bundle file (`identity_trust_anchors`), re-read every few seconds so a rotated
    /// bundle is trusted without a restart.
    File(PathBuf),
    /// The PEM bundle itself (`identity_trust_anchors_pem`: what the Kubernetes injector
    /// sets, since a pod cannot mount a ConfigMap of the control plane's namespace); fixed for
    /// the process's life.
    Pem(String),
}

/// Where the bootstrap token comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// The token itself (`identity_token`).
    Value(String),
    /// A file holding it (`identity_token_file`), read at start and again before every
    /// certify request (the kubelet rotates a projected ServiceAccount token in place).
    File(PathBuf),
}

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The token is a secret: never logged.
        match self {
            Self::Value(_) => f.write_str("Value(<redacted>)"),
            Self::File(path) => f.debug_tuple("File").field(path).finish(),
        }
    }
}

/// Why the identity cannot be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The token file could not be read.
    #[error("reading the identity token {path}: {source}")]
    ReadToken {
        /// The file.
        path: PathBuf,
        /// The read error.
        #[source]
        source: std::io::Error,
    },
    /// The token is empty.
    #[error("the identity token is empty (from `conduit identity token NAME`)")]
    EmptyToken,
    /// The trust anchors could not be read.
    #[error("reading the trust anchors {path}: {source}")]
    ReadAnchors {
        /// The file.
        path: PathBuf,
        /// The read error.
        #[source]
        source: std::io::Error,
    },
    /// The trust anchors are not a PEM bundle of certificates usable as anchors.
    #[error("trust anchors: {0}")]
    Anchors(String),
    /// The identity is not a DNS-like name.
    #[error("identity `{0}` is not a DNS-like name")]
    Name(String),
    /// Key or CSR generation failed.
    #[error("generating the key and CSR: {0}")]
    Key(String),
    /// A TLS configuration could not be built.
    #[error("building the TLS configuration: {0}")]
    Tls(String),
}

/// Why a certificate from the CA was not installed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum InstallError {
    #[error("the CA returned a chain that does not verify for `{name}`: {reason}")]
    Untrusted { name: String, reason: String },
    #[error("the CA returned a certificate for another key")]
    WrongKey,
    #[error("the CA returned a certificate that cannot be read: {0}")]
    Garbled(String),
}

/// The certificate held, with the end of its validity.
struct Current {
    key: Arc<CertifiedKey>,
    valid_from: UnixTime,
    valid_until: UnixTime,
}

/// Where the TLS configurations find the current certificate: replaced on renewal without
/// rebuilding them.
#[derive(Default)]
struct Slot {
    current: RwLock<Option<Current>>,
    wall: Option<WallClock>,
}

impl fmt::Debug for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Slot").finish_non_exhaustive()
    }
}

impl Slot {
    /// The certificate, while it is valid: an expired one is never offered.
    fn get(&self) -> Option<Arc<CertifiedKey>> {
        let current = self
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let current = current.as_ref()?;
        let now = self.wall.map_or(UnixTime::from_secs(0), |wall| wall());
        (now < current.valid_until).then(|| Arc::clone(&current.key))
    }
}

impl rustls::client::ResolvesClientCert for Slot {
    fn resolve(
        &self,
        _hints: &[&[u8]],
        _schemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.get()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl rustls::server::ResolvesServerCert for Slot {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.get()
    }
}

/// rustls reads wall time through the same seam as everything else.
#[derive(Debug)]
struct SeamTime(WallClock);

impl rustls::time_provider::TimeProvider for SeamTime {
    fn current_time(&self) -> Option<rustls::pki_types::UnixTime> {
        Some(rustls::pki_types::UnixTime::since_unix_epoch(
            Duration::from_secs((self.0)().as_secs()),
        ))
    }
}

/// This proxy's identity: its key, its certificate, and the TLS configurations that use them.
pub struct LocalIdentity {
    name: Arc<str>,
    server_name: ServerName<'static>,
    token: Vec<u8>,
    /// The token's file, re-read before each certify request.
    token_file: Option<PathBuf>,
    csr: Vec<u8>,
    public_key: Vec<u8>,
    key: Arc<dyn SigningKey>,
    slot: Arc<Slot>,
    provider: Arc<CryptoProvider>,
    /// The configurations on the anchors in force, replaced whole when the anchors change.
    tls: RwLock<Arc<Tls>>,
    /// The anchors file (when loaded from one) and the bytes last read from it.
    anchors: RwLock<(Option<PathBuf>, Vec<u8>)>,
    wall: WallClock,
    certified: watch::Sender<bool>,
}

impl fmt::Debug for LocalIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalIdentity")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl LocalIdentity {
    /// Reads the trust anchors named in `settings` and sets the identity up.
    ///
    /// # Errors
    ///
    /// [`IdentityError`] naming what is wrong (an unreadable or garbled anchor file, an
    /// invalid name).
    pub fn load(settings: &IdentitySettings, wall: WallClock) -> Result<Self, IdentityError> {
        let pem = match &settings.trust_anchors {
            TrustAnchors::File(path) => {
                std::fs::read(path).map_err(|source| IdentityError::ReadAnchors {
                    path: path.clone(),
                    source,
                })?
            }
            TrustAnchors::Pem(pem) => pem.clone().into_bytes(),
        };
        let token = match &settings.token {
            TokenSource::Value(token) => token.clone(),
            TokenSource::File(path) => std::fs::read_to_string(path)
                .map_err(|source| IdentityError::ReadToken {
                    path: path.clone(),
                    source,
                })?
                .trim()
                .to_owned(),
        };
        if token.is_empty() {
            return Err(IdentityError::EmptyToken);
        }
        let mut identity = Self::new(
            &settings.name,
            token.as_bytes(),
            &pem,
            wall,
            &Crypto::system(),
        )?;
        if let TokenSource::File(path) = &settings.token {
            identity.token_file = Some(path.clone());
        }
        if let TrustAnchors::File(path) = &settings.trust_anchors {
            identity
                .anchors
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0 = Some(path.clone());
        }
        Ok(identity)
    }

    /// The token to send with a certify request: the token file's contents now when the
    /// token comes from a file (the kubelet replaces a projected ServiceAccount token before
    /// it expires), else, or when the file cannot be read or is empty, the token read at
    /// start.
    fn current_token(&self) -> Vec<u8> {
        let Some(path) = &self.token_file else {
            return self.token.clone();
        };
        match std::fs::read_to_string(path) {
            Ok(token) if !token.trim().is_empty() => token.trim().as_bytes().to_vec(),
            Ok(_) => {
                tracing::warn!(path = %path.display(), "the identity token file is empty; sending the token read at start");
                self.token.clone()
            }
            Err(err) => {
                tracing::warn!(path = %path.display(), error = %err, "cannot read the identity token file; sending the token read at start");
                self.token.clone()
            }
        }
    }

    /// Generates a key (of `crypto`'s kind: P-256 in production) and a CSR for `name`, and
    /// builds the TLS configurations that trust the anchors in `anchors_pem`. No certificate is
    /// held until [`Self::install`] (the certify task) puts one in.
    ///
    /// # Errors
    ///
    /// [`IdentityError`] naming what is wrong.
    pub fn new(
        name: &str,
        token: &[u8],
        anchors_pem: &[u8],
        wall: WallClock,
        crypto: &Crypto,
    ) -> Result<Self, IdentityError> {
        let server_name = ServerName::try_from(name.to_owned())
            .ok()
            .filter(|n| matches!(n, ServerName::DnsName(_)))
            .ok_or_else(|| IdentityError::Name(name.to_owned()))?;
        let roots = Arc::new(parse_anchors(anchors_pem)?);
        let provider = Arc::clone(&crypto.provider);
        let key_pair = crypto.new_key().map_err(IdentityError::Key)?;
        let mut params = rcgen::CertificateParams::new(vec![name.to_owned()])
            .map_err(|err| IdentityError::Key(err.to_string()))?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let csr = params
            .serialize_request(&key_pair)
            .map_err(|err| IdentityError::Key(err.to_string()))?
            .der()
            .to_vec();
        let key = provider
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                key_pair.serialize_der(),
            )))
            .map_err(|err| IdentityError::Key(err.to_string()))?;
        let slot = Arc::new(Slot {
            current: RwLock::new(None),
            wall: Some(wall),
        });
        let tls = Tls::build(roots, &provider, &slot, wall)?;
        Ok(Self {
            name: Arc::from(name),
            server_name,
            token: token.to_vec(),
            token_file: None,
            csr,
            public_key: key_pair.public_key_raw().to_vec(),
            key,
            slot,
            provider,
            tls: RwLock::new(Arc::new(tls)),
            anchors: RwLock::new((None, anchors_pem.to_vec())),
            wall,
            certified: watch::Sender::new(false),
        })
    }

    /// Re-reads the trust anchors file (for a proxy made by [`Self::load`]) and, when it
    /// changed and parses, trusts the new bundle from the next connection on (connections
    /// already open keep theirs). A garbled new file is logged and the anchors in force stay.
    /// Returns whether the anchors changed.
    pub fn reload_anchors(&self) -> bool {
        let (path, last) = {
            let anchors = self
                .anchors
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match &anchors.0 {
                Some(path) => (path.clone(), anchors.1.clone()),
                None => return false,
            }
        };
        let pem = match std::fs::read(&path) {
            Ok(pem) => pem,
            Err(err) => {
                tracing::warn!(path = %path.display(), error = %err, "cannot read the trust anchors; keeping those in force");
                return false;
            }
        };
        if pem == last {
            return false;
        }
        match self.set_anchors(pem) {
            Ok(()) => {
                tracing::info!(path = %path.display(), "trust anchors reloaded");
                true
            }
            Err(err) => {
                tracing::warn!(path = %path.display(), error = %err, "new trust anchors rejected; keeping those in force");
                false
            }
        }
    }

    /// Trusts the anchors of the PEM bundle `pem` from the next connection on (connections
    /// already open keep theirs): what a reload of the anchors file does with the file's new
    /// contents (the simulation, which has no files, calls it directly).
    ///
    /// # Errors
    ///
    /// [`IdentityError`] for a garbled bundle; the anchors in force stay, and the same bytes
    /// are not reported again by [`Self::reload_anchors`].
    pub fn set_anchors(&self, pem: Vec<u8>) -> Result<(), IdentityError> {
        let rebuilt = parse_anchors(&pem)
            .and_then(|roots| Tls::build(Arc::new(roots), &self.provider, &self.slot, self.wall));
        self.anchors
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .1 = pem;
        let tls = rebuilt?;
        *self
            .tls
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(tls);
        Ok(())
    }

    /// The identity's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The end of the held certificate's validity, if one is held.
    #[must_use]
    pub fn valid_until(&self) -> Option<UnixTime> {
        self.slot
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .map(|c| c.valid_until)
    }

    /// The held certificate's validity (not before, not after), once one was received.
    #[must_use]
    pub fn validity(&self) -> Option<(UnixTime, UnixTime)> {
        self.slot
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .map(|c| (c.valid_from, c.valid_until))
    }

    /// The certificate chain held (DER, the leaf first, then its issuer), expired or not;
    /// empty before the first certificate.
    #[must_use]
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        self.slot
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .map(|c| c.key.cert.clone())
            .unwrap_or_default()
    }

    /// Whether a valid certificate is held now.
    #[must_use]
    pub fn is_certified(&self) -> bool {
        self.slot.get().is_some()
    }

    /// Completes once the first certificate is installed.
    pub async fn certified(&self) {
        let mut rx = self.certified.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }

    fn tls(&self) -> Arc<Tls> {
        Arc::clone(
            &self
                .tls
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    pub(crate) fn client_config(&self) -> Arc<ClientConfig> {
        Arc::clone(&self.tls().client)
    }

    pub(crate) fn server_config(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.tls().server)
    }

    /// Checks a certificate from the CA (it must verify for this identity against the anchors,
    /// now, and be for this proxy's key) and makes it the one offered. Returns its expiry.
    pub(crate) fn install(
        &self,
        leaf: Vec<u8>,
        intermediates: Vec<Vec<u8>>,
    ) -> Result<UnixTime, InstallError> {
        let leaf = CertificateDer::from(leaf);
        let intermediates: Vec<CertificateDer<'static>> = intermediates
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        let now = rustls::pki_types::UnixTime::since_unix_epoch(Duration::from_secs(
            (self.wall)().as_secs(),
        ));
        self.tls()
            .verifier
            .verify_server_cert(&leaf, &intermediates, &self.server_name, &[], now)
            .map_err(|err| InstallError::Untrusted {
                name: self.name.to_string(),
                reason: err.to_string(),
            })?;
        let (_, cert) = x509_parser::parse_x509_certificate(&leaf)
            .map_err(|err| InstallError::Garbled(err.to_string()))?;
        if cert.public_key().subject_public_key.data.as_ref() != self.public_key.as_slice() {
            return Err(InstallError::WrongKey);
        }
        let not_after = cert.validity().not_after.timestamp();
        let valid_until = UnixTime::from_secs(u64::try_from(not_after).unwrap_or(0));
        let not_before = cert.validity().not_before.timestamp();
        let valid_from = UnixTime::from_secs(u64::try_from(not_before).unwrap_or(0));
        let mut chain = Vec::with_capacity(1 + intermediates.len());
        chain.push(leaf);
        chain.extend(intermediates);
        let key = Arc::new(CertifiedKey::new(chain, Arc::clone(&self.key)));
        *self
            .slot
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Current {
            key,
            valid_from,
            valid_until,
        });
        self.certified.send_replace(true);
        Ok(valid_until)
    }

    /// Asks the controller's CA at `controller` (over mTLS when its identity is given) for
    /// certificates, first at once and then on the core's schedule, until `drain` fires.
    pub(crate) async fn certify<N: Net>(
        self: Arc<Self>,
        net: N,
        (controller, controller_identity): (PeerAddr, Option<String>),
        connect_timeout: Duration,
        clock: Clock,
        mut rng: DetRng,
        mut drain: Drain,
    ) {
        let endpoint = match TonicEndpoint::from_shared(format!("http://{controller}")) {
            Ok(endpoint) => endpoint.connect_timeout(connect_timeout),
            Err(err) => {
                tracing::error!(%controller, error = %err, "identity: the controller address is not a URI");
                return;
            }
        };
        let tls = match controller_identity
            .as_deref()
            .map(|name| ControllerTls::new(Arc::clone(&self), name))
            .transpose()
        {
            Ok(tls) => tls,
            Err(err) => {
                tracing::error!(error = %err, "identity: controller_identity");
                return;
            }
        };
        let connector = {
            let controller = controller.clone();
            tower::service_fn(move |_: http::Uri| {
                let net = net.clone();
                let controller = controller.clone();
                let tls = tls.clone();
                async move { connect_controller(&net, &controller, tls.as_ref()).await }
            })
        };
        let mut client = IdentityClient::new(endpoint.connect_with_connector_lazy(connector));
        let mut refresh = Refresh::new(RefreshConfig::default(), clock.now());
        let mut anchors = tokio::time::interval(ANCHORS_POLL_INTERVAL);
        anchors.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = clock.sleep_until(refresh.poll_timeout()) => {}
                _ = anchors.tick() => {
                    self.reload_anchors();
                    continue;
                }
                () = drain.signaled() => return,
            }
            let request = CertifyRequest {
                identity: self.name.to_string(),
                token: self.current_token(),
                certificate_signing_request: self.csr.clone(),
            };
            let answer = tokio::time::timeout(CERTIFY_TIMEOUT, client.certify(request)).await;
            let now = clock.now();
            let failure = match answer {
                Err(_) => format!("no answer within {CERTIFY_TIMEOUT:?}"),
                Ok(Err(status)) => format!("{}: {}", status.code(), status.message()),
                Ok(Ok(response)) => {
                    let response = response.into_inner();
                    match self.install(
                        response.leaf_certificate,
                        response.intermediate_certificates,
                    ) {
                        Ok(valid_until) => {
                            let next = refresh.handle_certified(now, (self.wall)(), valid_until);
                            tracing::info!(
                                identity = %self.name,
                                valid_until = valid_until.as_secs(),
                                renew_in = ?next.saturating_duration_since(now),
                                "certified"
                            );
                            continue;
                        }
                        Err(err) => err.to_string(),
                    }
                }
            };
            let next = refresh.handle_failed(now, &mut rng);
            tracing::warn!(
                identity = %self.name,
                %controller,
                error = %failure,
                certified = self.is_certified(),
                retry_in = ?next.saturating_duration_since(now),
                "certify failed"
            );
        }
    }
}

/// The TLS configurations on one set of trust anchors.
struct Tls {
    verifier: Arc<WebPkiServerVerifier>,
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
}

impl Tls {
    fn build(
        roots: Arc<RootCertStore>,
        provider: &Arc<CryptoProvider>,
        slot: &Arc<Slot>,
        wall: WallClock,
    ) -> Result<Self, IdentityError> {
        let time = Arc::new(SeamTime(wall));
        let tls = |err: rustls::Error| IdentityError::Tls(err.to_string());
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::clone(&roots), Arc::clone(provider))
                .build()
                .map_err(|err| IdentityError::Tls(err.to_string()))?;
        let client = ClientConfig::builder_with_details(Arc::clone(provider), time.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls)?
            .with_webpki_verifier(Arc::clone(&verifier))
            .with_client_cert_resolver(Arc::clone(slot) as _);
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots, Arc::clone(provider))
                .build()
                .map_err(|err| IdentityError::Tls(err.to_string()))?;
        let server = ServerConfig::builder_with_details(Arc::clone(provider), time)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls)?
            .with_client_cert_verifier(client_verifier)
            .with_cert_resolver(Arc::clone(slot) as _);
        Ok(Self {
            verifier,
            client: Arc::new(client),
            server: Arc::new(server),
        })
    }
}

/// How a proxy with an identity reaches the controller over mTLS: it checks that the
/// controller proves `name` (the controller's identity, `controller_identity`) and presents its
/// own certificate once it holds one (its first `Certify` goes without).
#[derive(Clone, Debug)]
pub struct ControllerTls {
    identity: Arc<LocalIdentity>,
    name: ServerName<'static>,
}

impl PartialEq for ControllerTls {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.identity, &other.identity) && self.name == other.name
    }
}

impl Eq for ControllerTls {}

impl ControllerTls {
    /// mTLS to a controller that proves `controller_identity`, as `identity`.
    ///
    /// # Errors
    ///
    /// [`IdentityError::Name`] when `controller_identity` is not a DNS-like name.
    pub fn new(
        identity: Arc<LocalIdentity>,
        controller_identity: &str,
    ) -> Result<Self, IdentityError> {
        let name = ServerName::try_from(controller_identity.to_owned())
            .ok()
            .filter(|n| matches!(n, ServerName::DnsName(_)))
            .ok_or_else(|| IdentityError::Name(controller_identity.to_owned()))?;
        Ok(Self { identity, name })
    }
}

/// Connects to the controller at `addr`: over mTLS with `tls`, else plaintext.
pub(crate) async fn connect_controller<N: Net>(
    net: &N,
    addr: &PeerAddr,
    tls: Option<&ControllerTls>,
) -> std::io::Result<TokioIo<crate::tls::UpstreamIo<N::Io>>> {
    let io = addr.connect(net).await?;
    let Some(tls) = tls else {
        return Ok(TokioIo::new(crate::tls::UpstreamIo::Plain(io)));
    };
    let connector = tokio_rustls::TlsConnector::from(tls.identity.client_config());
    let io = connector
        .connect(tls.name.clone(), io)
        .await
        .map_err(|err| {
            tracing::warn!(controller = %addr, error = %err, "mTLS to the controller failed");
            err
        })?;
    Ok(TokioIo::new(crate::tls::UpstreamIo::Tls(Box::new(io))))
}

fn parse_anchors(pem: &[u8]) -> Result<RootCertStore, IdentityError> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = RootCertStore::empty();
    for (i, der) in CertificateDer::pem_slice_iter(pem).enumerate() {
        let der = der.map_err(|err| {
            IdentityError::Anchors(format!("certificate {}: not PEM: {err}", i + 1))
        })?;
        roots.add(der).map_err(|err| {
            IdentityError::Anchors(format!(
                "certificate {} is not a usable anchor: {err}",
                i + 1
            ))
        })?;
    }
    if roots.is_empty() {
        return Err(IdentityError::Anchors(
            "no `BEGIN CERTIFICATE` block found".into(),
        ));
    }
    Ok(roots)
}

/// The identity a peer's certificate proves: its first DNS subject alternative name.
pub(crate) fn peer_identity(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        x509_parser::extensions::GeneralName::DNSName(dns) => Some(dns.to_ascii_lowercase()),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use rcgen::{
        BasicConstraints, CertificateParams, CertificateSigningRequestParams, IsCa, Issuer, KeyPair,
    };

    use super::*;

    /// The tests' wall clock: 2027-01-15.
    fn now() -> UnixTime {
        UnixTime::from_secs(1_800_000_000)
    }

    fn at(secs: i64) -> time::OffsetDateTime {
        time::OffsetDateTime::from_unix_timestamp(secs).unwrap()
    }

    struct Ca {
        issuer: Issuer<'static, KeyPair>,
        pem: String,
    }

    fn ca() -> Ca {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.not_before = at(1_700_000_000);
        params.not_after = at(1_900_000_000);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "test anchor");
        let cert = params.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// Signs `identity`'s CSR as the CA would, valid over `[from, until]`.
    fn sign(ca: &Ca, identity: &LocalIdentity, from: i64, until: i64) -> Vec<u8> {
        let der = rustls::pki_types::CertificateSigningRequestDer::from(identity.csr.clone());
        let mut csr = CertificateSigningRequestParams::from_der(&der).unwrap();
        csr.params.not_before = at(from);
        csr.params.not_after = at(until);
        csr.params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        csr.signed_by(&ca.issuer).unwrap().der().to_vec()
    }

    fn identity(ca: &Ca, name: &str) -> LocalIdentity {
        LocalIdentity::new(name, b"token", ca.pem.as_bytes(), now, &Crypto::system()).unwrap()
    }

    fn certified(ca: &Ca, name: &str) -> LocalIdentity {
        let id = identity(ca, name);
        let leaf = sign(ca, &id, 1_799_990_000, 1_800_086_400);
        assert_eq!(
            id.install(leaf, vec![]).unwrap(),
            UnixTime::from_secs(1_800_086_400)
        );
        assert!(id.is_certified());
        id
    }

    /// An mTLS handshake from `client` to `server`, the client expecting `expect`: the
    /// identity the server saw, or the handshake's error.
    async fn handshake(
        client: &LocalIdentity,
        server: &LocalIdentity,
        expect: &str,
    ) -> Result<Option<String>, String> {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let connector = tokio_rustls::TlsConnector::from(client.client_config());
        let acceptor = tokio_rustls::TlsAcceptor::from(server.server_config());
        let name = ServerName::try_from(expect.to_owned()).unwrap();
        let (connected, accepted) = tokio::join!(connector.connect(name, a), acceptor.accept(b));
        let accepted = accepted.map_err(|e| e.to_string());
        connected.map_err(|e| e.to_string())?;
        let accepted = accepted?;
        Ok(accepted
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(peer_identity))
    }

    #[tokio::test]
    async fn meshed_peers_prove_their_identities_to_each_other() {
        let ca = ca();
        let web = certified(&ca, "web.default.serviceaccount.identity.conduit.local");
        let api = certified(&ca, "api.default.serviceaccount.identity.conduit.local");
        let seen = handshake(
            &web,
            &api,
            "api.default.serviceaccount.identity.conduit.local",
        )
        .await
        .unwrap();
        assert_eq!(
            seen.as_deref(),
            Some("web.default.serviceaccount.identity.conduit.local")
        );
        // The client asked for another identity than the server proves: refused.
        let err = handshake(
            &web,
            &api,
            "db.default.serviceaccount.identity.conduit.local",
        )
        .await
        .unwrap_err();
        assert!(err.contains("certificate"), "{err}");
    }

    #[tokio::test]
    async fn an_ed25519_identity_speaks_mtls_with_a_p256_one() {
        // The simulation's key kind: certified by the same CA, and interoperable both ways.
        let ca = ca();
        let crypto = Crypto {
            keys: conduit_proto::crypto::KeyKind::Ed25519,
            ..Crypto::system()
        };
        let web = LocalIdentity::new("web.a", b"t", ca.pem.as_bytes(), now, &crypto).unwrap();
        web.install(sign(&ca, &web, 1_799_990_000, 1_800_086_400), vec![])
            .unwrap();
        let api = certified(&ca, "api.a");
        assert_eq!(
            handshake(&web, &api, "api.a").await.unwrap().as_deref(),
            Some("web.a")
        );
        assert_eq!(
            handshake(&api, &web, "web.a").await.unwrap().as_deref(),
            Some("api.a")
        );
    }

    #[tokio::test]
    async fn a_peer_from_another_ca_or_without_a_certificate_is_refused() {
        let ca = ca();
        let other = ca_other();
        let web = certified(&ca, "web.a");
        let stranger = certified(&other, "api.a");
        assert!(handshake(&web, &stranger, "api.a").await.is_err());
        assert!(handshake(&stranger, &web, "web.a").await.is_err());
        // A client holding no certificate yet: the server requires one.
        let fresh = identity(&ca, "new.a");
        assert!(!fresh.is_certified());
        assert!(handshake(&fresh, &web, "web.a").await.is_err());
    }

    fn ca_other() -> Ca {
        ca()
    }

    #[test]
    fn certificates_that_do_not_fit_are_refused() {
        let ca = ca();
        let web = identity(&ca, "web.a");
        let api = identity(&ca, "api.a");
        // For another identity's key and name.
        let leaf = sign(&ca, &api, 1_799_990_000, 1_800_086_400);
        assert!(matches!(
            web.install(leaf, vec![]),
            Err(InstallError::Untrusted { .. })
        ));
        // Expired, and not yet valid, at the wall clock's time.
        for (from, until) in [
            (1_799_000_000, 1_799_999_999),
            (1_800_000_100, 1_800_086_400),
        ] {
            let leaf = sign(&ca, &web, from, until);
            let err = web.install(leaf, vec![]).unwrap_err();
            assert!(matches!(err, InstallError::Untrusted { .. }), "{err}");
        }
        // From another CA.
        let other = ca_other();
        let leaf = sign(&other, &web, 1_799_990_000, 1_800_086_400);
        assert!(web.install(leaf, vec![]).is_err());
        // Garbage.
        assert!(web.install(b"not a certificate".to_vec(), vec![]).is_err());
        assert!(!web.is_certified(), "nothing was installed");
    }

    #[tokio::test]
    async fn a_new_anchor_bundle_is_trusted_after_a_reload_and_a_garbled_one_is_not() {
        let old = ca();
        let new = ca();
        let dir = std::env::temp_dir().join(format!("conduit-anchors-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("trust-anchors.pem");
        std::fs::write(&path, &old.pem).unwrap();
        let settings = IdentitySettings {
            name: "web.a".into(),
            token: TokenSource::Value("t".into()),
            trust_anchors: TrustAnchors::File(path.clone()),
        };
        let web = LocalIdentity::load(&settings, now).unwrap();
        let leaf = sign(&old, &web, 1_799_990_000, 1_800_086_400);
        web.install(leaf, vec![]).unwrap();
        // A peer that already trusts both anchors, whose certificate comes from the new one.
        let bundle = format!("{}{}", old.pem, new.pem);
        let api =
            LocalIdentity::new("api.a", b"t", bundle.as_bytes(), now, &Crypto::system()).unwrap();
        api.install(sign(&new, &api, 1_799_990_000, 1_800_086_400), vec![])
            .unwrap();
        assert!(handshake(&web, &api, "api.a").await.is_err());
        assert!(!web.reload_anchors(), "unchanged file");
        // Step 1 of an anchor rotation: the bundle holds both anchors.
        std::fs::write(&path, &bundle).unwrap();
        assert!(web.reload_anchors());
        assert!(handshake(&web, &api, "api.a").await.is_ok());
        // A garbled bundle is refused and the one in force stays.
        std::fs::write(&path, "-----BEGIN CERTIFICATE-----\ngarbage\n").unwrap();
        assert!(!web.reload_anchors());
        assert!(handshake(&web, &api, "api.a").await.is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_settings_get_errors_that_say_what_is_wrong() {
        let ca = ca();
        let err = LocalIdentity::new(
            "not a name",
            b"t",
            ca.pem.as_bytes(),
            now,
            &Crypto::system(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("not a DNS-like name"), "{err}");
        let err =
            LocalIdentity::new("web.a", b"t", b"garbage", now, &Crypto::system()).unwrap_err();
        assert!(err.to_string().contains("no `BEGIN CERTIFICATE`"), "{err}");
        let truncated = &ca.pem[..ca.pem.len() / 2];
        assert!(
            LocalIdentity::new("web.a", b"t", truncated.as_bytes(), now, &Crypto::system())
                .is_err()
        );
    }
}
