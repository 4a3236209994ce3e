//! From a compiler path to the toolchain that really runs.
//!
//! A real rustc (`<root>/bin/rustc`) is its own answer. A rustup proxy (`~/.cargo/bin/rustc`, a link
//! to `rustup`) runs whichever toolchain rustup selects for this call, so we apply rustup's rules
//! ourselves, without spawning it: `+name`, then `RUSTUP_TOOLCHAIN`, then walking up from the working
//! directory a directory override or a `rust-toolchain`/`rust-toolchain.toml` file, then the default.
//! Anything those rules cannot settle by looking at the disk falls back to `rustup which rustc`.

use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{BUILD_HOST, Error};

/// A resolved compiler: the real rustc binary and its toolchain root (the sysroot).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compiler {
    /// Canonical path of the real rustc binary (never a proxy).
    pub rustc: PathBuf,
    /// Canonical toolchain root; `rustc` is `<root>/bin/rustc`.
    pub root: PathBuf,
    /// How it was found, for messages: `path`, or `rustup:<toolchain>`.
    pub via: String,
}

/// What `rustc -vV` says about a compiler.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Probe {
    pub host: String,
    pub release: String,
    /// The first line of `rustc -vV`, e.g. `rustc 1.95.0 (59807616e 2026-04-14)`.
    pub version: String,
}

/// How this crate starts processes (`rustc -vV`, `rustup which`), so a caller can route them
/// through its own spawning (and tracing) code.
pub type Spawn = fn(&mut Command) -> std::io::Result<std::process::Output>;

/// Runs a command and collects its output: the default [`Spawn`].
pub fn spawn_output(cmd: &mut Command) -> std::io::Result<std::process::Output> {
    cmd.output()
}

/// Resolves `path` (a file path, or a bare name searched in `PATH`) to the real toolchain.
/// `plus` is a `+toolchain` given on the command line; `cwd` is where the compile runs.
pub fn resolve_compiler(path: &Path, plus: Option<&str>, cwd: &Path) -> Result<Compiler, Error> {
    resolve_compiler_with(path, plus, cwd, spawn_output)
}

/// [`resolve_compiler`], starting any process through `spawn`.
pub fn resolve_compiler_with(path: &Path, plus: Option<&str>, cwd: &Path, spawn: Spawn) -> Result<Compiler, Error> {
    let found = if path.components().count() == 1 && !path.as_os_str().is_empty() {
        search_path(path).ok_or_else(|| Error::CompilerNotFound { path: path.to_owned() })?
    } else {
        cwd.join(path)
    };
    let meta = fs::metadata(&found).map_err(|_| Error::CompilerNotFound { path: found.clone() })?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Err(Error::NotExecutable { path: found });
    }
    if is_rustup_proxy(&found) {
        let name = match plus {
            Some(name) => name.to_owned(),
            None => rustup_selection(cwd)?,
        };
        return resolve_rustup_toolchain(&name, cwd, spawn);
    }
    real_compiler(&found, "path".into())
}

impl Probe {
    /// Runs `rustc -vV`; anything that does not answer like rustc is [`Error::NotRustc`].
    pub fn run(rustc: &Path, spawn: Spawn) -> Result<Probe, Error> {
        let not_rustc = |reason: String| Error::NotRustc { path: rustc.to_owned(), reason };
        let out = spawn(Command::new(rustc).arg("-vV").env_remove("RUSTC_WRAPPER"))
            .map_err(|e| not_rustc(format!("cannot run it: {e}")))?;
        if !out.status.success() {
            return Err(not_rustc(format!("'-vV' failed with {}", out.status)));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let field = |name: &str| {
            text.lines().find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned())).filter(|v| !v.is_empty())
        };
        let version = text.lines().next().unwrap_or_default().to_owned();
        match (version.starts_with("rustc "), field("host:"), field("release:")) {
            (true, Some(host), Some(release)) => Ok(Probe { host, release, version }),
            _ => Err(not_rustc("'-vV' does not print a rustc version".into())),
        }
    }
}

fn real_compiler(found: &Path, via: String) -> Result<Compiler, Error> {
    let rustc = fs::canonicalize(found).map_err(Error::io(found))?;
    let root = rustc.parent().and_then(Path::parent).map(Path::to_owned);
    match root {
        Some(root) if rustc.parent().is_some_and(|b| b.ends_with("bin")) && root.join("lib/rustlib").is_dir() => {
            Ok(Compiler { rustc, root, via })
        }
        _ => Err(Error::NotRustc {
            path: found.to_owned(),
            reason: "no toolchain around it (expected <root>/bin/rustc with <root>/lib/rustlib)".into(),
        }),
    }
}

fn search_path(name: &Path) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(name)).find(|p| p.is_file())
}

/// Is this program a rustup proxy (`~/.cargo/bin/rustc` and friends: a link to, or copy of, rustup)?
pub fn is_rustup_proxy(path: &Path) -> bool {
    let canonical = fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    if canonical.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("rustup")) {
        return true;
    }
    // rustup may install its proxies as hard links rather than symlinks.
    let (Some(dir), Ok(meta)) = (path.parent(), fs::metadata(path)) else { return false };
    fs::metadata(dir.join("rustup")).is_ok_and(|r| r.ino() == meta.ino() && r.dev() == meta.dev())
}

fn rustup_home() -> PathBuf {
    if let Some(home) = std::env::var_os("RUSTUP_HOME") {
        return home.into();
    }
    let home: PathBuf = std::env::var_os("HOME").unwrap_or_else(|| OsString::from("/")).into();
    home.join(".rustup")
}

#[derive(serde::Deserialize, Default)]
struct Settings {
    default_toolchain: Option<String>,
    default_host_triple: Option<String>,
    #[serde(default)]
    overrides: std::collections::BTreeMap<String, String>,
}

fn settings() -> Settings {
    fs::read_to_string(rustup_home().join("settings.toml"))
        .ok()
        .and_then(|s| toml::from_str(&s).ok())
        .unwrap_or_default()
}

/// The toolchain name (or `path:` + directory) rustup would select in `cwd`.
fn rustup_selection(cwd: &Path) -> Result<String, Error> {
    if let Some(name) = std::env::var_os("RUSTUP_TOOLCHAIN") {
        return Ok(name.to_string_lossy().into_owned());
    }
    let settings = settings();
    for dir in cwd.ancestors() {
        if let Some(name) = settings.overrides.get(&*dir.to_string_lossy()) {
            return Ok(name.clone());
        }
        for file in ["rust-toolchain", "rust-toolchain.toml"] {
            let candidate = dir.join(file);
            let Ok(text) = fs::read_to_string(&candidate) else { continue };
            return toolchain_file_selection(&text, dir).ok_or_else(|| Error::Rustup {
                name: candidate.display().to_string(),
                reason: "cannot read a channel or path from this toolchain file".into(),
            });
        }
    }
    settings.default_toolchain.ok_or_else(|| Error::Rustup {
        name: "default".into(),
        reason: "rustup has no default toolchain; run 'rustup default stable'".into(),
    })
}

fn toolchain_file_selection(text: &str, dir: &Path) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct File {
        toolchain: Section,
    }
    #[derive(serde::Deserialize)]
    struct Section {
        channel: Option<String>,
        path: Option<String>,
    }
    match toml::from_str::<File>(text) {
        Ok(File { toolchain: Section { path: Some(path), .. } }) => Some(format!("path:{}", dir.join(path).display())),
        Ok(File { toolchain: Section { channel: Some(channel), .. } }) => Some(channel),
        Ok(_) => None,
        // The legacy one-line form: just a channel name.
        Err(_) => {
            let line = text.trim();
            (!line.is_empty() && !line.contains(['\n', '[', '='])).then(|| line.to_owned())
        }
    }
}

fn resolve_rustup_toolchain(name: &str, cwd: &Path, spawn: Spawn) -> Result<Compiler, Error> {
    let via = format!("rustup:{name}");
    if let Some(dir) = name.strip_prefix("path:") {
        return real_compiler(&Path::new(dir).join("bin/rustc"), via);
    }
    if name.contains('/') {
        return real_compiler(&Path::new(name).join("bin/rustc"), via);
    }
    let toolchains = rustup_home().join("toolchains");
    let host = settings().default_host_triple.unwrap_or_else(|| BUILD_HOST.to_owned());
    for dir in [toolchains.join(name), toolchains.join(format!("{name}-{host}"))] {
        if dir.join("bin/rustc").is_file() {
            return real_compiler(&dir.join("bin/rustc"), via);
        }
    }
    // Names we cannot map by looking (e.g. `1.95` meaning the newest 1.95.x): ask rustup itself.
    let out = spawn(
        Command::new("rustup")
            .args(["which", "rustc", "--toolchain", name])
            .current_dir(cwd)
            .env_remove("RUST_BACKTRACE")
            .env_remove("RUST_LIB_BACKTRACE"),
    )
    .map_err(|e| Error::Rustup { name: name.into(), reason: format!("cannot run rustup: {e}") })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let msg = stderr.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("no explanation").to_owned();
        return Err(Error::Rustup { name: name.into(), reason: format!("rustup says: {msg}") });
    }
    let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    real_compiler(Path::new(&path), via)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toolchain_files() {
        let dir = Path::new("/p");
        assert_eq!(toolchain_file_selection("[toolchain]\nchannel = \"nightly\"\n", dir).as_deref(), Some("nightly"));
        assert_eq!(toolchain_file_selection("[toolchain]\npath = \"tc\"\n", dir).as_deref(), Some("path:/p/tc"));
        assert_eq!(toolchain_file_selection("1.95.0\n", dir).as_deref(), Some("1.95.0"));
        assert_eq!(toolchain_file_selection("[toolchain]\n", dir), None);
    }
}
