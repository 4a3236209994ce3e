//! The worker's side of its scheduler session: connect, register, report every third of the
//! lease (busy slots, unpacked toolchains, jobs ended and running), and when the scheduler goes
//! away, reconnect with capped exponential backoff — forever, until shutdown. A `prefetch` from
//! the scheduler (a toolchain was just uploaded) fetches and unpacks that toolchain in the
//! background, so the first jobs that need it do not wait for it.

use std::sync::Arc;
use std::time::Duration;

use ferry_proto::TokenInterceptor;
use ferry_proto::to_digest;
use ferry_proto::v1::scheduler_client::SchedulerClient;
use ferry_proto::v1::{self, scheduler_message, worker_message};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::service::Shared;

/// What the worker tells the scheduler about itself.
#[derive(Debug, Clone)]
pub struct Identity {
    pub id: String,
    pub address: String,
    pub slots: u32,
}

pub(crate) async fn run(
    connect: impl Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<Channel>> + Send>>,
    token: TokenInterceptor,
    identity: Identity,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let attempt = async {
            let channel = connect().await?;
            session(channel, token.clone(), &identity, &shared, &shutdown, &mut backoff).await
        };
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = attempt => r,
        };
        if let Err(e) = result {
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
            r.lease_ms
        }
        _ => anyhow::bail!("the scheduler did not confirm the registration"),
    };
    tracing::info!(worker = %identity.id, lease_ms, "registered with the scheduler");
    *backoff = Duration::from_millis(100);
    let every = Duration::from_millis(u64::from(lease_ms.max(300)) / 3);
    loop {
        // Report every third of the lease, and at once when a job ends.
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            m = inbound.message() => match m? {
                Some(v1::SchedulerMessage { kind: Some(scheduler_message::Kind::Prefetch(t)) }) => {
                    match ferry_proto::digest(t.id.as_ref(), "id") {
                        Ok(id) => prefetch(Arc::clone(shared), ferry_toolchains::ToolchainId(id)),
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
fn prefetch(shared: Arc<Shared>, id: ferry_toolchains::ToolchainId) {
    tokio::spawn(async move {
        match shared.toolchain(id).await {
            Ok(_) => {
                tracing::info!(toolchain = %id, "prefetched a newly uploaded toolchain");
                // Report at once: the scheduler holds this toolchain's jobs back until a worker has it.
                shared.job_ended.notify_one();
            }
            Err(e) => tracing::warn!(toolchain = %id, error = %e, "prefetching a toolchain failed"),
        }
    });
}
