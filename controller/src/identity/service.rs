//! `conduit.identity.v1.Identity`: the gRPC face of the [`CertificateAuthority`].
//!
//! | outcome | status | `result` label |
//! |---|---|---|
//! | a leaf | `OK` | `ok` |
//! | bad or missing token, a ServiceAccount token the API server rejects | `UNAUTHENTICATED` | `unauthenticated` |
//! | the API server cannot review a ServiceAccount token | `UNAVAILABLE` | `error` |
//! | the token's identity is not the one asked for (request or CSR) | `PERMISSION_DENIED` | `denied` |
//! | garbled CSR, bad CSR signature, unsupported key | `INVALID_ARGUMENT` | `invalid` |
//! | no CA configured | `FAILED_PRECONDITION` | `error` |
//! | signing failed | `INTERNAL` | `error` |

use std::sync::Arc;

use conduit_proto::pb::identity;
use tonic::{Request, Response, Status};

use super::ca::{CertificateAuthority, CertifyError};
use super::serviceaccount::{ReviewError, ServiceAccountTokens};
use super::token::TOKEN_PREFIX;
use crate::metrics::{CertifyOutcome, Metrics};

/// The Identity service over an optional CA (without one, every call is
/// `FAILED_PRECONDITION`).
///
/// A request's token is the controller's own (`ct1:…`), or, when the service has
/// [`ServiceAccountTokens`] (a controller in Kubernetes), any other token is taken for a
/// ServiceAccount's and reviewed by the API server.
#[derive(Clone, Debug)]
pub struct IdentityService {
    ca: Option<Arc<CertificateAuthority>>,
    metrics: Arc<Metrics>,
    service_accounts: Option<Arc<ServiceAccountTokens>>,
}

impl IdentityService {
    /// The service signing with `ca`, counting into `metrics`.
    #[must_use]
    pub fn new(ca: Option<Arc<CertificateAuthority>>, metrics: Arc<Metrics>) -> Self {
        Self {
            ca,
            metrics,
            service_accounts: None,
        }
    }

    /// Also accepts ServiceAccount tokens, reviewed with `tokens`.
    #[must_use]
    pub fn with_service_accounts(mut self, tokens: Option<Arc<ServiceAccountTokens>>) -> Self {
        self.service_accounts = tokens;
        self
    }

    /// The tonic server for this service.
    #[must_use]
    pub fn into_server(self) -> identity::identity_server::IdentityServer<Self> {
        identity::identity_server::IdentityServer::new(self)
    }

    async fn answer(
        &self,
        request: &identity::CertifyRequest,
    ) -> Result<identity::CertifyResponse, (CertifyOutcome, Status)> {
        let Some(ca) = &self.ca else {
            return Err((
                CertifyOutcome::Error,
                Status::failed_precondition("identity is not configured on this controller"),
            ));
        };
        let csr = &request.certificate_signing_request;
        let certified = match &self.service_accounts {
            Some(tokens) if !request.token.starts_with(TOKEN_PREFIX.as_bytes()) => {
                let token = core::str::from_utf8(&request.token).map_err(|_| {
                    (
                        CertifyOutcome::Unauthenticated,
                        Status::unauthenticated("the token is not UTF-8"),
                    )
                })?;
                let proven = tokens.verify(token.trim()).await.map_err(|err| {
                    let outcome = match err {
                        ReviewError::Unavailable { .. } => CertifyOutcome::Error,
                        _ => CertifyOutcome::Unauthenticated,
                    };
                    let status = match err {
                        ReviewError::Unavailable { .. } => Status::unavailable(err.to_string()),
                        _ => Status::unauthenticated(err.to_string()),
                    };
                    (outcome, status)
                })?;
                ca.certify_proven(&request.identity, proven, csr)
            }
            _ => ca.certify(&request.identity, &request.token, csr),
        }
        .map_err(|err| (err.outcome(), status(&err)))?;
        Ok(identity::CertifyResponse {
            leaf_certificate: certified.leaf.to_vec(),
            intermediate_certificates: certified
                .intermediates
                .iter()
                .map(|cert| cert.to_vec())
                .collect(),
            valid_until_unix_ms: certified.valid_until.as_secs().saturating_mul(1000),
        })
    }
}

fn status(err: &CertifyError) -> Status {
    let message = err.to_string();
    match err {
        CertifyError::Unauthenticated(_) => Status::unauthenticated(message),
        CertifyError::IdentityMismatch { .. } | CertifyError::CsrNamesOther { .. } => {
            Status::permission_denied(message)
        }
        CertifyError::InvalidCsr { .. } => Status::invalid_argument(message),
        CertifyError::Sign { .. } => Status::internal(message),
    }
}

#[tonic::async_trait]
impl identity::identity_server::Identity for IdentityService {
    async fn certify(
        &self,
        request: Request<identity::CertifyRequest>,
    ) -> Result<Response<identity::CertifyResponse>, Status> {
        let request = request.into_inner();
        match self.answer(&request).await {
            Ok(response) => {
                self.metrics.record_certify(CertifyOutcome::Ok);
                tracing::debug!(identity = %request.identity, valid_until_unix_ms = response.valid_until_unix_ms, "certified");
                Ok(Response::new(response))
            }
            Err((outcome, status)) => {
                self.metrics.record_certify(outcome);
                tracing::debug!(
                    result = outcome.label(),
                    message = status.message(),
                    "certify refused"
                );
                Err(status)
            }
        }
    }
}
