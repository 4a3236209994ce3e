//! Opening files a job left in its tree without ever following a link: every component is opened
//! relative to the one before with `O_NOFOLLOW` (`openat`), starting from the tree itself, so a
//! symlink, `..` or an absolute path planted by a process left in the sandbox cannot lead outside.
//! The file must be a regular file (a FIFO or a device is refused; it is opened non-blocking so a
//! FIFO cannot hang the worker), and it is read with a size cap.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

/// Opens `rel` (a path inside `tree`, with or without a leading `/`) beneath `tree`.
pub fn open_beneath(tree: &Path, rel: &str) -> io::Result<File> {
    let refused = |what: &str| io::Error::new(io::ErrorKind::PermissionDenied, format!("{rel}: {what}"));
    let root = CString::new(tree.as_os_str().as_bytes()).map_err(|_| refused("NUL in the tree path"))?;
    // SAFETY: a NUL-terminated path; the descriptor returned is owned below.
    let fd = unsafe { libc::open(root.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor.
    let mut dir = unsafe { OwnedFd::from_raw_fd(fd) };
    let parts: Vec<&std::ffi::OsStr> = Path::new(rel.trim_start_matches('/'))
        .components()
        .map(|c| match c {
            Component::Normal(name) => Ok(name),
            _ => Err(refused("only plain path components are allowed")),
        })
        .collect::<io::Result<_>>()?;
    let Some((last, dirs)) = parts.split_last() else { return Err(refused("empty path")) };
    for name in dirs {
        dir = open_at(&dir, name, libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)?;
    }
    let file = File::from(open_at(&dir, last, libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)?);
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(refused("not a regular file"));
    }
    Ok(file)
}

/// Reads a file opened beneath the tree, refusing more than `cap` bytes.
pub fn read_beneath(tree: &Path, rel: &str, cap: u64) -> io::Result<Vec<u8>> {
    let file = open_beneath(tree, rel)?;
    let len = file.metadata()?.len();
    if len > cap {
        return Err(io::Error::new(io::ErrorKind::FileTooLarge, format!("{rel}: {len} bytes, over the cap of {cap}")));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(cap + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > cap {
        return Err(io::Error::new(io::ErrorKind::FileTooLarge, format!("{rel}: grew over the cap of {cap}")));
    }
    Ok(bytes)
}

fn open_at(dir: &OwnedFd, name: &std::ffi::OsStr, flags: libc::c_int) -> io::Result<OwnedFd> {
    let name =
        CString::new(name.as_bytes()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a name"))?;
    // SAFETY: a valid directory descriptor and a NUL-terminated name.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_fifos_and_escapes_are_refused() {
        let tree = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "host file").unwrap();
        std::fs::create_dir_all(tree.path().join("out")).unwrap();
        std::fs::write(tree.path().join("out/lib.rmeta"), "metadata").unwrap();
        assert_eq!(read_beneath(tree.path(), "/out/lib.rmeta", 100).unwrap(), b"metadata");
        std::os::unix::fs::symlink(outside.path().join("secret"), tree.path().join("out/link")).unwrap();
        std::os::unix::fs::symlink(outside.path(), tree.path().join("dirlink")).unwrap();
        assert!(read_beneath(tree.path(), "/out/link", 100).is_err(), "a symlinked file");
        assert!(read_beneath(tree.path(), "/dirlink/secret", 100).is_err(), "a symlinked directory");
        assert!(read_beneath(tree.path(), "/out/../../etc/passwd", 100).is_err(), "..");
        let fifo = CString::new(tree.path().join("out/fifo").as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        assert!(read_beneath(tree.path(), "/out/fifo", 100).is_err(), "a FIFO");
        assert!(read_beneath(tree.path(), "/out/lib.rmeta", 3).is_err(), "over the cap");
    }
}
