//! Discovery backends: where the controller learns which services exist and what their
//! endpoints and profiles are.
//!
//! Every backend answers the same question through [`Discovery`]: *watch this name*. The answer
//! is a [`ServiceWatch`], a `tokio::sync::watch` receiver of [`ServiceSnapshot`]s. A watch
//! channel holds only the latest value, so a slow subscriber skips intermediate states but
//! never sees an older state after a newer one, and each snapshot carries the backend's
//! `generation`, which only grows.
//!
//! Backends: [`file`](mod@file) (a watched YAML mesh file, for hosts without Kubernetes and the
//! demo) and [`kubernetes`] (watches on the API server). Both publish through
//! [`publish::Publisher`].

use std::sync::Arc;

use conduit_core::mesh::Service;
use tokio::sync::watch;

pub mod file;
pub mod kubernetes;
pub mod publish;

/// The longest authority a subscriber may ask for: a 253-byte DNS name, `:` and a port.
pub const MAX_AUTHORITY_BYTES: usize = 253 + 6;

/// A source of service state that the Destination and public API services read.
pub trait Discovery: Send + Sync + 'static {
    /// Watches the service a client's authority names (`web.default` or `web.default:80`).
    ///
    /// The watch starts at the current state and then follows every change. A name no service
    /// has is watched too: its state is [`ServiceState::NotFound`] until a service with that
    /// name appears.
    ///
    /// # Errors
    ///
    /// [`WatchError`] when the authority is malformed or the backend holds as many distinct
    /// watched names as it allows.
    fn watch(&self, authority: &str) -> Result<ServiceWatch, WatchError>;

    /// Every service known now, ordered by name.
    fn services(&self) -> Vec<Arc<Service>>;

    /// Whether the backend has loaded a complete view (the file backend always has; a
    /// Kubernetes backend only after its first sync).
    fn is_ready(&self) -> bool;
}

/// What discovery knows about one name at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSnapshot {
    /// The backend's generation that produced this state. Never decreases within one watch.
    pub generation: u64,
    /// The state.
    pub state: ServiceState,
}

/// Whether a name is a service, and if so which.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceState {
    /// No service has this name (distinct from a service with no endpoints, which is
    /// `Found` with an empty endpoint list).
    NotFound,
    /// The service, with its endpoints (possibly none) and profile.
    Found(Arc<Service>),
}

/// Works out the state of a name from the backend's current view.
pub type Project = Arc<dyn Fn(&str) -> ServiceSnapshot + Send + Sync>;

/// A subscription to one name's [`ServiceSnapshot`]s.
pub struct ServiceWatch {
    inner: Inner,
}

enum Inner {
    /// A channel of its own (names of known services).
    Named(watch::Receiver<ServiceSnapshot>),
    /// No channel of its own: the name's state is worked out again on every change of the
    /// backend (names no service has, which clients may make up in any number; they share
    /// one channel and cost the backend no table entry).
    Shared {
        changes: watch::Receiver<u64>,
        authority: String,
        project: Project,
    },
}

impl core::fmt::Debug for ServiceWatch {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match &self.inner {
            Inner::Named(_) => f.write_str("ServiceWatch::Named"),
            Inner::Shared { authority, .. } => write!(f, "ServiceWatch::Shared({authority})"),
        }
    }
}

impl ServiceWatch {
    /// Wraps a watch receiver. Backends call this; the sender must only ever publish
    /// snapshots whose generation does not decrease.
    #[must_use]
    pub fn new(rx: watch::Receiver<ServiceSnapshot>) -> Self {
        Self {
            inner: Inner::Named(rx),
        }
    }

    /// Follows `authority` through a channel the backend bumps on every change, working its
    /// state out with `project`. The generations `project` reports must not decrease.
    #[must_use]
    pub fn shared(changes: watch::Receiver<u64>, authority: String, project: Project) -> Self {
        Self {
            inner: Inner::Shared {
                changes,
                authority,
                project,
            },
        }
    }

    /// The latest snapshot, marking it seen.
    pub fn latest(&mut self) -> ServiceSnapshot {
        match &mut self.inner {
            Inner::Named(rx) => rx.borrow_and_update().clone(),
            Inner::Shared {
                changes,
                authority,
                project,
            } => {
                changes.borrow_and_update();
                project(authority)
            }
        }
    }

    /// Whether a snapshot newer than the last one seen may have been published (for a name no
    /// service had, any change of the backend counts).
    #[must_use]
    pub fn has_changed(&self) -> bool {
        match &self.inner {
            Inner::Named(rx) => rx.has_changed().unwrap_or(true),
            Inner::Shared { changes, .. } => changes.has_changed().unwrap_or(true),
        }
    }

    /// Waits until a snapshot newer than the last one seen may have been published.
    ///
    /// # Errors
    ///
    /// [`Closed`] when the backend has stopped and no newer snapshot will come.
    pub async fn changed(&mut self) -> Result<(), Closed> {
        match &mut self.inner {
            Inner::Named(rx) => rx.changed().await.map_err(|_| Closed),
            Inner::Shared { changes, .. } => changes.changed().await.map_err(|_| Closed),
        }
    }
}

/// The discovery backend stopped publishing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("discovery backend stopped")]
pub struct Closed;

/// Why a watch could not be started.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WatchError {
    /// The authority is empty or longer than [`MAX_AUTHORITY_BYTES`].
    #[error("invalid authority ({len} bytes): must be 1 to {MAX_AUTHORITY_BYTES} bytes")]
    InvalidAuthority {
        /// Its length in bytes.
        len: usize,
    },
    /// The backend already watches its maximum number of distinct names.
    #[error("too many distinct names watched (limit {max})")]
    TooManyWatches {
        /// The limit.
        max: usize,
    },
}

/// Checks an authority's length before a backend keys anything by it.
///
/// # Errors
///
/// [`WatchError::InvalidAuthority`].
pub fn check_authority(authority: &str) -> Result<(), WatchError> {
    if authority.is_empty() || authority.len() > MAX_AUTHORITY_BYTES {
        return Err(WatchError::InvalidAuthority {
            len: authority.len(),
        });
    }
    Ok(())
}
