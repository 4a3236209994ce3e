//! Digests of files shipped to workers, remembered across wrapper processes.
//!
//! A remote compile ships the dependency directory's metadata and proc-macro files, often
//! hundreds of megabytes; hashing them for every job would cost more than the job. So, like the
//! toolchain weak key, a digest is remembered under the file's stat fingerprint (size, mtime,
//! ctime, inode, device): any write changes the ctime, so a changed file is hashed again. One small
//! file per path under `<cache dir>/digests/`, replaced atomically; a damaged one is just a miss.
//! (Workers verify every blob they receive against its digest in any case.)
//!
//! Cache keys never use this: the local key hashes content on every compile.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

static DIR: OnceLock<PathBuf> = OnceLock::new();

/// Where the memo lives (created when the first digest is written).
pub fn init(cache_dir: &Path) {
    let _ = DIR.set(cache_dir.join("digests"));
}

/// The blake3 of `path`'s content, from the memo when its fingerprint matches.
pub fn digest(path: &Path, meta: &fs::Metadata) -> Option<[u8; 32]> {
    let stamp = format!(
        "{} {}.{} {}.{} {} {}",
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec(),
        meta.ino(),
        meta.dev()
    );
    let memo = DIR.get().map(|dir| {
        let name = blake3::hash(path.as_os_str().as_encoded_bytes()).to_hex();
        dir.join(&name[..32])
    });
    if let Some(memo) = &memo
        && let Ok(text) = fs::read_to_string(memo)
        && let Some((their_stamp, hex)) = text.trim_end().rsplit_once(' ')
        && their_stamp == stamp
        && let Ok(hash) = blake3::Hash::from_hex(hex)
    {
        return Some(*hash.as_bytes());
    }
    let digest = *blake3::hash(&fs::read(path).ok()?).as_bytes();
    if let Some(memo) = memo {
        let tmp = memo.with_extension(format!("tmp{}", std::process::id()));
        let text = format!("{stamp} {}\n", blake3::Hash::from_bytes(digest).to_hex());
        let written = memo.parent().map_or(Ok(()), fs::create_dir_all).and_then(|()| fs::write(&tmp, text));
        if written.and_then(|()| fs::rename(&tmp, &memo)).is_err() {
            let _ = fs::remove_file(&tmp);
        }
    }
    Some(digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_is_always_seen() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path());
        let file = dir.path().join("f");
        fs::write(&file, b"one").unwrap();
        let first = digest(&file, &fs::metadata(&file).unwrap()).unwrap();
        assert_eq!(first, *blake3::hash(b"one").as_bytes());
        assert_eq!(digest(&file, &fs::metadata(&file).unwrap()).unwrap(), first);
        // Same size, and the mtime put back: the ctime still moves.
        let mtime = fs::metadata(&file).unwrap().modified().unwrap();
        fs::write(&file, b"two").unwrap();
        fs::File::options().write(true).open(&file).unwrap().set_modified(mtime).unwrap();
        assert_eq!(digest(&file, &fs::metadata(&file).unwrap()).unwrap(), *blake3::hash(b"two").as_bytes());
    }
}
