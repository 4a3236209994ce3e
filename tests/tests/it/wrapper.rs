//! The compiler wrapper end to end: real cargo builds of a generated workspace (a proc-macro, a
//! build script, `include!`/`include_str!`/`env!` inputs, a dependency chain and a binary) through
//! `RUSTC_WRAPPER=ferry`, compared byte for byte with plain builds; and direct `ferry rustc ...`
//! calls for what a cargo build cannot provoke (16 writers of one key, a writer killed mid-write).
//! Nothing is mocked: damaged entries are damaged files, a full disk is a 1 MiB tmpfs.
//!
//! Every test builds in its own [`World`] (own cache dir, stats and spawn trace). Helpers, including
//! the workspace generator, are at the bottom of the file.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant, SystemTime};

use ferry_cache::{CacheKey, Entry, EntryKind};
use ferry_tests::{World, bin, installed_sysroot, ok};
use serde_json::Value;

/// Every rustc compile of the generated workspace, by crate name (sorted); all are cacheable.
const UNITS: &[&str] = &["app", "base", "build_script_build", "envy", "generated", "macros", "middle", "texty", "top"];

/// `UNITS.len()`, as the counters count.
const UNIT_COUNT: u64 = UNITS.len() as u64;

/// What the generated binary prints with `FERRY_TEST_VALUE=one` and unedited sources.
const APP_LINE: &str =
    "answer=42 chain=base+middle+top generated=from a build script text=hello from a text file value=one name=envy";

#[test]
fn outputs_are_byte_identical_and_a_rebuild_is_all_hits_without_rustc() {
    let world = world();
    let ws = workspace_in(&world, "ws");
    let plain = ok_build(cargo_build(&world, &ws, false));
    let expected = outputs(&ws);
    clean(&world, &ws);
    spawns(&world);

    let cold = ok_build(cargo_build(&world, &ws, true));
    assert_same_outputs(&expected, &outputs(&ws));
    assert_eq!(build_log(&cold), build_log(&plain), "cargo's output through ferry differs from a plain build");
    assert_eq!(spawns(&world).compiled(), UNITS, "a cold build compiles every unit once");
    let s = world.stats();
    let cold_counts = (n(&s, "/misses"), n(&s, "/hits_local"), n(&s, "/compiled_local"));
    assert_eq!(cold_counts, (UNIT_COUNT, 0, UNIT_COUNT), "{s:#}");
    assert_clean_run(&s);

    clean(&world, &ws);
    ok_build(cargo_build(&world, &ws, true));
    let s = world.stats();
    assert_eq!((n(&s, "/hits_local"), n(&s, "/misses")), (UNIT_COUNT, UNIT_COUNT), "every unit hits: {s:#}");
    let trace = spawns(&world);
    assert!(trace.queries > 0, "FERRY_TRACE_SPAWNS recorded nothing: is tracing on?");
    assert_eq!(trace.not_queries(), Vec::<&str>::new(), "a build of hits ran more than cargo's queries");
    assert_same_outputs(&expected, &outputs(&ws));
    assert_eq!(app(&ws), APP_LINE);
}

#[test]
fn basedirs_share_entries_between_checkouts_and_target_dirs() {
    let mut world = world();
    let a = workspace_in(&world, "a");
    let b = workspace_in(&world, "b");
    // Without FERRY_BASEDIRS, another checkout misses everything (absolute paths are in the key).
    assert_eq!(rebuild(&world, &a).misses, UNIT_COUNT);
    let step = rebuild(&world, &b);
    assert_eq!((step.misses, step.hits), (UNIT_COUNT, 0), "{step:?}");

    // With it alone, every output still holds checkout a's path (debug info's compilation
    // directory, the source paths in metadata): checkout b compiles everything again rather
    // than replay bytes that name a.
    world.set("FERRY_CACHE_DIR", world.path().join("cache-with-bases"));
    world.set("FERRY_BASEDIRS", &a);
    clean(&world, &a);
    assert_eq!(rebuild(&world, &a).misses, UNIT_COUNT);
    world.set("FERRY_BASEDIRS", &b);
    clean(&world, &b);
    let step = rebuild(&world, &b);
    // (The build script, built without debug info, holds no path: it is shared.)
    assert_eq!(
        (step.hits, step.misses),
        (1, UNIT_COUNT - 1),
        "bytes naming checkout a are never replayed in b: {step:?}"
    );
    assert!(!step.compiled.iter().any(|c| c == "build_script_build"), "{step:?}");
    // With the paths remapped (what sharing across checkouts needs), checkout b hits every entry
    // checkout a made and replays them with b's own paths (dep-info, diagnostics).
    world.set("FERRY_CACHE_DIR", world.path().join("cache-with-remapped-bases"));
    world.set("FERRY_BASEDIRS", &a);
    world.set("RUSTFLAGS", format!("--remap-path-prefix={}=/checkout", a.display()));
    clean(&world, &a);
    assert_eq!(rebuild(&world, &a).misses, UNIT_COUNT);
    world.set("FERRY_BASEDIRS", &b);
    world.set("RUSTFLAGS", format!("--remap-path-prefix={}=/checkout", b.display()));
    clean(&world, &b);
    let step = rebuild(&world, &b);
    assert_eq!((step.hits, step.misses), (UNIT_COUNT, 0), "{step:?}");
    assert_eq!(app(&b), APP_LINE);
    let a_text = a.display().to_string();
    for d in files_under(&b.join("target/debug")).into_iter().filter(|p| p.extension().is_some_and(|e| e == "d")) {
        let text = fs::read_to_string(&d).expect("dep-info");
        assert!(!text.contains(&a_text), "{} names checkout a:\n{text}", d.display());
    }
    // A second build of b is a no-op for cargo: the replayed dep-info points at b's files.
    let out = ok_build(cargo_build(&world, &b, true));
    assert!(!out.contains("Compiling"), "cargo rebuilt after a replay:\n{out}");

    // Only CARGO_TARGET_DIR differs (the peer tool misses every compile here); OUT_DIR is under
    // it, so `generated` and `app` compile again, as above.
    let (t1, t2) = (world.path().join("target-1"), world.path().join("target-2"));
    world.set("FERRY_CACHE_DIR", world.path().join("cache-target-dirs"));
    world.set("RUSTFLAGS", "");
    for (target, expect_hits) in [(&t1, 0), (&t2, UNIT_COUNT - 2)] {
        world.set("CARGO_TARGET_DIR", target);
        world.set("FERRY_BASEDIRS", format!("{}:{}", a.display(), target.display()));
        let step = rebuild(&world, &a);
        assert_eq!(step.hits, expect_hits, "target dir {}: {step:?}", target.display());
    }
    let out = ok(Command::new(t2.join("debug/app")).current_dir(&a).output().expect("app runs"));
    assert_eq!(out.trim(), APP_LINE);

    // A relative base is reported clearly, naming its source; ferry goes on without bases.
    world.set("FERRY_BASEDIRS", "relative/dir");
    let out = world.ferry(&["stats"]);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("environment variable FERRY_BASEDIRS: base directory 'relative/dir' must be an absolute path"),
        "{stderr}"
    );
}

#[test]
fn a_changed_toolchain_misses_everywhere_and_reverting_it_hits_again() {
    // A custom toolchain (a real copy), used the way cargo documents: RUSTC=<its rustc>.
    let copy = crate::toolchain::ToolchainCopy::new();
    let mut world = world();
    world.set("RUSTC", copy.rustc());
    let ws = workspace_in(&world, "ws");
    assert_eq!(rebuild(&world, &ws).misses, UNIT_COUNT);
    clean(&world, &ws);
    assert_eq!(rebuild(&world, &ws).hits, UNIT_COUNT);

    // One byte of one file of the set, changed in place with size and mtime restored. The file
    // (a bundled linker these builds never run) keeps every compile working.
    let rel = format!("lib/rustlib/{}/bin/wasm-component-ld", crate::toolchain::installed().host);
    let offset = copy.len(&rel) / 2;
    let original = copy.byte_at(&rel, offset);
    copy.write_in_place(&rel, offset, original ^ 0x5a);
    clean(&world, &ws);
    let changed = rebuild(&world, &ws);
    assert_eq!((changed.hits, changed.misses), (0, UNIT_COUNT), "a changed toolchain must not hit old entries");
    assert_eq!(app(&ws), APP_LINE);

    copy.write_in_place(&rel, offset, original);
    clean(&world, &ws);
    let reverted = rebuild(&world, &ws);
    assert_eq!((reverted.hits, reverted.misses), (UNIT_COUNT, 0), "the original bytes hit their entries again");
}

#[test]
fn an_edit_misses_exactly_for_what_it_changes() {
    let mut world = world();
    let ws = workspace_in(&world, "ws");
    ok_build(cargo_build(&world, &ws, true));

    edit(&ws.join("crates/middle/src/lib.rs"), "+middle", "+middle2");
    let step = rebuild(&world, &ws);
    assert_eq!(step.compiled, ["app", "middle", "top"], "an edit recompiles the crate and its dependents");
    assert_eq!((step.misses, step.hits), (3, 0));
    assert!(app(&ws).contains("chain=base+middle2+top"), "{}", app(&ws));

    world.set("FERRY_TEST_VALUE", "two");
    let step = rebuild(&world, &ws);
    assert_eq!(step.compiled, ["app", "envy"], "a variable read by env! is an input");
    assert_eq!((step.misses, step.hits), (2, 0));
    assert!(app(&ws).contains("value=two"), "{}", app(&ws));

    // Back to a value compiled before: cargo recompiles, ferry has both results.
    world.set("FERRY_TEST_VALUE", "one");
    let step = rebuild(&world, &ws);
    assert_eq!((step.compiled.len(), step.misses, step.hits), (0, 0, 2), "{step:?}");
    assert!(app(&ws).contains("value=one"), "{}", app(&ws));

    edit(&ws.join("crates/texty/src/message.txt"), "hello", "goodbye");
    let step = rebuild(&world, &ws);
    assert_eq!(step.compiled, ["app", "texty"], "a file read by include_str! is an input");
    assert_eq!((step.misses, step.hits), (2, 0));
    assert!(app(&ws).contains("text=goodbye from a text file"), "{}", app(&ws));

    world.set("RUSTFLAGS", "--cfg ferry_test");
    let step = rebuild(&world, &ws);
    assert_eq!(step.compiled, UNITS, "RUSTFLAGS are arguments of every compile");
    assert_eq!((step.misses, step.hits), (UNIT_COUNT, 0));

    // Without them again (from clean: cargo kept those outputs), everything is in the cache.
    world.set("RUSTFLAGS", "");
    clean(&world, &ws);
    let step = rebuild(&world, &ws);
    assert_eq!((step.compiled.len(), step.misses, step.hits), (0, 0, UNIT_COUNT), "{step:?}");
}

#[test]
fn entries_with_a_flipped_byte_are_misses_then_replaced() {
    check_damaged_entries(Damage::FlipMiddleByte);
}

#[test]
fn entries_truncated_to_half_are_misses_then_replaced() {
    check_damaged_entries(Damage::TruncateHalf);
}

#[test]
fn empty_entries_are_misses_then_replaced() {
    check_damaged_entries(Damage::Empty);
}

#[test]
fn parallel_builds_of_two_checkouts_share_one_cache() {
    let world = world();
    let (a, b) = (workspace_in(&world, "a"), workspace_in(&world, "b"));
    for round in ["cold", "warm"] {
        let (out_a, out_b) = both(|| cargo_build(&world, &a, true), || cargo_build(&world, &b, true));
        ok_build(out_a);
        ok_build(out_b);
        assert_eq!((app(&a), app(&b)), (APP_LINE.to_owned(), APP_LINE.to_owned()), "{round} round");
        clean(&world, &a);
        clean(&world, &b);
    }
    let s = world.stats();
    // Two checkouts at different paths do not share entries (the cwd is in the key).
    assert_eq!((n(&s, "/misses"), n(&s, "/hits_local")), (2 * UNIT_COUNT, 2 * UNIT_COUNT), "{s:#}");
    assert_clean_run(&s);
}

#[test]
fn sixteen_writers_of_one_key_agree() {
    let world = world();
    let dir = world.path().join("one-key");
    fs::create_dir_all(dir.join("out")).unwrap();
    // Metadata only: concurrent rustc runs into one out dir clash on their object files, with or
    // without ferry; writing `.rmeta` and `.d` they do not.
    let compile_x = lib("x", "dep-info,metadata", "out");
    // Rounds with new content: a bad entry stored by one round's race is served to the next.
    for value in 1..=4 {
        write(&dir.join("x.rs"), &format!("pub const VALUE: u32 = {value};\n"));
        world.ferry_ok(&["stats", "--zero"]);
        let barrier = std::sync::Barrier::new(16);
        let runs: Vec<Output> = std::thread::scope(|s| {
            let writers: Vec<_> = (0..16)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        ferry_rustc(&world, &dir, &compile_x)
                    })
                })
                .collect();
            writers.into_iter().map(|h| h.join().expect("writer thread")).collect()
        });
        // Concurrent rustc processes writing one out dir can trip over each other's metadata
        // temp files, with or without ferry ("failed to create encoded metadata"): that failure
        // is rustc's own and is tolerated; any other is not, and one writer at least succeeds.
        let mut succeeded = 0;
        for run in runs {
            let stderr = String::from_utf8_lossy(&run.stderr);
            if run.status.success() {
                succeeded += 1;
            } else {
                assert!(stderr.contains("failed to create encoded metadata"), "a writer failed:\n{stderr}");
            }
        }
        assert!(succeeded > 0, "no writer succeeded");
        let s = world.stats();
        assert_eq!(n(&s, "/misses") + n(&s, "/hits_local"), 16, "{s:#}");
        assert_eq!((n(&s, "/corrupt_entries"), n(&s, "/cache_errors")), (0, 0), "{s:#}");
        assert_entries_decode(&world);
        for list in input_lists(&world) {
            let source = dir.join("x.rs").display().to_string();
            assert_eq!(list["files"], serde_json::json!([source]), "a writer stored a wrong input list");
        }
        assert_x_value(&dir, value);
    }
    assert_eq!(fs::read_dir(cache_dir(&world).join("cache/tmp")).expect("tmp dir").count(), 0, "temp files left");

    world.ferry_ok(&["stats", "--zero"]);
    spawns(&world);
    ok(ferry_rustc(&world, &dir, &compile_x));
    assert_eq!(n(&world.stats(), "/hits_local"), 1);
    assert_eq!(spawns(&world).not_queries(), Vec::<&str>::new(), "a hit started a process");
}

#[test]
fn builds_racing_eviction_stay_correct() {
    // Two users of one cache with no grace period: `a` rebuilds from clean (hits, which bump its
    // entries' last use), while `b` builds with new flags each round (all misses). A checkout's
    // entries take ~14 MB (large payloads are stored uncompressed): one fits in 24 MiB (room for a
    // reader on a loaded machine), two do
    // not, so b's passes evict around a's readers.
    let mut reader = world();
    reader.set("FERRY_CACHE_SIZE", "24M").set("FERRY_CACHE_GRACE", "0");
    let mut writer = world();
    writer.set("FERRY_CACHE_DIR", cache_dir(&reader)).set("FERRY_CACHE_SIZE", "24M").set("FERRY_CACHE_GRACE", "0");
    let (a, b) = (workspace_in(&reader, "a"), workspace_in(&writer, "b"));
    ok_build(cargo_build(&reader, &a, false));
    let expected = outputs(&a);
    clean(&reader, &a);
    let rounds = 5;
    for round in 0..rounds {
        writer.set("RUSTFLAGS", format!("--cfg round{round}"));
        let (out_a, out_b) = both(|| cargo_build(&reader, &a, true), || cargo_build(&writer, &b, true));
        ok_build(out_a);
        ok_build(out_b);
        assert_same_outputs(&expected, &outputs(&a));
        assert_eq!((app(&a), app(&b)), (APP_LINE.to_owned(), APP_LINE.to_owned()), "round {round}");
        clean(&reader, &a);
    }
    let s = reader.stats();
    assert_eq!(n(&s, "/misses") + n(&s, "/hits_local"), 2 * rounds * UNIT_COUNT, "{s:#}");
    assert!(n(&s, "/hits_local") > 0, "no reader ever found an entry: {s:#}");
    assert_eq!((n(&s, "/cache_errors"), n(&s, "/corrupt_entries"), n(&s, "/fallbacks/replay-write-failed")), (0, 0, 0));
    let on_disk: u64 = entry_files(&reader).iter().map(|p| fs::metadata(p).unwrap().len()).sum();
    assert!(on_disk < n(&s, "/bytes_written"), "nothing was evicted: {on_disk} bytes on disk, {s:#}");
    assert!(on_disk <= 34 << 20, "a 24 MiB cache holds {on_disk} bytes after its passes");
    assert_entries_decode(&reader);
}

#[test]
fn the_grace_period_keeps_what_a_build_just_wrote() {
    let mut world = world();
    // Far too small for anything: every put runs an eviction pass, which must spare young entries.
    world.set("FERRY_CACHE_SIZE", "1K");
    let ws = workspace_in(&world, "ws");
    ok_build(cargo_build(&world, &ws, true));
    clean(&world, &ws);
    ok_build(cargo_build(&world, &ws, true));
    let s = world.stats();
    assert_eq!((n(&s, "/misses"), n(&s, "/hits_local")), (UNIT_COUNT, UNIT_COUNT), "{s:#}");
}

#[test]
fn a_writer_killed_mid_write_leaves_only_whole_entries() {
    let world = world();
    let dir = world.path().join("big");
    let compile = lib("big", "dep-info,link", "out");
    let tmp = cache_dir(&world).join("cache/tmp");
    fs::create_dir_all(dir.join("out")).unwrap();
    let mut killed = 0;
    // Kill the writer the moment a new temp file of the cache appears, or a little later: during
    // the write, the fsync, the link, or between the result and the manifest. The writer is a
    // detached copy of the wrapper (cargo already has its answer); the temp file names its pid.
    for (attempt, delay_us) in [0, 0, 300, 1_000, 3_000].into_iter().enumerate() {
        write(&dir.join("big.rs"), &big_source(attempt));
        let before = files_in(&tmp);
        let mut child =
            ferry_command(&world, &dir, &compile).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("spawn");
        let deadline = Instant::now() + Duration::from_secs(120);
        let writer = loop {
            let new: Option<PathBuf> = files_in(&tmp).into_iter().find(|f| !before.contains(f));
            if let Some(file) = new {
                let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                break name.split('.').next().and_then(|p| p.parse::<i32>().ok());
            }
            assert!(Instant::now() < deadline, "no temp file appeared");
            std::thread::sleep(Duration::from_micros(100));
        };
        std::thread::sleep(Duration::from_micros(delay_us));
        // SAFETY: signalling a process of this test by pid.
        if let Some(pid) = writer
            && unsafe { libc::kill(pid, libc::SIGKILL) } == 0
        {
            killed += 1;
            while fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z ")) {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = child.wait();
        assert_entries_decode(&world);
    }
    assert!(killed > 0, "no attempt killed ferry while it was writing an entry");

    // The cache still works: the next run succeeds and stores, the one after hits.
    ok(ferry_rustc(&world, &dir, &compile));
    world.ferry_ok(&["stats", "--zero"]);
    ok(ferry_rustc(&world, &dir, &compile));
    assert_eq!(n(&world.stats(), "/hits_local"), 1, "{:#}", world.stats());
    assert_entries_decode(&world);

    // Temp files of dead writers go at the next eviction pass, once old; young ones stay.
    let two_hours_ago = SystemTime::now() - Duration::from_secs(2 * 3600);
    write(&tmp.join("99999.0.1.tmp"), "abandoned by a killed writer");
    let leftovers: Vec<PathBuf> = fs::read_dir(&tmp).unwrap().map(|e| e.unwrap().path()).collect();
    for path in &leftovers {
        OpenOptions::new().write(true).open(path).unwrap().set_modified(two_hours_ago).unwrap();
    }
    write(&tmp.join("99999.1.2.tmp"), "a write in progress");
    // Any put into a 1-byte cache is over the limit and runs an eviction pass.
    let mut tiny = world;
    tiny.set("FERRY_CACHE_SIZE", "1");
    write(&dir.join("small.rs"), "pub fn small() {}\n");
    ok(ferry_rustc(&tiny, &dir, &lib("small", "dep-info,link", "out")));
    // The entry is written by a detached copy of the wrapper: `ferry stats` waits for it.
    tiny.ferry_ok(&["stats"]);
    let left: Vec<String> =
        fs::read_dir(&tmp).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert_eq!(left, ["99999.1.2.tmp"], "stale temp files ({}) must go, a young one must stay", leftovers.len());
}

#[test]
fn a_full_disk_costs_cache_writes_not_builds() {
    let mut world = world();
    let disk = world.path().join("disk");
    let _mount = Tmpfs::mount(&disk, "1m");
    world.set("FERRY_CACHE_DIR", disk.join("cache"));
    // The log is not what this test is about: keep it off the small disk.
    world.set("FERRY_LOG_FILE", world.path().join("ferry.log"));
    let ws = workspace_in(&world, "ws");
    ok_build(cargo_build(&world, &ws, true));
    assert_eq!(app(&ws), APP_LINE);
    let s = world.stats();
    assert!(n(&s, "/cache_errors") > 0, "a 1 MiB cache disk cannot hold the workspace: {s:#}");
    assert!(n(&s, "/not_stored/cache-write-failed") > 0, "{s:#}");
    assert_entries_decode(&world);
}

#[test]
fn cached_failures_replay_the_error_without_rustc() {
    let mut world = world();
    world.set("FERRY_CACHE_FAILURES", "1");
    let dir = broken_crate_in(&world);
    let plain = cargo_build(&world, &dir, false);
    clean(&world, &dir);
    spawns(&world);

    let first = cargo_build(&world, &dir, true);
    assert_eq!(first.status.code(), Some(101), "{}", String::from_utf8_lossy(&first.stderr));
    let error = String::from_utf8_lossy(&first.stderr).into_owned();
    assert!(error.contains("error[E0308]: mismatched types"), "{error}");
    assert_eq!(error, String::from_utf8_lossy(&plain.stderr), "a failure through ferry looks like a plain one");
    assert_eq!(spawns(&world).compiled(), ["broken"]);

    world.ferry_ok(&["stats", "--zero"]);
    let second = cargo_build(&world, &dir, true);
    assert_eq!(second.status.code(), Some(101));
    assert_eq!(String::from_utf8_lossy(&second.stderr), error, "the replayed failure differs");
    let s = world.stats();
    assert_eq!((n(&s, "/hits_local"), n(&s, "/misses")), (1, 0), "{s:#}");
    assert_eq!(spawns(&world).not_queries(), Vec::<&str>::new(), "a cached failure started a process");

    edit(&dir.join("src/lib.rs"), "\"forty-two\"", "42");
    ok_build(cargo_build(&world, &dir, true));
    assert_eq!(n(&world.stats(), "/misses"), 1);
}

#[test]
fn failures_are_not_cached_by_default() {
    let world = world();
    let dir = broken_crate_in(&world);
    for _ in 0..2 {
        assert_eq!(cargo_build(&world, &dir, true).status.code(), Some(101));
    }
    let s = world.stats();
    assert_eq!((n(&s, "/misses"), n(&s, "/hits_local")), (2, 0), "{s:#}");
    assert_eq!(n(&s, "/not_stored/compile-error"), 2, "{s:#}");
    assert_eq!(spawns(&world).compiled(), ["broken", "broken"]);
}

#[test]
fn queries_stdin_and_unknown_flags_pass_through_unchanged() {
    let world = world();
    let dir = world.path().join("pass");
    write(&dir.join("a.rs"), "pub fn a() {}\n");
    let rustc = rustc();
    let cases: [(&[&str], &str); 3] = [
        (&["-vV"], ""),
        (&["-", "--crate-name", "x", "--print=crate-name"], "fn main() {}\n"),
        (&["--crate-name", "a", "a.rs", "--crate-type", "lib", "--frobnicate"], ""),
    ];
    for (args, stdin) in cases {
        let plain = run_with_stdin(Command::new(&rustc).args(args).current_dir(&dir), stdin);
        let wrapped = run_with_stdin(&mut ferry_command(&world, &dir, args), stdin);
        assert_eq!(
            (wrapped.status.code(), &wrapped.stdout, &wrapped.stderr),
            (plain.status.code(), &plain.stdout, &plain.stderr),
            "ferry rustc {args:?} is not rustc {args:?}"
        );
    }
    let s = world.stats();
    assert_eq!(n(&s, "/requests"), 3, "{s:#}");
    let reasons = (n(&s, "/passthrough/query"), n(&s, "/passthrough/stdin-input"), n(&s, "/passthrough/unknown-flag"));
    assert_eq!(reasons, (1, 1, 1), "{s:#}");
    assert_eq!((n(&s, "/misses"), n(&s, "/hits_local")), (0, 0), "{s:#}");
    let trace = spawns(&world);
    assert_eq!(trace.lines.len(), 3, "each pass-through is one exec: {:#?}", trace.lines);
    assert_eq!(trace.lines[2], format!("{} --crate-name a a.rs --crate-type lib --frobnicate", rustc.display()));
}

#[test]
fn every_process_the_wrapper_starts_is_traced() {
    // A linker that logs who started it: rustc runs it to link, the wrapper may run it too (to
    // identify it for the key). Whatever the wrapper starts must be in FERRY_TRACE_SPAWNS, or the
    // trace cannot prove what a hit did not run.
    let world = world();
    let dir = world.path().join("linked");
    write(&dir.join("main.rs"), "fn main() {}\n");
    let logger = dir.join("cc-logger");
    write(&logger, "#!/bin/sh\necho \"$(cat /proc/$PPID/comm) $*\" >> \"$0.log\"\nexec cc \"$@\"\n");
    fs::set_permissions(&logger, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    fs::create_dir_all(dir.join("out")).unwrap();
    let args = ["--crate-name", "main", "--crate-type", "bin", "--emit=dep-info,link", "-C", "linker=./cc-logger"];
    ok(ferry_rustc(&world, &dir, &[&args[..], &["--out-dir", "out", "main.rs"]].concat()));

    let calls = fs::read_to_string(dir.join("cc-logger.log")).unwrap();
    assert!(calls.lines().any(|l| l.starts_with("rustc ")), "rustc did not link through the logger:\n{calls}");
    let trace = spawns(&world);
    for call in calls.lines().filter_map(|l| l.strip_prefix("ferry ")) {
        assert!(
            trace.lines.iter().any(|t| t.contains("cc-logger") && t.ends_with(&format!(" {call}"))),
            "the wrapper ran `cc-logger {call}` but FERRY_TRACE_SPAWNS has only {:#?}",
            trace.lines
        );
    }
}

#[test]
fn logs_never_reach_the_build_output() {
    let mut world = world();
    let log = world.path().join("logs/ferry.log");
    world.set("FERRY_LOG", "debug").set("FERRY_LOG_FILE", &log);
    let dir = world.path().join("quiet");
    write(&dir.join("quiet.rs"), "pub fn quiet() -> u32 { 1 }\n");
    write(&dir.join("loud.rs"), "pub fn loud() { let unused = 1; }\n");
    for out in ["out", "plain"] {
        fs::create_dir_all(dir.join(out)).unwrap();
    }
    for round in ["miss", "hit"] {
        let run = ferry_rustc(&world, &dir, &lib("quiet", "dep-info,link", "out"));
        assert!(run.status.success(), "{round}");
        assert_eq!((&*run.stdout, &*String::from_utf8_lossy(&run.stderr)), (&b""[..], ""), "{round}: ferry wrote");
    }
    let plain = Command::new(rustc()).args(lib("loud", "dep-info,link", "plain")).current_dir(&dir).output().unwrap();
    assert!(String::from_utf8_lossy(&plain.stderr).contains("unused variable"), "the crate must warn");
    for round in ["miss", "hit"] {
        let run = ferry_rustc(&world, &dir, &lib("loud", "dep-info,link", "out"));
        assert_eq!((run.status.code(), &run.stdout, &run.stderr), (Some(0), &plain.stdout, &plain.stderr), "{round}");
    }
    let plain = Command::new(rustc()).arg("-vV").output().unwrap();
    let run = ferry_rustc(&world, &dir, &["-vV"]);
    assert_eq!((run.stdout, run.stderr), (plain.stdout, plain.stderr), "a pass-through is rustc's output only");
    let s = world.stats();
    assert_eq!((n(&s, "/misses"), n(&s, "/hits_local"), n(&s, "/passthrough/query")), (2, 2, 1), "{s:#}");
    let logged = fs::read_to_string(&log).unwrap_or_default();
    assert!(logged.contains("DEBUG pass-through"), "no debug line in {}:\n{logged}", log.display());
}

/// A setting ferry cannot use is loud and never makes it step aside: the build is still cached
/// (that setting at its default), nothing reaches the build's output, the log says it, and
/// `ferry stats` counts it first, naming the variable or the file and key it came from.
#[test]
fn a_bad_setting_is_counted_and_named_and_the_build_is_still_cached() {
    let mut world = world();
    let config = world.path().join("ferry.toml");
    fs::write(&config, "[cache]\nfailures = \"sometimes\"\nsize_limit = \"1G\"\n").unwrap();
    let log = world.path().join("ferry.log");
    world.set("FERRY_CACHE_SIZE", "10X").set("FERRY_CONFIG", &config).set("FERRY_LOG_FILE", &log);
    let ws = workspace_in(&world, "ws");
    let plain = ok_build(cargo_build(&world, &ws, false));
    let expected = outputs(&ws);
    clean(&world, &ws);

    let cold = ok_build(cargo_build(&world, &ws, true));
    assert_eq!(build_log(&cold), build_log(&plain), "ferry wrote into the build's output");
    clean(&world, &ws);
    ok_build(cargo_build(&world, &ws, true));
    assert_same_outputs(&expected, &outputs(&ws));
    let s = world.stats();
    assert_eq!((n(&s, "/misses"), n(&s, "/hits_local")), (UNIT_COUNT, UNIT_COUNT), "{s:#}");
    let errors = s["config_errors"].as_object().expect("config_errors");
    let named = |needle: &str| errors.iter().find(|(k, _)| k.contains(needle)).map(|(k, v)| (k.clone(), v.clone()));
    let cfg = config.display().to_string();
    for needle in [
        "environment variable FERRY_CACHE_SIZE: ".to_owned(),
        format!("{cfg}: key 'cache.failures'"),
        format!("{cfg}: unknown key 'cache.size_limit'"),
    ] {
        let (problem, count) = named(&needle).unwrap_or_else(|| panic!("no config error naming {needle:?}: {s:#}"));
        assert_eq!(count.as_u64(), Some(n(&s, "/requests")), "{problem}: counted once per wrapper call");
    }
    assert!(
        named("FERRY_CACHE_SIZE").is_some_and(|(p, _)| p.contains("'10X'") && p.contains("using the default (10G)"))
    );

    // `ferry stats` shows them first, and says where each came from on stderr too.
    let out = world.ferry(&["stats"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.starts_with("configuration errors"), "{table}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ferry: configuration error: environment variable FERRY_CACHE_SIZE: "), "{stderr}");
    let logged = fs::read_to_string(&log).unwrap_or_default();
    assert!(logged.contains("configuration error") && logged.contains("FERRY_CACHE_SIZE"), "{logged}");
}

/// One damage applied to every entry file after a full build, then: the next build (from clean)
/// is correct and counts the damage, and the one after hits again.
fn check_damaged_entries(damage: Damage) {
    let world = world();
    let ws = workspace_in(&world, "ws");
    ok_build(cargo_build(&world, &ws, true));
    let expected = outputs(&ws);
    // Entries are written by detached copies of the wrapper after cargo has its answer; `ferry
    // stats` waits for them, so every entry exists before it is damaged.
    world.ferry_ok(&["stats"]);
    let damaged = damage_entries(&world, damage);
    assert!(damaged >= UNITS.len(), "only {damaged} entries after a full build");

    world.ferry_ok(&["stats", "--zero"]);
    clean(&world, &ws);
    ok_build(cargo_build(&world, &ws, true));
    assert_same_outputs(&expected, &outputs(&ws));
    assert_eq!(app(&ws), APP_LINE);
    let s = world.stats();
    assert_eq!(n(&s, "/hits_local"), 0, "a damaged entry was served: {s:#}");
    assert!(n(&s, "/corrupt_entries") >= UNIT_COUNT, "{damage:?} not counted: {s:#}");
    // Every unit recompiled and stored its result: no damaged file may be left behind.
    assert_entries_decode(&world);

    world.ferry_ok(&["stats", "--zero"]);
    clean(&world, &ws);
    ok_build(cargo_build(&world, &ws, true));
    assert_same_outputs(&expected, &outputs(&ws));
    let s = world.stats();
    assert_eq!(
        (n(&s, "/hits_local"), n(&s, "/misses"), n(&s, "/corrupt_entries")),
        (UNIT_COUNT, 0, 0),
        "the build after a {damage:?} round must hit: the damaged entries were to be replaced: {s:#}"
    );
}

// ---------------------------------------------------------------------------------------------
// The generated workspace
// ---------------------------------------------------------------------------------------------

/// Writes a cargo workspace of eight crates that together use every input kind ferry must see:
/// `macros` (proc-macro), `generated` (a build script writing `$OUT_DIR/generated.rs`, which the
/// lib `include!`s), `texty` (`include_str!`), `envy` (`env!("FERRY_TEST_VALUE")` and
/// `env!("CARGO_PKG_NAME")`), the chain `base` ← `middle` ← `top` (which also uses the macro), and
/// the binary `app` that prints [`APP_LINE`]. No registry dependencies: it builds offline.
fn workspace(root: &Path) {
    workspace_with(root, true);
}

/// [`workspace`], optionally without `envy` (whose `env!` of a non-cargo variable a remote
/// compile learns only after a first, local compile); then `app` prints only the first four
/// fields.
pub(crate) fn workspace_with(root: &Path, envy: bool) {
    write(
        &root.join("Cargo.toml"),
        "[workspace]\nresolver = \"2\"\nmembers = [\"crates/*\"]\n\n\
         [workspace.package]\nversion = \"0.1.0\"\nedition = \"2021\"\n",
    );
    let krate = |name: &str, deps: &[&str], extra: &str, files: &[(&str, &str)]| {
        let dir = root.join("crates").join(name);
        let mut manifest =
            format!("[package]\nname = \"{name}\"\nversion.workspace = true\nedition.workspace = true\n");
        manifest.push_str(extra);
        manifest.push_str("\n[dependencies]\n");
        for dep in deps {
            manifest.push_str(&format!("{dep} = {{ path = \"../{dep}\" }}\n"));
        }
        write(&dir.join("Cargo.toml"), &manifest);
        for (path, content) in files {
            write(&dir.join(path), content);
        }
    };
    krate("base", &[], "", &[("src/lib.rs", "pub fn name() -> String {\n    \"base\".to_owned()\n}\n")]);
    krate(
        "middle",
        &["base"],
        "",
        &[("src/lib.rs", "pub fn name() -> String {\n    format!(\"{}+middle\", base::name())\n}\n")],
    );
    krate(
        "macros",
        &[],
        "\n[lib]\nproc-macro = true\n",
        &[(
            "src/lib.rs",
            "use proc_macro::TokenStream;\n\n#[proc_macro]\npub fn answer(_input: TokenStream) -> TokenStream {\n    \
             \"42\".parse().unwrap()\n}\n",
        )],
    );
    krate(
        "top",
        &["middle", "macros"],
        "",
        &[(
            "src/lib.rs",
            "pub const ANSWER: u32 = macros::answer!();\n\n\
             pub fn name() -> String {\n    format!(\"{}+top\", middle::name())\n}\n",
        )],
    );
    krate(
        "generated",
        &[],
        "build = \"build.rs\"\n",
        &[
            (
                "build.rs",
                "fn main() {\n    let out = std::env::var(\"OUT_DIR\").unwrap();\n    \
                 let code = \"pub const GENERATED: &str = \\\"from a build script\\\";\\n\";\n    \
                 std::fs::write(format!(\"{out}/generated.rs\"), code).unwrap();\n    \
                 println!(\"cargo::rerun-if-changed=build.rs\");\n}\n",
            ),
            ("src/lib.rs", "include!(concat!(env!(\"OUT_DIR\"), \"/generated.rs\"));\n"),
        ],
    );
    krate(
        "texty",
        &[],
        "",
        &[
            ("src/lib.rs", "pub const TEXT: &str = include_str!(\"message.txt\");\n"),
            ("src/message.txt", "hello from a text file\n"),
        ],
    );
    if !envy {
        krate(
            "app",
            &["top", "generated", "texty"],
            "",
            &[(
                "src/main.rs",
                "fn main() {\n    println!(\n        \"answer={} chain={} generated={} text={}\",\n        top::ANSWER,\n        \
                 top::name(),\n        generated::GENERATED,\n        texty::TEXT.trim(),\n    );\n}\n",
            )],
        );
        return;
    }
    krate(
        "envy",
        &[],
        "",
        &[(
            "src/lib.rs",
            "pub const VALUE: &str = env!(\"FERRY_TEST_VALUE\");\npub const NAME: &str = env!(\"CARGO_PKG_NAME\");\n",
        )],
    );
    krate(
        "app",
        &["top", "generated", "texty", "envy"],
        "",
        &[(
            "src/main.rs",
            "fn main() {\n    println!(\n        \"answer={} chain={} generated={} text={} value={} name={}\",\n        \
             top::ANSWER,\n        top::name(),\n        generated::GENERATED,\n        texty::TEXT.trim(),\n        \
             envy::VALUE,\n        envy::NAME,\n    );\n}\n",
        )],
    );
}

/// A world for wrapper tests: `FERRY_TEST_VALUE=one` (the generated `envy` needs it) and every
/// process the wrapper starts traced to a file that [`spawns`] reads.
fn world() -> World {
    let mut world = World::new();
    let trace = world.path().join("spawns.log");
    world.set("FERRY_TEST_VALUE", "one").set("FERRY_TRACE_SPAWNS", trace);
    world
}

/// Generates the workspace in `<world>/<name>`.
fn workspace_in(world: &World, name: &str) -> PathBuf {
    let root = world.path().join(name);
    workspace(&root);
    root
}

/// A one-crate package whose lib does not type-check.
fn broken_crate_in(world: &World) -> PathBuf {
    let dir = world.path().join("broken");
    write(&dir.join("Cargo.toml"), "[package]\nname = \"broken\"\nversion = \"0.1.0\"\nedition = \"2021\"\n");
    write(&dir.join("src/lib.rs"), "pub fn answer() -> u32 {\n    \"forty-two\"\n}\n");
    dir
}

/// A library source that takes rustc a second or two and makes a rlib of a few megabytes; the
/// attempt number makes each variant a different cache key.
fn big_source(attempt: usize) -> String {
    let mut source = format!("// attempt {attempt}\n");
    for i in 0..3000 {
        source.push_str(&format!(
            "pub fn f{i}(x: u64) -> u64 {{ let a = x.wrapping_mul({i}).rotate_left(7) ^ {i}; \
             if a % 3 == 0 {{ a / 3 }} else {{ a + {i} }} }}\n"
        ));
    }
    source
}

// ---------------------------------------------------------------------------------------------
// Running cargo, ferry and rustc
// ---------------------------------------------------------------------------------------------

/// `cargo build -j2 --offline` in `dir`, through ferry or plain, with nothing of the test runner's
/// own cargo/rustc configuration leaking in (only the world's environment).
pub(crate) fn cargo_build(world: &World, dir: &Path, wrapper: bool) -> Output {
    let mut cmd = cargo(world, dir);
    cmd.args(["build", &jobs(world), "--offline"]);
    if wrapper {
        cmd.env("RUSTC_WRAPPER", bin("ferry"));
    } else {
        cmd.env_remove("RUSTC_WRAPPER");
    }
    cmd.output().expect("cargo runs")
}

/// `-j2`, or `-jN` when the world sets `CARGO_BUILD_JOBS=N` (a test that needs one unit at a time).
pub(crate) fn jobs(world: &World) -> String {
    let jobs = world.env.iter().find(|(k, _)| k == "CARGO_BUILD_JOBS").map_or("2", |(_, v)| v.as_str());
    format!("-j{jobs}")
}

pub(crate) fn clean(world: &World, dir: &Path) {
    ok(cargo(world, dir).args(["clean", "--offline"]).output().expect("cargo runs"));
}

/// Variables a CI runner or a shell commonly sets that the tests' crates read (`option_env!("CI")`):
/// not inherited, so what a test expects does not depend on the machine running it.
const AMBIENT: [&str; 2] = ["CI", "TMPDIR"];

pub(crate) fn cargo(world: &World, dir: &Path) -> Command {
    let mut cmd = world.command("cargo");
    for (name, _) in std::env::vars() {
        let config = (name.starts_with("CARGO_") && name != "CARGO_HOME")
            || ["RUSTC", "RUSTC_WRAPPER", "RUSTC_WORKSPACE_WRAPPER", "RUSTFLAGS", "RUSTDOCFLAGS"].contains(&&*name)
            || AMBIENT.contains(&&*name);
        if config && !world.env.iter().any(|(k, _)| *k == name) {
            cmd.env_remove(name);
        }
    }
    cmd.current_dir(dir);
    cmd
}

/// Asserts a cargo build succeeded; returns its stderr (cargo's progress and rustc's messages).
pub(crate) fn ok_build(out: Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(out);
    stderr
}

/// The lines of a cargo build's stderr, sorted (the order of `Compiling` lines varies with -j2) and
/// without the build time. Cargo's own lock notices ("Blocking waiting for file lock ...") depend on what other builds on
/// the machine hold at that moment, so they are not part of the log being compared.
pub(crate) fn build_log(stderr: &str) -> Vec<String> {
    let mut lines: Vec<String> = stderr
        .lines()
        .filter(|l| !l.trim_start().starts_with("Blocking waiting for file lock"))
        .map(|l| l.split(" target(s) in ").next().unwrap_or(l).to_owned())
        .collect();
    lines.sort();
    lines
}

/// One cargo build after an edit: which crates rustc compiled and what ferry counted.
#[derive(Debug)]
struct Step {
    compiled: Vec<String>,
    misses: u64,
    hits: u64,
}

/// Zeroes the counters and the trace, builds through ferry, reports the step.
fn rebuild(world: &World, ws: &Path) -> Step {
    world.ferry_ok(&["stats", "--zero"]);
    spawns(world);
    ok_build(cargo_build(world, ws, true));
    let s = world.stats();
    Step { compiled: spawns(world).compiled(), misses: n(&s, "/misses"), hits: n(&s, "/hits_local") }
}

/// Runs two closures at once, e.g. two cargo builds.
fn both<A: Send, B>(a: impl FnOnce() -> A + Send, b: impl FnOnce() -> B) -> (A, B) {
    std::thread::scope(|s| {
        let first = s.spawn(a);
        let second = b();
        (first.join().expect("parallel task"), second)
    })
}

/// The binary of the generated workspace, run; its one line of output.
fn app(ws: &Path) -> String {
    ok(Command::new(ws.join("target/debug/app")).output().expect("app runs")).trim().to_owned()
}

/// The real rustc of the installed toolchain (not the rustup proxy).
pub(crate) fn rustc() -> PathBuf {
    installed_sysroot().join("bin/rustc")
}

/// `ferry <real rustc> ARGS` in `dir`, as cargo would run it.
fn ferry_command(world: &World, dir: &Path, args: &[impl AsRef<OsStr>]) -> Command {
    let mut cmd = world.command(bin("ferry"));
    cmd.arg(rustc()).args(args).current_dir(dir);
    cmd
}

fn ferry_rustc(world: &World, dir: &Path, args: &[impl AsRef<OsStr>]) -> Output {
    ferry_command(world, dir, args).output().expect("ferry runs")
}

fn run_with_stdin(cmd: &mut Command, stdin: &str) -> Output {
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    child.stdin.take().expect("piped").write_all(stdin.as_bytes()).expect("write stdin");
    child.wait_with_output().expect("wait")
}

/// The arguments of a cargo-like compile of the library `<name>.rs` into the directory `out`.
fn lib(name: &str, emit: &str, out: &str) -> Vec<String> {
    let args = ["--crate-name", name, "--crate-type", "rlib", &format!("--emit={emit}"), "--out-dir", out];
    args.into_iter().map(str::to_owned).chain([format!("{name}.rs")]).collect()
}

/// Type-checks, with plain rustc, a crate asserting at compile time that `x::VALUE == value`
/// against `out/libx.rmeta`: the metadata is whole and current.
fn assert_x_value(dir: &Path, value: u32) {
    write(&dir.join("y.rs"), &format!("const _: () = assert!(x::VALUE == {value});\n"));
    let args = ["--crate-name", "y", "--crate-type", "lib", "--emit=metadata", "--extern", "x=out/libx.rmeta"];
    ok(Command::new(rustc()).args(args).args(["--out-dir", "y", "y.rs"]).current_dir(dir).output().unwrap());
}

// ---------------------------------------------------------------------------------------------
// Observing results: outputs, counters, spawns, cache entries
// ---------------------------------------------------------------------------------------------

/// blake3 of every compiler output of a workspace build, by path under `target/debug`: the
/// `deps/` libraries, metadata, proc-macros, dep-info and the `app` binary, the build script
/// binaries (`build/<pkg>-<hash>/build_script_build-<hash>`) and what they wrote to `out/`.
pub(crate) fn outputs(ws: &Path) -> BTreeMap<String, blake3::Hash> {
    let debug = ws.join("target/debug");
    let mut found = BTreeMap::new();
    let mut add = |path: PathBuf| {
        let name = path.strip_prefix(&debug).expect("under target/debug").display().to_string();
        found.insert(name, blake3::hash(&fs::read(&path).expect("read output")));
    };
    for path in files_in(&debug.join("deps")) {
        let name = path.file_name().unwrap().to_string_lossy();
        let ext = path.extension().map(|e| e.to_string_lossy().into_owned()).unwrap_or_default();
        if ["rlib", "rmeta", "so", "d"].contains(&&*ext) || (name.starts_with("app-") && ext.is_empty()) {
            add(path);
        }
    }
    for dir in files_in(&debug.join("build")) {
        for path in files_in(&dir) {
            if path.file_name().unwrap().to_string_lossy().starts_with("build_script_build-") {
                add(path);
            }
        }
        files_in(&dir.join("out")).into_iter().for_each(&mut add);
    }
    let kinds = ["rlib", "rmeta", "so", "app-", "build_script_build-", "out/generated.rs"];
    for kind in kinds {
        assert!(found.keys().any(|k| k.contains(kind)), "no {kind} output in {}: {found:#?}", debug.display());
    }
    found
}

pub(crate) fn assert_same_outputs(expected: &BTreeMap<String, blake3::Hash>, actual: &BTreeMap<String, blake3::Hash>) {
    let names = expected.keys().chain(actual.keys()).collect::<std::collections::BTreeSet<_>>();
    let differ: Vec<&String> = names.into_iter().filter(|n| expected.get(*n) != actual.get(*n)).collect();
    assert!(differ.is_empty(), "outputs differ from the expected build (missing, extra or other bytes): {differ:#?}");
}

/// A counter of `ferry stats --json` by JSON pointer (`/misses`, `/not_stored/compile-error`);
/// an absent reason is 0.
pub(crate) fn n(stats: &Value, pointer: &str) -> u64 {
    stats.pointer(pointer).map_or(0, |v| v.as_u64().unwrap_or_else(|| panic!("{pointer} is not a count: {v}")))
}

/// Nothing fell back, nothing went unstored, nothing was damaged, and the only pass-throughs
/// are cargo's queries.
fn assert_clean_run(s: &Value) {
    for map in ["/fallbacks", "/not_stored"] {
        assert_eq!(s.pointer(map).and_then(Value::as_object).map_or(0, |m| m.len()), 0, "{map}: {s:#}");
    }
    let passthrough = s["passthrough"].as_object().expect("passthrough map");
    assert!(passthrough.keys().all(|r| r == "query" || r == "stdin-input"), "unexpected pass-through: {s:#}");
    assert_eq!((n(s, "/corrupt_entries"), n(s, "/cache_errors")), (0, 0), "{s:#}");
}

/// What the wrapper spawned since the last call (which empties the trace).
struct Spawns {
    lines: Vec<String>,
    /// Lines that were compiler queries (`-vV`, `--print`): cargo asks them even on a full hit.
    queries: usize,
}

impl Spawns {
    /// The crates rustc compiled (one entry per run, sorted). Other spawns, such as identifying
    /// the linker on a miss, are neither compiles nor queries.
    fn compiled(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .lines
            .iter()
            .filter(|l| !is_query(l))
            .filter_map(|l| {
                let mut words = l.split(' ');
                words.find(|w| *w == "--crate-name").and_then(|_| words.next()).map(str::to_owned)
            })
            .collect();
        names.sort();
        names
    }

    /// Every spawn that was not a query cargo asked for.
    fn not_queries(&self) -> Vec<&str> {
        self.lines.iter().map(String::as_str).filter(|l| !is_query(l)).collect()
    }
}

fn is_query(line: &str) -> bool {
    line.split(' ').any(|w| w == "-vV" || w == "--print" || w.starts_with("--print="))
}

fn spawns(world: &World) -> Spawns {
    let path = world.path().join("spawns.log");
    let text = fs::read_to_string(&path).unwrap_or_default();
    let _ = fs::remove_file(&path);
    let lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let queries = lines.iter().filter(|l| is_query(l)).count();
    Spawns { lines, queries }
}

/// The world's `FERRY_CACHE_DIR` (which a test may have moved, e.g. onto a small disk).
fn cache_dir(world: &World) -> PathBuf {
    let dir = world.env.iter().find(|(k, _)| k == "FERRY_CACHE_DIR").map(|(_, v)| PathBuf::from(v));
    dir.expect("World sets FERRY_CACHE_DIR")
}

/// Every file under `<cache>/cache/entries/<2 hex>/`.
fn entry_files(world: &World) -> Vec<PathBuf> {
    files_in(&cache_dir(world).join("cache/entries")).iter().flat_map(|shard| files_in(shard)).collect()
}

/// Every entry on disk is whole: it decodes and verifies under the key its name says.
fn assert_entries_decode(world: &World) {
    for path in entry_files(world) {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let key = CacheKey::from_str(&name).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let bytes = fs::read(&path).unwrap();
        if let Err(e) = Entry::decode(&bytes, &key) {
            panic!("entry {} ({} bytes) does not decode: {e}", path.display(), bytes.len());
        }
    }
}

/// The payloads of the manifest entries: the input lists (`{"files": [...], "env": [...]}`) that
/// compiles under one pre-key read.
fn input_lists(world: &World) -> Vec<Value> {
    let mut lists = Vec::new();
    for path in entry_files(world) {
        let key = CacheKey::from_str(&path.file_name().unwrap().to_string_lossy()).unwrap();
        let entry = Entry::decode(&fs::read(&path).unwrap(), &key).unwrap();
        if entry.kind == EntryKind::Manifest {
            lists.push(serde_json::from_slice(&entry.payload).expect("a manifest is JSON"));
        }
    }
    lists
}

/// How [`damage_entries`] breaks a file.
#[derive(Debug, Clone, Copy)]
enum Damage {
    FlipMiddleByte,
    TruncateHalf,
    Empty,
}

/// Damages every entry file in place; returns how many. Entries are read-only (0444): root may
/// write them anyway, but only when asking for write access explicitly.
fn damage_entries(world: &World, damage: Damage) -> usize {
    let files = entry_files(world);
    for path in &files {
        let len = fs::metadata(path).unwrap().len();
        let file = OpenOptions::new().read(true).write(true).open(path).unwrap();
        match damage {
            Damage::FlipMiddleByte => {
                use std::os::unix::fs::FileExt;
                let mut byte = [0];
                file.read_exact_at(&mut byte, len / 2).unwrap();
                file.write_all_at(&[byte[0] ^ 0x40], len / 2).unwrap();
            }
            Damage::TruncateHalf => file.set_len(len / 2).unwrap(),
            Damage::Empty => file.set_len(0).unwrap(),
        }
    }
    files.len()
}

/// A tmpfs of `size` mounted at `dir` until dropped (we run as root, as CI does).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "cannot mount a tmpfs at {} (this test needs root, as in CI): {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Every file under `dir`, recursively, sorted.
pub(crate) fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for path in files_in(dir) {
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

pub(crate) fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(entries) => entries.map(|e| e.expect("read dir").path()).collect(),
        Err(_) => Vec::new(),
    };
    paths.sort();
    paths
}

pub(crate) fn write(path: &Path, content: &str) {
    fs::create_dir_all(path.parent().expect("a parent")).unwrap();
    File::create(path).and_then(|mut f| f.write_all(content.as_bytes())).unwrap();
}

/// Replaces `from` (which must occur) with `to` in a file.
pub(crate) fn edit(path: &Path, from: &str, to: &str) {
    let text = fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{} has no {from:?}", path.display());
    fs::write(path, text.replace(from, to)).unwrap();
}
