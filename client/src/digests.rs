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
//! The one exception is [`remember_output`]: a compile's output, hashed from the bytes the
//! wrapper itself wrote (a replay) or read after the compiler that wrote it exited. Nothing else
//! writes that path until cargo runs the same unit again, so no write can share its clock tick;
//! and without it every crate would hash its dependencies' fresh `.rmeta`s again.
//!
//! One small file per path under `<cache dir>/digests/`, rewritten in place; a damaged or half
//! written one is just a miss. This process also remembers what it hashed, by fingerprint.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

/// How long ago a file's last change must be before its digest is remembered.
pub const SETTLED: Duration = Duration::from_secs(2);

/// Smaller files are hashed every time: reading and hashing a few KiB costs no more than reading
/// a memo, and not remembering them saves creating thousands of memo files in a cold build.
pub const MEMO_FROM: u64 = 64 << 10;

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

/// Remembers the digest of an output whose bytes are `bytes` (see the module docs).
pub fn remember_output(path: &Path, bytes: &[u8]) {
    let Ok(meta) = fs::metadata(path) else { return };
    if meta.len() != bytes.len() as u64 {
        return;
    }
    let digest = *blake3::hash(bytes).as_bytes();
    let stamp = stamp(&meta);
    if meta.len() >= MEMO_FROM {
        write_memo(path, &stamp, digest);
    }
    remember(path, stamp, digest);
}

fn stamp(meta: &fs::Metadata) -> String {
    format!(
        "{} {}.{} {}.{} {} {}",
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec(),
        meta.ino(),
        meta.dev()
    )
}

fn memo_path(path: &Path) -> Option<PathBuf> {
    DIR.get().map(|dir| {
        let name = blake3::hash(path.as_os_str().as_encoded_bytes()).to_hex();
        dir.join(&name[..32])
    })
}

/// Writes a memo in place, in one `write`: a reader that sees it half written (or empty) finds
/// no matching fingerprint or no valid digest, a miss. (A temp file and a rename per memo would
/// create and delete an inode each time, which ext4 makes costly when thousands pile up.)
fn write_memo(path: &Path, stamp: &str, digest: [u8; 32]) {
    use std::io::Write;
    let Some(memo) = memo_path(path) else { return };
    let text = format!("{stamp} {}\n", blake3::Hash::from_bytes(digest).to_hex());
    let open = || fs::File::options().write(true).create(true).truncate(true).open(&memo);
    let file = open().or_else(|_| memo.parent().map_or(Ok(()), fs::create_dir_all).and_then(|()| open()));
    if let Ok(mut file) = file {
        let _ = file.write_all(text.as_bytes());
    }
}

/// The blake3 of `path`'s content, from a memo when its fingerprint matches.
pub fn digest(path: &Path, meta: &fs::Metadata) -> Option<[u8; 32]> {
    let stamp = stamp(meta);
    if let Some(d) = SEEN.with(|s| s.borrow().get(path).filter(|(st, _)| *st == stamp).map(|(_, d)| *d)) {
        return Some(d);
    }
    let memo = memo_path(path).filter(|_| meta.len() >= MEMO_FROM);
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
    let digest = hash_file(path, meta.len())?;
    COUNTS.with(|c| c.borrow_mut().0 += 1);
    tracing::trace!(path = %path.display(), bytes = meta.len(), "hashed");
    let time = |secs: i64, nanos: i64| SystemTime::UNIX_EPOCH + Duration::new(secs.max(0) as u64, nanos as u32);
    let changed = time(meta.ctime(), meta.ctime_nsec()).max(time(meta.mtime(), meta.mtime_nsec()));
    let settled = hashed_at.duration_since(changed).is_ok_and(|age| age > SETTLED);
    if settled && memo.is_some() {
        write_memo(path, &stamp, digest);
    }
    remember(path, stamp, digest);
    Some(digest)
}

fn remember(path: &Path, stamp: String, digest: [u8; 32]) {
    SEEN.with(|s| s.borrow_mut().insert(path.to_owned(), (stamp, digest)));
}

/// blake3 of a file of about `len` bytes, read in pieces of at most 1 MiB (a memory map would
/// turn a truncation under us into a crash). The buffer fits the file: a hit hashes dozens of
/// small headers, and zeroing 1 MiB for each was most of its time.
fn hash_file(path: &Path, len: u64) -> Option<[u8; 32]> {
    use std::io::Read;
    let mut file = fs::File::open(path).ok()?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; (len as usize).saturating_add(1).clamp(4 << 10, 1 << 20)];
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
        // Small, and just written: not remembered on disk, only by this process.
        assert!(fs::read_dir(dir.path().join("digests")).map_or(true, |d| d.count() == 0));
        assert_eq!(digest(&file, &fs::metadata(&file).unwrap()).unwrap(), first);
        // Same size, and the mtime put back: the ctime still moves.
        let mtime = fs::metadata(&file).unwrap().modified().unwrap();
        fs::write(&file, b"two").unwrap();
        fs::File::options().write(true).open(&file).unwrap().set_modified(mtime).unwrap();
        assert_eq!(digest(&file, &fs::metadata(&file).unwrap()).unwrap(), *blake3::hash(b"two").as_bytes());
    }
}
