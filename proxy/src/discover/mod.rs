//! Discovery: where the proxy learns services and their endpoints.
//!
//! A [`Discover`] hands out a watch of the latest [`Snapshot`] of the mesh. Today the one
//! production backend is [`file::FileDiscover`], a mesh file in the controller's format reloaded
//! when it changes; the controller client (issue #4) will be another implementation, and the
//! simulation and tests use [`StaticDiscover`] to push meshes by hand.

pub mod file;

use std::sync::Arc;

use conduit_core::mesh::Mesh;
use tokio::sync::watch;

pub use file::FileDiscover;

/// One version of the mesh. Versions strictly increase, so balancers can reject stale updates.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// Strictly increasing per discovery source, starting at 1.
    pub version: u64,
    /// The mesh at that version.
    pub mesh: Arc<Mesh>,
}

/// A source of mesh snapshots.
pub trait Discover: Send + Sync + 'static {
    /// A receiver that always holds the latest snapshot.
    fn subscribe(&self) -> watch::Receiver<Snapshot>;
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

    /// Publishes a new mesh under the next version.
    pub fn publish(&self, mesh: Mesh) {
        self.tx.send_modify(|snapshot| {
            snapshot.version += 1;
            snapshot.mesh = Arc::new(mesh);
        });
    }
}

impl Discover for StaticDiscover {
    fn subscribe(&self) -> watch::Receiver<Snapshot> {
        self.tx.subscribe()
    }
}

impl<D: Discover> Discover for Arc<D> {
    fn subscribe(&self) -> watch::Receiver<Snapshot> {
        (**self).subscribe()
    }
}
