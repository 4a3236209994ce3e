//! The worker's configuration: a TOML file (`--config`), `FERRY_*` environment variables over it,
//! flags over both. Errors name the file and the key.
//!
//! | setting | file key | environment / flag | default |
//! |---|---|---|---|
//! | scheduler URL | `scheduler` | `FERRY_SCHEDULER` / `--scheduler` | required |
//! | listen address | `listen` | `--listen` | `127.0.0.1:0` |
//! | address clients use | `advertise` | — | the bound address |
//! | worker id | `id` | — | `<hostname>-<port>` |
//! | job slots | `slots` | `--slots` | number of CPUs |
//! | data directory | `data_dir` | `FERRY_DATA_DIR` / `--data-dir` | `~/.local/share/ferry-worker` |
//! | token for the scheduler | `token` | `FERRY_TOKEN` | none |
//! | CA for the scheduler's TLS | `ca` | `FERRY_CA` | system roots |
//! | shared cache tier the worker writes | `shared_cache` | `FERRY_SHARED_CACHE` | `scheduler` (its cache service); `off`, `redis://[user:pw@]host[:port][/db]`, `rediss://…` (TLS) or `memcached://host:port[,host:port…]` |
//! | CA (PEM) a `rediss://` server's certificate chains to | `redis_ca` | `FERRY_REDIS_CA` | the system's roots |
//! | client certificate and key (PEM) for a `rediss://` server that asks for one | `redis_cert`, `redis_key` | `FERRY_REDIS_CERT`, `FERRY_REDIS_KEY` | none |
//! | unpacked toolchains kept | `toolchain_cache_bytes` | — | `21474836480` (20 GiB) |
//! | input blobs kept (least recently used evicted beyond it) | `blob_store_size` | `FERRY_BLOB_STORE_SIZE` | `10G` |
//! | this worker's writer key (signs what it publishes; registered with the scheduler) | `writer_key_file` | `FERRY_WRITER_KEY_FILE` | `<data_dir>/writer.key`, made at the first start |
//! | writers whose entries to accept besides those the scheduler lists (a Redis or memcached tier's other writers) | `trust_file` | `FERRY_TRUST_FILE` | none |
//! | own TLS certificate/key | `tls.cert`, `tls.key` | — | none |
//! | non-loopback without TLS | `insecure` | — | `false` |
//! | HTTP address for `/metrics` | `http` | `FERRY_HTTP` / `--http` | off |
//!
//! | sandbox limits | `sandbox.cpu_secs`, `sandbox.memory_bytes`, `sandbox.file_size_bytes`, `sandbox.max_processes`, `sandbox.wall_clock_secs`, `sandbox.disk_bytes` | — | 600, 8 GiB, 1 GiB, 4096, 600, 4 GiB |
//! | a cgroup per job where possible | `sandbox.cgroups` | — | `true` |
//!
//! `memory_bytes` and `max_processes` hold per job (its cgroup) where the worker can create a
//! cgroup, and per process (rlimits) always; `disk_bytes` is the size of the tmpfs a job's writes
//! land on, laid over its inputs (root workers; 0 turns it off). See [`crate::limits`].
//!
//! Clients present job grants from the scheduler, not tokens: a `[[tokens]]` section (accepted
//! before grants existed) is refused with that explanation.
//!
//! `ferry-worker --check-config` loads exactly this, then runs [`WorkerConfig::check`] and
//! [`WorkerConfig::check_sandbox`] (what can be checked without serving) and prints
//! [`WorkerConfig::summary`].

use std::net::ToSocketAddrs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use ferry_cache::without_password;
use ferry_proto::SharedTierSpec;
use serde::Deserialize;

use crate::check::{CheckFailed, CheckReport};
use crate::sandbox::SandboxConfig;

/// `blob_store_size` when not set: room for the inputs of many builds (a job's are mostly sources
/// and dependencies' `.rmeta` files, a few MB), small next to a build machine's disk.
const DEFAULT_BLOB_STORE_SIZE: u64 = 10 << 30;

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Where the file settings came from (the `--config` path, or `<defaults>`): messages name it.
    pub origin: String,
    pub scheduler: String,
    pub listen: String,
    pub advertise: Option<String>,
    pub id: Option<String>,
    pub slots: u32,
    pub data_dir: PathBuf,
    pub token: Option<String>,
    pub ca: Option<PathBuf>,
    pub toolchain_cache_bytes: u64,
    /// The most bytes of input blobs kept (`<data_dir>/blobs`): clients' uploads are bounded by
    /// it, least recently used blobs evicted (see `blobs.rs`).
    pub blob_store_size: u64,
    /// Where the worker publishes the results of the jobs it runs.
    pub shared_cache: SharedTierSpec,
    /// The worker's own writer key: what it publishes is signed with it.
    pub writer_key_file: PathBuf,
    /// Writers accepted besides those the scheduler lists.
    pub trust: ferry_cache::Trust,
    /// What a `rediss://` tier trusts and presents (read and checked at load).
    pub redis_tls: ferry_cache::RedisTls,
    pub tls: Option<(Vec<u8>, Vec<u8>)>,
    pub insecure: bool,
    pub sandbox: SandboxConfig,
    /// Where to serve `/metrics` (`--http`); None: not at all.
    pub http: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    shared_cache: Option<String>,
    shared_key_file: Option<PathBuf>,
    writer_key_file: Option<PathBuf>,
    trust_file: Option<PathBuf>,
    redis_ca: Option<PathBuf>,
    redis_cert: Option<PathBuf>,
    redis_key: Option<PathBuf>,
    scheduler: Option<String>,
    listen: Option<String>,
    advertise: Option<String>,
    id: Option<String>,
    slots: Option<u32>,
    data_dir: Option<PathBuf>,
    token: Option<String>,
    ca: Option<PathBuf>,
    toolchain_cache_bytes: Option<u64>,
    blob_store_size: Option<String>,
    tls: Option<Tls>,
    /// No longer used (see the module docs); present only to refuse it clearly.
    tokens: Option<toml::Value>,
    insecure: Option<bool>,
    http: Option<String>,
    #[serde(default)]
    sandbox: SandboxSection,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Tls {
    cert: PathBuf,
    key: PathBuf,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SandboxSection {
    cpu_secs: Option<u64>,
    memory_bytes: Option<u64>,
    file_size_bytes: Option<u64>,
    max_processes: Option<u64>,
    disk_bytes: Option<u64>,
    cgroups: Option<bool>,
    wall_clock_secs: Option<u64>,
}

/// Flags that override the file.
#[derive(Debug, Default)]
pub struct Overrides {
    pub scheduler: Option<String>,
    pub listen: Option<String>,
    pub slots: Option<u32>,
    pub data_dir: Option<PathBuf>,
    pub http: Option<String>,
}

impl WorkerConfig {
    pub fn load(file: Option<&Path>, flags: Overrides) -> anyhow::Result<WorkerConfig> {
        let parsed: FileConfig = ferry_proto::daemon::read_config(file).map_err(anyhow::Error::msg)?;
        let origin = file.map(|p| p.display().to_string()).unwrap_or_else(|| "<defaults>".into());
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let scheduler = flags
            .scheduler
            .or_else(|| env("FERRY_SCHEDULER"))
            .or(parsed.scheduler)
            .context("no scheduler: pass --scheduler URL (or set FERRY_SCHEDULER, or 'scheduler' in the config)")?;
        // `host:port`, as the scheduler prints its address, means http://.
        let scheduler = if scheduler.contains("://") { scheduler } else { format!("http://{scheduler}") };
        if !(scheduler.starts_with("http://") || scheduler.starts_with("https://")) {
            anyhow::bail!("scheduler URL '{scheduler}' must start with http:// or https://");
        }
        let data_dir = match flags.data_dir.or_else(|| env("FERRY_DATA_DIR").map(PathBuf::from)).or(parsed.data_dir) {
            Some(d) => d,
            None => {
                let home = env("HOME").context("cannot find a data directory; pass --data-dir")?;
                PathBuf::from(home).join(".local/share/ferry-worker")
            }
        };
        let tls = match parsed.tls {
            Some(t) => {
                let read = |key: &str, path: &Path| {
                    std::fs::read(path).map_err(|e| {
                        anyhow::anyhow!(
                            "{origin}: key '{key}': cannot read {}: {e}; check the path, and that the user the \
                             worker runs as may read it",
                            path.display()
                        )
                    })
                };
                let (cert, key) = (read("tls.cert", &t.cert)?, read("tls.key", &t.key)?);
                ferry_proto::daemon::check_tls_identity(&cert, &key).map_err(|problem| {
                    anyhow::anyhow!(
                        "{origin}: keys 'tls.cert', 'tls.key': {problem} (certificate {}, key {}); give the PEM \
                         certificate and its unencrypted PEM private key",
                        t.cert.display(),
                        t.key.display()
                    )
                })?;
                // What clients will connect to: `advertise`, or else the listen address itself
                // (unless it is a wildcard, which names no host).
                let listen = flags.listen.as_ref().or(parsed.listen.as_ref());
                let (setting, advertised) = match (&parsed.advertise, listen) {
                    (Some(a), _) => ("advertise", Some(a)),
                    (None, Some(l)) if !l.starts_with("0.0.0.0:") && !l.starts_with("[::]:") => ("listen", Some(l)),
                    _ => ("advertise", None),
                };
                if let Some(address) = advertised {
                    ferry_proto::daemon::check_certificate_names(&cert, address).map_err(|problem| {
                        anyhow::anyhow!(
                            "{origin}: keys '{setting}', 'tls.cert': {problem}; advertise a name the certificate \
                             holds, or issue the certificate for it (subjectAltName DNS:{0} or IP:{0})",
                            address.rsplit_once(':').map_or(address.as_str(), |(h, _)| h)
                        )
                    })?;
                }
                Some((cert, key))
            }
            None => None,
        };
        if parsed.tokens.is_some() {
            anyhow::bail!(
                "{origin}: key 'tokens' is not used by workers any more: clients present job grants from the \
                 scheduler instead of tokens; remove it"
            );
        }
        let shared_cache = match env("FERRY_SHARED_CACHE").or(parsed.shared_cache) {
            Some(text) => SharedTierSpec::parse(&text)
                .map_err(|e| anyhow::anyhow!("{origin}: key 'shared_cache' (or FERRY_SHARED_CACHE): {e}"))?,
            None => SharedTierSpec::Scheduler,
        };
        if env("FERRY_SHARED_KEY_FILE").is_some() || parsed.shared_key_file.is_some() {
            anyhow::bail!(
                "{origin}: key 'shared_key_file' (or FERRY_SHARED_KEY_FILE) is no longer used: each worker signs with a \
                 key of its own (writer_key_file, made in the data directory at the first start) and registers it \
                 with the scheduler; remove it"
            );
        }
        let writer_key_file = env("FERRY_WRITER_KEY_FILE")
            .map(PathBuf::from)
            .or(parsed.writer_key_file)
            .unwrap_or_else(|| data_dir.join("writer.key"));
        let trust = match env("FERRY_TRUST_FILE").map(PathBuf::from).or(parsed.trust_file) {
            Some(path) => std::fs::read_to_string(&path)
                .map_err(|e| e.to_string())
                .and_then(|t| ferry_cache::Trust::parse(&t))
                .map_err(|e| {
                    anyhow::anyhow!("{origin}: key 'trust_file' (or FERRY_TRUST_FILE): {}: {e}", path.display())
                })?,
            None => ferry_cache::Trust::default(),
        };
        let redis_tls = redis_tls(
            &origin,
            &shared_cache,
            env("FERRY_REDIS_CA").map(PathBuf::from).or(parsed.redis_ca),
            env("FERRY_REDIS_CERT").map(PathBuf::from).or(parsed.redis_cert),
            env("FERRY_REDIS_KEY").map(PathBuf::from).or(parsed.redis_key),
        )?;
        let blob_store_size = match env("FERRY_BLOB_STORE_SIZE").or(parsed.blob_store_size) {
            Some(text) => ferry_cache::parse_size(&text)
                .map_err(|e| anyhow::anyhow!("{origin}: key 'blob_store_size' (or FERRY_BLOB_STORE_SIZE): {e}"))?,
            None => DEFAULT_BLOB_STORE_SIZE,
        };
        let defaults = SandboxConfig::default();
        let s = parsed.sandbox;
        let sandbox = SandboxConfig {
            cpu_secs: s.cpu_secs.unwrap_or(defaults.cpu_secs),
            memory_bytes: s.memory_bytes.unwrap_or(defaults.memory_bytes),
            file_size_bytes: s.file_size_bytes.unwrap_or(defaults.file_size_bytes),
            max_processes: s.max_processes.unwrap_or(defaults.max_processes),
            wall_clock: s.wall_clock_secs.map(Duration::from_secs).unwrap_or(defaults.wall_clock),
            disk_bytes: s.disk_bytes.unwrap_or(defaults.disk_bytes),
            want_cgroups: s.cgroups.unwrap_or(defaults.want_cgroups),
            ..defaults
        };
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        Ok(WorkerConfig {
            origin,
            scheduler,
            listen: flags.listen.or(parsed.listen).unwrap_or_else(|| "127.0.0.1:0".into()),
            advertise: parsed.advertise,
            id: parsed.id,
            slots: flags.slots.or(parsed.slots).unwrap_or(cpus).max(1),
            data_dir,
            token: env("FERRY_TOKEN").or(parsed.token),
            ca: env("FERRY_CA").map(PathBuf::from).or(parsed.ca),
            toolchain_cache_bytes: parsed.toolchain_cache_bytes.unwrap_or(20 << 30),
            blob_store_size,
            shared_cache,
            writer_key_file,
            trust,
            redis_tls,
            tls,
            insecure: parsed.insecure.unwrap_or(false),
            sandbox,
            http: flags.http.or_else(|| env("FERRY_HTTP")).or(parsed.http),
        })
    }

    /// What `--check-config` checks of the settings beyond [`WorkerConfig::load`] (which has parsed
    /// the file and read and validated the TLS files and the shared-tier key): the scheduler URL is
    /// one the worker can connect to (it is not contacted: a scheduler that is down is waited
    /// for, not a configuration error), an `https://` scheduler's CA file is a PEM certificate,
    /// the token can travel in a header, and every address `listen` resolves to may be served
    /// under the exposure rule. Nothing is bound.
    pub fn check(&self) -> anyhow::Result<()> {
        let origin = &self.origin;
        let url = &self.scheduler;
        tonic::transport::Endpoint::from_shared(url.clone()).map_err(|e| {
            anyhow::anyhow!(
                "{origin}: key 'scheduler' (or --scheduler, FERRY_SCHEDULER): '{url}' is not a usable URL ({e}); \
                 give http(s)://HOST:PORT"
            )
        })?;
        if let (true, Some(ca)) = (url.starts_with("https://"), &self.ca) {
            let pem = std::fs::read(ca).map_err(|e| {
                anyhow::anyhow!(
                    "{origin}: key 'ca' (or FERRY_CA): cannot read {}: {e}; check the path, and that the user \
                     the worker runs as may read it",
                    ca.display()
                )
            })?;
            if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
                anyhow::bail!(
                    "{origin}: key 'ca' (or FERRY_CA): {} holds no PEM certificate; give the CA certificate \
                     the scheduler's certificate chains to",
                    ca.display()
                );
            }
        }
        if let Some(token) = &self.token {
            ferry_proto::check_not_placeholder(token)
                .map_err(|e| anyhow::anyhow!("{origin}: key 'token' (or FERRY_TOKEN): {e}"))?;
        }
        ferry_proto::TokenInterceptor::new(self.token.as_deref()).map_err(|e| {
            anyhow::anyhow!(
                "{origin}: key 'token' (or FERRY_TOKEN): {e}; give the token exactly as the scheduler has it"
            )
        })?;
        let listen = &self.listen;
        let addrs = listen
            .to_socket_addrs()
            .with_context(|| format!("{origin}: key 'listen' (or --listen): cannot resolve '{listen}'"))?;
        for addr in addrs {
            // Every call needs a job grant from the scheduler: that is the worker's authentication.
            ferry_proto::check_exposure(addr, self.tls.is_some(), true, self.insecure)
                .map_err(|e| anyhow::anyhow!("{origin}: key 'listen' (or --listen): {e}"))?;
        }
        if let Some(http) = &self.http {
            http.to_socket_addrs()
                .with_context(|| format!("{origin}: key 'http' (or --http, FERRY_HTTP): cannot resolve '{http}'"))?;
        }
        Ok(())
    }

    /// The start-up check ([`crate::self_check`]) without lasting effects, for `--check-config`.
    pub fn check_sandbox(&self) -> Result<CheckReport, CheckFailed> {
        crate::check::check_without_effects(&self.sandbox, &self.data_dir)
    }

    /// The effective settings, one line each, for `--check-config`. Never the token or a
    /// password in a URL.
    pub fn summary(&self, sandbox: &CheckReport) -> Vec<String> {
        let from = if self.origin == "<defaults>" { "no file: defaults" } else { &self.origin };
        let scheduler_tls = match (self.scheduler.starts_with("https://"), &self.ca) {
            (false, _) => "plain".to_owned(),
            (true, Some(ca)) => format!("tls, ca {}", ca.display()),
            (true, None) => "tls, system roots".to_owned(),
        };
        let token = if self.token.is_some() { "token set" } else { "no token" };
        let advertise = self.advertise.as_deref().map(|a| format!(" (clients use {a})")).unwrap_or_default();
        let shared = match &self.shared_cache {
            SharedTierSpec::Off => "off".to_owned(),
            SharedTierSpec::Scheduler => "the scheduler's".to_owned(),
            SharedTierSpec::Redis(url) if url.starts_with("rediss://") => format!(
                "{} (tls, {}{})",
                without_password(url),
                if self.redis_tls.ca.is_some() { "private ca" } else { "system roots" },
                if self.redis_tls.identity.is_some() { ", client certificate" } else { "" }
            ),
            SharedTierSpec::Redis(url) | SharedTierSpec::Memcached(url) => without_password(url),
        };
        let signed = match ferry_cache::Signer::read(&self.writer_key_file) {
            Ok(signer) => format!("signed by {} ({})", signer.public(), self.writer_key_file.display()),
            Err(_) => format!("signed by a key made at the first start in {}", self.writer_key_file.display()),
        };
        let jobs_as = match self.sandbox.run_as.filter(|_| self.sandbox.jobs_run_as_another_user()) {
            Some((uid, _)) => format!("uid {uid}"),
            None => "the worker's user".to_owned(),
        };
        let mut lines = vec![
            format!("ferry-worker: configuration ok ({from})"),
            format!("scheduler: {} ({scheduler_tls}, {token})", self.scheduler),
            format!("listen: {}{advertise}", self.listen),
            format!("id: {}", self.id.as_deref().unwrap_or("<hostname>-<port>")),
            format!("slots: {}", self.slots),
            format!("data dir: {}", self.data_dir.display()),
            format!(
                "blob store: {} in {} (least recently used evicted); unpacked toolchains: {}",
                ferry_cache::format_size(self.blob_store_size),
                self.data_dir.join("blobs").display(),
                ferry_cache::format_size(self.toolchain_cache_bytes)
            ),
            format!("tls: {}", if self.tls.is_some() { "on" } else { "off" }),
            format!("shared cache: {shared}, {signed}"),
            format!("sandbox: {} ({}), jobs run as {jobs_as}", sandbox.bwrap_version, sandbox.bwrap.display(),),
            match &sandbox.cgroups {
                Ok(version) => format!(
                    "job cgroups: {version} (memory {} bytes, {} processes per job)",
                    self.sandbox.memory_bytes, self.sandbox.max_processes
                ),
                Err(why) => format!("job cgroups: none, rlimits per process only ({why})"),
            },
            match &sandbox.disk_quota {
                Ok(()) if self.sandbox.disk_bytes > 0 => {
                    format!("job disk: a tmpfs of {} bytes per job", self.sandbox.disk_bytes)
                }
                Ok(()) => "job disk: no limit (sandbox.disk_bytes = 0)".to_owned(),
                Err(why) => format!("job disk: no limit ({why})"),
            },
            format!("http: {}", self.http.as_deref().unwrap_or("off")),
        ];
        if self.insecure {
            lines.push("insecure: yes (a non-loopback address is served without TLS)".into());
        }
        lines
    }
}

/// The TLS settings of a `rediss://` tier, read and checked: a file that cannot be used is a
/// configuration error naming its key. Set for a plain `redis://` tier they are refused the same
/// way (a missing `s` would send everything in clear); other tiers do not use them.
fn redis_tls(
    origin: &str,
    shared: &SharedTierSpec,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
) -> anyhow::Result<ferry_cache::RedisTls> {
    let mut tls = ferry_cache::RedisTls::default();
    let SharedTierSpec::Redis(url) = shared else { return Ok(tls) };
    if !url.starts_with("rediss://") {
        if ca.is_some() || cert.is_some() || key.is_some() {
            anyhow::bail!(
                "{origin}: keys 'redis_ca', 'redis_cert', 'redis_key' (or FERRY_REDIS_CA, FERRY_REDIS_CERT, \
                 FERRY_REDIS_KEY) are set, but the shared cache is a plain redis:// URL; use rediss:// (TLS) or \
                 remove them"
            );
        }
        return Ok(tls);
    }
    if let Some(ca) = ca {
        tls.ca = Some(
            ferry_cache::RedisTls::read_ca(&ca)
                .map_err(|e| anyhow::anyhow!("{origin}: key 'redis_ca' (or FERRY_REDIS_CA): {e}"))?,
        );
    }
    tls.identity = match (cert, key) {
        (None, None) => None,
        (Some(cert), Some(key)) => Some(ferry_cache::RedisTls::read_identity(&cert, &key).map_err(|e| {
            anyhow::anyhow!("{origin}: keys 'redis_cert', 'redis_key' (or FERRY_REDIS_CERT, FERRY_REDIS_KEY): {e}")
        })?),
        _ => anyhow::bail!(
            "{origin}: keys 'redis_cert', 'redis_key' (or FERRY_REDIS_CERT, FERRY_REDIS_KEY): give both or neither"
        ),
    };
    Ok(tls)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_tls_settings_are_checked_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let load = |toml: &str| {
            let file = dir.path().join("worker.toml");
            let base = format!("scheduler = \"http://127.0.0.1:1\"\ndata_dir = \"{}\"\n", dir.path().display());
            std::fs::write(&file, format!("{base}{toml}")).unwrap();
            WorkerConfig::load(Some(&file), Overrides::default()).map_err(|e| format!("{e:#}"))
        };
        let c = load("shared_cache = \"rediss://h\"\n").unwrap();
        assert_eq!(c.redis_tls, ferry_cache::RedisTls::default());
        let e = load("shared_cache = \"rediss://h\"\nredis_ca = \"/nonexistent/ca.pem\"\n").unwrap_err();
        assert!(e.contains("worker.toml: key 'redis_ca'") && e.contains("/nonexistent/ca.pem"), "{e}");
        let e = load("shared_cache = \"redis://h\"\nredis_ca = \"/nonexistent/ca.pem\"\n").unwrap_err();
        assert!(e.contains("plain redis:// URL"), "{e}");
        let e = load("shared_cache = \"rediss://h\"\nredis_cert = \"/nonexistent/c.pem\"\n").unwrap_err();
        assert!(e.contains("give both or neither"), "{e}");
        // Other tiers do not use them.
        assert!(load("shared_cache = \"off\"\nredis_ca = \"/nonexistent/ca.pem\"\n").is_ok());
    }

    #[test]
    fn passwords_are_not_shown() {
        assert_eq!(without_password("redis://u:secret@h:6379/0"), "redis://u:***@h:6379/0");
        assert_eq!(without_password("redis://:secret@h"), "redis://:***@h");
        assert_eq!(without_password("redis://h:6379/0"), "redis://h:6379/0");
        assert_eq!(without_password("memcached://a:1,b:2"), "memcached://a:1,b:2");
    }
}
