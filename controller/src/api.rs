//! The public API for the CLI, and the services whose implementations come with later issues.
//!
//! - [`ApiService`]: `ListWorkloads` answers from discovery; `StatSummary` needs the proxies'
//!   metrics, which the controller does not collect yet, so it answers `UNIMPLEMENTED`.
//! - [`IdentityService`] and [`TapService`] answer `UNIMPLEMENTED` with a message saying what
//!   is missing, so a client learns why instead of getting an empty "unknown service".

use std::sync::Arc;

use conduit_proto::pb::{api, identity, tap};
use tonic::{Request, Response, Status};

use crate::destination::UpdateStream;
use crate::discovery::Discovery;

/// The public API over any [`Discovery`] backend.
#[derive(Clone)]
pub struct ApiService {
    discovery: Arc<dyn Discovery>,
}

impl core::fmt::Debug for ApiService {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ApiService").finish_non_exhaustive()
    }
}

impl ApiService {
    /// The API answering from `discovery`.
    #[must_use]
    pub fn new(discovery: Arc<dyn Discovery>) -> Self {
        Self { discovery }
    }

    /// Wraps the service for a tonic router.
    #[must_use]
    pub fn into_server(self) -> api::api_server::ApiServer<Self> {
        api::api_server::ApiServer::new(self)
    }
}

#[tonic::async_trait]
impl api::api_server::Api for ApiService {
    async fn list_workloads(
        &self,
        _request: Request<api::ListWorkloadsRequest>,
    ) -> Result<Response<api::ListWorkloadsResponse>, Status> {
        let workloads = self
            .discovery
            .services()
            .iter()
            .map(|service| api::Workload::from(&**service))
            .collect();
        Ok(Response::new(api::ListWorkloadsResponse { workloads }))
    }

    async fn stat_summary(
        &self,
        _request: Request<api::StatSummaryRequest>,
    ) -> Result<Response<api::StatSummaryResponse>, Status> {
        Err(Status::unimplemented(
            "StatSummary is not implemented yet: the controller does not collect proxy metrics \
             (it arrives with the `conduit stat` issue)",
        ))
    }
}

/// `conduit.identity.v1.Identity`, not implemented yet.
#[derive(Clone, Copy, Debug, Default)]
pub struct IdentityService;

impl IdentityService {
    /// Wraps the service for a tonic router.
    #[must_use]
    pub fn into_server(self) -> identity::identity_server::IdentityServer<Self> {
        identity::identity_server::IdentityServer::new(self)
    }
}

#[tonic::async_trait]
impl identity::identity_server::Identity for IdentityService {
    async fn certify(
        &self,
        _request: Request<identity::CertifyRequest>,
    ) -> Result<Response<identity::CertifyResponse>, Status> {
        Err(Status::unimplemented(
            "Identity.Certify is not implemented yet: this controller has no certificate \
             authority (it arrives with the identity issue)",
        ))
    }
}

/// `conduit.tap.v1.Tap`, not implemented yet.
#[derive(Clone, Copy, Debug, Default)]
pub struct TapService;

impl TapService {
    /// Wraps the service for a tonic router.
    #[must_use]
    pub fn into_server(self) -> tap::tap_server::TapServer<Self> {
        tap::tap_server::TapServer::new(self)
    }
}

#[tonic::async_trait]
impl tap::tap_server::Tap for TapService {
    type ObserveStream = UpdateStream<tap::TapEvent>;

    async fn observe(
        &self,
        _request: Request<tap::ObserveRequest>,
    ) -> Result<Response<Self::ObserveStream>, Status> {
        Err(Status::unimplemented(
            "Tap.Observe is not implemented yet: the controller does not fan taps out to proxies \
             (it arrives with the tap issue)",
        ))
    }
}
