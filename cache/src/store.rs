//! The storage abstraction every cache tier implements, so tiers compose as small layers (disk,
//! remote, verifying, read-only) instead of one type with flags, and the errors they share.

use std::path::PathBuf;

use crate::entry::{Entry, EntryError};
use crate::key::CacheKey;

/// A cache tier: entries by key, published once and never replaced.
///
/// Callers treat every `Err` as a miss (and count it): the cache must never fail a build.
pub trait Store: Send + Sync {
    /// The verified entry stored under `key`, or `None` on a miss.
    fn get(&self, key: &CacheKey) -> Result<Option<Entry>, Error>;

    /// The encoded entry under `key` as stored (its signature block included), its header and
    /// checksum checked, not decoded: for a layer that checks more before decoding.
    fn get_encoded(&self, key: &CacheKey) -> Result<Option<Vec<u8>>, Error>;

    /// Publishes `entry` under `entry.key` unless an entry is already there (first writer wins).
    fn put(&self, entry: &Entry) -> Result<PutOutcome, Error> {
        self.put_encoded(&entry.key, &entry.encode())
    }

    /// [`Store::put`] for an entry already encoded under `key` (by [`Entry::encode`] or
    /// [`Entry::encode_result`]), so a large result is not encoded again for every tier.
    fn put_encoded(&self, key: &CacheKey, bytes: &[u8]) -> Result<PutOutcome, Error>;

    /// Removes the entry under `key`: verification (`FERRY_VERIFY`) found it wrong. Ok(false)
    /// when there was none, or this tier does not let its callers remove.
    fn remove(&self, key: &CacheKey) -> Result<bool, Error> {
        let _ = key;
        Ok(false)
    }

    /// Whether this tier itself keeps only entries its trusted writers signed, so that an entry it
    /// reports present on a put needs no second look (the scheduler's tier; Redis and memcached
    /// store whatever anyone sends).
    fn keeps_only_trusted(&self) -> bool {
        false
    }
}

/// What [`Store::put`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// This call published the entry; `bytes` is its encoded size.
    Published { bytes: u64 },
    /// Another writer published the key first; nothing was changed.
    AlreadyPresent,
}

/// A cache tier failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A stored entry did not verify. It has already been removed, so the next lookup is a
    /// clean miss and the bad object is never delivered twice.
    #[error("corrupt cache entry {path:?}")]
    Corrupt {
        path: PathBuf,
        #[source]
        reason: EntryError,
    },
    /// Any I/O failure, including a full disk; the operation left nothing half written.
    #[error("cache i/o error on {path:?}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}
