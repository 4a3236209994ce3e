//! The one place the wrapper starts processes. With `FERRY_TRACE_SPAWNS=<file>` every command line
//! is appended to that file, so tests can see exactly what ran (e.g. that a cache hit ran no rustc).

use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};

/// What a compiler run produced. stdout/stderr are also passed through live while it runs.
#[derive(Debug)]
pub struct RunOutput {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Replaces this process with `program args` (returns only if that failed): the pass-through path.
pub fn exec(program: &Path, args: &[OsString]) -> std::io::Error {
    trace(program, args);
    exec_untraced(program, args)
}

/// [`exec`] without the `FERRY_TRACE_SPAWNS` line: for a process that must write nothing (one
/// inside a compile ferry observes, whose writes would be that compile's side effects).
pub fn exec_untraced(program: &Path, args: &[OsString]) -> std::io::Error {
    use std::os::unix::process::CommandExt;
    Command::new(program).args(args).exec()
}

/// Runs a prepared command to completion, collecting its output (stdin closed).
pub fn output(cmd: &mut Command) -> std::io::Result<std::process::Output> {
    let args: Vec<OsString> = cmd.get_args().map(OsString::from).collect();
    trace(Path::new(cmd.get_program()), &args);
    cmd.stdin(Stdio::null()).output()
}

/// Runs `program args` with inherited stdio and waits for it.
pub fn run_inherited(program: &Path, args: &[OsString]) -> std::io::Result<ExitStatus> {
    trace(program, args);
    Command::new(program).args(args).status()
}

/// Runs `program args`, copying its stdout/stderr to ours as they arrive (cargo's pipelining reads
/// artifact notifications from stderr while rustc still runs) and keeping a copy of each.
/// `drop_stderr_lines` (without their newline) are not passed on: lines cargo already has (a failed
/// remote job's artifact notifications); they are still kept in the copy, which a replay prints.
/// `env` is added to this process's environment.
pub fn run_teed(
    program: &Path,
    args: &[OsString],
    env: &[(OsString, OsString)],
    drop_stderr_lines: &[Vec<u8>],
) -> std::io::Result<RunOutput> {
    trace(program, args);
    let mut child = Command::new(program)
        .args(args)
        .envs(env.iter().cloned())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let (stdout, stderr) = std::thread::scope(|s| {
        let o = s.spawn(move || tee(&mut out, &mut std::io::stdout(), &[]));
        let e = tee(&mut err, &mut std::io::stderr(), drop_stderr_lines);
        (o.join().expect("stdout tee panicked"), e)
    });
    let status = child.wait()?;
    Ok(RunOutput { status, stdout: stdout?, stderr: stderr? })
}

/// Runs `program args` with `env` added and its output collected, nothing passed on (stdin
/// closed): a compile whose answer cargo already has.
pub fn run_captured(program: &Path, args: &[OsString], env: &[(OsString, OsString)]) -> std::io::Result<RunOutput> {
    trace(program, args);
    let out = Command::new(program).args(args).envs(env.iter().cloned()).stdin(Stdio::null()).output()?;
    Ok(RunOutput { status: out.status, stdout: out.stdout, stderr: out.stderr })
}

fn tee(from: &mut impl Read, to: &mut impl Write, drop_lines: &[Vec<u8>]) -> std::io::Result<Vec<u8>> {
    let mut kept = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    let mut pending = Vec::new();
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            if !pending.is_empty() {
                let _ = to.write_all(&pending);
                kept.extend_from_slice(&pending);
            }
            let _ = to.flush();
            return Ok(kept);
        }
        if drop_lines.is_empty() {
            // Errors writing to our own stdout/stderr (a closed pipe) must not stop us reading.
            let _ = to.write_all(&buf[..n]).and_then(|()| to.flush());
            kept.extend_from_slice(&buf[..n]);
            continue;
        }
        // Line-oriented so a whole line can be recognised and dropped.
        pending.extend_from_slice(&buf[..n]);
        while let Some(pos) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=pos).collect();
            let bare = line.strip_suffix(b"\n").unwrap_or(&line);
            if !drop_lines.iter().any(|d| d.as_slice() == bare) {
                let _ = to.write_all(&line).and_then(|()| to.flush());
            }
            // Kept whole: a replay prints everything the compiler printed.
            kept.extend_from_slice(&line);
        }
    }
}

fn trace(program: &Path, args: &[OsString]) {
    let Some(file) = std::env::var_os("FERRY_TRACE_SPAWNS") else { return };
    let mut line = program.display().to_string();
    for a in args {
        line.push(' ');
        line.push_str(&a.to_string_lossy());
    }
    line.push('\n');
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(file) {
        let _ = f.write_all(line.as_bytes());
    }
}

/// Which side of [`detach`] this is.
pub enum Detached {
    /// The original process: it goes on (and soon exits, giving cargo its answer).
    Parent,
    /// A copy of it that finishes some work after the parent is gone: its own session, stdio on
    /// `/dev/null` (cargo waits for its pipes to close), holding whatever locks the parent held.
    Child,
    /// No fork: this process has more than one thread (a fork would copy their locks, not
    /// them), or fork failed. The caller does the work itself.
    NotPossible,
}

/// Forks this single-threaded process so the child can finish work the parent's exit must not
/// wait for. The child must end with `libc::_exit`.
pub fn detach() -> Detached {
    let threads = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Threads:").map(|n| n.trim().to_owned())));
    if threads.as_deref() != Some("1") {
        return Detached::NotPossible;
    }
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: the process has one thread, so the child's copy of every lock and buffer is
    // consistent; the child only uses it through normal Rust code and ends with `_exit`.
    match unsafe { libc::fork() } {
        -1 => Detached::NotPossible,
        0 => {
            // SAFETY: plain system calls on descriptors this process owns.
            unsafe {
                libc::setsid();
                let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
                if null >= 0 {
                    for fd in 0..3 {
                        libc::dup2(null, fd);
                    }
                    if null > 2 {
                        libc::close(null);
                    }
                }
            }
            Detached::Child
        }
        _ => Detached::Parent,
    }
}
