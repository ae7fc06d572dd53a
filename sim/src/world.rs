//! The topology builder and the running world: a turmoil simulation whose hosts run the real
//! proxy and controller libraries.
//!
//! Hosts, in registration order (which fixes their IPs and the poll order):
//! - `controller` (when discovery goes through the controller): the real
//!   `conduit_controller::Controller` serving gRPC on port 8086 over turmoil, its file backend
//!   fed by the harness through `FileDiscovery::replace` (the seam the controller exposes for
//!   the simulation, in place of a file on disk); every proxy then discovers through the real
//!   Destination client (`conduit_proxy::ControllerDiscover`) over turmoil, built inside its
//!   host's runtime;
//! - per service, `<name>-<i>` replicas: the [`app`] on port 8080 behind its own
//!   proxy (`conduit_proxy::run`, inbound 4143 forwarding to `127.0.0.1:8080`);
//! - `client-<i>` hosts: a proxy (outbound on `127.0.0.1:4140`) and the workload client, which
//!   sends its share of the schedule through it and scrapes the proxy's `/metrics` at the end.
//!
//! Every proxy's seed is drawn from the run's seed by host name and incarnation, turmoil's
//! world RNG is seeded from it too, and the epoch is pinned ([`EPOCH_SECS`]).
//!
//! A meshed world ([`WorldSpec::mtls`], [`WorldSpec::meshed`]) adds workload identity: the
//! controller runs the real certificate authority (`CertificateAuthority::in_memory`, on
//! simulated wall time, [`sim_wall`]) behind its Identity gRPC service; every proxy (each
//! replica's and each client's, unless the spec leaves a client out) gets an identity
//! ([`identity_name`]), a bootstrap token from that CA and its trust anchors, and certifies
//! itself through the real Identity client over turmoil; every endpoint the world publishes
//! carries its service's identity, so proxies speak mTLS to each other. With
//! [`MtlsSpec::watch_certificates`] the harness reads every proxy's certificate every 10 ms
//! and records each new one (when it was seen, when it expires) in [`Trace::certificates`], to
//! see renewals and expiry. Key generation and handshakes draw OS randomness (ring), so
//! certificate and handshake bytes differ from run to run; nothing the trace records depends
//! on them.
//!
//! Every proxy reports what it applies and picks to a [`SimObserver`], which records it in the
//! trace. Every endpoint the world publishes carries [`CONFIG_LABEL`]: the configuration
//! version at which its service's endpoints last changed, so a state a proxy applied names the
//! configuration it came from.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use conduit_controller::identity::CertificateAuthority;
use conduit_core::breaker::RawBreaker;
use conduit_core::mesh::{Mesh, RawEndpoint, RawMesh, RawServerPolicy, RawService};
use conduit_core::rand::{DetRng, Rng};
use conduit_core::route::RawProfile;
use conduit_core::time::UnixTime;
use conduit_proxy::config::{DiscoveryConfig, ProxyConfig};
use conduit_proxy::discover::controller::ControllerDiscoverConfig;
use conduit_proxy::identity::LocalIdentity;
use conduit_proxy::net::PeerAddr;
use conduit_proxy::observe::Observer;
use conduit_proxy::{ControllerDiscover, Discover, Proxy, ProxyStartError, StaticDiscover};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use turmoil::Sim;

use crate::app::{self, APP_PORT, AppControl, AppIdentity};
use crate::net::{SimNet, SimStream};
use crate::observe::SimObserver;
use crate::trace::{
    CERTIFICATE_WATCH_INTERVAL, CONFIG_LABEL, CertificateRecord, ConfigVersion, InboundCounters,
    ProxyCounters, Recorder, Trace, micros, now_us,
};
use crate::workload::{self, Workload};

/// The proxy's outbound port on a client host.
pub const OUTBOUND_PORT: u16 = 4140;
/// The proxy's inbound port on an app host (what the mesh lists as endpoints).
pub const INBOUND_PORT: u16 = 4143;
/// The proxy's admin port.
pub const ADMIN_PORT: u16 = 4191;
/// The controller's gRPC port.
pub const CONTROLLER_PORT: u16 = 8086;
/// The controller's host name.
pub const CONTROLLER: &str = "controller";

/// A fixed `date` for the controller's gRPC responses (turmoil.md §4.1).
const FIXED_DATE: &str = "Thu, 01 Jan 2026 00:00:00 GMT";

/// The pinned epoch of every run, in seconds since 1970 (2026-01-01T00:00:00Z).
pub const EPOCH_SECS: u64 = 1_767_225_600;

/// Simulated wall-clock time: the pinned epoch plus the simulated time of the host that asks
/// (the epoch itself outside a host). The wall clock of every proxy's identity and of the
/// controller's certificate authority, so certificate validity runs on simulated time.
#[must_use]
pub fn sim_wall() -> UnixTime {
    UnixTime::from_secs(turmoil::since_epoch().map_or(EPOCH_SECS, |since| since.as_secs()))
}

/// The suffix of every identity in a meshed world.
pub const IDENTITY_SUFFIX: &str = "serviceaccount.identity.conduit.local";

/// The identity of `service`'s proxies (and what its endpoints are published with):
/// `<service>.serviceaccount.identity.conduit.local`.
#[must_use]
pub fn identity_name(service: &str) -> String {
    format!("{service}.{IDENTITY_SUFFIX}")
}

/// The identity of client host `i`'s proxy: `client-<i>.default.serviceaccount.identity.conduit.local`.
#[must_use]
pub fn client_identity(i: usize) -> String {
    identity_name(&format!("{}.default", client_host(i)))
}

/// One service and its replicas.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    /// The authority clients use (`web.default`); replicas are named after its first label.
    pub authority: String,
    /// How many replicas (app hosts) it has.
    pub replicas: usize,
    /// Its route profile, published with its endpoints (and applied by the client proxies and
    /// by its replicas' proxies to their inbound requests). Not part of a failure file: the
    /// scenario rebuilds it from the seed.
    #[serde(skip)]
    pub profile: Option<RawProfile>,
    /// Its circuit-breaking settings (`None`: the defaults). Rebuilt from the seed like the
    /// profile.
    #[serde(skip)]
    pub breaker: Option<RawBreaker>,
    /// Its authorization policy, published with its endpoints and enforced by its replicas'
    /// proxies on inbound requests (`None`: every client admitted). Rebuilt from the seed like
    /// the profile.
    #[serde(skip)]
    pub policy: Option<RawServerPolicy>,
}

impl ServiceSpec {
    /// `replicas` replicas of `authority`.
    #[must_use]
    pub fn new(authority: &str, replicas: usize) -> Self {
        Self {
            authority: authority.to_owned(),
            replicas,
            profile: None,
            breaker: None,
            policy: None,
        }
    }

    /// The same service with a route profile.
    #[must_use]
    pub fn with_profile(mut self, profile: RawProfile) -> Self {
        self.profile = Some(profile);
        self
    }

    /// The same service with an authorization policy.
    #[must_use]
    pub fn with_policy(mut self, policy: RawServerPolicy) -> Self {
        self.policy = Some(policy);
        self
    }

    /// The same service with circuit breaking off (to see what other policies do alone).
    #[must_use]
    pub fn without_breaker(mut self) -> Self {
        self.breaker = Some(RawBreaker {
            enabled: Some(false),
            ..RawBreaker::default()
        });
        self
    }

    /// The host names of its replicas.
    #[must_use]
    pub fn hosts(&self) -> Vec<String> {
        let short = self.authority.split('.').next().unwrap_or("svc");
        (0..self.replicas).map(|i| format!("{short}-{i}")).collect()
    }
}

/// Where proxies learn endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiscoveryMode {
    /// `StaticDiscover`: the harness publishes each mesh version straight to every proxy.
    Static,
    /// The real controller on its own host; the harness edits its file backend.
    Controller,
}

/// Workload identity and mTLS for a whole world (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MtlsSpec {
    /// How long the CA's leaf certificates last.
    pub leaf_lifetime: Duration,
    /// Client hosts (by index) whose proxies run without an identity: they cannot reach a
    /// meshed endpoint (they refuse to send it plaintext).
    pub unidentified_clients: Vec<usize>,
    /// Every proxy's certificate is read every [`CERTIFICATE_WATCH_INTERVAL`] and each change
    /// recorded in [`Trace::certificates`] (to see renewals and expiry).
    #[serde(default)]
    pub watch_certificates: bool,
}

impl Default for MtlsSpec {
    fn default() -> Self {
        Self {
            leaf_lifetime: conduit_controller::identity::DEFAULT_LEAF_LIFETIME,
            unidentified_clients: Vec::new(),
            watch_certificates: false,
        }
    }
}

/// A topology and the world's physics.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorldSpec {
    /// Services, each with replicas behind proxies.
    pub services: Vec<ServiceSpec>,
    /// Client hosts, each with its own proxy.
    pub clients: usize,
    /// Where proxies learn endpoints.
    pub discovery: DiscoveryMode,
    /// Per-message network latency range (turmoil draws from an exponential in it).
    pub min_latency: Duration,
    /// See `min_latency`.
    pub max_latency: Duration,
    /// The proxies' fail-fast timeout (no ready endpoint for this long → 504).
    pub failfast_timeout: Duration,
    /// The proxies' connect timeout.
    pub connect_timeout: Duration,
    /// The proxies' upstream response-headers timeout (`None`: off).
    pub response_timeout: Option<Duration>,
    /// The run fails if it is not over by this sim time.
    pub time_limit: Duration,
    /// turmoil's per-host TCP capacity: segments a socket buffers, and connections a listener
    /// queues before it accepts them. turmoil panics when a listener's queue overflows (a
    /// kernel would queue up to its backlog, 4,096 on Linux by default), so worlds where held
    /// or partitioned links release many connection attempts at once raise it.
    #[serde(default = "default_tcp_capacity")]
    pub tcp_capacity: usize,
    /// Workload identity and mTLS (`None`: a plaintext mesh). Needs
    /// [`DiscoveryMode::Controller`]: the controller is the CA.
    #[serde(default)]
    pub mtls: Option<MtlsSpec>,
    /// At the end of the run, the last client to finish reads every replica proxy's inbound
    /// request counters into [`Trace::inbound`].
    #[serde(default)]
    pub scrape_inbound: bool,
    /// How every proxy chooses endpoints (`balancer_policy`); PeakEWMA unless a scenario
    /// compares policies.
    #[serde(skip)]
    pub balancer_policy: conduit_core::balance::Policy,
    /// A defect planted in every proxy, for tests that show a check catches it.
    #[cfg(feature = "planted-faults")]
    #[serde(skip)]
    pub planted: Option<conduit_proxy::observe::PlantedFault>,
}

/// A client's own traffic in place of its planned requests: given the outbound address of the
/// client's proxy, a future run on the client's host (the red-line search drives the load
/// generator this way). The run ends when every client's future has.
pub type Driver = Arc<dyn Fn(SocketAddr) -> std::pin::Pin<Box<dyn Future<Output = ()>>>>;

impl WorldSpec {
    /// One service, one client, static discovery, 1–5 ms links.
    #[must_use]
    pub fn new(services: Vec<ServiceSpec>, clients: usize) -> Self {
        Self {
            services,
            clients,
            discovery: DiscoveryMode::Static,
            min_latency: Duration::from_millis(1),
            max_latency: Duration::from_millis(5),
            failfast_timeout: conduit_proxy::config::DEFAULT_FAILFAST_TIMEOUT,
            connect_timeout: conduit_proxy::config::DEFAULT_CONNECT_TIMEOUT,
            response_timeout: Some(conduit_proxy::config::DEFAULT_RESPONSE_TIMEOUT),
            time_limit: Duration::from_secs(120),
            tcp_capacity: default_tcp_capacity(),
            mtls: None,
            scrape_inbound: false,
            balancer_policy: conduit_core::balance::Policy::PeakEwma,
            #[cfg(feature = "planted-faults")]
            planted: None,
        }
    }

    /// The same world meshed: discovery through the controller, which is the CA; every proxy
    /// with an identity; every endpoint published with its service's identity; the replica
    /// proxies' inbound counters read at the end.
    #[must_use]
    pub fn meshed(mut self) -> Self {
        self.discovery = DiscoveryMode::Controller;
        self.mtls = Some(MtlsSpec::default());
        self.scrape_inbound = true;
        self
    }

    /// Every replica host, in order.
    #[must_use]
    pub fn replica_hosts(&self) -> Vec<String> {
        self.services.iter().flat_map(ServiceSpec::hosts).collect()
    }
}

/// turmoil's default TCP capacity (what every world used before it was a setting).
const fn default_tcp_capacity() -> usize {
    64
}

/// The name of client host `i`.
#[must_use]
pub fn client_host(i: usize) -> String {
    format!("client-{i}")
}

#[derive(Debug)]
enum Discovery {
    Static(Arc<StaticDiscover>),
    Controller(conduit_controller::discovery::file::FileDiscovery),
}

/// A running simulated mesh.
pub struct World<'a> {
    sim: Sim<'a>,
    recorder: Recorder,
    discovery: Discovery,
    apps: BTreeMap<String, Arc<AppControl>>,
    drains: BTreeMap<String, Arc<tokio::sync::Notify>>,
    endpoints: BTreeMap<String, Vec<String>>,
    /// Per service, the configuration version at which its endpoints last changed (what its
    /// endpoints are labelled with).
    changed: BTreeMap<String, u64>,
    profiles: BTreeMap<String, RawProfile>,
    breakers: BTreeMap<String, RawBreaker>,
    policies: BTreeMap<String, RawServerPolicy>,
    /// Whether endpoints are published with their service's identity.
    meshed: bool,
    /// The controller's CA, in a meshed world.
    ca: Option<Arc<CertificateAuthority>>,
    /// The anchors every proxy trusts.
    anchors: Arc<Mutex<AnchorBoard>>,
    version: u64,
}

impl std::fmt::Debug for World<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("World")
            .field("endpoints", &self.endpoints)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// A proxy's configuration: a replica's (in front of the app of `service`) or a client's.
fn proxy_config(spec: &WorldSpec, seed: u64, service: Option<&str>) -> ProxyConfig {
    let discovery = match spec.discovery {
        DiscoveryMode::Static => DiscoveryConfig::File("sim".into()),
        // What the binary would be given; the proxy reads it only to certify its identity
        // (discovery itself is built by the harness).
        DiscoveryMode::Controller => DiscoveryConfig::Controller {
            addr: controller_addr(),
        },
    };
    let mut config = ProxyConfig::with_discovery(discovery);
    config.outbound_addr = SocketAddr::from(([127, 0, 0, 1], OUTBOUND_PORT));
    config.inbound_addr = SocketAddr::from(([0, 0, 0, 0], INBOUND_PORT));
    config.admin_addr = SocketAddr::from(([0, 0, 0, 0], ADMIN_PORT));
    config.app_addr = service.map(|_| SocketAddr::from(([127, 0, 0, 1], APP_PORT)));
    config.service = service.map(str::to_owned);
    config.seed = Some(seed);
    config.queue.failfast_timeout = spec.failfast_timeout;
    config.limits.connect_timeout = spec.connect_timeout;
    config.limits.response_timeout = spec.response_timeout;
    config.balancer.policy = spec.balancer_policy;
    config
}

/// The controller's gRPC address, by host name (resolved through turmoil's DNS at every
/// connect, as a cluster's service name is).
fn controller_addr() -> PeerAddr {
    PeerAddr::Name {
        host: CONTROLLER.to_owned(),
        port: CONTROLLER_PORT,
    }
}

/// What a proxy needs to set up its identity: its name, its bootstrap token and the CA's trust
/// anchors. Each incarnation makes a fresh key from it ([`Self::local`]).
#[derive(Clone, Debug)]
struct IdentityMaterial {
    name: String,
    token: String,
    anchors: Arc<Mutex<AnchorBoard>>,
}

/// The trust-anchor bundle every proxy is given (what a shared anchors file would hold), and
/// the identities of the proxies running now, which take a new bundle at once (as a reload of
/// that file would, within its poll interval).
#[derive(Debug, Default)]
struct AnchorBoard {
    pem: Vec<u8>,
    running: Vec<std::sync::Weak<LocalIdentity>>,
}

impl AnchorBoard {
    /// Publishes `pem` to every running proxy; returns how many took it.
    fn publish(&mut self, pem: Vec<u8>) -> Result<usize, String> {
        self.running.retain(|identity| identity.strong_count() > 0);
        for identity in self.running.iter().filter_map(std::sync::Weak::upgrade) {
            identity
                .set_anchors(pem.clone())
                .map_err(|err| format!("{}: {err}", identity.name()))?;
        }
        self.pem = pem;
        Ok(self.running.len())
    }
}

impl IdentityMaterial {
    fn new(
        ca: &CertificateAuthority,
        name: String,
        anchors: &Arc<Mutex<AnchorBoard>>,
    ) -> anyhow::Result<Self> {
        let token = ca
            .issue_token(&name)
            .map_err(|err| anyhow::anyhow!("a token for {name}: {err}"))?;
        Ok(Self {
            name,
            token,
            anchors: Arc::clone(anchors),
        })
    }

    /// A new key and CSR for the identity, on simulated wall time, trusting the bundle in
    /// force (and the ones published after).
    fn local(&self) -> Result<Arc<LocalIdentity>, Box<dyn std::error::Error>> {
        let mut board = self
            .anchors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let identity = LocalIdentity::new(
            &self.name,
            self.token.as_bytes(),
            &board.pem,
            sim_wall,
            &crate::crypto::seeded(),
        )
        .map(Arc::new)
        .map_err(|err| format!("identity {}: {err}", self.name))?;
        board.running.push(Arc::downgrade(&identity));
        Ok(identity)
    }
}

/// Seeds for a host's successive incarnations (a bounced host is a new process: new seed).
#[derive(Clone, Debug)]
struct Seeds {
    base: u64,
    incarnation: Arc<AtomicU64>,
}

impl Seeds {
    fn new(root: &mut DetRng, host: &str) -> Self {
        Self {
            base: root.child(&format!("proxy/{host}")).next_u64(),
            incarnation: Arc::default(),
        }
    }

    /// The next incarnation's seed, and its number (0 first).
    fn next(&self) -> (u64, u64) {
        let n = self.incarnation.fetch_add(1, Ordering::Relaxed);
        (
            DetRng::new(self.base ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15)).next_u64(),
            n,
        )
    }
}

/// Where a proxy learns endpoints.
#[derive(Clone, Debug)]
enum Source {
    /// Straight from the harness.
    Static(Arc<StaticDiscover>),
    /// From the controller, through the real Destination client. By its host name: resolved
    /// through the proxy's `Net` (turmoil's DNS) at every connect, as a cluster's service name
    /// is.
    Controller(PeerAddr),
}

/// What a proxy incarnation reports to, and the defect planted in it (if any).
#[derive(Clone, Debug)]
struct Hooks {
    observer: Arc<dyn Observer>,
    identity: Option<Arc<LocalIdentity>>,
    #[cfg(feature = "planted-faults")]
    planted: Option<conduit_proxy::observe::PlantedFault>,
}

impl Hooks {
    fn new(spec: &WorldSpec, host: &str, incarnation: u64, recorder: &Recorder) -> Self {
        let _ = spec;
        Self {
            observer: Arc::new(SimObserver::new(host, incarnation, recorder.clone())),
            identity: None,
            #[cfg(feature = "planted-faults")]
            planted: spec.planted,
        }
    }

    /// The same hooks with the proxy's identity.
    fn with_identity(mut self, identity: Option<Arc<LocalIdentity>>) -> Self {
        self.identity = identity;
        self
    }
}

/// Binds and serves one proxy, reporting to its observer.
async fn serve<D: Discover>(
    config: ProxyConfig,
    seed: u64,
    discovery: D,
    hooks: Hooks,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ProxyStartError> {
    let proxy = Proxy::bind(config, SimNet)
        .await?
        .with_observer(hooks.observer);
    let proxy = match hooks.identity {
        Some(identity) => proxy.with_identity(identity),
        None => proxy,
    };
    #[cfg(feature = "planted-faults")]
    let proxy = match hooks.planted {
        Some(fault) => proxy.with_planted_fault(fault),
        None => proxy,
    };
    proxy.serve(discovery, seed, shutdown).await
}

async fn run_proxy(
    config: ProxyConfig,
    seed: u64,
    source: Source,
    hooks: Hooks,
    drain: Arc<tokio::sync::Notify>,
) {
    let shutdown = async move { drain.notified().await };
    let result = match source {
        Source::Static(discovery) => serve(config, seed, discovery, hooks, shutdown).await,
        Source::Controller(addr) => {
            // As the binary does: the proxy's settings for the client, a child of its seed for
            // the reconnect jitter. Built here, inside the host's runtime (tonic's lazy channel
            // spawns onto the current one).
            let mut settings = ControllerDiscoverConfig::new(addr);
            settings.backoff = config.discovery_backoff;
            settings.connect_timeout = config.limits.connect_timeout;
            let rng = DetRng::new(seed).child("discovery");
            match ControllerDiscover::new(SimNet, settings, rng) {
                Ok(discovery) => serve(config, seed, discovery, hooks, shutdown).await,
                Err(err) => {
                    tracing::error!(error = %err, "controller discovery failed");
                    return;
                }
            }
        }
    };
    if let Err(err) = result {
        tracing::error!(error = %err, "proxy failed");
    }
}

/// Reads `identity`'s certificate every [`CERTIFICATE_WATCH_INTERVAL`] and records each new
/// one (its end of validity, as its `identity_cert_expiry_timestamp_seconds` reports it) in
/// [`Trace::certificates`]. Runs until the host goes down.
async fn watch_certificate(
    identity: Arc<LocalIdentity>,
    proxy: String,
    incarnation: u64,
    recorder: Recorder,
) {
    let mut last = Vec::new();
    let mut tick = tokio::time::interval(CERTIFICATE_WATCH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let chain = identity.chain();
        if chain == last {
            continue;
        }
        last.clone_from(&chain);
        if let (Some(leaf), Some(until)) = (chain.first(), identity.valid_until()) {
            let record = CertificateRecord {
                at_us: now_us(),
                proxy: proxy.clone(),
                incarnation,
                valid_until_s: until.as_secs().saturating_sub(EPOCH_SECS),
                fingerprint: fingerprint(leaf),
                issuer: chain.get(1).map(|c| fingerprint(c)).unwrap_or_default(),
            };
            recorder.with(|t| t.certificates.push(record));
        }
    }
}

/// A step of a trust-anchor rotation ([`World::anchor_step`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AnchorStep {
    /// A new anchor joins the bundle; the CA's next issuer is signed by it.
    Add,
    /// Only the anchor the CA signs with stays in the bundle.
    Retire,
}

/// The first 16 hex digits of a certificate's SHA-256.
fn fingerprint(der: &[u8]) -> String {
    let digest = <sha2::Sha256 as sha2::Digest>::digest(der);
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Starts watching `identity` (see [`watch_certificate`]) when the world asks for it.
fn spawn_watch(
    watch: bool,
    identity: Option<&Arc<LocalIdentity>>,
    proxy: &str,
    incarnation: u64,
    recorder: &Recorder,
) {
    if let Some(identity) = identity.filter(|_| watch) {
        tokio::spawn(watch_certificate(
            Arc::clone(identity),
            proxy.to_owned(),
            incarnation,
            recorder.clone(),
        ));
    }
}

impl<'a> World<'a> {
    /// Builds the world for `spec` at `seed`, with `workload` split over the client hosts.
    ///
    /// # Errors
    ///
    /// When the initial mesh is invalid (a harness bug).
    pub fn build(
        scenario: &str,
        spec: &WorldSpec,
        seed: u64,
        workload: &Workload,
    ) -> anyhow::Result<Self> {
        Self::build_driven(scenario, spec, seed, workload, None)
    }

    /// [`World::build`], with every client's traffic coming from `driver` instead of its
    /// planned requests when one is given.
    ///
    /// # Errors
    ///
    /// When the initial mesh is invalid (a harness bug).
    pub fn build_driven(
        scenario: &str,
        spec: &WorldSpec,
        seed: u64,
        workload: &Workload,
        driver: Option<Driver>,
    ) -> anyhow::Result<Self> {
        let mut root = DetRng::new(seed);
        let mut builder = turmoil::Builder::new();
        builder
            .rng_seed(root.child("turmoil").next_u64())
            .epoch(UNIX_EPOCH + Duration::from_secs(EPOCH_SECS))
            .simulation_duration(spec.time_limit)
            .tick_duration(Duration::from_millis(1))
            .tcp_capacity(spec.tcp_capacity)
            .min_message_latency(spec.min_latency)
            .max_message_latency(spec.max_latency);
        let mut sim = builder.build();
        let recorder = Recorder::new(scenario, seed);
        // Keys, certificates and TLS bytes from the seed too (the CA below is the first to
        // draw). Not a child of `root`, so that worlds without identity draw as before.
        crate::crypto::reseed(DetRng::new(seed).child("crypto").next_u64());

        // The CA outlives controller crashes (as its directory would): made once, here.
        let ca = match &spec.mtls {
            Some(_) if spec.discovery != DiscoveryMode::Controller => {
                anyhow::bail!("a meshed world needs the controller (DiscoveryMode::Controller)")
            }
            Some(mtls) => Some(Arc::new(
                CertificateAuthority::in_memory(
                    mtls.leaf_lifetime,
                    Arc::new(sim_wall),
                    crate::crypto::seeded(),
                )
                .map_err(|err| anyhow::anyhow!("the certificate authority: {err}"))?,
            )),
            None => None,
        };
        let anchors = Arc::new(Mutex::new(AnchorBoard {
            pem: ca
                .as_ref()
                .map(|ca| ca.trust_anchors_pem())
                .unwrap_or_default(),
            running: Vec::new(),
        }));

        let static_discover = Arc::new(StaticDiscover::new(Mesh::default()));
        let discovery = match spec.discovery {
            DiscoveryMode::Static => Discovery::Static(Arc::clone(&static_discover)),
            DiscoveryMode::Controller => {
                let files =
                    conduit_controller::discovery::file::FileDiscovery::new(Mesh::default());
                let backend = files.clone();
                let services = spec.services.len();
                let ca = ca.clone();
                sim.host(CONTROLLER, move || {
                    let backend = backend.clone();
                    let ca = ca.clone();
                    async move {
                        let listener =
                            crate::net::bind(SocketAddr::from(([0, 0, 0, 0], CONTROLLER_PORT)))
                                .await?;
                        let controller = conduit_controller::Controller::new(
                            Arc::new(backend),
                            Arc::new(conduit_controller::metrics::Metrics::new(services)),
                        )
                        .with_fixed_date_header(http::HeaderValue::from_static(FIXED_DATE));
                        let controller = match ca {
                            Some(ca) => controller.with_identity(ca),
                            None => controller,
                        };
                        controller
                            .serve_grpc(crate::net::incoming(listener), std::future::pending())
                            .await?;
                        Ok(())
                    }
                });
                Discovery::Controller(files)
            }
        };
        let source = match spec.discovery {
            DiscoveryMode::Static => Source::Static(Arc::clone(&static_discover)),
            DiscoveryMode::Controller => Source::Controller(controller_addr()),
        };

        let watch = spec.mtls.as_ref().is_some_and(|m| m.watch_certificates);
        let mut apps = BTreeMap::new();
        let mut drains = BTreeMap::new();
        let mut endpoints = BTreeMap::new();
        for service in &spec.services {
            endpoints.insert(service.authority.clone(), service.hosts());
            for host in service.hosts() {
                let control = Arc::new(AppControl::default());
                apps.insert(host.clone(), Arc::clone(&control));
                let identity = AppIdentity {
                    service: service.authority.clone(),
                    host: host.clone(),
                };
                let seeds = Seeds::new(&mut root, &host);
                let spec = spec.clone();
                let recorder = recorder.clone();
                let discover = source.clone();
                let drain = Arc::new(tokio::sync::Notify::new());
                drains.insert(host.clone(), Arc::clone(&drain));
                let name = host.clone();
                let material = ca
                    .as_deref()
                    .map(|ca| {
                        IdentityMaterial::new(ca, identity_name(&service.authority), &anchors)
                    })
                    .transpose()?;
                sim.host(host.as_str(), move || {
                    let drain = Arc::clone(&drain);
                    let (seed, incarnation) = seeds.next();
                    let config = proxy_config(&spec, seed, Some(&identity.service));
                    let hooks = Hooks::new(&spec, &name, incarnation, &recorder);
                    let discover = discover.clone();
                    let identity = identity.clone();
                    let control = Arc::clone(&control);
                    let recorder = recorder.clone();
                    // Every incarnation makes a new key and certifies it.
                    let local = material.as_ref().map(IdentityMaterial::local);
                    let name = name.clone();
                    async move {
                        let local = local.transpose()?;
                        spawn_watch(watch, local.as_ref(), &name, incarnation, &recorder);
                        let hooks = hooks.with_identity(local);
                        tokio::spawn(run_proxy(config, seed, discover, hooks, drain));
                        app::serve(identity, control, recorder).await
                    }
                });
            }
        }

        // Clients done so far: the last to finish reads the replicas' inbound counters.
        let finished = Arc::new(AtomicUsize::new(0));
        let inbound_hosts = if spec.scrape_inbound {
            spec.replica_hosts()
        } else {
            Vec::new()
        };
        for client in 0..spec.clients {
            let host = client_host(client);
            let seeds = Seeds::new(&mut root, &host);
            let (seed, incarnation) = seeds.next();
            let config = proxy_config(spec, seed, None);
            let material = match (&ca, &spec.mtls) {
                (Some(ca), Some(mtls)) if !mtls.unidentified_clients.contains(&client) => Some(
                    IdentityMaterial::new(ca, client_identity(client), &anchors)?,
                ),
                _ => None,
            };
            let hooks = Hooks::new(spec, &host, incarnation, &recorder);
            let discover = source.clone();
            let requests = workload.for_client(client);
            let recorder = recorder.clone();
            let drain = Arc::new(tokio::sync::Notify::new());
            drains.insert(host.clone(), Arc::clone(&drain));
            let finished = Arc::clone(&finished);
            let clients = spec.clients;
            let inbound_hosts = inbound_hosts.clone();
            let name = host.clone();
            let driver = driver.clone();
            sim.client(host.as_str(), async move {
                let local = material.as_ref().map(IdentityMaterial::local).transpose()?;
                spawn_watch(watch, local.as_ref(), &name, incarnation, &recorder);
                let hooks = hooks.with_identity(local);
                tokio::spawn(run_proxy(config, seed, discover, hooks, drain));
                let outbound = SocketAddr::from(([127, 0, 0, 1], OUTBOUND_PORT));
                match driver {
                    Some(driver) => driver(outbound).await,
                    None => workload::run_client(outbound, requests, recorder.clone()).await,
                }
                // Let the last responses settle in the proxy's counters, then read them.
                tokio::time::sleep(Duration::from_millis(50)).await;
                let counters = scrape(SocketAddr::from(([127, 0, 0, 1], ADMIN_PORT))).await;
                recorder.with(|t| t.counters.insert(client, counters));
                // Every host runs on this one thread, so which client is last is as
                // deterministic as the rest of the run; by then every request has ended.
                if finished.fetch_add(1, Ordering::Relaxed) + 1 == clients {
                    for replica in inbound_hosts {
                        let admin = SocketAddr::new(turmoil::lookup(replica.as_str()), ADMIN_PORT);
                        let counters = scrape_inbound(admin).await;
                        recorder.with(|t| t.inbound.insert(replica, counters));
                    }
                }
                Ok(())
            });
        }

        // Endpoints are named by host in the trace; every host is registered by now.
        let mut names: Vec<String> = apps.keys().cloned().collect();
        names.extend((0..spec.clients).map(client_host));
        if spec.discovery == DiscoveryMode::Controller {
            names.push(CONTROLLER.to_owned());
        }
        let hosts = names
            .into_iter()
            .map(|name| (sim.lookup(name.as_str()), name))
            .collect();
        recorder.set_hosts(hosts);

        let profiles = spec
            .services
            .iter()
            .filter_map(|s| Some((s.authority.clone(), s.profile.clone()?)))
            .collect();
        let breakers = spec
            .services
            .iter()
            .filter_map(|s| Some((s.authority.clone(), s.breaker.clone()?)))
            .collect();
        let policies = spec
            .services
            .iter()
            .filter_map(|s| Some((s.authority.clone(), s.policy.clone()?)))
            .collect();
        let mut world = Self {
            sim,
            recorder,
            discovery,
            apps,
            drains,
            endpoints,
            changed: BTreeMap::new(),
            profiles,
            breakers,
            policies,
            meshed: spec.mtls.is_some(),
            ca,
            anchors,
            version: 0,
        };
        world.publish()?;
        Ok(world)
    }

    /// Rotates the CA's issuer: a new one, signed by the same anchor, signs every leaf from
    /// now on (what `conduit identity rotate-issuer` and the controller's issuer watcher do
    /// with a directory). A world without a CA records a harness error.
    pub fn rotate_issuer(&mut self) {
        let rotated = match &self.ca {
            Some(ca) => ca.rotate_issuer_in_memory().map_err(|err| err.to_string()),
            None => Err("rotate the issuer: the world has no CA (not meshed)".to_owned()),
        };
        match rotated {
            Ok(not_after) => self.event(format!(
                "issuer rotated, valid until {} s",
                not_after.as_secs().saturating_sub(EPOCH_SECS)
            )),
            Err(err) => self
                .recorder
                .with(|t| t.sim_error = Some(format!("harness: {err}"))),
        }
    }

    /// An anchor rotation's step on the CA (`step` adds a new anchor to the bundle, or retires
    /// the old ones), then the CA's new bundle published to every proxy, running or started
    /// later, as a shared anchors file would be. A world without a CA, or a step the CA
    /// refuses, records a harness error.
    pub fn anchor_step(&mut self, step: AnchorStep) {
        let done = match &self.ca {
            Some(ca) => match step {
                AnchorStep::Add => ca.add_anchor_in_memory(),
                AnchorStep::Retire => ca.retire_anchors_in_memory(),
            }
            .map_err(|err| err.to_string())
            .and_then(|()| {
                let pem = ca.trust_anchors_pem();
                let anchors = ca.trust_anchors().len();
                self.anchors
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .publish(pem)
                    .map(|proxies| (anchors, proxies))
            }),
            None => Err("anchor rotation: the world has no CA (not meshed)".to_owned()),
        };
        match done {
            Ok((anchors, proxies)) => self.event(format!(
                "{step:?} anchor: {anchors} anchor(s) in the bundle, published to {proxies} proxies"
            )),
            Err(err) => self
                .recorder
                .with(|t| t.sim_error = Some(format!("harness: {err}"))),
        }
    }

    /// Sim time since the start.
    #[must_use]
    pub fn elapsed(&self) -> Duration {
        self.sim.elapsed()
    }

    /// The recorder (for scenario-specific events).
    #[must_use]
    pub fn recorder(&self) -> &Recorder {
        &self.recorder
    }

    /// Records a harness event in the trace at the current sim time.
    pub fn event(&self, text: String) {
        let at = micros(self.sim.elapsed());
        self.recorder.with(|t| t.events.push((at, text)));
    }

    /// Cuts the links between two hosts (both ways).
    pub fn partition(&mut self, a: &str, b: &str) {
        self.event(format!("partition {a} {b}"));
        self.sim.partition(a, b);
    }

    /// Cuts the link from `from` to `to` only: what `from` sends is lost, what `to` sends
    /// still arrives (a one-way partition: connections half-work and stall).
    pub fn partition_oneway(&mut self, from: &str, to: &str) {
        self.event(format!("partition-oneway {from} {to}"));
        self.sim.partition_oneway(from, to);
    }

    /// Restores the link from `from` to `to`.
    pub fn repair_oneway(&mut self, from: &str, to: &str) {
        self.event(format!("repair-oneway {from} {to}"));
        self.sim.repair_oneway(from, to);
    }

    /// Restores the links between two hosts.
    pub fn repair(&mut self, a: &str, b: &str) {
        self.event(format!("repair {a} {b}"));
        self.sim.repair(a, b);
    }

    /// Holds messages between two hosts (delivered on release).
    pub fn hold(&mut self, a: &str, b: &str) {
        self.event(format!("hold {a} {b}"));
        self.sim.hold(a, b);
    }

    /// Releases held messages.
    pub fn release(&mut self, a: &str, b: &str) {
        self.event(format!("release {a} {b}"));
        self.sim.release(a, b);
    }

    /// Crashes a host: every task and socket dropped (peers see the connections close).
    pub fn crash(&mut self, host: &str) {
        self.event(format!("crash {host}"));
        self.sim.crash(host);
    }

    /// Restarts a host with fresh software (a new proxy incarnation and app).
    pub fn bounce(&mut self, host: &str) {
        self.event(format!("bounce {host}"));
        self.sim.bounce(host);
    }

    /// Starts a graceful shutdown of a host's proxy (as `/shutdown` or SIGTERM would): it stops
    /// accepting, sends HTTP/2 GOAWAY, and drains in-flight requests.
    pub fn drain_proxy(&mut self, host: &str) {
        self.event(format!("drain-proxy {host}"));
        if let Some(drain) = self.drains.get(host) {
            drain.notify_waiters();
        }
    }

    /// Sets a fixed latency on the link between two hosts.
    pub fn set_link_latency(&mut self, a: &str, b: &str, latency: Duration) {
        self.event(format!("latency {a} {b} {}us", micros(latency)));
        self.sim.set_link_latency(a, b, latency);
    }

    /// Makes an app answer `delay` later.
    pub fn set_app_delay(&mut self, host: &str, delay: Duration) {
        self.event(format!("app-delay {host} {}us", micros(delay)));
        if let Some(app) = self.apps.get(host) {
            app.set_delay(delay);
        }
    }

    /// Makes an app answer `permille` of its requests `delay` later (a latency tail).
    pub fn set_app_tail(&mut self, host: &str, permille: u32, delay: Duration) {
        self.event(format!("app-tail {host} {permille} {}us", micros(delay)));
        if let Some(app) = self.apps.get(host) {
            app.set_tail(permille, delay);
        }
    }

    /// Stalls (or releases) an app: it accepts requests and does not answer.
    pub fn set_app_stalled(&mut self, host: &str, stalled: bool) {
        self.event(format!("app-stalled {host} {stalled}"));
        if let Some(app) = self.apps.get(host) {
            app.set_stalled(stalled);
        }
    }

    /// Gives an app a capacity: `concurrency` requests at once, each taking `service_time`
    /// ([`AppControl::set_capacity`]).
    pub fn set_app_capacity(&mut self, host: &str, concurrency: usize, service_time: Duration) {
        self.event(format!(
            "app-capacity {host} {concurrency} {}us",
            service_time.as_micros()
        ));
        if let Some(app) = self.apps.get(host) {
            app.set_capacity(concurrency, service_time);
        }
    }

    /// Makes an app answer every request with a 500 (or heals it).
    pub fn set_app_failing(&mut self, host: &str, failing: bool) {
        self.event(format!("app-failing {host} {failing}"));
        if let Some(app) = self.apps.get(host) {
            app.set_failing(failing);
        }
    }

    /// `permille` of the requests arriving at a replica's app from now on fail as `failure`
    /// says (0 ends it).
    pub fn set_app_failures(&mut self, host: &str, permille: u32, failure: app::Failure) {
        self.event(format!("app-failures {host} {permille} {failure:?}"));
        if let Some(app) = self.apps.get(host) {
            app.set_failures(permille, failure);
        }
    }

    /// After `permille` of its HTTP/1.1 responses from now on, a replica's app closes the
    /// connection unannounced (0 ends it).
    pub fn set_app_close_race(&mut self, host: &str, permille: u32) {
        self.event(format!("app-close-race {host} {permille}"));
        if let Some(app) = self.apps.get(host) {
            app.set_close_race(permille);
        }
    }

    /// Publishes a new configuration: `authority`'s endpoints become `hosts`' proxies.
    ///
    /// # Errors
    ///
    /// When the resulting mesh is invalid (a harness bug).
    pub fn set_endpoints(&mut self, authority: &str, hosts: Vec<String>) -> anyhow::Result<()> {
        if self.endpoints.get(authority) != Some(&hosts) {
            self.changed.insert(authority.to_owned(), self.version + 1);
        }
        self.endpoints.insert(authority.to_owned(), hosts);
        self.publish()
    }

    /// The endpoints currently configured for `authority`.
    #[must_use]
    pub fn endpoints(&self, authority: &str) -> Vec<String> {
        self.endpoints.get(authority).cloned().unwrap_or_default()
    }

    fn publish(&mut self) -> anyhow::Result<()> {
        let next = self.version + 1;
        let mut raw = RawMesh::default();
        for (authority, hosts) in &self.endpoints {
            let changed = *self.changed.entry(authority.clone()).or_insert(next);
            let endpoints = hosts
                .iter()
                .map(|host| RawEndpoint {
                    addr: SocketAddr::new(self.sim.lookup(host.as_str()), INBOUND_PORT).to_string(),
                    labels: BTreeMap::from([(CONFIG_LABEL.to_owned(), changed.to_string())]),
                    identity: self.meshed.then(|| identity_name(authority)),
                    ..RawEndpoint::default()
                })
                .collect();
            raw.services.insert(
                authority.clone(),
                RawService {
                    port: Some(80),
                    endpoints,
                    profile: self.profiles.get(authority).cloned(),
                    breaker: self.breakers.get(authority).cloned(),
                    policy: self.policies.get(authority).cloned(),
                },
            );
        }
        let mesh = Mesh::try_from(raw).map_err(|err| anyhow::anyhow!("invalid mesh: {err}"))?;
        self.version = next;
        match &self.discovery {
            Discovery::Static(discover) => discover.publish(mesh),
            Discovery::Controller(files) => {
                // The backend's own version is the controller's business.
                let _version = files.replace(mesh);
            }
        }
        let config = ConfigVersion {
            version: self.version,
            at_us: micros(self.sim.elapsed()),
            endpoints: self.endpoints.clone(),
        };
        self.recorder.with(|t| t.configs.push(config));
        Ok(())
    }

    /// Steps until every client has finished, calling `hook` before each step (faults are
    /// applied there, between steps). A simulation error ends the run and is recorded.
    #[must_use]
    pub fn run(mut self, mut hook: impl FnMut(&mut Self)) -> Trace {
        loop {
            hook(&mut self);
            match self.sim.step() {
                Ok(true) => break,
                Ok(false) => {}
                Err(err) => {
                    let text = err.to_string();
                    self.recorder.with(|t| t.sim_error = Some(text));
                    break;
                }
            }
        }
        let end = micros(self.sim.elapsed());
        self.recorder.with(|t| t.end_us = end);
        self.recorder.finish()
    }
}

/// Reads a proxy's inbound request counters from its admin `/metrics`: those that arrived over
/// mTLS (`tls="true"`) and the others.
async fn scrape_inbound(admin: SocketAddr) -> InboundCounters {
    let samples = match scrape_text(admin).await {
        Ok(text) => conduit_proto::prom::parse(&text).map_err(|err| err.to_string()),
        Err(err) => Err(err.to_string()),
    };
    match samples {
        Ok(samples) => {
            let mut counters = InboundCounters::default();
            for sample in samples {
                if sample.name != "request_total" || sample.label("direction") != Some("inbound") {
                    continue;
                }
                #[expect(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    reason = "counters are small non-negative integers"
                )]
                let value = sample.value as u64;
                if sample.label("tls") == Some("true") {
                    counters.tls += value;
                    let client = sample.label("client_id").unwrap_or("").to_owned();
                    *counters.clients.entry(client).or_insert(0) += value;
                } else {
                    counters.plain += value;
                }
            }
            counters
        }
        Err(error) => InboundCounters {
            error: Some(error),
            ..InboundCounters::default()
        },
    }
}

/// Reads a proxy's outbound request and response counters from its admin `/metrics`.
async fn scrape(admin: SocketAddr) -> ProxyCounters {
    match scrape_text(admin).await {
        Ok(text) => match conduit_proto::prom::parse(&text) {
            Ok(samples) => {
                let mut counters = ProxyCounters::default();
                for sample in samples {
                    if sample.label("direction") != Some("outbound") {
                        continue;
                    }
                    let authority = sample.label("authority").unwrap_or("").to_owned();
                    #[expect(
                        clippy::cast_possible_truncation,
                        clippy::cast_sign_loss,
                        reason = "counters are small non-negative integers"
                    )]
                    let value = sample.value as u64;
                    match sample.name.as_str() {
                        "request_total" => {
                            *counters.requests.entry(authority).or_insert(0) += value;
                        }
                        "response_total" => {
                            let status = sample
                                .label("status_code")
                                .and_then(|s| s.parse().ok())
                                .unwrap_or(0);
                            *counters
                                .responses
                                .entry(authority)
                                .or_default()
                                .entry(status)
                                .or_insert(0) += value;
                        }
                        "route_response_total" => {
                            let status = sample
                                .label("status_code")
                                .and_then(|s| s.parse().ok())
                                .unwrap_or(0);
                            let route = sample.label("route").unwrap_or("").to_owned();
                            *counters
                                .routes
                                .entry(authority)
                                .or_default()
                                .entry(route)
                                .or_default()
                                .entry(status)
                                .or_insert(0) += value;
                        }
                        _ => {}
                    }
                }
                counters
            }
            Err(err) => ProxyCounters {
                error: Some(err.to_string()),
                ..ProxyCounters::default()
            },
        },
        Err(err) => ProxyCounters {
            error: Some(err.to_string()),
            ..ProxyCounters::default()
        },
    }
}

async fn scrape_text(admin: SocketAddr) -> anyhow::Result<String> {
    let io = SimStream::connect(admin).await?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = http::Request::builder()
        .uri("/metrics")
        .header("host", "admin")
        .body(Empty::<bytes::Bytes>::new())?;
    let response =
        tokio::time::timeout(Duration::from_secs(5), sender.send_request(request)).await??;
    let body = tokio::time::timeout(Duration::from_secs(5), response.into_body().collect())
        .await??
        .to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}
