//! Conduit's control plane.
//!
//! The controller serves, over gRPC: Destination (endpoint and route-profile discovery; see
//! [`destination`] for the stream protocol), the public API for the CLI ([`api`]), Identity
//! (its certificate authority signs workloads' leaf certificates in exchange for a bootstrap
//! token and a CSR; see [`identity`]), and Tap, which answers `UNIMPLEMENTED` until its issue
//! lands. Discovery comes from a [`discovery::Discovery`] backend; today that is a watched
//! YAML mesh file ([`discovery::file`]). The admin port ([`admin`]) serves `/metrics`,
//! `/ready` and `/live`.
//!
//! # Environment as parameters
//!
//! The controller opens no sockets and reads no environment: callers pass streams of accepted
//! connections (tokio's in `main.rs` via [`net::tcp_incoming`], turmoil's in the simulation),
//! a [`config::ControllerConfig`], and a shutdown future. Time comes from `tokio::time`, which
//! turmoil and paused tests control. Wall-clock time for certificate validity comes from the
//! [`identity::WallClock`] the certificate authority is given ([`identity::system_wall_clock`]
//! in [`run_controller`]; the simulation passes its own through
//! [`Controller::with_identity`]). The one real-clock read left in the stack is hyper's
//! HTTP/2 `date` header on gRPC responses; [`Controller::with_fixed_date_header`] pins it for
//! the simulation (turmoil.md §4.1).
//!
//! ```no_run
//! # async fn example(config: conduit_controller::config::ControllerConfig) -> anyhow::Result<()> {
//! use conduit_controller::{net::tcp_incoming, run_controller};
//! let grpc = tokio::net::TcpListener::bind(config.grpc_addr).await?;
//! let admin = tokio::net::TcpListener::bind(config.admin_addr).await?;
//! let shutdown = async { let _ = tokio::signal::ctrl_c().await; };
//! run_controller(&config, tcp_incoming(grpc), tcp_incoming(admin), shutdown).await?;
//! # Ok(()) }
//! ```

use core::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::Stream;
use http::HeaderValue;
use tokio::io::{AsyncRead, AsyncWrite};
use tonic::transport::server::Connected;

pub mod admin;
pub mod api;
pub mod config;
pub mod crd;
pub mod date;
pub mod destination;
pub mod discovery;
pub mod identity;
pub mod lease;
pub mod metrics;
pub mod net;
pub mod stat;

use crate::admin::AdminState;
use crate::api::{ApiService, TapService};
use crate::config::{ControllerConfig, DiscoverySource};
use crate::destination::DestinationService;
use crate::discovery::Discovery;
use crate::discovery::file::{FileDiscovery, LoadError, load_mesh_file, watch_mesh_file};
use crate::discovery::kubernetes::KubeDiscovery;
use crate::identity::ca::{CaError, CertificateAuthority, watch_issuer_files};
use crate::identity::{IdentityService, system_wall_clock};
use crate::metrics::Metrics;

/// How long open connections get to finish after shutdown is asked for. Destination streams
/// never finish by themselves, so after this they are cut; proxies reconnect elsewhere.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// HTTP/2 keepalive pings on gRPC connections: a proxy that vanished without closing its
/// connection (a crashed host, a partition) is noticed and its streams dropped.
pub const GRPC_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);

/// How long a keepalive ping may go unanswered before the connection is closed.
pub const GRPC_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The most concurrent streams on one client connection. A proxy holds two per authority it
/// uses (endpoints and profile), and a sidecar uses tens to hundreds of authorities; a client
/// asking for more waits for its own streams to end, and cannot take the controller's capacity
/// from other proxies.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 4096;

/// Streams a client may open and reset before the server has accepted them, and streams the
/// server may reset for protocol errors, per connection, before the connection is closed
/// (the HTTP/2 "rapid reset" defences).
pub const MAX_RESET_STREAMS: usize = 100;

/// The controller's gRPC and admin servers over one discovery backend.
#[derive(Clone)]
pub struct Controller {
    discovery: Arc<dyn Discovery>,
    metrics: Arc<Metrics>,
    serving: Arc<AtomicBool>,
    date_header: Option<HeaderValue>,
    metrics_source: Option<Arc<dyn stat::MetricsSource>>,
    identity: Option<Arc<CertificateAuthority>>,
    service_accounts: Option<Arc<identity::serviceaccount::ServiceAccountTokens>>,
}

impl core::fmt::Debug for Controller {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Controller")
            .field("date_header", &self.date_header)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

/// Why the controller stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// The mesh file could not be loaded at start-up (the error names the field).
    #[error(transparent)]
    Load(#[from] LoadError),
    /// No Kubernetes client could be configured.
    #[error(transparent)]
    Kube(#[from] discovery::kubernetes::KubeError),
    /// The identity Secret could not be used.
    #[error("identity Secret: {0}")]
    IdentitySecret(#[from] identity::secret::SecretError),
    /// The certificate authority could not start (the error names the file).
    #[error("identity: {0}")]
    Identity(#[from] CaError),
    /// The controller could not certify itself for its TLS port.
    #[error(transparent)]
    Tls(#[from] identity::tls::ControllerTlsError),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
}

impl Controller {
    /// A controller answering from `discovery`, counting into `metrics`.
    #[must_use]
    pub fn new(discovery: Arc<dyn Discovery>, metrics: Arc<Metrics>) -> Self {
        Self {
            discovery,
            metrics,
            serving: Arc::new(AtomicBool::new(false)),
            date_header: None,
            metrics_source: None,
            identity: None,
            service_accounts: None,
        }
    }

    /// Lets workloads prove their identity with Kubernetes ServiceAccount tokens, reviewed by
    /// the API server (beside the controller's own tokens).
    #[must_use]
    pub fn with_service_accounts(
        mut self,
        tokens: identity::serviceaccount::ServiceAccountTokens,
    ) -> Self {
        self.service_accounts = Some(Arc::new(tokens));
        self
    }

    /// Serves `Identity.Certify` from `ca` (without one it answers `FAILED_PRECONDITION`),
    /// and exports the issuer's and trust anchors' expiry in the metrics. The CA carries its
    /// own wall clock: the simulation builds one on simulated time
    /// ([`CertificateAuthority::in_memory`]).
    #[must_use]
    pub fn with_identity(self, ca: Arc<CertificateAuthority>) -> Self {
        self.metrics
            .set_identity_issuer_expiry(ca.issuer_not_after().as_secs());
        self.metrics
            .set_identity_trust_anchor_expiry(ca.trust_anchors_not_after().as_secs());
        Self {
            identity: Some(ca),
            ..self
        }
    }

    /// Lets `StatSummary` read proxies' metrics through `source` (without one it answers
    /// `UNAVAILABLE`).
    #[must_use]
    pub fn with_metrics_source(mut self, source: Arc<dyn stat::MetricsSource>) -> Self {
        self.metrics_source = Some(source);
        self
    }

    /// Sets a fixed `date` header on every gRPC response, so hyper does not read the real
    /// clock for one. For the simulation only: a real server should send the real date.
    #[must_use]
    pub fn with_fixed_date_header(mut self, value: HeaderValue) -> Self {
        self.date_header = Some(value);
        self
    }

    /// The controller's metrics.
    #[must_use]
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Serves the gRPC API on every connection `incoming` yields until `shutdown` completes
    /// (then waits for open connections to close) or `incoming` ends.
    ///
    /// # Errors
    ///
    /// [`tonic::transport::Error`] when the server fails.
    pub async fn serve_grpc<I, IO, IE>(
        &self,
        incoming: I,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), tonic::transport::Error>
    where
        I: Stream<Item = Result<IO, IE>>,
        IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
        IE: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let router = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(GRPC_KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(GRPC_KEEPALIVE_TIMEOUT))
            .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
            .http2_max_pending_accept_reset_streams(Some(MAX_RESET_STREAMS))
            .http2_max_local_error_reset_streams(Some(MAX_RESET_STREAMS))
            .layer(date::DateHeaderLayer::new(self.date_header.clone()))
            .add_service(
                DestinationService::new(Arc::clone(&self.discovery), Arc::clone(&self.metrics))
                    .into_server(),
            )
            .add_service(
                ApiService::new(Arc::clone(&self.discovery))
                    .with_metrics_source(self.metrics_source.clone())
                    .into_server(),
            )
            .add_service(
                IdentityService::new(self.identity.clone(), Arc::clone(&self.metrics))
                    .with_service_accounts(self.service_accounts.clone())
                    .into_server(),
            )
            .add_service(TapService.into_server());
        self.serving.store(true, Ordering::Relaxed);
        let served = router
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await;
        self.serving.store(false, Ordering::Relaxed);
        served
    }

    /// Serves the admin endpoints on every connection `incoming` yields until `shutdown`
    /// completes or `incoming` ends. `/ready` answers 200 while [`Self::serve_grpc`] runs and
    /// discovery is ready.
    pub async fn serve_admin<I, IO, IE>(&self, incoming: I, shutdown: impl Future<Output = ()>)
    where
        I: Stream<Item = Result<IO, IE>>,
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        IE: core::fmt::Display,
    {
        let state = AdminState {
            metrics: Arc::clone(&self.metrics),
            discovery: Arc::clone(&self.discovery),
            serving: Arc::clone(&self.serving),
        };
        admin::serve_admin(incoming, state, shutdown).await;
    }
}

/// Runs a controller whose discovery is `config.discovery`: a mesh file (loaded, failing with
/// an error that names the field if it is invalid, then watched for edits) or the Kubernetes
/// API ([`discovery::kubernetes`]); opens the
/// certificate authority in `config.identity` (bootstrapping its directory on first start; see
/// [`identity`]) and watches its issuer, and serves gRPC and admin on the given connection
/// streams until `shutdown` completes.
///
/// After `shutdown`, open connections get [`SHUTDOWN_GRACE`] to close before they are cut.
///
/// # Errors
///
/// [`RunError::Load`] when the mesh file cannot be read or is invalid at start-up;
/// [`RunError::Identity`] when the certificate authority cannot start (a garbled or
/// mismatched file, an unwritable directory); [`RunError::Grpc`] when the gRPC server fails.
pub async fn run_controller<G, GIO, GE, A, AIO, AE>(
    config: &ControllerConfig,
    grpc_incoming: G,
    admin_incoming: A,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError>
where
    G: Stream<Item = Result<GIO, GE>>,
    GIO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    GE: Into<Box<dyn std::error::Error + Send + Sync>>,
    A: Stream<Item = Result<AIO, AE>>,
    AIO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    AE: core::fmt::Display,
{
    let mut singleton_client = None;
    let mut service_accounts = None;
    let (discovery, metrics, _watcher): (Arc<dyn Discovery>, _, _) = match &config.discovery {
        DiscoverySource::File {
            path,
            poll_interval,
        } => {
            let (mesh, tracker) = load_mesh_file(path).await?;
            let metrics = Arc::new(Metrics::new(mesh.services().len()));
            tracing::info!(
                path = %path.display(),
                services = mesh.services().len(),
                "mesh file loaded"
            );
            let discovery = FileDiscovery::new(mesh);
            let watcher = tokio::spawn(watch_mesh_file(
                tracker,
                *poll_interval,
                discovery.clone(),
                Arc::clone(&metrics),
            ));
            (Arc::new(discovery), metrics, AbortOnDrop(watcher))
        }
        DiscoverySource::Kubernetes {
            cluster_domain,
            kubeconfig,
            singleton,
        } => {
            let client = discovery::kubernetes::client(kubeconfig.as_deref()).await?;
            service_accounts = Some(identity::serviceaccount::ServiceAccountTokens::new(
                client.clone(),
                cluster_domain,
            ));
            if let Some(singleton) = singleton {
                singleton_client = Some((client.clone(), singleton.clone()));
            }
            let metrics = Arc::new(Metrics::new(0));
            let discovery = KubeDiscovery::new(cluster_domain);
            let watcher = tokio::spawn(discovery::kubernetes::run(
                client,
                discovery.clone(),
                Arc::clone(&metrics),
            ));
            (Arc::new(discovery), metrics, AbortOnDrop(watcher))
        }
    };
    // The watcher stops however this function returns (`_watcher` is dropped).

    // Replicated controllers: the Lease, and the CA's files from the Secret it guards
    // (bootstrapped by the Lease's holder when there is none yet).
    let mut webhook_keeper = None;
    let (lease_stop, lease_task) = match singleton_client {
        None => (None, None),
        Some((client, singleton)) => {
            let (leading_tx, leading) = tokio::sync::watch::channel(false);
            let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
            let task = tokio::spawn(lease::run(
                kube::Api::namespaced(client.clone(), &singleton.namespace),
                singleton.lease.clone(),
                lease::Elector::new(singleton.me.clone(), singleton.lease_duration),
                system_wall_clock(),
                leading_tx,
                async move {
                    let _ = stop_rx.wait_for(|stop| *stop).await;
                },
            ));
            if let Some(identity_secret) = &singleton.identity_secret {
                let secrets = kube::Api::namespaced(client.clone(), &singleton.namespace);
                identity::secret::materialize(
                    &secrets,
                    identity_secret,
                    &config.identity,
                    &system_wall_clock(),
                    leading.clone(),
                )
                .await?;
                // The anchors, public, for the injecting webhook (which may not read the
                // Secret).
                let anchors = config.identity.dir.join(identity::TRUST_ANCHORS_FILE);
                if let Ok(pem) = std::fs::read_to_string(&anchors) {
                    identity::secret::publish_anchors(
                        &kube::Api::namespaced(client.clone(), &singleton.namespace),
                        identity::secret::TRUST_ANCHORS_CONFIG_MAP,
                        &pem,
                    )
                    .await;
                }
            }
            if let (Some(webhook), DiscoverySource::Kubernetes { cluster_domain, .. }) =
                (&singleton.webhook, &config.discovery)
            {
                webhook_keeper = Some((
                    client,
                    singleton.namespace.clone(),
                    cluster_domain.clone(),
                    webhook.clone(),
                    leading,
                ));
            }
            (Some(stop_tx), Some(ReleaseOnDrop(Some(task))))
        }
    };

    // Blocking, once, at start-up: a few small files, and on first start two key pairs.
    let ca = Arc::new(CertificateAuthority::open(
        &config.identity,
        system_wall_clock(),
    )?);
    let issuer_watcher = tokio::spawn(watch_issuer_files(
        Arc::clone(&ca),
        config.identity.issuer_poll_interval,
        Arc::clone(&metrics),
    ));
    let _issuer_watcher = AbortOnDrop(issuer_watcher);
    // The webhook's serving certificate and caBundle, kept by the Lease's holder.
    let _webhook_keeper = webhook_keeper.map(|(client, namespace, domain, spec, leading)| {
        AbortOnDrop(tokio::spawn(identity::webhook::keep_issued(
            kube::Api::namespaced(client.clone(), &namespace),
            kube::Api::all(client),
            Arc::clone(&ca),
            spec,
            namespace,
            domain,
            leading,
        )))
    });

    // The controller's own certificate, for proxies that reach it over mTLS; plaintext
    // clients (the CLI, proxies without an identity) are served as before.
    let tls = Arc::new(identity::tls::ControllerTls::new(Arc::clone(&ca))?);
    let renewer = tokio::spawn(
        Arc::clone(&tls).keep_renewed(ca.leaf_lifetime().mul_f64(0.7).max(Duration::from_secs(10))),
    );
    let _renewer = AbortOnDrop(renewer);
    let grpc_incoming = tls.incoming(grpc_incoming);
    let mut controller = Controller::new(discovery, metrics)
        .with_metrics_source(Arc::new(stat::HttpMetricsSource))
        .with_identity(ca);
    if let Some(tokens) = service_accounts {
        controller = controller.with_service_accounts(tokens);
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        // An error means the sender is gone, which also means stop.
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let servers = async {
        let grpc = controller.serve_grpc(grpc_incoming, stopped(stop_rx.clone()));
        let admin = async {
            controller
                .serve_admin(admin_incoming, stopped(stop_rx.clone()))
                .await;
            Ok(())
        };
        tokio::try_join!(grpc, admin).map(|_| ())
    };
    let mut servers = core::pin::pin!(servers);
    tokio::select! {
        served = &mut servers => return served.map_err(RunError::from),
        () = shutdown => {}
    }
    tracing::info!(grace = ?SHUTDOWN_GRACE, "shutting down");
    let _ = stop_tx.send(true);
    let served = match tokio::time::timeout(SHUTDOWN_GRACE, servers).await {
        Ok(served) => served.map_err(RunError::from),
        Err(_) => {
            tracing::info!("connections still open after the grace period were closed");
            Ok(())
        }
    };
    // A leader releases the Lease, so a successor takes it at once.
    if let (Some(stop), Some(mut lease)) = (lease_stop, lease_task) {
        let _ = stop.send(true);
        if let Some(task) = lease.0.take() {
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, task).await;
        }
    }
    served
}

/// The Lease's task, aborted if the controller stops without releasing it.
#[derive(Debug)]
struct ReleaseOnDrop(Option<tokio::task::JoinHandle<()>>);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        if let Some(task) = &self.0 {
            task.abort();
        }
    }
}

#[derive(Debug)]
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
