//! Workers are the shared tier's trusted writers. After a job that succeeded, the worker publishes
//! its result under the key it derived itself from what the job observed in the sandbox
//! (`crate::observe`) — never from anything the client claims about keys — then the manifest that
//! leads to it.
//!
//! Publishing runs on one background thread so it never delays a job's answer; when the queue is
//! full a result is dropped (and logged), never waited for.
//!
//! Nothing waiting to be published is held in memory: a job's outputs are copied, as they are
//! streamed to the client, into staged files under `<data_dir>/publish` ([`Publisher::stage`]),
//! at most [`STAGING_BYTES`] at once (a job whose outputs do not fit is not published). The
//! thread reads one job's files when it encodes that job's entry, so publishing holds one entry
//! at a time. Staged files are removed when their job is published or dropped.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use ferry_cache::rustc::InputList;
use ferry_cache::rustc::recipe::{self, absolute};
use ferry_cache::rustc::{Bases, Classified, classify};
use ferry_cache::{CacheKey, CompileOutput, Entry, OutputFile, Store};
use ferry_toolchains::ToolchainId;

use crate::observe::Derived;

/// Results waiting to be published, at most.
const QUEUE: usize = 64;
/// Output bytes staged for publishing at once, at most (on disk, in `<data_dir>/publish`).
pub const STAGING_BYTES: u64 = 4 << 30;
/// stdout or stderr kept for a job's entry, at most each; a job that printed more is forwarded
/// whole to its client but not published.
pub const STREAM_KEEP_BYTES: usize = 16 << 20;
/// How long the tier (and with it the list of trusted writers, which decides whether a manifest
/// already there counts) is used before it is opened again.
const REOPEN_AFTER: Duration = Duration::from_secs(300);

/// Everything about one finished, successful job that its entries need.
#[derive(Debug)]
pub struct Finished {
    pub toolchain: ToolchainId,
    pub cwd: String,
    pub args: Vec<String>,
    pub basedirs: Vec<String>,
    /// What the job observed and the keys derived from it.
    pub derived: Derived,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Output files by absolute path, staged.
    pub outputs: HashMap<String, Staged>,
    pub compile_ms: u64,
}

/// One output's copy waiting to be published: removed, and its bytes given back to the staging
/// budget, when dropped.
#[derive(Debug)]
pub struct Staged {
    file: std::fs::File,
    path: ferry_cache::TempPath,
    bytes: u64,
    budget: Arc<AtomicU64>,
}

impl Staged {
    /// Appends to the staged copy (never more than was reserved).
    pub fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        std::io::Write::write_all(&mut self.file, data)
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        self.budget.fetch_add(self.bytes, Ordering::Relaxed);
    }
}

/// The publishing thread's mailbox, and the staging directory.
#[derive(Debug, Clone)]
pub struct Publisher {
    tx: mpsc::SyncSender<Finished>,
    staging: PathBuf,
    /// Staging bytes not reserved.
    budget: Arc<AtomicU64>,
}

impl Publisher {
    /// Starts the thread; `open` makes the store on it (a gRPC store blocks on a runtime, which
    /// must not happen on the server's own threads), and again every [`REOPEN_AFTER`]. `staging`
    /// (made and emptied here) holds outputs waiting to be published.
    pub fn start(
        staging: &Path,
        open: impl Fn() -> Result<Box<dyn Store>, String> + Send + 'static,
    ) -> std::io::Result<Publisher> {
        if staging.exists() {
            std::fs::remove_dir_all(staging)?;
        }
        std::fs::create_dir_all(staging)?;
        let (tx, rx) = mpsc::sync_channel::<Finished>(QUEUE);
        std::thread::Builder::new()
            .name("shared-cache-writer".into())
            .spawn(move || {
                let mut opened: Option<(Box<dyn Store>, Instant)> = None;
                for job in rx {
                    if opened.as_ref().is_none_or(|(_, at)| at.elapsed() > REOPEN_AFTER) {
                        match open() {
                            Ok(store) => opened = Some((store, Instant::now())),
                            Err(e) if opened.is_some() => tracing::warn!(error = %e, "reopening the shared cache tier"),
                            Err(e) => {
                                tracing::error!(error = %e, "shared cache tier unavailable: a result is not published");
                                continue;
                            }
                        }
                    }
                    let Some((store, _)) = &opened else { continue };
                    match entries(job) {
                        Ok(result) => publish(store.as_ref(), &result),
                        Err(reason) => tracing::debug!(reason, "job result not published"),
                    }
                }
            })
            .expect("spawning the shared cache writer");
        Ok(Publisher { tx, staging: staging.to_owned(), budget: Arc::new(AtomicU64::new(STAGING_BYTES)) })
    }

    /// A staged file for an output of `bytes` bytes; None when the staging budget is spent (the
    /// job is then not published) or the file cannot be made.
    pub fn stage(&self, bytes: u64) -> Option<Staged> {
        let reserved =
            self.budget.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| left.checked_sub(bytes)).is_ok();
        if !reserved {
            tracing::warn!(bytes, "outputs waiting to be published fill the staging budget: a result is not published");
            return None;
        }
        match ferry_cache::create_temp(&self.staging, "out-", 0o600) {
            Ok((file, path)) => {
                Some(Staged { file, path: ferry_cache::TempPath(path), bytes, budget: Arc::clone(&self.budget) })
            }
            Err(e) => {
                self.budget.fetch_add(bytes, Ordering::Relaxed);
                tracing::warn!(error = %e, "staging an output for publishing");
                None
            }
        }
    }

    pub fn submit(&self, job: Finished) {
        if let Err(mpsc::TrySendError::Full(_)) = self.tx.try_send(job) {
            tracing::warn!("shared cache writer is behind: a result was not published");
        }
    }
}

/// What one job publishes: its encoded result entry, and the manifest scope and input list that
/// lead to it.
#[derive(Debug)]
pub struct Publication {
    pub key: CacheKey,
    pub toolchain: [u8; 32],
    pub entry: Vec<u8>,
    pub scope: CacheKey,
    /// As stored: relative to the job's base directories.
    pub list: InputList,
}

fn publish(store: &dyn Store, result: &Publication) {
    if let Err(e) = store.put_encoded(&result.key, &result.entry) {
        tracing::warn!(error = %e, key = %result.key, "publishing a result failed");
        return;
    }
    let (scope, list) = (&result.scope, &result.list);
    match recipe::publish_manifest(store, result.toolchain, scope, list) {
        Ok(true) => tracing::debug!(key = %result.key, "published"),
        Ok(false) => tracing::info!(%scope, "every manifest generation is taken: result not reachable"),
        Err(e) => tracing::warn!(error = %e, "publishing a manifest failed"),
    }
}

/// The result entry, its manifest scope and input list. Err: why this job cannot be published.
pub fn entries(mut job: Finished) -> Result<Publication, &'static str> {
    let args: Vec<std::ffi::OsString> = job.args.iter().map(Into::into).collect();
    let Classified::Cacheable(rustc) = classify(&args) else { return Err("not-cacheable") };
    let bases = Bases::new(job.basedirs.iter().cloned()).map_err(|_| "bad-basedirs")?;
    let cwd = std::path::Path::new(&job.cwd);
    let mut files = Vec::new();
    for (path, executable) in rustc.outputs() {
        let staged = absolute(cwd, &path).to_str().and_then(|p| job.outputs.remove(p)).ok_or("missing-output")?;
        let bytes = std::fs::read(staged.path()).map_err(|_| "staged-output-unreadable")?;
        if bytes.len() as u64 != staged.bytes {
            return Err("staged-output-changed");
        }
        files.push(OutputFile { path, executable, bytes: bytes.into() });
    }
    let result = bases.rebase_output(CompileOutput {
        exit_code: 0,
        stdout: job.stdout,
        stderr: job.stderr,
        files,
        compile_ms: job.compile_ms,
    });
    let Derived { scope, list, key, .. } = job.derived;
    let entry = Entry::encode_result(key, job.toolchain.0, &result);
    Ok(Publication { key, toolchain: job.toolchain.0, entry, scope, list: bases.rebase_list(&list) })
}
