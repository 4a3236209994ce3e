//! Remote compiles: a cache miss of a distributable compile becomes a job on a worker.
//!
//! No local rustc pass decides what to send. We ship what the compile may read: the package
//! directory (`CARGO_MANIFEST_DIR`, bounded, without `target/` and VCS dirs, with every directory
//! so `..` paths resolve), the `--extern` files, the metadata and proc-macro files of the
//! `-L dependency=` directories (rustc loads transitive crates from there), and `OUT_DIR`. All
//! by content: the worker says which digests it lacks and only those travel. The exact inputs
//! come back in the job's dep-info, which the caller uses for the cache key as for a local compile.
//!
//! Every failure is a reason string; the caller compiles locally and counts it.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_proto::to_digest;
use ferry_proto::v1::worker_client::WorkerClient;
use ferry_proto::v1::{self, allocate_response, job_event};
use ferry_toolchains::{Compiler, ToolchainId};

use crate::config::Config;
use crate::phases::Phases;
use crate::process::RunOutput;
use ferry_cache::rustc::RustcArgs;
use ferry_cache::rustc::recipe::absolute;

/// Most files a job may ship, and most bytes (beyond these the compile stays local).
const MAX_FILES: usize = 20_000;
const MAX_BYTES: u64 = 1 << 30;
const CHUNK: usize = 1 << 20;
/// Directories never shipped from a package.
const SKIPPED_DIRS: &[&str] = &["target", ".git", ".hg", ".svn", ".jj"];

/// What the caller needs to run a job remotely.
#[derive(Debug)]
pub struct Job<'a> {
    pub config: &'a Config,
    pub rustc: &'a RustcArgs,
    pub compiler: &'a Compiler,
    pub toolchain: ToolchainId,
    pub cwd: &'a Path,
    /// Environment variable names earlier compiles of this crate read (from its manifests).
    pub env_names: Vec<String>,
}

/// A finished remote job (outputs already written locally).
#[derive(Debug)]
pub struct Remote {
    pub run: RunOutput,
    pub worker: String,
    pub bytes_sent: u64,
    /// The bytes of each output as written, by absolute path (for the local cache entry).
    pub outputs: HashMap<String, Vec<u8>>,
}

/// Why a compile cannot go to the cluster at all (it is then simply local, not a fallback).
pub fn distributable(rustc: &RustcArgs, cwd: &Path) -> Result<(), &'static str> {
    if rustc.crate_types.iter().any(|t| t != "rlib") {
        return Err("crate-type-not-distributed");
    }
    if rustc.output.is_some() || rustc.out_dir.is_none() {
        return Err("no-out-dir");
    }
    for (kind, path) in &rustc.emit {
        if path.is_some() || !matches!(kind.as_str(), "link" | "metadata" | "dep-info") {
            return Err("emit-not-distributed");
        }
    }
    if rustc.dep_info_path().is_none() {
        return Err("no-dep-info");
    }
    if std::env::var_os("CARGO_MANIFEST_DIR").is_none() {
        return Err("not-under-cargo");
    }
    // A build script's probe (proc-macro2, anyhow, autocfg... compile a snippet into OUT_DIR to
    // learn what the compiler supports): tiny, on the build's critical path, often meant to fail.
    if let (Some(out), Some(build_out)) = (&rustc.out_dir, std::env::var_os("OUT_DIR"))
        && absolute(cwd, out).starts_with(absolute(cwd, build_out))
    {
        return Err("build-script-probe");
    }
    Ok(())
}

/// Why a remote compile did not produce the answer, and what of it cargo has already seen.
#[derive(Debug)]
pub struct Failed {
    pub reason: String,
    /// stderr lines already passed to cargo (artifact notifications): a local re-run must not
    /// repeat them (cargo panics on a second notification for the same unit).
    pub forwarded: Vec<Vec<u8>>,
}

impl From<String> for Failed {
    fn from(reason: String) -> Failed {
        Failed { reason, forwarded: Vec::new() }
    }
}

/// How long one control call may take, and how long a job may go without any event (HTTP/2
/// keepalive notices a dead peer sooner; this bounds a live one that stopped answering).
const CALL_DEADLINE: Duration = Duration::from_secs(15);
const EVENT_IDLE: Duration = Duration::from_secs(900);

/// True while a recent scheduler failure (within `backoff`) says to compile locally without
/// trying: one unreachable scheduler costs a build one timeout, not one per compile.
pub fn backing_off(cache_dir: &Path, backoff: Duration) -> bool {
    crate::files::fresh(&cache_dir.join("cluster-down"), backoff)
}

/// Records a failure that means the scheduler itself is unreachable or unresponsive.
pub fn note_failure(cache_dir: &Path, reason: &str) {
    let scheduler_down =
        reason.starts_with("scheduler-") || reason == "allocate-timeout" || reason == "has-toolchain-timeout";
    if scheduler_down {
        let _ = fs::write(cache_dir.join("cluster-down"), reason);
    }
}

/// Runs the job on a worker. Err is a fallback reason.
pub fn run(job: &Job) -> Result<Remote, Failed> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|_| "runtime-unavailable".to_string())?;
    runtime.block_on(run_async(job))
}

/// `call` within [`CALL_DEADLINE`], its failure as a reason.
async fn deadline<T>(
    call: &str,
    fut: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, String> {
    match tokio::time::timeout(CALL_DEADLINE, fut).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(reason_for(call, &s)),
        Err(_) => {
            tracing::warn!(call, "cluster call timed out");
            Err(format!("{call}-timeout"))
        }
    }
}

async fn run_async(job: &Job<'_>) -> Result<Remote, Failed> {
    let mut clock = Phases::start();
    let mut scheduler = tokio::time::timeout(Duration::from_secs(5), crate::cluster::scheduler(job.config))
        .await
        .map_err(|_| "scheduler-timeout".to_string())?
        .map_err(|e| {
            tracing::warn!(error = %format!("{e:#}"), "scheduler unreachable");
            "scheduler-unreachable".to_string()
        })?;
    clock.lap("connect");
    ensure_toolchain(job, &mut scheduler).await?;
    clock.lap("toolchain");
    let allocation = deadline(
        "allocate",
        scheduler.allocate(v1::AllocateRequest { toolchain: Some(to_digest(job.toolchain.0)), client_id: client_id() }),
    )
    .await?;
    let assignment = match allocation.result {
        Some(allocate_response::Result::Assigned(a)) => a,
        Some(allocate_response::Result::Local(local)) => {
            tracing::info!(why = %local.detail, "scheduler says compile locally");
            let reason = match local.reason() {
                v1::LocalReason::NoWorkers => "no-workers",
                v1::LocalReason::ToolchainFetching => "toolchain-fetching",
                v1::LocalReason::WorkersQuarantined => "workers-quarantined",
                v1::LocalReason::NoCapacity | v1::LocalReason::Unspecified => "no-capacity",
            };
            return Err(String::from(reason).into());
        }
        None => return Err(String::from("scheduler-bad-answer").into()),
    };
    clock.lap("allocate");
    // Blocking on this single-threaded runtime is fine: nothing else runs on it meanwhile.
    let inputs = gather(job)?;
    clock.lap("gather");
    let url = format!(
        "{}://{}",
        if job.config.scheduler.as_deref().is_some_and(|u| u.starts_with("https")) { "https" } else { "http" },
        assignment.address
    );
    let (channel, token) =
        crate::cluster::channel(job.config, &url).await.map_err(|_| "worker-unreachable".to_string())?;
    let mut worker = WorkerClient::with_interceptor(channel, token).max_decoding_message_size(64 << 20);
    let digests: Vec<v1::Digest> = inputs.files.values().map(|f| to_digest(f.digest)).collect();
    clock.lap("worker-connect");
    let missing = deadline("find-missing", worker.find_missing(v1::FindMissingRequest { digests })).await?.missing;
    clock.lap("find-missing");
    let bytes_sent = upload_blobs(&mut worker, &inputs, &missing).await?;
    clock.lap("upload");
    let request = v1::RunJobRequest {
        job_id: assignment.job_id,
        toolchain: Some(to_digest(job.toolchain.0)),
        toolchain_root: job.compiler.root.display().to_string(),
        program: job.compiler.root.join("bin/rustc").display().to_string(),
        args: job.rustc.args.clone(),
        cwd: job.cwd.display().to_string(),
        env: environment(job),
        inputs: inputs
            .files
            .iter()
            .map(|(path, f)| v1::InputFile {
                path: path.clone(),
                digest: Some(to_digest(f.digest)),
                executable: f.executable,
            })
            .collect(),
        outputs: outputs(job),
        dirs: inputs.dirs.clone(),
        basedirs: job.config.basedirs.dirs().to_vec(),
    };
    let mut events = deadline("run-job", worker.run_job(request)).await?;
    let mut forwarded = Vec::new();
    let received = receive(&mut events, job, &assignment.worker_id, &mut forwarded, &mut clock).await;
    let (run, held, outputs) = received.map_err(|reason| Failed { reason, forwarded })?;
    let _ = std::io::stderr().write_all(&held);
    let _ = std::io::stdout().write_all(&run.stdout);
    tracing::debug!(krate = %job.rustc.crate_name, files = inputs.files.len(), bytes_sent, phases = %clock, "remote job");
    Ok(Remote { run, worker: assignment.worker_id, bytes_sent, outputs })
}

/// Reads a job's events to the end: stdout and stderr kept (artifact notifications passed to
/// cargo at once, recorded in `forwarded`; diagnostics held back), output files written as they
/// complete. The dep-info is checked against this machine's environment as soon as it arrives —
/// before the `.rmeta` announcement that follows it — so a job that saw another value of an
/// `env!`/`option_env!` variable is abandoned before cargo acts on any of it.
async fn receive(
    events: &mut tonic::Streaming<v1::JobEvent>,
    job: &Job<'_>,
    worker: &str,
    forwarded: &mut Vec<Vec<u8>>,
    clock: &mut Phases,
) -> Result<(RunOutput, Vec<u8>, HashMap<String, Vec<u8>>), String> {
    let dep_info = job.rustc.dep_info_path().map(|p| absolute(job.cwd, &p).display().to_string());
    let mut run = RunOutput { status: std::process::ExitStatus::from_raw(0), stdout: Vec::new(), stderr: Vec::new() };
    let mut held = Vec::new();
    let mut partial: BTreeMap<String, (bool, Vec<u8>)> = BTreeMap::new();
    let mut received = HashMap::new();
    let mut finished = None;
    loop {
        let event = match tokio::time::timeout(EVENT_IDLE, events.message()).await {
            Ok(Ok(Some(e))) => e,
            Ok(Ok(None)) => break,
            // The worker's own report of a job it could not run, versus the connection breaking.
            Ok(Err(s)) if s.code() == tonic::Code::Internal => {
                tracing::warn!(worker, error = %s.message(), "the worker could not run the job");
                return Err("worker-error".into());
            }
            Ok(Err(s)) => {
                tracing::warn!(worker, status = %s.message(), "worker lost during the job");
                return Err("worker-lost".into());
            }
            Err(_) => return Err("worker-silent".into()),
        };
        match event.kind {
            Some(job_event::Kind::Stdout(data)) => run.stdout.extend_from_slice(&data),
            Some(job_event::Kind::Stderr(data)) => {
                if data.starts_with(br#"{"$message_type":"artifact""#) {
                    clock.lap("artifact");
                    let _ = std::io::stderr().write_all(&data);
                    forwarded.push(data.strip_suffix(b"\n").unwrap_or(&data).to_vec());
                } else {
                    held.extend_from_slice(&data);
                }
                run.stderr.extend_from_slice(&data);
            }
            Some(job_event::Kind::Output(chunk)) => {
                let entry = partial.entry(chunk.path.clone()).or_insert((chunk.executable, Vec::new()));
                entry.1.extend_from_slice(&chunk.data);
                if chunk.last {
                    let (executable, bytes) = partial.remove(&chunk.path).expect("just inserted");
                    if dep_info.as_deref() == Some(chunk.path.as_str()) {
                        check_environment(&bytes)?;
                    }
                    write_output(Path::new(&chunk.path), &bytes, executable)
                        .map_err(|_| "output-write-failed".to_string())?;
                    received.insert(chunk.path, bytes);
                }
            }
            Some(job_event::Kind::Finished(f)) => {
                clock.lap("finished");
                finished = Some(f)
            }
            None => {}
        }
    }
    let finished = finished.ok_or_else(|| "worker-lost".to_string())?;
    if !finished.limit.is_empty() {
        tracing::warn!(worker, limit = %finished.limit, "remote job stopped by a sandbox limit");
        return Err("sandbox-limit".into());
    }
    run.status = match (finished.exit_code, finished.signal) {
        (Some(code), _) => std::process::ExitStatus::from_raw((code & 0xff) << 8),
        (None, Some(signal)) => std::process::ExitStatus::from_raw(signal & 0x7f),
        (None, None) => return Err("worker-bad-answer".into()),
    };
    if run.status.code() != Some(0) {
        return Err(format!("remote-exit-{}", run.status.code().map_or("signal".into(), |c| c.to_string())));
    }
    if outputs(job).iter().any(|o| !received.contains_key(o)) {
        return Err("missing-output".into());
    }
    Ok((run, held, received))
}

/// Every variable the remote compile read must have had the value it has here; otherwise its
/// outputs are not what a local compile would make (the variable was not sent: its name is
/// learned from this compile's manifest and sent next time).
fn check_environment(dep_info: &[u8]) -> Result<(), String> {
    for (name, seen) in ferry_cache::rustc::depinfo::env_values(&String::from_utf8_lossy(dep_info)) {
        if std::env::var(&name).ok() != seen {
            tracing::info!(name, "a variable the remote compile read differs from ours");
            return Err("env-not-sent".into());
        }
    }
    Ok(())
}

/// When a background upload ended (its lock is free) and the toolchain is still not on the
/// scheduler, that upload failed (its log says why): compiles stay local without starting another
/// one until this long after it started.
const UPLOAD_RETRY: Duration = Duration::from_secs(300);

/// Makes sure the scheduler has the toolchain. When it does not, the build does not wait for it:
/// the first wrapper to notice starts `ferry toolchain upload` in the background (detached, holding
/// the upload lock for as long as it runs, logging to `toolchains/upload-<id>.log`), and this
/// compile, like every one until the toolchain is on the scheduler, is local (`toolchain-uploading`).
async fn ensure_toolchain(job: &Job<'_>, scheduler: &mut crate::cluster::Scheduler) -> Result<(), String> {
    let id = Some(to_digest(job.toolchain.0));
    if deadline("has-toolchain", scheduler.has_toolchain(v1::ToolchainRef { id: id.clone() })).await?.present {
        return Ok(());
    }
    let lock_path = job.config.cache_dir.join("toolchains/locks").join(format!("upload-{}.lock", job.toolchain));
    let lock = crate::files::lock_file(&lock_path).map_err(|_| "toolchain-lock".to_string())?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => return Err("toolchain-uploading".into()),
        Err(fs::TryLockError::Error(_)) => return Err("toolchain-lock".into()),
    }
    // It may have landed between the two questions.
    if deadline("has-toolchain", scheduler.has_toolchain(v1::ToolchainRef { id })).await?.present {
        return Ok(());
    }
    let attempt = lock_path.with_extension("started");
    if crate::files::fresh(&attempt, UPLOAD_RETRY) {
        return Err("toolchain-upload-failed".into());
    }
    let log = job.config.cache_dir.join(format!("toolchains/upload-{}.log", job.toolchain));
    let started = fs::write(&attempt, b"").and_then(|()| start_upload(job, &lock, &log));
    match started {
        Ok(()) => {
            tracing::info!(toolchain = %job.toolchain, log = %log.display(), "uploading the toolchain in the background");
            Err("toolchain-uploading".into())
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the toolchain upload");
            Err("toolchain-upload-failed".into())
        }
    }
}

/// Starts `ferry toolchain upload` for this job's toolchain, detached from the build (its own
/// session, none of cargo's stdio), inheriting `lock` so the lock is held until it exits.
fn start_upload(job: &Job, lock: &fs::File, log: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let log = fs::OpenOptions::new().create(true).append(true).open(log)?;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.args(["toolchain", "upload", "--rustc"]).arg(&job.compiler.rustc);
    if let Some(target) = &job.rustc.target {
        cmd.args(["--target", target]);
    }
    cmd.current_dir(job.cwd).stdin(std::process::Stdio::null()).stdout(log.try_clone()?).stderr(log);
    let fd = lock.as_raw_fd();
    // SAFETY: between fork and exec this only makes async-signal-safe calls (fcntl, setsid) on
    // values prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            // Keep the locked descriptor across exec: the lock then lives as long as the upload.
            if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            libc::setsid();
            Ok(())
        });
    }
    cmd.spawn().map(drop)
}

#[derive(Debug)]
struct InputFile {
    digest: [u8; 32],
    executable: bool,
    /// Where to read it (the path rustc will use, resolved).
    source: PathBuf,
}

#[derive(Debug, Default)]
struct Inputs {
    files: BTreeMap<String, InputFile>,
    dirs: Vec<String>,
    bytes: u64,
}

fn gather(job: &Job) -> Result<Inputs, String> {
    let mut inputs = Inputs::default();
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from).ok_or("not-under-cargo")?;
    walk(&manifest_dir, &mut inputs, true)?;
    let input = absolute(job.cwd, &job.rustc.input);
    add_file(&input, &mut inputs)?;
    for (_, path) in &job.rustc.externs {
        add_file(&absolute(job.cwd, path), &mut inputs)?;
    }
    for (kind, dir) in &job.rustc.search_paths {
        if kind != "dependency" {
            continue;
        }
        let dir = absolute(job.cwd, dir);
        inputs.dirs.push(dir.display().to_string());
        for entry in fs::read_dir(&dir).map_err(|_| "dependency-dir-unreadable")?.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "rmeta" || e == "so") {
                add_file(&path, &mut inputs)?;
            }
        }
    }
    if let Some(out_dir) = std::env::var_os("OUT_DIR") {
        walk(&absolute(job.cwd, &out_dir), &mut inputs, false)?;
    }
    if let Some(out) = &job.rustc.out_dir {
        inputs.dirs.push(absolute(job.cwd, out).display().to_string());
    }
    // An earlier build's copy of an output is not an input: the job replaces it, and on the worker
    // it may be a read-only link to the blob store.
    for output in outputs(job) {
        inputs.files.remove(&output);
    }
    inputs.dirs.sort();
    inputs.dirs.dedup();
    Ok(inputs)
}

fn walk(dir: &Path, inputs: &mut Inputs, skip_build_dirs: bool) -> Result<(), String> {
    inputs.dirs.push(dir.display().to_string());
    let entries = fs::read_dir(dir).map_err(|_| "package-unreadable".to_string())?;
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let Ok(kind) = entry.file_type() else { continue };
        if kind.is_dir() {
            if skip_build_dirs && SKIPPED_DIRS.iter().any(|s| name == *s) {
                continue;
            }
            walk(&path, inputs, skip_build_dirs)?;
        } else if kind.is_file() || (kind.is_symlink() && path.is_file()) {
            add_file(&path, inputs)?;
        }
        if inputs.files.len() > MAX_FILES {
            return Err("too-many-input-files".into());
        }
    }
    Ok(())
}

fn add_file(path: &Path, inputs: &mut Inputs) -> Result<(), String> {
    let key = path.display().to_string();
    if inputs.files.contains_key(&key) {
        return Ok(());
    }
    let meta = fs::metadata(path).map_err(|_| "input-unreadable".to_string())?;
    inputs.bytes += meta.len();
    if inputs.bytes > MAX_BYTES {
        return Err("inputs-too-large".into());
    }
    let digest = crate::digests::digest(path, &meta).ok_or("input-unreadable")?;
    let executable = meta.permissions().mode() & 0o111 != 0;
    inputs.files.insert(key, InputFile { digest, executable, source: path.to_owned() });
    Ok(())
}

async fn upload_blobs(
    worker: &mut WorkerClient<
        tonic::service::interceptor::InterceptedService<tonic::transport::Channel, ferry_proto::TokenInterceptor>,
    >,
    inputs: &Inputs,
    missing: &[v1::Digest],
) -> Result<u64, String> {
    if missing.is_empty() {
        return Ok(0);
    }
    let wanted: std::collections::HashSet<&[u8]> = missing.iter().map(|d| d.blake3.as_slice()).collect();
    let mut sources: BTreeMap<[u8; 32], PathBuf> = BTreeMap::new();
    for f in inputs.files.values() {
        if wanted.contains(f.digest.as_slice()) {
            sources.entry(f.digest).or_insert_with(|| f.source.clone());
        }
    }
    let total: u64 = sources.values().filter_map(|p| fs::metadata(p).ok()).map(|m| m.len()).sum();
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let reader = tokio::task::spawn_blocking(move || -> Result<(), String> {
        for (digest, path) in sources {
            let bytes = fs::read(&path).map_err(|_| "input-unreadable".to_string())?;
            if *blake3::hash(&bytes).as_bytes() != digest {
                return Err("input-changed".into());
            }
            let count = bytes.len().div_ceil(CHUNK).max(1);
            for i in 0..count {
                let data = bytes[(i * CHUNK).min(bytes.len())..((i + 1) * CHUNK).min(bytes.len())].to_vec();
                let chunk = v1::BlobChunk { digest: Some(to_digest(digest)), data, last: i + 1 == count };
                if tx.blocking_send(chunk).is_err() {
                    return Ok(());
                }
            }
        }
        Ok(())
    });
    // Generous but bounded: the keepalive catches a dead worker sooner.
    let upload = worker.upload_blobs(tokio_stream::wrappers::ReceiverStream::new(rx));
    match tokio::time::timeout(Duration::from_secs(600), upload).await {
        Ok(Ok(_)) => {}
        Ok(Err(s)) => return Err(reason_for("upload-blobs", &s)),
        Err(_) => return Err("upload-blobs-timeout".into()),
    }
    reader.await.map_err(|_| "input-unreadable".to_string())??;
    Ok(total)
}

/// The environment a job sees: cargo's variables (not the jobserver), `OUT_DIR`, the variables
/// rustc itself reads, and those earlier compiles of this crate read through `env!`.
fn environment(job: &Job) -> Vec<v1::EnvVar> {
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in std::env::vars() {
        // Everything the key covers (so the worker derives the keys a client computes), OUT_DIR, and
        // the stack size rustc's threads get.
        let wanted = (name.starts_with("CARGO") && name != "CARGO_MAKEFLAGS")
            || ferry_cache::rustc::recipe::keyed_env(&name)
            || ["OUT_DIR", "RUST_MIN_STACK"].contains(&name.as_str())
            || job.env_names.contains(&name);
        if wanted {
            env.insert(name, value);
        }
    }
    env.into_iter().map(|(name, value)| v1::EnvVar { name, value }).collect()
}

fn outputs(job: &Job) -> Vec<String> {
    job.rustc.outputs().into_iter().map(|(p, _)| absolute(job.cwd, &p).display().to_string()).collect()
}

fn write_output(path: &Path, bytes: &[u8], executable: bool) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.ferry-{}",
        path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
        std::process::id()
    ));
    let result = fs::write(&tmp, bytes)
        .and_then(|()| fs::set_permissions(&tmp, fs::Permissions::from_mode(if executable { 0o755 } else { 0o644 })))
        .and_then(|()| fs::rename(&tmp, path));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// This machine's name, for the scheduler's fair queue.
fn client_id() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_owned()).unwrap_or_default()
}

fn reason_for(call: &str, s: &tonic::Status) -> String {
    tracing::warn!(call, code = ?s.code(), message = %s.message(), "cluster call failed");
    match s.code() {
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => format!("{call}-refused"),
        tonic::Code::Unavailable => format!("{call}-unavailable"),
        tonic::Code::DeadlineExceeded => format!("{call}-timeout"),
        _ => format!("{call}-failed"),
    }
}
