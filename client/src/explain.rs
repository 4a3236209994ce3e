//! `ferry explain`: every part of a compile's key, and what differs between two compiles of the
//! same unit (on two machines, in two checkouts).
//!
//! The wrapper records the last [`KEEP`] compiles it stored (its misses; a hit needs no
//! explaining, and `ferry explain -- CMD` computes any compile's keys on demand) under
//! `<cache dir>/explain/`, one JSON file each: the crate, its command line, the outcome, the
//! pre-key and the result key with every field (toolchain id, driver, arguments, each observed
//! file with its digest, each variable with its value; secrets only as digests). A record file
//! can be copied from another machine and diffed with one of this machine's.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use ferry_cache::KeyBuilder;
use serde::{Deserialize, Serialize};

use crate::compile::{Keys, Unit};
use crate::config::Config;

/// How many compiles' records a cache dir keeps.
pub const KEEP: usize = 100;

/// One compile's key, as recorded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    #[serde(rename = "crate")]
    pub krate: String,
    pub cwd: String,
    pub args: Vec<String>,
    pub outcome: String,
    /// Unix seconds.
    pub time: u64,
    pub pre_key: String,
    pub pre: Vec<(String, String)>,
    pub result_key: Option<String>,
    pub result: Vec<(String, String)>,
}

/// A compile's keys as a record.
pub fn record(unit: &Unit, cwd: &Path, keys: &Keys, result: Option<&KeyBuilder>, outcome: &str) -> Record {
    let parts = |k: &KeyBuilder| k.parts().iter().map(|p| (p.name.clone(), p.value.clone())).collect::<Vec<_>>();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    Record {
        krate: unit.name().to_owned(),
        cwd: cwd.display().to_string(),
        args: unit.args().to_vec(),
        outcome: outcome.to_owned(),
        time: now.as_secs(),
        pre_key: keys.pre.to_string(),
        pre: parts(&keys.pre_parts),
        result_key: result.map(|k| k.finish().to_string()),
        result: result.map(parts).unwrap_or_default(),
    }
}

/// Records a compile's keys under the cache dir (best effort: a failure only loses the record).
pub fn note(config: &Config, unit: &Unit, cwd: &Path, keys: &Keys, result: Option<&KeyBuilder>, outcome: &str) {
    let record = record(unit, cwd, keys, result, outcome);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let dir = config.cache_dir.join("explain");
    let name = format!("{:020}-{}.json", now.as_nanos(), std::process::id());
    let written = fs::create_dir_all(&dir).and_then(|()| {
        ferry_cache::write_replacing(
            &dir.join(&name),
            &serde_json::to_vec_pretty(&record).expect("a record serializes"),
            0o644,
        )
    });
    if written.is_err() {
        return;
    }
    // Prune now and then, not on every compile.
    if now.subsec_nanos().is_multiple_of(16) {
        prune(&dir);
    }
}

fn prune(dir: &Path) {
    let mut files = records_in(dir);
    if files.len() > KEEP {
        files.sort();
        for old in &files[..files.len() - KEEP] {
            let _ = fs::remove_file(old);
        }
    }
}

fn records_in(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.extension().is_some_and(|e| e == "json")
                        && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The JSON records in `dir` that parse as `T`, newest first (their names start with the time).
pub fn newest_first<T: serde::de::DeserializeOwned>(dir: &Path) -> Vec<(PathBuf, T)> {
    let mut files = records_in(dir);
    files.sort();
    files.reverse();
    files
        .into_iter()
        .filter_map(|p| Some((p.clone(), serde_json::from_slice::<T>(&fs::read(&p).ok()?).ok()?)))
        .collect()
}

/// The records of a cache dir, newest first, optionally of one crate only.
pub fn records(cache_dir: &Path, krate: Option<&str>) -> Vec<(PathBuf, Record)> {
    let mut records: Vec<(PathBuf, Record)> = newest_first(&cache_dir.join("explain"));
    records.retain(|(_, r)| krate.is_none_or(|k| r.krate == k));
    records
}

/// A record named on the command line: a record file, or a cache dir (its newest record of
/// `krate`, or of any crate).
pub fn load(spec: &Path, krate: Option<&str>) -> anyhow::Result<Record> {
    if spec.is_file() {
        let bytes = fs::read(spec).with_context(|| format!("reading {}", spec.display()))?;
        return serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not a ferry explain record", spec.display()));
    }
    if spec.is_dir() {
        return match records(spec, krate).into_iter().next() {
            Some((_, r)) => Ok(r),
            None => bail!(
                "no explain records{} in the cache dir {}",
                krate.map(|k| format!(" of crate '{k}'")).unwrap_or_default(),
                spec.display()
            ),
        };
    }
    bail!("'{}' is neither a record file nor a cache dir", spec.display())
}

/// A record as text: its command, outcome and every key part.
pub fn render(record: &Record) -> String {
    // A C compile's record names its source and driver (its pre-key's domain says which it is).
    let part = |name: &str| record.pre.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
    let (unit, program) = match part("domain") {
        Some("cc-compile") => ("source", part("driver").unwrap_or("cc")),
        _ => ("crate", "rustc"),
    };
    let mut out = format!(
        "{unit} {}  ({})\ncwd {}\n{program} {}\npre-key {}\n",
        record.krate,
        record.outcome,
        record.cwd,
        record.args.join(" "),
        record.pre_key
    );
    for (name, value) in &record.pre {
        out.push_str(&format!("  {name} = {value}\n"));
    }
    match &record.result_key {
        Some(key) => {
            out.push_str(&format!("result key {key}\n"));
            for (name, value) in &record.result {
                out.push_str(&format!("  {name} = {value}\n"));
            }
        }
        None => out.push_str("result key: none (no manifest matched)\n"),
    }
    out
}

/// Only the parts of two records' keys that differ (or are in one only).
pub fn diff(a: &Record, b: &Record) -> String {
    let mut out = String::new();
    for (title, left, right) in [("pre-key", &a.pre, &b.pre), ("result key", &a.result, &b.result)] {
        let mut lines = Vec::new();
        let find =
            |parts: &Vec<(String, String)>, name: &str| parts.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
        let mut names: Vec<&String> = left.iter().chain(right.iter()).map(|(n, _)| n).collect();
        names.sort();
        names.dedup();
        for name in names {
            if name == "pre" {
                continue; // the pre-key's own value: its parts are compared above
            }
            let (l, r) = (find(left, name), find(right, name));
            if l != r {
                lines.push(format!(
                    "  {name}\n    - {}\n    + {}\n",
                    l.as_deref().unwrap_or("(absent)"),
                    r.as_deref().unwrap_or("(absent)")
                ));
            }
        }
        if lines.is_empty() {
            out.push_str(&format!("{title}: the same\n"));
        } else {
            out.push_str(&format!("{title}: {} part(s) differ\n", lines.len()));
            out.extend(lines);
        }
    }
    out
}
