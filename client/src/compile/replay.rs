//! A hit, replayed: every output written atomically (a temp file beside it, then a rename), then
//! stdout and stderr byte for byte, and the exit code. Only regular files are ever written: a
//! path that exists as anything else made the call pass through before any lookup
//! ([`super::wrap`]), and one that became something else since is never renamed over.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use ferry_cache::CompileOutput;

use super::Job;
use crate::reason::Fallback;

/// Which tier a hit came from.
#[derive(Clone, Copy)]
pub enum Tier {
    Local,
    Shared,
}

impl Job {
    /// Counts a hit in `tier`, writes every output atomically, then replays stdout and stderr.
    pub(super) fn replay(
        &mut self,
        output: &CompileOutput,
        payload_len: u64,
        tier: Tier,
    ) -> Result<ExitCode, Fallback> {
        for file in &output.files {
            let path = self.cwd.join(&file.path);
            if let Err(e) = write_atomic(&path, &file.bytes, file.executable) {
                tracing::warn!(path = %path.display(), error = %e, "cannot write a cached output");
                return Err(Fallback::ReplayWriteFailed);
            }
            // What dependents read next: their keys find its digest without hashing it again.
            if file.path.ends_with(".rmeta") || file.path.ends_with(".so") {
                crate::digests::remember_output(&path, &file.bytes);
            }
        }
        match tier {
            Tier::Local => self.stats.hits_local += 1,
            Tier::Shared => self.stats.hits_remote += 1,
        }
        *self.stats.hits_by_language.entry(self.unit.language().into()).or_default() += 1;
        self.stats.bytes_read += payload_len;
        self.stats.time_saved_ms += output.compile_ms;
        let _ = std::io::stdout().write_all(&output.stdout);
        let _ = std::io::stderr().write_all(&output.stderr);
        Ok(ExitCode::from(output.exit_code.clamp(0, 255) as u8))
    }
}

/// Writes a file through a temp file in the same directory and a rename, so a reader (or a
/// concurrent cargo) never sees a partial output. Refuses to replace anything but a regular file.
pub fn write_atomic(path: &Path, bytes: &[u8], executable: bool) -> std::io::Result<()> {
    if fs::symlink_metadata(path).is_ok_and(|m| !m.is_file()) {
        return Err(std::io::Error::new(std::io::ErrorKind::AlreadyExists, "not a regular file: left alone"));
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir)?;
    }
    // As rustc creates its outputs: the umask decides.
    ferry_cache::write_replacing(path, bytes, if executable { 0o777 } else { 0o666 })
}
