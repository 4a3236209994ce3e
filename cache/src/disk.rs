//! The local disk tier: one verified file per entry, published with link(2), evicted by LRU.
//!
//! ```text
//! <root>/entries/<2 hex>/<64 hex>   one encoded Entry each, read-only, never rewritten
//! <root>/tmp/<pid>.<n>.<nanos>.tmp  writes in progress; published by hard-linking
//! <root>/usage                      approximate total entry bytes (u64 LE), updated by put
//! <root>/evict.lock                 held (non-blocking) by whoever runs an eviction pass
//! ```
//!
//! Concurrency rests on the file system, not on locks the hit path takes: `put` writes and
//! fsyncs a temp file and links it into place, which never replaces an existing name (so the
//! first writer wins, and a reader never sees a partial file); `get` reads one file and
//! verifies it; eviction unlinks, and an unlinked file stays readable through an open fd, so a
//! reader racing an eviction sees a whole entry or a miss. The last-used time is the file's
//! mtime, bumped on every hit. `put` adds to the usage counter under a short lock and, when it
//! passes the limit, runs an eviction pass unless another process already is.
//!
//! Large entries (1 MiB and up) leave the page cache as soon as they are durable
//! (`POSIX_FADV_DONTNEED` after the fsync): a cache writes far more than it reads back soon, and
//! holding a build's worth of rlibs twice would evict the build's own working set. On VMs that
//! hand free memory back to the host, freshly allocated page-cache pages are also slow — 2 ms per
//! MB on the benchmark machine against 0.25 ms for recycled ones — and the freed pages go
//! straight back to the next writer. A later hit reads the file from disk.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tracing::{debug, info, warn};

use crate::entry::Entry;
use crate::key::CacheKey;
use crate::store::{Error, PutOutcome, Store};

/// The limits of a [`DiskStore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// Eviction brings the total size of the entries back under this (to 90% of it).
    pub max_bytes: u64,
    /// Entries used more recently than this are never evicted, so a build that just wrote or
    /// hit an entry finds it again even when the cache is far too small for its working set.
    pub grace: Duration,
}

/// A cache tier in a local directory. See the module docs for the layout and the protocol.
#[derive(Debug)]
pub struct DiskStore {
    /// The directory holding `entries/`, `tmp/` and the bookkeeping files.
    root: PathBuf,
    /// Size limit and grace period for eviction.
    config: DiskConfig,
}

/// What one eviction pass did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EvictReport {
    /// Entries deleted because the cache was over its limit.
    pub removed_entries: u64,
    /// Their total size.
    pub removed_bytes: u64,
    /// Entries left after the pass.
    pub kept_entries: u64,
    /// Their total size: over the limit only when the rest is younger than the grace period.
    pub kept_bytes: u64,
    /// Temp files abandoned by killed writers (older than an hour) that were deleted.
    pub removed_temp_files: u64,
}

/// The size of a [`DiskStore`], as found by scanning it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Number of entry files.
    pub entries: u64,
    /// Their total size in bytes.
    pub bytes: u64,
}

impl Default for DiskConfig {
    fn default() -> Self {
        DiskConfig { max_bytes: 10 << 30, grace: Duration::from_secs(10 * 60) }
    }
}

const ENTRIES_DIR: &str = "entries";
const TMP_DIR: &str = "tmp";
const USAGE_FILE: &str = "usage";
const EVICT_LOCK: &str = "evict.lock";
/// Entries this large are dropped from the page cache once written (see the module docs).
const UNCACHED_FROM: usize = 1 << 20;
/// A temp file this old belongs to a writer that died; live writers finish in seconds.
const STALE_TEMP: Duration = Duration::from_secs(60 * 60);

impl DiskStore {
    /// Opens (creating if needed) a store rooted at `root`.
    pub fn open(root: impl Into<PathBuf>, config: DiskConfig) -> Result<DiskStore, Error> {
        let root = root.into();
        for dir in [root.join(ENTRIES_DIR), root.join(TMP_DIR)] {
            fs::create_dir_all(&dir).map_err(io_at(&dir))?;
        }
        Ok(DiskStore { root, config })
    }

    /// The directory the store lives in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the entry for `key` lives (whether or not it exists).
    pub fn entry_path(&self, key: &CacheKey) -> PathBuf {
        let hex = key.to_string();
        self.root.join(ENTRIES_DIR).join(&hex[..2]).join(hex)
    }

    /// Runs a full eviction pass now, waiting for any pass already running, and deletes stale
    /// temp files.
    pub fn evict(&self) -> Result<EvictReport, Error> {
        let (lock, path) = self.bookkeeping_file(EVICT_LOCK)?;
        lock.lock().map_err(io_at(&path))?;
        self.evict_locked()
    }

    /// Counts the entries and their bytes by scanning the directory.
    pub fn usage(&self) -> Result<Usage, Error> {
        let entries = self.scan()?;
        Ok(Usage { entries: entries.len() as u64, bytes: entries.iter().map(|e| e.len).sum() })
    }
}

impl Store for DiskStore {
    fn get(&self, key: &CacheKey) -> Result<Option<Entry>, Error> {
        self.read_verified(key, |bytes| Entry::decode_owned(bytes, key))
    }

    fn get_encoded(&self, key: &CacheKey) -> Result<Option<Vec<u8>>, Error> {
        DiskStore::get_encoded(self, key)
    }

    /// Publishes an already encoded entry under `key` unless a verified one is there. The caller
    /// has verified `bytes` (or encoded them itself).
    fn put_encoded(&self, key: &CacheKey, bytes: &[u8]) -> Result<PutOutcome, Error> {
        let path = self.entry_path(key);
        // Twice at most: an existing file counts as present only once it verifies, so a damaged
        // entry (removed by the check) never blocks its own replacement.
        for _ in 0..2 {
            if fs::symlink_metadata(&path).is_ok() {
                match self.get_encoded(key) {
                    Ok(Some(_)) => return Ok(PutOutcome::AlreadyPresent),
                    Ok(None) | Err(Error::Corrupt { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            match self.publish(bytes, &path)? {
                PutOutcome::Published { bytes } => {
                    self.account(bytes);
                    return Ok(PutOutcome::Published { bytes });
                }
                // Lost a race with another writer: check what they published.
                PutOutcome::AlreadyPresent => {}
            }
        }
        Ok(PutOutcome::AlreadyPresent)
    }

    /// Unlinks the entry (a reader that opened it keeps reading it whole); the usage counter
    /// catches up at the next eviction pass.
    fn remove(&self, key: &CacheKey) -> Result<bool, Error> {
        let path = self.entry_path(key);
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(Error::Io { path, source }),
        }
    }
}

impl DiskStore {
    /// The entry file of `key`, opened and checked (header and checksum, read 1 MiB at a time,
    /// never held whole in memory), rewound, with its length: for serving large entries. One that
    /// does not check out is removed and reported.
    pub fn open_checked(&self, key: &CacheKey) -> Result<Option<(File, u64)>, Error> {
        use std::io::{BufReader, Seek};
        let Some((path, mut file, len)) = self.open_entry(key)? else { return Ok(None) };
        match crate::entry::check_stream(BufReader::new(&file), len, key) {
            Ok(()) => {
                let _ = file.set_modified(SystemTime::now());
                file.rewind().map_err(io_at(&path))?;
                Ok(Some((file, len)))
            }
            Err(reason) => {
                remove_if_same_file(&path, &file);
                warn!(path = %path.display(), %reason, "removed corrupt cache entry");
                Err(Error::Corrupt { path, reason })
            }
        }
    }

    /// A temp file in this store to receive an entry into (see [`DiskStore::publish_temp`]).
    pub fn begin_temp(&self) -> Result<(File, PathBuf), Error> {
        let dir = self.root.join(TMP_DIR);
        crate::tempname::create_temp(&dir, &format!("{}.r.", std::process::id()), 0o444).map_err(io_at(&dir))
    }

    /// Publishes a received temp file (from [`DiskStore::begin_temp`], already checked by the
    /// caller) under `key`: fsync, then a link that never replaces an entry that verifies. The
    /// temp file is gone afterwards.
    pub fn publish_temp(&self, key: &CacheKey, file: File, tmp: &Path) -> Result<PutOutcome, Error> {
        let len = file.metadata().map_err(io_at(tmp))?.len();
        let synced = file.sync_all().map_err(io_at(tmp));
        drop(file);
        let path = self.entry_path(key);
        let outcome = synced.and_then(|()| {
            if fs::symlink_metadata(&path).is_ok() && matches!(self.open_checked(key), Ok(Some(_))) {
                return Ok(PutOutcome::AlreadyPresent);
            }
            let linked = match fs::hard_link(tmp, &path) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    let shard = path.parent().expect("entry paths have a shard directory");
                    fs::create_dir_all(shard).and_then(|()| fs::hard_link(tmp, &path))
                }
                linked => linked,
            };
            match linked {
                Ok(()) => {
                    self.account(len);
                    Ok(PutOutcome::Published { bytes: len })
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(PutOutcome::AlreadyPresent),
                Err(e) => Err(io_at(&path)(e)),
            }
        });
        let _ = fs::remove_file(tmp);
        outcome
    }

    /// The encoded entry stored under `key` after checking its header and checksum (the payload
    /// is not decompressed: for a tier that passes entries on, whose receiver decodes them).
    pub fn get_encoded(&self, key: &CacheKey) -> Result<Option<Vec<u8>>, Error> {
        self.read_verified(key, |bytes| Entry::check(&bytes, key).map(|()| bytes))
    }

    /// Reads the entry file of `key` and verifies it with `verify`. A file that does not verify
    /// is removed and reported; one that does has its last-used time (the mtime eviction sorts
    /// by) refreshed.
    /// The entry file of `key` and its length, or `None` when there is none.
    fn open_entry(&self, key: &CacheKey) -> Result<Option<(PathBuf, File, u64)>, Error> {
        let path = self.entry_path(key);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_at(&path)(e)),
        };
        let len = file.metadata().map_err(io_at(&path))?.len();
        Ok(Some((path, file, len)))
    }

    fn read_verified<T>(
        &self,
        key: &CacheKey,
        verify: impl FnOnce(Vec<u8>) -> Result<T, crate::EntryError>,
    ) -> Result<Option<T>, Error> {
        let Some((path, mut file, len)) = self.open_entry(key)? else { return Ok(None) };
        let mut bytes = Vec::with_capacity(len as usize);
        file.read_to_end(&mut bytes).map_err(io_at(&path))?;
        match verify(bytes) {
            Ok(found) => {
                // Best effort: a read-only cache directory still serves hits.
                let _ = file.set_modified(SystemTime::now());
                Ok(Some(found))
            }
            Err(reason) => {
                remove_if_same_file(&path, &file);
                warn!(path = %path.display(), %reason, "removed corrupt cache entry");
                Err(Error::Corrupt { path, reason })
            }
        }
    }
}

/// One entry file found by a scan.
struct Scanned {
    path: PathBuf,
    len: u64,
    modified: SystemTime,
    ino: u64,
}

impl DiskStore {
    /// Writes `bytes` to a fresh temp file, fsyncs it and links it to `path` unless something
    /// is already there. The temp file is gone afterwards, whatever happened.
    fn publish(&self, bytes: &[u8], path: &Path) -> Result<PutOutcome, Error> {
        let tmp = self.write_temp(bytes)?;
        let linked = match fs::hard_link(&tmp, path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let shard = path.parent().expect("entry paths have a shard directory");
                fs::create_dir_all(shard).and_then(|()| fs::hard_link(&tmp, path))
            }
            linked => linked,
        };
        if let Err(e) = fs::remove_file(&tmp) {
            // Harmless: the next eviction pass deletes it once it is stale.
            warn!(path = %tmp.display(), error = %e, "could not remove temp file");
        }
        match linked {
            Ok(()) => Ok(PutOutcome::Published { bytes: bytes.len() as u64 }),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(PutOutcome::AlreadyPresent),
            Err(e) => Err(io_at(path)(e)),
        }
    }

    /// Writes a uniquely named, read-only temp file holding `bytes`, removing it on failure.
    fn write_temp(&self, bytes: &[u8]) -> Result<PathBuf, Error> {
        let dir = self.root.join(TMP_DIR);
        let (mut file, path) =
            crate::tempname::create_temp(&dir, &format!("{}.", std::process::id()), 0o444).map_err(io_at(&dir))?;
        match file.write_all(bytes).and_then(|()| file.sync_all()) {
            Ok(()) => {
                if bytes.len() >= UNCACHED_FROM {
                    // Durable now, so its pages are clean and can go at once. Best effort.
                    // SAFETY: posix_fadvise only reads its arguments; the fd is open.
                    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
                }
                Ok(path)
            }
            Err(e) => {
                drop(file);
                let _ = fs::remove_file(&path);
                Err(io_at(&path)(e))
            }
        }
    }

    /// Adds a published entry to the usage counter and evicts if the cache is now over its
    /// limit (or the counter was missing). Failures here only delay eviction, so they are
    /// logged rather than returned: the entry is already published.
    fn account(&self, added: u64) {
        let needs_pass = match self.add_usage(added) {
            Ok(Some(total)) => total > self.config.max_bytes,
            Ok(None) => true,
            Err(e) => {
                warn!(error = %e, "could not update the cache usage counter");
                return;
            }
        };
        if !needs_pass {
            return;
        }
        let (lock, path) = match self.bookkeeping_file(EVICT_LOCK) {
            Ok(opened) => opened,
            Err(e) => {
                warn!(error = %e, "could not open the eviction lock");
                return;
            }
        };
        match lock.try_lock() {
            Ok(()) => match self.evict_locked() {
                Ok(report) => info!(?report, "evicted"),
                Err(e) => warn!(error = %e, "eviction failed"),
            },
            Err(TryLockError::WouldBlock) => debug!("eviction already running elsewhere"),
            Err(TryLockError::Error(e)) => {
                warn!(path = %path.display(), error = %e, "could not lock for eviction")
            }
        }
    }

    /// Adds to the usage counter under its lock; `None` if there was no counter yet (a new
    /// cache, or one whose counter was lost), which calls for a scan.
    fn add_usage(&self, added: u64) -> Result<Option<u64>, Error> {
        let (file, path) = self.bookkeeping_file(USAGE_FILE)?;
        file.lock().map_err(io_at(&path))?;
        let mut buf = [0; 8];
        let old = match file.read_exact_at(&mut buf, 0) {
            Ok(()) => Some(u64::from_le_bytes(buf)),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => None,
            Err(e) => return Err(io_at(&path)(e)),
        };
        let total = old.unwrap_or(0).saturating_add(added);
        file.write_all_at(&total.to_le_bytes(), 0).map_err(io_at(&path))?;
        Ok(old.map(|_| total))
    }

    fn set_usage(&self, total: u64) -> Result<(), Error> {
        let (file, path) = self.bookkeeping_file(USAGE_FILE)?;
        file.lock().map_err(io_at(&path))?;
        file.write_all_at(&total.to_le_bytes(), 0).map_err(io_at(&path))
    }

    /// The eviction pass proper; the caller holds the eviction lock.
    fn evict_locked(&self) -> Result<EvictReport, Error> {
        let mut report = EvictReport { removed_temp_files: self.remove_stale_temps()?, ..EvictReport::default() };
        let mut entries = self.scan()?;
        let mut total: u64 = entries.iter().map(|e| e.len).sum();
        let max = self.config.max_bytes;
        let target = max - max / 10;
        if total > max {
            entries.sort_by(|a, b| (a.modified, &a.path).cmp(&(b.modified, &b.path)));
            let now = SystemTime::now();
            for entry in &entries {
                let age = now.duration_since(entry.modified).unwrap_or_default();
                if total <= target || age < self.config.grace {
                    break; // sorted oldest first: everything after is younger still
                }
                if remove_if_unused(entry)? {
                    total -= entry.len;
                    report.removed_entries += 1;
                    report.removed_bytes += entry.len;
                }
            }
        }
        report.kept_entries = entries.len() as u64 - report.removed_entries;
        report.kept_bytes = total;
        // When the grace period kept the cache over its limit, record the target instead of
        // the real total: otherwise every put would rescan a cache that cannot shrink yet.
        // This way the next pass comes after another tenth of the limit has been written.
        self.set_usage(if total > max { target } else { total })?;
        Ok(report)
    }

    /// Deletes temp files left by writers that died mid-write; returns how many.
    fn remove_stale_temps(&self) -> Result<u64, Error> {
        let dir = self.root.join(TMP_DIR);
        let now = SystemTime::now();
        let mut removed = 0;
        for item in fs::read_dir(&dir).map_err(io_at(&dir))? {
            let item = item.map_err(io_at(&dir))?;
            let Ok(modified) = item.metadata().and_then(|m| m.modified()) else {
                continue; // finished and removed since the listing
            };
            if now.duration_since(modified).unwrap_or_default() >= STALE_TEMP {
                match fs::remove_file(item.path()) {
                    Ok(()) => removed += 1,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_at(&item.path())(e)),
                }
            }
        }
        Ok(removed)
    }

    /// Lists every entry file with its size and last-used time.
    fn scan(&self) -> Result<Vec<Scanned>, Error> {
        let dir = self.root.join(ENTRIES_DIR);
        let mut found = Vec::new();
        for shard in fs::read_dir(&dir).map_err(io_at(&dir))? {
            let shard = shard.map_err(io_at(&dir))?;
            if !shard.file_type().map_err(io_at(&shard.path()))?.is_dir() {
                continue;
            }
            let shard = shard.path();
            for item in fs::read_dir(&shard).map_err(io_at(&shard))? {
                let item = item.map_err(io_at(&shard))?;
                let meta = match item.metadata() {
                    Ok(meta) => meta,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io_at(&item.path())(e)),
                };
                if meta.is_file() {
                    found.push(Scanned {
                        path: item.path(),
                        len: meta.len(),
                        modified: meta.modified().map_err(io_at(&item.path()))?,
                        ino: meta.ino(),
                    });
                }
            }
        }
        Ok(found)
    }

    /// Opens (creating) a small file under the root that is used for its lock.
    fn bookkeeping_file(&self, name: &str) -> Result<(File, PathBuf), Error> {
        let path = self.root.join(name);
        let file =
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io_at(&path))?;
        Ok((file, path))
    }
}

/// Unlinks a scanned entry unless it was hit (or replaced) since the scan. Returns whether it
/// is gone now.
fn remove_if_unused(entry: &Scanned) -> Result<bool, Error> {
    match fs::symlink_metadata(&entry.path) {
        Ok(now) if now.ino() == entry.ino && now.modified().ok() == Some(entry.modified) => {}
        Ok(_) => return Ok(false),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(true),
        Err(e) => return Err(io_at(&entry.path)(e)),
    }
    match fs::remove_file(&entry.path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(io_at(&entry.path)(e)),
    }
}

/// Removes the corrupt file at `path` if it is still `read`, the file that was read: another
/// reader may have removed it already and a writer published a good entry under the same name
/// since. Holding `read` open is what makes comparing inode numbers sound: an inode that is
/// still open cannot be freed and reused for the new file.
fn remove_if_same_file(path: &Path, read: &File) {
    let Ok(read) = read.metadata() else { return };
    let same = fs::symlink_metadata(path).is_ok_and(|now| now.ino() == read.ino() && now.dev() == read.dev());
    if same && let Err(e) = fs::remove_file(path) {
        warn!(path = %path.display(), error = %e, "could not remove corrupt cache entry");
    }
}

/// Wraps an I/O error with the path it happened on.
fn io_at(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_owned(), source }
}

/// Parses `10G`, `512M`, `64KiB`, `1000` (bytes); binary units. Err is a sentence for the user.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is not a size (try 10G, 512M or a byte count)"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(format!("'{s}' has an unknown unit (use K, M, G or T)")),
    };
    n.checked_mul(1 << shift).ok_or_else(|| format!("'{s}' is too large"))
}

/// A size for people, binary units: `20 GiB`, `1.5 MiB`, `512 B`.
pub fn format_size(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    let text = format!("{value:.1}");
    format!("{} {}", text.strip_suffix(".0").unwrap_or(&text), UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::EntryKind;

    fn store(dir: &Path) -> DiskStore {
        DiskStore::open(dir, DiskConfig::default()).unwrap()
    }

    fn entry(payload: &[u8]) -> Entry {
        Entry { kind: EntryKind::Result, key: CacheKey([3; 32]), toolchain: [0; 32], payload: payload.to_vec() }
    }

    #[test]
    fn sizes_both_ways() {
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert!(parse_size("10X").unwrap_err().contains("unknown unit"));
        assert_eq!(format_size(20 << 30), "20 GiB");
        assert_eq!(format_size(3 << 19), "1.5 MiB");
        assert_eq!(format_size(512), "512 B");
    }

    #[test]
    fn losing_the_link_race_keeps_the_winner_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let first = entry(b"first");
        let path = store.entry_path(&first.key);
        assert!(matches!(store.publish(&first.encode(), &path), Ok(PutOutcome::Published { .. })));
        assert_eq!(store.publish(&entry(b"second").encode(), &path).unwrap(), PutOutcome::AlreadyPresent);
        assert_eq!(fs::read(&path).unwrap(), first.encode());
        assert_eq!(fs::read_dir(dir.path().join(TMP_DIR)).unwrap().count(), 0);
    }

    #[test]
    fn corrupt_file_replaced_by_a_good_one_is_not_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("entry");
        fs::write(&path, b"corrupt").unwrap();
        let read = File::open(&path).unwrap();
        // Another reader removes the corrupt file, a writer publishes a new one...
        fs::remove_file(&path).unwrap();
        fs::write(&path, b"good").unwrap();
        // ...and this reader's cleanup must leave it alone.
        remove_if_same_file(&path, &read);
        assert_eq!(fs::read(&path).unwrap(), b"good");
        remove_if_same_file(&path, &File::open(&path).unwrap());
        assert!(!path.exists());
    }

    #[test]
    fn usage_counter_tracks_puts_and_is_reset_by_a_pass() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        assert_eq!(store.add_usage(10).unwrap(), None);
        assert_eq!(store.add_usage(5).unwrap(), Some(15));
        store.evict().unwrap();
        assert_eq!(store.add_usage(0).unwrap(), Some(0));
        let published = store.put(&entry(b"x")).unwrap();
        let PutOutcome::Published { bytes } = published else { panic!("{published:?}") };
        assert_eq!(store.add_usage(0).unwrap(), Some(bytes));
        // A pass that the grace period keeps over the limit records the target, not the real
        // total, so the next puts do not each rescan a cache that cannot shrink yet.
        let small = DiskStore::open(dir.path(), DiskConfig { max_bytes: 10, grace: Duration::from_secs(600) }).unwrap();
        assert_eq!(small.evict().unwrap().kept_bytes, bytes);
        assert_eq!(small.add_usage(0).unwrap(), Some(9));
    }
}
