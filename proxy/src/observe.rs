//! What the proxy reports about its own decisions: the seam through which tests and the
//! simulation learn what the proxy *did* instead of inferring it from what clients saw.
//!
//! An [`Observer`] is told two things:
//! - [`applied`](Observer::applied): an authority's balancer put a resolution in force (its
//!   endpoints are from then on the ones its requests are balanced over), with the resolution's
//!   version and service, endpoints and their labels included;
//! - [`picked`](Observer::picked): the balancer picked an endpoint for a request the observer
//!   follows, under the resolution version in force at that pick. A request the proxy sends
//!   again (after an endpoint provably did not process it, or a retry) is picked again, and
//!   reported again; a hedge's pick says so, since the attempt before it may still answer.
//!
//! The observer chooses which requests it follows: [`request`](Observer::request) sees each
//! outbound request's head once, when it arrives, and returns a key for it (or `None`, the
//! default, and the request's picks are not reported). So following requests costs the proxy
//! nothing it would not do anyway, and an observer that follows none ([`NoObserver`], what
//! [`Proxy::bind`](crate::Proxy::bind) installs) costs one call per request that returns at
//! once. The proxy's own `debug` log already records every resolution it applies.
//!
//! Observers are called outside the balancer's lock, on the task that made the change or the
//! pick, and must return quickly (record and go).
//!
//! With the `planted-faults` cargo feature, [`PlantedFault`] holds deliberate defects a test
//! can plant in the proxy (through code only: no configuration reaches them) to prove that the
//! simulation's checks catch what they claim to.

use std::net::SocketAddr;

use conduit_core::route::RequestView;

use crate::discover::Resolution;

/// Told what the proxy applied and picked. Every method has a default that does nothing.
pub trait Observer: std::fmt::Debug + Send + Sync + 'static {
    /// `authority`'s balancer (keyed by the authority as the router normalised it) applied
    /// `resolution`: a [`Resolution::Service`] whose endpoints are now in force, or
    /// [`Resolution::NotFound`]. Stale resolutions the balancer ignores are not reported.
    fn applied(&self, authority: &str, resolution: &Resolution) {
        let _ = (authority, resolution);
    }

    /// An outbound request arrived with this head: the key under which its picks are reported,
    /// or `None` (the default) to follow nothing of it.
    fn request(&self, head: &dyn RequestView) -> Option<RequestKey> {
        let _ = head;
        None
    }

    /// An endpoint was picked for a followed request.
    fn picked(&self, pick: &Pick<'_>) {
        let _ = pick;
    }
}

/// An observer's key for a request it follows (what [`Observer::request`] returned).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestKey(pub u64);

/// An endpoint picked for a followed request.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct Pick<'a> {
    /// The request's key.
    pub request: RequestKey,
    /// The authority, as in [`Observer::applied`].
    pub authority: &'a str,
    /// The version of the resolution in force at the pick: the one [`Observer::applied`] last
    /// reported for the authority (on a multi-threaded runtime, a pick on another thread may be
    /// reported just before the application that enabled it).
    pub version: u64,
    /// The endpoint.
    pub endpoint: SocketAddr,
    /// The pick is a hedge's: an earlier attempt of the request is still out and may answer
    /// instead.
    pub hedge: bool,
}

/// The observer that observes nothing: what the proxy uses unless given another.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoObserver;

impl Observer for NoObserver {}

/// A deliberate defect a test plants in the proxy, to show a check catches it.
#[cfg(feature = "planted-faults")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PlantedFault {
    /// When a balancer applies a resolution whose endpoints overlap (but differ from) the ones
    /// it replaces, it then applies the replaced endpoints again under the new version, as if
    /// two applications had raced and the older had won, and reports that it did.
    StaleResolution,
    /// An attempt whose upstream connection failed after the request was written (reset,
    /// closed before the response) is taken as never processed and sent again, although the
    /// endpoint may have processed it: a non-idempotent request can then reach an app twice.
    ResendMaybeProcessed,
}

/// What the proxy's balancers report to, and (with `planted-faults`) the defect planted in
/// them.
#[derive(Clone, Debug)]
pub(crate) struct Hooks {
    pub(crate) observer: std::sync::Arc<dyn Observer>,
    #[cfg(feature = "planted-faults")]
    pub(crate) planted: Option<PlantedFault>,
}

impl Default for Hooks {
    fn default() -> Self {
        Self {
            observer: std::sync::Arc::new(NoObserver),
            #[cfg(feature = "planted-faults")]
            planted: None,
        }
    }
}
