//! A store layer for shared tiers with writer signatures ([`crate::signature`]): every entry
//! written is signed by this writer's key, and every entry read must be signed by a writer the
//! reader trusts — checked before it is decoded, let alone promoted. An entry that is unsigned,
//! signed by a stranger or a revoked key, or changed on the way, never verifies, and a writer's
//! put replaces it instead of finding the key "already present".

use crate::entry::Entry;
use crate::key::CacheKey;
use crate::signature::{Signer, Trust, sign, verify};
use crate::store::{Error, PutOutcome, Store};

/// `inner` with entries signed by `signer` (when this caller writes) and read only when a writer
/// in `trust` signed them.
pub struct Signed {
    inner: Box<dyn Store>,
    signer: Option<Signer>,
    trust: Trust,
}

impl Signed {
    pub fn new(inner: Box<dyn Store>, signer: Option<Signer>, trust: Trust) -> Signed {
        Signed { inner, signer, trust }
    }
}

impl std::fmt::Debug for Signed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signed").field("signer", &self.signer).field("trusted", &self.trust.trusted.len()).finish()
    }
}

impl Store for Signed {
    fn get(&self, key: &CacheKey) -> Result<Option<Entry>, Error> {
        let Some(bytes) = self.get_encoded(key)? else { return Ok(None) };
        Entry::decode_owned(bytes, key).map(Some).map_err(|reason| corrupt(key, reason))
    }

    fn get_encoded(&self, key: &CacheKey) -> Result<Option<Vec<u8>>, Error> {
        let Some(bytes) = self.inner.get_encoded(key)? else { return Ok(None) };
        verify(&bytes, &self.trust).map_err(|reason| corrupt(key, reason))?;
        Ok(Some(bytes))
    }

    /// Signs and publishes; an entry already there counts only when a trusted writer signed it
    /// (one that is not — unsigned, a stranger's, a revoked key's — is removed and replaced).
    /// A tier that [keeps only trusted entries](Store::keeps_only_trusted) is taken at its word,
    /// without fetching the entry back.
    fn put_encoded(&self, key: &CacheKey, bytes: &[u8]) -> Result<PutOutcome, Error> {
        let Some(signer) = &self.signer else {
            return Err(Error::Io {
                path: "shared tier".into(),
                source: std::io::Error::new(std::io::ErrorKind::PermissionDenied, "no writer key to sign with"),
            });
        };
        let signed = sign(bytes, signer);
        for _ in 0..2 {
            match self.inner.put_encoded(key, &signed)? {
                PutOutcome::Published { bytes } => return Ok(PutOutcome::Published { bytes }),
                // The tier checked what it has against its own list of writers.
                PutOutcome::AlreadyPresent if self.inner.keeps_only_trusted() => {
                    return Ok(PutOutcome::AlreadyPresent);
                }
                PutOutcome::AlreadyPresent => match self.inner.get_encoded(key) {
                    Ok(Some(there)) if verify(&there, &self.trust).is_ok() => return Ok(PutOutcome::AlreadyPresent),
                    // Raced away: publish again.
                    Ok(None) => {}
                    Ok(Some(_)) | Err(Error::Corrupt { .. }) => {
                        self.inner.remove(key)?;
                    }
                    Err(e) => return Err(e),
                },
            }
        }
        Ok(PutOutcome::AlreadyPresent)
    }

    fn remove(&self, key: &CacheKey) -> Result<bool, Error> {
        self.inner.remove(key)
    }
}

fn corrupt(key: &CacheKey, reason: crate::EntryError) -> Error {
    Error::Corrupt { path: format!("shared tier entry {key}").into(), reason }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DiskConfig, DiskStore, EntryKind};

    fn entry(payload: &[u8]) -> Entry {
        Entry { kind: EntryKind::Result, key: CacheKey([5; 32]), toolchain: [2; 32], payload: payload.to_vec() }
    }

    #[test]
    fn readers_take_only_trusted_writers_entries_and_writers_replace_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let store = || Box::new(DiskStore::open(dir.path(), DiskConfig::default()).unwrap()) as Box<dyn Store>;
        let (worker, _) = Signer::generate().unwrap();
        let (laptop, _) = Signer::generate().unwrap();
        let trust = Trust { trusted: [worker.public()].into(), revoked: Default::default() };
        // A laptop writes first (it may reach the store: memcached takes anyone's `set`).
        let rogue = Signed::new(store(), Some(laptop), trust.clone());
        assert!(matches!(rogue.put(&entry(b"forged")), Ok(PutOutcome::Published { .. })));
        let reader = Signed::new(store(), None, trust.clone());
        assert!(matches!(reader.get(&CacheKey([5; 32])), Err(Error::Corrupt { .. })), "a stranger's entry is refused");
        // The trusted writer's put does not find it "present": it replaces it.
        let writer = Signed::new(store(), Some(worker), trust.clone());
        assert!(matches!(writer.put(&entry(b"honest")), Ok(PutOutcome::Published { .. })));
        assert_eq!(reader.get(&CacheKey([5; 32])).unwrap().unwrap().payload, b"honest");
        assert_eq!(writer.put(&entry(b"honest")).unwrap(), PutOutcome::AlreadyPresent);
        // A writer without a key cannot publish at all.
        let keyless = Signed::new(store(), None, trust);
        assert!(keyless.put(&entry(b"x")).is_err());
    }
}
