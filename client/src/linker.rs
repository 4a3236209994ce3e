//! The linker's identity for cache keys of crates that link: its resolved path, a fingerprint of
//! the binary and its `--version` output. The version output is cached in
//! `<cache dir>/linkers.json` by fingerprint, so a hit does not spawn the linker.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

/// `path size mtime ino: first line of --version`.
pub fn identity(cache_dir: &Path, linker: &Path) -> String {
    let Ok(meta) = fs::metadata(linker) else { return format!("{} (unreadable)", linker.display()) };
    let fingerprint =
        format!("{} {} {}.{} {}", linker.display(), meta.len(), meta.mtime(), meta.mtime_nsec(), meta.ino());
    let file = cache_dir.join("linkers.json");
    let mut known: BTreeMap<String, String> =
        fs::read(&file).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
    if let Some(version) = known.get(&fingerprint) {
        return format!("{fingerprint}: {version}");
    }
    let version = crate::process::output(Command::new(linker).arg("--version"))
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or_default().to_owned())
        .unwrap_or_else(|e| format!("(--version failed: {e})"));
    known.insert(fingerprint.clone(), version.clone());
    // A plain cache of facts: a lost race only means another process runs --version again.
    let tmp = file.with_extension(format!("tmp-{}", std::process::id()));
    if fs::write(&tmp, serde_json::to_vec(&known).unwrap_or_default()).is_ok() && fs::rename(&tmp, &file).is_err() {
        let _ = fs::remove_file(&tmp);
    }
    format!("{fingerprint}: {version}")
}
