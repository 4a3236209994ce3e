//! The worker's side of its scheduler session: connect, register, report every third of the
//! lease (busy slots, unpacked toolchains, jobs ended and running), and when the scheduler goes
//! away, reconnect with capped exponential backoff — forever, until shutdown. A `prefetch` from
//! the scheduler (a toolchain was just uploaded) fetches and unpacks that toolchain in the
//! background, so the first jobs that need it do not wait for it: one at a time, a few waiting,
//! a duplicate or one beyond the queue ignored ([`Prefetcher`]). A job that needs a toolchain
//! no prefetch brought fetches it itself.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_proto::TokenInterceptor;
use ferry_proto::to_digest;
use ferry_proto::v1::scheduler_client::SchedulerClient;
use ferry_proto::v1::{self, scheduler_message, worker_message};
use ferry_toolchains::ToolchainId;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::service::Shared;

/// Prefetches run one at a time: unpacking a toolchain takes every core and much of the disk for
/// seconds, and jobs run beside it. (Jobs fetch what they need themselves, whatever this queue
/// holds; a slot bounds those.)
pub const PREFETCHES_AT_ONCE: usize = 1;
/// Prefetches waiting behind the one running; more are dropped, so a burst of uploads (each
/// one a prefetch to every worker) costs a worker at most this many unpacks in a row.
pub const PREFETCH_QUEUE: usize = 4;

/// The worker's prefetch queue: [`PREFETCHES_AT_ONCE`] running, [`PREFETCH_QUEUE`] waiting, a
/// toolchain already running or waiting not queued twice.
#[derive(Debug)]
pub(crate) struct Prefetcher {
    queue: tokio::sync::mpsc::Sender<ToolchainId>,
    /// Toolchains waiting or being fetched.
    pending: Arc<Mutex<HashSet<ToolchainId>>>,
}

/// What became of a prefetch request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Prefetch {
    Queued,
    /// Waiting or being fetched already.
    Duplicate,
    /// [`PREFETCH_QUEUE`] are waiting: dropped.
    QueueFull,
}

/// What the worker tells the scheduler about itself.
#[derive(Debug, Clone)]
pub struct Identity {
    pub id: String,
    pub address: String,
    pub slots: u32,
    /// The public key the worker signs shared-tier entries with.
    pub writer: ferry_cache::WriterKey,
}

/// The worker's exit code when the scheduler refuses its credentials (`EX_CONFIG`).
pub const EXIT_REFUSED: i32 = 78;

/// The scheduler's refusal of this worker's token, id or protocol revision, when that is what
/// ended a session.
fn refused(e: &anyhow::Error) -> Option<&tonic::Status> {
    let status = e.chain().find_map(|c| c.downcast_ref::<tonic::Status>())?;
    let code = status.code();
    matches!(code, tonic::Code::Unauthenticated | tonic::Code::PermissionDenied | tonic::Code::FailedPrecondition)
        .then_some(status)
}

pub(crate) async fn run(
    connect: impl Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<Channel>> + Send>>,
    token: TokenInterceptor,
    identity: Identity,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let prefetcher = {
        let shared = Arc::clone(&shared);
        Prefetcher::start(move |id| prefetch(Arc::clone(&shared), id), shutdown.clone())
    };
    let mut backoff = Duration::from_millis(100);
    loop {
        let attempt = async {
            let channel = connect().await?;
            session(channel, token.clone(), &identity, &shared, &prefetcher, &shutdown, &mut backoff).await
        };
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = attempt => r,
        };
        if let Err(e) = result {
            if let Some(status) = refused(&e) {
                // Retrying cannot help, and a worker that loops quietly looks healthy to its
                // supervisor: say why and stop (systemd shows the unit failed, with this line).
                if status.code() == tonic::Code::FailedPrecondition {
                    tracing::error!(
                        reason = status.message(),
                        "the scheduler cannot serve this worker's release; exiting"
                    );
                } else {
                    tracing::error!(
                        code = ?status.code(),
                        reason = status.message(),
                        "the scheduler refused this worker: check worker.token (the scheduler must list it with \
                         role \"worker\") and worker.id (another worker's token may own it); exiting"
                    );
                }
                std::process::exit(EXIT_REFUSED);
            }
            tracing::warn!(error = %format!("{e:#}"), retry_in_ms = backoff.as_millis() as u64, "scheduler session ended");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn session(
    channel: Channel,
    token: TokenInterceptor,
    identity: &Identity,
    shared: &Arc<Shared>,
    prefetcher: &Prefetcher,
    shutdown: &CancellationToken,
    backoff: &mut Duration,
) -> anyhow::Result<()> {
    let mut client = SchedulerClient::with_interceptor(channel, token);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let register = v1::Register {
        worker_id: identity.id.clone(),
        address: identity.address.clone(),
        slots: identity.slots,
        toolchains: shared.toolchains.present().iter().map(|t| to_digest(t.0)).collect(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        protocol: ferry_proto::PROTOCOL,
    };
    tx.send(v1::WorkerMessage { kind: Some(worker_message::Kind::Register(register)) }).await?;
    let mut inbound = client.worker_session(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
    let lease_ms = match inbound.message().await? {
        Some(v1::SchedulerMessage { kind: Some(scheduler_message::Kind::Registered(r)) }) => {
            let key: ferry_proto::GrantKey =
                r.grant_key.as_slice().try_into().map_err(|_| anyhow::anyhow!("the scheduler sent no grant key"))?;
            let mut keys = shared.grant_keys.lock().unwrap_or_else(|p| p.into_inner());
            keys.push(key);
            let excess = keys.len().saturating_sub(2);
            keys.drain(..excess);
            let offset = ferry_proto::clock_offset(r.now_unix_ms);
            shared.clock_offset_ms.store(offset, std::sync::atomic::Ordering::Relaxed);
            if offset.abs() > 2_000 {
                tracing::warn!(
                    offset_ms = offset,
                    "this worker's clock and the scheduler's differ by more than 2 s: job grants are judged on the \
                     scheduler's clock, but check NTP on both"
                );
            }
            r.lease_ms
        }
        _ => anyhow::bail!("the scheduler did not confirm the registration"),
    };
    tracing::info!(worker = %identity.id, lease_ms, "registered with the scheduler");
    // The key it signs with, vouched for by this session's credential.
    let writer = v1::RegisterWriterRequest { public_key: identity.writer.0.to_vec(), name: identity.id.clone() };
    match client.register_writer(writer).await {
        Ok(r) if r.get_ref().trusted => tracing::info!(writer = %identity.writer, "writer key registered"),
        Ok(_) => tracing::error!(
            writer = %identity.writer,
            "the scheduler has this worker's writer key revoked: nothing it publishes will be accepted; \
             remove the key file (writer_key_file) to make a new one"
        ),
        Err(e) => {
            tracing::warn!(error = %e.message(), "the writer key could not be registered: what this worker publishes may be refused")
        }
    }
    *backoff = Duration::from_millis(100);
    let every = Duration::from_millis(u64::from(lease_ms.max(300)) / 3);
    loop {
        // Report every third of the lease, and at once when a job ends.
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            m = inbound.message() => match m? {
                Some(v1::SchedulerMessage { kind: Some(scheduler_message::Kind::Prefetch(t)) }) => {
                    match ferry_proto::digest(t.id.as_ref(), "id").map(ToolchainId) {
                        Ok(id) if shared.toolchains.present().contains(&id) => {}
                        Ok(id) => match prefetcher.request(id) {
                            Prefetch::Queued | Prefetch::Duplicate => {}
                            Prefetch::QueueFull => tracing::info!(
                                toolchain = %id,
                                waiting = PREFETCH_QUEUE,
                                "prefetch dropped: the queue is full (the first job that needs it fetches it)"
                            ),
                        },
                        Err(e) => tracing::warn!(error = %e, "bad prefetch message"),
                    }
                    continue;
                }
                Some(_) => continue,
                None => anyhow::bail!("the scheduler closed the session"),
            },
            _ = tokio::time::sleep(every) => {}
            _ = shared.job_ended.notified() => {}
        }
        let ended = std::mem::take(&mut *shared.ended.lock().unwrap_or_else(|p| p.into_inner()));
        let running: Vec<u64> = shared.running.lock().unwrap_or_else(|p| p.into_inner()).iter().copied().collect();
        let report = v1::Report {
            busy: running.len() as u32,
            toolchains: shared.toolchains.present().iter().map(|t| to_digest(t.0)).collect(),
            ended,
            running,
        };
        tx.send(v1::WorkerMessage { kind: Some(worker_message::Kind::Report(report)) }).await?;
    }
}

/// Fetches and unpacks `id` unless it is here already (concurrent jobs share the one fetch).
async fn prefetch(shared: Arc<Shared>, id: ToolchainId) {
    match shared.toolchain(id).await {
        Ok(_) => {
            tracing::info!(toolchain = %id, "prefetched a newly uploaded toolchain");
            // Report at once: the scheduler holds this toolchain's jobs back until a worker has it.
            shared.job_ended.notify_one();
        }
        Err(e) => tracing::warn!(toolchain = %id, error = %e, "prefetching a toolchain failed"),
    }
}

impl Prefetcher {
    /// Starts the task that runs prefetches (`fetch`), one after the other, until `shutdown`.
    pub fn start<F, Fut>(fetch: F, shutdown: CancellationToken) -> Prefetcher
    where
        F: Fn(ToolchainId) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        const { assert!(PREFETCHES_AT_ONCE == 1, "one task runs them in turn") };
        let (queue, mut waiting) = tokio::sync::mpsc::channel(PREFETCH_QUEUE);
        let pending: Arc<Mutex<HashSet<ToolchainId>>> = Arc::default();
        let done = Arc::clone(&pending);
        tokio::spawn(async move {
            loop {
                let id = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    id = waiting.recv() => match id { Some(id) => id, None => return },
                };
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    () = fetch(id) => {}
                }
                done.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            }
        });
        Prefetcher { queue, pending }
    }

    /// Queues a prefetch of `id`, unless it is waiting or running already or the queue is full.
    pub fn request(&self, id: ToolchainId) -> Prefetch {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if !pending.insert(id) {
            return Prefetch::Duplicate;
        }
        match self.queue.try_send(id) {
            Ok(()) => Prefetch::Queued,
            Err(_) => {
                pending.remove(&id);
                Prefetch::QueueFull
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Prefetches that wait for the test to let each one finish, counting how many run at once.
    #[tokio::test]
    async fn prefetches_run_one_at_a_time_without_duplicates_and_a_full_queue_drops_more() {
        let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel();
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let running = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let most = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let fetch = {
            let (gate, running, most) = (Arc::clone(&gate), Arc::clone(&running), Arc::clone(&most));
            move |id: ToolchainId| {
                let (gate, running, most, started_tx) =
                    (Arc::clone(&gate), Arc::clone(&running), Arc::clone(&most), started_tx.clone());
                async move {
                    use std::sync::atomic::Ordering::SeqCst;
                    most.fetch_max(running.fetch_add(1, SeqCst) + 1, SeqCst);
                    started_tx.send(id).unwrap();
                    gate.acquire().await.unwrap().forget();
                    running.fetch_sub(1, SeqCst);
                }
            }
        };
        let shutdown = CancellationToken::new();
        let prefetcher = Prefetcher::start(fetch, shutdown.clone());
        let id = |n: u8| ToolchainId([n; 32]);
        assert_eq!(prefetcher.request(id(0)), Prefetch::Queued);
        assert_eq!(started.recv().await, Some(id(0)), "the first one runs");
        assert_eq!(prefetcher.request(id(0)), Prefetch::Duplicate, "running");
        for n in 1..=PREFETCH_QUEUE as u8 {
            assert_eq!(prefetcher.request(id(n)), Prefetch::Queued);
        }
        assert_eq!(prefetcher.request(id(1)), Prefetch::Duplicate, "waiting");
        assert_eq!(prefetcher.request(id(9)), Prefetch::QueueFull);
        gate.add_permits(PREFETCH_QUEUE + 1);
        for n in 1..=PREFETCH_QUEUE as u8 {
            assert_eq!(started.recv().await, Some(id(n)), "in the order they came");
        }
        assert_eq!(most.load(std::sync::atomic::Ordering::SeqCst), PREFETCHES_AT_ONCE);
        // Done: the same toolchain may be asked for again (it was evicted, say).
        while !prefetcher.pending.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
        assert_eq!(prefetcher.request(id(0)), Prefetch::Queued);
        assert_eq!(started.recv().await, Some(id(0)));
        shutdown.cancel();
    }
}
