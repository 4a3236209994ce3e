//! The job sandbox: one compile job run under bubblewrap (`bwrap`), because a job may load a
//! client-supplied proc-macro, which is arbitrary code running inside rustc.
//!
//! The sandbox has new user, pid, network, ipc, uts (and, when the kernel allows, cgroup)
//! namespaces, so a job sees no network (only its own loopback), no other process and cannot
//! signal anything outside. Its filesystem is built from nothing: `/usr` and the `/lib*`, `/bin`,
//! `/sbin` links mirrored read-only from the host, fresh `/proc`, `/dev` and a size-bounded
//! `/tmp`, the job's tree bound read-write (each top-level directory of the tree at `/<name>`),
//! the toolchain bound read-only where the client had it, and the root remounted read-only. No
//! `/etc`, `/home`, `/root`, `/var`, `/run`, `/sys`, nor the worker's own data directory. The
//! environment is exactly the job's list. Resource limits are rlimits set on `bwrap` before it
//! starts, so everything inside inherits them, and where the worker can create one, a cgroup per
//! job that holds the same memory and process limits for the whole job ([`crate::limits`]); the
//! wall clock is enforced here by killing bwrap's
//! process group, and `--die-with-parent` plus the pid namespace take everything inside with it.
//!
//! When the worker runs as root it must not compile anything as root (and `RLIMIT_NPROC` does not
//! bind uid 0), so by default the job runs as `nobody` (65534): bwrap is started as that user,
//! unprivileged, and the job's tree is chowned to it first. Consequences for the caller: the tree
//! and the toolchain directory (and every directory above them) must be searchable by that user,
//! and after the job the tree's files belong to it. bwrap 0.8.0 or later is required
//! (`--disable-userns`). bwrap exits without reaping its pid-1 helper, which is reparented to the
//! host's init: the worker must run under an init that reaps orphans (in a container, `--init`),
//! or those zombies pile up and count against `max_processes`.
//!
//! Which limit ended a job is read from how it ended: a signal (SIGXCPU, SIGXFSZ), which bwrap
//! passes on as exit code 128 + signal; and, where the kernel only makes a call fail, from the
//! job's stderr — see [`Limit`].

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::lchown;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub use crate::limits::JobCgroups;
use crate::limits::{GroupLimits, JobGroup};

/// How jobs are confined. One per worker; [`Default`] holds the production values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxConfig {
    /// The bubblewrap binary; a bare name is looked up in the worker's `PATH`, so packaged bwrap
    /// works without configuration.
    pub bwrap: PathBuf,
    /// The uid/gid the job runs as. A root worker must not run client code as root, and
    /// `RLIMIT_NPROC` does not apply to uid 0, so the default is `nobody` (65534) when the worker
    /// is root, and the worker's own user (`None`) otherwise.
    pub run_as: Option<(u32, u32)>,
    /// `RLIMIT_CPU` (the hard limit is 5 s higher): a job spinning forever ends with SIGXCPU
    /// instead of holding a slot until the wall clock runs out.
    pub cpu_secs: u64,
    /// `RLIMIT_AS`, per process: a job cannot make the worker's machine swap or trigger its OOM
    /// killer against other jobs.
    pub memory_bytes: u64,
    /// `RLIMIT_FSIZE`, per file written, and also the total size of the sandbox's `/tmp` (a tmpfs,
    /// which would otherwise be unbounded host memory): a job cannot fill the worker's disk or RAM
    /// with one file.
    pub file_size_bytes: u64,
    /// `RLIMIT_NPROC`: processes and threads of the job's uid, counted system-wide, so shared by
    /// concurrent jobs running as the same uid. Stops fork bombs.
    pub max_processes: u64,
    /// Wall-clock bound on the whole job, sleeping included; on expiry the whole process tree is
    /// killed, so a job blocked forever cannot hold a slot.
    pub wall_clock: Duration,
    /// Size of the tmpfs each job's writes land on (an overlay over its inputs), when
    /// `disk_quota` is on; see [`crate::limits`].
    pub disk_bytes: u64,
    /// Whether job directories get their own tmpfs of `disk_bytes`: set at start-up when the
    /// worker can mount one (root) and `disk_bytes` is not 0. Off by default.
    pub disk_quota: bool,
    /// Whether to give each job a cgroup where the worker can (`sandbox.cgroups`, default on).
    pub want_cgroups: bool,
    /// Where each job gets a cgroup holding `memory_bytes` and `max_processes` for the whole job
    /// (not per process): set at start-up when the worker can create them. `None` by default:
    /// rlimits only.
    pub cgroups: Option<JobCgroups>,
}

/// One job to run: what to execute, inside which view of the filesystem.
#[derive(Debug, Clone, Copy)]
pub struct SandboxJob<'a> {
    /// Absolute path of the program as seen inside the sandbox (e.g. the client's rustc path,
    /// which lies under the toolchain's mount path).
    pub program: &'a str,
    /// The program's arguments, passed through untouched.
    pub args: &'a [String],
    /// Absolute working directory inside the sandbox; it must exist there (normally inside the
    /// tree).
    pub cwd: &'a str,
    /// The only environment the job sees (plus `PWD`, which bwrap sets to `cwd`): the sandbox
    /// starts from an empty one, so nothing of the worker's (tokens, paths) leaks in.
    pub env: &'a [(String, String)],
    /// The unpacked toolchain on the host and the absolute path to mount it at, read-only.
    /// Mounted after the tree, so it is visible even when its mount path lies under a tree
    /// directory (bwrap then creates the mount point's directories in the tree).
    pub toolchain: (&'a Path, &'a str),
    /// The job's file tree on the host: a file meant to be at `/a/b/c` inside is at
    /// `<tree>/a/b/c`. Every top-level entry must be a real directory and is bound read-write at
    /// `/<name>`; names of system directories are refused.
    pub tree: &'a Path,
    /// More host files bound into the sandbox (the observer's library and log), after the tree.
    pub binds: &'a [Bind<'a>],
}

/// One host file or directory bound into the sandbox.
#[derive(Debug, Clone, Copy)]
pub struct Bind<'a> {
    pub host: &'a Path,
    /// Absolute path inside the sandbox.
    pub inside: &'a str,
    pub writable: bool,
}

/// Which of the job's output streams a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// A resource limit that ended a job.
///
/// How each is recognised:
/// - `Cpu`: the job died of SIGXCPU (the soft `RLIMIT_CPU`), or of a SIGKILL we did not send
///   after running at least `cpu_secs` of wall-clock time (the hard limit, reached when SIGXCPU
///   is ignored). The job's CPU time cannot be measured from here — bwrap's pid 1 reaps it and
///   bwrap exits without reaping pid 1, so no rusage reaches us — hence a heuristic: a SIGKILL
///   from the kernel's OOM killer, or one the job sent itself, after that long is reported as
///   `Cpu` too, and a multi-threaded job that reaches the hard limit sooner is reported without
///   a limit.
/// - `FileSize`: the job died of SIGXFSZ.
/// - `Memory`: the job failed and its cgroup counts an OOM kill (the whole job reached
///   `memory.max`), or its stderr says `memory allocation of N bytes failed` (Rust's
///   allocation-failure message, followed by an abort) or `Cannot allocate memory` (ENOMEM):
///   `RLIMIT_AS` makes allocations fail rather than killing anything, so there is no signal.
/// - `Processes`: the job failed and its cgroup counts a fork refused at `pids.max`, or its stderr
///   says `Resource temporarily unavailable` (EAGAIN, what fork, spawn and thread creation fail
///   with over `RLIMIT_NPROC`). A heuristic: another EAGAIN that made the job fail is reported
///   the same way.
/// - `Disk`: the job failed and its stderr says `No space left on device` (ENOSPC: its tmpfs).
/// - `WallClock`: we killed the job because it ran out of wall-clock time.
///
/// The stderr clues are only read when the job failed, and only decide which limit to report,
/// never whether the job failed; a job that prints them on purpose only mislabels its own failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    Cpu,
    Memory,
    FileSize,
    Processes,
    WallClock,
    /// The job's directory (a tmpfs of `disk_bytes`) or its `/tmp` is full.
    Disk,
    /// Not a limit: the job's client went away, and the job was killed at once to free its slot.
    Abandoned,
}

/// How a job ended. bwrap passes a job's death by signal N on as exit code 128 + N, so such jobs
/// show `exit_code: Some(128 + N)`; `signal` is set only when bwrap itself was killed (the wall
/// clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SandboxOutcome {
    /// bwrap's exit code, which is the job's (or 128 + the signal that killed the job).
    pub exit_code: Option<i32>,
    /// The signal that killed bwrap, when it was killed.
    pub signal: Option<i32>,
    /// The limit that ended the job, when one did.
    pub limit: Option<Limit>,
    /// From starting bwrap to its exit.
    pub duration: Duration,
}

/// Why a job could not be run. These are the worker's problems (or a malformed job), never the
/// compile's: the caller reports them as infrastructure failures, not as compile errors.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("bubblewrap '{}' not found; install bubblewrap or set the worker's bwrap path", path.display())]
    BwrapNotFound { path: PathBuf },
    #[error("cannot start bubblewrap '{}': {source}", path.display())]
    Spawn { path: PathBuf, source: io::Error },
    /// bwrap started but could not build the sandbox (or exec the program); the job never ran.
    /// `message` is bwrap's own (`bwrap: ...`), which was not passed to `on_output`.
    #[error("bubblewrap could not set up the sandbox: {message}")]
    Setup { message: String },
    #[error("cannot run jobs as uid {uid} gid {gid}: only a root worker can switch users")]
    RunAsNeedsRoot { uid: u32, gid: u32 },
    #[error("the job's {what} must be an absolute path, got '{value}'")]
    NotAbsolute { what: &'static str, value: String },
    #[error("the job's {what} contains a NUL byte: '{value}'")]
    NulByte { what: &'static str, value: String },
    #[error("environment variable '{name}' cannot be passed: {reason}")]
    BadEnv { name: String, reason: &'static str },
    #[error("tree entry '{name}' would shadow the system directory '/{name}'")]
    ReservedName { name: String },
    #[error("tree entry '{}' is a symlink; only real directories are bound", path.display())]
    SymlinkInTree { path: PathBuf },
    #[error("tree entry '{}' is not a directory", path.display())]
    NotADirectory { path: PathBuf },
    #[error("toolchain '{}' is not a directory", path.display())]
    ToolchainNotADirectory { path: PathBuf },
    #[error("a toolchain at '{path}' would hide the worker's own /usr: under /usr only /usr/local can hold one")]
    ToolchainUnderUsr { path: String },
    #[error("the job tree holds '{}': under /usr a job may bring files into /usr/local only", path.display())]
    UsrOutsideLocal { path: PathBuf },
    #[error("cannot {action} '{}': {source}", path.display())]
    Io { action: &'static str, path: PathBuf, source: io::Error },
    #[error("lost track of the sandboxed process: {0}")]
    Monitor(#[source] io::Error),
    #[error("cannot create the job's cgroup: {0}")]
    Cgroup(#[source] io::Error),
}

/// Runs `job` in the sandbox and waits for it, passing its stdout and stderr to `on_output` as
/// they arrive (the caller forwards rustc's artifact notifications before the compile ends).
///
/// A job that fails — compile error, crash, limit — is an `Ok` outcome; `Err` means the job was
/// refused before anything ran or the sandbox itself failed.
pub fn run(
    config: &SandboxConfig,
    job: &SandboxJob,
    on_output: &mut dyn FnMut(Stream, &[u8]),
) -> Result<SandboxOutcome, SandboxError> {
    run_until(config, job, on_output, &|| false)
}

/// [`run`], killing the job as soon as `abandoned` says its client went away (asked at least
/// every [`ABANDON_CHECK`]); the outcome then has [`Limit::Abandoned`].
pub fn run_until(
    config: &SandboxConfig,
    job: &SandboxJob,
    on_output: &mut dyn FnMut(Stream, &[u8]),
    abandoned: &dyn Fn() -> bool,
) -> Result<SandboxOutcome, SandboxError> {
    let bwrap = find_bwrap(&config.bwrap)?;
    let args = command_line(config, job)?;
    // Only root can switch users; anyone may "switch" to themselves.
    let switch_to = match config.run_as {
        Some(ids) if is_root() => Some(ids),
        // SAFETY: geteuid and getegid have no preconditions and cannot fail.
        Some(ids) if ids == unsafe { (libc::geteuid(), libc::getegid()) } => None,
        Some((uid, gid)) => return Err(SandboxError::RunAsNeedsRoot { uid, gid }),
        None => None,
    };
    if let Some((uid, gid)) = switch_to {
        chown_tree(job.tree, uid, gid)?;
    }

    let mut command = Command::new(&bwrap);
    command.args(&args).env_clear().stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // Its own process group, so the wall clock can kill bwrap and whatever shares the group.
    command.process_group(0);
    let limits = Rlimits::new(config);
    // Created before bwrap starts, removed (anything left in it killed) when this returns.
    let group = match &config.cgroups {
        Some(groups) => Some(
            groups
                .create(GroupLimits { memory_bytes: config.memory_bytes, processes: config.max_processes })
                .map_err(SandboxError::Cgroup)?,
        ),
        None => None,
    };
    let group_fds = group.as_ref().map_or([-1; 3], JobGroup::procs_fds);
    // SAFETY: the closure runs between fork and exec; it only makes async-signal-safe system
    // calls (setrlimit, write, setgroups, setgid, setuid, prctl) on values prepared before the
    // fork, and does not allocate.
    unsafe {
        command.pre_exec(move || {
            JobGroup::enter(&group_fds)?;
            limits.enter(switch_to)
        });
    }
    tracing::debug!(bwrap = %bwrap.display(), args = ?args, run_as = ?config.run_as, "starting sandbox");

    let start = Instant::now();
    let mut child = command.spawn().map_err(|source| SandboxError::Spawn { path: bwrap.clone(), source })?;
    let mut process = Process { pid: child.id() as libc::pid_t, reaped: false };
    let stdout: OwnedFd = child.stdout.take().expect("stdout is piped").into();
    let stderr: OwnedFd = child.stderr.take().expect("stderr is piped").into();
    // From here on `process` owns the child: dropping it early kills and reaps bwrap.
    drop(child);

    // A wall clock too long to represent is no wall clock at all.
    let deadline = start.checked_add(config.wall_clock).unwrap_or_else(|| start + Duration::from_secs(1 << 40));
    let mut watch = Watch::new(deadline, abandoned);
    let (gate, clues) = pump(&mut process, &mut watch, [stdout, stderr], on_output)?;
    let status = process.reap(&mut watch).map_err(SandboxError::Monitor)?;
    let duration = start.elapsed();
    let (exit_code, signal) = if libc::WIFEXITED(status) {
        (Some(libc::WEXITSTATUS(status)), None)
    } else if libc::WIFSIGNALED(status) {
        (None, Some(libc::WTERMSIG(status)))
    } else {
        (None, None)
    };
    if let Some(message) = gate.finish(exit_code, on_output) {
        return Err(SandboxError::Setup { message });
    }
    let limit = if watch.abandoned {
        Some(Limit::Abandoned)
    } else if watch.killed {
        Some(Limit::WallClock)
    } else {
        // The group's counters are facts, and come before the heuristics.
        match &group {
            Some(g) if exit_code != Some(0) && g.oom_killed() => Some(Limit::Memory),
            Some(g) if exit_code != Some(0) && g.pids_exhausted() => Some(Limit::Processes),
            _ => classify(exit_code, signal, duration, config.cpu_secs, &clues),
        }
    };
    drop(group);
    tracing::debug!(?exit_code, ?signal, ?limit, ?duration, "sandbox finished");
    Ok(SandboxOutcome { exit_code, signal, limit, duration })
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            bwrap: PathBuf::from("bwrap"),
            run_as: if is_root() { Some((NOBODY, NOBODY)) } else { None },
            cpu_secs: 600,
            memory_bytes: 8 << 30,
            file_size_bytes: 1 << 30,
            max_processes: 4096,
            wall_clock: Duration::from_secs(600),
            disk_bytes: 4 << 30,
            disk_quota: false,
            want_cgroups: true,
            cgroups: None,
        }
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Limit::Cpu => "cpu time",
            Limit::Memory => "memory",
            Limit::FileSize => "file size",
            Limit::Processes => "processes",
            Limit::WallClock => "wall-clock time",
            Limit::Disk => "disk space",
            Limit::Abandoned => "client gone",
        })
    }
}

/// Passes the job's output to `on_output` as it arrives until both pipes close (or the wall clock
/// ran out and the drain grace too); returns what stderr said.
fn pump(
    process: &mut Process,
    watch: &mut Watch,
    [stdout, stderr]: [OwnedFd; 2],
    on_output: &mut dyn FnMut(Stream, &[u8]),
) -> Result<(StderrGate, Clues), SandboxError> {
    let mut gate = StderrGate::Deciding(Vec::new());
    let mut clues = Clues::default();
    let mut pipes = [Some((Stream::Stdout, fs::File::from(stdout))), Some((Stream::Stderr, fs::File::from(stderr)))];
    let mut buf = vec![0u8; 64 * 1024];
    while pipes.iter().any(Option::is_some) {
        let Some(timeout) = watch.remaining(process) else {
            break; // killed, and the grace period for draining the pipes is over
        };
        let mut fds = pipes.each_ref().map(|pipe| libc::pollfd {
            fd: pipe.as_ref().map_or(-1, |(_, file)| file.as_raw_fd()),
            events: libc::POLLIN,
            revents: 0,
        });
        let timeout_ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs for the whole call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if n < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(SandboxError::Monitor(error));
        }
        for (slot, fd) in pipes.iter_mut().zip(&fds) {
            let Some((stream, file)) = slot else { continue };
            if fd.revents == 0 {
                continue;
            }
            match file.read(&mut buf) {
                Ok(0) => *slot = None,
                Ok(n) if *stream == Stream::Stdout => on_output(Stream::Stdout, &buf[..n]),
                Ok(n) => {
                    clues.feed(&buf[..n]);
                    gate.feed(&buf[..n], on_output);
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(SandboxError::Monitor(error)),
            }
        }
    }
    Ok((gate, clues))
}

/// uid and gid of `nobody`, the default user of a root worker's jobs.
const NOBODY: u32 = 65534;

/// Top-level tree names that would hide (or be hidden by) the sandbox's own system directories.
/// Top-level names a job tree may not use. `tmp` is allowed: projects often live under /tmp, and
/// then the job's own `tmp` replaces the sandbox's private tmpfs.
const RESERVED: &[&str] = &["lib", "lib64", "bin", "sbin", "etc", "proc", "dev", "sys", "run", "boot"];

/// The one place under `/usr` a job may bring files (projects and `CARGO_HOME` in the official
/// Rust container image, toolchains installed there): grafted onto the host's, see [`graft`].
pub const USR_LOCAL: &str = "/usr/local";

/// Host paths mirrored into the sandbox as the host has them: a symlink stays the same symlink, a
/// directory is bound read-only, a missing one is skipped.
const MIRRORED: &[&str] = &["/lib", "/lib64", "/bin", "/sbin"];

/// How long to keep reading the pipes after the wall-clock kill: everything inside dies with
/// bwrap, so they close at once unless something is badly wrong.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// bwrap's own error messages start with this (and it then exits with 1).
const BWRAP_PREFIX: &[u8] = b"bwrap: ";

/// At most this much stderr is held back while deciding whether it is bwrap's own message.
const HOLD_LIMIT: usize = 16 * 1024;

impl SandboxConfig {
    /// True when jobs run as a user other than the worker's (a root worker with `run_as`): such a
    /// job cannot write or chmod the worker's read-only files, so its inputs may be hard links.
    pub fn jobs_run_as_another_user(&self) -> bool {
        self.run_as.is_some_and(|(uid, _)| is_root() && uid != 0)
    }
}

pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

pub(crate) fn find_bwrap(configured: &Path) -> Result<PathBuf, SandboxError> {
    let not_found = || SandboxError::BwrapNotFound { path: configured.to_path_buf() };
    if configured.components().count() > 1 || configured.is_absolute() {
        return if configured.is_file() { Ok(configured.to_path_buf()) } else { Err(not_found()) };
    }
    let path = std::env::var_os("PATH").ok_or_else(not_found)?;
    std::env::split_paths(&path).map(|dir| dir.join(configured)).find(|p| p.is_file()).ok_or_else(not_found)
}

/// bwrap's arguments for `job`, after checking the job; nothing is started.
fn command_line(config: &SandboxConfig, job: &SandboxJob) -> Result<Vec<OsString>, SandboxError> {
    absolute("program", job.program)?;
    absolute("working directory", job.cwd)?;
    absolute("toolchain mount path", job.toolchain.1)?;
    for arg in job.args {
        no_nul("argument", arg)?;
    }
    for (name, value) in job.env {
        let reason = if name.is_empty() {
            Some("the name is empty")
        } else if name.contains('=') {
            Some("the name contains '='")
        } else if name.contains('\0') || value.contains('\0') {
            Some("it contains a NUL byte")
        } else {
            None
        };
        if let Some(reason) = reason {
            return Err(SandboxError::BadEnv { name: name.clone(), reason });
        }
    }
    let (toolchain_dir, toolchain_mount) = job.toolchain;
    if !toolchain_dir.is_dir() {
        return Err(SandboxError::ToolchainNotADirectory { path: toolchain_dir.to_path_buf() });
    }
    let tree = tree_entries(job.tree)?;
    if tree.iter().any(|(name, _)| name == "usr") {
        for entry in fs::read_dir(job.tree.join("usr")).map_err(|source| SandboxError::Io {
            action: "list the job tree",
            path: job.tree.join("usr"),
            source,
        })? {
            let entry =
                entry.map_err(|source| SandboxError::Io { action: "list", path: job.tree.join("usr"), source })?;
            if entry.file_name() != "local" {
                return Err(SandboxError::UsrOutsideLocal { path: entry.path() });
            }
        }
    }

    let mut args: Vec<OsString> = Vec::new();
    let mut push = |items: &[&OsStr]| args.extend(items.iter().map(|s| s.to_os_string()));
    let os = |s: &'static str| OsStr::new(s);
    for flag in [
        "--unshare-user",
        "--disable-userns",
        "--unshare-pid",
        "--unshare-net",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--die-with-parent",
        "--new-session",
        "--clearenv",
    ] {
        push(&[os(flag)]);
    }
    for (name, value) in job.env {
        push(&[os("--setenv"), name.as_ref(), value.as_ref()]);
    }
    let tmp_size = config.file_size_bytes.to_string();
    push(&[os("--hostname"), os("ferry-sandbox"), os("--proc"), os("/proc"), os("--dev"), os("/dev")]);
    if !tree.iter().any(|(name, _)| name == "tmp") {
        push(&[os("--size"), tmp_size.as_ref(), os("--tmpfs"), os("/tmp")]);
    }
    push(&[os("--ro-bind"), os("/usr"), os("/usr")]);
    // What the job brings under /usr/local (its tree's `usr/local`, a toolchain installed there)
    // joins what the host has there; everything else of /usr is the host's.
    let tree_usr_local = job.tree.join("usr/local");
    let toolchain_under_usr = Path::new(toolchain_mount).starts_with("/usr");
    let mut read_only_after = Vec::new();
    if tree_usr_local.exists() || toolchain_under_usr {
        if !Path::new(toolchain_mount).starts_with(USR_LOCAL) && toolchain_under_usr {
            return Err(SandboxError::ToolchainUnderUsr { path: toolchain_mount.to_owned() });
        }
        let mut extra = Vec::new();
        if toolchain_under_usr {
            extra.push(Graft {
                inside: PathBuf::from(toolchain_mount),
                host: toolchain_dir.to_path_buf(),
                writable: false,
            });
        }
        let tree = tree_usr_local.is_dir().then_some(tree_usr_local.as_path());
        graft(Path::new(USR_LOCAL), Some(Path::new(USR_LOCAL)), tree, &extra, &mut args, &mut read_only_after)?;
    }
    let mut push = |items: &[&OsStr]| args.extend(items.iter().map(|s| s.to_os_string()));
    for dir in MIRRORED {
        match fs::symlink_metadata(dir) {
            Ok(meta) if meta.file_type().is_symlink() => {
                let target = fs::read_link(dir).map_err(|source| SandboxError::Io {
                    action: "read the link",
                    path: dir.into(),
                    source,
                })?;
                push(&[os("--symlink"), target.as_os_str(), os(dir)]);
            }
            Ok(meta) if meta.is_dir() => push(&[os("--ro-bind"), os(dir), os(dir)]),
            _ => {}
        }
    }
    for (name, host) in &tree {
        if name == "usr" {
            continue; // grafted above
        }
        let mut inside = OsString::from("/");
        inside.push(name);
        push(&[os("--bind"), host.as_os_str(), &inside]);
    }
    if !toolchain_under_usr {
        push(&[os("--ro-bind"), toolchain_dir.as_os_str(), toolchain_mount.as_ref()]);
    }
    for bind in job.binds {
        absolute("bind mount path", bind.inside)?;
        let flag = if bind.writable { os("--bind") } else { os("--ro-bind") };
        push(&[flag, bind.host.as_os_str(), bind.inside.as_ref()]);
    }
    for dir in &read_only_after {
        push(&[os("--remount-ro"), dir.as_os_str()]);
    }
    push(&[os("--remount-ro"), os("/")]);
    push(&[os("--chdir"), job.cwd.as_ref(), os("--"), job.program.as_ref()]);
    args.extend(job.args.iter().map(OsString::from));
    Ok(args)
}

fn absolute(what: &'static str, value: &str) -> Result<(), SandboxError> {
    no_nul(what, value)?;
    if Path::new(value).is_absolute() {
        Ok(())
    } else {
        Err(SandboxError::NotAbsolute { what, value: value.to_owned() })
    }
}

fn no_nul(what: &'static str, value: &str) -> Result<(), SandboxError> {
    if value.contains('\0') {
        return Err(SandboxError::NulByte { what, value: value.replace('\0', "\\0") });
    }
    Ok(())
}

/// A host path to mount at `inside`, among those a [`graft`] places.
#[derive(Debug)]
struct Graft {
    inside: PathBuf,
    host: PathBuf,
    writable: bool,
}

/// Makes `inside` (a directory that exists in the sandbox so far, inside a read-only bind) the
/// union of the host's directory `host`, the job tree's `tree` and the `extra` mounts beneath it:
/// a tmpfs at `inside`, each entry the tree has bound from the tree whole (the job's own: the
/// host's entry of that name, if any, is hidden), each entry only the host has bound back
/// read-only (a symlink recreated), and each extra mount bound where it goes (through the host's
/// directories, grafted the same way, when one lies beneath them). The tmpfs directories are added
/// to `read_only_after`, to be remounted read-only once every mount is in place. So a project in
/// `/usr/local/src/app` or a toolchain in `/usr/local/rustup` appears at its client path, and the
/// rest of the host's `/usr/local` stays as it is.
fn graft(
    inside: &Path,
    host: Option<&Path>,
    tree: Option<&Path>,
    extra: &[Graft],
    args: &mut Vec<OsString>,
    read_only_after: &mut Vec<PathBuf>,
) -> Result<(), SandboxError> {
    let list = |dir: &Path| -> Result<BTreeMap<OsString, fs::Metadata>, SandboxError> {
        let io_error = |source| SandboxError::Io { action: "list", path: dir.to_path_buf(), source };
        let mut entries = BTreeMap::new();
        for entry in fs::read_dir(dir).map_err(io_error)? {
            let entry = entry.map_err(io_error)?;
            entries.insert(entry.file_name(), fs::symlink_metadata(entry.path()).map_err(io_error)?);
        }
        Ok(entries)
    };
    let host_entries = match host {
        Some(h) if h.is_dir() => list(h)?,
        _ => BTreeMap::new(),
    };
    let tree_entries = match tree {
        Some(t) => list(t)?,
        None => BTreeMap::new(),
    };
    let mut names: BTreeSet<OsString> = host_entries.keys().chain(tree_entries.keys()).cloned().collect();
    for g in extra {
        if let Some(first) = g.inside.strip_prefix(inside).ok().and_then(|rest| rest.components().next()) {
            names.insert(first.as_os_str().to_owned());
        }
    }
    args.extend([OsString::from("--tmpfs"), inside.as_os_str().to_owned()]);
    read_only_after.push(inside.to_path_buf());
    let bind = |args: &mut Vec<OsString>, source: &Path, at: &Path, writable: bool| {
        let flag = if writable { "--bind" } else { "--ro-bind" };
        args.extend([OsString::from(flag), source.as_os_str().to_owned(), at.as_os_str().to_owned()]);
    };
    for name in names {
        let at = inside.join(&name);
        let beneath: Vec<&Graft> = extra.iter().filter(|g| g.inside.starts_with(&at)).collect();
        if let Some(g) = beneath.iter().find(|g| g.inside == at) {
            bind(args, &g.host, &at, g.writable);
            continue;
        }
        if let Some(meta) = tree_entries.get(&name) {
            let source = tree.expect("listed").join(&name);
            if meta.file_type().is_symlink() {
                return Err(SandboxError::SymlinkInTree { path: source });
            }
            // bwrap makes the mount points of the extra mounts inside the tree's directory.
            bind(args, &source, &at, true);
            for g in beneath {
                bind(args, &g.host, &g.inside, g.writable);
            }
            continue;
        }
        match host_entries.get(&name) {
            Some(meta) if meta.is_dir() && !beneath.is_empty() => {
                let below: Vec<Graft> = beneath
                    .iter()
                    .map(|g| Graft { inside: g.inside.clone(), host: g.host.clone(), writable: g.writable })
                    .collect();
                graft(&at, Some(&host.expect("listed").join(&name)), None, &below, args, read_only_after)?;
            }
            Some(meta) if meta.file_type().is_symlink() => {
                let target = fs::read_link(host.expect("listed").join(&name)).map_err(|source| SandboxError::Io {
                    action: "read the link",
                    path: at.clone(),
                    source,
                })?;
                args.extend([OsString::from("--symlink"), target.into_os_string(), at.into_os_string()]);
            }
            Some(_) => bind(args, &host.expect("listed").join(&name), &at, false),
            // Only extra mounts go here: bwrap makes the directories on the way in the tmpfs.
            None => {
                for g in beneath {
                    bind(args, &g.host, &g.inside, g.writable);
                }
            }
        }
    }
    Ok(())
}

/// The tree's top-level directories as (name, host path), sorted; refuses symlinks, files and
/// reserved names.
fn tree_entries(tree: &Path) -> Result<Vec<(OsString, PathBuf)>, SandboxError> {
    let io_error = |source| SandboxError::Io { action: "list the job tree", path: tree.to_path_buf(), source };
    let mut entries = Vec::new();
    for entry in fs::read_dir(tree).map_err(io_error)? {
        let entry = entry.map_err(io_error)?;
        let name = entry.file_name();
        let path = entry.path();
        if RESERVED.iter().any(|r| OsStr::new(r) == name) {
            return Err(SandboxError::ReservedName { name: name.to_string_lossy().into_owned() });
        }
        // Not following links: a top-level symlink would bind whatever it points at on the host.
        let meta = fs::symlink_metadata(&path).map_err(|source| SandboxError::Io {
            action: "inspect",
            path: path.clone(),
            source,
        })?;
        if meta.file_type().is_symlink() {
            return Err(SandboxError::SymlinkInTree { path });
        }
        if !meta.is_dir() {
            return Err(SandboxError::NotADirectory { path });
        }
        entries.push((name, path));
    }
    entries.sort();
    Ok(entries)
}

/// Gives the tree's directories (the root included, so the job's user can reach it and create its
/// outputs) to uid/gid, without following any link. Files stay the worker's: they may be hard links
/// to its blob store, which the job must not be able to change.
fn chown_tree(tree: &Path, uid: u32, gid: u32) -> Result<(), SandboxError> {
    let mut pending = vec![tree.to_path_buf()];
    while let Some(dir) = pending.pop() {
        lchown(&dir, Some(uid), Some(gid)).map_err(|source| SandboxError::Io {
            action: "chown",
            path: dir.clone(),
            source,
        })?;
        let io_error = |source| SandboxError::Io { action: "list", path: dir.clone(), source };
        for entry in fs::read_dir(&dir).map_err(io_error)? {
            let entry = entry.map_err(io_error)?;
            // Not following links: a symlink to a directory is not a directory here.
            if entry.file_type().map_err(io_error)?.is_dir() {
                pending.push(entry.path());
            }
        }
    }
    Ok(())
}

/// The rlimits for bwrap and everything it starts, prepared before the fork.
#[derive(Debug, Clone, Copy)]
struct Rlimits {
    cpu: libc::rlimit,
    memory: libc::rlimit,
    file_size: libc::rlimit,
    processes: libc::rlimit,
}

impl Rlimits {
    fn new(config: &SandboxConfig) -> Self {
        let both = |n: u64| libc::rlimit { rlim_cur: n as libc::rlim_t, rlim_max: n as libc::rlim_t };
        Rlimits {
            cpu: libc::rlimit {
                rlim_cur: config.cpu_secs as libc::rlim_t,
                rlim_max: config.cpu_secs.saturating_add(5) as libc::rlim_t,
            },
            memory: both(config.memory_bytes),
            file_size: both(config.file_size_bytes),
            processes: both(config.max_processes),
        }
    }

    /// In the forked child, before exec: sets the limits, drops to `run_as` (groups first: after
    /// setuid we could no longer), and asks for SIGKILL if the worker thread that started us
    /// dies (setuid clears that setting, so it comes last).
    fn enter(&self, run_as: Option<(u32, u32)>) -> io::Result<()> {
        fn check(ret: libc::c_int) -> io::Result<()> {
            if ret == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
        }
        // SAFETY (all calls): plain system calls on valid pointers to local values.
        unsafe {
            check(libc::setrlimit(libc::RLIMIT_CPU, &self.cpu))?;
            check(libc::setrlimit(libc::RLIMIT_AS, &self.memory))?;
            check(libc::setrlimit(libc::RLIMIT_FSIZE, &self.file_size))?;
            check(libc::setrlimit(libc::RLIMIT_NPROC, &self.processes))?;
            if let Some((uid, gid)) = run_as {
                check(libc::setgroups(0, std::ptr::null()))?;
                check(libc::setgid(gid))?;
                check(libc::setuid(uid))?;
            }
            check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0))?;
        }
        Ok(())
    }
}

/// bwrap's process, until reaped; dropping it unreaped (an early error) kills and reaps it.
struct Process {
    pid: libc::pid_t,
    reaped: bool,
}

impl Process {
    fn kill(&self) {
        // SAFETY: plain system call. bwrap leads its own process group, and the pid (hence the
        // group id) cannot be reused before we reap it.
        unsafe { libc::kill(-self.pid, libc::SIGKILL) };
    }

    /// Waits for bwrap to exit, still enforcing the wall clock (a job may close its pipes and run
    /// on); returns the wait status.
    fn reap(&mut self, watch: &mut Watch) -> io::Result<libc::c_int> {
        let mut pause = Duration::from_millis(1);
        loop {
            let mut status = 0;
            // SAFETY: plain system call on our own child, writing through a valid pointer.
            let ret = unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG) };
            if ret == self.pid {
                self.reaped = true;
                return Ok(status);
            }
            if ret < 0 {
                let error = io::Error::last_os_error();
                if error.kind() != io::ErrorKind::Interrupted {
                    return Err(error);
                }
            }
            if watch.remaining(self).is_none() {
                // Past the grace period after a SIGKILL: only an unkillable bwrap gets here.
                pause = Duration::from_millis(50);
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if !self.reaped {
            self.kill();
            let mut status = 0;
            // SAFETY: plain system call on our own child.
            unsafe { libc::waitpid(self.pid, &mut status, 0) };
        }
    }
}

/// The wall clock: time left before the kill, then a grace period to drain the pipes.
struct Watch<'a> {
    deadline: Instant,
    killed: bool,
    /// Asked between waits: the job's client is gone.
    gone: &'a dyn Fn() -> bool,
    abandoned: bool,
}

/// How often a running job's client is checked for.
pub const ABANDON_CHECK: Duration = Duration::from_millis(200);

impl<'a> Watch<'a> {
    fn new(deadline: Instant, gone: &'a dyn Fn() -> bool) -> Self {
        Watch { deadline, killed: false, gone, abandoned: false }
    }

    /// Time left to wait (at most [`ABANDON_CHECK`]); kills the process group when the deadline
    /// passes or the client is gone (once), and answers `None` when the grace period after the
    /// kill is over too.
    fn remaining(&mut self, process: &mut Process) -> Option<Duration> {
        let now = Instant::now();
        if !self.killed && (self.gone)() {
            tracing::debug!(pid = process.pid, "the job's client is gone, killing the sandbox");
            self.abandoned = true;
            self.deadline = now;
        }
        if now < self.deadline {
            return Some((self.deadline - now).min(ABANDON_CHECK));
        }
        if self.killed {
            return None;
        }
        tracing::debug!(pid = process.pid, "wall clock expired, killing the sandbox");
        process.kill();
        self.killed = true;
        self.deadline = now + DRAIN_GRACE;
        Some(DRAIN_GRACE)
    }
}

/// Holds back the start of stderr when it looks like bwrap's own error message, so a sandbox
/// that failed to start is reported as [`SandboxError::Setup`] rather than as the job's output.
enum StderrGate {
    /// Fewer bytes than the prefix seen yet.
    Deciding(Vec<u8>),
    /// Starts with bwrap's prefix: held until the exit code tells.
    Holding(Vec<u8>),
    Passing,
}

impl StderrGate {
    fn feed(&mut self, chunk: &[u8], on_output: &mut dyn FnMut(Stream, &[u8])) {
        match self {
            StderrGate::Passing => on_output(Stream::Stderr, chunk),
            StderrGate::Deciding(held) | StderrGate::Holding(held) => {
                held.extend_from_slice(chunk);
                if held.len() < BWRAP_PREFIX.len() {
                    return;
                }
                if held.starts_with(BWRAP_PREFIX) && held.len() <= HOLD_LIMIT {
                    *self = StderrGate::Holding(std::mem::take(held));
                } else {
                    on_output(Stream::Stderr, held);
                    *self = StderrGate::Passing;
                }
            }
        }
    }

    /// At the end: bwrap's message when it failed (exit 1 after `bwrap: `), otherwise the held
    /// bytes go to `on_output`.
    fn finish(self, exit_code: Option<i32>, on_output: &mut dyn FnMut(Stream, &[u8])) -> Option<String> {
        match self {
            StderrGate::Holding(held) if exit_code == Some(1) => {
                let text = String::from_utf8_lossy(&held);
                Some(text.trim_end().to_owned())
            }
            StderrGate::Holding(held) | StderrGate::Deciding(held) => {
                if !held.is_empty() {
                    on_output(Stream::Stderr, &held);
                }
                None
            }
            StderrGate::Passing => None,
        }
    }
}

/// What the job's stderr said about failed allocations and forks, searched across chunk
/// boundaries without keeping the stream.
#[derive(Default)]
struct Clues {
    memory: bool,
    processes: bool,
    disk: bool,
    /// The end of the previous chunks, long enough to hold any clue cut in two.
    carry: Vec<u8>,
}

impl Clues {
    const CARRY: usize = 96;

    fn feed(&mut self, chunk: &[u8]) {
        let mut window = std::mem::take(&mut self.carry);
        window.extend_from_slice(chunk);
        self.memory |= allocation_failed(&window) || contains(&window, b"Cannot allocate memory");
        self.processes |= contains(&window, b"Resource temporarily unavailable");
        self.disk |= contains(&window, b"No space left on device");
        let keep = window.len().min(Self::CARRY);
        window.drain(..window.len() - keep);
        self.carry = window;
    }
}

/// Rust's message when an allocation fails: `memory allocation of N bytes failed`.
fn allocation_failed(text: &[u8]) -> bool {
    const HEAD: &[u8] = b"memory allocation of ";
    const TAIL: &[u8] = b" bytes failed";
    let mut rest = text;
    while let Some(at) = find(rest, HEAD) {
        let after = &rest[at + HEAD.len()..];
        let digits = after.iter().take_while(|b| b.is_ascii_digit()).count();
        if digits > 0 && after[digits..].starts_with(TAIL) {
            return true;
        }
        rest = after;
    }
    false
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    find(haystack, needle).is_some()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Which limit ended a job that was not killed by the wall clock; see [`Limit`].
fn classify(
    exit_code: Option<i32>,
    signal: Option<i32>,
    duration: Duration,
    cpu_secs: u64,
    clues: &Clues,
) -> Option<Limit> {
    if exit_code == Some(0) {
        return None;
    }
    // The job's death by signal reaches us as bwrap's exit code 128 + N; bwrap's own as a signal.
    let died_of = signal.or(exit_code.filter(|c| (129..=128 + 64).contains(c)).map(|c| c - 128));
    match died_of {
        Some(libc::SIGXCPU) => return Some(Limit::Cpu),
        Some(libc::SIGXFSZ) => return Some(Limit::FileSize),
        Some(libc::SIGKILL) if duration >= Duration::from_secs(cpu_secs) => return Some(Limit::Cpu),
        _ => {}
    }
    if clues.memory {
        Some(Limit::Memory)
    } else if clues.processes {
        Some(Limit::Processes)
    } else if clues.disk {
        Some(Limit::Disk)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clues(chunks: &[&str]) -> Clues {
        let mut clues = Clues::default();
        for chunk in chunks {
            clues.feed(chunk.as_bytes());
        }
        clues
    }

    #[test]
    fn clues_are_found_across_chunk_boundaries() {
        let memory = clues(&["error: rustc: memory alloc", "ation of 1073741824 by", "tes failed\n"]);
        assert!(memory.memory && !memory.processes);
        let disk = clues(&["error: could not write output to /job/out/x.o: No space left ", "on device (os error 28)"]);
        assert!(disk.disk && !disk.memory);
        assert_eq!(classify(Some(1), None, Duration::ZERO, 2, &disk), Some(Limit::Disk));
        assert_eq!(classify(Some(0), None, Duration::ZERO, 2, &disk), None);
        let processes = clues(&["spawn: Resource tempor", "arily unavailable (os error 11)"]);
        assert!(processes.processes && !processes.memory);
        let neither = clues(&["memory allocation of many bytes failed", "Resource temporarily"]);
        assert!(!neither.memory && !neither.processes);
    }

    #[test]
    fn signals_are_read_in_both_forms() {
        let none = Clues::default();
        let secs = Duration::from_secs;
        assert_eq!(classify(Some(128 + libc::SIGXCPU), None, secs(0), 2, &none), Some(Limit::Cpu));
        assert_eq!(classify(None, Some(libc::SIGXFSZ), secs(0), 2, &none), Some(Limit::FileSize));
        assert_eq!(classify(Some(137), None, secs(3), 2, &none), Some(Limit::Cpu));
        assert_eq!(classify(Some(137), None, secs(1), 2, &none), None);
        assert_eq!(classify(Some(0), None, secs(9), 2, &clues(&["Resource temporarily unavailable"])), None);
        assert_eq!(
            classify(Some(101), None, secs(0), 2, &clues(&["Resource temporarily unavailable"])),
            Some(Limit::Processes)
        );
    }

    #[test]
    fn bwrap_messages_are_held_back_only_when_bwrap_failed() {
        let run = |chunks: &[&str], exit: i32| {
            let mut seen = Vec::new();
            let mut gate = StderrGate::Deciding(Vec::new());
            let mut sink = |_: Stream, b: &[u8]| seen.extend_from_slice(b);
            for chunk in chunks {
                gate.feed(chunk.as_bytes(), &mut sink);
            }
            let error = gate.finish(Some(exit), &mut sink);
            (String::from_utf8(seen).unwrap(), error)
        };
        assert_eq!(run(&["bwr", "ap: Can't chdir\n"], 1), (String::new(), Some("bwrap: Can't chdir".to_owned())));
        assert_eq!(run(&["bwrap: pretend\n"], 0), ("bwrap: pretend\n".to_owned(), None));
        assert_eq!(run(&["war", "ning: x\n"], 1), ("warning: x\n".to_owned(), None));
        assert_eq!(run(&["w"], 1), ("w".to_owned(), None));
    }
}
