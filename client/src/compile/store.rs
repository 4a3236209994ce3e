//! Step 6, store: a finished compile's result goes into the local tier under the key of what it
//! observed, with its manifest in the next free generation of its scope; and into the shared tier
//! from a detached copy of the wrapper when this client holds `cache-write`.

use std::collections::HashMap;
use std::fs::{self, File};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use ferry_cache::rustc::InputList;
use ferry_cache::rustc::recipe::{self, MAX_MANIFESTS, absolute, manifest_key};
use ferry_cache::{CacheKey, CompileOutput, DiskStore, Entry, EntryKind, OutputFile};

use super::Job;
use super::identity::Identity;
use super::keys::Keys;
use super::run::Ran;
use crate::process;
use crate::reason::NotStored;
use crate::shared::SharedTier;
use crate::stats::Stats;

/// A result as the local tier stored it: its key and encoded entry (what the shared tier gets
/// too), and the manifest that leads to it.
pub struct Stored {
    pub key: CacheKey,
    pub toolchain: [u8; 32],
    pub bytes: Vec<u8>,
    pub list: InputList,
}

/// A result ready to store: everything read from the build's files (outputs, the current state of
/// the inputs) is in it, so storing it no longer depends on them (a `cargo clean` right after the
/// build cannot take them away from under a detached store).
pub struct Prepared {
    key: CacheKey,
    parts: ferry_cache::KeyBuilder,
    list: InputList,
    new_generation: Option<u32>,
    output: CompileOutput,
}

impl Job {
    /// The key, manifest and entry of a compile's result, from its observation and outputs;
    /// `written` holds outputs this process wrote itself (a remote job's), which are not read back.
    pub(super) fn prepare_result(
        &mut self,
        keys: &Keys,
        known: &[InputList],
        ran: Ran,
        mut written: HashMap<String, Vec<u8>>,
    ) -> Result<Prepared, NotStored> {
        let run = &ran.run;
        let code = match (run.status.code(), run.status.signal()) {
            (_, Some(_)) => return Err(NotStored::KilledBySignal),
            (Some(0), _) => 0,
            (Some(1), _) if self.config.cache_failures => 1,
            (Some(1), _) => return Err(NotStored::CompileError),
            (Some(101), _) if self.unit.rustc().is_some() => return Err(NotStored::InternalCompilerError),
            _ => return Err(NotStored::UnexpectedExitCode),
        };
        let ferry_cache::rustc::Observation { mut list, wrote } = ran.observed?;
        self.clock.lap("observed");
        for file in list.files.iter().chain(&list.present) {
            if self.changed_since(file, ran.started) {
                return Err(NotStored::InputsChangedDuringCompile);
            }
        }
        // A file the compile left outside its declared outputs (a proc-macro's side effect) would
        // not be written by a replay; a C compile's extra outputs are written (`cc`).
        let extras = match &self.unit {
            super::Unit::Cc(cc) => {
                if super::cc::uses_time_macro(&list.files, &self.cwd) {
                    return Err(NotStored::TimeMacro);
                }
                let extras = self.extra_outputs(cc, &wrote)?;
                // Looked for before it wrote them (the assembler probes its `.dwo`): its own.
                let made: Vec<String> =
                    extras.iter().map(|(p, _)| absolute(&self.cwd, p).display().to_string()).collect();
                list.absent.retain(|p| !made.contains(p));
                list.present.retain(|p| !made.contains(p));
                extras
            }
            super::Unit::Rustc(_) => {
                if let Some(left) = wrote.iter().find(|w| fs::symlink_metadata(w).is_ok()) {
                    tracing::info!(krate = %self.unit.name(), path = %left.display(), "the compile wrote outside its outputs");
                    return Err(NotStored::WroteOutsideOutputs);
                }
                Vec::new()
            }
        };
        // Digests taken before the compile may describe older content.
        crate::digests::forget_seen();
        let mut files = Vec::new();
        if code == 0 {
            for (path, executable) in self.unit.outputs() {
                let bytes = match written.remove(&absolute(&self.cwd, &path).display().to_string()) {
                    Some(bytes) => bytes,
                    None => fs::read(self.cwd.join(&path)).map_err(|_| NotStored::MissingOutput)?,
                };
                files.push(OutputFile { path, executable, bytes: bytes.into() });
            }
            files.extend(extras.into_iter().map(|(path, bytes)| OutputFile {
                path,
                executable: false,
                bytes: bytes.into(),
            }));
        }
        // What dependents' compiles read (metadata, proc-macros) is remembered now; an rlib has
        // one reader, the final link, which hashes it anyway.
        for f in files.iter().filter(|f| f.path.ends_with(".rmeta") || f.path.ends_with(".so")) {
            crate::digests::remember_output(&absolute(&self.cwd, &f.path), &f.bytes);
        }
        self.clock.lap("outputs");
        // Dep-info files name paths too, but are rewritten on replay.
        let outputs: Vec<&[u8]> = files.iter().filter(|f| !f.path.ends_with(".d")).map(|f| &f.bytes[..]).collect();
        recipe::mark_verbatim(
            &mut list,
            &self.config.basedirs,
            |n| std::env::var_os(n).map(|v| v.into_encoded_bytes()),
            &outputs,
        );
        let new_generation = (!known.contains(&list)).then_some(known.len() as u32);
        if new_generation.is_some_and(|g| g >= MAX_MANIFESTS) {
            return Err(NotStored::TooManyInputLists);
        }
        let parts = self.result_key_or_why(&keys.pre, &list).map_err(|why| {
            tracing::debug!(krate = %self.unit.name(), %why, "an input cannot be read back");
            NotStored::InputUnreadable
        })?;
        let key = parts.finish();
        self.clock.lap("result-key");
        let output = self.config.basedirs.rebase_output(CompileOutput {
            exit_code: code,
            stdout: run.stdout.clone(),
            stderr: run.stderr.clone(),
            files,
            compile_ms: ran.compile_ms,
        });
        Ok(Prepared { key, parts, list, new_generation, output })
    }

    /// Publishes a prepared result into the local tier: the result, then its manifest.
    pub(super) fn commit_result(
        &mut self,
        store: &DiskStore,
        ident: &Identity,
        keys: &Keys,
        prepared: Prepared,
    ) -> Result<Stored, NotStored> {
        let Prepared { key, parts, list, new_generation, output } = prepared;
        let toolchain = ident.id.0;
        let bytes = Entry::encode_result(key, toolchain, &output);
        drop(output);
        if !self.put_encoded(store, &key, &bytes) {
            return Err(NotStored::CacheWriteFailed);
        }
        if let Some(generation) = new_generation {
            let payload = serde_json::to_vec(&self.config.basedirs.rebase_list(&list)).expect("input list serializes");
            let manifest =
                Entry { kind: EntryKind::Manifest, key: manifest_key(&keys.scope, generation), toolchain, payload };
            if !self.put(store, &manifest) {
                return Err(NotStored::CacheWriteFailed);
            }
        }
        self.clock.lap("put");
        crate::explain::note(&self.config, &self.unit, &self.cwd, keys, Some(&parts), "miss (stored)");
        Ok(Stored { key, toolchain, bytes, list })
    }

    /// Runs `work` after cargo has its answer: in a forked copy of this process while this one
    /// exits, so the work (storing an entry, with its fsync; uploading it to the shared tier) is
    /// off the build's critical path. The copy holds the cache dir's publishing lock (shared),
    /// which `ferry stats` waits for, so counters (and a teammate's next build after them) see
    /// the work done. In this process when a fork is not safe here (more than one thread).
    /// `work` is told whether it runs in the copy, which must not use the parent's connections
    /// (their runtime's state is the parent's).
    pub(super) fn after_answer(&mut self, work: impl FnOnce(&mut Job, bool)) {
        let Ok(lock) = publishing_lock(&self.config.cache_dir).and_then(|f| f.lock_shared().map(|()| f)) else {
            return work(self, false);
        };
        match process::detach() {
            process::Detached::Parent => drop(lock),
            process::Detached::NotPossible => {
                tracing::debug!("not single-threaded: storing before answering");
                work(self, false)
            }
            process::Detached::Child => {
                // The parent counts its own work; the copy only what it does.
                self.stats = Stats::default();
                work(self, true);
                let _ = Stats::add(&self.config.stats_path(), &self.stats);
                drop(lock);
                // SAFETY: ends the forked child without running the parent's exit handlers.
                unsafe { libc::_exit(0) }
            }
        }
    }

    /// A local compile's result into the shared tier (this client holds `cache-write`): the
    /// result first, so a manifest never leads to nothing.
    pub(super) fn publish_shared(&mut self, tier: &mut SharedTier, stored: &Stored, scope: &CacheKey) {
        if !tier.put(&stored.key, &stored.bytes, &mut self.stats) {
            return;
        }
        let list = self.config.basedirs.rebase_list(&stored.list);
        match recipe::publish_manifest(tier.store(), stored.toolchain, scope, &list) {
            Ok(true) => {}
            Ok(false) => self.count_not_stored(&NotStored::SharedTooManyInputLists),
            Err(e) => tier.failed(&e, &mut self.stats),
        }
    }
}

impl Job {
    /// Whether an input may have changed since the compile started: its stamp differs from the
    /// one a lookup saw just before the compile, or (for a file no lookup saw) it was modified or
    /// its inode changed (ctime: a write whose mtime was put back, a rename over it) after the
    /// start. A file gone or unreadable counts as changed.
    pub(super) fn changed_since(&self, file: &str, started: SystemTime) -> bool {
        let path = self.cwd.join(file);
        let Ok(meta) = fs::metadata(&path) else { return true };
        if !meta.is_file() {
            return false;
        }
        match self.seen.get(&path) {
            Some(before) => super::keys::stamp(&meta) != *before,
            None => {
                use std::os::unix::fs::MetadataExt;
                let ctime =
                    SystemTime::UNIX_EPOCH + Duration::new(meta.ctime().max(0) as u64, meta.ctime_nsec() as u32);
                meta.modified().map_or(true, |m| m > started) || ctime > started
            }
        }
    }
}

/// The lock detached publishers hold (shared) while they run; see [`wait_for_publishers`].
fn publishing_lock(cache_dir: &Path) -> std::io::Result<File> {
    crate::files::lock_file(&cache_dir.join("publishing.lock"))
}

/// Waits (at most `limit`) until no detached publisher of this cache dir is still running.
pub fn wait_for_publishers(cache_dir: &Path, limit: Duration) {
    let Ok(lock) = publishing_lock(cache_dir) else { return };
    let start = Instant::now();
    while let Err(fs::TryLockError::WouldBlock) = lock.try_lock() {
        if start.elapsed() > limit {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
