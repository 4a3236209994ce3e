//! The scheduler's HTTP endpoint (`--http ADDR`): Prometheus metrics at `/metrics` and a status
//! page at `/` that refreshes itself every 2 s.
//!
//! Metrics (all `ferry_scheduler_…` or `ferry_shared_cache_…`/`ferry_toolchain_…`):
//! | name | type | labels |
//! |---|---|---|
//! | `ferry_scheduler_workers` | gauge | `state`: `registered`, `quarantined` |
//! | `ferry_scheduler_slots` | gauge | `state`: `total`, `busy` |
//! | `ferry_scheduler_queue_depth` | gauge | |
//! | `ferry_scheduler_jobs_running` | gauge | |
//! | `ferry_scheduler_jobs_total` | counter | `outcome`: `done`, `failed` |
//! | `ferry_scheduler_allocations_total` | counter | `result`: `assigned`, or the "compile locally" reason (`no-workers`, `no-capacity`, `toolchain-fetching`, `workers-quarantined`) |
//! | `ferry_scheduler_allocation_seconds` | histogram | time to answer an allocation (the queue wait) |
//! | `ferry_shared_cache_gets_total` | counter | `result`: `hit`, `miss`, `corrupt`, `busy`, `stalled` (a hit whose reader took no piece within `cache_send_timeout_ms`: cut off); a hit also has `kind`: `result` or `manifest`. A compile that hits reads a manifest and a result, one that misses ends at a manifest it does not find: its hit ratio is `hit` of `kind="result"` over that plus `miss` |
//! | `ferry_shared_cache_puts_total` | counter | `result`: `published`, `present`, `refused`, `busy`, `idle` (abandoned: nothing sent within `cache_idle_timeout_ms`), `removed` (a verifier found the entry wrong) |
//! | `ferry_shared_cache_bytes_total` | counter | `direction`: `read`, `written` |
//! | `ferry_shared_cache_size_bytes`, `ferry_shared_cache_entries` | gauge | (rescanned at most every 30 s) |
//! | `ferry_toolchain_transfers_total` | counter | `direction`: `upload`, `fetch`; `result`: `ok`, `refused` |
//! | `ferry_toolchain_bytes_total` | counter | `direction` |
//! | `ferry_toolchains` | gauge | archives stored |
//! | `ferry_toolchain_store_bytes` | gauge | bytes of archives stored (at most `archive_store_size`) |
//! | `ferry_toolchains_evicted_total` | counter | archives removed to make room for an upload |
//! | `ferry_shared_cache_limit_bytes` | gauge | the shared tier's size limit (`cache_size`) |
//! | `ferry_build_info`, `ferry_start_time_seconds` | gauge | `daemon` (`scheduler`), `version`, `protocol` (see `ferry_proto::http::register_build_info`) |

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::response::Html;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::service::Service;

type Labels = Vec<(&'static str, String)>;

/// Every metric the scheduler keeps; events count themselves, state is read at each scrape.
#[derive(Debug)]
pub struct Metrics {
    workers: Family<Labels, Gauge>,
    slots: Family<Labels, Gauge>,
    queue_depth: Gauge,
    running: Gauge,
    jobs: Family<Labels, Counter>,
    /// The state's cumulative job counts at the last scrape (the counters grow by the difference).
    jobs_seen: Mutex<(u64, u64)>,
    allocations: Family<Labels, Counter>,
    allocation_seconds: Histogram,
    cache_gets: Family<Labels, Counter>,
    cache_puts: Family<Labels, Counter>,
    cache_bytes: Family<Labels, Counter>,
    cache_size: Gauge,
    cache_limit: Gauge,
    cache_entries: Gauge,
    toolchain_transfers: Family<Labels, Counter>,
    toolchain_bytes: Family<Labels, Counter>,
    toolchains: Gauge,
    toolchain_store_bytes: Gauge,
    toolchains_evicted: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            workers: Family::default(),
            slots: Family::default(),
            queue_depth: Gauge::default(),
            running: Gauge::default(),
            jobs: Family::default(),
            jobs_seen: Mutex::new((0, 0)),
            allocations: Family::default(),
            // 1 ms to about 16 s.
            allocation_seconds: Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.001, 2.0, 15,
            )),
            cache_gets: Family::default(),
            cache_puts: Family::default(),
            cache_bytes: Family::default(),
            cache_size: Gauge::default(),
            cache_limit: Gauge::default(),
            cache_entries: Gauge::default(),
            toolchain_transfers: Family::default(),
            toolchain_bytes: Family::default(),
            toolchains: Gauge::default(),
            toolchain_store_bytes: Gauge::default(),
            toolchains_evicted: Counter::default(),
        }
    }
}

fn label(name: &'static str, value: impl Into<String>) -> Labels {
    vec![(name, value.into())]
}

impl Metrics {
    /// A registry holding every metric (they are shared with `self`).
    fn registry(&self) -> Registry {
        let mut r = Registry::default();
        ferry_proto::http::register_build_info(&mut r, "scheduler");
        r.register("ferry_scheduler_workers", "Registered workers, and those in quarantine", self.workers.clone());
        r.register(
            "ferry_scheduler_slots",
            "Job slots of the registered workers, and how many are busy",
            self.slots.clone(),
        );
        r.register("ferry_scheduler_queue_depth", "Allocations waiting for a slot", self.queue_depth.clone());
        r.register("ferry_scheduler_jobs_running", "Jobs assigned and not yet reported", self.running.clone());
        r.register("ferry_scheduler_jobs", "Jobs ended, by outcome", self.jobs.clone());
        r.register("ferry_scheduler_allocations", "Allocation answers, by result", self.allocations.clone());
        r.register(
            "ferry_scheduler_allocation_seconds",
            "Time to answer an allocation, queue wait included",
            self.allocation_seconds.clone(),
        );
        r.register("ferry_shared_cache_gets", "Shared tier reads, by result", self.cache_gets.clone());
        r.register("ferry_shared_cache_puts", "Shared tier writes, by result", self.cache_puts.clone());
        r.register("ferry_shared_cache_bytes", "Shared tier bytes moved, by direction", self.cache_bytes.clone());
        r.register("ferry_shared_cache_size_bytes", "Bytes the shared tier holds", self.cache_size.clone());
        r.register("ferry_shared_cache_limit_bytes", "The shared tier's size limit", self.cache_limit.clone());
        r.register("ferry_shared_cache_entries", "Entries the shared tier holds", self.cache_entries.clone());
        r.register(
            "ferry_toolchain_transfers",
            "Toolchain archives received and served",
            self.toolchain_transfers.clone(),
        );
        r.register(
            "ferry_toolchain_bytes",
            "Toolchain archive bytes received and served",
            self.toolchain_bytes.clone(),
        );
        r.register("ferry_toolchains", "Toolchain archives stored", self.toolchains.clone());
        r.register(
            "ferry_toolchain_store_bytes",
            "Bytes of toolchain archives stored",
            self.toolchain_store_bytes.clone(),
        );
        r.register(
            "ferry_toolchains_evicted",
            "Toolchain archives removed to make room for an upload",
            self.toolchains_evicted.clone(),
        );
        r
    }

    /// One allocation answered: `result` is `assigned` or the "compile locally" reason.
    pub fn allocated(&self, result: &str, took: Duration) {
        self.allocations.get_or_create(&label("result", result)).inc();
        self.allocation_seconds.observe(took.as_secs_f64());
    }

    pub fn cache_get(&self, result: &'static str) {
        self.cache_gets.get_or_create(&label("result", result)).inc();
    }

    /// A hit served: `kind` is the entry's (`result` or `manifest`).
    pub fn cache_hit(&self, kind: &'static str) {
        self.cache_gets.get_or_create(&vec![("result", "hit".to_owned()), ("kind", kind.to_owned())]).inc();
    }

    pub fn cache_put(&self, result: &'static str) {
        self.cache_puts.get_or_create(&label("result", result)).inc();
    }

    pub fn cache_bytes(&self, direction: &'static str, bytes: u64) {
        self.cache_bytes.get_or_create(&label("direction", direction)).inc_by(bytes);
    }

    pub fn toolchain_transfer(&self, direction: &'static str, ok: bool, bytes: u64) {
        let labels =
            vec![("direction", direction.to_owned()), ("result", if ok { "ok" } else { "refused" }.to_owned())];
        self.toolchain_transfers.get_or_create(&labels).inc();
        self.toolchain_bytes.get_or_create(&label("direction", direction)).inc_by(bytes);
    }

    pub fn toolchains_evicted(&self, count: u64) {
        self.toolchains_evicted.inc_by(count);
    }

    /// Sets the gauges (and the job counters) from the scheduler's state.
    fn refresh(&self, service: &Service) {
        let status = service.state_status();
        let registered = status.workers.len() as i64;
        let quarantined = status.workers.iter().filter(|w| w.quarantined_for.is_some()).count() as i64;
        self.workers.get_or_create(&label("state", "registered")).set(registered);
        self.workers.get_or_create(&label("state", "quarantined")).set(quarantined);
        self.slots.get_or_create(&label("state", "total")).set(status.workers.iter().map(|w| i64::from(w.slots)).sum());
        self.slots.get_or_create(&label("state", "busy")).set(status.workers.iter().map(|w| i64::from(w.busy)).sum());
        self.queue_depth.set(status.queued as i64);
        self.running.set(status.running as i64);
        {
            let mut seen = self.jobs_seen.lock().unwrap_or_else(|p| p.into_inner());
            let done = status.jobs_done.saturating_sub(seen.0);
            let failed = status.jobs_failed.saturating_sub(seen.1);
            self.jobs.get_or_create(&label("outcome", "done")).inc_by(done);
            self.jobs.get_or_create(&label("outcome", "failed")).inc_by(failed);
            *seen = (status.jobs_done.max(seen.0), status.jobs_failed.max(seen.1));
        }
        self.toolchains.set(service.toolchain_records().len() as i64);
        self.toolchain_store_bytes.set(service.toolchain_store_bytes() as i64);
        self.cache_limit.set(service.cache_limit() as i64);
        if let Some(usage) = service.cache_usage() {
            self.cache_size.set(usage.bytes as i64);
            self.cache_entries.set(usage.entries as i64);
        }
    }
}

/// The router for `--http`: `/metrics` and the status page at `/`.
pub fn router(service: Service) -> axum::Router {
    let metrics = service.metrics();
    let registry = Arc::new(metrics.registry());
    let refresh: ferry_proto::http::Refresh = {
        let service = service.clone();
        Arc::new(move || service.metrics().refresh(&service))
    };
    ferry_proto::http::metrics_router(registry, refresh).route(
        "/",
        axum::routing::get(move || {
            let service = service.clone();
            async move { Html(status_page(&service)) }
        }),
    )
}

/// The status page: workers, queue, toolchains and the shared tier, as HTML that reloads itself.
fn status_page(service: &Service) -> String {
    let status = service.state_status();
    let mut html = String::from(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"2\">\
         <title>ferry scheduler</title><style>body{font-family:sans-serif;margin:2em}\
         table{border-collapse:collapse;margin-bottom:2em}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}\
         th{background:#eee}.bad{color:#a00}</style></head><body>\n<h1>ferry scheduler</h1>\n",
    );
    html.push_str(&format!(
        "<h2>Queue</h2>\n<table id=\"queue\"><tr><th>queued</th><th>running</th><th>jobs done</th><th>jobs failed</th></tr>\
         <tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr></table>\n",
        status.queued, status.running, status.jobs_done, status.jobs_failed
    ));
    html.push_str(
        "<h2>Workers</h2>\n<table id=\"workers\"><tr><th>worker</th><th>address</th><th>version</th><th>slots</th>\
         <th>busy</th><th>last seen</th><th>failures</th><th>last error</th><th>quarantine</th><th>toolchains</th></tr>\n",
    );
    if status.workers.is_empty() {
        html.push_str("<tr><td colspan=\"10\">no workers registered</td></tr>\n");
    }
    for w in &status.workers {
        let quarantine = w.quarantined_for.map_or_else(String::new, |d| format!("{} s left", d.as_secs().max(1)));
        html.push_str(&format!(
            "<tr class=\"worker\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.1} s ago</td>\
             <td>{}</td><td class=\"bad\">{}</td><td class=\"bad\">{}</td><td>{}</td></tr>\n",
            escape(&w.id),
            escape(&w.address),
            escape(&w.version),
            w.slots,
            w.busy,
            w.last_seen.as_secs_f64(),
            w.failures,
            escape(w.last_error.as_deref().unwrap_or("")),
            quarantine,
            w.toolchains.len()
        ));
    }
    html.push_str("</table>\n<h2>Toolchains</h2>\n<table id=\"toolchains\"><tr><th>toolchain</th><th>rustc</th><th>targets</th><th>size</th><th>workers holding it</th></tr>\n");
    for r in service.toolchain_records() {
        let holders = r.id.parse().map(|id| service.holders(&id)).unwrap_or_default();
        html.push_str(&format!(
            "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{:.1} MiB</td><td>{}</td></tr>\n",
            escape(r.id.get(..16).unwrap_or(&r.id)),
            escape(&r.rustc_version),
            escape(&r.targets.join(", ")),
            r.bytes as f64 / (1 << 20) as f64,
            escape(&holders.join(", "))
        ));
    }
    let usage = service.cache_usage();
    html.push_str(&format!(
        "</table>\n<h2>Shared cache tier</h2>\n<table id=\"cache\"><tr><th>entries</th><th>size</th><th>corrupt entries removed</th></tr>\
         <tr><td>{}</td><td>{:.1} MiB</td><td>{}</td></tr></table>\n",
        usage.as_ref().map_or(0, |u| u.entries),
        usage.as_ref().map_or(0, |u| u.bytes) as f64 / (1 << 20) as f64,
        service.corrupt_entries()
    ));
    html.push_str("<p><a href=\"/metrics\">metrics</a></p>\n</body></html>\n");
    html
}

/// Text for HTML: worker ids, addresses and errors come from the network.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_from_the_network_cannot_become_markup() {
        assert_eq!(
            escape("<script>alert('x')</script> & \"y\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;y&quot;"
        );
    }
}
