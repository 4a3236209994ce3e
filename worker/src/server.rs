//! [`run`]: serve the `Worker` service on a listener and hold the scheduler session, until the
//! shutdown token is cancelled.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use ferry_cache::{MemcachedStore, RedisStore, Store};
use ferry_proto::v1::scheduler_client::SchedulerClient;
use ferry_proto::v1::worker_server::WorkerServer;
use ferry_proto::{RemoteCache, SharedTierSpec, TokenInterceptor, check_exposure, to_digest};
use ferry_toolchains::ToolchainId;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

use crate::blobs::BlobStore;
use crate::config::WorkerConfig;
use crate::publish::Publisher;
use crate::service::{Fetcher, Service, Shared};
use crate::session;
use crate::toolchain_cache::ToolchainCache;

pub async fn run(config: WorkerConfig, listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    check_exposure(addr, config.tls.is_some(), true, config.insecure).map_err(anyhow::Error::msg)?;
    let data = &config.data_dir;
    crate::check::prepare_data_dir(data).with_context(|| format!("preparing the data dir {}", data.display()))?;
    let jobs_dir = data.join("jobs");
    // Trees of jobs a previous run left (a killed worker); the directory itself stays.
    for stale in std::fs::read_dir(&jobs_dir)?.flatten() {
        crate::limits::unmount(&stale.path());
        let _ = std::fs::remove_dir_all(stale.path());
    }
    let token = TokenInterceptor::new(config.token.as_deref()).map_err(anyhow::Error::msg)?;
    // What the worker publishes is signed with its own key, made at the first start.
    let writer = ferry_cache::Signer::read_or_create(&config.writer_key_file)
        .map_err(|e| anyhow::anyhow!("the writer key (writer_key_file): {e}"))?
        .public();
    tracing::info!(%writer, file = %config.writer_key_file.display(), "writer key");
    let connect = {
        let (url, ca) = (config.scheduler.clone(), config.ca.clone());
        move || {
            let (url, ca) = (url.clone(), ca.clone());
            Box::pin(async move { connect(&url, ca.as_deref()).await })
                as std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<Channel>> + Send>>
        }
    };
    let fetch: Fetcher = {
        let connect = connect.clone();
        let token = token.clone();
        Arc::new(move |id: ToolchainId, sink| {
            let (connect, token) = (connect.clone(), token.clone());
            Box::pin(async move { fetch(connect().await.map_err(|e| format!("{e:#}"))?, token, id, sink).await })
        })
    };
    let worker_id = config.id.clone().unwrap_or_else(|| format!("{}-{}", hostname(), addr.port()));
    let shared = Arc::new(Shared {
        worker_id: worker_id.clone(),
        grant_keys: Mutex::new(Vec::new()),
        clock_offset_ms: Default::default(),
        granted: Mutex::new(HashMap::new()),
        blobs: BlobStore::open(data, config.blob_store_size).context("opening the blob store")?,
        toolchains: ToolchainCache::open(data, config.toolchain_cache_bytes).context("opening the toolchain cache")?,
        sandbox: config.sandbox.clone(),
        jobs_dir,
        observe_dir: data.join("observe"),
        slots: Semaphore::new(config.slots as usize),
        uploads: crate::service::Uploads::new(config.slots),
        fetch,
        running: Mutex::new(Default::default()),
        ended: Mutex::new(Vec::new()),
        job_ended: tokio::sync::Notify::new(),
        publisher: publisher(&config, token.clone(), &data.join("publish"))
            .context("preparing the directory of outputs waiting to be published")?,
        metrics: crate::http::Metrics::default(),
    });
    let identity = session::Identity {
        id: worker_id,
        address: config.advertise.clone().unwrap_or_else(|| addr.to_string()),
        slots: config.slots,
        writer,
    };
    // `http on ADDR` right after `listening on ADDR`, for whoever waits for both.
    let http = match &config.http {
        Some(http) => {
            let listener = ferry_proto::http::bind(http).await?;
            println!("http on {}", listener.local_addr()?);
            std::io::Write::flush(&mut std::io::stdout())?;
            let router = crate::http::router(Arc::clone(&shared), config.slots);
            Some(tokio::spawn(ferry_proto::http::serve(listener, router, shutdown.clone())))
        }
        None => None,
    };
    let session = tokio::spawn(session::run(connect, token, identity, Arc::clone(&shared), shutdown.clone()));
    let stopping = Arc::clone(&shared);
    let grants = Arc::clone(&shared);
    let api = InterceptedService::new(
        WorkerServer::new(Service { shared }).max_decoding_message_size(16 << 20).max_encoding_message_size(16 << 20),
        move |mut request: tonic::Request<()>| {
            let grant = grants.check_grant(&request).map_err(|e| tonic::Status::unauthenticated(e.to_string()))?;
            request.extensions_mut().insert(grant);
            Ok(request)
        },
    );
    // No call outlives the sandbox's own wall clock by much.
    let mut server = ferry_proto::daemon::server().timeout(config.sandbox.wall_clock + Duration::from_secs(300));
    if let Some((cert, key)) = &config.tls {
        server = server.tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))?;
    }
    tracing::info!(%addr, slots = config.slots, "worker serving");
    let served = server
        .add_service(api)
        .serve_with_incoming_shutdown(ferry_proto::daemon::incoming(listener), shutdown.cancelled())
        .await;
    shutdown.cancel();
    let _ = session.await;
    if let Some(http) = http {
        let _ = http.await;
    }
    if served.is_ok() {
        stopping.blobs.close();
    }
    served.context("serving")
}

async fn connect(url: &str, ca: Option<&std::path::Path>) -> anyhow::Result<Channel> {
    endpoint(url, ca)?.connect().await.with_context(|| format!("cannot connect to {url}"))
}

fn endpoint(url: &str, ca: Option<&std::path::Path>) -> anyhow::Result<Endpoint> {
    let mut endpoint = Endpoint::from_shared(url.to_owned())?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .initial_stream_window_size(8 << 20)
        .initial_connection_window_size(16 << 20);
    if url.starts_with("https://") {
        let mut tls = ClientTlsConfig::new().with_enabled_roots();
        if let Some(ca) = ca {
            tls = tls.ca_certificate(Certificate::from_pem(std::fs::read(ca)?));
        }
        endpoint = endpoint.tls_config(tls)?;
    }
    Ok(endpoint)
}

/// The shared tier the worker publishes to, opened on the publisher's own thread: what it writes
/// is signed with the worker's key (registered with the scheduler when its session starts), what
/// it reads back (manifests) must be signed by a writer the scheduler lists, the trust file names,
/// or the worker itself.
fn publisher(config: &WorkerConfig, token: TokenInterceptor, staging: &Path) -> std::io::Result<Option<Publisher>> {
    let (url, ca) = (config.scheduler.clone(), config.ca.clone());
    let (key_file, file_trust) = (config.writer_key_file.clone(), config.trust.clone());
    let signed = move |store: Box<dyn Store>, from_scheduler: ferry_cache::Trust| {
        let signer = ferry_cache::Signer::read(&key_file).ok();
        let mut trust = from_scheduler;
        trust.merge(&file_trust);
        if let Some(own) = &signer {
            trust.trusted.insert(own.public());
        }
        Box::new(ferry_cache::Signed::new(store, signer, trust)) as Box<dyn Store>
    };
    let started = match config.shared_cache.clone() {
        SharedTierSpec::Off => return Ok(None),
        SharedTierSpec::Redis(redis) => {
            let tls = config.redis_tls.clone();
            Publisher::start(staging, move || {
                RedisStore::new(&redis, &tls, STORE_DEADLINE).map(|s| signed(Box::new(s), Default::default()))
            })
        }
        SharedTierSpec::Memcached(url) => Publisher::start(staging, move || {
            MemcachedStore::new(&url, STORE_DEADLINE).map(|s| signed(Box::new(s), Default::default()))
        }),
        SharedTierSpec::Scheduler => Publisher::start(staging, move || {
            let runtime = std::sync::Arc::new(
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| format!("runtime: {e}"))?,
            );
            // Lazy: the scheduler may not be up yet; every call (re)connects as needed.
            let channel = {
                let _entered = runtime.enter();
                endpoint(&url, ca.as_deref()).map_err(|e| format!("{e:#}"))?.connect_lazy()
            };
            let client = SchedulerClient::with_interceptor(channel, token.clone());
            let remote = RemoteCache::new(runtime, client, STORE_DEADLINE);
            // The scheduler may not answer yet: the worker's own key is enough to publish.
            let trust = remote.trusted_writers().unwrap_or_default();
            Ok(signed(Box::new(remote), trust))
        }),
    };
    started.map(Some)
}

/// Every publishing call's deadline.
const STORE_DEADLINE: Duration = Duration::from_secs(30);

async fn fetch(
    channel: Channel,
    token: TokenInterceptor,
    id: ToolchainId,
    sink: tokio::sync::mpsc::Sender<Result<Vec<u8>, String>>,
) -> Result<(), String> {
    let mut client = SchedulerClient::with_interceptor(channel, token);
    let mut stream = client
        .fetch_toolchain(ferry_proto::v1::ToolchainRef { id: Some(to_digest(id.0)) })
        .await
        .map_err(|s| format!("fetching toolchain {id}: {}", s.message()))?
        .into_inner();
    loop {
        match stream.message().await {
            Ok(Some(chunk)) => {
                if sink.send(Ok(chunk.data)).await.is_err() {
                    // The unpacker stopped: it has refused the archive and says why.
                    return Ok(());
                }
            }
            Ok(None) => return Ok(()),
            Err(s) => {
                let message = format!("fetching toolchain {id}: {}", s.message());
                let _ = sink.send(Err(message.clone())).await;
                return Err(message);
            }
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "worker".into())
}
