//! ferry's configuration: a TOML file, overridden by `FERRY_*` environment variables.
//!
//! The file is `FERRY_CONFIG` if set, else `$XDG_CONFIG_HOME/ferry/config.toml` (or
//! `~/.config/ferry/config.toml`); a missing default file is fine, a missing `FERRY_CONFIG` is not.
//! Everything is validated once into [`Config`]; errors name the file and the key.
//!
//! | setting            | file key          | environment           | default                    |
//! |--------------------|-------------------|-----------------------|----------------------------|
//! | cache directory    | `cache.dir`       | `FERRY_CACHE_DIR`     | `$XDG_CACHE_HOME/ferry` or `~/.cache/ferry` |
//! | cache size limit   | `cache.size`      | `FERRY_CACHE_SIZE`    | `10G`                      |
//! | cache failures     | `cache.failures`  | `FERRY_CACHE_FAILURES`| `false`                    |
//! | eviction grace     | `cache.grace_secs`| `FERRY_CACHE_GRACE`   | `600` (seconds)            |
//! | log filter         | `log.level`       | `FERRY_LOG`           | unset: no logging          |
//! | log file           | `log.file`        | `FERRY_LOG_FILE`      | `<cache dir>/ferry.log`    |
//! | scheduler URL      | `cluster.scheduler` | `FERRY_SCHEDULER`   | unset: no cluster          |
//! | bearer token       | `cluster.token`   | `FERRY_TOKEN`         | unset                      |
//! | CA file for TLS    | `cluster.ca`      | `FERRY_CA`            | unset: system roots        |
//! | cluster backoff    | `cluster.backoff_secs` | `FERRY_CLUSTER_BACKOFF` | `10` (seconds)       |
//! | shared cache tier  | `cache.shared`    | `FERRY_SHARED_CACHE`  | the scheduler's cache when a scheduler is set; `off`, or `redis://[user:pw@]host[:port][/db]` |
//! | shared tier bypass after an error or a slow answer | `cache.shared_backoff_secs` | `FERRY_SHARED_BACKOFF` | `30` (seconds) |
//! | shared tier deadline per call | `cache.shared_timeout_ms` | `FERRY_SHARED_TIMEOUT_MS` | `2000` |
//! | base directories (paths in keys relative to them) | `cache.basedirs` | `FERRY_BASEDIRS` (`:`-separated) | none |
//! | shared-tier key: seal what this client writes, accept only sealed entries | `cache.shared_key_file` | `FERRY_SHARED_KEY_FILE` | none: entries are not sealed |

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use ferry_cache::rustc::Bases;
use ferry_proto::SharedTierSpec;
use serde::Deserialize;

/// The resolved configuration every part of the client reads.
#[derive(Debug, Clone)]
pub struct Config {
    pub cache_dir: PathBuf,
    pub cache_size: u64,
    /// Cache clean compiler-error exits (rustc exit 1) too; off by default because a cached
    /// failure hides a flaky environment problem from the person who could fix it.
    pub cache_failures: bool,
    /// Entries younger than this are never evicted, so a running build keeps what it just wrote.
    pub cache_grace: Duration,
    /// A tracing filter (`info`, `ferry=debug`, ...); `None` means no logging at all.
    pub log: Option<String>,
    pub log_file: PathBuf,
    /// `http://host:port` or `https://host:port`; `None` means no cluster.
    pub scheduler: Option<String>,
    pub token: Option<String>,
    /// PEM CA certificate the scheduler's and workers' TLS certificates chain to.
    pub ca: Option<PathBuf>,
    /// After the scheduler failed to answer, every wrapper compiles locally without trying for
    /// this long: an unreachable scheduler costs a build one timeout, not one per compile.
    pub cluster_backoff: Duration,
    /// Which shared tier the wrapper reads (and, with `cache-write`, writes); `Scheduler` only
    /// when `scheduler` is set.
    pub shared: SharedTierSpec,
    /// A shared tier that errored or answered too slowly is skipped this long by every wrapper.
    pub shared_backoff: Duration,
    pub shared_timeout: Duration,
    pub basedirs: Bases,
    /// The site's shared-tier key (from a file of 64 hex digits): with it, entries this client
    /// writes are sealed and only entries sealed under it are read from the shared tier.
    pub shared_key: Option<[u8; 32]>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    cache: CacheSection,
    #[serde(default)]
    log: LogSection,
    #[serde(default)]
    cluster: ClusterSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterSection {
    scheduler: Option<String>,
    token: Option<String>,
    ca: Option<PathBuf>,
    backoff_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CacheSection {
    dir: Option<PathBuf>,
    size: Option<toml::Value>,
    failures: Option<bool>,
    grace_secs: Option<u64>,
    shared: Option<String>,
    shared_backoff_secs: Option<u64>,
    shared_timeout_ms: Option<u64>,
    basedirs: Option<Vec<String>>,
    shared_key_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogSection {
    level: Option<String>,
    file: Option<PathBuf>,
}

impl Config {
    /// Loads the file (if any) and applies the environment on top.
    pub fn load() -> anyhow::Result<Config> {
        Config::load_from(&|name| std::env::var(name).ok())
    }

    pub fn load_from(env: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<Config> {
        let explicit = env("FERRY_CONFIG").filter(|s| !s.is_empty()).map(PathBuf::from);
        let path = explicit.clone().or_else(|| config_home(env).map(|d| d.join("ferry/config.toml")));
        let file = match &path {
            Some(path) => match std::fs::read_to_string(path) {
                Ok(text) => toml::from_str::<FileConfig>(&text)
                    .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.message()))?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && explicit.is_none() => FileConfig::default(),
                Err(e) => return Err(e).with_context(|| format!("reading config file {}", path.display())),
            },
            None => FileConfig::default(),
        };
        let origin = |key: &str| match &path {
            Some(p) => format!("{}: key '{key}'", p.display()),
            None => format!("key '{key}'"),
        };

        let cache_dir = match env("FERRY_CACHE_DIR").filter(|s| !s.is_empty()) {
            Some(dir) => PathBuf::from(dir),
            None => match file.cache.dir {
                Some(dir) => dir,
                None => cache_home(env).context("cannot find a cache directory; set FERRY_CACHE_DIR")?.join("ferry"),
            },
        };
        let cache_size = match env("FERRY_CACHE_SIZE") {
            Some(s) => parse_size(&s).with_context(|| "environment variable FERRY_CACHE_SIZE".to_string())?,
            None => match file.cache.size {
                Some(toml::Value::Integer(n)) if n >= 0 => n as u64,
                Some(toml::Value::String(s)) => parse_size(&s).with_context(|| origin("cache.size"))?,
                Some(other) => bail!("{}: expected a size like \"10G\", got {other:?}", origin("cache.size")),
                None => 10 << 30,
            },
        };
        let cache_failures = match env("FERRY_CACHE_FAILURES") {
            Some(s) => parse_bool(&s).context("environment variable FERRY_CACHE_FAILURES")?,
            None => file.cache.failures.unwrap_or(false),
        };
        let grace = match env("FERRY_CACHE_GRACE") {
            Some(s) => s.trim().parse().map_err(|_| anyhow::anyhow!("FERRY_CACHE_GRACE: '{s}' is not seconds"))?,
            None => file.cache.grace_secs.unwrap_or(600),
        };
        let log = env("FERRY_LOG").filter(|s| !s.is_empty()).or(file.log.level);
        let log_file = env("FERRY_LOG_FILE")
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
            .or(file.log.file)
            .unwrap_or_else(|| cache_dir.join("ferry.log"));
        let scheduler = env("FERRY_SCHEDULER").filter(|s| !s.is_empty()).or(file.cluster.scheduler);
        if let Some(url) = &scheduler
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            bail!("scheduler URL '{url}' must start with http:// or https:// ({})", origin("cluster.scheduler"));
        }
        let token = env("FERRY_TOKEN").filter(|s| !s.is_empty()).or(file.cluster.token);
        let ca = env("FERRY_CA").filter(|s| !s.is_empty()).map(PathBuf::from).or(file.cluster.ca);
        let backoff = match env("FERRY_CLUSTER_BACKOFF") {
            Some(s) => s.trim().parse().map_err(|_| anyhow::anyhow!("FERRY_CLUSTER_BACKOFF: '{s}' is not seconds"))?,
            None => file.cluster.backoff_secs.unwrap_or(10),
        };
        let seconds = |name: &str, file: Option<u64>, default: u64| -> anyhow::Result<u64> {
            match env(name) {
                Some(s) => s.trim().parse().map_err(|_| anyhow::anyhow!("{name}: '{s}' is not a whole number")),
                None => Ok(file.unwrap_or(default)),
            }
        };
        let shared_backoff = seconds("FERRY_SHARED_BACKOFF", file.cache.shared_backoff_secs, 30)?;
        let shared_timeout = seconds("FERRY_SHARED_TIMEOUT_MS", file.cache.shared_timeout_ms, 2000)?;
        let shared = match env("FERRY_SHARED_CACHE").filter(|s| !s.is_empty()).or(file.cache.shared) {
            Some(text) => SharedTierSpec::parse(&text)
                .map_err(|e| anyhow::anyhow!("{e} ({} or FERRY_SHARED_CACHE)", origin("cache.shared")))?,
            None if scheduler.is_some() => SharedTierSpec::Scheduler,
            None => SharedTierSpec::Off,
        };
        if shared == SharedTierSpec::Scheduler && scheduler.is_none() {
            bail!("the shared cache is 'scheduler' but no scheduler is set ({})", origin("cache.shared"));
        }
        let basedirs = match env("FERRY_BASEDIRS") {
            Some(s) => s.split(':').filter(|d| !d.is_empty()).map(str::to_owned).collect(),
            None => file.cache.basedirs.unwrap_or_default(),
        };
        let basedirs = Bases::new(basedirs).map_err(|bad| {
            anyhow::anyhow!(
                "base directory '{bad}' must be an absolute path ({} or FERRY_BASEDIRS)",
                origin("cache.basedirs")
            )
        })?;
        let shared_key =
            match env("FERRY_SHARED_KEY_FILE")
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
                .or(file.cache.shared_key_file)
            {
                Some(path) => Some(ferry_cache::read_key_file(&path).map_err(|e| {
                    anyhow::anyhow!("{e} ({} or FERRY_SHARED_KEY_FILE)", origin("cache.shared_key_file"))
                })?),
                None => None,
            };
        Ok(Config {
            shared_key,
            cache_dir,
            cache_size,
            cache_failures,
            cache_grace: Duration::from_secs(grace),
            log,
            log_file,
            scheduler,
            token,
            ca,
            cluster_backoff: Duration::from_secs(backoff),
            shared,
            shared_backoff: Duration::from_secs(shared_backoff),
            shared_timeout: Duration::from_millis(shared_timeout),
            basedirs,
        })
    }

    /// Where the local cache tier keeps entries.
    pub fn entries_dir(&self) -> PathBuf {
        self.cache_dir.join("cache")
    }

    pub fn stats_path(&self) -> PathBuf {
        self.cache_dir.join("stats.json")
    }
}

/// Parses `10G`, `512M`, `64KiB`, `1000` (bytes); binary units.
pub fn parse_size(s: &str) -> anyhow::Result<u64> {
    ferry_cache::parse_size(s).map_err(anyhow::Error::msg)
}

fn parse_bool(s: &str) -> anyhow::Result<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" | "" => Ok(false),
        _ => bail!("'{s}' is not a boolean (use 1 or 0)"),
    }
}

fn config_home(env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    env("XDG_CONFIG_HOME").filter(|s| !s.is_empty()).map(PathBuf::from).or_else(|| home(env).map(|h| h.join(".config")))
}

fn cache_home(env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    env("XDG_CACHE_HOME").filter(|s| !s.is_empty()).map(PathBuf::from).or_else(|| home(env).map(|h| h.join(".cache")))
}

fn home(env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    env("HOME").filter(|s| !s.is_empty()).map(PathBuf::from).filter(|p: &PathBuf| p.is_absolute())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(vars: &[(&str, &str)]) -> anyhow::Result<Config> {
        let mut vars: Vec<(String, String)> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        vars.push(("HOME".into(), "/h".into()));
        Config::load_from(&|name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
    }

    #[test]
    fn defaults_and_env_override_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "[cache]\nsize = \"1G\"\nfailures = true\n[log]\nlevel = \"debug\"\n").unwrap();
        let f = file.to_str().unwrap();
        let c = load(&[("HOME", "/h"), ("FERRY_CONFIG", f)]).unwrap();
        assert_eq!((c.cache_size, c.cache_failures, c.log.as_deref()), (1 << 30, true, Some("debug")));
        assert_eq!(c.cache_dir, PathBuf::from("/h/.cache/ferry"));
        let c = load(&[("HOME", "/h"), ("FERRY_CONFIG", f), ("FERRY_CACHE_SIZE", "5M"), ("FERRY_CACHE_FAILURES", "0")])
            .unwrap();
        assert_eq!((c.cache_size, c.cache_failures), (5 << 20, false));
        let c = load(&[("HOME", "/h")]).unwrap();
        assert_eq!((c.cache_size, c.cache_failures, c.log), (10 << 30, false, None));
    }

    #[test]
    fn errors_name_the_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "[cache]\nsize = \"lots\"\n").unwrap();
        let err = format!("{:#}", load(&[("FERRY_CONFIG", file.to_str().unwrap())]).unwrap_err());
        assert!(err.contains("c.toml: key 'cache.size'") && err.contains("'lots'"), "{err}");
        std::fs::write(&file, "[cache]\nsize_limit = 3\n").unwrap();
        let err = format!("{:#}", load(&[("FERRY_CONFIG", file.to_str().unwrap())]).unwrap_err());
        assert!(err.contains("c.toml") && err.contains("size_limit"), "{err}");
        let err = format!("{:#}", load(&[("FERRY_CONFIG", "/nonexistent/ferry.toml")]).unwrap_err());
        assert!(err.contains("/nonexistent/ferry.toml"), "{err}");
        assert!(load(&[("HOME", "/h"), ("FERRY_CACHE_FAILURES", "maybe")]).is_err());
    }
}
