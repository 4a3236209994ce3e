//! The shared cache tier from the wrapper's side: the scheduler's cache service, Redis or
//! memcached, opened only after a local miss, behind a circuit breaker.
//!
//! - Every call has a deadline (`FERRY_SHARED_TIMEOUT_MS`). A tier that errors or misses the
//!   deadline trips the breaker: a marker file in the cache dir makes every wrapper skip the tier
//!   for `FERRY_SHARED_BACKOFF` seconds (counted as `bypassed`), so a sick cache node costs a
//!   build one timeout, not one per compile.
//! - Writes need the `cache-write` role (or Redis ACLs that allow `SET`). A refused write leaves a
//!   marker (per token, for ten minutes) so later compiles do not ask again.
//! - Entries are signed by their writer's Ed25519 key and read only when a writer this client
//!   trusts signed them ([`ferry_cache::Signed`]): the writers the scheduler lists (fetched over
//!   its connection, kept in `<cache dir>/trusted-writers.json` for [`TRUST_FOR`]) and those of
//!   `FERRY_TRUST_FILE`. A client that publishes signs with `FERRY_WRITER_KEY_FILE` (made in the
//!   cache dir when it first publishes) and registers that key with the scheduler first.

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use ferry_cache::{CacheKey, Entry, Error as CacheError, MemcachedStore, PutOutcome, RedisStore, Store};
use ferry_proto::{RemoteCache, SharedTierSpec, TokenInterceptor};

use crate::config::Config;
use crate::files::fresh;
use crate::stats::Stats;

const BREAKER_FILE: &str = "shared-down";
const TRUST_FILE: &str = "trusted-writers.json";
/// How long the scheduler's list of trusted writers is used before it is asked again.
pub const TRUST_FOR: Duration = Duration::from_secs(300);
const REGISTERED_FILE: &str = "writer-registered";
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
        let writer = writer_id(config);
        let signer = ferry_cache::Signer::read(&config.writer_key_file).ok();
        // The store, and the scheduler's list of writers when the store is the scheduler's.
        type Opened = (Box<dyn Store>, Option<ferry_cache::Trust>);
        let opened: Result<Opened, (&'static str, String)> = match &config.shared {
            SharedTierSpec::Off => return None,
            SharedTierSpec::Redis(url) => RedisStore::new(url, &config.redis_tls, config.shared_timeout)
                .map(|s| (Box::new(s) as Box<dyn Store>, None))
                .map_err(|e| ("misconfigured", e)),
            SharedTierSpec::Memcached(url) => MemcachedStore::new(url, config.shared_timeout)
                .map(|s| (Box::new(s) as Box<dyn Store>, None))
                .map_err(|e| ("misconfigured", e)),
            SharedTierSpec::Scheduler => connect(config).map(|remote| {
                let trust = scheduler_trust(config, Some(&remote), stats);
                (Box::new(remote) as Box<dyn Store>, Some(trust))
            }),
        };
        // Readers accept what a trusted writer signed; this client signs what it writes.
        let opened = opened.map(|(store, from_scheduler)| {
            let mut trust = match from_scheduler {
                Some(trust) => trust,
                None if config.scheduler.is_some() => scheduler_trust(config, None, stats),
                None => ferry_cache::Trust::default(),
            };
            if let Some(file) = &config.trust_file {
                trust.merge(file);
            }
            if let Some(own) = &signer {
                trust.trusted.insert(own.public());
            }
            Box::new(ferry_cache::Signed::new(store, signer, trust)) as Box<dyn Store>
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
                // A token that may only read: the setup the guide gives developers, not an error.
                stats.shared_read_only += 1;
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

/// The writers the scheduler trusts: the list kept in the cache dir while fresh, else asked of
/// the scheduler (over `remote`, or a connection of its own) and kept. When it cannot be had, the
/// last list kept (however old), or none (every shared entry is then a miss, counted).
fn scheduler_trust(config: &Config, remote: Option<&RemoteCache>, stats: &mut Stats) -> ferry_cache::Trust {
    let file = config.cache_dir.join(TRUST_FILE);
    let kept: Option<ferry_cache::Trust> = fs::read(&file).ok().and_then(|b| serde_json::from_slice(&b).ok());
    if let Some(trust) = &kept
        && fresh(&file, TRUST_FOR)
    {
        return trust.clone();
    }
    let own;
    let remote = match remote {
        Some(r) => Some(r),
        None => {
            own = connect(config).ok();
            own.as_ref()
        }
    };
    match remote.map(RemoteCache::trusted_writers) {
        Some(Ok(trust)) => {
            let _ = ferry_cache::write_replacing(&file, &serde_json::to_vec(&trust).unwrap_or_default(), 0o644);
            trust
        }
        Some(Err(e)) => {
            tracing::warn!(error = %e, "cannot learn which writers the scheduler trusts");
            count(stats, "trust-unavailable");
            kept.unwrap_or_default()
        }
        None => {
            count(stats, "trust-unavailable");
            kept.unwrap_or_default()
        }
    }
}

/// Before this client first publishes: its writer key (made in the cache dir when it has none),
/// registered with the scheduler when there is one (at most once a day per key). False when it
/// may not publish: no key can be made, or the scheduler refused it (no `cache-write`: the
/// denied marker then stops further tries).
pub fn prepare_writer(config: &Config, stats: &mut Stats) -> bool {
    let signer = match ferry_cache::Signer::read(&config.writer_key_file) {
        Ok(signer) => signer,
        Err(_) => match ferry_cache::Signer::read_or_create(&config.writer_key_file) {
            Ok(signer) => signer,
            Err(e) => {
                tracing::warn!(error = %e, "no writer key: this client does not publish");
                count(stats, "no-writer-key");
                return false;
            }
        },
    };
    if config.scheduler.is_none() {
        return true;
    }
    let marker = config.cache_dir.join(REGISTERED_FILE);
    let public = signer.public().to_string();
    if fresh(&marker, Duration::from_secs(86_400)) && fs::read_to_string(&marker).is_ok_and(|k| k == public) {
        return true;
    }
    let Ok(remote) = connect(config) else {
        count(stats, "unavailable");
        return false;
    };
    let name = crate::commands::hostname();
    match remote.register_writer(signer.public(), &name) {
        Ok(true) => {
            let _ = fs::write(&marker, &public);
            // The list of trusted writers now includes this key: ask again next time.
            let _ = fs::remove_file(config.cache_dir.join(TRUST_FILE));
            true
        }
        Ok(false) => {
            tracing::warn!(key = %public, "the scheduler says this writer key is revoked: this client does not publish");
            count(stats, "writer-revoked");
            false
        }
        Err(e) => {
            let mut tier =
                SharedTier { store: Box::new(remote), cache_dir: config.cache_dir.clone(), writer: writer_id(config) };
            tier.failed(&e, stats);
            false
        }
    }
}

fn writer_id(config: &Config) -> String {
    blake3::hash(format!("{:?} {:?} {:?}", config.shared, config.scheduler, config.token).as_bytes())
        .to_hex()
        .to_string()
}

/// Connects to the scheduler's cache service within the deadline.
fn connect(config: &Config) -> Result<RemoteCache, (&'static str, String)> {
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
    Ok(RemoteCache::new(std::sync::Arc::new(runtime), client, config.shared_timeout))
}

fn count(stats: &mut Stats, reason: &str) {
    *stats.shared_errors.entry(reason.into()).or_default() += 1;
}

/// Opens the breaker for every wrapper using this cache dir.
fn trip(cache_dir: &std::path::Path, reason: &str) {
    let _ = fs::write(cache_dir.join(BREAKER_FILE), reason);
}
