//! The Destination service: per-subscriber endpoint and profile streams.
//!
//! The logic is sans-IO: [`EndpointDiff`] turns successive [`ServiceState`]s into the
//! versioned [`DestinationUpdate`]s a subscriber needs, and [`ProfileDiff`] does the same for
//! profiles. [`DestinationService`] is the thin tonic glue: it watches discovery and feeds the
//! diffs.
//!
//! # Stream protocol (what a subscriber can rely on)
//!
//! - `version` starts at 1 and grows by one with every message of the stream, so it never goes
//!   backwards; versions of different streams are unrelated.
//! - The first message is a complete state: `replace` with every endpoint, or `no_endpoints`
//!   (`exists: true` for a service without endpoints, `exists: false` for a name no service
//!   has).
//! - Later messages are `add` (new endpoints, and endpoints whose weight, identity or labels
//!   changed, which the receiver updates in place), `remove`, or `no_endpoints` when the set
//!   becomes empty or the service disappears. When one change both adds and removes, the `add`
//!   comes first, so a receiver never passes through an empty set that the file never had.
//! - A subscriber that falls behind skips intermediate states (discovery keeps only the latest),
//!   but applying the messages it gets, in order, always yields the latest state.
//! - `GetProfile` sends the complete profile first and again on every change (its routes, the
//!   service's circuit breaking and its inbound authorization policy: a change to any of them
//!   is a change).

use core::net::SocketAddr;
use core::pin::Pin;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use conduit_core::mesh::{Endpoint, Profile, Service};
use conduit_proto::convert::{DestinationChange, DestinationUpdate, ProfileUpdate};
use conduit_proto::pb::destination as pb;
use futures_util::Stream;
use tonic::{Request, Response, Status};

use crate::discovery::{Discovery, ServiceState, ServiceWatch, WatchError};
use crate::metrics::{Metrics, OpenStream, StreamKind};

// === Sans-IO diffs ===

/// What a subscriber was last sent: the discovery snapshot's own service, shared (a stream
/// holds a reference, not a copy of every endpoint, however many streams follow one name).
#[derive(Clone, Debug)]
enum Sent {
    NotFound,
    Service(Arc<Service>),
}

/// Turns a subscriber's successive service states into endpoint updates.
#[derive(Clone, Debug, Default)]
pub struct EndpointDiff {
    version: u64,
    sent: Option<Sent>,
}

impl EndpointDiff {
    /// A diff for a new stream: the first state it sees becomes a complete update.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// The version of the last update produced (0 before the first).
    #[must_use]
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The updates that take the subscriber from what it was last sent to `state`: none when
    /// nothing it sees changed, otherwise one or two (an `add` then a `remove`), each with the
    /// next version.
    #[must_use]
    pub fn handle_state(&mut self, state: &ServiceState) -> Vec<DestinationUpdate> {
        let mut changes = Vec::new();
        match (&self.sent, state) {
            (Some(Sent::NotFound), ServiceState::NotFound) => {}
            (_, ServiceState::NotFound) => {
                changes.push(DestinationChange::NoEndpoints { exists: false });
            }
            (Some(Sent::Service(old)), ServiceState::Found(new)) if Arc::ptr_eq(old, new) => {}
            (Some(Sent::Service(old)), ServiceState::Found(new))
                if old.endpoints.is_empty() && new.endpoints.is_empty() => {}
            (_, ServiceState::Found(new)) if new.endpoints.is_empty() => {
                changes.push(DestinationChange::NoEndpoints { exists: true });
            }
            (None, ServiceState::Found(new)) => {
                changes.push(DestinationChange::Replace(new.endpoints.clone()));
            }
            (Some(Sent::NotFound), ServiceState::Found(new)) => {
                changes.push(DestinationChange::Add(new.endpoints.clone()));
            }
            (Some(Sent::Service(old)), ServiceState::Found(new)) => {
                // New addresses and changed metadata, in discovery order; then what went.
                let before: BTreeMap<SocketAddr, &Endpoint> =
                    old.endpoints.iter().map(|e| (e.addr, e)).collect();
                let now: BTreeSet<SocketAddr> = new.endpoints.iter().map(|e| e.addr).collect();
                let added: Vec<Endpoint> = new
                    .endpoints
                    .iter()
                    .filter(|e| before.get(&e.addr) != Some(e))
                    .cloned()
                    .collect();
                let removed: Vec<SocketAddr> = before
                    .keys()
                    .filter(|addr| !now.contains(addr))
                    .copied()
                    .collect();
                if !added.is_empty() {
                    changes.push(DestinationChange::Add(added));
                }
                if !removed.is_empty() {
                    changes.push(DestinationChange::Remove(removed));
                }
            }
        }
        self.sent = Some(match state {
            ServiceState::NotFound => Sent::NotFound,
            ServiceState::Found(service) => Sent::Service(Arc::clone(service)),
        });
        changes
            .into_iter()
            .map(|change| {
                self.version += 1;
                DestinationUpdate {
                    version: self.version,
                    change,
                }
            })
            .collect()
    }
}

/// Turns a subscriber's successive service states into profile updates.
#[derive(Clone, Debug, Default)]
pub struct ProfileDiff {
    version: u64,
    sent: Option<Sent>,
}

impl ProfileDiff {
    /// A diff for a new stream: the first state it sees is always sent.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// The complete profile when it differs from the last one sent (or nothing was sent yet).
    #[must_use]
    pub fn handle_state(&mut self, state: &ServiceState) -> Option<ProfileUpdate> {
        let unchanged = match (&self.sent, state) {
            (Some(Sent::NotFound), ServiceState::NotFound) => true,
            (Some(Sent::Service(old)), ServiceState::Found(new)) => {
                Arc::ptr_eq(old, new) || (old.name == new.name && old.profile == new.profile)
            }
            _ => false,
        };
        self.sent = Some(match state {
            ServiceState::NotFound => Sent::NotFound,
            ServiceState::Found(service) => Sent::Service(Arc::clone(service)),
        });
        if unchanged {
            return None;
        }
        self.version += 1;
        let (exists, name, profile) = match state {
            ServiceState::NotFound => (false, String::new(), Profile::default()),
            ServiceState::Found(service) => (true, service.name.clone(), service.profile.clone()),
        };
        Some(ProfileUpdate {
            version: self.version,
            exists,
            name,
            profile,
        })
    }
}

// === tonic glue ===

/// How many updates one state change can produce at most (an `add` and a `remove`).
const MAX_UPDATES_PER_CHANGE: usize = 2;

/// A server stream of Destination messages.
pub type UpdateStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The tonic `Destination` service over any [`Discovery`] backend.
#[derive(Clone)]
pub struct DestinationService {
    discovery: Arc<dyn Discovery>,
    metrics: Arc<Metrics>,
}

impl core::fmt::Debug for DestinationService {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("DestinationService").finish_non_exhaustive()
    }
}

impl DestinationService {
    /// A service answering from `discovery`, counting into `metrics`.
    #[must_use]
    pub fn new(discovery: Arc<dyn Discovery>, metrics: Arc<Metrics>) -> Self {
        Self { discovery, metrics }
    }

    /// Wraps the service for a tonic router.
    #[must_use]
    pub fn into_server(self) -> pb::destination_server::DestinationServer<Self> {
        pb::destination_server::DestinationServer::new(self)
    }

    fn watch(&self, request: &pb::GetDestination) -> Result<ServiceWatch, Status> {
        self.discovery
            .watch(&request.path)
            .map_err(|err| match err {
                WatchError::InvalidAuthority { .. } => Status::invalid_argument(err.to_string()),
                WatchError::TooManyWatches { .. } => Status::resource_exhausted(err.to_string()),
            })
    }
}

/// One subscriber's stream state: pulled by tonic, so a slow subscriber applies backpressure
/// and a departed one drops it (and its watch) at once.
struct Subscriber<D: Diff> {
    watch: ServiceWatch,
    diff: D,
    pending: VecDeque<D::Message>,
    started: bool,
    metrics: Arc<Metrics>,
    _open: OpenStream,
}

/// A diff a [`Subscriber`] can drive.
trait Diff: Send + 'static {
    type Message: Send + 'static;
    const KIND: StreamKind;
    fn handle(&mut self, state: &ServiceState, out: &mut VecDeque<Self::Message>);
}

impl Diff for EndpointDiff {
    type Message = pb::Update;
    const KIND: StreamKind = StreamKind::Endpoints;
    fn handle(&mut self, state: &ServiceState, out: &mut VecDeque<pb::Update>) {
        let updates = self.handle_state(state);
        debug_assert!(updates.len() <= MAX_UPDATES_PER_CHANGE);
        out.extend(updates.into_iter().map(pb::Update::from));
    }
}

impl Diff for ProfileDiff {
    type Message = pb::DestinationProfile;
    const KIND: StreamKind = StreamKind::Profile;
    fn handle(&mut self, state: &ServiceState, out: &mut VecDeque<pb::DestinationProfile>) {
        out.extend(self.handle_state(state).map(pb::DestinationProfile::from));
    }
}

fn subscribe<D: Diff>(
    watch: ServiceWatch,
    diff: D,
    metrics: &Arc<Metrics>,
) -> UpdateStream<D::Message> {
    let subscriber = Subscriber {
        watch,
        diff,
        pending: VecDeque::with_capacity(MAX_UPDATES_PER_CHANGE),
        started: false,
        metrics: Arc::clone(metrics),
        _open: metrics.open_stream(D::KIND),
    };
    Box::pin(futures_util::stream::unfold(
        subscriber,
        |mut s| async move {
            loop {
                if let Some(message) = s.pending.pop_front() {
                    s.metrics.record_update(D::KIND);
                    return Some((Ok(message), s));
                }
                if s.started {
                    // The backend stopped: end the stream; the client reconnects and resyncs.
                    s.watch.changed().await.ok()?;
                }
                s.started = true;
                let snapshot = s.watch.latest();
                s.diff.handle(&snapshot.state, &mut s.pending);
            }
        },
    ))
}

#[tonic::async_trait]
impl pb::destination_server::Destination for DestinationService {
    type GetStream = UpdateStream<pb::Update>;
    type GetProfileStream = UpdateStream<pb::DestinationProfile>;

    async fn get(
        &self,
        request: Request<pb::GetDestination>,
    ) -> Result<Response<Self::GetStream>, Status> {
        let request = request.into_inner();
        let watch = self.watch(&request)?;
        tracing::debug!(path = %request.path, "Destination.Get stream opened");
        Ok(Response::new(subscribe(
            watch,
            EndpointDiff::new(),
            &self.metrics,
        )))
    }

    async fn get_profile(
        &self,
        request: Request<pb::GetDestination>,
    ) -> Result<Response<Self::GetProfileStream>, Status> {
        let request = request.into_inner();
        let watch = self.watch(&request)?;
        tracing::debug!(path = %request.path, "Destination.GetProfile stream opened");
        Ok(Response::new(subscribe(
            watch,
            ProfileDiff::new(),
            &self.metrics,
        )))
    }
}

#[cfg(test)]
mod tests;
