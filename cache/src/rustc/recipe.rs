//! The rustc key recipe.
//!
//! - The **pre-key** is everything known before compiling: the ToolchainId, the driver that runs
//!   (rustc itself, or clippy-driver or another driver, by content), the cwd, the arguments (in
//!   their keyed form: see [`RustcArgs::keyed`]), the content of every `--extern` file, and what
//!   `-C target-cpu=native` means on this machine.
//! - **Manifests** ([`InputList`]) live under a *scope* (the pre-key and the crate root's
//!   content) in up to [`MAX_MANIFESTS`] generations; each lists what one compile observed (see
//!   [`crate::rustc::observed`]).
//! - The **result key** is the pre-key plus the current state of everything a manifest lists:
//!   each file's content, each path's presence or absence, each link's target, each listed
//!   directory's entries, each program's content, each variable's value (or unset). A hit
//!   therefore requires that nothing the compile observed has changed.
//!
//! With [`Bases`] (`FERRY_BASEDIRS`), every path under a base directory enters the keys with the
//! base replaced by a placeholder, and the entry's stored output paths and diagnostics carry the
//! placeholder too, so two checkouts share entries and each replays with its own paths. Values
//! that reach the compiled bytes themselves are never rebased: a variable's value that occurs in
//! the outputs (an `env!` of `CARGO_MANIFEST_DIR`: [`mark_verbatim`]), and a crate root given as an
//! absolute path (what `file!()` embeds) unless a `--remap-path-prefix` rewrites it.

use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::key::{CacheKey, KeyBuilder, hex};
use crate::output::CompileOutput;
use crate::rustc::RustcArgs;
use crate::rustc::observed::{is_secret, never_keyed};
use crate::store::{PutOutcome, Store};
use crate::{Entry, EntryKind, Error};

/// How many different input lists one scope may accumulate (a crate whose module set changes).
pub const MAX_MANIFESTS: u32 = 8;

/// The payload of a manifest entry: what one compile under a scope observed, each list sorted.
/// Paths are absolute (relative to a base when stored under [`Bases`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputList {
    /// Files read: keyed by content (a directory opened is keyed as a directory).
    pub files: Vec<String>,
    /// Paths looked up and found, but not read: keyed by their kind (file, directory, other).
    pub present: Vec<String>,
    /// Paths looked for and not found: must still be absent.
    pub absent: Vec<String>,
    /// Symbolic links read: keyed by their target.
    pub links: Vec<String>,
    /// Directories listed: keyed by their entry names.
    pub listings: Vec<String>,
    /// Programs started, as named: a bare name is resolved in `PATH`; keyed by content.
    pub programs: Vec<String>,
    /// Environment variables looked up: keyed by value, or as unset.
    pub env: Vec<String>,
    /// Those of `env` whose value is keyed verbatim even under [`Bases`]: it names a path under a
    /// base and reaches the compiled outputs (see [`mark_verbatim`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env_verbatim: Vec<String>,
    /// A program the compile's plugin code started may have read its whole environment: the
    /// set of variable names is keyed too (a variable set later, unseen by the first compile,
    /// must miss).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub whole_environment: bool,
    /// Under [`Bases`], the bases (by position) whose path an output holds as bytes (debug info's
    /// compilation directory, source paths in metadata, a path compiled in): those bases are keyed
    /// verbatim, so another checkout compiles again instead of replaying this one's paths (see
    /// [`mark_verbatim`]; `--remap-path-prefix` removes such paths, and the entry is shared).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub verbatim_bases: Vec<usize>,
}

/// Marks the variables whose values must not be rebased: with base directories, a value that
/// names a path under a base and occurs as-is in the compile's output files (an `env!` of
/// `CARGO_MANIFEST_DIR` compiled into a string) would otherwise be replayed, first checkout's path
/// and all, in another checkout. Such a compile then misses elsewhere instead. A value that does
/// not reach the outputs (a proc-macro that only reads files under `CARGO_MANIFEST_DIR`) stays
/// rebased, and shared.
///
/// More generally, each base whose path an output file holds at all (debug info names the
/// compilation directory; metadata names source files) goes into [`InputList::verbatim_bases`]. `outputs` are the compiled files, not dep-info files (their
/// paths are rewritten on replay).
pub fn mark_verbatim(list: &mut InputList, bases: &Bases, env: impl Fn(&str) -> Option<Vec<u8>>, outputs: &[&[u8]]) {
    list.env_verbatim.clear();
    list.verbatim_bases.clear();
    if bases.is_empty() {
        return;
    }
    list.verbatim_bases = (0..bases.dirs().len()).filter(|&i| outputs.iter().any(|o| bases.occurs_in(i, o))).collect();
    for name in &list.env {
        let Some(value) = env(name) else { continue };
        if value.len() >= 2 && bases.rebase_bytes(&value) != value && outputs.iter().any(|o| contains(o, &value)) {
            list.env_verbatim.push(name.clone());
        }
    }
}

/// Does `haystack` contain `needle` (non-empty)?
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    find(haystack, needle, 0).is_some()
}

/// Where `needle` (non-empty) first stands in `haystack` at or after `from`.
fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    let (first, rest) = (needle[0], &needle[1..]);
    let mut at = from;
    while let Some(i) = haystack.get(at..)?.iter().position(|&b| b == first) {
        let start = at + i;
        if haystack[start + 1..].starts_with(rest) {
            return Some(start);
        }
        at = start + 1;
    }
    None
}

/// What a pre-key covers; the caller gathers it (digests, driver identity) from wherever it runs.
#[derive(Debug)]
pub struct PreKeyParts<'a> {
    /// The ToolchainId, hex.
    pub toolchain: &'a str,
    /// `rustc` when the toolchain's own rustc runs; otherwise the driver's file name and content
    /// digest (`clippy-driver blake3:…`), so another driver never gets rustc's entries.
    pub driver: &'a str,
    pub cwd: &'a str,
    pub args: &'a RustcArgs,
    /// `(name, path as given, blake3 of the content)` per `--extern` file, in argument order.
    pub externs: Vec<(String, String, [u8; 32])>,
    /// What `-C target-cpu=native` resolves to here (CPU name and features), when it is given.
    pub native_cpu: Option<&'a str>,
}

/// What is at a path now, as the result key sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// A regular file: the blake3 of its content, and whether it is executable (by anyone).
    File {
        digest: [u8; 32],
        executable: bool,
    },
    Dir,
    /// A device, FIFO or socket.
    Other,
    Absent,
    /// There, but not readable (the manifest cannot be checked).
    Unreadable,
}

/// Where the current state of a compile's inputs is read from: the client's own machine, or a
/// worker's job tree and the job's environment.
pub trait Inputs {
    /// The path now, resolved as the kernel resolves it (a symbolic link before `..`).
    fn probe(&mut self, path: &str) -> Found;
    /// A symbolic link's target, or None when the path is not a link.
    fn link(&mut self, path: &str) -> Option<String>;
    /// A directory's entry names, sorted; None when it cannot be listed.
    fn listing(&mut self, path: &str) -> Option<Vec<String>>;
    /// The content digest of the program this name starts (a bare name searched in `PATH`).
    fn program(&mut self, name: &str) -> Option<[u8; 32]>;
    /// A variable's value, or None when unset.
    fn env(&self, name: &str) -> Option<Vec<u8>>;
    /// The names of every variable set (for [`InputList::whole_environment`]).
    fn env_names(&self) -> Vec<String>;
}

/// The pre-key, with its readable parts (for `ferry explain`).
pub fn pre_key(parts: PreKeyParts<'_>, bases: &Bases) -> KeyBuilder {
    let mut k = KeyBuilder::new("rustc-compile");
    bases.mark(&mut k);
    k.field("toolchain", parts.toolchain);
    k.field("driver", parts.driver);
    k.field("cwd", bases.rebase(parts.cwd));
    let remaps: Vec<&str> = parts.args.remapped_prefixes();
    for (i, arg) in parts.args.keyed().iter().enumerate() {
        // A crate root named by an absolute path is compiled into the output (`file!()`, panic
        // locations): rebased only when a --remap-path-prefix rewrites it anyway.
        let embedded = *arg == parts.args.input
            && Path::new(arg).is_absolute()
            && !remaps.iter().any(|from| Path::new(arg).starts_with(from));
        k.field(&format!("arg{i}"), if embedded { (*arg).to_owned() } else { bases.rebase(arg) });
    }
    for (name, path, digest) in &parts.externs {
        k.field(&format!("extern:{name}:{}", bases.rebase(path)), hex(digest));
    }
    if let Some(native) = parts.native_cpu {
        // `cpu=NAME features=+a,+b,...`: the name readable in `ferry explain`, the list hashed.
        let (cpu, features) = native.split_once(" features=").unwrap_or((native, ""));
        k.field("target-cpu=native", cpu);
        k.field("target-cpu=native features", features);
    }
    k
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

/// The key of the result of a compile that observed `list`, from the current state of its inputs,
/// with its readable parts. None when something the list records no longer holds (a file read is
/// gone, a path found is absent, a path absent is there): that manifest cannot describe this
/// compile.
pub fn result_key(pre: &CacheKey, list: &InputList, bases: &Bases, now: &mut dyn Inputs) -> Option<KeyBuilder> {
    result_key_or_why(pre, list, bases, now).ok()
}

/// [`result_key`], or what no longer holds (`present:/p/x is absent now`).
pub fn result_key_or_why(
    pre: &CacheKey,
    list: &InputList,
    bases: &Bases,
    now: &mut dyn Inputs,
) -> Result<KeyBuilder, String> {
    let mut k = KeyBuilder::new("rustc-result");
    k.field("pre", pre.to_string());
    for file in &list.files {
        let value = match now.probe(file) {
            Found::File { digest, executable } => file_value(&digest, executable),
            Found::Dir => "directory".into(),
            other => return Err(format!("file:{file} is {other:?} now")),
        };
        k.field(&format!("file:{}", bases.rebase(file)), value);
    }
    // A file looked at without being read is keyed by content too: a process deciding from what
    // `stat` said (git's dirty check compares sizes and times, then content) reaches the same
    // conclusion whenever the content is the same, whatever the times.
    for path in &list.present {
        let kind = match now.probe(path) {
            Found::File { digest, executable } => format!("file {}", file_value(&digest, executable)),
            Found::Dir => "directory".into(),
            Found::Other => "other".into(),
            other => return Err(format!("present:{path} is {other:?} now")),
        };
        k.field(&format!("present:{}", bases.rebase(path)), kind);
    }
    for path in &list.absent {
        let found = now.probe(path);
        if found != Found::Absent {
            return Err(format!("absent:{path} is {found:?} now"));
        }
        k.field(&format!("absent:{}", bases.rebase(path)), "absent");
    }
    for path in &list.links {
        let target = now.link(path).ok_or_else(|| format!("link:{path} is not a link now"))?;
        k.field(&format!("link:{}", bases.rebase(path)), bases.rebase(&target));
    }
    for path in &list.listings {
        let names = now.listing(path).ok_or_else(|| format!("listing:{path} cannot be listed now"))?;
        k.field(&format!("listing:{}", bases.rebase(path)), names.join("\n"));
    }
    for name in &list.programs {
        let digest = now.program(name).ok_or_else(|| format!("program:{name} is not found now"))?;
        k.field(&format!("program:{}", bases.rebase(name)), hex(&digest));
    }
    for name in &list.env {
        match now.env(name) {
            Some(v) if is_secret(name, &v) => k.field(&format!("env:{name}"), format!("secret {}", blake3::hash(&v))),
            Some(v) if list.env_verbatim.contains(name) => {
                k.field(&format!("env:{name}"), [b"=".as_slice(), &v].concat())
            }
            Some(v) => k.field(&format!("env:{name}"), [b"=".as_slice(), &bases.rebase_bytes(&v)].concat()),
            None => k.field(&format!("env:{name}"), "unset"),
        };
    }
    for &i in &list.verbatim_bases {
        let dir = bases.dirs().get(i).map_or("(no such base here)", String::as_str);
        k.field(&format!("base {i} in the outputs"), dir);
    }
    if list.whole_environment {
        let mut names: Vec<String> = now.env_names().into_iter().filter(|n| !never_keyed(n)).collect();
        names.sort();
        k.field("environment", names.join(" "));
    }
    Ok(k)
}

/// How a regular file enters a key: its content digest, marked when it is executable.
fn file_value(digest: &[u8; 32], executable: bool) -> String {
    if executable { format!("{} executable", hex(digest)) } else { hex(digest) }
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
        // A generation that does not verify (torn, or signed by a writer this one does not
        // trust) is free: the put replaces it where the store can tell (`Signed`).
        let there = match store.get(&key) {
            Err(Error::Corrupt { .. }) => None,
            other => other?,
        };
        match there {
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
/// `..` resolved lexically, which is how a tree without symlinks (a worker's) resolves it. Not for
/// reading what a compile observed on the client: the kernel resolves a symbolic link before
/// `..` (`#[path = "../common.rs"]` inside a linked directory lands beside the link's target).
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
    pub(crate) fn mark(&self, k: &mut KeyBuilder) {
        if !self.is_empty() {
            k.field("paths", format!("relative to {} base directories, placeholders escaped", self.dirs.len()));
        }
    }

    /// `text` with every base (at a path boundary) replaced by its placeholder, and every
    /// placeholder-starting byte (`\x01`) already in it doubled: no text can pose as a
    /// placeholder, so two different texts never rebase alike ([`Bases::restore`] undoes both).
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
                None if text[i] == MARK => {
                    out.extend_from_slice(&[MARK, MARK]);
                    i += 1;
                }
                None => {
                    out.push(text[i]);
                    i += 1;
                }
            }
        }
        out
    }

    /// Whether `text` holds base `i`'s path (followed by `/`, or by a byte that ends a path).
    pub fn occurs_in(&self, i: usize, text: &[u8]) -> bool {
        let Some(dir) = self.dirs.get(i) else { return false };
        let dir = dir.as_bytes();
        let mut at = 0;
        while let Some(start) = find(text, dir, at) {
            let end = start + dir.len();
            if text.get(end).is_none_or(|&c| c == b'/' || !is_path_byte(c)) {
                return true;
            }
            at = start + 1;
        }
        false
    }

    /// Placeholders back to this machine's bases.
    pub fn restore(&self, text: &str) -> String {
        String::from_utf8_lossy(&self.restore_bytes(text.as_bytes())).into_owned()
    }

    /// [`Bases::restore`] on bytes: placeholders become this machine's bases, doubled marks
    /// single ones; anything else is kept as it is.
    pub fn restore_bytes(&self, text: &[u8]) -> Vec<u8> {
        if self.is_empty() {
            return text.to_vec();
        }
        let mut out = Vec::with_capacity(text.len());
        let mut i = 0;
        'bytes: while i < text.len() {
            if text[i] == MARK {
                if text.get(i + 1) == Some(&MARK) {
                    out.push(MARK);
                    i += 2;
                    continue;
                }
                for (b, dir) in self.dirs.iter().enumerate() {
                    let placeholder = placeholder(b);
                    if text[i..].starts_with(placeholder.as_bytes()) {
                        out.extend_from_slice(dir.as_bytes());
                        i += placeholder.len();
                        continue 'bytes;
                    }
                }
            }
            out.push(text[i]);
            i += 1;
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
            let map = |paths: &mut Vec<String>| {
                for p in paths.iter_mut() {
                    *p = String::from_utf8_lossy(&f(self, p.as_bytes())).into_owned();
                }
            };
            for paths in [&mut list.files, &mut list.present, &mut list.absent, &mut list.links, &mut list.listings] {
                map(paths);
            }
            map(&mut list.programs);
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

/// The byte that starts a placeholder (and is doubled wherever a text already holds it).
const MARK: u8 = 0x01;

/// Stands for base `i`.
fn placeholder(i: usize) -> String {
    format!("\u{1}ferry-base-{i}\u{1}")
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
        // A value that spells a placeholder is not one: it never rebases like the base's path,
        // and comes back as it was.
        let forged = "\u{1}ferry-base-0\u{1}/src/lib.rs";
        assert_ne!(bases.rebase(forged), bases.rebase("/home/a/ws/src/lib.rs"));
        assert_eq!(other.restore(&bases.rebase(forged)), forged);
        assert_eq!(other.restore(&bases.rebase("\u{1}\u{1}x\u{1}")), "\u{1}\u{1}x\u{1}");
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
                driver: "rustc",
                cwd: root,
                args: &args,
                externs: vec![("dep".into(), format!("{root}/target/libdep.rlib"), [7; 32])],
                native_cpu: None,
            };
            pre_key(parts, bases).finish()
        };
        let a = Bases::new(["/ws/a".into()]).unwrap();
        let b = Bases::new(["/elsewhere/b".into()]).unwrap();
        assert_eq!(key("/ws/a", &a), key("/elsewhere/b", &b));
        assert_ne!(key("/ws/a", &Bases::default()), key("/elsewhere/b", &Bases::default()));
        assert_ne!(key("/ws/a", &a), key("/ws/a", &Bases::default()));
    }
}
