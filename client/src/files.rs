//! The small files the wrapper coordinates through in its cache dir: lock files, and marker files
//! whose age says whether they are still in force.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The lock a background upload of `toolchain` holds while it runs; beside it, with the
/// extension `started`, the marker of its last attempt (see `compile::remote`).
pub fn toolchain_upload_lock(cache_dir: &Path, toolchain: &ferry_toolchains::ToolchainId) -> PathBuf {
    cache_dir.join("toolchains/locks").join(format!("upload-{toolchain}.lock"))
}

/// Opens (creating it and its directory) the lock file at `path`, without locking it.
pub fn lock_file(path: &Path) -> std::io::Result<File> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::OpenOptions::new().create(true).truncate(false).write(true).open(path)
}

/// True when `path` exists and was modified less than `within` ago (a marker file still in force).
pub fn fresh(path: &Path, within: Duration) -> bool {
    fs::metadata(path).and_then(|m| m.modified()).is_ok_and(|t| t.elapsed().is_ok_and(|age| age < within))
}
