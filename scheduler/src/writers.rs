//! The writers whose shared-tier entries the cluster trusts, by Ed25519 public key
//! (`ferry_cache::signature`): each worker registers its own key when its session starts (its
//! `worker` token vouches for it), a CI machine holding `cache-write` registers its own before it
//! publishes, and the configuration may name more (`[[writers]]`) and revoke any
//! (`revoked_writers`). Registered keys are kept in `<data_dir>/writers.json`, so entries signed by
//! a worker that is offline stay trusted; a revoked key never is, whoever registers it.
//!
//! Rotation is adding the new key and revoking the old one: the old key's entries become misses
//! for every reader and are replaced by the next writer that publishes their keys.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ferry_cache::{Trust, WriterKey};
use serde::{Deserialize, Serialize};

/// One registered writer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Registered {
    pub name: String,
    /// `worker` or `cache-write`: the role of the credential that registered it.
    pub role: String,
    /// Unix seconds.
    pub first_seen: u64,
    pub last_seen: u64,
}

/// The trusted writers: registered, configured and revoked.
#[derive(Debug)]
pub struct Writers {
    file: PathBuf,
    configured: BTreeMap<WriterKey, String>,
    revoked: BTreeSet<WriterKey>,
    registered: Mutex<BTreeMap<WriterKey, Registered>>,
}

impl Writers {
    /// The registry kept in `data_dir`, with the configuration's writers and revocations.
    pub fn open(
        data_dir: &Path,
        configured: BTreeMap<WriterKey, String>,
        revoked: BTreeSet<WriterKey>,
    ) -> std::io::Result<Writers> {
        std::fs::create_dir_all(data_dir)?;
        let file = data_dir.join("writers.json");
        let registered = match std::fs::read(&file) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                std::io::Error::other(format!("{} does not parse: {e}; move it away to start afresh", file.display()))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e),
        };
        Ok(Writers { file, configured, revoked, registered: Mutex::new(registered) })
    }

    /// Registers `key` under `name` for a credential of `role`; Err when it is revoked.
    pub fn register(&self, key: WriterKey, name: &str, role: &str) -> Result<(), String> {
        if self.revoked.contains(&key) {
            return Err(format!("writer key {key} is revoked (revoked_writers in the scheduler's configuration)"));
        }
        let now = crate::archives::now_secs();
        let mut registered = self.registered.lock().unwrap_or_else(|p| p.into_inner());
        let changed = match registered.get_mut(&key) {
            Some(r) if r.name == name && r.role == role && now.saturating_sub(r.last_seen) < 3600 => false,
            Some(r) => {
                r.name = name.to_owned();
                r.role = role.to_owned();
                r.last_seen = now;
                true
            }
            None => {
                let r = Registered { name: name.to_owned(), role: role.to_owned(), first_seen: now, last_seen: now };
                registered.insert(key, r);
                true
            }
        };
        if changed {
            self.save(&registered).map_err(|e| format!("keeping the writer in {}: {e}", self.file.display()))?;
        }
        Ok(())
    }

    /// Every key to accept (registered or configured) and every revoked one.
    pub fn trust(&self) -> Trust {
        let registered = self.registered.lock().unwrap_or_else(|p| p.into_inner());
        let mut trusted: BTreeSet<WriterKey> = registered.keys().copied().collect();
        trusted.extend(self.configured.keys().copied());
        Trust { trusted, revoked: self.revoked.clone() }
    }

    /// (key, name, how it is trusted) for every trusted writer, for readers and the status page.
    pub fn list(&self) -> Vec<(WriterKey, String, String)> {
        let registered = self.registered.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<(WriterKey, String, String)> = self
            .configured
            .iter()
            .filter(|(k, _)| !self.revoked.contains(k))
            .map(|(k, n)| (*k, n.clone(), "configured".to_owned()))
            .collect();
        out.extend(
            registered
                .iter()
                .filter(|(k, _)| !self.revoked.contains(k) && !self.configured.contains_key(k))
                .map(|(k, r)| (*k, r.name.clone(), r.role.clone())),
        );
        out
    }

    pub fn revoked(&self) -> &BTreeSet<WriterKey> {
        &self.revoked
    }

    fn save(&self, registered: &BTreeMap<WriterKey, Registered>) -> std::io::Result<()> {
        ferry_cache::write_replacing(
            &self.file,
            &serde_json::to_vec_pretty(registered).expect("writers serialize"),
            0o600,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_writers_persist_and_revoked_ones_never_count() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (WriterKey([1; 32]), WriterKey([2; 32]), WriterKey([3; 32]));
        let configured: BTreeMap<WriterKey, String> = [(c, "ci".to_owned())].into();
        let writers = Writers::open(dir.path(), configured.clone(), [b].into()).unwrap();
        writers.register(a, "worker-1", "worker").unwrap();
        assert!(writers.register(b, "laptop", "cache-write").unwrap_err().contains("revoked"));
        let trust = writers.trust();
        assert!(trust.accepts(&a) && trust.accepts(&c) && !trust.accepts(&b));
        // A restart keeps what was registered.
        let again = Writers::open(dir.path(), configured, BTreeSet::new()).unwrap();
        assert!(again.trust().accepts(&a));
        let names: Vec<String> = again.list().into_iter().map(|(_, n, _)| n).collect();
        assert_eq!(names, ["ci", "worker-1"]);
    }
}
