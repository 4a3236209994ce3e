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
//! | shared cache tier the worker writes | `shared_cache` | `FERRY_SHARED_CACHE` | `scheduler` (its cache service); `off`, `redis://[user:pw@]host[:port][/db]` or `memcached://host:port[,host:port…]` |
//! | unpacked toolchains kept | `toolchain_cache_bytes` | — | `21474836480` (20 GiB) |
//! | shared-tier key (seals what the worker publishes) | `shared_key_file` | `FERRY_SHARED_KEY_FILE` | none |
//! | own TLS certificate/key | `tls.cert`, `tls.key` | — | none |
//! | non-loopback without TLS | `insecure` | — | `false` |
//! | HTTP address for `/metrics` | `http` | `FERRY_HTTP` / `--http` | off |
//!
//! Clients present job grants from the scheduler, not tokens: a `[[tokens]]` section (accepted
//! before grants existed) is refused with that explanation.
//! | sandbox limits | `sandbox.cpu_secs`, `sandbox.memory_bytes`, `sandbox.file_size_bytes`, `sandbox.max_processes`, `sandbox.wall_clock_secs` | — | 600, 8 GiB, 1 GiB, 4096, 600 |

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use ferry_proto::SharedTierSpec;
use serde::Deserialize;

use crate::sandbox::SandboxConfig;

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub scheduler: String,
    pub listen: String,
    pub advertise: Option<String>,
    pub id: Option<String>,
    pub slots: u32,
    pub data_dir: PathBuf,
    pub token: Option<String>,
    pub ca: Option<PathBuf>,
    pub toolchain_cache_bytes: u64,
    /// Where the worker publishes the results of the jobs it runs.
    pub shared_cache: SharedTierSpec,
    /// The site's shared-tier key: entries the worker publishes are sealed under it.
    pub shared_key: Option<[u8; 32]>,
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
    scheduler: Option<String>,
    listen: Option<String>,
    advertise: Option<String>,
    id: Option<String>,
    slots: Option<u32>,
    data_dir: Option<PathBuf>,
    token: Option<String>,
    ca: Option<PathBuf>,
    toolchain_cache_bytes: Option<u64>,
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
                let cert = std::fs::read(&t.cert).with_context(|| format!("{origin}: key 'tls.cert'"))?;
                let key = std::fs::read(&t.key).with_context(|| format!("{origin}: key 'tls.key'"))?;
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
        let shared_key = match env("FERRY_SHARED_KEY_FILE").map(PathBuf::from).or(parsed.shared_key_file) {
            Some(path) => Some(
                ferry_cache::read_key_file(&path)
                    .map_err(|e| anyhow::anyhow!("{origin}: key 'shared_key_file' (or FERRY_SHARED_KEY_FILE): {e}"))?,
            ),
            None => None,
        };
        let defaults = SandboxConfig::default();
        let s = parsed.sandbox;
        let sandbox = SandboxConfig {
            cpu_secs: s.cpu_secs.unwrap_or(defaults.cpu_secs),
            memory_bytes: s.memory_bytes.unwrap_or(defaults.memory_bytes),
            file_size_bytes: s.file_size_bytes.unwrap_or(defaults.file_size_bytes),
            max_processes: s.max_processes.unwrap_or(defaults.max_processes),
            wall_clock: s.wall_clock_secs.map(Duration::from_secs).unwrap_or(defaults.wall_clock),
            ..defaults
        };
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        Ok(WorkerConfig {
            scheduler,
            listen: flags.listen.or(parsed.listen).unwrap_or_else(|| "127.0.0.1:0".into()),
            advertise: parsed.advertise,
            id: parsed.id,
            slots: flags.slots.or(parsed.slots).unwrap_or(cpus).max(1),
            data_dir,
            token: env("FERRY_TOKEN").or(parsed.token),
            ca: env("FERRY_CA").map(PathBuf::from).or(parsed.ca),
            toolchain_cache_bytes: parsed.toolchain_cache_bytes.unwrap_or(20 << 30),
            shared_cache,
            shared_key,
            tls,
            insecure: parsed.insecure.unwrap_or(false),
            sandbox,
            http: flags.http.or_else(|| env("FERRY_HTTP")).or(parsed.http),
        })
    }
}
