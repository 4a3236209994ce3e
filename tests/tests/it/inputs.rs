//! Exact inputs, end to end: a hit only when nothing the compile observed has changed, and a hit
//! wherever nothing that reaches the output differs. Each test generates a small cargo project
//! of the kind users of other caches were served wrong programs by (native code bundled into an
//! rlib, proc-macros that read files, variables and directories, link-argument files, module
//! files that appear, cached failures), changes one thing, rebuilds through ferry, and checks the
//! program that comes out against the change — or against a plain cargo build of the same tree.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ferry_tests::{World, bin, installed_sysroot, ok};
use serde_json::Value;

use crate::wrapper::{cargo, n};

#[test]
fn native_code_bundled_into_rlibs_follows_its_c_source() {
    // `hw` names its library only in #[link(kind = "static")]; `lsys` through
    // `cargo:rustc-link-lib=static=`, and is two dependency levels below the binary.
    let p = Project::new(&[
        ("Cargo.toml", "[workspace]\nresolver = \"2\"\nmembers = [\"hw\", \"lsys\", \"mid\", \"app\"]\n"),
        ("hw/Cargo.toml", &package("hw", "build = \"build.rs\"", &[])),
        ("hw/csrc/lib.c", "int hw_value(void) { return 1; }\n"),
        ("hw/build.rs", &c_build_script("hw", false)),
        (
            "hw/src/lib.rs",
            "#[link(name = \"hw\", kind = \"static\")]\nunsafe extern \"C\" { fn hw_value() -> i32; }\npub fn value() -> i32 { unsafe { hw_value() } }\n",
        ),
        ("lsys/Cargo.toml", &package("lsys", "build = \"build.rs\"", &[])),
        ("lsys/csrc/lib.c", "int lsys_value(void) { return 10; }\n"),
        ("lsys/build.rs", &c_build_script("lsys", true)),
        (
            "lsys/src/lib.rs",
            "unsafe extern \"C\" { fn lsys_value() -> i32; }\npub fn value() -> i32 { unsafe { lsys_value() } }\n",
        ),
        ("mid/Cargo.toml", &package("mid", "", &["lsys"])),
        ("mid/src/lib.rs", "pub fn value() -> i32 { lsys::value() }\n"),
        ("app/Cargo.toml", &package("app", "", &["hw", "mid"])),
        ("app/src/main.rs", "fn main() { println!(\"{} {}\", hw::value(), mid::value()); }\n"),
    ]);
    p.build().ok();
    assert_eq!(p.run("app"), "1 10");
    p.edit("hw/csrc/lib.c", "return 1;", "return 2;");
    p.edit("lsys/csrc/lib.c", "return 10;", "return 20;");
    let b = p.build().ok();
    assert_eq!(p.run("app"), "2 20", "stale native code was replayed: {:#}", b.stats);
    // Reverting both is a hit for every unit again: what changed was only the C code.
    p.edit("hw/csrc/lib.c", "return 2;", "return 1;");
    p.edit("lsys/csrc/lib.c", "return 20;", "return 10;");
    let b = p.build().ok();
    assert_eq!(p.run("app"), "1 10");
    assert_eq!(b.misses(), 0, "{:#}", b.stats);
}

#[test]
fn what_a_proc_macro_reads_is_an_input() {
    let mac = "use proc_macro::TokenStream;\n\
        fn dir() -> std::path::PathBuf { std::env::var(\"CARGO_MANIFEST_DIR\").unwrap().into() }\n\
        #[proc_macro]\npub fn level(_: TokenStream) -> TokenStream {\n\
            format!(\"{:?}\", std::env::var(\"CASE_LEVEL\").unwrap_or_else(|_| \"unset\".into())).parse().unwrap()\n}\n\
        #[proc_macro]\npub fn notes(_: TokenStream) -> TokenStream {\n\
            format!(\"{:?}\", std::fs::read_to_string(dir().join(\"notes.txt\")).unwrap().trim()).parse().unwrap()\n}\n\
        #[proc_macro]\npub fn listing(_: TokenStream) -> TokenStream {\n\
            let mut names: Vec<String> = std::fs::read_dir(dir().join(\"assets\")).unwrap()\n\
                .map(|e| e.unwrap().file_name().into_string().unwrap()).collect();\n\
            names.sort();\n\
            format!(\"{:?}\", names.join(\",\")).parse().unwrap()\n}\n";
    let p = Project::new(&[
        ("Cargo.toml", "[workspace]\nresolver = \"2\"\nmembers = [\"mac\", \"doc\", \"app\"]\n"),
        ("mac/Cargo.toml", &package("mac", "[lib]\nproc-macro = true", &[])),
        ("mac/src/lib.rs", mac),
        // cargo's usual ways to rebuild when what a macro reads changes.
        ("doc/Cargo.toml", &package("doc", "build = \"build.rs\"", &["mac"])),
        (
            "doc/build.rs",
            "fn main() {\n    println!(\"cargo:rerun-if-env-changed=CASE_LEVEL\");\n    println!(\"cargo:rerun-if-changed=notes.txt\");\n    println!(\"cargo:rerun-if-changed=assets\");\n}\n",
        ),
        ("doc/notes.txt", "v1\n"),
        ("doc/assets/a.txt", "a"),
        (
            "doc/src/lib.rs",
            "pub const LEVEL: &str = mac::level!();\npub const NOTES: &str = mac::notes!();\npub const FILES: &str = mac::listing!();\n",
        ),
        ("app/Cargo.toml", &package("app", "", &["doc"])),
        ("app/src/main.rs", "fn main() { println!(\"{} {} {}\", doc::LEVEL, doc::NOTES, doc::FILES); }\n"),
    ]);
    p.build_with(&[("CASE_LEVEL", "debug")]).ok();
    assert_eq!(p.run("app"), "debug v1 a.txt");
    p.build_with(&[("CASE_LEVEL", "info")]).ok();
    assert_eq!(p.run("app"), "info v1 a.txt", "a variable the macro read changed");
    p.write("doc/notes.txt", "v2\n");
    p.build_with(&[("CASE_LEVEL", "info")]).ok();
    assert_eq!(p.run("app"), "info v2 a.txt", "a file the macro read changed");
    p.write("doc/assets/b.txt", "b");
    p.build_with(&[("CASE_LEVEL", "info")]).ok();
    assert_eq!(p.run("app"), "info v2 a.txt,b.txt", "a directory the macro listed changed");
    // Back to the first state: every unit was compiled that way before, so every one hits.
    p.write("doc/notes.txt", "v1\n");
    fs::remove_file(p.root.join("doc/assets/b.txt")).expect("rm");
    let b = p.build_with(&[("CASE_LEVEL", "debug")]).ok();
    assert_eq!(p.run("app"), "debug v1 a.txt");
    assert_eq!(b.misses(), 0, "{:#}", b.stats);
}

#[test]
fn a_module_file_that_appears_beside_another_fails_the_compile_again() {
    let p = Project::new(&[
        ("Cargo.toml", &package("modules", "", &[])),
        ("src/lib.rs", "mod m;\npub fn f() -> u32 { m::g() }\n"),
        ("src/m.rs", "pub fn g() -> u32 { 1 }\n"),
    ]);
    p.build().ok();
    // rustc refuses a module found at both m.rs and m/mod.rs; a replayed success would hide it.
    p.write("src/m/mod.rs", "pub fn g() -> u32 { 2 }\n");
    p.touch("src/lib.rs");
    let b = p.build();
    assert!(!b.success, "the compile must fail now:\n{}", b.log);
    assert!(b.log.contains("file for module `m` found at both"), "{}", b.log);
    assert_eq!(b.hits(), 0, "{:#}", b.stats);
}

#[test]
fn a_cached_failure_ends_when_the_missing_file_appears() {
    let p = Project::new(&[
        ("Cargo.toml", &package("genasset", "", &[])),
        ("src/lib.rs", "pub const ASSET: &str = include_str!(\"../assets/generated.txt\");\n"),
        ("src/main.rs", "fn main() { println!(\"{}\", genasset::ASSET.trim()); }\n"),
    ]);
    let failing = p.build_with(&[("FERRY_CACHE_FAILURES", "1")]);
    assert!(!failing.success && failing.log.contains("generated.txt"), "{}", failing.log);
    // The same failure again is replayed from the cache...
    p.touch("src/lib.rs");
    let again = p.build_with(&[("FERRY_CACHE_FAILURES", "1")]);
    assert!(!again.success);
    assert_eq!(again.hits(), 1, "the failure is cached: {:#}", again.stats);
    // ...until the file it looked for exists.
    p.write("assets/generated.txt", "hello\n");
    p.build_with(&[("FERRY_CACHE_FAILURES", "1")]).ok();
    assert_eq!(p.run("genasset"), "hello");
}

#[test]
fn files_named_by_link_arguments_are_inputs() {
    // An implicit linker script (a symbol's value) and a version script, both named by
    // `cargo:rustc-link-arg`: rustc never reads them, the linker does.
    let p = Project::new(&[
        ("Cargo.toml", &package("linked", "build = \"build.rs\"", &[])),
        ("values.ld", "ferry_value = 7;\n"),
        ("exports.map", "V1 { global: main; local: *; };\n"),
        (
            "build.rs",
            "fn main() {\n    let dir = std::env::var(\"CARGO_MANIFEST_DIR\").unwrap();\n    \
             println!(\"cargo:rustc-link-arg={dir}/values.ld\");\n    \
             println!(\"cargo:rustc-link-arg=-Wl,--version-script={dir}/exports.map\");\n    \
             println!(\"cargo:rerun-if-changed=values.ld\");\n    println!(\"cargo:rerun-if-changed=exports.map\");\n}\n",
        ),
        (
            "src/main.rs",
            "unsafe extern \"C\" { static ferry_value: u8; }\nfn main() { println!(\"{}\", unsafe { &raw const ferry_value } as usize); }\n",
        ),
    ]);
    p.build().ok();
    assert_eq!(p.run("linked"), "7");
    p.write("values.ld", "ferry_value = 9;\n");
    p.build().ok();
    assert_eq!(p.run("linked"), "9", "an edited linker script reaches the binary");
    p.write("exports.map", "V2 { global: main; local: *; };\n");
    p.build().ok();
    let through_ferry = fs::read(p.root.join("target/debug/linked")).expect("binary");
    ok(cargo(&p.world, &p.root)
        .args(["build", "-q", "--offline"])
        .env_remove("RUSTC_WRAPPER")
        .env("CARGO_TARGET_DIR", p.root.join("plain"))
        .output()
        .expect("cargo"));
    let plain = fs::read(p.root.join("plain/debug/linked")).expect("plain binary");
    assert!(
        contains(&through_ferry, b"V2") && !contains(&through_ferry, b"V1\0"),
        "the edited version script was not used"
    );
    assert!(contains(&plain, b"V2"));
}

#[test]
fn a_build_script_cfg_from_an_environment_variable() {
    let p = Project::new(&[
        ("Cargo.toml", &package("cfgd", "build = \"build.rs\"", &[])),
        (
            "build.rs",
            "fn main() {\n    println!(\"cargo:rerun-if-env-changed=CASE_FAST\");\n    println!(\"cargo::rustc-check-cfg=cfg(fast)\");\n    if std::env::var_os(\"CASE_FAST\").is_some() {\n        println!(\"cargo:rustc-cfg=fast\");\n    }\n}\n",
        ),
        ("src/lib.rs", "pub fn mode() -> &'static str { if cfg!(fast) { \"fast\" } else { \"slow\" } }\n"),
        ("src/main.rs", "fn main() { println!(\"{}\", cfgd::mode()); }\n"),
    ]);
    p.build().ok();
    assert_eq!(p.run("cfgd"), "slow");
    p.build_with(&[("CASE_FAST", "1")]).ok();
    assert_eq!(p.run("cfgd"), "fast");
    let b = p.build().ok();
    assert_eq!(p.run("cfgd"), "slow");
    assert_eq!(b.misses(), 0, "the first build's entries serve the third: {:#}", b.stats);
}

#[test]
fn an_include_of_a_generated_file_under_out_dir() {
    let p = Project::new(&[
        ("Cargo.toml", &package("gen", "build = \"build.rs\"", &[])),
        ("template.txt", "41"),
        (
            "build.rs",
            "fn main() {\n    println!(\"cargo:rerun-if-changed=template.txt\");\n    let n = std::fs::read_to_string(\"template.txt\").unwrap();\n    \
            std::fs::write(std::path::Path::new(&std::env::var(\"OUT_DIR\").unwrap()).join(\"gen.rs\"), format!(\"pub const N: u32 = {};\", n.trim())).unwrap();\n}\n",
        ),
        ("src/lib.rs", "include!(concat!(env!(\"OUT_DIR\"), \"/gen.rs\"));\n"),
        ("src/main.rs", "fn main() { println!(\"{}\", gen::N); }\n"),
    ]);
    p.build().ok();
    assert_eq!(p.run("gen"), "41");
    p.write("template.txt", "42");
    p.build().ok();
    assert_eq!(p.run("gen"), "42");
}

#[test]
fn another_driver_never_gets_rustc_entries() {
    let clippy = installed_sysroot().join("bin/clippy-driver");
    let p = Project::new(&[
        ("Cargo.toml", &package("lints", "", &[])),
        ("src/lib.rs", "pub fn circle_area(r: f64) -> f64 {\n    3.14 * r * r\n}\n"),
    ]);
    let check = |rustc: Option<&Path>| {
        let mut cmd = cargo(&p.world, &p.root);
        cmd.args(["check", "--offline"]).env("RUSTC_WRAPPER", bin("ferry"));
        if let Some(r) = rustc {
            cmd.env("RUSTC", r);
        }
        cmd.output().expect("cargo")
    };
    assert!(check(None).status.success());
    p.touch("src/lib.rs");
    let out = check(Some(&clippy));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("approx_constant"),
        "clippy-driver must run and refuse the crate:\n{stderr}"
    );
    // And as a workspace wrapper in front of rustc (what `cargo clippy` does).
    p.touch("src/lib.rs");
    let mut cmd = cargo(&p.world, &p.root);
    cmd.args(["check", "--offline"]).env("RUSTC_WRAPPER", bin("ferry")).env("RUSTC_WORKSPACE_WRAPPER", &clippy);
    let out = cmd.output().expect("cargo");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("approx_constant"), "{stderr}");
    let s = p.world.stats();
    assert_eq!(n(&s, "/passthrough/multiple-inputs"), 0, "a workspace wrapper is not multiple inputs: {s:#}");
}

#[test]
fn with_basedirs_a_checkout_path_compiled_in_is_never_replayed_elsewhere() {
    let files = [
        ("Cargo.toml", package("where", "", &[])),
        ("src/main.rs", "fn main() { println!(\"{}\", env!(\"CARGO_MANIFEST_DIR\")); }\n".into()),
        ("src/lib.rs", "pub fn plain() -> u32 { 7 }\n".into()),
    ];
    let files: Vec<(&str, &str)> = files.iter().map(|(a, b)| (*a, b.as_str())).collect();
    let a = Project::new(&files);
    let mut world_b = Project::in_world(&a.world, "b", &files);
    world_b.set_env("FERRY_BASEDIRS", world_b.root.display().to_string());
    // Paths remapped, as sharing across checkouts needs (else debug info names the checkout).
    world_b.set_env("RUSTFLAGS", format!("--remap-path-prefix={}=/src", world_b.root.display()));
    let a_root = a.root.display().to_string();
    let a_flags = format!("--remap-path-prefix={a_root}=/src");
    let a_build = a.build_with(&[("FERRY_BASEDIRS", &a_root), ("RUSTFLAGS", &a_flags)]).ok();
    assert_eq!(a_build.misses(), 2);
    let b_build = world_b.build().ok();
    assert_eq!(world_b.run("where"), world_b.root.display().to_string());
    // The library shares its entry; the binary, whose bytes hold the path as a value (not a
    // source path the remapping rewrites), compiles again.
    assert_eq!((b_build.hits(), b_build.misses()), (1, 1), "{:#}", b_build.stats);
}

#[test]
fn outputs_that_are_not_regular_files_pass_through() {
    let world = World::new();
    let dir = world.path().join("dev");
    fs::create_dir_all(&dir).expect("mkdir");
    fs::write(dir.join("p.rs"), "pub fn f() -> u32 { 1 }\n").expect("write");
    let node = dir.join("null");
    let made = Command::new("mknod").arg(&node).args(["c", "1", "3"]).status().expect("mknod runs");
    assert!(made.success(), "mknod (the tests run as root)");
    let fifo = dir.join("fifo");
    assert!(Command::new("mkfifo").arg(&fifo).status().expect("mkfifo").success());
    for _ in 0..2 {
        let out = world
            .command(bin("ferry"))
            .arg(crate::wrapper::rustc())
            .args(["--crate-name", "p", "--crate-type", "lib", "--emit=mir", "-o"])
            .arg(&node)
            .arg("p.rs")
            .current_dir(&dir)
            .output()
            .expect("ferry");
        ok(out);
    }
    use std::os::unix::fs::FileTypeExt;
    assert!(fs::symlink_metadata(&node).expect("node").file_type().is_char_device(), "the device node was replaced");
    assert!(fs::symlink_metadata(&fifo).expect("fifo").file_type().is_fifo());
    let s = world.stats();
    assert_eq!((n(&s, "/passthrough/output-not-regular"), n(&s, "/hits_local")), (2, 0), "{s:#}");
}

#[test]
fn cargo_settings_secrets_and_terminal_width_do_not_change_keys() {
    let p = Project::new(&[
        ("Cargo.toml", &package("keys", "", &[])),
        ("src/lib.rs", "pub fn answer() -> u32 {\n    42\n}\n"),
        ("src/main.rs", "fn main() { println!(\"{}\", keys::answer()); }\n"),
    ]);
    let secret = "ci-token-4f1e9a";
    p.build_with(&[("CARGO_HTTP_TIMEOUT", "30"), ("CARGO_NET_RETRY", "2"), ("CARGO_REGISTRY_TOKEN", secret)]).ok();
    p.clean();
    let b = p
        .build_with(&[
            ("CARGO_HTTP_TIMEOUT", "31"),
            ("CARGO_NET_RETRY", "3"),
            ("CARGO_REGISTRY_TOKEN", "ci-token-other"),
            ("CARGO_TERM_COLOR", "always"),
        ])
        .ok();
    assert_eq!((b.misses(), b.hits()), (0, 2), "{:#}", b.stats);
    assert_eq!(p.run("keys"), "42");
    // The token is nowhere in the cache dir: not in entries, manifests or explain records.
    for file in crate::wrapper::files_under(&p.world.cache_dir()) {
        let bytes = fs::read(&file).unwrap_or_default();
        assert!(!contains(&bytes, secret.as_bytes()), "{} holds the registry token", file.display());
    }
    // rustc's --diagnostic-width (a terminal's width) is not keyed either.
    let width = |w: &str| {
        p.world
            .command(bin("ferry"))
            .arg(crate::wrapper::rustc())
            .args(["--crate-name", "w", "--crate-type", "lib", "--emit=link", "--out-dir", "wout", "src/lib.rs"])
            .arg(format!("--diagnostic-width={w}"))
            .current_dir(&p.root)
            .output()
            .expect("ferry")
    };
    p.world.ferry_ok(&["stats", "--zero"]);
    ok(width("80"));
    ok(width("200"));
    assert_eq!(n(&p.world.stats(), "/hits_local"), 1);
}

#[test]
fn a_non_utf8_environment_variable_never_fails_a_build() {
    use std::os::unix::ffi::OsStrExt;
    let p = Project::new(&[
        ("Cargo.toml", &package("odd", "", &[])),
        ("src/lib.rs", "pub fn f() -> u32 { 1 }\n"),
        ("src/main.rs", "fn main() { println!(\"{}\", odd::f()); }\n"),
    ]);
    let mut cmd = cargo(&p.world, &p.root);
    cmd.args(["build", "--offline"])
        .env("RUSTC_WRAPPER", bin("ferry"))
        .env("ODDVAR", std::ffi::OsStr::from_bytes(b"caf\xe9"));
    let out = cmd.output().expect("cargo");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let unrelated = std::ffi::OsStr::from_bytes(b"\xff\xfe");
    let mut cmd = cargo(&p.world, &p.root);
    p.touch("src/lib.rs");
    cmd.args(["build", "--offline"]).env("RUSTC_WRAPPER", bin("ferry")).env("FERRY_UNRELATED", unrelated);
    assert!(cmd.output().expect("cargo").status.success());
}

#[test]
fn a_second_machine_with_a_copied_linker_hits_every_unit() {
    // Machine A and machine B share nothing but the cache's content; B's linker driver is a
    // byte-identical copy with another mtime and inode, its terminal colors on, its registry
    // token and HTTP timeout different.
    let files = [
        ("Cargo.toml", "[workspace]\nmembers = [\"m\", \"a\"]\nresolver = \"2\"\n".to_owned()),
        ("m/Cargo.toml", package("m", "[lib]\nproc-macro = true", &[])),
        ("m/src/lib.rs", "use proc_macro::TokenStream;\n#[proc_macro]\npub fn seven(_: TokenStream) -> TokenStream { \"7\".parse().unwrap() }\n".into()),
        ("a/Cargo.toml", package("a", "build = \"build.rs\"", &["m"])),
        ("a/build.rs", "fn main() { println!(\"cargo:rustc-env=K=v\"); }\n".into()),
        ("a/src/main.rs", "fn main() { println!(\"{} {}\", m::seven!(), env!(\"K\")); }\n".into()),
    ];
    let files: Vec<(&str, &str)> = files.iter().map(|(a, b)| (*a, b.as_str())).collect();
    let mut p = Project::new(&files);
    let tools = p.world.path().join("bin");
    fs::create_dir_all(&tools).expect("mkdir");
    let cc = tools.join("cc");
    fs::write(&cc, "#!/bin/sh\nexec /usr/bin/cc \"$@\"\n").expect("write");
    fs::set_permissions(&cc, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let path = format!("{}:{}", tools.display(), std::env::var("PATH").unwrap_or_default());
    p.set_env("PATH", &path);
    let first = p.build().ok();
    assert_eq!(first.misses(), 3, "{:#}", first.stats);
    // Machine B: a copy of A's cache, a new target dir, the linker copied (new inode, old mtime).
    let cache_b = p.world.path().join("cache-b");
    assert!(Command::new("cp").arg("-a").arg(p.world.cache_dir()).arg(&cache_b).status().expect("cp").success());
    let copy = tools.join("cc.new");
    fs::copy(&cc, &copy).expect("copy");
    fs::rename(&copy, &cc).expect("rename");
    assert!(Command::new("touch").args(["-d", "2001-01-01"]).arg(&cc).status().expect("touch").success());
    p.clean();
    p.set_env("FERRY_CACHE_DIR", cache_b.display().to_string());
    let b = p
        .build_with(&[
            ("CARGO_TERM_COLOR", "always"),
            ("CARGO_REGISTRY_TOKEN", "secret123"),
            ("CARGO_HTTP_TIMEOUT", "99"),
        ])
        .ok();
    assert_eq!((b.hits(), b.misses()), (3, 0), "every unit (proc-macro, build script, bin) hits: {:#}", b.stats);
    assert_eq!(p.run("a"), "7 v");
    // A linker with other content is another linker: the binary misses.
    fs::write(&cc, "#!/bin/sh\n# another driver\nexec /usr/bin/cc \"$@\"\n").expect("write");
    p.clean();
    let c = p.build().ok();
    assert!(c.misses() >= 1, "a changed linker must miss the linking units: {:#}", c.stats);
}

// ---------------------------------------------------------------------------------------------
// The project DSL
// ---------------------------------------------------------------------------------------------

/// A generated cargo project in its own world, built through ferry.
pub(crate) struct Project {
    pub(crate) world: World,
    pub(crate) root: PathBuf,
}

/// One cargo build: did it succeed, its stderr, and ferry's counters for it alone.
pub(crate) struct Built {
    pub(crate) success: bool,
    pub(crate) log: String,
    pub(crate) stats: Value,
}

impl Project {
    pub(crate) fn new(files: &[(&str, &str)]) -> Project {
        let world = World::new();
        let root = world.path().join("p");
        write_all(&root, files);
        Project { world, root }
    }

    /// Another project in a fresh world that shares `world`'s cache dir.
    pub(crate) fn in_world(world: &World, name: &str, files: &[(&str, &str)]) -> Project {
        let mut other = World::new();
        other.set("FERRY_CACHE_DIR", world.cache_dir());
        let root = other.path().join(name);
        write_all(&root, files);
        Project { world: other, root }
    }

    pub(crate) fn set_env(&mut self, key: &str, value: impl AsRef<std::ffi::OsStr>) {
        self.world.set(key, value);
    }

    pub(crate) fn write(&self, rel: &str, text: &str) {
        let path = self.root.join(rel);
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        fs::write(path, text).expect("write");
    }

    pub(crate) fn edit(&self, rel: &str, from: &str, to: &str) {
        crate::wrapper::edit(&self.root.join(rel), from, to);
    }

    /// Moves a file's mtime forward, so cargo compiles its crate again.
    pub(crate) fn touch(&self, rel: &str) {
        let file = fs::File::options().append(true).open(self.root.join(rel)).expect("open");
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(2);
        file.set_modified(later).expect("set mtime");
    }

    pub(crate) fn build(&self) -> Built {
        self.build_with(&[])
    }

    /// `cargo build --offline` through ferry with `env` added, the counters zeroed first.
    pub(crate) fn build_with(&self, env: &[(&str, &str)]) -> Built {
        self.world.ferry_ok(&["stats", "--zero"]);
        let mut cmd = cargo(&self.world, &self.root);
        cmd.args(["build", "-j2", "--offline"]).env("RUSTC_WRAPPER", bin("ferry"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out: Output = cmd.output().expect("cargo runs");
        Built {
            success: out.status.success(),
            log: String::from_utf8_lossy(&out.stderr).into_owned(),
            stats: self.world.stats(),
        }
    }

    pub(crate) fn clean(&self) {
        crate::wrapper::clean(&self.world, &self.root);
    }

    /// Runs `target/debug/<name>`; its output, trimmed.
    pub(crate) fn run(&self, name: &str) -> String {
        ok(Command::new(self.root.join("target/debug").join(name)).output().expect("binary runs")).trim().to_owned()
    }
}

impl Built {
    pub(crate) fn ok(self) -> Built {
        assert!(self.success, "the build failed:\n{}", self.log);
        self
    }

    pub(crate) fn hits(&self) -> u64 {
        n(&self.stats, "/hits_local") + n(&self.stats, "/hits_remote")
    }

    pub(crate) fn misses(&self) -> u64 {
        n(&self.stats, "/misses")
    }
}

fn write_all(root: &Path, files: &[(&str, &str)]) {
    for (rel, text) in files {
        let path = root.join(rel);
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        fs::write(path, text).expect("write");
    }
}

/// A package manifest with `extra` lines and path dependencies on sibling packages.
pub(crate) fn package(name: &str, extra: &str, deps: &[&str]) -> String {
    let mut text =
        format!("[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2021\"\n{extra}\n\n[dependencies]\n");
    for d in deps {
        text.push_str(&format!("{d} = {{ path = \"../{d}\" }}\n"));
    }
    text
}

/// A build script compiling `csrc/lib.c` into `OUT_DIR/lib<name>.a`, naming it to rustc by `-l
/// static=` when `link_lib`, else only adding the search path (the crate names it in #[link]).
fn c_build_script(name: &str, link_lib: bool) -> String {
    let link =
        if link_lib { format!("    println!(\"cargo:rustc-link-lib=static={name}\");\n") } else { String::new() };
    format!(
        "use std::process::Command;\nfn main() {{\n    let out = std::path::PathBuf::from(std::env::var(\"OUT_DIR\").unwrap());\n    \
         println!(\"cargo:rerun-if-changed=csrc/lib.c\");\n    \
         assert!(Command::new(\"cc\").args([\"-c\", \"-fPIC\", \"csrc/lib.c\", \"-o\"]).arg(out.join(\"lib.o\")).status().unwrap().success());\n    \
         let _ = std::fs::remove_file(out.join(\"lib{name}.a\"));\n    \
         assert!(Command::new(\"ar\").arg(\"crs\").arg(out.join(\"lib{name}.a\")).arg(out.join(\"lib.o\")).status().unwrap().success());\n    \
         println!(\"cargo:rustc-link-search=native={{}}\", out.display());\n{link}}}\n"
    )
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn explain_shows_every_part_and_the_parts_two_machines_differ_in() {
    let files = [
        ("Cargo.toml", package("told", "", &[])),
        ("src/lib.rs", "pub const WHO: &str = env!(\"CASE_WHO\");\n".to_owned()),
    ];
    let files: Vec<(&str, &str)> = files.iter().map(|(a, b)| (*a, b.as_str())).collect();
    let a = Project::new(&files);
    a.build_with(&[("CASE_WHO", "alice")]).ok();
    let shown = a.world.ferry_ok(&["explain", "--crate", "told"]);
    for part in ["toolchain = ", "driver = rustc", "cwd = ", "env:CASE_WHO = =alice"] {
        assert!(shown.contains(part), "'{part}' missing from:\n{shown}");
    }
    let source = a.root.join("src/lib.rs").display().to_string();
    let digest = blake3::hash(&fs::read(a.root.join("src/lib.rs")).expect("source")).to_hex().to_string();
    assert!(shown.contains(&format!("file:{source} = {digest}")), "the source and its digest:\n{shown}");

    // Machine B: same project at the same place, another value; it misses, and the diff says why.
    let mut b = Project::new(&files);
    b.set_env("FERRY_CACHE_DIR", b.world.path().join("cache-b"));
    let root_b = b.root.clone();
    fs::remove_dir_all(&root_b).expect("rm");
    b.root = a.root.clone();
    b.clean();
    b.build_with(&[("CASE_WHO", "bob")]).ok();
    let diff = b.world.ferry_ok(&[
        "explain",
        "--crate",
        "told",
        "--diff",
        &a.world.cache_dir().display().to_string(),
        &b.world.path().join("cache-b").display().to_string(),
    ]);
    assert!(diff.contains("pre-key: the same"), "{diff}");
    assert!(diff.contains("result key: 1 part(s) differ") && diff.contains("env:CASE_WHO"), "{diff}");
    assert!(diff.contains("=alice") && diff.contains("=bob"), "{diff}");
    assert!(!diff.contains("toolchain"), "only the parts that differ: {diff}");

    // And for a command, without compiling: the keys it would have now.
    let out = b
        .world
        .command(bin("ferry"))
        .args(["explain", "--"])
        .arg(crate::wrapper::rustc())
        .args(["--crate-name", "told", "--crate-type", "lib", "--emit=link", "src/lib.rs"])
        .current_dir(&a.root)
        .output()
        .expect("ferry explain");
    let text = ok(out);
    assert!(text.contains("no manifest: never compiled here") && text.contains("driver = rustc"), "{text}");
}

#[test]
fn stats_explain_incremental_pass_throughs_with_the_fix() {
    let p = Project::new(&[("Cargo.toml", &package("incr", "", &[])), ("src/lib.rs", "pub fn f() {}\n")]);
    let mut cmd = cargo(&p.world, &p.root);
    cmd.args(["build", "--offline"]).env("RUSTC_WRAPPER", bin("ferry")).env("CARGO_INCREMENTAL", "1");
    ok(cmd.output().expect("cargo"));
    let text = p.world.ferry_ok(&["stats"]);
    assert!(text.contains("pass-through: incremental"), "{text}");
    assert!(text.contains("CARGO_INCREMENTAL=0"), "the one-line fix is shown:\n{text}");
}
