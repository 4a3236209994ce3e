//! C and C++: `ferry gcc|g++|cc|c++|clang|clang++|/path/to/compiler ARGS...`, and the same through
//! a link named after a compiler that points at ferry (masquerade: `ferry setup` makes them).
//!
//! A call takes the same walk as a rustc one ([`super::Job`]); what differs is here:
//! - **Which compiler**: the one named, found in `PATH` as the shell would, skipping every file
//!   that is ferry itself (so a masquerade link runs the next compiler of that name on `PATH`).
//!   Passed-through calls (linking, `-E`, cc-rs's probes) run it unchanged.
//! - **Identity**: the driver by content (through the stat-fingerprint memo); everything else
//!   that shapes the output — `cc1`/`cc1plus`, `as`, the libraries they load, plugins, specs,
//!   every header — the compile is observed reading, and its manifest keys by content
//!   (`ferry_cache::cc`). The ToolchainId of a C compiler is derived from the driver's digest.
//! - **Outputs**: the object and an `-MF` file, and what the compile wrote beside them under the
//!   names its driver picks (`.d`, `.dwo`, `.gcno`, `.su`: `ferry_cache::cc::is_extra_output`).
//! - **Time**: a source or header that uses `__DATE__`/`__TIME__`/`__TIMESTAMP__` without
//!   `SOURCE_DATE_EPOCH` is not stored.
//! - **Colour**: when the wrapper's stderr is a terminal, the compile is asked for colour (it
//!   writes to a pipe), and that is keyed.

use std::ffi::OsString;
use std::fs;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use ferry_cache::KeyBuilder;
use ferry_cache::cc::{CcArgs, PreKeyParts};
use ferry_cache::rustc::recipe::absolute;
use ferry_toolchains::ToolchainId;

use super::identity::Identity;
use super::{Invocation, Job, Unit};
use crate::reason::{Fallback, NotStored};

/// `ferry COMPILER ARGS...` (or a masquerade link's `COMPILER ARGS...`): the compiler found, its
/// arguments as given. Err when no compiler of that name but ferry is there.
pub fn invocation(args: &[OsString]) -> Result<Invocation, String> {
    let named = Path::new(&args[0]);
    let program = find_compiler(named).ok_or_else(|| {
        let name = named.file_name().map_or_else(|| named.display().to_string(), |n| n.to_string_lossy().into_owned());
        format!("cannot find the compiler '{name}' in PATH (other than ferry itself)")
    })?;
    Ok(Invocation { program, inner: None, plus: None, rest: args[1..].to_vec() })
}

/// The compiler a name stands for: a path as given, or the first file of that name in `PATH`;
/// never ferry itself (a masquerade link, or a path to ferry under a compiler's name), whose
/// name is then searched in `PATH` past it.
pub fn find_compiler(named: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let me = std::env::current_exe().and_then(fs::canonicalize).ok();
    let is_me = |p: &Path| me.is_some() && fs::canonicalize(p).ok() == me;
    let runnable = |p: &Path| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if named.components().count() > 1 && !is_me(named) {
        return runnable(named).then(|| named.to_owned());
    }
    let name = named.file_name()?;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| runnable(p) && !is_me(p))
}

/// Is this process part of a compile ferry observes (a linker driver rustc started, a compiler a
/// proc-macro runs)? Such a call runs as it is: its reads belong to the outer compile's manifest.
pub fn inside_observed_compile() -> bool {
    std::env::var_os(ferry_observe::LOG_VAR).is_some()
}

impl Job {
    /// The C compiler's identity: the driver by content (its digest through the memo).
    pub(super) fn identify_cc(&mut self, native: bool) -> Result<Identity, Fallback> {
        let program = self.invocation.program.clone();
        let canonical = fs::canonicalize(&program).map_err(|_| Fallback::ToolchainUnresolved)?;
        let meta = fs::metadata(&canonical).map_err(|_| Fallback::ToolchainUnresolved)?;
        let digest = crate::digests::digest(&canonical, &meta).ok_or(Fallback::ToolchainUnresolved)?;
        // The name as run, not as resolved: clang decides its mode (C or C++) from it.
        let name = program.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let driver = format!("{name} blake3:{}", blake3::Hash::from_bytes(digest).to_hex());
        let mut id = blake3::Hasher::new();
        id.update(b"ferry cc toolchain\0").update(&digest);
        let native_cpu = native.then(|| {
            let cpu = super::identity::this_cpu();
            format!("blake3:{}", blake3::hash(cpu.as_bytes()).to_hex())
        });
        Ok(Identity {
            id: ToolchainId(*id.finalize().as_bytes()),
            rust: None,
            driver,
            program,
            prefix: Vec::new(),
            native_cpu,
        })
    }

    pub(super) fn pre_key_cc(&self, cc: &CcArgs, ident: &Identity) -> KeyBuilder {
        let (name, digest) = ident.driver.split_once(" blake3:").unwrap_or((&ident.driver, ""));
        let cwd = self.cwd.to_string_lossy();
        let added = colour_argument(cc);
        let parts = PreKeyParts {
            driver: name,
            driver_digest: digest,
            cwd: &cwd,
            args: cc,
            added,
            native_cpu: ident.native_cpu.as_deref(),
        };
        ferry_cache::cc::pre_key(parts, &self.config.basedirs)
    }

    /// For a C compile, an exclusive lock on its object's path (`<cache dir>/locks/`), held from
    /// before the compile until its outputs are read back: two compiles of one object at once (a
    /// make rule reached twice) write it in place, and one of them reading it back while the
    /// other has just truncated it would store a torn object. A hit replays by rename and needs
    /// none. A rustc unit's outputs are cargo's own, never shared: no lock.
    pub(super) fn output_lock(&self) -> Result<Option<fs::File>, NotStored> {
        let Unit::Cc(cc) = &self.unit else { return Ok(None) };
        let object = absolute(&self.cwd, &cc.object);
        let name = blake3::hash(object.as_os_str().as_encoded_bytes()).to_hex();
        let lock = crate::files::lock_file(&self.config.cache_dir.join("locks").join(&name[..32]))
            .and_then(|f| f.lock().map(|()| f))
            .map_err(|e| {
                tracing::warn!(error = %e, "cannot lock the object's path");
                NotStored::OutputLock
            })?;
        Ok(Some(lock))
    }

    /// Arguments the wrapper adds to the compiler's (see [`colour_argument`]).
    pub(super) fn added_args(&self) -> Vec<OsString> {
        match &self.unit {
            Unit::Cc(cc) => colour_argument(cc).into_iter().map(OsString::from).collect(),
            Unit::Rustc(_) => Vec::new(),
        }
    }

    /// What a C compile wrote beside its declared outputs that a replay must write too:
    /// `(path as stored, bytes)`. Err when it wrote anything else that is still there.
    pub(super) fn extra_outputs(&self, cc: &CcArgs, wrote: &[PathBuf]) -> Result<Vec<(String, Vec<u8>)>, NotStored> {
        let declared: Vec<PathBuf> = cc.outputs().iter().map(|(o, _)| absolute(&self.cwd, o)).collect();
        let mut extras = Vec::new();
        for path in wrote {
            let Ok(meta) = fs::symlink_metadata(path) else { continue };
            if !meta.is_file() || !ferry_cache::cc::is_extra_output(cc, &self.cwd, path) {
                tracing::info!(krate = %cc.name(), path = %path.display(), "the compile wrote outside its outputs");
                return Err(NotStored::WroteOutsideOutputs);
            }
            let stored = path.strip_prefix(&self.cwd).unwrap_or(path).to_string_lossy().into_owned();
            if declared.contains(&absolute(&self.cwd, &stored)) {
                continue;
            }
            extras.push((stored, fs::read(path).map_err(|_| NotStored::MissingOutput)?));
        }
        extras.sort();
        Ok(extras)
    }
}

/// `-fdiagnostics-color=always` when the wrapper's stderr is a terminal and no colour option is
/// given: a compile writing into a pipe (as a wrapped one does) prints no colour, where the same
/// compile run plainly would (both gcc and clang accept the option).
fn colour_argument(cc: &CcArgs) -> Option<&'static str> {
    ferry_cache::cc::colour_argument(cc, std::io::stderr().is_terminal())
}

/// Whether any file a C compile read (source, headers; not binaries) uses a time macro, which
/// makes its output depend on when it ran. With `SOURCE_DATE_EPOCH` set, gcc and clang take
/// the time from it, and the variable is keyed like any other they read.
pub fn uses_time_macro(files: &[String], cwd: &Path) -> bool {
    if std::env::var_os("SOURCE_DATE_EPOCH").is_some() {
        return false;
    }
    files.iter().any(|f| {
        // Programs and libraries (ELF) are not preprocessed: only their first bytes are read.
        let path = cwd.join(f);
        let mut magic = [0u8; 4];
        let elf = fs::File::open(&path).and_then(|mut file| std::io::Read::read_exact(&mut file, &mut magic)).is_ok()
            && magic == *b"\x7fELF";
        !elf && fs::read(&path).is_ok_and(|bytes| has_time_macro(&bytes))
    })
}

fn has_time_macro(bytes: &[u8]) -> bool {
    const MACROS: [&[u8]; 3] = [b"__DATE__", b"__TIME__", b"__TIMESTAMP__"];
    let mut from = 0;
    while let Some(i) = bytes[from..].iter().position(|&b| b == b'_') {
        let at = from + i;
        if MACROS.iter().any(|m| bytes[at..].starts_with(m)) {
            return true;
        }
        from = at + 1;
    }
    false
}

/// Entry point for C-family compilers (see the module's text).
pub fn wrap(args: &[OsString]) -> ExitCode {
    let invocation = match invocation(args) {
        Ok(i) => i,
        Err(e) => {
            let _ = std::io::Write::write_all(&mut std::io::stderr(), format!("ferry: {e}\n").as_bytes());
            return ExitCode::from(127);
        }
    };
    // Inside an observed compile nothing of ferry's own may show: no configuration read, no
    // counter written (the outer compile's manifest would list them, and its result not be
    // stored for a write outside its outputs).
    if inside_observed_compile() {
        let err = crate::process::exec_untraced(&invocation.program, &invocation.rest);
        return super::cannot_run(&invocation.program, &err);
    }
    super::start(invocation, true)
}

/// This machine's locale data and message catalogs for the locale the environment selects (see
/// `ferry_cache::rustc::LocaleInputs`): every locale directory's files (or `locale-archive`) under
/// `LOCPATH` or `/usr/lib/locale`, and the catalogs of each language the variables name under
/// `/usr/share/locale` and `/usr/share/locale-langpack`.
pub fn locale_inputs() -> ferry_cache::rustc::LocaleInputs {
    let mut inputs = ferry_cache::rustc::LocaleInputs::default();
    let roots: Vec<PathBuf> = match std::env::var_os("LOCPATH") {
        Some(p) => std::env::split_paths(&p).collect(),
        None => vec![PathBuf::from("/usr/lib/locale")],
    };
    for root in &roots {
        add_locale_dir(root, &mut inputs, 2);
    }
    let mut languages: Vec<String> = Vec::new();
    for var in ["LANGUAGE", "LC_ALL", "LC_MESSAGES", "LANG"] {
        let Some(value) = std::env::var_os(var) else { continue };
        for name in value.to_string_lossy().split(':').filter(|n| !n.is_empty()) {
            let base = name.split(['.', '@']).next().unwrap_or(name);
            if matches!(base, "C" | "POSIX") {
                continue;
            }
            for lang in [name, base, base.split('_').next().unwrap_or(base)] {
                if !languages.iter().any(|l| l == lang) {
                    languages.push(lang.to_owned());
                }
            }
        }
    }
    for lang in &languages {
        for base in ["/usr/share/locale", "/usr/share/locale-langpack"] {
            add_locale_dir(&Path::new(base).join(lang).join("LC_MESSAGES"), &mut inputs, 0);
        }
    }
    inputs
}

/// A directory's listing (or its absence) and its files, and its subdirectories' to `depth`.
fn add_locale_dir(dir: &Path, inputs: &mut ferry_cache::rustc::LocaleInputs, depth: u32) {
    let Ok(entries) = fs::read_dir(dir) else {
        inputs.absent.push(dir.to_owned());
        return;
    };
    inputs.listings.push(dir.to_owned());
    for entry in entries.flatten() {
        let path = entry.path();
        match fs::metadata(&path) {
            Ok(m) if m.is_file() => inputs.files.push(path),
            Ok(m) if m.is_dir() && depth > 0 => add_locale_dir(&path, inputs, depth - 1),
            _ => {}
        }
    }
}
