//! Writers sign, readers verify: every entry a shared tier holds carries, after the entry, a
//! signature block — the magic `FERRYSIG`, the writer's Ed25519 public key and its signature over
//! a digest of the entry (blake3 in derive-key mode, context [`CONTEXT`]; the entry's header holds
//! its key, so a signature cannot be moved to another key). Each worker and each CI writer has a
//! key of its own; clients hold only public keys ([`Trust`]), so a machine that can read the cache
//! — a developer's laptop, with every file it has — can never make an entry another client
//! accepts. A revoked key's entries are misses.
//!
//! Ed25519 comes from `ring`, already in the build for TLS: no new crate. Checking a hit costs the
//! blake3 of the entry (as its checksum already does) and one signature check (tens of µs).

use std::collections::BTreeSet;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

use crate::entry::{EntryError, SIGNATURE_MAGIC, split_signature};

/// The bytes a signature block adds after an entry: magic, public key, signature.
pub const SIGNATURE_LEN: usize = 8 + 32 + 64;

/// Domain separation of the signed digest.
const CONTEXT: &str = "ferry 2026 cache entry signature v1";

/// A writer's public key; shown and parsed as `ed25519:<64 hex digits>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WriterKey(pub [u8; 32]);

impl fmt::Display for WriterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ed25519:{}", blake3::Hash::from_bytes(self.0).to_hex())
    }
}

impl fmt::Debug for WriterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl FromStr for WriterKey {
    type Err = String;

    fn from_str(s: &str) -> Result<WriterKey, String> {
        let hex = s.trim().strip_prefix("ed25519:").ok_or_else(|| format!("'{s}' is not ed25519:<64 hex digits>"))?;
        let hash = blake3::Hash::from_hex(hex).map_err(|_| format!("'{s}' is not ed25519:<64 hex digits>"))?;
        Ok(WriterKey(*hash.as_bytes()))
    }
}

impl serde::Serialize for WriterKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for WriterKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<WriterKey, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A writer's private key: what signs the entries it publishes.
pub struct Signer {
    pair: Ed25519KeyPair,
    public: WriterKey,
}

impl fmt::Debug for Signer {
    /// Never the private key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signer").field("public", &self.public).finish_non_exhaustive()
    }
}

impl Signer {
    /// The key whose 32-byte seed is `seed`.
    pub fn from_seed(seed: &[u8; 32]) -> Signer {
        let pair = Ed25519KeyPair::from_seed_unchecked(seed).expect("any 32 bytes are an Ed25519 seed");
        let public = WriterKey(pair.public_key().as_ref().try_into().expect("an Ed25519 public key is 32 bytes"));
        Signer { pair, public }
    }

    /// A new random key, and its seed (what its file holds).
    pub fn generate() -> Result<(Signer, [u8; 32]), String> {
        use ring::rand::SecureRandom;
        let mut seed = [0u8; 32];
        ring::rand::SystemRandom::new().fill(&mut seed).map_err(|_| "no randomness for a new key".to_owned())?;
        Ok((Signer::from_seed(&seed), seed))
    }

    pub fn public(&self) -> WriterKey {
        self.public
    }

    /// The key in `path`: 64 hex digits (the seed), as [`Signer::create`] writes it.
    pub fn read(path: &Path) -> Result<Signer, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        let hash = blake3::Hash::from_hex(text.trim())
            .map_err(|_| format!("{} must hold a writer key: 64 hex digits", path.display()))?;
        Ok(Signer::from_seed(hash.as_bytes()))
    }

    /// A new key written to `path` (which must not exist), readable by its owner only.
    pub fn create(path: &Path) -> Result<Signer, String> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let (signer, seed) = Signer::generate()?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        }
        let mut file = std::fs::File::options()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| format!("creating {}: {e}", path.display()))?;
        writeln!(file, "{}", blake3::Hash::from_bytes(seed).to_hex())
            .and_then(|()| file.sync_all())
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
        Ok(signer)
    }

    /// The key in `path`, created there when there is none yet (a worker's first start).
    pub fn read_or_create(path: &Path) -> Result<Signer, String> {
        match Signer::create(path) {
            Ok(signer) => Ok(signer),
            Err(_) if path.exists() => Signer::read(path),
            Err(e) => Err(e),
        }
    }
}

/// The writers a reader accepts entries from, and those it refuses whatever else says.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Trust {
    pub trusted: BTreeSet<WriterKey>,
    pub revoked: BTreeSet<WriterKey>,
}

impl Trust {
    /// A trust file: one `ed25519:<hex> [name]` per line, `revoked ed25519:<hex> [name]` for a key
    /// that must never be accepted, `#` comments. Err names the first line that does not parse.
    pub fn parse(text: &str) -> Result<Trust, String> {
        let mut trust = Trust::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or_default().trim();
            if line.is_empty() {
                continue;
            }
            let (revoked, rest) = match line.strip_prefix("revoked ") {
                Some(rest) => (true, rest.trim()),
                None => (false, line),
            };
            let key: WriterKey = rest
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .parse()
                .map_err(|e| format!("line {}: {e}", n + 1))?;
            if revoked {
                trust.revoked.insert(key)
            } else {
                trust.trusted.insert(key)
            };
        }
        Ok(trust)
    }

    /// Both lists joined (a revocation anywhere wins).
    pub fn merge(&mut self, other: &Trust) {
        self.trusted.extend(other.trusted.iter().copied());
        self.revoked.extend(other.revoked.iter().copied());
    }

    pub fn accepts(&self, key: &WriterKey) -> bool {
        self.trusted.contains(key) && !self.revoked.contains(key)
    }
}

/// The digest a writer signs.
fn signed_digest(entry: &[u8]) -> [u8; 32] {
    blake3::derive_key(CONTEXT, entry)
}

/// The encoded entry `bytes` (any signature block it had removed) signed by `signer`.
pub fn sign(bytes: &[u8], signer: &Signer) -> Vec<u8> {
    let (entry, _) = split_signature(bytes);
    let signature = signer.pair.sign(&signed_digest(entry));
    let mut out = Vec::with_capacity(entry.len() + SIGNATURE_LEN);
    out.extend_from_slice(entry);
    out.extend_from_slice(&SIGNATURE_MAGIC);
    out.extend_from_slice(&signer.public.0);
    out.extend_from_slice(signature.as_ref());
    out
}

/// Who signed `bytes`, when the signature holds and `trust` accepts the writer.
pub fn verify(bytes: &[u8], trust: &Trust) -> Result<WriterKey, EntryError> {
    let (entry, block) = split_signature(bytes);
    check(block.ok_or(EntryError::Unsigned)?, &signed_digest(entry), trust)
}

/// [`verify`] for an encoded entry of `len` bytes read from `reader` (a file) without holding it
/// in memory: the entry part hashed 1 MiB at a time, then the signature block checked. The
/// entry's own checks (header, checksum) are [`crate::check_stream`]'s.
pub fn verify_stream(mut reader: impl std::io::Read, len: u64, trust: &Trust) -> Result<WriterKey, EntryError> {
    let truncated = |offset| EntryError::Truncated { what: "signed entry", offset };
    let entry_len = len.checked_sub(SIGNATURE_LEN as u64).ok_or(EntryError::Unsigned)?;
    let mut hasher = blake3::Hasher::new_derive_key(CONTEXT);
    crate::entry::hash_exact(&mut reader, &mut hasher, entry_len)
        .map_err(|left| truncated((entry_len - left) as usize))?;
    let mut block = [0u8; SIGNATURE_LEN];
    reader.read_exact(&mut block).map_err(|_| truncated(entry_len as usize))?;
    if block[..8] != SIGNATURE_MAGIC {
        return Err(EntryError::Unsigned);
    }
    check(&block[8..], hasher.finalize().as_bytes(), trust)
}

/// The signature block (public key, signature) over `digest`, and the writer's standing.
fn check(block: &[u8], digest: &[u8; 32], trust: &Trust) -> Result<WriterKey, EntryError> {
    let key = WriterKey(block[..32].try_into().map_err(|_| EntryError::Unsigned)?);
    UnparsedPublicKey::new(&ED25519, key.0).verify(digest, &block[32..]).map_err(|_| EntryError::BadSignature)?;
    if trust.revoked.contains(&key) {
        return Err(EntryError::RevokedWriter { key: key.to_string() });
    }
    if !trust.trusted.contains(&key) {
        return Err(EntryError::UntrustedWriter { key: key.to_string() });
    }
    Ok(key)
}

/// The writer key that signed `bytes`, without checking anything (for reports).
pub fn signer_of(bytes: &[u8]) -> Option<WriterKey> {
    let (_, block) = split_signature(bytes);
    Some(WriterKey(block?[..32].try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CacheKey, Entry, EntryKind};

    fn entry() -> Vec<u8> {
        Entry { kind: EntryKind::Result, key: CacheKey([3; 32]), toolchain: [1; 32], payload: b"payload".to_vec() }
            .encode()
    }

    #[test]
    fn only_trusted_unrevoked_writers_verify_and_nothing_can_be_moved_or_changed() {
        let (writer, _) = Signer::generate().unwrap();
        let (laptop, _) = Signer::generate().unwrap();
        let trust = Trust { trusted: [writer.public()].into(), revoked: Default::default() };
        let signed = sign(&entry(), &writer);
        assert_eq!(verify(&signed, &trust), Ok(writer.public()));
        assert_eq!(verify_stream(&signed[..], signed.len() as u64, &trust), Ok(writer.public()));
        assert_eq!(verify_stream(&entry()[..], entry().len() as u64, &trust), Err(EntryError::Unsigned));
        assert_eq!(signer_of(&signed), Some(writer.public()));
        // A laptop's own key signs fine, but nobody trusts it.
        assert!(matches!(verify(&sign(&entry(), &laptop), &trust), Err(EntryError::UntrustedWriter { .. })));
        // Re-signing under another key replaces the block; unsigned is refused.
        assert_eq!(verify(&entry(), &trust), Err(EntryError::Unsigned));
        // Any byte changed (entry or signature) breaks it.
        for at in [20, signed.len() - 70, signed.len() - 1] {
            let mut bad = signed.clone();
            bad[at] ^= 1;
            assert!(verify(&bad, &trust).is_err(), "a flip at {at} verified");
        }
        // A trusted writer's public key with a laptop's signature does not verify.
        let mut forged = sign(&entry(), &laptop);
        let at = forged.len() - 96;
        forged[at..at + 32].copy_from_slice(&writer.public().0);
        assert_eq!(verify(&forged, &trust), Err(EntryError::BadSignature));
        // A revocation wins over trust.
        let revoked = Trust { trusted: trust.trusted.clone(), revoked: [writer.public()].into() };
        assert!(matches!(verify(&signed, &revoked), Err(EntryError::RevokedWriter { .. })));
    }

    #[test]
    fn keys_and_trust_files_round_trip_and_bad_lines_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("writer.key");
        let created = Signer::create(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(Signer::read(&path).unwrap().public(), created.public());
        assert_eq!(Signer::read_or_create(&path).unwrap().public(), created.public());
        let shown = created.public().to_string();
        assert_eq!(shown.parse::<WriterKey>().unwrap(), created.public());
        let trust = Trust::parse(&format!("# ci\n{shown} ci-1\nrevoked {shown} # old\n")).unwrap();
        assert!(trust.trusted.contains(&created.public()) && !trust.accepts(&created.public()));
        assert_eq!(Trust::parse("ed25519:zz\n"), Err("line 1: 'ed25519:zz' is not ed25519:<64 hex digits>".into()));
    }
}
