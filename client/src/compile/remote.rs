//! Step 5 on a worker: a miss of a distributable compile becomes a job.
//!
//! No local rustc pass decides what to send. A crate compiled before is sent what its manifests
//! say it read; a new one its package directory (bounded, without VCS directories and without the
//! target directory — by its real path, so sources under a nested `src/target/` still go); and
//! always the crate root, the `--extern` files, the metadata and proc-macro files of the
//! `-L dependency=` directories (rustc loads transitive crates from there), and `OUT_DIR`. All by
//! content: the worker says which digests it lacks and only those travel.
//!
//! The worker observes the job in its sandbox and sends what it observed twice: before rustc's
//! `.rmeta` announcement, and at the end. Each time the client derives the result key from that
//! list with its own files and environment; a key unlike the worker's means the worker saw
//! something else (a file not sent, a variable not sent), and the job is abandoned — before cargo
//! acted on the metadata, in the first case. A key that agrees is the key the worker publishes
//! under and the client stores under.
//!
//! Only declared outputs are accepted from a worker, as regular files within a size cap. Every
//! failure is a [`Fallback`]; the caller compiles locally and counts it.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use ferry_cache::rustc::recipe::{self, absolute};
use ferry_cache::rustc::{InputList, Observation, RustcArgs, is_secret, never_keyed};
use ferry_cache::{CacheKey, DiskStore};
use ferry_proto::to_digest;
use ferry_proto::v1::worker_client::WorkerClient;
use ferry_proto::v1::{self, allocate_response, job_event};
use ferry_toolchains::{Compiler, ToolchainId};

use super::identity::Identity;
use super::keys::{Keys, LocalInputs};
use super::run::Ran;
use super::{Job, exit_code};
use crate::config::Config;
use crate::phases::Phases;
use crate::process::RunOutput;
use crate::reason::{Call, CallFailure, Fallback, LocalReason};

/// Most files a job may ship, and most bytes (beyond these the compile stays local).
const MAX_FILES: usize = 20_000;
const MAX_BYTES: u64 = 1 << 30;
/// The largest output accepted from a worker, and all outputs of one job together.
const MAX_OUTPUT_BYTES: u64 = 4 << 30;
const MAX_OUTPUTS_BYTES: u64 = 8 << 30;
/// The most stdout, and the most stderr, taken from a worker for one job (rustc prints far less;
/// the worker keeps 16 MiB of each for the entry): beyond, the job is abandoned and compiled here.
const MAX_STREAM_BYTES: usize = 64 << 20;
const CHUNK: usize = 1 << 20;
/// Directories never shipped from a package.
const VCS_DIRS: &[&str] = &[".git", ".hg", ".svn", ".jj"];
/// Top-level directories a worker never takes files into (it has its own); of `/usr` it takes
/// `/usr/local` (projects and `CARGO_HOME` in the official Rust container image).
const SYSTEM_DIRS: &[&str] = &["usr", "lib", "lib64", "bin", "sbin", "etc", "proc", "dev", "sys", "run", "boot"];

/// What a remote compile needs from the wrapper.
#[derive(Debug)]
pub struct RemoteJob<'a> {
    pub config: &'a Config,
    pub rustc: &'a RustcArgs,
    pub compiler: &'a Compiler,
    pub toolchain: ToolchainId,
    pub cwd: &'a Path,
    /// The manifests of this crate's scope: what earlier compiles read.
    pub known: &'a [InputList],
    pub pre: CacheKey,
}

/// A finished remote job (outputs already written locally).
#[derive(Debug)]
pub struct Remote {
    pub run: RunOutput,
    pub worker: String,
    pub bytes_sent: u64,
    /// The bytes of each output as written, by absolute path (for the local cache entry).
    pub outputs: HashMap<String, Vec<u8>>,
    /// What the job observed, with the key both sides derived from it.
    pub observed: InputList,
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
    pub reason: Fallback,
    /// stderr lines already passed to cargo (artifact notifications): a local re-run must not
    /// repeat them (cargo panics on a second notification for the same unit).
    pub forwarded: Vec<Vec<u8>>,
}

impl From<Fallback> for Failed {
    fn from(reason: Fallback) -> Failed {
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
pub fn note_failure(cache_dir: &Path, reason: &Fallback) {
    if reason.scheduler_down() {
        let _ = fs::write(cache_dir.join("cluster-down"), reason.as_str());
    }
}

impl Job {
    /// Runs the compile on a worker and stores its result like a local one.
    pub(super) fn compile_remotely(
        &mut self,
        store: &DiskStore,
        ident: &Identity,
        keys: &Keys,
        known: &[InputList],
    ) -> Result<ExitCode, Failed> {
        let (Some(rustc), Some(rust)) = (self.unit.rustc(), &ident.rust) else {
            return Err(Fallback::Inputs("not-rustc").into());
        };
        let job = RemoteJob {
            config: &self.config,
            rustc,
            compiler: &rust.compiler,
            toolchain: ident.id,
            cwd: &self.cwd,
            known,
            pre: keys.pre,
        };
        let started = SystemTime::now();
        let clock = Instant::now();
        let remote = run(&job)?;
        self.stats.compiled_remote += 1;
        self.stats.bytes_sent += remote.bytes_sent;
        tracing::info!(worker = %remote.worker, krate = %self.unit.name(), "compiled remotely");
        let status = remote.run.status;
        let compile_ms = clock.elapsed().as_millis() as u64;
        // What the job wrote outside its outputs stayed on the worker, which reports such a job as
        // incomplete; none is left to check here.
        let observed = Ok(Observation { list: remote.observed, wrote: Vec::new() });
        let ran = Ran { run: remote.run, observed, started, compile_ms };
        let prepared = self.prepare_result(keys, known, ran, remote.outputs);
        // As for a local compile: the entry is written once cargo has its answer.
        self.after_answer(|job, _| {
            if let Err(reason) = prepared.and_then(|p| job.commit_result(store, ident, keys, p)) {
                job.count_not_stored(&reason);
            }
        });
        Ok(exit_code(status))
    }
}

/// Runs the job on a worker.
pub fn run(job: &RemoteJob) -> Result<Remote, Failed> {
    // Paths a worker cannot give a job, named rather than refused there one job at a time.
    let root = &job.compiler.root;
    if root.starts_with("/usr") && !(root.starts_with("/usr/local/") && root != Path::new("/usr/local")) {
        return Err(Fallback::Inputs("toolchain-in-system-dir").into());
    }
    if !shippable_place(job.cwd) {
        return Err(Fallback::Inputs("project-in-system-dir").into());
    }
    // A proc-macro of this crate runs programs that may read the whole environment: a job is
    // given only the variables earlier compiles looked up, so the worker's would differ.
    if job.known.iter().any(|l| l.whole_environment) {
        return Err(Fallback::Inputs("reads-whole-environment").into());
    }
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|_| Fallback::RuntimeUnavailable)?;
    runtime.block_on(run_async(job))
}

/// `call` within [`CALL_DEADLINE`], its failure as a reason.
async fn deadline<T>(
    call: Call,
    fut: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, Fallback> {
    match tokio::time::timeout(CALL_DEADLINE, fut).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(reason_for(call, &s)),
        Err(_) => {
            tracing::warn!(?call, "cluster call timed out");
            Err(Fallback::Call(call, CallFailure::Timeout))
        }
    }
}

async fn run_async(job: &RemoteJob<'_>) -> Result<Remote, Failed> {
    let mut clock = Phases::start();
    let mut scheduler = tokio::time::timeout(Duration::from_secs(5), crate::cluster::scheduler(job.config))
        .await
        .map_err(|_| Fallback::Call(Call::Scheduler, CallFailure::Timeout))?
        .map_err(|e| {
            tracing::warn!(error = %format!("{e:#}"), "scheduler unreachable");
            Fallback::Call(Call::Scheduler, CallFailure::Unreachable)
        })?;
    clock.lap("connect");
    ensure_toolchain(job, &mut scheduler).await?;
    clock.lap("toolchain");
    let allocation = deadline(
        Call::Allocate,
        scheduler.allocate(v1::AllocateRequest {
            toolchain: Some(to_digest(job.toolchain.0)),
            client_id: crate::commands::hostname(),
            protocol: ferry_proto::PROTOCOL,
        }),
    )
    .await?;
    let assignment = match allocation.result {
        Some(allocate_response::Result::Assigned(a)) => a,
        Some(allocate_response::Result::Local(local)) => {
            tracing::info!(why = %local.detail, "scheduler says compile locally");
            let reason = match local.reason() {
                v1::LocalReason::NoWorkers => LocalReason::NoWorkers,
                v1::LocalReason::ToolchainFetching => LocalReason::ToolchainFetching,
                v1::LocalReason::WorkersQuarantined => LocalReason::WorkersQuarantined,
                v1::LocalReason::NoCapacity | v1::LocalReason::Unspecified => LocalReason::NoCapacity,
            };
            return Err(Fallback::Local(reason).into());
        }
        None => return Err(Fallback::WorkerBadAnswer.into()),
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
    let (channel, _) = crate::cluster::channel(job.config, &url).await.map_err(|e| {
        // The reason (a certificate that does not name the worker's advertised address, a CA
        // this machine lacks) with what to do: `channel` adds the hint.
        tracing::warn!(worker = %assignment.worker_id, error = %format!("{e:#}"), "cannot reach the worker");
        Fallback::Call(Call::Worker, CallFailure::Unreachable)
    })?;
    // Only the job's grant goes to the worker, never this client's token.
    let mut worker = WorkerClient::new(channel).max_decoding_message_size(64 << 20);
    let grant = assignment.grant.clone();

    let digests: Vec<v1::Digest> = inputs.files.values().map(|f| to_digest(f.digest)).collect();
    clock.lap("worker-connect");
    let missing = deadline(Call::FindMissing, worker.find_missing(granted(v1::FindMissingRequest { digests }, &grant)))
        .await?
        .missing;
    clock.lap("find-missing");
    let bytes_sent = upload_blobs(&mut worker, &grant, &inputs, &missing).await?;
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
    let mut events = deadline(Call::RunJob, worker.run_job(granted(request, &grant))).await?;
    let mut forwarded = Vec::new();
    let received = receive(&mut events, job, &assignment.worker_id, &mut forwarded, &mut clock).await;
    let (run, held, outputs, observed) = received.map_err(|reason| Failed { reason, forwarded })?;
    let _ = std::io::stderr().write_all(&held);
    let _ = std::io::stdout().write_all(&run.stdout);
    tracing::debug!(krate = %job.rustc.crate_name, files = inputs.files.len(), bytes_sent, phases = %clock, "remote job");
    Ok(Remote { run, worker: assignment.worker_id, bytes_sent, outputs, observed })
}

/// Reads a job's events to the end: stdout and stderr kept (artifact notifications passed to
/// cargo at once, recorded in `forwarded`; diagnostics held back), declared outputs written as
/// they complete, and the worker's observations checked against this machine as they arrive.
async fn receive(
    events: &mut tonic::Streaming<v1::JobEvent>,
    job: &RemoteJob<'_>,
    worker: &str,
    forwarded: &mut Vec<Vec<u8>>,
    clock: &mut Phases,
) -> Result<(RunOutput, Vec<u8>, HashMap<String, Vec<u8>>, InputList), Fallback> {
    let declared = outputs(job);
    let mut run = RunOutput { status: std::process::ExitStatus::from_raw(0), stdout: Vec::new(), stderr: Vec::new() };
    let mut held = Vec::new();
    let mut partial: BTreeMap<String, (bool, Vec<u8>)> = BTreeMap::new();
    let mut received = HashMap::new();
    let mut total = 0u64;
    let mut finished = None;
    let mut observed = None;
    let mut checked = false;
    loop {
        let event = match tokio::time::timeout(EVENT_IDLE, events.message()).await {
            Ok(Ok(Some(e))) => e,
            Ok(Ok(None)) => break,
            // The worker's own report of a job it could not run, versus the connection breaking.
            Ok(Err(s)) if s.code() == tonic::Code::Internal => {
                tracing::warn!(worker, error = %s.message(), "the worker could not run the job");
                return Err(Fallback::WorkerError);
            }
            Ok(Err(s)) => {
                tracing::warn!(worker, status = %s.message(), "worker lost during the job");
                return Err(Fallback::WorkerLost);
            }
            Err(_) => return Err(Fallback::WorkerSilent),
        };
        let streamed = match &event.kind {
            Some(job_event::Kind::Stdout(data)) => run.stdout.len() + data.len(),
            Some(job_event::Kind::Stderr(data)) => run.stderr.len() + data.len(),
            _ => 0,
        };
        if streamed > MAX_STREAM_BYTES {
            tracing::warn!(worker, "the worker sent more than {MAX_STREAM_BYTES} bytes of one stream");
            return Err(Fallback::OutputRejected);
        }
        match event.kind {
            Some(job_event::Kind::Stdout(data)) => run.stdout.extend_from_slice(&data),
            Some(job_event::Kind::Stderr(data)) => {
                // cargo starts dependents at the `.rmeta` announcement: passed on only once the
                // worker's observation of what it was made from has been checked, else held back
                // like a diagnostic (and re-announced by a local compile if the job fails).
                let artifact = data.starts_with(br#"{"$message_type":"artifact""#);
                if artifact && (checked || !contains(&data, br#""emit":"metadata""#)) {
                    clock.lap("artifact");
                    let _ = std::io::stderr().write_all(&data);
                    forwarded.push(data.strip_suffix(b"\n").unwrap_or(&data).to_vec());
                } else {
                    held.extend_from_slice(&data);
                }
                run.stderr.extend_from_slice(&data);
            }
            Some(job_event::Kind::Output(chunk)) => {
                // Only the outputs this compile declares, within the caps: a worker never
                // writes anywhere else on this machine.
                if !declared.contains(&chunk.path) {
                    tracing::warn!(worker, path = %chunk.path, "the worker sent an output that was not asked for");
                    return Err(Fallback::OutputRejected);
                }
                let entry = partial.entry(chunk.path.clone()).or_insert((chunk.executable, Vec::new()));
                total += chunk.data.len() as u64;
                if entry.1.len() as u64 + chunk.data.len() as u64 > MAX_OUTPUT_BYTES || total > MAX_OUTPUTS_BYTES {
                    return Err(Fallback::OutputRejected);
                }
                entry.1.extend_from_slice(&chunk.data);
                if chunk.last {
                    let (executable, bytes) = partial.remove(&chunk.path).expect("just inserted");
                    super::replay::write_atomic(Path::new(&chunk.path), &bytes, executable)
                        .map_err(|_| Fallback::OutputWriteFailed)?;
                    received.insert(chunk.path, bytes);
                }
            }
            Some(job_event::Kind::Observed(o)) => {
                let list = verify_observation(job, &o)?;
                checked = true;
                if o.complete {
                    observed = Some(list);
                }
            }
            Some(job_event::Kind::Finished(f)) => {
                clock.lap("finished");
                finished = Some(f)
            }
            None => {}
        }
    }
    let finished = finished.ok_or(Fallback::WorkerLost)?;
    if !finished.limit.is_empty() {
        tracing::warn!(worker, limit = %finished.limit, "remote job stopped by a sandbox limit");
        return Err(Fallback::SandboxLimit);
    }
    run.status = match (finished.exit_code, finished.signal) {
        (Some(code), _) => std::process::ExitStatus::from_raw((code & 0xff) << 8),
        (None, Some(signal)) => std::process::ExitStatus::from_raw(signal & 0x7f),
        (None, None) => return Err(Fallback::WorkerBadAnswer),
    };
    if run.status.code() != Some(0) {
        return Err(Fallback::RemoteExit(run.status.code()));
    }
    if declared.iter().any(|o| !received.contains_key(o)) {
        return Err(Fallback::MissingOutput);
    }
    let observed = observed.ok_or(Fallback::RemoteObservationIncomplete)?;
    Ok((run, held, received, observed))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A request to a worker, carrying the job's grant.
fn granted<T>(message: T, grant: &[u8]) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    ferry_proto::attach_grant(&mut request, grant);
    request
}

/// The worker's observation, accepted only when this machine derives the same result key from it.
fn verify_observation(job: &RemoteJob, o: &v1::Observed) -> Result<InputList, Fallback> {
    if !o.incomplete.is_empty() {
        tracing::info!(krate = %job.rustc.crate_name, why = %o.incomplete, "the worker could not observe the whole job");
        return Err(Fallback::RemoteObservationIncomplete);
    }
    let list: InputList = serde_json::from_slice(&o.list).map_err(|_| Fallback::WorkerBadAnswer)?;
    let theirs = ferry_proto::digest(o.key.as_ref(), "key").map_err(|_| Fallback::WorkerBadAnswer)?;
    let list = job.config.basedirs.restore_list(list);
    let ours = recipe::result_key(&job.pre, &list, &job.config.basedirs, &mut LocalInputs { cwd: job.cwd, seen: None });
    if ours.as_ref().map(|k| k.finish().0) != Some(theirs) {
        tracing::info!(krate = %job.rustc.crate_name, "the worker observed other inputs than this machine has");
        if let Some(ours) = &ours {
            // The worker logs its own parts (debug): the two lists show which input differs.
            let parts: Vec<String> = ours.parts().iter().map(|p| format!("{} = {}", p.name, p.value)).collect();
            tracing::debug!(krate = %job.rustc.crate_name, parts = %parts.join("; "), "this machine's key parts");
        }
        return Err(Fallback::RemoteInputsDiffer);
    }
    Ok(list)
}

/// When a background upload ended (its lock is free) and the toolchain is still not on the
/// scheduler, that upload failed (its log says why): compiles stay local without starting another
/// one until this long after it started.
const UPLOAD_RETRY: Duration = Duration::from_secs(300);

/// Makes sure the scheduler has the toolchain. When it does not, the build does not wait for it:
/// the first wrapper to notice starts `ferry toolchain upload` in the background (detached, holding
/// the upload lock for as long as it runs, logging to `toolchains/upload-<id>.log`), and this
/// compile, like every one until the toolchain is on the scheduler, is local (`toolchain-uploading`).
async fn ensure_toolchain(job: &RemoteJob<'_>, scheduler: &mut crate::cluster::Scheduler) -> Result<(), Fallback> {
    let id = Some(to_digest(job.toolchain.0));
    let has = deadline(Call::HasToolchain, scheduler.has_toolchain(v1::ToolchainRef { id: id.clone() })).await?;
    if has.present {
        return Ok(());
    }
    if has.upload_refused {
        // Packing it (hundreds of MiB, seconds of every core) would only be refused.
        return Err(Fallback::ToolchainNotUploaded);
    }
    let lock_path = crate::files::toolchain_upload_lock(&job.config.cache_dir, &job.toolchain);
    let lock = crate::files::lock_file(&lock_path).map_err(|_| Fallback::ToolchainLock)?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => return Err(Fallback::ToolchainUploading),
        Err(fs::TryLockError::Error(_)) => return Err(Fallback::ToolchainLock),
    }
    // It may have landed between the two questions.
    if deadline(Call::HasToolchain, scheduler.has_toolchain(v1::ToolchainRef { id })).await?.present {
        return Ok(());
    }
    let attempt = lock_path.with_extension("started");
    if crate::files::fresh(&attempt, UPLOAD_RETRY) {
        return Err(Fallback::ToolchainUploadFailed);
    }
    let log = job.config.cache_dir.join(format!("toolchains/upload-{}.log", job.toolchain));
    let started = fs::write(&attempt, b"").and_then(|()| start_upload(job, &lock, &log));
    match started {
        Ok(()) => {
            tracing::info!(toolchain = %job.toolchain, log = %log.display(), "uploading the toolchain in the background");
            Err(Fallback::ToolchainUploading)
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the toolchain upload");
            Err(Fallback::ToolchainUploadFailed)
        }
    }
}

/// Starts `ferry toolchain upload` for this job's toolchain, detached from the build (its own
/// session, none of cargo's stdio), inheriting `lock` so the lock is held until it exits.
fn start_upload(job: &RemoteJob, lock: &fs::File, log: &Path) -> std::io::Result<()> {
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

fn gather(job: &RemoteJob) -> Result<Inputs, Fallback> {
    let mut inputs = Inputs::default();
    let out_dir = job.rustc.out_dir.as_ref().map(|d| absolute(job.cwd, d));
    if job.known.is_empty() {
        // Never compiled before: the whole package.
        let manifest_dir =
            std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from).ok_or(Fallback::Inputs("not-under-cargo"))?;
        walk(&manifest_dir, &mut inputs, out_dir.as_deref())?;
    } else {
        // What earlier compiles of this scope read (what no longer exists is simply not sent).
        for list in job.known {
            for path in list.files.iter().chain(&list.present) {
                let path = absolute(job.cwd, path);
                if shippable(job, &path) {
                    add_existing(&path, &mut inputs)?;
                }
            }
            for dir in &list.listings {
                let dir = absolute(job.cwd, dir);
                if shippable(job, &dir) && dir.is_dir() {
                    walk(&dir, &mut inputs, out_dir.as_deref())?;
                }
            }
        }
    }
    add_file(&absolute(job.cwd, &job.rustc.input), &mut inputs)?;
    for (_, path) in &job.rustc.externs {
        add_file(&absolute(job.cwd, path), &mut inputs)?;
    }
    for (kind, dir) in &job.rustc.search_paths {
        if kind != "dependency" {
            continue;
        }
        let dir = absolute(job.cwd, dir);
        inputs.dirs.push(dir.display().to_string());
        for entry in fs::read_dir(&dir).map_err(|_| Fallback::Inputs("dependency-dir-unreadable"))?.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "rmeta" || e == "so") {
                add_file(&path, &mut inputs)?;
            }
        }
    }
    if let Some(build_out) = std::env::var_os("OUT_DIR") {
        walk(&absolute(job.cwd, &build_out), &mut inputs, None)?;
    }
    if let Some(out) = &out_dir {
        inputs.dirs.push(out.display().to_string());
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

/// Can a worker take this path into a job (not a system directory, not the toolchain)?
fn shippable(job: &RemoteJob, path: &Path) -> bool {
    shippable_place(path) && !path.starts_with(&job.compiler.root)
}

/// Outside the system directories a worker has its own of (`/usr/local` is not one of them).
fn shippable_place(path: &Path) -> bool {
    let top = path.components().nth(1).map(|c| c.as_os_str().to_owned()).unwrap_or_default();
    !SYSTEM_DIRS.iter().any(|d| OsStr::new(d) == top)
        || (path.starts_with("/usr/local") && path != Path::new("/usr/local"))
}

/// Adds every file under `dir`, skipping VCS directories and the build's own target directory
/// (any directory the output directory lies in), and records every directory.
fn walk(dir: &Path, inputs: &mut Inputs, out_dir: Option<&Path>) -> Result<(), Fallback> {
    inputs.dirs.push(dir.display().to_string());
    let entries = fs::read_dir(dir).map_err(|_| Fallback::Inputs("package-unreadable"))?;
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let Ok(kind) = entry.file_type() else { continue };
        if kind.is_dir() {
            if VCS_DIRS.iter().any(|s| name == *s) || out_dir.is_some_and(|o| o.starts_with(&path)) {
                continue;
            }
            walk(&path, inputs, out_dir)?;
        } else if kind.is_file() || (kind.is_symlink() && path.is_file()) {
            add_file(&path, inputs)?;
        }
        if inputs.files.len() > MAX_FILES {
            return Err(Fallback::Inputs("too-many-input-files"));
        }
    }
    Ok(())
}

/// [`add_file`] for a path that may be gone or be a directory.
fn add_existing(path: &Path, inputs: &mut Inputs) -> Result<(), Fallback> {
    match fs::metadata(path) {
        Ok(m) if m.is_file() => add_file(path, inputs),
        Ok(m) if m.is_dir() => {
            inputs.dirs.push(path.display().to_string());
            Ok(())
        }
        _ => Ok(()),
    }
}

fn add_file(path: &Path, inputs: &mut Inputs) -> Result<(), Fallback> {
    let key = path.display().to_string();
    if inputs.files.contains_key(&key) {
        return Ok(());
    }
    let meta = fs::metadata(path).map_err(|_| Fallback::Inputs("input-unreadable"))?;
    inputs.bytes += meta.len();
    if inputs.bytes > MAX_BYTES {
        return Err(Fallback::Inputs("inputs-too-large"));
    }
    let digest = crate::digests::digest(path, &meta).ok_or(Fallback::Inputs("input-unreadable"))?;
    let executable = meta.permissions().mode() & 0o111 != 0;
    inputs.files.insert(key, InputFile { digest, executable, source: path.to_owned() });
    Ok(())
}

async fn upload_blobs(
    worker: &mut WorkerClient<tonic::transport::Channel>,
    grant: &[u8],
    inputs: &Inputs,
    missing: &[v1::Digest],
) -> Result<u64, Fallback> {
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
    let reader = tokio::task::spawn_blocking(move || -> Result<(), Fallback> {
        for (digest, path) in sources {
            let bytes = fs::read(&path).map_err(|_| Fallback::Inputs("input-unreadable"))?;
            if *blake3::hash(&bytes).as_bytes() != digest {
                return Err(Fallback::Inputs("input-changed"));
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
    let upload = worker.upload_blobs(granted(tokio_stream::wrappers::ReceiverStream::new(rx), grant));
    match tokio::time::timeout(Duration::from_secs(600), upload).await {
        Ok(Ok(_)) => {}
        Ok(Err(s)) => return Err(reason_for(Call::UploadBlobs, &s)),
        Err(_) => return Err(Fallback::Call(Call::UploadBlobs, CallFailure::Timeout)),
    }
    reader.await.map_err(|_| Fallback::Inputs("input-unreadable"))??;
    Ok(total)
}

/// Variables cargo sets for each crate, sent to every job.
const CRATE_ENV_PREFIXES: &[&str] = &["CARGO_PKG_", "CARGO_MANIFEST_", "CARGO_BIN_EXE_"];
const CRATE_ENV: &[&str] = &[
    "CARGO_CRATE_NAME",
    "CARGO_BIN_NAME",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_TARGET_TMPDIR",
    "CARGO_RUSTC_CURRENT_DIR",
    "OUT_DIR",
    "RUSTC_BOOTSTRAP",
    "SOURCE_DATE_EPOCH",
];

/// The environment a job sees: cargo's variables for the crate, and every variable earlier
/// compiles of it looked up. Never a secret, a loader variable, or one of cargo's own settings:
/// a compile that reads a variable not sent sees it unset, which the key check catches.
fn environment(job: &RemoteJob) -> Vec<v1::EnvVar> {
    let learned: Vec<&String> = job.known.iter().flat_map(|l| l.env.iter()).collect();
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in std::env::vars_os() {
        let (Some(name), Some(value)) = (name.to_str(), value.to_str()) else { continue };
        let wanted = CRATE_ENV_PREFIXES.iter().any(|p| name.starts_with(p))
            || CRATE_ENV.contains(&name)
            || learned.iter().any(|l| *l == name);
        if wanted && !never_keyed(name) && !is_secret(name, value.as_bytes()) && !name.starts_with("LD_") {
            env.insert(name.to_owned(), value.to_owned());
        }
    }
    env.into_iter().map(|(name, value)| v1::EnvVar { name, value }).collect()
}

fn outputs(job: &RemoteJob) -> Vec<String> {
    job.rustc.outputs().into_iter().map(|(p, _)| absolute(job.cwd, &p).display().to_string()).collect()
}

fn reason_for(call: Call, s: &tonic::Status) -> Fallback {
    tracing::warn!(?call, code = ?s.code(), message = %s.message(), "cluster call failed");
    // The worker is still fetching the toolchain (it goes on; the next jobs find it there).
    if call == Call::RunJob && s.code() == tonic::Code::Unavailable && s.message().contains("is being fetched") {
        return Fallback::Local(crate::reason::LocalReason::ToolchainFetching);
    }
    let how = match s.code() {
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => CallFailure::Refused,
        tonic::Code::Unavailable => CallFailure::Unavailable,
        tonic::Code::DeadlineExceeded => CallFailure::Timeout,
        _ => CallFailure::Failed,
    };
    Fallback::Call(call, how)
}
