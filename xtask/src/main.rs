//! `cargo xtask`: the benchmark harness and the demo, kept out of the product crates.
//!
//! - `cargo xtask demo`: the README's main job — uploads the toolchain, builds a generated sample
//!   workspace through ferry twice (cold, then after `cargo clean` with an empty local cache) and
//!   prints `ferry stats`.
//! - `cargo xtask bench [toolchain|wrapper|all]`: figures as ratios against a baseline measured in
//!   the same run (plain `tar -czf`, plain `cargo build`).
//! - `cargo xtask difftest [--seed S] [--sequences N] [--steps K] [--no-shrink] [--no-cluster]`: the differential
//!   oracle (`ferry_tests::oracle`) for as long as asked; each finding is printed as a script.
//!
//! When `XTASK_RECORD` is set this binary is a recording `RUSTC_WRAPPER`: it appends the call
//! (cwd, args, environment) as one JSON line to that file and execs ferry, so single hits can be
//! replayed and timed exactly as cargo ran them.

mod bench;
mod bench_c;
mod bench_cluster;
mod bench_security;
mod sample;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

fn main() -> anyhow::Result<()> {
    if let Some(file) = std::env::var_os("XTASK_RECORD") {
        return bench::record_and_exec(Path::new(&file));
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["demo"] => demo(),
        ["bench"] | ["bench", "all"] => {
            bench::toolchain()?;
            bench::wrapper()?;
            bench::distributed()?;
            bench_cluster::allocations()
        }
        ["bench", "distributed"] | ["bench", "distributed", "memcached"] => bench::distributed(),
        ["bench", "cluster"] => bench_cluster::allocations(),
        ["bench", "security"] => bench_security::costs(),
        ["bench", "toolchain"] => bench::toolchain(),
        ["bench", "wrapper"] => bench::wrapper(),
        ["bench", "c"] => bench_c::c(),
        ["difftest", ..] => difftest(&args[1..]),
        _ => bail!(
            "usage: cargo xtask demo | cargo xtask bench [toolchain|wrapper|c|distributed|cluster|security|all] \
             | cargo xtask difftest [--seed S] [--sequences N] [--steps K] [--no-shrink] [--no-cluster] [--ferry PATH]"
        ),
    }
}

/// `cargo xtask difftest`: the differential oracle with a seed and budget of the caller's choosing
/// (some sequences through a scheduler and a worker on loopback, unless `--no-cluster`)
/// (defaults: a seed from the clock, 20 sequences of 10 builds), against a release build (or the
/// `ferry` given with `--ferry PATH`). Each
/// finding is printed (and written to `target/difftest/finding-<seed>-<sequence>.sh`); the exit
/// code is 1 when there was one.
fn difftest(args: &[String]) -> anyhow::Result<()> {
    let mut seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let (mut sequences, mut steps, mut shrink) = (20, 10, true);
    let mut ferry = None;
    let mut cluster = true;
    let mut only = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| -> anyhow::Result<u64> {
            it.next().and_then(|v| v.parse().ok()).with_context(|| format!("{name} needs a number"))
        };
        match a.as_str() {
            "--seed" => seed = value("--seed")?,
            "--sequences" => sequences = value("--sequences")? as usize,
            "--steps" => steps = value("--steps")? as usize,
            "--no-shrink" => shrink = false,
            "--no-cluster" => cluster = false,
            "--only" => only = Some(value("--only")? as usize),
            "--ferry" => {
                let given = PathBuf::from(it.next().context("--ferry needs a path")?);
                ferry = Some(given.canonicalize().with_context(|| format!("no ferry at {}", given.display()))?);
            }
            other => bail!("unknown difftest argument '{other}'"),
        }
    }
    let ferry = match ferry {
        Some(f) => f,
        None => build_ferry()?,
    };
    let out = workspace_root().join("target/difftest");
    std::fs::create_dir_all(&out)?;
    let work = tempfile::Builder::new().prefix("ferry-difftest-").tempdir()?;
    println!("== difftest: seed {seed}, {sequences} sequences of {steps} builds");
    let opts = ferry_tests::oracle::Options {
        seed,
        sequences,
        steps,
        ferry,
        work: work.path().to_owned(),
        shrink,
        shrink_runs: 60,
        cluster,
        only,
    };
    let report = ferry_tests::oracle::run(&opts, &mut |line| println!("  {line}"));
    println!(
        "== {} sequences, {} steps, {} compared builds, {} hits, {} misses, {:.0} s; {} finding(s)",
        report.sequences,
        report.steps,
        report.builds,
        report.hits,
        report.misses,
        report.elapsed.as_secs_f64(),
        report.findings.len()
    );
    for f in &report.findings {
        let file = out.join(format!("finding-{}-{}.sh", f.seed, f.sequence));
        std::fs::write(&file, &f.script)?;
        println!(
            "
-- sequence {}: {}
   script ({} steps): {}
",
            f.sequence,
            f.message,
            f.steps,
            file.display()
        );
        println!("{}", f.script);
    }
    if !report.findings.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}

/// Builds the release binaries (cargo's progress shown) and returns the path of `ferry`.
pub fn build_ferry() -> anyhow::Result<PathBuf> {
    let status = Command::new(env!("CARGO"))
        .args(["build", "--release", "-p", "ferry-client", "-p", "ferry-scheduler", "-p", "ferry-worker"])
        .current_dir(workspace_root())
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build --release failed");
    }
    Ok(workspace_root().join("target/release/ferry"))
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_owned()
}

/// Programs the demo needs from the system, and the Debian package that has each.
const DEMO_NEEDS: &[(&str, &str)] = &[("bwrap", "bubblewrap"), ("cc", "gcc")];

/// Installs what the demo needs when run as root (as `scripts/test` does); otherwise stops at
/// once with the exact command to run.
fn ensure_prerequisites() -> anyhow::Result<()> {
    let missing: Vec<&str> = DEMO_NEEDS.iter().filter(|(cmd, _)| !on_path(cmd)).map(|(_, pkg)| *pkg).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let list = missing.join(" ");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the demo's worker needs {list}, which is not installed: run `sudo apt-get install -y {list}`              (or your distribution's equivalent) and run `cargo xtask demo` again"
        );
    }
    println!("== installing {list} (apt-get, as root)");
    let installed = Command::new("sh")
        .args(["-c", &format!("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq {list}")])
        .status()
        .context("running apt-get")?;
    if !installed.success() || DEMO_NEEDS.iter().any(|(cmd, _)| !on_path(cmd)) {
        bail!("installing {list} failed: run `apt-get install -y {list}` yourself and look at its errors");
    }
    Ok(())
}

fn on_path(program: &str) -> bool {
    which(program).is_some()
}

/// A program's path, as the shell finds it in `PATH`.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(program)).find(|p| p.is_file())
}

fn demo() -> anyhow::Result<()> {
    ensure_prerequisites()?;
    println!("== building ferry (release)");
    let ferry = build_ferry()?;
    let release = ferry.parent().expect("target/release").to_owned();
    let tmp = tempfile::Builder::new().prefix("ferry-demo-").tempdir()?;
    // The worker's sandbox runs as an unprivileged user that must reach the worker's files.
    std::fs::set_permissions(tmp.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let project = tmp.path().join("sample");
    sample::write_workspace(&project)?;
    let cache = tmp.path().join("cache");
    // The compiler links (`ferry setup`) first in PATH: the build script's `cc` goes through ferry.
    let links = tmp.path().join("ferry-bin");
    let setup = Command::new(&ferry).args(["setup", "--dir"]).arg(&links).env("FERRY_CACHE_DIR", &cache).output()?;
    if !setup.status.success() {
        bail!("ferry setup failed: {}", String::from_utf8_lossy(&setup.stderr));
    }
    let path = format!("{}:{}", links.display(), std::env::var("PATH").unwrap_or_default());

    println!("== starting a scheduler and a worker on loopback");
    let cluster = LocalCluster::start(&release, tmp.path())?;
    let url = cluster.url.clone();
    println!("   scheduler {url}, worker {}", cluster.worker.addr);

    let ferry_cmd = |cache: &Path, args: &[&str]| {
        Command::new(&ferry).args(args).env("FERRY_CACHE_DIR", cache).env("FERRY_SCHEDULER", &url).status()
    };
    let build = |what: &str, cache: &Path| -> anyhow::Result<()> {
        println!("\n== {what}");
        let started = std::time::Instant::now();
        let status = Command::new(env!("CARGO"))
            .args(["build", "-j2", "--offline"])
            .current_dir(&project)
            .env("RUSTC_WRAPPER", &ferry)
            .env("PATH", &path)
            .env("FERRY_CACHE_DIR", cache)
            .env("FERRY_SCHEDULER", &url)
            .env("CARGO_INCREMENTAL", "0")
            .status()?;
        if !status.success() {
            bail!("cargo build failed");
        }
        println!("   ({:.2} s)", started.elapsed().as_secs_f64());
        Ok(())
    };
    println!("\n== ferry toolchain upload: the toolchain goes to the scheduler, the worker prefetches it");
    ferry_cmd(&cache, &["toolchain", "upload"])?;
    until_a_worker_holds_the_toolchain(&ferry, &url, std::time::Duration::from_secs(120))?;
    ferry_cmd(&cache, &["toolchain", "list"])?;
    build("cold build: libraries compile on the worker", &cache)?;
    println!("\n== ferry stats (first machine)");
    ferry_cmd(&cache, &["stats"])?;
    ferry_cmd(&cache, &["status"])?;
    check_compiled_remotely(&ferry, &cache, &cluster)?;
    Command::new(env!("CARGO")).args(["clean", "-q"]).current_dir(&project).status()?;
    let fresh = tmp.path().join("cache-of-a-second-machine");
    build("after cargo clean, with an empty local cache (a teammate's machine): shared-tier hits", &fresh)?;
    let out = Command::new(project.join("target/debug/app")).output()?;
    println!("\n== the binary (from the shared cache) runs: {}", String::from_utf8_lossy(&out.stdout).trim());
    println!("\n== ferry stats (second machine)");
    ferry_cmd(&fresh, &["stats"])?;
    drop(cluster);
    println!("\n== stopped the worker and the scheduler");
    Ok(())
}

/// The demo's point is remote compiles: a cold build that had none is a failure, named.
fn check_compiled_remotely(ferry: &Path, cache: &Path, cluster: &LocalCluster) -> anyhow::Result<()> {
    let out = Command::new(ferry).args(["stats", "--json"]).env("FERRY_CACHE_DIR", cache).output()?;
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).context("reading ferry stats --json")?;
    let remote = stats["compiled_remote"].as_u64().unwrap_or(0);
    if remote > 0 {
        println!("\n== {remote} units compiled on the worker");
        return Ok(());
    }
    let fallbacks = stats["fallbacks"]
        .as_object()
        .map(|m| m.iter().map(|(reason, n)| format!("{reason} x{n}")).collect::<Vec<_>>().join(", "));
    let worker_log = std::fs::read_to_string(&cluster.worker_log).unwrap_or_default();
    let worker_errors: Vec<&str> =
        worker_log.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).rev().take(5).collect();
    bail!(
        "the cold build compiled nothing remotely; fallbacks: {}; the worker's last warnings ({}):\n{}",
        fallbacks.filter(|f| !f.is_empty()).unwrap_or_else(|| "none".into()),
        cluster.worker_log.display(),
        if worker_errors.is_empty() { "  (none)".to_owned() } else { worker_errors.join("\n") }
    )
}

/// Polls `ferry toolchain list` on the scheduler at `url` until a worker holds an uploaded
/// toolchain (there is one in the demo and the benchmark), for at most `limit`.
pub fn until_a_worker_holds_the_toolchain(ferry: &Path, url: &str, limit: std::time::Duration) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    loop {
        let list = Command::new(ferry).args(["toolchain", "list", "--json"]).env("FERRY_SCHEDULER", url).output()?;
        let list: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap_or_default();
        if list[0]["workers"].as_array().is_some_and(|w| !w.is_empty()) {
            return Ok(());
        }
        if started.elapsed() > limit {
            bail!("no worker holds the toolchain after {limit:?}: {list}");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A scheduler and one worker with 2 slots on loopback, from the release binaries, their data
/// dirs and logs under `dir` (which the sandbox's user must be able to traverse). Dropping it stops
/// the worker, then the scheduler.
struct LocalCluster {
    worker: Daemon,
    _scheduler: Daemon,
    url: String,
    worker_log: PathBuf,
}

impl LocalCluster {
    fn start(release: &Path, dir: &Path) -> anyhow::Result<LocalCluster> {
        let scheduler = Daemon::start(
            Command::new(release.join("ferry-scheduler"))
                .args(["--listen", "127.0.0.1:0", "--data-dir"])
                .arg(dir.join("scheduler")),
            &dir.join("scheduler.log"),
        )?;
        let url = format!("http://{}", scheduler.addr);
        let worker_log = dir.join("worker.log");
        let mut worker = Command::new(release.join("ferry-worker"));
        worker
            .args(["--scheduler", &url, "--slots", "2", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.join("worker"));
        // For A/B runs of the benchmarks: the worker's settings from a file (e.g. `[sandbox]
        // cgroups = false` or `disk_bytes = 0`).
        if let Some(config) = std::env::var_os("XTASK_WORKER_CONFIG") {
            worker.arg("--config").arg(config);
        }
        let worker = Daemon::start(&mut worker, &worker_log)?;
        Ok(LocalCluster { worker, _scheduler: scheduler, url, worker_log })
    }
}

/// A daemon started for the demo, stopped (SIGTERM, then waited for) when dropped.
struct Daemon {
    child: std::process::Child,
    addr: String,
}

impl Daemon {
    fn start(cmd: &mut Command, log: &Path) -> anyhow::Result<Daemon> {
        use std::io::BufRead;
        let mut child = cmd
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(log)?)
            .spawn()
            .with_context(|| format!("starting {:?}", cmd.get_program()))?;
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
        let Some(addr) = line.trim().strip_prefix("listening on ") else {
            let _ = child.kill();
            bail!("{:?} did not start: {}", cmd.get_program(), std::fs::read_to_string(log).unwrap_or_default());
        };
        Ok(Daemon { addr: addr.to_owned(), child })
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: signalling our own child process by pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}
