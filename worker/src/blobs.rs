//! Input blobs by content: `<data dir>/blobs/<2 hex>/<64 hex>`. A blob is stored only after its
//! bytes hash to the claimed digest, written to a temp file and published with `link(2)`; so an
//! extern rlib or a registry source crosses the network once, not once per job. Stored blobs are
//! read-only (0444, owned by the worker). A job whose sandbox runs as another user gets hard links
//! to them (it can neither write nor chmod a file it does not own, and removing or replacing a
//! name in its tree leaves the blob alone) — executables to the blob's one 0555 copy,
//! `<64 hex>.x`; otherwise it gets copies.
//!
//! The store is bounded (`blob_store_size`): it never holds more bytes (blobs, their executable
//! copies and blobs kept over an unclean stop alike) than its limit. Storing a blob first removes
//! the least recently used ones (used: found for a client, read for a job, or written) that no
//! job holds. A job holds a blob from the moment a call under its grant finds or stores it —
//! until the grant expires, or while the job runs until it ends — so what `FindMissing` called
//! present is still here when `RunJob` comes. A removed blob is only a name: a job's tree links
//! the inode or has a copy. When the held blobs leave no room, the blob is refused
//! ([`StoreError::Full`]; the client compiles locally) rather than the limit exceeded. After a
//! restart, blobs rank by when they were written. (A blob being received waits in `tmp/`: at most
//! the limit, and the upload's own cap, per upload in flight.)

use ferry_proto::now_ms;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

/// Present while a worker has the store open (see [`BlobStore::open`]).
const OPEN_MARKER: &str = "open";
/// Where the blobs found after an unclean stop wait for their first use (see [`BlobStore::open`]).
const UNVERIFIED: &str = "unverified";
/// A job may hold a quarter of the store, and never less than this (or the whole of a smaller
/// store): enough for the dependencies of a large crate.
const MIN_JOB_SHARE: u64 = 256 << 20;

#[derive(Debug)]
pub struct BlobStore {
    dir: PathBuf,
    /// What is stored, its size, its last use and which jobs hold it: the eviction order. Every
    /// change to the files under `dir` is made holding it (or, for a blob being checked, with
    /// the blob pinned in it), so it and the files agree.
    index: Mutex<Index>,
    /// Taken while a blob kept over an unclean stop is hashed on its first use, outside `index`
    /// (a large blob takes a while): each is checked once.
    checking: Mutex<()>,
}

/// A job's claim on the blobs a call under its grant found or stored: they are not evicted
/// while it lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hold {
    pub job: u64,
    /// Milliseconds since the Unix epoch; `u64::MAX` until [`BlobStore::release`].
    pub until_ms: u64,
}

/// Why a received blob was not stored.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("blob content hashes to {actual}, not the claimed {claimed}")]
    Mismatch { claimed: String, actual: String },
    #[error("a blob of {bytes} bytes is larger than this worker's whole blob store ({limit} bytes, blob_store_size)")]
    TooLarge { bytes: u64, limit: u64 },
    #[error(
        "no room for a blob of {bytes} bytes: jobs hold {held} of the {limit} bytes of this worker's blob store \
         (blob_store_size)"
    )]
    Full { bytes: u64, limit: u64, held: u64 },
    #[error(
        "one job may hold at most {share} bytes of this worker's blob store (a quarter of blob_store_size, at \
         least 256 MiB); \
         its inputs so far hold {held}, and this blob is {bytes} more"
    )]
    JobShare { bytes: u64, held: u64, share: u64 },
    #[error("storing blob: {0}")]
    Io(#[from] std::io::Error),
}

/// A blob being received, chunk by chunk; removed unless it verifies.
#[derive(Debug)]
pub struct IncomingBlob {
    digest: [u8; 32],
    tmp: PathBuf,
    file: Option<File>,
    hasher: blake3::Hasher,
    pub received: u64,
}

impl Hold {
    /// For the calls that prepare a job (`FindMissing`, `UploadBlobs`): until its grant expires.
    pub fn until(job: u64, expires_ms: u64) -> Hold {
        Hold { job, until_ms: expires_ms }
    }

    /// For a job that runs: until it ends and [`BlobStore::release`] is called.
    pub fn running(job: u64) -> Hold {
        Hold { job, until_ms: u64::MAX }
    }
}

impl BlobStore {
    /// Opens the store for this worker process, holding at most `limit` bytes (blobs beyond it,
    /// least recently written first, are removed now). Blobs are not fsynced (one fsync per input
    /// file was most of a job's upload time): instead the store is marked open until
    /// [`BlobStore::close`]. A store found still marked open — its last worker died, perhaps with
    /// the machine, whose crash can leave a linked blob with missing content — keeps its blobs,
    /// but as unverified: they move under `unverified/`, and each is checked against its digest
    /// the first time a job needs it ([`BlobStore::has`]), moved back when it holds, removed when
    /// it does not. So a killed worker's clients do not send everything again, and a torn blob
    /// never reaches a job.
    pub fn open(data_dir: &Path, limit: u64) -> std::io::Result<BlobStore> {
        let dir = data_dir.join("blobs");
        fs::create_dir_all(dir.join("tmp"))?;
        for stale in fs::read_dir(dir.join("tmp"))?.flatten() {
            let _ = fs::remove_file(stale.path());
        }
        let marker = dir.join(OPEN_MARKER);
        if marker.exists() {
            let moved = set_aside(&dir)?;
            tracing::info!(dir = %dir.display(), blobs = moved, "the blob store was not closed cleanly: its blobs are checked on first use");
        }
        File::create(&marker)?.sync_all()?;
        File::open(&dir)?.sync_all()?;
        let store = BlobStore { index: Mutex::new(scan(&dir, limit)?), dir, checking: Mutex::new(()) };
        {
            let mut index = store.lock();
            let (blobs, bytes) = (index.blobs.len(), index.total);
            let victims = index.make_room(0).unwrap_or_default();
            if !victims.is_empty() {
                tracing::info!(evicted = victims.len(), limit, "the blob store was over its limit");
            }
            store.remove_files(&victims);
            tracing::info!(blobs, bytes, limit, "blob store opened");
        }
        Ok(store)
    }

    /// Marks the store closed cleanly, once every blob in it is on disk (one `syncfs` instead of
    /// an fsync per blob). Call once nothing writes any more; a failure leaves it marked open.
    pub fn close(&self) {
        use std::os::fd::AsRawFd;
        let Ok(dir) = File::open(&self.dir) else { return };
        // SAFETY: syncfs only reads its argument, an open descriptor.
        if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
            return;
        }
        if fs::remove_file(self.dir.join(OPEN_MARKER)).is_ok() {
            let _ = dir.sync_all();
        }
    }

    /// The most bytes the store holds (`blob_store_size`).
    pub fn limit(&self) -> u64 {
        self.lock().limit
    }

    /// The bytes it holds now.
    pub fn bytes(&self) -> u64 {
        self.lock().total
    }

    pub fn path(&self, digest: &[u8; 32]) -> PathBuf {
        let hex = hex(digest);
        self.dir.join(&hex[..2]).join(hex)
    }

    /// Whether the blob is here, verified; if so it counts as used and `hold`'s job holds it.
    /// One set aside after an unclean stop is hashed now (once) and taken back only when its
    /// content is its digest.
    ///
    /// A job holds at most a quarter of the store, at least 256 MiB ([`StoreError::JobShare`]),
    /// so grants that look up (or send) many blobs cannot pin it all: what a job may pin is
    /// bounded by the jobs a scheduler grants at once and their grants' lifetime.
    pub fn has(&self, digest: &[u8; 32], hold: Hold) -> Result<bool, StoreError> {
        let mut index = self.lock();
        let Some((bytes, unverified)) = index.blobs.get(digest).map(|m| (m.bytes, m.unverified)) else {
            return Ok(false);
        };
        index.may_hold(digest, hold.job, bytes)?;
        if !unverified {
            if !self.path(digest).is_file() {
                // Removed behind the worker's back: forgotten, and sent again.
                index.remove(digest);
                return Ok(false);
            }
            index.touch(digest);
            index.hold(digest, hold);
            return Ok(true);
        }
        drop(index);
        Ok(self.check_unverified(digest, hold))
    }

    /// Those of `wanted` that are not here ([`BlobStore::has`] for each, in order): what is here
    /// `hold`'s job now holds.
    pub fn missing(&self, wanted: &[[u8; 32]], hold: Hold) -> Result<Vec<[u8; 32]>, StoreError> {
        let mut missing = Vec::new();
        for d in wanted {
            if !self.has(d, hold)? {
                missing.push(*d);
            }
        }
        Ok(missing)
    }

    /// Lets go of every blob `job` holds (its job ended).
    pub fn release(&self, job: u64) {
        self.lock().release(job);
    }

    pub fn begin(&self, digest: [u8; 32]) -> std::io::Result<IncomingBlob> {
        let (file, tmp) = ferry_cache::create_temp(&self.dir.join("tmp"), "in-", 0o644)?;
        Ok(IncomingBlob { digest, tmp, file: Some(file), hasher: blake3::Hasher::new(), received: 0 })
    }

    /// Verifies and publishes a received blob, which `hold`'s job then holds, removing least
    /// recently used blobs no job holds to make room. An existing blob with that digest is kept.
    pub fn finish(&self, mut blob: IncomingBlob, hold: Hold) -> Result<(), StoreError> {
        let actual = *blob.hasher.finalize().as_bytes();
        if actual != blob.digest {
            return Err(StoreError::Mismatch { claimed: hex(&blob.digest), actual: hex(&actual) });
        }
        let digest = blob.digest;
        let file = blob.file.take().expect("finish once");
        file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o444))?;
        drop(file);
        let path = self.path(&digest);
        // A copy waiting for its first-use check is replaced by what arrived, verified; never
        // while that check runs.
        let unverified = self.lock().blobs.get(&digest).is_some_and(|m| m.unverified);
        let _no_check = unverified.then(|| self.checking.lock().unwrap_or_else(|p| p.into_inner()));
        let mut index = self.lock();
        match index.blobs.get(&digest).map(|m| m.unverified) {
            Some(false) if path.is_file() => {}
            state => {
                if index.remove(&digest).is_some() && state == Some(true) {
                    let _ = fs::remove_file(self.unverified_path(&digest));
                }
                let limit = index.limit;
                if blob.received > limit {
                    return Err(StoreError::TooLarge { bytes: blob.received, limit });
                }
                index.may_hold(&digest, hold.job, blob.received)?;
                let victims = index.make_room(blob.received).map_err(|held| StoreError::Full {
                    bytes: blob.received,
                    limit,
                    held,
                })?;
                self.remove_files(&victims);
                fs::create_dir_all(path.parent().expect("sharded"))?;
                link_new(&blob.tmp, &path)?;
                index.insert(digest, blob.received, false);
            }
        }
        index.touch(&digest);
        index.hold(&digest, hold);
        Ok(())
    }

    /// Places a blob at `dest` (creating parents): a hard link when `link` (the caller's promise
    /// that the job cannot write files it does not own) — to the executable twin when
    /// `executable` — else a copy with the given executable bit. The caller's job holds the blob.
    pub fn materialize(&self, digest: &[u8; 32], dest: &Path, executable: bool, link: bool) -> std::io::Result<()> {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent)?;
        }
        let source = self.path(digest);
        // Blobs stored before they were made read-only are copied rather than linked.
        if link && fs::metadata(&source)?.mode() & 0o222 == 0 {
            // On failure (another file system, a link limit, no room for the twin) a copy does
            // the same job.
            let linked = match executable {
                false => fs::hard_link(&source, dest),
                true => self.executable_twin(digest).and_then(|twin| fs::hard_link(twin, dest)),
            };
            if linked.is_ok() {
                return Ok(());
            }
        }
        fs::copy(&source, dest)?;
        fs::set_permissions(dest, fs::Permissions::from_mode(if executable { 0o755 } else { 0o644 }))
    }
}

impl BlobStore {
    fn lock(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn unverified_path(&self, digest: &[u8; 32]) -> PathBuf {
        let hex = hex(digest);
        self.dir.join(UNVERIFIED).join(&hex[..2]).join(hex)
    }

    /// [`BlobStore::has`] for a blob kept over an unclean stop: hashed outside the index lock,
    /// and held meanwhile, so neither eviction nor a second check touches it.
    fn check_unverified(&self, digest: &[u8; 32], hold: Hold) -> bool {
        let _one_at_a_time = self.checking.lock().unwrap_or_else(|p| p.into_inner());
        {
            let mut index = self.lock();
            match index.blobs.get_mut(digest) {
                None => return false,
                Some(m) if !m.unverified => {
                    // Checked, or sent again, while this waited.
                    index.touch(digest);
                    index.hold(digest, hold);
                    return true;
                }
                Some(m) => m.holds += 1,
            }
        }
        let suspect = self.unverified_path(digest);
        let path = self.path(digest);
        let holds = hash_file(&suspect).is_ok_and(|d| d == *digest);
        let taken_back = holds && {
            let _ = fs::create_dir_all(path.parent().expect("sharded"));
            link_new(&suspect, &path).is_ok()
        };
        let _ = fs::remove_file(&suspect);
        let mut index = self.lock();
        let Some(m) = index.blobs.get_mut(digest) else { return false };
        m.holds -= 1;
        if m.unverified && !taken_back {
            if !holds {
                tracing::warn!(blob = %hex(digest), "a blob kept over an unclean stop does not match its digest: removed");
            }
            index.remove(digest);
            return false;
        }
        m.unverified = false;
        index.touch(digest);
        index.hold(digest, hold);
        true
    }

    /// `<blob>.x`: a read-only executable (0555) copy of the blob, made once, so executable inputs
    /// (proc-macro libraries, shipped to every job) are linked like the others. It counts toward
    /// the store's size with its blob and goes with it; made under the index lock (rare, and it
    /// must not race the blob's eviction).
    fn executable_twin(&self, digest: &[u8; 32]) -> std::io::Result<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        let blob = self.path(digest);
        let twin = twin_path(&blob);
        let mut index = self.lock();
        if fs::symlink_metadata(&twin).is_ok() {
            return Ok(twin);
        }
        let bytes = match index.blobs.get_mut(digest) {
            Some(m) if !m.unverified => {
                // Not its own victim while room is made.
                m.holds += 1;
                m.bytes
            }
            _ => return Err(std::io::Error::other("the blob is not in the store")),
        };
        let room = index.make_room(bytes);
        if let Some(m) = index.blobs.get_mut(digest) {
            m.holds -= 1;
        }
        let victims = room.map_err(|_| std::io::Error::other("no room for an executable copy"))?;
        self.remove_files(&victims);
        let (mut file, tmp) = ferry_cache::create_temp(&self.dir.join("tmp"), "x-", 0o600)?;
        let made = File::open(&blob)
            .and_then(|mut from| std::io::copy(&mut from, &mut file))
            .and_then(|_| file.set_permissions(fs::Permissions::from_mode(0o555)))
            .and_then(|()| link_new(&tmp, &twin));
        drop(file);
        let _ = fs::remove_file(&tmp);
        made?;
        index.add_twin(digest, bytes);
        Ok(twin)
    }

    /// Removes evicted blobs' files (the caller holds the index lock).
    fn remove_files(&self, victims: &[([u8; 32], Meta)]) {
        for (digest, meta) in victims {
            if meta.unverified {
                let _ = fs::remove_file(self.unverified_path(digest));
            } else {
                let path = self.path(digest);
                let _ = fs::remove_file(twin_path(&path));
                let _ = fs::remove_file(&path);
            }
            tracing::debug!(blob = %hex(digest), bytes = meta.bytes, "evicted a blob");
        }
    }
}

impl IncomingBlob {
    pub fn digest(&self) -> [u8; 32] {
        self.digest
    }

    pub fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.hasher.update(data);
        self.received += data.len() as u64;
        self.file.as_mut().expect("open").write_all(data)
    }
}

impl Drop for IncomingBlob {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.tmp);
    }
}

/// The store's bookkeeping: sizes, the order of last use, and holds.
#[derive(Debug, Default)]
struct Index {
    limit: u64,
    /// Bytes of every blob (and executable twin) stored, verified or not.
    total: u64,
    /// Counts uses: a blob's last use is the clock's value then.
    clock: u64,
    blobs: HashMap<[u8; 32], Meta>,
    /// `(last use, digest)`, least recently used first.
    lru: BTreeSet<(u64, [u8; 32])>,
    /// Per job: until when, the blobs it holds, and their bytes (as they were when it took
    /// them, for its share).
    holds: HashMap<u64, (u64, HashSet<[u8; 32]>, u64)>,
    /// The most bytes one job may hold: see [`MIN_JOB_SHARE`].
    job_share: u64,
}

#[derive(Debug, Clone)]
struct Meta {
    /// The blob's size, plus its executable twin's once made.
    bytes: u64,
    used: u64,
    /// Jobs holding it, plus a check or a twin in the making: never evicted while above 0.
    holds: u32,
    /// Kept over an unclean stop and not checked yet (under `unverified/`).
    unverified: bool,
}

impl Index {
    /// Adds a blob (replacing its entry), held by the jobs that held it before (a blob removed
    /// behind the worker's back and stored again).
    fn insert(&mut self, digest: [u8; 32], bytes: u64, unverified: bool) {
        self.clock += 1;
        let holds = self.holds.values().filter(|(_, held, _)| held.contains(&digest)).count() as u32;
        let meta = Meta { bytes, used: self.clock, holds, unverified };
        self.lru.insert((meta.used, digest));
        self.total += bytes;
        if let Some(old) = self.blobs.insert(digest, meta) {
            self.lru.remove(&(old.used, digest));
            self.total -= old.bytes;
        }
    }

    fn remove(&mut self, digest: &[u8; 32]) -> Option<Meta> {
        let meta = self.blobs.remove(digest)?;
        self.lru.remove(&(meta.used, *digest));
        self.total -= meta.bytes;
        Some(meta)
    }

    fn touch(&mut self, digest: &[u8; 32]) {
        let Some(meta) = self.blobs.get_mut(digest) else { return };
        self.lru.remove(&(meta.used, *digest));
        self.clock += 1;
        meta.used = self.clock;
        self.lru.insert((meta.used, *digest));
    }

    fn add_twin(&mut self, digest: &[u8; 32], bytes: u64) {
        if let Some(meta) = self.blobs.get_mut(digest) {
            meta.bytes += bytes;
            self.total += bytes;
        }
    }

    fn hold(&mut self, digest: &[u8; 32], hold: Hold) {
        let (until, held, bytes) = self.holds.entry(hold.job).or_default();
        *until = (*until).max(hold.until_ms);
        if held.insert(*digest)
            && let Some(meta) = self.blobs.get_mut(digest)
        {
            meta.holds += 1;
            *bytes += meta.bytes;
        }
    }

    /// Whether `job` may take a hold of `bytes` more on `digest` within its share (a quarter of
    /// the store); one it holds already costs nothing.
    fn may_hold(&self, digest: &[u8; 32], job: u64, bytes: u64) -> Result<(), StoreError> {
        let (holds, held) = self.holds.get(&job).map_or((false, 0), |(_, set, bytes)| (set.contains(digest), *bytes));
        if holds {
            return Ok(());
        }
        let share = self.job_share;
        if held + bytes > share {
            return Err(StoreError::JobShare { bytes, held, share });
        }
        Ok(())
    }

    fn release(&mut self, job: u64) {
        let Some((_, held, _)) = self.holds.remove(&job) else { return };
        for digest in held {
            if let Some(meta) = self.blobs.get_mut(&digest) {
                meta.holds -= 1;
            }
        }
    }

    /// Ends the holds of grants that expired without their job running.
    fn expire(&mut self, now_ms: u64) {
        let expired: Vec<u64> =
            self.holds.iter().filter(|(_, (until, _, _))| *until < now_ms).map(|(j, _)| *j).collect();
        for job in expired {
            self.release(job);
        }
    }

    /// Takes the least recently used blobs no job holds out of the index until `bytes` more fit
    /// under the limit, and returns them (their files are the caller's to remove); takes none and
    /// returns the bytes held when that cannot be done.
    fn make_room(&mut self, bytes: u64) -> Result<Vec<([u8; 32], Meta)>, u64> {
        self.expire(now_ms());
        let mut over = (self.total + bytes).saturating_sub(self.limit);
        if over == 0 {
            return Ok(Vec::new());
        }
        let mut chosen = Vec::new();
        for (_, digest) in &self.lru {
            let meta = &self.blobs[digest];
            if meta.holds == 0 {
                chosen.push(*digest);
                over = over.saturating_sub(meta.bytes);
                if over == 0 {
                    break;
                }
            }
        }
        if over > 0 {
            return Err(self.blobs.values().filter(|m| m.holds > 0).map(|m| m.bytes).sum());
        }
        Ok(chosen.into_iter().filter_map(|d| Some((d, self.remove(&d)?))).collect())
    }
}

/// The index of what `dir` holds, its order of use that of the files' modification times.
fn scan(dir: &Path, limit: u64) -> std::io::Result<Index> {
    let mut found: Vec<(SystemTime, [u8; 32], u64, bool)> = Vec::new();
    let mut twins: Vec<([u8; 32], u64, PathBuf)> = Vec::new();
    let mut shards = |root: &Path, unverified: bool| -> std::io::Result<()> {
        for shard in fs::read_dir(root)?.flatten() {
            let name = shard.file_name();
            if !shard.file_type().is_ok_and(|t| t.is_dir()) || name == "tmp" || name == UNVERIFIED {
                continue;
            }
            for file in fs::read_dir(shard.path())?.flatten() {
                let Ok(meta) = file.metadata() else { continue };
                let name = file.file_name().to_string_lossy().into_owned();
                let (stem, twin) = match name.strip_suffix(".x") {
                    Some(stem) => (stem.to_owned(), true),
                    None => (name, false),
                };
                let Ok(digest) = blake3::Hash::from_hex(&stem) else { continue };
                if twin {
                    twins.push((*digest.as_bytes(), meta.len(), file.path()));
                } else {
                    let written = meta.modified().unwrap_or(UNIX_EPOCH);
                    found.push((written, *digest.as_bytes(), meta.len(), unverified));
                }
            }
        }
        Ok(())
    };
    shards(dir, false)?;
    if dir.join(UNVERIFIED).is_dir() {
        shards(&dir.join(UNVERIFIED), true)?;
    }
    found.sort();
    let job_share = (limit / 4).max(limit.min(MIN_JOB_SHARE));
    let mut index = Index { limit, job_share, ..Index::default() };
    let unverified_path = |digest: &[u8; 32]| {
        let hex = hex(digest);
        dir.join(UNVERIFIED).join(&hex[..2]).join(hex)
    };
    for (_, digest, bytes, unverified) in found {
        // Both checked and waiting for a check (a crash in between): the checked one stays.
        match index.blobs.get(&digest).map(|m| m.unverified) {
            None => index.insert(digest, bytes, unverified),
            Some(_) if unverified => {
                let _ = fs::remove_file(unverified_path(&digest));
            }
            Some(true) => {
                let _ = fs::remove_file(unverified_path(&digest));
                index.insert(digest, bytes, false);
            }
            Some(false) => {}
        }
    }
    for (digest, bytes, path) in twins {
        match index.blobs.get(&digest) {
            Some(m) if !m.unverified => index.add_twin(&digest, bytes),
            _ => {
                let _ = fs::remove_file(path);
            }
        }
    }
    Ok(index)
}

/// Moves every verified shard under `unverified/` (merging with what an earlier unclean stop left
/// there); returns how many blobs were moved. Executable twins are dropped (remade on use).
fn set_aside(dir: &Path) -> std::io::Result<u64> {
    let aside = dir.join(UNVERIFIED);
    fs::create_dir_all(&aside)?;
    let mut moved = 0;
    for shard in fs::read_dir(dir)?.flatten() {
        let name = shard.file_name();
        if !shard.file_type().is_ok_and(|t| t.is_dir()) || name == "tmp" || name == UNVERIFIED {
            continue;
        }
        let target = aside.join(&name);
        fs::create_dir_all(&target)?;
        for blob in fs::read_dir(shard.path())?.flatten() {
            let from = blob.path();
            if from.extension().is_some_and(|e| e == "x") {
                let _ = fs::remove_file(&from);
                continue;
            }
            fs::rename(&from, target.join(blob.file_name()))?;
            moved += 1;
        }
        fs::remove_dir(shard.path())?;
    }
    Ok(moved)
}

/// `link(2)`, where a file already at `to` (the same content: names are digests) is fine.
fn link_new(from: &Path, to: &Path) -> std::io::Result<()> {
    match fs::hard_link(from, to) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        linked => linked,
    }
}

fn twin_path(blob: &Path) -> PathBuf {
    let mut twin = blob.as_os_str().to_owned();
    twin.push(".x");
    PathBuf::from(twin)
}

/// blake3 of a file, read in 1 MiB pieces.
fn hash_file(path: &Path) -> std::io::Result<[u8; 32]> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(File::open(path)?)?;
    Ok(*hasher.finalize().as_bytes())
}

pub fn hex(d: &[u8; 32]) -> String {
    blake3::Hash::from_bytes(*d).to_hex().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plenty: for the tests that are not about the limit.
    const LIMIT: u64 = 1 << 30;
    /// A job whose grant never expires and that never ends: what it holds stays.
    const JOB: Hold = Hold { job: 1, until_ms: u64::MAX };

    /// Stores `content` as a verified blob that no job holds (its upload's job ended); its digest.
    fn put(store: &BlobStore, content: &[u8]) -> [u8; 32] {
        let digest = try_put(store, content, Hold::running(0)).unwrap();
        store.release(0);
        digest
    }

    fn try_put(store: &BlobStore, content: &[u8], hold: Hold) -> Result<[u8; 32], StoreError> {
        let digest = *blake3::hash(content).as_bytes();
        let mut blob = store.begin(digest).unwrap();
        blob.write(content).unwrap();
        store.finish(blob, hold).map(|()| digest)
    }

    #[test]
    fn only_verified_blobs_are_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path(), LIMIT).unwrap();
        let good = *blake3::hash(b"hello").as_bytes();
        let mut blob = store.begin(good).unwrap();
        blob.write(b"hel").unwrap();
        blob.write(b"lo").unwrap();
        store.finish(blob, JOB).unwrap();
        assert!(store.has(&good, JOB).unwrap());
        let claimed = [7u8; 32];
        let mut bad = store.begin(claimed).unwrap();
        bad.write(b"not what was claimed").unwrap();
        let err = store.finish(bad, JOB).unwrap_err().to_string();
        assert!(err.contains("not the claimed"), "{err}");
        assert!(!store.has(&claimed, JOB).unwrap());
        assert_eq!(fs::read_dir(dir.path().join("blobs/tmp")).unwrap().count(), 0);
    }

    #[test]
    fn a_store_not_closed_cleanly_keeps_its_blobs_until_they_fail_their_check() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path(), LIMIT).unwrap();
        let kept = put(&store, b"kept");
        store.close();
        let store = BlobStore::open(dir.path(), LIMIT).unwrap();
        assert!(store.has(&kept, JOB).unwrap(), "a clean close keeps the blobs");
        let intact = put(&store, b"intact");
        let torn = put(&store, b"torn by a crash");
        store.materialize(&intact, &dir.path().join("job/x.so"), true, true).unwrap();
        drop(store); // no close: the worker died, perhaps with its machine
        let store = BlobStore::open(dir.path(), LIMIT).unwrap();
        // What the crash did to one of them (content lost after its link was made).
        let torn_path = dir.path().join("blobs/unverified").join(&hex(&torn)[..2]).join(hex(&torn));
        fs::set_permissions(&torn_path, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(&torn_path, vec![0u8; 15]).unwrap();
        assert!(!store.path(&kept).exists(), "set aside until first use");
        assert!(
            store.has(&kept, JOB).unwrap() && store.has(&intact, JOB).unwrap(),
            "intact blobs are taken back on first use"
        );
        assert!(store.path(&kept).is_file());
        assert!(!store.has(&torn, JOB).unwrap(), "a torn blob is not served");
        assert!(!torn_path.exists(), "and is removed");
        store.materialize(&intact, &dir.path().join("job2/x.so"), true, true).unwrap();
        assert_eq!(fs::read(dir.path().join("job2/x.so")).unwrap(), b"intact", "its twin is made again");
        let again = put(&store, b"torn by a crash");
        assert_eq!(again, torn);
        assert!(store.has(&torn, JOB).unwrap(), "sent again, stored again");
        assert!(dir.path().join("blobs/tmp").is_dir());
    }

    #[test]
    fn linked_executables_share_one_read_only_twin() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path(), LIMIT).unwrap();
        let digest = put(&store, b"\x7fELF proc-macro");
        let (a, b, c) = (dir.path().join("job1/m.so"), dir.path().join("job2/m.so"), dir.path().join("job3/m.so"));
        store.materialize(&digest, &a, true, true).unwrap();
        store.materialize(&digest, &b, true, true).unwrap();
        store.materialize(&digest, &c, true, false).unwrap();
        let (a, b, c) = (fs::metadata(a).unwrap(), fs::metadata(b).unwrap(), fs::metadata(c).unwrap());
        assert_eq!(a.ino(), b.ino(), "both jobs link the same twin");
        assert_eq!(a.mode() & 0o777, 0o555);
        assert_ne!(a.ino(), fs::metadata(store.path(&digest)).unwrap().ino(), "the blob itself stays 0444");
        assert_eq!(fs::metadata(store.path(&digest)).unwrap().mode() & 0o777, 0o444);
        assert_ne!(c.ino(), a.ino(), "without link: a copy");
        assert_eq!(c.mode() & 0o777, 0o755);
        assert_eq!(fs::read_dir(dir.path().join("blobs/tmp")).unwrap().count(), 0);
    }

    /// Ten bytes of content `tag`, so sizes add up simply.
    fn ten(tag: u8) -> Vec<u8> {
        vec![tag; 10]
    }

    #[test]
    fn over_its_limit_the_store_evicts_the_least_recently_used() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path(), 30).unwrap();
        let (a, b, c) = (put(&store, &ten(b'a')), put(&store, &ten(b'b')), put(&store, &ten(b'c')));
        assert_eq!(store.bytes(), 30);
        // `a` is read for a job (found, placed in its tree), which then ends.
        assert!(store.has(&a, Hold::running(7)).unwrap());
        store.materialize(&a, &dir.path().join("job/a"), false, true).unwrap();
        store.release(7);
        let d = put(&store, &ten(b'd'));
        assert!(!store.path(&b).exists(), "the least recently used blob goes");
        assert!(!store.has(&b, JOB).unwrap(), "and is reported missing, to be sent again");
        assert!([a, c, d].iter().all(|x| store.path(x).is_file()), "the recently read one stays");
        assert_eq!(store.bytes(), 30);
        let e = put(&store, &ten(b'e'));
        assert!(!store.path(&c).exists() && store.path(&e).is_file());
        // The job's tree is untouched by evictions: a link to the inode, or a copy.
        put(&store, &ten(b'f'));
        assert!(!store.path(&a).exists());
        assert_eq!(fs::read(dir.path().join("job/a")).unwrap(), ten(b'a'));
        // Sent again, stored again.
        assert_eq!(put(&store, &ten(b'b')), b);
        assert!(store.has(&b, JOB).unwrap());
        assert_eq!(store.bytes(), 30);
    }

    #[test]
    fn blobs_a_job_holds_are_never_evicted_and_a_store_full_of_them_refuses_more() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path(), 20).unwrap();
        let now = now_ms();
        // Job 1 found `a` (FindMissing) and job 2 uploaded `b`; both grants are valid.
        let a = put(&store, &ten(b'a'));
        assert!(store.has(&a, Hold::until(1, now + 60_000)).unwrap());
        let b = try_put(&store, &ten(b'b'), Hold::until(2, now + 60_000)).unwrap();
        let err = try_put(&store, &ten(b'c'), Hold::until(3, now + 60_000)).unwrap_err();
        assert!(matches!(err, StoreError::Full { bytes: 10, limit: 20, held: 20 }), "{err}");
        assert!(err.to_string().contains("blob_store_size"), "{err}");
        assert!(store.path(&a).is_file() && store.path(&b).is_file(), "a refusal evicts nothing");
        assert_eq!(fs::read_dir(dir.path().join("blobs/tmp")).unwrap().count(), 0);
        // Job 1 runs (its hold lasts until it ends) and job 2's grant expires unused.
        assert!(store.has(&a, Hold::running(1)).unwrap());
        store.lock().holds.get_mut(&2).unwrap().0 = now - 1;
        let c = try_put(&store, &ten(b'c'), Hold::until(3, now + 60_000)).unwrap();
        assert!(!store.path(&b).exists(), "an expired grant holds nothing");
        assert!(store.path(&a).is_file() && store.path(&c).is_file(), "the running job's input and the new blob stay");
        // Job 1 ends: its input can go.
        store.release(1);
        store.release(3);
        put(&store, &ten(b'd'));
        assert!(!store.path(&a).exists());
        assert_eq!(store.bytes(), 20);
    }

    #[test]
    fn one_job_cannot_pin_more_than_its_share_of_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path(), 40).unwrap();
        store.lock().job_share = 20; // as for a store of 80 bytes, a quarter
        let now = now_ms();
        let greedy = Hold::until(1, now + 60_000);
        let (a, b) = (put(&store, &ten(b'a')), put(&store, &ten(b'b')));
        assert!(store.has(&a, greedy).unwrap() && store.has(&b, greedy).unwrap());
        assert!(store.has(&a, greedy).unwrap(), "what a job holds already costs nothing more");
        // A third blob, looked up or sent, is over the share: refused, and nothing is held for it.
        let c = put(&store, &ten(b'c'));
        let err = store.has(&c, greedy).unwrap_err();
        assert!(matches!(err, StoreError::JobShare { bytes: 10, held: 20, share: 20 }), "{err}");
        assert!(err.to_string().contains("blob_store_size"), "{err}");
        let err = try_put(&store, &ten(b'd'), greedy).unwrap_err();
        assert!(matches!(err, StoreError::JobShare { .. }), "{err}");
        assert_eq!(fs::read_dir(dir.path().join("blobs/tmp")).unwrap().count(), 0);
        // Another job still finds and stores what it needs.
        let honest = Hold::until(2, now + 60_000);
        assert!(store.has(&c, honest).unwrap());
        try_put(&store, &ten(b'e'), honest).unwrap();
        // The share comes back when the job's holds end.
        store.release(1);
        assert!(store.has(&c, greedy).unwrap());
    }

    #[test]
    fn a_blob_larger_than_the_whole_store_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path(), 20).unwrap();
        let a = put(&store, &ten(b'a'));
        let err = try_put(&store, &[b'x'; 21], JOB).unwrap_err();
        assert!(matches!(err, StoreError::TooLarge { bytes: 21, limit: 20 }), "{err}");
        assert!(store.has(&a, JOB).unwrap(), "nothing was evicted for it");
        assert_eq!(fs::read_dir(dir.path().join("blobs/tmp")).unwrap().count(), 0);
    }

    #[test]
    fn executable_twins_count_toward_the_limit_and_go_with_their_blob() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path(), 30).unwrap();
        let m = put(&store, &ten(b'm'));
        assert!(store.has(&m, Hold::running(5)).unwrap());
        store.materialize(&m, &dir.path().join("job/m.so"), true, true).unwrap();
        store.release(5);
        let twin = twin_path(&store.path(&m));
        assert!(twin.is_file());
        assert_eq!(store.bytes(), 20, "the blob and its executable copy");
        put(&store, &ten(b'a'));
        put(&store, &ten(b'b'));
        assert!(!store.path(&m).exists() && !twin.exists(), "evicted together");
        assert_eq!(store.bytes(), 20);
        assert_eq!(fs::read(dir.path().join("job/m.so")).unwrap(), ten(b'm'));
        // No room for a twin (everything held): the job gets a copy instead.
        let full = BlobStore::open(&dir.path().join("full"), 10).unwrap();
        let x = try_put(&full, &ten(b'x'), Hold::running(6)).unwrap();
        full.materialize(&x, &dir.path().join("job2/x.so"), true, true).unwrap();
        assert!(!twin_path(&full.path(&x)).exists());
        assert_eq!(fs::read(dir.path().join("job2/x.so")).unwrap(), ten(b'x'));
        assert_eq!(full.bytes(), 10);
    }

    #[test]
    fn a_reopened_store_knows_its_size_and_evicts_the_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path(), 40).unwrap();
        let blobs: Vec<[u8; 32]> = (0..4).map(|i| put(&store, &ten(b'a' + i))).collect();
        // Written a second apart, the first last: the order a restart ranks them by.
        for (i, digest) in blobs.iter().enumerate() {
            let at = UNIX_EPOCH + std::time::Duration::from_secs(1_000_000 + [4, 1, 2, 3][i]);
            File::open(store.path(digest)).unwrap().set_modified(at).unwrap();
        }
        store.close();
        let store = BlobStore::open(dir.path(), 40).unwrap();
        assert_eq!(store.bytes(), 40, "a clean restart counts every blob");
        store.close();
        let store = BlobStore::open(dir.path(), 20).unwrap();
        assert_eq!(store.bytes(), 20, "a smaller limit evicts at once");
        assert!(!store.path(&blobs[1]).exists() && !store.path(&blobs[2]).exists(), "the two written first");
        assert!(store.has(&blobs[0], JOB).unwrap() && store.has(&blobs[3], JOB).unwrap());
        store.release(JOB.job);
        // An unclean stop: the blobs wait under unverified/, still counted, still evictable.
        drop(store);
        let store = BlobStore::open(dir.path(), 20).unwrap();
        assert_eq!(store.bytes(), 20, "blobs waiting for their check count too");
        assert!(!store.path(&blobs[0]).exists(), "set aside");
        let e = put(&store, &ten(b'e'));
        assert!(store.has(&e, JOB).unwrap());
        assert_eq!(store.bytes(), 20);
        let left = [blobs[0], blobs[3]].iter().filter(|d| store.has(d, JOB).unwrap()).count();
        assert_eq!(left, 1, "one unverified blob made room, the other is checked and kept");
        assert_eq!(files(&dir.path().join("blobs")), 2);
    }

    /// Blob files in the store (checked or not), twins included.
    fn files(dir: &Path) -> usize {
        let mut n = 0;
        for entry in fs::read_dir(dir).unwrap().flatten() {
            let name = entry.file_name();
            if entry.file_type().unwrap().is_dir() && name != "tmp" {
                n += files(&entry.path());
            } else if name.len() >= 64 {
                n += 1;
            }
        }
        n
    }
}
