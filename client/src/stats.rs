//! Counters shared by every wrapper process: `<cache dir>/stats.json`, updated under a lock file and
//! replaced atomically, so concurrent compiles never lose or tear an update. Recording is best
//! effort: a stats problem never affects a compile.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Stats {
    /// Wrapper calls that ran with a setting that could not be used (at its default, or the
    /// shared tier off), by the problem (which names the variable, or the file and key).
    pub config_errors: BTreeMap<String, u64>,
    /// Every wrapper invocation, pass-through included.
    pub requests: u64,
    pub hits_local: u64,
    pub hits_remote: u64,
    /// Cacheable compiles that found no entry.
    pub misses: u64,
    /// Hits (both tiers) and misses by language: `rust`, `c`, `c++`, `objective-c`, `assembler`.
    pub hits_by_language: BTreeMap<String, u64>,
    pub misses_by_language: BTreeMap<String, u64>,
    pub compiled_local: u64,
    pub compiled_remote: u64,
    /// Calls handed straight to rustc, by reason.
    pub passthrough: BTreeMap<String, u64>,
    /// Infrastructure problems that turned into a plain local compile, by reason.
    pub fallbacks: BTreeMap<String, u64>,
    /// Compiles that ran but whose result was not stored, by reason.
    pub not_stored: BTreeMap<String, u64>,
    /// Shared-tier calls that failed or were skipped, by reason (`timeout`, `unavailable`,
    /// `bypassed` while the circuit breaker is open, `corrupt-entry`, …).
    pub shared_errors: BTreeMap<String, u64>,
    /// Times the scheduler refused this client's writes because its token may only read (no
    /// `cache-write`: developers' intended setup). Not an error; writes pause for 10 minutes.
    pub shared_read_only: u64,
    /// Entries this client published to the shared tier (with the `cache-write` role).
    pub shared_writes: u64,
    pub corrupt_entries: u64,
    pub cache_errors: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Input bytes uploaded to workers (blobs they did not have yet).
    pub bytes_sent: u64,
    /// Sampled hits compiled again (`FERRY_VERIFY`) whose outputs were the same.
    pub verified: u64,
    /// Sampled hits compiled again whose outputs differed: the entry was removed
    /// (`ferry explain --mismatches` shows why).
    pub verify_mismatches: u64,
    /// Compile time the hits did not spend (as measured when the entries were made), milliseconds.
    pub time_saved_ms: u64,
}

impl Stats {
    /// Reads the counters (waiting for a writer to finish); a missing or damaged file reads as
    /// zeros.
    pub fn read(path: &Path) -> Stats {
        let lock = crate::files::lock_file(&path.with_extension("lock"));
        let _held = lock.as_ref().ok().and_then(|l| l.lock_shared().ok());
        fs::read(path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
    }

    /// Adds `delta` to the shared counters.
    pub fn add(path: &Path, delta: &Stats) -> std::io::Result<()> {
        Stats::update(path, |s| s.merge(delta))
    }

    pub fn zero(path: &Path) -> std::io::Result<()> {
        Stats::update(path, |s| *s = Stats::default())
    }

    /// Rewrites the file in place under the exclusive lock (readers take it shared): no temp file,
    /// so no inode is created and deleted per compile.
    fn update(path: &Path, change: impl FnOnce(&mut Stats)) -> std::io::Result<()> {
        use std::io::{Read, Seek};
        let lock = crate::files::lock_file(&path.with_extension("lock"))?;
        lock.lock()?;
        let mut file = File::options().read(true).write(true).create(true).truncate(false).open(path)?;
        let mut text = Vec::new();
        file.read_to_end(&mut text)?;
        let mut stats: Stats = serde_json::from_slice(&text).unwrap_or_default();
        change(&mut stats);
        let bytes = serde_json::to_vec_pretty(&stats).expect("stats serialize");
        file.set_len(0)?;
        file.seek(std::io::SeekFrom::Start(0))?;
        file.write_all(&bytes)
    }

    fn merge(&mut self, d: &Stats) {
        self.requests += d.requests;
        self.hits_local += d.hits_local;
        self.hits_remote += d.hits_remote;
        self.misses += d.misses;
        self.compiled_local += d.compiled_local;
        self.compiled_remote += d.compiled_remote;
        self.corrupt_entries += d.corrupt_entries;
        self.cache_errors += d.cache_errors;
        self.bytes_read += d.bytes_read;
        self.bytes_written += d.bytes_written;
        self.bytes_sent += d.bytes_sent;
        self.time_saved_ms += d.time_saved_ms;
        self.shared_writes += d.shared_writes;
        self.shared_read_only += d.shared_read_only;
        self.verified += d.verified;
        self.verify_mismatches += d.verify_mismatches;
        for (mine, theirs) in [
            (&mut self.shared_errors, &d.shared_errors),
            (&mut self.passthrough, &d.passthrough),
            (&mut self.fallbacks, &d.fallbacks),
            (&mut self.not_stored, &d.not_stored),
            (&mut self.config_errors, &d.config_errors),
            (&mut self.hits_by_language, &d.hits_by_language),
            (&mut self.misses_by_language, &d.misses_by_language),
        ] {
            for (k, v) in theirs {
                *mine.entry(k.clone()).or_default() += v;
            }
        }
    }

    /// The human table of `ferry stats`.
    pub fn table(&self) -> String {
        let mut rows: Vec<(String, String)> = vec![
            ("requests".into(), self.requests.to_string()),
            ("hits (local tier)".into(), self.hits_local.to_string()),
            ("hits (shared tier)".into(), self.hits_remote.to_string()),
            ("misses".into(), self.misses.to_string()),
            ("compiled locally".into(), self.compiled_local.to_string()),
            ("compiled remotely".into(), self.compiled_remote.to_string()),
            ("corrupt entries".into(), self.corrupt_entries.to_string()),
            ("cache errors".into(), self.cache_errors.to_string()),
            ("bytes read".into(), crate::commands::human_bytes(self.bytes_read)),
            ("bytes written".into(), crate::commands::human_bytes(self.bytes_written)),
            ("bytes sent to workers".into(), crate::commands::human_bytes(self.bytes_sent)),
            ("shared tier writes".into(), self.shared_writes.to_string()),
            ("shared tier read-only (token without cache-write)".into(), self.shared_read_only.to_string()),
            ("time saved".into(), format!("{:.1} s", self.time_saved_ms as f64 / 1000.0)),
        ];
        if self.verified + self.verify_mismatches > 0 {
            rows.push(("hits verified (same bytes)".into(), self.verified.to_string()));
            rows.push(("verify mismatches (removed)".into(), self.verify_mismatches.to_string()));
        }
        for (title, map) in [
            ("hits", &self.hits_by_language),
            ("misses", &self.misses_by_language),
            ("pass-through", &self.passthrough),
            ("fallback", &self.fallbacks),
            ("not stored", &self.not_stored),
            ("shared tier", &self.shared_errors),
        ] {
            for (reason, n) in map {
                rows.push((format!("{title}: {reason}"), n.to_string()));
            }
        }
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        // A setting ferry could not use comes first: every number below is shaped by it.
        let mut out = String::new();
        if !self.config_errors.is_empty() {
            out.push_str("configuration errors (compiles that ran with a setting at its default):\n");
            for (problem, n) in &self.config_errors {
                out.push_str(&format!("  {n:>6}  {problem}\n"));
            }
            out.push('\n');
        }
        out.extend(rows.iter().map(|(k, v)| format!("{k:<width$}  {v:>10}\n")));
        let mut notes = Vec::new();
        for (title, map) in
            [("pass-through", &self.passthrough), ("fallback", &self.fallbacks), ("not stored", &self.not_stored)]
        {
            for reason in map.keys() {
                if let Some(text) = crate::reason::explain(title, reason) {
                    notes.push(format!("  {title}: {reason}: {text}\n"));
                }
            }
        }
        if !notes.is_empty() {
            out.push_str("\nnotes:\n");
            out.extend(notes);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_adds_are_not_lost() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stats.json");
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..25 {
                        let mut d = Stats { requests: 1, ..Stats::default() };
                        d.fallbacks.insert("x".into(), 2);
                        Stats::add(&path, &d).unwrap();
                    }
                });
            }
        });
        let s = Stats::read(&path);
        assert_eq!((s.requests, s.fallbacks["x"]), (200, 400));
        Stats::zero(&path).unwrap();
        assert_eq!(Stats::read(&path), Stats::default());
    }
}
