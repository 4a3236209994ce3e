//! What a compile observed. ferry runs every compile it may cache with `libferry_observe.so`
//! preloaded (`LD_PRELOAD`) into rustc and every process rustc starts (the linker driver, the
//! linker, a build tool a proc-macro runs): the interposer (`interposer/lib.rs`, built by
//! `build.rs` and embedded here) records the files they opened, looked for, listed and created,
//! the environment variables they looked up and the programs they started, into a log. This crate
//! installs the interposer, says which environment turns it on, and parses the log into
//! [`Record`]s. Deciding which records are inputs of a cache key is the key recipe's job
//! (`ferry-cache`).
//!
//! Why an interposer and not seccomp user notification (or ptrace): measured on a 2-core machine,
//! the interposer costs about 1 ms on a library compile and 3 ms on a linking one (four processes
//! load it), because a recorded call costs one extra `write(2)` at most; a seccomp supervisor pays a
//! context switch to another process on every trapped call, and must read paths out of the
//! tracee's memory. The interposer's blind spots are listed in `interposer/lib.rs`; each one that
//! can be detected is written to the log as an [`Record::Incomplete`], so a compile whose
//! observation is incomplete is never stored.
//!
//! The log format: records one after another; each is one op byte followed by its fields, every
//! field ended by a NUL byte. A pid is written as decimal text. The ops and their fields:
//!
//! | op | fields | [`Record`] |
//! |----|--------|------------|
//! | `r` `w` `a` `s` `l` `d` `c` `u` `m` `e` | path | one variant each, see below |
//! | `v` | name, origin (`c`, `p` or `s`: see [`Origin`]) | [`Record::Env`] |
//! | `E` | program name | [`Record::WholeEnvironment`] |
//! | `x` | name, resolved path, pid of the process that runs it, `e` or `s` | [`Record::Exec`] |
//! | `f` | pid | [`Record::ExecFailed`] |
//! | `X` | executable, pid | [`Record::Exe`] |
//! | `!` | reason, detail | [`Record::Incomplete`] |
//!
//! Every process that loads the interposer and can open the log writes `X` first. `x` is written
//! before an exec-family call (`e`: the pid is the caller's own, which the new program keeps) and
//! after a successful `posix_spawn` (`s`: the child's pid; the child may have written its `X`
//! before it: measured, about one spawn in six); an exec-family call that returns (it failed) is
//! followed by `f` with the caller's pid, and so is a failed `posix_spawn` (its `x` an `e` one
//! with the caller's pid). [`unaccounted`] uses them to find a started program that never wrote
//! to the log.
//!
//! The `!` reasons (the detail in parentheses): `static-executable`, `foreign-executable`,
//! `environment-drops-observer` (the program; see [`UNOBSERVED_PROGRAM`]), `record-too-long`,
//! `unresolvable-path` (the start of the path), `unknown-executable` (the pid of a process whose
//! executable could not be read), `network-connect`, `network-bind`, `network-send` (the address
//! family), `name-service` and `locale-data` (the libc function: glibc read files or asked a
//! daemon on its own).

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

/// The interposer's bytes (a shared library for the target this crate was built for).
pub const INTERPOSER: &[u8] = include_bytes!(env!("FERRY_INTERPOSER"));

/// A hash of [`INTERPOSER`] that names its installed copy.
const INTERPOSER_HASH: &str = env!("FERRY_INTERPOSER_HASH");

/// The environment variable naming the log the interposer appends to.
pub const LOG_VAR: &str = "FERRY_OBSERVE_LOG";
/// The environment variable holding the pid of the process that starts the observed compile, so
/// the compile's first process can tell it is the root (it does not record its own libraries).
pub const PARENT_VAR: &str = "FERRY_OBSERVE_PARENT";

/// One thing a process of the compile did, as the interposer recorded it. Paths are absolute as
/// the process named them (made absolute against its cwd), not resolved.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Record {
    /// `r`: opened for reading (a file or a directory).
    Read(PathBuf),
    /// `w`: opened for writing, created, or renamed or linked to.
    Wrote(PathBuf),
    /// `a`: looked for (opened, stat'ed, accessed, listed, run) and not there.
    Absent(PathBuf),
    /// `s`: stat'ed or accessed, and there.
    Present(PathBuf),
    /// `l`: a symbolic link whose target was read.
    Link(PathBuf),
    /// `d`: a directory whose entries were listed.
    Listed(PathBuf),
    /// `c`: a directory the compile created.
    MadeDir(PathBuf),
    /// `v`: an environment variable looked up (set or not), and whose code looked it up.
    Env { name: OsString, by: Origin },
    /// `E`: a program started by plugin code (as named) may read its whole environment: which
    /// variables are set at all is an input (their values are `v` records of their own).
    WholeEnvironment(OsString),
    /// `u`: an existing file opened for reading and writing (not truncated): its old content may
    /// have been read, so it is an input even though the compile may also have written it.
    Updated(PathBuf),
    /// `x`: a program started, as it was named, the file that name found, the pid of the
    /// process that runs it, and whether a spawn started it (`s`: the child's pid, written after
    /// the child started) or an exec (`e`: the caller's own pid, written before the call).
    Exec { name: OsString, resolved: PathBuf, pid: u32, spawned: bool },
    /// `f`: the exec-family call of process `pid` returned (failed): the `x` it wrote last runs
    /// no program.
    ExecFailed { pid: u32 },
    /// `X`: the executable of a process of the compile and its pid (the first record each process
    /// writes).
    Exe { path: PathBuf, pid: u32 },
    /// `m`: a file mapped into a process other than the compile's first one at its start (its
    /// shared libraries).
    Mapped(PathBuf),
    /// `e`: an access that failed for another reason than absence (e.g. permission denied).
    Failed(PathBuf),
    /// `!`: something the interposer could not observe (a statically linked program started, a
    /// child whose environment dropped the interposer, a path too long, a name-service lookup, a
    /// locale or character set loaded by glibc).
    Incomplete { reason: String, detail: OsString },
}

/// The `!` reasons that say a started program will not observe itself, its `detail` the program:
/// such an exec writes no `X`, and the observation is incomplete already.
pub const UNOBSERVED_PROGRAM: [&str; 3] = ["static-executable", "foreign-executable", "environment-drops-observer"];

/// Whose code made a lookup, told by the address it returns to (on x86_64 and aarch64; elsewhere
/// every lookup reads [`Origin::Plugin`], the most careful answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Origin {
    /// `c`: the compiler itself (the compile's first process, code loaded when it started).
    Compiler,
    /// `p`: code loaded later into any process of the compile (a proc-macro, a plugin), or a
    /// program such code started, for every variable of the environment it was given.
    Plugin,
    /// `s`: another process of the compile, its own code (the linker driver and the linker).
    Subprocess,
}

/// A log that does not parse (cut short, or written by something else).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadLog {
    /// Byte offset of the record that does not parse.
    pub offset: usize,
}

impl std::fmt::Display for BadLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the observation log is malformed at byte {}", self.offset)
    }
}

impl std::error::Error for BadLog {}

/// Parses a whole log.
pub fn parse(log: &[u8]) -> Result<Vec<Record>, BadLog> {
    let mut records = Vec::new();
    let mut at = 0;
    while at < log.len() {
        let start = at;
        let bad = || BadLog { offset: start };
        let op = log[at];
        at += 1;
        let mut field = || -> Result<&[u8], BadLog> {
            let len = log[at..].iter().position(|&b| b == 0).ok_or_else(bad)?;
            let bytes = &log[at..at + len];
            at += len + 1;
            Ok(bytes)
        };
        let path = |bytes: &[u8]| PathBuf::from(OsStr::from_bytes(bytes));
        // Decimal digits only (no sign, no spaces), as the interposer writes them.
        let pid = |bytes: &[u8]| {
            if bytes.is_empty() || !bytes.iter().all(u8::is_ascii_digit) {
                return None;
            }
            std::str::from_utf8(bytes).ok()?.parse::<u32>().ok()
        };
        let record = match op {
            b'r' => Record::Read(path(field()?)),
            b'w' => Record::Wrote(path(field()?)),
            b'a' => Record::Absent(path(field()?)),
            b's' => Record::Present(path(field()?)),
            b'l' => Record::Link(path(field()?)),
            b'd' => Record::Listed(path(field()?)),
            b'c' => Record::MadeDir(path(field()?)),
            b'v' => {
                let name = OsString::from_vec(field()?.to_vec());
                let by = match field()? {
                    b"c" => Origin::Compiler,
                    b"p" => Origin::Plugin,
                    b"s" => Origin::Subprocess,
                    _ => return Err(bad()),
                };
                Record::Env { name, by }
            }
            b'u' => Record::Updated(path(field()?)),
            b'E' => Record::WholeEnvironment(OsString::from_vec(field()?.to_vec())),
            b'x' => {
                let name = OsString::from_vec(field()?.to_vec());
                let resolved = path(field()?);
                let pid = pid(field()?).ok_or_else(bad)?;
                let spawned = match field()? {
                    b"e" => false,
                    b"s" => true,
                    _ => return Err(bad()),
                };
                Record::Exec { name, resolved, pid, spawned }
            }
            b'f' => Record::ExecFailed { pid: pid(field()?).ok_or_else(bad)? },
            b'X' => {
                let exe = path(field()?);
                Record::Exe { path: exe, pid: pid(field()?).ok_or_else(bad)? }
            }
            b'm' => Record::Mapped(path(field()?)),
            b'e' => Record::Failed(path(field()?)),
            b'!' => {
                let reason = String::from_utf8_lossy(field()?).into_owned();
                Record::Incomplete { reason, detail: OsString::from_vec(field()?.to_vec()) }
            }
            _ => return Err(bad()),
        };
        records.push(record);
    }
    Ok(records)
}

/// A program the compile started that never wrote to the log, described; `None` when every one
/// did. A dynamically linked program that carries the observer writes exactly one `X` record as
/// it starts; one that does not could not open the log (a log path it cannot reach, a setuid
/// program the loader does not preload into), and what it did is unknown.
///
/// Per pid P, in the order written: an exec's `x` (`e`) is answered by the next `X` for P, or by
/// an `f` for P (the call failed: the `f` answers the last exec P announced). A spawn's `x` (`s`)
/// is answered by an `X` for P written after it, or by one written before it that no exec
/// explains (the child started before its parent wrote the record). An `X` for P that answers
/// nothing is a process started unseen (the compile's first one, or one `system` started): it
/// answers no exec of P, only a spawn. Execs a `!` record already names (see
/// [`UNOBSERVED_PROGRAM`]) are not counted: the observation is incomplete anyway. A pid reused
/// within one compile (after 2^15 or more processes) could pair records of two processes.
pub fn unaccounted(records: &[Record]) -> Option<String> {
    use std::collections::HashMap;
    #[derive(Default)]
    struct Pid<'a> {
        /// Execs announced and not answered, oldest first: (program, counted).
        execs: Vec<(&'a Path, bool)>,
        /// Spawned programs (counted) whose `X` has not been seen.
        spawns: Vec<&'a Path>,
        /// `X` records no exec or spawn explained (yet).
        unexplained: usize,
    }
    let unobserved: Vec<&OsStr> = records
        .iter()
        .filter_map(|r| match r {
            Record::Incomplete { reason, detail } if UNOBSERVED_PROGRAM.contains(&reason.as_str()) => {
                Some(detail.as_os_str())
            }
            _ => None,
        })
        .collect();
    let mut pids: HashMap<u32, Pid> = HashMap::new();
    for r in records {
        match r {
            Record::Exec { resolved, pid, spawned, .. } => {
                let counted = !unobserved.contains(&resolved.as_os_str());
                let p = pids.entry(*pid).or_default();
                if !spawned {
                    p.execs.push((resolved, counted));
                } else if counted && p.unexplained > 0 {
                    p.unexplained -= 1;
                } else if counted {
                    p.spawns.push(resolved);
                }
            }
            Record::ExecFailed { pid } => {
                pids.entry(*pid).or_default().execs.pop();
            }
            Record::Exe { pid, .. } => {
                let p = pids.entry(*pid).or_default();
                if let Some(i) = p.execs.iter().position(|&(_, counted)| counted) {
                    p.execs.remove(i);
                } else if !p.spawns.is_empty() {
                    p.spawns.remove(0);
                } else {
                    p.unexplained += 1;
                }
            }
            _ => {}
        }
    }
    let mut missing: Vec<(u32, &Path)> = pids
        .iter()
        .flat_map(|(&pid, p)| {
            let execs = p.execs.iter().filter(|&&(_, counted)| counted).map(|&(program, _)| program);
            execs.chain(p.spawns.iter().copied()).map(move |program| (pid, program))
        })
        .collect();
    missing.sort();
    let (pid, program) = missing.first()?;
    Some(format!("{} (pid {pid}) was started and never wrote to the observation log", program.display()))
}

/// Writes the interposer into `dir` (once: the file name carries its hash, and an existing copy
/// is used only when its bytes are exactly ours) and returns its path.
pub fn install(dir: &Path) -> io::Result<PathBuf> {
    let path = dir.join(format!("libferry_observe-{INTERPOSER_HASH}.so"));
    if fs::read(&path).is_ok_and(|bytes| bytes == INTERPOSER) {
        return Ok(path);
    }
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".libferry_observe.{}.tmp", std::process::id()));
    let written = fs::write(&tmp, INTERPOSER).and_then(|()| {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755))?;
        fs::rename(&tmp, &path)
    });
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written.map(|()| path)
}

/// The interposer, ready to be preloaded: the file [`install`] wrote, or a memory file (`memfd`,
/// opened as `/proc/<pid>/fd/<n>` while this process lives) when the directory is on a
/// filesystem mounted `noexec` (the loader cannot map code from it, and would print an error
/// into the build's output) or cannot be written.
#[derive(Debug)]
pub struct Interposer {
    pub path: PathBuf,
    /// Keeps the memory file open.
    _memory: Option<fs::File>,
}

impl Interposer {
    /// The installed copy under `dir` when code can be mapped from there, else a memory file.
    /// Err only when neither can be had (no `memfd_create`, and `dir` unusable).
    pub fn load(dir: &Path) -> io::Result<Interposer> {
        let installed = if mounted_noexec(dir) { None } else { install(dir).ok() };
        match installed {
            Some(path) => Ok(Interposer { path, _memory: None }),
            None => Interposer::in_memory(),
        }
    }

    /// The interposer in a memory file.
    pub fn in_memory() -> io::Result<Interposer> {
        use std::io::Write;
        // MFD_EXEC (Linux 6.3) states that code will be mapped from it, for systems whose
        // `vm.memfd_noexec` would otherwise seal it; older kernels refuse the flag.
        const MFD_EXEC: libc::c_uint = 0x10;
        let name = c"libferry_observe";
        let (mut file, path) =
            memory_file(name, libc::MFD_CLOEXEC | MFD_EXEC).or_else(|_| memory_file(name, libc::MFD_CLOEXEC))?;
        file.write_all(INTERPOSER)?;
        Ok(Interposer { path, _memory: Some(file) })
    }
}

/// A new memory file (`memfd_create` with `flags`) and the path other processes of this user
/// open it by while this process lives (`/proc/<pid>/fd/<n>`).
fn memory_file(name: &std::ffi::CStr, flags: libc::c_uint) -> io::Result<(fs::File, PathBuf)> {
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: memfd_create reads a NUL-terminated name; the fd it returns is ours.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let file = unsafe { fs::File::from_raw_fd(fd) };
    let path = PathBuf::from(format!("/proc/{}/fd/{}", std::process::id(), file.as_raw_fd()));
    Ok((file, path))
}

/// Whether the filesystem holding `dir` (or its nearest existing ancestor) is mounted `noexec`.
fn mounted_noexec(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let existing = dir.ancestors().find(|d| d.exists()).unwrap_or(Path::new("/"));
    let Ok(c) = std::ffi::CString::new(existing.as_os_str().as_bytes()) else { return false };
    // SAFETY: statvfs fills the struct we pass; the path is NUL-terminated.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        libc::statvfs(c.as_ptr(), &mut st) == 0 && st.f_flag & libc::ST_NOEXEC != 0
    }
}

/// Where an observed compile's records go: a memory file (`memfd`), opened by the observed
/// processes as `/proc/<pid>/fd/<n>` of the process that made it (no disk file to create and
/// delete per compile), or a file.
#[derive(Debug)]
pub struct Log {
    file: fs::File,
    /// The path the observed processes open.
    pub path: PathBuf,
}

impl Log {
    /// A log in memory, for processes of the same user while this process lives.
    pub fn in_memory() -> io::Result<Log> {
        let (file, path) = memory_file(c"ferry-observe", libc::MFD_CLOEXEC)?;
        Ok(Log { file, path })
    }

    /// A new, empty log file at `path` (which must not exist).
    pub fn file(path: &Path) -> io::Result<Log> {
        let file = fs::File::options().read(true).write(true).create_new(true).open(path)?;
        Ok(Log { file, path: path.to_owned() })
    }

    /// Everything written so far.
    pub fn read_all(&self) -> io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let len = self.file.metadata()?.len() as usize;
        let mut bytes = vec![0u8; len];
        self.file.read_exact_at(&mut bytes, 0)?;
        Ok(bytes)
    }
}

/// The variables that make a process observed: the interposer preloaded (before any preload the
/// environment already has), the log, and the pid of the process that starts it.
pub fn environment(
    interposer: &Path,
    log: &Path,
    existing_preload: Option<&OsStr>,
    parent: u32,
) -> Vec<(OsString, OsString)> {
    let mut preload = interposer.as_os_str().to_owned();
    if let Some(existing) = existing_preload.filter(|p| !p.is_empty()) {
        preload.push(":");
        preload.push(existing);
    }
    vec![
        ("LD_PRELOAD".into(), preload),
        (LOG_VAR.into(), log.as_os_str().to_owned()),
        (PARENT_VAR.into(), parent.to_string().into()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_parse_and_damage_is_refused() {
        // (A pid field is split off in its own literal: `\0` and digits would read as octal.)
        let log = [
            &b"X/bin/rustc\0"[..],
            b"401\0r/a\0x cc\0/usr/bin/cc\0",
            b"401\0e\0f401\0vHOME\0p\0!static-executable\0/bin/x\0a/b c\0u/db\0",
        ]
        .concat();
        let records = parse(&log).unwrap();
        assert_eq!(
            records,
            [
                Record::Exe { path: "/bin/rustc".into(), pid: 401 },
                Record::Read("/a".into()),
                Record::Exec { name: " cc".into(), resolved: "/usr/bin/cc".into(), pid: 401, spawned: false },
                Record::ExecFailed { pid: 401 },
                Record::Env { name: "HOME".into(), by: Origin::Plugin },
                Record::Incomplete { reason: "static-executable".into(), detail: "/bin/x".into() },
                Record::Absent("/b c".into()),
                Record::Updated("/db".into()),
            ]
        );
        assert_eq!(parse(b"r/a\0r/b"), Err(BadLog { offset: 4 }));
        assert_eq!(parse(b"q/a\0"), Err(BadLog { offset: 0 }));
        assert_eq!(parse(b"vHOME\0z\0"), Err(BadLog { offset: 0 }));
        // A pid is decimal digits that fit in 32 bits; the old one-field `X` does not parse.
        assert_eq!(parse(b"X/bin/cc\0"), Err(BadLog { offset: 0 }));
        assert_eq!(parse(b"X/bin/cc\0-1\0"), Err(BadLog { offset: 0 }));
        assert_eq!(parse(b"f\0"), Err(BadLog { offset: 0 }));
        assert_eq!(parse(b"r/a\0f4294967296\0"), Err(BadLog { offset: 4 }));
        assert_eq!(parse(b"x cc\0/usr/bin/cc\0 7\0e\0"), Err(BadLog { offset: 0 }));
        assert_eq!(parse(b"x cc\0/usr/bin/cc\x007\0"), Err(BadLog { offset: 0 }));
        assert_eq!(parse(b"x cc\0/usr/bin/cc\x007\0q\0"), Err(BadLog { offset: 0 }));
        assert_eq!(parse(b""), Ok(Vec::new()));
    }

    #[test]
    fn the_fuzz_seed_is_a_whole_log() {
        let seed = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/observe_log/records");
        let records = parse(&fs::read(seed).unwrap()).unwrap();
        assert!(matches!(records.first(), Some(Record::Exe { pid: 1234, .. })), "{records:#?}");
        assert!(records.iter().any(|r| matches!(r, Record::Exec { spawned: true, .. })));
        assert!(records.contains(&Record::ExecFailed { pid: 1235 }));
        assert_eq!(unaccounted(&records), None);
    }

    fn exe(path: &str, pid: u32) -> Record {
        Record::Exe { path: path.into(), pid }
    }

    /// `x` for an exec (`e`) of `path` by process `pid`.
    fn exec(path: &str, pid: u32) -> Record {
        Record::Exec { name: path.into(), resolved: path.into(), pid, spawned: false }
    }

    /// `x` for a spawn (`s`) of `path` as child `pid`.
    fn spawn(path: &str, pid: u32) -> Record {
        Record::Exec { name: path.into(), resolved: path.into(), pid, spawned: true }
    }

    fn failed(pid: u32) -> Record {
        Record::ExecFailed { pid }
    }

    #[track_caller]
    fn missing(records: &[Record], program: &str) {
        let found = unaccounted(records);
        assert!(found.as_deref().is_some_and(|d| d.starts_with(&format!("{program} "))), "{found:?}");
    }

    #[test]
    fn an_exec_is_answered_by_the_next_exe_of_its_pid_or_by_its_failure() {
        let root = exe("/bin/rustc", 10);
        // fork, then exec in the child: the program's X follows.
        assert_eq!(unaccounted(&[root.clone(), exec("/bin/cc", 11), exe("/bin/cc", 11)]), None);
        missing(&[root.clone(), exec("/bin/cc", 11)], "/bin/cc");
        // The X of another pid answers nothing.
        missing(&[root.clone(), exec("/bin/cc", 11), exe("/bin/cc", 12)], "/bin/cc");
        // An X written before the exec is announced is the old image's.
        missing(&[root.clone(), exe("/bin/cc", 11), exec("/bin/cc", 11)], "/bin/cc");
        // The exec failed: nothing runs.
        assert_eq!(unaccounted(&[root.clone(), exec("/bin/cc", 11), failed(11)]), None);
        // A failure answers the last exec that process announced, not an earlier one.
        missing(&[root.clone(), exec("/bin/a", 11), exe("/bin/a", 11), exec("/bin/b", 11)], "/bin/b");
        assert_eq!(
            unaccounted(&[root.clone(), exec("/bin/a", 11), exe("/bin/a", 11), exec("/bin/b", 11), failed(11)]),
            None
        );
        missing(&[root.clone(), exec("/bin/a", 11), exec("/bin/b", 11), failed(11)], "/bin/a");
        // A process that execs twice writes two X records.
        let twice = [exec("/bin/sh", 11), exe("/bin/sh", 11), exec("/bin/cat", 11), exe("/bin/cat", 11)];
        assert_eq!(unaccounted(&twice), None);
        missing(&twice[..3], "/bin/cat");
        // The compile's first process (or one `system` started) was announced by no record: its X
        // explains no exec it makes later.
        missing(&[root.clone(), exec("/bin/ld", 10)], "/bin/ld");
        assert_eq!(unaccounted(&[root, exec("/bin/ld", 10), exe("/bin/ld", 10)]), None);
    }

    #[test]
    fn a_spawn_is_answered_by_its_childs_exe_before_or_after_it() {
        let root = exe("/bin/rustc", 10);
        assert_eq!(unaccounted(&[root.clone(), spawn("/bin/cc", 11), exe("/bin/cc", 11)]), None);
        // The child started before its parent wrote the record.
        assert_eq!(unaccounted(&[root.clone(), exe("/bin/cc", 11), spawn("/bin/cc", 11)]), None);
        missing(&[root.clone(), spawn("/bin/cc", 11)], "/bin/cc");
        missing(&[root.clone(), spawn("/bin/cc", 11), exe("/bin/cc", 12)], "/bin/cc");
        // The child exec'd again before the parent wrote the spawn's record.
        let early = [root.clone(), exe("/bin/sh", 11), exec("/bin/cat", 11), exe("/bin/cat", 11), spawn("/bin/sh", 11)];
        assert_eq!(unaccounted(&early), None);
        // ... and that exec wrote nothing: its X is not the spawn's.
        missing(&[root.clone(), exe("/bin/sh", 11), exec("/bin/cat", 11), spawn("/bin/sh", 11)], "/bin/cat");
        // One X answers one spawn.
        missing(&[root, exe("/bin/cc", 11), spawn("/bin/cc", 11), spawn("/bin/cc", 11)], "/bin/cc");
    }

    #[test]
    fn execs_already_flagged_incomplete_are_not_counted() {
        let root = exe("/bin/rustc", 10);
        let flagged = |why: &str, path: &str| Record::Incomplete { reason: why.into(), detail: path.into() };
        for why in UNOBSERVED_PROGRAM {
            assert_eq!(unaccounted(&[root.clone(), exec("/bin/x", 11), flagged(why, "/bin/x")]), None);
            assert_eq!(unaccounted(&[root.clone(), spawn("/bin/x", 11), flagged(why, "/bin/x")]), None);
        }
        // Another program's flag does not count.
        missing(&[root.clone(), exec("/bin/x", 11), flagged("static-executable", "/bin/y")], "/bin/x");
        // Other reasons say nothing about a program.
        missing(&[root.clone(), exec("/bin/x", 11), flagged("name-service", "/bin/x")], "/bin/x");
        // A flagged exec that failed is the one its failure answers.
        let failed_static =
            [exec("/bin/a", 11), exec("/bin/x", 11), flagged("static-executable", "/bin/x"), failed(11)];
        missing(&failed_static, "/bin/a");
        assert_eq!(unaccounted(&[]), None);
    }
}
