//! A store layer for shared tiers under a site key: every entry written is sealed (a keyed
//! blake3 MAC after it, see [`crate::entry::seal`]), and every entry read must carry a seal that
//! verifies before it is decoded, let alone promoted. An entry stored without the key, changed on
//! the cache node, or forged on the way never verifies.

use crate::entry::{Entry, seal, unseal};
use crate::key::CacheKey;
use crate::store::{Error, PutOutcome, Store};

/// `inner` with entries sealed under `key`.
pub struct Sealed {
    inner: Box<dyn Store>,
    key: [u8; 32],
}

impl Sealed {
    pub fn new(inner: Box<dyn Store>, key: [u8; 32]) -> Sealed {
        Sealed { inner, key }
    }
}

impl std::fmt::Debug for Sealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealed").finish_non_exhaustive()
    }
}

impl Store for Sealed {
    fn get(&self, key: &CacheKey) -> Result<Option<Entry>, Error> {
        let Some(bytes) = self.get_encoded(key)? else { return Ok(None) };
        Entry::decode_owned(bytes, key).map(Some).map_err(|reason| corrupt(key, reason))
    }

    fn get_encoded(&self, key: &CacheKey) -> Result<Option<Vec<u8>>, Error> {
        let Some(bytes) = self.inner.get_encoded(key)? else { return Ok(None) };
        unseal(&bytes, &self.key).map_err(|reason| corrupt(key, reason))?;
        Ok(Some(bytes))
    }

    fn put_encoded(&self, key: &CacheKey, bytes: &[u8]) -> Result<PutOutcome, Error> {
        self.inner.put_encoded(key, &seal(bytes, &self.key))
    }

    fn remove(&self, key: &CacheKey) -> Result<bool, Error> {
        self.inner.remove(key)
    }
}

fn corrupt(key: &CacheKey, reason: crate::EntryError) -> Error {
    Error::Corrupt { path: format!("shared tier entry {key}").into(), reason }
}

/// A site key from its file: 64 hex digits (whitespace around them ignored).
pub fn read_key_file(path: &std::path::Path) -> Result<[u8; 32], String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let hash = blake3::Hash::from_hex(text.trim())
        .map_err(|_| format!("{} must hold 64 hex digits (e.g. from `openssl rand -hex 32`)", path.display()))?;
    Ok(*hash.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DiskConfig, DiskStore, EntryKind};

    #[test]
    fn only_entries_sealed_under_the_key_are_served() {
        let dir = tempfile::tempdir().unwrap();
        let disk = || -> Box<dyn Store> {
            Box::new(
                DiskStore::open(dir.path(), DiskConfig { max_bytes: 1 << 30, grace: std::time::Duration::ZERO })
                    .unwrap(),
            )
        };
        let sealed = Sealed::new(disk(), [1; 32]);
        let entry = |k: u8| Entry {
            kind: EntryKind::Result,
            key: CacheKey([k; 32]),
            toolchain: [0; 32],
            payload: vec![k; 100],
        };
        sealed.put(&entry(1)).unwrap();
        assert_eq!(sealed.get(&CacheKey([1; 32])).unwrap(), Some(entry(1)));
        // Stored without the key (a client without it, or a forger): never served.
        disk().put(&entry(2)).unwrap();
        let err = sealed.get(&CacheKey([2; 32])).unwrap_err();
        assert!(matches!(err, Error::Corrupt { reason: crate::EntryError::Unsealed, .. }), "{err:?}");
        // Sealed under another key: refused.
        Sealed::new(disk(), [9; 32]).put(&entry(3)).unwrap();
        let err = sealed.get(&CacheKey([3; 32])).unwrap_err();
        assert!(matches!(err, Error::Corrupt { reason: crate::EntryError::BadSeal, .. }), "{err:?}");
        // Readers without the key still read sealed entries (the seal is after the entry).
        assert_eq!(disk().get(&CacheKey([1; 32])).unwrap(), Some(entry(1)));
    }
}
