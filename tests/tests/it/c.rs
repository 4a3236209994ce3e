//! C and C++ through ferry: `ferry gcc|clang ARGS`, masquerade links (`ferry setup`), cc-rs in a
//! cargo build and make. Every compile through ferry is checked against a plain compile of the
//! same thing in the same place, byte for byte (object, side outputs, diagnostics).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use ferry_tests::{World, bin, ok};

use crate::cluster::which;
use crate::wrapper::{n, write};

/// The C compilers the suite checks (`scripts/test` installs both).
const COMPILERS: [&str; 2] = ["gcc", "clang"];

/// A directory of C sources in its own world (cache dir, config).
struct Sources {
    world: World,
    root: PathBuf,
}

/// What one compile left: its files under `out/` by name, its stderr and exit code.
#[derive(Debug, PartialEq, Eq)]
struct Compiled {
    files: BTreeMap<String, Vec<u8>>,
    stderr: String,
    code: Option<i32>,
}

impl Sources {
    fn new(files: &[(&str, &str)]) -> Sources {
        let world = World::new();
        let root = world.path().join("src");
        for (rel, text) in files {
            write(&root.join(rel), text);
        }
        Sources { world, root }
    }

    /// Runs `program args` in the source directory with the world's environment and `env`,
    /// `out/` emptied first; what it left there.
    fn run(&self, program: &Path, args: &[&str], env: &[(&str, &str)]) -> Compiled {
        let out = self.root.join("out");
        let _ = fs::remove_dir_all(&out);
        fs::create_dir_all(&out).expect("mkdir out");
        let mut cmd = self.world.command(program);
        cmd.args(args).current_dir(&self.root).envs(env.iter().copied());
        let output = cmd.output().expect("compiler runs");
        let files = crate::wrapper::files_in(&out)
            .into_iter()
            .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), fs::read(&p).expect("read output")))
            .collect();
        Compiled { files, stderr: String::from_utf8_lossy(&output.stderr).into_owned(), code: output.status.code() }
    }

    /// The compile through ferry and plainly, asserted the same; the counters of the ferry one.
    fn same_as_plain(&self, compiler: &str, args: &[&str], env: &[(&str, &str)]) -> (Compiled, serde_json::Value) {
        let plain = self.run(&which(compiler), args, env);
        self.world.ferry_ok(&["stats", "--zero"]);
        let mut with_ferry = vec![compiler];
        with_ferry.extend_from_slice(args);
        let ferry = self.run(&bin("ferry"), &with_ferry, env);
        assert_eq!(ferry, plain, "{compiler} {args:?} through ferry differs from the plain compile");
        (ferry, self.world.stats())
    }
}

fn hits(stats: &serde_json::Value) -> u64 {
    n(stats, "/hits_local") + n(stats, "/hits_remote")
}

#[test]
fn a_hit_gives_back_the_object_every_side_output_and_the_diagnostics_without_running_a_compiler() {
    for compiler in COMPILERS {
        let s = Sources::new(&[
            ("inc/answer.h", "#define ANSWER 42\n"),
            ("a.c", "#include \"answer.h\"\nint answer(void) { int unused; return ANSWER; }\n"),
        ]);
        let args = ["-Wall", "-O1", "-g", "-gsplit-dwarf", "-Iinc", "-MD", "-c", "a.c", "-o", "out/a.o"];
        let (first, stats) = s.same_as_plain(compiler, &args, &[]);
        assert_eq!((hits(&stats), n(&stats, "/misses_by_language/c")), (0, 1), "{compiler}: {stats:#}");
        let names: Vec<&str> = first.files.keys().map(String::as_str).collect();
        assert_eq!(names, ["a.d", "a.dwo", "a.o"], "{compiler}: the object and its side outputs");
        assert!(first.stderr.contains("unused"), "{compiler}: the warning is part of the output: {}", first.stderr);
        // The hit: the same bytes, and no compiler ran (nothing but ferry started a process).
        let trace = s.world.path().join("spawns");
        let (_, stats) = s.same_as_plain(compiler, &args, &[("FERRY_TRACE_SPAWNS", trace.to_str().unwrap())]);
        assert_eq!(n(&stats, "/hits_by_language/c"), 1, "{compiler}: {stats:#}");
        assert_eq!(fs::read_to_string(&trace).unwrap_or_default(), "", "{compiler}: a hit ran a program");
    }
}

#[test]
fn what_the_compiler_looked_for_read_and_ran_is_keyed() {
    let s = Sources::new(&[
        ("b/v.h", "#define V 1\n"),
        ("a/.keep", ""),
        ("v.c", "#include \"v.h\"\n#include \"w.h\"\nint v(void) { return V + W; }\n"),
        ("x/w.h", "#define W 10\n"),
        ("y/w.h", "#define W 20\n"),
    ]);
    let args = ["-O2", "-Ia", "-Ib", "-c", "v.c", "-o", "out/v.o"];
    let x = [("CPATH", "x")];
    s.same_as_plain("gcc", &args, &x);
    let (_, stats) = s.same_as_plain("gcc", &args, &x);
    assert_eq!(hits(&stats), 1, "unchanged: a hit");
    // A header that appears earlier in the search path: looked for, not found the first time.
    write(&s.root.join("a/v.h"), "#define V 2\n");
    let (_, stats) = s.same_as_plain("gcc", &args, &x);
    assert_eq!(hits(&stats), 0, "a header earlier in the path: {stats:#}");
    fs::remove_file(s.root.join("a/v.h")).expect("rm");
    let (_, stats) = s.same_as_plain("gcc", &args, &x);
    assert_eq!(hits(&stats), 1, "the first entry again: {stats:#}");
    // A variable the compiler reads.
    let (_, stats) = s.same_as_plain("gcc", &args, &[("CPATH", "y")]);
    assert_eq!(hits(&stats), 0, "CPATH: {stats:#}");
    // A header edited to the same size.
    write(&s.root.join("b/v.h"), "#define V 3\n");
    let (_, stats) = s.same_as_plain("gcc", &args, &x);
    assert_eq!(hits(&stats), 0, "an edited header: {stats:#}");

    // The compiler proper, not the driver: cc1 from a -B directory, changed by one byte.
    let cc1 = ok(Command::new("gcc").arg("-print-prog-name=cc1").output().expect("gcc"));
    let tools = s.root.join("tools");
    fs::create_dir_all(&tools).expect("mkdir");
    fs::copy(cc1.trim(), tools.join("cc1")).expect("copy cc1");
    let with_b = ["-Btools/", "-O2", "-Ia", "-Ib", "-c", "v.c", "-o", "out/v.o"];
    s.same_as_plain("gcc", &with_b, &x);
    let (_, stats) = s.same_as_plain("gcc", &with_b, &x);
    assert_eq!(hits(&stats), 1, "the copied cc1 unchanged: {stats:#}");
    fs::OpenOptions::new()
        .append(true)
        .open(tools.join("cc1"))
        .and_then(|mut f| {
            use std::io::Write;
            f.write_all(b"\0")
        })
        .expect("append to cc1");
    let (_, stats) = s.same_as_plain("gcc", &with_b, &x);
    assert_eq!((hits(&stats), n(&stats, "/misses")), (0, 1), "one byte more in cc1: {stats:#}");
}

#[test]
fn time_macros_are_not_stored_unless_source_date_epoch_sets_the_time() {
    let s = Sources::new(&[("t.c", "const char *when = __DATE__ \" \" __TIME__;\n")]);
    let args = ["-c", "t.c", "-o", "out/t.o"];
    s.world.ferry_ok(&["stats", "--zero"]);
    s.run(&bin("ferry"), &["gcc", "-c", "t.c", "-o", "out/t.o"], &[]);
    s.run(&bin("ferry"), &["gcc", "-c", "t.c", "-o", "out/t.o"], &[]);
    let stats = s.world.stats();
    assert_eq!((hits(&stats), n(&stats, "/not_stored/time-macro")), (0, 2), "{stats:#}");
    s.same_as_plain("gcc", &args, &[("SOURCE_DATE_EPOCH", "1000000000")]);
    let (_, stats) = s.same_as_plain("gcc", &args, &[("SOURCE_DATE_EPOCH", "1000000000")]);
    assert_eq!(hits(&stats), 1, "a fixed time: {stats:#}");
    let (_, stats) = s.same_as_plain("gcc", &args, &[("SOURCE_DATE_EPOCH", "2000000000")]);
    assert_eq!(hits(&stats), 0, "another time: {stats:#}");
}

#[test]
fn a_compile_in_a_utf8_locale_is_cached_with_its_locale_keyed() {
    // gcc sets its locale from the environment; glibc reads the locale's files where the
    // observer cannot see: they are keyed by content instead, and the variables by value.
    let s = Sources::new(&[("l.c", "int l(void) { return 'x'; }\n")]);
    let args = ["-Wall", "-c", "l.c", "-o", "out/l.o"];
    let utf8 = [("LANG", "C.UTF-8"), ("LC_ALL", "C.UTF-8")];
    let (_, stats) = s.same_as_plain("gcc", &args, &utf8);
    let not_stored = stats.pointer("/not_stored").and_then(serde_json::Value::as_object).map_or(0, |m| m.len());
    assert_eq!(not_stored, 0, "{stats:#}");
    let (_, stats) = s.same_as_plain("gcc", &args, &utf8);
    assert_eq!(hits(&stats), 1, "{stats:#}");
    let (_, stats) = s.same_as_plain("gcc", &args, &[("LANG", "C"), ("LC_ALL", "C")]);
    assert_eq!(hits(&stats), 0, "another locale: {stats:#}");
}

#[test]
fn every_other_call_runs_the_compiler_unchanged_with_its_reason_counted() {
    let s = Sources::new(&[("m.c", "int main(void) { return 3; }\n")]);
    let ferry = bin("ferry");
    s.world.ferry_ok(&["stats", "--zero"]);
    let link = s.run(&ferry, &["gcc", "m.c", "-o", "out/m"], &[]);
    assert_eq!(link.code, Some(0), "{}", link.stderr);
    let ran = Command::new(s.root.join("out/m")).status().expect("runs");
    assert_eq!(ran.code(), Some(3));
    let pre = s.run(&ferry, &["gcc", "-E", "m.c", "-o", "out/m.i"], &[]);
    assert!(pre.files.contains_key("m.i"));
    s.run(&ferry, &["gcc", "-c", "m.c", "-o", "out/m.o", "--frobnicate-the-widgets"], &[]);
    let stats = s.world.stats();
    for reason in ["not-compile-only", "preprocess-only", "unknown-option"] {
        assert_eq!(n(&stats, &format!("/passthrough/{reason}")), 1, "{reason}: {stats:#}");
    }
    // An error is the compiler's, exactly.
    let (failed, _) = s.same_as_plain("gcc", &["-c", "missing.c", "-o", "out/x.o"], &[]);
    assert_ne!(failed.code, Some(0));
}

/// A directory of links made by `ferry setup`, and PATH with it first.
fn masquerade(world: &World) -> (PathBuf, String) {
    let dir = world.path().join("ferry-bin");
    let said = world.ferry_ok(&["setup", "--dir", dir.to_str().unwrap()]);
    assert!(said.contains("export PATH="), "{said}");
    let path = format!("{}:{}", dir.display(), std::env::var("PATH").expect("PATH"));
    (dir, path)
}

#[test]
fn masquerade_links_run_the_next_compiler_of_their_name_and_never_ferry() {
    let s = Sources::new(&[("k.c", "int k(void) { return 7; }\n")]);
    let (dir, path) = masquerade(&s.world);
    for name in ["cc", "gcc", "clang"] {
        let link = dir.join(name);
        assert_eq!(fs::canonicalize(&link).ok(), fs::canonicalize(bin("ferry")).ok(), "{name} links to ferry");
        s.world.ferry_ok(&["stats", "--zero"]);
        let through = s.run(&link, &["-c", "k.c", "-o", "out/k.o"], &[("PATH", &path)]);
        let plain = s.run(&which(name), &["-c", "k.c", "-o", "out/k.o"], &[]);
        assert_eq!(through, plain, "{name} through its link");
        assert_eq!(n(&s.world.stats(), "/misses_by_language/c"), 1, "{name} went through ferry");
    }
    // A link with no compiler of its name after it: a clear error, no loop.
    let alone = s.run(&dir.join("gcc"), &["-c", "k.c"], &[("PATH", dir.to_str().unwrap())]);
    assert_eq!(alone.code, Some(127));
    assert!(alone.stderr.contains("cannot find the compiler 'gcc'"), "{}", alone.stderr);
}

/// A cargo package whose build script compiles C through cc-rs (from crates.io).
fn cc_rs_package(world: &World) -> PathBuf {
    let root = world.path().join("ccrs");
    write(
        &root.join("Cargo.toml"),
        "[package]\nname = \"ccrs\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[build-dependencies]\ncc = \"1\"\n",
    );
    write(
        &root.join("build.rs"),
        "fn main() { println!(\"cargo:rerun-if-changed=native\"); cc::Build::new().file(\"native/answer.c\").file(\"native/twice.c\").include(\"native\").compile(\"answer\"); }\n",
    );
    write(&root.join("native/answer.h"), "#define ANSWER 21\nint twice(int);\n");
    write(&root.join("native/answer.c"), "#include \"answer.h\"\nint answer(void) { return twice(ANSWER); }\n");
    write(&root.join("native/twice.c"), "int twice(int x) { return 2 * x; }\n");
    write(
        &root.join("src/main.rs"),
        "unsafe extern \"C\" { fn answer() -> i32; }\nfn main() { println!(\"{}\", unsafe { answer() }); }\n",
    );
    fetch(&root);
    root
}

/// The package's crates.io dependencies into the registry (a fresh machine may not have them).
fn fetch(root: &Path) {
    let offline = Command::new("cargo").args(["fetch", "--offline"]).current_dir(root).output().expect("cargo");
    if !offline.status.success() {
        ok(Command::new("cargo").arg("fetch").current_dir(root).output().expect("cargo"));
    }
}

fn cargo_build(world: &World, root: &Path, ferry_path: Option<&str>) -> String {
    let mut cmd = crate::wrapper::cargo(world, root);
    cmd.args(["build", "-j2", "--offline"]);
    match ferry_path {
        Some(path) => cmd.env("RUSTC_WRAPPER", bin("ferry")).env("PATH", path),
        None => cmd.env_remove("RUSTC_WRAPPER"),
    };
    crate::wrapper::ok_build(cmd.output().expect("cargo runs"));
    ok(Command::new(root.join("target/debug/ccrs")).output().expect("runs")).trim().to_owned()
}

#[test]
fn cc_rs_compiles_in_a_build_script_hit_after_cargo_clean_and_the_binary_is_the_plain_one() {
    let world = World::new();
    let root = cc_rs_package(&world);
    assert_eq!(cargo_build(&world, &root, None), "42");
    let plain = fs::read(root.join("target/debug/ccrs")).expect("binary");
    let (_, path) = masquerade(&world);
    crate::wrapper::clean(&world, &root);
    world.ferry_ok(&["stats", "--zero"]);
    assert_eq!(cargo_build(&world, &root, Some(&path)), "42");
    let cold = world.stats();
    // Both C files, and cc-rs's probe of a flag.
    let c_compiles = n(&cold, "/misses_by_language/c");
    assert!(c_compiles >= 2, "both C files through ferry: {cold:#}");
    assert_eq!(fs::read(root.join("target/debug/ccrs")).expect("binary"), plain, "cold: the plain binary");
    crate::wrapper::clean(&world, &root);
    world.ferry_ok(&["stats", "--zero"]);
    assert_eq!(cargo_build(&world, &root, Some(&path)), "42");
    let warm = world.stats();
    assert_eq!((n(&warm, "/misses"), n(&warm, "/hits_by_language/c")), (0, c_compiles), "warm: all hits: {warm:#}");
    assert!(n(&warm, "/hits_by_language/rust") >= 2, "{warm:#}");
    assert_eq!(fs::read(root.join("target/debug/ccrs")).expect("binary"), plain, "warm: the plain binary");
    // One C file edited: that one compiles again.
    write(&root.join("native/twice.c"), "int twice(int x) { return 3 * x; }\n");
    world.ferry_ok(&["stats", "--zero"]);
    assert_eq!(cargo_build(&world, &root, Some(&path)), "63");
    let edited = world.stats();
    assert_eq!(n(&edited, "/misses_by_language/c"), 1, "only the edited file: {edited:#}");
}

#[test]
fn make_with_ferry_gcc_hits_every_object_when_warm_and_builds_the_plain_program() {
    let s = Sources::new(&[
        ("lib.h", "int add(int, int);\nint mul(int, int);\n"),
        ("add.c", "#include \"lib.h\"\nint add(int a, int b) { return a + b; }\n"),
        ("mul.c", "#include \"lib.h\"\nint mul(int a, int b) { return a * b; }\n"),
        (
            "main.c",
            "#include <stdio.h>\n#include \"lib.h\"\nint main(void) { printf(\"%d\\n\", add(2, mul(3, 4))); return 0; }\n",
        ),
        (
            "Makefile",
            "OBJS = out/add.o out/mul.o out/main.o\nout/app: $(OBJS)\n\t$(CC) $(OBJS) -o $@\nout/%.o: %.c lib.h\n\t@mkdir -p out\n\t$(CC) -O2 -g -MMD -c $< -o $@\nclean:\n\trm -rf out\n",
        ),
    ]);
    let make = |cc: &str| {
        let out =
            s.world.command("make").args(["-j2", &format!("CC={cc}")]).current_dir(&s.root).output().expect("make");
        ok(out);
        ok(Command::new(s.root.join("out/app")).output().expect("app runs"))
    };
    let outputs = || -> BTreeMap<String, Vec<u8>> {
        crate::wrapper::files_in(&s.root.join("out"))
            .into_iter()
            .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), fs::read(&p).unwrap()))
            .collect()
    };
    assert_eq!(make("gcc"), "14\n");
    let plain = outputs();
    let ferry_gcc = format!("{} gcc", bin("ferry").display());
    for round in ["cold", "warm"] {
        ok(s.world.command("make").arg("clean").current_dir(&s.root).output().expect("make clean"));
        s.world.ferry_ok(&["stats", "--zero"]);
        assert_eq!(make(&ferry_gcc), "14\n");
        assert_eq!(outputs(), plain, "{round}: every object, dependency file and the program as plain make");
        let stats = s.world.stats();
        let expect = if round == "cold" { (0, 3) } else { (3, 0) };
        assert_eq!((hits(&stats), n(&stats, "/misses")), expect, "{round}: {stats:#}");
    }
}

#[test]
fn a_cached_failure_ends_when_the_missing_header_appears() {
    let mut s = Sources::new(&[("f.c", "#include \"gen.h\"\nint f(void) { return GEN; }\n")]);
    s.world.set("FERRY_CACHE_FAILURES", "1");
    let args = ["-c", "f.c", "-o", "out/f.o"];
    let (failed, _) = s.same_as_plain("gcc", &args, &[]);
    assert_ne!(failed.code, Some(0));
    let (replayed, stats) = s.same_as_plain("gcc", &args, &[]);
    assert_eq!((replayed.code, hits(&stats)), (failed.code, 1), "the failure replayed: {stats:#}");
    write(&s.root.join("gen.h"), "#define GEN 5\n");
    let (built, stats) = s.same_as_plain("gcc", &args, &[]);
    assert_eq!((built.code, hits(&stats)), (Some(0), 0), "the header appeared: {stats:#}");
}

#[test]
fn explain_shows_a_c_compile_s_keys_and_what_it_read() {
    let s = Sources::new(&[("inc/e.h", "#define E 1\n"), ("e.c", "#include \"e.h\"\nint e(void) { return E; }\n")]);
    let args = ["gcc", "-Iinc", "-c", "e.c", "-o", "out/e.o"];
    s.run(&bin("ferry"), &args, &[]);
    // The entry is stored once the compiler's answer is out; `ferry stats` waits for that.
    s.world.stats();
    let mut cmd = s.world.command(bin("ferry"));
    cmd.arg("explain").arg("--").args(args).current_dir(&s.root);
    let text = ok(cmd.output().expect("ferry explain"));
    assert!(text.starts_with("source e.c  (manifest 0: a hit)"), "{text}");
    assert!(text.contains("\ngcc -Iinc -c e.c -o out/e.o\n"), "{text}");
    for part in ["domain = cc-compile", "driver content = ", "/inc/e.h = ", "absent:"] {
        assert!(text.contains(part), "{part} missing from:\n{text}");
    }
}

#[test]
fn cmake_with_ferry_as_the_compiler_launcher_hits_every_object_when_warm() {
    let s = Sources::new(&[
        (
            "CMakeLists.txt",
            "cmake_minimum_required(VERSION 3.10)\nproject(cm C CXX)\nadd_executable(cm main.c twice.cpp)\n",
        ),
        ("main.c", "#include <stdio.h>\nint twice(int);\nint main(void) { printf(\"%d\\n\", twice(21)); return 0; }\n"),
        ("twice.cpp", "extern \"C\" int twice(int x) { return 2 * x; }\n"),
    ]);
    let build = s.root.join("build");
    let cmake = |launcher: bool| -> BTreeMap<String, Vec<u8>> {
        let _ = fs::remove_dir_all(&build);
        let mut configure = s.world.command("cmake");
        configure.args(["-S", ".", "-B", "build", "-DCMAKE_BUILD_TYPE=RelWithDebInfo"]).current_dir(&s.root);
        if launcher {
            let ferry = bin("ferry").display().to_string();
            configure.arg(format!("-DCMAKE_C_COMPILER_LAUNCHER={ferry}"));
            configure.arg(format!("-DCMAKE_CXX_COMPILER_LAUNCHER={ferry}"));
        }
        ok(configure.output().expect("cmake"));
        s.world.ferry_ok(&["stats", "--zero"]);
        ok(s.world.command("cmake").args(["--build", "build", "-j2"]).current_dir(&s.root).output().expect("build"));
        assert_eq!(ok(Command::new(build.join("cm")).output().expect("cm runs")), "42\n");
        crate::wrapper::files_under(&build.join("CMakeFiles/cm.dir"))
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "o"))
            .map(|p| (p.display().to_string(), fs::read(&p).unwrap()))
            .collect()
    };
    let plain = cmake(false);
    assert_eq!(plain.len(), 2, "{plain:#?}");
    assert_eq!(cmake(true), plain, "cold: the plain objects");
    let cold = s.world.stats();
    assert_eq!((n(&cold, "/misses_by_language/c"), n(&cold, "/misses_by_language/c++")), (1, 1), "{cold:#}");
    assert_eq!(cmake(true), plain, "warm: the plain objects");
    let warm = s.world.stats();
    assert_eq!((hits(&warm), n(&warm, "/misses")), (2, 0), "{warm:#}");
}

#[test]
fn a_real_sys_crate_with_bundled_c_replays_every_c_compile_and_builds_the_plain_binary() {
    // zstd-sys compiles zstd's C library (and its assembler) through cc-rs in its build script.
    let world = World::new();
    let root = world.path().join("sys");
    write(
        &root.join("Cargo.toml"),
        "[package]\nname = \"sys\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[dependencies]\nzstd-sys = \"2\"\n",
    );
    write(
        &root.join("src/main.rs"),
        "fn main() { println!(\"{}\", unsafe { zstd_sys::ZSTD_versionNumber() } > 10000); }\n",
    );
    fetch(&root);
    let trace = world.path().join("spawns");
    let build = |path: Option<&str>| -> (Vec<u8>, serde_json::Value) {
        crate::wrapper::clean(&world, &root);
        world.ferry_ok(&["stats", "--zero"]);
        let mut cmd = crate::wrapper::cargo(&world, &root);
        cmd.args(["build", "-j2", "--offline"]);
        match path {
            Some(path) => cmd.env("RUSTC_WRAPPER", bin("ferry")).env("PATH", path).env("FERRY_TRACE_SPAWNS", &trace),
            None => cmd.env_remove("RUSTC_WRAPPER"),
        };
        let _ = fs::remove_file(&trace);
        crate::wrapper::ok_build(cmd.output().expect("cargo runs"));
        assert_eq!(ok(Command::new(root.join("target/debug/sys")).output().expect("runs")).trim(), "true");
        (fs::read(root.join("target/debug/sys")).expect("binary"), world.stats())
    };
    let (plain, _) = build(None);
    let (_, path) = masquerade(&world);
    let (cold, stats) = build(Some(&path));
    let c_compiles = n(&stats, "/misses_by_language/c") + n(&stats, "/misses_by_language/assembler");
    assert!(c_compiles >= 20, "zstd's C files through ferry: {stats:#}");
    assert_eq!(cold, plain, "cold: the plain binary");
    let (warm, stats) = build(Some(&path));
    assert_eq!(warm, plain, "warm: the plain binary");
    assert_eq!(n(&stats, "/misses"), 0, "warm: {stats:#}");
    assert_eq!(n(&stats, "/hits_by_language/c") + n(&stats, "/hits_by_language/assembler"), c_compiles, "{stats:#}");
    // What ferry ran: cc-rs's probes (`-E`) and cargo's queries; no compile.
    let ran = fs::read_to_string(&trace).unwrap_or_default();
    assert!(!ran.lines().any(|l| l.split(' ').any(|a| a == "-c")), "a warm build compiled:\n{ran}");
}

#[test]
fn every_change_of_the_command_line_reaches_the_object() {
    // What ccache's rewriting of options got wrong: the order of -D and -U, -Wp,-D after every
    // -D, one option with a space against two that join to the same text.
    let s = Sources::new(&[(
        "d.c",
        "#ifdef V\nint v(void) { return V; }\n#else\nint v(void) { return -1; }\n#endif\nconst char *w = W;\n",
    )]);
    let lines: [&[&str]; 6] = [
        &["-DV=1", "-DW=\"a b\"", "-c", "d.c", "-o", "out/d.o"],
        &["-DV=2", "-DW=\"a b\"", "-c", "d.c", "-o", "out/d.o"],
        &["-DV=2", "-UV", "-DW=\"a b\"", "-c", "d.c", "-o", "out/d.o"],
        &["-UV", "-DV=2", "-DW=\"a b\"", "-c", "d.c", "-o", "out/d.o"],
        &["-DV=2", "-Wp,-UV", "-DW=\"a b\"", "-c", "d.c", "-o", "out/d.o"],
        &["-DV=2", "-DW=\"a", "b\"", "-c", "d.c", "-o", "out/d.o"],
    ];
    let mut objects = Vec::new();
    for args in lines {
        let (compiled, stats) = s.same_as_plain("gcc", args, &[]);
        assert_eq!(hits(&stats), 0, "{args:?} is a new command line: {stats:#}");
        objects.push(compiled.files.get("d.o").cloned());
    }
    // The first five compile (and differ where the macros differ); each ran, none was replayed.
    assert_ne!(objects[0], objects[1]);
    assert_ne!(objects[1], objects[2]);
}

#[test]
fn concurrent_compiles_of_one_source_all_give_the_plain_object() {
    // Eight compiles of one entry at once: cold (all miss and store), then warm (all hit), then
    // with the entry removed while they look it up (seven may look while the first stores).
    let s = Sources::new(&[("p.c", "int p(int x) { return x * 7; }\n")]);
    let args = ["-O2", "-MD", "-c", "p.c", "-o", "out/p.o"];
    let plain = s.run(&which("gcc"), &args, &[]);
    let ferry = bin("ferry");
    for round in ["cold", "warm", "racing a store"] {
        if round == "racing a store" {
            let _ = fs::remove_dir_all(s.world.cache_dir());
        }
        s.world.ferry_ok(&["stats", "--zero"]);
        let _ = fs::remove_dir_all(s.root.join("out"));
        fs::create_dir_all(s.root.join("out")).expect("mkdir");
        let children: Vec<_> = (0..8)
            .map(|_| {
                let mut cmd = s.world.command(&ferry);
                cmd.arg("gcc").args(args).current_dir(&s.root);
                cmd.spawn().expect("ferry gcc")
            })
            .collect();
        for mut child in children {
            assert!(child.wait().expect("wait").success(), "{round}");
        }
        for file in ["p.o", "p.d"] {
            let got = fs::read(s.root.join("out").join(file)).expect("output");
            assert_eq!(Some(&got), plain.files.get(file), "{round}: {file}");
        }
        let stats = s.world.stats();
        assert_eq!(hits(&stats) + n(&stats, "/misses"), 8, "{round}: {stats:#}");
        if round == "warm" {
            assert_eq!(hits(&stats), 8, "{stats:#}");
        }
    }
}
