//! The scheduler's toolchain store: archives by ToolchainId under `<data dir>/toolchains`, each
//! with a small JSON record. An upload is written to a temp file while it is verified completely
//! (every entry against the manifest, the manifest against the claimed id; the service runs the
//! check as the bytes arrive) and only then published with `link(2)`, which never replaces an
//! existing archive. A refused upload leaves nothing.
//!
//! The store is bounded (`archive_store_size`): publishing an archive first removes the least
//! recently used others until it fits (used: uploaded, asked for by a client, fetched by a
//! worker). The archive being published is never removed to make room for itself, and one larger
//! than the whole store is refused. An evicted toolchain is forgotten at once — its record goes
//! first, so nothing lists or serves it again — and the next client that asks for it uploads it
//! again (`ferry toolchain upload`, started in the background by the wrapper); a worker's fetch
//! already under way keeps reading the removed file to its end.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use ferry_toolchains::ToolchainId;
use serde::{Deserialize, Serialize};

/// How stale a record's `last_used` may get before a use writes it again: uses are counted in
/// memory (a client asks about its toolchain before every remote compile), and the record only
/// carries the order of use over a restart.
const RECORD_USE_EVERY_SECS: u64 = 60;

#[derive(Debug)]
pub struct ArchiveStore {
    dir: PathBuf,
    /// The most bytes of archives kept (`archive_store_size`).
    limit: u64,
    /// Every stored toolchain (archive and record both present): its size and last use. Every
    /// change to the files is made holding it, so it and the files agree.
    index: Mutex<Index>,
}

/// What is known about a stored toolchain.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    pub rustc_version: String,
    pub targets: Vec<String>,
    pub bytes: u64,
    /// Unix seconds.
    pub uploaded: u64,
    pub last_used: u64,
}

/// The outcome of [`ArchiveStore::publish`].
#[derive(Debug, PartialEq, Eq)]
pub struct Published {
    /// Whether this upload stored the archive (false: it was here already).
    pub stored: bool,
    /// Toolchains removed to make room for it, forgotten.
    pub evicted: Vec<ToolchainId>,
}

/// An upload being received: a temp file that is removed unless it is published.
#[derive(Debug)]
pub struct Incoming {
    path: PathBuf,
    file: Option<File>,
    pub received: u64,
}

impl ArchiveStore {
    /// Opens the store, holding at most `limit` bytes of archives: beyond it, the least recently
    /// used are removed now. A record without its archive, or an archive without its record (a
    /// crash between the two), is removed too.
    pub fn open(data_dir: &Path, limit: u64) -> std::io::Result<ArchiveStore> {
        let dir = data_dir.join("toolchains");
        fs::create_dir_all(dir.join("tmp"))?;
        // Uploads interrupted by a crash leave temp files; nothing can still be writing them now.
        for entry in fs::read_dir(dir.join("tmp"))?.flatten() {
            let _ = fs::remove_file(entry.path());
        }
        let store = ArchiveStore { index: Mutex::new(scan(&dir)?), dir, limit };
        let evicted = store.make_room(&mut store.lock(), 0);
        if !evicted.is_empty() {
            tracing::info!(evicted = evicted.len(), limit, "the toolchain archive store was over its limit");
        }
        Ok(store)
    }

    /// The most bytes of archives kept (`archive_store_size`).
    pub fn limit(&self) -> u64 {
        self.limit
    }

    pub fn path(&self, id: &ToolchainId) -> PathBuf {
        self.dir.join(format!("{id}.tar.gz"))
    }

    pub fn has(&self, id: &ToolchainId) -> bool {
        self.lock().stored.contains_key(id) && self.path(id).is_file()
    }

    pub fn record(&self, id: &ToolchainId) -> Option<Record> {
        serde_json::from_slice(&fs::read(self.record_path(id)).ok()?).ok()
    }

    /// The stored toolchains' records, by id.
    pub fn list(&self) -> Vec<Record> {
        let ids: Vec<ToolchainId> = self.lock().stored.keys().copied().collect();
        let mut out: Vec<Record> = ids.iter().filter_map(|id| self.record(id)).collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// The bytes of archives stored.
    pub fn bytes(&self) -> u64 {
        self.lock().total
    }

    pub fn begin(&self) -> std::io::Result<Incoming> {
        let (file, path) = ferry_cache::create_temp(&self.dir.join("tmp"), &format!("{}.", std::process::id()), 0o644)?;
        Ok(Incoming { path, file: Some(file), received: 0 })
    }

    /// Publishes a received archive, which the caller has verified against `id` (as it arrived),
    /// with its record, after removing the least recently used others until it fits. Blocking.
    pub fn publish(&self, mut incoming: Incoming, id: &ToolchainId, mut record: Record) -> Result<Published, String> {
        let file = incoming.file.take().expect("publish once");
        file.sync_all().map_err(|e| format!("storing the upload: {e}"))?;
        drop(file);
        let bytes = incoming.received;
        if bytes > self.limit {
            return Err(too_large(bytes, self.limit));
        }
        let mut index = self.lock();
        if index.stored.contains_key(id) {
            index.touch(id);
            return Ok(Published { stored: false, evicted: Vec::new() });
        }
        let evicted = self.make_room(&mut index, bytes);
        match fs::hard_link(&incoming.path, self.path(id)) {
            // Only verified archives are ever linked under an id's name.
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("storing the archive: {e}")),
        }
        let now = now_secs();
        record.id = id.to_hex();
        record.bytes = bytes;
        record.uploaded = now;
        record.last_used = now;
        if let Err(e) = self.write_record(&record) {
            let _ = fs::remove_file(self.path(id));
            return Err(format!("storing the record: {e}"));
        }
        index.insert(*id, bytes, now);
        Ok(Published { stored: true, evicted })
    }

    /// Notes a use of the toolchain (a client asked for it, a worker fetched it): the least
    /// recently used go first. Best effort.
    pub fn touch(&self, id: &ToolchainId) {
        let mut index = self.lock();
        let Some(recorded) = index.touch(id) else { return };
        let now = now_secs();
        if now.saturating_sub(recorded) < RECORD_USE_EVERY_SECS {
            return;
        }
        if let Some(mut r) = self.record(id) {
            r.last_used = now;
            if self.write_record(&r).is_ok()
                && let Some(u) = index.stored.get_mut(id)
            {
                u.recorded = now;
            }
        }
    }

    fn write_record(&self, record: &Record) -> std::io::Result<()> {
        let path = self.dir.join(format!("{}.json", record.id));
        let tmp = self.dir.join("tmp").join(format!("{}.json.{}", record.id, std::process::id()));
        fs::write(&tmp, serde_json::to_vec_pretty(record).expect("record serializes"))?;
        fs::rename(&tmp, &path)
    }
}

impl ArchiveStore {
    fn lock(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record_path(&self, id: &ToolchainId) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Removes the least recently used toolchains until `bytes` more fit; returns them.
    fn make_room(&self, index: &mut Index, bytes: u64) -> Vec<ToolchainId> {
        let mut evicted = Vec::new();
        while index.total + bytes > self.limit {
            let Some(id) = index.least_recently_used() else { break };
            index.remove(&id);
            // The record first: whoever lists toolchains no longer sees it.
            let _ = fs::remove_file(self.record_path(&id));
            let _ = fs::remove_file(self.path(&id));
            tracing::info!(toolchain = %id, "evicted a toolchain archive");
            evicted.push(id);
        }
        evicted
    }
}

/// Why an archive is refused whatever else the store holds.
pub fn too_large(bytes: u64, limit: u64) -> String {
    format!(
        "an archive of {bytes} bytes is larger than the scheduler's whole toolchain store ({limit} bytes, \
         archive_store_size)"
    )
}

impl Incoming {
    pub fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.received += data.len() as u64;
        self.file.as_mut().expect("still open").write_all(data)
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Sizes and order of use of the stored toolchains.
#[derive(Debug, Default)]
struct Index {
    total: u64,
    /// Counts uses: a toolchain's last use is the clock's value then.
    clock: u64,
    stored: HashMap<ToolchainId, Usage>,
}

#[derive(Debug, Clone, Copy)]
struct Usage {
    bytes: u64,
    used: u64,
    /// The `last_used` its record holds (Unix seconds).
    recorded: u64,
}

impl Index {
    fn insert(&mut self, id: ToolchainId, bytes: u64, recorded: u64) {
        self.clock += 1;
        self.total += bytes;
        if let Some(old) = self.stored.insert(id, Usage { bytes, used: self.clock, recorded }) {
            self.total -= old.bytes;
        }
    }

    fn remove(&mut self, id: &ToolchainId) {
        if let Some(old) = self.stored.remove(id) {
            self.total -= old.bytes;
        }
    }

    /// Marks a use; the `last_used` in its record, if stored.
    fn touch(&mut self, id: &ToolchainId) -> Option<u64> {
        let usage = self.stored.get_mut(id)?;
        self.clock += 1;
        usage.used = self.clock;
        Some(usage.recorded)
    }

    /// A linear scan: a store holds tens of toolchains, and this runs once per upload.
    fn least_recently_used(&self) -> Option<ToolchainId> {
        self.stored.iter().min_by_key(|(id, u)| (u.used, **id)).map(|(id, _)| *id)
    }
}

/// The index of what `dir` holds, in the order of the records' `last_used` (then `uploaded`).
fn scan(dir: &Path) -> std::io::Result<Index> {
    let mut found: Vec<(u64, u64, ToolchainId, u64)> = Vec::new();
    let mut archives: Vec<(ToolchainId, PathBuf)> = Vec::new();
    for entry in fs::read_dir(dir)?.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(stem) = name.strip_suffix(".json") {
            let record: Option<Record> = fs::read(&path).ok().and_then(|b| serde_json::from_slice(&b).ok());
            let archive = dir.join(format!("{stem}.tar.gz"));
            match (stem.parse::<ToolchainId>(), record, fs::metadata(&archive)) {
                (Ok(id), Some(r), Ok(meta)) if r.id == stem => found.push((r.last_used, r.uploaded, id, meta.len())),
                _ => {
                    tracing::warn!(record = %path.display(), "a toolchain record without its archive: removed");
                    let _ = fs::remove_file(&path);
                }
            }
        } else if let Some(stem) = name.strip_suffix(".tar.gz")
            && let Ok(id) = stem.parse::<ToolchainId>()
        {
            archives.push((id, path));
        }
    }
    found.sort();
    let mut index = Index::default();
    for (last_used, _, id, bytes) in found {
        index.insert(id, bytes, last_used);
    }
    for (id, path) in archives {
        if !index.stored.contains_key(&id) {
            tracing::warn!(archive = %path.display(), "a toolchain archive without its record: removed");
            let _ = fs::remove_file(&path);
        }
    }
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Publishes `bytes` bytes as toolchain `n` (the store does not look inside: the service
    /// verifies archives as they arrive).
    fn upload(store: &ArchiveStore, n: u8, bytes: usize) -> Result<Published, String> {
        let mut incoming = store.begin().unwrap();
        incoming.write(&vec![n; bytes]).unwrap();
        let record = Record {
            id: String::new(),
            rustc_version: format!("rustc 1.{n}.0"),
            targets: vec!["x86_64-unknown-linux-gnu".into()],
            bytes: 0,
            uploaded: 0,
            last_used: 0,
        };
        store.publish(incoming, &id(n), record)
    }

    fn id(n: u8) -> ToolchainId {
        ToolchainId([n; 32])
    }

    fn listed(store: &ArchiveStore) -> Vec<ToolchainId> {
        store.list().iter().map(|r| r.id.parse().unwrap()).collect()
    }

    #[test]
    fn over_its_limit_the_store_evicts_the_least_recently_used_and_forgets_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArchiveStore::open(dir.path(), 300).unwrap();
        for n in 1..=3 {
            assert_eq!(upload(&store, n, 100).unwrap(), Published { stored: true, evicted: vec![] });
        }
        assert_eq!(store.bytes(), 300);
        store.touch(&id(1)); // a client asked for it
        assert_eq!(upload(&store, 4, 100).unwrap(), Published { stored: true, evicted: vec![id(2)] });
        assert!(!store.has(&id(2)));
        assert!(!store.path(&id(2)).exists() && store.record(&id(2)).is_none(), "its files are gone");
        assert_eq!(listed(&store), [id(1), id(3), id(4)], "nothing lists it");
        assert!(store.has(&id(1)), "the recently used one stays");
        // Uploaded again, it is stored again (making room in turn).
        assert_eq!(upload(&store, 2, 100).unwrap(), Published { stored: true, evicted: vec![id(3)] });
        assert_eq!(upload(&store, 2, 100).unwrap(), Published { stored: false, evicted: vec![] });
        assert_eq!(store.bytes(), 300);
    }

    #[test]
    fn the_archive_just_uploaded_stays_and_one_larger_than_the_store_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArchiveStore::open(dir.path(), 300).unwrap();
        upload(&store, 1, 100).unwrap();
        upload(&store, 2, 100).unwrap();
        let big = upload(&store, 3, 300).unwrap();
        assert_eq!(big, Published { stored: true, evicted: vec![id(1), id(2)] });
        assert!(store.has(&id(3)));
        let err = upload(&store, 4, 301).unwrap_err();
        assert!(err.contains("301 bytes") && err.contains("archive_store_size"), "{err}");
        assert!(store.has(&id(3)), "a refused upload evicts nothing");
        assert_eq!(fs::read_dir(dir.path().join("toolchains/tmp")).unwrap().count(), 0, "and leaves nothing");
    }

    #[test]
    fn a_reopened_store_keeps_its_toolchains_in_their_order_of_use() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArchiveStore::open(dir.path(), 300).unwrap();
        for n in 1..=3 {
            upload(&store, n, 100).unwrap();
        }
        // Uses a restart remembers: the records' last_used (toolchain 1 used last).
        for (n, last_used) in [(1, 30), (2, 10), (3, 20)] {
            let mut r = store.record(&id(n)).unwrap();
            r.last_used = last_used;
            store.write_record(&r).unwrap();
        }
        // A crash between an archive and its record, either way round.
        fs::write(dir.path().join(format!("toolchains/{}.tar.gz", id(8))), b"no record").unwrap();
        let mut orphan = store.record(&id(1)).unwrap();
        orphan.id = id(9).to_hex();
        store.write_record(&orphan).unwrap();
        drop(store);
        let store = ArchiveStore::open(dir.path(), 300).unwrap();
        assert_eq!((store.bytes(), listed(&store)), (300, vec![id(1), id(2), id(3)]));
        assert!(!store.has(&id(8)) && !store.path(&id(8)).exists());
        assert!(store.record(&id(9)).is_none());
        assert_eq!(upload(&store, 4, 100).unwrap().evicted, [id(2)]);
        drop(store);
        let smaller = ArchiveStore::open(dir.path(), 150).unwrap();
        assert_eq!(listed(&smaller), [id(4)], "a smaller limit evicts at once, least recently used first");
        assert_eq!(smaller.bytes(), 100);
    }
}
