//! The cluster end to end: a real `ferry-scheduler`, real `ferry-worker`s running jobs in real
//! bubblewrap sandboxes, the real `ferry` wrapper under real cargo builds, all on loopback. Faults
//! are real too: workers and schedulers are SIGKILLed, restarted on the same port, or frozen with
//! SIGSTOP.
//!
//! Packaging, uploading and unpacking the installed toolchain costs tens of seconds, so tests
//! that are not about those steps start from a [`Seed`]: the state a real scheduler and a real
//! worker left on disk after a real `ferry toolchain upload` and a first remote job, hard-linked
//! into the test's own data directories. The tests about uploading and the first fetch start
//! from nothing.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use ferry_tests::{Daemon, Pki, World, bin, ok};
use serde_json::Value;

use crate::wrapper::{
    assert_same_outputs, build_log, cargo_build, clean, edit, files_in, n, ok_build, outputs, rustc, write,
};

#[test]
fn a_remote_job_is_byte_identical_to_a_local_compile() {
    let c = Cluster::start(Setup { workers: 2, seed_scheduler: true, seed_workers: true, ..Setup::default() });
    let x = Lib::new(&c.world, "x", X_SOURCE);
    let plain = x.plain(&c.world);
    let remote = x.ferry(&c.world);
    assert_eq!(
        (remote.code, &remote.stdout, &remote.stderr),
        (plain.code, &plain.stdout, &plain.stderr),
        "exit code, stdout and stderr (with its artifact notifications) of a remote compile"
    );
    assert!(plain.stderr.contains(r#""emit":"metadata""#), "rustc announced no artifacts:\n{}", plain.stderr);
    assert_same_files("remote compile", &plain.files, &remote.files);
    let s = c.world.stats();
    assert_eq!((n(&s, "/compiled_remote"), n(&s, "/compiled_local")), (1, 0), "{s:#}");
    assert_no_fallbacks(&s);
    assert!(n(&s, "/bytes_sent") > 0, "the source must have travelled: {s:#}");

    // A warning: the diagnostic arrives once (held back until the job succeeded), next to the
    // same artifact notifications in their order.
    let w = Lib::new(&c.world, "w", "pub fn w() -> u32 {\n    let unused = 1;\n    2\n}\n");
    let plain = w.plain(&c.world);
    let remote = w.ferry(&c.world);
    assert!(plain.stderr.contains("unused variable"), "the crate must warn:\n{}", plain.stderr);
    assert_eq!(sorted_lines(&remote.stderr), sorted_lines(&plain.stderr), "the same messages, each once");
    assert_eq!(artifact_lines(&remote.stderr), artifact_lines(&plain.stderr));
    assert_same_files("remote compile with a warning", &plain.files, &remote.files);
    assert_eq!(n(&c.world.stats(), "/compiled_remote"), 2);

    // A cargo build: every rlib goes to the cluster, the rest (proc-macro, build script, binary)
    // stays local, and everything is byte for byte what a plain build at the same path makes.
    let ws = c.world.path().join("ws");
    workspace(&ws);
    let plain_log = ok_build(cargo_build(&c.world, &ws, false));
    let expected = outputs(&ws);
    clean(&c.world, &ws);
    c.world.ferry_ok(&["stats", "--zero"]);
    let before = remote_jobs(&c.world).len();
    let log = ok_build(cargo_build(&c.world, &ws, true));
    assert_same_outputs(&expected, &outputs(&ws));
    assert_eq!(build_log(&log), build_log(&plain_log), "cargo's output through the cluster differs");
    let s = c.world.stats();
    assert_no_fallbacks(&s);
    assert_eq!((n(&s, "/compiled_remote"), n(&s, "/compiled_local")), (RLIBS.len() as u64, 3), "{s:#}");
    let mut remote_crates: Vec<String> = remote_jobs(&c.world)[before..].iter().map(|j| j.krate.clone()).collect();
    remote_crates.sort();
    assert_eq!(remote_crates, RLIBS, "every rlib unit is compiled on a worker");
    assert_eq!(app(&ws), APP_LINE);
}

#[test]
fn the_second_job_goes_to_the_worker_with_the_toolchain() {
    let mut c = Cluster::start(Setup { seed_scheduler: true, ..Setup::default() });
    let id = &seed().id;
    c.add_worker("worker-b");
    ok(Lib::new(&c.world, "a", "pub fn a() -> u32 { 1 }\n").ferry_output(&c.world));
    let jobs = remote_jobs(&c.world);
    assert_eq!(jobs.len(), 1, "the first job did not run remotely: {:#}", c.world.stats());
    assert_eq!(jobs[0].worker, "worker-b");
    // The worker reports the fetched toolchain when the job ends.
    c.status_until("worker-b reports the toolchain and is idle again", |s| {
        workers_of(s).iter().all(|w| has_toolchain(w, id) && w["busy"] == 0)
    });

    // Without locality, worker-a would win: both are idle, and ties go to the lower id.
    c.add_worker("worker-a");
    let status = c.status_until("worker-a registers", |s| workers_of(s).len() == 2);
    let lacking: Vec<&str> =
        workers_of(&status).iter().filter(|w| !has_toolchain(w, id)).filter_map(|w| w["id"].as_str()).collect();
    assert_eq!(lacking, ["worker-a"], "{status:#}");

    ok(Lib::new(&c.world, "b", "pub fn b() -> u32 { 2 }\n").ferry_output(&c.world));
    let jobs = remote_jobs(&c.world);
    assert_eq!(jobs.len(), 2, "the second job did not run remotely: {:#}", c.world.stats());
    assert_eq!((jobs[1].krate.as_str(), jobs[1].worker.as_str()), ("b", "worker-b"), "{jobs:?}");
    let status = c.status();
    let lacking: Vec<&str> =
        workers_of(&status).iter().filter(|w| !has_toolchain(w, id)).filter_map(|w| w["id"].as_str()).collect();
    assert_eq!(lacking, ["worker-a"], "the worker without the toolchain fetched it anyway: {status:#}");
    assert!(!c.workers[1].log_text().contains("job done"), "the worker without the toolchain ran a job");
    assert_no_fallbacks(&c.world.stats());
}

#[test]
fn a_killed_worker_fails_its_job_promptly_and_the_build_goes_on() {
    let (mut c, ws) = kill_setup();
    let started = Instant::now();
    ok_build(cargo_build(&c.world, &ws, false));
    let plain_secs = started.elapsed();
    let expected = deps_outputs(&ws);
    clean(&c.world, &ws);
    c.world.ferry_ok(&["stats", "--zero"]);

    let killed = kill_mid_build(&mut c, &ws, KillWhen::Compiling);
    assert!(killed.status.success(), "the build failed after a worker died:\n{}", killed.stderr);
    // The local compile of `big` is most of this; a connection left hanging would take far longer.
    let bound = Duration::from_secs(10) + plain_secs * 2;
    assert!(killed.after_kill < bound, "the build took {:?} after the kill (bound {bound:?})", killed.after_kill);
    assert_same_files("build after the kill", &expected, &deps_outputs(&ws));
    let s = c.world.stats();
    assert!(n(&s, "/fallbacks/worker-lost") >= 1, "the lost job is counted as worker-lost: {s:#}");

    let status = c.status_until_within(Duration::from_secs(8), "the scheduler drops the dead worker", |s| {
        workers_of(s).len() == 1
    });
    assert!(workers_of(&status)[0]["id"] != killed.worker.as_str(), "{status:#}");
    assert!(status["jobs_failed"].as_u64().unwrap_or(0) >= 1, "the dead worker's job is counted failed: {status:#}");
    let survivor = workers_of(&status)[0]["id"].as_str().unwrap_or_default().to_owned();

    c.world.ferry_ok(&["stats", "--zero"]);
    edit(&ws.join("crates/user/src/lib.rs"), "f1(3)", "f2(3)");
    ok_build(cargo_build(&c.world, &ws, true));
    let s = c.world.stats();
    assert_eq!((n(&s, "/compiled_remote"), n(&s, "/compiled_local")), (1, 0), "{s:#}");
    let last = remote_jobs(&c.world).pop().expect("a remote job");
    assert_eq!((last.krate.as_str(), last.worker.as_str()), ("user", survivor.as_str()));
}

#[test]
fn a_worker_lost_after_the_early_metadata_does_not_break_cargo() {
    // The wrapper hands a remote job's `.rmeta` and its artifact notification to cargo before the
    // job ends (pipelining); if the worker dies after that, the local compile must not announce
    // the metadata a second time: cargo has already started the dependents.
    let (mut c, ws) = kill_setup();
    let killed = kill_mid_build(&mut c, &ws, KillWhen::AfterMetadata);
    assert!(killed.status.success(), "the build failed after a worker died:\n{}", killed.stderr);
    assert!(!killed.stderr.contains("panicked"), "{}", killed.stderr);
    assert!(n(&c.world.stats(), "/fallbacks/worker-lost") >= 1, "{:#}", c.world.stats());
}

#[test]
fn workers_reconnect_after_a_scheduler_restart() {
    let mut c = Cluster::start(Setup { workers: 2, seed_scheduler: true, seed_workers: true, ..Setup::default() });
    // This test is about workers reconnecting: the client tries again at once.
    c.world.set("FERRY_CLUSTER_BACKOFF", "0");
    let addr = c.scheduler.addr.clone();
    c.scheduler.kill();

    // Meanwhile, builds go on locally.
    let x = Lib::new(&c.world, "x", X_SOURCE);
    ok(x.ferry_output(&c.world));
    let s = c.world.stats();
    assert_eq!((n(&s, "/compiled_local"), n(&s, "/fallbacks/scheduler-unreachable")), (1, 1), "{s:#}");

    c.scheduler = c.world.scheduler_at(&addr, &[]);
    let id = &seed().id;
    c.status_until_within(Duration::from_secs(20), "both workers re-register with their toolchains", |s| {
        workers_of(s).len() == 2 && workers_of(s).iter().all(|w| has_toolchain(w, id))
    });
    c.world.ferry_ok(&["stats", "--zero"]);
    edit(&x.dir.join("x.rs"), "a + b", "b + a");
    let remote = x.ferry(&c.world);
    assert_eq!(remote.code, Some(0), "{}", remote.stderr);
    let s = c.world.stats();
    assert_eq!((n(&s, "/compiled_remote"), n(&s, "/compiled_local")), (1, 0), "{s:#}");
    assert_no_fallbacks(&s);
}

#[test]
fn toolchain_upload_once_and_list_shows_holders() {
    let c = Cluster::start(Setup { workers: 2, ..Setup::default() });
    let packaged = c.world.ferry_json(&["toolchain", "package", "--json"]);
    let id = packaged["id"].as_str().expect("an id").to_owned();
    assert_eq!(c.world.ferry_json(&["toolchain", "list", "--json"]), serde_json::json!([]));

    let first = c.world.ferry_json(&["toolchain", "upload", "--json"]);
    assert_eq!((&first["id"], &first["uploaded"]), (&Value::from(id.as_str()), &Value::Bool(true)), "{first}");
    assert_eq!(first["bytes_sent"], packaged["archive_bytes"], "{first}");
    let second = c.world.ferry_json(&["toolchain", "upload", "--json"]);
    assert_eq!((&second["uploaded"], &second["bytes_sent"]), (&Value::Bool(false), &Value::from(0)), "{second}");

    let list = c.world.ferry_json(&["toolchain", "list", "--json"]);
    let listed = list.as_array().filter(|l| l.len() == 1).map(|l| &l[0]).unwrap_or_else(|| panic!("{list:#}"));
    assert_eq!(listed["id"], id.as_str());
    assert_eq!(listed["rustc_version"], packaged["rustc_version"]);
    assert_eq!(listed["targets"], packaged["targets"]);
    assert_eq!(listed["bytes"], packaged["archive_bytes"]);
    assert!(listed["uploaded"].as_u64().unwrap_or(0) > 1_700_000_000, "upload time in Unix seconds: {listed}");

    // Both workers prefetch the new toolchain without any job asking for it.
    let mut everyone = vec![c.worker_id(0), c.worker_id(1)];
    everyone.sort();
    let holders = wait_until(Duration::from_secs(60), "the list names both workers", || {
        let list = c.world.ferry_json(&["toolchain", "list", "--json"]);
        let mut workers: Vec<String> =
            list[0]["workers"].as_array()?.iter().filter_map(|w| w.as_str().map(str::to_owned)).collect();
        workers.sort();
        (workers == everyone).then_some(workers)
    });
    assert_eq!(holders, everyone);
    assert!(remote_jobs(&c.world).is_empty());
    let x = Lib::new(&c.world, "x", X_SOURCE);
    ok(x.ferry_output(&c.world));
    assert_eq!(remote_jobs(&c.world).len(), 1, "{:#}", c.world.stats());
    assert_no_fallbacks(&c.world.stats());

    // A scheduler that is down from the start: the build goes on, with a counted fallback.
    let mut down = World::new();
    down.set("FERRY_SCHEDULER", format!("http://{}", closed_port()));
    let pkg = down.path().join("pkg");
    write(&pkg.join("Cargo.toml"), "[package]\nname = \"pkg\"\nversion = \"0.1.0\"\nedition = \"2021\"\n");
    write(&pkg.join("src/lib.rs"), "pub fn pkg() -> u32 { 7 }\n");
    ok_build(cargo_build(&down, &pkg, true));
    let s = down.stats();
    assert_eq!((n(&s, "/compiled_local"), n(&s, "/compiled_remote")), (1, 0), "{s:#}");
    assert_eq!(s["fallbacks"], serde_json::json!({"scheduler-unreachable": 1}), "{s:#}");
    // Right after, another compile does not even try (every wrapper backs off for a while).
    let x = Lib::new(&down, "x", X_SOURCE);
    ok(x.ferry_output(&down));
    let s = down.stats();
    assert_eq!((n(&s, "/fallbacks/scheduler-unreachable"), n(&s, "/fallbacks/cluster-backoff")), (1, 1), "{s:#}");
}

/// A scheduler whose archive store (`archive_store_size`) is smaller than a toolchain forgets the
/// one it held when it starts — nothing lists it, its files are gone — and refuses its upload,
/// saying why.
#[test]
fn a_toolchain_larger_than_the_archive_store_is_forgotten_and_refused() {
    let c = Cluster::start(Setup {
        seed_scheduler: true,
        scheduler_toml: "archive_store_size = \"1M\"\n",
        ..Setup::default()
    });
    assert_eq!(c.world.ferry_json(&["toolchain", "list", "--json"]), serde_json::json!([]));
    let store = c.world.path().join("scheduler/toolchains");
    let left: Vec<PathBuf> =
        crate::wrapper::files_under(&store).into_iter().filter(|p| !p.starts_with(store.join("tmp"))).collect();
    assert!(left.is_empty(), "{left:?}");
    let out = c.world.ferry(&["toolchain", "upload"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("larger than the scheduler's whole toolchain store") && stderr.contains("archive_store_size"),
        "{stderr}"
    );
    assert_eq!(c.world.ferry_json(&["toolchain", "list", "--json"]), serde_json::json!([]));
}

#[test]
fn toolchain_upload_to_first_job_time() {
    let c = Cluster::start(Setup { workers: 1, ..Setup::default() });
    let x = Lib::new(&c.world, "x", X_SOURCE);
    let plain = x.plain(&c.world);
    let started = Instant::now();
    let upload = c.world.ferry_json(&["toolchain", "upload", "--json"]);
    let uploaded = started.elapsed();
    let id = upload["id"].as_str().expect("an id");
    c.status_until("the worker prefetches the uploaded toolchain", |s| {
        workers_of(s).iter().all(|w| has_toolchain(w, id))
    });
    let prefetched = started.elapsed();
    let remote = x.ferry(&c.world);
    let total = started.elapsed();
    eprintln!(
        "toolchain upload to the end of the first remote job: {:.1} s (package + upload {:.1} s, the \
         worker's prefetch (fetch and unpack) {:.1} s, the job {:.1} s)",
        total.as_secs_f64(),
        uploaded.as_secs_f64(),
        (prefetched - uploaded).as_secs_f64(),
        (total - prefetched).as_secs_f64()
    );
    assert_eq!(upload["uploaded"], true, "{upload}");
    assert_eq!((remote.code, &remote.stderr), (plain.code, &plain.stderr));
    assert_same_files("first remote compile", &plain.files, &remote.files);
    let s = c.world.stats();
    assert_eq!((n(&s, "/compiled_remote"), n(&s, "/compiled_local")), (1, 0), "{s:#}");
}

#[test]
fn the_first_build_does_not_wait_for_the_toolchain_upload() {
    let mut c = Cluster::start(Setup { workers: 1, ..Setup::default() });
    // Only the cluster may answer the second build (no shared-tier hits of the first's results).
    c.world.set("FERRY_SHARED_CACHE", "off");
    let ws = c.world.path().join("ws");
    workspace(&ws);
    let expected = plain_outputs(&c.world, &ws);

    // Nothing on the cluster yet: the first miss starts the upload in the background, and every
    // compile until it lands is local.
    let s = build_as(&mut c, "first", &ws);
    assert_same_outputs(&expected, &outputs(&ws));
    assert!(n(&s, "/fallbacks/toolchain-uploading") >= 1, "{s:#}");
    assert_eq!(n(&s, "/compiled_remote") + n(&s, "/compiled_local"), UNITS, "{s:#}");
    let id = wait_until(Duration::from_secs(120), "the upload lands and the worker prefetches it", || {
        let list = c.world.ferry_json(&["toolchain", "list", "--json"]);
        let fetched = list[0]["workers"].as_array().is_some_and(|w| w.len() == 1);
        fetched.then(|| list[0]["id"].as_str().map(str::to_owned)).flatten()
    });
    let log = c.world.path().join(format!("cache-first/toolchains/upload-{id}.log"));
    let text = fs::read_to_string(&log).unwrap_or_default();
    assert!(text.contains(&format!("uploaded toolchain {id}")), "{}: {text}", log.display());

    // Once it is there, misses go to the worker.
    let s = build_as(&mut c, "second", &ws);
    assert_same_outputs(&expected, &outputs(&ws));
    assert_no_fallbacks(&s);
    assert_eq!((n(&s, "/compiled_remote"), n(&s, "/compiled_local")), (RLIBS.len() as u64, 3), "{s:#}");
}

#[test]
fn a_failed_background_upload_is_not_retried_by_every_compile() {
    let c = Cluster::start(Setup { workers: 1, scheduler_toml: "max_toolchain_bytes = 1000\n", ..Setup::default() });
    let x = Lib::new(&c.world, "x", X_SOURCE);
    let plain = x.plain(&c.world);
    let first = x.ferry(&c.world);
    assert_eq!((first.code, &first.stderr), (plain.code, &plain.stderr));
    assert_eq!(c.world.stats()["fallbacks"], serde_json::json!({"toolchain-uploading": 1}));
    let logs = c.world.path().join("cache/toolchains");
    let refused = wait_until(Duration::from_secs(120), "the background upload is refused", || {
        let log = fs::read_dir(&logs)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "log"))?;
        let text = fs::read_to_string(log).ok()?;
        text.contains("error").then_some(text)
    });
    assert!(refused.contains("over the limit") || refused.contains("larger"), "{refused}");
    // The lock is free again, but the toolchain is not there: no new upload for a while.
    let y = Lib::new(&c.world, "y", X_SOURCE);
    let plain = y.plain(&c.world);
    let second = y.ferry(&c.world);
    assert_eq!((second.code, &second.stderr), (plain.code, &plain.stderr));
    let s = c.world.stats();
    assert_eq!(s["fallbacks"], serde_json::json!({"toolchain-uploading": 1, "toolchain-upload-failed": 1}), "{s:#}");
    assert_eq!((n(&s, "/compiled_local"), n(&s, "/compiled_remote")), (2, 0), "{s:#}");
    assert_eq!(c.world.ferry_json(&["toolchain", "list", "--json"]), serde_json::json!([]));
}

#[test]
fn a_client_that_may_not_upload_never_packs_a_toolchain() {
    let tokens = "[[tokens]]\ntoken = \"client-token-0123456789abcdef\"\nroles = [\"client\"]\n\
                  [[tokens]]\ntoken = \"worker-token-0123456789abcdef\"\nroles = [\"worker\"]\n";
    let c = Cluster::start(Setup {
        workers: 1,
        scheduler_toml: tokens,
        worker_toml: "token = \"worker-token-0123456789abcdef\"\n",
        client_token: Some("client-token-0123456789abcdef"),
        ..Setup::default()
    });
    let x = Lib::new(&c.world, "x", X_SOURCE);
    let plain = x.plain(&c.world);
    let first = x.ferry(&c.world);
    assert_eq!((first.code, &first.stderr), (plain.code, &plain.stderr));
    let s = c.world.stats();
    assert_eq!(s["fallbacks"], serde_json::json!({"toolchain-not-uploaded": 1}), "{s:#}");
    // Nothing was packed or started: no upload log or marker, no file the size of an archive.
    let made: Vec<PathBuf> = crate::wrapper::files_under(&c.world.cache_dir())
        .into_iter()
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy().into_owned();
            name.starts_with("upload-")
                || name.ends_with(".started")
                || fs::metadata(p).is_ok_and(|m| m.len() > 1 << 20)
        })
        .collect();
    assert!(made.is_empty(), "the client packed or started an upload: {made:?}");
    let table = c.world.ferry_ok(&["stats"]);
    assert!(table.contains("a machine with the 'toolchain-upload' role"), "the note says what to do:\n{table}");
}

#[test]
fn build_script_probes_compile_locally() {
    let c = Cluster::start(Setup { workers: 1, seed_scheduler: true, seed_workers: true, ..Setup::default() });
    let pkg = c.world.path().join("probing");
    write(&pkg.join("Cargo.toml"), "[package]\nname = \"probing\"\nversion = \"0.1.0\"\nedition = \"2021\"\n");
    // As proc-macro2 and anyhow do: compile snippets into OUT_DIR through the same wrapper.
    write(
        &pkg.join("build.rs"),
        r#"use std::process::{Command, Stdio};
fn main() {
    let out = std::env::var("OUT_DIR").unwrap();
    std::fs::create_dir_all(format!("{out}/probe")).unwrap();
    let rustc = std::env::var("RUSTC").unwrap();
    let wrapper = std::env::var("RUSTC_WRAPPER").ok().filter(|w| !w.is_empty());
    let probe = |name: &str, code: &str| -> bool {
        let src = format!("{out}/{name}.rs");
        std::fs::write(&src, code).unwrap();
        let mut cmd = match &wrapper {
            Some(w) => { let mut c = Command::new(w); c.arg(&rustc); c }
            None => Command::new(&rustc),
        };
        cmd.args(["--crate-type=lib", "--crate-name", name, "--emit=dep-info,metadata", "--out-dir"]);
        cmd.arg(format!("{out}/probe")).arg(&src).stderr(Stdio::null());
        cmd.status().unwrap().success()
    };
    println!("cargo::rustc-check-cfg=cfg(has_good,has_bad)");
    if probe("good", "pub fn f() {}") { println!("cargo::rustc-cfg=has_good"); }
    if probe("bad", "pub fn f() -> u32 { \"no\" }") { println!("cargo::rustc-cfg=has_bad"); }
}
"#,
    );
    write(
        &pkg.join("src/lib.rs"),
        "#[cfg(not(has_good))]\ncompile_error!(\"the good probe failed\");\n\
         #[cfg(has_bad)]\ncompile_error!(\"the bad probe passed\");\npub const PROBED: bool = true;\n",
    );
    ok_build(cargo_build(&c.world, &pkg, true));
    let s = c.world.stats();
    assert_no_fallbacks(&s);
    let remote: Vec<String> = remote_jobs(&c.world).into_iter().map(|j| j.krate).collect();
    assert_eq!(remote, ["probing"], "{s:#}");
    // The build script, and both probes.
    assert_eq!((n(&s, "/compiled_remote"), n(&s, "/compiled_local")), (1, 3), "{s:#}");
}

#[test]
fn a_remote_compile_sees_the_variables_a_local_one_sees() {
    // `option_env!` compiles either way: a variable the job does not carry silently changes the
    // crate, and the result is stored under the key of the value the client has.
    let mut c = Cluster::start(Setup { workers: 1, seed_scheduler: true, seed_workers: true, ..Setup::default() });
    c.world.set("FERRY_TEST_OPTIONAL", "hello");
    let source = "pub const VALUE: Option<&str> = option_env!(\"FERRY_TEST_OPTIONAL\");\n\n\
                  pub fn value_len() -> usize {\n    VALUE.map_or(0, str::len)\n}\n";
    let opt = Lib::new(&c.world, "opt", source);
    let plain = opt.plain(&c.world);
    let remote = opt.ferry(&c.world);
    assert_eq!(remote.code, Some(0), "{}", remote.stderr);
    let s = c.world.stats();
    assert_eq!(n(&s, "/compiled_remote") + n(&s, "/compiled_local"), 1, "{s:#}");

    // The same compile again, without a cluster: a hit in the local cache.
    remove_outputs(&opt);
    c.world.set("FERRY_SCHEDULER", "");
    let hit = opt.ferry(&c.world);
    assert_eq!(n(&c.world.stats(), "/hits_local"), 1, "{:#}", c.world.stats());
    let cached = if hit.files == plain.files { "right" } else { "wrong" };
    assert_same_files(
        &format!("remote compile (the cache now serves the {cached} bytes)"),
        &plain.files,
        &remote.files,
    );
    assert_same_files("local cache hit", &plain.files, &hit.files);
}

#[test]
fn a_stopped_scheduler_costs_a_bounded_wait_not_the_build() {
    let c = Cluster::start(Setup { workers: 1, seed_scheduler: true, seed_workers: true, ..Setup::default() });
    let x = Lib::new(&c.world, "x", X_SOURCE);
    let plain = x.plain(&c.world);
    // A frozen scheduler (a paused VM, a stuck process): connections are accepted by the kernel,
    // nothing ever answers.
    let _frozen = Frozen::new(&c.scheduler);
    let mut run = Background::spawn(x.ferry_command(&c.world), &c.world.path().join("frozen-scheduler"));
    let (status, took) = run.wait_bounded(HANG_BOUND);
    let stderr = run.stderr();
    assert!(status.is_some(), "the wrapper still waits for a frozen scheduler after {took:?}:\n{stderr}");
    assert_eq!((status.and_then(|s| s.code()), stderr.as_str()), (Some(0), plain.stderr.as_str()));
    assert_same_files("local fallback", &plain.files, &x.outputs());
    let s = c.world.stats();
    assert_eq!((n(&s, "/compiled_local"), fallback_count(&s)), (1, 1), "{s:#}");
}

#[test]
fn a_stopped_worker_costs_a_bounded_wait_not_the_build() {
    let c = Cluster::start(Setup {
        workers: 1,
        seed_scheduler: true,
        seed_workers: true,
        lease_ms: Some(2000),
        ..Setup::default()
    });
    let big = Lib::new(&c.world, "big", &big_source(8000));
    let mut run = Background::spawn(big.ferry_command(&c.world), &c.world.path().join("frozen-worker"));
    wait_until(Duration::from_secs(90), "the worker compiling big", || {
        assert!(run.running(), "the compile ended before the worker was frozen:\n{}", run.stderr());
        rustc_running_under(c.workers[0].child.id(), "big").then_some(())
    });
    let _frozen = Frozen::new(&c.workers[0]);
    let frozen_at = Instant::now();
    c.status_until_within(Duration::from_secs(8), "the scheduler drops the frozen worker (2 s lease)", |s| {
        workers_of(s).is_empty()
    });
    let (status, _) = run.wait_bounded(HANG_BOUND.saturating_sub(frozen_at.elapsed()));
    let took = frozen_at.elapsed();
    assert!(status.is_some(), "the wrapper still waits for a frozen worker after {took:?}:\n{}", run.stderr());
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", run.stderr());
    let s = c.world.stats();
    assert_eq!((n(&s, "/compiled_local"), fallback_count(&s)), (1, 1), "{s:#}");
}

// ---------------------------------------------------------------------------------------------
// A cluster on loopback
// ---------------------------------------------------------------------------------------------

/// How long a wrapper may wait on a frozen peer before compiling locally: generous (a cold
/// connection, a slow machine), and far from "forever".
const HANG_BOUND: Duration = Duration::from_secs(30);

// ---- the shared cache tier ---------------------------------------------------------------------

/// Every unit of [`workspace`]: the rlibs, the proc-macro, the build script and the binary.
const UNITS: u64 = RLIBS.len() as u64 + 3;

#[test]
fn a_second_client_with_an_empty_cache_hits_every_unit_in_the_shared_tier() {
    let mut c = Cluster::start(Setup { workers: 2, seed_scheduler: true, seed_workers: true, ..Setup::default() });
    let ws = c.world.path().join("ws");
    workspace(&ws);
    // A file reached through `..` (as libc's sources do).
    fs::create_dir_all(ws.join("crates/texty/src/nested")).expect("mkdir");
    write(&ws.join("crates/texty/extra.txt"), "through dot-dot\n");
    let lib = ws.join("crates/texty/src/lib.rs");
    let source = fs::read_to_string(&lib).expect("texty");
    write(&lib, &format!("{source}\npub const EXTRA: &str = include_str!(\"nested/../../extra.txt\");\n"));
    // Both machines reach the linker driver through a `cc` of their own on PATH.
    let tools = c.world.path().join("tools");
    fs::create_dir_all(&tools).expect("mkdir");
    replace_script(&tools.join("cc"), "exec /usr/bin/cc \"$@\"");
    let path = format!("{}:{}", tools.display(), std::env::var("PATH").unwrap_or_default());
    c.world.set("PATH", &path);
    let expected = plain_outputs(&c.world, &ws);

    build_as(&mut c, "first", &ws);
    assert_same_outputs(&expected, &outputs(&ws));
    let s = c.world.stats();
    assert_no_fallbacks(&s);
    assert_eq!((n(&s, "/compiled_remote"), n(&s, "/compiled_local")), (RLIBS.len() as u64, 3), "{s:#}");

    // Workers publish in the background: let the last results land first.
    wait_until(Duration::from_secs(30), "every unit's result and manifest in the shared tier", || {
        (scheduler_entries(&c).len() >= 2 * UNITS as usize).then_some(())
    });
    // A teammate: empty local cache, same sources at the same place; a byte-identical linker
    // driver with another inode and mtime, colors on, its own registry token and HTTP timeout.
    fs::copy(tools.join("cc"), tools.join("cc.copy")).expect("copy");
    fs::rename(tools.join("cc.copy"), tools.join("cc")).expect("rename");
    fs::File::options()
        .append(true)
        .open(tools.join("cc"))
        .expect("open")
        .set_modified(std::time::UNIX_EPOCH + Duration::from_secs(1 << 30))
        .expect("mtime");
    c.world
        .set("CARGO_TERM_COLOR", "always")
        .set("CARGO_REGISTRY_TOKEN", "second-secret")
        .set("CARGO_HTTP_TIMEOUT", "77");
    client(&mut c, "second");
    clean(&c.world, &ws);
    let jobs = remote_jobs(&c.world).len();
    ok_build(cargo_build(&c.world, &ws, true));
    assert_same_outputs(&expected, &outputs(&ws));
    let s = c.world.stats();
    assert_eq!((n(&s, "/hits_remote"), n(&s, "/misses")), (UNITS, 0), "{s:#}");
    assert_eq!((n(&s, "/compiled_remote"), n(&s, "/compiled_local")), (0, 0), "{s:#}");
    assert_eq!(remote_jobs(&c.world).len(), jobs, "a shared hit ran a job");
    assert_eq!(app(&ws), APP_LINE);
    // The hits were promoted: the next build is all local hits.
    clean(&c.world, &ws);
    c.world.ferry_ok(&["stats", "--zero"]);
    ok_build(cargo_build(&c.world, &ws, true));
    let s = c.world.stats();
    assert_eq!((n(&s, "/hits_local"), n(&s, "/hits_remote")), (UNITS, 0), "{s:#}");
}

#[test]
fn a_changed_toolchain_never_hits_and_the_same_toolchain_elsewhere_hits_everything() {
    let t = crate::toolchain::ToolchainCopy::new();
    let elsewhere = crate::toolchain::ToolchainCopy::new();
    let mut c = Cluster::start(Setup { workers: 1, seed_scheduler: true, seed_workers: true, ..Setup::default() });
    let ws = c.world.path().join("ws");
    workspace(&ws);
    let expected = plain_outputs(&c.world, &ws);

    // A: toolchain T (a copy; the same id as the installed one) fills the shared tier.
    c.world.set("RUSTC", t.rustc());
    let s = build_as(&mut c, "a", &ws);
    assert_eq!((n(&s, "/misses"), n(&s, "/compiled_remote")), (UNITS, RLIBS.len() as u64), "{s:#}");

    // B: T' differs from T in one byte of one file of the set, size and mtime restored.
    let rel = format!("lib/rustlib/{}/bin/wasm-component-ld", crate::toolchain::installed().host);
    let offset = t.len(&rel) / 2;
    t.write_in_place(&rel, offset, t.byte_at(&rel, offset) ^ 0x5a);
    let s = build_as(&mut c, "b", &ws);
    assert_eq!((n(&s, "/hits_remote"), n(&s, "/hits_local"), n(&s, "/misses")), (0, 0, UNITS), "{s:#}");
    assert_eq!(n(&s, "/compiled_remote") + n(&s, "/compiled_local"), UNITS, "{s:#}");
    assert_same_outputs(&expected, &outputs(&ws));

    // C: T installed at another path hits everything A left.
    c.world.set("RUSTC", elsewhere.rustc());
    let s = build_as(&mut c, "c", &ws);
    assert_eq!((n(&s, "/hits_remote"), n(&s, "/misses")), (UNITS, 0), "{s:#}");
    assert_eq!(app(&ws), APP_LINE);
}

#[test]
fn only_workers_and_cache_write_clients_write_the_shared_tier() {
    const CLIENT: &str = "client-token-0123456789abcdef";
    const CI: &str = "ci-token-0123456789abcdef0123";
    const WORKER: &str = "worker-token-0123456789abcdef";
    let tokens = "[[tokens]]\ntoken = \"client-token-0123456789abcdef\"\nroles = [\"client\"]\n\
                  [[tokens]]\ntoken = \"ci-token-0123456789abcdef0123\"\nroles = [\"client\", \"cache-write\"]\n\
                  [[tokens]]\ntoken = \"worker-token-0123456789abcdef\"\nroles = [\"worker\"]\n";
    let mut c = Cluster::start(Setup {
        workers: 1,
        seed_scheduler: true,
        seed_workers: true,
        scheduler_toml: tokens,
        worker_toml: "token = \"worker-token-0123456789abcdef\"\n",
        client_token: Some(CLIENT),
        ..Setup::default()
    });
    let ws = c.world.path().join("ws");
    workspace(&ws);
    // The laptops' registry credentials: like their FERRY_TOKEN, never for a worker's eyes.
    const REGISTRY: &str = "registry-secret-9c41e07b";
    const NAMED_REGISTRY: &str = "named-registry-secret-27d5aa";
    c.world.set("CARGO_REGISTRY_TOKEN", REGISTRY).set("CARGO_REGISTRIES_INTERNAL_TOKEN", NAMED_REGISTRY);

    // A laptop: its rlibs compile on the worker (which publishes them); its own compiles of the
    // proc-macro, build script and binary may not be written.
    let s = build_as(&mut c, "laptop", &ws);
    assert!(n(&s, "/shared_read_only") >= 1, "{s:#}");
    assert!(s["shared_errors"].as_object().is_none_or(|e| !e.contains_key("write-denied")), "not an error: {s:#}");
    assert_eq!(n(&s, "/shared_writes"), 0, "{s:#}");

    let s = build_as(&mut c, "second-laptop", &ws);
    assert_eq!((n(&s, "/hits_remote"), n(&s, "/misses")), (RLIBS.len() as u64, 3), "only the workers' results: {s:#}");

    // CI holds cache-write: its local compiles are published.
    c.world.set("FERRY_TOKEN", CI);
    let s = build_as(&mut c, "ci", &ws);
    assert_eq!((n(&s, "/hits_remote"), n(&s, "/shared_writes")), (RLIBS.len() as u64, 3), "{s:#}");

    c.world.set("FERRY_TOKEN", CLIENT);
    assert_eq!(n(&build_as(&mut c, "third-laptop", &ws), "/hits_remote"), UNITS);
    assert_eq!(app(&ws), APP_LINE);

    // No client's secret reached the worker: not its data directory (blobs, job trees, state),
    // not its log at debug level.
    let worker = &c.workers[0];
    let mut places: Vec<(String, Vec<u8>)> = vec![(worker.log.display().to_string(), worker.log_text().into_bytes())];
    let data = c.world.path().join("worker0");
    for file in crate::wrapper::files_under(&data) {
        // Unpacked toolchains are verified against their archive's id: nothing of a client's.
        if !file.starts_with(data.join("toolchains")) {
            places.push((file.display().to_string(), fs::read(&file).unwrap_or_default()));
        }
    }
    assert!(places.len() > 10 && places.iter().any(|(p, _)| p.contains("/blobs/")), "nothing looked at: {places:?}");
    for secret in [CLIENT, CI, REGISTRY, NAMED_REGISTRY] {
        for (place, bytes) in &places {
            assert!(!contains(bytes, secret.as_bytes()), "{secret} is in {place}");
        }
    }
    assert!(worker.log_text().contains("job"), "the worker's log is empty");
    let _ = WORKER;
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn a_corrupt_shared_entry_is_reported_and_never_promoted() {
    let mut c = Cluster::start(Setup { workers: 1, seed_scheduler: true, seed_workers: true, ..Setup::default() });
    let ws = c.world.path().join("ws");
    workspace(&ws);
    let expected = plain_outputs(&c.world, &ws);
    build_as(&mut c, "first", &ws);

    // Flip one byte in the middle of every entry the scheduler stores.
    let entries = scheduler_entries(&c);
    assert!(entries.len() as u64 >= 2 * UNITS, "{} entries", entries.len());
    for entry in &entries {
        flip_middle_byte(entry);
    }
    assert_eq!(c.status()["shared_corrupt_entries"], 0);
    assert_corrupt_tier_is_harmless(&mut c, &ws, &expected);
    assert!(c.scheduler.log_text().contains("corrupt"), "the scheduler did not report it");
    let removed = c.status()["shared_corrupt_entries"].as_u64().unwrap_or(0);
    assert!(removed >= 1 && removed <= entries.len() as u64, "{removed} of {} entries", entries.len());
}

#[test]
fn only_entries_signed_by_trusted_writers_are_served_and_a_revoked_key_is_replaced() {
    let mut c = Cluster::start(Setup { workers: 1, seed_scheduler: true, seed_workers: true, ..Setup::default() });
    let ws = c.world.path().join("ws");
    workspace(&ws);
    let expected = plain_outputs(&c.world, &ws);
    // The first machine: its rlibs compile on the worker, the rest here; both publish (the
    // loopback default grants this client `cache-write`), each signing with its own key.
    build_as(&mut c, "first", &ws);
    wait_until(Duration::from_secs(30), "every unit's result and manifest in the shared tier", || {
        (scheduler_entries(&c).len() >= 2 * UNITS as usize).then_some(())
    });
    let trusted = trusted_writers(&c);
    let worker_key: ferry_cache::WriterKey =
        fs::read_to_string(c.world.path().join("worker0/writer.key")).map(|_| ()).map_or_else(
            |e| panic!("the worker made no writer key: {e}"),
            |()| ferry_cache::Signer::read(&c.world.path().join("worker0/writer.key")).unwrap().public(),
        );
    assert!(trusted.trusted.contains(&worker_key), "the worker's key is listed: {trusted:?}");
    for entry in scheduler_entries(&c) {
        let bytes = fs::read(&entry).expect("entry");
        let signer = ferry_cache::signer_of(&bytes).unwrap_or_else(|| panic!("{} is not signed", entry.display()));
        assert!(ferry_cache::verify(&bytes, &trusted).is_ok(), "{} signed by {signer}, not trusted", entry.display());
    }
    let s = build_as(&mut c, "second", &ws);
    assert_eq!((n(&s, "/hits_remote"), n(&s, "/misses")), (UNITS, 0), "{s:#}");
    assert_same_outputs(&expected, &outputs(&ws));

    // A key nobody registered (a laptop's own) cannot store an entry, even with every role.
    let (laptop, _) = ferry_cache::Signer::generate().unwrap();
    let some = scheduler_entries(&c)[0].clone();
    let key: ferry_cache::CacheKey = some.file_name().unwrap().to_str().unwrap().parse().unwrap();
    let forged = ferry_cache::sign(&fs::read(&some).unwrap(), &laptop);
    let refused = cache_put(&c, key, &forged).expect_err("an entry signed by an unknown key is stored");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    // One changed on the cache node itself (re-signed by that key) is refused by every reader and
    // replaced by the next trusted writer's put.
    for entry in scheduler_entries(&c) {
        let bytes = fs::read(&entry).unwrap();
        fs::write(&entry, ferry_cache::sign(&bytes, &laptop)).unwrap();
    }
    let s = build_as(&mut c, "after-forgery", &ws);
    assert_eq!(n(&s, "/hits_remote"), 0, "a forged entry was served: {s:#}");
    assert!(n(&s, "/shared_errors/corrupt-entry") >= 1, "{s:#}");
    assert_same_outputs(&expected, &outputs(&ws));
    let s = build_as(&mut c, "after-healing", &ws);
    assert_eq!((n(&s, "/hits_remote"), n(&s, "/misses")), (UNITS, 0), "the tier healed: {s:#}");

    // The worker's key revoked (a restart with `revoked_writers`): its entries are misses, and
    // after a rotation (a new key, made at the worker's next start) its new entries hit.
    let addr = c.scheduler.addr.clone();
    c.scheduler.kill();
    let config = c.world.path().join("scheduler-revoking.toml");
    write(&config, &format!("revoked_writers = [\"{worker_key}\"]\n"));
    c.scheduler = c.world.scheduler_at(&addr, &["--config", &config.display().to_string()]);
    c.workers[0].kill();
    fs::remove_file(c.world.path().join("worker0/writer.key")).unwrap();
    let scheduler_url = c.scheduler.url();
    c.workers[0] = c.world.worker("worker0", &scheduler_url, &["--slots", "2"]);
    let id = seed().id.clone();
    c.status_until_within(Duration::from_secs(20), "the worker re-registers", |s| {
        workers_of(s).len() == 1 && workers_of(s).iter().all(|w| has_toolchain(w, &id))
    });
    let rotated = ferry_cache::Signer::read(&c.world.path().join("worker0/writer.key")).unwrap().public();
    assert_ne!(rotated, worker_key);
    let s = build_as(&mut c, "after-revocation", &ws);
    assert_eq!(n(&s, "/hits_remote"), UNITS - RLIBS.len() as u64, "the revoked key's rlibs missed: {s:#}");
    assert_eq!(n(&s, "/compiled_remote"), RLIBS.len() as u64, "{s:#}");
    let s = build_as(&mut c, "after-rotation", &ws);
    assert_eq!((n(&s, "/hits_remote"), n(&s, "/misses")), (UNITS, 0), "the rotated key's entries hit: {s:#}");
    assert_same_outputs(&expected, &outputs(&ws));
}

/// The scheduler's list of trusted writers, asked as a reader asks it.
fn trusted_writers(c: &Cluster) -> ferry_cache::Trust {
    let runtime = std::sync::Arc::new(tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap());
    let channel =
        runtime.block_on(tonic::transport::Endpoint::from_shared(c.scheduler.url()).unwrap().connect()).unwrap();
    let client = ferry_proto::v1::scheduler_client::SchedulerClient::with_interceptor(
        channel,
        ferry_proto::TokenInterceptor::new(None).unwrap(),
    );
    ferry_proto::RemoteCache::new(runtime, client, Duration::from_secs(10)).trusted_writers().unwrap()
}

/// A raw `CachePut` of `bytes` under `key`, as any caller with a token could send it.
fn cache_put(c: &Cluster, key: ferry_cache::CacheKey, bytes: &[u8]) -> Result<bool, tonic::Status> {
    use ferry_proto::v1::{self, cache_upload};
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let mut client = ferry_proto::v1::scheduler_client::SchedulerClient::connect(c.scheduler.url()).await.unwrap();
        let header = v1::CacheHeader { key: Some(ferry_proto::to_digest(key.0)), size: bytes.len() as u64 };
        let mut messages = vec![v1::CacheUpload { kind: Some(cache_upload::Kind::Header(header)) }];
        messages.extend(
            bytes.chunks(1 << 20).map(|c| v1::CacheUpload { kind: Some(cache_upload::Kind::Data(c.to_vec())) }),
        );
        client.cache_put(tokio_stream::iter(messages)).await.map(|r| r.into_inner().published)
    })
}

#[test]
fn redis_as_the_shared_tier_serves_hits_and_drops_corrupt_entries() {
    let redis_dir = tempfile::tempdir().expect("temp dir");
    let redis = ferry_tests::Redis::start(redis_dir.path());
    let mut c = Cluster::start(Setup {
        workers: 1,
        seed_scheduler: true,
        seed_workers: true,
        env: vec![("FERRY_SHARED_CACHE", redis.url())],
        ..Setup::default()
    });
    let ws = c.world.path().join("ws");
    workspace(&ws);
    let expected = plain_outputs(&c.world, &ws);
    assert_eq!(n(&build_as(&mut c, "first", &ws), "/compiled_remote"), RLIBS.len() as u64);
    assert_eq!(scheduler_entries(&c).len(), 0, "the scheduler's own tier was used");

    let s = build_as(&mut c, "second", &ws);
    assert_eq!((n(&s, "/hits_remote"), n(&s, "/misses")), (UNITS, 0), "{s:#}");
    assert_same_outputs(&expected, &outputs(&ws));

    // Damage every value in place (same length).
    let keys: Vec<String> = redis.cli(&["--scan", "--pattern", "ferry:*"]).lines().map(str::to_owned).collect();
    assert!(keys.len() as u64 >= 2 * UNITS, "{keys:?}");
    for key in &keys {
        flip_middle_byte_of_value(&redis, key);
    }
    assert_corrupt_tier_is_harmless(&mut c, &ws, &expected);
}

/// Redis over TLS (`rediss://`; a CA made here by `openssl`, given to the worker and the clients
/// as `FERRY_REDIS_CA`): the worker publishes through it, a second machine hits every unit with
/// byte-identical outputs, and a byte flipped in every stored value (through `redis-cli --tls`) is
/// refused, counted and healed.
#[test]
fn redis_over_tls_serves_hits_and_drops_corrupt_entries() {
    let redis_dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new(&redis_dir.path().join("pki"));
    let redis = ferry_tests::Redis::start_tls(redis_dir.path(), &pki, "no");
    assert!(redis.url().starts_with("rediss://"), "{}", redis.url());
    let mut c = Cluster::start(Setup {
        workers: 1,
        seed_scheduler: true,
        seed_workers: true,
        env: vec![("FERRY_SHARED_CACHE", redis.url()), ("FERRY_REDIS_CA", pki.ca.display().to_string())],
        ..Setup::default()
    });
    let ws = c.world.path().join("ws");
    workspace(&ws);
    let expected = plain_outputs(&c.world, &ws);
    assert_eq!(n(&build_as(&mut c, "first", &ws), "/compiled_remote"), RLIBS.len() as u64);
    assert_eq!(scheduler_entries(&c).len(), 0, "the scheduler's own tier was used");
    let keys =
        || -> Vec<String> { redis.cli(&["--scan", "--pattern", "ferry:*"]).lines().map(str::to_owned).collect() };
    wait_until(Duration::from_secs(30), "every unit's result and manifest in Redis", || {
        (keys().len() as u64 >= 2 * UNITS).then_some(())
    });

    let s = build_as(&mut c, "second", &ws);
    assert_eq!((n(&s, "/hits_remote"), n(&s, "/misses")), (UNITS, 0), "{s:#}");
    assert_same_outputs(&expected, &outputs(&ws));

    for key in keys() {
        flip_middle_byte_of_value(&redis, &key);
    }
    assert_corrupt_tier_is_harmless(&mut c, &ws, &expected);
}

/// A client that cannot check the Redis server's certificate never uses the tier and never fails
/// a build: a CA that did not sign it, or none (the system's roots), is a connection problem,
/// counted (`shared_errors`) and logged with the reason; a CA file that cannot be read is a
/// configuration problem (`config_errors`, naming the variable) that turns the tier off. Either
/// way every unit compiles here, byte-identical, and nothing reaches Redis. With the right CA, as
/// a control, one machine publishes and the next hits every unit.
#[test]
fn redis_over_tls_with_a_wrong_or_absent_ca_is_loud_and_builds_locally() {
    let redis_dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new(&redis_dir.path().join("pki"));
    let redis = ferry_tests::Redis::start_tls(redis_dir.path(), &pki, "no");
    let mut world = World::new();
    world.set("FERRY_SHARED_CACHE", redis.url());
    // Every machine here publishes as the CI writer (the tier has no scheduler to list writers).
    let ci = ci_writer(&mut world);
    world.set("FERRY_WRITER_KEY_FILE", &ci);
    let ws = world.path().join("ws");
    workspace(&ws);
    let expected = plain_outputs(&world, &ws);
    // Builds from clean as a fresh machine `name`: its counters and its log.
    let build = |world: &mut World, name: &str| -> (Value, String) {
        let cache = world.path().join(format!("cache-{name}"));
        world.set("FERRY_CACHE_DIR", &cache);
        world.ferry_ok(&["stats", "--zero"]);
        clean(world, &ws);
        ok_build(cargo_build(world, &ws, true));
        assert_same_outputs(&expected, &outputs(&ws));
        (world.stats(), fs::read_to_string(cache.join("ferry.log")).unwrap_or_default())
    };

    for (name, ca) in [("other-ca", Some(&pki.other_ca)), ("system-roots", None)] {
        world.set("FERRY_REDIS_CA", ca.map(|p| p.display().to_string()).unwrap_or_default());
        let (s, log) = build(&mut world, name);
        assert_eq!((n(&s, "/misses"), n(&s, "/hits_remote"), n(&s, "/shared_writes")), (UNITS, 0, 0), "{name}: {s:#}");
        assert!(n(&s, "/shared_errors/unavailable") >= 1, "{name}: {s:#}");
        assert!(s["config_errors"].as_object().is_none_or(|e| e.is_empty()), "{name}: {s:#}");
        assert!(
            log.contains("invalid peer certificate") && log.contains("FERRY_REDIS_CA"),
            "{name}: the log does not say why:\n{}",
            tail(&log, 20)
        );
    }
    assert_eq!(redis.cli(&["DBSIZE"]).trim(), "0", "a client that could not check the server wrote to it");

    let missing = world.path().join("missing-ca.pem");
    world.set("FERRY_REDIS_CA", &missing);
    let (s, _) = build(&mut world, "missing-ca");
    assert_eq!((n(&s, "/misses"), n(&s, "/hits_remote")), (UNITS, 0), "{s:#}");
    assert!(s["shared_errors"].as_object().is_none_or(|e| e.is_empty()), "the tier was used: {s:#}");
    let errors = s["config_errors"].as_object().cloned().unwrap_or_default();
    assert!(
        errors.keys().any(|p| p.starts_with("environment variable FERRY_REDIS_CA: ")
            && p.contains(&missing.display().to_string())
            && p.ends_with("the shared tier is off")),
        "{s:#}"
    );
    let out = world.ferry(&["stats"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ferry: configuration error: environment variable FERRY_REDIS_CA: "), "{stderr}");

    world.set("FERRY_REDIS_CA", &pki.ca);
    let (s, _) = build(&mut world, "right-ca");
    assert!(n(&s, "/shared_writes") >= 1 && s["shared_errors"].as_object().is_none_or(|e| e.is_empty()), "{s:#}");
    let (s, _) = build(&mut world, "right-ca-second");
    assert_eq!((n(&s, "/hits_remote"), n(&s, "/misses")), (UNITS, 0), "{s:#}");
}

/// `RedisStore` itself against a Redis that requires client certificates
/// (`--tls-auth-clients yes`): refused without one (and with a CA that did not sign the server's,
/// saying so); with one, a 5 MB entry goes in once (`SET NX`: a second put finds it), comes back
/// whole, and once damaged in Redis is refused as corrupt and deleted.
#[test]
fn redis_store_over_mutual_tls_publishes_once_and_deletes_what_does_not_verify() {
    use ferry_cache::{Error, PutOutcome, RedisStore, RedisTls, Store};
    let redis_dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new(&redis_dir.path().join("pki"));
    let redis = ferry_tests::Redis::start_tls(redis_dir.path(), &pki, "yes");
    let ca = RedisTls::read_ca(&pki.ca).expect("the CA");
    let identity = RedisTls::read_identity(&pki.client_cert, &pki.client_key).expect("the client certificate");
    let mismatched = RedisTls::read_identity(&pki.client_cert, &pki.key);
    assert!(mismatched.as_ref().is_err_and(|e| e.contains("client.pem")), "another key: {mismatched:?}");
    let store = |ca: &[u8], identity: Option<(Vec<u8>, Vec<u8>)>| {
        let tls = RedisTls { ca: Some(ca.to_vec()), identity };
        RedisStore::new(&redis.url(), &tls, Duration::from_secs(5)).expect("store")
    };

    let mut content = vec![0u8; 5 << 20];
    blake3::Hasher::new().update(b"big").finalize_xof().fill(&mut content);
    let key = ferry_cache::CacheKey(*blake3::hash(b"a big entry over tls").as_bytes());
    let output = ferry_cache::CompileOutput {
        files: vec![ferry_cache::OutputFile {
            path: "/big.rlib".into(),
            executable: false,
            bytes: content.clone().into(),
        }],
        ..Default::default()
    };
    let entry = ferry_cache::Entry::encode_result(key, [1; 32], &output);

    let anonymous = store(&ca, None).put_encoded(&key, &entry);
    assert!(matches!(anonymous, Err(Error::Io { .. })), "without a client certificate: {anonymous:?}");
    let other_ca = RedisTls::read_ca(&pki.other_ca).expect("the other CA");
    match store(&other_ca, Some(identity.clone())).get(&key) {
        Err(Error::Io { source, .. }) => assert!(source.to_string().contains("invalid peer certificate"), "{source}"),
        other => panic!("a server the CA did not sign: {other:?}"),
    }
    assert_eq!(redis.cli(&["DBSIZE"]).trim(), "0");

    let store = store(&ca, Some(identity));
    assert_eq!(store.put_encoded(&key, &entry).expect("put"), PutOutcome::Published { bytes: entry.len() as u64 });
    assert_eq!(store.put_encoded(&key, &entry).expect("put"), PutOutcome::AlreadyPresent);
    let back = store.get(&key).expect("get").expect("the big entry");
    let back = ferry_cache::CompileOutput::decode(&back.payload).expect("a compile result");
    assert!(back.files[0].bytes[..] == content[..], "the big entry came back changed");

    let name = ferry_cache::redis_key(&key);
    redis.cli(&["SETRANGE", &name, &(entry.len() / 2).to_string(), "damaged!"]);
    let damaged = store.get(&key);
    assert!(matches!(damaged, Err(Error::Corrupt { .. })), "the damaged entry: {damaged:?}");
    assert_eq!(redis.cli(&["EXISTS", &name]).trim(), "0", "the damaged entry was not deleted");
    assert_eq!(store.get(&key).expect("get").map(|_| ()), None);
}

/// With every shared entry damaged: a client with an empty cache reports corruption, promotes
/// nothing, and builds the right outputs; its own cache then replays them correctly.
/// memcached as the shared tier (one real `memcached`, started here): a second machine hits every
/// unit with byte-identical outputs; an entry of several MB goes in as chunks and comes back whole;
/// every item damaged in place (a byte flipped) is refused by its digest and healed.
#[test]
fn memcached_as_the_shared_tier_serves_hits_and_drops_corrupt_entries() {
    let memcached = ferry_tests::Memcached::start();
    let mut c = Cluster::start(Setup {
        workers: 1,
        seed_scheduler: true,
        seed_workers: true,
        env: vec![("FERRY_SHARED_CACHE", memcached.url())],
        ..Setup::default()
    });
    let ws = c.world.path().join("ws");
    workspace(&ws);
    let expected = plain_outputs(&c.world, &ws);
    assert_eq!(n(&build_as(&mut c, "first", &ws), "/compiled_remote"), RLIBS.len() as u64);
    assert_eq!(scheduler_entries(&c).len(), 0, "the scheduler's own tier was used");
    wait_until(Duration::from_secs(30), "the worker publishes every library", || {
        (memcached.keys().iter().filter(|k| k.starts_with("ferry:v1:")).count() >= 2 * RLIBS.len()).then_some(())
    });

    let s = build_as(&mut c, "second", &ws);
    assert_eq!((n(&s, "/hits_remote"), n(&s, "/misses")), (UNITS, 0), "{s:#}");
    assert_same_outputs(&expected, &outputs(&ws));

    // An entry of 5 MB: five chunks and a head, whole again on the way back.
    let store = ferry_cache::MemcachedStore::new(&memcached.url(), Duration::from_secs(5)).expect("store");
    let mut content = vec![0u8; 5 << 20];
    blake3::Hasher::new().update(b"big").finalize_xof().fill(&mut content);
    let key = ferry_cache::CacheKey(*blake3::hash(b"a big entry").as_bytes());
    let output = ferry_cache::CompileOutput {
        files: vec![ferry_cache::OutputFile {
            path: "/big.rlib".into(),
            executable: false,
            bytes: content.clone().into(),
        }],
        ..Default::default()
    };
    let entry = ferry_cache::Entry::encode_result(key, [1; 32], &output);
    use ferry_cache::Store;
    assert_eq!(
        store.put_encoded(&key, &entry).expect("put"),
        ferry_cache::PutOutcome::Published { bytes: entry.len() as u64 }
    );
    let chunks = memcached.keys().into_iter().filter(|k| k.starts_with(&format!("ferry:v1:{key}:"))).count();
    assert_eq!(chunks, entry.len().div_ceil(ferry_cache::MEMCACHED_CHUNK), "chunks of the big entry");
    let back = store.get(&key).expect("get").expect("the big entry");
    let back = ferry_cache::CompileOutput::decode(&back.payload).expect("a compile result");
    assert!(back.files[0].bytes[..] == content[..], "the big entry came back changed");
    assert_eq!(store.put_encoded(&key, &entry).expect("put"), ferry_cache::PutOutcome::AlreadyPresent);

    // Damage every item in place (same length).
    let keys: Vec<String> = memcached.keys().into_iter().filter(|k| k.starts_with("ferry:")).collect();
    assert!(keys.len() as u64 >= 2 * UNITS, "{keys:?}");
    for key in &keys {
        let mut value = memcached.get(key).expect("value");
        let middle = value.len() / 2;
        value[middle] ^= 0x5a;
        memcached.set(key, &value);
    }
    let damaged = store.get(&key);
    assert!(matches!(damaged, Err(ferry_cache::Error::Corrupt { .. })), "the damaged big entry: {damaged:?}");
    assert_corrupt_tier_is_harmless(&mut c, &ws, &expected);
}

/// A tier any machine on the network may write (memcached takes every `set`, Redis every `SET`
/// its ACL allows), with no scheduler to list writers: clients trust the CI writer's key from a
/// trust file. A laptop holding every file a developer has (the trust file, its own writer key)
/// replaces every entry with a checksum-valid one whose outputs it changed, signed by its own key:
/// the next teammate accepts none of them (misses, counted as corrupt, byte-identical outputs),
/// and after the CI writer's next build, which replaces them, every unit hits again.
fn a_laptop_cannot_make_an_entry_a_teammate_accepts(tier: &str) {
    use ferry_cache::Store;
    let dir = tempfile::tempdir().expect("temp dir");
    // The tier's URL, the store itself (as anyone who reaches it), and its item names.
    type Tier = (String, Box<dyn Store>, Box<dyn Fn() -> Vec<String>>);
    let (url, raw, names): Tier = match tier {
        "redis" => {
            let redis = ferry_tests::Redis::start(dir.path());
            let url = redis.url();
            let store = ferry_cache::RedisStore::new(&url, &Default::default(), Duration::from_secs(5)).expect("store");
            (
                url,
                Box::new(store),
                Box::new(move || redis.cli(&["--scan", "--pattern", "ferry:*"]).lines().map(str::to_owned).collect()),
            )
        }
        _ => {
            let memcached = ferry_tests::Memcached::start();
            let store = ferry_cache::MemcachedStore::new(&memcached.url(), Duration::from_secs(5)).expect("store");
            (memcached.url(), Box::new(store), Box::new(move || memcached.keys()))
        }
    };
    let mut world = World::new();
    world.set("FERRY_SHARED_CACHE", &url);
    let ci = ci_writer(&mut world);
    let ws = world.path().join("ws");
    workspace(&ws);
    let expected = plain_outputs(&world, &ws);
    // A fresh machine `name` that signs with `key` (by default its own, made in its cache dir).
    let build = |world: &mut World, name: &str, key: Option<&Path>| -> Value {
        let cache = world.path().join(format!("cache-{name}"));
        world.set("FERRY_CACHE_DIR", &cache);
        world.set("FERRY_WRITER_KEY_FILE", key.map_or_else(|| cache.join("writer.key"), Path::to_path_buf));
        world.ferry_ok(&["stats", "--zero"]);
        clean(world, &ws);
        ok_build(cargo_build(world, &ws, true));
        assert_same_outputs(&expected, &outputs(&ws));
        world.stats()
    };
    let s = build(&mut world, "ci", Some(&ci));
    assert_eq!(n(&s, "/shared_writes"), UNITS, "{tier}: {s:#}");
    let s = build(&mut world, "teammate", None);
    assert_eq!((n(&s, "/hits_remote"), n(&s, "/misses")), (UNITS, 0), "{tier}: {s:#}");

    // The laptop's key, as `ferry writer-key --create` makes it.
    let laptop_cache = world.path().join("cache-laptop");
    world.set("FERRY_CACHE_DIR", &laptop_cache).set("FERRY_WRITER_KEY_FILE", laptop_cache.join("writer.key"));
    let shown = world.ferry_ok(&["writer-key", "--create"]);
    let laptop = ferry_cache::Signer::read(&laptop_cache.join("writer.key")).expect("the laptop's key");
    assert!(shown.starts_with(&laptop.public().to_string()), "{shown}");
    let mut keys: Vec<ferry_cache::CacheKey> = names()
        .iter()
        .flat_map(|name| name.split(':').filter_map(|part| part.parse().ok()).collect::<Vec<_>>())
        .collect();
    keys.sort_by_key(|k| k.0);
    keys.dedup();
    assert!(keys.len() as u64 >= 2 * UNITS, "{tier}: {keys:?}");
    let mut changed = 0;
    for key in &keys {
        let bytes = raw.get_encoded(key).expect("get").expect("the entry is there");
        let mut entry = ferry_cache::Entry::decode(&bytes, key).expect("an honest entry");
        if entry.kind == ferry_cache::EntryKind::Result {
            let mut output = ferry_cache::CompileOutput::decode(&entry.payload).expect("outputs");
            for file in &mut output.files {
                let mut patched = file.bytes.to_vec();
                if let Some(byte) = patched.get_mut(file.bytes.len() / 2) {
                    *byte ^= 0x5a;
                    changed += 1;
                }
                file.bytes = patched.into();
            }
            entry.payload = output.encode();
        }
        let forged = ferry_cache::sign(&entry.encode(), &laptop);
        assert!(ferry_cache::Entry::check(&forged, key).is_ok(), "the forgery is a well-formed entry");
        raw.remove(key).expect("remove");
        raw.put_encoded(key, &forged).expect("put");
    }
    assert!(changed >= UNITS, "{tier}: {changed} output files changed");
    let s = build(&mut world, "teammate-after-forgery", None);
    assert_eq!(n(&s, "/hits_remote"), 0, "{tier}: a forged entry was served: {s:#}");
    assert!(n(&s, "/shared_errors/corrupt-entry") >= 1, "{tier}: {s:#}");
    // The CI writer's next build does not find its keys "present": it replaces what it cannot
    // trust (the laptop's, and what the last teammate signed with its own key).
    let s = build(&mut world, "ci-again", Some(&ci));
    assert_eq!(n(&s, "/shared_writes"), UNITS, "{tier}: {s:#}");
    let s = build(&mut world, "teammate-after-healing", None);
    assert_eq!((n(&s, "/hits_remote"), n(&s, "/misses")), (UNITS, 0), "{tier}: {s:#}");
}

#[test]
fn a_laptop_cannot_make_an_entry_a_teammate_accepts_through_memcached() {
    a_laptop_cannot_make_an_entry_a_teammate_accepts("memcached");
}

#[test]
fn a_laptop_cannot_make_an_entry_a_teammate_accepts_through_redis() {
    a_laptop_cannot_make_an_entry_a_teammate_accepts("redis");
}

/// A CI writer's key (`ci-writer.key` in the world) and a trust file listing it, given to every
/// client of the world as `FERRY_TRUST_FILE`; the key's path, for the machines that publish.
fn ci_writer(world: &mut World) -> PathBuf {
    let key = world.path().join("ci-writer.key");
    let public = ferry_cache::Signer::create(&key).expect("a writer key").public();
    let trust = world.path().join("trusted-writers");
    write(&trust, &format!("# writers whose entries this site accepts\n{public} ci\n"));
    world.set("FERRY_TRUST_FILE", &trust);
    key
}

fn assert_corrupt_tier_is_harmless(c: &mut Cluster, ws: &Path, expected: &BTreeMap<String, blake3::Hash>) {
    let s = build_as(c, "after-damage", ws);
    assert!(n(&s, "/corrupt_entries") >= 1 && n(&s, "/shared_errors/corrupt-entry") >= 1, "{s:#}");
    assert_eq!((n(&s, "/hits_remote"), n(&s, "/hits_local")), (0, 0), "{s:#}");
    assert_same_outputs(expected, &outputs(ws));
    clean(&c.world, ws);
    c.world.ferry_ok(&["stats", "--zero"]);
    ok_build(cargo_build(&c.world, ws, true));
    let s = c.world.stats();
    assert_eq!((n(&s, "/hits_local"), n(&s, "/corrupt_entries")), (UNITS, 0), "{s:#}");
    assert_same_outputs(expected, &outputs(ws));
    // The tier healed: the damaged entries were removed and published afresh.
    let s = build_as(c, "after-healing", ws);
    assert_eq!((n(&s, "/hits_remote"), n(&s, "/corrupt_entries")), (UNITS, 0), "{s:#}");
    assert_same_outputs(expected, &outputs(ws));
}

/// The entry files of the scheduler's shared tier.
fn scheduler_entries(c: &Cluster) -> Vec<PathBuf> {
    let dir = c.world.path().join("scheduler/cache");
    if !dir.exists() {
        return Vec::new();
    }
    crate::wrapper::files_under(&dir).into_iter().filter(|p| p.file_name().is_some_and(|n| n.len() == 64)).collect()
}

/// A plain build's outputs (then cleaned away).
fn plain_outputs(world: &World, ws: &Path) -> BTreeMap<String, blake3::Hash> {
    ok_build(cargo_build(world, ws, false));
    let expected = outputs(ws);
    clean(world, ws);
    expected
}

/// Builds `ws` from clean as a fresh machine `name` (see [`client`]); its counters.
fn build_as(c: &mut Cluster, name: &str, ws: &Path) -> Value {
    client(c, name);
    clean(&c.world, ws);
    ok_build(cargo_build(&c.world, ws, true));
    c.world.stats()
}

/// Makes the world's client a fresh machine: its own empty cache dir, zeroed counters.
fn client(c: &mut Cluster, name: &str) {
    c.world.set("FERRY_CACHE_DIR", c.world.path().join(format!("cache-{name}")));
    c.world.ferry_ok(&["stats", "--zero"]);
}

/// Damages a Redis value in place, keeping its length.
fn flip_middle_byte_of_value(redis: &ferry_tests::Redis, key: &str) {
    let len: usize = redis.cli(&["STRLEN", key]).trim().parse().expect("length");
    redis.cli(&["SETRANGE", key, &(len / 2).to_string(), "\u{7f}"]);
}

fn flip_middle_byte(path: &Path) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut file = fs::OpenOptions::new().read(true).write(true).open(path).expect("open entry");
    let middle = file.metadata().expect("stat").len() / 2;
    let mut byte = [0u8];
    file.seek(SeekFrom::Start(middle)).expect("seek");
    file.read_exact(&mut byte).expect("read");
    file.seek(SeekFrom::Start(middle)).expect("seek");
    file.write_all(&[byte[0] ^ 0x55]).expect("write");
}

#[test]
fn a_worker_without_bubblewrap_exits_at_once_naming_it() {
    let world = World::new();
    let empty = world.path().join("no-programs");
    fs::create_dir_all(&empty).expect("mkdir");
    let mut child = world
        .command(bin("ferry-worker"))
        .args(["--scheduler", "http://127.0.0.1:1", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(world.path().join("w"))
        .env("PATH", &empty)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ferry-worker starts");
    let status = wait_until(Duration::from_secs(10), "ferry-worker exits", || child.try_wait().ok().flatten());
    let out = child.wait_with_output().expect("output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(status.code(), Some(2), "stderr:\n{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "", "it must not announce an address it will not serve");
    let line = stderr.lines().find(|l| l.starts_with("ferry-worker:")).unwrap_or_default();
    assert!(line.contains("bubblewrap") && line.contains("apt-get install bubblewrap"), "{stderr}");
}

#[test]
fn a_worker_whose_sandbox_breaks_is_quarantined_and_builds_lose_nothing() {
    // bwrap reached through a script the test can break while the worker runs.
    let world_bin = tempfile::Builder::new().prefix("ferry-bwrap-").tempdir().expect("temp dir");
    // The worker starts bwrap as the jobs' unprivileged user.
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(world_bin.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let real = which("bwrap");
    let shim = world_bin.path().join("bwrap");
    replace_script(&shim, &format!("exec {} \"$@\"", real.display()));
    let path = format!("{}:{}", world_bin.path().display(), std::env::var("PATH").unwrap_or_default());
    let c = Cluster::start(Setup {
        workers: 1,
        seed_scheduler: true,
        seed_workers: true,
        env: vec![("PATH", path)],
        ..Setup::default()
    });
    let compile = |name: &str| {
        let lib = Lib::new(&c.world, name, X_SOURCE);
        let out = lib.ferry(&c.world);
        assert_eq!(out.code, Some(0), "{name}: {}", out.stderr);
        assert!(out.files.keys().any(|f| f.ends_with(".rlib")), "{name} has no rlib: {:?}", out.files.keys());
    };
    compile("healthy");
    assert_eq!(n(&c.world.stats(), "/compiled_remote"), 1, "{:#}", c.world.stats());

    let message = "bwrap: Creating new namespace failed: Operation not permitted";
    replace_script(&shim, &format!("echo '{message}' >&2; exit 1"));
    for (i, name) in ["broken1", "broken2", "broken3"].into_iter().enumerate() {
        compile(name);
        let failures = i as u64 + 1;
        c.status_until(&format!("the scheduler counts failure {failures}"), |s| {
            workers_of(s)[0]["failures"] == failures
        });
    }
    let s = c.world.stats();
    assert_eq!(n(&s, "/fallbacks/worker-error"), 3, "an error inside the worker is not worker-lost: {s:#}");
    assert_eq!(n(&s, "/fallbacks/worker-lost"), 0, "{s:#}");
    let status = c.status();
    let worker = workers_of(&status)[0];
    assert!(worker["quarantined_ms"].as_u64().unwrap_or(0) > 0, "{status:#}");
    assert!(worker["last_error"].as_str().unwrap_or_default().contains("Operation not permitted"), "{status:#}");
    let text = c.world.ferry_ok(&["status"]);
    assert!(text.contains("quarantined for") && text.contains(message), "ferry status:\n{text}");

    // Quarantined: the next compile does not even try the worker.
    compile("quarantined");
    let s = c.world.stats();
    assert_eq!(n(&s, "/fallbacks/workers-quarantined"), 1, "{s:#}");
    assert_eq!(n(&s, "/fallbacks/worker-error"), 3, "{s:#}");
    assert_eq!(n(&s, "/compiled_remote"), 1, "{s:#}");
}

#[test]
fn target_cpu_native_stays_local_keyed_by_this_cpu() {
    let mut c = Cluster::start(Setup { workers: 1, seed_scheduler: true, seed_workers: true, ..Setup::default() });
    let dir = c.world.path().join("native");
    write(&dir.join("Cargo.toml"), "[package]\nname = \"native\"\nversion = \"0.1.0\"\nedition = \"2021\"\n");
    write(
        &dir.join("src/lib.rs"),
        "pub fn dot(a: &[f32], b: &[f32]) -> f32 { a.iter().zip(b).map(|(x, y)| x * y).sum() }\n",
    );
    write(&dir.join("src/main.rs"), "fn main() { println!(\"{}\", native::dot(&[1.0, 2.0], &[3.0, 4.0])); }\n");
    c.world.set("RUSTFLAGS", "-C target-cpu=native");
    client(&mut c, "native");
    ok_build(cargo_build(&c.world, &dir, true));
    let s = c.world.stats();
    assert_eq!(
        (n(&s, "/compiled_remote"), n(&s, "/compiled_local")),
        (0, 2),
        "nothing built for 'native' leaves: {s:#}"
    );
    assert_no_fallbacks(&s);
    let explained = c.world.ferry_ok(&["explain", "--crate", "native"]);
    let cpu = explained.lines().find(|l| l.contains("target-cpu=native = ")).unwrap_or_default();
    assert!(cpu.contains("cpu=") && !cpu.contains("cpu=unknown"), "{explained}");
    // The same build without the flag goes to the worker: only 'native' kept it here.
    c.world.set("RUSTFLAGS", "");
    clean(&c.world, &dir);
    client(&mut c, "portable");
    ok_build(cargo_build(&c.world, &dir, true));
    assert_eq!(n(&c.world.stats(), "/compiled_remote"), 1);
}

/// Projects where container images and CI agents keep them (`/var/tmp`, `/usr/local/src`), built
/// with the installed toolchain and with one under `/usr/local` (where the official Rust image has
/// rustup's), distribute: the worker grafts them onto its own `/usr/local`, hiding none of it.
#[test]
fn projects_and_toolchains_under_var_and_usr_local_distribute() {
    let toolchain = crate::toolchain::ToolchainCopy::new_in(Path::new("/usr/local"));
    let mut c = Cluster::start(Setup { workers: 1, seed_scheduler: true, seed_workers: true, ..Setup::default() });
    // Every build compiles on the worker, none hits the one before.
    c.world.set("FERRY_SHARED_CACHE", "off");
    for parent in ["/var/tmp", "/usr/local/src"] {
        let place = tempfile::Builder::new().prefix("ferry-test-").tempdir_in(parent).expect("temp dir");
        let ws = place.path().join("ws");
        workspace(&ws);
        for rustc in [None, Some(toolchain.rustc())] {
            let what = format!(
                "a project in {parent} built by {}",
                rustc.as_ref().map_or("rustc".into(), |r| r.display().to_string())
            );
            match &rustc {
                Some(r) => c.world.set("RUSTC", r),
                None => c.world.set("RUSTC", crate::wrapper::rustc()),
            };
            let expected = plain_outputs(&c.world, &ws);
            let s = build_as(&mut c, &format!("{}-{}", parent.replace('/', "-"), rustc.is_some()), &ws);
            if fallback_count(&s) > 0 {
                panic!("{what}: {s:#}\nworker log:\n{}", tail(&c.workers[0].log_text(), 40));
            }
            assert_eq!(n(&s, "/compiled_remote"), RLIBS.len() as u64, "{what}: {s:#}");
            assert_same_outputs(&expected, &outputs(&ws));
            assert_eq!(app(&ws), APP_LINE, "{what}");
        }
    }
}

/// `--http` on both daemons (here `http` in their config files): Prometheus metrics scraped while a
/// build runs and after it show allocations, jobs, shared-tier traffic and the scheduler's
/// "compile locally" answers by reason; the status page renders in a real headless Chromium and
/// lists the worker (its screenshot is kept in `target/test-artifacts/`).
#[test]
fn metrics_and_the_status_page_show_the_cluster_at_work() {
    let mut c = Cluster::start(Setup {
        workers: 1,
        seed_scheduler: true,
        seed_workers: true,
        scheduler_toml: "http = \"127.0.0.1:0\"\n",
        worker_toml: "http = \"127.0.0.1:0\"\n",
        ..Setup::default()
    });
    let (scheduler, worker) = (c.scheduler.http_addr(), c.workers[0].http_addr());
    let ws = c.world.path().join("ws");
    workspace(&ws);

    // Scraped every 100 ms while the build runs.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scraper = {
        let (stop, scheduler, worker) = (stop.clone(), scheduler.clone(), worker.clone());
        std::thread::spawn(move || {
            let mut scrapes = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                scrapes.push((http_get(&scheduler, "/metrics"), http_get(&worker, "/metrics")));
                std::thread::sleep(Duration::from_millis(100));
            }
            scrapes
        })
    };
    let s = build_as(&mut c, "first", &ws);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let scrapes = scraper.join().expect("scraper");
    assert_no_fallbacks(&s);
    assert!(scrapes.len() >= 2, "{} scrapes during the build", scrapes.len());
    let assigned = r#"ferry_scheduler_allocations_total{result="assigned"}"#;
    let seen: Vec<f64> = scrapes.iter().map(|(s, _)| metric(s, assigned)).collect();
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "a counter went down: {seen:?}");
    let busy = scrapes.iter().map(|(s, _)| metric(s, r#"ferry_scheduler_slots{state="busy"}"#)).fold(0.0, f64::max);
    let running = scrapes.iter().map(|(s, _)| metric(s, "ferry_scheduler_jobs_running")).fold(0.0, f64::max);
    eprintln!("during the build: {} scrapes, at most {busy} slots busy, {running} jobs running", scrapes.len());

    let rlibs = RLIBS.len() as f64;
    let after = http_get(&scheduler, "/metrics");
    for (name, at_least) in [
        (assigned, rlibs),
        (r#"ferry_scheduler_jobs_total{outcome="done"}"#, rlibs),
        (r#"ferry_scheduler_workers{state="registered"}"#, 1.0),
        (r#"ferry_scheduler_slots{state="total"}"#, 2.0),
        ("ferry_scheduler_allocation_seconds_count", rlibs),
        ("ferry_toolchains", 1.0),
    ] {
        assert!(metric(&after, name) >= at_least, "{name} < {at_least}:\n{after}");
    }
    let from_worker = http_get(&worker, "/metrics");
    assert!(metric(&from_worker, r#"ferry_worker_jobs_total{outcome="succeeded"}"#) >= rlibs, "{from_worker}");
    assert!(metric(&from_worker, "ferry_worker_job_seconds_count") >= rlibs, "{from_worker}");
    assert_eq!(metric(&from_worker, r#"ferry_worker_slots{state="total"}"#), 2.0, "{from_worker}");
    assert!(metric(&from_worker, "ferry_worker_blob_bytes_total") > 0.0, "{from_worker}");
    // Which versions run, since when, and the shared tier's limit beside its size.
    let version = env!("CARGO_PKG_VERSION");
    for (text, daemon) in [(&after, "scheduler"), (&from_worker, "worker")] {
        let info = format!(r#"ferry_build_info{{daemon="{daemon}",version="{version}",protocol="ferry.v1"}}"#);
        assert_eq!(metric(text, &info), 1.0, "{text}");
        let started = metric(text, &format!(r#"ferry_start_time_seconds{{daemon="{daemon}"}}"#));
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        assert!(started > now - 600.0 && started <= now, "{daemon} started at {started}, now {now}");
    }
    assert_eq!(metric(&after, "ferry_shared_cache_limit_bytes"), (20u64 << 30) as f64, "the default cache_size (20G)");
    wait_until(Duration::from_secs(30), "the worker's results are published", || {
        let text = http_get(&scheduler, "/metrics");
        (metric(&text, r#"ferry_shared_cache_puts_total{result="published"}"#) >= rlibs).then_some(())
    });

    // A second machine: its hits are the tier's.
    let s = build_as(&mut c, "second", &ws);
    assert_eq!(n(&s, "/hits_remote"), UNITS, "{s:#}");
    let after = http_get(&scheduler, "/metrics");
    // One hit per unit is a result (its manifest is the other read).
    assert_eq!(metric(&after, r#"ferry_shared_cache_gets_total{result="hit",kind="result"}"#), UNITS as f64, "{after}");
    assert!(
        metric(&after, r#"ferry_shared_cache_gets_total{result="hit",kind="manifest"}"#) >= UNITS as f64,
        "{after}"
    );
    assert!(metric(&after, r#"ferry_shared_cache_bytes_total{direction="read"}"#) > 0.0, "{after}");

    // The status page, rendered by a real browser.
    let id = c.worker_id(0);
    let url = format!("http://{scheduler}/");
    let dom = String::from_utf8_lossy(&chromium(&["--dump-dom", &url]).stdout).into_owned();
    assert!(dom.contains("<h1>ferry scheduler</h1>") && dom.contains("id=\"workers\""), "{dom}");
    let row = dom.lines().find(|l| l.contains("class=\"worker\"")).unwrap_or_else(|| panic!("no worker row: {dom}"));
    assert!(
        row.contains(&format!("<td>{id}</td>")) && row.contains(&format!("<td>{}</td>", c.workers[0].addr)),
        "{row}"
    );
    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    fs::create_dir_all(&artifacts).expect("mkdir");
    let shot = artifacts.join("status-page.png");
    let _ = fs::remove_file(&shot);
    chromium(&[&format!("--screenshot={}", shot.display()), "--window-size=1280,900", &url]);
    let png = fs::read(&shot).expect("the screenshot");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "{} bytes", png.len());

    // No worker: the scheduler's "compile locally" answers, by reason.
    c.workers[0].kill();
    c.status_until("the worker is gone", |s| workers_of(s).is_empty());
    c.world.set("FERRY_SHARED_CACHE", "off");
    let s = build_as(&mut c, "alone", &ws);
    assert!(n(&s, "/fallbacks/no-workers") >= 1, "{s:#}");
    let after = http_get(&scheduler, "/metrics");
    assert!(metric(&after, r#"ferry_scheduler_allocations_total{result="no-workers"}"#) >= 1.0, "{after}");
}

/// `GET path` over HTTP/1.1 from `addr`: the body of a 200 answer.
fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").expect("request");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("answer");
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

/// The value of the sample `name` (with its labels) in Prometheus text; 0 when absent.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Headless Chromium (the Debian package) with `args`, bounded.
fn chromium(args: &[&str]) -> Output {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let program = std::env::split_paths(&path).map(|d| d.join("chromium")).find(|p| p.is_file());
    let program = program.expect("chromium is not installed: apt-get install -y chromium (scripts/test does as root)");
    let mut cmd = Command::new(program);
    cmd.args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]).args(args);
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("chromium starts");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let Ok(out) = rx.recv_timeout(Duration::from_secs(60)) else {
        // SAFETY: kill(2) on the child's pid, which has not been waited for (its waiter is still running).
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        panic!("chromium did not finish within 60 s");
    };
    let out = out.expect("chromium's output");
    assert!(out.status.success(), "chromium failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

/// A worker killed (SIGKILL: no clean stop, its blob store still marked open) and started again
/// on its data directory keeps its input blobs: each is checked against its digest on first use,
/// and the next build's jobs send none of them again.
#[test]
fn a_killed_worker_keeps_its_blobs_and_checks_them_on_first_use() {
    let mut c = Cluster::start(Setup { workers: 1, seed_scheduler: true, seed_workers: true, ..Setup::default() });
    c.world.set("FERRY_SHARED_CACHE", "off");
    // One unit at a time: a job carries the dependency files present when it starts, so with
    // cargo's parallelism the two builds could ship different sets (a dependency's rlib finished
    // in one build and not yet in the other) and the second would rightly send a file the first
    // never did.
    c.world.set("CARGO_BUILD_JOBS", "1");
    let ws = c.world.path().join("ws");
    workspace(&ws);
    let s = build_as(&mut c, "first", &ws);
    assert_eq!(n(&s, "/compiled_remote"), RLIBS.len() as u64, "{s:#}");
    assert!(n(&s, "/bytes_sent") > 0, "{s:#}");

    c.workers[0].kill();
    c.status_until("the killed worker is gone", |s| workers_of(s).is_empty());
    let blobs = c.world.path().join("worker0/blobs");
    assert!(blobs.join("open").exists(), "a killed worker leaves its store marked open");
    let config = c.world.path().join("worker.toml").display().to_string();
    let again = c.world.worker("worker0", &c.scheduler.url(), &["--slots", "2", "--config", &config]);
    c.workers[0] = again;
    let id = seed_id_if(true);
    c.status_until("the worker is back", |s| workers_of(s).len() == 1 && has_toolchain(workers_of(s)[0], &id));
    let set_aside = crate::wrapper::files_under(&blobs.join("unverified")).len();
    assert!(set_aside >= RLIBS.len(), "{set_aside} blobs set aside for checking");

    let s = build_as(&mut c, "after-the-kill", &ws);
    assert_no_fallbacks(&s);
    assert_eq!((n(&s, "/compiled_remote"), n(&s, "/bytes_sent")), (RLIBS.len() as u64, 0), "{s:#}");
    let left = crate::wrapper::files_under(&blobs.join("unverified")).len();
    assert!(left < set_aside, "no blob was checked and taken back ({left} of {set_aside} left)");
}

/// A worker whose blob store holds less than a build's inputs evicts the least recently used
/// blobs and builds correctly anyway, before and after it is killed and started again (its blobs
/// then wait for their check, counted against the limit): what `FindMissing` called present stays
/// until the job has run, and an evicted blob is simply sent again.
#[test]
fn a_worker_with_a_small_blob_store_evicts_and_still_builds_correctly_across_a_restart() {
    // Six crates of 64 KiB of source each, two jobs at once (cargo -j2): room for those two.
    const LIMIT: u64 = 160 << 10;
    let mut c = Cluster::start(Setup {
        workers: 1,
        seed_scheduler: true,
        seed_workers: true,
        worker_toml: "blob_store_size = \"160K\"\n",
        ..Setup::default()
    });
    c.world.set("FERRY_SHARED_CACHE", "off");
    let ws = c.world.path().join("wide");
    wide_workspace(&ws, 6, 64 << 10);
    ok_build(cargo_build(&c.world, &ws, false));
    let expected = wide_outputs(&ws);
    assert_eq!(expected.len(), 6 * 3 + 2, "{expected:#?}");
    clean(&c.world, &ws);
    let blobs = c.world.path().join("worker0/blobs");
    let stored = || -> u64 {
        let files = crate::wrapper::files_under(&blobs);
        files.iter().filter(|p| !p.starts_with(blobs.join("tmp"))).map(|p| fs::metadata(p).map_or(0, |m| m.len())).sum()
    };
    for round in ["first", "after-the-restart"] {
        if round == "after-the-restart" {
            c.workers[0].kill();
            c.status_until("the killed worker is gone", |s| workers_of(s).is_empty());
            assert!(blobs.join("open").exists(), "a killed worker leaves its store marked open");
            let config = c.world.path().join("worker.toml").display().to_string();
            c.workers[0] = c.world.worker("worker0", &c.scheduler.url(), &["--slots", "2", "--config", &config]);
            let id = seed_id_if(true);
            c.status_until("the worker is back", |s| workers_of(s).len() == 1 && has_toolchain(workers_of(s)[0], &id));
        }
        let s = build_as(&mut c, round, &ws);
        assert_same_outputs(&expected, &wide_outputs(&ws));
        assert_eq!(ok(Command::new(ws.join("target/debug/app")).output().expect("app runs")).trim(), "15");
        assert_no_fallbacks(&s);
        assert_eq!(n(&s, "/compiled_remote"), 6, "{s:#}");
        // More than the store holds went to the worker: it evicted, and what it evicted was sent
        // again when needed.
        assert!(n(&s, "/bytes_sent") > LIMIT, "{s:#}");
        assert!(stored() <= LIMIT, "the store holds {} bytes, over its {LIMIT}", stored());
    }
}

/// blake3 of the compiler outputs of a [`wide_workspace`] build by file name: libraries,
/// metadata, dep-info and the binary.
fn wide_outputs(ws: &Path) -> BTreeMap<String, blake3::Hash> {
    let deps = ws.join("target/debug/deps");
    files_in(&deps)
        .into_iter()
        .filter(|p| p.extension().is_none_or(|e| ["rlib", "rmeta", "d"].contains(&&*e.to_string_lossy())))
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), blake3::hash(&fs::read(&p).unwrap())))
        .collect()
}

/// A workspace of `crates` independent libraries `p0`…, each a source of about `bytes` bytes
/// (mostly a comment: their metadata stays small), and the binary `app` printing the sum of
/// their numbers.
fn wide_workspace(root: &Path, crates: usize, bytes: usize) {
    write(&root.join("Cargo.toml"), "[workspace]\nresolver = \"2\"\nmembers = [\"crates/*\"]\n");
    let package = |name: &str, deps: &str| {
        format!("[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[dependencies]\n{deps}")
    };
    let mut deps = String::new();
    let mut sum = Vec::new();
    for i in 0..crates {
        let name = format!("p{i}");
        let padding = format!("// crate {i}: {}\n", "x".repeat(60)).repeat(bytes / 76);
        write(&root.join(format!("crates/{name}/Cargo.toml")), &package(&name, ""));
        write(
            &root.join(format!("crates/{name}/src/lib.rs")),
            &format!("{padding}pub fn n() -> u32 {{\n    {i}\n}}\n"),
        );
        deps.push_str(&format!("{name} = {{ path = \"../{name}\" }}\n"));
        sum.push(format!("{name}::n()"));
    }
    write(&root.join("crates/app/Cargo.toml"), &package("app", &deps));
    write(
        &root.join("crates/app/src/main.rs"),
        &format!("fn main() {{\n    println!(\"{{}}\", {});\n}}\n", sum.join(" + ")),
    );
}

/// Also: a `FERRY_SCHEDULER` without a scheme distributes.
#[test]
fn sources_under_a_nested_target_directory_reach_the_worker() {
    let mut c = Cluster::start(Setup { workers: 1, seed_scheduler: true, seed_workers: true, ..Setup::default() });
    let dir = c.world.path().join("nt");
    write(&dir.join("Cargo.toml"), "[package]\nname = \"nt\"\nversion = \"0.1.0\"\nedition = \"2021\"\n");
    write(
        &dir.join("src/lib.rs"),
        "mod target;\npub fn arch() -> String { target::arch_of(\"x86_64-unknown-linux-gnu\") }\n",
    );
    write(&dir.join("src/target.rs"), "mod parser;\npub fn arch_of(t: &str) -> String { parser::first(t) }\n");
    write(
        &dir.join("src/target/parser.rs"),
        "pub fn first(t: &str) -> String { t.split('-').next().unwrap_or_default().to_owned() }\n",
    );
    write(&dir.join("src/main.rs"), "fn main() { println!(\"{}\", nt::arch()); }\n");
    client(&mut c, "nested");
    // The scheduler's address as it prints it, without a scheme: taken as http://.
    let addr = c.scheduler.addr.clone();
    c.world.set("FERRY_SCHEDULER", &addr);
    ok_build(cargo_build(&c.world, &dir, true));
    let s = c.world.stats();
    assert_no_fallbacks(&s);
    assert_eq!(n(&s, "/compiled_remote"), 1, "{s:#}");
    assert_eq!(s["config_errors"], serde_json::json!({}), "{s:#}");
    let out = ok(Command::new(dir.join("target/debug/nt")).output().expect("runs"));
    assert_eq!(out.trim(), "x86_64");
}

/// The first `name` on `PATH`.
/// A program's path, as the shell finds it in `PATH`.
pub(crate) fn which(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file()).unwrap_or_else(|| panic!("{name} on PATH"))
}

/// Writes an executable `#!/bin/sh` script atomically (a running copy keeps its old text).
fn replace_script(path: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, format!("#!/bin/sh\n{body}\n")).expect("write script");
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)).expect("chmod");
    fs::rename(&tmp, path).expect("rename script");
}

/// What [`Cluster::start`] starts from.
#[derive(Debug, Default)]
struct Setup {
    /// Workers started with the scheduler.
    workers: usize,
    /// The scheduler already stores the installed toolchain.
    seed_scheduler: bool,
    /// Every worker already has it unpacked.
    seed_workers: bool,
    /// The scheduler's worker lease (default: the scheduler's own, 10 s).
    lease_ms: Option<u64>,
    /// More lines of the scheduler's and the workers' config files.
    scheduler_toml: &'static str,
    worker_toml: &'static str,
    /// Environment for every process of the world (daemons and clients).
    env: Vec<(&'static str, String)>,
    /// The clients' `FERRY_TOKEN`, set once the daemons run (they read `FERRY_TOKEN` too).
    client_token: Option<&'static str>,
}

/// A scheduler and workers (2 slots each) in one world whose `FERRY_SCHEDULER` points at them.
#[derive(Debug)]
struct Cluster {
    world: World,
    scheduler: Daemon,
    workers: Vec<Daemon>,
}

impl Cluster {
    fn start(setup: Setup) -> Cluster {
        let mut world = World::new();
        if setup.seed_scheduler {
            seed().seed_scheduler_dir(&world.path().join("scheduler"));
        }
        for (key, value) in &setup.env {
            world.set(key, value);
        }
        let config = world.path().join("scheduler.toml");
        let lease = setup.lease_ms.map(|l| format!("lease_ms = {l}\n")).unwrap_or_default();
        write(&config, &format!("{lease}{}", setup.scheduler_toml));
        let scheduler = world.scheduler(&["--config", &config.display().to_string()]);
        world.set("FERRY_SCHEDULER", scheduler.url());
        let worker_config = world.path().join("worker.toml");
        write(&worker_config, setup.worker_toml);
        let worker_config = worker_config.display().to_string();
        let workers: Vec<Daemon> = (0..setup.workers)
            .map(|i| {
                let name = format!("worker{i}");
                if setup.seed_workers {
                    seed().seed_worker_dir(&world.path().join(&name));
                }
                world.worker(&name, &scheduler.url(), &["--slots", "2", "--config", &worker_config])
            })
            .collect();
        if let Some(token) = setup.client_token {
            world.set("FERRY_TOKEN", token);
        }
        let c = Cluster { world, scheduler, workers };
        let id = &seed_id_if(setup.seed_workers);
        c.status_until("every worker registers", |s| {
            workers_of(s).len() == setup.workers && workers_of(s).iter().all(|w| id.is_empty() || has_toolchain(w, id))
        });
        c
    }

    /// Starts one more worker (2 slots), with the id `id`, and waits for it to register.
    fn add_worker(&mut self, id: &str) {
        let config = self.world.path().join(format!("{id}.toml"));
        write(&config, &format!("id = \"{id}\"\n"));
        let config = config.display().to_string();
        let worker = self.world.worker(id, &self.scheduler.url(), &["--slots", "2", "--config", &config]);
        self.workers.push(worker);
        self.status_until(&format!("{id} registers"), |s| workers_of(s).iter().any(|w| w["id"] == id));
    }

    fn status(&self) -> Value {
        self.world.ferry_json(&["status", "--json"])
    }

    fn status_until(&self, what: &str, ready: impl Fn(&Value) -> bool) -> Value {
        self.status_until_within(Duration::from_secs(30), what, ready)
    }

    /// Polls `ferry status --json` until `ready` holds; panics (with the last status and the
    /// daemons' logs' tails) when it does not within `limit`.
    fn status_until_within(&self, limit: Duration, what: &str, ready: impl Fn(&Value) -> bool) -> Value {
        let status = self.world.wait_for_status(limit, &ready);
        if !ready(&status) {
            let logs: Vec<String> = std::iter::once(&self.scheduler)
                .chain(&self.workers)
                .map(|d| format!("--- {}:\n{}", d.log.display(), tail(&d.log_text(), 15)))
                .collect();
            panic!("not within {limit:?}: {what}; last status:\n{status:#}\n{}", logs.join("\n"));
        }
        status
    }

    /// The id the scheduler knows worker `i` by.
    fn worker_id(&self, i: usize) -> String {
        let status = self.status();
        let addr = &self.workers[i].addr;
        let found = workers_of(&status).into_iter().find(|w| w["address"] == addr.as_str()).map(|w| w["id"].clone());
        found.and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_else(|| panic!("{addr} not in {status:#}"))
    }
}

/// Two workers with the toolchain and a 2 s lease (a killed one is dropped soon), and a
/// [`slow_workspace`] to build on them.
fn kill_setup() -> (Cluster, PathBuf) {
    let c = Cluster::start(Setup {
        workers: 2,
        seed_scheduler: true,
        seed_workers: true,
        lease_ms: Some(2000),
        ..Setup::default()
    });
    let ws = c.world.path().join("slow");
    slow_workspace(&ws);
    (c, ws)
}

/// When [`kill_mid_build`] kills the worker compiling `big`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KillWhen {
    /// As soon as its rustc runs (well before the metadata is written).
    Compiling,
    /// Once `big`'s `.rmeta` came back (cargo has been told and starts `user`), while its rustc
    /// is still generating code.
    AfterMetadata,
}

/// How a build went after its worker was killed.
#[derive(Debug)]
struct Killed {
    status: std::process::ExitStatus,
    stderr: String,
    /// From the kill to the end of the build.
    after_kill: Duration,
    /// The killed worker's id.
    worker: String,
}

/// Builds [`slow_workspace`] through the cluster and SIGKILLs the worker compiling `big`.
fn kill_mid_build(c: &mut Cluster, ws: &Path, when: KillWhen) -> Killed {
    let ids: Vec<String> = (0..c.workers.len()).map(|i| c.worker_id(i)).collect();
    let mut cmd = cargo_command(&c.world, ws);
    cmd.env("RUSTC_WRAPPER", bin("ferry"));
    let mut build = Background::spawn(cmd, &c.world.path().join("killed-build"));
    let deps = ws.join("target/debug/deps");
    let rmeta_back =
        || files_in(&deps).iter().any(|p| name_of(p).starts_with("libbig-") && name_of(p).ends_with(".rmeta"));
    let victim = wait_until(Duration::from_secs(90), &format!("a worker compiling big ({when:?})"), || {
        assert!(build.running(), "the build ended before a worker was killed:\n{}", build.stderr());
        if when == KillWhen::AfterMetadata && !rmeta_back() {
            return None;
        }
        c.workers.iter().position(|w| rustc_running_under(w.child.id(), "big"))
    });
    c.workers[victim].kill();
    let killed = Instant::now();
    let status = build.wait(Duration::from_secs(180));
    Killed { status, stderr: build.stderr(), after_kill: killed.elapsed(), worker: ids[victim].clone() }
}

fn workers_of(status: &Value) -> Vec<&Value> {
    status["workers"].as_array().map(|w| w.iter().collect()).unwrap_or_default()
}

fn has_toolchain(worker: &Value, id: &str) -> bool {
    worker["toolchains"].as_array().is_some_and(|t| t.iter().any(|t| t == id))
}

/// One "compiled remotely" line of the wrapper's log.
#[derive(Debug, Clone)]
struct RemoteJob {
    worker: String,
    krate: String,
}

/// Every remote compile the world's wrappers logged, in order.
fn remote_jobs(world: &World) -> Vec<RemoteJob> {
    let log = fs::read_to_string(world.cache_dir().join("ferry.log")).unwrap_or_default();
    log.lines()
        .filter(|l| l.contains(" compiled remotely "))
        .map(|l| {
            let field = |name: &str| {
                l.split(' ').find_map(|w| w.strip_prefix(name)).unwrap_or_default().trim_matches('"').to_owned()
            };
            RemoteJob { worker: field("worker="), krate: field("krate=") }
        })
        .collect()
}

fn assert_no_fallbacks(stats: &Value) {
    assert_eq!(fallback_count(stats), 0, "{stats:#}");
}

fn fallback_count(stats: &Value) -> u64 {
    stats["fallbacks"].as_object().map_or(0, |m| m.values().filter_map(Value::as_u64).sum())
}

/// An address where nothing listens.
fn closed_port() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address").to_string()
}

/// A daemon stopped with SIGSTOP until dropped.
struct Frozen(u32);

impl Frozen {
    fn new(daemon: &Daemon) -> Frozen {
        signal(daemon.child.id(), libc::SIGSTOP);
        Frozen(daemon.child.id())
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        signal(self.0, libc::SIGCONT);
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on a process this test started (and has not reaped).
    let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig}) failed");
}

/// Whether a `rustc` compiling `krate` runs below process `pid` (a worker: its sandbox).
fn rustc_running_under(pid: u32, krate: &str) -> bool {
    let mut parent: HashMap<u32, u32> = HashMap::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(p) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else { continue };
        // "pid (comm) state ppid ...": comm may hold anything, so read after its last ')'.
        let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse().ok());
        if let Some(ppid) = ppid {
            parent.insert(p, ppid);
        }
    }
    let below = |mut p: u32| {
        while let Some(&up) = parent.get(&p) {
            if up == pid {
                return true;
            }
            p = up;
        }
        false
    };
    parent.keys().any(|&p| {
        let comm = fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
        let cmdline = fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        comm.trim() == "rustc"
            && args.windows(2).any(|w| w[0] == b"--crate-name" && w[1] == krate.as_bytes())
            && below(p)
    })
}

/// Polls `f` every 50 ms until it gives a value; panics after `limit`.
fn wait_until<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < limit, "not within {limit:?}: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().filter(|l| !l.contains("h2::") && !l.contains("hyper")).collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// The seed: a toolchain uploaded and unpacked once per test process
// ---------------------------------------------------------------------------------------------

/// What a real scheduler and a real worker left on disk after `ferry toolchain upload` and one
/// remote job: the scheduler's archive store and the worker's unpacked toolchain. Removed when
/// the test process exits.
#[derive(Debug)]
struct Seed {
    root: PathBuf,
    id: String,
}

fn seed() -> &'static Seed {
    static SEED: OnceLock<Seed> = OnceLock::new();
    SEED.get_or_init(|| {
        let c = Cluster::start(Setup { workers: 1, ..Setup::default() });
        let upload = c.world.ferry_json(&["toolchain", "upload", "--json"]);
        let id = upload["id"].as_str().expect("an id").to_owned();
        c.status_until("the seed worker prefetched the toolchain", |s| {
            workers_of(s).iter().all(|w| has_toolchain(w, &id))
        });
        ok(Lib::new(&c.world, "seed", "pub fn seed() {}\n").ferry_output(&c.world));
        assert_eq!(n(&c.world.stats(), "/compiled_remote"), 1, "the seed job: {:#}", c.world.stats());
        let Cluster { world, scheduler, workers } = c;
        drop((scheduler, workers));
        let root = world.dir.keep();
        let _ = SEED_ROOT.set(root.clone());
        // SAFETY: registers a plain function without arguments, run once at exit.
        unsafe { libc::atexit(remove_seed) };
        Seed { root, id }
    })
}

static SEED_ROOT: OnceLock<PathBuf> = OnceLock::new();

extern "C" fn remove_seed() {
    if let Some(root) = SEED_ROOT.get() {
        make_writable(root);
        let _ = fs::remove_dir_all(root);
    }
}

/// The seed's toolchain id, or "" when not seeding.
fn seed_id_if(seeded: bool) -> String {
    if seeded { seed().id.clone() } else { String::new() }
}

impl Seed {
    /// Hard-links the scheduler's archive store into the data dir `dir`.
    fn seed_scheduler_dir(&self, dir: &Path) {
        fs::create_dir_all(dir).expect("scheduler dir");
        copy_linked(&self.root.join("scheduler/toolchains"), dir);
    }

    /// Hard-links the unpacked toolchain into the worker data dir `dir`.
    fn seed_worker_dir(&self, dir: &Path) {
        fs::create_dir_all(dir.join("toolchains")).expect("worker dir");
        copy_linked(&self.root.join("worker0/toolchains").join(&self.id), &dir.join("toolchains"));
    }
}

/// `cp -al from into/`: the same files (hard links), so a seed costs no copying.
fn copy_linked(from: &Path, into: &Path) {
    ok(Command::new("cp").arg("-al").arg(from).arg(into).output().expect("cp runs"));
}

fn make_writable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o755));
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            make_writable(&entry.path());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Compiling: one library by hand, as cargo would, and generated workspaces
// ---------------------------------------------------------------------------------------------

/// A few functions, no diagnostics.
const X_SOURCE: &str = "pub fn add(a: u64, b: u64) -> u64 {\n    a + b\n}\n\n\
                        pub fn twice(x: u64) -> u64 {\n    add(x, x)\n}\n\n\
                        pub fn name() -> &'static str {\n    \"x\"\n}\n";

/// A library `<name>.rs` alone in `<world>/<name>/`, compiled into its `out/` as cargo would.
#[derive(Debug)]
struct Lib {
    dir: PathBuf,
    name: String,
}

/// One compile: its exit code, streams, and output files by name.
#[derive(Debug)]
struct Compiled {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    files: BTreeMap<String, Vec<u8>>,
}

impl Lib {
    fn new(world: &World, name: &str, source: &str) -> Lib {
        let dir = world.path().join(name);
        write(&dir.join(format!("{name}.rs")), source);
        fs::create_dir_all(dir.join("out")).expect("out dir");
        Lib { dir, name: name.to_owned() }
    }

    fn args(&self) -> Vec<String> {
        let out = self.dir.join("out").display().to_string();
        let name = self.name.as_str();
        let args = ["--crate-name", name, "--edition=2021", &format!("{name}.rs"), "--crate-type", "lib"];
        let more = ["--emit=dep-info,metadata,link", "--out-dir", &out, "-C", "extra-filename=-abc"];
        let json = ["--error-format=json", "--json=artifacts"];
        args.iter().chain(&more).chain(&json).map(|s| (*s).to_owned()).collect()
    }

    /// `program` in the crate's directory with the world's environment, `CARGO_MANIFEST_DIR`
    /// set as cargo sets it, and nothing of the test runner's own cargo environment.
    fn command(&self, world: &World, program: &Path) -> Command {
        let mut cmd = world.command(program);
        for (name, _) in std::env::vars() {
            if (name.starts_with("CARGO") || name.starts_with("RUSTC")) && !world.env.iter().any(|(k, _)| *k == name) {
                cmd.env_remove(name);
            }
        }
        cmd.env("CARGO_MANIFEST_DIR", &self.dir).current_dir(&self.dir);
        cmd
    }

    /// `ferry <real rustc> ARGS`.
    fn ferry_command(&self, world: &World) -> Command {
        let mut cmd = self.command(world, &bin("ferry"));
        cmd.arg(rustc()).args(self.args());
        cmd
    }

    fn ferry_output(&self, world: &World) -> Output {
        self.ferry_command(world).output().expect("ferry runs")
    }

    /// A plain rustc compile; its outputs are then removed, so the next compile starts clean.
    fn plain(&self, world: &World) -> Compiled {
        let out = self.command(world, &rustc()).args(self.args()).output().expect("rustc runs");
        let compiled = self.compiled(out);
        assert_eq!(compiled.code, Some(0), "plain rustc failed:\n{}", compiled.stderr);
        remove_outputs(self);
        compiled
    }

    fn ferry(&self, world: &World) -> Compiled {
        self.compiled(self.ferry_output(world))
    }

    fn compiled(&self, out: Output) -> Compiled {
        Compiled {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            files: self.outputs(),
        }
    }

    fn outputs(&self) -> BTreeMap<String, Vec<u8>> {
        let files = files_in(&self.dir.join("out"));
        files.iter().map(|p| (name_of(p), fs::read(p).expect("read output"))).collect()
    }
}

/// Removes a library's outputs, so the next compile starts clean.
fn remove_outputs(lib: &Lib) {
    for path in files_in(&lib.dir.join("out")) {
        fs::remove_file(&path).expect("remove output");
    }
}

fn name_of(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

fn assert_same_files<T: AsRef<[u8]>>(what: &str, expected: &BTreeMap<String, T>, actual: &BTreeMap<String, T>) {
    let names = |m: &BTreeMap<String, T>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(actual), names(expected), "{what}: output file names");
    let differ: Vec<&String> = expected
        .iter()
        .filter(|(name, bytes)| actual[*name].as_ref() != bytes.as_ref())
        .map(|(name, _)| name)
        .collect();
    // Dep-info is text, and says what the compile read: show it.
    let text = |b: &T| String::from_utf8_lossy(b.as_ref()).into_owned();
    let dep_info: Vec<String> = differ
        .iter()
        .filter(|name| name.ends_with(".d"))
        .map(|name| format!("{name} expected:\n{}\n{name} got:\n{}", text(&expected[*name]), text(&actual[*name])))
        .collect();
    assert!(differ.is_empty(), "{what}: {differ:?} differ from the plain compile's\n{}", dep_info.join("\n"));
}

fn sorted_lines(text: &str) -> Vec<&str> {
    let mut lines: Vec<&str> = text.lines().collect();
    lines.sort_unstable();
    lines
}

fn artifact_lines(text: &str) -> Vec<&str> {
    text.lines().filter(|l| l.starts_with(r#"{"$message_type":"artifact""#)).collect()
}

/// `.rlib`, `.rmeta` and `.d` files of `target/debug/deps`, by name.
fn deps_outputs(ws: &Path) -> BTreeMap<String, Vec<u8>> {
    files_in(&ws.join("target/debug/deps"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "rlib" || e == "rmeta" || e == "d"))
        .map(|p| (name_of(&p), fs::read(&p).expect("read output")))
        .collect()
}

/// A library source that takes rustc a few seconds, most of it generating code after the
/// metadata is written.
fn big_source(functions: usize) -> String {
    let mut source = String::new();
    for i in 0..functions {
        source.push_str(&format!(
            "pub fn f{i}(x: u64) -> u64 {{ let a = x.wrapping_mul({i}).rotate_left(7) ^ {i}; \
             if a % 3 == 0 {{ a / 3 }} else {{ a + {i} }} }}\n"
        ));
    }
    source
}

/// The rlib units of [`workspace`], sorted.
const RLIBS: &[&str] = &["base", "generated", "middle", "texty", "top"];

/// What the binary of [`workspace`] prints.
const APP_LINE: &str = "answer=42 chain=base+middle+top generated=from a build script text=hello from a text file";

/// The wrapper tests' workspace without `envy`: lib crates in a chain (`base` ← `middle` ←
/// `top`), a proc-macro `top` uses, a lib with a build script writing the source it `include!`s,
/// a lib using `include_str!`, and the binary `app` using them all. Path dependencies only.
fn workspace(root: &Path) {
    crate::wrapper::workspace_with(root, false);
}

/// A workspace of `big` (a few seconds of codegen) and `user`, which depends on it.
fn slow_workspace(root: &Path) {
    write(&root.join("Cargo.toml"), "[workspace]\nresolver = \"2\"\nmembers = [\"crates/*\"]\n");
    let package = |name: &str, deps: &str| {
        format!("[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[dependencies]\n{deps}")
    };
    write(&root.join("crates/big/Cargo.toml"), &package("big", ""));
    write(&root.join("crates/big/src/lib.rs"), &big_source(8000));
    write(&root.join("crates/user/Cargo.toml"), &package("user", "big = { path = \"../big\" }\n"));
    write(&root.join("crates/user/src/lib.rs"), "pub fn user() -> u64 {\n    big::f1(3)\n}\n");
}

fn app(ws: &Path) -> String {
    ok(Command::new(ws.join("target/debug/app")).output().expect("app runs")).trim().to_owned()
}

/// `cargo build -j2 --offline` in `dir` as [`cargo_build`] runs it, to be spawned.
fn cargo_command(world: &World, dir: &Path) -> Command {
    let mut cmd = crate::wrapper::cargo(world, dir);
    cmd.args(["build", &crate::wrapper::jobs(world), "--offline"]);
    cmd
}

/// A process running in the background, its stdout and stderr going to files.
#[derive(Debug)]
struct Background {
    child: Child,
    stderr: PathBuf,
}

impl Background {
    fn spawn(mut cmd: Command, prefix: &Path) -> Background {
        let stderr = prefix.with_extension("stderr");
        let out = File::create(prefix.with_extension("stdout")).expect("stdout file");
        let err = File::create(&stderr).expect("stderr file");
        let child = cmd.stdin(Stdio::null()).stdout(out).stderr(err).spawn().expect("spawn");
        Background { child, stderr }
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// Waits at most `limit`; kills it (and says None) if it is still running then.
    fn wait_bounded(&mut self, limit: Duration) -> (Option<std::process::ExitStatus>, Duration) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return (Some(status), start.elapsed());
            }
            if start.elapsed() > limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return (None, start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let (status, took) = self.wait_bounded(limit);
        status.unwrap_or_else(|| panic!("still running after {took:?}:\n{}", self.stderr()))
    }

    fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_job_abandoned_for_an_input_the_worker_lacks_stores_everything_rustc_printed() {
    // Found by the oracle (with FERRY_VERIFY): the proc-macro reads a file outside the package, so
    // the first job's key differs from this machine's and the crate compiles here; the artifact
    // notifications the job had already passed to cargo are not passed again, but the entry
    // keeps them, so a hit prints everything rustc printed (verification compares it).
    let mut c = Cluster::start(Setup { workers: 1, seed_scheduler: true, seed_workers: true, ..Setup::default() });
    let outside = c.world.path().join("outside.txt");
    write(&outside, "outside");
    let ws = c.world.path().join("ws");
    let mac = format!(
        "use proc_macro::TokenStream;\n#[proc_macro]\npub fn read(_: TokenStream) -> TokenStream {{\n    \
         format!(\"{{:?}}\", std::fs::read_to_string({:?}).unwrap_or_default()).parse().unwrap()\n}}\n",
        outside.display().to_string()
    );
    // `app` depends on `user`, so cargo asks for artifact notifications (pipelining).
    write(&ws.join("Cargo.toml"), "[workspace]\nresolver = \"2\"\nmembers = [\"mac\", \"user\", \"app\"]\n");
    write(
        &ws.join("app/Cargo.toml"),
        "[package]\nname = \"app\"\nversion = \"0.1.0\"\nedition = \"2021\"\n[dependencies]\nuser = { path = \"../user\" }\n",
    );
    write(&ws.join("app/src/main.rs"), "fn main() { println!(\"{}\", user::TEXT); }\n");
    write(
        &ws.join("mac/Cargo.toml"),
        "[package]\nname = \"mac\"\nversion = \"0.1.0\"\nedition = \"2021\"\n[lib]\nproc-macro = true\n",
    );
    write(&ws.join("mac/src/lib.rs"), &mac);
    write(
        &ws.join("user/Cargo.toml"),
        "[package]\nname = \"user\"\nversion = \"0.1.0\"\nedition = \"2021\"\n[dependencies]\nmac = { path = \"../mac\" }\n",
    );
    write(&ws.join("user/src/lib.rs"), "pub const TEXT: &str = mac::read!();\n");
    client(&mut c, "first");
    ok_build(cargo_build(&c.world, &ws, true));
    let s = c.world.stats();
    assert_eq!(n(&s, "/fallbacks/remote-inputs-differ"), 1, "{s:#}");
    // The same machine, after a clean: hits, each compiled again and compared.
    clean(&c.world, &ws);
    c.world.set("FERRY_VERIFY", "1");
    c.world.set("FERRY_SCHEDULER", "");
    c.world.ferry_ok(&["stats", "--zero"]);
    ok_build(cargo_build(&c.world, &ws, true));
    let s = c.world.stats();
    assert_eq!(n(&s, "/hits_local"), 3, "{s:#}");
    assert_eq!((n(&s, "/verified"), n(&s, "/verify_mismatches")), (3, 0), "{s:#}");
}
