//! Content digests of files, remembered across wrapper processes by the file's stat fingerprint,
//! so a hit whose manifest lists hundreds of files (transitive `.rmeta`s, the linker's system
//! libraries) costs a `stat` per file, not a read.
//!
//! A digest is remembered under the file's fingerprint (size, mtime, ctime, inode, device): a
//! write changes the ctime, so a changed file is hashed again. The one way a write can keep every
//! field is to land in the same clock tick as the ctime the memo recorded; so, as git does for
//! its index ("racy clean"), a digest is only remembered once the file's ctime and mtime are more
//! than [`SETTLED`] in the past when it is hashed. A file written just now is hashed every time
//! until it settles. (On a network filesystem whose server clock runs ahead of ours the rule
//! waits longer; one that runs behind by more than [`SETTLED`] weakens it to the filesystem's
//! own timestamp granularity.)
//!
//! One small file per path under `<cache dir>/digests/`, replaced atomically; a damaged one is
//! just a miss. This process also remembers what it hashed, by fingerprint.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

/// How long ago a file's last change must be before its digest is remembered.
pub const SETTLED: Duration = Duration::from_secs(2);

static DIR: OnceLock<PathBuf> = OnceLock::new();

thread_local! {
    /// This process's digests by path, with the fingerprint they were made under.
    static SEEN: RefCell<HashMap<PathBuf, (String, [u8; 32])>> = RefCell::new(HashMap::new());
}

/// Where the memo lives (created when the first digest is written).
pub fn init(cache_dir: &Path) {
    let _ = DIR.set(cache_dir.join("digests"));
}

/// Files hashed (read whole) and files answered from a memo by this process, for the debug log
/// and the benchmark's "hashed vs stat'ed per hit".
pub fn counts() -> (u64, u64) {
    COUNTS.with(|c| *c.borrow())
}

thread_local! {
    static COUNTS: RefCell<(u64, u64)> = const { RefCell::new((0, 0)) };
}

/// The blake3 of `path`'s content, from a memo when its fingerprint matches.
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
    if let Some(d) = SEEN.with(|s| s.borrow().get(path).filter(|(st, _)| *st == stamp).map(|(_, d)| *d)) {
        return Some(d);
    }
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
        COUNTS.with(|c| c.borrow_mut().1 += 1);
        remember(path, stamp, *hash.as_bytes());
        return Some(*hash.as_bytes());
    }
    let hashed_at = SystemTime::now();
    let digest = hash_file(path)?;
    COUNTS.with(|c| c.borrow_mut().0 += 1);
    let time = |secs: i64, nanos: i64| SystemTime::UNIX_EPOCH + Duration::new(secs.max(0) as u64, nanos as u32);
    let changed = time(meta.ctime(), meta.ctime_nsec()).max(time(meta.mtime(), meta.mtime_nsec()));
    let settled = hashed_at.duration_since(changed).is_ok_and(|age| age > SETTLED);
    if let Some(memo) = memo.filter(|_| settled) {
        let tmp = memo.with_extension(format!("tmp{}", std::process::id()));
        let text = format!("{stamp} {}\n", blake3::Hash::from_bytes(digest).to_hex());
        let written = memo.parent().map_or(Ok(()), fs::create_dir_all).and_then(|()| fs::write(&tmp, text));
        if written.and_then(|()| fs::rename(&tmp, &memo)).is_err() {
            let _ = fs::remove_file(&tmp);
        }
    }
    remember(path, stamp, digest);
    Some(digest)
}

fn remember(path: &Path, stamp: String, digest: [u8; 32]) {
    SEEN.with(|s| s.borrow_mut().insert(path.to_owned(), (stamp, digest)));
}

/// blake3 of a file, read in 1 MiB pieces (a memory map would turn a truncation under us into a
/// crash).
fn hash_file(path: &Path) -> Option<[u8; 32]> {
    use std::io::Read;
    let mut file = fs::File::open(path).ok()?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match file.read(&mut buf) {
            Ok(0) => return Some(*hasher.finalize().as_bytes()),
            Ok(n) => {
                hasher.update(&buf[..n]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
}

/// Forgets what this process hashed (after a compile, which may have rewritten files).
pub fn forget_seen() {
    SEEN.with(|s| s.borrow_mut().clear());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_is_always_seen_and_fresh_files_are_not_remembered() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path());
        let file = dir.path().join("f");
        fs::write(&file, b"one").unwrap();
        let first = digest(&file, &fs::metadata(&file).unwrap()).unwrap();
        assert_eq!(first, *blake3::hash(b"one").as_bytes());
        // Just written: not remembered on disk (racy clean), only by this process.
        assert!(fs::read_dir(dir.path().join("digests")).map_or(true, |d| d.count() == 0));
        assert_eq!(digest(&file, &fs::metadata(&file).unwrap()).unwrap(), first);
        // Same size, and the mtime put back: the ctime still moves.
        let mtime = fs::metadata(&file).unwrap().modified().unwrap();
        fs::write(&file, b"two").unwrap();
        fs::File::options().write(true).open(&file).unwrap().set_modified(mtime).unwrap();
        assert_eq!(digest(&file, &fs::metadata(&file).unwrap()).unwrap(), *blake3::hash(b"two").as_bytes());
    }
}
