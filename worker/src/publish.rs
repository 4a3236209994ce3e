//! Workers are the shared tier's trusted writers. After a job that succeeded, the worker derives
//! the keys a client will look up from the job alone — toolchain, cwd, arguments, the environment
//! it ran with, the digests of the inputs it placed, and the dep-info its own sandboxed compile
//! wrote — never from anything the client claims about keys. It publishes the result, then the
//! manifest that leads to it.
//!
//! Publishing runs on one background thread so it never delays a job's answer; when the queue is
//! full a result is dropped (and logged), never waited for.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::Path;
use std::sync::mpsc;

use ferry_cache::rustc::recipe::{self, InputList, PreKeyParts, absolute, keyed_env};
use ferry_cache::rustc::{Bases, Classified, classify, depinfo};
use ferry_cache::{CacheKey, CompileOutput, Entry, OutputFile, Store};
use ferry_toolchains::ToolchainId;

/// Results waiting to be published, at most.
const QUEUE: usize = 64;

/// Everything about one finished, successful job that the keys and the entry need.
#[derive(Debug)]
pub struct Finished {
    pub toolchain: ToolchainId,
    pub cwd: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Input digests by absolute path.
    pub inputs: HashMap<String, [u8; 32]>,
    pub basedirs: Vec<String>,
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

/// The result entry, its manifest scope and input list — exactly what the wrapper computes for
/// the same compile. Err: why this job cannot be published.
pub fn entries(mut job: Finished) -> Result<Publication, &'static str> {
    let args: Vec<OsString> = job.args.iter().map(OsString::from).collect();
    let Classified::Cacheable(rustc) = classify(&args) else { return Err("not-cacheable") };
    if rustc.links() {
        return Err("links");
    }
    let bases = Bases::new(job.basedirs.iter().cloned()).map_err(|_| "bad-basedirs")?;
    let cwd = Path::new(&job.cwd);
    let digest = |path: &str| job.inputs.get(absolute(cwd, path).to_str()?).copied();
    let mut externs = Vec::new();
    for (name, path) in &rustc.externs {
        externs.push((name.clone(), path.clone(), digest(path).ok_or("extern-not-sent")?));
    }
    let env: Vec<(String, String)> = job.env.iter().filter(|(n, _)| keyed_env(n)).cloned().collect();
    let toolchain = job.toolchain.to_hex();
    let parts = PreKeyParts { toolchain: &toolchain, cwd: &job.cwd, args: &rustc, externs, env, link: None };
    let pre = recipe::pre_key(parts, &bases);
    let scope = recipe::manifest_scope(&pre, Some(digest(&rustc.input).ok_or("root-not-sent")?));

    let dep_info = rustc.dep_info_path().ok_or("no-dep-info")?;
    let dep_info = job.outputs.get(absolute(cwd, &dep_info).to_str().ok_or("no-dep-info")?).ok_or("no-dep-info")?;
    let text = std::str::from_utf8(dep_info).map_err(|_| "dep-info-unusable")?;
    let deps = depinfo::parse(text).ok_or("dep-info-unusable")?;
    let root = absolute(cwd, &rustc.input);
    if !deps.files.iter().any(|f| absolute(cwd, f) == root) {
        return Err("dep-info-unusable");
    }
    let list = InputList { files: deps.files, env: deps.env };
    let env_value = |name: &str| job.env.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone().into_bytes());
    let key = recipe::result_key(&pre, &list, &bases, digest, env_value).ok_or("input-not-sent")?;

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
    let entry = Entry::encode_result(key, job.toolchain.0, &result);
    Ok(Publication { key, toolchain: job.toolchain.0, entry, scope, list: bases.rebase_list(&list) })
}
