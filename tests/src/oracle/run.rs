//! Running a generated sequence for real: the workspace on disk, each step applied, and every
//! build done twice — plainly and through ferry — into two target directories that take turns at
//! the same path (outputs hold absolute paths, so both builds must happen in one place), then
//! compared: the build's outcome and diagnostics, every file under `target/debug` byte for byte
//! (and its executable bit), files a proc-macro wrote beside the workspace, and what the program
//! prints.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::generate::{Mount, Sequence, Step};

/// Where one run of a sequence happens, and what the machine gives it.
#[derive(Debug, Clone)]
pub struct Place {
    /// An empty directory of the run's own.
    pub work: PathBuf,
    pub ferry: PathBuf,
    /// `PATH`, `HOME`, `CARGO_HOME` and `RUSTUP_HOME` as the builds start with them.
    pub path: String,
    pub home: String,
    pub cargo_home: String,
    pub rustup_home: String,
    pub root: bool,
    /// The scheduler's URL, when the run has a cluster.
    pub scheduler: Option<String>,
}

/// How far a sequence got.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    /// Compared builds.
    pub builds: usize,
    /// Steps applied (builds included).
    pub steps: usize,
    /// Hits and misses ferry counted.
    pub hits: u64,
    pub misses: u64,
    /// The first difference, and the index of the step (in `setup ++ steps`) that showed it.
    pub finding: Option<(usize, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Plain,
    Ferry,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Plain => "plain",
            Side::Ferry => "ferry",
        }
    }
}

/// What one build left to compare.
#[derive(Debug, Default)]
struct Built {
    success: bool,
    /// Rendered diagnostics (cargo's JSON messages), sorted.
    diagnostics: Vec<String>,
    /// Files a proc-macro wrote beside the workspace (`side/`), by name.
    side: BTreeMap<String, Vec<u8>>,
    /// The tail of cargo's own output, for a finding's message.
    log: String,
}

struct Runner<'a> {
    place: &'a Place,
    seq: &'a Sequence,
    /// Where the checkout is now (it moves on `Relocate`).
    project: PathBuf,
    other: PathBuf,
    basedirs: bool,
    toolchain: Option<String>,
    filler: Option<usize>,
    cache: PathBuf,
    mounted: bool,
    env: BTreeMap<String, Option<String>>,
}

/// Runs a sequence (its setup, then at most `limit` of its steps) in a fresh world under
/// `place.work`, stopping at the first difference.
pub fn run(place: &Place, seq: &Sequence, limit: usize) -> Outcome {
    let _ = fs::remove_dir_all(&place.work);
    fs::create_dir_all(&place.work).expect("work dir");
    for d in [
        "home-a",
        "home-b",
        "tmp-a",
        "tmp-b",
        "bin-a",
        "cargo-home-b",
        "targets/plain",
        "targets/ferry",
        "sides/plain",
        "sides/ferry",
        "cache",
    ] {
        fs::create_dir_all(place.work.join(d)).expect("work dirs");
    }
    fs::write(place.work.join("ferry.toml"), "").expect("config");
    let mut r = Runner {
        place,
        seq,
        project: place.work.join("a/ws"),
        other: place.work.join("b/elsewhere/checkout"),
        basedirs: false,
        toolchain: None,
        filler: None,
        cache: place.work.join("cache"),
        mounted: false,
        env: BTreeMap::new(),
    };
    fs::create_dir_all(&r.project).expect("checkout");
    if place.root {
        r.mounted = mount(&r.cache, "size=2g,mode=0755");
    }
    let mut outcome = Outcome::default();
    let all: Vec<&Step> = seq.setup.iter().chain(seq.steps.iter().take(limit)).collect();
    for (i, step) in all.iter().enumerate() {
        outcome.steps += 1;
        if let Err(finding) = r.step(step, &mut outcome) {
            outcome.finding = Some((i, finding));
            break;
        }
    }
    let stats = r.ferry_stats();
    outcome.hits = stats.0;
    outcome.misses = stats.1;
    if stats.2 > 0 && outcome.finding.is_none() {
        let explained = Command::new(&place.ferry)
            .args(["explain", "--mismatches", "--list"])
            .env("FERRY_CACHE_DIR", &r.cache)
            .env("FERRY_CONFIG", place.work.join("ferry.toml"))
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let what = format!("verification reported {} mismatch(es):\n{explained}", stats.2);
        outcome.finding = Some((all.len().saturating_sub(1), what));
    }
    r.finish();
    outcome
}

impl Runner<'_> {
    fn step(&mut self, step: &Step, outcome: &mut Outcome) -> Result<(), String> {
        match step {
            Step::Write { path, content, keep_mtime } => {
                let p = self.path(path);
                let before = keep_mtime.then(|| fs::metadata(&p).ok()).flatten();
                if let Some(parent) = p.parent() {
                    fs::create_dir_all(parent).map_err(|e| format!("setup: mkdir {}: {e}", parent.display()))?;
                }
                if fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_symlink()) {
                    let _ = fs::remove_file(&p);
                }
                fs::write(&p, content).map_err(|e| format!("setup: write {}: {e}", p.display()))?;
                if let Some(before) = before {
                    let mtime = before.modified().expect("mtime");
                    let file = fs::File::options().write(true).open(&p).expect("reopen");
                    file.set_modified(mtime).expect("put the mtime back");
                }
            }
            Step::Chmod { path, executable } => {
                let p = self.path(path);
                let mode = if *executable { 0o755 } else { 0o644 };
                let _ = fs::set_permissions(&p, fs::Permissions::from_mode(mode));
            }
            Step::Remove { path } => {
                let _ = fs::remove_file(self.path(path));
            }
            Step::Link { path, target } => {
                let p = self.path(path);
                let _ = fs::remove_file(&p);
                if let Some(parent) = p.parent() {
                    let _ = fs::create_dir_all(parent);
                }
                std::os::unix::fs::symlink(target, &p).map_err(|e| format!("setup: symlink {}: {e}", p.display()))?;
            }
            Step::Rename { from, to } => {
                let _ = fs::rename(self.path(from), self.path(to));
            }
            Step::Touch { path } => {
                let p = self.path(path);
                if let Ok(f) = fs::File::options().write(true).open(&p) {
                    let _ = f.set_modified(std::time::SystemTime::now());
                }
            }
            Step::Cc { source, output } => {
                let out = Command::new("cc")
                    .args(["-shared", "-fPIC", "-o"])
                    .arg(self.path(output))
                    .arg(self.path(source))
                    .output()
                    .map_err(|e| format!("setup: cc: {e}"))?;
                if !out.status.success() {
                    return Err(format!("setup: cc failed: {}", String::from_utf8_lossy(&out.stderr)));
                }
            }
            Step::SetEnv { name, value } => {
                self.env.insert(name.clone(), value.clone());
            }
            Step::Toolchain(t) => self.toolchain = t.clone(),
            Step::Clean => {
                for side in ["plain", "ferry"] {
                    let t = self.place.work.join("targets").join(side);
                    let _ = fs::remove_dir_all(&t);
                    fs::create_dir_all(&t).expect("target dir");
                }
            }
            Step::Relocate => {
                if let Some(parent) = self.other.parent() {
                    fs::create_dir_all(parent).expect("mkdir");
                }
                fs::rename(&self.project, &self.other).map_err(|e| format!("setup: relocate: {e}"))?;
                std::mem::swap(&mut self.project, &mut self.other);
                self.basedirs = true;
            }
            Step::Mount(how) => {
                if self.mounted {
                    self.remount(*how);
                }
            }
            Step::ExecLimit(room) => self.filler = *room,
            Step::EditDuringBuild { path, content, delay_ms } => {
                let p = self.path(path);
                let content = content.clone();
                let delay = Duration::from_millis(*delay_ms);
                let editor = std::thread::spawn(move || {
                    std::thread::sleep(delay);
                    let _ = fs::write(&p, content);
                });
                let _ = self.build(Side::Ferry, None);
                let _ = editor.join();
            }
            Step::Build { twice } => {
                outcome.builds += 1;
                let plain = self.build(Side::Plain, None);
                let ferry = if *twice { self.build_twice() } else { self.build(Side::Ferry, None) };
                self.compare(&plain, &ferry)?;
            }
        }
        Ok(())
    }

    /// A step's path: absolute as given, else in the checkout.
    fn path(&self, p: &str) -> PathBuf {
        if p.starts_with('/') { PathBuf::from(p) } else { self.project.join(p) }
    }

    fn fill(&self, value: &str) -> String {
        value
            .replace("{work}", &self.place.work.to_string_lossy())
            .replace("{path}", &self.place.path)
            .replace("{cargo_home}", &self.place.cargo_home)
    }

    /// The environment of a build: nothing inherited from the test, the model's variables, and
    /// for ferry its own.
    fn command(&self, side: Side, project: &Path, target: Option<&Path>) -> Command {
        let mut cmd = Command::new("cargo");
        cmd.args(["build", "--offline", "--message-format=json"]).current_dir(project).env_clear();
        cmd.env("PATH", &self.place.path)
            .env("HOME", &self.place.home)
            .env("CARGO_HOME", &self.place.cargo_home)
            .env("RUSTUP_HOME", &self.place.rustup_home)
            .env("CARGO_INCREMENTAL", "0");
        if let Some(t) = &self.toolchain {
            cmd.env("RUSTUP_TOOLCHAIN", t);
        }
        if let Some(t) = target {
            cmd.env("CARGO_TARGET_DIR", t);
        }
        if self.basedirs {
            // What sharing across checkouts needs: paths in outputs remapped (both builds).
            cmd.env("RUSTFLAGS", format!("--remap-path-prefix={}=/checkout", project.display()));
        }
        for (name, value) in &self.env {
            match value {
                Some(v) => cmd.env(name, self.fill(v)),
                None => cmd.env_remove(name),
            };
        }
        if let Some(room) = self.filler {
            for (name, value) in filler(room, &cmd) {
                cmd.env(name, value);
            }
        }
        // Compiler links first in PATH, on both sides under one name: ferry's (`ferry setup`, as
        // the README sets cargo up, so build scripts' C compiles go through ferry) or links to
        // the compilers themselves. A program that reads PATH sees the same value either way.
        let links = self.place.work.join("cc-bin");
        self.point_compiler_links(side, &links);
        let path = cmd.get_envs().filter(|(k, _)| *k == "PATH").last().and_then(|(_, v)| v.map(|v| v.to_owned()));
        if let Some(path) = path {
            let mut with_links = links.into_os_string();
            with_links.push(":");
            with_links.push(path);
            cmd.env("PATH", with_links);
        }
        if side == Side::Ferry {
            cmd.env("RUSTC_WRAPPER", &self.place.ferry)
                .env("FERRY_CACHE_DIR", &self.cache)
                .env("FERRY_CONFIG", self.place.work.join("ferry.toml"))
                .env("FERRY_LOG", "info");
            if self.basedirs {
                cmd.env("FERRY_BASEDIRS", project);
            }
            if self.seq.cache_failures {
                cmd.env("FERRY_CACHE_FAILURES", "1");
            }
            if self.seq.verify {
                cmd.env("FERRY_VERIFY", "1");
            }
            if let Some(url) = self.place.scheduler.as_ref().filter(|_| self.seq.cluster) {
                cmd.env("FERRY_SCHEDULER", url);
            }
        }
        cmd
    }

    /// Makes `links` hold `cc`, `c++`, `gcc`, `g++`, `clang`, `clang++` (those installed) for
    /// `side`: ferry's masquerade links, or links to the compilers. Left alone when they already
    /// are (`.side` says): two builds of one side may run at once.
    fn point_compiler_links(&self, side: Side, links: &Path) {
        let marker = links.join(".side");
        if fs::read_to_string(&marker).is_ok_and(|s| s == side.name()) {
            return;
        }
        let _ = fs::remove_dir_all(links);
        if side == Side::Ferry {
            let setup = Command::new(&self.place.ferry).args(["setup", "--dir"]).arg(links).output();
            assert!(setup.is_ok_and(|o| o.status.success()), "ferry setup failed");
        } else {
            fs::create_dir_all(links).expect("mkdir compiler links");
            for name in ferry_cache::cc::COMPILER_NAMES {
                let found = std::env::split_paths(&self.place.path).map(|d| d.join(name)).find(|p| p.is_file());
                if let Some(compiler) = found {
                    std::os::unix::fs::symlink(compiler, links.join(name)).expect("link a compiler");
                }
            }
        }
        fs::write(marker, side.name()).expect("write the links' side");
    }

    /// One build of the checkout, in this side's target directory and side-file directory
    /// (moved into place for it: what the side's earlier builds left there).
    fn build(&self, side: Side, concurrent: Option<&dyn Fn()>) -> Built {
        let stash = self.place.work.join("targets").join(side.name());
        let target = self.project.join("target");
        let _ = fs::remove_dir_all(&target);
        fs::rename(&stash, &target).expect("target dir into place");
        let side_stash = self.place.work.join("sides").join(side.name());
        let _ = fs::remove_dir_all(self.project.join("side"));
        let _ = fs::rename(&side_stash, self.project.join("side"));
        let child = self.command(side, &self.project, None).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn();
        if let Some(other) = concurrent {
            other();
        }
        let waited = child.and_then(|c| c.wait_with_output());
        if side == Side::Ferry {
            // ferry's detached work (stores, verification) reads the build's files: let it end
            // before the target directory moves away.
            self.wait_for_ferry();
        }
        let built = match waited {
            Ok(out) => {
                let mut diagnostics: Vec<String> = String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                    .filter(|v| v["reason"] == "compiler-message")
                    .filter_map(|v| v["message"]["rendered"].as_str().map(str::to_owned))
                    .collect();
                diagnostics.sort();
                let stderr = String::from_utf8_lossy(&out.stderr);
                let log =
                    stderr.lines().rev().take(12).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
                Built { success: out.status.success(), diagnostics, side: read_side(&self.project), log }
            }
            Err(e) => Built { log: format!("cargo did not run: {e}"), ..Built::default() },
        };
        if fs::rename(self.project.join("side"), &side_stash).is_err() {
            let _ = fs::create_dir_all(&side_stash);
        }
        fs::rename(&target, &stash).expect("target dir back");
        built
    }

    /// A ferry build while a second one of a copy of the checkout runs against the same cache.
    fn build_twice(&self) -> Built {
        let twin = self.place.work.join("twin");
        let _ = fs::remove_dir_all(&twin);
        let copied = Command::new("cp").arg("-a").arg(&self.project).arg(&twin).status();
        if !copied.is_ok_and(|s| s.success()) {
            return self.build(Side::Ferry, None);
        }
        let _ = fs::remove_dir_all(twin.join("target"));
        let mut cmd = self.command(Side::Ferry, &twin, Some(&twin.join("target")));
        let second = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn();
        let built = self.build(Side::Ferry, None);
        if let Ok(mut c) = second {
            let _ = c.wait();
        }
        built
    }

    fn compare(&self, plain: &Built, ferry: &Built) -> Result<(), String> {
        if plain.success != ferry.success {
            return Err(format!(
                "the plain build {} and the ferry build {}\n--- plain:\n{}\n--- ferry:\n{}",
                verb(plain.success),
                verb(ferry.success),
                plain.log,
                ferry.log
            ));
        }
        if plain.diagnostics != ferry.diagnostics {
            return Err(format!(
                "the diagnostics differ\n--- plain:\n{}\n--- ferry:\n{}",
                plain.diagnostics.join("\n"),
                ferry.diagnostics.join("\n")
            ));
        }
        if plain.side != ferry.side {
            return Err(format!(
                "the files written beside the workspace differ: plain {:?}, ferry {:?}",
                plain.side.keys().collect::<Vec<_>>(),
                ferry.side.keys().collect::<Vec<_>>()
            ));
        }
        let targets = self.place.work.join("targets");
        let (a, b) = (targets.join("plain/debug"), targets.join("ferry/debug"));
        let (fa, fb) = (tree(&a), tree(&b));
        for (rel, x) in &fa {
            match fb.get(rel) {
                None => return Err(format!("target/debug/{rel} exists only after the plain build")),
                Some(y) if y != x => return Err(format!("target/debug/{rel} differs")),
                Some(_) => {}
            }
        }
        if let Some(rel) = fb.keys().find(|k| !fa.contains_key(*k)) {
            return Err(format!("target/debug/{rel} exists only after the ferry build"));
        }
        if plain.success {
            let (ra, rb) = (self.run_app(&a), self.run_app(&b));
            if ra != rb {
                return Err(format!("the program prints\n{}\nbuilt plainly, but\n{}\nbuilt through ferry", ra, rb));
            }
        }
        Ok(())
    }

    fn run_app(&self, debug: &Path) -> String {
        match Command::new(debug.join("app")).env_clear().output() {
            Ok(out) => format!("{}{}", String::from_utf8_lossy(&out.stdout), out.status),
            Err(e) => format!("cannot run: {e}"),
        }
    }

    fn remount(&self, how: Mount) {
        let filler = self.cache.join(".oracle-filler");
        let opts = match how {
            Mount::Normal | Mount::Full => "remount,rw,exec",
            Mount::Noexec => "remount,rw,noexec",
            Mount::ReadOnly => "remount,ro,exec",
        };
        if how != Mount::ReadOnly {
            let _ = Command::new("mount").args(["-o", "remount,rw"]).arg(&self.cache).status();
            let _ = fs::remove_file(&filler);
        }
        let _ = Command::new("mount").args(["-o", opts]).arg(&self.cache).status();
        if how == Mount::Full
            && let Ok(mut f) = fs::File::create(&filler)
        {
            let chunk = vec![0u8; 1 << 20];
            while f.write_all(&chunk).is_ok() {}
        }
    }

    /// Waits for ferry's detached work (`ferry stats` takes the publishing lock).
    fn wait_for_ferry(&self) {
        let _ = Command::new(&self.place.ferry)
            .args(["stats", "--json"])
            .env("FERRY_CACHE_DIR", &self.cache)
            .env("FERRY_CONFIG", self.place.work.join("ferry.toml"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    /// (hits, misses, verify mismatches) as `ferry stats` counts them.
    fn ferry_stats(&self) -> (u64, u64, u64) {
        if self.mounted {
            self.remount(Mount::Normal);
        }
        let out = Command::new(&self.place.ferry)
            .args(["stats", "--json"])
            .env("FERRY_CACHE_DIR", &self.cache)
            .env("FERRY_CONFIG", self.place.work.join("ferry.toml"))
            .output();
        let v: serde_json::Value =
            out.ok().and_then(|o| serde_json::from_slice(&o.stdout).ok()).unwrap_or(serde_json::Value::Null);
        let n = |k: &str| v[k].as_u64().unwrap_or(0);
        (n("hits_local") + n("hits_remote"), n("misses"), n("verify_mismatches"))
    }

    fn finish(&self) {
        if self.mounted {
            let _ = Command::new("umount").arg("-l").arg(&self.cache).status();
        }
    }
}

fn verb(success: bool) -> &'static str {
    if success { "succeeded" } else { "failed" }
}

fn mount(dir: &Path, opts: &str) -> bool {
    Command::new("mount")
        .args(["-t", "tmpfs", "-o", opts, "ferry-oracle"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Variables that bring a command's environment to `room` bytes below the exec limit (each at
/// most 100 000 bytes: one string may not exceed 128 KiB).
fn filler(room: usize, cmd: &Command) -> Vec<(String, String)> {
    // SAFETY: sysconf has no preconditions.
    let limit = unsafe { libc::sysconf(libc::_SC_ARG_MAX) }.max(0) as usize;
    let used: usize = cmd.get_envs().filter_map(|(k, v)| v.map(|v| k.len() + v.len() + 2 + 8)).sum::<usize>() + 4096;
    let mut left = limit.saturating_sub(used + room);
    let mut out = Vec::new();
    let mut i = 0;
    while left > 64 {
        let name = format!("ORACLE_FILL_{i}");
        let size = left.min(100_000).saturating_sub(name.len() + 2 + 8);
        out.push((name, "x".repeat(size)));
        left = left.saturating_sub(size + 24 + 8);
        i += 1;
    }
    out
}

/// Every file under `dir` (relative path → content, executable bit, link target), leaving out
/// cargo's bookkeeping: `.fingerprint`, `incremental`, `.cargo-lock`, `invoked.timestamp`.
fn tree(dir: &Path) -> BTreeMap<String, (Vec<u8>, bool)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if matches!(name.as_str(), ".fingerprint" | "incremental" | ".cargo-lock" | "invoked.timestamp") {
                continue;
            }
            let rel = p.strip_prefix(dir).map(|r| r.to_string_lossy().into_owned()).unwrap_or_default();
            let Ok(meta) = fs::symlink_metadata(&p) else { continue };
            if meta.file_type().is_symlink() {
                let target = fs::read_link(&p).map(|t| t.to_string_lossy().into_owned()).unwrap_or_default();
                out.insert(rel, (format!("-> {target}").into_bytes(), false));
            } else if meta.is_dir() {
                stack.push(p);
            } else {
                let bytes = fs::read(&p).unwrap_or_default();
                out.insert(rel, (bytes, meta.permissions().mode() & 0o111 != 0));
            }
        }
    }
    out
}

fn read_side(project: &Path) -> BTreeMap<String, Vec<u8>> {
    let Ok(entries) = fs::read_dir(project.join("side")) else { return BTreeMap::new() };
    entries
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().into_owned(), fs::read(e.path()).unwrap_or_default()))
        .collect()
}
