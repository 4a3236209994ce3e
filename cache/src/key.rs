//! Cache keys: a [`CacheKey`] is blake3 (derive-key mode) over length-prefixed, named fields
//! that the caller adds in a fixed order; [`KeyBuilder`] also keeps a readable copy of every
//! field so a miss can be explained by printing or diffing two compiles' parts.
//!
//! The framing is `u64 LE len(name) ‖ name ‖ u64 LE len(value) ‖ value` per field, so no two
//! different field lists can hash the same bytes ("ab","c" vs "a","bc"). Changing the framing
//! or the meaning of a field means changing [`KEY_CONTEXT`].

use std::fmt;
use std::str::FromStr;

/// A 32-byte blake3 cache key. Displays (and debugs) as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey(pub [u8; 32]);

/// Builds a [`CacheKey`] field by field and records the readable parts.
#[derive(Clone)]
pub struct KeyBuilder {
    /// The running hash; cloned by [`KeyBuilder::finish`] so the builder stays usable.
    hasher: blake3::Hasher,
    /// Every field in the order it was hashed, for `ferry explain`.
    parts: Vec<KeyPart>,
}

/// One field of a key as a person reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPart {
    /// The field name the caller chose, e.g. `toolchain` or `env:CARGO_PKG_NAME`.
    pub name: String,
    /// The value if it is short utf-8, else `blake3:<hex>  (<N> bytes)`, so a diff still shows
    /// which field changed without dumping a source file.
    pub value: String,
}

/// A string that is not 64 hex digits was parsed as a [`CacheKey`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid cache key {input:?}: expected 64 hex digits")]
pub struct ParseKeyError {
    /// The rejected text.
    pub input: String,
}

/// The blake3 derive-key context; bump the version when the key recipe changes.
const KEY_CONTEXT: &str = "ferry cache key v2";

/// Values up to this many bytes of valid utf-8 are recorded verbatim in [`KeyPart::value`].
const MAX_VERBATIM: usize = 200;

impl KeyBuilder {
    /// Starts a key; `domain` (e.g. `rustc`) is hashed as the first field, named `domain`.
    pub fn new(domain: &str) -> Self {
        let mut builder = KeyBuilder { hasher: blake3::Hasher::new_derive_key(KEY_CONTEXT), parts: Vec::new() };
        builder.field("domain", domain);
        builder
    }

    /// Hashes one named field. Callers must add fields in a fixed order.
    pub fn field(&mut self, name: &str, value: impl AsRef<[u8]>) -> &mut Self {
        let value = value.as_ref();
        for bytes in [name.as_bytes(), value] {
            self.hasher.update(&(bytes.len() as u64).to_le_bytes());
            self.hasher.update(bytes);
        }
        let readable = match std::str::from_utf8(value) {
            Ok(text) if text.len() <= MAX_VERBATIM => text.to_owned(),
            _ => format!("blake3:{}  ({} bytes)", blake3::hash(value), value.len()),
        };
        self.parts.push(KeyPart { name: name.to_owned(), value: readable });
        self
    }

    /// The fields hashed so far, in order.
    pub fn parts(&self) -> &[KeyPart] {
        &self.parts
    }

    /// The key over the fields so far; the builder stays usable so its parts can be printed.
    pub fn finish(&self) -> CacheKey {
        CacheKey(*self.hasher.finalize().as_bytes())
    }
}

impl fmt::Debug for KeyBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyBuilder").field("parts", &self.parts).finish_non_exhaustive()
    }
}

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for CacheKey {
    type Err = ParseKeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseKeyError { input: s.to_owned() };
        let digits = s.as_bytes();
        if digits.len() != 64 {
            return Err(err());
        }
        let mut key = [0u8; 32];
        for (byte, pair) in key.iter_mut().zip(digits.chunks_exact(2)) {
            let nibble = |c: u8| (c as char).to_digit(16).ok_or_else(err);
            *byte = ((nibble(pair[0])? << 4) | nibble(pair[1])?) as u8;
        }
        Ok(CacheKey(key))
    }
}

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(fields: &[(&str, &[u8])]) -> CacheKey {
        let mut builder = KeyBuilder::new("rustc");
        for (name, value) in fields {
            builder.field(name, value);
        }
        builder.finish()
    }

    #[test]
    fn key_is_derive_key_over_length_prefixed_fields() {
        // An independent rendering of the documented recipe: if the framing changes, this fails.
        let mut expected = blake3::Hasher::new_derive_key("ferry cache key v2");
        for (name, value) in [("domain", "rustc"), ("target", "x86_64-unknown-linux-gnu")] {
            expected.update(&(name.len() as u64).to_le_bytes());
            expected.update(name.as_bytes());
            expected.update(&(value.len() as u64).to_le_bytes());
            expected.update(value.as_bytes());
        }
        let actual = key(&[("target", b"x86_64-unknown-linux-gnu")]);
        assert_eq!(actual.0, *expected.finalize().as_bytes());
    }

    #[test]
    fn same_fields_same_key_and_any_change_changes_it() {
        let base = key(&[("a", b"1"), ("b", b"2")]);
        assert_eq!(base, key(&[("a", b"1"), ("b", b"2")]));
        let variants = [
            key(&[("a", b"1"), ("c", b"2")]),
            key(&[("a", b"1"), ("b", b"3")]),
            key(&[("b", b"2"), ("a", b"1")]),
            key(&[("a", b"1")]),
            key(&[("a", b"1"), ("b", b"2"), ("b", b"")]),
        ];
        for variant in variants {
            assert_ne!(base, variant);
        }
        let mut other_domain = KeyBuilder::new("clang");
        other_domain.field("a", "1").field("b", "2");
        assert_ne!(base, other_domain.finish());
    }

    #[test]
    fn moving_bytes_between_fields_changes_the_key() {
        assert_ne!(key(&[("x", b"ab"), ("y", b"c")]), key(&[("x", b"a"), ("y", b"bc")]));
        assert_ne!(key(&[("ab", b"c")]), key(&[("a", b"bc")]));
        assert_ne!(key(&[("x", b"ab")]), key(&[("xa", b"b")]));
    }

    #[test]
    fn parts_are_recorded_readably() {
        let mut builder = KeyBuilder::new("rustc");
        builder.field("crate_name", "serde").field("source", vec![b'x'; 201]).field("rlib", [0xff, 0xfe]);
        let parts: Vec<(&str, String)> = builder.parts().iter().map(|p| (p.name.as_str(), p.value.clone())).collect();
        let x201 = blake3::hash(&[b'x'; 201]);
        let ff = blake3::hash(&[0xff, 0xfe]);
        assert_eq!(
            parts,
            [
                ("domain", "rustc".to_owned()),
                ("crate_name", "serde".to_owned()),
                ("source", format!("blake3:{x201}  (201 bytes)")),
                ("rlib", format!("blake3:{ff}  (2 bytes)")),
            ]
        );
        // finish does not consume, and is stable.
        assert_eq!(builder.finish(), builder.finish());
    }

    #[test]
    fn hex_round_trips() {
        let key = key(&[("a", b"1")]);
        let text = key.to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(text, text.to_lowercase());
        assert_eq!(format!("{key:?}"), text);
        assert_eq!(text.parse::<CacheKey>(), Ok(key));
        assert_eq!(text.to_uppercase().parse::<CacheKey>(), Ok(key));
        for bad in ["", &text[1..], &format!("{text}0"), &format!("g{}", &text[1..])] {
            let err = bad.parse::<CacheKey>().unwrap_err();
            assert_eq!(err.to_string(), format!("invalid cache key {bad:?}: expected 64 hex digits"));
        }
        // A multi-byte character must not be mistaken for two digits.
        assert!(format!("é{}", &text[2..]).parse::<CacheKey>().is_err());
    }
}
