//! The compiler wrapper: `ferry /path/to/rustc ARGS...`.
//!
//! 1. Classify the call; pass-through calls `exec` the real compiler (one process spawn, nothing else).
//! 2. Identify the toolchain (weak-key map → ToolchainId) and compute the *pre-key*: everything known
//!    before compiling (toolchain, cwd, normalized arguments, `--extern` contents, observable
//!    environment, and for linking crates the linker and native libraries).
//! 3. Look up input manifests stored under the pre-key: each lists the files and environment
//!    variables a previous compile read. Hashing those files now gives a result key; a result entry
//!    under it is a hit, replayed without running rustc.
//! 4. On a miss, run rustc once (stdout/stderr teed live for cargo's pipelining), learn the inputs
//!    from its dep-info, and store the result and the manifest.
//!
//! Every infrastructure problem turns into a plain compile with a counted reason; the wrapper never
//! writes to the build's stdout/stderr anything rustc did not write.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use ferry_cache::rustc::recipe::{self, InputList, MAX_MANIFESTS, PreKeyParts, absolute, keyed_env, manifest_key};
use ferry_cache::rustc::{Classified, RustcArgs, classify, depinfo};
use ferry_cache::{
    CacheKey, CompileOutput, DiskConfig, DiskStore, Entry, EntryKind, Error as CacheError, OutputFile, PutOutcome,
    Store,
};
use ferry_toolchains::{Compiler, Error as ToolchainError, LocalStore, ToolchainId, resolve_compiler_with};

use crate::config::Config;
use crate::phases::Phases;
use crate::process;
use crate::remote;
use crate::shared::SharedTier;
use crate::stats::Stats;

/// Entry point of wrapper mode. `args[0]` is the compiler cargo would have run.
pub fn wrap(args: &[OsString]) -> ExitCode {
    let compiler = PathBuf::from(&args[0]);
    let mut rest = &args[1..];
    let plus = rest.first().and_then(|a| a.to_str()).and_then(|a| a.strip_prefix('+')).map(str::to_owned);
    if plus.is_some() {
        rest = &rest[1..];
    }
    let mut stats = Stats { requests: 1, ..Stats::default() };
    let Ok(config) = Config::load() else {
        // No usable config means no cache dir to count in: just be rustc.
        return passthrough(&compiler, &args[1..]);
    };
    crate::logging::init(&config);
    crate::digests::init(&config.cache_dir);
    let rustc = match classify(rest) {
        Classified::Cacheable(r) => r,
        Classified::Passthrough(reason) => {
            tracing::debug!(reason, "pass-through");
            *stats.passthrough.entry(reason).or_default() += 1;
            let _ = Stats::add(&config.stats_path(), &stats);
            return passthrough(&compiler, &args[1..]);
        }
    };
    let cwd = match std::env::current_dir() {
        Ok(cwd) => cwd,
        Err(_) => return passthrough(&compiler, &args[1..]),
    };
    let clock = Phases::start();
    let mut job = Job { config, compiler, plus, rustc, cwd, stats, digests: HashMap::new(), clock };
    let code = job.run();
    tracing::debug!(krate = %job.rustc.crate_name, phases = %job.clock, "wrapper call");
    let _ = Stats::add(&job.config.stats_path(), &job.stats);
    code
}

/// Replaces this process with the real compiler: exact stdio, exit code and signals, at the cost
/// of one exec.
fn passthrough(compiler: &Path, args: &[OsString]) -> ExitCode {
    let err = process::exec(compiler, args);
    // Only reached when exec failed: report like a missing compiler would be reported.
    let _ = writeln!(std::io::stderr(), "ferry: cannot run '{}': {err}", compiler.display());
    ExitCode::from(1)
}

struct Job {
    config: Config,
    /// The compiler path cargo gave us; rustc is always run through it, so a miss behaves exactly
    /// as the unwrapped build would.
    compiler: PathBuf,
    plus: Option<String>,
    rustc: Box<RustcArgs>,
    cwd: PathBuf,
    stats: Stats,
    /// Content digests computed by this process, by path as listed (None: unreadable).
    digests: HashMap<String, Option<[u8; 32]>>,
    clock: Phases,
}

/// A reason to fall back to a plain compile.
struct Fallback(&'static str);

/// A result as the local tier stored it: its key and its encoded entry (what the shared tier
/// gets too).
struct Stored {
    key: CacheKey,
    toolchain: [u8; 32],
    bytes: Vec<u8>,
}

/// Which tier a hit came from.
#[derive(Clone, Copy)]
enum Tier {
    Local,
    Shared,
}

impl Job {
    fn run(&mut self) -> ExitCode {
        if self.rustc.links() && self.rustc.target.as_deref().is_some_and(|t| !t.contains("-linux")) {
            *self.stats.passthrough.entry("link-target-unsupported".into()).or_default() += 1;
            return self.plain_compile();
        }
        match self.cached_compile() {
            Ok(code) => code,
            Err(Fallback(reason)) => {
                tracing::info!(reason, krate = %self.rustc.crate_name, "falling back to a plain compile");
                *self.stats.fallbacks.entry(reason.into()).or_default() += 1;
                self.plain_compile()
            }
        }
    }

    fn cached_compile(&mut self) -> Result<ExitCode, Fallback> {
        let (compiler, id) = self.toolchain_id()?;
        self.clock.lap("toolchain");
        let store = DiskStore::open(
            self.config.entries_dir(),
            DiskConfig { max_bytes: self.config.cache_size, grace: self.config.cache_grace },
        );
        let store = match store {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "local cache unavailable");
                self.stats.cache_errors += 1;
                return Err(Fallback("cache-unavailable"));
            }
        };
        let pre = self.pre_key(&id)?;
        let scope = self.manifest_scope(&pre);
        self.clock.lap("pre-key");
        let mut known = Vec::new();
        for generation in 0..MAX_MANIFESTS {
            let Some(entry) = self.get(&store, &manifest_key(&scope, generation)) else { break };
            let Ok(list) = serde_json::from_slice::<InputList>(&entry.payload) else { continue };
            let list = self.config.basedirs.restore_list(list);
            known.push(list.clone());
            let Some(key) = self.result_key(&pre, &list) else { continue };
            let Some(entry) = self.get(&store, &key) else { continue };
            let payload_len = entry.payload.len() as u64;
            if let Some(output) = self.usable_output(&key, entry.payload.into()) {
                return self.replay(&output, payload_len, Tier::Local);
            }
        }
        self.clock.lap("local");
        let mut shared = SharedTier::open(&self.config, &mut self.stats);
        self.clock.lap("shared-open");
        if let Some(tier) = &mut shared
            && let Some(code) = self.shared_lookup(tier, &store, &pre, &scope, &known)
        {
            return code;
        }
        self.clock.lap("shared");
        self.stats.misses += 1;
        Ok(self.compile_and_store(&store, shared.as_mut(), &compiler, &id, (&pre, &scope), &known))
    }

    /// After a local miss: the manifests and results of the shared tier. A hit is verified (the
    /// entry's checksum and key, then its payload) before it is promoted into the local tier and
    /// replayed.
    fn shared_lookup(
        &mut self,
        tier: &mut SharedTier,
        store: &DiskStore,
        pre: &CacheKey,
        scope: &CacheKey,
        known: &[InputList],
    ) -> Option<Result<ExitCode, Fallback>> {
        for generation in 0..MAX_MANIFESTS {
            let manifest = tier.get(&manifest_key(scope, generation), &mut self.stats);
            self.clock.lap("shared-manifest");
            let manifest = manifest?;
            let Ok(list) = serde_json::from_slice::<InputList>(&manifest.payload) else { continue };
            let list = self.config.basedirs.restore_list(list);
            if known.contains(&list) {
                continue;
            }
            let Some(key) = self.result_key(pre, &list) else { continue };
            let entry = tier.get(&key, &mut self.stats);
            self.clock.lap("shared-result");
            let Some(entry) = entry else { continue };
            let payload_len = entry.payload.len() as u64;
            let payload = Bytes::from(entry.payload);
            let Some(output) = self.usable_output(&key, payload.clone()) else { continue };
            // Promote: the result first, then the manifest that leads to it.
            let encoded = Entry::encode_parts(entry.kind, &key, &entry.toolchain, &payload);
            if self.put_encoded(store, &key, &encoded) && (known.len() as u32) < MAX_MANIFESTS {
                let promoted = Entry { key: manifest_key(scope, known.len() as u32), ..manifest };
                self.put(store, &promoted);
            }
            self.clock.lap("promote");
            return Some(self.replay(&output, payload_len, Tier::Shared));
        }
        None
    }

    fn toolchain_id(&mut self) -> Result<(Compiler, ToolchainId), Fallback> {
        let compiler = resolve_compiler_with(&self.compiler, self.plus.as_deref(), &self.cwd, process::output)
            .map_err(|e| {
                tracing::warn!(error = %e, "cannot resolve the toolchain");
                Fallback("toolchain-unresolved")
            })?;
        let store = LocalStore::open(&self.config.cache_dir).map(|s| s.with_spawn(process::output)).map_err(|e| {
            tracing::warn!(error = %e, "toolchain store unavailable");
            Fallback("toolchain-store")
        })?;
        let targets: Vec<String> = self.rustc.target.iter().cloned().collect();
        match store.identify(&compiler, &targets) {
            Ok(identified) => Ok((compiler, identified.id)),
            Err(ToolchainError::UnknownTarget { .. }) => Err(Fallback("target-not-installed")),
            Err(e) => {
                tracing::warn!(error = %e, "cannot identify the toolchain");
                Err(Fallback("toolchain-identify"))
            }
        }
    }

    /// Everything that determines the compile and is known before running it.
    fn pre_key(&mut self, id: &ToolchainId) -> Result<CacheKey, Fallback> {
        let mut externs = Vec::new();
        for (name, path) in self.rustc.externs.clone() {
            let digest = self.digest(&path).ok_or(Fallback("extern-unreadable"))?;
            externs.push((name, path, digest));
        }
        let env: Vec<(String, String)> = std::env::vars().filter(|(name, _)| keyed_env(name)).collect();
        let link = if self.rustc.links() {
            let mut libs = Vec::new();
            for (kind, name) in self.rustc.libs.clone() {
                let value = match self.find_native_lib(&name) {
                    Some(path) => {
                        let digest = self.digest(&path).ok_or(Fallback("native-lib-unreadable"))?;
                        format!("{path} {}", hex(&digest))
                    }
                    None => "system".into(),
                };
                libs.push((kind, name, value));
            }
            Some((self.linker_identity(), libs))
        } else {
            None
        };
        let cwd = self.cwd.to_string_lossy().into_owned();
        let toolchain = id.to_hex();
        let parts = PreKeyParts { toolchain: &toolchain, cwd: &cwd, args: &self.rustc, externs, env, link };
        Ok(recipe::pre_key(parts, &self.config.basedirs))
    }

    /// The key of the result of a compile that read `list`, from the files' current content.
    /// None when a listed file is gone (that manifest cannot describe this compile).
    fn result_key(&mut self, pre: &CacheKey, list: &InputList) -> Option<CacheKey> {
        let (digests, cwd) = (&mut self.digests, &self.cwd);
        recipe::result_key(
            pre,
            list,
            &self.config.basedirs,
            |file| digest_memo(digests, cwd, file),
            |name| std::env::var_os(name).map(|v| v.into_encoded_bytes()),
        )
    }

    /// The manifests' scope: the pre-key and the crate root's content.
    fn manifest_scope(&mut self, pre: &CacheKey) -> CacheKey {
        let input = self.rustc.input.clone();
        recipe::manifest_scope(pre, self.digest(&input))
    }

    fn get(&mut self, store: &DiskStore, key: &CacheKey) -> Option<Entry> {
        match store.get(key) {
            Ok(found) => found,
            Err(CacheError::Corrupt { path, reason }) => {
                tracing::warn!(path = %path.display(), %reason, "corrupt cache entry removed");
                self.stats.corrupt_entries += 1;
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "cache read failed");
                self.stats.cache_errors += 1;
                None
            }
        }
    }

    fn put(&mut self, store: &DiskStore, entry: &Entry) -> bool {
        self.put_encoded(store, &entry.key, &entry.encode())
    }

    fn put_encoded(&mut self, store: &DiskStore, key: &CacheKey, bytes: &[u8]) -> bool {
        match store.put_encoded(key, bytes) {
            Ok(PutOutcome::Published { bytes }) => {
                self.stats.bytes_written += bytes;
                true
            }
            Ok(PutOutcome::AlreadyPresent) => true,
            Err(e) => {
                tracing::warn!(error = %e, "cache write failed");
                self.stats.cache_errors += 1;
                false
            }
        }
    }

    fn matches_outputs(&self, output: &CompileOutput) -> bool {
        if output.exit_code != 0 {
            return output.files.is_empty();
        }
        let mut have: Vec<(&str, bool)> = output.files.iter().map(|f| (f.path.as_str(), f.executable)).collect();
        have.sort();
        let want = self.rustc.outputs();
        have.len() == want.len() && have.iter().zip(&want).all(|((p, x), (wp, wx))| p == wp && x == wx)
    }

    /// The result payload of a verified entry, decoded and with this machine's paths, when it is
    /// the output of this very call. None (counted when corrupt) otherwise.
    fn usable_output(&mut self, key: &CacheKey, payload: Bytes) -> Option<CompileOutput> {
        match CompileOutput::decode_shared(payload) {
            Ok(output) => {
                let output = self.config.basedirs.restore_output(output);
                let usable = self.matches_outputs(&output);
                if !usable {
                    tracing::warn!(%key, "entry's outputs differ from this call's; ignoring it");
                }
                usable.then_some(output)
            }
            Err(e) => {
                tracing::warn!(%key, error = %e, "undecodable result entry: not used");
                self.stats.corrupt_entries += 1;
                None
            }
        }
    }

    /// Counts a hit in `tier`, writes every output atomically, then replays stdout and stderr
    /// byte for byte.
    fn replay(&mut self, output: &CompileOutput, payload_len: u64, tier: Tier) -> Result<ExitCode, Fallback> {
        for file in &output.files {
            let path = self.cwd.join(&file.path);
            if let Err(e) = write_atomic(&path, &file.bytes, file.executable) {
                tracing::warn!(path = %path.display(), error = %e, "cannot write a cached output");
                return Err(Fallback("replay-write-failed"));
            }
        }
        match tier {
            Tier::Local => self.stats.hits_local += 1,
            Tier::Shared => self.stats.hits_remote += 1,
        }
        self.stats.bytes_read += payload_len;
        self.stats.time_saved_ms += output.compile_ms;
        let _ = std::io::stdout().write_all(&output.stdout);
        let _ = std::io::stderr().write_all(&output.stderr);
        Ok(ExitCode::from(output.exit_code.clamp(0, 255) as u8))
    }

    #[allow(clippy::too_many_arguments)]
    fn compile_and_store(
        &mut self,
        store: &DiskStore,
        shared: Option<&mut SharedTier>,
        compiler: &Compiler,
        id: &ToolchainId,
        keys: (&CacheKey, &CacheKey),
        known: &[InputList],
    ) -> ExitCode {
        let mut remote_failure = None;
        if self.config.scheduler.is_some() && remote::distributable(&self.rustc, &self.cwd).is_ok() {
            if remote::backing_off(&self.config.cache_dir, self.config.cluster_backoff) {
                *self.stats.fallbacks.entry("cluster-backoff".into()).or_default() += 1;
            } else {
                let remote = self.compile_remotely(store, compiler, id, keys, known);
                self.clock.lap("remote");
                match remote {
                    Ok(code) => return code,
                    Err(failed) => {
                        let reason = failed.reason.clone();
                        tracing::info!(reason, krate = %self.rustc.crate_name, "remote compile failed; compiling locally");
                        remote::note_failure(&self.config.cache_dir, &reason);
                        *self.stats.fallbacks.entry(reason).or_default() += 1;
                        remote_failure = Some(failed);
                    }
                }
            }
        }
        let cargo_dep_info = self.rustc.dep_info_path();
        // An injected dep-info goes beside the outputs: if rustc can write its outputs there, it can
        // write this too (ferry's own cache dir may be full or unwritable).
        let injected = cargo_dep_info.is_none().then(|| {
            let dir = match (&self.rustc.out_dir, &self.rustc.output) {
                (Some(dir), _) => self.cwd.join(dir),
                (None, Some(o)) => self.cwd.join(o).parent().map_or_else(|| self.cwd.clone(), Path::to_owned),
                (None, None) => self.cwd.clone(),
            };
            dir.join(format!(".ferry-dep-info-{}-{}.d", std::process::id(), nanos()))
        });
        let mut args: Vec<OsString> = self.plus.iter().map(|p| OsString::from(format!("+{p}"))).collect();
        let mut drop_lines: Vec<Vec<u8>> = remote_failure.as_ref().map(|f| f.forwarded.clone()).unwrap_or_default();
        match &injected {
            Some(path) => {
                args.extend(inject_dep_info(&self.rustc.args, path).into_iter().map(OsString::from));
                if self.rustc.json.iter().any(|j| j == "artifacts") {
                    let artifact = serde_json::to_string(&path.to_string_lossy()).expect("string serializes");
                    drop_lines.push(
                        format!(r#"{{"$message_type":"artifact","artifact":{artifact},"emit":"dep-info"}}"#)
                            .into_bytes(),
                    );
                }
            }
            None => args.extend(self.rustc.args.iter().map(OsString::from)),
        }
        let dep_info = injected.clone().unwrap_or_else(|| self.cwd.join(cargo_dep_info.as_deref().unwrap_or("")));
        // Never learn inputs from a stale dep-info left by an earlier compile.
        let _ = fs::remove_file(&dep_info);
        let started = SystemTime::now();
        let clock = Instant::now();
        let run = process::run_teed(&self.compiler, &args, &drop_lines);
        let run = match run {
            Ok(run) => run,
            Err(e) => {
                let _ = writeln!(std::io::stderr(), "ferry: cannot run '{}': {e}", self.compiler.display());
                return ExitCode::from(1);
            }
        };
        self.stats.compiled_local += 1;
        self.clock.lap("compile");
        if remote_failure.is_some_and(|f| f.reason.starts_with("remote-exit")) && run.status.success() {
            // The worker's compile failed where ours succeeded: a broken worker or a missing
            // input; the local result stands, and the discrepancy is counted.
            tracing::warn!(krate = %self.rustc.crate_name, "remote compile failed but local succeeded");
            *self.stats.fallbacks.entry("discrepancy".into()).or_default() += 1;
        }
        let compile_ms = clock.elapsed().as_millis() as u64;
        let stored = self.store_result(store, id, keys, known, &run, &dep_info, started, compile_ms, HashMap::new());
        match stored {
            Ok((stored, list)) => {
                if let Some(tier) = shared
                    && tier.may_write()
                {
                    self.publish_shared_detached(tier, &stored, keys.1, &list);
                }
            }
            Err(reason) => {
                tracing::debug!(reason, krate = %self.rustc.crate_name, "result not stored");
                *self.stats.not_stored.entry(reason.into()).or_default() += 1;
            }
        }
        if let Some(path) = injected {
            let _ = fs::remove_file(path);
        }
        self.clock.lap("store");
        exit_code(run.status)
    }

    #[allow(clippy::too_many_arguments)]
    fn store_result(
        &mut self,
        store: &DiskStore,
        id: &ToolchainId,
        (pre, scope): (&CacheKey, &CacheKey),
        known: &[InputList],
        run: &process::RunOutput,
        dep_info: &Path,
        started: SystemTime,
        compile_ms: u64,
        mut written: HashMap<String, Vec<u8>>,
    ) -> Result<(Stored, InputList), &'static str> {
        let code = match (run.status.code(), run.status.signal()) {
            (_, Some(_)) => return Err("killed-by-signal"),
            (Some(0), _) => 0,
            (Some(1), _) if self.config.cache_failures => 1,
            (Some(1), _) => return Err("compile-error"),
            (Some(101), _) => return Err("internal-compiler-error"),
            _ => return Err("unexpected-exit-code"),
        };
        let deps = self.read_dep_info(dep_info, started).ok_or("dep-info-unusable")?;
        for file in &deps.files {
            let changed = fs::metadata(self.cwd.join(file)).map(|m| modified(&m) > started).unwrap_or(true);
            if changed {
                return Err("inputs-changed-during-compile");
            }
        }
        // Digests computed before the compile may describe older content: hash afresh.
        for file in &deps.files {
            self.digests.remove(file);
        }
        let list = InputList { files: deps.files, env: deps.env };
        let new_generation = (!known.contains(&list)).then_some(known.len() as u32);
        if new_generation.is_some_and(|g| g >= MAX_MANIFESTS) {
            return Err("too-many-input-lists");
        }
        let key = self.result_key(pre, &list).ok_or("input-unreadable")?;
        let mut files = Vec::new();
        if code == 0 {
            for (path, executable) in self.rustc.outputs() {
                // What this process wrote itself (a remote job's outputs) is not read back.
                let bytes = match written.remove(&absolute(&self.cwd, &path).display().to_string()) {
                    Some(bytes) => bytes,
                    None => fs::read(self.cwd.join(&path)).map_err(|_| "missing-output")?,
                };
                files.push(OutputFile { path, executable, bytes: bytes.into() });
            }
        }
        let output = self.config.basedirs.rebase_output(CompileOutput {
            exit_code: code,
            stdout: run.stdout.clone(),
            stderr: run.stderr.clone(),
            files,
            compile_ms,
        });
        let stored = Stored { bytes: Entry::encode_result(key, id.0, &output), key, toolchain: id.0 };
        drop(output);
        if !self.put_encoded(store, &stored.key, &stored.bytes) {
            return Err("cache-write-failed");
        }
        if let Some(generation) = new_generation {
            let payload = serde_json::to_vec(&self.config.basedirs.rebase_list(&list)).expect("input list serializes");
            let manifest =
                Entry { kind: EntryKind::Manifest, key: manifest_key(scope, generation), toolchain: id.0, payload };
            if !self.put(store, &manifest) {
                return Err("cache-write-failed");
            }
        }
        Ok((stored, list))
    }

    /// [`Job::publish_shared`] after cargo has its answer: a forked child uploads while this
    /// process exits. The child holds the cache dir's publishing lock, which `ferry stats` waits
    /// for, so counters (and a teammate's next build after them) see the publish done. In-process
    /// when a fork is not safe here.
    fn publish_shared_detached(&mut self, tier: &mut SharedTier, stored: &Stored, scope: &CacheKey, list: &InputList) {
        let Ok(lock) = publishing_lock(&self.config.cache_dir).and_then(|f| f.lock_shared().map(|()| f)) else {
            return self.publish_shared(tier, stored, scope, list);
        };
        match process::detach() {
            process::Detached::Parent => drop(lock),
            process::Detached::NotPossible => self.publish_shared(tier, stored, scope, list),
            process::Detached::Child => {
                // The parent counts its own work; the child only what it does, on a tier of its
                // own (the parent's runtime and connection are the parent's).
                self.stats = Stats::default();
                if let Some(mut tier) = SharedTier::open(&self.config, &mut self.stats) {
                    self.publish_shared(&mut tier, stored, scope, list);
                }
                tracing::debug!(key = %stored.key, "published after the build's answer");
                let _ = Stats::add(&self.config.stats_path(), &self.stats);
                drop(lock);
                // SAFETY: ends the forked child without running the parent's exit handlers.
                unsafe { libc::_exit(0) }
            }
        }
    }

    /// A local compile's result into the shared tier (this client holds `cache-write`): the
    /// result first, so a manifest never leads to nothing.
    fn publish_shared(&mut self, tier: &mut SharedTier, stored: &Stored, scope: &CacheKey, list: &InputList) {
        if !tier.put(&stored.key, &stored.bytes, &mut self.stats) {
            return;
        }
        let list = self.config.basedirs.rebase_list(list);
        match recipe::publish_manifest(tier.store(), stored.toolchain, scope, &list) {
            Ok(true) => {}
            Ok(false) => *self.stats.not_stored.entry("shared-too-many-input-lists".into()).or_default() += 1,
            Err(e) => tier.failed(&e, &mut self.stats),
        }
    }

    /// The dep-info this compile wrote: written after it started, unchanged while we read it,
    /// complete, and listing the crate root. Anything else (another process rewriting the same
    /// file, say) means we do not know the inputs, and the result is not stored.
    fn read_dep_info(&self, path: &Path, started: SystemTime) -> Option<depinfo::DepInfo> {
        let stamp = |m: &fs::Metadata| (m.len(), modified(m), m.ino());
        let before = fs::metadata(path).ok()?;
        let text = fs::read_to_string(path).ok()?;
        let after = fs::metadata(path).ok()?;
        // File times come from a coarse clock that may lag ours by a tick: allow a margin.
        let written_before_start = modified(&after) + std::time::Duration::from_millis(100) < started;
        if stamp(&before) != stamp(&after) || written_before_start {
            return None;
        }
        let deps = depinfo::parse(&text)?;
        let root = self.cwd.join(&self.rustc.input);
        deps.files.iter().any(|f| self.cwd.join(f) == root).then_some(deps)
    }

    /// Runs the compile on a worker and stores its result like a local one. Err: the reason to
    /// fall back.
    fn compile_remotely(
        &mut self,
        store: &DiskStore,
        compiler: &Compiler,
        id: &ToolchainId,
        keys: (&CacheKey, &CacheKey),
        known: &[InputList],
    ) -> Result<ExitCode, remote::Failed> {
        let dep_info = self.cwd.join(self.rustc.dep_info_path().expect("distributable compiles ask for dep-info"));
        let _ = fs::remove_file(&dep_info);
        let env_names = known.iter().flat_map(|l| l.env.iter().cloned()).collect();
        let job = remote::Job {
            config: &self.config,
            rustc: &self.rustc,
            compiler,
            toolchain: *id,
            cwd: &self.cwd,
            env_names,
        };
        let started = SystemTime::now();
        let clock = Instant::now();
        let remote = remote::run(&job)?;
        self.stats.compiled_remote += 1;
        self.stats.bytes_sent += remote.bytes_sent;
        tracing::info!(worker = %remote.worker, krate = %self.rustc.crate_name, "compiled remotely");
        let compile_ms = clock.elapsed().as_millis() as u64;
        let stored =
            self.store_result(store, id, keys, known, &remote.run, &dep_info, started, compile_ms, remote.outputs);
        if let Err(reason) = stored {
            *self.stats.not_stored.entry(reason.into()).or_default() += 1;
        }
        Ok(exit_code(remote.run.status))
    }

    /// A compile with no cache involvement, for fallbacks: rustc with inherited stdio.
    fn plain_compile(&mut self) -> ExitCode {
        let mut args: Vec<OsString> = self.plus.iter().map(|p| OsString::from(format!("+{p}"))).collect();
        args.extend(self.rustc.args.iter().map(OsString::from));
        self.stats.compiled_local += 1;
        match process::run_inherited(&self.compiler, &args) {
            Ok(status) => exit_code(status),
            Err(e) => {
                let _ = writeln!(std::io::stderr(), "ferry: cannot run '{}': {e}", self.compiler.display());
                ExitCode::from(1)
            }
        }
    }

    /// blake3 of a file named as rustc names it (relative to the cwd or absolute), memoized.
    fn digest(&mut self, path: &str) -> Option<[u8; 32]> {
        digest_memo(&mut self.digests, &self.cwd, path)
    }

    /// The linker rustc will run, identified by its resolved path, file fingerprint and version.
    fn linker_identity(&self) -> String {
        let program = self.rustc.linker.clone().unwrap_or_else(|| "cc".into());
        let resolved = if program.contains('/') {
            Some(self.cwd.join(&program))
        } else {
            std::env::var_os("PATH")
                .and_then(|p| std::env::split_paths(&p).map(|d| d.join(&program)).find(|c| c.is_file()))
        };
        let Some(path) = resolved.and_then(|p| fs::canonicalize(p).ok()) else {
            return format!("{program} (not found)");
        };
        crate::linker::identity(&self.config.cache_dir, &path)
    }

    fn find_native_lib(&self, name: &str) -> Option<String> {
        for (kind, dir) in &self.rustc.search_paths {
            if !matches!(kind.as_str(), "native" | "all") {
                continue;
            }
            for file in [format!("lib{name}.a"), format!("lib{name}.so"), name.to_owned()] {
                let candidate = Path::new(dir).join(&file);
                if self.cwd.join(&candidate).is_file() {
                    return Some(candidate.to_string_lossy().into_owned());
                }
            }
        }
        None
    }
}

/// blake3 of `path` (relative to `cwd` or absolute) through `memo`, the per-process memo.
fn digest_memo(memo: &mut HashMap<String, Option<[u8; 32]>>, cwd: &Path, path: &str) -> Option<[u8; 32]> {
    if let Some(d) = memo.get(path) {
        return *d;
    }
    let d = fs::read(cwd.join(path)).ok().map(|bytes| *blake3::hash(&bytes).as_bytes());
    memo.insert(path.to_owned(), d);
    d
}

/// The arguments with `dep-info=<path>` added to `--emit` (or an `--emit` added).
fn inject_dep_info(args: &[String], path: &Path) -> Vec<String> {
    let extra = format!("dep-info={}", path.display());
    let mut out = Vec::with_capacity(args.len() + 1);
    let mut done = false;
    let mut iter = args.iter();
    while let Some(a) = iter.next() {
        if !done
            && a == "--emit"
            && let Some(v) = iter.next()
        {
            out.push(a.clone());
            out.push(format!("{v},{extra}"));
            done = true;
            continue;
        }
        if !done && let Some(v) = a.strip_prefix("--emit=") {
            out.push(format!("--emit={v},{extra}"));
            done = true;
            continue;
        }
        out.push(a.clone());
    }
    if !done {
        out.push(format!("--emit=link,{extra}"));
    }
    out
}

/// Writes a file through a temp file in the same directory and a rename, so a reader (or a
/// concurrent cargo) never sees a partial output.
fn write_atomic(path: &Path, bytes: &[u8], executable: bool) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.ferry-{}-{}", std::process::id(), nanos()));
    let mode = if executable { 0o777 } else { 0o666 };
    let result = File::options()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .and_then(|mut f| f.write_all(bytes))
        .and_then(|()| fs::rename(&tmp, path));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// The wrapper's exit mirrors rustc's: the same code, or the same signal.
fn exit_code(status: std::process::ExitStatus) -> ExitCode {
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

fn modified(meta: &fs::Metadata) -> SystemTime {
    meta.modified().unwrap_or_else(|_| SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(meta.mtime() as u64))
}

fn hex(digest: &[u8; 32]) -> String {
    blake3::Hash::from_bytes(*digest).to_hex().to_string()
}

fn nanos() -> u32 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos())
}

/// The lock detached publishers hold (shared) while they run; see [`wait_for_publishers`].
fn publishing_lock(cache_dir: &Path) -> std::io::Result<File> {
    crate::files::lock_file(&cache_dir.join("publishing.lock"))
}

/// Waits (at most `limit`) until no detached publisher of this cache dir is still running.
pub fn wait_for_publishers(cache_dir: &Path, limit: std::time::Duration) {
    let Ok(lock) = publishing_lock(cache_dir) else { return };
    let start = Instant::now();
    while let Err(fs::TryLockError::WouldBlock) = lock.try_lock() {
        if start.elapsed() > limit {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dep_info_injection() {
        let args: Vec<String> = ["--crate-name", "a", "--emit", "link", "a.rs"].map(String::from).into();
        assert_eq!(inject_dep_info(&args, Path::new("/t/x.d"))[3], "link,dep-info=/t/x.d");
        let args: Vec<String> = ["--emit=metadata,link", "a.rs"].map(String::from).into();
        assert_eq!(inject_dep_info(&args, Path::new("/t/x.d"))[0], "--emit=metadata,link,dep-info=/t/x.d");
        let args: Vec<String> = ["a.rs"].map(String::from).into();
        assert_eq!(inject_dep_info(&args, Path::new("/t/x.d"))[1], "--emit=link,dep-info=/t/x.d");
    }
}
