//! Limits that hold for a whole job rather than per process: a cgroup per job (`memory`,
//! `pids`, `cpu` weight) and a size-limited tmpfs under the job's tree.
//!
//! rlimits (see [`crate::sandbox`]) bind one process each: sixteen processes of 1 GiB get past an
//! 8 GiB `RLIMIT_AS`, and `RLIMIT_FSIZE` bounds one file, not a thousand. A job's cgroup holds the
//! total of everything it starts, and the tmpfs holds the total it writes.
//!
//! **cgroups.** cgroup v2 is preferred: the worker needs the `memory` and `pids` controllers in
//! its own group (under systemd, `Delegate=yes`). v2's rule that a group with processes has no
//! controlled children is met by moving the worker into a leaf `ferry-worker` first (only the
//! worker: a group shared with other processes is not the worker's to rearrange). Hosts that still mount the v1 controllers (hybrid hierarchies: older distributions,
//! some container hosts; this is where the `memory` controller lives when v2 has none) get the same
//! limits through v1's per-controller directories. Job groups are named
//! `ferry-job-<worker pid>-<n>`; groups of a worker that died are removed at the next start.
//! bwrap enters the job's group between fork and exec (it writes `0` to `cgroup.procs` through a
//! descriptor opened before the fork), so everything the job starts is inside from its first
//! instruction; `--unshare-cgroup-try` then makes that group the job's cgroup root.
//!
//! **Disk.** When the worker may mount (root), what a job writes lands on a tmpfs of
//! `sandbox.disk_bytes`: its tree is an overlay of that tmpfs over the placed inputs (hard links
//! into the blob store, as without a limit, so the inputs cost neither a copy nor the limit; a
//! job that changes one gets its own copy, against the limit). A first version put the whole job
//! directory on a tmpfs, which meant copying every input: 0.1x of a plain build slower in `bench
//! distributed`. The tmpfs pages the job writes are charged to its memory group, so
//! `memory_bytes` bounds tree and processes together. A job that fills it fails with ENOSPC,
//! reported as [`crate::Limit::Disk`].

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// cgroup v2 `cpu.weight` of every job (v1: `cpu.shares` 1024, the same share): concurrent jobs
/// get equal CPU, and one job's threads cannot starve another job.
pub const JOB_CPU_WEIGHT: u64 = 100;

/// Where this worker creates a cgroup per job, found (and prepared) once at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobCgroups {
    kind: Kind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    /// Job groups are children of `parent`, the worker's own group, with `memory`, `pids` (and
    /// `cpu` when `cpu`) enabled in its `cgroup.subtree_control`.
    V2 { parent: PathBuf, cpu: bool },
    /// One parent per controller hierarchy.
    V1 { memory: PathBuf, pids: PathBuf, cpu: Option<PathBuf> },
}

/// What one job may use in total.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupLimits {
    /// `memory.max` (v1 `memory.limit_in_bytes`): processes plus tmpfs pages they wrote.
    pub memory_bytes: u64,
    /// `pids.max`: processes and threads.
    pub processes: u64,
}

/// One job's cgroup, removed (its processes killed first) when dropped.
#[derive(Debug)]
pub struct JobGroup {
    dirs: Vec<PathBuf>,
    v2: bool,
    /// `cgroup.procs` of each directory, open for writing before the fork.
    procs: Vec<File>,
}

impl JobCgroups {
    /// Finds the worker's own cgroup and prepares it for job groups: cgroup v2 with the `memory`
    /// and `pids` controllers, else the v1 `memory` and `pids` hierarchies. Err says, for each
    /// version, why it cannot be used. Removes job groups left by workers that died.
    pub fn setup() -> Result<JobCgroups, String> {
        let found = Found::read().map_err(|e| format!("reading /proc/self/mountinfo and /proc/self/cgroup: {e}"))?;
        let v2 = match found.v2_dir() {
            Some(dir) => match setup_v2(&dir) {
                Ok(kind) => return Ok(JobCgroups { kind }),
                Err(e) => e,
            },
            None => "not mounted".to_owned(),
        };
        match setup_v1(&found) {
            Ok(kind) => Ok(JobCgroups { kind }),
            Err(v1) => Err(format!("cgroup v2: {v2}; cgroup v1: {v1}")),
        }
    }

    /// Like [`setup`](Self::setup) but without effects (for `--check-config`): which version
    /// would be used, or why none can be.
    pub fn probe() -> Result<&'static str, String> {
        let found = Found::read().map_err(|e| format!("reading /proc/self/mountinfo and /proc/self/cgroup: {e}"))?;
        let v2 = match found.v2_dir() {
            Some(dir) => match controllers_v2(&dir) {
                Ok(_) if writable(&dir) => return Ok("v2"),
                Ok(_) => format!("{} is not writable by this user", dir.display()),
                Err(e) => e,
            },
            None => "not mounted".to_owned(),
        };
        match (found.v1_dir("memory"), found.v1_dir("pids")) {
            (Some(m), Some(p)) if writable(&m) && writable(&p) => Ok("v1"),
            (Some(_), Some(_)) => Err(format!("cgroup v2: {v2}; cgroup v1: not writable by this user")),
            _ => Err(format!("cgroup v2: {v2}; cgroup v1: the memory and pids controllers are not mounted")),
        }
    }

    /// "v2" or "v1", for logs and `--check-config`.
    pub fn version(&self) -> &'static str {
        match self.kind {
            Kind::V2 { .. } => "v2",
            Kind::V1 { .. } => "v1",
        }
    }

    /// Creates a group for one job with `limits`.
    pub fn create(&self, limits: GroupLimits) -> io::Result<JobGroup> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!("ferry-job-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let mut group = JobGroup { dirs: Vec::new(), v2: matches!(self.kind, Kind::V2 { .. }), procs: Vec::new() };
        let mut make = |parent: &Path| -> io::Result<PathBuf> {
            let dir = parent.join(&name);
            fs::create_dir(&dir)?;
            group.dirs.push(dir.clone());
            Ok(dir)
        };
        match &self.kind {
            Kind::V2 { parent, cpu } => {
                let dir = make(parent)?;
                write(&dir.join("memory.max"), limits.memory_bytes)?;
                // No swap either, where swap is accounted: the limit means memory.
                let _ = write(&dir.join("memory.swap.max"), 0);
                write(&dir.join("pids.max"), limits.processes)?;
                if *cpu {
                    write(&dir.join("cpu.weight"), JOB_CPU_WEIGHT)?;
                }
            }
            Kind::V1 { memory, pids, cpu } => {
                let dir = make(memory)?;
                write(&dir.join("memory.limit_in_bytes"), limits.memory_bytes)?;
                let dir = make(pids)?;
                write(&dir.join("pids.max"), limits.processes)?;
                if let Some(cpu) = cpu {
                    let dir = make(cpu)?;
                    write(&dir.join("cpu.shares"), JOB_CPU_WEIGHT * 1024 / 100)?;
                }
            }
        }
        for dir in &group.dirs {
            group.procs.push(OpenOptions::new().write(true).open(dir.join("cgroup.procs"))?);
        }
        Ok(group)
    }
}

impl JobGroup {
    /// Descriptors of the group's `cgroup.procs` files (-1 where there is none), for
    /// [`enter`](Self::enter) in a forked child.
    pub fn procs_fds(&self) -> [RawFd; 3] {
        let mut fds = [-1; 3];
        for (slot, file) in fds.iter_mut().zip(&self.procs) {
            *slot = file.as_raw_fd();
        }
        fds
    }

    /// Moves the calling process into the group. Async-signal-safe (one `write` per descriptor),
    /// for use between fork and exec.
    pub fn enter(fds: &[RawFd; 3]) -> io::Result<()> {
        for &fd in fds.iter().filter(|&&fd| fd >= 0) {
            // SAFETY: a plain system call on a descriptor the parent keeps open, with a static buffer.
            if unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) } != 1 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// Whether the kernel's OOM killer killed a process of this group (it reached `memory.max`).
    pub fn oom_killed(&self) -> bool {
        let file = if self.v2 { "memory.events" } else { "memory.oom_control" };
        self.dirs.iter().any(|dir| counter(&dir.join(file), "oom_kill").is_some_and(|n| n > 0))
    }

    /// Whether a fork or thread creation failed because the group reached `pids.max`.
    pub fn pids_exhausted(&self) -> bool {
        self.dirs.iter().any(|dir| counter(&dir.join("pids.events"), "max").is_some_and(|n| n > 0))
    }
}

impl Drop for JobGroup {
    fn drop(&mut self) {
        for dir in &self.dirs {
            empty_and_remove(dir);
        }
    }
}

/// A job's directory. With a size limit, what the job writes lands on its own tmpfs of that size:
/// the inputs are placed in `lower/` (hard links into the blob store, as without a limit), the
/// job's tree is an overlay of a tmpfs (`limit/upper`) over them, so writes — new files, and
/// copies of inputs the job changes — count against the limit while the inputs cost nothing.
/// Without a limit the inputs are placed in the tree itself. Dropping it unmounts both and
/// removes the directory with everything in it.
#[derive(Debug)]
pub struct JobDir {
    dir: PathBuf,
    limited: bool,
    sealed: bool,
}

impl JobDir {
    /// Creates `dir`, and when `bytes` is `Some` mounts a tmpfs of that size (and an inode limit
    /// of one per 4 KiB) at `dir/limit`. Mounting needs `CAP_SYS_ADMIN`; a directory whose path
    /// holds `,`, `:` or `\\` cannot be named in overlay options and is refused.
    pub fn create(dir: &Path, bytes: Option<u64>) -> io::Result<JobDir> {
        fs::create_dir_all(dir)?;
        let mut job_dir = JobDir { dir: dir.to_owned(), limited: false, sealed: false };
        if let Some(bytes) = bytes {
            if dir.as_os_str().as_bytes().iter().any(|b| matches!(b, b',' | b':' | b'\\')) {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, "a ',', ':' or '\\' in the path"));
            }
            let limit = dir.join("limit");
            fs::create_dir(&limit)?;
            mount_tmpfs(&limit, bytes)?;
            job_dir.limited = true;
            fs::create_dir(limit.join("upper"))?;
            fs::create_dir(limit.join("work"))?;
            fs::create_dir(dir.join("lower"))?;
        }
        Ok(job_dir)
    }

    /// Where the inputs are placed, before [`seal`](Self::seal).
    pub fn inputs(&self) -> PathBuf {
        self.dir.join(if self.limited { "lower" } else { "tree" })
    }

    /// The job's tree: where it runs and writes, and where its outputs are read after
    /// [`seal`](Self::seal).
    pub fn tree(&self) -> PathBuf {
        self.dir.join("tree")
    }

    /// Where the job's other files go (the observer's log): on the limited tmpfs when there is one.
    pub fn scratch(&self) -> PathBuf {
        if self.limited { self.dir.join("limit") } else { self.dir.clone() }
    }

    /// The inputs are placed: with a limit, mounts the tree as the overlay over them (the inputs
    /// must not change while it is mounted; nothing but the job writes there from now on).
    pub fn seal(&mut self) -> io::Result<()> {
        if !self.limited || self.sealed {
            return Ok(());
        }
        let tree = self.tree();
        fs::create_dir_all(&tree)?;
        let limit = self.dir.join("limit");
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            self.inputs().display(),
            limit.join("upper").display(),
            limit.join("work").display()
        );
        mount("overlay", &tree, "overlay", &options)?;
        self.sealed = true;
        Ok(())
    }
}

impl Drop for JobDir {
    fn drop(&mut self) {
        if self.sealed {
            unmount(&self.tree());
        }
        if self.limited {
            unmount(&self.dir.join("limit"));
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Whether this process can give job directories a size limit: it makes one in `scratch` (which
/// must exist), places an input, seals it and writes over the input in the tree. Err is the reason.
pub fn disk_quota_usable(scratch: &Path) -> Result<(), String> {
    let probe = scratch.join(format!(".ferry-quota-probe-{}", std::process::id()));
    let trial = || -> io::Result<()> {
        let mut job_dir = JobDir::create(&probe, Some(1 << 20))?;
        fs::write(job_dir.inputs().join("input"), "input")?;
        job_dir.seal()?;
        fs::write(job_dir.tree().join("input"), "written by the job")?;
        match fs::read_to_string(job_dir.inputs().join("input"))?.as_str() {
            "input" => Ok(()),
            _ => Err(io::Error::other("a write in the tree reached the input below it")),
        }
    };
    let result = trial().map_err(|e| match e.raw_os_error() {
        Some(libc::EPERM) => "mounting a tmpfs and an overlay needs root (CAP_SYS_ADMIN)".to_owned(),
        _ => format!("a size-limited job directory in {}: {e}", scratch.display()),
    });
    let _ = fs::remove_dir(&probe);
    result
}

/// Unmounts whatever is mounted at `dir` (lazily: a process still inside cannot keep it busy).
/// Errors are ignored: nothing mounted is the common case.
pub fn unmount(dir: &Path) {
    if let Ok(path) = CString::new(dir.as_os_str().as_bytes()) {
        // SAFETY: plain system call on a valid NUL-terminated path.
        unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
    }
}

fn mount_tmpfs(dir: &Path, bytes: u64) -> io::Result<()> {
    let inodes = (bytes / 4096).max(1024);
    mount("ferry-job", dir, "tmpfs", &format!("size={bytes},nr_inodes={inodes},mode=0755"))
}

/// mount(2), `nosuid,nodev`.
fn mount(source: &str, target: &Path, fstype: &str, options: &str) -> io::Result<()> {
    let invalid = |_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in a mount argument");
    let source = CString::new(source).map_err(invalid)?;
    let target = CString::new(target.as_os_str().as_bytes()).map_err(invalid)?;
    let fstype = CString::new(fstype).map_err(invalid)?;
    let options = CString::new(options).map_err(invalid)?;
    // SAFETY: plain system call; every pointer is a valid NUL-terminated string that outlives it.
    let ret = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            options.as_ptr().cast(),
        )
    };
    if ret == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// The mounts and this process's groups, as the kernel lists them.
struct Found {
    /// (root within the hierarchy, mount point, file system type, super options)
    mounts: Vec<(String, PathBuf, String, String)>,
    /// (controllers, path) from `/proc/self/cgroup`; v2's line has empty controllers.
    groups: Vec<(String, String)>,
}

impl Found {
    fn read() -> io::Result<Found> {
        let mounts = fs::read_to_string("/proc/self/mountinfo")?.lines().filter_map(parse_mountinfo).collect();
        let groups = fs::read_to_string("/proc/self/cgroup")?
            .lines()
            .filter_map(|l| {
                let mut parts = l.splitn(3, ':');
                let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
                Some((controllers.to_owned(), path.to_owned()))
            })
            .collect();
        Ok(Found { mounts, groups })
    }

    fn v2_dir(&self) -> Option<PathBuf> {
        let (_, path) = self.groups.iter().find(|(c, _)| c.is_empty())?;
        self.mounts.iter().filter(|m| m.2 == "cgroup2").find_map(|(root, point, _, _)| under(root, point, path))
    }

    fn v1_dir(&self, controller: &str) -> Option<PathBuf> {
        let (_, path) = self.groups.iter().find(|(c, _)| c.split(',').any(|c| c == controller))?;
        self.mounts
            .iter()
            .filter(|m| m.2 == "cgroup" && m.3.split(',').any(|o| o == controller))
            .find_map(|(root, point, _, _)| under(root, point, path))
    }
}

/// `<point>/<path relative to root>`, when the group lies inside the mounted part.
fn under(root: &str, point: &Path, path: &str) -> Option<PathBuf> {
    let rel = if root == "/" { path } else { path.strip_prefix(root)? };
    let dir = point.join(rel.trim_start_matches('/'));
    dir.is_dir().then_some(dir)
}

/// One line of `/proc/self/mountinfo`: `id parent dev root point opts [tags] - type source super`.
fn parse_mountinfo(line: &str) -> Option<(String, PathBuf, String, String)> {
    let (head, tail) = line.split_once(" - ")?;
    let head: Vec<&str> = head.split(' ').collect();
    let tail: Vec<&str> = tail.split(' ').collect();
    let unescape = |s: &str| s.replace("\\040", " ");
    Some((
        unescape(head.get(3)?),
        PathBuf::from(unescape(head.get(4)?)),
        tail.first()?.to_string(),
        tail.get(2)?.to_string(),
    ))
}

fn controllers_v2(dir: &Path) -> Result<Vec<String>, String> {
    let list = fs::read_to_string(dir.join("cgroup.controllers")).map_err(|e| format!("{}: {e}", dir.display()))?;
    let list: Vec<String> = list.split_whitespace().map(str::to_owned).collect();
    for need in ["memory", "pids"] {
        if !list.iter().any(|c| c == need) {
            return Err(format!(
                "the {need} controller is not delegated to {} (it has: {}); under systemd set Delegate=yes",
                dir.display(),
                if list.is_empty() { "none".to_owned() } else { list.join(" ") }
            ));
        }
    }
    Ok(list)
}

fn setup_v2(dir: &Path) -> Result<Kind, String> {
    let controllers = controllers_v2(dir)?;
    let cpu = controllers.iter().any(|c| c == "cpu");
    let enable = if cpu { "+memory +pids +cpu" } else { "+memory +pids" };
    let control = dir.join("cgroup.subtree_control");
    if fs::write(&control, enable).is_err() {
        // A group with processes cannot have controlled children: move ours into a leaf.
        let leaf = dir.join("ferry-worker");
        match fs::create_dir(&leaf) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                return Err(format!("creating {}: {e}", leaf.display()));
            }
            _ => {}
        }
        // Only this process moves: other processes in the group (a shell it was started from)
        // are not ours to move, and then the group is not the worker's own.
        fs::write(leaf.join("cgroup.procs"), "0").map_err(|e| format!("moving into {}: {e}", leaf.display()))?;
        fs::write(&control, enable).map_err(|e| {
            format!(
                "enabling {enable} in {}: {e} (other processes share the worker's cgroup: run it in its own, \
                 e.g. as a systemd service with Delegate=yes)",
                control.display()
            )
        })?;
    }
    remove_stale(dir);
    let kind = Kind::V2 { parent: dir.to_owned(), cpu };
    trial(&kind)?;
    Ok(kind)
}

fn setup_v1(found: &Found) -> Result<Kind, String> {
    let (Some(memory), Some(pids)) = (found.v1_dir("memory"), found.v1_dir("pids")) else {
        return Err("the memory and pids controllers are not mounted".to_owned());
    };
    let cpu = found.v1_dir("cpu").filter(|d| writable(d));
    for dir in [Some(&memory), Some(&pids), cpu.as_ref()].into_iter().flatten() {
        remove_stale(dir);
    }
    let kind = Kind::V1 { memory, pids, cpu };
    trial(&kind)?;
    Ok(kind)
}

/// Creates and removes one job group: the parents are writable and the limits accepted.
fn trial(kind: &Kind) -> Result<(), String> {
    let groups = JobCgroups { kind: kind.clone() };
    groups
        .create(GroupLimits { memory_bytes: 1 << 30, processes: 64 })
        .map(drop)
        .map_err(|e| format!("creating a job group: {e}"))
}

fn writable(dir: &Path) -> bool {
    let Ok(path) = CString::new(dir.as_os_str().as_bytes()) else { return false };
    // SAFETY: plain system call on a valid NUL-terminated path.
    unsafe { libc::access(path.as_ptr(), libc::W_OK) == 0 }
}

/// Job groups in `parent` whose worker no longer runs.
fn remove_stale(parent: &Path) {
    let Ok(entries) = fs::read_dir(parent) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("ferry-job-")) else { continue };
        let Some(pid) = rest.split('-').next() else { continue };
        if !Path::new("/proc").join(pid).exists() {
            empty_and_remove(&entry.path());
        }
    }
}

/// Kills every process in the group, waits (at most a second) for it to empty, and removes it.
fn empty_and_remove(dir: &Path) {
    // v2 (5.14+) kills the whole group at once.
    let _ = fs::write(dir.join("cgroup.kill"), "1");
    for _ in 0..100 {
        let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        if procs.trim().is_empty() && fs::remove_dir(dir).is_ok() {
            return;
        }
        for pid in procs.split_whitespace().filter_map(|p| p.parse::<libc::pid_t>().ok()) {
            // SAFETY: plain system call.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    tracing::debug!(group = %dir.display(), "a job cgroup could not be removed");
}

fn write(path: &Path, value: u64) -> io::Result<()> {
    fs::write(path, value.to_string()).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

/// The value of `name` in a flat-keyed file such as `memory.events` (`oom_kill 1`).
fn counter(path: &Path, name: &str) -> Option<u64> {
    let text = fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_are_read() {
        let v2 = "35 24 0:30 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate";
        assert_eq!(
            parse_mountinfo(v2),
            Some(("/".into(), PathBuf::from("/sys/fs/cgroup"), "cgroup2".into(), "rw,nsdelegate".into()))
        );
        let v1 = "40 30 0:35 /docker/abc /sys/fs/cgroup/memory ro,nosuid - cgroup cgroup rw,memory";
        let parsed = parse_mountinfo(v1).unwrap();
        assert_eq!((parsed.0.as_str(), parsed.3.as_str()), ("/docker/abc", "rw,memory"));
        assert_eq!(parse_mountinfo("garbage"), None);
    }

    #[test]
    fn counters_are_read_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("memory.events");
        fs::write(&file, "low 0\nhigh 0\nmax 3\noom 1\noom_kill 2\noom_group_kill 0\n").unwrap();
        assert_eq!(counter(&file, "oom_kill"), Some(2));
        assert_eq!(counter(&file, "oom"), Some(1));
        assert_eq!(counter(&file, "max"), Some(3));
        assert_eq!(counter(&file, "nothing"), None);
    }

    /// As root: a job's tree is full when the job has written its limit (ENOSPC, what rustc then
    /// reports), whatever the size of its inputs, and dropping it leaves neither mount nor directory.
    #[test]
    fn a_job_dir_is_full_at_its_size_and_gone_after() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root");
            return;
        }
        let base = tempfile::tempdir().unwrap();
        assert_eq!(disk_quota_usable(base.path()), Ok(()));
        let dir = base.path().join("job");
        let mut job_dir = JobDir::create(&dir, Some(4 << 20)).unwrap();
        // Inputs cost nothing against the limit: they are below the job's writes.
        fs::write(job_dir.inputs().join("input"), vec![1u8; 6 << 20]).unwrap();
        job_dir.seal().unwrap();
        let tree = job_dir.tree();
        assert_eq!(fs::read(tree.join("input")).unwrap().len(), 6 << 20);
        fs::write(tree.join("small"), vec![1u8; 1 << 20]).unwrap();
        let err = fs::write(tree.join("big"), vec![1u8; 8 << 20]).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
        // Changing an input copies it up, against the limit, and leaves the one below alone.
        let err = fs::write(tree.join("input"), vec![2u8; 6 << 20]).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
        assert_eq!(fs::read(job_dir.inputs().join("input")).unwrap(), vec![1u8; 6 << 20]);
        drop(job_dir);
        assert!(!dir.exists());
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mounts.contains(dir.to_str().unwrap()), "still mounted: {mounts}");
    }

    /// As root on a host with cgroups (CI runs as root), a job group can be made, entered and
    /// removed, and its limits are the ones asked for.
    #[test]
    fn a_job_group_holds_its_limits() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root");
            return;
        }
        let groups = JobCgroups::setup().expect("cgroups usable as root");
        let group = groups.create(GroupLimits { memory_bytes: 64 << 20, processes: 7 }).unwrap();
        let limit = |name: &str| {
            group.dirs.iter().find_map(|d| fs::read_to_string(d.join(name)).ok()).map(|s| s.trim().to_owned())
        };
        assert_eq!(limit("pids.max").as_deref(), Some("7"));
        let memory = limit("memory.max").or_else(|| limit("memory.limit_in_bytes")).unwrap();
        assert_eq!(memory, (64u64 << 20).to_string());
        assert!(!group.oom_killed() && !group.pids_exhausted());
        let dirs = group.dirs.clone();
        drop(group);
        assert!(dirs.iter().all(|d| !d.exists()), "groups removed: {dirs:?}");
    }
}
