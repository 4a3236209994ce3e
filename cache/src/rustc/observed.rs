//! From what a compile observed ([`ferry_observe::Record`]s) to its manifest ([`InputList`]):
//! which observations are inputs of the cache key, and how each is keyed. The wrapper and the
//! workers both use this, so a worker publishes under exactly the key a client looks up.
//!
//! The rules (each one comes from DESIGN.md's "Observed inputs"):
//! - Inputs under the toolchain root are covered by the ToolchainId; `/proc`, `/dev` and `/sys`
//!   are not inputs; nor is anything the compile wrote itself (its outputs, files it created,
//!   renamed to or linked, directories it created and everything under them), nor the observer's
//!   own files.
//! - A crate-search directory (`-L`) lists whatever cargo has built so far: its listing is not
//!   keyed, only the files the compile opened or looked for in it. Any other directory listing is
//!   keyed by its entry names (a proc-macro that embeds a directory).
//! - A program the compile started is keyed by content: by the name it was started under (a bare
//!   name is resolved in `PATH` again at lookup), not where it happened to live. An executable
//!   no exec record explains (a script's interpreter) is keyed by its path and content.
//! - Environment variables are keyed by value (or unset), except those that cannot reach an
//!   output ([`IGNORED_ENV`], [`IGNORED_ENV_PREFIXES`]).
//! - Anything the observer could not see (an `!` record), an input it could not read (`e`), or
//!   no record from the compile at all makes the observation incomplete: nothing is stored.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use ferry_observe::Record;

use crate::rustc::recipe::InputList;

/// Variables that are looked up but cannot change an output, so they are not keyed: the
/// observer's own, `PATH` (programs are keyed by what their name resolves to), temp and home
/// directories, terminal settings, cargo's own settings and jobserver, and rustc's and gcc's
/// logging and debugging switches.
pub const IGNORED_ENV: &[&str] = &[
    "LD_PRELOAD",
    "PATH",
    "HOME",
    "TMPDIR",
    "TMP",
    "TEMP",
    "TERM",
    "COLUMNS",
    "LINES",
    "NO_COLOR",
    "CLICOLOR",
    "CLICOLOR_FORCE",
    "CI",
    "RUST_BACKTRACE",
    "RUST_LIB_BACKTRACE",
    "RUST_MIN_STACK",
    "RUSTC_ICE",
    "RUSTC_GRAPHVIZ_FONT",
    "RUSTC_CTFE_BACKTRACE",
    "CARGO",
    "CARGO_HOME",
    "CARGO_MAKEFLAGS",
    "CARGO_BUILD_JOBS",
    "MAKEFLAGS",
    "MFLAGS",
    "MAKELEVEL",
    "COLLECT_GCC",
    "COLLECT_GCC_OPTIONS",
    "COLLECT_LTO_WRAPPER",
    "GCC_EXTRA_DIAGNOSTIC_OUTPUT",
];

/// Prefixes of variables that are never keyed (see [`IGNORED_ENV`]): the observer's own, rustc's
/// logging, and cargo's terminal, network and registry settings (which hold secrets).
pub const IGNORED_ENV_PREFIXES: &[&str] = &[
    "FERRY_OBSERVE_",
    "RUSTC_LOG",
    "CARGO_TERM_",
    "CARGO_HTTP_",
    "CARGO_NET_",
    "CARGO_REGISTRY_",
    "CARGO_REGISTRIES_",
];

/// Directories whose contents are never inputs.
const NOT_INPUTS: &[&str] = &["/proc", "/dev", "/sys"];

/// What a compile's records are judged against.
#[derive(Debug, Clone)]
pub struct Scope<'a> {
    /// The toolchain root (as the compile saw it): covered by the ToolchainId.
    pub toolchain_root: &'a Path,
    /// The compile's declared outputs, absolute.
    pub outputs: Vec<PathBuf>,
    /// Crate-search directories (`-L`), absolute: not keyed as listings.
    pub search_dirs: Vec<PathBuf>,
    /// The observer's own files (its log, the interposer).
    pub own_files: Vec<PathBuf>,
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

/// Is this variable keyed when a compile looks it up?
pub fn keyed_env(name: &str) -> bool {
    !IGNORED_ENV.contains(&name) && !IGNORED_ENV_PREFIXES.iter().any(|p| name.starts_with(p))
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

/// The manifest of one compile from its records. Err when the observation is incomplete.
pub fn input_list(records: &[Record], scope: &Scope) -> Result<InputList, Incomplete> {
    let incomplete = |reason: &str, detail: &Path| {
        Err(Incomplete { reason: reason.to_owned(), detail: detail.display().to_string() })
    };
    if !records.iter().any(|r| matches!(r, Record::Exe(_))) {
        return incomplete("observer-not-loaded", Path::new("no process of the compile wrote to the log"));
    }
    let mut written: BTreeSet<&Path> = scope.outputs.iter().map(PathBuf::as_path).collect();
    let mut made: Vec<&Path> = Vec::new();
    let mut started: BTreeSet<&Path> = BTreeSet::new();
    for r in records {
        match r {
            Record::Wrote(p) => {
                written.insert(p);
            }
            Record::MadeDir(p) => made.push(p),
            Record::Exec { resolved, .. } => {
                started.insert(resolved);
            }
            _ => {}
        }
    }
    let outside = |p: &Path| {
        p.starts_with(scope.toolchain_root)
            || NOT_INPUTS.iter().any(|d| p.starts_with(d))
            || scope.own_files.iter().any(|f| f == p)
            || written.contains(p)
            || made.iter().any(|d| p.starts_with(d))
    };
    let mut sets = Sets::default();
    for r in records {
        match r {
            Record::Read(p) | Record::Mapped(p) if !outside(p) => sets.files.insert(text(p)?),
            Record::Exe(p) if !outside(p) && !started.contains(p.as_path()) => sets.files.insert(text(p)?),
            Record::Present(p) if !outside(p) => sets.present.insert(text(p)?),
            Record::Absent(p) if !outside(p) => sets.absent.insert(text(p)?),
            Record::Link(p) if !outside(p) => sets.links.insert(text(p)?),
            Record::Listed(p) if !outside(p) && !scope.search_dirs.iter().any(|d| d == p) => {
                sets.listings.insert(text(p)?)
            }
            Record::Exec { name, resolved } if !outside(resolved) => {
                let name = name.to_str().ok_or_else(|| non_utf8(resolved))?;
                let as_named = if name.contains('/') { text(resolved)? } else { name.to_owned() };
                sets.programs.insert(as_named)
            }
            Record::Env(name) => match name.to_str() {
                Some(name) if keyed_env(name) => sets.env.insert(name.to_owned()),
                Some(_) => false,
                None => return incomplete("non-utf8-variable-name", Path::new(name)),
            },
            Record::Failed(p) if !outside(p) => return incomplete("unreadable-input", p),
            Record::Incomplete { reason, detail } => return incomplete(reason, Path::new(detail)),
            _ => false,
        };
    }
    // A path read for its content needs no separate existence check.
    let Sets { files, mut present, absent, links, listings, programs, env } = sets;
    present.retain(|p| !files.contains(p) && !links.contains(p));
    Ok(InputList {
        files: files.into_iter().collect(),
        present: present.into_iter().collect(),
        absent: absent.into_iter().collect(),
        links: links.into_iter().collect(),
        listings: listings.into_iter().collect(),
        programs: programs.into_iter().collect(),
        env: env.into_iter().collect(),
        env_verbatim: Vec::new(),
    })
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

    fn check(log: &[Record], expect: Expect) {
        let scope = Scope {
            toolchain_root: Path::new("/tc"),
            outputs: vec!["/p/out/liba.rlib".into()],
            search_dirs: vec!["/p/out".into()],
            own_files: vec!["/cache/observe/log".into()],
        };
        let actual = match input_list(log, &scope) {
            Ok(list) => serde_json::to_string_pretty(&list).unwrap(),
            Err(e) => format!("incomplete: {e}"),
        };
        expect.assert_eq(&actual);
    }

    fn r(path: &str) -> Record {
        Record::Read(path.into())
    }

    #[test]
    fn what_counts_as_an_input() {
        use Record::*;
        check(
            &[
                Exe("/tc/bin/rustc".into()),
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
                Env("CARGO_PKG_NAME".into()),
                Env("CARGO_TERM_COLOR".into()),
                Env("RUST_MIN_STACK".into()),
                Env("CARGO_REGISTRY_TOKEN".into()),
                Exec { name: "cc".into(), resolved: "/usr/bin/cc".into() },
                Exe("/usr/bin/x86_64-linux-gnu-gcc-12".into()),
                Exec {
                    name: "/tc/lib/rustlib/x/bin/rust-lld".into(),
                    resolved: "/tc/lib/rustlib/x/bin/rust-lld".into(),
                },
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
        let exe = Exe("/tc/bin/rustc".into());
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
        assert!(!keyed_env("CARGO_HTTP_TIMEOUT") && !keyed_env("CARGO_TERM_COLOR") && !keyed_env("PATH"));
        assert!(keyed_env("CARGO_PKG_NAME") && keyed_env("SOURCE_DATE_EPOCH") && keyed_env("RUSTC_BOOTSTRAP"));
    }
}
