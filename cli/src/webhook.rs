//! `conduit inject-webhook`: the mutating admission webhook, serving
//! [`crate::inject::admission_review`] over HTTPS to the Kubernetes API server.
//!
//! Every `POST` (the webhook configuration names the path) carries an `AdmissionReview`; the
//! answer is the review's response, with a JSON Patch for a pod that gets the proxy. `GET
//! /ready` answers `200 ready` for the deployment's readiness probe. A body that is not JSON,
//! or larger than [`MAX_REVIEW_BYTES`], gets a 400 with the reason; the API server then applies
//! the webhook's `failurePolicy`. The certificate and key are PEM files (the chart's secret);
//! they are read once at start.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::inject::{Anchors, InjectOptions, admission_refusal, admission_review};

/// The largest `AdmissionReview` read (a pod with its whole spec is a few KB; the API server
/// caps request bodies at 3 MB).
pub const MAX_REVIEW_BYTES: usize = 4 * 1024 * 1024;

/// The TLS configuration of the webhook from its certificate chain and key (PEM files).
///
/// # Errors
///
/// A file cannot be read, holds no certificate or key, or they do not match.
pub fn tls_config(cert: &Path, key: &Path) -> anyhow::Result<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{} is not PEM certificates", cert.display()))?;
    if certs.is_empty() {
        bail!("{} holds no certificate", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("reading a private key from {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the certificate and key do not make a usable pair")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
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
        let Ok((tcp, peer)) = listener.accept().await else {
            continue;
        };
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
    let tls = tls_config(cert, key)?;
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
