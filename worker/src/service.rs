//! The worker's gRPC service: which blobs are missing, receiving blobs (verified by digest), and
//! running one job in the sandbox while streaming its stdout/stderr, then its declared outputs.
//!
//! Nothing from the wire is trusted: paths must be absolute and normal, may not land in system
//! directories or inside the toolchain mount, the program must be the toolchain's own rustc, every
//! input must already be here by digest, and a job must declare at least one output. Outputs are
//! read only from the declared paths and only when they are regular files (never through a link).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_proto::v1::worker_server::Worker as WorkerApi;
use ferry_proto::v1::{self, job_event};
use ferry_proto::{Grant, GrantError, absolute_path, digest, digests, to_digest};
use ferry_toolchains::ToolchainId;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::blobs::{BlobStore, Hold, StoreError};
use crate::observe::{JobObserver, JobView};
use crate::sandbox::{self, SandboxConfig, SandboxJob};
use crate::toolchain_cache::ToolchainCache;

const CHUNK: usize = 1 << 20;
/// The largest input blob, and the most one `UploadBlobs` call may carry: a client cannot fill
/// the worker's disk with one endless stream.
const MAX_BLOB_BYTES: u64 = 1 << 30;
const MAX_UPLOAD_BYTES: u64 = 4 << 30;
/// `UploadBlobs` streams at once per job slot, and per job (grant).
pub(crate) const UPLOADS_PER_SLOT: usize = 2;
const UPLOADS_PER_JOB: usize = 2;
/// The most digests one `FindMissing` may name (a job's inputs are far fewer).
const MAX_FIND_DIGESTS: usize = 1 << 16;
/// How long a `RunJob` call may wait for a slot and its toolchain together before it answers:
/// under the client's 15 s deadline for the call (`CALL_DEADLINE` in the client), so a client
/// hears "busy" or "fetching" instead of timing out. A toolchain fetch goes on after that.
pub const START_BUDGET: Duration = Duration::from_secs(10);
/// The largest output a job may send back (clients refuse more anyway).
const MAX_OUTPUT_BYTES: u64 = 4 << 30;
/// Top-level directories a job's files may never be placed in; under `/usr` only `/usr/local`
/// may hold them (grafted onto the worker's own, see `sandbox::graft`).
const SYSTEM_DIRS: &[&str] = &["usr", "lib", "lib64", "bin", "sbin", "etc", "proc", "dev", "sys", "run", "boot"];

/// Fetches toolchain archives (from the scheduler) into a file.
pub type Fetcher = Arc<
    dyn Fn(
            ToolchainId,
            mpsc::Sender<Result<Vec<u8>, String>>,
        ) -> Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>>
        + Send
        + Sync,
>;

#[derive(Clone)]
pub struct Service {
    pub(crate) shared: Arc<Shared>,
}

pub(crate) struct Shared {
    /// This worker's id, as registered: grants name it.
    pub worker_id: String,
    /// Grant keys of this worker's latest scheduler sessions (newest last; a reconnect makes a
    /// new one, and grants made just before it still verify with the previous).
    pub grant_keys: Mutex<Vec<ferry_proto::GrantKey>>,
    /// The scheduler's clock minus this machine's (ms), measured when the session started:
    /// grants expire on the scheduler's clock.
    pub clock_offset_ms: std::sync::atomic::AtomicI64,
    /// Job ids that started here, with their grant's expiry: each grant runs one job, once.
    pub granted: Mutex<HashMap<u64, u64>>,
    pub blobs: BlobStore,
    pub toolchains: ToolchainCache,
    pub sandbox: SandboxConfig,
    pub jobs_dir: PathBuf,
    /// Where the observer's library is installed (`<data dir>/observe`).
    pub observe_dir: PathBuf,
    pub slots: Semaphore,
    /// `UploadBlobs` streams received at once: [`UPLOADS_PER_SLOT`] per slot in all, and
    /// [`UPLOADS_PER_JOB`] per grant; each holds one temp blob at a time (at most
    /// [`MAX_BLOB_BYTES`]), so these bound the temp files in `blobs/tmp`.
    pub uploads: Uploads,
    pub fetch: Fetcher,
    /// Jobs running now, and jobs that ended since the last report (for the scheduler).
    pub running: Mutex<HashSet<u64>>,
    pub ended: Mutex<Vec<v1::JobEnded>>,
    /// Wakes the session to report at once when a job ends, so its slot is free for the next
    /// allocation without waiting for the periodic report.
    pub job_ended: tokio::sync::Notify,
    /// Publishes successful jobs' results to the shared cache tier (None: `shared_cache = off`).
    pub publisher: Option<crate::publish::Publisher>,
    pub metrics: crate::http::Metrics,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service").field("jobs_dir", &self.shared.jobs_dir).finish()
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// A job request after validation.
struct Job {
    id: u64,
    toolchain: ToolchainId,
    toolchain_root: String,
    program: String,
    args: Vec<String>,
    cwd: String,
    env: Vec<(String, String)>,
    inputs: Vec<(String, [u8; 32], bool)>,
    outputs: Vec<String>,
    dirs: Vec<String>,
    basedirs: Vec<String>,
}

#[tonic::async_trait]
impl WorkerApi for Service {
    type RunJobStream = BoxStream<v1::JobEvent>;

    async fn find_missing(
        &self,
        request: Request<v1::FindMissingRequest>,
    ) -> Result<Response<v1::FindMissingResponse>, Status> {
        let grant = granted(&request)?;
        if request.get_ref().digests.len() > MAX_FIND_DIGESTS {
            return Err(Status::invalid_argument(format!(
                "FindMissing names {} digests; at most {MAX_FIND_DIGESTS} may be asked at once",
                request.get_ref().digests.len()
            )));
        }
        let wanted = digests(&request.get_ref().digests, "digests")?;
        // What is here now stays until the job runs, or its grant expires.
        let hold = Hold::until(grant.job_id, grant.expires_ms);
        // Off the async threads: a blob kept over an unclean stop is hashed on its first lookup.
        let shared = Arc::clone(&self.shared);
        let missing = tokio::task::spawn_blocking(move || shared.blobs.missing(&wanted, hold))
            .await
            .map_err(|e| Status::internal(format!("looking up blobs: {e}")))?
            .map_err(store_status)?;
        Ok(Response::new(v1::FindMissingResponse { missing: missing.into_iter().map(to_digest).collect() }))
    }

    async fn upload_blobs(
        &self,
        request: Request<Streaming<v1::BlobChunk>>,
    ) -> Result<Response<v1::UploadBlobsResponse>, Status> {
        let grant = granted(&request)?;
        let hold = Hold::until(grant.job_id, grant.expires_ms);
        let _receiving = self.shared.uploads.start(grant.job_id)?;
        // No blob larger than the whole store is written to disk only to be refused.
        let max_blob = MAX_BLOB_BYTES.min(self.shared.blobs.limit());
        let mut inbound = request.into_inner();
        let mut current: Option<crate::blobs::IncomingBlob> = None;
        let mut stored = 0;
        let mut total = 0u64;
        while let Some(chunk) = inbound.message().await? {
            total += chunk.data.len() as u64;
            if total > MAX_UPLOAD_BYTES {
                return Err(Status::resource_exhausted(format!(
                    "one upload may carry at most {MAX_UPLOAD_BYTES} bytes"
                )));
            }
            let d = digest(chunk.digest.as_ref(), "digest")?;
            if current.as_ref().is_some_and(|b| b.digest() != d) {
                return Err(Status::invalid_argument("a blob's chunks must be consecutive and end with 'last'"));
            }
            let blob = match &mut current {
                Some(b) => b,
                None => current
                    .insert(self.shared.blobs.begin(d).map_err(|e| Status::internal(format!("storing blob: {e}")))?),
            };
            if blob.received + chunk.data.len() as u64 > max_blob {
                return Err(Status::resource_exhausted(format!(
                    "a blob may be at most {max_blob} bytes here (the largest blob, or this worker's \
                     blob_store_size)"
                )));
            }
            blob.write(&chunk.data).map_err(|e| Status::internal(format!("storing blob: {e}")))?;
            self.shared.metrics.blob_bytes(chunk.data.len() as u64);
            if chunk.last {
                let blob = current.take().expect("current blob");
                self.shared.blobs.finish(blob, hold).map_err(store_status)?;
                stored += 1;
            }
        }
        if current.is_some() {
            return Err(Status::invalid_argument("the stream ended inside a blob (no chunk marked 'last')"));
        }
        Ok(Response::new(v1::UploadBlobsResponse { stored }))
    }

    async fn run_job(&self, request: Request<v1::RunJobRequest>) -> Result<Response<Self::RunJobStream>, Status> {
        let grant = granted(&request)?;
        match self.start_job(&grant, request.into_inner()).await {
            Ok(events) => Ok(Response::new(events)),
            Err((status, infrastructure)) => {
                // The scheduler frees the job's slot at once (and counts a worker's own failure).
                let error = if infrastructure { status.message().to_owned() } else { String::new() };
                self.shared.metrics.job(if infrastructure { "error" } else { "refused" }, None);
                self.shared.ended.lock().unwrap_or_else(|p| p.into_inner()).push(v1::JobEnded {
                    job_id: grant.job_id,
                    ok: !infrastructure,
                    duration_ms: 0,
                    error,
                    refused: !infrastructure,
                });
                self.shared.job_ended.notify_one();
                Err(status)
            }
        }
    }
}

impl Service {
    /// Checks and starts a granted job; Err carries whether the failure is this worker's own.
    async fn start_job(
        &self,
        grant: &Grant,
        request: v1::RunJobRequest,
    ) -> Result<BoxStream<v1::JobEvent>, (Status, bool)> {
        let refused = |s: Status| (s, false);
        let job = validate(request).map_err(refused)?;
        if grant.job_id != job.id {
            return Err(refused(Status::permission_denied(format!(
                "the grant is for job {}, not job {}: a worker runs only the job it was granted",
                grant.job_id, job.id
            ))));
        }
        // Claimed at the first call: the grant is spent whatever happens next. Should the caller
        // go away while this waits (a slot, the toolchain), its slot is given back at once.
        self.shared.claim(grant).map_err(refused)?;
        let mut unclaimed = Abandoned { shared: Arc::clone(&self.shared), job_id: job.id, armed: true };
        let started = self.prepare_job(job).await;
        unclaimed.armed = false;
        started
    }

    /// The rest of [`Service::start_job`], once the job is claimed.
    async fn prepare_job(&self, job: Job) -> Result<BoxStream<v1::JobEvent>, (Status, bool)> {
        let refused = |s: Status| (s, false);
        // The job holds its inputs until it ends: none is evicted before it is placed.
        let inputs_held = InputsHeld { shared: Arc::clone(&self.shared), job: job.id };
        let running = Hold::running(job.id);
        // Off the async threads, as in FindMissing.
        let digests: Vec<[u8; 32]> = job.inputs.iter().map(|(_, d, _)| *d).collect();
        let shared = Arc::clone(&self.shared);
        let missing = tokio::task::spawn_blocking(move || shared.blobs.missing(&digests, running))
            .await
            .map_err(|e| refused(Status::internal(format!("looking up blobs: {e}"))))?
            .map_err(|e| refused(store_status(e)))?
            .len();
        if missing > 0 {
            let message = format!("{missing} input blobs are missing; upload them first");
            return Err(refused(Status::failed_precondition(message)));
        }
        // The slot wait and the toolchain fetch share START_BUDGET, inside the client's deadline
        // for this call, so the client hears why rather than timing out.
        let started = Instant::now();
        let shared = Arc::clone(&self.shared);
        let permit = Arc::clone(&self.shared).slots_permit(START_BUDGET).await.map_err(refused)?;
        let id = job.toolchain;
        // The fetch runs on its own task: a caller that gives up does not cancel it, and the
        // jobs after it find the toolchain unpacked.
        let fetch = {
            let shared = Arc::clone(&shared);
            tokio::spawn(async move { shared.toolchain(id).await })
        };
        let left = START_BUDGET.saturating_sub(started.elapsed());
        let lease = match tokio::time::timeout(left, fetch).await {
            Ok(Ok(lease)) => lease,
            Ok(Err(e)) => return Err((Status::internal(format!("toolchain {id}: fetch task: {e}")), true)),
            Err(_) => {
                let message = format!("toolchain {id} is being fetched; it will be here for the next jobs");
                return Err(refused(Status::unavailable(message)));
            }
        }
        .map_err(|e| (Status::unavailable(format!("toolchain {id}: {e}")), !e.contains("is not stored here")))?;
        if !shared.running.lock().unwrap_or_else(|p| p.into_inner()).insert(job.id) {
            return Err(refused(Status::already_exists(format!("job {} is already running here", job.id))));
        }
        let (tx, rx) = mpsc::channel::<Result<v1::JobEvent, Status>>(64);
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let (outcome, error) = match run_blocking(&shared, &job, &lease.dir, tx) {
                Ok(outcome) => (outcome, String::new()),
                Err(JobFailure::ClientGone) => ("client-gone", String::new()),
                Err(JobFailure::Infrastructure(error)) => {
                    tracing::warn!(job = job.id, %error, "a job could not run");
                    ("error", error)
                }
            };
            shared.metrics.job(outcome, Some(started.elapsed().as_secs_f64()));
            drop(inputs_held);
            drop(lease);
            drop(permit);
            shared.running.lock().unwrap_or_else(|p| p.into_inner()).remove(&job.id);
            shared.ended.lock().unwrap_or_else(|p| p.into_inner()).push(v1::JobEnded {
                job_id: job.id,
                ok: error.is_empty(),
                duration_ms: started.elapsed().as_millis() as u64,
                error,
                refused: false,
            });
            shared.job_ended.notify_one();
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }
}

/// A claimed job whose `RunJob` call was dropped before the job started (its client went away
/// while it waited for a slot or its toolchain): reports it refused when dropped armed, so the
/// scheduler frees its slot at once instead of after the claim timeout.
struct Abandoned {
    shared: Arc<Shared>,
    job_id: u64,
    armed: bool,
}

impl Drop for Abandoned {
    fn drop(&mut self) {
        if self.armed {
            self.shared.metrics.job("client-gone", None);
            self.shared.ended.lock().unwrap_or_else(|p| p.into_inner()).push(v1::JobEnded {
                job_id: self.job_id,
                ok: true,
                duration_ms: 0,
                error: String::new(),
                refused: true,
            });
            self.shared.job_ended.notify_one();
        }
    }
}

/// Lets go of the blobs a job holds when dropped: when it ends, or when it does not start.
struct InputsHeld {
    shared: Arc<Shared>,
    job: u64,
}

impl Drop for InputsHeld {
    fn drop(&mut self) {
        self.shared.blobs.release(self.job);
    }
}

/// A blob not stored, as the client hears it: a full store is this worker's state, not the
/// client's mistake (it compiles locally and may try again).
fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::Mismatch { .. } => Status::invalid_argument(e.to_string()),
        StoreError::TooLarge { .. } | StoreError::Full { .. } | StoreError::JobShare { .. } => {
            Status::resource_exhausted(e.to_string())
        }
        StoreError::Io(_) => Status::internal(e.to_string()),
    }
}

/// The `UploadBlobs` streams being received, in all and per job.
#[derive(Debug)]
pub(crate) struct Uploads {
    limit: usize,
    per_job: Mutex<HashMap<u64, usize>>,
}

/// One stream's place among [`Uploads`]; given back when dropped.
struct Receiving<'a> {
    uploads: &'a Uploads,
    job: u64,
}

impl Uploads {
    pub(crate) fn new(slots: u32) -> Uploads {
        Uploads { limit: (slots as usize * UPLOADS_PER_SLOT).max(1), per_job: Mutex::new(HashMap::new()) }
    }

    /// A place for one more stream of `job`, or the reason there is none (the client compiles
    /// locally and says why).
    fn start(&self, job: u64) -> Result<Receiving<'_>, Status> {
        let mut per_job = self.per_job.lock().unwrap_or_else(|p| p.into_inner());
        let all: usize = per_job.values().sum();
        if all >= self.limit {
            return Err(Status::resource_exhausted(format!(
                "this worker is receiving {all} uploads at once ({UPLOADS_PER_SLOT} per slot); try again later"
            )));
        }
        let mine = per_job.entry(job).or_default();
        if *mine >= UPLOADS_PER_JOB {
            return Err(Status::resource_exhausted(format!(
                "job {job} already has {UPLOADS_PER_JOB} uploads in progress here, the most one job may"
            )));
        }
        *mine += 1;
        Ok(Receiving { uploads: self, job })
    }
}

impl Drop for Receiving<'_> {
    fn drop(&mut self) {
        let mut per_job = self.uploads.per_job.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = per_job.get_mut(&self.job) {
            *n -= 1;
            if *n == 0 {
                per_job.remove(&self.job);
            }
        }
    }
}

/// The grant the interceptor checked (every call to this service has one).
fn granted<T>(request: &Request<T>) -> Result<Grant, Status> {
    request.extensions().get::<Grant>().cloned().ok_or_else(|| Status::unauthenticated(GrantError::Missing.to_string()))
}

impl Shared {
    /// Checks a call's job grant: made by this worker's scheduler, for this worker, not expired.
    pub fn check_grant<T>(&self, request: &Request<T>) -> Result<Grant, GrantError> {
        let bytes = ferry_proto::grant_bytes(request).ok_or(GrantError::Missing)?;
        let keys = self.grant_keys.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let offset = self.clock_offset_ms.load(std::sync::atomic::Ordering::Relaxed);
        Grant::verify(&bytes, &keys, &self.worker_id, offset)
    }

    /// Marks a granted job as started; a second start of the same job is refused.
    fn claim(&self, grant: &Grant) -> Result<(), Status> {
        let now = ferry_proto::now_ms();
        let mut granted = self.granted.lock().unwrap_or_else(|p| p.into_inner());
        granted.retain(|_, expires| *expires >= now);
        if granted.insert(grant.job_id, grant.expires_ms).is_some() {
            return Err(Status::already_exists(format!(
                "job {} was already run here; a grant runs one job once",
                grant.job_id
            )));
        }
        Ok(())
    }

    /// `id` unpacked here, fetched from the scheduler first unless present (concurrent callers
    /// share one fetch); the lease keeps it from eviction.
    pub async fn toolchain(&self, id: ToolchainId) -> Result<crate::toolchain_cache::Lease, String> {
        let fetch = Arc::clone(&self.fetch);
        self.toolchains.get(id, move |dest| fetch(id, dest)).await.map(|(lease, _)| lease)
    }

    async fn slots_permit(self: Arc<Self>, within: Duration) -> Result<SlotPermit, Status> {
        let permit = tokio::time::timeout(within, self.slots.acquire())
            .await
            .map_err(|_| {
                Status::resource_exhausted(format!("every slot of this worker stayed busy for {} s", within.as_secs()))
            })?
            .map_err(|_| Status::unavailable("worker is shutting down"))?;
        permit.forget();
        Ok(SlotPermit(self))
    }
}

/// Gives its slot back when dropped.
struct SlotPermit(Arc<Shared>);

impl Drop for SlotPermit {
    fn drop(&mut self) {
        self.0.slots.add_permits(1);
    }
}

/// Why a job did not run to its end.
enum JobFailure {
    /// The client stopped listening: nothing is wrong with this worker.
    ClientGone,
    /// This worker could not run it (inputs not placed, sandbox broken): reported to the client
    /// as `INTERNAL` with this message, and to the scheduler, which quarantines a worker that
    /// keeps failing.
    Infrastructure(String),
}

/// Runs the job and streams its events.
fn run_blocking(
    shared: &Shared,
    job: &Job,
    toolchain: &Path,
    tx: mpsc::Sender<Result<v1::JobEvent, Status>>,
) -> Result<&'static str, JobFailure> {
    let send = |kind| tx.blocking_send(Ok(v1::JobEvent { kind: Some(kind) })).map_err(|_| ());
    let fail = |msg: String| {
        let _ = tx.blocking_send(Err(Status::internal(msg.clone())));
        JobFailure::Infrastructure(msg)
    };
    // Unique per call, whatever id the client claims: no two jobs ever share a tree.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let dir = shared.jobs_dir.join(format!("{}-{}", job.id, NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)));
    // Removed (its mounts undone) when this returns, whichever way.
    let mut job_dir =
        match crate::limits::JobDir::create(&dir, shared.sandbox.disk_quota.then_some(shared.sandbox.disk_bytes)) {
            Ok(d) => d,
            Err(e) => return Err(fail(format!("creating the job directory {}: {e}", dir.display()))),
        };
    let (placed_in, tree) = (job_dir.inputs(), job_dir.tree());
    let clock = Instant::now();
    let link = shared.sandbox.jobs_run_as_another_user();
    for (path, d, executable) in &job.inputs {
        if let Err(e) = shared.blobs.materialize(d, &placed_in.join(&path[1..]), *executable, link) {
            return Err(fail(format!("placing input {path}: {e}")));
        }
    }
    for d in job.dirs.iter().chain([&job.cwd]) {
        if let Err(e) = std::fs::create_dir_all(placed_in.join(&d[1..])) {
            return Err(fail(format!("creating {d}: {e}")));
        }
    }
    if let Err(e) = job_dir.seal() {
        return Err(fail(format!("mounting the job's size-limited tree: {e}")));
    }
    let run_as = shared.sandbox.run_as.filter(|_| shared.sandbox.jobs_run_as_another_user());
    let observer = match JobObserver::new(&shared.observe_dir, &job_dir.scratch(), run_as) {
        Ok(o) => o,
        Err(e) => {
            return Err(fail(format!("preparing the observer: {e}")));
        }
    };
    let mut env = job.env.clone();
    env.extend(JobObserver::env());
    let binds = observer.binds();
    let sandbox_job = SandboxJob {
        program: &job.program,
        args: &job.args,
        cwd: &job.cwd,
        env: &env,
        toolchain: (toolchain, &job.toolchain_root),
        tree: &tree,
        binds: &binds,
    };
    let inputs: HashMap<String, [u8; 32]> = job.inputs.iter().map(|(p, d, _)| (p.clone(), *d)).collect();
    let host = crate::observe::toolchain_host(toolchain);
    let view = JobView {
        toolchain: job.toolchain,
        toolchain_root: &job.toolchain_root,
        toolchain_host: &host,
        cwd: &job.cwd,
        args: &job.args,
        env: &job.env,
        inputs: &inputs,
        outputs: &job.outputs,
        basedirs: &job.basedirs,
        tree: &tree,
    };
    // What the job observed, sent to the client (which checks it against its own machine).
    let observed = |derived: &Result<crate::observe::Derived, String>, partial: bool| {
        let event = match derived {
            Ok(d) => v1::Observed {
                list: serde_json::to_vec(
                    &ferry_cache::rustc::Bases::new(job.basedirs.iter().cloned())
                        .map(|b| b.rebase_list(&d.list))
                        .unwrap_or_else(|_| d.list.clone()),
                )
                .unwrap_or_default(),
                key: Some(to_digest(d.key.0)),
                incomplete: String::new(),
                complete: !partial,
            },
            Err(why) => v1::Observed { list: Vec::new(), key: None, incomplete: why.clone(), complete: !partial },
        };
        job_event::Kind::Observed(event)
    };
    let placed = clock.elapsed();
    let mut streaming_ok = true;
    // stderr goes line by line: when rustc announces a finished dep-info or `.rmeta`, that file is
    // sent before the announcement, so the client can check the one and hand the other to cargo
    // while codegen continues.
    let mut line = Vec::new();
    // What was sent, kept for the shared cache entry: outputs by path (staged on disk when they
    // will be published), stdout and stderr (up to STREAM_KEEP_BYTES each).
    let publisher = shared.publisher.as_ref();
    let mut sent: HashMap<String, Sent> = HashMap::new();
    let (mut stdout, mut stderr) = (Kept::default(), Kept::default());
    let forward_stderr = |bytes: &[u8], sent: &mut HashMap<String, Sent>, stderr: &mut Kept| {
        if let Some((path, emit)) = early_artifact(bytes, &job.cwd)
            && job.outputs.contains(&path)
            && !sent.contains_key(&path)
        {
            sent.insert(path.clone(), send_output(&tree, &path, &send, publisher)?);
            if emit == "metadata" {
                // What the metadata was made from, checked by the client before cargo sees it.
                send(observed(&observer.derive(&view, true), true))?;
            }
        }
        stderr.keep(bytes);
        send(job_event::Kind::Stderr(bytes.to_vec()))
    };
    // A client that went away (cargo's Ctrl-C, its deadline) is noticed at once: its job is
    // killed, and its slot is free.
    let client_gone = {
        let tx = tx.clone();
        move || tx.is_closed()
    };
    let outcome = sandbox::run_until(
        &shared.sandbox,
        &sandbox_job,
        &mut |stream, data| match stream {
            sandbox::Stream::Stdout => {
                stdout.keep(data);
                streaming_ok &= send(job_event::Kind::Stdout(data.to_vec())).is_ok();
            }
            sandbox::Stream::Stderr => {
                line.extend_from_slice(data);
                while let Some(pos) = line.iter().position(|&b| b == b'\n') {
                    let complete: Vec<u8> = line.drain(..=pos).collect();
                    streaming_ok &= forward_stderr(&complete, &mut sent, &mut stderr).is_ok();
                }
                // A line longer than any artifact notice goes on as it is: held, it could grow
                // without bound.
                if line.len() > MAX_LINE_BYTES {
                    stderr.keep(&line);
                    streaming_ok &= send(job_event::Kind::Stderr(std::mem::take(&mut line))).is_ok();
                }
            }
        },
        &client_gone,
    );
    if !line.is_empty() {
        streaming_ok &= forward_stderr(&line, &mut sent, &mut stderr).is_ok();
    }
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            return Err(fail(format!("sandbox: {e}")));
        }
    };
    if outcome.exit_code != Some(0) && outcome.limit != Some(sandbox::Limit::Abandoned) {
        // For a `discrepancy` (failed here, fine on the client): what rustc said, in this log.
        let kept = &stderr.bytes;
        let shown = String::from_utf8_lossy(&kept[kept.len().saturating_sub(8 << 10)..]).into_owned();
        tracing::info!(job = job.id, exit_code = ?outcome.exit_code, limit = ?outcome.limit, stderr = ?shown, "a job failed");
    }
    if outcome.exit_code == Some(0) {
        for out in &job.outputs {
            if sent.contains_key(out) {
                continue;
            }
            match send_output(&tree, out, &send, publisher) {
                Ok(s) => sent.insert(out.clone(), s),
                Err(()) => break,
            };
        }
    }
    // Every output sent whole (only a dep-info may be empty) and staged, and the streams kept.
    let complete = job
        .outputs
        .iter()
        .all(|o| sent.get(o).is_some_and(|s| (s.bytes > 0 || o.ends_with(".d")) && s.staged.is_some()))
        && !stdout.over
        && !stderr.over;
    // Derived once: sent to the client, and published with the entry.
    let derived = if outcome.exit_code == Some(0) {
        let derived = observer.derive(&view, false);
        streaming_ok &= send(observed(&derived, false)).is_ok();
        derived.ok()
    } else {
        None
    };
    if let Some(publisher) = &shared.publisher
        && let Some(derived) = derived
        && outcome.limit.is_none()
        && streaming_ok
        && complete
    {
        publisher.submit(crate::publish::Finished {
            toolchain: job.toolchain,
            cwd: job.cwd.clone(),
            args: job.args.clone(),
            basedirs: job.basedirs.clone(),
            derived,
            stdout: stdout.bytes,
            stderr: stderr.bytes,
            outputs: sent.into_iter().filter_map(|(path, s)| Some((path, s.staged?))).collect(),
            compile_ms: outcome.duration.as_millis() as u64,
        });
    }
    let finished = v1::JobFinished {
        exit_code: outcome.exit_code,
        signal: outcome.signal,
        limit: outcome.limit.map(|l| l.to_string()).unwrap_or_default(),
        duration_ms: outcome.duration.as_millis() as u64,
    };
    let _ = send(job_event::Kind::Finished(finished));
    // The client has everything: end its stream before the tree is removed.
    drop(tx);
    let ran = clock.elapsed();
    drop(job_dir);
    tracing::debug!(
        job = job.id,
        inputs = job.inputs.len(),
        place_ms = placed.as_millis() as u64,
        rustc_ms = outcome.duration.as_millis() as u64,
        total_ms = ran.as_millis() as u64,
        cleanup_ms = (clock.elapsed() - ran).as_millis() as u64,
        "job done"
    );
    let outcome = match (outcome.exit_code, outcome.limit) {
        (_, Some(sandbox::Limit::Abandoned)) => return Err(JobFailure::ClientGone),
        (_, Some(_)) => "limit",
        (Some(0), None) => "succeeded",
        _ => "failed",
    };
    if streaming_ok { Ok(outcome) } else { Err(JobFailure::ClientGone) }
}

/// The longest stderr line held while looking for rustc's artifact notices (which are short).
const MAX_LINE_BYTES: usize = 1 << 20;

/// One output as it was sent: its size, and its staged copy when it will be published.
struct Sent {
    bytes: u64,
    staged: Option<crate::publish::Staged>,
}

/// A stream's bytes kept for the job's entry, up to [`crate::publish::STREAM_KEEP_BYTES`].
#[derive(Default)]
struct Kept {
    bytes: Vec<u8>,
    /// More came than is kept: the job is not published.
    over: bool,
}

impl Kept {
    fn keep(&mut self, data: &[u8]) {
        if self.over || self.bytes.len() + data.len() > crate::publish::STREAM_KEEP_BYTES {
            self.over = true;
            self.bytes = Vec::new();
        } else {
            self.bytes.extend_from_slice(data);
        }
    }
}

/// Streams one declared output, a chunk at a time, copying it into a staged file for the
/// publisher when there is one (nothing is held whole in memory). A missing output, one over the
/// cap, or one that cannot be read to its announced size, is not sent whole (the client notices)
/// and comes back as 0 bytes, not staged.
fn send_output(
    tree: &Path,
    out: &str,
    send: &dyn Fn(job_event::Kind) -> Result<(), ()>,
    publisher: Option<&crate::publish::Publisher>,
) -> Result<Sent, ()> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let nothing = Sent { bytes: 0, staged: None };
    // Opened beneath the tree without following any link, a regular file, within the cap.
    let Ok(mut file) = crate::beneath::open_beneath(tree, out) else { return Ok(nothing) };
    let Ok(meta) = file.metadata() else { return Ok(nothing) };
    let len = meta.len();
    if len > MAX_OUTPUT_BYTES {
        tracing::warn!(output = out, bytes = len, "an output over the cap is not sent");
        return Ok(nothing);
    }
    let executable = meta.permissions().mode() & 0o111 != 0;
    let mut staged = publisher.and_then(|p| p.stage(len));
    let count = len.div_ceil(CHUNK as u64).max(1);
    let mut buffer = vec![0u8; CHUNK.min(len as usize)];
    for i in 0..count {
        let size = (len - i * CHUNK as u64).min(CHUNK as u64) as usize;
        if file.read_exact(&mut buffer[..size]).is_err() {
            // Shorter than it was: what was sent is incomplete (no `last`), and the client drops it.
            return Ok(nothing);
        }
        if let Some(s) = &mut staged
            && s.write(&buffer[..size]).is_err()
        {
            staged = None;
        }
        send(job_event::Kind::Output(v1::OutputChunk {
            path: out.to_owned(),
            executable,
            data: buffer[..size].to_vec(),
            last: i + 1 == count,
        }))?;
    }
    Ok(Sent { bytes: len, staged })
}

/// The absolute path and kind of a file announced on this stderr line that is sent ahead of the
/// announcement: the `.rmeta` (cargo's pipelining) and the dep-info.
fn early_artifact(line: &[u8], cwd: &str) -> Option<(String, String)> {
    let text = std::str::from_utf8(line).ok()?.trim_end();
    if !text.starts_with(r#"{"$message_type":"artifact""#) {
        return None;
    }
    let value: serde_json::Value = serde_json::from_str(text).ok()?;
    let emit = value.get("emit")?.as_str()?;
    if !matches!(emit, "metadata" | "dep-info") {
        return None;
    }
    let path = value.get("artifact")?.as_str()?;
    let path = if path.starts_with('/') { path.to_owned() } else { format!("{cwd}/{path}") };
    Some((path, emit.to_owned()))
}

/// Checks that the job's tree can be built: no input file, and no output, is where another entry
/// needs a directory (`/a/b` a file and `/a/b/c` anything), and no input or output is one of the
/// directories. Such a tree is the client's fault (InvalidArgument), refused before the job is
/// accepted, so it never counts against this worker (quarantine counts only failures a client
/// cannot cause).
fn tree_shape(
    inputs: &[(String, [u8; 32], bool)],
    dirs: &[String],
    cwd: &str,
    outputs: &[String],
) -> Result<(), Status> {
    use std::collections::BTreeMap;
    #[derive(Clone, Copy, PartialEq)]
    enum Kind {
        Input,
        Output,
        Dir,
    }
    let name = |k: Kind| match k {
        Kind::Input => "an input file",
        Kind::Output => "an output",
        Kind::Dir => "a directory",
    };
    let mut entries: BTreeMap<&str, Kind> = BTreeMap::new();
    let all = inputs
        .iter()
        .map(|(p, _, _)| (p.as_str(), Kind::Input))
        .chain(outputs.iter().map(|p| (p.as_str(), Kind::Output)))
        .chain(dirs.iter().map(String::as_str).chain([cwd]).map(|p| (p, Kind::Dir)));
    for (path, kind) in all {
        match entries.insert(path, kind) {
            Some(before) if before != kind || kind != Kind::Dir => {
                return Err(Status::invalid_argument(format!(
                    "{path} is both {} and {} of the job",
                    name(before),
                    name(kind)
                )));
            }
            _ => {}
        }
    }
    for &path in entries.keys() {
        let mut ancestor = Path::new(path).parent();
        while let Some(dir) = ancestor.and_then(Path::to_str).filter(|d| *d != "/") {
            if let Some(&kind) = entries.get(dir).filter(|&&k| k != Kind::Dir) {
                return Err(Status::invalid_argument(format!(
                    "{dir} is {} of the job, but {path} is beneath it",
                    name(kind)
                )));
            }
            ancestor = Path::new(dir).parent();
        }
    }
    Ok(())
}

/// The job's outputs as the worker derives them from its arguments (the predictor the client
/// uses, [`ferry_cache::rustc::RustcArgs::outputs`], made absolute against `cwd`): the worker
/// sends and publishes these and nothing else, so a client cannot make an input (or any other
/// file) an "output" that drops out of the manifest. Err, as the client's fault, when the
/// arguments are not a compile ferry caches or `declared` is not exactly that set.
fn derived_outputs(args: &[String], cwd: &str, declared: &[String]) -> Result<Vec<String>, Status> {
    use ferry_cache::rustc::{Classified, classify, recipe::absolute};
    let os: Vec<std::ffi::OsString> = args.iter().map(Into::into).collect();
    let rustc = match classify(&os) {
        Classified::Cacheable(rustc) => rustc,
        Classified::Passthrough(why) => {
            return Err(Status::invalid_argument(format!("the arguments are not a compile a worker runs ({why})")));
        }
    };
    let mut derived: Vec<String> =
        rustc.outputs().into_iter().map(|(p, _)| absolute(Path::new(cwd), &p).display().to_string()).collect();
    derived.sort();
    derived.dedup();
    let mut claimed = declared.to_vec();
    claimed.sort();
    claimed.dedup();
    if claimed != derived {
        return Err(Status::invalid_argument(format!(
            "'outputs' {claimed:?} are not what the arguments produce: {derived:?}"
        )));
    }
    Ok(derived)
}

/// Variables a client may never set in a job: the dynamic loader's and libc's (they would run
/// code or read files the key does not cover), and the observer's own.
fn refused_env(name: &str) -> bool {
    const REFUSED: &[&str] = &[
        "GCONV_PATH",
        "GETCONF_DIR",
        "HOSTALIASES",
        "LOCALDOMAIN",
        "LOCPATH",
        "NLSPATH",
        "RESOLV_HOST_CONF",
        "RES_OPTIONS",
        "TMPDIR",
        "TZDIR",
        "GLIBC_TUNABLES",
    ];
    name.starts_with("LD_") || name.starts_with("MALLOC_") || name.starts_with("FERRY_") || REFUSED.contains(&name)
}

fn validate(r: v1::RunJobRequest) -> Result<Job, Status> {
    let toolchain = ToolchainId(digest(r.toolchain.as_ref(), "toolchain")?);
    absolute_path(&r.toolchain_root, "toolchain_root")?;
    if Path::new(&r.toolchain_root).starts_with("/usr")
        && !Path::new(&r.toolchain_root).starts_with(crate::sandbox::USR_LOCAL)
        || r.toolchain_root == crate::sandbox::USR_LOCAL
    {
        return Err(Status::invalid_argument(format!(
            "'toolchain_root' {} would hide the worker's own /usr: under /usr only /usr/local/<dir> can hold a toolchain",
            r.toolchain_root
        )));
    }
    if r.program != format!("{}/bin/rustc", r.toolchain_root) {
        return Err(Status::invalid_argument("'program' must be the toolchain's bin/rustc"));
    }
    absolute_path(&r.cwd, "cwd")?;
    if r.outputs.is_empty() {
        return Err(Status::invalid_argument("a job must declare at least one output"));
    }
    let place = |path: &str, field: &'static str| -> Result<(), Status> {
        absolute_path(path, field)?;
        let top = path[1..].split('/').next().unwrap_or_default();
        if SYSTEM_DIRS.contains(&top) && !Path::new(path).starts_with(crate::sandbox::USR_LOCAL) {
            return Err(Status::invalid_argument(format!("'{field}' {path} is inside a system directory")));
        }
        if path == crate::sandbox::USR_LOCAL {
            return Err(Status::invalid_argument(format!("'{field}' {path} is the worker's own /usr/local")));
        }
        if Path::new(path).starts_with(&r.toolchain_root) {
            return Err(Status::invalid_argument(format!("'{field}' {path} is inside the toolchain")));
        }
        Ok(())
    };
    place(&r.cwd, "cwd")?;
    let mut inputs = Vec::with_capacity(r.inputs.len());
    let mut seen = HashMap::new();
    for input in r.inputs {
        place(&input.path, "inputs.path")?;
        let d = digest(input.digest.as_ref(), "inputs.digest")?;
        if seen.insert(input.path.clone(), d).is_some() {
            return Err(Status::invalid_argument(format!("input {} is listed twice", input.path)));
        }
        inputs.push((input.path, d, input.executable));
    }
    for o in &r.outputs {
        place(o, "outputs")?;
    }
    let outputs = derived_outputs(&r.args, &r.cwd, &r.outputs)?;
    tree_shape(&inputs, &r.dirs, &r.cwd, &outputs)?;
    for d in &r.dirs {
        place(d, "dirs")?;
    }
    let mut env = Vec::with_capacity(r.env.len());
    for v in r.env {
        if v.name.is_empty() || v.name.contains(['=', '\0']) || v.value.contains('\0') {
            return Err(Status::invalid_argument(format!("bad environment variable name '{}'", v.name)));
        }
        if refused_env(&v.name) {
            return Err(Status::invalid_argument(format!(
                "environment variable '{}' is not allowed in a job: it changes how programs are loaded or run",
                v.name
            )));
        }
        env.push((v.name, v.value));
    }
    Ok(Job {
        id: r.job_id,
        toolchain,
        toolchain_root: r.toolchain_root,
        program: r.program,
        args: r.args,
        cwd: r.cwd,
        env,
        inputs,
        outputs,
        dirs: r.dirs,
        basedirs: r.basedirs,
    })
}
