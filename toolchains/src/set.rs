//! The toolchain file set: exactly the files a rustc needs to compile for a set of targets.
//!
//! For rustc that is `bin/rustc`, the shared libraries at the top of `lib/` it loads, and
//! `lib/rustlib/<target>/lib` for the host and each requested target. Deliberately beyond the design
//! text: `lib/rustlib/<host>/bin` (rust-lld and its `gcc-ld` shims), because since Rust 1.90 rustc
//! links x86_64 Linux binaries with that bundled lld, so it shapes every linked output we cache.
//! Not in the set: rust-src, docs, cargo, rustdoc, other installed targets.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use crate::Error;

/// The files of one toolchain for one (host, targets) combination, sorted by relative path.
#[derive(Debug, Clone)]
pub struct ToolchainSet {
    pub root: PathBuf,
    pub host: String,
    /// Requested targets besides the host, sorted and deduplicated.
    pub targets: Vec<String>,
    pub files: Vec<SetFile>,
}

/// One entry of a [`ToolchainSet`], with the metadata the weak key is made of.
#[derive(Debug, Clone)]
pub struct SetFile {
    /// Path relative to the toolchain root, with `/` separators.
    pub rel: String,
    pub abs: PathBuf,
    /// `Some(target)` when this is a symlink kept as a symlink (relative, stays inside the root).
    pub symlink: Option<String>,
    pub size: u64,
    pub executable: bool,
    /// (mtime ns, ctime ns, inode, device): what a cheap fingerprint can see of an in-place change.
    pub stamp: (i128, i128, u64, u64),
}

impl ToolchainSet {
    /// Lists the set for `root`. `targets` may contain the host; unknown targets are an error.
    pub fn collect(root: &Path, host: &str, targets: &[String]) -> Result<ToolchainSet, Error> {
        let mut targets: Vec<String> = targets.iter().filter(|t| *t != host).cloned().collect();
        targets.sort();
        targets.dedup();
        let mut files = Vec::new();
        add_file(root, "bin/rustc", &mut files)?;
        let lib = root.join("lib");
        for entry in fs::read_dir(&lib).map_err(Error::io(&lib))? {
            let entry = entry.map_err(Error::io(&lib))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let is_dir = entry.file_type().map_err(Error::io(entry.path()))?.is_dir();
            if !is_dir && name.contains(".so") {
                add_file(root, &format!("lib/{name}"), &mut files)?;
            }
        }
        for target in std::iter::once(host).chain(targets.iter().map(String::as_str)) {
            if target.is_empty() || target.contains(['/', '\\']) || target.starts_with('.') {
                return Err(Error::UnknownTarget { target: target.to_owned(), root: root.into() });
            }
            let dir = format!("lib/rustlib/{target}/lib");
            if !root.join(&dir).is_dir() {
                return Err(Error::UnknownTarget { target: target.to_owned(), root: root.into() });
            }
            add_tree(root, &dir, &mut files)?;
        }
        for extra in [format!("lib/rustlib/{host}/bin"), format!("lib/rustlib/{host}/codegen-backends")] {
            if root.join(&extra).is_dir() {
                add_tree(root, &extra, &mut files)?;
            }
        }
        files.sort_by(|a, b| a.rel.cmp(&b.rel));
        files.dedup_by(|a, b| a.rel == b.rel);
        Ok(ToolchainSet { root: root.to_owned(), host: host.to_owned(), targets, files })
    }

    /// Total bytes of regular-file content in the set.
    pub fn bytes(&self) -> u64 {
        self.files.iter().filter(|f| f.symlink.is_none()).map(|f| f.size).sum()
    }

    /// All requested targets including the host, sorted.
    pub fn all_targets(&self) -> Vec<String> {
        let mut all = self.targets.clone();
        all.push(self.host.clone());
        all.sort();
        all
    }
}

fn add_tree(root: &Path, rel_dir: &str, files: &mut Vec<SetFile>) -> Result<(), Error> {
    let dir = root.join(rel_dir);
    let mut entries: Vec<_> =
        fs::read_dir(&dir).map_err(Error::io(&dir))?.collect::<Result<_, _>>().map_err(Error::io(&dir))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            return Err(Error::NotRustc { path: entry.path(), reason: "toolchain file names must be utf-8".into() });
        };
        let rel = format!("{rel_dir}/{name}");
        let kind = entry.file_type().map_err(Error::io(entry.path()))?;
        if kind.is_dir() {
            add_tree(root, &rel, files)?;
        } else {
            add_file(root, &rel, files)?;
        }
    }
    Ok(())
}

fn add_file(root: &Path, rel: &str, files: &mut Vec<SetFile>) -> Result<(), Error> {
    let abs = root.join(rel);
    let link_meta = fs::symlink_metadata(&abs).map_err(Error::io(&abs))?;
    let mut symlink = None;
    if link_meta.file_type().is_symlink() {
        let target = fs::read_link(&abs).map_err(Error::io(&abs))?;
        if let Some(t) = target.to_str().filter(|_| stays_inside(rel, &target)) {
            symlink = Some(t.to_owned());
        }
    }
    // A symlink that leaves the root is followed: its content is what the compiler sees. Anything
    // else is described by the one `lstat` already made (half the stats of a hit's toolchain check).
    let meta = if symlink.is_none() && link_meta.file_type().is_symlink() {
        fs::metadata(&abs).map_err(Error::io(&abs))?
    } else {
        link_meta
    };
    if symlink.is_none() && !meta.is_file() {
        return Err(Error::NotRustc { path: abs, reason: "expected a regular file here".into() });
    }
    files.push(SetFile {
        rel: rel.to_owned(),
        size: if symlink.is_some() { 0 } else { meta.len() },
        executable: symlink.is_none() && meta.mode() & 0o111 != 0,
        stamp: (
            meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
            meta.ctime() as i128 * 1_000_000_000 + meta.ctime_nsec() as i128,
            meta.ino(),
            meta.dev(),
        ),
        symlink,
        abs,
    });
    Ok(())
}

/// True when a relative symlink at `rel` pointing to `target` resolves inside the root.
pub(crate) fn stays_inside(rel: &str, target: &Path) -> bool {
    if target.is_absolute() {
        return false;
    }
    let mut depth: i64 = rel.split('/').count() as i64 - 1;
    for c in target.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            Component::CurDir => {}
            _ => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlink_containment() {
        assert!(stays_inside("lib/a.so", Path::new("b.so")));
        assert!(stays_inside("lib/x/a.so", Path::new("../b.so")));
        assert!(!stays_inside("lib/a.so", Path::new("../../b.so")));
        assert!(!stays_inside("a.so", Path::new("../b.so")));
        assert!(!stays_inside("lib/a.so", Path::new("/etc/passwd")));
    }
}
