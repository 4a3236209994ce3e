//! Toolchains on a worker: fetched from the scheduler by id, verified and unpacked once into
//! `<data dir>/toolchains/<id>` (read-only), kept in a size-bounded LRU (`toolchain_cache_bytes`:
//! after each unpack, and at start, the least recently used go until the rest fit). Concurrent
//! jobs that need the same toolchain wait for one unpack (a lock per id); different toolchains
//! never wait on each other. Toolchains in use are never evicted, so the unpacked bytes exceed the
//! limit only by what running jobs (one toolchain per slot) and the one unpack at hand hold.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ferry_toolchains::{ToolchainId, UnpackLimits, unpack_archive};

#[derive(Debug)]
pub struct ToolchainCache {
    dir: PathBuf,
    max_bytes: u64,
    /// Per-id unpack locks and bookkeeping.
    entries: Mutex<HashMap<ToolchainId, Arc<Slot>>>,
}

#[derive(Debug, Default)]
struct Slot {
    unpack: tokio::sync::Mutex<()>,
    state: Mutex<SlotState>,
}

#[derive(Debug, Default)]
struct SlotState {
    in_use: usize,
    last_used: Option<Instant>,
    bytes: u64,
}

/// A toolchain held for one job: it is not evicted while the lease lives.
#[derive(Debug)]
pub struct Lease {
    pub dir: PathBuf,
    slot: Arc<Slot>,
}

impl Slot {
    /// Whether its unpack finished (its size is known only then; an empty toolchain is not one).
    fn unpacked(&self) -> bool {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).bytes > 0
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut s = self.slot.state.lock().unwrap_or_else(|p| p.into_inner());
        s.in_use -= 1;
        s.last_used = Some(Instant::now());
    }
}

impl ToolchainCache {
    pub fn open(data_dir: &Path, max_bytes: u64) -> std::io::Result<ToolchainCache> {
        let dir = data_dir.join("toolchains");
        fs::create_dir_all(&dir)?;
        let mut entries = HashMap::new();
        for entry in fs::read_dir(&dir)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Ok(id) = name.parse::<ToolchainId>() {
                let slot = Slot::default();
                slot.state.lock().expect("fresh").bytes = tree_bytes(&entry.path());
                entries.insert(id, Arc::new(slot));
            } else {
                // Half-finished unpacks from a crash.
                make_writable(&entry.path());
                let _ = fs::remove_dir_all(entry.path());
            }
        }
        let cache = ToolchainCache { dir, max_bytes, entries: Mutex::new(entries) };
        // A smaller limit than the last run's takes effect now.
        cache.evict();
        Ok(cache)
    }

    /// The toolchains unpacked here (completely: one being unpacked is not listed).
    pub fn present(&self) -> Vec<ToolchainId> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let mut ids: Vec<ToolchainId> =
            entries.iter().filter(|(id, slot)| slot.unpacked() && self.path(id).is_dir()).map(|(id, _)| *id).collect();
        ids.sort();
        ids
    }

    pub fn path(&self, id: &ToolchainId) -> PathBuf {
        self.dir.join(id.to_hex())
    }

    /// The unpacked toolchain, fetching and unpacking it first if needed; `fetch` sends the
    /// archive's chunks, which are verified and unpacked as they arrive. Returns whether this
    /// call unpacked it.
    pub async fn get<F, Fut>(&self, id: ToolchainId, fetch: F) -> Result<(Lease, bool), String>
    where
        F: FnOnce(tokio::sync::mpsc::Sender<Result<Vec<u8>, String>>) -> Fut,
        Fut: std::future::Future<Output = Result<(), String>>,
    {
        // In use from the moment it is looked up, under the lock eviction takes: never evicted
        // between the two.
        let slot = {
            let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            let slot = Arc::clone(entries.entry(id).or_default());
            slot.state.lock().unwrap_or_else(|p| p.into_inner()).in_use += 1;
            slot
        };
        let lease = Lease { dir: self.path(&id), slot: Arc::clone(&slot) };
        let _guard = slot.unpack.lock().await;
        if slot.unpacked() && lease.dir.is_dir() {
            return Ok((lease, false));
        }
        if lease.dir.exists() {
            // Left by an unpack that did not finish: never used, started over.
            make_writable(&lease.dir);
            let _ = fs::remove_dir_all(&lease.dir);
        }
        let started = Instant::now();
        tracing::info!(toolchain = %id, "fetching and unpacking a toolchain");
        let (tx, reader) = ferry_proto::ChunkReader::channel(16);
        let dest = lease.dir.clone();
        let unpacker = tokio::task::spawn_blocking(move || -> Result<u64, String> {
            unpack_archive(reader, &dest, &id, &UnpackLimits::default())
                .map_err(|e| format!("toolchain {id} refused: {e}"))?;
            make_read_only(&dest);
            Ok(tree_bytes(&dest))
        });
        let fetched = fetch(tx).await;
        let unpacked = unpacker.await.map_err(|e| format!("unpacking: {e}")).and_then(|r| r);
        if fetched.is_err() || unpacked.is_err() {
            // Unknown or refused ids leave no bookkeeping behind (waiters hold their own slot).
            self.entries.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        }
        // A failed transfer explains a failed unpack better than the unpack's own message.
        fetched?;
        let bytes = unpacked?;
        tracing::info!(toolchain = %id, bytes, ms = started.elapsed().as_millis() as u64, "toolchain unpacked");
        slot.state.lock().unwrap_or_else(|p| p.into_inner()).bytes = bytes;
        self.evict();
        Ok((lease, true))
    }

    /// Removes least recently used toolchains not in use until the total fits.
    fn evict(&self) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let total: u64 = entries.values().map(|s| s.state.lock().map_or(0, |s| s.bytes)).sum();
            if total <= self.max_bytes {
                return;
            }
            let victim = entries
                .iter()
                .filter_map(|(id, s)| {
                    let st = s.state.lock().ok()?;
                    (st.in_use == 0 && st.bytes > 0).then_some((st.last_used, *id))
                })
                .min();
            let Some((_, id)) = victim else { return };
            let path = self.path(&id);
            make_writable(&path);
            let _ = fs::remove_dir_all(&path);
            entries.remove(&id);
            tracing::info!(toolchain = %id, "evicted toolchain");
        }
    }
}

fn tree_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        match entry.file_type() {
            Ok(t) if t.is_dir() => total += tree_bytes(&entry.path()),
            Ok(t) if t.is_file() => total += entry.metadata().map_or(0, |m| m.len()),
            _ => {}
        }
    }
    total
}

/// Directories 0555 and files without write bits: a job (or a bug) cannot change a toolchain.
fn make_read_only(dir: &Path) {
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_dir() => make_read_only(&path),
            Ok(t) if t.is_file() => {
                if let Ok(m) = fs::metadata(&path) {
                    let _ = fs::set_permissions(&path, fs::Permissions::from_mode(m.permissions().mode() & 0o555));
                }
            }
            _ => {}
        }
    }
    let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o555));
}

fn make_writable(dir: &Path) {
    let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o755));
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            make_writable(&entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_toolchains::{BUILD_HOST, Manifest, ToolchainSet, write_archive};

    /// A toolchain of `bytes` bytes (its `rustc` and one library), made and archived for real;
    /// its id and archive.
    fn toolchain(dir: &Path, tag: u8, bytes: usize) -> (ToolchainId, Vec<u8>) {
        let root = dir.join(format!("toolchain-{tag}"));
        let lib = root.join(format!("lib/rustlib/{BUILD_HOST}/lib"));
        fs::create_dir_all(root.join("bin")).unwrap();
        fs::create_dir_all(&lib).unwrap();
        fs::write(root.join("bin/rustc"), format!("#!/bin/sh\n# {tag}\n")).unwrap();
        fs::set_permissions(root.join("bin/rustc"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(lib.join("libstd.rlib"), vec![tag; bytes]).unwrap();
        let set = ToolchainSet::collect(&root, BUILD_HOST, &[]).unwrap();
        let manifest = Manifest::compute(&set).unwrap();
        let mut archive = Vec::new();
        write_archive(&set, &manifest, &mut archive).unwrap();
        (manifest.id(), archive)
    }

    /// The toolchain, fetched from `archive` when it is not here.
    async fn get(cache: &ToolchainCache, (id, archive): &(ToolchainId, Vec<u8>)) -> Lease {
        let archive = archive.clone();
        let fetch = |tx: tokio::sync::mpsc::Sender<Result<Vec<u8>, String>>| async move {
            tx.send(Ok(archive)).await.map_err(|e| e.to_string())
        };
        cache.get(*id, fetch).await.unwrap().0
    }

    #[tokio::test]
    async fn over_its_limit_the_least_recently_used_toolchain_goes_never_one_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let [a, b, c] = [1, 2, 3].map(|tag| toolchain(dir.path(), tag, 10_000));
        let data = dir.path().join("data");
        // Room for two.
        let cache = ToolchainCache::open(&data, 25_000).unwrap();
        let ids = |cache: &ToolchainCache| cache.present();
        let sorted = |mut v: Vec<ToolchainId>| {
            v.sort();
            v
        };
        drop(get(&cache, &a).await);
        drop(get(&cache, &b).await);
        drop(get(&cache, &a).await); // used again: `b` is now the least recently used
        drop(get(&cache, &c).await);
        assert_eq!(ids(&cache), sorted(vec![a.0, c.0]));
        assert!(!cache.path(&b.0).exists());

        // `a` is the least recently used but a job holds it: `c` goes instead.
        let held = get(&cache, &a).await;
        drop(get(&cache, &c).await);
        drop(get(&cache, &b).await);
        assert_eq!(ids(&cache), sorted(vec![a.0, b.0]));
        assert!(held.dir.join("bin/rustc").is_file(), "the job's toolchain is intact");
        drop(held);

        // A restart knows what is unpacked, and a smaller limit takes effect at once.
        drop(cache);
        let cache = ToolchainCache::open(&data, 25_000).unwrap();
        assert_eq!(ids(&cache), sorted(vec![a.0, b.0]));
        drop(cache);
        let cache = ToolchainCache::open(&data, 15_000).unwrap();
        assert_eq!(ids(&cache).len(), 1, "one fits");
        assert_eq!(fs::read_dir(data.join("toolchains")).unwrap().count(), 1);
    }
}
