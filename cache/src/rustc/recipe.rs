//! The rustc key recipe.
//!
//! - The **pre-key** is everything known before compiling: the ToolchainId, the cwd, the
//!   normalized arguments, the content of every `--extern` file, the environment the compile can
//!   observe, and for crates that link, the linker and native libraries.
//! - **Manifests** ([`InputList`]) live under a *scope* (the pre-key and the crate root's
//!   content) in up to [`MAX_MANIFESTS`] generations; each lists the files and variables one
//!   compile read.
//! - The **result key** is the pre-key plus the content of every listed file and the value of
//!   every listed variable.
//!
//! With [`Bases`] (`FERRY_BASEDIRS`), every path under a base directory enters the keys with the
//! base replaced by a placeholder, and the entry's stored output paths and diagnostics carry the
//! placeholder too, so two checkouts share entries and each replays with its own paths.

use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::key::{CacheKey, KeyBuilder, hex};
use crate::output::CompileOutput;
use crate::rustc::RustcArgs;
use crate::store::{PutOutcome, Store};
use crate::{Entry, EntryKind, Error};

/// How many different input lists one scope may accumulate (a crate whose module set changes).
pub const MAX_MANIFESTS: u32 = 8;

/// Environment variables rustc (or the linker it runs) reads, beyond `CARGO_*` and `env-dep`s.
pub const OBSERVED_ENV: &[&str] = &[
    "RUSTC_BOOTSTRAP",
    "SOURCE_DATE_EPOCH",
    "RUSTC_OVERRIDE_VERSION_STRING",
    "RUST_TARGET_PATH",
    "LIBRARY_PATH",
    "MACOSX_DEPLOYMENT_TARGET",
    "IPHONEOS_DEPLOYMENT_TARGET",
    "SDKROOT",
];

/// `CARGO_*` variables that never reach a compile's output but differ between machines or runs.
const IGNORED_CARGO_ENV: &[&str] = &["CARGO", "CARGO_HOME", "CARGO_MAKEFLAGS"];

/// Is this variable part of every pre-key (when set)?
pub fn keyed_env(name: &str) -> bool {
    name.starts_with("CARGO_") && !IGNORED_CARGO_ENV.contains(&name) || OBSERVED_ENV.contains(&name)
}

/// The payload of a manifest entry: what one compile under a scope read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputList {
    /// Files as rustc named them in its dep-info (relative to the cwd, or absolute).
    pub files: Vec<String>,
    /// Variables read through `env!`/`option_env!`.
    pub env: Vec<String>,
}

/// What a pre-key covers; the caller gathers it (digests, environment) from wherever it runs.
#[derive(Debug)]
pub struct PreKeyParts<'a> {
    /// The ToolchainId, hex.
    pub toolchain: &'a str,
    pub cwd: &'a str,
    pub args: &'a RustcArgs,
    /// `(name, path as given, blake3 of the content)` per `--extern` file, in argument order.
    pub externs: Vec<(String, String, [u8; 32])>,
    /// Every set variable for which [`keyed_env`] holds.
    pub env: Vec<(String, String)>,
    /// For crates that link: the linker's identity, and `(kind, name, path + digest or "system")`
    /// per native library.
    pub link: Option<Link>,
}

/// The linker's identity and `(kind, name, path + digest or "system")` per native library.
pub type Link = (String, Vec<(String, String, String)>);

/// The pre-key.
pub fn pre_key(parts: PreKeyParts<'_>, bases: &Bases) -> CacheKey {
    let mut k = KeyBuilder::new("rustc-compile");
    bases.mark(&mut k);
    k.field("toolchain", parts.toolchain);
    k.field("cwd", bases.rebase(parts.cwd));
    for (i, arg) in parts.args.normalized.iter().enumerate() {
        k.field(&format!("arg{i}"), bases.rebase(arg));
    }
    for (name, path, digest) in &parts.externs {
        k.field(&format!("extern:{name}:{}", bases.rebase(path)), hex(digest));
    }
    let mut env = parts.env;
    env.sort();
    for (name, value) in env {
        k.field(&format!("env:{name}"), bases.rebase(&value));
    }
    if let Some((linker, libs)) = parts.link {
        k.field("linker", linker);
        for (kind, name, value) in libs {
            k.field(&format!("native-lib:{kind}:{name}"), bases.rebase(&value));
        }
    }
    k.finish()
}

/// Manifests live under the pre-key and the crate root's content: the root usually declares the
/// modules, so a changed module list mostly lands in a fresh scope instead of using up the
/// generations of the old one.
pub fn manifest_scope(pre: &CacheKey, root: Option<[u8; 32]>) -> CacheKey {
    let root = root.map(|d| hex(&d)).unwrap_or_else(|| "unreadable".into());
    let mut k = KeyBuilder::new("rustc-manifest-scope");
    k.field("pre", pre.to_string()).field("root", root);
    k.finish()
}

/// The key of one manifest generation.
pub fn manifest_key(scope: &CacheKey, generation: u32) -> CacheKey {
    let mut k = KeyBuilder::new("rustc-manifest");
    k.field("scope", scope.to_string()).field("generation", generation.to_string());
    k.finish()
}

/// The key of the result of a compile that read `list`: `digest` gives a listed file's content
/// digest, `env` a listed variable's value. None when a file cannot be read (that manifest cannot
/// describe this compile).
pub fn result_key(
    pre: &CacheKey,
    list: &InputList,
    bases: &Bases,
    mut digest: impl FnMut(&str) -> Option<[u8; 32]>,
    env: impl Fn(&str) -> Option<Vec<u8>>,
) -> Option<CacheKey> {
    let mut k = KeyBuilder::new("rustc-result");
    k.field("pre", pre.to_string());
    for file in &list.files {
        let d = digest(file)?;
        k.field(&format!("file:{}", bases.rebase(file)), hex(&d));
    }
    for name in &list.env {
        match env(name) {
            Some(v) => k.field(&format!("env:{name}"), [b"=".as_slice(), &bases.rebase_bytes(&v)].concat()),
            None => k.field(&format!("env:{name}"), "unset"),
        };
    }
    Some(k.finish())
}

/// Adds `list` to the manifests of `scope` in a shared tier, where other writers may be adding
/// theirs: done when an equal list is there, else it takes the first free generation (first
/// writer wins; a lost race re-reads that generation). Ok(false): every generation is taken.
pub fn publish_manifest(
    store: &dyn Store,
    toolchain: [u8; 32],
    scope: &CacheKey,
    list: &InputList,
) -> Result<bool, Error> {
    let payload = serde_json::to_vec(list).expect("an input list serializes");
    let mut generation = 0;
    let mut raced = false;
    while generation < MAX_MANIFESTS {
        let key = manifest_key(scope, generation);
        match store.get(&key)? {
            Some(found) if serde_json::from_slice::<InputList>(&found.payload).ok().as_ref() == Some(list) => {
                return Ok(true);
            }
            Some(_) => {}
            None => {
                let entry = Entry { kind: EntryKind::Manifest, key, toolchain, payload: payload.clone() };
                match store.put(&entry)? {
                    PutOutcome::Published { .. } => return Ok(true),
                    // Someone published this generation between our get and put: read it once.
                    PutOutcome::AlreadyPresent if !raced => {
                        raced = true;
                        continue;
                    }
                    PutOutcome::AlreadyPresent => {}
                }
            }
        }
        raced = false;
        generation += 1;
    }
    Ok(false)
}

/// `path` (as rustc names it: relative to `cwd`, or absolute) as an absolute path with `.` and
/// `..` resolved lexically, which is how a tree without symlinks (a worker's) resolves it.
pub fn absolute(cwd: &Path, path: impl AsRef<Path>) -> PathBuf {
    let mut out = PathBuf::new();
    for c in cwd.join(path).components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// Base directories (`FERRY_BASEDIRS`): paths under them enter keys and stored outputs relative to
/// the base, so checkouts at different places share entries. The i-th base of one machine
/// corresponds to the i-th of another.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bases {
    /// As configured (absolute, without a trailing `/`).
    dirs: Vec<String>,
    /// Indices into `dirs`, longest first: the most specific base wins.
    by_length: Vec<usize>,
}

impl Bases {
    /// Bases from absolute directory paths; Err names the first path that is not absolute.
    pub fn new(dirs: impl IntoIterator<Item = String>) -> Result<Bases, String> {
        let mut clean = Vec::new();
        for dir in dirs {
            let trimmed = dir.trim_end_matches('/');
            if !dir.starts_with('/') || trimmed.is_empty() || dir.split('/').any(|c| c == ".." || c == ".") {
                return Err(dir);
            }
            clean.push(trimmed.to_owned());
        }
        let mut by_length: Vec<usize> = (0..clean.len()).collect();
        by_length.sort_by_key(|&i| std::cmp::Reverse(clean[i].len()));
        Ok(Bases { dirs: clean, by_length })
    }

    pub fn is_empty(&self) -> bool {
        self.dirs.is_empty()
    }

    pub fn dirs(&self) -> &[String] {
        &self.dirs
    }

    /// Keys made with bases never equal keys made without: their stored paths are placeholders.
    fn mark(&self, k: &mut KeyBuilder) {
        if !self.is_empty() {
            k.field("paths", format!("relative to {} base directories", self.dirs.len()));
        }
    }

    /// `text` with every base (at a path boundary) replaced by its placeholder.
    pub fn rebase(&self, text: &str) -> String {
        String::from_utf8(self.rebase_bytes(text.as_bytes())).expect("placeholders are utf-8")
    }

    /// [`Bases::rebase`] on bytes (diagnostics are not always utf-8).
    pub fn rebase_bytes(&self, text: &[u8]) -> Vec<u8> {
        if self.is_empty() {
            return text.to_vec();
        }
        let mut out = Vec::with_capacity(text.len());
        let mut i = 0;
        while i < text.len() {
            let at_boundary = i == 0 || !is_path_byte(text[i - 1]) && text[i - 1] != b'/';
            let found = at_boundary.then(|| {
                self.by_length.iter().copied().find(|&b| {
                    let dir = self.dirs[b].as_bytes();
                    text[i..].starts_with(dir) && text.get(i + dir.len()).is_none_or(|&c| !is_path_byte(c))
                })
            });
            match found.flatten() {
                Some(b) => {
                    out.extend_from_slice(placeholder(b).as_bytes());
                    i += self.dirs[b].len();
                }
                None => {
                    out.push(text[i]);
                    i += 1;
                }
            }
        }
        out
    }

    /// Placeholders back to this machine's bases.
    pub fn restore(&self, text: &str) -> String {
        String::from_utf8_lossy(&self.restore_bytes(text.as_bytes())).into_owned()
    }

    /// [`Bases::restore`] on bytes.
    pub fn restore_bytes(&self, text: &[u8]) -> Vec<u8> {
        let mut out = text.to_vec();
        for (b, dir) in self.dirs.iter().enumerate() {
            out = replace(&out, placeholder(b).as_bytes(), dir.as_bytes());
        }
        out
    }

    /// An input list as stored in a manifest (its absolute paths under a base made relative).
    pub fn rebase_list(&self, list: &InputList) -> InputList {
        self.map_list(list.clone(), Bases::rebase_bytes)
    }

    /// A stored input list with this machine's paths.
    pub fn restore_list(&self, list: InputList) -> InputList {
        self.map_list(list, Bases::restore_bytes)
    }

    /// An output as stored under a key made with these bases.
    pub fn rebase_output(&self, output: CompileOutput) -> CompileOutput {
        self.map_output(output, Bases::rebase_bytes)
    }

    /// A stored output with this machine's paths.
    pub fn restore_output(&self, output: CompileOutput) -> CompileOutput {
        self.map_output(output, Bases::restore_bytes)
    }

    fn map_list(&self, mut list: InputList, f: fn(&Bases, &[u8]) -> Vec<u8>) -> InputList {
        if !self.is_empty() {
            list.files =
                list.files.iter().map(|p| String::from_utf8_lossy(&f(self, p.as_bytes())).into_owned()).collect();
        }
        list
    }

    /// Applies `f` to the output's paths, streams, and dep-info files (which list paths; cargo
    /// reads them back to decide what is stale).
    fn map_output(&self, mut output: CompileOutput, f: fn(&Bases, &[u8]) -> Vec<u8>) -> CompileOutput {
        if self.is_empty() {
            return output;
        }
        output.stdout = f(self, &output.stdout);
        output.stderr = f(self, &output.stderr);
        for file in &mut output.files {
            file.path = String::from_utf8_lossy(&f(self, file.path.as_bytes())).into_owned();
            if file.path.ends_with(".d") {
                file.bytes = f(self, &file.bytes).into();
            }
        }
        output
    }
}

/// Bytes that continue a path component.
fn is_path_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-' | b'+' | b'~')
}

/// Stands for base `i`; control characters never occur in paths cargo passes.
fn placeholder(i: usize) -> String {
    format!("\u{1}ferry-base-{i}\u{1}")
}

fn replace(text: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        if text[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(text[i]);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bases_replace_whole_path_prefixes_only() {
        let bases = Bases::new(["/home/a/ws".into(), "/home/a".into()]).unwrap();
        let text = "/home/a/ws/src/lib.rs /home/a/ws2/x /home/a/.cargo/r --out-dir=/home/a/ws x/home/a/ws";
        let rebased = bases.rebase(text);
        assert_eq!(
            rebased,
            "\u{1}ferry-base-0\u{1}/src/lib.rs \u{1}ferry-base-1\u{1}/ws2/x \u{1}ferry-base-1\u{1}/.cargo/r \
             --out-dir=\u{1}ferry-base-0\u{1} x/home/a/ws"
        );
        let other = Bases::new(["/srv/b/checkout".into(), "/srv/b".into()]).unwrap();
        assert_eq!(
            other.restore(&rebased),
            "/srv/b/checkout/src/lib.rs /srv/b/ws2/x /srv/b/.cargo/r --out-dir=/srv/b/checkout x/home/a/ws"
        );
        assert_eq!(Bases::default().rebase(text), text);
        assert_eq!(Bases::new(["relative".into()]), Err("relative".into()));
        assert_eq!(Bases::new(["/a/../b".into()]), Err("/a/../b".into()));
    }

    #[test]
    fn keys_with_bases_differ_from_keys_without_and_agree_across_checkouts() {
        let args = |root: &str| RustcArgs {
            normalized: vec![format!("--out-dir={root}/target/debug/deps"), "src/lib.rs".into()],
            ..RustcArgs::default()
        };
        let key = |root: &str, bases: &Bases| {
            let args = args(root);
            let parts = PreKeyParts {
                toolchain: "00",
                cwd: root,
                args: &args,
                externs: vec![("dep".into(), format!("{root}/target/libdep.rlib"), [7; 32])],
                env: vec![("CARGO_MANIFEST_DIR".into(), root.into())],
                link: None,
            };
            pre_key(parts, bases)
        };
        let a = Bases::new(["/ws/a".into()]).unwrap();
        let b = Bases::new(["/elsewhere/b".into()]).unwrap();
        assert_eq!(key("/ws/a", &a), key("/elsewhere/b", &b));
        assert_ne!(key("/ws/a", &Bases::default()), key("/elsewhere/b", &Bases::default()));
        assert_ne!(key("/ws/a", &a), key("/ws/a", &Bases::default()));
    }
}
