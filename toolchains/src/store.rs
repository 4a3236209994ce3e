//! The local toolchain store under `<cache dir>/toolchains`: the weak→strong map and the archives.
//!
//! Layout:
//! - `map.json`: weak key → ToolchainId (plus a probe cache: rustc binary fingerprint → `rustc -vV`).
//!   Read without a lock (it is only ever replaced whole, by rename); updated under `map.lock`.
//! - `archives/<id>.tar.gz` and `archives/<id>.json` (size, blake3 of the archive, description).
//! - `locks/<key>.lock`: one per weak key (computing an id) and per id (building an archive), so N
//!   processes that need the same toolchain do the work once while the others wait, and different
//!   toolchains never wait on each other.
//!
//! Nothing in the map is trusted beyond what it is for: an archive is used only when its size and
//! blake3 match its record, and when an archive must be rebuilt the id is recomputed from the files.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::archive::{file_digest, write_archive};
use crate::{Compiler, Error, Manifest, Probe, Spawn, ToolchainId, ToolchainSet, spawn_output};

/// Toolchain entries kept in the map; older ones are dropped first.
const MAX_MAP_ENTRIES: usize = 256;

/// The store, rooted at `<cache dir>/toolchains`.
#[derive(Debug, Clone)]
pub struct LocalStore {
    dir: PathBuf,
    /// How `rustc -vV` is run (the client routes it through its traced spawner).
    spawn: Spawn,
}

/// A toolchain whose strong id is known.
#[derive(Debug, Clone)]
pub struct Identified {
    pub id: ToolchainId,
    pub compiler: Compiler,
    pub probe: Probe,
    /// Every target in the set, host included, sorted.
    pub targets: Vec<String>,
    pub files: usize,
    pub bytes: u64,
    /// True when the weak key was found in the map (no hashing happened).
    pub from_map: bool,
}

/// A toolchain whose archive is in the store.
#[derive(Debug, Clone)]
pub struct Packaged {
    pub identified: Identified,
    pub archive: PathBuf,
    pub archive_bytes: u64,
    /// True when this call built the archive.
    pub built: bool,
}

/// The record kept beside each archive; what `ferry toolchain list --local` shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredToolchain {
    pub id: String,
    pub rustc_version: String,
    pub targets: Vec<String>,
    pub files: usize,
    pub bytes: u64,
    pub archive_bytes: u64,
    /// blake3 of the archive file, checked before the archive is used again.
    pub archive_blake3: String,
    /// Seconds since the Unix epoch.
    pub packaged_at: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Map {
    #[serde(default)]
    probes: BTreeMap<String, Probe>,
    #[serde(default)]
    toolchains: BTreeMap<String, MapEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct MapEntry {
    id: String,
    root: PathBuf,
    targets: Vec<String>,
    files: usize,
    bytes: u64,
    created: u64,
}

impl LocalStore {
    /// Opens (creating) the store under `cache_dir`.
    pub fn open(cache_dir: &Path) -> Result<LocalStore, Error> {
        let dir = cache_dir.join("toolchains");
        for sub in ["archives", "locks"] {
            let path = dir.join(sub);
            fs::create_dir_all(&path).map_err(|error| Error::CacheDir { path: cache_dir.to_owned(), error })?;
        }
        Ok(LocalStore { dir, spawn: spawn_output })
    }

    /// Fails with [`Error::CacheDir`] unless the store can be written: creating directories can
    /// succeed on a store we cannot write into. For commands that must say so up front; the
    /// wrapper skips it (a write failure there is a counted fallback, not worth a probe per compile).
    pub fn check_writable(&self) -> Result<(), Error> {
        let probe = self.dir.join(format!(".write-test-{}", std::process::id()));
        let cache_dir = self.dir.parent().unwrap_or(&self.dir).to_owned();
        File::create(&probe).map_err(|error| Error::CacheDir { path: cache_dir, error })?;
        let _ = fs::remove_file(&probe);
        Ok(())
    }

    /// Starts processes through `spawn` from now on.
    pub fn with_spawn(mut self, spawn: Spawn) -> LocalStore {
        self.spawn = spawn;
        self
    }

    /// Finds the strong id of `compiler` for `targets` (the host is always included), through the
    /// weak-key map when possible, else by hashing the set once (other processes wait for it).
    pub fn identify(&self, compiler: &Compiler, targets: &[String]) -> Result<Identified, Error> {
        self.identify_inner(compiler, targets).map(|(identified, _)| identified)
    }

    /// Identifies the toolchain and makes sure its verified archive is in the store.
    pub fn package(&self, compiler: &Compiler, targets: &[String]) -> Result<Packaged, Error> {
        // Twice at most: a stale map entry is dropped and the toolchain identified afresh.
        for _ in 0..2 {
            let (identified, manifest) = self.identify_inner(compiler, targets)?;
            let _lock = self.lock(&format!("archive-{}", identified.id))?;
            if let Some((archive, archive_bytes)) = self.verified_archive(&identified.id) {
                return Ok(Packaged { identified, archive, archive_bytes, built: false });
            }
            // The archive is missing or damaged: rebuild it from the files, re-deriving the id
            // rather than trusting the map entry that pointed here.
            let set = ToolchainSet::collect(&compiler.root, &identified.probe.host, targets)?;
            let manifest = match manifest {
                Some(m) => m,
                None => Manifest::compute(&set)?,
            };
            if manifest.id() != identified.id {
                tracing::warn!(stale = %identified.id, fresh = %manifest.id(), "toolchain map entry was stale");
                self.forget(&identified.id)?;
                continue;
            }
            let (archive, archive_bytes) = self.write_archive_files(&identified, &set, &manifest)?;
            return Ok(Packaged { identified, archive, archive_bytes, built: true });
        }
        Err(Error::Changed { path: compiler.root.clone() })
    }

    /// Every archive in the store, sorted by id.
    pub fn list(&self) -> Result<Vec<StoredToolchain>, Error> {
        let dir = self.dir.join("archives");
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(Error::io(&dir))? {
            let path = entry.map_err(Error::io(&dir))?.path();
            if path.extension().is_some_and(|e| e == "json")
                && let Some(record) = read_json::<StoredToolchain>(&path)
            {
                out.push(record);
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Path of the archive for `id` (which may not exist).
    pub fn archive_path(&self, id: &ToolchainId) -> PathBuf {
        self.dir.join("archives").join(format!("{id}.tar.gz"))
    }

    fn identify_inner(&self, compiler: &Compiler, targets: &[String]) -> Result<(Identified, Option<Manifest>), Error> {
        let probe = self.probe(compiler)?;
        let set = ToolchainSet::collect(&compiler.root, &probe.host, targets)?;
        let weak = weak_key(compiler, &set);
        let identified = |entry: &MapEntry, from_map| -> Result<Identified, Error> {
            Ok(Identified {
                id: entry.id.parse().map_err(|reason| Error::CorruptArchive { reason })?,
                compiler: compiler.clone(),
                probe: probe.clone(),
                targets: set.all_targets(),
                files: entry.files,
                bytes: entry.bytes,
                from_map,
            })
        };
        if let Some(entry) = self.read_map().toolchains.get(&weak)
            && let Ok(found) = identified(entry, true)
        {
            return Ok((found, None));
        }
        let _lock = self.lock(&weak)?;
        if let Some(entry) = self.read_map().toolchains.get(&weak)
            && let Ok(found) = identified(entry, true)
        {
            return Ok((found, None));
        }
        let manifest = Manifest::compute(&set)?;
        let entry = MapEntry {
            id: manifest.id().to_hex(),
            root: compiler.root.clone(),
            targets: set.all_targets(),
            files: manifest.entries.len(),
            bytes: manifest.bytes(),
            created: now_secs(),
        };
        self.update_map(|map| {
            map.toolchains.insert(weak.clone(), entry.clone());
        })?;
        Ok((identified(&entry, false)?, Some(manifest)))
    }

    fn probe(&self, compiler: &Compiler) -> Result<Probe, Error> {
        let key = probe_key(compiler)?;
        if let Some(probe) = self.read_map().probes.get(&key) {
            return Ok(probe.clone());
        }
        let probe = Probe::run(&compiler.rustc, self.spawn)?;
        self.update_map(|map| {
            map.probes.insert(key.clone(), probe.clone());
        })?;
        Ok(probe)
    }

    fn verified_archive(&self, id: &ToolchainId) -> Option<(PathBuf, u64)> {
        let archive = self.archive_path(id);
        let record: StoredToolchain = read_json(&archive.with_extension("").with_extension("json"))?;
        let (digest, len) = file_digest(&archive).ok()?;
        let ok =
            len == record.archive_bytes && blake3::Hash::from_bytes(digest).to_hex().as_str() == record.archive_blake3;
        if !ok {
            tracing::warn!(archive = %archive.display(), "stored toolchain archive is damaged; rebuilding it");
        }
        ok.then_some((archive, len))
    }

    fn write_archive_files(
        &self,
        identified: &Identified,
        set: &ToolchainSet,
        manifest: &Manifest,
    ) -> Result<(PathBuf, u64), Error> {
        let archive = self.archive_path(&identified.id);
        let tmp = temp_name(&archive);
        let result = (|| {
            let mut file = File::create(&tmp).map_err(Error::io(&tmp))?;
            let mut hashing = HashingWriter { inner: &mut file, hasher: blake3::Hasher::new() };
            let bytes = write_archive(set, manifest, &mut hashing)?;
            let digest = hashing.hasher.finalize().to_hex().to_string();
            file.sync_all().map_err(Error::io(&tmp))?;
            fs::rename(&tmp, &archive).map_err(Error::io(&archive))?;
            let record = StoredToolchain {
                id: identified.id.to_hex(),
                rustc_version: identified.probe.version.clone(),
                targets: identified.targets.clone(),
                files: manifest.entries.len(),
                bytes: manifest.bytes(),
                archive_bytes: bytes,
                archive_blake3: digest,
                packaged_at: now_secs(),
            };
            let json = serde_json::to_vec_pretty(&record).expect("record serializes");
            write_atomic(&archive.with_extension("").with_extension("json"), &json)?;
            Ok((archive.clone(), bytes))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    fn forget(&self, id: &ToolchainId) -> Result<(), Error> {
        let hex = id.to_hex();
        self.update_map(|map| map.toolchains.retain(|_, e| e.id != hex))
    }

    fn read_map(&self) -> Map {
        // A damaged map is not an error: it is rebuilt from the files, entry by entry.
        read_json(&self.dir.join("map.json")).unwrap_or_default()
    }

    fn update_map(&self, change: impl FnOnce(&mut Map)) -> Result<(), Error> {
        let _lock = self.lock("map")?;
        let mut map = self.read_map();
        change(&mut map);
        map.toolchains.retain(|_, e| e.root.is_dir());
        while map.toolchains.len() > MAX_MAP_ENTRIES {
            let oldest = map.toolchains.iter().min_by_key(|(_, e)| e.created).map(|(k, _)| k.clone());
            map.toolchains.remove(&oldest.expect("map is not empty"));
        }
        let json = serde_json::to_vec(&map).expect("map serializes");
        write_atomic(&self.dir.join("map.json"), &json)
    }

    fn lock(&self, name: &str) -> Result<File, Error> {
        let path = self.dir.join("locks").join(format!("{name}.lock"));
        let file = OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(Error::io(&path))?;
        file.lock().map_err(Error::io(&path))?;
        Ok(file)
    }
}

/// The weak key: the compiler and root paths, the targets, and each set file's path and stat stamp.
fn weak_key(compiler: &Compiler, set: &ToolchainSet) -> String {
    let mut h = blake3::Hasher::new_derive_key("ferry toolchain weak key v1");
    for part in [compiler.rustc.as_os_str(), compiler.root.as_os_str()] {
        h.update(part.as_encoded_bytes()).update(b"\0");
    }
    for t in set.all_targets() {
        h.update(t.as_bytes()).update(b"\0");
    }
    for f in &set.files {
        let (mtime, ctime, ino, dev) = f.stamp;
        h.update(f.rel.as_bytes()).update(b"\0");
        h.update(&f.size.to_le_bytes()).update(&mtime.to_le_bytes()).update(&ctime.to_le_bytes());
        h.update(&ino.to_le_bytes()).update(&dev.to_le_bytes());
        h.update(f.symlink.as_deref().unwrap_or("").as_bytes()).update(b"\0");
    }
    h.finalize().to_hex().to_string()
}

/// Fingerprint of the rustc binary and the libraries beside it: what `rustc -vV` depends on.
fn probe_key(compiler: &Compiler) -> Result<String, Error> {
    let mut h = blake3::Hasher::new_derive_key("ferry rustc probe key v1");
    h.update(compiler.rustc.as_os_str().as_encoded_bytes());
    let lib = compiler.root.join("lib");
    let mut paths = vec![compiler.rustc.clone()];
    for entry in fs::read_dir(&lib).map_err(Error::io(&lib))? {
        let entry = entry.map_err(Error::io(&lib))?;
        if entry.file_name().to_string_lossy().contains(".so") {
            paths.push(entry.path());
        }
    }
    paths.sort();
    for path in paths {
        let m = fs::metadata(&path).map_err(Error::io(&path))?;
        h.update(path.as_os_str().as_encoded_bytes());
        for v in [m.len() as i64, m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec(), m.ino() as i64] {
            h.update(&v.to_le_bytes());
        }
    }
    Ok(h.finalize().to_hex().to_string())
}

struct HashingWriter<'a> {
    inner: &'a mut File,
    hasher: blake3::Hasher,
}

impl Write for HashingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Option<T> {
    serde_json::from_slice(&fs::read(path).ok()?).ok()
}

/// Writes `bytes` to a temp file beside `path`, syncs it and renames it over `path`.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let tmp = temp_name(path);
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(Error::io(path))
}

fn temp_name(path: &Path) -> PathBuf {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".tmp-{}-{nanos}", std::process::id()));
    name.into()
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
