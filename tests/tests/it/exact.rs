//! Exact by construction: each kind of input the differential oracle (`oracle.rs`) generates, as
//! a test of its own. Each builds a generated workspace through ferry, changes one thing of that
//! kind, builds again, and checks the program against the change; where ferry may not store a
//! result, that it says why. The oracle found the whole-environment case on its own
//! (`a_program_a_proc_macro_runs_reads_variables_set_later`).

use std::fs;
use std::process::Command;

use ferry_tests::{World, bin, installed_sysroot, ok};

use crate::inputs::{Project, package};
use crate::wrapper::n;

/// A workspace of a proc-macro `mac`, whose `value!()` expands to the string `body` computes
/// (`dir()` is the using crate's directory), a library `lib` holding it, and a binary `app`
/// printing it; plus `files` (relative to the library).
fn macro_project(body: &str, files: &[(&str, &str)]) -> Project {
    let mac = format!(
        "use proc_macro::TokenStream;\n#[allow(dead_code)]\n\
         fn dir() -> std::path::PathBuf {{ std::env::var(\"CARGO_MANIFEST_DIR\").unwrap().into() }}\n\
         #[proc_macro]\npub fn value(_: TokenStream) -> TokenStream {{\n    let v: String = {body};\n    \
         format!(\"{{:?}}\", v).parse().unwrap()\n}}\n"
    );
    let mut all: Vec<(String, String)> = vec![
        ("Cargo.toml".into(), "[workspace]\nresolver = \"2\"\nmembers = [\"mac\", \"lib\", \"app\"]\n".into()),
        ("mac/Cargo.toml".into(), package("mac", "[lib]\nproc-macro = true", &[])),
        ("mac/src/lib.rs".into(), mac),
        ("lib/Cargo.toml".into(), package("lib", "", &["mac"])),
        ("lib/src/lib.rs".into(), "pub const VALUE: &str = mac::value!();\n".into()),
        ("app/Cargo.toml".into(), package("app", "", &["lib"])),
        ("app/src/main.rs".into(), "fn main() { println!(\"{}\", lib::VALUE); }\n".into()),
    ];
    all.extend(files.iter().map(|(p, t)| (format!("lib/{p}"), (*t).to_owned())));
    let refs: Vec<(&str, &str)> = all.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    Project::new(&refs)
}

/// Rebuilds after `change`, making cargo compile the library again (as any edit of it would).
fn rebuild(p: &Project, env: &[(&str, &str)]) -> crate::inputs::Built {
    p.touch("lib/src/lib.rs");
    p.build_with(env).ok()
}

#[test]
fn variables_rustc_reports_reading_are_keyed_whatever_their_name() {
    // CI, HOME and TMPDIR are names rustc itself reads (or used to be on a not-keyed list);
    // read by the crate (`option_env!`, `env!`), rustc lists them in dep-info and they are keyed.
    let real_home = std::env::var("HOME").expect("HOME");
    let cargo_home = std::env::var("CARGO_HOME").unwrap_or_else(|_| format!("{real_home}/.cargo"));
    let rustup_home = std::env::var("RUSTUP_HOME").unwrap_or_else(|_| format!("{real_home}/.rustup"));
    let p = Project::new(&[
        ("Cargo.toml", &package("envs", "", &[])),
        (
            "src/lib.rs",
            "pub fn values() -> String { format!(\"{:?} {:?} {}\", option_env!(\"CI\"), option_env!(\"TMPDIR\"), env!(\"HOME\")) }\n",
        ),
        ("src/main.rs", "fn main() { println!(\"{}\", envs::values()); }\n"),
    ]);
    let homes = [("CARGO_HOME", cargo_home.as_str()), ("RUSTUP_HOME", rustup_home.as_str())];
    fn join<'a>(a: &[(&'a str, &'a str)], b: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
        a.iter().chain(b).copied().collect()
    }
    let with = |extra: &[(&'static str, &'static str)]| join(&homes, extra);
    p.build_with(&with(&[("HOME", "/home/a")])).ok();
    assert_eq!(p.run("envs"), "None None /home/a");
    p.build_with(&with(&[("HOME", "/home/b")])).ok();
    assert_eq!(p.run("envs"), "None None /home/b", "env!(\"HOME\") is an input");
    p.build_with(&with(&[("HOME", "/home/b"), ("CI", "true")])).ok();
    assert_eq!(p.run("envs"), "Some(\"true\") None /home/b", "option_env!(\"CI\") is an input");
    let tmp = p.world.path().join("tmp-b");
    fs::create_dir_all(&tmp).expect("mkdir");
    let tmp = tmp.display().to_string();
    p.build_with(&join(&homes, &[("HOME", "/home/b"), ("CI", "true"), ("TMPDIR", &tmp)])).ok();
    assert_eq!(p.run("envs"), format!("Some(\"true\") Some({tmp:?}) /home/b"), "option_env!(\"TMPDIR\") is an input");
    // Back to the first values: the first build's entries serve them.
    let b = p.build_with(&with(&[("HOME", "/home/a")])).ok();
    assert_eq!(p.run("envs"), "None None /home/a");
    assert_eq!(b.misses(), 0, "{:#}", b.stats);
}

#[test]
fn a_proc_macro_s_lookups_are_keyed_whatever_the_name() {
    // TERM and TMPDIR are on rustc's own list; a proc-macro's lookup of them is keyed.
    let p = macro_project(
        "format!(\"{}|{}\", std::env::var(\"TERM\").unwrap_or_default(), std::env::var(\"TMPDIR\").unwrap_or_default())",
        &[],
    );
    p.build_with(&[("TERM", "xterm")]).ok();
    assert_eq!(p.run("app"), "xterm|");
    rebuild(&p, &[("TERM", "dumb")]);
    assert_eq!(p.run("app"), "dumb|", "a proc-macro's TERM is an input");
    let b = rebuild(&p, &[("TERM", "xterm")]);
    assert_eq!(p.run("app"), "xterm|");
    assert_eq!(b.misses(), 0, "the first build's entry: {:#}", b.stats);
}

#[test]
fn a_file_a_proc_macro_opens_for_reading_and_writing_is_an_input() {
    // What sqlx's query! does with an SQLite database: open it read-write, read the schema.
    let p = macro_project(
        "{ use std::io::Read; let mut s = String::new(); \
          std::fs::OpenOptions::new().read(true).write(true).open(dir().join(\"schema.db\")).unwrap().read_to_string(&mut s).unwrap(); s }",
        &[("schema.db", "v1")],
    );
    p.build().ok();
    assert_eq!(p.run("app"), "v1");
    p.write("lib/schema.db", "v2");
    rebuild(&p, &[]);
    assert_eq!(p.run("app"), "v2", "a migrated schema must reach the program");
}

#[test]
fn a_library_a_proc_macro_loads_with_dlopen_is_an_input() {
    let p = macro_project(
        "{ unsafe extern \"C\" { fn dlopen(f: *const std::ffi::c_char, m: i32) -> *mut std::ffi::c_void; \
            fn dlsym(h: *mut std::ffi::c_void, s: *const std::ffi::c_char) -> *mut std::ffi::c_void; } \
           let p = std::ffi::CString::new(dir().join(\"libdyn.so\").to_str().unwrap()).unwrap(); \
           let h = unsafe { dlopen(p.as_ptr(), 2) }; assert!(!h.is_null()); \
           let f: extern \"C\" fn() -> i32 = unsafe { std::mem::transmute(dlsym(h, c\"dyn_value\".as_ptr())) }; \
           f().to_string() }",
        &[("dyn.c", "int dyn_value(void) { return 1; }\n")],
    );
    let cc = |p: &Project| {
        let lib = p.root.join("lib");
        ok(Command::new("cc")
            .args(["-shared", "-fPIC", "-o", "libdyn.so", "dyn.c"])
            .current_dir(lib)
            .output()
            .expect("cc"));
    };
    cc(&p);
    p.build().ok();
    assert_eq!(p.run("app"), "1");
    p.write("lib/dyn.c", "int dyn_value(void) { return 2; }\n");
    cc(&p);
    rebuild(&p, &[]);
    assert_eq!(p.run("app"), "2", "an upgraded library (bindgen's libclang) must be an input");
}

#[test]
fn a_path_through_a_symbolic_link_is_resolved_as_the_kernel_does() {
    // `#[path = "../common.rs"]` in a module that lives in a linked directory: the kernel resolves
    // `linked` first, so the file is shared/common.rs, never src/common.rs (the decoy).
    let p = Project::new(&[
        ("Cargo.toml", &package("paths", "", &[])),
        ("src/lib.rs", "mod linked;\npub fn value() -> String { linked::value() }\n"),
        ("src/main.rs", "fn main() { println!(\"{}\", paths::value()); }\n"),
        (
            "shared/one/mod.rs",
            "#[path = \"../common.rs\"]\nmod common;\npub fn value() -> String { common::VALUE.into() }\n",
        ),
        ("shared/common.rs", "pub const VALUE: &str = \"real\";\n"),
        ("src/common.rs", "pub const VALUE: &str = \"decoy\";\n"),
    ]);
    std::os::unix::fs::symlink("../shared/one", p.root.join("src/linked")).expect("symlink");
    p.build().ok();
    assert_eq!(p.run("paths"), "real");
    p.write("shared/common.rs", "pub const VALUE: &str = \"real, edited\";\n");
    p.touch("src/lib.rs");
    p.build().ok();
    assert_eq!(p.run("paths"), "real, edited", "an edit of the file rustc really read");
    // The decoy is not an input: editing it is a hit.
    p.write("src/common.rs", "pub const VALUE: &str = \"decoy, edited\";\n");
    p.touch("src/lib.rs");
    let b = p.build().ok();
    assert_eq!(p.run("paths"), "real, edited");
    assert_eq!(b.misses(), 0, "{:#}", b.stats);
}

#[test]
fn what_a_proc_macro_decides_from_stat_is_keyed() {
    let p = macro_project(
        "{ use std::os::unix::fs::PermissionsExt; let m = std::fs::metadata(dir().join(\"data.txt\")).unwrap(); \
           format!(\"{} {}\", m.len(), m.permissions().mode() & 0o111 != 0) }",
        &[("data.txt", "12345")],
    );
    p.build().ok();
    assert_eq!(p.run("app"), "5 false");
    p.write("lib/data.txt", "1234567");
    rebuild(&p, &[]);
    assert_eq!(p.run("app"), "7 false", "the size it read from stat");
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(p.root.join("lib/data.txt"), fs::Permissions::from_mode(0o755)).expect("chmod");
    rebuild(&p, &[]);
    assert_eq!(p.run("app"), "7 true", "the mode it read from stat");
}

#[test]
fn a_same_size_edit_with_the_mtime_put_back_is_seen() {
    let p = macro_project("std::fs::read_to_string(dir().join(\"data.txt\")).unwrap()", &[("data.txt", "abc")]);
    p.build().ok();
    let path = p.root.join("lib/data.txt");
    let mtime = fs::metadata(&path).and_then(|m| m.modified()).expect("mtime");
    fs::write(&path, "xyz").expect("write");
    fs::File::options().write(true).open(&path).and_then(|f| f.set_modified(mtime)).expect("mtime back");
    rebuild(&p, &[]);
    assert_eq!(p.run("app"), "xyz");
}

#[test]
fn a_file_under_the_toolchain_directory_that_its_id_does_not_cover_is_an_input() {
    let share = installed_sysroot().join(format!("share/ferry-test-{}", std::process::id()));
    fs::create_dir_all(&share).expect("mkdir under the sysroot");
    struct Remove(std::path::PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
    let _remove = Remove(share.clone());
    let file = share.join("data.txt");
    fs::write(&file, "one").expect("write");
    let p = macro_project(&format!("std::fs::read_to_string({:?}).unwrap()", file.display().to_string()), &[]);
    p.build().ok();
    assert_eq!(p.run("app"), "one");
    fs::write(&file, "two").expect("write");
    rebuild(&p, &[]);
    assert_eq!(p.run("app"), "two", "only what the ToolchainId covers is left out as the toolchain's");
}

#[test]
fn a_program_a_proc_macro_runs_reads_variables_set_later() {
    // Found by the oracle: a shell reads `$FERRY_CASE_LEVEL` from its environment, not through
    // getenv; unset at the first build, set at the second.
    let p = macro_project(
        "String::from_utf8(std::process::Command::new(\"sh\").args([\"-c\", \"printf '%s|' \\\"$FERRY_CASE_LEVEL\\\"; cat data.txt\"]).current_dir(dir()).output().unwrap().stdout).unwrap()",
        &[("data.txt", "d")],
    );
    p.build().ok();
    assert_eq!(p.run("app"), "|d");
    rebuild(&p, &[("FERRY_CASE_LEVEL", "debug")]);
    assert_eq!(p.run("app"), "debug|d", "a variable set later reaches the program");
    p.write("lib/data.txt", "e");
    rebuild(&p, &[("FERRY_CASE_LEVEL", "debug")]);
    assert_eq!(p.run("app"), "debug|e", "a file the program read");
}

#[test]
fn a_proc_macro_s_side_effect_happens_on_every_build() {
    // sqlx's offline data: the macro writes a file beside the workspace while it expands. Such a
    // compile is not stored, so every build writes the file, as plain cargo's would.
    let p =
        macro_project("{ std::fs::write(dir().join(\"../side.txt\"), \"written\").unwrap(); \"v\".to_string() }", &[]);
    let b = p.build().ok();
    assert_eq!(n(&b.stats, "/not_stored/wrote-outside-outputs"), 1, "{:#}", b.stats);
    fs::remove_file(p.root.join("side.txt")).expect("the macro wrote it");
    p.clean();
    p.build().ok();
    assert!(p.root.join("side.txt").is_file(), "a build after a clean writes it again");
}

#[test]
fn an_input_changed_while_the_compile_runs_is_not_stored() {
    // The macro reads its input, then changes it with the mtime put back (an editor racing the
    // build, to the second): the result describes neither content, so it is not stored.
    let p = macro_project(
        "{ let p = dir().join(\"data.txt\"); let v = std::fs::read_to_string(&p).unwrap(); \
           let t = std::fs::metadata(&p).unwrap().modified().unwrap(); \
           std::fs::write(&p, \"changed\").unwrap(); \
           std::fs::File::options().write(true).open(&p).unwrap().set_modified(t).unwrap(); v }",
        &[("data.txt", "first")],
    );
    let b = p.build().ok();
    assert_eq!(p.run("app"), "first");
    assert_eq!(n(&b.stats, "/not_stored/inputs-changed-during-compile"), 1, "{:#}", b.stats);
}

#[test]
fn a_cache_dir_on_a_noexec_mount_still_observes_and_caches() {
    let files =
        [("Cargo.toml", package("noexec", "", &[])), ("src/main.rs", "fn main() { println!(\"ran\"); }\n".into())];
    let files: Vec<(&str, &str)> = files.iter().map(|(a, b)| (*a, b.as_str())).collect();
    let mut p = Project::new(&files);
    let cache = p.world.path().join("noexec-cache");
    fs::create_dir_all(&cache).expect("mkdir");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "noexec,size=512m", "ferry-test"])
        .arg(&cache)
        .status()
        .expect("mount runs");
    assert!(mounted.success(), "mounting a tmpfs (the tests run as root)");
    p.set_env("FERRY_CACHE_DIR", &cache);
    let first = p.build().ok();
    assert!(!first.log.contains("cannot be preloaded"), "the loader's error reached the build:\n{}", first.log);
    assert_eq!(n(&first.stats, "/misses"), 1, "{:#}", first.stats);
    assert!(first.stats["not_stored"].as_object().is_none_or(|m| m.is_empty()), "{:#}", first.stats);
    p.clean();
    let second = p.build().ok();
    assert_eq!(p.run("noexec"), "ran");
    assert_eq!(n(&second.stats, "/hits_local"), 1, "{:#}", second.stats);
    let _ = Command::new("umount").arg("-l").arg(&cache).status();
}

#[test]
fn a_command_line_near_the_exec_limit_compiles_as_plainly() {
    // The environment filled to within a few KiB of the system's limit: rustc still starts as
    // cargo asked (the observer's variables would not fit), and the result is not stored.
    let world = World::new();
    let dir = world.path().join("limit");
    fs::create_dir_all(&dir).expect("mkdir");
    fs::write(dir.join("near.rs"), "pub fn f() -> u32 { 1 }\n").expect("write");
    // SAFETY: sysconf has no preconditions.
    let limit = unsafe { libc::sysconf(libc::_SC_ARG_MAX) } as usize;
    let mut cmd = world.command(bin("ferry"));
    cmd.arg(crate::wrapper::rustc()).args(["--crate-name", "near", "--crate-type", "lib", "near.rs"]).current_dir(&dir);
    let used: usize = std::env::vars_os().map(|(k, v)| k.len() + v.len() + 10).sum::<usize>() + 2048;
    let mut left = limit.saturating_sub(used + 6 * 1024);
    let mut i = 0;
    while left > 1000 {
        let size = left.min(100_000) - 100;
        cmd.env(format!("FERRY_CASE_FILL_{i}"), "x".repeat(size));
        left -= size + 100;
        i += 1;
    }
    let out = cmd.output().expect("ferry runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(dir.join("libnear.rlib").is_file());
    let s = world.stats();
    assert_eq!(n(&s, "/not_stored/unobserved: exec-limit"), 1, "{s:#}");
}

#[test]
fn verification_finds_removes_counts_and_explains_an_entry_made_wrong() {
    use ferry_cache::{CacheKey, DiskConfig, DiskStore, Entry, Store};
    let p = Project::new(&[
        ("Cargo.toml", "[workspace]\nresolver = \"2\"\nmembers = [\"val\", \"app\"]\n"),
        ("val/Cargo.toml", &package("val", "", &[])),
        ("val/src/lib.rs", "pub fn v() -> u32 { 1 }\n"),
        ("app/Cargo.toml", &package("app", "", &["val"])),
        ("app/src/main.rs", "fn main() { println!(\"{}\", val::v()); }\n"),
    ]);
    p.build().ok();
    p.edit("val/src/lib.rs", "{ 1 }", "{ 2 }");
    p.build().ok();
    assert_eq!(p.run("app"), "2");
    // The key each compile of `val` was stored under, oldest first.
    let mut records: Vec<std::path::PathBuf> =
        crate::wrapper::files_under(&p.world.cache_dir().join("explain")).into_iter().collect();
    records.sort();
    let keys: Vec<CacheKey> = records
        .iter()
        .filter_map(|r| serde_json::from_slice::<serde_json::Value>(&fs::read(r).ok()?).ok())
        .filter(|r| r["crate"] == "val")
        .filter_map(|r| r["result_key"].as_str()?.parse().ok())
        .collect();
    assert_eq!(keys.len(), 2, "{records:?}");
    // Make the entry of `v() -> 1` wrong: the payload of `v() -> 2`, its checksum valid again.
    let store = DiskStore::open(p.world.cache_dir().join("cache"), DiskConfig::default()).expect("store");
    let right = store.get(&keys[1]).expect("read").expect("entry");
    assert!(store.remove(&keys[0]).expect("remove"), "the first entry is there");
    store.put(&Entry { key: keys[0], ..right }).expect("put the wrong entry");
    // A hit on it, verified: the build replays the wrong bytes (cargo has its answer at once),
    // and the detached verification finds, removes, counts and keeps them.
    p.edit("val/src/lib.rs", "{ 2 }", "{ 1 }");
    let b = p.build_with(&[("FERRY_VERIFY", "1")]).ok();
    assert_eq!(p.run("app"), "2", "the wrong entry was served (the premise of this test)");
    assert_eq!(n(&b.stats, "/verify_mismatches"), 1, "{:#}", b.stats);
    assert!(n(&b.stats, "/verified") >= 1, "the right hit (app) verifies: {:#}", b.stats);
    assert!(store.get(&keys[0]).expect("read").is_none(), "the wrong entry is removed");
    let explained = p.world.ferry_ok(&["explain", "--mismatches"]);
    assert!(explained.contains("crate val") && explained.contains("libval"), "{explained}");
    assert!(explained.contains("removed from the local tier"), "{explained}");
    // The next build compiles it again, right.
    p.touch("val/src/lib.rs");
    let b = p.build().ok();
    assert_eq!(p.run("app"), "1");
    assert!(b.misses() >= 1, "{:#}", b.stats);
}

/// What the observer cannot see into never becomes an entry: a proc-macro that takes its answer
/// from a socket, runs a statically linked program through `execveat` (which reads a file no
/// record names), or starts a child that cannot open the observation log. Each compile is not
/// stored, counted under its reason, and after the answer changes the program says the new one,
/// as plain cargo's does (a stored entry would replay the old).
#[test]
fn what_the_observer_cannot_see_into_is_never_stored() {
    let answer = std::sync::Arc::new(std::sync::Mutex::new("first".to_owned()));
    let port = serve_answers(answer.clone());
    let socket = macro_project(
        "{ use std::io::Read; let port: u16 = std::fs::read_to_string(dir().join(\"port.txt\")).unwrap().trim().parse().unwrap(); \
           let mut s = std::net::TcpStream::connect((\"127.0.0.1\", port)).unwrap(); \
           let mut v = String::new(); s.read_to_string(&mut v).unwrap(); v }",
        &[("port.txt", &port.to_string())],
    );
    let b = socket.build().ok();
    assert_eq!(socket.run("app"), "first");
    assert_eq!(n(&b.stats, "/not_stored/unobserved: network-connect"), 1, "{:#}", b.stats);
    *answer.lock().unwrap() = "second".to_owned();
    rebuild(&socket, &[]);
    assert_eq!(socket.run("app"), "second");

    // A static program that exits with the length of a data file.
    let execveat = macro_project(
        "{ use std::ffi::{CString, c_char}; \
           unsafe extern \"C\" { fn fork() -> i32; fn execveat(d: i32, p: *const c_char, a: *const *const c_char, e: *const *const c_char, f: i32) -> i32; fn waitpid(p: i32, s: *mut i32, o: i32) -> i32; fn _exit(c: i32) -> !; } \
           let prog = CString::new(dir().join(\"answer\").to_str().unwrap()).unwrap(); \
           let argv = [prog.as_ptr(), std::ptr::null()]; let envp: [*const c_char; 1] = [std::ptr::null()]; \
           let mut status = 0; \
           unsafe { let pid = fork(); if pid == 0 { execveat(-100, prog.as_ptr(), argv.as_ptr(), envp.as_ptr(), 0); _exit(127); } waitpid(pid, &mut status, 0); } \
           format!(\"exit {}\", (status >> 8) & 0xff) }",
        &[("data.txt", "12345")],
    );
    let data = execveat.root.join("lib/data.txt");
    let source = execveat.root.join("answer.rs");
    fs::write(
        &source,
        format!("fn main() {{ std::process::exit(std::fs::read({:?}).map_or(99, |d| d.len() as i32)) }}\n", data),
    )
    .expect("write");
    let built = Command::new(installed_sysroot().join("bin/rustc"))
        .args(["-C", "target-feature=+crt-static", "-o"])
        .arg(execveat.root.join("lib/answer"))
        .arg(&source)
        .output()
        .expect("rustc runs");
    ok(built);
    let b = execveat.build().ok();
    assert_eq!(execveat.run("app"), "exit 5");
    assert_eq!(n(&b.stats, "/not_stored/unobserved: static-executable"), 1, "{:#}", b.stats);
    execveat.write("lib/data.txt", "1234567");
    rebuild(&execveat, &[]);
    assert_eq!(execveat.run("app"), "exit 7");

    // `cat` told to log where it cannot: it runs, reads the file, and writes no record.
    let hidden = macro_project(
        "{ let out = std::process::Command::new(\"/bin/cat\").arg(dir().join(\"data.txt\")) \
             .env(\"FERRY_OBSERVE_LOG\", \"/nonexistent/ferry-observe.log\").output().unwrap(); \
           String::from_utf8(out.stdout).unwrap() }",
        &[("data.txt", "first")],
    );
    let b = hidden.build().ok();
    assert_eq!(hidden.run("app"), "first");
    assert_eq!(n(&b.stats, "/not_stored/unobserved: unobserved-child"), 1, "{:#}", b.stats);
    hidden.write("lib/data.txt", "second");
    rebuild(&hidden, &[]);
    assert_eq!(hidden.run("app"), "second");
}

/// A TCP server on loopback that answers every connection with `answer` and closes it; it stops
/// by itself after 20 connections or two minutes.
fn serve_answers(answer: std::sync::Arc<std::sync::Mutex<String>>) -> u16 {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        let mut served = 0;
        while served < 20 && std::time::Instant::now() < deadline {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    let text = answer.lock().unwrap().clone();
                    let _ = stream.set_nonblocking(false);
                    let _ = stream.write_all(text.as_bytes());
                    served += 1;
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        }
    });
    port
}
