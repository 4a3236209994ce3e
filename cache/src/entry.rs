//! The entry format: one self-verifying blob per cache entry, identical on disk and on the wire.
//!
//! Layout (integers little-endian):
//!
//! ```text
//! 0   magic "FERRYCE\0"               8 bytes
//! 8   format version (1)              u32
//! 12  kind (1 result, 2 manifest)     u8
//! 13  compression (0 none, 1 lz4)     u8
//! 14  reserved, zero                  2 bytes
//! 16  key                             32 bytes
//! 48  toolchain id                    32 bytes
//! 80  uncompressed payload length     u64
//! 88  stored payload length           u64
//! 96  stored payload                  (stored length)
//! ..  blake3 of everything above      32 bytes
//! ```
//!
//! A reader trusts nothing before the checksum matches, and nothing after it that the header
//! does not agree with: the key must be the one asked for and every length must add up.
//!
//! An entry in a shared tier carries a **signature block** after it (the magic `FERRYSIG`, the
//! writer's Ed25519 public key, the signature: see [`crate::signature`]). The checksum catches
//! damage; the signature proves which writer made the entry, so neither a compromised cache node,
//! a man in the middle nor a machine that may only read can serve one a client accepts. The
//! entry's own length (from its header) says where the block starts, so stores that only pass
//! entries on ignore it.

use std::fmt;

use crate::key::{CacheKey, hex};
use crate::output::CompileOutput;
use crate::signature::SIGNATURE_LEN;

/// What an entry holds: the kind byte of the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntryKind {
    /// A [`CompileOutput`](crate::CompileOutput): what a compile produced.
    Result,
    /// What a second lookup needs, e.g. the inputs a compile turned out to read; its payload
    /// format belongs to the caller.
    Manifest,
}

/// One cache entry: what is stored under a key.
#[derive(Clone, PartialEq, Eq)]
pub struct Entry {
    /// How to interpret the payload.
    pub kind: EntryKind,
    /// The key the entry is stored under; repeated inside so a misplaced file is detected.
    pub key: CacheKey,
    /// The ToolchainId of the compiler that produced it, for stats and for purging a toolchain.
    pub toolchain: [u8; 32],
    /// The entry's content, uncompressed.
    pub payload: Vec<u8>,
}

/// Why bytes are not a valid entry (or a valid [`CompileOutput`](crate::CompileOutput)).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    /// Too few bytes to hold even an empty entry; includes a zero-length file.
    #[error("entry is {len} bytes, shorter than the {MIN_LEN}-byte minimum")]
    TooShort { len: usize },
    /// The trailing blake3 does not match the content: a flipped bit or a truncation.
    #[error("checksum mismatch: entry says {}, content hashes to {}", hex(stored), hex(computed))]
    ChecksumMismatch { stored: [u8; 32], computed: [u8; 32] },
    #[error("bad magic \"{}\"", found.escape_ascii())]
    BadMagic { found: [u8; 8] },
    /// Written by a newer (or older) ferry; `what` says which format.
    #[error("unsupported {what} format version {version}")]
    UnsupportedVersion { what: &'static str, version: u32 },
    #[error("unknown entry kind {kind}")]
    BadKind { kind: u8 },
    #[error("unknown compression method {compression}")]
    BadCompression { compression: u8 },
    /// A valid entry, but for another key: a misplaced or renamed file.
    #[error("entry holds key {found}, expected {expected}")]
    KeyMismatch { expected: CacheKey, found: CacheKey },
    #[error("{what} length mismatch: header says {expected} bytes, found {actual}")]
    LengthMismatch { what: &'static str, expected: u64, actual: u64 },
    #[error("lz4 decompression failed: {reason}")]
    Decompress { reason: String },
    /// A length-prefixed field runs past the end of the input.
    #[error("truncated {what} at byte {offset}")]
    Truncated { what: &'static str, offset: usize },
    #[error("{count} unexpected trailing bytes")]
    TrailingBytes { count: usize },
    /// A field holds a value its type does not allow (a bool that is 2, a path that is not utf-8).
    #[error("invalid {what} at byte {offset}")]
    Invalid { what: &'static str, offset: usize },
    /// A remote tier found its copy corrupt (and removed it) instead of sending it.
    #[error("the tier holding it found it corrupt and removed it")]
    CorruptAtSource,
    /// The entry carries no signature, but this reader accepts only signed entries.
    #[error("the entry is not signed by a writer")]
    Unsigned,
    /// The signature does not match the entry and the key it names.
    #[error("the entry's signature does not verify")]
    BadSignature,
    /// Signed by a writer this reader does not trust (a laptop's own key, a stranger's).
    #[error("signed by a writer this reader does not trust: {key}")]
    UntrustedWriter { key: String },
    /// Signed by a writer whose key was revoked.
    #[error("signed by a revoked writer key: {key}")]
    RevokedWriter { key: String },
}

pub(crate) const SIGNATURE_MAGIC: [u8; 8] = *b"FERRYSIG";

/// The entry part of `bytes` and the signature block after it (public key and signature), if
/// there is one. The entry's length comes from its own header; bytes that do not add up are
/// returned whole, for the checks to refuse.
pub fn split_signature(bytes: &[u8]) -> (&[u8], Option<&[u8]>) {
    if bytes.len() >= HEADER_LEN {
        let stored_len = u64::from_le_bytes(array(&bytes[88..96]));
        // Checked: a hostile length near u64::MAX must not overflow (found by the `entry` fuzz target).
        if let Some(entry_len) = stored_len.checked_add(MIN_LEN as u64).and_then(|l| usize::try_from(l).ok())
            && entry_len.checked_add(SIGNATURE_LEN) == Some(bytes.len())
            && bytes[entry_len..entry_len + 8] == SIGNATURE_MAGIC
        {
            return (&bytes[..entry_len], Some(&bytes[entry_len + 8..]));
        }
    }
    (bytes, None)
}

/// Checks an encoded entry of `len` bytes read from `reader` (a file) without holding it in
/// memory: the header fields and lengths, then the checksum over the entry part, hashing 1 MiB at
/// a time. A signature block after the entry is allowed (and not checked: see [`crate::verify`]). The payload's compressed framing
/// is not decoded: a receiver that decodes verifies it.
pub fn check_stream(mut reader: impl std::io::Read, len: u64, expected_key: &CacheKey) -> Result<(), EntryError> {
    let truncated = |offset| EntryError::Truncated { what: "entry", offset };
    if len < MIN_LEN as u64 {
        return Err(EntryError::TooShort { len: len as usize });
    }
    let mut header = [0u8; HEADER_LEN];
    reader.read_exact(&mut header).map_err(|_| truncated(0))?;
    if header[0..8] != MAGIC {
        return Err(EntryError::BadMagic { found: array(&header[0..8]) });
    }
    let version = u32::from_le_bytes(array(&header[8..12]));
    if version != FORMAT_VERSION {
        return Err(EntryError::UnsupportedVersion { what: "entry", version });
    }
    EntryKind::from_byte(header[12]).ok_or(EntryError::BadKind { kind: header[12] })?;
    if header[13] != STORED_RAW && header[13] != STORED_LZ4 {
        return Err(EntryError::BadCompression { compression: header[13] });
    }
    let key = CacheKey(array(&header[16..48]));
    if key != *expected_key {
        return Err(EntryError::KeyMismatch { expected: *expected_key, found: key });
    }
    let stored_len = u64::from_le_bytes(array(&header[88..96]));
    let entry_len = stored_len.checked_add(MIN_LEN as u64).ok_or(EntryError::LengthMismatch {
        what: "stored payload",
        expected: stored_len,
        actual: len,
    })?;
    if entry_len != len && entry_len + SIGNATURE_LEN as u64 != len {
        return Err(EntryError::LengthMismatch {
            what: "stored payload",
            expected: stored_len,
            actual: len - MIN_LEN as u64,
        });
    }
    let mut hasher = blake3::Hasher::new();
    hasher.update(&header);
    hash_exact(&mut reader, &mut hasher, stored_len).map_err(|left| truncated((entry_len - left) as usize))?;
    let mut stored_sum = [0u8; CHECKSUM_LEN];
    reader.read_exact(&mut stored_sum).map_err(|_| truncated((entry_len - 32) as usize))?;
    let computed = hasher.finalize();
    if computed.as_bytes() != &stored_sum {
        return Err(EntryError::ChecksumMismatch { stored: stored_sum, computed: *computed.as_bytes() });
    }
    Ok(())
}

const MAGIC: [u8; 8] = *b"FERRYCE\0";
const FORMAT_VERSION: u32 = 1;
const HEADER_LEN: usize = 96;
const CHECKSUM_LEN: usize = 32;
const MIN_LEN: usize = HEADER_LEN + CHECKSUM_LEN;
const STORED_RAW: u8 = 0;
const STORED_LZ4: u8 = 1;
/// lz4 cannot compress better than about 255:1, so a header claiming a larger uncompressed
/// size is refused before anything that large is allocated.
const LZ4_MAX_RATIO: u64 = 256;

/// Payloads larger than this are stored uncompressed.
pub const COMPRESS_MAX: usize = 1 << 20;

impl Entry {
    /// The encoding of the result entry whose payload is `output` — the same bytes as
    /// `Entry { kind: Result, key, toolchain, payload: output.encode() }.encode()`, but a large
    /// output is written straight into the entry's buffer instead of into a payload first: one
    /// copy of every output file instead of two.
    pub fn encode_result(key: CacheKey, toolchain: [u8; 32], output: &CompileOutput) -> Vec<u8> {
        let len = output.encoded_len();
        if len <= COMPRESS_MAX {
            return Entry::encode_parts(EntryKind::Result, &key, &toolchain, &output.encode());
        }
        encode_stored(EntryKind::Result, &key, &toolchain, len, |out| output.encode_into(out))
    }

    /// Serializes the entry, lz4-compressing the payload when that makes it smaller — but only
    /// payloads up to [`COMPRESS_MAX`]: a hit on a large entry would spend more time
    /// decompressing than the disk space saves is worth (a 19 MB rlib: ~13 ms of a 30 ms hit).
    pub fn encode(&self) -> Vec<u8> {
        Entry::encode_parts(self.kind, &self.key, &self.toolchain, &self.payload)
    }

    /// [`Entry::encode`] of an entry given by its parts, for a payload held elsewhere (a hit's
    /// payload, shared with the output decoded from it).
    pub fn encode_parts(kind: EntryKind, key: &CacheKey, toolchain: &[u8; 32], payload: &[u8]) -> Vec<u8> {
        if payload.len() > COMPRESS_MAX {
            return encode_stored(kind, key, toolchain, payload.len(), |out| out.extend_from_slice(payload));
        }
        let bound = lz4_flex::block::get_maximum_output_size(payload.len());
        let mut out = Vec::with_capacity(HEADER_LEN + bound + CHECKSUM_LEN);
        out.resize(HEADER_LEN + bound, 0);
        let compressed =
            lz4_flex::block::compress_into(payload, &mut out[HEADER_LEN..]).ok().filter(|&len| len < payload.len());
        let compression = match compressed {
            Some(len) => {
                out.truncate(HEADER_LEN + len);
                STORED_LZ4
            }
            None => {
                out.truncate(HEADER_LEN);
                out.extend_from_slice(payload);
                STORED_RAW
            }
        };
        finish_encoding(kind, key, toolchain, payload.len(), out, compression)
    }

    /// Verifies everything but the compressed payload's own framing: checksum, magic, version,
    /// kind, key and lengths. Enough to pass an entry on to a receiver that decodes it.
    pub fn check(bytes: &[u8], expected_key: &CacheKey) -> Result<(), EntryError> {
        Header::verify(bytes, expected_key).map(|_| ())
    }

    /// Everything [`Entry::decode`] verifies, without keeping the payload: a stored payload is not
    /// copied, a compressed one is decompressed (its framing is part of what must hold) and dropped.
    /// For a tier that stores entries it received.
    pub fn verify(bytes: &[u8], expected_key: &CacheKey) -> Result<(), EntryError> {
        let header = Header::verify(bytes, expected_key)?;
        if header.compression != STORED_RAW {
            decompress(stored(bytes), header.uncompressed_len)?;
        }
        Ok(())
    }

    /// Parses and fully verifies an encoded entry that was looked up as `expected_key`.
    pub fn decode(bytes: &[u8], expected_key: &CacheKey) -> Result<Entry, EntryError> {
        let header = Header::verify(bytes, expected_key)?;
        let payload = match header.compression {
            STORED_RAW => stored(bytes).to_vec(),
            _ => decompress(stored(bytes), header.uncompressed_len)?,
        };
        Ok(header.into_entry(payload))
    }

    /// [`Entry::decode`] for bytes the caller owns: an uncompressed payload is reused in place
    /// instead of copied, which matters on the hit path for large entries.
    pub fn decode_owned(mut bytes: Vec<u8>, expected_key: &CacheKey) -> Result<Entry, EntryError> {
        let header = Header::verify(&bytes, expected_key)?;
        let payload = match header.compression {
            STORED_RAW => {
                let entry_len = split_signature(&bytes).0.len();
                bytes.truncate(entry_len - CHECKSUM_LEN);
                bytes.drain(..HEADER_LEN);
                bytes
            }
            _ => decompress(stored(&bytes), header.uncompressed_len)?,
        };
        Ok(header.into_entry(payload))
    }
}

/// An uncompressed entry whose `payload_len`-byte payload `write` appends.
fn encode_stored(
    kind: EntryKind,
    key: &CacheKey,
    toolchain: &[u8; 32],
    payload_len: usize,
    write: impl FnOnce(&mut Vec<u8>),
) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload_len + CHECKSUM_LEN);
    out.resize(HEADER_LEN, 0);
    write(&mut out);
    finish_encoding(kind, key, toolchain, payload_len, out, STORED_RAW)
}

/// Fills in the header of `out` (header space, then the stored payload of an entry whose payload
/// is `payload_len` bytes uncompressed) and appends the checksum over everything.
fn finish_encoding(
    kind: EntryKind,
    key: &CacheKey,
    toolchain: &[u8; 32],
    payload_len: usize,
    mut out: Vec<u8>,
    compression: u8,
) -> Vec<u8> {
    let stored_len = (out.len() - HEADER_LEN) as u64;
    let header = &mut out[..HEADER_LEN];
    header[0..8].copy_from_slice(&MAGIC);
    header[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    header[12] = kind.to_byte();
    header[13] = compression;
    header[14..16].fill(0);
    header[16..48].copy_from_slice(&key.0);
    header[48..80].copy_from_slice(toolchain);
    header[80..88].copy_from_slice(&(payload_len as u64).to_le_bytes());
    header[88..96].copy_from_slice(&stored_len.to_le_bytes());
    let checksum = blake3::hash(&out);
    out.extend_from_slice(checksum.as_bytes());
    out
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("kind", &self.kind)
            .field("key", &self.key)
            .field("toolchain", &hex(&self.toolchain))
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

impl EntryKind {
    fn to_byte(self) -> u8 {
        match self {
            EntryKind::Result => 1,
            EntryKind::Manifest => 2,
        }
    }

    fn from_byte(kind: u8) -> Option<EntryKind> {
        match kind {
            1 => Some(EntryKind::Result),
            2 => Some(EntryKind::Manifest),
            _ => None,
        }
    }
}

/// The verified header fields of an entry.
struct Header {
    kind: EntryKind,
    key: CacheKey,
    toolchain: [u8; 32],
    compression: u8,
    uncompressed_len: u64,
}

impl Header {
    /// Checks everything that can be checked without touching the payload, in the documented
    /// order; for a raw payload that includes its length.
    fn verify(bytes: &[u8], expected_key: &CacheKey) -> Result<Header, EntryError> {
        let (bytes, _) = split_signature(bytes);
        if bytes.len() < MIN_LEN {
            return Err(EntryError::TooShort { len: bytes.len() });
        }
        let (content, stored_sum) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
        let computed = blake3::hash(content);
        if computed.as_bytes() != stored_sum {
            return Err(EntryError::ChecksumMismatch { stored: array(stored_sum), computed: *computed.as_bytes() });
        }
        if bytes[0..8] != MAGIC {
            return Err(EntryError::BadMagic { found: array(&bytes[0..8]) });
        }
        let version = u32::from_le_bytes(array(&bytes[8..12]));
        if version != FORMAT_VERSION {
            return Err(EntryError::UnsupportedVersion { what: "entry", version });
        }
        let kind = EntryKind::from_byte(bytes[12]).ok_or(EntryError::BadKind { kind: bytes[12] })?;
        let compression = bytes[13];
        if compression != STORED_RAW && compression != STORED_LZ4 {
            return Err(EntryError::BadCompression { compression });
        }
        let key = CacheKey(array(&bytes[16..48]));
        if key != *expected_key {
            return Err(EntryError::KeyMismatch { expected: *expected_key, found: key });
        }
        let uncompressed_len = u64::from_le_bytes(array(&bytes[80..88]));
        let stored_len = u64::from_le_bytes(array(&bytes[88..96]));
        let actual_stored = (bytes.len() - MIN_LEN) as u64;
        if stored_len != actual_stored {
            return Err(EntryError::LengthMismatch {
                what: "stored payload",
                expected: stored_len,
                actual: actual_stored,
            });
        }
        if compression == STORED_RAW && uncompressed_len != stored_len {
            return Err(EntryError::LengthMismatch {
                what: "uncompressed payload",
                expected: uncompressed_len,
                actual: stored_len,
            });
        }
        Ok(Header { kind, key, toolchain: array(&bytes[48..80]), compression, uncompressed_len })
    }

    fn into_entry(self, payload: Vec<u8>) -> Entry {
        Entry { kind: self.kind, key: self.key, toolchain: self.toolchain, payload }
    }
}

/// The stored payload of bytes that passed [`Header::verify`].
fn stored(bytes: &[u8]) -> &[u8] {
    let (bytes, _) = split_signature(bytes);
    &bytes[HEADER_LEN..bytes.len() - CHECKSUM_LEN]
}

fn decompress(stored: &[u8], uncompressed_len: u64) -> Result<Vec<u8>, EntryError> {
    let bound = (stored.len() as u64).saturating_mul(LZ4_MAX_RATIO);
    let len = usize::try_from(uncompressed_len).ok().filter(|_| uncompressed_len <= bound).ok_or_else(|| {
        EntryError::Decompress {
            reason: format!("{uncompressed_len} bytes cannot come from {} compressed bytes", stored.len()),
        }
    })?;
    let payload =
        lz4_flex::block::decompress(stored, len).map_err(|e| EntryError::Decompress { reason: e.to_string() })?;
    if payload.len() != len {
        return Err(EntryError::LengthMismatch {
            what: "uncompressed payload",
            expected: uncompressed_len,
            actual: payload.len() as u64,
        });
    }
    Ok(payload)
}

/// Feeds the next `len` bytes of `reader` to `hasher`, 1 MiB at a time, never holding more.
/// `Err(left)`: the reader ended (or failed) with `left` bytes still to come.
pub(crate) fn hash_exact(reader: &mut impl std::io::Read, hasher: &mut blake3::Hasher, len: u64) -> Result<(), u64> {
    let mut left = len;
    let mut buf = vec![0u8; (1 << 20).min(len) as usize];
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        reader.read_exact(&mut buf[..n]).map_err(|_| left)?;
        hasher.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(())
}

/// Copies a slice of known length into an array.
fn array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    bytes.try_into().expect("caller passes exactly N bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `entry` fuzz target: a stored length near `u64::MAX` overflowed the trailer
    /// arithmetic (a panic, i.e. a failed build, served by a hostile tier). Now it is an error.
    #[test]
    fn a_huge_stored_length_is_an_error_not_a_panic() {
        let bytes: Vec<u8> = (0..129).map(|i| u8::from_str_radix(&"7700ffffffffffffffffffffffffffff00000000000000000000000000000000000000000000000000000000000000010000000100000001ffffffffff0000020000000000000010ffffffffffffffffffffffffff00000066ffffffffffffffffffffffffff6affffffffffffffffffffffffffffffffffffffffffffffffffff"[2 * i..2 * i + 2], 16).unwrap()).collect();
        let key = CacheKey(bytes[..32].try_into().unwrap());
        assert_eq!(split_signature(&bytes).1, None);
        assert!(Entry::decode(&bytes, &key).is_err());
        assert!(Entry::check(&bytes, &key).is_err());
        assert!(check_stream(&bytes[..], bytes.len() as u64, &key).is_err());
        assert!(crate::verify(&bytes, &crate::Trust::default()).is_err());
    }

    fn entry(payload: Vec<u8>) -> Entry {
        Entry { kind: EntryKind::Result, key: CacheKey([7; 32]), toolchain: [9; 32], payload }
    }

    /// Bytes that lz4 cannot shrink.
    fn noise(len: usize) -> Vec<u8> {
        let mut out = vec![0; len];
        blake3::Hasher::new().finalize_xof().fill(&mut out);
        out
    }

    fn compressible(len: usize) -> Vec<u8> {
        b"fn main() { println!(\"hello\"); }\n".iter().copied().cycle().take(len).collect()
    }

    /// A result encoded in one buffer is byte for byte the entry of its encoded payload, for a
    /// small (lz4-tried) and a large (stored) output alike.
    #[test]
    fn encode_result_is_encode_of_the_payload() {
        for (file, len) in [(compressible(4000), "small"), (noise(COMPRESS_MAX + 5), "large")] {
            let output = CompileOutput {
                exit_code: 0,
                compile_ms: 7,
                stdout: b"out".to_vec(),
                stderr: b"err".to_vec(),
                files: vec![crate::OutputFile { path: "a.rlib".into(), executable: false, bytes: file.into() }],
            };
            let e = entry(output.encode());
            let bytes = Entry::encode_result(e.key, e.toolchain, &output);
            assert_eq!(bytes, e.encode(), "{len} output");
            assert_eq!(Entry::decode(&bytes, &e.key), Ok(e), "{len} output");
        }
    }

    /// Recomputes the checksum after a header edit, to reach the checks behind it.
    fn reseal(mut bytes: Vec<u8>, edit: impl FnOnce(&mut [u8])) -> Vec<u8> {
        bytes.truncate(bytes.len() - CHECKSUM_LEN);
        edit(&mut bytes);
        let sum = blake3::hash(&bytes);
        bytes.extend_from_slice(sum.as_bytes());
        bytes
    }

    #[test]
    fn round_trips_compressed_raw_and_empty() {
        for (payload, compression) in
            [(compressible(100_000), STORED_LZ4), (noise(10_000), STORED_RAW), (Vec::new(), STORED_RAW)]
        {
            let original = entry(payload);
            let bytes = original.encode();
            assert_eq!(bytes[13], compression);
            if compression == STORED_LZ4 {
                assert!(bytes.len() < original.payload.len() / 4);
            }
            assert_eq!(Entry::decode(&bytes, &original.key), Ok(original.clone()));
            assert_eq!(Entry::verify(&bytes, &original.key), Ok(()));
            assert_eq!(Entry::decode_owned(bytes, &original.key), Ok(original));
        }
        let manifest = Entry { kind: EntryKind::Manifest, ..entry(b"k".to_vec()) };
        assert_eq!(Entry::decode(&manifest.encode(), &manifest.key), Ok(manifest));
    }

    #[test]
    fn every_flipped_byte_and_every_truncation_is_rejected() {
        for payload in [compressible(300), noise(40)] {
            let original = entry(payload);
            let bytes = original.encode();
            for at in 0..bytes.len() {
                for flip in [0x01, 0x80, 0xff] {
                    let mut bad = bytes.clone();
                    bad[at] ^= flip;
                    assert!(Entry::decode(&bad, &original.key).is_err(), "flip {flip:#x} at {at}");
                    assert!(Entry::verify(&bad, &original.key).is_err(), "flip {flip:#x} at {at}");
                    assert!(Entry::decode_owned(bad, &original.key).is_err());
                }
            }
            for len in 0..bytes.len() {
                assert!(Entry::decode(&bytes[..len], &original.key).is_err(), "truncated to {len}");
                assert!(Entry::verify(&bytes[..len], &original.key).is_err(), "truncated to {len}");
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert!(Entry::decode(&longer, &original.key).is_err());
        }
        assert_eq!(Entry::decode(&[], &CacheKey([0; 32])), Err(EntryError::TooShort { len: 0 }));
    }

    #[test]
    fn wrong_key_is_rejected() {
        let original = entry(b"payload".to_vec());
        let other = CacheKey([8; 32]);
        assert_eq!(
            Entry::decode(&original.encode(), &other),
            Err(EntryError::KeyMismatch { expected: other, found: original.key })
        );
    }

    #[test]
    fn each_header_check_has_its_own_error() {
        let original = entry(compressible(1000));
        let key = original.key;
        let bytes = original.encode();
        let check = |edit: fn(&mut [u8]), expected: &str| {
            let bad = reseal(bytes.clone(), edit);
            assert_eq!(Entry::verify(&bad, &key).err(), Entry::decode(&bad, &key).err(), "{expected}");
            let err = Entry::decode(&bad, &key).expect_err(expected);
            assert_eq!(err.to_string(), expected);
        };
        check(|b| b[0] = b'X', r#"bad magic "XERRYCE\x00""#);
        check(|b| b[8] = 2, "unsupported entry format version 2");
        check(|b| b[12] = 0, "unknown entry kind 0");
        check(|b| b[13] = 7, "unknown compression method 7");
        check(|b| b[88] ^= 1, "stored payload length mismatch: header says 49 bytes, found 48");
        check(|b| b[80] ^= 1, "uncompressed payload length mismatch: header says 1001 bytes, found 1000");
        check(
            |b| b[80..88].copy_from_slice(&u64::MAX.to_le_bytes()),
            "lz4 decompression failed: 18446744073709551615 bytes cannot come from 48 compressed bytes",
        );
        // What lz4 itself rejects: its own messages, so only the variant is checked.
        let lz4_rejects: [fn(&mut [u8]); 2] =
            [|b| b[80..88].copy_from_slice(&999u64.to_le_bytes()), |b| b[HEADER_LEN..HEADER_LEN + 48].fill(0xff)];
        for edit in lz4_rejects {
            let err = Entry::decode(&reseal(bytes.clone(), edit), &key);
            assert!(matches!(err, Err(EntryError::Decompress { .. })), "{err:?}");
        }
        let raw = entry(noise(50)).encode();
        let bad = reseal(raw, |b| b[80] = 49);
        assert_eq!(
            Entry::decode(&bad, &key).unwrap_err().to_string(),
            "uncompressed payload length mismatch: header says 49 bytes, found 50"
        );
    }

    #[test]
    fn debug_does_not_dump_the_payload() {
        let text = format!("{:?}", entry(vec![b'Z'; 64]));
        assert!(text.contains("payload_len: 64"), "{text}");
        assert!(!text.contains("90, 90"), "{text}");
    }
}
