//! The certificate authority: trust anchors, the issuer that signs leaves, and the token key.
//!
//! [`CertificateAuthority::open`] reads (and on first start, creates) the identity directory;
//! [`CertificateAuthority::in_memory`] makes a throwaway CA with no files, for the simulation.
//! [`CertificateAuthority::certify`] turns a token and a CSR into a leaf.
//!
//! # Checking an issuer
//!
//! Every issuer, bootstrapped, supplied or reloaded, is checked before it signs anything: its
//! key must match its certificate (their SubjectPublicKeyInfo are compared), and a probe leaf
//! it signs must verify, through rustls' webpki, against the trust anchors at the current
//! time. The probe is the same kind of leaf workloads get, so an issuer that passes is one
//! whose leaves proxies will accept: a CA certificate, allowed to sign, within its validity,
//! signed by an anchor.
//!
//! # Rotating the issuer
//!
//! The issuer's two files are polled ([`watch_issuer_files`]); when their contents change the
//! new pair is checked as above and replaces the old one, and leaves signed afterwards carry
//! the new issuer. A bad pair is logged and the old issuer keeps signing. [`rotate_issuer`]
//! writes a new bootstrapped issuer signed by `anchor.key`. It writes the key first and the
//! certificate second, each atomically; a poll that falls between the two sees a mismatch,
//! rejects it once, and picks the pair up on the next poll.

use core::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use conduit_core::time::UnixTime;
use conduit_proto::crypto::Crypto;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType, SerialNumber,
};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier as _;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer, ServerName};

use super::files::{self, CERT_MODE, KEY_MODE, ReadError};
use super::token::{TOKEN_KEY_BYTES, TokenError, TokenKey};
use super::{
    ANCHOR_COMMON_NAME, ANCHOR_KEY_FILE, ANCHOR_KEY_PREVIOUS_FILE, CA_VALIDITY,
    CLOCK_SKEW_ALLOWANCE, ISSUER_CERT_FILE, ISSUER_COMMON_NAME, ISSUER_KEY_FILE, IdentityConfig,
    TOKEN_KEY_FILE, TRUST_ANCHORS_FILE, WallClock, der, truncated,
};
use crate::metrics::{CertifyOutcome, Metrics};

/// The largest certificate signing request accepted (a P-256 CSR is about 300 bytes).
pub const MAX_CSR_BYTES: usize = 16 * 1024;

/// The name the probe leaf that checks an issuer is made for.
const PROBE_IDENTITY: &str = "issuer-check.identity.conduit.local";

/// How long the probe leaf lasts.
const PROBE_LIFETIME: Duration = Duration::from_secs(60);

/// Why the certificate authority could not start, or a new issuer was not taken.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A file or the directory could not be written.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A file holds something unusable (garbled, mismatched, or not chaining to an anchor).
    #[error("{}: {reason}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A key or certificate could not be made.
    #[error("cannot generate {what}: {reason}")]
    Generate {
        /// What was being made.
        what: &'static str,
        /// Why not.
        reason: String,
    },
}

/// Why a Certify request was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertifyError {
    /// The token is missing, malformed or not this CA's.
    #[error("invalid token: {0}")]
    Unauthenticated(#[source] TokenError),
    /// The token proves one identity and the request asks for another.
    #[error("the token is for `{token}`, but the request asks for `{requested}`")]
    IdentityMismatch {
        /// The identity the token proves.
        token: String,
        /// The identity asked for (truncated).
        requested: String,
    },
    /// The CSR asks for a name other than the token's identity.
    #[error(
        "the certificate signing request asks for {requested}, but the token is for `{identity}`"
    )]
    CsrNamesOther {
        /// What the CSR asks for.
        requested: String,
        /// The identity the token proves.
        identity: String,
    },
    /// The CSR is garbled, its signature does not verify, or its key is of an unsupported kind.
    #[error("invalid certificate signing request: {reason}")]
    InvalidCsr {
        /// What is wrong.
        reason: String,
    },
    /// Signing failed (an internal error).
    #[error("cannot sign the certificate: {reason}")]
    Sign {
        /// Why not.
        reason: String,
    },
}

impl CertifyError {
    /// How the outcome is counted.
    #[must_use]
    pub fn outcome(&self) -> CertifyOutcome {
        match self {
            Self::Unauthenticated(_) => CertifyOutcome::Unauthenticated,
            Self::IdentityMismatch { .. } | Self::CsrNamesOther { .. } => CertifyOutcome::Denied,
            Self::InvalidCsr { .. } => CertifyOutcome::Invalid,
            Self::Sign { .. } => CertifyOutcome::Error,
        }
    }
}

/// A signed leaf and the chain to send with it.
#[derive(Clone, Debug)]
pub struct Certified {
    /// The leaf certificate (DER).
    pub leaf: CertificateDer<'static>,
    /// The intermediates, leaf-most first, up to (not including) the trust anchor: the issuer.
    pub intermediates: Vec<CertificateDer<'static>>,
    /// The end of the leaf's validity.
    pub valid_until: UnixTime,
}

/// A serving certificate for DNS names ([`CertificateAuthority::certify_server`]), as PEM for
/// a `kubernetes.io/tls` Secret.
#[derive(Clone)]
pub struct ServerCertificate {
    /// The chain: the leaf, then the issuer.
    pub chain_pem: String,
    /// The leaf's private key (PKCS#8).
    pub key_pem: String,
    /// The start of the leaf's validity (with the clock-skew allowance).
    pub not_before: UnixTime,
    /// The end of the leaf's validity.
    pub not_after: UnixTime,
}

impl fmt::Debug for ServerCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerCertificate")
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// What one poll of the issuer's files found.
#[derive(Debug)]
#[non_exhaustive]
pub enum IssuerReload {
    /// The same contents as last time (or the CA has no files).
    Unchanged,
    /// A new, checked issuer now signs leaves.
    Replaced {
        /// The end of the new issuer's validity.
        not_after: UnixTime,
    },
    /// The files changed but are unusable (or unreadable); the previous issuer keeps signing.
    /// Reported once per distinct bad state.
    Rejected(CaError),
}

/// What [`CertificateAuthority::reload_anchors`] did.
#[derive(Debug)]
pub enum AnchorsReload {
    /// The bundle is as before (or was already refused).
    Unchanged,
    /// A new bundle is in force.
    Replaced {
        /// How many anchors it holds.
        count: usize,
        /// The earliest end of validity among them.
        not_after: UnixTime,
    },
    /// The bundle changed but is unusable, or the current issuer does not chain to it; the
    /// anchors in force stay. Reported once per distinct bad bundle.
    Rejected(CaError),
}

/// The trust anchors: read at start, replaced whole when their bundle changes (an anchor
/// rotation).
struct Anchors {
    certs: Vec<CertificateDer<'static>>,
    /// The bundle as PEM text.
    pem: Vec<u8>,
    /// The earliest end of validity among them.
    not_after: UnixTime,
    verifier: Arc<WebPkiServerVerifier>,
    /// Where they came from, for messages.
    path: PathBuf,
}

/// The issuer that signs leaves.
struct SigningIssuer {
    cert: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    not_after: UnixTime,
}

/// The issuer's files and what the last poll saw in them.
struct IssuerFiles {
    cert: PathBuf,
    key: PathBuf,
    seen: Mutex<Seen>,
}

#[derive(PartialEq, Eq)]
enum Seen {
    Contents { cert: Vec<u8>, key: Vec<u8> },
    Error(String),
}

/// The controller's certificate authority.
///
/// Shared by the gRPC service and the issuer watcher behind an `Arc`; the current issuer is
/// swapped under a lock that signing holds only long enough to clone an `Arc`.
pub struct CertificateAuthority {
    anchors: RwLock<Arc<Anchors>>,
    /// Bumped whenever the anchors are replaced (the controller's own TLS rebuilds on it).
    anchors_version: AtomicU64,
    /// The last bundle [`Self::reload_anchors`] read (so a refused one is reported once).
    anchors_seen: Mutex<Vec<u8>>,
    issuer: RwLock<Arc<SigningIssuer>>,
    tokens: TokenKey,
    clock: WallClock,
    leaf_lifetime: Duration,
    files: Option<IssuerFiles>,
    crypto: Crypto,
    /// The signing anchor's key and certificate, kept by an in-memory CA only (to rotate its
    /// issuer and anchors, for the simulation); a directory keeps them in its files.
    anchor: Mutex<Option<MemoryAnchor>>,
}

/// An in-memory CA's signing anchor: its key, certificate and the certificate's PEM.
#[derive(Clone)]
struct MemoryAnchor {
    key: Arc<KeyPair>,
    cert: CertificateDer<'static>,
    pem: String,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("anchors", &self.current_anchors().path)
            .field("anchors_not_after", &self.current_anchors().not_after)
            .field("issuer_not_after", &self.current_issuer().not_after)
            .field("leaf_lifetime", &self.leaf_lifetime)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Opens the identity directory of `config`, creating what is missing: the directory
    /// (0700), the token key, and, unless `config.supplied` names an operator's CA, a trust
    /// anchor and an issuer. Then checks the issuer against the anchors.
    ///
    /// Blocking: it reads and writes files and may generate keys. Call it at start-up.
    ///
    /// # Errors
    ///
    /// [`CaError`] naming the file that cannot be read or written or is unusable, and what is
    /// wrong with it.
    pub fn open(config: &IdentityConfig, clock: WallClock) -> Result<Self, CaError> {
        let dir = &config.dir;
        files::create_dir(dir).map_err(|source| CaError::Write {
            path: dir.clone(),
            source,
        })?;
        if files::mode(dir).is_some_and(|mode| mode & 0o077 != 0) {
            tracing::warn!(dir = %dir.display(), "the identity directory is open to other users; it holds private keys (chmod 700)");
        }
        let tokens = open_token_key(dir)?;
        let now = clock();
        let (anchors_path, cert_path, key_path) = match &config.supplied {
            Some(supplied) => (
                supplied.trust_anchors.clone(),
                supplied.issuer_cert.clone(),
                supplied.issuer_key.clone(),
            ),
            None => {
                bootstrap(dir, now)?;
                (
                    dir.join(TRUST_ANCHORS_FILE),
                    dir.join(ISSUER_CERT_FILE),
                    dir.join(ISSUER_KEY_FILE),
                )
            }
        };
        let anchors = parse_anchors(&anchors_path, read(&anchors_path)?)?;
        let cert = read(&cert_path)?;
        let key = read(&key_path)?;
        for path in [&key_path, &dir.join(TOKEN_KEY_FILE)] {
            if files::mode(path).is_some_and(|mode| mode & 0o077 != 0) {
                tracing::warn!(path = %path.display(), "a private key is readable by other users (chmod 600)");
            }
        }
        let crypto = Crypto::system();
        let issuer = parse_issuer(&cert_path, &cert, &key_path, &key, &anchors, now, &crypto)?;
        tracing::info!(
            dir = %dir.display(),
            trust_anchors = anchors.certs.len(),
            issuer_not_after = issuer.not_after.as_secs(),
            "certificate authority ready"
        );
        Ok(Self {
            anchors: RwLock::new(Arc::new(anchors)),
            anchors_version: AtomicU64::new(0),
            anchors_seen: Mutex::new(Vec::new()),
            issuer: RwLock::new(Arc::new(issuer)),
            tokens,
            clock,
            leaf_lifetime: config.leaf_lifetime,
            files: Some(IssuerFiles {
                cert: cert_path,
                key: key_path,
                seen: Mutex::new(Seen::Contents { cert, key }),
            }),
            crypto,
            anchor: Mutex::new(None),
        })
    }

    /// A CA with a fresh anchor, issuer and token key held in memory only (for the
    /// simulation, which has no files), made with `crypto` (the simulation's is seeded):
    /// [`Self::trust_anchors_pem`] and [`Self::issue_token`] hand out what a directory would.
    ///
    /// # Errors
    ///
    /// [`CaError::Generate`] if a key or certificate cannot be made.
    pub fn in_memory(
        leaf_lifetime: Duration,
        clock: WallClock,
        crypto: Crypto,
    ) -> Result<Self, CaError> {
        let now = clock();
        let (anchor_key, anchor_cert) = generate_anchor(now, &crypto)?;
        let (issuer_key, issuer_cert) =
            generate_issuer(anchor_cert.der(), &anchor_key, now, &crypto)?;
        let memory = PathBuf::from("<memory>");
        let anchors = parse_anchors(&memory, anchor_cert.pem().into_bytes())?;
        let issuer = parse_issuer(
            &memory,
            issuer_cert.pem().as_bytes(),
            &memory,
            issuer_key.serialize_pem().as_bytes(),
            &anchors,
            now,
            &crypto,
        )?;
        let anchor = MemoryAnchor {
            key: Arc::new(anchor_key),
            cert: anchor_cert.der().clone(),
            pem: anchor_cert.pem(),
        };
        Ok(Self {
            anchors: RwLock::new(Arc::new(anchors)),
            anchors_version: AtomicU64::new(0),
            anchors_seen: Mutex::new(Vec::new()),
            issuer: RwLock::new(Arc::new(issuer)),
            tokens: TokenKey::from_bytes(&random_bytes(&crypto)?),
            clock,
            leaf_lifetime,
            files: None,
            crypto,
            anchor: Mutex::new(Some(anchor)),
        })
    }

    /// The crypto the CA was made with (the controller's own TLS uses it too).
    #[must_use]
    pub fn crypto(&self) -> &Crypto {
        &self.crypto
    }

    /// The wall clock the CA reads (the controller's own TLS checks certificates on it).
    #[must_use]
    pub fn clock(&self) -> &WallClock {
        &self.clock
    }

    /// The trust anchors (DER).
    #[must_use]
    pub fn trust_anchors(&self) -> Vec<CertificateDer<'static>> {
        self.current_anchors().certs.clone()
    }

    /// The trust-anchor bundle as PEM, as proxies load it.
    #[must_use]
    pub fn trust_anchors_pem(&self) -> Vec<u8> {
        self.current_anchors().pem.clone()
    }

    /// The earliest end of validity among the trust anchors.
    #[must_use]
    pub fn trust_anchors_not_after(&self) -> UnixTime {
        self.current_anchors().not_after
    }

    /// How many times the trust anchors were replaced since start.
    #[must_use]
    pub fn trust_anchors_version(&self) -> u64 {
        self.anchors_version.load(Ordering::Acquire)
    }

    /// The current issuer's certificate (DER).
    #[must_use]
    pub fn issuer_certificate(&self) -> CertificateDer<'static> {
        self.current_issuer().cert.clone()
    }

    /// The end of the current issuer's validity.
    #[must_use]
    pub fn issuer_not_after(&self) -> UnixTime {
        self.current_issuer().not_after
    }

    /// The CA's wall-clock time (its injected clock).
    #[must_use]
    pub fn now(&self) -> UnixTime {
        (self.clock)()
    }

    /// How long each leaf lasts.
    #[must_use]
    pub fn leaf_lifetime(&self) -> Duration {
        self.leaf_lifetime
    }

    /// The bootstrap token for `identity`, made with this CA's token key.
    ///
    /// # Errors
    ///
    /// [`TokenError::InvalidIdentity`] when `identity` is not a valid name.
    pub fn issue_token(&self, identity: &str) -> Result<String, TokenError> {
        self.tokens.issue(identity)
    }

    /// Signs a leaf for the identity `token` proves, which must be `identity`, over the public
    /// key of `csr` (a DER PKCS#10 request whose signature must verify with that key).
    ///
    /// The leaf names the token's identity and nothing else (the CSR's subject is ignored;
    /// any subject alternative name it asks for must be that identity): one DNS name, the
    /// same common name, server and client authentication, digital signature, not a CA. It is
    /// valid from [`CLOCK_SKEW_ALLOWANCE`] before now for the leaf lifetime, but never past
    /// the issuer's own end.
    ///
    /// Never panics, whatever the input.
    ///
    /// # Errors
    ///
    /// [`CertifyError`]: which kind says which gRPC status it is.
    pub fn certify(
        &self,
        identity: &str,
        token: &[u8],
        csr: &[u8],
    ) -> Result<Certified, CertifyError> {
        let proven = self
            .tokens
            .verify(token)
            .map_err(CertifyError::Unauthenticated)?;
        self.certify_proven(identity, proven, csr)
    }

    /// Signs a leaf for `proven`, an identity the caller has already proven (a ServiceAccount
    /// token the API server reviewed, [`super::serviceaccount`]), which must be `identity`,
    /// over the public key of `csr`: the rest of [`Self::certify`], with the same checks.
    ///
    /// # Errors
    ///
    /// As [`Self::certify`], except [`CertifyError::Unauthenticated`].
    pub fn certify_proven(
        &self,
        identity: &str,
        proven: String,
        csr: &[u8],
    ) -> Result<Certified, CertifyError> {
        if identity != proven {
            return Err(CertifyError::IdentityMismatch {
                token: proven,
                requested: truncated(identity),
            });
        }
        let request = parse_csr(csr)?;
        for name in &request.params.subject_alt_names {
            match name {
                SanType::DnsName(name) if name.as_str() == proven => {}
                other => {
                    return Err(CertifyError::CsrNamesOther {
                        requested: describe_san(other),
                        identity: proven,
                    });
                }
            }
        }
        let issuer = self.current_issuer();
        let now = (self.clock)();
        let (params, valid_until) = leaf_params(
            &proven,
            now,
            self.leaf_lifetime,
            issuer.not_after,
            &self.crypto,
        )
        .map_err(|reason| CertifyError::Sign { reason })?;
        let leaf = params
            .signed_by(&request.public_key, &issuer.issuer)
            .map_err(|err| CertifyError::Sign {
                reason: err.to_string(),
            })?;
        Ok(Certified {
            leaf: leaf.der().clone(),
            intermediates: vec![issuer.cert.clone()],
            valid_until,
        })
    }

    /// A serving certificate for `names` (DNS names, the first also its common name) with a
    /// fresh key, signed by the current issuer, valid for `lifetime` or until the issuer
    /// expires, whichever comes first. For servers that are not workloads, such as the
    /// injecting webhook, whose clients (the Kubernetes API server) trust the anchors: it is
    /// good for server authentication only.
    ///
    /// # Errors
    ///
    /// [`CaError::Generate`] when a name is not a DNS name or the key or signature fails.
    pub fn certify_server(
        &self,
        names: &[String],
        lifetime: Duration,
    ) -> Result<ServerCertificate, CaError> {
        let generate = |reason: String| CaError::Generate {
            what: "a serving certificate",
            reason,
        };
        let first = names
            .first()
            .ok_or_else(|| generate("no name to certify".into()))?;
        let issuer = self.current_issuer();
        let now = (self.clock)();
        let mut params =
            CertificateParams::new(names.to_vec()).map_err(|err| generate(format!("{err}")))?;
        params.distinguished_name = common_name(first);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial(&self.crypto)?);
        let not_before =
            UnixTime::from_secs(now.as_secs().saturating_sub(CLOCK_SKEW_ALLOWANCE.as_secs()));
        let not_after = UnixTime::from_secs(now.as_secs().saturating_add(lifetime.as_secs()))
            .min(issuer.not_after);
        params.not_before = date(not_before).map_err(generate)?;
        params.not_after = date(not_after).map_err(generate)?;
        let key = generate_key("a serving certificate's key", &self.crypto)?;
        let leaf = params
            .signed_by(&key, &issuer.issuer)
            .map_err(|err| generate(err.to_string()))?;
        let issuer_pem = certificate_pem(&issuer.cert);
        Ok(ServerCertificate {
            chain_pem: format!("{}{issuer_pem}", leaf.pem()),
            key_pem: key.serialize_pem(),
            not_before,
            not_after,
        })
    }

    /// Whether `chain` (a leaf, then its intermediates) is good now for the server `name`
    /// against the current trust anchors: the check a TLS client trusting them makes.
    ///
    /// # Errors
    ///
    /// Why not, for a message.
    pub fn verify_server_chain(
        &self,
        chain: &[CertificateDer<'_>],
        name: &str,
    ) -> Result<(), String> {
        let (leaf, intermediates) = chain.split_first().ok_or("no certificate")?;
        let name = ServerName::try_from(name).map_err(|err| err.to_string())?;
        let now = (self.clock)();
        self.current_anchors()
            .verifier
            .verify_server_cert(
                leaf,
                intermediates,
                &name,
                &[],
                rustls::pki_types::UnixTime::since_unix_epoch(Duration::from_secs(now.as_secs())),
            )
            .map(|_| ())
            .map_err(|err| err.to_string())
    }

    /// Reads the issuer's files and, if they changed and are good, makes them the issuer.
    ///
    /// Blocking (it reads two small files); run it off the async threads.
    pub fn reload_issuer(&self) -> IssuerReload {
        let Some(files) = &self.files else {
            return IssuerReload::Unchanged;
        };
        let read = read(&files.cert).and_then(|cert| Ok((cert, read(&files.key)?)));
        let mut seen = files.seen.lock().unwrap_or_else(PoisonError::into_inner);
        match read {
            Ok((cert, key)) => {
                if matches!(&*seen, Seen::Contents { cert: c, key: k } if *c == cert && *k == key) {
                    return IssuerReload::Unchanged;
                }
                let checked = parse_issuer(
                    &files.cert,
                    &cert,
                    &files.key,
                    &key,
                    &self.current_anchors(),
                    (self.clock)(),
                    &self.crypto,
                );
                *seen = Seen::Contents { cert, key };
                match checked {
                    Ok(issuer) => {
                        let not_after = issuer.not_after;
                        *self.issuer.write().unwrap_or_else(PoisonError::into_inner) =
                            Arc::new(issuer);
                        IssuerReload::Replaced { not_after }
                    }
                    Err(err) => IssuerReload::Rejected(err),
                }
            }
            Err(err) => {
                let now_seen = Seen::Error(err.to_string());
                if *seen == now_seen {
                    return IssuerReload::Unchanged;
                }
                *seen = now_seen;
                IssuerReload::Rejected(err)
            }
        }
    }

    /// For an in-memory CA ([`Self::in_memory`]): signs a new issuer with the anchor's key and
    /// makes it the issuer at once, as a directory's watcher does with a rotated issuer's files.
    /// Leaves already issued stay valid (they chain to the same anchor); new ones come from
    /// the new issuer. Returns the new issuer's end of validity.
    ///
    /// # Errors
    ///
    /// [`CaError::Invalid`] for a CA opened from a directory (rotate its files instead), or
    /// [`CaError::Generate`] if the key or certificate cannot be made.
    pub fn rotate_issuer_in_memory(&self) -> Result<UnixTime, CaError> {
        let memory = PathBuf::from("<memory>");
        let anchor = self.memory_anchor("its issuer", "rotate-issuer")?;
        let now = (self.clock)();
        let (key, cert) = generate_issuer(&anchor.cert, &anchor.key, now, &self.crypto)?;
        let issuer = parse_issuer(
            &memory,
            cert.pem().as_bytes(),
            &memory,
            key.serialize_pem().as_bytes(),
            &self.current_anchors(),
            now,
            &self.crypto,
        )?;
        let not_after = issuer.not_after;
        *self.issuer.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(issuer);
        Ok(not_after)
    }

    /// For an in-memory CA: makes a new trust anchor, adds it to the bundle (old anchors
    /// first) and signs with it from the next issuer rotation on. Step 1 of an anchor rotation,
    /// as `conduit identity add-anchor` is for a directory.
    ///
    /// # Errors
    ///
    /// [`CaError::Invalid`] for a CA opened from a directory, or [`CaError::Generate`].
    pub fn add_anchor_in_memory(&self) -> Result<(), CaError> {
        self.memory_anchor("its anchors", "add-anchor")?;
        let (key, cert) = generate_anchor((self.clock)(), &self.crypto)?;
        let mut bundle = self.current_anchors().pem.clone();
        bundle.extend_from_slice(cert.pem().as_bytes());
        self.swap_anchors(parse_anchors(Path::new("<memory>"), bundle)?);
        *self.anchor.lock().unwrap_or_else(PoisonError::into_inner) = Some(MemoryAnchor {
            key: Arc::new(key),
            cert: cert.der().clone(),
            pem: cert.pem(),
        });
        Ok(())
    }

    /// For an in-memory CA: keeps only the anchor it signs with in the bundle. The last step
    /// of an anchor rotation, as `conduit identity retire-anchors` is for a directory.
    ///
    /// # Errors
    ///
    /// [`CaError::Invalid`] for a CA opened from a directory, or when the current issuer does
    /// not chain to that anchor (rotate the issuer first).
    pub fn retire_anchors_in_memory(&self) -> Result<(), CaError> {
        let anchor = self.memory_anchor("its anchors", "retire-anchors")?;
        let anchors = parse_anchors(Path::new("<memory>"), anchor.pem.into_bytes())?;
        self.check_issuer_chains(&anchors)?;
        self.swap_anchors(anchors);
        Ok(())
    }

    /// Re-reads the trust-anchor bundle of a CA opened from a directory and, when it changed,
    /// parses and the current issuer still chains to it, makes it the anchors (an anchor
    /// rotation's added or retired anchor). The controller's issuer watcher calls it on every
    /// poll, before [`Self::reload_issuer`], so an issuer signed by a just-added anchor is
    /// accepted on the same poll.
    ///
    /// Blocking (it reads a small file); run it off the async threads.
    pub fn reload_anchors(&self) -> AnchorsReload {
        let current = self.current_anchors();
        if self.files.is_none() {
            return AnchorsReload::Unchanged;
        }
        let pem = match read(&current.path) {
            Ok(pem) if pem == current.pem => return AnchorsReload::Unchanged,
            Ok(pem) => pem,
            Err(err) => return AnchorsReload::Rejected(err),
        };
        let mut seen = self
            .anchors_seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if *seen == pem {
            // Already refused (reported once).
            return AnchorsReload::Unchanged;
        }
        seen.clone_from(&pem);
        let checked = parse_anchors(&current.path, pem).and_then(|anchors| {
            self.check_issuer_chains(&anchors)?;
            Ok(anchors)
        });
        match checked {
            Ok(anchors) => {
                let count = anchors.certs.len();
                let not_after = anchors.not_after;
                self.swap_anchors(anchors);
                AnchorsReload::Replaced { count, not_after }
            }
            Err(err) => AnchorsReload::Rejected(err),
        }
    }

    /// Refuses `anchors` unless the current issuer's leaves verify against them.
    fn check_issuer_chains(&self, anchors: &Anchors) -> Result<(), CaError> {
        self.current_issuer()
            .probe(anchors, (self.clock)(), &self.crypto)
            .map_err(|reason| CaError::Invalid {
                path: anchors.path.clone(),
                reason: format!(
                    "the current issuer does not chain to these anchors ({reason}): rotate the \
                     issuer to one signed by an anchor in the bundle first"
                ),
            })
    }

    fn swap_anchors(&self, anchors: Anchors) {
        *self.anchors.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(anchors);
        self.anchors_version.fetch_add(1, Ordering::AcqRel);
    }

    fn current_anchors(&self) -> Arc<Anchors> {
        Arc::clone(&self.anchors.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// An in-memory CA's signing anchor; for a directory's CA, an error naming the command
    /// that does `what` to it.
    fn memory_anchor(&self, what: &str, command: &str) -> Result<MemoryAnchor, CaError> {
        self.anchor
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or_else(|| CaError::Invalid {
                path: PathBuf::from("<memory>"),
                reason: format!(
                    "only an in-memory CA changes {what} itself; for a directory run \
                     `conduit identity {command} --identity-dir DIR`"
                ),
            })
    }

    fn current_issuer(&self) -> Arc<SigningIssuer> {
        // The lock guards a single `Arc` swap, which cannot be left half-done by a panic.
        Arc::clone(&self.issuer.read().unwrap_or_else(PoisonError::into_inner))
    }
}

/// Polls the issuer's files every `interval` and takes a good new issuer, forever; run it as
/// a task and abort it to stop. A bad one is logged at `warn` and the old issuer kept.
pub async fn watch_issuer_files(
    ca: Arc<CertificateAuthority>,
    interval: Duration,
    metrics: Arc<Metrics>,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick completes at once; the files were just read.
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let polled = Arc::clone(&ca);
        // Anchors first: an issuer signed by a just-added anchor is taken on the same poll.
        let reloaded =
            tokio::task::spawn_blocking(move || (polled.reload_anchors(), polled.reload_issuer()))
                .await;
        let issuer = match reloaded {
            Ok((anchors, issuer)) => {
                match anchors {
                    AnchorsReload::Unchanged => {}
                    AnchorsReload::Replaced { count, not_after } => {
                        metrics.set_identity_trust_anchor_expiry(not_after.as_secs());
                        tracing::info!(
                            anchors = count,
                            not_after = not_after.as_secs(),
                            "new trust-anchor bundle loaded; the controller trusts it from its next connection"
                        );
                    }
                    AnchorsReload::Rejected(err) => {
                        metrics.record_identity_issuer_reject();
                        tracing::warn!(error = %err, "new trust-anchor bundle rejected; the anchors in force stay");
                    }
                }
                Ok(issuer)
            }
            Err(err) => Err(err),
        };
        match issuer {
            Ok(IssuerReload::Unchanged) => {}
            Ok(IssuerReload::Replaced { not_after }) => {
                metrics.set_identity_issuer_expiry(not_after.as_secs());
                tracing::info!(
                    not_after = not_after.as_secs(),
                    "new issuer loaded; it signs every leaf from now on"
                );
            }
            Ok(IssuerReload::Rejected(err)) => {
                metrics.record_identity_issuer_reject();
                tracing::warn!(error = %err, "new issuer rejected; the previous issuer keeps signing");
            }
            Err(err) => {
                tracing::warn!(error = %err, "issuer reload task failed");
            }
        }
    }
}

/// Writes a new issuer for the bootstrapped anchor in `dir`, signed with its `anchor.key`.
/// A running controller picks it up on its next poll.
///
/// # Errors
///
/// [`CaError`] naming the file: no anchor key (the anchors were supplied, not bootstrapped),
/// an unreadable one, or one matching no certificate in the bundle.
pub fn rotate_issuer(dir: &Path, clock: &WallClock) -> Result<UnixTime, CaError> {
    write_new_issuer(dir, clock())
}

/// Step 1 of an anchor rotation in the bootstrapped directory `dir`: makes a new trust
/// anchor, appends it to the bundle (proxies and a running controller trust both from their
/// next poll) and makes its key the anchor key (the old one is kept as `anchor.key.previous`),
/// so the next [`rotate_issuer`] signs with it. Returns the new anchor's end of validity.
///
/// # Errors
///
/// [`CaError`] naming the file: no anchor key (supplied anchors rotate by hand), an
/// unreadable bundle, or a write that failed.
pub fn add_anchor(dir: &Path, clock: &WallClock) -> Result<UnixTime, CaError> {
    let anchors_path = dir.join(TRUST_ANCHORS_FILE);
    let key_path = dir.join(ANCHOR_KEY_FILE);
    let old_key = read_anchor_key(&key_path)?;
    let mut bundle = read(&anchors_path)?;
    parse_anchors(&anchors_path, bundle.clone())?;
    let (key, cert) = generate_anchor(clock(), &Crypto::system())?;
    if !bundle.ends_with(b"\n") && !bundle.is_empty() {
        bundle.push(b'\n');
    }
    bundle.extend_from_slice(cert.pem().as_bytes());
    // The bundle first: a crash before the key is written leaves the old key signing, and the
    // new anchor merely trusted.
    write(&anchors_path, &bundle, CERT_MODE)?;
    write(&dir.join(ANCHOR_KEY_PREVIOUS_FILE), &old_key, KEY_MODE)?;
    write(&key_path, key.serialize_pem().as_bytes(), KEY_MODE)?;
    let not_after = der::read_certificate(cert.der())
        .map_err(|reason| CaError::Generate {
            what: "the trust anchor",
            reason: reason.to_owned(),
        })?
        .not_after;
    Ok(not_after)
}

/// The last step of an anchor rotation in the bootstrapped directory `dir`: keeps in the
/// bundle only the anchor whose key is `anchor.key`, once the issuer chains to it (after
/// [`rotate_issuer`], and after every leaf signed by the old issuer has expired or been
/// renewed). Returns how many anchors were removed.
///
/// # Errors
///
/// [`CaError`] naming the file: no anchor key, an anchor key matching no certificate in the
/// bundle, or an issuer that does not chain to that anchor (rotate it first).
pub fn retire_anchors(dir: &Path, clock: &WallClock) -> Result<usize, CaError> {
    let anchors_path = dir.join(TRUST_ANCHORS_FILE);
    let key_path = dir.join(ANCHOR_KEY_FILE);
    let key = parse_key(&key_path, &read_anchor_key(&key_path)?)?;
    let spki = key.subject_public_key_info();
    let bundle = read(&anchors_path)?;
    let blocks = pem_blocks(&bundle);
    let total = blocks.len();
    let kept = blocks
        .into_iter()
        .find(|block| {
            CertificateDer::from_pem_slice(block)
                .ok()
                .and_then(|cert| der::read_certificate(&cert).ok().map(|f| f.spki == spki))
                .unwrap_or(false)
        })
        .ok_or_else(|| CaError::Invalid {
            path: key_path.clone(),
            reason: format!("matches no certificate in {}", anchors_path.display()),
        })?
        .to_vec();
    let mut kept = kept;
    kept.push(b'\n');
    let anchors = parse_anchors(&anchors_path, kept.clone())?;
    let (cert_path, issuer_key_path) = (dir.join(ISSUER_CERT_FILE), dir.join(ISSUER_KEY_FILE));
    parse_issuer(
        &cert_path,
        &read(&cert_path)?,
        &issuer_key_path,
        &read(&issuer_key_path)?,
        &anchors,
        clock(),
        &Crypto::system(),
    )
    .map_err(|err| CaError::Invalid {
        path: cert_path.clone(),
        reason: format!(
            "the issuer does not chain to the anchor being kept ({err}): run \
             `conduit identity rotate-issuer` first"
        ),
    })?;
    if total > 1 {
        write(&anchors_path, &kept, CERT_MODE)?;
    }
    Ok(total - 1)
}

/// The anchor key file's contents, or an error saying the anchors were not bootstrapped.
fn read_anchor_key(key_path: &Path) -> Result<Vec<u8>, CaError> {
    if !files::exists(key_path) {
        return Err(CaError::Invalid {
            path: key_path.to_owned(),
            reason: "missing: only a bootstrapped CA (one that made its own anchor) rotates \
                     its anchors here; rotate supplied anchors with the tools that made them"
                .into(),
        });
    }
    read(key_path)
}

/// The `BEGIN CERTIFICATE` blocks of a PEM bundle, each with its END line.
fn pem_blocks(pem: &[u8]) -> Vec<&[u8]> {
    const BEGIN: &[u8] = b"-----BEGIN CERTIFICATE-----";
    const END: &[u8] = b"-----END CERTIFICATE-----";
    let find = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).position(|w| w == needle);
    let mut blocks = Vec::new();
    let mut rest = pem;
    while let Some(start) = find(rest, BEGIN) {
        let Some(end) = find(&rest[start..], END) else {
            break;
        };
        let stop = start + end + END.len();
        blocks.push(&rest[start..stop]);
        rest = &rest[stop..];
    }
    blocks
}

// === Start-up ===

fn open_token_key(dir: &Path) -> Result<TokenKey, CaError> {
    match TokenKey::load(dir) {
        Ok(key) => return Ok(key),
        Err(TokenError::NoKey { path }) => {
            tracing::info!(path = %path.display(), "no bootstrap-token key: generating one");
            let bytes = random_bytes::<TOKEN_KEY_BYTES>(&Crypto::system())?;
            write(&path, TokenKey::file_contents(&bytes).as_bytes(), KEY_MODE)?;
        }
        Err(err) => return Err(token_file_error(err)),
    }
    TokenKey::load(dir).map_err(token_file_error)
}

fn token_file_error(err: TokenError) -> CaError {
    match err {
        TokenError::Read { path, source } => CaError::Read { path, source },
        TokenError::InvalidKey { path, reason } => CaError::Invalid {
            path,
            reason: reason.into(),
        },
        TokenError::NoKey { path } => CaError::Invalid {
            path,
            reason: "missing".into(),
        },
        other => CaError::Generate {
            what: "the token key",
            reason: other.to_string(),
        },
    }
}

/// Makes what a bootstrapped directory is missing: an anchor (and so a new issuer) when there
/// are no trust anchors, an issuer when there is no issuer certificate (a first start
/// interrupted between the two, or an issuer deleted to have a new one made).
fn bootstrap(dir: &Path, now: UnixTime) -> Result<(), CaError> {
    let anchors_path = dir.join(TRUST_ANCHORS_FILE);
    if !files::exists(&anchors_path) {
        tracing::info!(dir = %dir.display(), "no trust anchors: generating a trust anchor and an issuer");
        let (anchor_key, anchor_cert) = generate_anchor(now, &Crypto::system())?;
        // The key first: a crash before the bundle is written leaves no anchors, so the next
        // start generates both again.
        write(
            &dir.join(ANCHOR_KEY_FILE),
            anchor_key.serialize_pem().as_bytes(),
            KEY_MODE,
        )?;
        write(&anchors_path, anchor_cert.pem().as_bytes(), CERT_MODE)?;
        let (issuer_key, issuer_cert) =
            generate_issuer(anchor_cert.der(), &anchor_key, now, &Crypto::system())?;
        return write_issuer(dir, &issuer_key, &issuer_cert);
    }
    if !files::exists(&dir.join(ISSUER_CERT_FILE)) {
        tracing::info!(dir = %dir.display(), "no issuer certificate: signing a new issuer with the anchor key");
        write_new_issuer(dir, now)?;
    }
    Ok(())
}

fn write_new_issuer(dir: &Path, now: UnixTime) -> Result<UnixTime, CaError> {
    let anchors_path = dir.join(TRUST_ANCHORS_FILE);
    let anchors = parse_anchors(&anchors_path, read(&anchors_path)?)?;
    let key_path = dir.join(ANCHOR_KEY_FILE);
    if !files::exists(&key_path) {
        return Err(CaError::Invalid {
            path: key_path,
            reason: "missing: there is no anchor key to sign a new issuer with (supply the \
                     issuer's certificate and key, or remove the trust anchors to bootstrap \
                     a new CA)"
                .into(),
        });
    }
    let anchor_key = parse_key(&key_path, &read(&key_path)?)?;
    let spki = anchor_key.subject_public_key_info();
    let anchor_cert = anchors
        .certs
        .iter()
        .find(|cert| der::read_certificate(cert).is_ok_and(|fields| fields.spki == spki))
        .ok_or_else(|| CaError::Invalid {
            path: key_path.clone(),
            reason: format!("matches no certificate in {}", anchors_path.display()),
        })?;
    let (issuer_key, issuer_cert) =
        generate_issuer(anchor_cert, &anchor_key, now, &Crypto::system())?;
    write_issuer(dir, &issuer_key, &issuer_cert)?;
    Ok(UnixTime::from_secs(
        now.as_secs().saturating_add(CA_VALIDITY.as_secs()),
    ))
}

fn write_issuer(dir: &Path, key: &KeyPair, cert: &rcgen::Certificate) -> Result<(), CaError> {
    // The key first: the certificate's absence is what marks an unfinished issuer.
    write(
        &dir.join(ISSUER_KEY_FILE),
        key.serialize_pem().as_bytes(),
        KEY_MODE,
    )?;
    write(
        &dir.join(ISSUER_CERT_FILE),
        cert.pem().as_bytes(),
        CERT_MODE,
    )
}

fn read(path: &Path) -> Result<Vec<u8>, CaError> {
    files::read(path).map_err(|err| match err {
        ReadError::Io(source) => CaError::Read {
            path: path.to_owned(),
            source,
        },
        ReadError::TooLarge => CaError::Invalid {
            path: path.to_owned(),
            reason: format!(
                "larger than {} bytes: not a certificate or key",
                files::MAX_FILE_BYTES
            ),
        },
    })
}

fn write(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    files::write_atomically(path, contents, mode).map_err(|source| CaError::Write {
        path: path.to_owned(),
        source,
    })
}

// === Parsing and checking ===

fn parse_anchors(path: &Path, pem: Vec<u8>) -> Result<Anchors, CaError> {
    let invalid = |reason: String| CaError::Invalid {
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| invalid(format!("not a PEM bundle of certificates: {err}")))?;
    if certs.is_empty() {
        return Err(invalid(
            "holds no certificate (expected `-----BEGIN CERTIFICATE-----` blocks)".into(),
        ));
    }
    let count = certs.len();
    let mut roots = rustls::RootCertStore::empty();
    let mut not_after = UnixTime::from_secs(u64::MAX);
    for (i, cert) in certs.iter().enumerate() {
        let which = format!("certificate {} of {count}", i + 1);
        let fields =
            der::read_certificate(cert).map_err(|reason| invalid(format!("{which}: {reason}")))?;
        not_after = not_after.min(fields.not_after);
        roots
            .add(cert.clone())
            .map_err(|err| invalid(format!("{which} is not usable as a trust anchor: {err}")))?;
    }
    let verifier = WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .map_err(|err| invalid(format!("not usable as trust anchors: {err}")))?;
    Ok(Anchors {
        certs,
        pem,
        not_after,
        verifier,
        path: path.to_owned(),
    })
}

fn parse_key(path: &Path, pem: &[u8]) -> Result<KeyPair, CaError> {
    let invalid = |reason: String| CaError::Invalid {
        path: path.to_owned(),
        reason,
    };
    let text = core::str::from_utf8(pem).map_err(|_| invalid("not PEM text".into()))?;
    KeyPair::from_pem(text).map_err(|err| {
        invalid(format!(
            "not a PKCS#8 PEM private key (ECDSA P-256 or P-384, or Ed25519): {err}"
        ))
    })
}

/// Parses an issuer and checks it (see the module docs).
fn parse_issuer(
    cert_path: &Path,
    cert_pem: &[u8],
    key_path: &Path,
    key_pem: &[u8],
    anchors: &Anchors,
    now: UnixTime,
    crypto: &Crypto,
) -> Result<SigningIssuer, CaError> {
    let invalid_cert = |reason: String| CaError::Invalid {
        path: cert_path.to_owned(),
        reason,
    };
    let cert = CertificateDer::from_pem_slice(cert_pem)
        .map_err(|err| invalid_cert(format!("not a PEM certificate: {err}")))?;
    let fields = der::read_certificate(&cert)
        .map_err(|reason| invalid_cert(format!("not an X.509 certificate: {reason}")))?;
    let not_after = fields.not_after;
    let key = parse_key(key_path, key_pem)?;
    if key.subject_public_key_info() != fields.spki {
        return Err(CaError::Invalid {
            path: key_path.to_owned(),
            reason: format!(
                "this key does not match the certificate in {}",
                cert_path.display()
            ),
        });
    }
    let issuer = Issuer::from_ca_cert_der(&cert, key)
        .map_err(|err| invalid_cert(format!("cannot sign with this certificate: {err}")))?;
    let signing = SigningIssuer {
        cert,
        issuer,
        not_after,
    };
    signing.probe(anchors, now, crypto).map_err(|reason| {
        invalid_cert(format!(
            "leaves it signs do not verify against the trust anchors in {}: {reason}",
            anchors.path.display()
        ))
    })?;
    Ok(signing)
}

impl SigningIssuer {
    /// Signs a short probe leaf (over the issuer's own public key, so no key is generated)
    /// and verifies it against the anchors at `now`.
    fn probe(&self, anchors: &Anchors, now: UnixTime, crypto: &Crypto) -> Result<(), String> {
        let (params, _) = leaf_params(PROBE_IDENTITY, now, PROBE_LIFETIME, self.not_after, crypto)?;
        let leaf = params
            .signed_by(self.issuer.key(), &self.issuer)
            .map_err(|err| format!("cannot sign: {err}"))?;
        let name = ServerName::try_from(PROBE_IDENTITY).map_err(|err| err.to_string())?;
        anchors
            .verifier
            .verify_server_cert(
                leaf.der(),
                core::slice::from_ref(&self.cert),
                &name,
                &[],
                rustls::pki_types::UnixTime::since_unix_epoch(Duration::from_secs(now.as_secs())),
            )
            .map(|_| ())
            .map_err(|err| err.to_string())
    }
}

fn parse_csr(csr: &[u8]) -> Result<CertificateSigningRequestParams, CertifyError> {
    let invalid = |reason: String| CertifyError::InvalidCsr { reason };
    if csr.is_empty() {
        return Err(invalid("empty".into()));
    }
    if csr.len() > MAX_CSR_BYTES {
        return Err(invalid(format!("larger than {MAX_CSR_BYTES} bytes")));
    }
    // rcgen parses with x509-parser and verifies the request's signature with its own public
    // key (rcgen's `ring` feature turns on x509-parser's `verify`): proof that the caller
    // holds the private key.
    let request =
        CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr))
            .map_err(|err| {
                invalid(match err {
            rcgen::Error::CouldNotParseCertificationRequest => {
                "not a DER-encoded PKCS#10 certificate signing request".into()
            }
            rcgen::Error::InvalidCertificationRequestSignature => {
                "its signature does not verify with its own public key (no proof of possession)"
                    .into()
            }
            rcgen::Error::UnsupportedExtension => "it requests an extension other than \
                subjectAltName, keyUsage, extendedKeyUsage and basicConstraints"
                .into(),
            other => other.to_string(),
        })
            })?;
    let key = &request.public_key;
    let algorithm = rcgen::PublicKey::algorithm(key);
    let length = key.der_bytes().len();
    let supported = (*algorithm == rcgen::PKCS_ECDSA_P256_SHA256 && length == 65)
        || (*algorithm == rcgen::PKCS_ECDSA_P384_SHA384 && length == 97)
        || (*algorithm == rcgen::PKCS_ED25519 && length == 32);
    if !supported {
        return Err(invalid(
            "the key must be ECDSA P-256 signed with SHA-256, ECDSA P-384 with SHA-384, or \
             Ed25519"
                .into(),
        ));
    }
    Ok(request)
}

fn describe_san(name: &SanType) -> String {
    match name {
        SanType::DnsName(name) => format!("the DNS name `{}`", truncated(name.as_str())),
        SanType::Rfc822Name(name) => format!("the email address `{}`", truncated(name.as_str())),
        SanType::URI(uri) => format!("the URI `{}`", truncated(uri.as_str())),
        SanType::IpAddress(ip) => format!("the IP address {ip}"),
        _ => "a name of another kind".into(),
    }
}

// === Making certificates ===

/// A leaf's parameters, and the end of its validity.
fn leaf_params(
    identity: &str,
    now: UnixTime,
    lifetime: Duration,
    issuer_not_after: UnixTime,
    crypto: &Crypto,
) -> Result<(CertificateParams, UnixTime), String> {
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name(identity);
    params.subject_alt_names = vec![SanType::DnsName(
        identity.try_into().map_err(|err| format!("{err}"))?,
    )];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial(crypto).map_err(|err| err.to_string())?);
    let not_before =
        UnixTime::from_secs(now.as_secs().saturating_sub(CLOCK_SKEW_ALLOWANCE.as_secs()));
    let not_after =
        UnixTime::from_secs(now.as_secs().saturating_add(lifetime.as_secs())).min(issuer_not_after);
    params.not_before = date(not_before)?;
    params.not_after = date(not_after)?;
    Ok((params, not_after))
}

/// The parameters of a CA certificate: an anchor (`path_len` `None`) or an issuer (`Some(0)`).
fn ca_params(
    name: &str,
    path_len: Option<u8>,
    now: UnixTime,
    crypto: &Crypto,
) -> Result<CertificateParams, CaError> {
    let generate = |reason: String| CaError::Generate {
        what: "a CA certificate",
        reason,
    };
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name(name);
    params.is_ca = IsCa::Ca(match path_len {
        None => BasicConstraints::Unconstrained,
        Some(n) => BasicConstraints::Constrained(n),
    });
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.use_authority_key_identifier_extension = path_len.is_some();
    params.serial_number = Some(random_serial(crypto)?);
    params.not_before = date(UnixTime::from_secs(
        now.as_secs().saturating_sub(CLOCK_SKEW_ALLOWANCE.as_secs()),
    ))
    .map_err(generate)?;
    params.not_after = date(UnixTime::from_secs(
        now.as_secs().saturating_add(CA_VALIDITY.as_secs()),
    ))
    .map_err(generate)?;
    Ok(params)
}

fn generate_anchor(
    now: UnixTime,
    crypto: &Crypto,
) -> Result<(KeyPair, rcgen::Certificate), CaError> {
    let key = generate_key("the trust anchor's key", crypto)?;
    let cert = ca_params(ANCHOR_COMMON_NAME, None, now, crypto)?
        .self_signed(&key)
        .map_err(|err| CaError::Generate {
            what: "the trust anchor",
            reason: err.to_string(),
        })?;
    Ok((key, cert))
}

fn generate_issuer(
    anchor_cert: &CertificateDer<'_>,
    anchor_key: &KeyPair,
    now: UnixTime,
    crypto: &Crypto,
) -> Result<(KeyPair, rcgen::Certificate), CaError> {
    let generate = |err: rcgen::Error| CaError::Generate {
        what: "the issuer",
        reason: err.to_string(),
    };
    let anchor = Issuer::from_ca_cert_der(anchor_cert, anchor_key).map_err(generate)?;
    let key = generate_key("the issuer's key", crypto)?;
    let cert = ca_params(ISSUER_COMMON_NAME, Some(0), now, crypto)?
        .signed_by(&key, &anchor)
        .map_err(generate)?;
    Ok((key, cert))
}

fn generate_key(what: &'static str, crypto: &Crypto) -> Result<KeyPair, CaError> {
    crypto
        .new_key()
        .map_err(|reason| CaError::Generate { what, reason })
}

/// One certificate as a PEM block (RFC 7468: base64 in lines of 64 characters).
fn certificate_pem(der: &[u8]) -> String {
    use base64::Engine as _;
    let text = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::with_capacity(text.len() + text.len() / 64 + 64);
    pem.push_str("-----BEGIN CERTIFICATE-----\n");
    for line in text.as_bytes().chunks(64) {
        // Base64 is ASCII.
        pem.push_str(core::str::from_utf8(line).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

fn common_name(name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn
}

fn date(time: UnixTime) -> Result<time::OffsetDateTime, String> {
    i64::try_from(time.as_secs())
        .ok()
        .and_then(|secs| time::OffsetDateTime::from_unix_timestamp(secs).ok())
        .ok_or_else(|| format!("{}s after the Unix epoch is not a date", time.as_secs()))
}

/// A random positive 128-bit serial number (RFC 5280 allows up to 20 bytes; random serials
/// keep two certificates from ever sharing one).
fn random_serial(crypto: &Crypto) -> Result<SerialNumber, CaError> {
    let mut bytes = random_bytes::<16>(crypto)?;
    // Positive, and with no leading zero byte to be dropped by the DER encoding.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from(bytes.to_vec()))
}

fn random_bytes<const N: usize>(crypto: &Crypto) -> Result<[u8; N], CaError> {
    let mut bytes = [0u8; N];
    crypto
        .fill(&mut bytes)
        .map_err(|reason| CaError::Generate {
            what: "random bytes",
            reason,
        })?;
    Ok(bytes)
}
