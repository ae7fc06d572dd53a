//! The public API for the CLI, and the services whose implementations come with later issues.
//!
//! - [`ApiService`]: `ListWorkloads` answers from discovery; `StatSummary` scrapes the admin
//!   servers of the endpoints' proxies twice, a window apart, and reports each workload's
//!   server-side success rate, request rate and latency percentiles over that window;
//!   `RouteSummary` does the same per route of one workload's profile, from the proxies'
//!   per-route families (`route_response_total`, `route_response_latency_ms`), and beside
//!   it the callers' view: every meshed proxy's outbound counts for the workload, effective
//!   (what callers got, after retries) and actual (every attempt,
//!   `route_actual_response_total`).
//! - [`TapService`] answers `UNIMPLEMENTED` with a message saying what is missing, so a client
//!   learns why instead of getting an empty "unknown service". (Identity lives in
//!   [`crate::identity`].)

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use conduit_core::mesh::Service;
use conduit_core::route::DEFAULT_ROUTE;
use conduit_proto::pb::{api, tap};
use conduit_proto::prom::Sample;
use tonic::{Request, Response, Status};

use crate::destination::UpdateStream;
use crate::discovery::Discovery;
use crate::stat::{
    ClientCounts, Counts, Figures, Group, MetricsSource, client_counts_by_route,
    counts_by_authority, counts_by_route, scrape_reduced, total,
};

/// The window `StatSummary` uses when the request names none.
pub const DEFAULT_STAT_WINDOW: Duration = Duration::from_secs(2);

/// The longest window `StatSummary` and `RouteSummary` accept: the request holds a stream
/// open for it.
pub const MAX_STAT_WINDOW: Duration = Duration::from_secs(60);

/// The shortest window accepted: shorter ones are raised to it (two scrapes closer together
/// than this measure mostly the scrapes).
pub const MIN_STAT_WINDOW: Duration = Duration::from_millis(100);

/// The most admin servers one summary scrapes at once.
pub const MAX_SCRAPES_PER_CALL: usize = 16;

/// The most scrapes in flight across every summary call: each may buffer up to
/// `stat::MAX_SCRAPE_BYTES`, so this bounds what summaries can make the controller hold (and
/// how hard they can hit the proxies), however many callers ask at once.
pub const MAX_SCRAPES: usize = 32;

/// The window a request asks for (`window_ms`, 0 for the default), within the bounds.
fn window_of(window_ms: u64) -> Duration {
    match window_ms {
        0 => DEFAULT_STAT_WINDOW,
        ms => Duration::from_millis(ms).clamp(MIN_STAT_WINDOW, MAX_STAT_WINDOW),
    }
}

/// The wire form of one row's figures.
struct Golden {
    success_count: u64,
    failure_count: u64,
    requests_per_second_milli: u64,
    latency_p50_us: Option<u64>,
    latency_p95_us: Option<u64>,
    latency_p99_us: Option<u64>,
    window_ms: u64,
}

impl Golden {
    fn new(delta: &Counts, window: Duration) -> Self {
        let figures = Figures::from_counts(delta, window);
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
        Self {
            success_count: delta.successes,
            failure_count: delta.responses.saturating_sub(delta.successes),
            requests_per_second_milli: rps_milli,
            latency_p50_us: micros(figures.p50_ms),
            latency_p95_us: micros(figures.p95_ms),
            latency_p99_us: micros(figures.p99_ms),
            window_ms: u64::try_from(window.as_millis()).unwrap_or(u64::MAX),
        }
    }
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The public API over any [`Discovery`] backend.
#[derive(Clone)]
pub struct ApiService {
    discovery: Arc<dyn Discovery>,
    metrics_source: Option<Arc<dyn MetricsSource>>,
    /// Scrapes in flight across calls (at most [`MAX_SCRAPES`]).
    scrapes: Arc<tokio::sync::Semaphore>,
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
            scrapes: Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPES)),
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
        let window = window_of(request.window_ms);
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
        let (before, after) = scrape_window(
            source.as_ref(),
            &admins,
            window,
            |samples| total(&counts_by_authority(samples, "inbound")),
            &self.scrapes,
        )
        .await;
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
                let golden = Golden::new(&delta, window);
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
                    success_count: golden.success_count,
                    failure_count: golden.failure_count,
                    requests_per_second_milli: golden.requests_per_second_milli,
                    latency_p50_us: golden.latency_p50_us,
                    latency_p95_us: golden.latency_p95_us,
                    latency_p99_us: golden.latency_p99_us,
                    // No mTLS yet: nothing is encrypted (the identity issue changes this).
                    tls_permille: 0,
                    scraped_endpoints: scraped,
                    window_ms: golden.window_ms,
                }
            })
            .collect();
        Ok(Response::new(api::StatSummaryResponse { rows }))
    }

    async fn route_summary(
        &self,
        request: Request<api::RouteSummaryRequest>,
    ) -> Result<Response<api::RouteSummaryResponse>, Status> {
        let request = request.into_inner();
        if request.workload.is_empty() {
            return Err(Status::invalid_argument(
                "workload: required (the service whose routes to summarise)",
            ));
        }
        let Some(service) = self
            .discovery
            .services()
            .into_iter()
            .find(|s| names_service(s, &request.workload))
        else {
            return Err(Status::not_found(format!(
                "no workload named `{}`",
                request.workload
            )));
        };
        let Some(source) = self.metrics_source.clone() else {
            return Err(Status::unavailable(
                "this controller has no way to read proxy metrics (no metrics source configured)",
            ));
        };
        let window = window_of(request.window_ms);
        let admins: Vec<SocketAddr> = service.endpoints.iter().filter_map(|e| e.admin).collect();
        // Every meshed proxy may call the workload: all are read for the callers' view (the
        // workload's own replicas among them).
        let mut callers: Vec<SocketAddr> = self
            .discovery
            .services()
            .iter()
            .flat_map(|s| s.endpoints.iter().filter_map(|e| e.admin))
            .collect();
        callers.sort_unstable();
        callers.dedup();
        let (before, after) = scrape_window(
            source.as_ref(),
            &callers,
            window,
            |samples| RouteScrape {
                inbound: counts_by_route(samples, "inbound"),
                outbound: client_counts_by_route(samples),
            },
            &self.scrapes,
        )
        .await;
        let authority = format!("{}:{}", service.name, service.port);
        // The rows: the profile's routes by name, then the default route. Series for names the
        // profile does not have (a route renamed or removed since the proxy counted it) are
        // not shown.
        let mut names: Vec<&str> = service.profile.routes().iter().map(|r| &*r.name).collect();
        names.sort_unstable();
        names.push(DEFAULT_ROUTE);
        let mut deltas: Vec<Counts> = vec![Counts::default(); names.len()];
        let mut clients: Vec<ClientCounts> = vec![ClientCounts::default(); names.len()];
        let mut scraped = 0u32;
        let empty = Counts::default();
        let no_client = ClientCounts::default();
        for admin in &admins {
            let (Some(b), Some(a)) = (before.get(admin), after.get(admin)) else {
                continue;
            };
            scraped += 1;
            for (name, delta) in names.iter().zip(&mut deltas) {
                // A route's series appears with its first request: absent before is zero.
                let now = a.inbound.get(*name).unwrap_or(&empty);
                let then = b.inbound.get(*name).unwrap_or(&empty);
                delta.add(&now.since(then));
            }
        }
        for admin in &callers {
            let (Some(b), Some(a)) = (before.get(admin), after.get(admin)) else {
                continue;
            };
            for (name, client) in names.iter().zip(&mut clients) {
                let group = Group {
                    authority: authority.clone(),
                    route: Some((*name).to_owned()),
                };
                let now = a.outbound.get(&group).unwrap_or(&no_client);
                let then = b.outbound.get(&group).unwrap_or(&no_client);
                client.add(&now.since(then));
            }
        }
        let rows = names
            .iter()
            .zip(deltas.iter().zip(&clients))
            .map(|(name, (delta, client))| {
                let golden = Golden::new(delta, window);
                let failures = |c: &Counts| c.responses.saturating_sub(c.successes);
                api::RouteRow {
                    effective_success_count: client.effective.successes,
                    effective_failure_count: failures(&client.effective),
                    actual_success_count: client.actual.successes,
                    actual_failure_count: failures(&client.actual),
                    route: (*name).to_owned(),
                    success_count: golden.success_count,
                    failure_count: golden.failure_count,
                    requests_per_second_milli: golden.requests_per_second_milli,
                    latency_p50_us: golden.latency_p50_us,
                    latency_p95_us: golden.latency_p95_us,
                    latency_p99_us: golden.latency_p99_us,
                    window_ms: golden.window_ms,
                }
            })
            .collect();
        Ok(Response::new(api::RouteSummaryResponse {
            rows,
            total_endpoints: count(service.endpoints.len()),
            scraped_endpoints: scraped,
            window_ms: u64::try_from(window.as_millis()).unwrap_or(u64::MAX),
        }))
    }
}

/// What `RouteSummary` keeps of one scrape: the proxy's inbound counts per route (its own
/// service's profile), and its outbound counts per authority and route (as a caller).
struct RouteScrape {
    inbound: BTreeMap<String, Counts>,
    outbound: BTreeMap<Group, ClientCounts>,
}

/// Whether `workload` names `service`: its name, or its name and port (`api.demo:80`).
fn names_service(service: &Service, workload: &str) -> bool {
    match workload.rsplit_once(':') {
        Some((name, port)) => name == service.name && port.parse() == Ok(service.port),
        None => workload == service.name,
    }
}

/// Scrapes every admin server, waits `window`, and scrapes them again; each scrape reduced by
/// `reduce`. Admin servers that fail a scrape are absent from that scrape's result.
async fn scrape_window<T>(
    source: &dyn MetricsSource,
    admins: &[SocketAddr],
    window: Duration,
    reduce: fn(&[Sample]) -> T,
    scrapes: &tokio::sync::Semaphore,
) -> (BTreeMap<SocketAddr, T>, BTreeMap<SocketAddr, T>) {
    let before = scrape_all(source, admins, reduce, scrapes).await;
    tokio::time::sleep(window).await;
    let after = scrape_all(source, admins, reduce, scrapes).await;
    (before, after)
}

/// Scrapes every admin server concurrently (each bounded by the source's timeout and size
/// limit); the ones that fail are absent from the result.
async fn scrape_all<T>(
    source: &dyn MetricsSource,
    admins: &[SocketAddr],
    reduce: fn(&[Sample]) -> T,
    scrapes: &tokio::sync::Semaphore,
) -> BTreeMap<SocketAddr, T> {
    use futures_util::StreamExt as _;
    futures_util::stream::iter(admins.iter().copied())
        .map(|admin| async move {
            // Closed only if the controller is going away: then nothing is scraped.
            let Ok(_permit) = scrapes.acquire().await else {
                return (admin, None);
            };
            (admin, scrape_reduced(source, admin, reduce).await)
        })
        .buffer_unordered(MAX_SCRAPES_PER_CALL)
        .filter_map(|(admin, counts)| async move { counts.map(|c| (admin, c)) })
        .collect()
        .await
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
