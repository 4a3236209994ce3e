//! Job grants: how a worker knows a call comes from a client the scheduler gave this job to,
//! without the client's token ever reaching the worker.
//!
//! At registration the scheduler gives each worker session a fresh random 32-byte key, over the
//! session stream (TLS when configured). An allocation carries a grant for one job on one
//! worker: the job id, the worker id and an expiry, with a keyed blake3 MAC under that worker's
//! key. The client sends it (binary metadata [`GRANT_HEADER`]) with every call to that worker;
//! the worker checks the MAC, its own id and the expiry, and runs each granted job id once. A
//! grant for one worker is worthless at another (another key), a client cannot make one (no key),
//! and a worker that restarts gets a new key, so older grants stop working there.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The metadata key a grant travels under (binary: it must end with `-bin`).
pub const GRANT_HEADER: &str = "ferry-grant-bin";

/// How long a grant stays valid after the scheduler made it. A client calls the worker at once;
/// the bound is there so a grant that leaked stops working.
pub const GRANT_LIFETIME: Duration = Duration::from_secs(120);

/// A worker session's key.
pub type GrantKey = [u8; 32];

/// One job on one worker, as granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub job_id: u64,
    pub worker_id: String,
    /// Milliseconds since the Unix epoch.
    pub expires_ms: u64,
}

/// Why a grant is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    #[error("the call carries no job grant: a worker runs only jobs the scheduler granted (allocate first)")]
    Missing,
    #[error("the job grant is malformed")]
    Malformed,
    #[error("the job grant was not made for this worker by its scheduler")]
    BadSignature,
    #[error("the job grant is for worker '{0}', not this one")]
    OtherWorker(String),
    #[error("the job grant expired")]
    Expired,
}

const VERSION: u8 = 1;

impl Grant {
    /// A grant for `job_id` on `worker_id`, valid for [`GRANT_LIFETIME`] from now.
    pub fn new(job_id: u64, worker_id: &str) -> Grant {
        Grant { job_id, worker_id: worker_id.to_owned(), expires_ms: now_ms() + GRANT_LIFETIME.as_millis() as u64 }
    }

    /// The grant's bytes with its MAC under `key`.
    pub fn sign(&self, key: &GrantKey) -> Vec<u8> {
        let mut bytes = vec![VERSION];
        bytes.extend_from_slice(&self.job_id.to_le_bytes());
        bytes.extend_from_slice(&self.expires_ms.to_le_bytes());
        bytes.extend_from_slice(&(self.worker_id.len() as u16).to_le_bytes());
        bytes.extend_from_slice(self.worker_id.as_bytes());
        let mac = blake3::keyed_hash(key, &bytes);
        bytes.extend_from_slice(mac.as_bytes());
        bytes
    }

    /// A grant from its bytes, checked against any of `keys` (a worker keeps its last few), for
    /// `worker_id`, not expired on the scheduler's clock: `offset_ms` is the scheduler's clock
    /// minus this machine's ([`clock_offset`], measured when the session started). The grant
    /// returned has `expires_ms` on this machine's clock.
    pub fn verify(bytes: &[u8], keys: &[GrantKey], worker_id: &str, offset_ms: i64) -> Result<Grant, GrantError> {
        if bytes.len() < 1 + 8 + 8 + 2 + 32 || bytes[0] != VERSION {
            return Err(GrantError::Malformed);
        }
        let (body, mac) = bytes.split_at(bytes.len() - 32);
        let mac: [u8; 32] = mac.try_into().map_err(|_| GrantError::Malformed)?;
        // blake3::Hash compares in constant time.
        if !keys.iter().any(|k| blake3::keyed_hash(k, body) == blake3::Hash::from_bytes(mac)) {
            return Err(GrantError::BadSignature);
        }
        let u64_at = |at: usize| u64::from_le_bytes(body[at..at + 8].try_into().expect("8 bytes"));
        let (job_id, expires_ms) = (u64_at(1), u64_at(9));
        let len = usize::from(u16::from_le_bytes([body[17], body[18]]));
        let id = body.get(19..19 + len).filter(|_| body.len() == 19 + len).ok_or(GrantError::Malformed)?;
        let id = std::str::from_utf8(id).map_err(|_| GrantError::Malformed)?;
        if id != worker_id {
            return Err(GrantError::OtherWorker(id.to_owned()));
        }
        let local_expiry = expires_ms.saturating_add_signed(-offset_ms);
        if local_expiry < now_ms() {
            return Err(GrantError::Expired);
        }
        Ok(Grant { job_id, worker_id: id.to_owned(), expires_ms: local_expiry })
    }
}

/// A fresh random key (the kernel's `getrandom`).
pub fn new_grant_key() -> GrantKey {
    ferry_cache::random_bytes()
}

/// The scheduler's clock minus this machine's, in milliseconds, from the scheduler's time in its
/// `Registered` message (`scheduler_now_ms`; off by at most the message's one-way delay).
pub fn clock_offset(scheduler_now_ms: u64) -> i64 {
    scheduler_now_ms as i64 - now_ms() as i64
}

/// This machine's clock: milliseconds since the Unix epoch (0 before it).
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Adds a grant to a request's metadata.
pub fn attach_grant<T>(request: &mut tonic::Request<T>, grant: &[u8]) {
    request.metadata_mut().insert_bin(GRANT_HEADER, tonic::metadata::MetadataValue::from_bytes(grant));
}

/// The grant bytes of a request, if any.
pub fn grant_bytes<T>(request: &tonic::Request<T>) -> Option<Vec<u8>> {
    request.metadata().get_bin(GRANT_HEADER).and_then(|v| v.to_bytes().ok()).map(|b| b.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_verify_only_under_their_key_for_their_worker_unexpired() {
        let key = new_grant_key();
        let other = new_grant_key();
        assert_ne!(key, other);
        let bytes = Grant::new(7, "w1").sign(&key);
        let grant = Grant::verify(&bytes, &[other, key], "w1", 0).unwrap();
        assert_eq!((grant.job_id, grant.worker_id.as_str()), (7, "w1"));
        assert_eq!(Grant::verify(&bytes, &[other], "w1", 0), Err(GrantError::BadSignature));
        assert_eq!(Grant::verify(&bytes, &[key], "w2", 0), Err(GrantError::OtherWorker("w1".into())));
        // Any changed byte breaks the MAC, e.g. another job id.
        let mut forged = bytes.clone();
        forged[1] ^= 1;
        assert_eq!(Grant::verify(&forged, &[key], "w1", 0), Err(GrantError::BadSignature));
        let expired = Grant { job_id: 7, worker_id: "w1".into(), expires_ms: 1 }.sign(&key);
        assert_eq!(Grant::verify(&expired, &[key], "w1", 0), Err(GrantError::Expired));
        assert_eq!(Grant::verify(&bytes[..10], &[key], "w1", 0), Err(GrantError::Malformed));
    }

    #[test]
    fn expiry_is_judged_on_the_scheduler_s_clock() {
        let key = new_grant_key();
        let hour: i64 = 3_600_000;
        let ms = hour as u64;
        // A scheduler an hour ahead of this worker: its fresh grant expires, on this worker's
        // clock, in two minutes — not in an hour and two minutes.
        let ahead = Grant { job_id: 1, worker_id: "w".into(), expires_ms: now_ms() + ms + 120_000 }.sign(&key);
        let grant = Grant::verify(&ahead, &[key], "w", hour).unwrap();
        assert!(grant.expires_ms <= now_ms() + 120_000 && grant.expires_ms > now_ms() + 100_000, "{grant:?}");
        // A scheduler an hour behind: its fresh grant is not "expired an hour ago" here.
        let behind = Grant { job_id: 2, worker_id: "w".into(), expires_ms: now_ms() - ms + 120_000 }.sign(&key);
        assert!(Grant::verify(&behind, &[key], "w", -hour).is_ok());
        assert_eq!(Grant::verify(&behind, &[key], "w", 0), Err(GrantError::Expired));
        // The offset from a scheduler's time.
        assert!((clock_offset(now_ms() + ms) - hour).abs() < 1000);
    }
}
