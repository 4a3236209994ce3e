//! The scheduler's toolchain store: archives by ToolchainId under `<data dir>/toolchains`, each
//! with a small JSON record. An upload is written to a temp file while it is verified completely
//! (every entry against the manifest, the manifest against the claimed id; the service runs the
//! check as the bytes arrive) and only then published with `link(2)`, which never replaces an
//! existing archive. A refused upload leaves nothing.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use ferry_toolchains::ToolchainId;
use serde::{Deserialize, Serialize};

#[derive(Debug)]
pub struct ArchiveStore {
    dir: PathBuf,
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

/// An upload being received: a temp file that is removed unless it is published.
#[derive(Debug)]
pub struct Incoming {
    path: PathBuf,
    file: Option<File>,
    pub received: u64,
}

impl ArchiveStore {
    pub fn open(data_dir: &Path) -> std::io::Result<ArchiveStore> {
        let dir = data_dir.join("toolchains");
        fs::create_dir_all(dir.join("tmp"))?;
        // Uploads interrupted by a crash leave temp files; nothing can still be writing them now.
        for entry in fs::read_dir(dir.join("tmp"))?.flatten() {
            let _ = fs::remove_file(entry.path());
        }
        Ok(ArchiveStore { dir })
    }

    pub fn path(&self, id: &ToolchainId) -> PathBuf {
        self.dir.join(format!("{id}.tar.gz"))
    }

    pub fn has(&self, id: &ToolchainId) -> bool {
        self.path(id).is_file() && self.record(id).is_some()
    }

    pub fn record(&self, id: &ToolchainId) -> Option<Record> {
        serde_json::from_slice(&fs::read(self.dir.join(format!("{id}.json"))).ok()?).ok()
    }

    pub fn list(&self) -> Vec<Record> {
        let mut out: Vec<Record> = fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| serde_json::from_slice(&fs::read(e.path()).ok()?).ok())
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    pub fn begin(&self) -> std::io::Result<Incoming> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let path =
            self.dir.join("tmp").join(format!("{}.{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed)));
        let file = File::options().write(true).create_new(true).open(&path)?;
        Ok(Incoming { path, file: Some(file), received: 0 })
    }

    /// Publishes a received archive, which the caller has verified against `id` (as it arrived),
    /// with its record. Blocking.
    pub fn publish(&self, mut incoming: Incoming, id: &ToolchainId, mut record: Record) -> Result<bool, String> {
        let file = incoming.file.take().expect("publish once");
        file.sync_all().map_err(|e| format!("storing the upload: {e}"))?;
        drop(file);
        let published = match fs::hard_link(&incoming.path, self.path(id)) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
            Err(e) => return Err(format!("storing the archive: {e}")),
        };
        if published || self.record(id).is_none() {
            record.id = id.to_hex();
            record.bytes = incoming.received;
            record.uploaded = now_secs();
            record.last_used = record.uploaded;
            self.write_record(&record).map_err(|e| format!("storing the record: {e}"))?;
        }
        Ok(published)
    }

    /// Notes that a worker fetched the toolchain (best effort).
    pub fn touch(&self, id: &ToolchainId) {
        if let Some(mut r) = self.record(id) {
            r.last_used = now_secs();
            let _ = self.write_record(&r);
        }
    }

    fn write_record(&self, record: &Record) -> std::io::Result<()> {
        let path = self.dir.join(format!("{}.json", record.id));
        let tmp = self.dir.join("tmp").join(format!("{}.json.{}", record.id, std::process::id()));
        fs::write(&tmp, serde_json::to_vec_pretty(record).expect("record serializes"))?;
        fs::rename(&tmp, &path)
    }
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
