//! Input blobs by content: `<data dir>/blobs/<2 hex>/<64 hex>`. A blob is stored only after its
//! bytes hash to the claimed digest, written to a temp file and published with `link(2)`; so an
//! extern rlib or a registry source crosses the network once, not once per job. Stored blobs are
//! read-only (0444, owned by the worker). A job whose sandbox runs as another user gets hard links
//! to them (it can neither write nor chmod a file it does not own, and removing or replacing a
//! name in its tree leaves the blob alone) — executables to the blob's one 0555 copy,
//! `<64 hex>.x`; otherwise it gets copies.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Present while a worker has the store open (see [`BlobStore::open`]).
const OPEN_MARKER: &str = "open";
/// Where the blobs found after an unclean stop wait for their first use (see [`BlobStore::open`]).
const UNVERIFIED: &str = "unverified";

#[derive(Debug)]
pub struct BlobStore {
    dir: PathBuf,
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

impl BlobStore {
    /// Opens the store for this worker process. Blobs are not fsynced (one fsync per input file
    /// was most of a job's upload time): instead the store is marked open until [`BlobStore::close`].
    /// A store found still marked open — its last worker died, perhaps with the machine, whose
    /// crash can leave a linked blob with missing content — keeps its blobs, but as unverified:
    /// they move under `unverified/`, and each is checked against its digest the first time a job
    /// needs it ([`BlobStore::has`]), moved back when it holds, removed when it does not. So a
    /// killed worker's clients do not send everything again, and a torn blob never reaches a job.
    pub fn open(data_dir: &Path) -> std::io::Result<BlobStore> {
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
        Ok(BlobStore { dir })
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

    pub fn path(&self, digest: &[u8; 32]) -> PathBuf {
        let hex = hex(digest);
        self.dir.join(&hex[..2]).join(hex)
    }

    /// Whether the blob is here, verified: one set aside after an unclean stop is hashed now
    /// (once) and taken back only when its content is its digest.
    pub fn has(&self, digest: &[u8; 32]) -> bool {
        let path = self.path(digest);
        if path.is_file() {
            return true;
        }
        let hex = hex(digest);
        let suspect = self.dir.join(UNVERIFIED).join(&hex[..2]).join(&hex);
        if !suspect.is_file() {
            return false;
        }
        let _ = fs::remove_file(suspect.with_extension("x"));
        let holds = hash_file(&suspect).is_ok_and(|d| d == *digest);
        if holds {
            let _ = fs::create_dir_all(path.parent().expect("sharded"));
            match fs::hard_link(&suspect, &path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(_) => return false,
            }
        } else {
            tracing::warn!(blob = %hex, "a blob kept over an unclean stop does not match its digest: removed");
        }
        let _ = fs::remove_file(&suspect);
        holds
    }

    pub fn begin(&self, digest: [u8; 32]) -> std::io::Result<IncomingBlob> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let tmp =
            self.dir.join("tmp").join(format!("{}.{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed)));
        let file = File::options().write(true).create_new(true).open(&tmp)?;
        Ok(IncomingBlob { digest, tmp, file: Some(file), hasher: blake3::Hasher::new(), received: 0 })
    }

    /// Verifies and publishes a received blob. An existing blob with that digest is kept.
    pub fn finish(&self, mut blob: IncomingBlob) -> Result<(), String> {
        let actual = *blob.hasher.finalize().as_bytes();
        if actual != blob.digest {
            return Err(format!("blob content hashes to {}, not the claimed {}", hex(&actual), hex(&blob.digest)));
        }
        let file = blob.file.take().expect("finish once");
        let read_only = std::os::unix::fs::PermissionsExt::from_mode(0o444);
        file.set_permissions(read_only).map_err(|e| format!("storing blob: {e}"))?;
        let path = self.path(&blob.digest);
        fs::create_dir_all(path.parent().expect("sharded")).map_err(|e| format!("storing blob: {e}"))?;
        match fs::hard_link(&blob.tmp, &path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(format!("storing blob: {e}")),
        }
    }

    /// Places a blob at `dest` (creating parents): a hard link when `link` (the caller's promise
    /// that the job cannot write files it does not own) — to the executable twin when
    /// `executable` — else a copy with the given executable bit.
    pub fn materialize(&self, digest: &[u8; 32], dest: &Path, executable: bool, link: bool) -> std::io::Result<()> {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent)?;
        }
        let source = self.path(digest);
        // Blobs stored before they were made read-only are copied rather than linked.
        if link && fs::metadata(&source)?.mode() & 0o222 == 0 {
            // On failure (another file system, a link limit) a copy does the same job.
            let linked = match executable {
                false => fs::hard_link(&source, dest),
                true => self.executable_twin(&source).and_then(|twin| fs::hard_link(twin, dest)),
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
    /// `<blob>.x`: a read-only executable (0555) copy of `blob`, made once, so executable inputs
    /// (proc-macro libraries, shipped to every job) are linked like the others. Published with
    /// `link(2)` like a blob; losing a race to another job's twin is fine.
    fn executable_twin(&self, blob: &Path) -> std::io::Result<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        let mut twin = blob.as_os_str().to_owned();
        twin.push(".x");
        let twin = PathBuf::from(twin);
        if fs::symlink_metadata(&twin).is_ok() {
            return Ok(twin);
        }
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let tmp =
            self.dir.join("tmp").join(format!("{}.x{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed)));
        let made = fs::copy(blob, &tmp)
            .and_then(|_| fs::set_permissions(&tmp, fs::Permissions::from_mode(0o555)))
            .and_then(|()| match fs::hard_link(&tmp, &twin) {
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
                linked => linked,
            });
        let _ = fs::remove_file(&tmp);
        made.map(|()| twin)
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

    /// Stores `content` as a verified blob; its digest.
    fn put(store: &BlobStore, content: &[u8]) -> [u8; 32] {
        let digest = *blake3::hash(content).as_bytes();
        let mut blob = store.begin(digest).unwrap();
        blob.write(content).unwrap();
        store.finish(blob).unwrap();
        digest
    }

    #[test]
    fn only_verified_blobs_are_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let good = *blake3::hash(b"hello").as_bytes();
        let mut blob = store.begin(good).unwrap();
        blob.write(b"hel").unwrap();
        blob.write(b"lo").unwrap();
        store.finish(blob).unwrap();
        assert!(store.has(&good));
        let claimed = [7u8; 32];
        let mut bad = store.begin(claimed).unwrap();
        bad.write(b"not what was claimed").unwrap();
        let err = store.finish(bad).unwrap_err();
        assert!(err.contains("not the claimed"), "{err}");
        assert!(!store.has(&claimed));
        assert_eq!(fs::read_dir(dir.path().join("blobs/tmp")).unwrap().count(), 0);
    }

    #[test]
    fn a_store_not_closed_cleanly_keeps_its_blobs_until_they_fail_their_check() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let kept = put(&store, b"kept");
        store.close();
        let store = BlobStore::open(dir.path()).unwrap();
        assert!(store.has(&kept), "a clean close keeps the blobs");
        let intact = put(&store, b"intact");
        let torn = put(&store, b"torn by a crash");
        store.materialize(&intact, &dir.path().join("job/x.so"), true, true).unwrap();
        drop(store); // no close: the worker died, perhaps with its machine
        let store = BlobStore::open(dir.path()).unwrap();
        // What the crash did to one of them (content lost after its link was made).
        let torn_path = dir.path().join("blobs/unverified").join(&hex(&torn)[..2]).join(hex(&torn));
        fs::set_permissions(&torn_path, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(&torn_path, vec![0u8; 15]).unwrap();
        assert!(!store.path(&kept).exists(), "set aside until first use");
        assert!(store.has(&kept) && store.has(&intact), "intact blobs are taken back on first use");
        assert!(store.path(&kept).is_file());
        assert!(!store.has(&torn), "a torn blob is not served");
        assert!(!torn_path.exists(), "and is removed");
        store.materialize(&intact, &dir.path().join("job2/x.so"), true, true).unwrap();
        assert_eq!(fs::read(dir.path().join("job2/x.so")).unwrap(), b"intact", "its twin is made again");
        let again = put(&store, b"torn by a crash");
        assert_eq!(again, torn);
        assert!(store.has(&torn), "sent again, stored again");
        assert!(dir.path().join("blobs/tmp").is_dir());
    }

    #[test]
    fn linked_executables_share_one_read_only_twin() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
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
}
