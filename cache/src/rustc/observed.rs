//! From what a compile observed ([`ferry_observe::Record`]s) to its manifest ([`InputList`]):
//! which observations are inputs of the cache key, and how each is keyed. The wrapper and the
//! workers both use this, so a worker publishes under exactly the key a client looks up.
//!
//! Every rule that leaves an observation out of the key is here, with why it cannot reach an
//! output (ARCHITECTURE.md lists them too, and each has a test that fails if it loses an input):
//! - **The toolchain's own files**: exactly those the ToolchainId covers ([`ToolchainFiles`]) —
//!   not everything under its directory. One exception, rust-src (see [`ToolchainFiles::covers`]).
//! - **`/proc`, `/dev`, `/sys`**: the kernel's views of processes and devices, not files.
//! - **The directories that hold the declared outputs**, looked at (`stat`): a compile that
//!   writes its outputs there finds them there; the key does not depend on where they are.
//! - **What the compile itself made**, from the moment it made it: a file it created or
//!   overwrote (its old content was never read), a directory it created and everything in it, and
//!   its declared outputs. A file it read (or opened for update) *before* writing it is an input —
//!   and, changed by the compile, makes the result unstorable (checked after the compile by the
//!   caller, by ctime).
//! - **The observer's own files** and variables (`LD_PRELOAD`, `FERRY_OBSERVE_*`).
//! - **A crate-search directory's listing** (`-L`): it lists whatever cargo built so far; only
//!   the files the compile opened or looked for in it count.
//! - **Variables**, by who looked them up ([`Origin`]): every variable rustc reports reading
//!   (dep-info `# env-dep:` lines: `env!`, `option_env!`, tracked proc-macro lookups) and every one
//!   a proc-macro or a program it started looks up is keyed whatever its name; only rustc's own
//!   lookups ([`COMPILER_OWN`]) and the linker driver's own ([`SUBPROCESS_OWN`]) of a few named
//!   variables are not, each because that program's use of it is shown not to reach an output;
//!   the jobserver's variables ([`JOBSERVER`]) are never keyed.
//!
//! A program the compile started is keyed by content, by the name it was started under (a bare
//! name is resolved in `PATH` again at lookup). An executable no exec record explains (a script's
//! interpreter) is keyed by its path and content. Anything the observer could not see (an `!`
//! record), an input it could not read (`e`), or no record at all makes the observation
//! incomplete: nothing is stored.

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};

use ferry_observe::{Origin, Record};

use crate::rustc::recipe::InputList;

/// Variables rustc itself looks up whose value cannot reach what it writes, so its own lookups of
/// them are not keyed (a proc-macro's lookup of the same name is):
/// - `PATH`: rustc searches it for the linker; the program found is keyed by content.
/// - `TMPDIR`, `TMP`, `TEMP`: where rustc puts temporary files, removed before it exits.
/// - `TERM`: terminal colours, used only when stderr is a terminal; a wrapped rustc writes to a pipe.
/// - `CI`: rustc reads it to decide where an internal compiler error's report goes; an ICE
///   (exit 101) is never stored.
/// - `RUST_BACKTRACE`, `RUST_LIB_BACKTRACE`, `RUSTC_ICE`, `RUSTC_CTFE_BACKTRACE`,
///   `RUSTC_GRAPHVIZ_FONT`, `RUSTC_LOG*`: debugging output of rustc itself (backtraces of a
///   crash, logs, graphs written on request), never part of a successful compile's output.
/// - `RUST_MIN_STACK`: the stack size of rustc's threads.
pub const COMPILER_OWN: &[&str] = &[
    "PATH",
    "TMPDIR",
    "TMP",
    "TEMP",
    "TERM",
    "CI",
    "RUST_BACKTRACE",
    "RUST_LIB_BACKTRACE",
    "RUSTC_ICE",
    "RUSTC_CTFE_BACKTRACE",
    "RUSTC_GRAPHVIZ_FONT",
    "RUST_MIN_STACK",
];

/// Prefixes of [`COMPILER_OWN`] names: rustc's logging switches.
pub const COMPILER_OWN_PREFIXES: &[&str] = &["RUSTC_LOG"];

/// Variables the compile's other processes (the linker driver, collect2, the linker) look up with
/// their own code whose value cannot reach an output:
/// - `PATH`: the programs found through it are keyed by content.
/// - `TMPDIR`, `TMP`, `TEMP`: temporary files, removed before they exit.
/// - `TERM`: colours, only for a terminal.
/// - `COLLECT_GCC`, `COLLECT_GCC_OPTIONS`, `COLLECT_LTO_WRAPPER`: set by the gcc driver for its
///   own children from its command line (which rustc built from the keyed arguments and names of
///   temporary files).
pub const SUBPROCESS_OWN: &[&str] =
    &["PATH", "TMPDIR", "TMP", "TEMP", "TERM", "COLLECT_GCC", "COLLECT_GCC_OPTIONS", "COLLECT_LTO_WRAPPER"];

/// cargo's jobserver: descriptors (or a FIFO) through which a process asks for job tokens. They
/// change how many threads run, never what they produce, and they differ from build to build.
pub const JOBSERVER: &[&str] = &["CARGO_MAKEFLAGS", "MAKEFLAGS", "MFLAGS"];

/// Directories whose contents are never inputs.
const NOT_INPUTS: &[&str] = &["/proc", "/dev", "/sys"];

/// The files a ToolchainId covers, as paths under the toolchain's root: `bin/rustc`, the shared
/// libraries at the top of `lib/`, `lib/rustlib/<target>/lib` for the host and each requested
/// target, and the host's `lib/rustlib/<host>/bin` and `codegen-backends` (the set
/// `ferry_toolchains::ToolchainSet` hashes).
#[derive(Debug, Clone, Copy)]
pub struct ToolchainFiles<'a> {
    pub root: &'a Path,
    pub host: &'a str,
    /// Requested targets besides the host.
    pub targets: &'a [String],
}

impl ToolchainFiles<'_> {
    /// Whether the ToolchainId covers `path` (as a process named it). A path with `..` is never
    /// covered: the kernel resolves a symbolic link before `..`, so where it lands cannot be told
    /// from its text. rust-src (`lib/rustlib/src`, `lib/rustlib/rustc-src`) is treated as covered
    /// although the ToolchainId leaves it out: rustc looks for it only to quote the standard
    /// library's source in a diagnostic (text on stderr, never compiled bytes), and developers
    /// install it (rust-analyzer needs it) where CI machines and workers do not, so keying it
    /// would split every team's entries and make every remote job differ from its client.
    pub fn covers(&self, path: &Path) -> bool {
        self.covers_as(path, false)
    }

    /// [`ToolchainFiles::covers`] for a directory's listing: only a directory whose every entry
    /// is in the set (`lib/rustlib/<target>/lib` and below, the host's `bin`...) is covered; the
    /// set's ancestors (`lib`, `lib/rustlib`) may hold other things.
    pub fn covers_listing(&self, path: &Path) -> bool {
        self.covers_as(path, true)
    }

    fn covers_as(&self, path: &Path, listing: bool) -> bool {
        let Ok(rel) = path.strip_prefix(self.root) else { return false };
        if rel.components().any(|c| matches!(c, Component::ParentDir)) {
            return false;
        }
        let Some(rel) = rel.to_str() else { return false };
        let parts: Vec<&str> = rel.split('/').filter(|p| !p.is_empty() && *p != ".").collect();
        let ours = |target: &str| target == self.host || self.targets.iter().any(|t| t == target);
        match parts.as_slice() {
            // Directories that hold the set: there whenever the set is.
            [] | ["bin"] | ["lib"] | ["lib", "rustlib"] => !listing,
            ["lib", "rustlib", target] => !listing && ours(target),
            ["bin", "rustc"] => true,
            ["lib", name] => name.contains(".so"),
            ["lib", "rustlib", "src" | "rustc-src", ..] => true,
            ["lib", "rustlib", target, "lib", ..] => ours(target),
            ["lib", "rustlib", host, "bin" | "codegen-backends", ..] => *host == self.host,
            _ => false,
        }
    }
}

/// What a compile's records are judged against.
#[derive(Debug, Clone)]
pub struct Scope<'a> {
    /// The files the ToolchainId covers (not keyed again); None for a C-family compiler, whose
    /// every file read is keyed by content (its pre-key holds only the driver's digest).
    pub toolchain: Option<ToolchainFiles<'a>>,
    /// The compile's declared outputs, absolute.
    pub outputs: Vec<PathBuf>,
    /// Crate-search directories (`-L`), absolute: not keyed as listings.
    pub search_dirs: Vec<PathBuf>,
    /// The observer's own files (its log, the interposer).
    pub own_files: Vec<PathBuf>,
    /// The variables rustc reported reading (its dep-info's `# env-dep:` lines), keyed whatever
    /// their name; None when the compile wrote no dep-info (a failed compile): then every lookup
    /// rustc itself made is keyed.
    pub tracked_env: Option<Vec<String>>,
    /// What a locale other than the built-in `C` reads inside glibc, where the observer cannot
    /// see (`! locale-data setlocale`): with None such a compile is incomplete; with Some, those
    /// inputs are keyed instead (a C compiler sets the locale from the environment; see
    /// [`LocaleInputs`]).
    pub locale: Option<LocaleInputs>,
}

/// The inputs of `setlocale(…, "")` beyond the locale variables (which the observer records as
/// looked up): the locale data files (`locale-archive`, or a locale's directory under
/// `/usr/lib/locale` or `LOCPATH`) and message catalogs (`<dir>/<language>/LC_MESSAGES`), each
/// by content, the directories searched by their listing or absence, and the variables glibc
/// reads for them (`LOCPATH`, `LANGUAGE`, `NLSPATH`). Gathered by the caller from its machine.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocaleInputs {
    pub files: Vec<PathBuf>,
    pub listings: Vec<PathBuf>,
    pub absent: Vec<PathBuf>,
}

/// The variables glibc's locale and message-catalog code reads besides `LC_*` and `LANG`.
pub const LOCALE_VARIABLES: &[&str] = &["LOCPATH", "LANGUAGE", "NLSPATH"];

/// A compile's manifest, and what it wrote outside its declared outputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    pub list: InputList,
    /// Paths the compile created or wrote that are not declared outputs nor directories holding
    /// one (nor under `/dev`, `/proc`, `/sys`), in the order first written. One still there after the compile is a side
    /// effect a replay would not repeat: the caller does not store such a result.
    pub wrote: Vec<PathBuf>,
}

/// Why an observation cannot describe the compile: nothing is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incomplete {
    /// A short reason, counted in `ferry stats` (e.g. `static-executable`).
    pub reason: String,
    /// The path or name concerned.
    pub detail: String,
}

impl std::fmt::Display for Incomplete {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason, self.detail)
    }
}

/// Is a lookup of this variable by this origin keyed? (Names rustc reports reading are keyed
/// whatever this says.)
pub fn keyed_lookup(name: &str, by: Origin) -> bool {
    if never_keyed(name) {
        return false;
    }
    match by {
        Origin::Compiler => !COMPILER_OWN.contains(&name) && !COMPILER_OWN_PREFIXES.iter().any(|p| name.starts_with(p)),
        Origin::Subprocess => !SUBPROCESS_OWN.contains(&name),
        Origin::Plugin => true,
    }
}

/// Variables no lookup keys: the observer's own, and the jobserver's.
pub fn never_keyed(name: &str) -> bool {
    name == "LD_PRELOAD" || name.starts_with("FERRY_OBSERVE_") || JOBSERVER.contains(&name)
}

/// Does this variable (by its name) or its value hold a secret? Secrets are keyed only as a
/// digest, never shipped to a worker and never logged.
pub fn is_secret(name: &str, value: &[u8]) -> bool {
    let upper = name.to_ascii_uppercase();
    let named = ["TOKEN", "PASSWORD", "PASSWD", "SECRET", "CREDENTIAL", "API_KEY", "PRIVATE_KEY"]
        .iter()
        .any(|w| upper.contains(w));
    // Credentials in a URL: scheme://user:password@host
    let text = String::from_utf8_lossy(value);
    let in_url = text.find("://").is_some_and(|i| {
        let rest = &text[i + 3..];
        let authority = rest.split('/').next().unwrap_or_default();
        authority.contains('@') && authority.split('@').next().is_some_and(|u| u.contains(':'))
    });
    named || in_url
}

/// The manifest of one compile from its records (in the order they were written). Err when the
/// observation is incomplete.
pub fn input_list(records: &[Record], scope: &Scope) -> Result<Observation, Incomplete> {
    let incomplete = |reason: &str, detail: &Path| {
        Err(Incomplete { reason: reason.to_owned(), detail: detail.display().to_string() })
    };
    if !records.iter().any(|r| matches!(r, Record::Exe { .. })) {
        return incomplete("observer-not-loaded", Path::new("no process of the compile wrote to the log"));
    }
    let started: BTreeSet<&Path> = records
        .iter()
        .filter_map(|r| match r {
            Record::Exec { resolved, .. } => Some(resolved.as_path()),
            _ => None,
        })
        .collect();
    let mut own = Own { scope, created: BTreeSet::new(), made: Vec::new() };
    let mut sets = Sets::default();
    let mut wrote: Vec<PathBuf> = Vec::new();
    // (Called for what is not `own`: outputs and `NOT_INPUTS` are never noted.) A directory that
    // holds an output is there whenever the compile succeeds: not a side effect either.
    let note_write = |p: &Path, wrote: &mut Vec<PathBuf>| {
        if !scope.outputs.iter().any(|o| o.starts_with(p)) && !wrote.iter().any(|w| w == p) {
            wrote.push(p.to_owned());
        }
    };
    for r in records {
        match r {
            Record::Wrote(p) => {
                if !own.is(p) {
                    note_write(p, &mut wrote);
                }
                own.created.insert(p);
            }
            Record::MadeDir(p) => {
                if !own.is(p) {
                    note_write(p, &mut wrote);
                }
                own.made.push(p);
            }
            Record::Updated(p) if !own.is(p) => {
                note_write(p, &mut wrote);
                sets.files.insert(text(p)?);
            }
            Record::Read(p) | Record::Mapped(p) if !own.is(p) => {
                sets.files.insert(text(p)?);
            }
            Record::Exe { path: p, .. } if !own.is(p) && !started.contains(p.as_path()) => {
                sets.files.insert(text(p)?);
            }
            // The directories that hold the outputs are there whenever the compile succeeds.
            Record::Present(p) if !own.is(p) && !scope.outputs.iter().any(|o| o != p && o.starts_with(p)) => {
                sets.present.insert(text(p)?);
            }
            Record::Absent(p) if !own.is(p) => {
                sets.absent.insert(text(p)?);
            }
            Record::Link(p) if !own.is(p) => {
                sets.links.insert(text(p)?);
            }
            Record::Listed(p) if !own.is_listing(p) && !scope.search_dirs.iter().any(|d| d == p) => {
                sets.listings.insert(text(p)?);
            }
            Record::Exec { name, resolved, .. } if !own.is(resolved) => {
                let name = name.to_str().ok_or_else(|| non_utf8(resolved))?;
                let as_named = if name.contains('/') { text(resolved)? } else { name.to_owned() };
                sets.programs.insert(as_named);
            }
            Record::Env { name, by } => {
                let Some(name) = name.to_str() else {
                    return incomplete("non-utf8-variable-name", Path::new(name));
                };
                // The names dep-info lists are keyed after the loop; without dep-info, rustc's
                // own lookups cannot be told from `env!`'s.
                let untracked_compiler = scope.tracked_env.is_none() && *by == Origin::Compiler && !never_keyed(name);
                if untracked_compiler || keyed_lookup(name, *by) {
                    sets.env.insert(name.to_owned());
                }
            }
            Record::WholeEnvironment(_) => sets.whole_environment = true,
            Record::Failed(p) if !own.is(p) => return incomplete("unreadable-input", p),
            Record::Incomplete { reason, detail } if reason == "locale-data" && detail == "setlocale" => {
                let Some(locale) = &scope.locale else { return incomplete(reason, Path::new(detail)) };
                for f in &locale.files {
                    sets.files.insert(text(f)?);
                }
                for d in &locale.listings {
                    sets.listings.insert(text(d)?);
                }
                for a in &locale.absent {
                    sets.absent.insert(text(a)?);
                }
                sets.env.extend(LOCALE_VARIABLES.iter().map(|v| (*v).to_owned()));
            }
            Record::Incomplete { reason, detail } => return incomplete(reason, Path::new(detail)),
            _ => {}
        }
    }
    // A program the compile started that never wrote to the log (it could not open it: a path
    // it cannot reach, a loader that did not preload the observer) read what nobody knows.
    if let Some(why) = ferry_observe::unaccounted(records) {
        return incomplete("unobserved-child", Path::new(&why));
    }
    // Every variable dep-info lists (`env!`, `option_env!`, `tracked_env`) is keyed whatever its
    // name, but for the ones ferry itself sets or changes.
    for name in scope.tracked_env.iter().flatten() {
        if !never_keyed(name) {
            sets.env.insert(name.clone());
        }
    }
    // A path read for its content needs no separate existence check.
    let Sets { files, mut present, absent, links, listings, programs, env, whole_environment } = sets;
    present.retain(|p| !files.contains(p) && !links.contains(p));
    let list = InputList {
        files: files.into_iter().collect(),
        present: present.into_iter().collect(),
        absent: absent.into_iter().collect(),
        links: links.into_iter().collect(),
        listings: listings.into_iter().collect(),
        programs: programs.into_iter().collect(),
        env: env.into_iter().collect(),
        env_verbatim: Vec::new(),
        whole_environment,
        verbatim_bases: Vec::new(),
    };
    Ok(Observation { list, wrote })
}

/// What belongs to the compile itself at this point of its records.
struct Own<'a, 's> {
    scope: &'a Scope<'s>,
    /// Files it created or overwrote so far.
    created: BTreeSet<&'a Path>,
    /// Directories it created so far.
    made: Vec<&'a Path>,
}

impl Own<'_, '_> {
    fn is(&self, p: &Path) -> bool {
        self.scope.toolchain.is_some_and(|t| t.covers(p)) || self.not_toolchain(p)
    }

    fn is_listing(&self, p: &Path) -> bool {
        self.scope.toolchain.is_some_and(|t| t.covers_listing(p)) || self.not_toolchain(p)
    }

    fn not_toolchain(&self, p: &Path) -> bool {
        NOT_INPUTS.iter().any(|d| p.starts_with(d))
            || self.scope.own_files.iter().any(|f| f == p)
            || self.scope.outputs.iter().any(|o| o == p)
            || self.created.contains(p)
            || self.made.iter().any(|d| p.starts_with(d))
    }
}

#[derive(Default)]
struct Sets {
    files: BTreeSet<String>,
    present: BTreeSet<String>,
    absent: BTreeSet<String>,
    links: BTreeSet<String>,
    listings: BTreeSet<String>,
    programs: BTreeSet<String>,
    env: BTreeSet<String>,
    whole_environment: bool,
}

fn text(p: &Path) -> Result<String, Incomplete> {
    p.to_str().map(str::to_owned).ok_or_else(|| non_utf8(p))
}

fn non_utf8(p: &Path) -> Incomplete {
    Incomplete { reason: "non-utf8-path".into(), detail: p.display().to_string() }
}

#[cfg(test)]
mod tests {
    use expect_test::{Expect, expect};

    use super::*;

    const TARGETS: &[String] = &[];

    fn scope(tracked: Option<&[&str]>) -> Scope<'static> {
        Scope {
            toolchain: Some(ToolchainFiles {
                root: Path::new("/tc"),
                host: "x86_64-unknown-linux-gnu",
                targets: TARGETS,
            }),
            outputs: vec!["/p/out/liba.rlib".into(), "/p/out/a.d".into()],
            search_dirs: vec!["/p/out".into()],
            own_files: vec!["/cache/observe/log".into()],
            tracked_env: tracked.map(|t| t.iter().map(|s| s.to_string()).collect()),
            locale: None,
        }
    }

    fn check_with(log: &[Record], scope: &Scope, expect: Expect) {
        let actual = match input_list(log, scope) {
            Ok(o) => {
                let mut text = serde_json::to_string_pretty(&o.list).unwrap();
                if !o.wrote.is_empty() {
                    text.push_str(&format!("\nwrote: {:?}", o.wrote));
                }
                text
            }
            Err(e) => format!("incomplete: {e}"),
        };
        expect.assert_eq(&actual);
    }

    fn check(log: &[Record], expect: Expect) {
        check_with(log, &scope(Some(&[])), expect)
    }

    fn r(path: &str) -> Record {
        Record::Read(path.into())
    }

    fn env(name: &str, by: Origin) -> Record {
        Record::Env { name: name.into(), by }
    }

    #[test]
    fn what_counts_as_an_input() {
        use Record::*;
        check(
            &[
                Exe { path: "/tc/bin/rustc".into(), pid: 1 },
                r("/tc/lib/librustc_driver.so"),
                r("/proc/self/statm"),
                r("/p/src/lib.rs"),
                Present("/p/src/m.rs".into()),
                r("/p/src/m.rs"),
                Absent("/p/src/m/mod.rs".into()),
                Listed("/p/out".into()),
                r("/p/out/libdep-1.rmeta"),
                Listed("/p/assets".into()),
                MadeDir("/p/out/rustcXYZ".into()),
                r("/p/out/rustcXYZ/symbols.o"),
                Wrote("/p/out/a.d".into()),
                Absent("/p/out/a.d".into()),
                Absent("/p/out/liba.rlib".into()),
                env("CARGO_PKG_NAME", Origin::Compiler),
                Exec { name: "cc".into(), resolved: "/usr/bin/cc".into(), pid: 2, spawned: true },
                Exe { path: "/usr/bin/x86_64-linux-gnu-gcc-12".into(), pid: 2 },
                Exec {
                    name: "/tc/lib/rustlib/x86_64-unknown-linux-gnu/bin/rust-lld".into(),
                    resolved: "/tc/lib/rustlib/x86_64-unknown-linux-gnu/bin/rust-lld".into(),
                    pid: 2,
                    spawned: false,
                },
                Exe { path: "/tc/lib/rustlib/x86_64-unknown-linux-gnu/bin/rust-lld".into(), pid: 2 },
                Mapped("/usr/lib/libc.so.6".into()),
                r("/usr/lib/gcc/x86_64-linux-gnu/12/crtbeginS.o"),
                r("/cache/observe/log"),
            ],
            expect![[r#"
                {
                  "files": [
                    "/p/out/libdep-1.rmeta",
                    "/p/src/lib.rs",
                    "/p/src/m.rs",
                    "/usr/bin/x86_64-linux-gnu-gcc-12",
                    "/usr/lib/gcc/x86_64-linux-gnu/12/crtbeginS.o",
                    "/usr/lib/libc.so.6"
                  ],
                  "present": [],
                  "absent": [
                    "/p/src/m/mod.rs"
                  ],
                  "links": [],
                  "listings": [
                    "/p/assets"
                  ],
                  "programs": [
                    "cc"
                  ],
                  "env": [
                    "CARGO_PKG_NAME"
                  ]
                }
                wrote: ["/p/out/rustcXYZ"]"#]],
        );
    }

    #[test]
    fn only_what_the_toolchain_id_covers_is_left_out_as_toolchain() {
        use Record::*;
        check(
            &[
                Exe { path: "/tc/bin/rustc".into(), pid: 1 },
                r("/tc/bin/rustc"),
                r("/tc/lib/librustc_driver-1.so"),
                r("/tc/lib/rustlib/x86_64-unknown-linux-gnu/lib/libstd-1.rlib"),
                Absent("/tc/lib/rustlib/x86_64-unknown-linux-gnu/bin/gcc-ld/cc".into()),
                Absent("/tc/lib/rustlib/src/rust/library/std/src/lib.rs".into()),
                // Not in the ToolchainId: another target's libraries, docs, cargo, files a
                // proc-macro reads there, a path through `..`.
                r("/tc/lib/rustlib/wasm32-unknown-unknown/lib/libcore-1.rlib"),
                r("/tc/share/doc/rust/README.md"),
                Present("/tc/bin/cargo".into()),
                Present("/tc/lib/rustlib/x86_64-unknown-linux-gnu".into()),
                Listed("/tc/lib/rustlib/x86_64-unknown-linux-gnu/lib".into()),
                Listed("/tc/lib/rustlib".into()),
                r("/tc/lib/rustlib/x86_64-unknown-linux-gnu/lib/../../etc/data.txt"),
                r("/tc/lib/rustlib/x86_64-unknown-linux-gnu/lib/self-contained/../../../../../home/secret"),
            ],
            expect![[r#"
                {
                  "files": [
                    "/tc/lib/rustlib/wasm32-unknown-unknown/lib/libcore-1.rlib",
                    "/tc/lib/rustlib/x86_64-unknown-linux-gnu/lib/../../etc/data.txt",
                    "/tc/lib/rustlib/x86_64-unknown-linux-gnu/lib/self-contained/../../../../../home/secret",
                    "/tc/share/doc/rust/README.md"
                  ],
                  "present": [
                    "/tc/bin/cargo"
                  ],
                  "absent": [],
                  "links": [],
                  "listings": [
                    "/tc/lib/rustlib"
                  ],
                  "programs": [],
                  "env": []
                }"#]],
        );
    }

    #[test]
    fn a_file_read_before_the_compile_writes_it_is_an_input_and_what_it_created_is_not() {
        use Record::*;
        check(
            &[
                Exe { path: "/tc/bin/rustc".into(), pid: 1 },
                // Read, then rewritten: an input (and, changed, unstorable: the caller checks).
                r("/p/config.json"),
                Wrote("/p/config.json".into()),
                // Opened for update: an input, and written.
                Updated("/p/db.sqlite".into()),
                // Created, then read back: the compile's own.
                Absent("/p/gen/out.txt".into()),
                MadeDir("/p/gen".into()),
                Wrote("/p/gen/out.txt".into()),
                r("/p/gen/out.txt"),
                Wrote("/tmp/cc1.o".into()),
                r("/tmp/cc1.o"),
                Wrote("/dev/null".into()),
                Wrote("/p/out/liba.rlib".into()),
            ],
            expect![[r#"
                {
                  "files": [
                    "/p/config.json",
                    "/p/db.sqlite"
                  ],
                  "present": [],
                  "absent": [
                    "/p/gen/out.txt"
                  ],
                  "links": [],
                  "listings": [],
                  "programs": [],
                  "env": []
                }
                wrote: ["/p/config.json", "/p/db.sqlite", "/p/gen", "/tmp/cc1.o"]"#]],
        );
    }

    #[test]
    fn a_started_program_that_never_wrote_to_the_log_makes_it_incomplete() {
        let rustc = Record::Exe { path: "/tc/bin/rustc".into(), pid: 1 };
        let cc = Record::Exec { name: "cc".into(), resolved: "/usr/bin/cc".into(), pid: 2, spawned: true };
        let err = input_list(&[rustc.clone(), cc.clone()], &scope(Some(&[]))).unwrap_err();
        assert_eq!(err.reason, "unobserved-child");
        assert!(err.detail.starts_with("/usr/bin/cc (pid 2)"), "{}", err.detail);
        let answered = Record::Exe { path: "/usr/bin/cc".into(), pid: 2 };
        assert!(input_list(&[rustc, cc, answered], &scope(Some(&[]))).is_ok());
    }

    #[test]
    fn variables_are_keyed_by_who_looked_them_up() {
        use Origin::*;
        let log = [
            Record::Exe { path: "/tc/bin/rustc".into(), pid: 1 },
            // rustc's own lookups of names shown not to reach outputs: not keyed...
            env("CI", Compiler),
            env("TMPDIR", Compiler),
            env("RUSTC_LOG_COLOR", Compiler),
            // ...unless rustc reports reading them for the crate (option_env!("HOME") here).
            env("HOME", Compiler),
            env("RUSTC_BOOTSTRAP", Compiler),
            // A proc-macro's lookups: keyed whatever the name.
            env("TERM", Plugin),
            env("PATH", Plugin),
            env("CARGO_HTTP_TIMEOUT", Plugin),
            // The linker driver's own.
            env("COLLECT_GCC_OPTIONS", Subprocess),
            env("GCC_EXEC_PREFIX", Subprocess),
            env("TMPDIR", Subprocess),
            // Never: the observer's, the jobserver's.
            env("LD_PRELOAD", Plugin),
            env("CARGO_MAKEFLAGS", Plugin),
        ];
        check_with(
            &log,
            &scope(Some(&["HOME", "CI_LIKE_UNSEEN"])),
            expect![[r#"
                {
                  "files": [],
                  "present": [],
                  "absent": [],
                  "links": [],
                  "listings": [],
                  "programs": [],
                  "env": [
                    "CARGO_HTTP_TIMEOUT",
                    "CI_LIKE_UNSEEN",
                    "GCC_EXEC_PREFIX",
                    "HOME",
                    "PATH",
                    "RUSTC_BOOTSTRAP",
                    "TERM"
                  ]
                }"#]],
        );
        // Without dep-info (a failed compile) every lookup rustc made is keyed.
        check_with(
            &log[..6],
            &scope(None),
            expect![[r#"
                {
                  "files": [],
                  "present": [],
                  "absent": [],
                  "links": [],
                  "listings": [],
                  "programs": [],
                  "env": [
                    "CI",
                    "HOME",
                    "RUSTC_BOOTSTRAP",
                    "RUSTC_LOG_COLOR",
                    "TMPDIR"
                  ]
                }"#]],
        );
    }

    #[test]
    fn what_makes_an_observation_incomplete() {
        use Record::*;
        check(
            &[r("/p/src/lib.rs")],
            expect!["incomplete: observer-not-loaded: no process of the compile wrote to the log"],
        );
        let exe = Exe { path: "/tc/bin/rustc".into(), pid: 1 };
        check(
            &[exe.clone(), Incomplete { reason: "static-executable".into(), detail: "/opt/ld.static".into() }],
            expect!["incomplete: static-executable: /opt/ld.static"],
        );
        check(&[exe.clone(), Failed("/p/secret".into())], expect!["incomplete: unreadable-input: /p/secret"]);
        check(
            &[exe, Failed("/proc/1/mem".into())],
            expect![[r#"
            {
              "files": [],
              "present": [],
              "absent": [],
              "links": [],
              "listings": [],
              "programs": [],
              "env": []
            }"#]],
        );
    }

    #[test]
    fn secrets_are_recognised_by_name_and_by_url() {
        assert!(is_secret("CARGO_REGISTRY_TOKEN", b"x"));
        assert!(is_secret("DB_PASSWORD", b"x"));
        assert!(is_secret("MIRROR", b"https://me:hunter2@example.com/x"));
        assert!(!is_secret("MIRROR", b"https://example.com/a@b"));
        assert!(!is_secret("CARGO_PKG_NAME", b"serde"));
        assert!(!keyed_lookup("CARGO_MAKEFLAGS", Origin::Plugin) && !keyed_lookup("PATH", Origin::Compiler));
        assert!(keyed_lookup("PATH", Origin::Plugin) && keyed_lookup("SOURCE_DATE_EPOCH", Origin::Compiler));
    }
}
