//! Step 4, look up: each manifest generation under the scope gives a result key from this
//! machine's inputs now; an entry under it that verifies and describes this very call is a hit.
//! First the local tier, then (after a local miss) the shared tier, whose hits are verified again
//! and promoted into the local tier before they are replayed.

use std::path::Path;
use std::process::ExitCode;

use bytes::Bytes;
use ferry_cache::rustc::InputList;
use ferry_cache::rustc::recipe::{MAX_MANIFESTS, manifest_key};
use ferry_cache::{
    CacheKey, CompileOutput, DiskConfig, DiskStore, Entry, Error as CacheError, KeyBuilder, PutOutcome, Store,
};

use super::Job;
use super::keys::Keys;
use super::replay::Tier;
use crate::reason::Fallback;
use crate::shared::SharedTier;

/// The outcome of the local lookup.
pub enum Found {
    Hit(ExitCode),
    /// The manifests seen (their lists are this crate's known inputs).
    Miss(Vec<InputList>),
}

impl Job {
    pub(super) fn local_store(&mut self) -> Result<DiskStore, Fallback> {
        let config = DiskConfig { max_bytes: self.config.cache_size, grace: self.config.cache_grace };
        DiskStore::open(self.config.entries_dir(), config).map_err(|e| {
            tracing::warn!(error = %e, "local cache unavailable");
            self.stats.cache_errors += 1;
            Fallback::CacheUnavailable
        })
    }

    pub(super) fn lookup_local(&mut self, store: &DiskStore, keys: &Keys) -> Result<Found, Fallback> {
        let mut known = Vec::new();
        for generation in 0..MAX_MANIFESTS {
            let Some(entry) = self.get(store, &manifest_key(&keys.scope, generation)) else { break };
            let Ok(list) = serde_json::from_slice::<InputList>(&entry.payload) else { continue };
            let list = self.config.basedirs.restore_list(list);
            known.push(list.clone());
            let Some(parts) = self.result_key(&keys.pre, &list) else { continue };
            let key = parts.finish();
            let Some(entry) = self.get(store, &key) else { continue };
            let payload_len = entry.payload.len() as u64;
            if let Some(output) = self.usable_output(&key, entry.payload.into()) {
                self.sample_for_verification(&key, parts, &list, &output, Tier::Local);
                return self.replay(&output, payload_len, Tier::Local).map(Found::Hit);
            }
        }
        Ok(Found::Miss(known))
    }

    /// After a local miss: the manifests and results of the shared tier. A hit is verified (the
    /// entry's checksum and key, then its payload) before it is promoted into the local tier and
    /// replayed.
    pub(super) fn lookup_shared(
        &mut self,
        tier: &mut SharedTier,
        store: &DiskStore,
        keys: &Keys,
        known: &[InputList],
    ) -> Option<Result<ExitCode, Fallback>> {
        for generation in 0..MAX_MANIFESTS {
            let manifest = tier.get(&manifest_key(&keys.scope, generation), &mut self.stats);
            self.clock.lap("shared-manifest");
            let manifest = manifest?;
            let Ok(list) = serde_json::from_slice::<InputList>(&manifest.payload) else { continue };
            let list = self.config.basedirs.restore_list(list);
            if known.contains(&list) {
                continue;
            }
            let Some(parts) = self.result_key(&keys.pre, &list) else { continue };
            let key = parts.finish();
            let entry = tier.get(&key, &mut self.stats);
            self.clock.lap("shared-result");
            let Some(entry) = entry else { continue };
            let payload_len = entry.payload.len() as u64;
            let payload = Bytes::from(entry.payload);
            let Some(output) = self.usable_output(&key, payload.clone()) else { continue };
            // Promote: the result first, then the manifest that leads to it.
            let encoded = Entry::encode_parts(entry.kind, &key, &entry.toolchain, &payload);
            if self.put_encoded(store, &key, &encoded) && (known.len() as u32) < MAX_MANIFESTS {
                let promoted = Entry { key: manifest_key(&keys.scope, known.len() as u32), ..manifest };
                self.put(store, &promoted);
            }
            self.clock.lap("promote");
            self.sample_for_verification(&key, parts, &list, &output, Tier::Shared);
            return Some(self.replay(&output, payload_len, Tier::Shared));
        }
        None
    }

    /// Keeps a hit for verification when `FERRY_VERIFY` samples it.
    fn sample_for_verification(
        &mut self,
        key: &CacheKey,
        parts: KeyBuilder,
        list: &InputList,
        output: &CompileOutput,
        tier: Tier,
    ) {
        // A C hit is not verified yet: compiling it again needs its outputs moved aside.
        if self.unit.rustc().is_some() && super::verify::sampled(self.config.verify) {
            let pending = super::verify::Pending { key: *key, parts, list: list.clone(), output: output.clone(), tier };
            self.verify = Some(Box::new(pending));
        }
    }

    pub(super) fn get(&mut self, store: &DiskStore, key: &CacheKey) -> Option<Entry> {
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

    pub(super) fn put(&mut self, store: &DiskStore, entry: &Entry) -> bool {
        self.put_encoded(store, &entry.key, &entry.encode())
    }

    pub(super) fn put_encoded(&mut self, store: &DiskStore, key: &CacheKey, bytes: &[u8]) -> bool {
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
        let want = self.unit.outputs();
        let mut have: Vec<(&str, bool)> = output.files.iter().map(|f| (f.path.as_str(), f.executable)).collect();
        // A C compile's extra outputs (a `.d` at the driver's default place, a `.dwo`) are named by
        // what it wrote, not by its arguments.
        if let super::Unit::Cc(cc) = &self.unit {
            have.retain(|(p, x)| {
                want.iter().any(|(w, _)| w == p) || !*x && ferry_cache::cc::is_extra_output(cc, &self.cwd, Path::new(p))
            });
            if have.len() != output.files.len() {
                return false;
            }
            have.retain(|(p, _)| want.iter().any(|(w, _)| w == p));
        }
        have.sort();
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
}
