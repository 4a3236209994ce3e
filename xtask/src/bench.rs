//! The benchmarks. Every figure is printed next to a baseline measured in the same run, as a ratio.
//!
//! `toolchain`: ToolchainId from scratch, the weak-key map hit, and archive creation against
//! `tar -czf` of the same files. `wrapper`: `cargo build -j2` of a real dependency graph from
//! crates.io, plain vs through ferry with a cold and a warm cache (fresh target dir each time), and
//! single warm hits replayed exactly as cargo ran them.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ferry_toolchains::{LocalStore, Manifest, ToolchainSet, resolve_compiler, write_archive};

pub fn toolchain() -> anyhow::Result<()> {
    let sysroot = String::from_utf8(Command::new("rustc").args(["--print", "sysroot"]).output()?.stdout)?;
    let rustc = Path::new(sysroot.trim()).join("bin/rustc");
    let compiler = resolve_compiler(&rustc, None, &std::env::current_dir()?)?;
    let tmp = tempfile::tempdir()?;
    println!("== toolchain ({})", compiler.root.display());

    // Warm the page cache so both sides read from memory.
    let probe_store = LocalStore::open(&tmp.path().join("warm"))?;
    let identified = probe_store.identify(&compiler, &[])?;
    let mut cold = Vec::new();
    for i in 0..3 {
        let store = LocalStore::open(&tmp.path().join(format!("cold{i}")))?;
        let t = Instant::now();
        store.identify(&compiler, &[])?;
        cold.push(t.elapsed());
    }
    let mut warm = Vec::new();
    for _ in 0..21 {
        let t = Instant::now();
        let found = probe_store.identify(&compiler, &[])?;
        warm.push(t.elapsed());
        assert!(found.from_map);
    }
    println!(
        "  ToolchainId from scratch ({} files, {:.0} MiB): median {:.3} s   (target <= 1.0 s)",
        identified.files,
        identified.bytes as f64 / (1 << 20) as f64,
        median(&mut cold).as_secs_f64()
    );
    println!("  weak-key map hit:                        median {:.2} ms  (target <= 5 ms)", ms(median(&mut warm)));

    let host = identified.probe.host.clone();
    let set = ToolchainSet::collect(&compiler.root, &host, &[])?;
    let manifest = Manifest::compute(&set)?;
    let ours = tmp.path().join("ours.tar.gz");
    let t = Instant::now();
    let ours_bytes = write_archive(&set, &manifest, &mut std::io::BufWriter::new(fs::File::create(&ours)?))?;
    let ours_time = t.elapsed();
    let list = tmp.path().join("files.txt");
    let mut names = String::new();
    for f in &set.files {
        names.push_str(&f.rel);
        names.push('\n');
    }
    fs::write(&list, names)?;
    let theirs = tmp.path().join("theirs.tar.gz");
    let t = Instant::now();
    let status =
        Command::new("tar").arg("-czf").arg(&theirs).arg("-C").arg(&compiler.root).arg("-T").arg(&list).status()?;
    let tar_time = t.elapsed();
    if !status.success() {
        bail!("tar -czf failed");
    }
    let tar_bytes = fs::metadata(&theirs)?.len();
    println!(
        "  archive: ferry {:.2} s, {:.1} MiB | tar -czf {:.2} s, {:.1} MiB | time {:.3}x (target <= 0.25x), size {:.3}x (target <= 1.25x)",
        ours_time.as_secs_f64(),
        mib(ours_bytes),
        tar_time.as_secs_f64(),
        mib(tar_bytes),
        ours_time.as_secs_f64() / tar_time.as_secs_f64(),
        ours_bytes as f64 / tar_bytes as f64
    );
    // The two halves of "upload to first job" that are pure CPU: the scheduler verifying an
    // upload, and a worker unpacking it (both decompress and hash every byte).
    let t = Instant::now();
    ferry_toolchains::verify_archive(fs::File::open(&ours)?, &manifest.id(), &Default::default())?;
    let verify = t.elapsed();
    let t = Instant::now();
    ferry_toolchains::unpack_archive(
        fs::File::open(&ours)?,
        &tmp.path().join("unpacked"),
        &manifest.id(),
        &Default::default(),
    )?;
    println!(
        "  archive verify {:.2} s, verified unpack {:.2} s ({:.0} MiB of files)",
        verify.as_secs_f64(),
        t.elapsed().as_secs_f64(),
        mib(manifest.bytes())
    );
    Ok(())
}

pub fn wrapper() -> anyhow::Result<()> {
    let ferry = crate::build_ferry()?;
    let xtask = std::env::current_exe()?;
    let tmp = tempfile::Builder::new().prefix("ferry-bench-").tempdir()?;
    let (project, packages) = registry_project(tmp.path())?;
    println!("== wrapper: cargo build -j2 (debug) of {packages} packages from crates.io, fresh target dir each time");
    let cache = tmp.path().join("cache");
    let record = tmp.path().join("calls.jsonl");
    // One target dir path for every variant, removed before each build: keys contain the output
    // paths, and sharing across different target dirs is the separate, opt-in FERRY_BASEDIRS.
    let target = project.join("target");
    let build = |name: &str, wrapper: Option<&Path>, extra: &[(&str, &Path)]| -> anyhow::Result<Duration> {
        let mut env: Vec<(&str, &Path)> = vec![("FERRY_CACHE_DIR", &cache), ("XTASK_FERRY", &ferry)];
        env.extend_from_slice(extra);
        timed_build(name, &project, &target, wrapper, &env)
    };
    let plain1 = build("plain1", None, &[])?;
    let cold = build("cold", Some(&xtask), &[("XTASK_RECORD", &record)])?;
    // A local compile's entry is written by a detached copy of the wrapper once cargo has its
    // answer: how long after the build those copies still ran (`ferry stats` waits for them).
    let tail = Instant::now();
    Command::new(&ferry).arg("stats").env("FERRY_CACHE_DIR", &cache).output()?;
    let tail = tail.elapsed();
    let warm = build("warm", Some(&ferry), &[])?;
    // Verification in the field: the CPU this machine spent from a warm build's start until
    // ferry's detached work ended (`ferry stats` waits for it; a sampled hit is compiled again
    // there), at FERRY_VERIFY 0, 0.01 and 1, and how many hits were checked.
    let mut verify = Vec::new();
    for fraction in ["0", "0.01", "1"] {
        let verified = |cache: &Path| -> anyhow::Result<u64> {
            let out = Command::new(&ferry).args(["stats", "--json"]).env("FERRY_CACHE_DIR", cache).output()?;
            let stats: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            Ok(stats["verified"].as_u64().unwrap_or(0) + stats["verify_mismatches"].as_u64().unwrap_or(0))
        };
        let (checked, cpu) = (verified(&cache)?, busy_cpu_secs()?);
        let wall =
            build(&format!("warm, FERRY_VERIFY={fraction}"), Some(&ferry), &[("FERRY_VERIFY", Path::new(fraction))])?;
        let checked = verified(&cache)? - checked;
        verify.push((fraction, wall, busy_cpu_secs()? - cpu, checked));
    }
    let plain2 = build("plain2", None, &[])?;
    let plain = (plain1 + plain2) / 2;
    let stats = Command::new(&ferry).args(["stats", "--json"]).env("FERRY_CACHE_DIR", &cache).output()?;
    let stats: serde_json::Value = serde_json::from_slice(&stats.stdout)?;
    println!("  plain:      {:.2} s (mean of {:.2} s and {:.2} s)", plain.as_secs_f64(), secs(plain1), secs(plain2));
    println!(
        "  cold cache: {:.2} s = {:.3}x plain (target <= 1.05x); detached stores finished {:.2} s after",
        secs(cold),
        ratio(cold, plain),
        secs(tail)
    );
    println!("  warm cache: {:.2} s = {:.3}x plain (target <= 0.10x)", secs(warm), ratio(warm, plain));
    let base_cpu = verify[0].2;
    for (fraction, wall, cpu, checked) in &verify {
        println!(
            "  warm, FERRY_VERIFY={fraction}: {:.2} s = {:.3}x plain; machine CPU to the end of ferry's detached work \
             {cpu:.2} s ({:+.2} s against FERRY_VERIFY=0, {:.3}x of plain's wall time); {checked} hits compiled again",
            secs(*wall),
            ratio(*wall, plain),
            cpu - base_cpu,
            (cpu - base_cpu) / plain.as_secs_f64()
        );
    }
    println!(
        "  ferry stats: hits {} misses {} passthrough {} not_stored {}",
        stats["hits_local"], stats["misses"], stats["passthrough"], stats["not_stored"]
    );

    let calls: Vec<serde_json::Value> =
        fs::read_to_string(&record)?.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    for (label, crate_name, target_ms) in [("regex-syntax", "regex_syntax", 30.0), ("tiny (cfg-if)", "cfg_if", 3.0)] {
        let Some(call) = calls.iter().find(|c| {
            let args = c["args"].as_array().map(Vec::as_slice).unwrap_or_default();
            args.windows(2).any(|w| w[0] == "--crate-name" && w[1] == crate_name)
        }) else {
            println!("  single hit {label}: no recorded call for {crate_name}");
            continue;
        };
        let mut times = Vec::new();
        for _ in 0..21 {
            times.push(replay(&ferry, call, None)?);
        }
        let med = median(&mut times);
        let log = tmp.path().join("hit.log");
        replay(&ferry, call, Some(&log))?;
        let (hashed, memo) = digest_counts(&log);
        println!(
            "  single warm hit, {label}: median {:.2} ms of wrapper start to exit (target <= {target_ms} ms); \
             {memo} input digests from the memo (a stat each), {hashed} files hashed (small ones)",
            ms(med)
        );
    }
    observer_cost(&calls, cold)?;
    Ok(())
}

/// The observer's own cost: sampled compiles of the cold build run again, plain and observed
/// (the interposer preloaded, logging to a file), alternately; the difference per compile, and
/// what it adds up to over the whole build.
fn observer_cost(calls: &[serde_json::Value], cold: Duration) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let interposer = ferry_observe::install(tmp.path())?;
    let log = tmp.path().join("observe.log");
    let links =
        |c: &serde_json::Value| c["args"].as_array().is_some_and(|a| a.iter().any(|x| x == "bin" || x == "proc-macro"));
    let sample: Vec<&serde_json::Value> = calls
        .iter()
        .filter(|c| !links(c))
        .step_by(8)
        .take(6)
        .chain(calls.iter().filter(|c| links(c)).step_by(3).take(4))
        .collect();
    let mut extra = Vec::new();
    for call in &sample {
        let args: Vec<&str> = call["args"].as_array().context("args")?.iter().filter_map(|a| a.as_str()).collect();
        let run = |observed: bool| -> anyhow::Result<Duration> {
            let mut cmd = Command::new(args[0]);
            cmd.args(&args[1..]).current_dir(call["cwd"].as_str().context("cwd")?).env_clear();
            for (k, v) in call["env"].as_object().context("env")? {
                cmd.env(k, v.as_str().unwrap_or_default());
            }
            if observed {
                fs::write(&log, b"")?;
                cmd.envs(ferry_observe::environment(&interposer, &log, None, std::process::id()));
            }
            cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
            let t = Instant::now();
            cmd.status()?;
            Ok(t.elapsed())
        };
        let (mut plain, mut observed) = (Vec::new(), Vec::new());
        for _ in 0..5 {
            plain.push(run(false)?);
            observed.push(run(true)?);
        }
        extra.push(ms(median(&mut observed)) - ms(median(&mut plain)));
    }
    let per_compile = extra.iter().sum::<f64>() / extra.len().max(1) as f64;
    let total = per_compile * calls.len() as f64 / 1000.0;
    println!(
        "  observer: {per_compile:+.2} ms per compile (median of 5 runs each, {} compiles sampled, {} of them linking); \
         over the build's {} compiles {total:.2} s, {:.1}% of the cold build's two job slots",
        sample.len(),
        sample.iter().filter(|c| links(c)).count(),
        calls.len(),
        100.0 * total / (2.0 * secs(cold))
    );
    Ok(())
}

/// `hashed=` and `memoized=` of the last wrapper call in a debug log.
fn digest_counts(log: &Path) -> (u64, u64) {
    let text = fs::read_to_string(log).unwrap_or_default();
    let line = text.lines().rev().find(|l| l.contains("wrapper call")).unwrap_or_default();
    let field = |name: &str| {
        line.split_whitespace().find_map(|w| w.strip_prefix(name)).and_then(|v| v.parse().ok()).unwrap_or(0)
    };
    (field("hashed="), field("memoized="))
}

/// Recording-wrapper mode (see the crate docs).
/// `cargo build -j2 --offline --quiet` of `project` into a fresh `target` (removed first),
/// through `wrapper` if given, with `env`; how long it took.
fn timed_build(
    name: &str,
    project: &Path,
    target: &Path,
    wrapper: Option<&Path>,
    env: &[(&str, &Path)],
) -> anyhow::Result<Duration> {
    if target.exists() {
        fs::remove_dir_all(target)?;
    }
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(["build", "-j2", "--offline", "--quiet"])
        .current_dir(project)
        .env("CARGO_TARGET_DIR", target)
        .env("CARGO_INCREMENTAL", "0")
        .env_remove("RUSTC_WRAPPER");
    if let Some(w) = wrapper {
        cmd.env("RUSTC_WRAPPER", w);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let t = Instant::now();
    if !cmd.status()?.success() {
        bail!("build '{name}' failed");
    }
    Ok(t.elapsed())
}

/// CPU time every core of this machine spent busy since boot (`/proc/stat`), in seconds.
fn busy_cpu_secs() -> anyhow::Result<f64> {
    let stat = fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("an empty /proc/stat")?;
    let ticks: Vec<u64> = line.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal: all but idle and iowait are busy.
    let busy: u64 = ticks.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, t)| t).sum();
    // SAFETY: sysconf reads a constant of the running system.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    Ok(busy as f64 / hz as f64)
}

/// The crates.io dependency graph the benchmarks build, fetched; and its package count.
fn registry_project(dir: &Path) -> anyhow::Result<(PathBuf, usize)> {
    let project = dir.join("graph");
    crate::sample::write_registry_project(&project)?;
    let fetch = Command::new(env!("CARGO")).arg("fetch").current_dir(&project).status()?;
    if !fetch.success() {
        bail!("cargo fetch failed (the benchmark needs crates.io once)");
    }
    let packages = count_packages(&project)?;
    Ok((project, packages))
}

/// The distributed path's overhead: one worker with 2 slots on this machine (no speed-up is
/// possible), `cargo build -j2` of the crates.io graph, ratios to plain builds of the same run.
pub fn distributed() -> anyhow::Result<()> {
    let ferry = crate::build_ferry()?;
    let release = ferry.parent().expect("target/release").to_owned();
    let tmp = tempfile::Builder::new().prefix("ferry-bench-dist-").tempdir()?;
    std::fs::set_permissions(tmp.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let (project, packages) = registry_project(tmp.path())?;
    // `bench distributed memcached`: a real memcached (started here) is the shared tier of the
    // worker and the clients instead of the scheduler's.
    let _memcached;
    let tier = match std::env::args().nth(3).as_deref() {
        Some("memcached") => {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            _memcached = Kill(
                Command::new("memcached")
                    .args(["-l", "127.0.0.1", "-p", &port.to_string(), "-U", "0", "-m", "1024", "-u", "nobody"])
                    .spawn()
                    .context("starting memcached (apt-get install memcached)")?,
            );
            std::thread::sleep(Duration::from_millis(300));
            let url = format!("memcached://127.0.0.1:{port}");
            // The worker inherits it.
            // SAFETY: set before any thread that reads the environment is started.
            unsafe { std::env::set_var("FERRY_SHARED_CACHE", &url) };
            url
        }
        Some(other) => bail!("unknown shared tier '{other}' (try: memcached)"),
        None => "scheduler".to_owned(),
    };
    let cluster = crate::LocalCluster::start(&release, tmp.path())?;
    let url = &cluster.url;
    println!(
        "== distributed: cargo build -j2 (debug) of {packages} packages, one local worker with 2 slots, shared tier {tier}"
    );
    // Each variant builds into its own fresh target dir (keys contain output paths, so a new target
    // dir is a cold build even with the shared tier full), with its own empty local cache.
    // Every build reaches the linker driver through a `cc` of its own on PATH; the warm build is
    // "another machine": a byte-identical copy of that `cc` (other inode and mtime), terminal
    // colors on, its own registry token and HTTP timeout.
    let tools = tmp.path().join("tools");
    fs::create_dir_all(&tools)?;
    let cc = tools.join("cc");
    fs::write(&cc, "#!/bin/sh\nexec /usr/bin/cc \"$@\"\n")?;
    fs::set_permissions(&cc, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let path = std::ffi::OsString::from(format!("{}:{}", tools.display(), std::env::var("PATH").unwrap_or_default()));
    let build = |name: &str, wrapper: bool, target: &str| -> anyhow::Result<(Duration, serde_json::Value)> {
        let cache = tmp.path().join(format!("cache-{name}"));
        // The blob-cache run must compile everything again: no shared-tier hits.
        let shared = Path::new(if name == "warm-blobs" { "off" } else { tier.as_str() });
        let mut env: Vec<(&str, &Path)> = vec![
            ("FERRY_CACHE_DIR", &cache),
            ("FERRY_SCHEDULER", Path::new(url)),
            ("FERRY_SHARED_CACHE", shared),
            ("PATH", Path::new(&path)),
        ];
        if name == "warm" {
            let copy = tools.join("cc.copy");
            fs::copy(&cc, &copy)?;
            fs::rename(&copy, &cc)?;
            fs::File::options()
                .append(true)
                .open(&cc)?
                .set_modified(std::time::UNIX_EPOCH + Duration::from_secs(1 << 30))?;
            env.extend([
                ("CARGO_TERM_COLOR", Path::new("always")),
                ("CARGO_REGISTRY_TOKEN", Path::new("another-machines-token")),
                ("CARGO_HTTP_TIMEOUT", Path::new("77")),
            ]);
        }
        let elapsed = timed_build(name, &project, &tmp.path().join(target), wrapper.then_some(&*ferry), &env)?;
        // Detached stores of local compiles finish before the next build starts.
        Command::new(&ferry).arg("stats").env("FERRY_CACHE_DIR", &cache).output()?;
        let stats = Command::new(&ferry).args(["stats", "--json"]).env("FERRY_CACHE_DIR", &cache).output()?;
        Ok((elapsed, serde_json::from_slice(&stats.stdout).unwrap_or_default()))
    };
    let (plain1, _) = build("plain1", false, "target-plain")?;
    // The first build uploads the toolchain in the background: watch for the moment the worker
    // holds it; the runs after it start only then.
    let started = Instant::now();
    let watcher = {
        let (ferry, url) = (ferry.clone(), url.clone());
        std::thread::spawn(move || -> anyhow::Result<Duration> {
            crate::until_a_worker_holds_the_toolchain(&ferry, &url, Duration::from_secs(600))?;
            Ok(started.elapsed())
        })
    };
    let (first, first_stats) = build("first", true, "target-first")?;
    let on_cluster = watcher.join().map_err(|_| anyhow::anyhow!("the toolchain watcher panicked"))??;
    let (cold, cold_stats) = build("cold", true, "target-cold")?;
    // Plain runs before, between and after: this machine's speed drifts by a few percent
    // within minutes.
    let (plain2, _) = build("plain2", false, "target-plain")?;
    let (warm, warm_stats) = build("warm", true, "target-first")?;
    // The cold build's target dir again: every input blob is already on the worker.
    let (blobs, blob_stats) = build("warm-blobs", true, "target-cold")?;
    let (plain3, _) = build("plain3", false, "target-plain")?;
    let plain = (plain1 + plain2 + plain3) / 3;
    let n = |s: &serde_json::Value, k: &str| s[k].as_u64().unwrap_or(0);
    println!(
        "  plain:       {:.2} s (mean of {:.2} s, {:.2} s and {:.2} s)",
        secs(plain),
        secs(plain1),
        secs(plain2),
        secs(plain3)
    );
    println!(
        "  first build, toolchain packaged and uploaded: {:.2} s = {:.3}x plain (target <= 1.35x); the worker \
         held the toolchain {:.2} s after it started",
        secs(first),
        ratio(first, plain),
        secs(on_cluster)
    );
    println!(
        "  cold distributed, toolchain on the cluster:   {:.2} s = {:.3}x plain (target <= 1.15x)",
        secs(cold),
        ratio(cold, plain)
    );
    println!(
        "  warm from the shared tier, empty local cache, another machine: {:.2} s = {:.3}x plain (target <= 0.2x)",
        secs(warm),
        ratio(warm, plain)
    );
    let units = n(&cold_stats, "misses");
    println!(
        "  units: {} compiled remotely of {units} compiled ({} locally); fallbacks {}",
        n(&cold_stats, "compiled_remote"),
        n(&cold_stats, "compiled_local"),
        cold_stats["fallbacks"]
    );
    println!(
        "  shared-tier hits {} of {} cacheable; first build's fallbacks {}",
        n(&warm_stats, "hits_remote"),
        n(&warm_stats, "hits_remote") + n(&warm_stats, "misses"),
        first_stats["fallbacks"]
    );
    let per_job = |s: &serde_json::Value| n(s, "bytes_sent") as f64 / n(s, "compiled_remote").max(1) as f64 / 1024.0;
    println!(
        "  bytes sent per job: empty blob cache (first build) {:.1} KiB, new target dir (cold) {:.1} KiB, warm blob \
         cache {:.1} KiB ({} jobs, {:.2} s = {:.3}x plain)",
        per_job(&first_stats),
        per_job(&cold_stats),
        per_job(&blob_stats),
        n(&blob_stats, "compiled_remote"),
        secs(blobs),
        ratio(blobs, plain)
    );
    Ok(())
}

/// A child process killed when dropped.
struct Kill(std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn record_and_exec(file: &Path) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let env: BTreeMap<String, String> = std::env::vars().filter(|(k, _)| k != "XTASK_RECORD").collect();
    let line = serde_json::json!({ "cwd": std::env::current_dir()?, "args": args, "env": env });
    let mut f = fs::OpenOptions::new().create(true).append(true).open(file)?;
    // One write per record: concurrent appenders (cargo -j2) then never interleave lines.
    f.write_all(format!("{line}\n").as_bytes())?;
    drop(f);
    let ferry = std::env::var_os("XTASK_FERRY").context("XTASK_FERRY is not set")?;
    let err = Command::new(ferry).args(&args).env_remove("XTASK_RECORD").exec();
    Err(err.into())
}

/// Replays one recorded call through ferry (a hit), with a debug log when `log` is given.
fn replay(ferry: &Path, call: &serde_json::Value, log: Option<&Path>) -> anyhow::Result<Duration> {
    let args: Vec<&str> = call["args"].as_array().context("args")?.iter().filter_map(|a| a.as_str()).collect();
    let mut cmd = Command::new(ferry);
    cmd.args(&args).current_dir(call["cwd"].as_str().context("cwd")?).env_clear();
    for (k, v) in call["env"].as_object().context("env")? {
        cmd.env(k, v.as_str().unwrap_or_default());
    }
    if let Some(log) = log {
        cmd.env("FERRY_LOG", "debug").env("FERRY_LOG_FILE", log);
    }
    cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    // As after `cargo clean`: the outputs are not there (replacing existing files would add the
    // kernel's cost of freeing their pages, which a warm build never pays).
    let value = |flag: &str| args.windows(2).find(|w| w[0] == flag).map(|w| w[1]);
    let stem = format!(
        "{}{}",
        value("--crate-name").unwrap_or_default(),
        args.iter().find_map(|a| a.strip_prefix("extra-filename=")).unwrap_or_default()
    );
    if let Some(out_dir) = value("--out-dir") {
        for entry in fs::read_dir(out_dir)?.flatten() {
            if entry.file_name().to_string_lossy().contains(&stem) {
                fs::remove_file(entry.path())?;
            }
        }
    }
    let t = Instant::now();
    let status = cmd.status()?;
    let elapsed = t.elapsed();
    if !status.success() {
        bail!("replayed call failed");
    }
    Ok(elapsed)
}

fn count_packages(project: &Path) -> anyhow::Result<usize> {
    let lock = fs::read_to_string(project.join("Cargo.lock"))?;
    Ok(lock.matches("[[package]]").count())
}

pub(crate) fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub(crate) fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

pub(crate) fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64()
}

fn mib(n: u64) -> f64 {
    n as f64 / (1 << 20) as f64
}
