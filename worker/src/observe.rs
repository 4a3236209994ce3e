//! Observing a job inside its sandbox, and the keys the worker derives from what it observed.
//!
//! Every job runs with `ferry-observe`'s interposer preloaded (bound read-only into the sandbox
//! at [`INTERPOSER_INSIDE`]) and a log of its own (bound writable at [`LOG_INSIDE`], owned by the
//! job's user). From the log the worker derives, with the same recipe as the client
//! (`ferry_cache::rustc`): the job's manifest, and its result key computed from the job's own
//! inputs (the files placed in its tree, the worker's system files, the job's environment). That
//! key is what the worker publishes under, and what it tells the client: a client derives the
//! same key from the same manifest with its own files only when nothing the job observed differs.
//!
//! The pre-key covers the `--extern` files by content, so the code a job loads into rustc
//! (proc-macros) is always keyed; an observation can only be tampered with by code running in the
//! observed processes, and that code is keyed too.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use ferry_cache::CacheKey;
use ferry_cache::rustc::recipe::{self, PreKeyParts, absolute};
use ferry_cache::rustc::{
    Bases, Classified, Found, InputList, Inputs, Observation, Scope, ToolchainFiles, classify, input_list,
};
use ferry_toolchains::ToolchainId;

use crate::sandbox::Bind;

/// Where the interposer and the log appear inside the sandbox. The library's file name must say
/// `libferry_observe` (the interposer checks that children keep it preloaded by that name).
pub const INTERPOSER_INSIDE: &str = "/run/ferry/libferry_observe.so";
pub const LOG_INSIDE: &str = "/run/ferry/observe.log";

/// One job's observer: the interposer and the job's log, on the host.
#[derive(Debug)]
pub struct JobObserver {
    pub interposer: PathBuf,
    pub log: PathBuf,
}

/// What a job observed and what the worker derives from it.
#[derive(Debug, Clone)]
pub struct Derived {
    pub scope: CacheKey,
    /// The manifest, with the job's paths (not rebased).
    pub list: InputList,
    pub key: CacheKey,
}

/// A job as the key recipe needs it.
#[derive(Debug)]
pub struct JobView<'a> {
    pub toolchain: ToolchainId,
    pub toolchain_root: &'a str,
    /// The toolchain's host triple ([`toolchain_host`]).
    pub toolchain_host: &'a str,
    pub cwd: &'a str,
    pub args: &'a [String],
    pub env: &'a [(String, String)],
    /// Input digests by absolute path.
    pub inputs: &'a HashMap<String, [u8; 32]>,
    pub outputs: &'a [String],
    pub basedirs: &'a [String],
    /// The job's tree on the host.
    pub tree: &'a Path,
}

impl JobObserver {
    /// Installs the interposer under `observe_dir` (once) and creates the job's empty log in
    /// `job_dir`, owned by the job's user when jobs run as another one.
    pub fn new(observe_dir: &Path, job_dir: &Path, run_as: Option<(u32, u32)>) -> std::io::Result<JobObserver> {
        use std::os::unix::fs::PermissionsExt;
        let interposer = ferry_observe::install(observe_dir)?;
        fs::set_permissions(observe_dir, fs::Permissions::from_mode(0o711))?;
        fs::create_dir_all(job_dir)?;
        let log = job_dir.join("observe.log");
        fs::File::create_new(&log)?;
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::lchown(&log, Some(uid), Some(gid))?;
        }
        Ok(JobObserver { interposer, log })
    }

    pub fn binds(&self) -> [Bind<'_>; 2] {
        [
            Bind { host: &self.interposer, inside: INTERPOSER_INSIDE, writable: false },
            Bind { host: &self.log, inside: LOG_INSIDE, writable: true },
        ]
    }

    /// The variables that turn the interposer on inside the sandbox (rustc's parent there is the
    /// sandbox's pid 1).
    pub fn env() -> Vec<(String, String)> {
        vec![
            ("LD_PRELOAD".into(), INTERPOSER_INSIDE.into()),
            (ferry_observe::LOG_VAR.into(), LOG_INSIDE.into()),
            (ferry_observe::PARENT_VAR.into(), "1".into()),
        ]
    }

    /// The manifest and keys of the job so far (`partial`: while it still runs, a record being
    /// written at the end is left out) or in all. Err: why the observation is incomplete.
    pub fn derive(&self, job: &JobView, partial: bool) -> Result<Derived, String> {
        let bytes = fs::read(&self.log).map_err(|e| format!("the observation log cannot be read: {e}"))?;
        let records = match ferry_observe::parse(&bytes) {
            Ok(records) => records,
            Err(bad) if partial => ferry_observe::parse(&bytes[..bad.offset]).map_err(|e| e.to_string())?,
            Err(e) => return Err(e.to_string()),
        };
        let Classified::Cacheable(rustc) = classify(&job.args.iter().map(Into::into).collect::<Vec<_>>()) else {
            return Err("the job's command line is not cacheable".into());
        };
        let cwd = Path::new(job.cwd);
        let targets: Vec<String> = rustc.target.iter().filter(|t| *t != job.toolchain_host).cloned().collect();
        let tracked_env = rustc.dep_info_path().and_then(|d| {
            let path = absolute(cwd, d);
            let bytes = crate::beneath::read_beneath(job.tree, path.to_str()?, 64 << 20).ok()?;
            Some(ferry_cache::rustc::depinfo::env_names(&String::from_utf8_lossy(&bytes)))
        });
        let scope = Scope {
            toolchain: Some(ToolchainFiles {
                root: Path::new(job.toolchain_root),
                host: job.toolchain_host,
                targets: &targets,
            }),
            outputs: job.outputs.iter().map(PathBuf::from).collect(),
            search_dirs: rustc.search_dirs().map(|d| absolute(cwd, d)).collect(),
            own_files: vec![INTERPOSER_INSIDE.into(), LOG_INSIDE.into()],
            tracked_env,
            locale: None,
        };
        let Observation { mut list, wrote } = input_list(&records, &scope).map_err(|e| e.to_string())?;
        let mut inputs = TreeInputs::new(job);
        if !partial {
            // What the job left outside its outputs would not reach the client: it compiles locally.
            if let Some(left) = wrote
                .iter()
                .find(|w| w.to_str().and_then(|p| inputs.host(p)).is_some_and(|h| fs::symlink_metadata(h).is_ok()))
            {
                return Err(format!("wrote-outside-outputs: {}", left.display()));
            }
        }
        let bases = Bases::new(job.basedirs.iter().cloned()).map_err(|b| format!("bad base directory '{b}'"))?;
        if !bases.is_empty() {
            let outputs: Vec<Vec<u8>> = job
                .outputs
                .iter()
                .filter(|o| !o.ends_with(".d"))
                .filter_map(|o| crate::beneath::read_beneath(job.tree, o, 4 << 30).ok())
                .collect();
            let outputs: Vec<&[u8]> = outputs.iter().map(Vec::as_slice).collect();
            let env = |n: &str| job.env.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone().into_bytes());
            recipe::mark_verbatim(&mut list, &bases, env, &outputs);
        }
        let digest = |path: &str| job.inputs.get(absolute(cwd, path).to_str()?).copied();
        let mut externs = Vec::new();
        for (name, path) in &rustc.externs {
            externs.push((name.clone(), path.clone(), digest(path).ok_or("an --extern file was not sent")?));
        }
        let toolchain = job.toolchain.to_hex();
        let parts = PreKeyParts {
            toolchain: &toolchain,
            driver: "rustc",
            cwd: job.cwd,
            args: &rustc,
            externs,
            native_cpu: None,
        };
        let pre = recipe::pre_key(parts, &bases).finish();
        let scope = recipe::manifest_scope(&pre, digest(&rustc.input));
        let key = recipe::result_key_or_why(&pre, &list, &bases, &mut inputs)
            .map_err(|why| format!("an observed input cannot be read back: {why}"))?;
        if tracing::enabled!(tracing::Level::DEBUG) {
            let parts: Vec<String> = key.parts().iter().map(|p| format!("{} = {}", p.name, p.value)).collect();
            tracing::debug!(partial, parts = %parts.join("; "), "the job's key parts");
        }
        Ok(Derived { scope, list, key: key.finish() })
    }
}

fn executable(meta: &fs::Metadata) -> bool {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o111 != 0
}

/// The host triple of an unpacked toolchain: the one target whose `lib/rustlib/<host>/bin` (or
/// `codegen-backends`) the archive holds, as only the host's are packed. Empty when none is
/// found: then fewer paths count as the toolchain's, more are keyed, and a client's key differs.
pub fn toolchain_host(unpacked: &Path) -> String {
    let Ok(dir) = fs::read_dir(unpacked.join("lib/rustlib")) else { return String::new() };
    dir.flatten()
        .map(|e| e.path())
        .find(|t| t.join("bin").is_dir() || t.join("codegen-backends").is_dir())
        .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default()
}

/// A job's inputs as the sandbox showed them: its tree, the mirrored system directories, and its
/// environment.
struct TreeInputs<'a> {
    job: &'a JobView<'a>,
    tops: HashSet<String>,
}

/// Host directories the sandbox mirrors read-only at the same path.
const MIRRORED: &[&str] = &["usr", "lib", "lib64", "bin", "sbin"];

impl<'a> TreeInputs<'a> {
    fn new(job: &'a JobView<'a>) -> TreeInputs<'a> {
        let tops = fs::read_dir(job.tree)
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        TreeInputs { job, tops }
    }

    /// Where a path inside the sandbox is on the host; None when the sandbox has nothing there.
    /// Under /usr the job's files are grafted onto the host's (`sandbox::graft`): the tree's
    /// wins where it has the path.
    fn host(&self, path: &str) -> Option<PathBuf> {
        let rel = path.strip_prefix('/')?;
        let top = rel.split('/').next().unwrap_or_default();
        if top == "usr" {
            let in_tree = self.job.tree.join(rel);
            return Some(if fs::symlink_metadata(&in_tree).is_ok() { in_tree } else { PathBuf::from(path) });
        }
        if self.tops.contains(top) {
            Some(self.job.tree.join(rel))
        } else if MIRRORED.contains(&top) {
            Some(PathBuf::from(path))
        } else {
            None
        }
    }
}

impl Inputs for TreeInputs<'_> {
    fn probe(&mut self, path: &str) -> Found {
        let abs = absolute(Path::new(self.job.cwd), path);
        let Some(host) = abs.to_str().and_then(|p| self.host(p)) else { return Found::Absent };
        match fs::metadata(&host) {
            Ok(m) if m.is_file() => match abs.to_str().and_then(|p| self.job.inputs.get(p)) {
                Some(d) => Found::File { digest: *d, executable: executable(&m) },
                // Read without following links when it lies in the job's tree (a process left in
                // the sandbox could have planted one); the mirrored system directories are read-only.
                None => {
                    let bytes = match host.strip_prefix(self.job.tree) {
                        Ok(rel) => crate::beneath::read_beneath(self.job.tree, &rel.to_string_lossy(), 4 << 30),
                        Err(_) => fs::read(&host),
                    };
                    bytes.map_or(Found::Unreadable, |b| Found::File {
                        digest: *blake3::hash(&b).as_bytes(),
                        executable: executable(&m),
                    })
                }
            },
            Ok(m) if m.is_dir() => Found::Dir,
            Ok(_) => Found::Other,
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => Found::Absent,
            Err(_) => Found::Unreadable,
        }
    }

    fn link(&mut self, path: &str) -> Option<String> {
        let host = self.host(path)?;
        fs::read_link(host).ok().and_then(|t| t.to_str().map(str::to_owned))
    }

    fn listing(&mut self, path: &str) -> Option<Vec<String>> {
        let host = self.host(path)?;
        let mut names: Vec<String> =
            fs::read_dir(host).ok()?.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        Some(names)
    }

    fn program(&mut self, name: &str) -> Option<[u8; 32]> {
        let path = if name.contains('/') {
            name.to_owned()
        } else {
            let search = self.job.env.iter().find(|(n, _)| n == "PATH").map(|(_, v)| v.as_str()).unwrap_or_default();
            search.split(':').map(|d| format!("{d}/{name}")).find(|p| matches!(self.probe(p), Found::File { .. }))?
        };
        match self.probe(&path) {
            Found::File { digest, .. } => Some(digest),
            _ => None,
        }
    }

    fn env(&self, name: &str) -> Option<Vec<u8>> {
        self.job.env.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone().into_bytes())
    }

    fn env_names(&self) -> Vec<String> {
        self.job.env.iter().map(|(n, _)| n.clone()).collect()
    }
}
