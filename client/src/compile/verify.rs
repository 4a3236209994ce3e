//! Verification in the field (`FERRY_VERIFY=<fraction>`): a sampled hit is also compiled — after
//! cargo has its answer, in the detached copy of the wrapper that stores entries — into a private
//! directory, observed like any compile, and the two results are compared: every output byte for
//! byte (a dep-info file and artifact notifications with the directory put back), stdout, stderr
//! and the exit code.
//!
//! A difference means the entry was wrong for this machine as it is now (an input its manifest
//! leaves out, a poisoned or damaged entry that still checks out, a compile that is not
//! deterministic). It is removed from every tier this client may write (the local one; the
//! shared one with `cache-write`), counted (`verify_mismatches`), and both sides are kept under
//! `<cache dir>/verify/` — the key the hit was served under and the key the fresh compile's own
//! observation gives, and which outputs differed — for `ferry explain --mismatches`. A
//! verification whose inputs changed while it ran, or since the hit (the hit's own manifest no
//! longer gives its key: cargo went on, a `cargo clean` came), says nothing and is dropped.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use ferry_cache::rustc::{InputList, Observation, input_list};
use ferry_cache::{CacheKey, CompileOutput, DiskStore, KeyBuilder, Store};
use serde::{Deserialize, Serialize};

use super::Job;
use super::identity::Identity;
use super::keys::Keys;
use super::replay::Tier;
use crate::process;

/// A hit chosen for verification, as it was replayed.
pub struct Pending {
    pub key: CacheKey,
    /// The result key's parts, and the manifest that led to the hit.
    pub parts: KeyBuilder,
    pub list: InputList,
    pub output: CompileOutput,
    pub tier: Tier,
}

/// One verification that found other bytes, as kept under `<cache dir>/verify/`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Mismatch {
    #[serde(rename = "crate")]
    pub krate: String,
    /// Unix seconds.
    pub time: u64,
    /// `local` or `shared`: where the entry came from.
    pub tier: String,
    /// What differed: output paths, `stdout`, `stderr`, `exit code`.
    pub differ: Vec<String>,
    /// The entry's key (what the hit was served under) and the fresh compile's.
    pub hit: crate::explain::Record,
    pub fresh: crate::explain::Record,
    /// Which tiers the entry was removed from.
    pub removed_from: Vec<String>,
    /// The fresh compile's exit code and the end of its stderr (8 KiB at most).
    #[serde(default)]
    pub fresh_exit: Option<i32>,
    #[serde(default)]
    pub fresh_stderr: String,
    /// The replayed stderr (8 KiB at most), when stderr differed.
    #[serde(default)]
    pub replayed_stderr: String,
}

/// Whether this hit is verified: with probability `fraction` (0: never, 1: always).
pub fn sampled(fraction: f64) -> bool {
    if fraction <= 0.0 {
        return false;
    }
    if fraction >= 1.0 {
        return true;
    }
    let draw = u64::from_le_bytes(ferry_cache::random_bytes()) as f64 / u64::MAX as f64;
    draw < fraction
}

/// The mismatch records of a cache dir, newest first.
pub fn mismatches(cache_dir: &Path) -> Vec<(PathBuf, Mismatch)> {
    crate::explain::newest_first(&cache_dir.join("verify"))
}

impl Job {
    /// Compiles the hit again beside cargo's outputs and compares (see the module's text).
    pub(super) fn verify(&mut self, store: &DiskStore, ident: &Identity, keys: &Keys, hit: Pending) {
        let Some(rustc) = self.unit.rustc().cloned() else { return };
        let Ok(dir) = tempfile::Builder::new().prefix("ferry-verify-").tempdir() else { return };
        let dir_text = dir.path().to_string_lossy().into_owned();
        let mut args: Vec<std::ffi::OsString> = ident.prefix.clone();
        args.extend(rustc.with_outputs_in(&dir_text).into_iter().map(Into::into));
        let Some(observer) = self.observer() else { return };
        let env = observer.environment();
        let started = SystemTime::now();
        let Ok(run) = process::run_captured(&ident.program, &args, &env) else { return };
        let Ok(bytes) = observer.log.read_all() else { return };
        let Ok(records) = ferry_observe::parse(&bytes) else { return };
        let moved = |p: &str| dir.path().join(Path::new(p).file_name().unwrap_or_default());
        let outputs: Vec<(String, bool)> = rustc.outputs();
        let tracked_env = rustc.dep_info_path().and_then(|d| {
            let text = fs::read_to_string(moved(&d)).ok()?;
            Some(ferry_cache::rustc::depinfo::env_names(&text))
        });
        let scope = observer.scope(self, ident, outputs.iter().map(|(p, _)| moved(p)).collect(), tracked_env);
        let list: Option<InputList> = input_list(&records, &scope).ok().map(|o: Observation| o.list);
        if let Some(list) = &list
            && list.files.iter().chain(&list.present).any(|f| self.changed_since(f, started))
        {
            tracing::debug!(krate = %self.unit.name(), "an input changed while verifying: nothing concluded");
            return;
        }
        // Compare what the fresh compile wrote with what the hit replayed.
        let mut differ = Vec::new();
        let put_back = |bytes: &[u8], original: &str| -> Vec<u8> {
            let parent = Path::new(original).parent().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
            replace(bytes, dir_text.as_bytes(), parent.as_bytes())
        };
        let out_dir = outputs.first().map(|(p, _)| p.clone()).unwrap_or_default();
        if run.status.code() != Some(hit.output.exit_code) {
            differ.push("exit code".to_owned());
        }
        if run.stdout != hit.output.stdout {
            differ.push("stdout".to_owned());
        }
        if put_back(&run.stderr, &out_dir) != hit.output.stderr {
            differ.push("stderr".to_owned());
        }
        if run.status.success() {
            for (path, _) in &outputs {
                let fresh = fs::read(moved(path)).map(|b| if path.ends_with(".d") { put_back(&b, path) } else { b });
                let replayed = hit.output.files.iter().find(|f| &f.path == path).map(|f| &f.bytes[..]);
                if fresh.ok().as_deref() != replayed {
                    differ.push(path.clone());
                }
            }
        }
        if differ.is_empty() {
            self.stats.verified += 1;
            return;
        }
        // Only a machine in the state the hit was served for says anything: an input of the
        // entry's own manifest that changed since (cargo went on; a `cargo clean`) does not make
        // the entry wrong.
        if self.result_key(&keys.pre, &hit.list).map(|k| k.finish()) != Some(hit.key) {
            tracing::debug!(krate = %self.unit.name(), "the inputs changed since the hit: nothing concluded");
            return;
        }
        // Wrong for this machine: remove it wherever this client may, and keep both sides.
        self.stats.verify_mismatches += 1;
        let mut removed_from = Vec::new();
        if Store::remove(store, &hit.key).unwrap_or(false) {
            removed_from.push("local".to_owned());
        }
        if matches!(hit.tier, Tier::Shared)
            && let Some(mut tier) = crate::shared::SharedTier::open(&self.config, &mut self.stats)
            && tier.may_write()
            && tier.remove(&hit.key, &mut self.stats)
        {
            removed_from.push("shared".to_owned());
        }
        let fresh_parts = list.as_ref().and_then(|l| self.result_key(&keys.pre, l));
        tracing::warn!(krate = %self.unit.name(), differ = ?differ, removed = ?removed_from, "a verified hit differed from a fresh compile; the entry is removed");
        let record = |parts: Option<&KeyBuilder>, outcome: &str| {
            crate::explain::record(&self.unit, &self.cwd, keys, parts, outcome)
        };
        let mismatch = Mismatch {
            krate: rustc.crate_name.clone(),
            time: started.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            tier: match hit.tier {
                Tier::Local => "local".into(),
                Tier::Shared => "shared".into(),
            },
            differ,
            hit: record(Some(&hit.parts), "the entry's key (served)"),
            fresh: record(fresh_parts.as_ref(), "the fresh compile's key (its own observation)"),
            removed_from,
            fresh_exit: run.status.code(),
            fresh_stderr: String::from_utf8_lossy(&run.stderr[run.stderr.len().saturating_sub(8 << 10)..]).into_owned(),
            replayed_stderr: String::from_utf8_lossy(
                &hit.output.stderr[hit.output.stderr.len().saturating_sub(8 << 10)..],
            )
            .into_owned(),
        };
        let folder = self.config.cache_dir.join("verify");
        let nanos = started.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let name = format!("{nanos:020}-{}.json", std::process::id());
        let _ = fs::create_dir_all(&folder).and_then(|()| {
            ferry_cache::write_replacing(
                &folder.join(name),
                &serde_json::to_vec_pretty(&mismatch).unwrap_or_default(),
                0o644,
            )
        });
    }
}

/// `text` with every `from` replaced by `to`.
fn replace(text: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    if from.is_empty() {
        return text.to_vec();
    }
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        if text[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(text[i]);
            i += 1;
        }
    }
    out
}
