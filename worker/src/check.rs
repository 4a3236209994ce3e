//! The worker's start-up check: before it registers, a worker proves it can run jobs by running
//! one trial job in a real sandbox, and prepares its data directory. A worker that cannot run jobs
//! must not register (every job sent to it would fail and cost a client a fallback), so a failed
//! check is one line naming the cause and the fix, and the daemon exits non-zero.
//!
//! What is checked, in order: bubblewrap is on `PATH` (or where configured) and is 0.8.0 or later
//! (`--disable-userns`); the data directory and every directory above it can be traversed by the
//! user jobs run as; a trial job (`/bin/sh` writing a file in its tree) runs, which needs user
//! namespaces. Whether a cgroup per job and a tmpfs per job directory are usable is reported (and
//! set up, see [`crate::limits`]), not required.
//!
//! `--check-config` runs the same checks without lasting effects ([`check_without_effects`]): the
//! data directory is probed, not created or chmodded, and the trial job runs in a temporary
//! directory that is removed afterwards.

use std::fmt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::limits::{JobCgroups, disk_quota_usable};
use crate::sandbox::{self, SandboxConfig, SandboxError, SandboxJob};

/// The oldest bubblewrap with every flag the sandbox passes (`--disable-userns` came in 0.8.0).
pub const MIN_BWRAP: (u32, u32, u32) = (0, 8, 0);

/// Why this worker cannot run jobs, and what the operator can do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckFailed {
    /// What is wrong, e.g. `bubblewrap (bwrap) is not installed`.
    pub cause: String,
    /// What to do, e.g. `install it: apt-get install bubblewrap`.
    pub fix: String,
}

/// What the check found on a worker that can run jobs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckReport {
    /// bubblewrap's path and version.
    pub bwrap: PathBuf,
    pub bwrap_version: String,
    /// The cgroup version jobs get a group in ("v2", "v1"), or why they get none (then only
    /// per-process rlimits apply).
    pub cgroups: Result<&'static str, String>,
    /// Where job groups are made, after [`self_check`] set them up; `None` from
    /// `--check-config` and when `cgroups` is an error.
    pub job_cgroups: Option<JobCgroups>,
    /// Whether each job directory can be its own tmpfs of `sandbox.disk_bytes`, or why not.
    pub disk_quota: Result<(), String>,
}

impl CheckReport {
    /// `config` with the limits this check found usable turned on.
    pub fn apply(&self, config: &SandboxConfig) -> SandboxConfig {
        SandboxConfig {
            cgroups: self.job_cgroups.clone(),
            disk_quota: self.disk_quota.is_ok() && config.disk_bytes > 0,
            ..config.clone()
        }
    }
}

impl fmt::Display for CheckFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}; {}", self.cause, self.fix)
    }
}

impl std::error::Error for CheckFailed {}

/// Prepares `data_dir` (created, its job and toolchain directories traversable by the job user)
/// and runs a trial job in the sandbox. Takes about as long as one bwrap start (milliseconds).
pub fn self_check(sandbox: &SandboxConfig, data_dir: &Path) -> Result<CheckReport, CheckFailed> {
    let (bwrap, version) = find_bwrap(sandbox)?;
    prepare_data_dir(data_dir).map_err(|e| CheckFailed {
        cause: format!("cannot prepare the data directory {}: {e}", data_dir.display()),
        fix: "pick a writable --data-dir (or data_dir in the config)".into(),
    })?;
    if let Some((uid, _)) = sandbox.run_as.filter(|_| sandbox.jobs_run_as_another_user()) {
        traversable_by(uid, &data_dir.join("jobs"))?;
    }
    let job_cgroups = match sandbox.want_cgroups {
        true => JobCgroups::setup(),
        false => Err("turned off (sandbox.cgroups = false)".to_owned()),
    };
    let mut report = CheckReport {
        bwrap,
        bwrap_version: version,
        cgroups: job_cgroups.as_ref().map(JobCgroups::version).map_err(Clone::clone),
        job_cgroups: job_cgroups.ok(),
        disk_quota: disk_quota_usable(&data_dir.join("jobs")),
    };
    // The trial job runs in its cgroup, as real jobs will.
    if let Err(failed) = trial_run(&report.apply(sandbox), data_dir) {
        if report.job_cgroups.is_none() {
            return Err(failed);
        }
        // Jobs can run, just not in a cgroup here: say so, and run them without.
        trial_run(sandbox, data_dir)?;
        report.cgroups = Err(format!("a trial job in a cgroup failed: {failed}"));
        report.job_cgroups = None;
    }
    Ok(report)
}

/// [`self_check`] for `--check-config`, leaving nothing behind: bubblewrap and its version; the
/// data directory writable (a probe file made and removed) or, when missing, creatable (its first
/// missing directory made and removed), and the directories above it traversable by the job user
/// (a start makes the data directory itself traversable); a trial job run in a temporary
/// directory instead of the data directory; whether cgroup v2 is usable.
pub(crate) fn check_without_effects(sandbox: &SandboxConfig, data_dir: &Path) -> Result<CheckReport, CheckFailed> {
    let (bwrap, version) = find_bwrap(sandbox)?;
    let data_dir = std::path::absolute(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    ferry_proto::daemon::check_writable_dir(&data_dir).map_err(|cause| CheckFailed {
        cause: format!("cannot use the data directory {}: {cause}", data_dir.display()),
        fix: "pick a writable --data-dir (or data_dir in the config; under systemd: StateDirectory= or \
              ReadWritePaths=)"
            .into(),
    })?;
    if let (Some((uid, _)), Some(parent)) =
        (sandbox.run_as.filter(|_| sandbox.jobs_run_as_another_user()), data_dir.parent())
    {
        traversable_by(uid, parent)?;
    }
    // A name nobody can make in a shared /tmp first (prepare_data_dir makes it).
    let scratch = std::env::temp_dir().join(ferry_cache::unpredictable_name("ferry-worker-check-"));
    let trial = prepare_data_dir(&scratch)
        .map_err(|e| CheckFailed {
            cause: format!("cannot make a scratch directory {} for a trial job: {e}", scratch.display()),
            fix: "set TMPDIR to a writable directory".into(),
        })
        .and_then(|()| trial_run(sandbox, &scratch));
    let _ = std::fs::remove_dir_all(&scratch);
    trial?;
    Ok(CheckReport {
        bwrap,
        bwrap_version: version,
        cgroups: match sandbox.want_cgroups {
            true => JobCgroups::probe(),
            false => Err("turned off (sandbox.cgroups = false)".to_owned()),
        },
        job_cgroups: None,
        disk_quota: if sandbox::is_root() { Ok(()) } else { Err("mounting a tmpfs needs root (CAP_SYS_ADMIN)".into()) },
    })
}

/// Creates the data directory and the directories jobs must reach, mode 0711 (traversable,
/// not listable, by the job user).
pub fn prepare_data_dir(data_dir: &Path) -> std::io::Result<()> {
    for dir in [data_dir.to_path_buf(), data_dir.join("jobs"), data_dir.join("toolchains")] {
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711))?;
    }
    Ok(())
}

/// bubblewrap's path and its `--version`, which must be [`MIN_BWRAP`] or later.
fn find_bwrap(sandbox: &SandboxConfig) -> Result<(PathBuf, String), CheckFailed> {
    let bwrap = sandbox::find_bwrap(&sandbox.bwrap).map_err(|_| CheckFailed {
        cause: format!("bubblewrap ('{}') is not installed or not on PATH", sandbox.bwrap.display()),
        fix: "install it (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install bubblewrap)".into(),
    })?;
    let version = bwrap_version(&bwrap)?;
    Ok((bwrap, version))
}

fn bwrap_version(bwrap: &Path) -> Result<String, CheckFailed> {
    let out = Command::new(bwrap).arg("--version").output().map_err(|e| CheckFailed {
        cause: format!("cannot run bubblewrap '{}': {e}", bwrap.display()),
        fix: "reinstall bubblewrap".into(),
    })?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let found = parse_version(&text);
    match found {
        Some(v) if v >= MIN_BWRAP => Ok(text),
        _ => Err(CheckFailed {
            cause: format!(
                "bubblewrap '{}' says '{text}'; ferry needs {}.{}.{} or later (for --disable-userns)",
                bwrap.display(),
                MIN_BWRAP.0,
                MIN_BWRAP.1,
                MIN_BWRAP.2
            ),
            fix: "install a newer bubblewrap (Debian 12 and Ubuntu 24.04 have one)".into(),
        }),
    }
}

/// `bubblewrap 0.8.0` → (0, 8, 0).
fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    let number = text.split_whitespace().last()?;
    let mut parts = number.split('.').map(|p| p.parse::<u32>().ok());
    Some((parts.next()??, parts.next().flatten().unwrap_or(0), parts.next().flatten().unwrap_or(0)))
}

/// Every directory from `/` down to `dir` must be searchable by `uid`.
fn traversable_by(uid: u32, dir: &Path) -> Result<(), CheckFailed> {
    let mut path = PathBuf::from("/");
    for part in dir.components().skip(1) {
        path.push(part);
        let Ok(meta) = std::fs::metadata(&path) else { continue };
        let mode = meta.mode();
        let searchable = if meta.uid() == uid { mode & 0o100 != 0 } else { mode & 0o001 != 0 };
        if !searchable {
            return Err(CheckFailed {
                cause: format!(
                    "jobs run as uid {uid}, which cannot reach {}: {} has mode {:04o}",
                    dir.display(),
                    path.display(),
                    mode & 0o7777
                ),
                fix: format!(
                    "run 'chmod o+x {}' or choose a --data-dir whose parents others may traverse",
                    path.display()
                ),
            });
        }
    }
    Ok(())
}

/// Runs `/bin/sh` in the sandbox, writing a file into its tree, as a job would.
fn trial_run(config: &SandboxConfig, data_dir: &Path) -> Result<(), CheckFailed> {
    let dir = data_dir.join("jobs").join(format!("selfcheck-{}", std::process::id()));
    let tree = dir.join("tree");
    let toolchain = dir.join("toolchain");
    let failed = |cause: String, fix: &str| CheckFailed { cause, fix: fix.to_owned() };
    let made = std::fs::create_dir_all(tree.join("ferry-selfcheck"))
        .and_then(|()| std::fs::create_dir_all(&toolchain))
        .and_then(|()| std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711)))
        .and_then(|()| std::fs::set_permissions(&toolchain, std::fs::Permissions::from_mode(0o755)));
    if let Err(e) = made {
        let _ = std::fs::remove_dir_all(&dir);
        return Err(failed(format!("cannot create {}: {e}", dir.display()), "check the data directory's permissions"));
    }
    let args = ["-c".to_owned(), "echo ok > /ferry-selfcheck/probe".to_owned()];
    let env = [("PATH".to_owned(), "/usr/bin:/bin".to_owned())];
    let job = SandboxJob {
        program: "/bin/sh",
        args: &args,
        cwd: "/ferry-selfcheck",
        env: &env,
        toolchain: (&toolchain, "/ferry-selfcheck-toolchain"),
        tree: &tree,
        binds: &[],
    };
    let mut output = Vec::new();
    let outcome = sandbox::run(config, &job, &mut |_, data| output.extend_from_slice(data));
    let wrote = std::fs::read_to_string(tree.join("ferry-selfcheck/probe")).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    match outcome {
        Ok(o) if o.exit_code == Some(0) && wrote.trim() == "ok" => Ok(()),
        Ok(o) => Err(failed(
            format!(
                "a trial job in the sandbox failed (exit {:?}, signal {:?}): {}",
                o.exit_code,
                o.signal,
                String::from_utf8_lossy(&output).trim()
            ),
            "run the worker with FERRY_LOG=debug to see the bwrap command line",
        )),
        Err(SandboxError::Setup { message }) => Err(setup_failure(&message)),
        Err(e) => {
            Err(failed(format!("a trial job in the sandbox could not start: {e}"), "check the bubblewrap install"))
        }
    }
}

/// bwrap's own message, turned into a cause and a fix.
fn setup_failure(message: &str) -> CheckFailed {
    let lower = message.to_ascii_lowercase();
    // The kernel lets a user namespace mount a fresh /proc only when nothing covers part of the
    // worker's own: systemd's ProtectKernelTunables=, ProtectKernelLogs=, ProtectProc= and
    // ProcSubset=, and a container's masked /proc paths, all do.
    let fix = if lower.contains("mount proc") {
        "leave the worker's /proc uncovered: under systemd remove ProtectKernelTunables=, ProtectKernelLogs=, \
         ProtectProc= and ProcSubset= from its unit; in a container run it with --privileged (or without masked \
         /proc paths)"
    } else if lower.contains("namespace") || lower.contains("uid map") || lower.contains("operation not permitted") {
        "allow unprivileged user namespaces (sysctl -w kernel.unprivileged_userns_clone=1 and \
         user.max_user_namespaces=15000; Ubuntu 24.04+: kernel.apparmor_restrict_unprivileged_userns=0; in a \
         container: run it with --privileged or a seccomp profile that allows clone(CLONE_NEWUSER))"
    } else if lower.contains("permission denied") || lower.contains("can't chdir") || lower.contains("can't find") {
        "make the data directory and its parents traversable by the job user (chmod o+x), or choose another --data-dir"
    } else {
        "run the worker with FERRY_LOG=debug to see the bwrap command line"
    };
    CheckFailed { cause: format!("the sandbox cannot start: {message}"), fix: fix.into() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_and_messages() {
        assert_eq!(parse_version("bubblewrap 0.8.0"), Some((0, 8, 0)));
        assert_eq!(parse_version("bubblewrap 0.11.1"), Some((0, 11, 1)));
        assert_eq!(parse_version("bubblewrap 0.4"), Some((0, 4, 0)));
        assert_eq!(parse_version("garbage"), None);
        assert!(parse_version("bubblewrap 0.6.2").unwrap() < MIN_BWRAP);
        let ns = setup_failure(
            "bwrap: No permissions to creating new namespace, likely because the kernel does not allow non-privileged user namespaces.",
        );
        assert!(ns.fix.contains("user namespaces"), "{ns}");
        let proc = setup_failure("bwrap: Can't mount proc on /newroot/proc: Operation not permitted");
        assert!(proc.fix.contains("ProtectKernelTunables="), "{proc}");
        let perm = setup_failure("bwrap: Can't chdir to /x: Permission denied");
        assert!(perm.fix.contains("chmod o+x"), "{perm}");
    }

    #[test]
    fn an_untraversable_parent_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let closed = dir.path().join("closed");
        std::fs::create_dir_all(closed.join("data/jobs")).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
        let err = traversable_by(65534, &closed.join("data/jobs")).unwrap_err();
        assert!(err.cause.contains(&format!("{} has mode 0700", closed.display())), "{err}");
        assert!(err.fix.contains(&format!("chmod o+x {}", closed.display())), "{err}");
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o711)).unwrap();
        assert_eq!(traversable_by(65534, &closed.join("data/jobs")), Ok(()));
    }
}
