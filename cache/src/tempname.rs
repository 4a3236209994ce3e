//! Temp files every part of ferry writes the same way: created with `O_CREAT|O_EXCL|O_NOFOLLOW`
//! (never through a link, never an existing file) under a name nobody can predict (64 random bits
//! from the kernel), in the directory of the file they become, then renamed over it.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// `N` bytes from the kernel's random source (`getrandom`), for keys and names nobody can guess.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut random = [0u8; N];
    let mut filled = 0;
    while filled < N {
        // SAFETY: writes at most the remaining bytes of a local buffer.
        let n = unsafe { libc::getrandom(random[filled..].as_mut_ptr().cast(), N - filled, 0) };
        if n > 0 {
            filled += n as usize;
        }
    }
    random
}

/// A name no other process can guess: `prefix`, 16 random hex digits, `.tmp`.
pub fn unpredictable_name(prefix: &str) -> String {
    format!("{prefix}{:016x}.tmp", u64::from_le_bytes(random_bytes()))
}

/// A new file in `dir` named by [`unpredictable_name`], opened for writing (and reading) with
/// `mode` (before the umask).
pub fn create_temp(dir: &Path, prefix: &str, mode: u32) -> std::io::Result<(File, PathBuf)> {
    let path = dir.join(unpredictable_name(prefix));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(mode)
        .open(&path)?;
    Ok((file, path))
}

/// A temp file's path that removes the file when dropped (unless it was renamed or linked away
/// first, which the caller does to keep it): whatever way the work on it ends, nothing is left.
#[derive(Debug)]
pub struct TempPath(pub PathBuf);

impl std::ops::Deref for TempPath {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `bytes` written to `path` through a temp file beside it and a rename, so no reader ever sees
/// a part of them; the temp file is removed when anything fails.
pub fn write_replacing(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let (mut file, tmp) = create_temp(dir, &format!(".{name}.ferry-"), mode)?;
    let result = file.write_all(bytes).and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_files_never_follow_links_and_are_not_guessable() {
        let dir = tempfile::tempdir().unwrap();
        assert_ne!(unpredictable_name("x"), unpredictable_name("x"));
        let target = dir.path().join("out.rlib");
        write_replacing(&target, b"one", 0o644).unwrap();
        write_replacing(&target, b"two", 0o644).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"two");
        // Only the file itself is left.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // A link planted at a temp name is never written through.
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        let (_, path) = create_temp(dir.path(), "p", 0o600).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        let err = OpenOptions::new().write(true).create_new(true).custom_flags(libc::O_NOFOLLOW).open(&path);
        assert!(err.is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
    }
}
