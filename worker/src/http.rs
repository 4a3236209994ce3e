//! The worker's HTTP endpoint (`--http ADDR`): Prometheus metrics at `/metrics`.
//!
//! | name | type | labels |
//! |---|---|---|
//! | `ferry_worker_jobs_total` | counter | `outcome`: `succeeded`, `failed` (the compile's own error), `limit` (a sandbox limit), `error` (the worker's), `client-gone`, `refused` |
//! | `ferry_worker_job_seconds` | histogram | a job's time on this worker, placing its files included |
//! | `ferry_worker_slots` | gauge | `state`: `total`, `busy` |
//! | `ferry_worker_blob_bytes_total` | counter | input bytes received |
//! | `ferry_worker_blob_store_bytes` | gauge | bytes the blob store holds (at most `blob_store_size`) |
//! | `ferry_build_info`, `ferry_start_time_seconds` | gauge | `daemon` (`worker`), `version`, `protocol` (see `ferry_proto::http::register_build_info`) |

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::service::Shared;

type Labels = Vec<(&'static str, String)>;

#[derive(Debug)]
pub struct Metrics {
    jobs: Family<Labels, Counter>,
    job_seconds: Histogram,
    slots: Family<Labels, Gauge>,
    blob_bytes: Counter,
    blob_store_bytes: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            jobs: Family::default(),
            // 10 ms to about 11 min.
            job_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 17)),
            slots: Family::default(),
            blob_bytes: Counter::default(),
            blob_store_bytes: Gauge::default(),
        }
    }
}

impl Metrics {
    fn registry(&self) -> Registry {
        let mut r = Registry::default();
        ferry_proto::http::register_build_info(&mut r, "worker");
        r.register("ferry_worker_jobs", "Jobs ended here, by outcome", self.jobs.clone());
        r.register("ferry_worker_job_seconds", "Time of a job on this worker", self.job_seconds.clone());
        r.register("ferry_worker_slots", "Job slots, and how many are busy", self.slots.clone());
        r.register("ferry_worker_blob_bytes", "Input bytes received from clients", self.blob_bytes.clone());
        r.register("ferry_worker_blob_store_bytes", "Bytes the blob store holds", self.blob_store_bytes.clone());
        r
    }

    /// A job ended (`seconds` is None for one refused before it ran).
    pub fn job(&self, outcome: &'static str, seconds: Option<f64>) {
        self.jobs.get_or_create(&vec![("outcome", outcome.to_owned())]).inc();
        if let Some(s) = seconds {
            self.job_seconds.observe(s);
        }
    }

    pub fn blob_bytes(&self, bytes: u64) {
        self.blob_bytes.inc_by(bytes);
    }
}

/// The router for `--http`: `/metrics`, its slot and blob store gauges read at each scrape.
pub fn router(shared: Arc<Shared>, slots: u32) -> axum::Router {
    let registry = Arc::new(shared.metrics.registry());
    let refresh: ferry_proto::http::Refresh = Arc::new(move || {
        let busy = shared.running.lock().unwrap_or_else(|p| p.into_inner()).len() as i64;
        shared.metrics.slots.get_or_create(&vec![("state", "total".to_owned())]).set(i64::from(slots));
        shared.metrics.slots.get_or_create(&vec![("state", "busy".to_owned())]).set(busy);
        shared.metrics.blob_store_bytes.set(shared.blobs.bytes() as i64);
    });
    ferry_proto::http::metrics_router(registry, refresh)
}
