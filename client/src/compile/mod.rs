//! The compiler wrapper: `ferry [DRIVER] /path/to/rustc ARGS...`, or for C and C++
//! `ferry gcc|clang|cc|/path/to/compiler ARGS...` (and a link named after a compiler: [`cc`]).
//! Each call is one walk, the same for both kinds of [`Unit`], a room per step:
//!
//! 1. **classify** ([`wrap`]): the command line (`ferry_cache::rustc::classify`,
//!    `ferry_cache::cc::classify`); a pass-through `exec`s the real compiler (one process spawn,
//!    nothing else).
//! 2. **identify** ([`identity`]): which toolchain (weak-key map → ToolchainId), which driver really
//!    runs (rustc, clippy-driver, a workspace wrapper), what `-C target-cpu=native` means here.
//! 3. **key** ([`keys`]): the pre-key and the manifest scope; a manifest's listed inputs, read from
//!    this machine now, give a result key.
//! 4. **look up** ([`lookup`]): the local tier, then the shared tier (verified, promoted); a hit is
//!    replayed ([`replay`]) without running any compiler.
//! 5. **run** ([`run`], [`remote`]): on a miss, on a worker when the compile is distributable,
//!    else locally; either way the compile is *observed* (`ferry-observe`): what it read, looked
//!    for, listed, ran and looked up becomes its manifest.
//! 6. **store** ([`store`]): the result and its manifest into the local tier, and into the shared
//!    tier when this client may write it.
//!
//! Every infrastructure problem turns into a plain compile with a counted [`Fallback`]; the
//! wrapper never writes to the build's stdout/stderr anything the compiler did not write.

pub mod cc;
mod identity;
mod keys;
mod lookup;
pub mod remote;
mod replay;
mod run;
mod store;
mod verify;

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use ferry_cache::DiskStore;
use ferry_cache::cc::CcArgs;
use ferry_cache::rustc::{Classified, RustcArgs, classify};

use crate::config::Config;
use crate::phases::Phases;
use crate::process;
use crate::reason::Fallback;
use crate::stats::Stats;

pub use keys::Keys;
pub use store::wait_for_publishers;
pub use verify::mismatches;

/// What cargo asked the wrapper to run.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// The first program cargo named: rustc itself, or a workspace wrapper (`RUSTC_WORKSPACE_WRAPPER`)
    /// or driver (`RUSTC=clippy-driver`). A pass-through or a fallback runs exactly this.
    pub program: PathBuf,
    /// With a workspace wrapper: the rustc cargo gave it (cargo runs `WRAPPER RUSTC ARGS...`).
    pub inner: Option<PathBuf>,
    /// A `+toolchain` argument (for a rustup proxy).
    pub plus: Option<String>,
    /// rustc's arguments.
    pub rest: Vec<OsString>,
}

impl Invocation {
    /// Splits `[program, [inner rustc], [+toolchain], args...]`.
    pub fn parse(args: &[OsString]) -> Invocation {
        let program = PathBuf::from(&args[0]);
        let mut rest = &args[1..];
        let inner = rest.first().filter(|a| names_rustc(a)).map(PathBuf::from);
        if inner.is_some() {
            rest = &rest[1..];
        }
        let plus = rest.first().and_then(|a| a.to_str()).and_then(|a| a.strip_prefix('+')).map(str::to_owned);
        if plus.is_some() {
            rest = &rest[1..];
        }
        Invocation { program, inner, plus, rest: rest.to_vec() }
    }

    /// Everything after the program, as cargo gave it.
    pub fn original_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = self.inner.iter().map(|p| p.clone().into_os_string()).collect();
        args.extend(self.plus.iter().map(|p| OsString::from(format!("+{p}"))));
        args.extend(self.rest.iter().cloned());
        args
    }
}

/// What one cacheable call compiles.
#[derive(Debug, Clone)]
pub enum Unit {
    /// A crate, by rustc.
    Rustc(Box<RustcArgs>),
    /// One C, C++, Objective-C or assembler source, by gcc or clang.
    Cc(Box<CcArgs>),
}

impl Unit {
    /// The crate's name, or the source file as given: for logs and `ferry explain --crate`.
    pub fn name(&self) -> &str {
        match self {
            Unit::Rustc(r) => &r.crate_name,
            Unit::Cc(c) => c.name(),
        }
    }

    /// The compiler's arguments as given.
    pub fn args(&self) -> &[String] {
        match self {
            Unit::Rustc(r) => &r.args,
            Unit::Cc(c) => &c.args,
        }
    }

    /// The outputs known before compiling, `(path as given, executable)`, sorted.
    pub fn outputs(&self) -> Vec<(String, bool)> {
        match self {
            Unit::Rustc(r) => r.outputs(),
            Unit::Cc(c) => c.outputs(),
        }
    }

    /// The file whose content scopes the manifests: the crate root, or the source.
    pub fn root(&self) -> &str {
        match self {
            Unit::Rustc(r) => &r.input,
            Unit::Cc(c) => &c.source,
        }
    }

    pub fn rustc(&self) -> Option<&RustcArgs> {
        match self {
            Unit::Rustc(r) => Some(r),
            Unit::Cc(_) => None,
        }
    }

    /// The language, as `ferry stats` counts hits and misses: `rust`, `c`, `c++`, …
    pub fn language(&self) -> &'static str {
        match self {
            Unit::Rustc(_) => "rust",
            Unit::Cc(c) => c.language.as_str(),
        }
    }
}

/// Is this argument the rustc cargo hands a workspace wrapper (a path or name ending in `rustc`),
/// rather than rustc's first argument?
fn names_rustc(arg: &OsString) -> bool {
    let path = Path::new(arg);
    !arg.to_string_lossy().starts_with(['-', '+'])
        && path.file_name().is_some_and(|n| n == "rustc")
        && (path.components().count() == 1 || path.is_file())
}

/// Entry point of wrapper mode. `args[0]` is the program cargo would have run.
pub fn wrap(args: &[OsString]) -> ExitCode {
    if ferry_cache::cc::is_c_compiler(Path::new(&args[0])) {
        return cc::wrap(args);
    }
    start(Invocation::parse(args), false)
}

/// The unit a call compiles (by a C-family compiler, or rustc), or why it passes through.
fn classify_unit(c_compiler: bool, rest: &[OsString]) -> Result<Unit, String> {
    if c_compiler {
        return match ferry_cache::cc::classify(rest) {
            ferry_cache::cc::Classified::Cacheable(c) => Ok(Unit::Cc(c)),
            ferry_cache::cc::Classified::Passthrough(reason) => Err(reason),
        };
    }
    match classify(rest) {
        Classified::Cacheable(r) => Ok(Unit::Rustc(r)),
        Classified::Passthrough(reason) => Err(reason),
    }
}

/// Loads the configuration and classifies the call (a pass-through reason, or the unit to compile),
/// then walks it.
fn start(invocation: Invocation, c_compiler: bool) -> ExitCode {
    let mut stats = Stats { requests: 1, ..Stats::default() };
    let Ok(config) = Config::load() else {
        // No usable config means no cache dir to count in: just be rustc.
        return passthrough(&invocation);
    };
    crate::logging::init(&config);
    crate::digests::init(&config.cache_dir);
    // Loud, never silent: logged, and counted for `ferry stats` (which shows them first).
    for problem in &config.problems {
        tracing::warn!(%problem, "configuration error");
        *stats.config_errors.entry(problem.clone()).or_default() += 1;
    }
    let unit = match classify_unit(c_compiler, &invocation.rest) {
        Ok(unit) => unit,
        Err(reason) => return passthrough_counted(&config, stats, &invocation, &reason),
    };
    let Ok(cwd) = std::env::current_dir() else { return passthrough(&invocation) };
    // An output that exists as something other than a regular file (`-o /dev/null`, a FIFO) is
    // the compiler's to write: a replay would rename a file over it.
    if unit.outputs().iter().any(|(p, _)| std::fs::symlink_metadata(cwd.join(p)).is_ok_and(|m| !m.is_file())) {
        return passthrough_counted(&config, stats, &invocation, "output-not-regular");
    }
    let clock = Phases::start();
    let mut job = Job { config, invocation, unit, cwd, stats, clock, seen: Default::default(), verify: None };
    let code = job.run();
    let (hashed, memoized) = crate::digests::counts();
    tracing::debug!(krate = %job.unit.name(), phases = %job.clock, hashed, memoized, "wrapper call");
    let _ = Stats::add(&job.config.stats_path(), &job.stats);
    code
}

fn passthrough_counted(config: &Config, mut stats: Stats, invocation: &Invocation, reason: &str) -> ExitCode {
    tracing::debug!(reason, args = ?invocation.rest, "pass-through");
    *stats.passthrough.entry(reason.to_owned()).or_default() += 1;
    let _ = Stats::add(&config.stats_path(), &stats);
    passthrough(invocation)
}

/// Replaces this process with the program cargo named: exact stdio, exit code and signals, at the
/// cost of one exec.
fn passthrough(invocation: &Invocation) -> ExitCode {
    let err = process::exec(&invocation.program, &invocation.original_args());
    cannot_run(&invocation.program, &err)
}

/// Only reached when starting the compiler failed: reported as a missing compiler would be.
fn cannot_run(program: &Path, err: &std::io::Error) -> ExitCode {
    let _ = writeln!(std::io::stderr(), "ferry: cannot run '{}': {err}", program.display());
    ExitCode::from(1)
}

/// One cacheable compile on its walk.
struct Job {
    config: Config,
    invocation: Invocation,
    unit: Unit,
    cwd: PathBuf,
    stats: Stats,
    clock: Phases,
    /// What each input looked like when a lookup read it before the compile: a compile that
    /// changes one, or runs while one changes, is told by comparing (see `store`).
    seen: keys::Seen,
    /// A hit sampled for verification (`FERRY_VERIFY`), checked after cargo has its answer.
    verify: Option<Box<verify::Pending>>,
}

impl Job {
    fn run(&mut self) -> ExitCode {
        if let Some(rustc) = self.unit.rustc()
            && rustc.links()
            && rustc.target.as_deref().is_some_and(|t| !t.contains("-linux"))
        {
            *self.stats.passthrough.entry("link-target-unsupported".into()).or_default() += 1;
            return self.plain_compile();
        }
        match self.cached_compile() {
            Ok(code) => code,
            Err(fallback) => {
                tracing::info!(reason = %fallback, krate = %self.unit.name(), "falling back to a plain compile");
                self.count_fallback(&fallback);
                self.plain_compile()
            }
        }
    }

    fn cached_compile(&mut self) -> Result<ExitCode, Fallback> {
        let ident = self.identify()?;
        self.clock.lap("identify");
        let store = self.local_store()?;
        let pre_parts = self.pre_key(&ident)?;
        let pre = pre_parts.finish();
        let keys = Keys::new(pre_parts, self.manifest_scope(&pre));
        self.clock.lap("pre-key");
        let known = match self.lookup_local(&store, &keys)? {
            lookup::Found::Hit(code) => return Ok(self.verify_later(&store, &ident, &keys, code)),
            lookup::Found::Miss(known) => known,
        };
        self.clock.lap("local");
        let mut shared = crate::shared::SharedTier::open(&self.config, &mut self.stats);
        self.clock.lap("shared-open");
        if let Some(tier) = &mut shared
            && let Some(code) = self.lookup_shared(tier, &store, &keys, &known)
        {
            drop(shared);
            return code.map(|code| self.verify_later(&store, &ident, &keys, code));
        }
        self.clock.lap("shared");
        self.stats.misses += 1;
        *self.stats.misses_by_language.entry(self.unit.language().into()).or_default() += 1;
        Ok(self.compile_and_store(&store, shared.as_mut(), &ident, &keys, &known))
    }

    /// After a hit: when it was sampled for verification, compiles it again once cargo has its
    /// answer (see `verify`).
    fn verify_later(&mut self, store: &DiskStore, ident: &identity::Identity, keys: &Keys, code: ExitCode) -> ExitCode {
        if let Some(pending) = self.verify.take() {
            self.after_answer(|job, _| job.verify(store, ident, keys, *pending));
        }
        code
    }

    fn count_fallback(&mut self, fallback: &Fallback) {
        *self.stats.fallbacks.entry(fallback.as_str()).or_default() += 1;
    }

    /// A compile with no cache involvement, for fallbacks: what cargo named, with inherited stdio.
    fn plain_compile(&mut self) -> ExitCode {
        self.stats.compiled_local += 1;
        match process::run_inherited(&self.invocation.program, &self.invocation.original_args()) {
            Ok(status) => exit_code(status),
            Err(e) => cannot_run(&self.invocation.program, &e),
        }
    }
}

/// `ferry explain -- RUSTC ARGS...`: the keys this compile would have here and now, one record
/// per manifest of its scope (or the pre-key alone when there is none), without compiling.
pub fn explain_command(args: &[OsString]) -> anyhow::Result<Vec<crate::explain::Record>> {
    use anyhow::{Context, bail};
    if args.is_empty() {
        bail!("give the compiler command after '--', e.g. ferry explain -- rustc --crate-name a src/lib.rs ...");
    }
    let c_compiler = ferry_cache::cc::is_c_compiler(Path::new(&args[0]));
    let invocation =
        if c_compiler { cc::invocation(args).map_err(anyhow::Error::msg)? } else { Invocation::parse(args) };
    let config = Config::load_reporting()?;
    crate::digests::init(&config.cache_dir);
    let unit = classify_unit(c_compiler, &invocation.rest)
        .map_err(|reason| anyhow::anyhow!("this compile is not cached: it passes through ({reason})"))?;
    let cwd = std::env::current_dir().context("reading the current directory")?;
    let mut job = Job {
        config,
        invocation,
        unit,
        cwd,
        stats: Stats::default(),
        clock: Phases::start(),
        seen: Default::default(),
        verify: None,
    };
    let ident = job.identify().map_err(|f| anyhow::anyhow!("cannot identify the compiler: {f}"))?;
    let pre_parts = job.pre_key(&ident).map_err(|f| anyhow::anyhow!("cannot make the pre-key: {f}"))?;
    let pre = pre_parts.finish();
    let keys = Keys::new(pre_parts, job.manifest_scope(&pre));
    let store = job.local_store().map_err(|f| anyhow::anyhow!("{f}"))?;
    let mut records = Vec::new();
    for generation in 0..ferry_cache::rustc::MAX_MANIFESTS {
        let key = ferry_cache::rustc::recipe::manifest_key(&keys.scope, generation);
        let Some(entry) = job.get(&store, &key) else { break };
        let Ok(list) = serde_json::from_slice(&entry.payload) else { continue };
        let list = job.config.basedirs.restore_list(list);
        let parts = job.result_key(&keys.pre, &list);
        let hit = parts.as_ref().is_some_and(|p| job.get(&store, &p.finish()).is_some());
        let outcome = match &parts {
            Some(_) if hit => format!("manifest {generation}: a hit"),
            Some(_) => format!("manifest {generation}: no entry under this key"),
            None => format!("manifest {generation}: an input it lists no longer holds"),
        };
        records.push(crate::explain::record(&job.unit, &job.cwd, &keys, parts.as_ref(), &outcome));
    }
    if records.is_empty() {
        records.push(crate::explain::record(&job.unit, &job.cwd, &keys, None, "no manifest: never compiled here"));
    }
    Ok(records)
}

/// The wrapper's exit mirrors the compiler's: the same code, or the same signal.
fn exit_code(status: std::process::ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt;
    if let Some(signal) = status.signal() {
        // SAFETY: restoring the default action and re-raising the signal the child died of.
        unsafe {
            libc::signal(signal, libc::SIG_DFL);
            libc::raise(signal);
        }
        return ExitCode::from(128 + signal as u8);
    }
    ExitCode::from(status.code().unwrap_or(1).clamp(0, 255) as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workspace_wrappers_and_toolchain_arguments_are_told_apart() {
        let parse = |args: &[&str]| Invocation::parse(&args.iter().map(OsString::from).collect::<Vec<_>>());
        let plain = parse(&["rustc", "--crate-name", "a", "a.rs"]);
        assert_eq!((plain.inner, plain.plus, plain.rest.len()), (None, None, 3));
        let chain = parse(&["clippy-driver", "rustc", "--crate-name", "a"]);
        assert_eq!((&chain.program, &chain.inner), (&PathBuf::from("clippy-driver"), &Some(PathBuf::from("rustc"))));
        assert_eq!(chain.original_args(), ["rustc", "--crate-name", "a"]);
        let plus = parse(&["rustc", "+nightly", "-vV"]);
        assert_eq!((plus.inner, plus.plus.as_deref()), (None, Some("nightly")));
        // A source file called like rustc is an input, not a wrapped compiler.
        let source = parse(&["rustc", "dir/rustc.rs"]);
        assert_eq!(source.inner, None);
    }
}
