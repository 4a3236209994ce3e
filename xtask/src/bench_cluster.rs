//! The scheduler benchmark: a real `ferry-scheduler` service on loopback (in this process), 1,000
//! simulated workers holding real `WorkerSession` streams, and 10,000 `Allocate` calls in flight
//! at once over a few HTTP/2 connections. Reports throughput and per-call latency (p50/p99).

use std::time::{Duration, Instant};

use anyhow::Context;
use ferry_proto::to_digest;
use ferry_proto::v1::scheduler_client::SchedulerClient;
use ferry_proto::v1::{self, worker_message};
use ferry_scheduler::SchedulerConfig;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

const WORKERS: usize = 1_000;
const SLOTS: u32 = 16;
const REQUESTS: usize = 10_000;
const CONNECTIONS: usize = 8;

pub fn allocations() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    println!(
        "== scheduler allocation path ({WORKERS} workers x {SLOTS} slots, {REQUESTS} Allocate calls, loopback gRPC)"
    );
    // All requests in flight at once: throughput. (Latency is then mostly queueing: by Little's
    // law, mean wait = in-flight / throughput.)
    runtime.block_on(run(REQUESTS))?;
    // Bounded concurrency: the per-call latency of the allocation path.
    runtime.block_on(run(64))
}

async fn run(concurrency: usize) -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let mut config = SchedulerConfig::load(None, Some("127.0.0.1:0".into()), Some(data.path().to_owned()))?;
    config.lease = Duration::from_secs(60);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(ferry_scheduler::run(config, listener, shutdown.clone()));

    let mut channels = Vec::new();
    for _ in 0..CONNECTIONS {
        channels.push(Channel::from_shared(url.clone())?.connect().await.context("connecting")?);
    }
    let toolchain = to_digest([7; 32]);
    // Register the simulated workers (a quarter of them already hold the toolchain).
    let mut sessions = Vec::new();
    for i in 0..WORKERS {
        let mut client = SchedulerClient::new(channels[i % CONNECTIONS].clone());
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let register = v1::Register {
            worker_id: format!("sim-{i}"),
            address: format!("127.0.0.1:{}", 20_000 + i),
            slots: SLOTS,
            toolchains: if i % 4 == 0 { vec![toolchain.clone()] } else { vec![] },
            version: "bench".into(),
            protocol: ferry_proto::PROTOCOL,
        };
        tx.send(v1::WorkerMessage { kind: Some(worker_message::Kind::Register(register)) }).await?;
        let mut inbound = client.worker_session(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
        inbound.message().await?.context("registered")?;
        sessions.push((tx, inbound));
    }
    let started = Instant::now();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::with_capacity(concurrency);
    for c in 0..concurrency {
        let mut client = SchedulerClient::new(channels[c % CONNECTIONS].clone());
        let (toolchain, next) = (toolchain.clone(), std::sync::Arc::clone(&next));
        tasks.push(tokio::spawn(async move {
            let mut results = Vec::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < REQUESTS {
                let request = v1::AllocateRequest {
                    toolchain: Some(toolchain.clone()),
                    client_id: format!("client-{}", c % 50),
                    protocol: ferry_proto::PROTOCOL,
                };
                let t = Instant::now();
                let r = client.allocate(request).await.map(|r| r.into_inner());
                results.push((t.elapsed(), r));
            }
            results
        }));
    }
    let mut latencies = Vec::with_capacity(REQUESTS);
    let mut assigned = 0;
    for task in tasks {
        for (latency, result) in task.await? {
            if matches!(result?.result, Some(v1::allocate_response::Result::Assigned(_))) {
                assigned += 1;
            }
            latencies.push(latency);
        }
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!(
        "  {concurrency:>5} in flight: {assigned} assigned in {:.3} s: {:.0} allocations/s (target >= 20000), p50 {:.2} ms, p99 {:.2} ms (target <= 5 ms)",
        elapsed.as_secs_f64(),
        REQUESTS as f64 / elapsed.as_secs_f64(),
        pct(0.50).as_secs_f64() * 1000.0,
        pct(0.99).as_secs_f64() * 1000.0
    );
    drop(sessions);
    shutdown.cancel();
    let _ = server.await;
    Ok(())
}
