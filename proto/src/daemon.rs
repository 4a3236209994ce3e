//! What both daemons do the same way at start: log to stderr (filter from `FERRY_LOG`, default
//! `info`), and turn SIGINT/SIGTERM into a cancelled shutdown token.

use tokio_util::sync::CancellationToken;

/// Logs to stderr with the `FERRY_LOG` filter (default `info`).
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
}

/// The HTTP/2 server settings every ferry daemon uses: large flow-control windows (toolchain
/// archives are hundreds of megabytes) and keepalive (a dead peer is noticed within seconds).
pub fn server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .http2_adaptive_window(Some(true))
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(16 << 20))
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
}

/// A token cancelled on the first SIGINT or SIGTERM. Call inside a tokio runtime.
pub fn shutdown_on_signals() -> std::io::Result<CancellationToken> {
    use tokio::signal::unix::{SignalKind, signal};
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let cancel = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        cancel.cancel();
    });
    Ok(token)
}
