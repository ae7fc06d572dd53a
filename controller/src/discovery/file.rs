//! The file backend: a YAML mesh file (DESIGN.md, "The mesh file"), watched for changes.
//!
//! Three parts, so that only the last one touches IO:
//!
//! - [`FileDiscovery`] holds the last good [`Mesh`] and publishes it to watchers. It is also the
//!   seam the simulation uses: it can call [`FileDiscovery::replace`] directly, with no file.
//! - [`MeshFileTracker`] decides what a file read means: unchanged, a good edit to publish, or a
//!   bad edit to reject (with the error naming the field). A bad edit never replaces the last
//!   good mesh, and the same bad contents are reported once, not on every poll.
//! - [`watch_mesh_file`] polls the file on a `tokio::time` interval, reads it (bounded by
//!   [`MAX_MESH_FILE_BYTES`]) and feeds the tracker. Polling rather than inotify keeps the
//!   backend portable and deterministic; it compares whole contents rather than mtimes, so
//!   two edits within the clock's granularity are not missed.
//!
//! Write the file atomically (write a temporary file, then rename it over the old one): a
//! poll that catches a file half-written sees either a decoding error (rejected and logged,
//! then corrected on the next poll) or, worse, a shorter file that happens to be valid.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use conduit_core::mesh::{Mesh, Service};
use conduit_proto::mesh_file::{self, MAX_MESH_FILE_BYTES, MeshFileError};
use tokio::io::AsyncReadExt as _;

use super::publish::{Publisher, View};
use super::{Discovery, ServiceWatch, WatchError};
use crate::metrics::Metrics;

pub use super::publish::MAX_WATCHED_NAMES;

/// Discovery from a mesh file: the last good mesh, published to per-name watches.
///
/// Cloning is cheap and clones share state.
#[derive(Clone, Debug)]
pub struct FileDiscovery {
    publisher: Publisher<MeshView>,
}

/// A mesh as a [`View`]: its services by name, shared with the snapshots that hold them.
#[derive(Debug)]
struct MeshView {
    mesh: Mesh,
    services: BTreeMap<String, Arc<Service>>,
}

impl MeshView {
    fn new(mesh: Mesh) -> Self {
        let services = mesh
            .services()
            .map(|s| (s.name.clone(), Arc::new(s.clone())))
            .collect();
        Self { mesh, services }
    }
}

impl View for MeshView {
    fn lookup(&self, authority: &str) -> Option<Arc<Service>> {
        let service = self.mesh.lookup(authority)?;
        self.services.get(&service.name).cloned()
    }

    fn services(&self) -> Vec<Arc<Service>> {
        self.services.values().cloned().collect()
    }
}

impl FileDiscovery {
    /// Starts serving `mesh` as generation 1.
    #[must_use]
    pub fn new(mesh: Mesh) -> Self {
        Self {
            publisher: Publisher::new(MeshView::new(mesh)),
        }
    }

    /// Publishes a new mesh and returns its generation.
    ///
    /// Only watches whose service changed are woken; a watch of a name that disappeared sees
    /// [`ServiceState::NotFound`](super::ServiceState::NotFound).
    pub fn replace(&self, mesh: Mesh) -> u64 {
        let services = mesh.services().len();
        let generation = self.publisher.replace(MeshView::new(mesh));
        tracing::debug!(generation, services, "published mesh");
        generation
    }

    /// The generation of the mesh being served (1 for the initial one).
    #[must_use]
    pub fn generation(&self) -> u64 {
        self.publisher.generation()
    }

    /// The number of distinct names being watched (including ones whose last watcher left
    /// since the last prune).
    #[must_use]
    pub fn watched_names(&self) -> usize {
        self.publisher.watched_names()
    }
}

impl Discovery for FileDiscovery {
    fn watch(&self, authority: &str) -> Result<ServiceWatch, WatchError> {
        self.publisher.watch(authority)
    }

    fn services(&self) -> Vec<Arc<Service>> {
        self.publisher.services()
    }

    fn is_ready(&self) -> bool {
        self.publisher.is_ready()
    }
}

// === The file ===

/// Why the mesh file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read mesh file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// The file is larger than [`MAX_MESH_FILE_BYTES`].
    #[error("mesh file {} is larger than {MAX_MESH_FILE_BYTES} bytes", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// The file is not a valid mesh; the error names the field.
    #[error("mesh file {}: {source}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the field's path.
        #[source]
        source: MeshFileError,
    },
}

/// Reads the mesh file, at most [`MAX_MESH_FILE_BYTES`] of it.
///
/// # Errors
///
/// [`LoadError::Read`] or [`LoadError::TooLarge`].
pub async fn read_mesh_file(path: &Path) -> Result<Vec<u8>, LoadError> {
    let read_error = |source| LoadError::Read {
        path: path.to_owned(),
        source,
    };
    let file = tokio::fs::File::open(path).await.map_err(read_error)?;
    let limit = u64::try_from(MAX_MESH_FILE_BYTES)
        .unwrap_or(u64::MAX)
        .saturating_add(1);
    let mut contents = Vec::new();
    file.take(limit)
        .read_to_end(&mut contents)
        .await
        .map_err(read_error)?;
    if contents.len() > MAX_MESH_FILE_BYTES {
        return Err(LoadError::TooLarge {
            path: path.to_owned(),
        });
    }
    Ok(contents)
}

/// Decodes and validates mesh file contents.
///
/// # Errors
///
/// [`LoadError::Invalid`] naming the field, for non-UTF-8 text too.
pub fn parse_mesh(path: &Path, contents: &[u8]) -> Result<Mesh, LoadError> {
    let invalid = |source| LoadError::Invalid {
        path: path.to_owned(),
        source,
    };
    let text = std::str::from_utf8(contents).map_err(|err| {
        invalid(MeshFileError::Decode {
            path: String::new(),
            message: format!("not UTF-8 text: {err}"),
        })
    })?;
    mesh_file::parse(text).map_err(invalid)
}

/// Reads and validates the mesh file once, as at start-up.
///
/// Returns the mesh and the tracker to keep watching it with.
///
/// # Errors
///
/// [`LoadError`] naming the problem (and, for an invalid mesh, the field).
pub async fn load_mesh_file(path: &Path) -> Result<(Mesh, MeshFileTracker), LoadError> {
    let contents = read_mesh_file(path).await?;
    let mesh = parse_mesh(path, &contents)?;
    Ok((mesh, MeshFileTracker::new(path.to_owned(), contents)))
}

/// What one read of the mesh file means.
#[derive(Debug)]
pub enum Reload {
    /// The contents are what was seen last; nothing to do.
    Unchanged,
    /// A good edit: publish this mesh.
    Changed(Mesh),
    /// A bad edit, or the file could not be read: keep serving the last good mesh.
    Rejected(LoadError),
}

/// Turns successive reads of the mesh file into [`Reload`] decisions. Sans-IO: the caller
/// reads the file.
#[derive(Debug)]
pub struct MeshFileTracker {
    path: PathBuf,
    last: Seen,
}

#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Contents(Vec<u8>),
    ReadError(io::ErrorKind),
    TooLarge,
}

impl MeshFileTracker {
    /// A tracker whose last seen contents (already published) are `contents`.
    #[must_use]
    pub fn new(path: PathBuf, contents: Vec<u8>) -> Self {
        Self {
            path,
            last: Seen::Contents(contents),
        }
    }

    /// The file being tracked.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Decides what a read of the file means. The same bad contents, or the same read error,
    /// twice in a row is [`Reload::Unchanged`] the second time, so each bad edit is reported
    /// once.
    pub fn handle_read(&mut self, read: Result<Vec<u8>, LoadError>) -> Reload {
        match read {
            Ok(contents) => {
                if matches!(&self.last, Seen::Contents(last) if *last == contents) {
                    return Reload::Unchanged;
                }
                let parsed = parse_mesh(&self.path, &contents);
                self.last = Seen::Contents(contents);
                match parsed {
                    Ok(mesh) => Reload::Changed(mesh),
                    Err(err) => Reload::Rejected(err),
                }
            }
            Err(err) => {
                let seen = match &err {
                    LoadError::Read { source, .. } => Seen::ReadError(source.kind()),
                    _ => Seen::TooLarge,
                };
                if seen == self.last {
                    return Reload::Unchanged;
                }
                self.last = seen;
                Reload::Rejected(err)
            }
        }
    }
}

/// Polls the mesh file every `interval` and publishes good edits to `discovery`, forever.
///
/// Bad edits are logged at `warn` with the error naming the field and counted in `metrics`;
/// the last good mesh keeps serving. Run it as a task and abort it to stop.
pub async fn watch_mesh_file(
    mut tracker: MeshFileTracker,
    interval: Duration,
    discovery: FileDiscovery,
    metrics: Arc<Metrics>,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick completes at once; the initial contents are already published.
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let read = read_mesh_file(tracker.path()).await;
        match tracker.handle_read(read) {
            Reload::Unchanged => {}
            Reload::Changed(mesh) => {
                let services = mesh.services().len();
                let generation = discovery.replace(mesh);
                metrics.record_mesh_reload(generation, services);
                tracing::info!(generation, services, path = %tracker.path().display(), "mesh file reloaded");
            }
            Reload::Rejected(err) => {
                metrics.record_mesh_reject();
                tracing::warn!(error = %err, "mesh file edit rejected; serving the last good mesh");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::ServiceState;

    fn mesh(text: &str) -> Mesh {
        mesh_file::parse(text).unwrap()
    }

    const ONE: &str = "services:\n  web.default:\n    endpoints:\n      - addr: 127.0.0.1:9001\n";
    const TWO: &str = "services:\n  web.default:\n    endpoints:\n      - addr: 127.0.0.1:9001\n      - addr: 127.0.0.1:9002\n";
    const OTHER: &str = "services:\n  web.default:\n    endpoints:\n      - addr: 127.0.0.1:9001\n  api.default: {}\n";

    #[test]
    fn watches_see_only_their_service_change() {
        let discovery = FileDiscovery::new(mesh(ONE));
        let mut web = discovery.watch("web.default:80").unwrap();
        let mut nope = discovery.watch("nope.default").unwrap();
        assert_eq!(nope.latest().state, ServiceState::NotFound);
        let ServiceState::Found(first) = web.latest().state else {
            panic!("found")
        };
        assert_eq!(first.endpoints.len(), 1);

        // A change elsewhere in the mesh does not wake the web watch. The watch of a name no
        // service has is woken by every change (it shares one channel) and finds it unchanged.
        assert_eq!(discovery.replace(mesh(OTHER)), 2);
        assert!(!web.has_changed());
        assert!(nope.has_changed());
        assert_eq!(nope.latest().state, ServiceState::NotFound);

        assert_eq!(discovery.replace(mesh(TWO)), 3);
        assert!(web.has_changed());
        let snapshot = web.latest();
        assert_eq!(snapshot.generation, 3);
        let ServiceState::Found(second) = snapshot.state else {
            panic!("found")
        };
        assert_eq!(second.endpoints.len(), 2);
    }

    #[test]
    fn a_wrong_port_is_not_found_and_names_are_case_insensitive() {
        let discovery = FileDiscovery::new(mesh(ONE));
        assert_eq!(
            discovery.watch("web.default:81").unwrap().latest().state,
            ServiceState::NotFound
        );
        assert!(matches!(
            discovery.watch("WEB.default").unwrap().latest().state,
            ServiceState::Found(_)
        ));
        // Only the known service takes a table entry.
        assert_eq!(discovery.watched_names(), 1);
        assert!(matches!(
            discovery.watch(""),
            Err(WatchError::InvalidAuthority { len: 0 })
        ));
    }

    #[test]
    fn abandoned_watches_are_pruned() {
        let discovery = FileDiscovery::new(mesh(ONE));
        drop(discovery.watch("web.default").unwrap());
        let _kept = discovery.watch("web.default:80").unwrap();
        discovery.replace(mesh(ONE));
        assert_eq!(discovery.watched_names(), 1);
    }

    #[test]
    fn made_up_names_take_no_table_entry_and_see_their_service_appear() {
        let discovery = FileDiscovery::new(mesh(ONE));
        let mut made_up: Vec<ServiceWatch> = (0..MAX_WATCHED_NAMES + 100)
            .map(|i| discovery.watch(&format!("made-up-{i}.default")).unwrap())
            .collect();
        assert_eq!(discovery.watched_names(), 0);
        // A real service still resolves.
        assert!(matches!(
            discovery.watch("web.default").unwrap().latest().state,
            ServiceState::Found(_)
        ));
        // A made-up name that becomes a service is seen.
        discovery.replace(mesh(
            "services:\n  made-up-7.default:\n    endpoints:\n      - addr: 127.0.0.1:9009\n",
        ));
        assert!(made_up[7].has_changed());
        assert!(matches!(made_up[7].latest().state, ServiceState::Found(_)));
        assert_eq!(made_up[8].latest().state, ServiceState::NotFound);
    }

    #[test]
    fn the_tracker_rejects_bad_edits_once_and_keeps_going() {
        let path = PathBuf::from("mesh.yaml");
        let mut tracker = MeshFileTracker::new(path.clone(), ONE.into());
        assert!(matches!(
            tracker.handle_read(Ok(ONE.into())),
            Reload::Unchanged
        ));
        assert!(matches!(
            tracker.handle_read(Ok(TWO.into())),
            Reload::Changed(_)
        ));

        let bad = "services:\n  web.default:\n    endpoints:\n      - addr: nope\n";
        let Reload::Rejected(err) = tracker.handle_read(Ok(bad.into())) else {
            panic!("rejected")
        };
        assert!(
            err.to_string()
                .contains("services.web.default.endpoints[0].addr"),
            "{err}"
        );
        assert!(
            matches!(tracker.handle_read(Ok(bad.into())), Reload::Unchanged),
            "reported once"
        );

        let gone = || {
            Err(LoadError::Read {
                path: path.clone(),
                source: io::ErrorKind::NotFound.into(),
            })
        };
        assert!(matches!(tracker.handle_read(gone()), Reload::Rejected(_)));
        assert!(matches!(tracker.handle_read(gone()), Reload::Unchanged));

        // Back to a good file, even the one already published: publish (a no-op for watchers).
        assert!(matches!(
            tracker.handle_read(Ok(TWO.into())),
            Reload::Changed(_)
        ));
        assert!(matches!(
            tracker.handle_read(Ok(vec![0xff, 0xfe])),
            Reload::Rejected(_)
        ));
    }
}
