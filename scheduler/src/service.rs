//! The gRPC adapter over the state machine and the archive store. Every handler checks the
//! caller's role, validates its input through `ferry-proto`, takes the state lock only for the
//! pure state call, and turns domain outcomes into `tonic::Status` here and nowhere else.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ferry_cache::{CacheKey, DiskConfig, DiskStore, Entry, Error as CacheError, PutOutcome};
use ferry_proto::v1::scheduler_server::Scheduler as SchedulerApi;
use ferry_proto::v1::{self, scheduler_message, worker_message};
use ferry_proto::{ChunkReader, Role, digest, digests, require, require_any, to_digest};
use ferry_toolchains::{ToolchainId, UnpackLimits, verify_archive};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

use crate::archives::{ArchiveStore, Record};
use crate::config::SchedulerConfig;
use crate::state::{Allocation, Assignment, Effects, JobId, JobOutcome, Registration, Scheduler, WaitId};
use crate::transfers::{Busy, Caller, PERMIT_WAIT, TransferPermit, TransferPermits};

const CHUNK: usize = 1 << 20;
/// A worker that has not sent `register` this long after opening its session is dropped.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
/// An assignment whose client has not reached the worker after this is released.
const CLAIM_WITHIN: Duration = Duration::from_secs(30);
/// Shared cache entries younger than this are never evicted (a build in flight still wants them).
const CACHE_GRACE: Duration = Duration::from_secs(600);
/// Longest a freshly uploaded toolchain's jobs stay local while the workers prefetch it.
const PREFETCH_WAIT: Duration = Duration::from_secs(30);

/// The sending half of a worker's session stream.
type SessionTx = mpsc::Sender<Result<v1::SchedulerMessage, Status>>;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The service object tonic serves.
#[derive(Debug, Clone)]
pub struct Service {
    shared: Arc<Shared>,
}

#[derive(Debug)]
pub(crate) struct Shared {
    inner: Mutex<Inner>,
    archives: ArchiveStore,
    /// The shared cache tier: the same entry files, verification and eviction as a local tier.
    cache: DiskStore,
    /// Shared entries found corrupt on a read (and removed) since start, for `ferry status`.
    corrupt_entries: std::sync::atomic::AtomicU64,
    /// Cache transfers served at once (`cache_concurrency`, the bound on their memory), and per
    /// caller (`cache_concurrency_per_caller`).
    transfers: TransferPermits,
    config: SchedulerConfig,
    shutdown: CancellationToken,
    metrics: crate::http::Metrics,
    /// The shared tier's usage when last scanned.
    usage: Mutex<Option<(Instant, ferry_cache::Usage)>>,
    /// The writers whose signed entries the shared tier takes.
    writers: crate::writers::Writers,
}

#[derive(Debug)]
struct Inner {
    state: Scheduler,
    /// Queued allocations waiting for a slot.
    waiters: HashMap<WaitId, oneshot::Sender<Assignment>>,
    /// The current session of each worker: its number (a stale session ending must not remove
    /// the worker's newer registration), the sender of its stream, its key for job grants, and
    /// the slots it offers.
    sessions: HashMap<String, (u64, SessionTx, ferry_proto::GrantKey, u32)>,
    next_session: u64,
    /// Each worker id's credential (the token that first registered it since this scheduler
    /// started): no other credential may take the id over, and one credential's live sessions
    /// together offer at most `max_slots_per_credential`.
    owners: HashMap<String, ferry_proto::Credential>,
    /// Toolchains just uploaded and sent to the workers to prefetch, and when: until a worker
    /// holds one (or [`PREFETCH_WAIT`] passes), its jobs are answered "compile locally" rather than
    /// given a slot that would sit waiting for the fetch.
    prefetching: HashMap<ToolchainId, Instant>,
}

impl Service {
    pub fn new(config: SchedulerConfig, shutdown: CancellationToken) -> std::io::Result<Service> {
        let archives = ArchiveStore::open(&config.data_dir, config.archive_store_size)?;
        let cache = DiskStore::open(
            config.data_dir.join("cache"),
            DiskConfig { max_bytes: config.cache_size, grace: CACHE_GRACE },
        )
        .map_err(std::io::Error::other)?;
        let inner = Inner {
            // Microseconds since the epoch: ids of this run start above any of an earlier run.
            state: Scheduler::new(config.lease).starting_jobs_at(
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_micros() as u64),
            ),
            waiters: HashMap::new(),
            sessions: HashMap::new(),
            next_session: 1,
            owners: HashMap::new(),
            prefetching: HashMap::new(),
        };
        let corrupt_entries = std::sync::atomic::AtomicU64::new(0);
        let writers =
            crate::writers::Writers::open(&config.data_dir, config.writers.clone(), config.revoked_writers.clone())?;
        let transfers = TransferPermits::new(config.cache_concurrency, config.cache_per_caller, PERMIT_WAIT);
        let metrics = crate::http::Metrics::default();
        let shared = Shared {
            inner: Mutex::new(inner),
            archives,
            cache,
            corrupt_entries,
            transfers,
            config,
            shutdown,
            metrics,
            usage: Mutex::new(None),
            writers,
        };
        Ok(Service { shared: Arc::new(shared) })
    }

    /// Removes workers whose lease ran out; the server runs this periodically.
    pub fn expire(&self) {
        let mut inner = self.shared.lock();
        let effects = inner.state.expire(Instant::now());
        for job in &effects.failed_jobs {
            warn!(job = job.0, "worker lease expired: job failed");
        }
        inner.apply(effects);
    }
}

impl Service {
    /// The answer to one `Allocate`: a slot, or "compile locally" and why.
    async fn answer_allocation(
        &self,
        request: Request<v1::AllocateRequest>,
    ) -> Result<Response<v1::AllocateResponse>, Status> {
        require(&request, Role::Client, "Allocate")?;
        let peer = request.remote_addr();
        let r = request.into_inner();
        ferry_proto::check_protocol(r.protocol, "client")?;
        let toolchain = ToolchainId(digest(r.toolchain.as_ref(), "toolchain")?);
        let client = if r.client_id.is_empty() {
            peer.map(|p: SocketAddr| p.ip().to_string()).unwrap_or_default()
        } else {
            r.client_id
        };
        let (wait, rx) = {
            let mut inner = self.shared.lock();
            if let Some(since) = inner.prefetching.get(&toolchain) {
                if since.elapsed() < PREFETCH_WAIT && inner.state.holders(&toolchain).is_empty() {
                    return Ok(Response::new(local(
                        v1::LocalReason::ToolchainFetching,
                        "the workers are fetching this toolchain",
                    )));
                }
                inner.prefetching.remove(&toolchain);
            }
            match inner.state.allocate(&client, toolchain) {
                Allocation::Assigned(a) => return Ok(Response::new(inner.assigned(a))),
                Allocation::NoWorkers => {
                    return Ok(Response::new(local(v1::LocalReason::NoWorkers, "no workers are registered")));
                }
                Allocation::AllQuarantined => {
                    let detail = "every worker is quarantined after failing jobs (see ferry status)";
                    return Ok(Response::new(local(v1::LocalReason::WorkersQuarantined, detail)));
                }
                Allocation::Queued(wait) => {
                    let (tx, rx) = oneshot::channel();
                    inner.waiters.insert(wait, tx);
                    (wait, rx)
                }
            }
        };
        let timeout = self.shared.config.queue_timeout;
        if let Ok(Ok(a)) = tokio::time::timeout(timeout, rx).await {
            return Ok(Response::new(self.shared.lock().assigned(a)));
        }
        // Timed out. If the slot came at the last moment, `apply` saw the waiter gone and
        // released it, so cancelling here never leaks a slot.
        let mut inner = self.shared.lock();
        inner.waiters.remove(&wait);
        inner.state.cancel(wait);
        let detail = format!("every worker slot stayed busy for {} ms", timeout.as_millis());
        Ok(Response::new(local(v1::LocalReason::NoCapacity, &detail)))
    }

    /// The allocation state now (for metrics and the status page).
    pub(crate) fn state_status(&self) -> crate::state::Status {
        self.shared.lock().state.status(Instant::now())
    }

    pub(crate) fn toolchain_records(&self) -> Vec<Record> {
        self.shared.archives.list()
    }

    pub(crate) fn toolchain_store_bytes(&self) -> u64 {
        self.shared.archives.bytes()
    }

    /// The workers holding toolchain `id`.
    pub(crate) fn holders(&self, id: &ToolchainId) -> Vec<String> {
        self.shared.lock().state.holders(id)
    }

    /// What the shared tier holds: a directory scan, made at most every 30 s (the status page
    /// reloads every 2 s). None when it cannot be read.
    pub(crate) fn cache_usage(&self) -> Option<ferry_cache::Usage> {
        let mut scanned = self.shared.usage.lock().unwrap_or_else(|p| p.into_inner());
        if scanned.as_ref().is_none_or(|(at, _)| at.elapsed() > Duration::from_secs(30)) {
            *scanned = Some((Instant::now(), self.shared.cache.usage().ok()?));
        }
        scanned.as_ref().map(|(_, usage)| *usage)
    }

    /// The shared tier's size limit (`cache_size`), bytes.
    pub(crate) fn cache_limit(&self) -> u64 {
        self.shared.config.cache_size
    }

    pub(crate) fn corrupt_entries(&self) -> u64 {
        self.shared.corrupt_entries.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn metrics(&self) -> &crate::http::Metrics {
        &self.shared.metrics
    }
}

/// A "compile locally" reason as metrics label it: `LOCAL_REASON_NO_WORKERS` is `no-workers`.
fn local_reason_name(reason: i32) -> String {
    let name = v1::LocalReason::try_from(reason).map_or("LOCAL_REASON_UNKNOWN", |r| r.as_str_name());
    name.trim_start_matches("LOCAL_REASON_").to_ascii_lowercase().replace('_', "-")
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A cache-transfer permit for `caller`, waiting [`PERMIT_WAIT`] at most.
    async fn cache_permit(&self, caller: Caller) -> Result<TransferPermit, Status> {
        self.transfers.acquire(caller).await.map_err(|busy| match busy {
            Busy::Caller { share, total } => Status::resource_exhausted(format!(
                "this caller already has {share} shared cache transfers in progress (at most {share} of the {total} \
                 per caller); try again later"
            )),
            Busy::All { total } => {
                Status::resource_exhausted(format!("the shared cache is serving {total} transfers; try again later"))
            }
        })
    }
}

impl Inner {
    /// Hands assignments to their waiters; an assignment whose waiter is gone frees its slot
    /// again (which may serve the next waiter, hence the work list).
    fn apply(&mut self, effects: Effects) {
        let mut pending = effects.assigned;
        while let Some((wait, assignment)) = pending.pop() {
            let unclaimed = match self.waiters.remove(&wait) {
                Some(tx) => tx.send(assignment).err(),
                None => Some(assignment),
            };
            if let Some(a) = unclaimed
                && let Ok(more) = self.state.finish(a.job, JobOutcome::Released, Instant::now())
            {
                pending.extend(more.assigned);
            }
        }
    }
}

#[tonic::async_trait]
impl SchedulerApi for Service {
    type WorkerSessionStream = BoxStream<v1::SchedulerMessage>;
    type FetchToolchainStream = BoxStream<v1::Chunk>;

    async fn worker_session(
        &self,
        request: Request<Streaming<v1::WorkerMessage>>,
    ) -> Result<Response<Self::WorkerSessionStream>, Status> {
        require(&request, Role::Worker, "WorkerSession")?;
        let credential = ferry_proto::Credential::of(&request);
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(REGISTER_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no 'register' message within 10 s"))??;
        let Some(v1::WorkerMessage { kind: Some(worker_message::Kind::Register(reg)) }) = first else {
            return Err(Status::invalid_argument("the first message of a worker session must be 'register'"));
        };
        let mut reg = registration(reg)?;
        let id = reg.id.clone();
        let (tx, rx) = mpsc::channel(4);
        let grant_key = ferry_proto::new_grant_key();
        let session = {
            let mut inner = self.shared.lock();
            if let Some(owner) = inner.owners.get(&id)
                && *owner != credential
            {
                return Err(Status::permission_denied(format!(
                    "worker id '{id}' belongs to another worker's token: give each worker its own id"
                )));
            }
            // What this credential's other live sessions offer (a restart replaces its own).
            let others: u32 = inner
                .sessions
                .iter()
                .filter(|(other, _)| **other != id && inner.owners.get(*other) == Some(&credential))
                .map(|(_, (_, _, _, slots))| slots)
                .sum();
            let cap = self.shared.config.max_slots_per_credential;
            let left = cap.saturating_sub(others);
            if left == 0 {
                return Err(Status::resource_exhausted(format!(
                    "this worker token's sessions already offer {others} slots, the most one token may \
                     (max_slots_per_credential = {cap})"
                )));
            }
            if reg.slots > left {
                tracing::warn!(worker = %id, asked = reg.slots, given = left, cap, "a worker's slots cut to its token's share");
                reg.slots = left;
            }
            inner.owners.insert(id.clone(), credential);
            inner.next_session += 1;
            let session = inner.next_session;
            inner.sessions.insert(id.clone(), (session, tx.clone(), grant_key, reg.slots));
            let effects = inner
                .state
                .register(reg.clone(), Instant::now())
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            inner.apply(effects);
            session
        };
        info!(worker = %id, address = %reg.address, slots = reg.slots, "worker registered");
        let lease_ms = self.shared.config.lease.as_millis() as u32;
        let registered = scheduler_message::Kind::Registered(v1::Registered {
            lease_ms,
            grant_key: grant_key.to_vec(),
            now_unix_ms: ferry_proto::now_ms(),
        });
        let _ = tx.send(Ok(v1::SchedulerMessage { kind: Some(registered) })).await;
        let shared = Arc::clone(&self.shared);
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    _ = shared.shutdown.cancelled() => break,
                    m = inbound.message() => m,
                };
                match message {
                    Ok(Some(v1::WorkerMessage { kind: Some(worker_message::Kind::Report(report)) })) => {
                        if let Err(status) = apply_report(&shared, &id, report) {
                            let _ = tx.send(Err(status)).await;
                            break;
                        }
                    }
                    Ok(Some(_)) => {
                        let _ = tx.send(Err(Status::invalid_argument("only 'report' may follow 'register'"))).await;
                        break;
                    }
                    Ok(None) | Err(_) => break,
                }
            }
            let mut inner = shared.lock();
            if inner.sessions.get(&id).is_some_and(|(s, _, _, _)| *s == session) {
                // The id stays its credential's; its slots no longer count.
                inner.sessions.remove(&id);
                let effects = inner.state.remove(&id);
                info!(worker = %id, failed_jobs = effects.failed_jobs.len(), "worker session ended");
                inner.apply(effects);
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn allocate(&self, request: Request<v1::AllocateRequest>) -> Result<Response<v1::AllocateResponse>, Status> {
        let started = Instant::now();
        let answer = self.answer_allocation(request).await;
        if let Ok(response) = &answer {
            let result = match &response.get_ref().result {
                Some(v1::allocate_response::Result::Assigned(_)) => "assigned".to_owned(),
                Some(v1::allocate_response::Result::Local(l)) => local_reason_name(l.reason),
                None => "none".to_owned(),
            };
            self.shared.metrics.allocated(&result, started.elapsed());
        }
        answer
    }

    async fn has_toolchain(
        &self,
        request: Request<v1::ToolchainRef>,
    ) -> Result<Response<v1::HasToolchainResponse>, Status> {
        require(&request, Role::Client, "HasToolchain")?;
        let id = ToolchainId(digest(request.get_ref().id.as_ref(), "id")?);
        let present = self.shared.archives.has(&id);
        if present {
            // A client asks before every remote compile: the toolchains in use are kept.
            self.shared.archives.touch(&id);
        }
        let upload_refused = require(&request, Role::ToolchainUpload, "UploadToolchain").is_err();
        Ok(Response::new(v1::HasToolchainResponse { present, upload_refused }))
    }

    async fn upload_toolchain(
        &self,
        request: Request<Streaming<v1::ToolchainUpload>>,
    ) -> Result<Response<v1::UploadToolchainResponse>, Status> {
        require(&request, Role::ToolchainUpload, "UploadToolchain")?;
        let mut inbound = request.into_inner();
        let Some(v1::ToolchainUpload { kind: Some(v1::toolchain_upload::Kind::Header(header)) }) =
            inbound.message().await?
        else {
            return Err(Status::invalid_argument("an upload starts with a 'header' message"));
        };
        let id = ToolchainId(digest(header.id.as_ref(), "header.id")?);
        let max = self.shared.config.max_toolchain_bytes;
        if header.size > max {
            return Err(Status::invalid_argument(format!(
                "archive of {} bytes is over the limit of {max}",
                header.size
            )));
        }
        if header.size > self.shared.archives.limit() {
            return Err(Status::invalid_argument(crate::archives::too_large(
                header.size,
                self.shared.archives.limit(),
            )));
        }
        if self.shared.archives.has(&id) {
            return Ok(Response::new(v1::UploadToolchainResponse { stored: false }));
        }
        let mut incoming =
            self.shared.archives.begin().map_err(|e| Status::internal(format!("storing the upload: {e}")))?;
        // Verification runs while the bytes arrive, on a blocking thread.
        let (tx, reader) = ChunkReader::channel(16);
        let verifier = tokio::task::spawn_blocking(move || {
            verify_archive(reader, &id, &UnpackLimits::default())
                .map(|_| ())
                .map_err(|e| format!("the archive is not toolchain {id}: {e}"))
        });
        while let Some(message) = inbound.message().await? {
            let Some(v1::toolchain_upload::Kind::Data(data)) = message.kind else {
                return Err(Status::invalid_argument("only 'data' may follow the header"));
            };
            if incoming.received + data.len() as u64 > header.size {
                return Err(Status::invalid_argument(format!(
                    "archive is larger than the {} bytes announced",
                    header.size
                )));
            }
            incoming.write(&data).map_err(|e| Status::internal(format!("storing the upload: {e}")))?;
            // A verifier that stopped early has found a problem; it is reported below.
            let _ = tx.send(Ok(data)).await;
        }
        drop(tx);
        if incoming.received != header.size {
            return Err(Status::invalid_argument(format!(
                "archive ended after {} of the {} bytes announced",
                incoming.received, header.size
            )));
        }
        let record = Record {
            id: String::new(),
            rustc_version: header.rustc_version,
            targets: header.targets,
            bytes: 0,
            uploaded: 0,
            last_used: 0,
        };
        let received = incoming.received;
        verifier
            .await
            .map_err(|e| Status::internal(format!("verifying the upload: {e}")))?
            .map_err(Status::invalid_argument)
            .inspect_err(|_| self.shared.metrics.toolchain_transfer("upload", false, received))?;
        let shared = Arc::clone(&self.shared);
        let published = tokio::task::spawn_blocking(move || shared.archives.publish(incoming, &id, record))
            .await
            .map_err(|e| Status::internal(format!("verifying the upload: {e}")))?
            .map_err(Status::invalid_argument)?;
        let stored = published.stored;
        info!(toolchain = %id, stored, evicted = published.evicted.len(), "toolchain uploaded");
        self.shared.metrics.toolchain_transfer("upload", true, received);
        if !published.evicted.is_empty() {
            // Forgotten: nothing waits for their prefetch, and a client asking is told to upload.
            let mut inner = self.shared.lock();
            for evicted in &published.evicted {
                inner.prefetching.remove(evicted);
            }
            self.shared.metrics.toolchains_evicted(published.evicted.len() as u64);
        }
        if stored {
            // Best effort: a worker whose stream is full fetches on its first job instead.
            let prefetch = v1::SchedulerMessage {
                kind: Some(scheduler_message::Kind::Prefetch(v1::ToolchainRef { id: Some(to_digest(id.0)) })),
            };
            let mut inner = self.shared.lock();
            let sent =
                inner.sessions.values().filter(|(_, tx, _, _)| tx.try_send(Ok(prefetch.clone())).is_ok()).count();
            if sent > 0 {
                inner.prefetching.insert(id, Instant::now());
            }
        }
        Ok(Response::new(v1::UploadToolchainResponse { stored }))
    }

    async fn fetch_toolchain(
        &self,
        request: Request<v1::ToolchainRef>,
    ) -> Result<Response<Self::FetchToolchainStream>, Status> {
        require(&request, Role::Worker, "FetchToolchain")?;
        let id = ToolchainId(digest(request.get_ref().id.as_ref(), "id")?);
        let path = self.shared.archives.path(&id);
        let mut file = tokio::fs::File::open(&path).await.map_err(|_| {
            Status::not_found(format!("toolchain {id} is not stored here; upload it with 'ferry toolchain upload'"))
        })?;
        self.shared.archives.touch(&id);
        let size = file.metadata().await.map_or(0, |m| m.len());
        self.shared.metrics.toolchain_transfer("fetch", true, size);
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            loop {
                let mut buf = vec![0u8; CHUNK];
                match file.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => {
                        buf.truncate(n);
                        if tx.send(Ok(v1::Chunk { data: buf })).await.is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(Status::internal(format!("reading the archive: {e}")))).await;
                        break;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_toolchains(
        &self,
        request: Request<v1::ListToolchainsRequest>,
    ) -> Result<Response<v1::ListToolchainsResponse>, Status> {
        require(&request, Role::Client, "ListToolchains")?;
        let records = self.shared.archives.list();
        let inner = self.shared.lock();
        let toolchains = records
            .into_iter()
            .filter_map(|r| {
                let id: ToolchainId = r.id.parse().ok()?;
                Some(v1::ToolchainInfo {
                    id: Some(to_digest(id.0)),
                    rustc_version: r.rustc_version,
                    targets: r.targets,
                    bytes: r.bytes,
                    uploaded: r.uploaded,
                    last_used: r.last_used,
                    workers: inner.state.holders(&id),
                })
            })
            .collect();
        Ok(Response::new(v1::ListToolchainsResponse { toolchains }))
    }

    type CacheGetStream = BoxStream<v1::Chunk>;

    async fn cache_get(&self, request: Request<v1::CacheKeyRef>) -> Result<Response<Self::CacheGetStream>, Status> {
        require_any(&request, &[Role::Client, Role::Worker, Role::CacheWrite], "CacheGet")?;
        let key = CacheKey(digest(request.get_ref().key.as_ref(), "key")?);
        let caller = Caller::of(&request);
        let permit = self.shared.cache_permit(caller).await.inspect_err(|_| self.shared.metrics.cache_get("busy"))?;
        let shared = self.shared.clone();
        let opened = tokio::task::spawn_blocking(move || shared.cache.open_checked(&key))
            .await
            .map_err(|e| Status::internal(format!("cache lookup: {e}")))?;
        // Checked (header and checksum) but not decoded: the client decodes and verifies it.
        let (file, _len) = match opened {
            Ok(Some(found)) => found,
            Ok(None) => {
                self.shared.metrics.cache_get("miss");
                return Err(Status::not_found(format!("no entry {key}")));
            }
            Err(CacheError::Corrupt { path, reason }) => {
                self.shared.metrics.cache_get("corrupt");
                self.shared.corrupt_entries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                warn!(path = %path.display(), %reason, "removed a corrupt shared cache entry");
                return Err(Status::data_loss(format!("entry {key} was corrupt here and has been removed")));
            }
            Err(e) => return Err(Status::unavailable(format!("shared cache: {e}"))),
        };
        // Streamed from the file in 1 MiB pieces: one waiting for the reader, one read ahead. With
        // the piece HTTP/2 is sending and its buffers, a transfer holds about 7 MiB (measured: 16
        // slow readers of a 100 MB entry grow the scheduler by 108 MiB): `cache_concurrency` times
        // that bounds the tier's memory. A reader that takes no piece within the send deadline is
        // cut off (its permit, file and waiting pieces released at once; it hears
        // DEADLINE_EXCEEDED if it reads again), so a stalled reader never keeps a permit.
        // The kind byte of the checked header (offset 12: `ferry_cache`'s entry layout).
        let mut kind = [0u8; 1];
        let kind = match std::os::unix::fs::FileExt::read_at(&file, &mut kind, 12) {
            Ok(1) if kind[0] == 2 => "manifest",
            _ => "result",
        };
        self.shared.metrics.cache_hit(kind);
        let stream = EntryStream::default();
        let outgoing = Arc::clone(&stream.0);
        let (tx, rx) = mpsc::channel(1);
        outgoing.lock().unwrap_or_else(|p| p.into_inner()).pieces = Some(rx);
        let shared = Arc::clone(&self.shared);
        let deadline = self.shared.config.cache_send_timeout;
        tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let _permit = permit;
            let mut file = tokio::fs::File::from_std(file);
            loop {
                let mut buf = vec![0u8; CHUNK];
                let piece = match file.read(&mut buf).await {
                    Ok(0) => return,
                    Ok(n) => {
                        buf.truncate(n);
                        Ok(v1::Chunk { data: buf })
                    }
                    Err(e) => Err(Status::internal(format!("reading the entry: {e}"))),
                };
                let failed = piece.is_err();
                let n = piece.as_ref().map_or(0, |c| c.data.len() as u64);
                match tokio::time::timeout(deadline, tx.reserve()).await {
                    Ok(Ok(slot)) => slot.send(piece),
                    // The reader went away.
                    Ok(Err(_)) => return,
                    Err(_) => {
                        let why = format!(
                            "the reader took no piece of entry {key} for {} ms: cut off (cache_send_timeout_ms)",
                            deadline.as_millis()
                        );
                        info!(%key, ?caller, "a shared cache reader stalled and was cut off");
                        shared.metrics.cache_get("stalled");
                        outgoing.lock().unwrap_or_else(|p| p.into_inner()).cut(Status::deadline_exceeded(why));
                        return;
                    }
                }
                if failed {
                    return;
                }
                shared.metrics.cache_bytes("read", n);
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn cache_put(
        &self,
        request: Request<Streaming<v1::CacheUpload>>,
    ) -> Result<Response<v1::CachePutResponse>, Status> {
        require_any(&request, &[Role::Worker, Role::CacheWrite], "CachePut")?;
        let caller = Caller::of(&request);
        let mut inbound = request.into_inner();
        // Every message must come within the idle deadline: a writer that stops sending never
        // keeps a permit (nor, before its header, a call).
        let idle = self.shared.config.cache_idle_timeout;
        let abandoned = || {
            self.shared.metrics.cache_put("idle");
            Status::deadline_exceeded(format!(
                "no message of the entry for {} ms: the upload is abandoned (cache_idle_timeout_ms)",
                idle.as_millis()
            ))
        };
        let first = tokio::time::timeout(idle, inbound.message()).await.map_err(|_| abandoned())??;
        let Some(v1::CacheUpload { kind: Some(v1::cache_upload::Kind::Header(header)) }) = first else {
            return Err(Status::invalid_argument("a cache upload starts with a 'header' message"));
        };
        let key = CacheKey(digest(header.key.as_ref(), "header.key")?);
        let max = self.shared.config.max_entry_bytes;
        if header.size > max {
            return Err(Status::invalid_argument(format!("entry of {} bytes is over the limit of {max}", header.size)));
        }
        let _permit = self.shared.cache_permit(caller).await.inspect_err(|_| self.shared.metrics.cache_put("busy"))?;
        // Received into a temp file of the store, never whole in memory; removed whichever way
        // the put ends (refused, abandoned, its caller gone and this call dropped).
        let (mut file, tmp) =
            self.shared.cache.begin_temp().map_err(|e| Status::unavailable(format!("shared cache: {e}")))?;
        let tmp = ferry_cache::TempPath(tmp);
        let received = async {
            use std::io::Write;
            let mut written = 0u64;
            while let Some(message) = tokio::time::timeout(idle, inbound.message()).await.map_err(|_| abandoned())?? {
                let Some(v1::cache_upload::Kind::Data(data)) = message.kind else {
                    return Err(Status::invalid_argument("only 'data' may follow the header"));
                };
                written += data.len() as u64;
                if written > header.size {
                    return Err(Status::invalid_argument(format!(
                        "entry is larger than the {} bytes announced",
                        header.size
                    )));
                }
                file.write_all(&data).map_err(|e| Status::unavailable(format!("shared cache: {e}")))?;
            }
            if written != header.size {
                return Err(Status::invalid_argument(format!(
                    "entry ended after {written} of the {} bytes announced",
                    header.size
                )));
            }
            Ok(())
        }
        .await;
        if let Err(e) = received {
            if e.code() != tonic::Code::DeadlineExceeded {
                self.shared.metrics.cache_put("refused");
            }
            return Err(e);
        }
        let shared = self.shared.clone();
        let stored = tokio::task::spawn_blocking(move || -> Result<PutOutcome, Status> {
            // Fully verified once, here (compressed framing included for small entries, whose
            // payloads are the compressed ones); stored as received.
            let checked = verify_received(&mut file, &key, header.size);
            if let Err(e) = checked {
                return Err(Status::invalid_argument(format!("the entry does not verify under key {key}: {e}")));
            }
            // Only what a trusted writer signed is stored; what is there already and is not
            // (unsigned, a stranger's, a revoked key's) is replaced rather than kept.
            let trust = shared.writers.trust();
            if let Err(e) = signed_by(&mut file, header.size, &trust) {
                return Err(Status::permission_denied(format!(
                    "entry {key} is not signed by a writer this scheduler trusts: {e}"
                )));
            }
            if let Ok(Some((mut there, len))) = shared.cache.open_checked(&key)
                && let Err(e) = signed_by(&mut there, len, &trust)
            {
                tracing::info!(%key, reason = %e, "replacing a shared entry no trusted writer signed");
                let _ = ferry_cache::Store::remove(&shared.cache, &key);
            }
            shared.cache.publish_temp(&key, file, &tmp).map_err(|e| Status::unavailable(format!("shared cache: {e}")))
        })
        .await
        .map_err(|e| Status::internal(format!("cache store: {e}")))?
        .inspect_err(|_| self.shared.metrics.cache_put("refused"))?;
        let published = matches!(stored, PutOutcome::Published { .. });
        self.shared.metrics.cache_put(if published { "published" } else { "present" });
        if published {
            self.shared.metrics.cache_bytes("written", header.size);
        }
        tracing::debug!(%key, published, "shared cache entry");
        Ok(Response::new(v1::CachePutResponse { published }))
    }

    async fn register_writer(
        &self,
        request: Request<v1::RegisterWriterRequest>,
    ) -> Result<Response<v1::RegisterWriterResponse>, Status> {
        require_any(&request, &[Role::Worker, Role::CacheWrite], "RegisterWriter")?;
        // The development default's callers hold every role; a worker token says "worker".
        let role = if ferry_proto::require(&request, Role::Worker, "").is_ok() { "worker" } else { "cache-write" };
        let r = request.into_inner();
        let key: [u8; 32] = r
            .public_key
            .as_slice()
            .try_into()
            .map_err(|_| Status::invalid_argument("'public_key' must be 32 bytes (Ed25519)"))?;
        let key = ferry_cache::WriterKey(key);
        let name: String = r.name.chars().filter(|c| !c.is_control()).take(128).collect();
        if self.shared.writers.revoked().contains(&key) {
            warn!(writer = %key, name, "a revoked writer key tried to register");
            return Ok(Response::new(v1::RegisterWriterResponse { trusted: false }));
        }
        self.shared.writers.register(key, &name, role).map_err(Status::unavailable)?;
        info!(writer = %key, name, role, "writer registered");
        Ok(Response::new(v1::RegisterWriterResponse { trusted: true }))
    }

    async fn trusted_writers(
        &self,
        request: Request<v1::TrustedWritersRequest>,
    ) -> Result<Response<v1::TrustedWritersResponse>, Status> {
        require_any(&request, &[Role::Client, Role::Worker, Role::CacheWrite], "TrustedWriters")?;
        let trusted = self
            .shared
            .writers
            .list()
            .into_iter()
            .map(|(key, name, _)| v1::Writer { public_key: key.0.to_vec(), name })
            .collect();
        let revoked = self.shared.writers.revoked().iter().map(|k| k.0.to_vec()).collect();
        Ok(Response::new(v1::TrustedWritersResponse { trusted, revoked }))
    }

    async fn cache_remove(
        &self,
        request: Request<v1::CacheKeyRef>,
    ) -> Result<Response<v1::CacheRemoveResponse>, Status> {
        require_any(&request, &[Role::Worker, Role::CacheWrite], "CacheRemove")?;
        let key = CacheKey(digest(request.get_ref().key.as_ref(), "key")?);
        let shared = self.shared.clone();
        let removed = tokio::task::spawn_blocking(move || ferry_cache::Store::remove(&shared.cache, &key))
            .await
            .map_err(|e| Status::internal(format!("cache remove: {e}")))?
            .map_err(|e| Status::unavailable(format!("shared cache: {e}")))?;
        if removed {
            info!(%key, "removed a shared cache entry a verifier found wrong");
            self.shared.metrics.cache_put("removed");
        }
        Ok(Response::new(v1::CacheRemoveResponse { removed }))
    }

    async fn status(&self, request: Request<v1::StatusRequest>) -> Result<Response<v1::StatusResponse>, Status> {
        require(&request, Role::Client, "Status")?;
        let status = self.shared.lock().state.status(Instant::now());
        Ok(Response::new(v1::StatusResponse {
            workers: status
                .workers
                .into_iter()
                .map(|w| v1::WorkerStatus {
                    id: w.id,
                    address: w.address,
                    slots: w.slots,
                    busy: w.busy,
                    toolchains: w.toolchains.iter().map(|t| to_digest(t.0)).collect(),
                    version: w.version,
                    last_seen_ms: w.last_seen.as_millis() as u64,
                    failures: w.failures,
                    last_error: w.last_error.unwrap_or_default(),
                    quarantined_ms: w.quarantined_for.map_or(0, |d| d.as_millis().max(1) as u64),
                })
                .collect(),
            queued: status.queued as u32,
            running: status.running as u32,
            jobs_done: status.jobs_done,
            jobs_failed: status.jobs_failed,
            shared_corrupt_entries: self.shared.corrupt_entries.load(std::sync::atomic::Ordering::Relaxed),
        }))
    }
}

/// A `CacheGet` answer: the pieces its sender task reads from the entry file, until the sender
/// cuts it off (the reader stalled past the send deadline): then what waited is dropped, and the
/// reader, should it read again, gets the reason instead of a truncated entry.
#[derive(Default)]
struct EntryStream(Arc<Mutex<Outgoing>>);

#[derive(Default)]
struct Outgoing {
    /// The pieces, one waiting at most; None once cut off or ended.
    pieces: Option<mpsc::Receiver<Result<v1::Chunk, Status>>>,
    /// Why the stream was cut off, until the reader hears it.
    cut: Option<Status>,
    /// The task reading this stream, woken when it is cut off.
    reader: Option<std::task::Waker>,
}

impl Outgoing {
    fn cut(&mut self, why: Status) {
        self.pieces = None;
        self.cut = Some(why);
        if let Some(reader) = self.reader.take() {
            reader.wake();
        }
    }
}

impl Stream for EntryStream {
    type Item = Result<v1::Chunk, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        let mut out = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(why) = out.cut.take() {
            return Poll::Ready(Some(Err(why)));
        }
        let Some(pieces) = out.pieces.as_mut() else { return Poll::Ready(None) };
        let next = pieces.poll_recv(cx);
        if next.is_pending() {
            out.reader = Some(cx.waker().clone());
        } else if matches!(next, Poll::Ready(None)) {
            out.pieces = None;
        }
        next
    }
}

/// Who signed the entry in `file` (`len` bytes), when a writer in `trust` did.
fn signed_by(
    file: &mut std::fs::File,
    len: u64,
    trust: &ferry_cache::Trust,
) -> Result<ferry_cache::WriterKey, ferry_cache::EntryError> {
    use std::io::{BufReader, Seek};
    file.rewind().map_err(|_| ferry_cache::EntryError::Truncated { what: "entry", offset: 0 })?;
    ferry_cache::verify_stream(BufReader::new(&mut *file), len, trust)
}

/// Checks a received entry in its temp file: header and checksum streamed; an entry small enough
/// to be lz4-compressed is decoded whole (its compressed framing must hold too).
fn verify_received(file: &mut std::fs::File, key: &CacheKey, len: u64) -> Result<(), ferry_cache::EntryError> {
    use std::io::{BufReader, Read, Seek};
    let io = |_| ferry_cache::EntryError::Truncated { what: "received entry", offset: 0 };
    file.rewind().map_err(io)?;
    ferry_cache::check_stream(BufReader::new(&mut *file), len, key)?;
    if len <= 4 << 20 {
        file.rewind().map_err(io)?;
        let mut bytes = Vec::with_capacity(len as usize);
        file.read_to_end(&mut bytes).map_err(io)?;
        Entry::verify(&bytes, key)?;
    }
    Ok(())
}

fn registration(r: v1::Register) -> Result<Registration, Status> {
    ferry_proto::check_protocol(r.protocol, "worker")?;
    if r.worker_id.is_empty() || r.worker_id.len() > 128 || r.worker_id.chars().any(char::is_control) {
        return Err(Status::invalid_argument("'worker_id' must be 1 to 128 printable characters"));
    }
    if r.address.parse::<SocketAddr>().is_err() && !r.address.contains(':') {
        return Err(Status::invalid_argument(format!("'address' '{}' is not host:port", r.address)));
    }
    if r.slots == 0 || r.slots > 4096 {
        return Err(Status::invalid_argument(format!("'slots' must be 1 to 4096, not {}", r.slots)));
    }
    let toolchains = digests(&r.toolchains, "toolchains")?.into_iter().map(ToolchainId).collect();
    Ok(Registration { id: r.worker_id, address: r.address, slots: r.slots, toolchains, version: r.version })
}

fn apply_report(shared: &Shared, id: &str, report: v1::Report) -> Result<(), Status> {
    let toolchains: Vec<ToolchainId> =
        digests(&report.toolchains, "toolchains")?.into_iter().map(ToolchainId).collect();
    let running: Vec<JobId> = report.running.iter().copied().map(JobId).collect();
    let mut inner = shared.lock();
    let now = Instant::now();
    for ended in report.ended {
        let outcome = if ended.refused {
            JobOutcome::Released
        } else if ended.ok {
            JobOutcome::Succeeded { duration: Duration::from_millis(ended.duration_ms) }
        } else {
            warn!(worker = %id, job = ended.job_id, error = %ended.error, "a job failed on the worker");
            JobOutcome::Failed { error: ended.error.chars().take(500).collect() }
        };
        match inner.state.finish_reported(id, JobId(ended.job_id), outcome, now) {
            Ok(effects) => inner.apply(effects),
            Err(e @ crate::state::StateError::NotAssignedTo { .. }) => {
                warn!(worker = %id, error = %e, "report refused")
            }
            Err(_) => {}
        }
    }
    let effects = inner
        .state
        .report(id, Some(toolchains), Some(&running), CLAIM_WITHIN, Instant::now())
        .map_err(|_| Status::not_found(format!("worker '{id}' is no longer registered (lease expired); reconnect")))?;
    inner.apply(effects);
    Ok(())
}

impl Inner {
    /// The answer for an assignment, with the job's grant signed under its worker's session key.
    fn assigned(&self, a: Assignment) -> v1::AllocateResponse {
        let grant = match self.sessions.get(&a.worker) {
            Some((_, _, key, _)) => ferry_proto::Grant::new(a.job.0, &a.worker).sign(key),
            // The worker's session ended meanwhile: the client's call will fail and fall back.
            None => Vec::new(),
        };
        v1::AllocateResponse {
            result: Some(v1::allocate_response::Result::Assigned(v1::Assignment {
                job_id: a.job.0,
                worker_id: a.worker,
                address: a.address,
                has_toolchain: a.has_toolchain,
                grant,
            })),
        }
    }
}

fn local(reason: v1::LocalReason, detail: &str) -> v1::AllocateResponse {
    let local = v1::Local { reason: reason as i32, detail: detail.to_owned() };
    v1::AllocateResponse { result: Some(v1::allocate_response::Result::Local(local)) }
}
