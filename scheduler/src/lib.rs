//! ferry's scheduler: the pure allocation state machine ([`Scheduler`]), the toolchain archive
//! store, the gRPC service over both, and [`run`], which serves it until told to stop.

mod archives;
mod config;
mod http;
mod service;
mod state;
mod transfers;
mod writers;

use std::time::Duration;

use anyhow::Context;
use ferry_proto::v1::scheduler_server::SchedulerServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Identity, ServerTlsConfig};

pub use config::SchedulerConfig;
pub use service::Service;
pub use state::{
    Allocation, Assignment, ClientId, Effects, JobId, JobOutcome, Registration, Scheduler, StateError, Status, WaitId,
    WorkerId, WorkerStatus,
};

/// Serves the scheduler on `listener` until `shutdown` is cancelled.
pub async fn run(config: SchedulerConfig, listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    config.check_exposure(addr)?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
    let service = Service::new(config.clone(), shutdown.clone())
        .with_context(|| format!("opening the toolchain store in {}", config.data_dir.display()))?;
    let expiry = {
        let service = service.clone();
        let shutdown = shutdown.clone();
        let every = config.lease / 4;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(every) => service.expire(),
                }
            }
        })
    };
    let api = tonic::service::interceptor::InterceptedService::new(
        SchedulerServer::new(service.clone())
            .max_decoding_message_size(config.max_message_bytes)
            .max_encoding_message_size(config.max_message_bytes),
        config.tokens.clone().interceptor(),
    );
    let mut server = ferry_proto::daemon::server().timeout(Duration::from_secs(3600));
    if let Some((cert, key)) = &config.tls {
        server = server.tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))?;
    }
    // `http on ADDR` right after `listening on ADDR`, for whoever waits for both.
    let http = match &config.http {
        Some(http) => {
            let listener = ferry_proto::http::bind(http).await?;
            println!("http on {}", listener.local_addr()?);
            std::io::Write::flush(&mut std::io::stdout())?;
            let router = http::router(service.clone());
            Some(tokio::spawn(ferry_proto::http::serve(listener, router, shutdown.clone())))
        }
        None => None,
    };
    tracing::info!(%addr, tls = config.tls.is_some(), "scheduler serving");
    let served = server
        .add_service(api)
        .serve_with_incoming_shutdown(ferry_proto::daemon::incoming(listener), shutdown.cancelled())
        .await;
    shutdown.cancel();
    let _ = expiry.await;
    if let Some(http) = http {
        let _ = http.await;
    }
    served.context("serving")
}
