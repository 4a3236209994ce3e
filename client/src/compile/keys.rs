//! Step 3, key: the pre-key (everything known before compiling), the manifest scope, and the
//! result key of a manifest, computed from this machine's files and environment as they are now
//! ([`LocalInputs`]). The recipe itself is `ferry_cache::rustc::recipe`, shared with the workers.

use std::fs;
use std::io::ErrorKind;
use std::path::Path;

use ferry_cache::rustc::recipe::{self, PreKeyParts};
use ferry_cache::rustc::{Found, InputList, Inputs};
use ferry_cache::{CacheKey, KeyBuilder};

use super::Job;
use super::identity::Identity;
use crate::reason::Fallback;

/// A compile's pre-key (with its readable parts, for `ferry explain`) and manifest scope.
#[derive(Debug, Clone)]
pub struct Keys {
    pub pre_parts: KeyBuilder,
    pub pre: CacheKey,
    pub scope: CacheKey,
}

impl Keys {
    pub fn new(pre_parts: KeyBuilder, scope: CacheKey) -> Keys {
        Keys { pre: pre_parts.finish(), pre_parts, scope }
    }
}

impl Job {
    /// Everything that determines the compile and is known before running it.
    pub(super) fn pre_key(&mut self, ident: &Identity) -> Result<KeyBuilder, Fallback> {
        let rustc = match &self.unit {
            super::Unit::Rustc(rustc) => rustc,
            super::Unit::Cc(cc) => return Ok(self.pre_key_cc(cc, ident)),
        };
        let mut externs = Vec::new();
        for (name, path) in &rustc.externs {
            let digest = file_digest(&self.cwd.join(path)).ok_or(Fallback::ExternUnreadable)?;
            externs.push((name.clone(), path.clone(), digest));
        }
        let cwd = self.cwd.to_string_lossy().into_owned();
        let toolchain = ident.id.to_hex();
        let parts = PreKeyParts {
            toolchain: &toolchain,
            driver: &ident.driver,
            cwd: &cwd,
            args: rustc,
            externs,
            native_cpu: ident.native_cpu.as_deref(),
        };
        Ok(recipe::pre_key(parts, &self.config.basedirs))
    }

    /// The manifests' scope: the pre-key and the crate root's (or the C source's) content.
    pub(super) fn manifest_scope(&mut self, pre: &CacheKey) -> CacheKey {
        recipe::manifest_scope(pre, file_digest(&self.cwd.join(self.unit.root())))
    }

    /// The result key of a compile that observed `list`, from this machine's state now.
    pub(super) fn result_key(&mut self, pre: &CacheKey, list: &InputList) -> Option<KeyBuilder> {
        self.result_key_or_why(pre, list).ok()
    }

    /// [`Job::result_key`], or what no longer holds.
    pub(super) fn result_key_or_why(&mut self, pre: &CacheKey, list: &InputList) -> Result<KeyBuilder, String> {
        let mut inputs = LocalInputs { cwd: &self.cwd, seen: Some(&mut self.seen) };
        recipe::result_key_or_why(pre, list, &self.config.basedirs, &mut inputs)
    }
}

/// What a file looked like: (size, mtime ns, ctime ns, inode, device). A write changes the ctime
/// even when the mtime is put back; a file replaced by another changes the inode.
pub type Stamp = (u64, i128, i128, u64, u64);

/// Stamps of the files a lookup probed, by path.
pub type Seen = std::collections::HashMap<std::path::PathBuf, Stamp>;

pub fn stamp(m: &fs::Metadata) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
    (m.len(), ns(m.mtime(), m.mtime_nsec()), ns(m.ctime(), m.ctime_nsec()), m.ino(), m.dev())
}

/// This machine's files and environment, as a result key reads them. Digests come through the
/// stat-fingerprint memo (`crate::digests`); each regular file's stamp is noted in `seen`.
pub struct LocalInputs<'a> {
    pub cwd: &'a Path,
    pub seen: Option<&'a mut Seen>,
}

impl Inputs for LocalInputs<'_> {
    fn probe(&mut self, path: &str) -> Found {
        use std::os::unix::fs::PermissionsExt;
        // Joined, not cleaned: the kernel resolves `..` after the symbolic link before it.
        let path = self.cwd.join(path);
        match fs::metadata(&path) {
            Ok(m) if m.is_file() => {
                if let Some(seen) = self.seen.as_deref_mut() {
                    seen.insert(path.clone(), stamp(&m));
                }
                crate::digests::digest(&path, &m).map_or(Found::Unreadable, |digest| Found::File {
                    digest,
                    executable: m.permissions().mode() & 0o111 != 0,
                })
            }
            Ok(m) if m.is_dir() => Found::Dir,
            Ok(_) => Found::Other,
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => Found::Absent,
            Err(_) => Found::Unreadable,
        }
    }

    fn link(&mut self, path: &str) -> Option<String> {
        fs::read_link(self.cwd.join(path)).ok().and_then(|t| t.to_str().map(str::to_owned))
    }

    fn listing(&mut self, path: &str) -> Option<Vec<String>> {
        let mut names: Vec<String> = fs::read_dir(self.cwd.join(path))
            .ok()?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_, _>>()
            .ok()?;
        names.sort();
        Some(names)
    }

    fn program(&mut self, name: &str) -> Option<[u8; 32]> {
        let found = if name.contains('/') {
            self.cwd.join(name)
        } else {
            let path = std::env::var_os("PATH")?;
            std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())?
        };
        file_digest(&found)
    }

    fn env(&self, name: &str) -> Option<Vec<u8>> {
        std::env::var_os(name).map(|v| v.into_encoded_bytes())
    }

    fn env_names(&self) -> Vec<String> {
        std::env::vars_os().map(|(k, _)| k.to_string_lossy().into_owned()).collect()
    }
}

/// The content digest of a file (through the memo).
pub fn file_digest(path: &Path) -> Option<[u8; 32]> {
    let meta = fs::metadata(path).ok()?;
    crate::digests::digest(path, &meta)
}
