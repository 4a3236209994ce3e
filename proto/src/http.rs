//! The daemons' optional HTTP endpoint (`--http ADDR`, `http` in the config; off by default):
//! Prometheus text at `/metrics` (every metric named `ferry_…`), and whatever pages the daemon
//! adds (the scheduler's status page at `/`).
//!
//! It serves read-only state without authentication, so it is meant for loopback or a monitoring
//! network; a daemon logs a warning when it is given another address.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Registers what every daemon reports about itself: `ferry_build_info{daemon, version, protocol}`
/// (always 1: join on it to see which versions run) and `ferry_start_time_seconds{daemon}` (Unix
/// seconds; `time() - ferry_start_time_seconds` is the uptime, and a change a restart).
pub fn register_build_info(registry: &mut Registry, daemon: &str) {
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge;
    let info: Family<Vec<(&'static str, String)>, Gauge> = Family::default();
    let labels = vec![
        ("daemon", daemon.to_owned()),
        ("version", env!("CARGO_PKG_VERSION").to_owned()),
        ("protocol", "ferry.v1".to_owned()),
    ];
    info.get_or_create(&labels).set(1);
    registry.register("ferry_build_info", "The daemon's version and protocol (always 1)", info);
    let started: Family<Vec<(&'static str, String)>, Gauge> = Family::default();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    started.get_or_create(&vec![("daemon", daemon.to_owned())]).set(now as i64);
    registry.register("ferry_start_time_seconds", "When the daemon started, Unix seconds", started);
}

/// Called before each scrape, to set the gauges read from the daemon's state.
pub type Refresh = Arc<dyn Fn() + Send + Sync>;

/// A router serving `registry` at `/metrics` (after `refresh`), in the Prometheus text format.
pub fn metrics_router(registry: Arc<Registry>, refresh: Refresh) -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let registry = Arc::clone(&registry);
            let refresh = Arc::clone(&refresh);
            async move {
                refresh();
                let mut text = String::new();
                match encode(&mut text, &registry) {
                    Ok(()) => (
                        StatusCode::OK,
                        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
                        text,
                    )
                        .into_response(),
                    Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("encoding metrics: {e}")).into_response(),
                }
            }
        }),
    )
}

/// Binds `addr` (so a bad address fails the daemon's start, not a later scrape) and logs a
/// warning for an address other than loopback.
pub async fn bind(addr: &str) -> anyhow::Result<TcpListener> {
    let listener =
        TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("cannot listen for HTTP on {addr}: {e}"))?;
    let bound: SocketAddr = listener.local_addr()?;
    if !bound.ip().is_loopback() {
        tracing::warn!(%bound, "the HTTP endpoint serves metrics and status without authentication: keep it on a monitoring network");
    }
    Ok(listener)
}

/// Serves `router` on `listener` until `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, router: axum::Router, shutdown: CancellationToken) -> anyhow::Result<()> {
    axum::serve(listener, router).with_graceful_shutdown(async move { shutdown.cancelled().await }).await?;
    Ok(())
}
