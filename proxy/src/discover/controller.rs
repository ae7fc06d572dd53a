//! Discovery from the controller: `Destination.Get` and `Destination.GetProfile` per authority.
//!
//! [`ControllerDiscover`] follows each authority the proxy uses with one `Get` stream
//! (endpoints: a complete state, then adds and removes) and one `GetProfile` stream (the route
//! profile), over one lazily connected gRPC channel that reaches the controller through the
//! proxy's [`Net`] seam. Wire messages become core types only through
//! `conduit_proto::convert`; a message that does not convert is treated like a broken stream.
//!
//! # What a proxy can rely on
//!
//! - **Versions never go backwards.** Within a stream, a message whose version is not above
//!   the last one applied is ignored (counted as stale). The resolution published to the
//!   router carries the proxy's own per-authority version, which grows with every change,
//!   across reconnects too.
//! - **The last known state survives the controller.** When a stream fails or the controller
//!   is unreachable, the authority keeps its last resolution (endpoints and profile) and the
//!   stream is retried with capped, jittered exponential backoff
//!   ([`conduit_core::backoff`], seeded from the proxy's seed). After a reconnect the first
//!   message is a complete state, which replaces what was kept.
//! - **Idle authorities are dropped.** When the router drops an authority (no requests for the
//!   discovery idle timeout) it drops its receiver; the streams are then cancelled and the
//!   authority forgotten. The next request resolves it afresh.
//!
//! The service a resolution names is called by the authority's host (lower case, without a
//! trailing dot), on the authority's port or, when the request gave none, port 80 (HTTP's
//! default): the streams carry no port.
//!
//! # Metrics
//!
//! `control_discovery_destinations` (authorities followed), `control_discovery_streams{kind,
//! state}` (`kind` is `endpoints` or `profile`, `state` is `open` or `connecting`),
//! `control_discovery_updates_total{kind}`, `control_discovery_ignored_total{kind,reason}`
//! (`stale` or `invalid`) and `control_discovery_reconnects_total{kind}`. Every label set is
//! fixed, whatever the authorities.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use conduit_core::backoff::{Backoff, BackoffConfig};
use conduit_core::mesh::{self, Endpoint, Profile, Service};
use conduit_core::rand::DetRng;
use conduit_proto::convert::{DestinationChange, DestinationUpdate, ProfileUpdate};
use conduit_proto::pb::destination as pb;
use conduit_proto::pb::destination::destination_client::DestinationClient;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint as TonicEndpoint};

use super::{Discover, Resolution};
use crate::net::{Net, PeerAddr};

/// How long connecting to the controller may take before the attempt counts as failed.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// HTTP/2 keepalive pings towards the controller: a controller that vanished without closing
/// the connection (a crashed host, a partition) is noticed within interval + timeout, and the
/// streams reconnect. Matches the controller's own keepalive.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);

/// How long a keepalive ping may go unanswered.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long subscribing may take (connecting included) before the attempt counts as failed:
/// a controller that accepts connections but never answers must not stall a stream forever.
pub const STREAM_OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// The most authorities followed at once; more are never resolved (their requests fail fast).
/// The router's own bound is the same, so this only guards direct users.
pub const MAX_DESTINATIONS: usize = 10_000;

/// How the controller client behaves.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ControllerDiscoverConfig {
    /// The controller's gRPC address.
    pub addr: PeerAddr,
    /// Reconnect backoff.
    pub backoff: BackoffConfig,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// mTLS to the controller (a proxy with an identity and `controller_identity`); plaintext
    /// when `None`.
    pub tls: Option<crate::identity::ControllerTls>,
}

impl ControllerDiscoverConfig {
    /// The defaults for a controller at `addr` (an IP address or a name resolved at every
    /// connect).
    #[must_use]
    pub fn new(addr: impl Into<PeerAddr>) -> Self {
        Self {
            addr: addr.into(),
            backoff: BackoffConfig::default(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            tls: None,
        }
    }
}

/// Why the controller client could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControllerDiscoverError {
    /// The address does not make a valid URI.
    #[error("controller address {addr}: {source}")]
    Address {
        /// The address.
        addr: PeerAddr,
        /// tonic's error.
        #[source]
        source: tonic::transport::Error,
    },
}

/// Discovery from the controller's Destination API.
///
/// Cloning shares the channel and the followed authorities.
#[derive(Clone)]
pub struct ControllerDiscover {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ControllerDiscover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControllerDiscover")
            .field("addr", &self.inner.config.addr)
            .field("destinations", &lock(&self.inner.destinations).len())
            .finish_non_exhaustive()
    }
}

struct Inner {
    config: ControllerDiscoverConfig,
    client: DestinationClient<Channel>,
    destinations: Mutex<BTreeMap<String, watch::Sender<Resolution>>>,
    rng: Mutex<DetRng>,
    stats: Stats,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves its state consistent before anything can panic.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ControllerDiscover {
    /// A client for the controller at `config.addr`, connecting through `net` when first
    /// needed. `rng` seeds the reconnect jitter (a child of the proxy's generator).
    ///
    /// # Errors
    ///
    /// [`ControllerDiscoverError::Address`] if the address does not make a URI (it always
    /// does for a socket address; the error is tonic's type).
    pub fn new<N: Net>(
        net: N,
        config: ControllerDiscoverConfig,
        rng: DetRng,
    ) -> Result<Self, ControllerDiscoverError> {
        let addr = config.addr.clone();
        let endpoint = TonicEndpoint::from_shared(format!("http://{addr}"))
            .map_err(|source| ControllerDiscoverError::Address {
                addr: addr.clone(),
                source,
            })?
            .connect_timeout(config.connect_timeout)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        let connector = {
            let addr = addr.clone();
            let tls = config.tls.clone();
            tower::service_fn(move |_: http::Uri| {
                let net = net.clone();
                let addr = addr.clone();
                let tls = tls.clone();
                async move { crate::identity::connect_controller(&net, &addr, tls.as_ref()).await }
            })
        };
        let channel = endpoint.connect_with_connector_lazy(connector);
        tracing::info!(controller = %addr, "discovery from the controller");
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                client: DestinationClient::new(channel),
                destinations: Mutex::default(),
                rng: Mutex::new(rng),
                stats: Stats::default(),
            }),
        })
    }
}

impl Discover for ControllerDiscover {
    fn resolve(&self, authority: &str) -> watch::Receiver<Resolution> {
        let mut destinations = lock(&self.inner.destinations);
        if let Some(tx) = destinations.get(authority) {
            return tx.subscribe();
        }
        let (tx, rx) = watch::channel(Resolution::Unknown);
        if destinations.len() >= MAX_DESTINATIONS {
            tracing::warn!(limit = MAX_DESTINATIONS, %authority, "too many destinations; not resolving");
            return rx;
        }
        let Some(target) = Target::parse(authority) else {
            tracing::debug!(%authority, "not a valid authority");
            tx.send_replace(Resolution::NotFound);
            return rx;
        };
        destinations.insert(authority.to_owned(), tx.clone());
        self.inner
            .stats
            .destinations
            .fetch_add(1, Ordering::Relaxed);
        let rng = lock(&self.inner.rng).child(authority);
        tracing::debug!(%authority, "following destination");
        tokio::spawn(follow(Arc::clone(&self.inner), target, tx, rng));
        rx
    }

    fn render_metrics(&self, out: &mut String) {
        self.inner.stats.render(out);
    }
}

/// The authority being followed, and the service name and port it resolves to.
#[derive(Clone, Debug)]
struct Target {
    authority: String,
    name: String,
    port: u16,
}

impl Target {
    fn parse(authority: &str) -> Option<Self> {
        let parsed: http::uri::Authority = authority.parse().ok()?;
        let name = parsed.host().trim_end_matches('.').to_ascii_lowercase();
        if name.is_empty() {
            return None;
        }
        Some(Self {
            authority: authority.to_owned(),
            name,
            port: parsed.port_u16().unwrap_or(mesh::DEFAULT_PORT),
        })
    }
}

/// What the two streams have told us about one authority.
#[derive(Debug, Default)]
struct Known {
    /// `None` until `Get` answers; then whether the service exists, with its endpoints.
    endpoints: Option<Option<Vec<Endpoint>>>,
    profile: Profile,
    /// The last version published to the router.
    version: u64,
}

impl Known {
    fn apply_endpoints(&mut self, change: DestinationChange) {
        match change {
            DestinationChange::Replace(endpoints) => self.endpoints = Some(Some(endpoints)),
            DestinationChange::NoEndpoints { exists: true } => self.endpoints = Some(Some(vec![])),
            DestinationChange::NoEndpoints { exists: false } => self.endpoints = Some(None),
            DestinationChange::Add(added) => {
                let endpoints = self
                    .endpoints
                    .get_or_insert(None)
                    .get_or_insert_with(Vec::new);
                for endpoint in added {
                    let len = endpoints.len();
                    match endpoints.iter_mut().find(|e| e.addr == endpoint.addr) {
                        Some(existing) => *existing = endpoint,
                        None if len < mesh::MAX_ENDPOINTS => endpoints.push(endpoint),
                        None => {
                            tracing::warn!(
                                limit = mesh::MAX_ENDPOINTS,
                                "too many endpoints; ignoring an add"
                            );
                        }
                    }
                }
            }
            DestinationChange::Remove(removed) => {
                if let Some(Some(endpoints)) = &mut self.endpoints {
                    endpoints.retain(|e| !removed.contains(&e.addr));
                }
            }
        }
    }

    /// The resolution this knowledge makes, under the next version if it changed.
    fn publish(&mut self, target: &Target, tx: &watch::Sender<Resolution>) {
        let next = match &self.endpoints {
            None => return,
            Some(None) => Resolution::NotFound,
            Some(Some(endpoints)) => Resolution::Service {
                version: self.version + 1,
                service: Arc::new(Service {
                    name: target.name.clone(),
                    port: target.port,
                    endpoints: endpoints.clone(),
                    profile: self.profile.clone(),
                }),
            },
        };
        tx.send_if_modified(|current| {
            if current.same_state(&next) {
                return false;
            }
            self.version += 1;
            *current = next;
            true
        });
    }
}

/// Follows one authority until nobody uses it any more.
async fn follow(inner: Arc<Inner>, target: Target, tx: watch::Sender<Resolution>, mut rng: DetRng) {
    let known = Mutex::new(Known::default());
    let shared = Shared {
        inner: &inner,
        target: &target,
        known: &known,
        tx: &tx,
    };
    let endpoints = follow_stream::<EndpointsKind>(&shared, rng.child("endpoints"));
    let profile = follow_stream::<ProfileKind>(&shared, rng.child("profile"));
    let mut streams = std::pin::pin!(async { tokio::join!(endpoints, profile) });
    loop {
        let ended = tokio::select! {
            _ = &mut streams => true,
            () = tx.closed() => false,
        };
        // Unused: forget the authority, unless someone subscribed since `closed` fired (they
        // subscribe under the same lock, so this check cannot race them).
        let mut destinations = lock(&inner.destinations);
        // (The streams never end by themselves; if they did, the authority would be dropped
        // rather than the finished future polled again.)
        if ended || tx.receiver_count() == 0 {
            destinations.remove(&target.authority);
            inner.stats.destinations.fetch_sub(1, Ordering::Relaxed);
            tracing::debug!(authority = %target.authority, "destination idle; streams cancelled");
            return;
        }
    }
}

/// What both streams of one authority share.
struct Shared<'a> {
    inner: &'a Inner,
    target: &'a Target,
    known: &'a Mutex<Known>,
    tx: &'a watch::Sender<Resolution>,
}

/// One of the two Destination streams.
trait StreamKind {
    type Message: Send + 'static;
    type Update: Send;
    const KIND: Kind;
    fn open(
        client: DestinationClient<Channel>,
        request: pb::GetDestination,
    ) -> impl Future<Output = Result<tonic::Streaming<Self::Message>, tonic::Status>> + Send;
    fn convert(message: Self::Message) -> Result<(u64, Self::Update), String>;
    fn apply(known: &mut Known, update: Self::Update);
}

struct EndpointsKind;

impl StreamKind for EndpointsKind {
    type Message = pb::Update;
    type Update = DestinationChange;
    const KIND: Kind = Kind::Endpoints;

    async fn open(
        mut client: DestinationClient<Channel>,
        request: pb::GetDestination,
    ) -> Result<tonic::Streaming<pb::Update>, tonic::Status> {
        client.get(request).await.map(tonic::Response::into_inner)
    }

    fn convert(message: pb::Update) -> Result<(u64, DestinationChange), String> {
        DestinationUpdate::try_from(message)
            .map(|update| (update.version, update.change))
            .map_err(|err| err.to_string())
    }

    fn apply(known: &mut Known, update: DestinationChange) {
        known.apply_endpoints(update);
    }
}

struct ProfileKind;

impl StreamKind for ProfileKind {
    type Message = pb::DestinationProfile;
    type Update = Profile;
    const KIND: Kind = Kind::Profile;

    async fn open(
        mut client: DestinationClient<Channel>,
        request: pb::GetDestination,
    ) -> Result<tonic::Streaming<pb::DestinationProfile>, tonic::Status> {
        client
            .get_profile(request)
            .await
            .map(tonic::Response::into_inner)
    }

    fn convert(message: pb::DestinationProfile) -> Result<(u64, Profile), String> {
        ProfileUpdate::try_from(message)
            .map(|update| (update.version, update.profile))
            .map_err(|err| err.to_string())
    }

    fn apply(known: &mut Known, profile: Profile) {
        known.profile = profile;
    }
}

/// Keeps one stream open for as long as the authority is followed: subscribes, applies each
/// message in version order, and after any failure waits out the backoff and subscribes again.
async fn follow_stream<K: StreamKind>(shared: &Shared<'_>, mut rng: DetRng) {
    let stats = &shared.inner.stats;
    let authority = shared.target.authority.as_str();
    let mut backoff = Backoff::new(shared.inner.config.backoff);
    loop {
        let request = pb::GetDestination {
            path: authority.to_owned(),
            context_token: String::new(),
        };
        let opened = {
            let _connecting = stats.stream(K::KIND, StreamState::Connecting);
            tokio::time::timeout(
                STREAM_OPEN_TIMEOUT,
                K::open(shared.inner.client.clone(), request),
            )
            .await
            .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("subscribing timed out")))
        };
        match opened {
            Err(status) => {
                tracing::debug!(%authority, kind = K::KIND.as_str(), error = %status, "controller unavailable");
            }
            Ok(mut stream) => {
                let _open = stats.stream(K::KIND, StreamState::Open);
                // Versions are per stream: a new stream starts again from its complete state.
                let mut last_version = 0;
                loop {
                    let message = match stream.message().await {
                        Ok(Some(message)) => message,
                        Ok(None) => {
                            tracing::debug!(%authority, kind = K::KIND.as_str(), "stream ended by the controller");
                            break;
                        }
                        Err(status) => {
                            tracing::debug!(%authority, kind = K::KIND.as_str(), error = %status, "stream failed");
                            break;
                        }
                    };
                    let (version, update) = match K::convert(message) {
                        Ok(converted) => converted,
                        Err(err) => {
                            tracing::warn!(%authority, kind = K::KIND.as_str(), error = %err, "invalid message from the controller; resubscribing");
                            stats.ignored(K::KIND, Ignored::Invalid);
                            break;
                        }
                    };
                    if version <= last_version {
                        tracing::debug!(%authority, kind = K::KIND.as_str(), version, last_version, "ignoring stale update");
                        stats.ignored(K::KIND, Ignored::Stale);
                        continue;
                    }
                    last_version = version;
                    // A stream that delivers is healthy: the next failure backs off from the
                    // start again.
                    backoff.reset();
                    stats.updates[K::KIND as usize].fetch_add(1, Ordering::Relaxed);
                    let mut known = lock(shared.known);
                    K::apply(&mut known, update);
                    known.publish(shared.target, shared.tx);
                }
            }
        }
        let delay = backoff.next_delay(&mut rng);
        stats.reconnects[K::KIND as usize].fetch_add(1, Ordering::Relaxed);
        let _waiting = stats.stream(K::KIND, StreamState::Connecting);
        tracing::debug!(%authority, kind = K::KIND.as_str(), ?delay, "resubscribing after backoff");
        tokio::time::sleep(delay).await;
    }
}

/// The `kind` label.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Endpoints = 0,
    Profile = 1,
}

impl Kind {
    const ALL: [Self; 2] = [Self::Endpoints, Self::Profile];

    const fn as_str(self) -> &'static str {
        match self {
            Self::Endpoints => "endpoints",
            Self::Profile => "profile",
        }
    }
}

/// The `state` label of `control_discovery_streams`.
#[derive(Clone, Copy, Debug)]
enum StreamState {
    Open = 0,
    Connecting = 1,
}

/// The `reason` label of `control_discovery_ignored_total`.
#[derive(Clone, Copy, Debug)]
enum Ignored {
    Stale = 0,
    Invalid = 1,
}

#[derive(Debug, Default)]
struct Stats {
    destinations: AtomicU64,
    /// `[kind][state]`.
    streams: [[Arc<AtomicU64>; 2]; 2],
    updates: [AtomicU64; 2],
    /// `[kind][reason]`.
    ignored: [[AtomicU64; 2]; 2],
    reconnects: [AtomicU64; 2],
}

/// One stream counted in a state until dropped.
struct StreamGauge(Arc<AtomicU64>);

impl Drop for StreamGauge {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Stats {
    fn stream(&self, kind: Kind, state: StreamState) -> StreamGauge {
        let gauge = &self.streams[kind as usize][state as usize];
        gauge.fetch_add(1, Ordering::Relaxed);
        StreamGauge(Arc::clone(gauge))
    }

    fn ignored(&self, kind: Kind, reason: Ignored) {
        self.ignored[kind as usize][reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String) {
        let load = |value: &AtomicU64| value.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP control_discovery_destinations Authorities followed on the controller.\n\
             # TYPE control_discovery_destinations gauge\n\
             control_discovery_destinations {}",
            load(&self.destinations)
        );
        let _ = writeln!(
            out,
            "# HELP control_discovery_streams Destination streams by state.\n\
             # TYPE control_discovery_streams gauge"
        );
        for kind in Kind::ALL {
            for (state, name) in [
                (StreamState::Open, "open"),
                (StreamState::Connecting, "connecting"),
            ] {
                let _ = writeln!(
                    out,
                    "control_discovery_streams{{kind=\"{}\",state=\"{name}\"}} {}",
                    kind.as_str(),
                    load(&self.streams[kind as usize][state as usize])
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP control_discovery_updates_total Destination messages applied.\n\
             # TYPE control_discovery_updates_total counter"
        );
        for kind in Kind::ALL {
            let _ = writeln!(
                out,
                "control_discovery_updates_total{{kind=\"{}\"}} {}",
                kind.as_str(),
                load(&self.updates[kind as usize])
            );
        }
        let _ = writeln!(
            out,
            "# HELP control_discovery_ignored_total Destination messages ignored (stale or invalid).\n\
             # TYPE control_discovery_ignored_total counter"
        );
        for kind in Kind::ALL {
            for (reason, name) in [(Ignored::Stale, "stale"), (Ignored::Invalid, "invalid")] {
                let _ = writeln!(
                    out,
                    "control_discovery_ignored_total{{kind=\"{}\",reason=\"{name}\"}} {}",
                    kind.as_str(),
                    load(&self.ignored[kind as usize][reason as usize])
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP control_discovery_reconnects_total Destination streams re-opened after a failure.\n\
             # TYPE control_discovery_reconnects_total counter"
        );
        for kind in Kind::ALL {
            let _ = writeln!(
                out,
                "control_discovery_reconnects_total{{kind=\"{}\"}} {}",
                kind.as_str(),
                load(&self.reconnects[kind as usize])
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(port: u16) -> Endpoint {
        Endpoint::new(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
    }

    fn target() -> Target {
        Target::parse("Web.Test.:8080").expect("valid")
    }

    #[test]
    fn targets_name_the_host_and_port() {
        let t = target();
        assert_eq!((t.name.as_str(), t.port), ("web.test", 8080));
        assert_eq!(Target::parse("web.test").expect("valid").port, 80);
        assert!(Target::parse("").is_none());
    }

    #[test]
    fn known_state_follows_adds_removes_and_reconnects() {
        let (tx, rx) = watch::channel(Resolution::Unknown);
        let t = target();
        let mut known = Known::default();
        known.publish(&t, &tx);
        assert_eq!(
            *rx.borrow(),
            Resolution::Unknown,
            "nothing until Get answers"
        );

        known.apply_endpoints(DestinationChange::Replace(vec![endpoint(1), endpoint(2)]));
        known.publish(&t, &tx);
        known.apply_endpoints(DestinationChange::Add(vec![endpoint(3)]));
        known.apply_endpoints(DestinationChange::Remove(vec![endpoint(1).addr]));
        known.publish(&t, &tx);
        let Resolution::Service { version, service } = rx.borrow().clone() else {
            panic!("found");
        };
        assert_eq!(version, 2);
        let ports: Vec<u16> = service.endpoints.iter().map(|e| e.addr.port()).collect();
        assert_eq!(ports, [2, 3]);

        // Publishing the same state again is no change.
        known.publish(&t, &tx);
        assert!(matches!(
            *rx.borrow(),
            Resolution::Service { version: 2, .. }
        ));

        // A reconnect's complete state replaces what was kept.
        known.apply_endpoints(DestinationChange::NoEndpoints { exists: false });
        known.publish(&t, &tx);
        assert_eq!(*rx.borrow(), Resolution::NotFound);
        known.apply_endpoints(DestinationChange::Add(vec![endpoint(4)]));
        known.publish(&t, &tx);
        assert!(matches!(
            *rx.borrow(),
            Resolution::Service { version: 4, .. }
        ));
    }

    #[test]
    fn metrics_have_fixed_labels() {
        let stats = Stats::default();
        let _open = stats.stream(Kind::Endpoints, StreamState::Open);
        stats.ignored(Kind::Profile, Ignored::Stale);
        let mut out = String::new();
        stats.render(&mut out);
        assert!(
            out.contains("control_discovery_streams{kind=\"endpoints\",state=\"open\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("control_discovery_ignored_total{kind=\"profile\",reason=\"stale\"} 1"),
            "{out}"
        );
        assert_eq!(
            out.lines().filter(|l| !l.starts_with('#')).count(),
            1 + 4 + 2 + 4 + 2
        );
    }
}
