//! ferry's configuration: a TOML file, overridden by `FERRY_*` environment variables.
//!
//! The file is `FERRY_CONFIG` if set, else `$XDG_CONFIG_HOME/ferry/config.toml` (or
//! `~/.config/ferry/config.toml`); a missing default file is fine, a missing `FERRY_CONFIG` is not.
//! Everything is validated once into [`Config`]. A setting that cannot be used takes its default
//! (or the safe choice: no shared tier) and becomes a problem in [`Config::problems`] that names
//! its source, the variable or the file and key; only a missing cache directory is an error.
//!
//! | setting            | file key          | environment           | default                    |
//! |--------------------|-------------------|-----------------------|----------------------------|
//! | cache directory    | `cache.dir`       | `FERRY_CACHE_DIR`     | `$XDG_CACHE_HOME/ferry` or `~/.cache/ferry` |
//! | cache size limit   | `cache.size`      | `FERRY_CACHE_SIZE`    | `10G`                      |
//! | cache failures     | `cache.failures`  | `FERRY_CACHE_FAILURES`| `false`                    |
//! | verify this fraction of hits by compiling them too (0 to 1) | `cache.verify` | `FERRY_VERIFY` | `0` |
//! | eviction grace     | `cache.grace_secs`| `FERRY_CACHE_GRACE`   | `600` (seconds)            |
//! | log filter         | `log.level`       | `FERRY_LOG`           | unset: no logging          |
//! | log file           | `log.file`        | `FERRY_LOG_FILE`      | `<cache dir>/ferry.log`    |
//! | scheduler URL (`host:port` means `http://host:port`) | `cluster.scheduler` | `FERRY_SCHEDULER` | unset: no cluster |
//! | bearer token       | `cluster.token`   | `FERRY_TOKEN`         | unset                      |
//! | CA file for TLS    | `cluster.ca`      | `FERRY_CA`            | unset: system roots        |
//! | cluster backoff    | `cluster.backoff_secs` | `FERRY_CLUSTER_BACKOFF` | `10` (seconds)       |
//! | shared cache tier  | `cache.shared`    | `FERRY_SHARED_CACHE`  | the scheduler's cache when a scheduler is set; `off`, `redis://[user:pw@]host[:port][/db]`, `rediss://…` (TLS) or `memcached://host:port[,host:port…]` |
//! | CA (PEM) a `rediss://` server's certificate chains to | `cache.redis_ca` | `FERRY_REDIS_CA` | unset: the system's roots |
//! | client certificate and key (PEM) for a `rediss://` server that asks for one | `cache.redis_cert`, `cache.redis_key` | `FERRY_REDIS_CERT`, `FERRY_REDIS_KEY` | unset: none |
//! | shared tier bypass after an error or a slow answer | `cache.shared_backoff_secs` | `FERRY_SHARED_BACKOFF` | `30` (seconds) |
//! | shared tier deadline per call | `cache.shared_timeout_ms` | `FERRY_SHARED_TIMEOUT_MS` | `2000` |
//! | base directories (paths in keys relative to them) | `cache.basedirs` | `FERRY_BASEDIRS` (`:`-separated) | none |
//! | this machine's writer key (signs what it publishes; a CI writer's) | `cache.writer_key_file` | `FERRY_WRITER_KEY_FILE` | `<cache dir>/writer.key`, made when this client first publishes |
//! | writers whose entries to accept besides those the scheduler lists | `cache.trust_file` | `FERRY_TRUST_FILE` | none |

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use ferry_cache::rustc::Bases;
use ferry_cache::{RedisTls, Trust};
use ferry_proto::SharedTierSpec;

/// The resolved configuration every part of the client reads.
#[derive(Debug, Clone)]
pub struct Config {
    pub cache_dir: PathBuf,
    pub cache_size: u64,
    /// Cache clean compiler-error exits (rustc exit 1) too; off by default because a cached
    /// failure hides a flaky environment problem from the person who could fix it.
    pub cache_failures: bool,
    /// The fraction of hits (0 to 1) that are also compiled, after cargo has its answer, and
    /// compared with what was replayed: a wrong entry is removed and reported.
    pub verify: f64,
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
    /// What a `rediss://` tier trusts (a private CA instead of the system's roots) and presents
    /// (a client certificate); read and checked once here, so a bad file is a problem, not an
    /// error on every connection.
    pub redis_tls: RedisTls,
    /// A shared tier that errored or answered too slowly is skipped this long by every wrapper.
    pub shared_backoff: Duration,
    pub shared_timeout: Duration,
    pub basedirs: Bases,
    /// This machine's writer key file: it signs what this client publishes (with `cache-write`).
    pub writer_key_file: PathBuf,
    /// Writers accepted besides those the scheduler lists (a tier without a scheduler needs it).
    pub trust_file: Option<Trust>,
    /// Settings that could not be used, each naming its source (variable, or file and key) and
    /// what was used instead: logged and counted by the wrapper, shown by the commands.
    pub problems: Vec<String>,
}

impl Config {
    /// Loads the file (if any) and applies the environment on top.
    pub fn load() -> anyhow::Result<Config> {
        Config::load_from(&|name| std::env::var(name).ok())
    }

    /// Like [`Config::load`], and tells the user on stderr about every setting that was not
    /// usable (for commands; the wrapper logs and counts them instead).
    pub fn load_reporting() -> anyhow::Result<Config> {
        let config = Config::load()?;
        for problem in &config.problems {
            eprintln!("ferry: configuration error: {problem}");
        }
        Ok(config)
    }

    /// A setting that cannot be used never stops ferry: it takes its default (or, where the
    /// default could be less safe than what was meant, the safe choice: no shared tier) and the
    /// reason goes into [`Config::problems`]. Err only when there is no cache directory at all.
    pub fn load_from(env: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<Config> {
        let mut s = Settings::read(env);

        let cache_dir = match s.text(Some("FERRY_CACHE_DIR"), "cache.dir") {
            Some(Ok(dir)) => PathBuf::from(dir),
            bad => {
                if let Some(Err(problem)) = bad {
                    s.problems.push(problem);
                }
                cache_home(env).context("cannot find a cache directory; set FERRY_CACHE_DIR")?.join("ferry")
            }
        };
        let cache_size =
            s.value(Some("FERRY_CACHE_SIZE"), "cache.size", 10 << 30, "10G", |raw| match (raw.text(), raw) {
                (Some(text), _) => parse_size(text).map_err(|e| e.to_string()),
                (None, Raw::File(toml::Value::Integer(n))) if *n >= 0 => Ok(*n as u64),
                (None, _) => Err(format!("expected a size like \"10G\", got {}", raw.shown())),
            });
        let cache_failures = s.value(Some("FERRY_CACHE_FAILURES"), "cache.failures", false, "false", boolean);
        let verify = s.value(Some("FERRY_VERIFY"), "cache.verify", 0.0, "0", fraction);
        let grace = s.value(Some("FERRY_CACHE_GRACE"), "cache.grace_secs", 600, "600", whole);
        let log = s.text(Some("FERRY_LOG"), "log.level").and_then(|r| r.map_err(|p| s.problems.push(p)).ok());
        let log_file = match s.text(Some("FERRY_LOG_FILE"), "log.file") {
            Some(Ok(file)) => PathBuf::from(file),
            bad => {
                if let Some(Err(problem)) = bad {
                    s.problems.push(problem);
                }
                cache_dir.join("ferry.log")
            }
        };
        let scheduler = s.value(Some("FERRY_SCHEDULER"), "cluster.scheduler", None, "no cluster", |raw| {
            let url = raw.text().ok_or_else(|| format!("expected a URL, got {}", raw.shown()))?.trim();
            match url.split_once("://") {
                Some(("http" | "https", _)) => Ok(Some(url.to_owned())),
                // `host:port`, as the scheduler prints its address.
                None => Ok(Some(format!("http://{url}"))),
                Some(_) => Err(format!("scheduler URL '{url}' must start with http:// or https://")),
            }
        });
        let token = s.text(Some("FERRY_TOKEN"), "cluster.token").and_then(|r| r.map_err(|p| s.problems.push(p)).ok());
        let ca = s.text(Some("FERRY_CA"), "cluster.ca").and_then(|r| r.map_err(|p| s.problems.push(p)).ok());
        let backoff = s.value(Some("FERRY_CLUSTER_BACKOFF"), "cluster.backoff_secs", 10, "10", whole);
        let shared_backoff = s.value(Some("FERRY_SHARED_BACKOFF"), "cache.shared_backoff_secs", 30, "30", whole);
        let shared_timeout = s.value(Some("FERRY_SHARED_TIMEOUT_MS"), "cache.shared_timeout_ms", 2000, "2000", whole);
        let default_shared = if scheduler.is_some() { SharedTierSpec::Scheduler } else { SharedTierSpec::Off };
        let default_text = if scheduler.is_some() { "the scheduler's" } else { "off" };
        let mut shared =
            s.value(Some("FERRY_SHARED_CACHE"), "cache.shared", default_shared, default_text, |raw| match raw.text() {
                Some(text) => SharedTierSpec::parse(text),
                None => Err(format!(
                    "expected 'scheduler', 'off', a redis://, rediss:// or memcached:// URL, got {}",
                    raw.shown()
                )),
            });
        if shared == SharedTierSpec::Scheduler && scheduler.is_none() {
            s.problems.push("the shared cache is 'scheduler' but no scheduler is set; the shared tier is off".into());
            shared = SharedTierSpec::Off;
        }
        let basedirs = s.value(Some("FERRY_BASEDIRS"), "cache.basedirs", Bases::default(), "none", |raw| {
            let dirs: Vec<String> = match raw {
                Raw::Env(text) => text.split(':').filter(|d| !d.is_empty()).map(str::to_owned).collect(),
                Raw::File(toml::Value::Array(items)) => items
                    .iter()
                    .map(|v| v.as_str().map(str::to_owned).ok_or_else(|| format!("expected paths, got {}", shown(v))))
                    .collect::<Result<_, _>>()?,
                Raw::File(other) => return Err(format!("expected a list of paths, got {}", shown(other))),
            };
            Bases::new(dirs).map_err(|bad| format!("base directory '{bad}' must be an absolute path"))
        });
        // The symmetric site key is gone: writers sign with keys of their own.
        if let Some(Ok(_)) = s.text(Some("FERRY_SHARED_KEY_FILE"), "cache.shared_key_file") {
            let origin = s.origin(Some("FERRY_SHARED_KEY_FILE"), "cache.shared_key_file");
            s.problems.push(format!(
                "{origin}: no longer used: each writer signs with a key of its own (FERRY_WRITER_KEY_FILE) and readers \
                 accept the writers the scheduler lists (or FERRY_TRUST_FILE); remove the setting"
            ));
        }
        let writer_key_file = match s.text(Some("FERRY_WRITER_KEY_FILE"), "cache.writer_key_file") {
            Some(Ok(path)) => PathBuf::from(path),
            bad => {
                if let Some(Err(problem)) = bad {
                    s.problems.push(problem);
                }
                cache_dir.join("writer.key")
            }
        };
        // A trust file that cannot be read is not "trust nobody extra": the tier goes off.
        let trust_file = match s.text(Some("FERRY_TRUST_FILE"), "cache.trust_file") {
            None => None,
            Some(Ok(path)) => {
                match std::fs::read_to_string(&path).map_err(|e| e.to_string()).and_then(|t| Trust::parse(&t)) {
                    Ok(trust) => Some(trust),
                    Err(e) => {
                        let origin = s.origin(Some("FERRY_TRUST_FILE"), "cache.trust_file");
                        s.problems.push(format!("{origin}: {path}: {e}; the shared tier is off"));
                        shared = SharedTierSpec::Off;
                        None
                    }
                }
            }
            Some(Err(problem)) => {
                s.problems.push(format!("{problem}; the shared tier is off"));
                shared = SharedTierSpec::Off;
                None
            }
        };
        let redis_tls = redis_tls(&mut s, &mut shared);
        if s.unreadable && shared != SharedTierSpec::Off {
            shared = SharedTierSpec::Off;
            s.problems
                .push("with the config file unusable the shared tier is off (it may name the writers to trust)".into());
        }
        s.unknown_keys();
        Ok(Config {
            writer_key_file,
            trust_file,
            cache_dir,
            cache_size,
            cache_failures,
            verify,
            cache_grace: Duration::from_secs(grace),
            log,
            log_file,
            scheduler,
            token,
            ca: ca.map(PathBuf::from),
            cluster_backoff: Duration::from_secs(backoff),
            shared,
            redis_tls,
            shared_backoff: Duration::from_secs(shared_backoff),
            shared_timeout: Duration::from_millis(shared_timeout),
            basedirs,
            problems: s.problems,
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

/// Every file key there is, by section (anything else in the file is reported and ignored).
const FILE_KEYS: &[&str] = &[
    "cache.dir",
    "cache.size",
    "cache.failures",
    "cache.verify",
    "cache.grace_secs",
    "cache.shared",
    "cache.shared_backoff_secs",
    "cache.shared_timeout_ms",
    "cache.basedirs",
    "cache.shared_key_file",
    "cache.writer_key_file",
    "cache.trust_file",
    "cache.redis_ca",
    "cache.redis_cert",
    "cache.redis_key",
    "cluster.scheduler",
    "cluster.token",
    "cluster.ca",
    "cluster.backoff_secs",
    "log.level",
    "log.file",
];

/// The TLS settings of a `rediss://` shared tier, read and checked. One that cannot be used turns
/// the tier off: its default (the system's roots, no client certificate) is not what was meant. Set
/// for a plain `redis://` tier, they are reported (a missing `s` would send everything in clear).
fn redis_tls(s: &mut Settings, shared: &mut SharedTierSpec) -> RedisTls {
    let ca = s.text(Some("FERRY_REDIS_CA"), "cache.redis_ca");
    let cert = s.text(Some("FERRY_REDIS_CERT"), "cache.redis_cert");
    let key = s.text(Some("FERRY_REDIS_KEY"), "cache.redis_key");
    let mut tls = RedisTls::default();
    let url = match &*shared {
        SharedTierSpec::Redis(url) => url.clone(),
        _ => return tls,
    };
    if !url.starts_with("rediss://") {
        for (set, var, key) in [
            (ca.is_some(), "FERRY_REDIS_CA", "cache.redis_ca"),
            (cert.is_some(), "FERRY_REDIS_CERT", "cache.redis_cert"),
            (key.is_some(), "FERRY_REDIS_KEY", "cache.redis_key"),
        ] {
            if set {
                let origin = s.origin(Some(var), key);
                s.problems.push(format!(
                    "{origin}: set, but the shared tier is a plain redis:// URL (TLS is rediss://); it is ignored"
                ));
            }
        }
        return tls;
    }
    let mut off = |s: &mut Settings, problem: String| {
        s.problems.push(format!("{problem}; the shared tier is off"));
        *shared = SharedTierSpec::Off;
    };
    match ca {
        None => {}
        Some(Ok(path)) => match RedisTls::read_ca(std::path::Path::new(&path)) {
            Ok(pem) => tls.ca = Some(pem),
            Err(e) => off(s, format!("{}: {e}", s.origin(Some("FERRY_REDIS_CA"), "cache.redis_ca"))),
        },
        Some(Err(problem)) => off(s, problem),
    }
    match (cert, key) {
        (None, None) => {}
        (Some(Ok(cert)), Some(Ok(key))) => {
            match RedisTls::read_identity(std::path::Path::new(&cert), std::path::Path::new(&key)) {
                Ok(identity) => tls.identity = Some(identity),
                Err(e) => {
                    let origin = s.origin(Some("FERRY_REDIS_CERT"), "cache.redis_cert");
                    off(s, format!("{origin} (and its key): {e}"));
                }
            }
        }
        (Some(Err(problem)), _) | (_, Some(Err(problem))) => off(s, problem),
        (Some(Ok(_)), None) => {
            let origin = s.origin(Some("FERRY_REDIS_CERT"), "cache.redis_cert");
            off(s, format!("{origin}: a client certificate needs its key (FERRY_REDIS_KEY or cache.redis_key)"));
        }
        (None, Some(Ok(_))) => {
            let origin = s.origin(Some("FERRY_REDIS_KEY"), "cache.redis_key");
            off(s, format!("{origin}: a client key needs its certificate (FERRY_REDIS_CERT or cache.redis_cert)"));
        }
    }
    tls
}

/// One setting's raw value: a non-empty environment variable wins over the file.
enum Raw<'a> {
    Env(&'a str),
    File(&'a toml::Value),
}

/// The file (parsed once) and the environment, with the problems found so far.
struct Settings<'e> {
    env: &'e dyn Fn(&str) -> Option<String>,
    path: Option<PathBuf>,
    file: toml::Table,
    /// The file was named but could not be read or parsed: none of it applies.
    unreadable: bool,
    problems: Vec<String>,
}

impl<'e> Settings<'e> {
    fn read(env: &'e dyn Fn(&str) -> Option<String>) -> Settings<'e> {
        let explicit = env("FERRY_CONFIG").filter(|s| !s.is_empty()).map(PathBuf::from);
        let path = explicit.clone().or_else(|| config_home(env).map(|d| d.join("ferry/config.toml")));
        let mut s =
            Settings { env, path: path.clone(), file: toml::Table::new(), unreadable: false, problems: Vec::new() };
        let Some(path) = path else { return s };
        match std::fs::read_to_string(&path) {
            Ok(text) => match text.parse::<toml::Table>() {
                Ok(table) => s.file = table,
                Err(e) => {
                    s.unreadable = true;
                    s.problems.push(format!("{}: {}; the file is ignored", path.display(), e.message().trim()));
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && explicit.is_none() => {}
            Err(e) => {
                s.unreadable = true;
                s.problems.push(format!("cannot read the config file {} (FERRY_CONFIG): {e}", path.display()));
            }
        }
        s
    }

    /// "environment variable NAME" or "FILE: key 'KEY'", whichever the value came from.
    fn origin(&self, var: Option<&str>, key: &str) -> String {
        match var.filter(|v| (self.env)(v).is_some_and(|s| !s.is_empty())) {
            Some(var) => format!("environment variable {var}"),
            None => match &self.path {
                Some(p) => format!("{}: key '{key}'", p.display()),
                None => format!("key '{key}'"),
            },
        }
    }

    fn lookup(&self, key: &str) -> Option<&toml::Value> {
        let (section, name) = key.split_once('.')?;
        self.file.get(section)?.as_table()?.get(name)
    }

    /// The setting parsed by `parse`, or `default` (shown to the user as `default_text`) with a
    /// problem recorded when it does not parse.
    fn value<T>(
        &mut self,
        var: Option<&str>,
        key: &str,
        default: T,
        default_text: &str,
        parse: impl FnOnce(&Raw) -> Result<T, String>,
    ) -> T {
        let from_env = var.and_then(|v| (self.env)(v)).filter(|s| !s.is_empty());
        let result = match (&from_env, self.lookup(key)) {
            (Some(text), _) => parse(&Raw::Env(text)),
            (None, Some(value)) => parse(&Raw::File(value)),
            (None, None) => return default,
        };
        result.unwrap_or_else(|e| {
            let origin = self.origin(var, key);
            self.problems.push(format!("{origin}: {e}; using the default ({default_text})"));
            default
        })
    }

    /// A text setting: None when unset, Err(problem) when the file holds something else.
    fn text(&mut self, var: Option<&str>, key: &str) -> Option<Result<String, String>> {
        if let Some(text) = var.and_then(|v| (self.env)(v)).filter(|s| !s.is_empty()) {
            return Some(Ok(text));
        }
        match self.lookup(key)? {
            toml::Value::String(text) => Some(Ok(text.clone())),
            other => {
                Some(Err(format!("{}: expected text, got {}; it is ignored", self.origin(None, key), shown(other))))
            }
        }
    }

    /// Reports what the file holds that ferry does not know (a typo must not pass unnoticed).
    fn unknown_keys(&mut self) {
        let Some(path) = &self.path else { return };
        for (section, value) in &self.file {
            match value.as_table() {
                Some(table) => {
                    for name in table.keys() {
                        let key = format!("{section}.{name}");
                        if !FILE_KEYS.contains(&key.as_str()) {
                            self.problems.push(format!("{}: unknown key '{key}'; it is ignored", path.display()));
                        }
                    }
                }
                None => self.problems.push(format!(
                    "{}: unknown key '{section}' (settings go in [cache], [cluster] and [log]); it is ignored",
                    path.display()
                )),
            }
        }
    }
}

impl Raw<'_> {
    /// The value as text: a variable's, or a string in the file.
    fn text(&self) -> Option<&str> {
        match self {
            Raw::Env(text) => Some(text),
            Raw::File(toml::Value::String(text)) => Some(text),
            Raw::File(_) => None,
        }
    }

    fn shown(&self) -> String {
        match self {
            Raw::Env(text) => format!("'{text}'"),
            Raw::File(value) => shown(value),
        }
    }
}

/// A file value as the user wrote it, roughly.
fn shown(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => format!("'{s}'"),
        toml::Value::Integer(n) => n.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        toml::Value::Datetime(d) => d.to_string(),
        toml::Value::Array(_) => "a list".into(),
        toml::Value::Table(_) => "a table".into(),
    }
}

fn boolean(raw: &Raw) -> Result<bool, String> {
    match (raw.text(), raw) {
        (Some(text), _) => parse_bool(text).map_err(|e| e.to_string()),
        (None, Raw::File(toml::Value::Boolean(b))) => Ok(*b),
        (None, _) => Err(format!("expected true or false, got {}", raw.shown())),
    }
}

/// A fraction from 0 to 1 (`0.01`, `1`; `1%` too).
fn fraction(raw: &Raw) -> Result<f64, String> {
    let value = match (raw.text(), raw) {
        (Some(text), _) => {
            let text = text.trim();
            let (number, scale) = match text.strip_suffix('%') {
                Some(n) => (n, 100.0),
                None => (text, 1.0),
            };
            number.parse::<f64>().map(|v| v / scale).map_err(|_| format!("'{text}' is not a fraction like 0.01"))?
        }
        (None, Raw::File(toml::Value::Float(f))) => *f,
        (None, Raw::File(toml::Value::Integer(n))) => *n as f64,
        (None, _) => return Err(format!("expected a fraction like 0.01, got {}", raw.shown())),
    };
    if (0.0..=1.0).contains(&value) { Ok(value) } else { Err(format!("{value} is not between 0 and 1")) }
}

fn whole(raw: &Raw) -> Result<u64, String> {
    match (raw.text(), raw) {
        (Some(text), _) => text.trim().parse().map_err(|_| format!("'{text}' is not a whole number")),
        (None, Raw::File(toml::Value::Integer(n))) if *n >= 0 => Ok(*n as u64),
        (None, _) => Err(format!("expected a whole number, got {}", raw.shown())),
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
    fn an_unusable_setting_takes_its_default_and_names_its_source() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        let f = file.to_str().unwrap();
        std::fs::write(&file, "[cache]\nsize = \"lots\"\nfailures = true\n").unwrap();
        let c = load(&[("FERRY_CONFIG", f)]).unwrap();
        assert_eq!((c.cache_size, c.cache_failures), (10 << 30, true));
        assert_eq!(c.problems.len(), 1, "{:?}", c.problems);
        assert!(
            c.problems[0].contains("c.toml: key 'cache.size'") && c.problems[0].contains("'lots'"),
            "{:?}",
            c.problems
        );
        assert!(c.problems[0].contains("using the default (10G)"), "{:?}", c.problems);

        // From the environment, the variable is named, not a file that does not exist.
        let c = load(&[("FERRY_CACHE_SIZE", "10X"), ("FERRY_CACHE_FAILURES", "maybe")]).unwrap();
        assert_eq!((c.cache_size, c.cache_failures), (10 << 30, false));
        assert!(
            c.problems.iter().any(|p| p.starts_with("environment variable FERRY_CACHE_SIZE: ")),
            "{:?}",
            c.problems
        );
        assert!(c.problems.iter().any(|p| p.starts_with("environment variable FERRY_CACHE_FAILURES: ")));
        assert!(c.problems.iter().all(|p| !p.contains("config.toml")), "{:?}", c.problems);

        // A typo in a key is reported, and the rest of the file applies.
        std::fs::write(&file, "[cache]\nsize_limit = 3\nsize = \"1G\"\n[cach]\nx = 1\n").unwrap();
        let c = load(&[("FERRY_CONFIG", f)]).unwrap();
        assert_eq!(c.cache_size, 1 << 30);
        assert!(c.problems.iter().any(|p| p.contains("unknown key 'cache.size_limit'")), "{:?}", c.problems);
        assert!(c.problems.iter().any(|p| p.contains("unknown key 'cach.x'")), "{:?}", c.problems);

        // A file that does not parse (or cannot be read) is ignored whole, and the shared tier
        // is off: the file may have held the trust file readers must check entries against.
        std::fs::write(&file, "[cache\nsize = 3\n").unwrap();
        let c = load(&[("FERRY_CONFIG", f), ("FERRY_SCHEDULER", "http://s:1")]).unwrap();
        assert_eq!(c.shared, SharedTierSpec::Off);
        assert!(
            c.problems.iter().any(|p| p.contains("c.toml") && p.contains("the file is ignored")),
            "{:?}",
            c.problems
        );
        let c = load(&[("FERRY_CONFIG", "/nonexistent/ferry.toml")]).unwrap();
        assert!(c.problems.iter().any(|p| p.contains("/nonexistent/ferry.toml")), "{:?}", c.problems);

        // An unreadable trust file: no shared tier rather than one trusting less than meant.
        let c = load(&[("FERRY_SCHEDULER", "http://s:1"), ("FERRY_TRUST_FILE", "/nonexistent/trust")]).unwrap();
        assert_eq!((c.shared, c.trust_file), (SharedTierSpec::Off, None));
        assert!(c.problems.iter().any(|p| p.starts_with("environment variable FERRY_TRUST_FILE: ")));
        // The old symmetric key is reported as gone, naming what replaced it.
        let c = load(&[("FERRY_SHARED_KEY_FILE", "/etc/ferry/site.key")]).unwrap();
        assert!(c.problems.iter().any(|p| p.contains("FERRY_SHARED_KEY_FILE") && p.contains("no longer used")));
    }

    #[test]
    fn an_unusable_redis_tls_setting_turns_the_tier_off_and_names_its_source() {
        let dir = tempfile::tempdir().unwrap();
        let garbage = dir.path().join("ca.pem");
        std::fs::write(&garbage, "not a certificate\n").unwrap();
        let garbage = garbage.to_str().unwrap();
        let tls = ("FERRY_SHARED_CACHE", "rediss://127.0.0.1:6380");

        // No TLS settings: the system's roots, no client certificate.
        let c = load(&[tls]).unwrap();
        assert_eq!(
            (c.shared, c.redis_tls, c.problems.len()),
            (SharedTierSpec::Redis(tls.1.into()), RedisTls::default(), 0)
        );

        for (vars, source) in [
            (vec![("FERRY_REDIS_CA", "/nonexistent/ca.pem")], "environment variable FERRY_REDIS_CA: cannot read"),
            (vec![("FERRY_REDIS_CA", garbage)], "environment variable FERRY_REDIS_CA: "),
            (vec![("FERRY_REDIS_CERT", garbage)], "needs its key"),
            (vec![("FERRY_REDIS_KEY", garbage)], "needs its certificate"),
            (vec![("FERRY_REDIS_CERT", garbage), ("FERRY_REDIS_KEY", garbage)], "holds no PEM certificate"),
        ] {
            let c = load(&[vec![tls], vars.clone()].concat()).unwrap();
            assert_eq!(c.shared, SharedTierSpec::Off, "{vars:?}");
            assert!(
                c.problems.iter().any(|p| p.contains(source) && p.ends_with("the shared tier is off")),
                "{vars:?}: {:?}",
                c.problems
            );
        }

        // From the file, the file and key are named.
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "[cache]\nshared = \"rediss://h\"\nredis_ca = \"/nonexistent/ca.pem\"\n").unwrap();
        let c = load(&[("FERRY_CONFIG", file.to_str().unwrap())]).unwrap();
        assert_eq!(c.shared, SharedTierSpec::Off);
        assert!(c.problems.iter().any(|p| p.contains("c.toml: key 'cache.redis_ca'")), "{:?}", c.problems);

        // Set for a plain redis:// tier: reported, the tier kept as asked.
        let c = load(&[("FERRY_SHARED_CACHE", "redis://h"), ("FERRY_REDIS_CA", garbage)]).unwrap();
        assert_eq!(c.shared, SharedTierSpec::Redis("redis://h".into()));
        assert!(c.problems[0].contains("plain redis:// URL"), "{:?}", c.problems);
    }

    #[test]
    fn a_scheduler_address_without_a_scheme_is_http() {
        let c = load(&[("FERRY_SCHEDULER", "127.0.0.1:7700")]).unwrap();
        assert_eq!(c.scheduler.as_deref(), Some("http://127.0.0.1:7700"));
        assert_eq!((c.shared, c.problems.len()), (SharedTierSpec::Scheduler, 0));
        let c = load(&[("FERRY_SCHEDULER", "grpc://s:1")]).unwrap();
        assert_eq!((c.scheduler, c.shared), (None, SharedTierSpec::Off));
        assert!(c.problems[0].starts_with("environment variable FERRY_SCHEDULER: "), "{:?}", c.problems);
    }
}
