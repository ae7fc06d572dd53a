//! The public API for the CLI, and the services whose implementations come with later issues.
//!
//! - [`ApiService`]: `ListWorkloads` answers from discovery; `StatSummary` scrapes the admin
//!   servers of the endpoints' proxies twice, a window apart, and reports each workload's
//!   server-side success rate, request rate and latency percentiles over that window.
//! - [`IdentityService`] and [`TapService`] answer `UNIMPLEMENTED` with a message saying what
//!   is missing, so a client learns why instead of getting an empty "unknown service".

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use conduit_proto::pb::{api, identity, tap};
use tonic::{Request, Response, Status};

use crate::destination::UpdateStream;
use crate::discovery::Discovery;
use crate::stat::{Counts, Figures, MetricsSource, scrape_inbound};

/// The window `StatSummary` uses when the request names none.
pub const DEFAULT_STAT_WINDOW: Duration = Duration::from_secs(2);

/// The longest window `StatSummary` accepts: the request holds a stream open for it.
pub const MAX_STAT_WINDOW: Duration = Duration::from_secs(60);

/// The public API over any [`Discovery`] backend.
#[derive(Clone)]
pub struct ApiService {
    discovery: Arc<dyn Discovery>,
    metrics_source: Option<Arc<dyn MetricsSource>>,
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
        Self {
            discovery,
            metrics_source: None,
        }
    }

    /// Answers `StatSummary` by scraping proxies through `source`.
    #[must_use]
    pub fn with_metrics_source(mut self, source: Option<Arc<dyn MetricsSource>>) -> Self {
        self.metrics_source = source;
        self
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
        request: Request<api::StatSummaryRequest>,
    ) -> Result<Response<api::StatSummaryResponse>, Status> {
        let Some(source) = self.metrics_source.clone() else {
            return Err(Status::unavailable(
                "this controller has no way to read proxy metrics (no metrics source configured)",
            ));
        };
        let request = request.into_inner();
        let window = match request.window_ms {
            0 => DEFAULT_STAT_WINDOW,
            ms => Duration::from_millis(ms).clamp(Duration::from_millis(100), MAX_STAT_WINDOW),
        };
        let services: Vec<_> = self
            .discovery
            .services()
            .into_iter()
            .filter(|s| request.workload.is_empty() || s.name == request.workload)
            .collect();
        if services.is_empty() && !request.workload.is_empty() {
            return Err(Status::not_found(format!(
                "no workload named `{}`",
                request.workload
            )));
        }
        let admins: Vec<SocketAddr> = services
            .iter()
            .flat_map(|s| s.endpoints.iter().filter_map(|e| e.admin))
            .collect();
        let before = scrape_all(source.as_ref(), &admins).await;
        tokio::time::sleep(window).await;
        let after = scrape_all(source.as_ref(), &admins).await;
        let rows = services
            .iter()
            .map(|service| {
                let mut delta = Counts::default();
                let mut scraped = 0u32;
                for admin in service.endpoints.iter().filter_map(|e| e.admin) {
                    if let (Some(b), Some(a)) = (before.get(&admin), after.get(&admin)) {
                        delta.add(&a.since(b));
                        scraped += 1;
                    }
                }
                let figures = Figures::from_counts(&delta, window);
                let micros = |ms: Option<f64>| {
                    // Float-to-int conversion saturates; latencies are finite and positive.
                    #[expect(
                        clippy::cast_possible_truncation,
                        clippy::cast_sign_loss,
                        reason = "saturating"
                    )]
                    ms.map(|ms| (ms * 1000.0).round() as u64)
                };
                #[expect(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    reason = "saturating"
                )]
                let rps_milli = (figures.rps * 1000.0).round() as u64;
                let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
                api::StatRow {
                    workload: service.name.clone(),
                    meshed_endpoints: count(
                        service
                            .endpoints
                            .iter()
                            .filter(|e| e.identity.is_some())
                            .count(),
                    ),
                    total_endpoints: count(service.endpoints.len()),
                    success_count: delta.successes,
                    failure_count: delta.responses.saturating_sub(delta.successes),
                    requests_per_second_milli: rps_milli,
                    latency_p50_us: micros(figures.p50_ms),
                    latency_p95_us: micros(figures.p95_ms),
                    latency_p99_us: micros(figures.p99_ms),
                    // No mTLS yet: nothing is encrypted (the identity issue changes this).
                    tls_permille: 0,
                    scraped_endpoints: scraped,
                    window_ms: u64::try_from(window.as_millis()).unwrap_or(u64::MAX),
                }
            })
            .collect();
        Ok(Response::new(api::StatSummaryResponse { rows }))
    }
}

/// Scrapes every admin server concurrently; the ones that fail are absent from the result.
async fn scrape_all(
    source: &dyn MetricsSource,
    admins: &[SocketAddr],
) -> BTreeMap<SocketAddr, Counts> {
    let scrapes = admins
        .iter()
        .map(|&admin| async move { (admin, scrape_inbound(source, admin).await) });
    futures_util::future::join_all(scrapes)
        .await
        .into_iter()
        .filter_map(|(admin, counts)| counts.map(|c| (admin, c)))
        .collect()
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
