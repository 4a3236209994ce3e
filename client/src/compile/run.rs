//! Step 5, run: a miss compiles on a worker when it can ([`super::remote`]), else here; a local
//! compile runs observed — the interposer preloaded into rustc and everything it starts, logging
//! what they read, looked for, listed, ran and looked up — and its observation becomes the
//! manifest ([`ferry_cache::rustc::input_list`]). A compile whose observation is incomplete still
//! gives cargo its answer; only its result is not stored.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs;
use std::process::ExitCode;
use std::time::{Instant, SystemTime};

use ferry_cache::DiskStore;
use ferry_cache::rustc::recipe::absolute;
use ferry_cache::rustc::{InputList, Observation, Scope, ToolchainFiles, input_list};

use super::identity::Identity;
use super::keys::Keys;
use super::{Job, Unit, exit_code, remote};
use crate::process::{self, RunOutput};
use crate::reason::{Fallback, NotStored};
use crate::shared::SharedTier;

/// A compile that ran here.
pub struct Ran {
    pub run: RunOutput,
    /// Its manifest and what it wrote, or why it cannot have one.
    pub observed: Result<Observation, NotStored>,
    pub started: SystemTime,
    pub compile_ms: u64,
}

/// The interposer and this compile's log.
pub(super) struct Observer {
    pub(super) interposer: ferry_observe::Interposer,
    pub(super) log: ferry_observe::Log,
}

impl Observer {
    /// The variables that make a compile's processes observe themselves into the log.
    pub(super) fn environment(&self) -> Vec<(OsString, OsString)> {
        ferry_observe::environment(
            &self.interposer.path,
            &self.log.path,
            std::env::var_os("LD_PRELOAD").as_deref(),
            std::process::id(),
        )
    }

    /// What [`ferry_cache::rustc::input_list`] needs to know of a compile observed into this
    /// log: its outputs and the variables its dep-info lists (None: no dep-info).
    pub(super) fn scope<'a>(
        &'a self,
        job: &Job,
        ident: &'a Identity,
        outputs: Vec<std::path::PathBuf>,
        tracked_env: Option<Vec<String>>,
    ) -> Scope<'a> {
        Scope {
            toolchain: ident.rust.as_ref().map(|r| ToolchainFiles {
                root: &r.compiler.root,
                host: &r.host,
                targets: &r.targets,
            }),
            outputs,
            search_dirs: job
                .unit
                .rustc()
                .map_or(Vec::new(), |r| r.search_dirs().map(|d| absolute(&job.cwd, d)).collect()),
            own_files: vec![self.log.path.clone(), self.interposer.path.clone()],
            tracked_env,
            locale: None,
        }
    }
}

/// Room left below the system's limit on a command line and environment before a compile runs
/// unobserved: the observer's three variables, and the larger lines rustc builds for the programs
/// it starts (it moves a linker's arguments into a file when they do not fit, the environment it
/// cannot move).
const EXEC_HEADROOM: usize = 16 << 10;

impl Job {
    pub(super) fn compile_and_store(
        &mut self,
        store: &DiskStore,
        shared: Option<&mut SharedTier>,
        ident: &Identity,
        keys: &Keys,
        known: &[InputList],
    ) -> ExitCode {
        let mut remote_failure = None;
        let may_distribute = ident.is_plain_rustc()
            && ident.native_cpu.is_none()
            && self.unit.rustc().is_some_and(|r| remote::distributable(r, &self.cwd).is_ok());
        if self.config.scheduler.is_some() && may_distribute {
            if remote::backing_off(&self.config.cache_dir, self.config.cluster_backoff) {
                self.count_fallback(&Fallback::ClusterBackoff);
            } else {
                let remote = self.compile_remotely(store, ident, keys, known);
                self.clock.lap("remote");
                match remote {
                    Ok(code) => return code,
                    Err(failed) => {
                        tracing::info!(reason = %failed.reason, krate = %self.unit.name(), forwarded = failed.forwarded.len(), "remote compile failed; compiling locally");
                        remote::note_failure(&self.config.cache_dir, &failed.reason);
                        self.count_fallback(&failed.reason);
                        remote_failure = Some(failed);
                    }
                }
            }
        }
        let drop_lines = remote_failure.as_ref().map(|f| f.forwarded.clone()).unwrap_or_default();
        // Held until the outputs are read back (see `Job::output_lock`).
        let output_lock = self.output_lock();
        let ran = match self.run_observed(ident, &drop_lines) {
            Ok(ran) => ran,
            Err(e) => return super::cannot_run(&ident.program, &e),
        };
        self.stats.compiled_local += 1;
        self.clock.lap("compile");
        if remote_failure.is_some_and(|f| matches!(f.reason, Fallback::RemoteExit(_))) && ran.run.status.success() {
            // The worker's compile failed where ours succeeded: a broken worker or a missing
            // input; the local result stands, and the discrepancy is counted.
            tracing::warn!(krate = %self.unit.name(), "remote compile failed but local succeeded");
            self.count_fallback(&Fallback::Discrepancy);
        }
        let status = ran.run.status;
        let prepared = match output_lock {
            Err(reason) => Err(reason),
            Ok(_held) => self.prepare_result(keys, known, ran, HashMap::new()),
        };
        // cargo has its answer (outputs, streams, exit code); writing the entry (and its fsync)
        // can wait for the next job slot rather than hold this one.
        self.after_answer(|job, _forked| match prepared.and_then(|p| job.commit_result(store, ident, keys, p)) {
            Ok(stored) => {
                // Publishing needs this client's writer key (made and registered the first
                // time), and a tier opened with it: the one the lookup opened may predate it, and
                // a forked copy must not use the parent's connection anyway.
                let may_write = shared.as_ref().is_some_and(|t| t.may_write());
                if may_write
                    && crate::shared::prepare_writer(&job.config, &mut job.stats)
                    && let Some(mut tier) = SharedTier::open(&job.config, &mut job.stats)
                {
                    job.publish_shared(&mut tier, &stored, &keys.scope);
                }
            }
            Err(reason) => job.count_not_stored(&reason),
        });
        self.clock.lap("store");
        exit_code(status)
    }

    pub(super) fn count_not_stored(&mut self, reason: &NotStored) {
        tracing::debug!(reason = %reason.as_str(), krate = %self.unit.name(), "result not stored");
        *self.stats.not_stored.entry(reason.as_str()).or_default() += 1;
    }

    /// Runs the compile here with its stdout/stderr teed to cargo (minus `drop_lines`, which a
    /// failed remote job already passed on), observed — unless the observer's variables could push
    /// the command line and environment over the system's limit, or the start fails on it: then
    /// exactly as cargo asked, unobserved (never worse than plain: `exec-limit`, not stored).
    fn run_observed(&mut self, ident: &Identity, drop_lines: &[Vec<u8>]) -> std::io::Result<Ran> {
        let mut args: Vec<OsString> = ident.prefix.clone();
        args.extend(self.invocation.rest.iter().cloned());
        args.extend(self.added_args());
        let near_limit = exec_size(&ident.program, &args) + EXEC_HEADROOM > arg_max();
        let observer = if near_limit { None } else { self.observer() };
        let env = observer.as_ref().map(Observer::environment).unwrap_or_default();
        let started = SystemTime::now();
        let clock = Instant::now();
        let mut run = process::run_teed(&ident.program, &args, &env, drop_lines);
        let too_long = matches!(&run, Err(e) if e.raw_os_error() == Some(libc::E2BIG));
        if too_long && observer.is_some() {
            tracing::info!(krate = %self.unit.name(), "the observer's variables do not fit: running unobserved");
            run = process::run_teed(&ident.program, &args, &[], drop_lines);
        }
        let compile_ms = clock.elapsed().as_millis() as u64;
        self.clock.lap("rustc");
        let observed = match &observer {
            _ if near_limit || too_long => Err(NotStored::Unobserved("exec-limit".into())),
            Some(o) => self.read_observation(o, ident, started),
            None => Err(NotStored::Unobserved("observer-unavailable".into())),
        };
        if let Some(o) = &observer
            && !o.log.path.starts_with("/proc")
        {
            let _ = fs::remove_file(&o.log.path);
        }
        Ok(Ran { run: run?, observed, started, compile_ms })
    }

    /// The interposer (installed under the cache dir, or in memory where that cannot be mapped)
    /// and a fresh log; None (the compile then runs unobserved and is not stored) when either
    /// cannot be made.
    pub(super) fn observer(&self) -> Option<Observer> {
        let dir = self.config.cache_dir.join("observe");
        let interposer = ferry_observe::Interposer::load(&dir)
            .map_err(|e| tracing::warn!(error = %e, dir = %dir.display(), "cannot load the observer"))
            .ok()?;
        let log = ferry_observe::Log::in_memory().or_else(|_| {
            let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
            let path = dir.join("logs").join(format!("{}-{nanos}.log", std::process::id()));
            fs::create_dir_all(dir.join("logs")).and_then(|()| ferry_observe::Log::file(&path))
        });
        let log = log.map_err(|e| tracing::warn!(error = %e, "cannot create the observation log")).ok()?;
        Some(Observer { interposer, log })
    }

    fn read_observation(
        &self,
        observer: &Observer,
        ident: &Identity,
        started: SystemTime,
    ) -> Result<Observation, NotStored> {
        let bytes = observer.log.read_all().map_err(|_| NotStored::Unobserved("log-unreadable".into()))?;
        let records = ferry_observe::parse(&bytes).map_err(|_| NotStored::Unobserved("log-malformed".into()))?;
        // The variables rustc reports reading, from the dep-info this compile wrote (an older
        // file left by an earlier build says nothing about this one). A C compiler reports none:
        // every variable it or its programs look up is keyed, but for the few of
        // `ferry_cache::rustc::observed::COMPILER_OWN` and `SUBPROCESS_OWN` (temporary files,
        // `PATH`, a terminal's `TERM`: a wrapped compile writes to a pipe).
        let tracked_env = match &self.unit {
            Unit::Rustc(rustc) => rustc.dep_info_path().and_then(|d| {
                let path = self.cwd.join(d);
                let fresh = fs::metadata(&path).and_then(|m| m.modified()).is_ok_and(|m| m >= started);
                let text = fs::read_to_string(&path).ok().filter(|_| fresh)?;
                Some(ferry_cache::rustc::depinfo::env_names(&text))
            }),
            Unit::Cc(_) => Some(Vec::new()),
        };
        let outputs = self.unit.outputs().iter().map(|(p, _)| absolute(&self.cwd, p)).collect();
        let mut scope = observer.scope(self, ident, outputs, tracked_env);
        // A C compiler's locale files are gathered only when it loaded a locale other than `C`.
        let loaded_locale = records.iter().any(|r| {
            matches!(r, ferry_observe::Record::Incomplete { reason, detail } if reason == "locale-data" && detail == "setlocale")
        });
        if loaded_locale && matches!(self.unit, Unit::Cc(_)) {
            scope.locale = Some(super::cc::locale_inputs());
        }
        input_list(&records, &scope).map_err(|incomplete| {
            tracing::info!(krate = %self.unit.name(), %incomplete, "the compile was not fully observed");
            NotStored::Unobserved(incomplete.reason)
        })
    }
}

/// The bytes `execve` counts for a program, its arguments and this process's environment: each
/// string with its NUL, and a pointer for each.
fn exec_size(program: &std::path::Path, args: &[OsString]) -> usize {
    let strings = program.as_os_str().len() + 1 + args.iter().map(|a| a.len() + 1).sum::<usize>();
    let env: usize = std::env::vars_os().map(|(k, v)| k.len() + v.len() + 2 + 8).sum();
    strings + 8 * (args.len() + 2) + env
}

/// The system's limit on a command line and environment together (`ARG_MAX`).
fn arg_max() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_ARG_MAX) };
    if n > 0 { n as usize } else { 128 << 10 }
}
