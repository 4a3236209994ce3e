//! The differential oracle: generated cargo workspaces and generated changes between builds, each
//! build done plainly and through ferry, and everything compared. A difference is a fault of
//! ferry's (a stale hit, an input left out of a key, a build that fails where plain cargo's
//! succeeds): the failing sequence is shrunk — steps removed while it still fails — and printed as
//! a bash script that reproduces it.
//!
//! Seeded and reproducible: sequence `i` of seed `S` is generated from `sequence_seed(S, i)` alone.
//! The test suite runs a fixed seed and budget (`tests/tests/it/oracle.rs`);
//! `cargo xtask difftest --seed S --sequences N --steps K` runs longer.
//!
//! The kinds of input it generates are in [`generate::Feature`], the changes in [`generate::Step`].

pub mod generate;
mod run;
pub mod script;

use std::path::PathBuf;
use std::time::{Duration, Instant};

pub use run::Place;

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    pub seed: u64,
    /// How many sequences (each a fresh workspace, cache and pair of target directories).
    pub sequences: usize,
    /// Builds per sequence.
    pub steps: usize,
    pub ferry: PathBuf,
    /// A directory the oracle may fill (one subdirectory per sequence, removed after).
    pub work: PathBuf,
    /// Shrink a failing sequence before reporting it (each try reruns builds).
    pub shrink: bool,
    /// At most this many runs while shrinking.
    pub shrink_runs: usize,
    /// Only this sequence (by index), when set.
    pub only: Option<usize>,
    /// Runs a scheduler and a worker (`ferry-scheduler` and `ferry-worker` beside `ferry`) for
    /// some sequences' ferry builds.
    pub cluster: bool,
}

/// What a run did.
#[derive(Debug, Default)]
pub struct Report {
    pub sequences: usize,
    pub builds: usize,
    pub steps: usize,
    pub hits: u64,
    pub misses: u64,
    pub findings: Vec<Finding>,
    pub elapsed: Duration,
}

/// A difference between a plain build and ferry's.
#[derive(Debug, Clone)]
pub struct Finding {
    pub seed: u64,
    pub sequence: usize,
    pub message: String,
    /// A bash script that reproduces it (shrunk when asked).
    pub script: String,
    /// Steps in the script after the workspace's setup.
    pub steps: usize,
}

/// The seed of sequence `i` of a run seeded `seed`.
pub fn sequence_seed(seed: u64, i: usize) -> u64 {
    generate::Rng::new(seed ^ (i as u64).wrapping_mul(0x2545_f491_4f6c_dd1d)).next_u64()
}

/// Runs the oracle; `progress` hears one line per sequence.
pub fn run(opts: &Options, progress: &mut dyn FnMut(&str)) -> Report {
    let start = Instant::now();
    let cluster = if opts.cluster { Cluster::start(&opts.ferry, progress) } else { None };
    let mut can = abilities();
    can.cluster = cluster.is_some();
    let place = |i: usize| Place {
        work: opts.work.join(format!("seq-{i}")),
        ferry: opts.ferry.clone(),
        path: std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into()),
        home: std::env::var("HOME").unwrap_or_else(|_| "/root".into()),
        cargo_home: std::env::var("CARGO_HOME")
            .unwrap_or_else(|_| format!("{}/.cargo", std::env::var("HOME").unwrap_or_default())),
        rustup_home: std::env::var("RUSTUP_HOME")
            .unwrap_or_else(|_| format!("{}/.rustup", std::env::var("HOME").unwrap_or_default())),
        root: can.root,
        scheduler: cluster.as_ref().map(|c| c.url.clone()),
    };
    let mut report = Report::default();
    for i in 0..opts.sequences {
        if opts.only.is_some_and(|only| only != i) {
            continue;
        }
        let mut rng = generate::Rng::new(sequence_seed(opts.seed, i));
        let seq = generate::sequence(&mut rng, opts.steps, &can);
        let here = place(i);
        let outcome = run::run(&here, &seq, seq.steps.len());
        report.sequences += 1;
        report.builds += outcome.builds;
        report.steps += outcome.steps.saturating_sub(seq.setup.len());
        report.hits += outcome.hits;
        report.misses += outcome.misses;
        let features: Vec<String> = seq.features.iter().map(|f| format!("{f:?}")).collect();
        progress(&format!(
            "sequence {i}: {} builds, {} hits, {} misses{}{} [{}]",
            outcome.builds,
            outcome.hits,
            outcome.misses,
            if seq.cluster { ", cluster" } else { "" },
            if outcome.finding.is_some() { ", DIFFERENCE" } else { "" },
            features.join(", ")
        ));
        if let Some((at, message)) = outcome.finding {
            let failing: Vec<generate::Step> = seq.steps[..at + 1 - seq.setup.len().min(at + 1)].to_vec();
            let steps = if opts.shrink { shrink(&here, &seq, failing, opts.shrink_runs, progress) } else { failing };
            let header = format!(
                "ferry differential oracle: seed {}, sequence {i} ({} steps after the setup)\nfound: {}",
                opts.seed,
                steps.len(),
                message.lines().next().unwrap_or_default()
            );
            report.findings.push(Finding {
                seed: opts.seed,
                sequence: i,
                message,
                script: script::render(&seq, &steps, &header),
                steps: steps.len(),
            });
        }
        let _ = std::fs::remove_dir_all(&here.work);
    }
    cleanup(&can);
    report.elapsed = start.elapsed();
    report
}

/// Removes steps one at a time (builds last) while the sequence still shows a difference.
fn shrink(
    place: &Place,
    seq: &generate::Sequence,
    mut steps: Vec<generate::Step>,
    budget: usize,
    progress: &mut dyn FnMut(&str),
) -> Vec<generate::Step> {
    let mut runs = 0;
    let fails = |steps: &[generate::Step], runs: &mut usize| {
        *runs += 1;
        let trial = generate::Sequence { steps: steps.to_vec(), ..seq.clone() };
        run::run(place, &trial, steps.len()).finding.is_some()
    };
    // Everything after the last build is noise.
    while steps.last().is_some_and(|s| !matches!(s, generate::Step::Build { .. })) {
        steps.pop();
    }
    for pass_builds in [false, true] {
        let mut i = steps.len();
        while i > 0 && runs < budget {
            i -= 1;
            let is_build = matches!(steps[i], generate::Step::Build { .. });
            if is_build != pass_builds || i + 1 == steps.len() {
                continue;
            }
            let mut fewer = steps.clone();
            fewer.remove(i);
            if fails(&fewer, &mut runs) {
                steps = fewer;
            }
        }
    }
    progress(&format!("shrunk to {} steps in {runs} runs", steps.len()));
    steps
}

/// What this machine lets the generator use.
fn abilities() -> generate::Abilities {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let sysroot = std::process::Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let home = std::env::var("RUSTUP_HOME")
        .unwrap_or_else(|_| format!("{}/.rustup", std::env::var("HOME").unwrap_or_default()));
    let nightly = std::fs::read_dir(format!("{home}/toolchains"))
        .ok()
        .and_then(|d| d.flatten().find(|e| e.file_name().to_string_lossy().starts_with("nightly")))
        .map(|_| "nightly".to_owned());
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let tag = format!("{}-{nanos}", std::process::id());
    generate::Abilities { root, other_toolchain: nightly, sysroot, tag, cluster: false }
}

/// Removes what the oracle placed under the sysroot.
fn cleanup(can: &generate::Abilities) {
    let _ = std::fs::remove_dir_all(format!("{}/share/ferry-oracle-{}", can.sysroot, can.tag));
}

/// A scheduler and one worker (2 slots) on loopback for the run, with the installed toolchain
/// uploaded and unpacked; stopped when dropped.
struct Cluster {
    _world: crate::World,
    url: String,
    _daemons: Vec<crate::Daemon>,
}

impl Cluster {
    fn start(ferry: &std::path::Path, progress: &mut dyn FnMut(&str)) -> Option<Cluster> {
        let dir = ferry.parent()?;
        let (scheduler, worker) = (dir.join("ferry-scheduler"), dir.join("ferry-worker"));
        if !scheduler.is_file() || !worker.is_file() {
            progress("no ferry-scheduler and ferry-worker beside ferry: every sequence runs without a cluster");
            return None;
        }
        let mut world = crate::World::new();
        let mut cmd = world.command(&scheduler);
        cmd.args(["--listen", "127.0.0.1:0", "--data-dir"]).arg(world.path().join("scheduler"));
        let sched = crate::Daemon::start(cmd, world.path().join("scheduler.log"));
        let url = sched.url();
        let mut cmd = world.command(&worker);
        cmd.args(["--scheduler", &url, "--listen", "127.0.0.1:0", "--slots", "2", "--data-dir"])
            .arg(world.path().join("worker"));
        let work = crate::Daemon::start(cmd, world.path().join("worker.log"));
        world.set("FERRY_SCHEDULER", &url);
        let upload = world.command(ferry).args(["toolchain", "upload", "--json"]).output().ok()?;
        let id: serde_json::Value = serde_json::from_slice(&upload.stdout).ok()?;
        let id = id["id"].as_str()?.to_owned();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(120) {
            let status = world.command(ferry).args(["status", "--json"]).output().ok();
            let status: serde_json::Value =
                status.and_then(|o| serde_json::from_slice(&o.stdout).ok()).unwrap_or_default();
            let holds =
                |w: &serde_json::Value| w["toolchains"].as_array().is_some_and(|t| t.iter().any(|t| t == id.as_str()));
            if status["workers"].as_array().is_some_and(|w| w.iter().any(holds)) {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        progress(&format!("cluster: scheduler {url}, one worker with toolchain {}", &id[..12.min(id.len())]));
        Some(Cluster { _world: world, url, _daemons: vec![work, sched] })
    }
}
