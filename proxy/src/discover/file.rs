//! Static discovery from a mesh file, reloaded when it changes.
//!
//! The file is read once at start (an invalid file fails start-up, naming the field), then
//! polled every `poll_interval`: when its bytes change and still parse, a new snapshot is
//! published; when they no longer parse, the error is logged at `warn` and the last good mesh
//! stays in force (the proxy keeps serving with what it knew, DESIGN.md "Proxy").

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use conduit_proto::mesh_file::{self, MeshFileError};
use tokio::sync::watch;

use super::{Discover, Resolution, Snapshot};

/// Why the mesh file could not be loaded at start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FileDiscoverError {
    /// The file could not be read.
    #[error("reading mesh file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid mesh file.
    #[error("mesh file {path}: {source}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the field.
        #[source]
        source: MeshFileError,
    },
}

/// Mesh-file discovery; dropping it stops the reload task.
#[derive(Debug)]
pub struct FileDiscover {
    rx: watch::Receiver<Snapshot>,
    task: tokio::task::JoinHandle<()>,
}

impl FileDiscover {
    /// Loads `path` and starts polling it every `poll_interval`.
    ///
    /// # Errors
    ///
    /// [`FileDiscoverError`] when the file cannot be read or is invalid.
    pub async fn start(
        path: impl Into<PathBuf>,
        poll_interval: Duration,
    ) -> Result<Self, FileDiscoverError> {
        let path = path.into();
        let text = read(&path).await?;
        let mesh = mesh_file::parse(&text).map_err(|source| FileDiscoverError::Invalid {
            path: path.clone(),
            source,
        })?;
        tracing::info!(path = %path.display(), services = mesh.services().len(), "loaded mesh file");
        let (tx, rx) = watch::channel(Snapshot {
            version: 1,
            mesh: Arc::new(mesh),
        });
        let task = tokio::spawn(poll(path, poll_interval, text, tx));
        Ok(Self { rx, task })
    }
}

impl Drop for FileDiscover {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Discover for FileDiscover {
    fn resolve(&self, authority: &str) -> watch::Receiver<Resolution> {
        super::resolve_in_mesh(self.rx.clone(), authority)
    }
}

/// Reads the mesh file, at most [`mesh_file::MAX_MESH_FILE_BYTES`] of it: the read itself is
/// bounded, so a file that grows between a size check and the read (or a device that never
/// ends) cannot take the process's memory.
async fn read(path: &Path) -> Result<String, FileDiscoverError> {
    use tokio::io::AsyncReadExt as _;
    let failed = |source| FileDiscoverError::Read {
        path: path.to_owned(),
        source,
    };
    let file = tokio::fs::File::open(path).await.map_err(failed)?;
    let limit = mesh_file::MAX_MESH_FILE_BYTES;
    let mut bytes = Vec::new();
    file.take(u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1))
        .read_to_end(&mut bytes)
        .await
        .map_err(failed)?;
    if bytes.len() > limit {
        return Err(FileDiscoverError::Invalid {
            path: path.to_owned(),
            source: MeshFileError::TooLarge { size: bytes.len() },
        });
    }
    String::from_utf8(bytes).map_err(|_| {
        failed(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the mesh file is not UTF-8",
        ))
    })
}

async fn poll(path: PathBuf, interval: Duration, mut last: String, tx: watch::Sender<Snapshot>) {
    let mut version = 1;
    loop {
        tokio::time::sleep(interval).await;
        if tx.is_closed() {
            return;
        }
        let text = match read(&path).await {
            Ok(text) => text,
            Err(err) => {
                tracing::warn!(error = %err, "mesh file unreadable; keeping the last good mesh");
                continue;
            }
        };
        if text == last {
            continue;
        }
        match mesh_file::parse(&text) {
            Ok(mesh) => {
                version += 1;
                tracing::info!(
                    path = %path.display(),
                    version,
                    services = mesh.services().len(),
                    "mesh file changed; reloaded"
                );
                tx.send_replace(Snapshot {
                    version,
                    mesh: Arc::new(mesh),
                });
            }
            Err(err) => {
                tracing::warn!(path = %path.display(), error = %err, "mesh file invalid; keeping the last good mesh");
            }
        }
        last = text;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn a_file_that_never_ends_is_refused_after_the_limit() {
        // A device that never ends: the read stops one byte past the limit.
        let err = read(Path::new("/dev/zero")).await.unwrap_err();
        assert!(
            matches!(
                err,
                FileDiscoverError::Invalid {
                    source: MeshFileError::TooLarge { size },
                    ..
                } if size == mesh_file::MAX_MESH_FILE_BYTES + 1
            ),
            "{err}"
        );
    }
}
