//! The canonical manifest of a toolchain and the strong [`ToolchainId`] derived from it.
//!
//! The manifest is a text file, one line per file of the set in sorted path order:
//! `F <x|-> <size> <blake3> <path>` for a regular file, `L <target> <path>` (tab separated) for a
//! symlink. It holds no install location, no mtimes and nothing about compression, so the same
//! toolchain anywhere has one id and any changed byte gives another.

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::str::FromStr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::{Error, ToolchainSet};

const HEADER: &str = "ferry-toolchain-manifest v1\n";
const ID_CONTEXT: &str = "ferry toolchain id v1";

/// The strong identity of a toolchain: blake3 of its canonical manifest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ToolchainId(pub [u8; 32]);

/// The canonical description of a toolchain's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub entries: Vec<ManifestEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestEntry {
    /// Relative path with `/` separators; never absolute, never `..`.
    pub path: String,
    pub kind: ManifestKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManifestKind {
    File { executable: bool, size: u64, digest: [u8; 32] },
    Symlink { target: String },
}

impl ToolchainId {
    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }
}

impl fmt::Display for ToolchainId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ToolchainId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ToolchainId({})", self.to_hex())
    }
}

impl FromStr for ToolchainId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        blake3::Hash::from_hex(s)
            .map(|h| ToolchainId(*h.as_bytes()))
            .map_err(|_| format!("'{s}' is not a toolchain id (64 hex characters)"))
    }
}

impl Manifest {
    /// Hashes every file of the set, in parallel, and builds the manifest.
    pub fn compute(set: &ToolchainSet) -> Result<Manifest, Error> {
        // Largest files first so the two big shared libraries do not end up on one thread.
        let mut order: Vec<usize> = (0..set.files.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(set.files[i].size));
        let digests: Vec<Mutex<Option<[u8; 32]>>> = set.files.iter().map(|_| Mutex::new(None)).collect();
        let next = AtomicUsize::new(0);
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).min(8);
        std::thread::scope(|s| {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| -> Result<(), Error> {
                        loop {
                            let Some(&i) = order.get(next.fetch_add(1, Ordering::Relaxed)) else {
                                return Ok(());
                            };
                            let file = &set.files[i];
                            if file.symlink.is_none() {
                                let (digest, size) = hash_file(&file.abs)?;
                                if size != file.size {
                                    return Err(Error::Changed { path: file.abs.clone() });
                                }
                                *digests[i].lock().expect("no panics while hashing") = Some(digest);
                            }
                        }
                    })
                })
                .collect();
            workers.into_iter().try_for_each(|w| w.join().expect("hash worker panicked"))
        })?;
        let entries = set
            .files
            .iter()
            .zip(digests)
            .map(|(file, digest)| ManifestEntry {
                path: file.rel.clone(),
                kind: match &file.symlink {
                    Some(target) => ManifestKind::Symlink { target: target.clone() },
                    None => ManifestKind::File {
                        executable: file.executable,
                        size: file.size,
                        digest: digest.into_inner().expect("no panics").expect("every file hashed"),
                    },
                },
            })
            .collect();
        Ok(Manifest { entries })
    }

    pub fn id(&self) -> ToolchainId {
        ToolchainId(blake3::derive_key(ID_CONTEXT, self.to_text().as_bytes()))
    }

    /// Sum of regular file sizes.
    pub fn bytes(&self) -> u64 {
        self.entries
            .iter()
            .map(|e| match e.kind {
                ManifestKind::File { size, .. } => size,
                ManifestKind::Symlink { .. } => 0,
            })
            .sum()
    }

    pub fn to_text(&self) -> String {
        let mut out = String::from(HEADER);
        for e in &self.entries {
            match &e.kind {
                ManifestKind::File { executable, size, digest } => {
                    let x = if *executable { "x" } else { "-" };
                    let hex = blake3::Hash::from_bytes(*digest).to_hex();
                    out.push_str(&format!("F\t{x}\t{size}\t{hex}\t{}\n", e.path));
                }
                ManifestKind::Symlink { target } => out.push_str(&format!("L\t{target}\t{}\n", e.path)),
            }
        }
        out
    }

    /// Parses and checks a manifest: sorted unique paths, each safe (relative, no `..`).
    pub fn parse(text: &str) -> Result<Manifest, Error> {
        let bad = |reason: String| Error::CorruptArchive { reason: format!("manifest: {reason}") };
        let body = text.strip_prefix(HEADER).ok_or_else(|| bad("missing header".into()))?;
        let mut entries: Vec<ManifestEntry> = Vec::new();
        for line in body.lines() {
            let fields: Vec<&str> = line.split('\t').collect();
            let entry = match fields.as_slice() {
                ["F", x, size, hex, path] => ManifestEntry {
                    path: path.to_string(),
                    kind: ManifestKind::File {
                        executable: match *x {
                            "x" => true,
                            "-" => false,
                            _ => return Err(bad(format!("bad mode '{x}'"))),
                        },
                        size: size.parse().map_err(|_| bad(format!("bad size '{size}'")))?,
                        digest: *blake3::Hash::from_hex(hex)
                            .map_err(|_| bad(format!("bad digest '{hex}'")))?
                            .as_bytes(),
                    },
                },
                ["L", target, path] => {
                    ManifestEntry { path: path.to_string(), kind: ManifestKind::Symlink { target: target.to_string() } }
                }
                _ => return Err(bad(format!("bad line '{line}'"))),
            };
            check_rel_path(&entry.path).map_err(|reason| Error::UnsafeEntry { entry: entry.path.clone(), reason })?;
            if let Some(prev) = entries.last()
                && prev.path >= entry.path
            {
                return Err(bad(format!("paths not sorted at '{}'", entry.path)));
            }
            entries.push(entry);
        }
        Ok(Manifest { entries })
    }
}

/// Checks that a path is relative, normal and free of `..`, empty components and NULs.
pub(crate) fn check_rel_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("empty path".into());
    }
    if path.starts_with('/') {
        return Err("absolute path".into());
    }
    if path.contains('\0') || path.contains('\n') || path.contains('\t') {
        return Err("control character in path".into());
    }
    for part in path.split('/') {
        match part {
            "" | "." => return Err("empty or '.' path component".into()),
            ".." => return Err("'..' path component".into()),
            _ => {}
        }
    }
    Ok(())
}

/// blake3 and length of a file's content.
pub(crate) fn hash_file(path: &Path) -> Result<([u8; 32], u64), Error> {
    let mut file = File::open(path).map_err(Error::io(path))?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(Error::io(path))?;
        if n == 0 {
            break;
        }
        len += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok((*hasher.finalize().as_bytes(), len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_roundtrip_and_id_depends_on_every_field() {
        let m = Manifest {
            entries: vec![
                ManifestEntry {
                    path: "bin/rustc".into(),
                    kind: ManifestKind::File { executable: true, size: 3, digest: [1; 32] },
                },
                ManifestEntry { path: "lib/a.so".into(), kind: ManifestKind::Symlink { target: "b.so".into() } },
            ],
        };
        assert_eq!(Manifest::parse(&m.to_text()).unwrap(), m);
        let mut variants = Vec::new();
        for i in 0..4 {
            let mut v = m.clone();
            match (&mut v.entries[0].kind, i) {
                (ManifestKind::File { executable, .. }, 0) => *executable = false,
                (ManifestKind::File { size, .. }, 1) => *size = 4,
                (ManifestKind::File { digest, .. }, 2) => digest[31] = 9,
                _ => v.entries[1].kind = ManifestKind::Symlink { target: "c.so".into() },
            }
            variants.push(v.id());
        }
        variants.push(m.id());
        variants.sort();
        variants.dedup();
        assert_eq!(variants.len(), 5);
    }

    #[test]
    fn parse_refuses_unsafe_or_unsorted() {
        for bad in ["F\t-\t1\t{h}\t../x\n", "F\t-\t1\t{h}\t/etc/x\n", "F\t-\t1\t{h}\tb\nF\t-\t1\t{h}\ta\n"] {
            let text = format!("{HEADER}{}", bad.replace("{h}", &"00".repeat(32)));
            assert!(Manifest::parse(&text).is_err(), "{text}");
        }
    }
}
