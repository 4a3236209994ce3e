//! Why a compile left the cached path, or why its result was not kept: one enum per kind, each
//! variant rendered once ([`Fallback::as_str`], [`NotStored::as_str`]) under the names
//! `ferry stats` counts, and explained once ([`explain`]) for `ferry stats` and the README's table.

use std::fmt;

/// An infrastructure problem that turned a cached or remote compile into a plain local one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fallback {
    /// The compiler cargo named could not be mapped to a toolchain.
    ToolchainUnresolved,
    /// The local toolchain store could not be opened.
    ToolchainStore,
    /// The compile targets a platform whose standard library is not installed.
    TargetNotInstalled,
    /// The toolchain could not be hashed.
    ToolchainIdentify,
    /// The local cache directory could not be opened.
    CacheUnavailable,
    /// An `--extern` file could not be read.
    ExternUnreadable,
    /// A cached output could not be written back.
    ReplayWriteFailed,
    /// The scheduler failed to answer recently: compiles stay local for a while.
    ClusterBackoff,
    /// A call to the scheduler or a worker failed.
    Call(Call, CallFailure),
    /// The scheduler answered "compile locally".
    Local(LocalReason),
    /// The toolchain is being uploaded in the background, or its upload failed recently.
    ToolchainUploading,
    ToolchainUploadFailed,
    /// The scheduler lacks the toolchain and this client's token may not upload it.
    ToolchainNotUploaded,
    ToolchainLock,
    /// The worker could not run the job (its own error, reported by it).
    WorkerError,
    /// The connection to the worker broke during the job.
    WorkerLost,
    /// The worker sent nothing for too long.
    WorkerSilent,
    /// A sandbox limit stopped the job.
    SandboxLimit,
    /// The remote compile failed (exit code, or a signal).
    RemoteExit(Option<i32>),
    /// The worker did not send every declared output.
    MissingOutput,
    /// The worker sent an output that was not declared, or one over the size cap: nothing of it
    /// is written.
    OutputRejected,
    /// An output sent by the worker could not be written here.
    OutputWriteFailed,
    /// What the remote compile observed differs from this machine (a file, a variable).
    RemoteInputsDiffer,
    /// The worker could not observe the whole job.
    RemoteObservationIncomplete,
    /// The worker's answer made no sense.
    WorkerBadAnswer,
    /// Gathering the job's inputs failed (too many, too large, unreadable).
    Inputs(&'static str),
    /// Local machinery failed (no async runtime).
    RuntimeUnavailable,
    /// The remote compile failed but the local one succeeded: a broken worker or a missing input.
    Discrepancy,
}

/// Which cluster call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Scheduler,
    HasToolchain,
    Allocate,
    Worker,
    FindMissing,
    UploadBlobs,
    RunJob,
}

/// How a cluster call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallFailure {
    Unreachable,
    Timeout,
    Refused,
    Unavailable,
    Failed,
}

/// The scheduler's reasons to say "compile locally" (`ferry.v1.LocalReason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalReason {
    NoWorkers,
    NoCapacity,
    ToolchainFetching,
    WorkersQuarantined,
}

/// A compile that ran but whose result was not kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotStored {
    KilledBySignal,
    /// rustc exit 1 (without `FERRY_CACHE_FAILURES=1`): includes build-script probes meant to fail.
    CompileError,
    InternalCompilerError,
    UnexpectedExitCode,
    /// The observation of the compile is incomplete (the reason says what it could not see).
    Unobserved(String),
    /// An input changed while the compile ran (or the compile changed it).
    InputsChangedDuringCompile,
    /// The compile left a file or directory outside its declared outputs, which a replay would not
    /// write (a proc-macro's side effect).
    WroteOutsideOutputs,
    /// A listed input cannot be read back.
    InputUnreadable,
    /// A declared output is missing.
    MissingOutput,
    CacheWriteFailed,
    TooManyInputLists,
    SharedTooManyInputLists,
    /// A C compile's output lock could not be taken (see `Job::output_lock`).
    OutputLock,
    /// A C-family source or header uses `__DATE__`, `__TIME__` or `__TIMESTAMP__` without
    /// `SOURCE_DATE_EPOCH`: its output depends on when it was compiled.
    TimeMacro,
}

impl Fallback {
    /// The name `ferry stats` counts it under.
    pub fn as_str(&self) -> String {
        match self {
            Fallback::ToolchainUnresolved => "toolchain-unresolved".into(),
            Fallback::ToolchainStore => "toolchain-store".into(),
            Fallback::TargetNotInstalled => "target-not-installed".into(),
            Fallback::ToolchainIdentify => "toolchain-identify".into(),
            Fallback::CacheUnavailable => "cache-unavailable".into(),
            Fallback::ExternUnreadable => "extern-unreadable".into(),
            Fallback::ReplayWriteFailed => "replay-write-failed".into(),
            Fallback::ClusterBackoff => "cluster-backoff".into(),
            Fallback::Call(call, how) => format!("{}-{}", call.as_str(), how.as_str()),
            Fallback::Local(reason) => reason.as_str().into(),
            Fallback::ToolchainUploading => "toolchain-uploading".into(),
            Fallback::ToolchainNotUploaded => "toolchain-not-uploaded".into(),
            Fallback::ToolchainUploadFailed => "toolchain-upload-failed".into(),
            Fallback::ToolchainLock => "toolchain-lock".into(),
            Fallback::WorkerError => "worker-error".into(),
            Fallback::WorkerLost => "worker-lost".into(),
            Fallback::WorkerSilent => "worker-silent".into(),
            Fallback::SandboxLimit => "sandbox-limit".into(),
            Fallback::RemoteExit(Some(code)) => format!("remote-exit-{code}"),
            Fallback::RemoteExit(None) => "remote-exit-signal".into(),
            Fallback::MissingOutput => "missing-output".into(),
            Fallback::OutputRejected => "output-rejected".into(),
            Fallback::OutputWriteFailed => "output-write-failed".into(),
            Fallback::RemoteInputsDiffer => "remote-inputs-differ".into(),
            Fallback::RemoteObservationIncomplete => "remote-observation-incomplete".into(),
            Fallback::WorkerBadAnswer => "worker-bad-answer".into(),
            Fallback::Inputs(what) => (*what).into(),
            Fallback::RuntimeUnavailable => "runtime-unavailable".into(),
            Fallback::Discrepancy => "discrepancy".into(),
        }
    }

    /// True when this means the scheduler itself did not answer (every wrapper then backs off).
    pub fn scheduler_down(&self) -> bool {
        matches!(
            self,
            Fallback::Call(Call::Scheduler, _)
                | Fallback::Call(Call::Allocate, CallFailure::Timeout)
                | Fallback::Call(Call::HasToolchain, CallFailure::Timeout)
        )
    }
}

impl fmt::Display for Fallback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.as_str())
    }
}

impl Call {
    fn as_str(self) -> &'static str {
        match self {
            Call::Scheduler => "scheduler",
            Call::HasToolchain => "has-toolchain",
            Call::Allocate => "allocate",
            Call::Worker => "worker",
            Call::FindMissing => "find-missing",
            Call::UploadBlobs => "upload-blobs",
            Call::RunJob => "run-job",
        }
    }
}

impl CallFailure {
    fn as_str(self) -> &'static str {
        match self {
            CallFailure::Unreachable => "unreachable",
            CallFailure::Timeout => "timeout",
            CallFailure::Refused => "refused",
            CallFailure::Unavailable => "unavailable",
            CallFailure::Failed => "failed",
        }
    }
}

impl Call {
    const ALL: [Call; 7] = [
        Call::Scheduler,
        Call::HasToolchain,
        Call::Allocate,
        Call::Worker,
        Call::FindMissing,
        Call::UploadBlobs,
        Call::RunJob,
    ];

    /// Whether the call goes to a worker (else to the scheduler).
    fn to_worker(self) -> bool {
        matches!(self, Call::Worker | Call::FindMissing | Call::UploadBlobs | Call::RunJob)
    }
}

impl CallFailure {
    const ALL: [CallFailure; 5] = [
        CallFailure::Unreachable,
        CallFailure::Timeout,
        CallFailure::Refused,
        CallFailure::Unavailable,
        CallFailure::Failed,
    ];
}

/// The call and failure a `Fallback::Call` name (`<call>-<failure>`) stands for.
fn call_failure(name: &str) -> Option<(Call, CallFailure)> {
    Call::ALL.into_iter().find_map(|call| {
        let how = name.strip_prefix(call.as_str())?.strip_prefix('-')?;
        CallFailure::ALL.into_iter().find(|f| f.as_str() == how).map(|f| (call, f))
    })
}

/// What to do about a failed cluster call.
fn explain_call(call: Call, how: CallFailure) -> &'static str {
    match how {
        CallFailure::Unreachable if call.to_worker() => {
            "no connection to the worker at the address it advertises: check the worker's 'advertise' (its \
             certificate must name that host: ferry-worker --check-config says), the firewall, and FERRY_LOG=debug here"
        }
        CallFailure::Unreachable => {
            "no connection to the scheduler: check FERRY_SCHEDULER (https:// for a TLS port), FERRY_CA for a private \
             CA, the network; FERRY_LOG=debug logs the error"
        }
        CallFailure::Refused => {
            "the scheduler or worker refused the call: a token that is missing, unknown or without the 'client' role \
             (FERRY_TOKEN; the scheduler's log names the peer), or a grant the worker does not accept"
        }
        CallFailure::Timeout => {
            "the call took longer than its deadline: an overloaded scheduler or worker, or a slow network"
        }
        CallFailure::Unavailable => {
            "the server said it is unavailable (restarting, or overloaded): transient; persistent ones show in its log"
        }
        CallFailure::Failed => "the call failed with an error the server sent: FERRY_LOG=debug logs it",
    }
}

impl LocalReason {
    fn as_str(self) -> &'static str {
        match self {
            LocalReason::NoWorkers => "no-workers",
            LocalReason::NoCapacity => "no-capacity",
            LocalReason::ToolchainFetching => "toolchain-fetching",
            LocalReason::WorkersQuarantined => "workers-quarantined",
        }
    }
}

impl NotStored {
    /// The name `ferry stats` counts it under.
    pub fn as_str(&self) -> String {
        match self {
            NotStored::KilledBySignal => "killed-by-signal".into(),
            NotStored::CompileError => "compile-error".into(),
            NotStored::InternalCompilerError => "internal-compiler-error".into(),
            NotStored::UnexpectedExitCode => "unexpected-exit-code".into(),
            NotStored::Unobserved(reason) => format!("unobserved: {reason}"),
            NotStored::InputsChangedDuringCompile => "inputs-changed-during-compile".into(),
            NotStored::WroteOutsideOutputs => "wrote-outside-outputs".into(),
            NotStored::InputUnreadable => "input-unreadable".into(),
            NotStored::MissingOutput => "missing-output".into(),
            NotStored::CacheWriteFailed => "cache-write-failed".into(),
            NotStored::TooManyInputLists => "too-many-input-lists".into(),
            NotStored::SharedTooManyInputLists => "shared-too-many-input-lists".into(),
            NotStored::TimeMacro => "time-macro".into(),
            NotStored::OutputLock => "output-lock".into(),
        }
    }
}

/// One line on what a counted reason means and what to do about it, by the name `ferry stats`
/// shows (`pass-through: ...`, `fallback: ...`, `not stored: ...`); None for names without one.
pub fn explain(kind: &str, name: &str) -> Option<&'static str> {
    if kind == "fallback"
        && let Some((call, how)) = call_failure(name)
    {
        return Some(explain_call(call, how));
    }
    let text = match (kind, name) {
        ("pass-through", "incremental") => {
            "cargo compiles workspace members incrementally in debug builds; set CARGO_INCREMENTAL=0 to cache them"
        }
        ("pass-through", "query") => "rustc -vV / --print: cargo's questions, nothing to cache",
        ("pass-through", "stdin-input") => "a source on stdin (cargo's probes): nothing to cache",
        ("pass-through", "multiple-inputs") => {
            "more than one source file: a wrapper in front of rustc that ferry cannot tell apart from rustc"
        }
        ("pass-through", "non-utf8-argument") => "an argument ferry cannot represent: rustc runs unchanged",
        ("pass-through", "output-not-regular") => {
            "an output path is a device, FIFO, socket or directory: rustc writes it itself"
        }
        ("pass-through", "unknown-flag") => "a rustc flag ferry does not know: never guessed at",
        ("fallback", "discrepancy") => {
            "the worker's compile failed where the local one succeeded: the worker's log has its stderr"
        }
        ("fallback", "remote-inputs-differ") => {
            "the worker saw another file or variable than this machine (learned now; sent next time)"
        }
        ("fallback", "toolchain-in-system-dir") => {
            "the compiler lives under /usr (a distribution's rustc): a worker cannot mount it without hiding its own \
             /usr; install a toolchain with rustup (or under /usr/local/<dir>) to distribute"
        }
        ("fallback", "project-in-system-dir") => {
            "the project is under /etc, /usr (other than /usr/local) or another system directory a worker has its own of"
        }
        ("fallback", "reads-whole-environment") => {
            "a proc-macro of this crate runs programs, which may read any variable: it compiles where the whole \
             environment is"
        }
        ("fallback", "cluster-backoff") => {
            "the scheduler failed to answer a moment ago: compiles stay local for FERRY_CLUSTER_BACKOFF seconds"
        }
        ("fallback", "no-workers") => "no worker is connected to the scheduler: see ferry status",
        ("fallback", "no-capacity") => {
            "every worker slot was busy past the scheduler's queue wait: add workers or slots"
        }
        ("fallback", "toolchain-fetching") => "the workers are still fetching this toolchain: the next builds use them",
        ("fallback", "toolchain-uploading") => {
            "this toolchain is being uploaded to the scheduler in the background: the next builds use the cluster"
        }
        ("fallback", "toolchain-not-uploaded") => {
            "the scheduler lacks this toolchain and this token may not upload it: a machine with the \
             'toolchain-upload' role (CI) runs ferry toolchain upload once per toolchain"
        }
        ("fallback", "toolchain-upload-failed") => {
            "the toolchain upload failed (a token without 'toolchain-upload', or the network): its log is in \
             <cache dir>/toolchains/; ask an operator to run ferry toolchain upload"
        }
        ("fallback", "worker-lost") => {
            "the connection to the worker broke during the job (it restarted, or the network)"
        }
        ("fallback", "worker-silent") => "the worker sent nothing for 15 minutes: see its log",
        ("fallback", "sandbox-limit") => {
            "a sandbox limit of the worker stopped the job: see ferry status and its [sandbox]"
        }
        ("fallback", "output-rejected" | "missing-output" | "worker-bad-answer") => {
            "the worker sent something not asked for, too much, or not all outputs: nothing of it was used; see its log"
        }
        ("fallback", "remote-observation-incomplete") => {
            "the worker could not observe the whole compile (a static program, a socket): it compiled here"
        }
        ("fallback", "workers-quarantined") => "every worker is quarantined after failing jobs: see ferry status",
        ("fallback", "worker-error") => "a worker could not run the job: see ferry status for its error",
        ("not stored", "compile-error") => {
            "rustc reported errors (build scripts' probes fail on purpose); FERRY_CACHE_FAILURES=1 caches them"
        }
        ("not stored", "inputs-changed-during-compile") => {
            "a file the compile read changed while it ran (or the compile rewrote it): its result may mix both"
        }
        ("not stored", "wrote-outside-outputs") => {
            "the compile (a proc-macro) wrote a file besides its outputs; a replay would not write it"
        }
        ("not stored", "output-lock") => {
            "the lock that keeps two compiles of one C object from storing a torn file could not be taken \
             (<cache dir>/locks/ not writable)"
        }
        ("not stored", "time-macro") => {
            "a C source or header uses __DATE__, __TIME__ or __TIMESTAMP__: set SOURCE_DATE_EPOCH to cache it"
        }
        ("pass-through", "unknown-option") => {
            "a C compiler option ferry does not know (FERRY_LOG=debug names it): the compile ran as it is"
        }
        ("not stored", "unobserved: exec-limit") => {
            "the command line and environment are so near the system's limit that the observer's variables \
             would not fit: the compile ran exactly as cargo asked"
        }
        ("not stored", r) if r.starts_with("unobserved") => {
            "part of the compile could not be observed (a static program, a dropped LD_PRELOAD): never cached"
        }
        _ => return None,
    };
    Some(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_failed_call_is_explained_and_only_those_as_calls() {
        for call in Call::ALL {
            for how in CallFailure::ALL {
                let name = Fallback::Call(call, how).as_str();
                assert_eq!(call_failure(&name), Some((call, how)), "{name}");
                assert!(explain("fallback", &name).is_some(), "{name}");
            }
        }
        assert!(explain("fallback", "worker-unreachable").unwrap().contains("advertise"));
        assert!(explain("fallback", "scheduler-unreachable").unwrap().contains("FERRY_SCHEDULER"));
        for local in ["cache-unavailable", "runtime-unavailable", "replay-write-failed", "toolchain-upload-failed"] {
            assert_eq!(call_failure(local), None, "{local}");
        }
    }
}
