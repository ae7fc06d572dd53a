//! Discovery: where the proxy learns, per authority, which service it names and its endpoints.
//!
//! Resolution is per authority and on demand, as Linkerd's is: the first request for an
//! authority asks its [`Discover`] to [`resolve`](Discover::resolve) it and gets a watch of
//! that authority's [`Resolution`]: [`Unknown`](Resolution::Unknown) until discovery answers,
//! then [`NotFound`](Resolution::NotFound) (the proxy answers 404, or sends a request that
//! came on a redirected connection to where that connection was headed) or a
//! [`Service`](Resolution::Service) with its endpoints and route profile, updated as they
//! change. Requests for an authority that is still unknown wait in the core's queue and fail
//! fast (504) if no answer comes in time. When the proxy stops using an authority (the router
//! drops it after an idle period) it drops the receiver, and the backend may stop following
//! the authority (the controller client cancels its streams); the next request resolves again.
//!
//! A resolution never goes back to `Unknown`, and a backend that loses its source (the
//! controller is unreachable, the mesh file turns invalid) keeps publishing nothing rather than
//! forgetting: the proxy keeps serving with what it last knew (DESIGN.md, "Proxy").
//!
//! Backends:
//! - [`controller::ControllerDiscover`]: the controller's `Destination` API (`Get` and
//!   `GetProfile` per authority), the production backend;
//! - [`file::FileDiscover`]: a mesh file in the controller's format, reloaded when it changes;
//! - [`StaticDiscover`]: meshes pushed by hand (tests and the simulation).

pub mod controller;
pub mod file;

use std::sync::Arc;

use conduit_core::mesh::{Mesh, Service};
use tokio::sync::watch;

pub use controller::ControllerDiscover;
pub use file::FileDiscover;

/// What discovery knows about one authority.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// Discovery has not answered yet: requests wait (and fail fast with 504).
    Unknown,
    /// No service has this name: requests get 404, or go to their connection's original
    /// destination when a redirect sent it to the proxy.
    NotFound,
    /// The authority names this service.
    Service {
        /// Strictly increasing for one authority's receiver: a later resolution always has a
        /// higher version, so a stale one can be recognised and ignored.
        version: u64,
        /// The service: its name and port (the metrics authority), endpoints (possibly none)
        /// and route profile.
        service: Arc<Service>,
    },
}

impl Resolution {
    /// Whether two resolutions say the same thing, versions aside.
    #[must_use]
    pub fn same_state(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Unknown, Self::Unknown) | (Self::NotFound, Self::NotFound) => true,
            (Self::Service { service: a, .. }, Self::Service { service: b, .. }) => a == b,
            _ => false,
        }
    }
}

/// A source of per-authority resolutions.
pub trait Discover: Send + Sync + 'static {
    /// Starts (or joins) following `authority` (`host[:port]` as the request carried it) and
    /// returns a receiver that always holds its latest resolution. Dropping every receiver for
    /// an authority tells the backend it is no longer used.
    ///
    /// Called from within the proxy's tokio runtime (backends may spawn).
    fn resolve(&self, authority: &str) -> watch::Receiver<Resolution>;

    /// Appends the backend's metric families (Prometheus text) to `out`; none by default.
    fn render_metrics(&self, out: &mut String) {
        let _ = out;
    }
}

impl<D: Discover> Discover for Arc<D> {
    fn resolve(&self, authority: &str) -> watch::Receiver<Resolution> {
        (**self).resolve(authority)
    }

    fn render_metrics(&self, out: &mut String) {
        (**self).render_metrics(out);
    }
}

/// One version of a whole mesh, as the mesh-based backends hold it. Versions strictly
/// increase.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// Strictly increasing per discovery source, starting at 1.
    pub version: u64,
    /// The mesh at that version.
    pub mesh: Arc<Mesh>,
}

/// Discovery pushed by hand: tests and the simulation call [`StaticDiscover::publish`].
#[derive(Debug)]
pub struct StaticDiscover {
    tx: watch::Sender<Snapshot>,
}

impl StaticDiscover {
    /// Starts with `mesh` at version 1.
    #[must_use]
    pub fn new(mesh: Mesh) -> Self {
        let (tx, _) = watch::channel(Snapshot {
            version: 1,
            mesh: Arc::new(mesh),
        });
        Self { tx }
    }

    /// Publishes a new mesh under the next version; every authority in use is resolved again
    /// against it.
    pub fn publish(&self, mesh: Mesh) {
        self.tx.send_modify(|snapshot| {
            snapshot.version += 1;
            snapshot.mesh = Arc::new(mesh);
        });
    }
}

impl Discover for StaticDiscover {
    fn resolve(&self, authority: &str) -> watch::Receiver<Resolution> {
        resolve_in_mesh(self.tx.subscribe(), authority)
    }
}

/// Resolves `authority` against a whole-mesh watch: answers at once from the current mesh,
/// then follows mesh changes on a task that ends when the receiver is dropped.
pub(crate) fn resolve_in_mesh(
    mut meshes: watch::Receiver<Snapshot>,
    authority: &str,
) -> watch::Receiver<Resolution> {
    let first = lookup(&meshes.borrow_and_update(), authority);
    let (tx, rx) = watch::channel(first);
    let authority = authority.to_owned();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                changed = meshes.changed() => {
                    if changed.is_err() {
                        // The source is gone: keep the last resolution until nobody needs it.
                        tx.closed().await;
                        return;
                    }
                }
                () = tx.closed() => return,
            }
            let next = lookup(&meshes.borrow_and_update(), &authority);
            tx.send_if_modified(|current| {
                if current.same_state(&next) {
                    return false;
                }
                *current = next;
                true
            });
        }
    });
    rx
}

/// The resolution of `authority` in one mesh snapshot; the snapshot's version orders it.
fn lookup(snapshot: &Snapshot, authority: &str) -> Resolution {
    match snapshot.mesh.lookup(authority) {
        Some(service) => Resolution::Service {
            version: snapshot.version,
            service: Arc::new(service.clone()),
        },
        None => Resolution::NotFound,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mesh(yaml: &str) -> Mesh {
        conduit_proto::mesh_file::parse(yaml).expect("valid mesh")
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn static_discovery_resolves_per_authority_and_follows_publishes() {
        let discover = StaticDiscover::new(mesh(
            "services:\n  web.test:\n    endpoints:\n      - addr: 127.0.0.1:1\n",
        ));
        let mut web = discover.resolve("web.test");
        let mut other = discover.resolve("other.test:80");
        assert_eq!(*other.borrow(), Resolution::NotFound);
        let Resolution::Service { version, service } = web.borrow_and_update().clone() else {
            panic!("web.test is in the mesh");
        };
        assert_eq!((version, service.port, service.endpoints.len()), (1, 80, 1));

        discover.publish(mesh(
            "services:\n  web.test:\n    endpoints:\n      - addr: 127.0.0.1:1\n      - addr: 127.0.0.1:2\n  other.test: {}\n",
        ));
        web.changed().await.expect("follows");
        other.changed().await.expect("follows");
        let Resolution::Service { version, service } = web.borrow_and_update().clone() else {
            panic!("still there");
        };
        assert_eq!((version, service.endpoints.len()), (2, 2));
        assert!(matches!(*other.borrow(), Resolution::Service { .. }));
    }
}
