//! Step 2, identify: which toolchain, which driver, and what runs on a miss.
//!
//! - The **toolchain** (ToolchainId) comes from rustc: the program cargo named, or with a workspace
//!   wrapper the rustc cargo gave the wrapper.
//! - The **driver** is the program that really runs: `rustc` when that is the toolchain's own
//!   rustc; otherwise (clippy-driver, a custom driver, a workspace wrapper) its file name and
//!   content digest, so another driver never gets rustc's entries.
//! - What **runs on a miss** is what cargo named, with one change: a rustup proxy is replaced by
//!   the toolchain's own binary it would run. The proxy reads rustup's settings and toolchain
//!   files, which are this machine's business, not the compile's: observing them would key
//!   entries by them.
//! - `-C target-cpu=native` is resolved to this machine's CPU and features
//!   (`rustc --print target-cpus`, `--print cfg`), remembered per toolchain and CPU.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use ferry_toolchains::{
    Compiler, Error as ToolchainError, LocalStore, ToolchainId, is_rustup_proxy, resolve_compiler_with,
};

use super::Job;
use crate::process;
use crate::reason::Fallback;

/// Who compiles, as the key and the miss need it.
#[derive(Debug, Clone)]
pub struct Identity {
    pub id: ToolchainId,
    /// A Rust toolchain's files (None for a C-family compiler: see [`super::cc`]).
    pub rust: Option<RustToolchain>,
    /// `rustc`, or `<file name> blake3:<digest>` of the driver.
    pub driver: String,
    /// The program a miss runs, and the arguments before rustc's own.
    pub program: PathBuf,
    pub prefix: Vec<OsString>,
    /// What `-C target-cpu=native` means here, when given.
    pub native_cpu: Option<String>,
}

/// A Rust toolchain, as the key and a remote job need it.
#[derive(Debug, Clone)]
pub struct RustToolchain {
    pub compiler: Compiler,
    /// The toolchain's host triple and the other targets its ToolchainId covers (what
    /// [`ferry_cache::rustc::ToolchainFiles`] leaves out of keys).
    pub host: String,
    pub targets: Vec<String>,
}

impl Identity {
    /// Only the toolchain's own rustc, without a wrapper, runs on workers.
    pub fn is_plain_rustc(&self) -> bool {
        self.driver == "rustc"
    }
}

impl Job {
    pub(super) fn identify(&mut self) -> Result<Identity, Fallback> {
        match &self.unit {
            super::Unit::Rustc(rustc) => {
                let (target, native) = (rustc.target.clone(), rustc.native_cpu);
                self.identify_rustc(target, native)
            }
            super::Unit::Cc(cc) => {
                let native = cc.native_cpu;
                self.identify_cc(native)
            }
        }
    }

    fn identify_rustc(&mut self, target: Option<String>, native: bool) -> Result<Identity, Fallback> {
        let inv = &self.invocation;
        let rustc_path = inv.inner.as_deref().unwrap_or(&inv.program).to_owned();
        let mut compiler = resolve_compiler_with(&rustc_path, inv.plus.as_deref(), &self.cwd, process::output)
            .map_err(|e| {
                tracing::warn!(error = %e, "cannot resolve the toolchain");
                Fallback::ToolchainUnresolved
            })?;
        // A driver of the toolchain named as the compiler (`RUSTC=.../bin/clippy-driver`): the
        // toolchain is its directory's; rustc is the toolchain's own.
        let own_rustc = compiler.root.join("bin/rustc");
        if compiler.rustc != own_rustc && own_rustc.is_file() {
            compiler.rustc = own_rustc;
        }
        let toolchains =
            LocalStore::open(&self.config.cache_dir).map(|s| s.with_spawn(process::output)).map_err(|e| {
                tracing::warn!(error = %e, "toolchain store unavailable");
                Fallback::ToolchainStore
            })?;
        let targets: Vec<String> = target.iter().cloned().collect();
        let (id, host, targets) = match toolchains.identify(&compiler, &targets) {
            Ok(identified) => {
                let host = identified.probe.host;
                let others = identified.targets.into_iter().filter(|t| *t != host).collect();
                (identified.id, host, others)
            }
            Err(ToolchainError::UnknownTarget { .. }) => return Err(Fallback::TargetNotInstalled),
            Err(e) => {
                tracing::warn!(error = %e, "cannot identify the toolchain");
                return Err(Fallback::ToolchainIdentify);
            }
        };
        let (program, prefix) = match &inv.inner {
            // A workspace wrapper runs in front of rustc: it is the driver; a rustup proxy it was
            // given becomes the toolchain's rustc.
            Some(inner) => {
                let inner = if find(inner).is_some_and(|p| is_rustup_proxy(&p)) {
                    compiler.rustc.clone()
                } else {
                    inner.clone()
                };
                (inv.program.clone(), vec![inner.into_os_string()])
            }
            None => (self.direct_program(&compiler), Vec::new()),
        };
        let driver = self.driver_identity(&compiler, &program)?;
        tracing::debug!(program = %program.display(), rustc = %compiler.rustc.display(), %driver, "identified");
        let native_cpu = if native { Some(native_cpu(&self.config.cache_dir, &compiler, &id, &target)) } else { None };
        let rust = Some(RustToolchain { compiler, host, targets });
        Ok(Identity { id, rust, driver, program, prefix, native_cpu })
    }

    /// The binary cargo's program stands for: itself, or for a rustup proxy the toolchain's binary
    /// of the same name (`clippy-driver`, `rustc`).
    fn direct_program(&self, compiler: &Compiler) -> PathBuf {
        let Some(found) = find(&self.invocation.program) else { return self.invocation.program.clone() };
        if !is_rustup_proxy(&found) {
            return found;
        }
        let name = found.file_name().map(PathBuf::from).unwrap_or_else(|| "rustc".into());
        let own = compiler.root.join("bin").join(name);
        if own.is_file() { own } else { compiler.rustc.clone() }
    }

    fn driver_identity(&self, compiler: &Compiler, program: &Path) -> Result<String, Fallback> {
        let found = find(program).ok_or(Fallback::ToolchainUnresolved)?;
        let canonical = fs::canonicalize(&found).unwrap_or(found);
        if canonical == compiler.rustc && self.invocation.inner.is_none() {
            return Ok("rustc".into());
        }
        let meta = fs::metadata(&canonical).map_err(|_| Fallback::ToolchainUnresolved)?;
        let digest = crate::digests::digest(&canonical, &meta).ok_or(Fallback::ToolchainUnresolved)?;
        let name = canonical.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        Ok(format!("{name} blake3:{}", blake3::Hash::from_bytes(digest).to_hex()))
    }
}

/// A program named as cargo names it (a path, or a bare name searched in `PATH`).
fn find(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return program.is_file().then(|| program.to_owned());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(program)).find(|p| p.is_file())
}

/// This machine's CPU as `/proc/cpuinfo` describes it: its model name and feature flags (x86),
/// or features and part number (Arm), for the first CPU.
pub(super) fn this_cpu() -> String {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    cpuinfo
        .lines()
        .filter(|l| {
            l.starts_with("model name")
                || l.starts_with("flags")
                || l.starts_with("Features")
                || l.starts_with("CPU part")
        })
        .take(4)
        .collect::<Vec<_>>()
        .join("\n")
}

/// `cpu=<name> features=<+a,+b,...>` for `-C target-cpu=native` on this machine, remembered in
/// `<cache dir>/native/` by toolchain and CPU (a cache dir shared between machines, on NFS say,
/// sees each machine's CPU under its own name). Unknown parts read `unknown`, which still differs
/// from every concrete CPU's key.
fn native_cpu(cache_dir: &Path, compiler: &Compiler, id: &ToolchainId, target: &Option<String>) -> String {
    let this_cpu = this_cpu();
    let memo = cache_dir.join("native").join(format!(
        "{}-{}-{}",
        &id.to_hex()[..16],
        &blake3::hash(this_cpu.as_bytes()).to_hex()[..16],
        target.as_deref().unwrap_or("host")
    ));
    if let Ok(known) = fs::read_to_string(&memo) {
        return known;
    }
    let rustc = |extra: &[&str]| {
        let mut cmd = Command::new(&compiler.rustc);
        cmd.args(extra).env_remove("RUSTC_WRAPPER");
        if let Some(t) = target {
            cmd.args(["--target", t]);
        }
        process::output(&mut cmd)
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let cpu = rustc(&["--print", "target-cpus"])
        .and_then(|text| {
            let line = text.lines().find(|l| l.trim_start().starts_with("native"))?.to_owned();
            let start = line.find("(currently ")? + "(currently ".len();
            let end = line[start..].find(')')? + start;
            Some(line[start..end].to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let features = rustc(&["-C", "target-cpu=native", "--print", "cfg"])
        .map(|text| {
            let mut f: Vec<&str> = text
                .lines()
                .filter_map(|l| l.strip_prefix("target_feature=\"").and_then(|v| v.strip_suffix('"')))
                .collect();
            f.sort();
            f.join(",")
        })
        .unwrap_or_else(|| "unknown".into());
    let answer = format!("cpu={cpu} features={features}");
    if cpu != "unknown" && features != "unknown" {
        let _ = fs::create_dir_all(memo.parent().unwrap_or(cache_dir));
        let _ = ferry_cache::write_replacing(&memo, answer.as_bytes(), 0o644);
    }
    answer
}
