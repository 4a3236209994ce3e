//! Workers are the shared tier's trusted writers. After a job that succeeded, the worker publishes
//! its result under the key it derived itself from what the job observed in the sandbox
//! (`crate::observe`) — never from anything the client claims about keys — then the manifest that
//! leads to it.
//!
//! Publishing runs on one background thread so it never delays a job's answer; when the queue is
//! full a result is dropped (and logged), never waited for.

use std::collections::HashMap;
use std::sync::mpsc;

use ferry_cache::rustc::InputList;
use ferry_cache::rustc::recipe::{self, absolute};
use ferry_cache::rustc::{Bases, Classified, classify};
use ferry_cache::{CacheKey, CompileOutput, Entry, OutputFile, Store};
use ferry_toolchains::ToolchainId;

use crate::observe::Derived;

/// Results waiting to be published, at most.
const QUEUE: usize = 64;

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
    /// Output bytes by absolute path.
    pub outputs: HashMap<String, Vec<u8>>,
    pub compile_ms: u64,
}

/// The publishing thread's mailbox.
#[derive(Debug, Clone)]
pub struct Publisher {
    tx: mpsc::SyncSender<Finished>,
}

impl Publisher {
    /// Starts the thread; `open` makes the store on it (a gRPC store blocks on a runtime, which
    /// must not happen on the server's own threads).
    pub fn start(open: impl FnOnce() -> Result<Box<dyn Store>, String> + Send + 'static) -> Publisher {
        let (tx, rx) = mpsc::sync_channel::<Finished>(QUEUE);
        std::thread::Builder::new()
            .name("shared-cache-writer".into())
            .spawn(move || {
                let store = match open() {
                    Ok(store) => store,
                    Err(e) => {
                        tracing::error!(error = %e, "shared cache tier unavailable: results are not published");
                        return;
                    }
                };
                for job in rx {
                    match entries(job) {
                        Ok(result) => publish(store.as_ref(), &result),
                        Err(reason) => tracing::debug!(reason, "job result not published"),
                    }
                }
            })
            .expect("spawning the shared cache writer");
        Publisher { tx }
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
        let bytes = absolute(cwd, &path).to_str().and_then(|p| job.outputs.remove(p)).ok_or("missing-output")?;
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
