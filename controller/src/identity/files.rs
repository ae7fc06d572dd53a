//! The identity directory's file operations: bounded reads, and writes that land whole with
//! their mode from the start.

use std::fs;
use std::io::{self, Read as _, Write as _};
use std::path::{Path, PathBuf};

/// The largest identity file read (a bundle of a few anchors is a few KiB).
pub(super) const MAX_FILE_BYTES: u64 = 256 * 1024;

/// Mode of private keys.
pub(super) const KEY_MODE: u32 = 0o600;

/// Mode of certificates.
pub(super) const CERT_MODE: u32 = 0o644;

/// Mode of the identity directory.
pub(super) const DIR_MODE: u32 = 0o700;

/// Why a file could not be read.
#[derive(Debug)]
pub(super) enum ReadError {
    /// The OS said no (including "not found").
    Io(io::Error),
    /// Larger than [`MAX_FILE_BYTES`].
    TooLarge,
}

/// Reads a whole file of at most [`MAX_FILE_BYTES`].
pub(super) fn read(path: &Path) -> Result<Vec<u8>, ReadError> {
    let file = fs::File::open(path).map_err(ReadError::Io)?;
    let mut contents = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut contents)
        .map_err(ReadError::Io)?;
    if contents.len() as u64 > MAX_FILE_BYTES {
        return Err(ReadError::TooLarge);
    }
    Ok(contents)
}

/// Whether `path` exists (a broken symlink or an unreadable parent count as absent; the read
/// that follows reports the real error).
pub(super) fn exists(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

/// Creates the directory (and missing parents) with mode 0700.
pub(super) fn create_dir(dir: &Path) -> io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, DIR_MODE);
    builder.create(dir)
}

/// Writes `contents` to `path` whole: into a temporary file beside it, created with `mode`,
/// then renamed over `path`. A reader sees the old file or the new one, never half of one,
/// and a key is never readable by others, not even for a moment.
pub(super) fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let tmp = temporary(path);
    match fs::remove_file(&tmp) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(err),
        _ => {}
    }
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    let mut file = options.open(&tmp)?;
    // The umask may have taken bits from `mode` (never added any): set it exactly, before a
    // byte is written.
    #[cfg(unix)]
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))?;
    #[cfg(not(unix))]
    let _ = mode;
    let written = file.write_all(contents).and_then(|()| file.sync_all());
    drop(file);
    if let Err(err) = written.and_then(|()| fs::rename(&tmp, path)) {
        let _ = fs::remove_file(&tmp);
        return Err(err);
    }
    Ok(())
}

fn temporary(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".tmp");
    path.with_file_name(name)
}

/// The permission bits of `path`, where the platform has them.
#[cfg(unix)]
pub(super) fn mode(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::metadata(path)
        .ok()
        .map(|m| m.permissions().mode() & 0o777)
}

/// The permission bits of `path`, where the platform has them.
#[cfg(not(unix))]
pub(super) fn mode(_path: &Path) -> Option<u32> {
    None
}
