//! The shared cache tier from the wrapper's side: the scheduler's cache service, Redis or
//! memcached, opened only after a local miss, behind a circuit breaker.
//!
//! - Every call has a deadline (`FERRY_SHARED_TIMEOUT_MS`). A tier that errors or misses the
//!   deadline trips the breaker: a marker file in the cache dir makes every wrapper skip the tier
//!   for `FERRY_SHARED_BACKOFF` seconds (counted as `bypassed`), so a sick cache node costs a
//!   build one timeout, not one per compile.
//! - Writes need the `cache-write` role (or Redis ACLs that allow `SET`). A refused write leaves a
//!   marker (per token, for ten minutes) so later compiles do not ask again.

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use ferry_cache::{CacheKey, Entry, Error as CacheError, MemcachedStore, PutOutcome, RedisStore, Store};
use ferry_proto::{RemoteCache, SharedTierSpec, TokenInterceptor};

use crate::config::Config;
use crate::files::fresh;
use crate::stats::Stats;

const BREAKER_FILE: &str = "shared-down";
const DENIED_FILE: &str = "shared-write-denied";
/// How long a refused write keeps this token from trying again.
const DENIED_FOR: Duration = Duration::from_secs(600);

pub struct SharedTier {
    store: Box<dyn Store>,
    cache_dir: PathBuf,
    /// Identifies the credentials whose writes were refused.
    writer: String,
}

impl SharedTier {
    /// The configured tier, or None when there is none or the breaker is open (counted).
    pub fn open(config: &Config, stats: &mut Stats) -> Option<SharedTier> {
        if config.shared == SharedTierSpec::Off {
            return None;
        }
        let breaker = config.cache_dir.join(BREAKER_FILE);
        if fresh(&breaker, config.shared_backoff) {
            count(stats, "bypassed");
            return None;
        }
        let writer = blake3::hash(format!("{:?} {:?} {:?}", config.shared, config.scheduler, config.token).as_bytes())
            .to_hex()
            .to_string();
        let opened = match &config.shared {
            SharedTierSpec::Off => return None,
            SharedTierSpec::Redis(url) => RedisStore::new(url, &config.redis_tls, config.shared_timeout)
                .map(|s| Box::new(s) as Box<dyn Store>)
                .map_err(|e| ("misconfigured", e)),
            SharedTierSpec::Memcached(url) => MemcachedStore::new(url, config.shared_timeout)
                .map(|s| Box::new(s) as Box<dyn Store>)
                .map_err(|e| ("misconfigured", e)),
            SharedTierSpec::Scheduler => connect(config),
        };
        // With the site key, what is written is sealed and only sealed entries are read.
        let opened = opened.map(|store| match config.shared_key {
            Some(key) => Box::new(ferry_cache::Sealed::new(store, key)) as Box<dyn Store>,
            None => store,
        });
        match opened {
            Ok(store) => Some(SharedTier { store, cache_dir: config.cache_dir.clone(), writer }),
            Err((reason, message)) => {
                tracing::warn!(%message, "shared cache tier unavailable");
                count(stats, reason);
                trip(&config.cache_dir, reason);
                None
            }
        }
    }

    /// A verified entry, or None (a miss, or an error that is counted and trips the breaker).
    pub fn get(&mut self, key: &CacheKey, stats: &mut Stats) -> Option<Entry> {
        match self.store.get(key) {
            Ok(found) => found,
            Err(CacheError::Corrupt { path, reason }) => {
                tracing::warn!(path = %path.display(), %reason, "corrupt shared cache entry: not promoted");
                stats.corrupt_entries += 1;
                count(stats, "corrupt-entry");
                None
            }
            Err(e) => {
                self.failed(&e, stats);
                None
            }
        }
    }

    /// May this client write? False once a write was refused (for a while).
    pub fn may_write(&self) -> bool {
        let marker = self.cache_dir.join(DENIED_FILE);
        !(fresh(&marker, DENIED_FOR) && fs::read_to_string(&marker).is_ok_and(|w| w == self.writer))
    }

    /// Publishes an encoded entry (first writer wins). False: refused or failed (counted).
    pub fn put(&mut self, key: &CacheKey, bytes: &[u8], stats: &mut Stats) -> bool {
        match self.store.put_encoded(key, bytes) {
            Ok(PutOutcome::Published { .. }) => {
                stats.shared_writes += 1;
                true
            }
            Ok(PutOutcome::AlreadyPresent) => true,
            Err(e) => {
                self.failed(&e, stats);
                false
            }
        }
    }

    /// Removes an entry verification found wrong. False: not there, or refused or failed
    /// (counted).
    pub fn remove(&mut self, key: &CacheKey, stats: &mut Stats) -> bool {
        match self.store.remove(key) {
            Ok(removed) => removed,
            Err(e) => {
                self.failed(&e, stats);
                false
            }
        }
    }

    /// The store itself, for [`ferry_cache::rustc::recipe::publish_manifest`].
    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    /// Counts a failed call and trips the breaker (a refused write only stops writes).
    pub fn failed(&mut self, e: &CacheError, stats: &mut Stats) {
        let kind = match e {
            CacheError::Io { source, .. } => source.kind(),
            CacheError::Corrupt { .. } => std::io::ErrorKind::InvalidData,
        };
        tracing::warn!(error = %e, cause = %std::error::Error::source(e).map(|s| s.to_string()).unwrap_or_default(), "shared cache call failed");
        match kind {
            std::io::ErrorKind::PermissionDenied => {
                count(stats, "write-denied");
                let _ = fs::write(self.cache_dir.join(DENIED_FILE), &self.writer);
            }
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => {
                count(stats, "timeout");
                trip(&self.cache_dir, "timeout");
            }
            _ => {
                count(stats, "unavailable");
                trip(&self.cache_dir, "unavailable");
            }
        }
    }
}

/// Connects to the scheduler's cache service within the deadline.
fn connect(config: &Config) -> Result<Box<dyn Store>, (&'static str, String)> {
    // Config guarantees a scheduler for this tier.
    let url = config.scheduler.as_deref().ok_or(("misconfigured", "no scheduler is set".to_string()))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ("unavailable", e.to_string()))?;
    let connected = runtime
        .block_on(async { tokio::time::timeout(config.shared_timeout, crate::cluster::channel(config, url)).await });
    let channel = match connected {
        Ok(Ok((channel, _))) => channel,
        Ok(Err(e)) => return Err(("unavailable", format!("{e:#}"))),
        Err(_) => return Err(("timeout", format!("no connection to {url} within {:?}", config.shared_timeout))),
    };
    let token = TokenInterceptor::new(config.token.as_deref()).map_err(|e| ("misconfigured", e))?;
    let client = ferry_proto::v1::scheduler_client::SchedulerClient::with_interceptor(channel, token);
    Ok(Box::new(RemoteCache::new(std::sync::Arc::new(runtime), client, config.shared_timeout)))
}

fn count(stats: &mut Stats, reason: &str) {
    *stats.shared_errors.entry(reason.into()).or_default() += 1;
}

/// Opens the breaker for every wrapper using this cache dir.
fn trip(cache_dir: &std::path::Path, reason: &str) {
    let _ = fs::write(cache_dir.join(BREAKER_FILE), reason);
}
