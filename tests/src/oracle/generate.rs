//! What the oracle generates: a small cargo workspace made of *features* — each a crate (and its
//! proc-macro) of a kind users of other caches were served stale results by — and the steps
//! between its builds: edits of every kind of file a compile, a proc-macro or a build script
//! reads, variables (including every name on one of ferry's lists), symbolic links, renames,
//! modes, same-size edits with the mtime put back, rebuilt libraries, and the environment's odd
//! corners (a clean, another checkout, another toolchain, odd cache mounts, the exec limit, an edit
//! while a build runs, two builds at once).
//!
//! Paths in steps are relative to the checkout, or absolute; values may hold placeholders the
//! runner fills in (`{work}`, `{path}`, `{cargo_home}`).

use std::collections::BTreeMap;

/// A small, seeded generator (splitmix64): the same seed gives the same sequence everywhere.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// One change to the world, or a build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Writes a file (making its directory); with `keep_mtime` its modification time is put back
    /// afterwards (a same-size edit cargo and mtime-based caches cannot see).
    Write {
        path: String,
        content: String,
        keep_mtime: bool,
    },
    Chmod {
        path: String,
        executable: bool,
    },
    Remove {
        path: String,
    },
    /// Creates or retargets a symbolic link.
    Link {
        path: String,
        target: String,
    },
    Rename {
        from: String,
        to: String,
    },
    /// Bumps a file's mtime (cargo then recompiles its crate: a lookup in ferry).
    Touch {
        path: String,
    },
    /// `cc -shared -fPIC -o OUTPUT SOURCE`: a library a proc-macro loads with `dlopen`.
    Cc {
        source: String,
        output: String,
    },
    SetEnv {
        name: String,
        value: Option<String>,
    },
    /// `RUSTUP_TOOLCHAIN` for both builds from now on (None: the default toolchain).
    Toolchain(Option<String>),
    /// Removes both builds' target directories: everything compiles again (hits, for ferry).
    Clean,
    /// Moves the checkout to the other place; ferry builds use `FERRY_BASEDIRS` from now on.
    Relocate,
    /// How ferry's cache directory is mounted from now on (root only).
    Mount(Mount),
    /// Fills the environment to this many bytes below the system's exec limit (None: removes it).
    ExecLimit(Option<usize>),
    /// A ferry build during which a file is rewritten after `delay_ms`: its results are not
    /// compared (the tree changed under it); the next build's are.
    EditDuringBuild {
        path: String,
        content: String,
        delay_ms: u64,
    },
    /// Builds plainly and through ferry and compares everything; with `twice`, a second ferry
    /// build of a copy of the checkout runs at the same time against the same cache.
    Build {
        twice: bool,
    },
}

/// A mount of the cache directory (a tmpfs of the oracle's own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mount {
    Normal,
    Noexec,
    ReadOnly,
    Full,
}

/// A kind of input, as one crate (`f<i>`) and, where it needs one, a proc-macro (`m<i>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Feature {
    /// `option_env!(VAR)` in a library (rustc lists it in dep-info; cargo rebuilds on change).
    EnvMacro { var: String },
    /// A proc-macro reads a variable with `std::env::var` (cargo does not track it).
    MacroEnv { var: String },
    /// A proc-macro reads a file: plainly, opened read-write (an SQLite database), through
    /// `link/../` where `link` is a symbolic link, or through a linked file.
    MacroFile { how: FileHow },
    /// A proc-macro decides from `stat`: a file's size, its executable bit, its existence.
    MacroStat { what: StatWhat },
    /// A proc-macro lists a directory.
    MacroListing,
    /// A proc-macro loads a library with `dlopen` and calls it.
    MacroDlopen,
    /// `#[path = "../common.rs"]` inside a module that lives in a linked directory.
    PathModule,
    /// `include_str!` of a data file.
    Include,
    /// A build script reads a file and a variable and generates code.
    BuildScript { var: String },
    /// A build script compiles C into a static library the crate links.
    NativeC,
    /// A proc-macro writes a file beside the workspace while it expands.
    SideEffect,
    /// A proc-macro runs a shell that reads a variable from its environment and a file.
    MacroChild { var: String },
    /// A proc-macro reads a file under the toolchain's directory that the ToolchainId does not
    /// cover (`<sysroot>/share/...`).
    ToolchainFile,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileHow {
    Plain,
    Update,
    DotDot,
    Linked,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatWhat {
    Len,
    Executable,
    Exists,
}

/// Variables a generated crate reads: every name on one of ferry's lists, and others.
pub const VARIABLES: &[&str] = &[
    "CI",
    "HOME",
    "TERM",
    "TMPDIR",
    "PATH",
    "RUST_BACKTRACE",
    "RUST_MIN_STACK",
    "COLUMNS",
    "NO_COLOR",
    "LANG",
    "CARGO_HOME",
    "CARGO_BUILD_JOBS",
    "CARGO_TERM_COLOR",
    "CARGO_HTTP_TIMEOUT",
    "CARGO_REGISTRY_TOKEN",
    "COLLECT_GCC",
    "RUSTC_LOG",
    "ORACLE_A",
    "ORACLE_B",
];

/// The values a variable takes (None: unset). Values that name directories name ones the runner
/// creates; `PATH` and `CARGO_HOME` stay usable by cargo itself.
pub fn values(var: &str) -> Vec<Option<String>> {
    let some = |v: &[&str]| v.iter().map(|s| Some((*s).to_owned())).collect::<Vec<_>>();
    match var {
        "HOME" => some(&["{work}/home-a", "{work}/home-b"]),
        "TMPDIR" => [vec![None], some(&["{work}/tmp-a", "{work}/tmp-b"])].concat(),
        "PATH" => some(&["{path}", "{work}/bin-a:{path}"]),
        "CARGO_HOME" => some(&["{cargo_home}", "{work}/cargo-home-b"]),
        "CARGO_BUILD_JOBS" => [vec![None], some(&["1", "2"])].concat(),
        "RUST_MIN_STACK" => [vec![None], some(&["8388608", "16777216"])].concat(),
        "RUST_BACKTRACE" => [vec![None], some(&["0", "1"])].concat(),
        "LANG" => [vec![None], some(&["C", "C.UTF-8"])].concat(),
        "CARGO_TERM_COLOR" => [vec![None], some(&["never", "always"])].concat(),
        "RUSTC_LOG" => [vec![None], some(&["off"])].concat(),
        "COLLECT_GCC" => [vec![None], some(&["cc"])].concat(),
        _ => [vec![None], some(&["one", "two", "three-3"])].concat(),
    }
}

/// A generated sequence: its features, the steps that create the workspace, then the steps
/// between builds.
#[derive(Debug, Clone)]
pub struct Sequence {
    pub features: Vec<Feature>,
    /// Sequence-wide settings: `FERRY_CACHE_FAILURES` for ferry's builds.
    pub cache_failures: bool,
    /// `FERRY_VERIFY=1` for ferry's builds: every hit is compiled again and compared; a mismatch
    /// it reports is a finding too (a wrong entry, or a verification that is wrong).
    pub verify: bool,
    /// ferry's builds use a scheduler and a worker (libraries compile remotely, results go to
    /// the shared tier).
    pub cluster: bool,
    pub setup: Vec<Step>,
    pub steps: Vec<Step>,
}

/// What the generator may use on this machine.
#[derive(Debug, Clone)]
pub struct Abilities {
    /// Mounts (the cache directory on odd mounts) need root.
    pub root: bool,
    /// Another installed toolchain to switch to (`nightly`), if any.
    pub other_toolchain: Option<String>,
    /// The default toolchain's sysroot, for [`Feature::ToolchainFile`].
    pub sysroot: String,
    /// Unique per run: names the files placed under the sysroot.
    pub tag: String,
    /// A scheduler and worker run for the oracle.
    pub cluster: bool,
}

/// The files of the workspace as the generator tracks them (content, executable bit, or a link
/// target), with each file's earlier contents for reverting.
#[derive(Debug, Clone, Default)]
pub struct Model {
    pub files: BTreeMap<String, String>,
    pub links: BTreeMap<String, String>,
    pub history: BTreeMap<String, Vec<String>>,
    pub executable: BTreeMap<String, bool>,
    pub env: BTreeMap<String, Option<String>>,
}

impl Model {
    pub fn apply(&mut self, step: &Step) {
        match step {
            Step::Write { path, content, .. } => {
                if let Some(old) = self.files.insert(path.clone(), content.clone()) {
                    self.history.entry(path.clone()).or_default().push(old);
                }
                self.links.remove(path);
            }
            Step::Chmod { path, executable } => {
                self.executable.insert(path.clone(), *executable);
            }
            Step::Remove { path } => {
                self.files.remove(path);
                self.links.remove(path);
            }
            Step::Link { path, target } => {
                self.links.insert(path.clone(), target.clone());
                self.files.remove(path);
            }
            Step::Rename { from, to } => {
                if let Some(c) = self.files.remove(from) {
                    self.files.insert(to.clone(), c);
                }
                if let Some(t) = self.links.remove(from) {
                    self.links.insert(to.clone(), t);
                }
            }
            Step::SetEnv { name, value } => {
                self.env.insert(name.clone(), value.clone());
            }
            _ => {}
        }
    }
}

/// Generates one sequence of `rounds` builds.
pub fn sequence(rng: &mut Rng, rounds: usize, can: &Abilities) -> Sequence {
    let count = 2 + rng.below(4);
    let mut features = Vec::new();
    for _ in 0..count {
        features.push(feature(rng));
    }
    let setup = setup(&features, can);
    let mut model = Model::default();
    for s in &setup {
        model.apply(s);
    }
    let mut steps = Vec::new();
    let mut mounted = Mount::Normal;
    let mut exec_limited = false;
    let mut switched = false;
    for round in 0..rounds {
        let mut round_steps = Vec::new();
        // Odd corners, now and then.
        if round > 0 && rng.chance(15) {
            round_steps.push(Step::Clean);
        }
        if round > 0 && rng.chance(5) {
            round_steps.push(Step::Relocate);
        }
        if let Some(other) = &can.other_toolchain
            && round > 0
            && rng.chance(4)
        {
            switched = !switched;
            round_steps.push(Step::Toolchain(switched.then(|| other.clone())));
        }
        if can.root && round > 0 && rng.chance(10) {
            let next = *rng.pick(&[Mount::Normal, Mount::Noexec, Mount::ReadOnly, Mount::Full]);
            if next != mounted {
                mounted = next;
                round_steps.push(Step::Mount(next));
            }
        }
        if round > 0 && rng.chance(5) {
            exec_limited = !exec_limited;
            let room = *rng.pick(&[1 << 10, 2 << 10, 3 << 10, 4 << 10, 6 << 10, 8 << 10, 12 << 10]);
            round_steps.push(Step::ExecLimit(exec_limited.then_some(room)));
        }
        for _ in 0..1 + rng.below(3) {
            let i = rng.below(features.len());
            round_steps.extend(mutation(rng, i, &features[i], &model, can));
        }
        if rng.chance(40) {
            let i = rng.below(features.len());
            round_steps.push(Step::Touch { path: format!("f{i}/src/lib.rs") });
        }
        if rng.chance(25)
            && let Some(revert) = revert(rng, &model)
        {
            round_steps.push(revert);
        }
        if round > 0 && rng.chance(7) {
            let i = rng.below(features.len());
            let path = format!("f{i}/src/lib.rs");
            let content = format!("{}// edited while building {}\n", model.files[&path], rng.below(1000));
            round_steps.push(Step::EditDuringBuild { path, content, delay_ms: rng.below(400) as u64 });
        }
        round_steps.push(Step::Build { twice: rng.chance(10) });
        for s in &round_steps {
            model.apply(s);
        }
        steps.extend(round_steps);
    }
    let cluster = can.cluster && rng.chance(40);
    Sequence { features, cache_failures: rng.chance(30), verify: rng.chance(30), cluster, setup, steps }
}

fn feature(rng: &mut Rng) -> Feature {
    let var = |rng: &mut Rng| (*rng.pick(VARIABLES)).to_owned();
    match rng.below(13) {
        0 => Feature::EnvMacro { var: var(rng) },
        1 => Feature::MacroEnv { var: var(rng) },
        2 => {
            Feature::MacroFile { how: *rng.pick(&[FileHow::Plain, FileHow::Update, FileHow::DotDot, FileHow::Linked]) }
        }
        3 => Feature::MacroStat { what: *rng.pick(&[StatWhat::Len, StatWhat::Executable, StatWhat::Exists]) },
        4 => Feature::MacroListing,
        5 => Feature::MacroDlopen,
        6 => Feature::PathModule,
        7 => Feature::Include,
        8 => Feature::BuildScript { var: var(rng) },
        9 => Feature::NativeC,
        10 => Feature::SideEffect,
        11 => Feature::MacroChild { var: var(rng) },
        _ => Feature::ToolchainFile,
    }
}

fn write(path: impl Into<String>, content: impl Into<String>) -> Step {
    Step::Write { path: path.into(), content: content.into(), keep_mtime: false }
}

fn link(path: impl Into<String>, target: impl Into<String>) -> Step {
    Step::Link { path: path.into(), target: target.into() }
}

fn package(name: &str, extra: &str, deps: &[String]) -> String {
    let mut text = format!("[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2021\"\n{extra}\n");
    if !deps.is_empty() {
        text.push_str("[dependencies]\n");
        for d in deps {
            text.push_str(&format!("{d} = {{ path = \"../{d}\" }}\n"));
        }
    }
    text
}

/// The proc-macro crate `m<i>`, whose `value!()` expands to the string `body` computes (`dir()`
/// is the using crate's manifest directory).
fn proc_macro(i: usize, body: &str) -> Vec<Step> {
    let lib = format!(
        "use proc_macro::TokenStream;\n\
         #[allow(dead_code)]\nfn dir() -> std::path::PathBuf {{ std::env::var(\"CARGO_MANIFEST_DIR\").unwrap().into() }}\n\
         #[proc_macro]\npub fn value(_: TokenStream) -> TokenStream {{\n    let v: String = {body};\n    format!(\"{{:?}}\", v).parse().unwrap()\n}}\n"
    );
    vec![
        write(format!("m{i}/Cargo.toml"), package(&format!("m{i}"), "[lib]\nproc-macro = true", &[])),
        write(format!("m{i}/src/lib.rs"), lib),
    ]
}

/// The library `f<i>` that shows a proc-macro's value.
fn macro_user(i: usize) -> Vec<Step> {
    vec![
        write(format!("f{i}/Cargo.toml"), package(&format!("f{i}"), "", &[format!("m{i}")])),
        write(format!("f{i}/src/lib.rs"), format!("pub fn value() -> String {{ m{i}::value!().to_string() }}\n")),
    ]
}

fn lib(i: usize, extra: &str, body: &str) -> Vec<Step> {
    vec![
        write(format!("f{i}/Cargo.toml"), package(&format!("f{i}"), extra, &[])),
        write(format!("f{i}/src/lib.rs"), body),
    ]
}

/// The steps that create the workspace.
pub fn setup(features: &[Feature], can: &Abilities) -> Vec<Step> {
    let names: Vec<String> = (0..features.len()).map(|i| format!("f{i}")).collect();
    let mut members: Vec<String> = vec!["app".into()];
    let mut steps = Vec::new();
    for (i, f) in features.iter().enumerate() {
        members.push(format!("f{i}"));
        let uses_macro = !matches!(
            f,
            Feature::EnvMacro { .. }
                | Feature::PathModule
                | Feature::Include
                | Feature::BuildScript { .. }
                | Feature::NativeC
        );
        if uses_macro {
            members.push(format!("m{i}"));
        }
        steps.extend(feature_files(i, f, can));
    }
    let quoted: Vec<String> = members.iter().map(|m| format!("\"{m}\"")).collect();
    steps.insert(0, write("Cargo.toml", format!("[workspace]\nresolver = \"2\"\nmembers = [{}]\n", quoted.join(", "))));
    let mut main = String::from("fn main() {\n");
    for n in &names {
        main.push_str(&format!("    println!(\"{n}={{}}\", {n}::value());\n"));
    }
    main.push_str("}\n");
    steps.push(write("app/Cargo.toml", package("app", "", &names)));
    steps.push(write("app/src/main.rs", main));
    steps
}

fn feature_files(i: usize, f: &Feature, can: &Abilities) -> Vec<Step> {
    let unset = "unwrap_or_else(|_| \"unset\".into())";
    let mut s = Vec::new();
    match f {
        Feature::EnvMacro { var } => {
            s.extend(lib(
                i,
                "",
                &format!("pub fn value() -> String {{ format!(\"{{:?}}\", option_env!(\"{var}\")) }}\n"),
            ));
        }
        Feature::MacroEnv { var } => {
            s.extend(proc_macro(i, &format!("std::env::var(\"{var}\").{unset}")));
            s.extend(macro_user(i));
        }
        Feature::MacroFile { how } => {
            let read = "std::fs::read_to_string(&p).unwrap_or_else(|e| format!(\"error {:?}\", e.kind()))";
            let body = match how {
                FileHow::Plain | FileHow::Linked => format!("{{ let p = dir().join(\"data/d.txt\"); {read} }}"),
                FileHow::DotDot => format!("{{ let p = dir().join(\"link/../d.txt\"); {read} }}"),
                FileHow::Update => "{ use std::io::Read; let mut s = String::new(); \
                    match std::fs::OpenOptions::new().read(true).write(true).open(dir().join(\"data/d.txt\")) { \
                    Ok(mut f) => { f.read_to_string(&mut s).unwrap(); s } Err(e) => format!(\"error {:?}\", e.kind()) } }"
                    .to_owned(),
            };
            s.extend(proc_macro(i, &body));
            s.extend(macro_user(i));
            match how {
                FileHow::Plain | FileHow::Update => s.push(write(format!("f{i}/data/d.txt"), "first")),
                FileHow::Linked => {
                    s.push(write(format!("f{i}/data/a.txt"), "file a"));
                    s.push(write(format!("f{i}/data/b.txt"), "file b"));
                    s.push(link(format!("f{i}/data/d.txt"), "a.txt"));
                }
                FileHow::DotDot => {
                    // The kernel resolves `link` first: link/../d.txt is deep/d.txt (or
                    // other/d.txt); read lexically it would be f<i>/d.txt, the decoy.
                    s.push(write(format!("f{i}/deep/inner/keep"), ""));
                    s.push(write(format!("f{i}/other/inner/keep"), ""));
                    s.push(write(format!("f{i}/deep/d.txt"), "deep"));
                    s.push(write(format!("f{i}/other/d.txt"), "other"));
                    s.push(write(format!("f{i}/d.txt"), "decoy"));
                    s.push(link(format!("f{i}/link"), "deep/inner"));
                }
            }
        }
        Feature::MacroStat { what } => {
            let body = match what {
                StatWhat::Len => {
                    "std::fs::metadata(dir().join(\"data/s.txt\")).map(|m| m.len().to_string()).unwrap_or_else(|_| \"missing\".into())"
                }
                StatWhat::Executable => {
                    "{ use std::os::unix::fs::PermissionsExt; std::fs::metadata(dir().join(\"data/s.txt\")).map(|m| (m.permissions().mode() & 0o111 != 0).to_string()).unwrap_or_else(|_| \"missing\".into()) }"
                }
                StatWhat::Exists => "dir().join(\"data/s.txt\").exists().to_string()",
            };
            s.extend(proc_macro(i, body));
            s.extend(macro_user(i));
            s.push(write(format!("f{i}/data/s.txt"), "12345"));
        }
        Feature::MacroListing => {
            s.extend(proc_macro(
                i,
                "{ let mut v: Vec<String> = std::fs::read_dir(dir().join(\"assets\")).map(|d| d.map(|e| e.unwrap().file_name().into_string().unwrap()).collect()).unwrap_or_default(); v.sort(); v.join(\",\") }",
            ));
            s.extend(macro_user(i));
            s.push(write(format!("f{i}/assets/a"), "a"));
        }
        Feature::MacroDlopen => {
            s.extend(proc_macro(
                i,
                "{ unsafe extern \"C\" { fn dlopen(f: *const std::ffi::c_char, m: i32) -> *mut std::ffi::c_void; \
                   fn dlsym(h: *mut std::ffi::c_void, s: *const std::ffi::c_char) -> *mut std::ffi::c_void; } \
                   let p = std::ffi::CString::new(dir().join(\"dyn/libdyn.so\").to_str().unwrap()).unwrap(); \
                   let h = unsafe { dlopen(p.as_ptr(), 2) }; assert!(!h.is_null(), \"dlopen\"); \
                   let f: extern \"C\" fn() -> i32 = unsafe { std::mem::transmute(dlsym(h, c\"dyn_value\".as_ptr())) }; \
                   f().to_string() }",
            ));
            s.extend(macro_user(i));
            s.push(write(format!("f{i}/dyn/dyn.c"), "int dyn_value(void) { return 1; }\n"));
            s.push(Step::Cc { source: format!("f{i}/dyn/dyn.c"), output: format!("f{i}/dyn/libdyn.so") });
        }
        Feature::PathModule => {
            s.extend(lib(i, "", "mod linked;\npub fn value() -> String { linked::value() }\n"));
            let module =
                "#[path = \"../common.rs\"]\nmod common;\npub fn value() -> String { common::VALUE.to_string() }\n";
            s.push(write(format!("f{i}/shared/one/mod.rs"), module));
            s.push(write(format!("f{i}/alt/two/mod.rs"), module));
            s.push(write(format!("f{i}/shared/common.rs"), "pub const VALUE: &str = \"shared\";\n"));
            s.push(write(format!("f{i}/alt/common.rs"), "pub const VALUE: &str = \"alt\";\n"));
            s.push(write(format!("f{i}/src/common.rs"), "pub const VALUE: &str = \"decoy\";\n"));
            s.push(link(format!("f{i}/src/linked"), "../shared/one"));
        }
        Feature::Include => {
            s.extend(lib(i, "", "pub fn value() -> String { include_str!(\"../data/inc.txt\").to_string() }\n"));
            s.push(write(format!("f{i}/data/inc.txt"), "included"));
        }
        Feature::BuildScript { var } => {
            s.extend(lib(
                i,
                "build = \"build.rs\"",
                "include!(concat!(env!(\"OUT_DIR\"), \"/gen.rs\"));\npub fn value() -> String { GEN.to_string() }\n",
            ));
            s.push(write(
                format!("f{i}/build.rs"),
                format!(
                    "fn main() {{\n    println!(\"cargo:rerun-if-changed=data/b.txt\");\n    println!(\"cargo:rerun-if-env-changed={var}\");\n    \
                     let text = std::fs::read_to_string(\"data/b.txt\").unwrap();\n    let var = std::env::var(\"{var}\").{unset};\n    \
                     let out = std::env::var(\"OUT_DIR\").unwrap();\n    \
                     std::fs::write(format!(\"{{out}}/gen.rs\"), format!(\"pub const GEN: &str = {{:?}};\", format!(\"{{text}}|{{var}}\"))).unwrap();\n}}\n"
                ),
            ));
            s.push(write(format!("f{i}/data/b.txt"), "built"));
        }
        Feature::NativeC => {
            s.extend(lib(
                i,
                "build = \"build.rs\"",
                "unsafe extern \"C\" { fn nat_value() -> i32; }\npub fn value() -> String { unsafe { nat_value() }.to_string() }\n",
            ));
            s.push(write(
                format!("f{i}/build.rs"),
                format!(
                    "use std::process::Command;\nfn main() {{\n    println!(\"cargo:rerun-if-changed=csrc/nat.c\");\n    \
                     let out = std::env::var(\"OUT_DIR\").unwrap();\n    let obj = format!(\"{{out}}/nat.o\");\n    \
                     assert!(Command::new(\"cc\").args([\"-c\", \"-fPIC\", \"-o\", &obj, \"csrc/nat.c\"]).status().unwrap().success());\n    \
                     assert!(Command::new(\"ar\").args([\"crs\", &format!(\"{{out}}/libnat{i}.a\"), &obj]).status().unwrap().success());\n    \
                     println!(\"cargo:rustc-link-search=native={{out}}\");\n    println!(\"cargo:rustc-link-lib=static=nat{i}\");\n}}\n"
                ),
            ));
            s.push(write(format!("f{i}/csrc/nat.c"), "int nat_value(void) { return 10; }\n"));
        }
        Feature::SideEffect => {
            s.extend(proc_macro(
                i,
                &format!(
                    "{{ let side = dir().join(\"../side\"); std::fs::create_dir_all(&side).unwrap(); \
                     let input = std::fs::read_to_string(dir().join(\"data/d.txt\")).unwrap_or_default(); \
                     std::fs::write(side.join(\"f{i}.txt\"), &input).unwrap(); input }}"
                ),
            ));
            s.extend(macro_user(i));
            s.push(write(format!("f{i}/data/d.txt"), "side one"));
        }
        Feature::MacroChild { var } => {
            s.extend(proc_macro(
                i,
                &format!(
                    "{{ let out = std::process::Command::new(\"sh\").args([\"-c\", \"printf '%s|' \\\"${var}\\\"; cat data/d.txt\"]).current_dir(dir()).output().unwrap(); \
                     String::from_utf8_lossy(&out.stdout).into_owned() }}"
                ),
            ));
            s.extend(macro_user(i));
            s.push(write(format!("f{i}/data/d.txt"), "child"));
        }
        Feature::ToolchainFile => {
            let path = toolchain_file(i, can);
            s.extend(proc_macro(
                i,
                &format!("std::fs::read_to_string({path:?}).unwrap_or_else(|_| \"missing\".into())"),
            ));
            s.extend(macro_user(i));
            s.push(write(path, "toolchain-side data"));
        }
    }
    s
}

/// The file under the sysroot that feature `i` reads (outside what the ToolchainId covers).
pub fn toolchain_file(i: usize, can: &Abilities) -> String {
    format!("{}/share/ferry-oracle-{}/f{i}.txt", can.sysroot, can.tag)
}

/// A random new content for a data file.
fn content(rng: &mut Rng) -> String {
    format!("{}-{}", *rng.pick(&["v", "w", "xx", "yyy"]), rng.below(100))
}

/// The same length as `old`, other bytes (a digit or letter changed).
fn same_size(rng: &mut Rng, old: &str) -> String {
    if old.is_empty() {
        return "s".into();
    }
    let mut bytes: Vec<u8> = old.bytes().collect();
    let at = rng.below(bytes.len());
    let from = bytes[at];
    let mut to = b'a' + rng.below(26) as u8;
    if to == from {
        to = if from == b'z' { b'a' } else { from + 1 };
    }
    if !from.is_ascii_alphanumeric() {
        to = b'q';
    }
    bytes[at] = to;
    String::from_utf8(bytes).unwrap_or_else(|_| "s".into())
}

fn edit(rng: &mut Rng, model: &Model, path: String) -> Step {
    match model.files.get(&path) {
        Some(old) if rng.chance(35) => Step::Write { content: same_size(rng, old), path, keep_mtime: true },
        _ => write(path, content(rng)),
    }
}

fn set_var(rng: &mut Rng, var: &str) -> Step {
    Step::SetEnv { name: var.to_owned(), value: rng.pick(&values(var)).clone() }
}

/// One change aimed at feature `i`.
fn mutation(rng: &mut Rng, i: usize, f: &Feature, model: &Model, can: &Abilities) -> Vec<Step> {
    let file = |p: &str| format!("f{i}/{p}");
    match f {
        Feature::EnvMacro { var } | Feature::MacroEnv { var } => vec![set_var(rng, var)],
        Feature::MacroChild { var } | Feature::BuildScript { var } => {
            if rng.chance(50) {
                vec![set_var(rng, var)]
            } else {
                let data = if matches!(f, Feature::BuildScript { .. }) { "data/b.txt" } else { "data/d.txt" };
                vec![edit(rng, model, file(data))]
            }
        }
        Feature::MacroFile { how } => match how {
            FileHow::Plain | FileHow::Update => vec![edit(rng, model, file("data/d.txt"))],
            FileHow::Linked => match rng.below(3) {
                0 => {
                    let now = model.links.get(&file("data/d.txt")).cloned().unwrap_or_default();
                    vec![link(file("data/d.txt"), if now == "a.txt" { "b.txt" } else { "a.txt" })]
                }
                1 => vec![edit(rng, model, file("data/a.txt"))],
                _ => vec![edit(rng, model, file("data/b.txt"))],
            },
            FileHow::DotDot => match rng.below(4) {
                0 => {
                    let now = model.links.get(&file("link")).cloned().unwrap_or_default();
                    vec![link(file("link"), if now == "deep/inner" { "other/inner" } else { "deep/inner" })]
                }
                1 => vec![edit(rng, model, file("deep/d.txt"))],
                2 => vec![edit(rng, model, file("other/d.txt"))],
                _ => vec![edit(rng, model, file("d.txt"))],
            },
        },
        Feature::MacroStat { .. } => {
            let p = file("data/s.txt");
            let there = model.files.contains_key(&p);
            match rng.below(4) {
                0 if there => vec![Step::Remove { path: p }],
                1 if there => {
                    let executable = !model.executable.get(&p).copied().unwrap_or(false);
                    vec![Step::Chmod { path: p, executable }]
                }
                _ => vec![edit(rng, model, p)],
            }
        }
        Feature::MacroListing => {
            let names: Vec<&String> = model.files.keys().filter(|k| k.starts_with(&file("assets/"))).collect();
            match rng.below(3) {
                0 if !names.is_empty() => vec![Step::Remove { path: (*rng.pick(&names)).clone() }],
                1 if !names.is_empty() => {
                    let from = (*rng.pick(&names)).clone();
                    vec![Step::Rename { from, to: file(&format!("assets/r{}", rng.below(5))) }]
                }
                _ => vec![write(file(&format!("assets/n{}", rng.below(5))), "n")],
            }
        }
        Feature::MacroDlopen => vec![
            write(file("dyn/dyn.c"), format!("int dyn_value(void) {{ return {}; }}\n", rng.below(50))),
            Step::Cc { source: file("dyn/dyn.c"), output: file("dyn/libdyn.so") },
        ],
        Feature::PathModule => match rng.below(4) {
            0 => {
                let now = model.links.get(&file("src/linked")).cloned().unwrap_or_default();
                vec![link(file("src/linked"), if now == "../shared/one" { "../alt/two" } else { "../shared/one" })]
            }
            1 => vec![write(
                file("shared/common.rs"),
                format!("pub const VALUE: &str = \"shared {}\";\n", rng.below(99)),
            )],
            2 => vec![write(file("alt/common.rs"), format!("pub const VALUE: &str = \"alt {}\";\n", rng.below(99)))],
            _ => vec![write(file("src/common.rs"), format!("pub const VALUE: &str = \"decoy {}\";\n", rng.below(99)))],
        },
        Feature::Include => vec![edit(rng, model, file("data/inc.txt"))],
        Feature::NativeC => {
            vec![write(file("csrc/nat.c"), format!("int nat_value(void) {{ return {}; }}\n", rng.below(99)))]
        }
        Feature::SideEffect => vec![edit(rng, model, file("data/d.txt"))],
        Feature::ToolchainFile => vec![edit(rng, model, toolchain_file(i, can))],
    }
}

/// A file put back to one of its earlier contents (what was compiled before: a hit).
fn revert(rng: &mut Rng, model: &Model) -> Option<Step> {
    let candidates: Vec<(&String, &Vec<String>)> =
        model.history.iter().filter(|(p, h)| !h.is_empty() && model.files.contains_key(*p)).collect();
    if candidates.is_empty() {
        return None;
    }
    let (path, history) = *rng.pick(&candidates);
    Some(write(path.clone(), rng.pick(history).clone()))
}
