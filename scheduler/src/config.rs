//! The scheduler's configuration: a TOML file (`--config`), `FERRY_*` environment variables over
//! it, flags over both; validated once into [`SchedulerConfig`]. Errors name the file and the key.
//!
//! | setting | file key | environment | default |
//! |---|---|---|---|
//! | listen address | `listen` | `FERRY_LISTEN` | `127.0.0.1:7700` |
//! | data directory | `data_dir` | `FERRY_DATA_DIR` | `$XDG_DATA_HOME/ferry-scheduler` (`~/.local/share/ferry-scheduler`) |
//! | worker lease | `lease_ms` | — | `10000` |
//! | queue wait before "compile locally" | `queue_timeout_ms` | — | `5000` |
//! | largest gRPC message | `max_message_bytes` | — | `16777216` |
//! | largest toolchain archive | `max_toolchain_bytes` | — | `4294967296` |
//! | toolchain archives kept (least recently used evicted beyond it; a larger archive is refused) | `archive_store_size` | `FERRY_ARCHIVE_STORE_SIZE` | `20G` |
//! | shared cache tier size (evicts least recently used beyond it) | `cache_size` | `FERRY_SHARED_CACHE_SIZE` | `20G` |
//! | largest shared cache entry | `max_entry_bytes` | — | `1073741824` |
//! | shared cache transfers served at once (each holds at most ~7 MiB: the bound on the tier's memory) | `cache_concurrency` | — | `16` |
//! | job slots the live workers of one credential (token) may offer together; a registration beyond is cut down to what is left, and refused when nothing is | `max_slots_per_credential` | — | `256` |
//! | of those, the most one caller (its token; without tokens, its IP address) holds at once | `cache_concurrency_per_caller` | — | half of `cache_concurrency`, at least 1 |
//! | a `CacheGet` whose reader takes no piece for this long is ended (`DEADLINE_EXCEEDED`) and its transfer freed | `cache_send_timeout_ms` | — | `10000` |
//! | a `CachePut` whose writer sends nothing for this long is abandoned (nothing stored) and its transfer freed | `cache_idle_timeout_ms` | — | `10000` |
//! | TLS certificate and key (PEM) | `tls.cert`, `tls.key` | — | none |
//! | bearer tokens and their roles | `[[tokens]] token, roles` | — | none |
//! | run without TLS/tokens on a non-loopback address | `insecure` | — | `false` |
//! | HTTP address for `/metrics` and the status page at `/` | `http` | `FERRY_HTTP` / `--http` | off |
//! | writers trusted besides those that register (CI machines' keys) | `[[writers]] key, name` | — | none |
//! | writer keys never trusted (rotated away, lost) | `revoked_writers` | — | none |
//!
//! `ferry-scheduler --check-config` loads exactly this, then runs [`SchedulerConfig::check`] (what
//! can be checked without serving) and prints [`SchedulerConfig::summary`].

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use ferry_cache::format_size;
use ferry_proto::{Role, Tokens, check_exposure, tokens_from_config};
use serde::Deserialize;

/// `archive_store_size` when not set: about a hundred toolchains (an archive of rustc with one
/// target is about 200 MiB).
const DEFAULT_ARCHIVE_STORE_SIZE: u64 = 20 << 30;

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Where the file settings came from (the `--config` path, or `<defaults>`): messages name it.
    pub origin: String,
    pub listen: String,
    pub data_dir: PathBuf,
    /// A worker that does not report within this is removed and its jobs fail over.
    pub lease: Duration,
    /// How long an allocation waits for a free slot before the client compiles locally.
    pub queue_timeout: Duration,
    pub max_message_bytes: usize,
    pub max_toolchain_bytes: u64,
    /// The most bytes of toolchain archives kept (`<data_dir>/toolchains`): least recently used
    /// (uploaded, asked for by a client, fetched by a worker) archives go beyond it.
    pub archive_store_size: u64,
    /// The shared cache tier's size limit (`<data_dir>/cache`).
    pub cache_size: u64,
    pub max_entry_bytes: u64,
    /// `CacheGet`/`CachePut` calls served at once; more wait (2 s at most, then
    /// `RESOURCE_EXHAUSTED`). Each streams through a file in 1 MiB pieces, so the cache service's
    /// memory stays under about this × 7 MiB whatever the entry sizes and the number of clients.
    pub cache_concurrency: usize,
    /// How many of those one caller may hold (1..=`cache_concurrency`): a caller that opens many
    /// transfers and stalls them cannot keep the others (workers' puts, other clients) out.
    pub cache_per_caller: usize,
    /// A `CacheGet` reader that has not taken the next piece after this is cut off, so a stalled
    /// reader never keeps a transfer's permit.
    pub cache_send_timeout: Duration,
    /// A `CachePut` writer that has sent nothing for this long is abandoned, for the same reason.
    pub cache_idle_timeout: Duration,
    /// Slots the live sessions of one worker credential may offer together.
    pub max_slots_per_credential: u32,
    /// PEM certificate and key; `None` serves plain HTTP/2 (loopback or `insecure` only).
    pub tls: Option<(Vec<u8>, Vec<u8>)>,
    pub tokens: Tokens,
    pub insecure: bool,
    /// Where to serve `/metrics` and the status page (`--http`); None: not at all.
    pub http: Option<String>,
    /// Writer keys trusted without registering (a CI machine's, given by the operator), by name.
    pub writers: std::collections::BTreeMap<ferry_cache::WriterKey, String>,
    /// Writer keys whose entries are never accepted, whoever registers them.
    pub revoked_writers: std::collections::BTreeSet<ferry_cache::WriterKey>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    lease_ms: Option<u64>,
    queue_timeout_ms: Option<u64>,
    max_message_bytes: Option<usize>,
    max_toolchain_bytes: Option<u64>,
    archive_store_size: Option<String>,
    cache_size: Option<String>,
    max_entry_bytes: Option<u64>,
    cache_concurrency: Option<usize>,
    max_slots_per_credential: Option<u32>,
    cache_concurrency_per_caller: Option<usize>,
    cache_send_timeout_ms: Option<u64>,
    cache_idle_timeout_ms: Option<u64>,
    tls: Option<TlsFiles>,
    #[serde(default)]
    tokens: Vec<TokenEntry>,
    insecure: Option<bool>,
    http: Option<String>,
    #[serde(default)]
    writers: Vec<WriterEntry>,
    #[serde(default)]
    revoked_writers: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WriterEntry {
    key: String,
    name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TlsFiles {
    cert: PathBuf,
    key: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TokenEntry {
    token: String,
    roles: Vec<String>,
}

impl SchedulerConfig {
    /// Loads `file` (if given), then the environment, then the flags.
    pub fn load(file: Option<&Path>, listen: Option<String>, data_dir: Option<PathBuf>) -> anyhow::Result<Self> {
        let parsed: FileConfig = ferry_proto::daemon::read_config(file).map_err(anyhow::Error::msg)?;
        let origin = file.map(|p| p.display().to_string()).unwrap_or_else(|| "<defaults>".into());
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let listen =
            listen.or_else(|| env("FERRY_LISTEN")).or(parsed.listen).unwrap_or_else(|| "127.0.0.1:7700".into());
        let data_dir = match data_dir.or_else(|| env("FERRY_DATA_DIR").map(PathBuf::from)).or(parsed.data_dir) {
            Some(d) => d,
            None => default_data_dir().context("cannot find a data directory; pass --data-dir")?,
        };
        let tls = match parsed.tls {
            Some(t) => Some(read_tls(&t, &origin)?),
            None => None,
        };
        let tokens = tokens(parsed.tokens).with_context(|| format!("{origin}: key 'tokens'"))?;
        let cache_size = match env("FERRY_SHARED_CACHE_SIZE").or(parsed.cache_size) {
            Some(text) => ferry_cache::parse_size(&text)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("{origin}: key 'cache_size' (or FERRY_SHARED_CACHE_SIZE)"))?,
            None => 20 << 30,
        };
        let archive_store_size = match env("FERRY_ARCHIVE_STORE_SIZE").or(parsed.archive_store_size) {
            Some(text) => ferry_cache::parse_size(&text)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("{origin}: key 'archive_store_size' (or FERRY_ARCHIVE_STORE_SIZE)"))?,
            None => DEFAULT_ARCHIVE_STORE_SIZE,
        };
        let mut writers = std::collections::BTreeMap::new();
        for (i, w) in parsed.writers.iter().enumerate() {
            let key =
                w.key.parse().map_err(anyhow::Error::msg).with_context(|| format!("{origin}: writers[{i}].key"))?;
            writers.insert(key, w.name.clone());
        }
        let revoked_writers = parsed
            .revoked_writers
            .iter()
            .enumerate()
            .map(|(i, k)| {
                k.parse().map_err(anyhow::Error::msg).with_context(|| format!("{origin}: revoked_writers[{i}]"))
            })
            .collect::<anyhow::Result<_>>()?;
        let cache_concurrency = parsed.cache_concurrency.unwrap_or(16).max(1);
        let cache_per_caller =
            parsed.cache_concurrency_per_caller.unwrap_or(cache_concurrency / 2).clamp(1, cache_concurrency);
        // Shorter than 100 ms would cut honest readers on a busy machine.
        let deadline = |ms: Option<u64>| Duration::from_millis(ms.unwrap_or(10_000).max(100));
        Ok(SchedulerConfig {
            writers,
            revoked_writers,
            origin,
            listen,
            data_dir,
            lease: Duration::from_millis(parsed.lease_ms.unwrap_or(10_000).max(100)),
            queue_timeout: Duration::from_millis(parsed.queue_timeout_ms.unwrap_or(5_000)),
            max_message_bytes: parsed.max_message_bytes.unwrap_or(16 << 20),
            max_toolchain_bytes: parsed.max_toolchain_bytes.unwrap_or(4 << 30),
            archive_store_size,
            cache_size,
            max_entry_bytes: parsed.max_entry_bytes.unwrap_or(1 << 30),
            max_slots_per_credential: parsed.max_slots_per_credential.unwrap_or(256).max(1),
            cache_concurrency,
            cache_per_caller,
            cache_send_timeout: deadline(parsed.cache_send_timeout_ms),
            cache_idle_timeout: deadline(parsed.cache_idle_timeout_ms),
            tls,
            tokens,
            insecure: parsed.insecure.unwrap_or(false),
            http: env("FERRY_HTTP").or(parsed.http),
        })
    }

    /// The development default holds only on loopback: anywhere else a server needs TLS and
    /// tokens, unless the operator wrote `insecure = true`.
    pub fn check_exposure(&self, addr: SocketAddr) -> anyhow::Result<()> {
        check_exposure(addr, self.tls.is_some(), matches!(self.tokens, Tokens::Required(_)), self.insecure)
            .map_err(anyhow::Error::msg)
    }

    /// What `--check-config` checks beyond [`SchedulerConfig::load`] (which has parsed the file,
    /// read and validated the TLS files and the tokens): every address `listen` resolves to may be
    /// served under the exposure rule, and the data directory can be written. Nothing is bound,
    /// and nothing is left behind.
    pub fn check(&self) -> anyhow::Result<()> {
        let listen = &self.listen;
        let addrs = listen.to_socket_addrs().with_context(|| {
            format!("{}: key 'listen' (or --listen, FERRY_LISTEN): cannot resolve '{listen}'", self.origin)
        })?;
        for addr in addrs {
            self.check_exposure(addr)
                .with_context(|| format!("{}: key 'listen' (or --listen, FERRY_LISTEN)", self.origin))?;
        }
        if let Some(http) = &self.http {
            http.to_socket_addrs().with_context(|| {
                format!("{}: key 'http' (or --http, FERRY_HTTP): cannot resolve '{http}'", self.origin)
            })?;
        }
        ferry_proto::daemon::check_writable_dir(&self.data_dir).map_err(|cause| {
            anyhow::anyhow!(
                "{}: key 'data_dir' (or --data-dir, FERRY_DATA_DIR): {cause}; make it writable by the user the \
                 scheduler runs as (under systemd: StateDirectory= or ReadWritePaths=), or choose another",
                self.origin
            )
        })
    }

    /// The effective settings, one line each, for `--check-config`. Never a token: only how many
    /// hold each role.
    pub fn summary(&self) -> Vec<String> {
        let from = if self.origin == "<defaults>" { "no file: defaults" } else { &self.origin };
        let mut lines = vec![
            format!("ferry-scheduler: configuration ok ({from})"),
            format!("listen: {}", self.listen),
            format!("data dir: {}", self.data_dir.display()),
            format!("tls: {}", if self.tls.is_some() { "on" } else { "off" }),
            format!("tokens: {}", token_counts(&self.tokens)),
            format!(
                "toolchain archives: {} in {}, each up to {} (least recently used evicted)",
                format_size(self.archive_store_size),
                self.data_dir.join("toolchains").display(),
                format_size(self.max_toolchain_bytes.min(self.archive_store_size))
            ),
            format!(
                "shared cache: {} in {}, entries up to {}",
                format_size(self.cache_size),
                self.data_dir.join("cache").display(),
                format_size(self.max_entry_bytes)
            ),
            format!(
                "shared cache transfers: {} at once, at most {} per caller; a reader stalled for {} ms or a writer \
                 idle for {} ms is cut off",
                self.cache_concurrency,
                self.cache_per_caller,
                self.cache_send_timeout.as_millis(),
                self.cache_idle_timeout.as_millis()
            ),
            format!("http: {}", self.http.as_deref().unwrap_or("off")),
            format!(
                "writers: {} configured, {} revoked (workers and cache-write clients register their own keys in {})",
                self.writers.len(),
                self.revoked_writers.len(),
                self.data_dir.join("writers.json").display()
            ),
        ];
        if self.insecure {
            lines.push("insecure: yes (a non-loopback address is served without TLS and tokens)".into());
        }
        lines
    }
}

/// Reads the TLS certificate and key and checks them as serving would (tonic's own parser, which
/// also refuses a key that is not the certificate's), so a bad file is named here, not later.
pub(crate) fn read_tls(t: &TlsFiles, origin: &str) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
    let read = |key: &str, path: &Path| {
        std::fs::read(path).map_err(|e| {
            anyhow::anyhow!(
                "{origin}: key '{key}': cannot read {}: {e}; check the path, and that the user the scheduler runs \
                 as may read it",
                path.display()
            )
        })
    };
    let (cert, key) = (read("tls.cert", &t.cert)?, read("tls.key", &t.key)?);
    ferry_proto::daemon::check_tls_identity(&cert, &key).map_err(|problem| {
        anyhow::anyhow!(
            "{origin}: keys 'tls.cert', 'tls.key': {problem} (certificate {}, key {}); give the PEM certificate and \
             its unencrypted PEM private key",
            t.cert.display(),
            t.key.display()
        )
    })?;
    Ok((cert, key))
}

/// `4 (client 2, toolchain-upload 1, worker 2, cache-write 1, admin 0)`, or what no tokens mean.
fn token_counts(tokens: &Tokens) -> String {
    let Tokens::Required(map) = tokens else { return "none (every caller has every role)".into() };
    let roles = [Role::Client, Role::ToolchainUpload, Role::Worker, Role::CacheWrite, Role::Admin];
    let counts: Vec<String> = roles
        .iter()
        .map(|role| format!("{role} {}", map.values().filter(|held| held.contains(role)).count()))
        .collect();
    format!("{} ({})", map.len(), counts.join(", "))
}

pub(crate) fn tokens(entries: Vec<TokenEntry>) -> anyhow::Result<Tokens> {
    tokens_from_config(entries.into_iter().map(|e| (e.token, e.roles)).collect()).map_err(anyhow::Error::msg)
}

fn default_data_dir() -> Option<PathBuf> {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    env("XDG_DATA_HOME").or_else(|| env("HOME").map(|h| h.join(".local/share"))).map(|d| d.join("ferry-scheduler"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposure_rules() {
        let lo: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
        let any: std::net::SocketAddr = "0.0.0.0:1".parse().unwrap();
        assert!(check_exposure(lo, false, false, false).is_ok());
        assert!(check_exposure(any, false, false, false).is_err());
        assert!(check_exposure(any, true, false, false).is_err());
        assert!(check_exposure(any, true, true, false).is_ok());
        assert!(check_exposure(any, false, false, true).is_ok());
    }

    #[test]
    fn config_errors_name_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("s.toml");
        std::fs::write(&file, "[[tokens]]\ntoken = \"0123456789abcdef\"\nroles = [\"wizard\"]\n").unwrap();
        let err = format!("{:#}", SchedulerConfig::load(Some(&file), None, Some(dir.path().into())).unwrap_err());
        assert!(err.contains("s.toml: key 'tokens'") && err.contains("'wizard'"), "{err}");
        std::fs::write(&file, "lease = 3\n").unwrap();
        let err = format!("{:#}", SchedulerConfig::load(Some(&file), None, Some(dir.path().into())).unwrap_err());
        assert!(err.contains("s.toml") && err.contains("lease"), "{err}");
    }

    #[test]
    fn a_caller_holds_half_the_cache_transfers_unless_told_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("s.toml");
        let load = |text: &str| {
            std::fs::write(&file, text).unwrap();
            SchedulerConfig::load(Some(&file), None, Some(dir.path().into())).unwrap()
        };
        let c = load("");
        assert_eq!((c.cache_concurrency, c.cache_per_caller), (16, 8));
        assert_eq!((c.cache_send_timeout, c.cache_idle_timeout), (Duration::from_secs(10), Duration::from_secs(10)));
        assert_eq!(load("cache_concurrency = 1\n").cache_per_caller, 1, "at least one");
        assert_eq!(load("cache_concurrency = 5\n").cache_per_caller, 2);
        let c = load("cache_concurrency = 4\ncache_concurrency_per_caller = 9\ncache_send_timeout_ms = 1\n");
        assert_eq!(c.cache_per_caller, 4, "never more than the whole");
        assert_eq!(c.cache_send_timeout, Duration::from_millis(100), "never so short that honest readers are cut");
    }

    #[test]
    fn the_data_dir_check_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(ferry_proto::daemon::check_writable_dir(&dir.path().join("a/b/c")), Ok(()));
        assert_eq!(ferry_proto::daemon::check_writable_dir(dir.path()), Ok(()));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        std::fs::write(dir.path().join("f"), "").unwrap();
        let err = ferry_proto::daemon::check_writable_dir(&dir.path().join("f/x")).unwrap_err();
        assert_eq!(err, format!("{} is not a directory", dir.path().join("f").display()));
    }
}
