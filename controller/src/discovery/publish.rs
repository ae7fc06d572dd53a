//! Publishing a backend's view to per-name watches: the part every backend shares.
//!
//! A backend builds a [`View`] of what it knows (the file backend: the last good mesh; the
//! Kubernetes backend: services, endpoints and profiles as the API server last said) and hands
//! each new one to [`Publisher::replace`]. The publisher wakes only the watches whose service
//! changed, and a watch of a name no service has shares one channel with every other such
//! name, so clients asking for made-up names cost no table entry.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use conduit_core::mesh::Service;
use tokio::sync::watch;

use super::check_authority;
use super::{Discovery, Project, ServiceSnapshot, ServiceState, ServiceWatch, WatchError};

/// The most distinct names of known services watched with a channel of their own at once
/// (names nobody watches any more are pruned). Names no service has take no entry: their
/// watches share one channel and work their state out on every change, so clients asking for
/// any number of made-up names cannot fill this table and keep other proxies from resolving
/// real services.
pub const MAX_WATCHED_NAMES: usize = 10_000;

/// What a backend knows at one moment, as the publisher asks it.
pub trait View: Send + 'static {
    /// The service a lower-cased authority (`host[:port]`) names, if any.
    fn lookup(&self, authority: &str) -> Option<Arc<Service>>;

    /// Every service, ordered by name and port.
    fn services(&self) -> Vec<Arc<Service>>;
}

/// A backend's current [`View`], published to watches. Cloning is cheap and clones share state.
#[derive(Debug)]
pub struct Publisher<V> {
    shared: Arc<Mutex<State<V>>>,
}

impl<V> Clone for Publisher<V> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

#[derive(Debug)]
struct State<V> {
    view: V,
    generation: u64,
    /// Whether the view is complete (a backend that syncs first starts without).
    ready: bool,
    /// Watched authorities (lower-cased) of known services, and their channels.
    watches: BTreeMap<String, watch::Sender<ServiceSnapshot>>,
    /// Bumped (to the generation) on every change: the shared channel of watches of names no
    /// service had when they were asked for.
    changes: watch::Sender<u64>,
}

impl<V: View> State<V> {
    fn project(&self, authority: &str) -> ServiceState {
        match self.view.lookup(authority) {
            Some(service) => ServiceState::Found(service),
            None => ServiceState::NotFound,
        }
    }

    fn prune(&mut self) {
        self.watches.retain(|_, tx| tx.receiver_count() > 0);
    }
}

impl<V: View> Publisher<V> {
    /// Serves `view` as generation 1, ready.
    #[must_use]
    pub fn new(view: V) -> Self {
        Self::with_readiness(view, true)
    }

    /// Serves `view` as generation 1 but not ready ([`Discovery::is_ready`] is false) until the
    /// first [`replace`](Self::replace): for a backend that must sync before it knows anything.
    #[must_use]
    pub fn unready(view: V) -> Self {
        Self::with_readiness(view, false)
    }

    fn with_readiness(view: V, ready: bool) -> Self {
        let state = State {
            view,
            generation: 1,
            ready,
            watches: BTreeMap::new(),
            changes: watch::Sender::new(1),
        };
        Self {
            shared: Arc::new(Mutex::new(state)),
        }
    }

    /// Publishes a new view, marks the publisher ready, and returns the view's generation.
    ///
    /// Only watches whose service changed are woken; a watch of a name that disappeared sees
    /// [`ServiceState::NotFound`].
    pub fn replace(&self, view: V) -> u64 {
        let mut state = self.lock();
        state.generation += 1;
        state.view = view;
        state.ready = true;
        state.prune();
        let generation = state.generation;
        for (authority, tx) in &state.watches {
            let next = state.project(authority);
            tx.send_if_modified(|snapshot| {
                if snapshot.state == next {
                    false
                } else {
                    *snapshot = ServiceSnapshot {
                        generation,
                        state: next,
                    };
                    true
                }
            });
        }
        state.changes.send_replace(generation);
        generation
    }

    /// The generation of the view being served (1 for the initial one).
    #[must_use]
    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// The number of distinct names being watched (including ones whose last watcher left
    /// since the last prune).
    #[must_use]
    pub fn watched_names(&self) -> usize {
        self.lock().watches.len()
    }

    fn lock(&self) -> MutexGuard<'_, State<V>> {
        // Every critical section leaves the state consistent, so a panic elsewhere while the
        // lock was held cannot have left it half-updated.
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<V: View> Discovery for Publisher<V> {
    fn watch(&self, authority: &str) -> Result<ServiceWatch, WatchError> {
        check_authority(authority)?;
        let key = authority.to_ascii_lowercase();
        let mut state = self.lock();
        if let Some(tx) = state.watches.get(&key) {
            return Ok(ServiceWatch::new(tx.subscribe()));
        }
        if matches!(state.project(&key), ServiceState::NotFound) {
            let shared = Arc::clone(&self.shared);
            let project: Project = Arc::new(move |authority: &str| {
                let state = shared.lock().unwrap_or_else(PoisonError::into_inner);
                ServiceSnapshot {
                    generation: state.generation,
                    state: state.project(authority),
                }
            });
            return Ok(ServiceWatch::shared(
                state.changes.subscribe(),
                key,
                project,
            ));
        }
        if state.watches.len() >= MAX_WATCHED_NAMES {
            state.prune();
            if state.watches.len() >= MAX_WATCHED_NAMES {
                return Err(WatchError::TooManyWatches {
                    max: MAX_WATCHED_NAMES,
                });
            }
        }
        let snapshot = ServiceSnapshot {
            generation: state.generation,
            state: state.project(&key),
        };
        let (tx, rx) = watch::channel(snapshot);
        state.watches.insert(key, tx);
        Ok(ServiceWatch::new(rx))
    }

    fn services(&self) -> Vec<Arc<Service>> {
        self.lock().view.services()
    }

    fn is_ready(&self) -> bool {
        self.lock().ready
    }
}
