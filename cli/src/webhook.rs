//! `conduit inject-webhook`: the mutating admission webhook, serving
//! [`crate::inject::admission_review`] over HTTPS to the Kubernetes API server.
//!
//! Every `POST` (the webhook configuration names the path) carries an `AdmissionReview`; the
//! answer is the review's response, with a JSON Patch for a pod that gets the proxy. `GET
//! /ready` answers `200 ready` for the deployment's readiness probe. A body that is not JSON,
//! or larger than [`MAX_REVIEW_BYTES`], gets a 400 with the reason; the API server then applies
//! the webhook's `failurePolicy`. The certificate and key are PEM files (the chart's Secret,
//! given as values or issued by the controller), checked at start and read again every
//! [`RELOAD_INTERVAL`]: the kubelet updates a mounted Secret in place when the controller renews
//! the certificate, and new connections get the new pair. A pair that fails to load is
//! logged and the last good one keeps serving.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls::server::ResolvesServerCert;
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;

use crate::inject::{Anchors, InjectOptions, admission_refusal, admission_review};

/// The largest `AdmissionReview` read (a pod with its whole spec is a few KB; the API server
/// caps request bodies at 3 MB).
pub const MAX_REVIEW_BYTES: usize = 4 * 1024 * 1024;

/// How often the certificate and key files are checked for a renewed pair.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(10);

/// The webhook's serving certificate, from its PEM files, reloaded when they change.
#[derive(Debug)]
pub struct WebhookTls {
    cert: PathBuf,
    key: PathBuf,
    /// The files' contents last read, and the pair made from the last good ones.
    state: RwLock<(Vec<u8>, Arc<CertifiedKey>)>,
}

impl WebhookTls {
    /// Reads the pair from `cert` (the chain, leaf first) and `key`.
    ///
    /// # Errors
    ///
    /// A file cannot be read, holds no certificate or key, or they do not match.
    pub fn load(cert: &Path, key: &Path) -> anyhow::Result<Arc<Self>> {
        let (contents, certified) = read_pair(cert, key)?;
        Ok(Arc::new(Self {
            cert: cert.to_owned(),
            key: key.to_owned(),
            state: RwLock::new((contents, certified)),
        }))
    }

    /// The server configuration, serving whatever pair is current at each handshake.
    ///
    /// # Errors
    ///
    /// The TLS library refuses its protocol versions (never with its defaults).
    pub fn server_config(self: &Arc<Self>) -> anyhow::Result<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS versions")?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(self) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }

    /// Reads the files again; takes the pair if they changed and load. `Ok(true)`: a new
    /// pair serves from now on.
    ///
    /// # Errors
    ///
    /// The changed files do not make a usable pair (the old one keeps serving).
    pub fn reload(&self) -> anyhow::Result<bool> {
        let contents = read_both(&self.cert, &self.key)?;
        if self.state.read().unwrap_or_else(PoisonError::into_inner).0 == contents {
            return Ok(false);
        }
        let certified = pair_from(&self.cert, &self.key, &contents)?;
        *self.state.write().unwrap_or_else(PoisonError::into_inner) = (contents, certified);
        Ok(true)
    }

    /// Reloads every `interval`, logging what changed and (once per failure) what failed.
    pub async fn keep_reloaded(self: Arc<Self>, interval: Duration) {
        let mut failing = None;
        loop {
            tokio::time::sleep(interval).await;
            let this = Arc::clone(&self);
            let reloaded =
                tokio::task::spawn_blocking(move || this.reload().map_err(|e| format!("{e:#}")))
                    .await
                    .unwrap_or_else(|err| Err(err.to_string()));
            match reloaded {
                Ok(true) => {
                    failing = None;
                    tracing::info!(cert = %self.cert.display(), "serving the renewed certificate");
                }
                Ok(false) => failing = None,
                Err(error) => {
                    if failing.as_ref() != Some(&error) {
                        tracing::warn!(cert = %self.cert.display(), %error, "cannot load the changed certificate; still serving the previous one");
                        failing = Some(error);
                    }
                }
            }
        }
    }
}

impl ResolvesServerCert for WebhookTls {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(
            &self.state.read().unwrap_or_else(PoisonError::into_inner).1,
        ))
    }
}

/// Both files' contents, concatenated with their lengths (what a change is judged on).
fn read_both(cert: &Path, key: &Path) -> anyhow::Result<Vec<u8>> {
    let cert_bytes = std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?;
    let key_bytes = std::fs::read(key).with_context(|| format!("reading {}", key.display()))?;
    let mut contents = Vec::with_capacity(cert_bytes.len() + key_bytes.len() + 8);
    contents.extend_from_slice(&(cert_bytes.len() as u64).to_be_bytes());
    contents.extend_from_slice(&cert_bytes);
    contents.extend_from_slice(&key_bytes);
    Ok(contents)
}

fn read_pair(cert: &Path, key: &Path) -> anyhow::Result<(Vec<u8>, Arc<CertifiedKey>)> {
    let contents = read_both(cert, key)?;
    let certified = pair_from(cert, key, &contents)?;
    Ok((contents, certified))
}

/// The pair from [`read_both`]'s contents, checked to match.
fn pair_from(cert: &Path, key: &Path, contents: &[u8]) -> anyhow::Result<Arc<CertifiedKey>> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let (length, rest) = contents.split_at(8);
    let length = usize::try_from(u64::from_be_bytes(length.try_into()?))?;
    let (cert_pem, key_pem) = rest.split_at(length);
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{} is not PEM certificates", cert.display()))?;
    if certs.is_empty() {
        bail!("{} holds no certificate", cert.display());
    }
    let key_der = PrivateKeyDer::from_pem_slice(key_pem)
        .with_context(|| format!("reading a private key from {}", key.display()))?;
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(key_der)
        .with_context(|| format!("{} is not a usable key", key.display()))?;
    let certified = CertifiedKey::new(certs, signing);
    certified
        .keys_match()
        .context("the certificate and key do not make a usable pair")?;
    Ok(Arc::new(certified))
}

/// The TLS configuration of the webhook from its certificate chain and key (PEM files), read
/// once (see [`WebhookTls`] for one that follows the files).
///
/// # Errors
///
/// A file cannot be read, holds no certificate or key, or they do not match.
pub fn tls_config(cert: &Path, key: &Path) -> anyhow::Result<rustls::ServerConfig> {
    WebhookTls::load(cert, key)?.server_config()
}

/// Serves the webhook on `listener` until the task is dropped. With `anchors`, every pod's
/// proxy gets an identity and the trust anchors as the file holds them when the pod is
/// admitted; a pod arriving while the file cannot be read is refused with the reason, never
/// admitted without identity.
pub async fn serve(
    listener: TcpListener,
    tls: rustls::ServerConfig,
    options: InjectOptions,
    anchors: Option<Anchors>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let options = Arc::new((options, anchors));
    loop {
        let (tcp, peer) = crate::accept::accept(&listener).await;
        let acceptor = acceptor.clone();
        let options = Arc::clone(&options);
        tokio::spawn(async move {
            let tls = match acceptor.accept(tcp).await {
                Ok(tls) => tls,
                Err(err) => {
                    tracing::debug!(%peer, error = %err, "webhook TLS handshake failed");
                    return;
                }
            };
            let service = hyper::service::service_fn(move |request| {
                let options = Arc::clone(&options);
                async move { Ok::<_, Infallible>(answer(request, &options).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
    }
}

/// Binds `addr` and serves the webhook there.
///
/// # Errors
///
/// The TLS files are unusable, or the address cannot be bound.
pub async fn run(
    addr: SocketAddr,
    cert: &Path,
    key: &Path,
    options: InjectOptions,
    anchors: Option<Anchors>,
) -> anyhow::Result<()> {
    let certificate = WebhookTls::load(cert, key)?;
    let tls = certificate.server_config()?;
    tokio::spawn(Arc::clone(&certificate).keep_reloaded(RELOAD_INTERVAL));
    if let Some(anchors) = &anchors {
        // Checked once at start, so a wrong path fails the deployment visibly.
        anchors.read()?;
    }
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    tracing::info!(%addr, "admission webhook listening");
    serve(listener, tls, options, anchors).await;
    Ok(())
}

async fn answer(
    request: Request<Incoming>,
    options: &(InjectOptions, Option<Anchors>),
) -> Response<Full<Bytes>> {
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/ready") => return text(StatusCode::OK, "ready\n".into()),
        (&Method::POST, _) => {}
        _ => return text(StatusCode::NOT_FOUND, "POST an AdmissionReview\n".into()),
    }
    let body = match Limited::new(request.into_body(), MAX_REVIEW_BYTES)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(err) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("reading the review: {err}\n"),
            );
        }
    };
    let review: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(review) => review,
        Err(err) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("the review is not JSON: {err}\n"),
            );
        }
    };
    let (options, anchors) = options;
    let with_identity;
    let answered = match anchors.as_ref().map(Anchors::read) {
        None => admission_review(&review, options),
        Some(Ok(identity)) => {
            with_identity = InjectOptions {
                identity: Some(identity),
                ..options.clone()
            };
            admission_review(&review, &with_identity)
        }
        Some(Err(err)) => {
            tracing::warn!(error = %format!("{err:#}"), "cannot read the trust anchors; refusing the pod");
            admission_refusal(
                &review,
                500,
                &format!("the webhook cannot read the mesh's trust anchors: {err:#}"),
            )
        }
    };
    match answered.and_then(|r| Ok(serde_json::to_vec(&r)?)) {
        Ok(json) => {
            let mut response = Response::new(Full::new(Bytes::from(json)));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            response
        }
        Err(err) => text(
            StatusCode::BAD_REQUEST,
            format!("not an AdmissionReview: {err:#}\n"),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}
