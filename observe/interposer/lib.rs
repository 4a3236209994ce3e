//! `libferry_observe.so`: the interposer ferry loads (`LD_PRELOAD`) into a compile and every
//! process it starts, to learn what the compile observed — the files it opened, looked for and did
//! not find, listed, created; the environment variables it looked up; the programs it ran.
//!
//! It is built by `build.rs` with the same rustc, as a `no_std` cdylib without dependencies, and
//! embedded into the crates that use it (see `../src/lib.rs`): it must load into any dynamically
//! linked process without pulling in a second Rust runtime, and must never allocate (it runs in
//! `vfork` children and between `fork` and `exec`).
//!
//! Each wrapped libc function calls the real one (found with `dlsym(RTLD_NEXT)`), then appends one
//! record to the log named by `FERRY_OBSERVE_LOG` with a single `write(2)` on an `O_APPEND`
//! descriptor, so records of concurrent threads and processes never interleave. A record is one
//! op byte, its fields, each ended by a NUL byte (a path cannot contain NUL); paths are made
//! absolute (relative to the cwd, or to the directory an `*at` call names) but not resolved. The
//! record ops are listed in `../src/lib.rs` ([`Op`] there). Records are deduplicated per process
//! through a lock-free table of 64-bit hashes. `errno` is preserved across the recording.
//!
//! What it cannot see is written as an `!` record, so the caller knows the observation is
//! incomplete: a program started that is statically linked or not an ELF it can load into, a
//! child whose environment dropped `LD_PRELOAD` or the log, a path too long to record.
//! What it cannot see and cannot tell: raw system calls, `execl*` (C-variadic; a dynamic child
//! still observes itself), reading the whole environment (`environ`) instead of looking a
//! variable up, and files the dynamic loader opens (recorded from `/proc/self/maps` at start).
#![no_std]
#![allow(clippy::missing_safety_doc, non_camel_case_types)]

use core::ffi::{c_char, c_int, c_uint, c_void};
use core::sync::atomic::{AtomicI32, AtomicPtr, AtomicU64, Ordering};

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    // SAFETY: abort has no preconditions.
    unsafe { abort() }
}

type mode_t = c_uint;
type pid_t = c_int;
type size_t = usize;
type ssize_t = isize;

#[link(name = "c")]
unsafe extern "C" {
    fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
    fn __errno_location() -> *mut c_int;
    fn abort() -> !;
    fn write(fd: c_int, buf: *const c_void, n: size_t) -> ssize_t;
    fn read(fd: c_int, buf: *mut c_void, n: size_t) -> ssize_t;
    fn pread(fd: c_int, buf: *mut c_void, n: size_t, offset: i64) -> ssize_t;
    fn close(fd: c_int) -> c_int;
    fn getcwd(buf: *mut c_char, size: size_t) -> *mut c_char;
    fn getppid() -> pid_t;
    fn fcntl(fd: c_int, cmd: c_int, arg: c_int) -> c_int;
    static environ: *const *const c_char;
}

const RTLD_NEXT: *mut c_void = -1isize as *mut c_void;
const AT_FDCWD: c_int = -100;
const O_ACCMODE: c_int = 3;
const O_WRONLY: c_int = 1;
const O_CREAT: c_int = 0o100;
const O_TRUNC: c_int = 0o1000;
const O_APPEND: c_int = 0o2000;
const O_CLOEXEC: c_int = 0o2000000;
const ENOENT: c_int = 2;
const ENOTDIR: c_int = 20;
const EBADF: c_int = 9;
const F_DUPFD_CLOEXEC: c_int = 1030;
const AT_EMPTY_PATH: c_int = 0x1000;
/// The log descriptor is moved at least this high, out of the way of programs that reuse low
/// descriptor numbers.
const HIGH_FD: c_int = 900;
const PATH_MAX: usize = 4096;

// ---------------------------------------------------------------------------------------------
// The real functions
// ---------------------------------------------------------------------------------------------

/// The next definition of a symbol after this library's, resolved once.
struct Real(AtomicPtr<c_void>, &'static [u8]);

impl Real {
    const fn new(name: &'static [u8]) -> Real {
        Real(AtomicPtr::new(core::ptr::null_mut()), name)
    }

    fn get(&self) -> *mut c_void {
        let p = self.0.load(Ordering::Relaxed);
        if !p.is_null() {
            return p;
        }
        // SAFETY: the name is NUL-terminated; dlsym is thread-safe.
        let found = unsafe { dlsym(RTLD_NEXT, self.1.as_ptr().cast()) };
        self.0.store(found, Ordering::Relaxed);
        found
    }
}

macro_rules! real {
    ($name:ident: fn($($arg:ty),*) -> $ret:ty) => {{
        static REAL: Real = Real::new(concat!(stringify!($name), "\0").as_bytes());
        let p = REAL.get();
        if p.is_null() {
            // The symbol does not exist further down: behave as if the call failed.
            None
        } else {
            // SAFETY: dlsym found the libc function of this name, whose signature this is.
            Some(unsafe { core::mem::transmute::<*mut c_void, unsafe extern "C" fn($($arg),*) -> $ret>(p) })
        }
    }};
}

// ---------------------------------------------------------------------------------------------
// The log
// ---------------------------------------------------------------------------------------------

/// -1: not opened (no log configured, or not yet); else the descriptor.
static LOG_FD: AtomicI32 = AtomicI32::new(-1);
/// The log's path, kept to reopen it when a program closed the descriptor under us.
static mut LOG_PATH: [u8; PATH_MAX] = [0; PATH_MAX];

#[used]
#[unsafe(link_section = ".init_array")]
static INIT: extern "C" fn() = init;

extern "C" fn init() {
    let Some(path) = env_value(b"FERRY_OBSERVE_LOG") else { return };
    if path.len() + 1 > PATH_MAX {
        return;
    }
    // SAFETY: single-threaded at load time; nothing else touches LOG_PATH before this.
    unsafe {
        let dst = &mut *core::ptr::addr_of_mut!(LOG_PATH);
        dst[..path.len()].copy_from_slice(path);
        dst[path.len()] = 0;
    }
    open_log();
    let mut buf = [0u8; PATH_MAX];
    let exe = readlink_into(b"/proc/self/exe\0", &mut buf);
    if let Some(exe) = exe {
        emit(b'X', &[exe]);
    }
    // The files the loader mapped (shared libraries), for every process but the compiler itself,
    // whose libraries come with its toolchain.
    // SAFETY: getppid has no preconditions.
    let parent = unsafe { getppid() };
    let root = env_value(b"FERRY_OBSERVE_PARENT").and_then(parse_int) == Some(i64::from(parent));
    if !root {
        record_maps(exe.unwrap_or(b""));
    }
}

fn open_log() -> c_int {
    let Some(open) = real!(open: fn(*const c_char, c_int, mode_t) -> c_int) else { return -1 };
    // SAFETY: LOG_PATH is NUL-terminated and only written in `init`.
    let fd = unsafe { open(core::ptr::addr_of!(LOG_PATH).cast(), O_WRONLY | O_APPEND | O_CLOEXEC, 0) };
    if fd < 0 {
        return -1;
    }
    // SAFETY: plain descriptor calls.
    let high = unsafe { fcntl(fd, F_DUPFD_CLOEXEC, HIGH_FD) };
    let fd = if high >= 0 {
        unsafe { close(fd) };
        high
    } else {
        fd
    };
    LOG_FD.store(fd, Ordering::Relaxed);
    fd
}

/// Writes one record (op byte, then each field and a NUL) in one `write`, unless this process
/// already wrote the same record.
fn emit(op: u8, fields: &[&[u8]]) {
    if LOG_FD.load(Ordering::Relaxed) < 0 {
        return;
    }
    let mut buf = [0u8; 2 * PATH_MAX + 64];
    let mut len = 1;
    buf[0] = op;
    for field in fields {
        if len + field.len() + 1 > buf.len() {
            emit(b'!', &[b"record-too-long", &field[..field.len().min(256)]]);
            return;
        }
        buf[len..len + field.len()].copy_from_slice(field);
        buf[len + field.len()] = 0;
        len += field.len() + 1;
    }
    if !first_time(&buf[..len]) {
        return;
    }
    let fd = LOG_FD.load(Ordering::Relaxed);
    // SAFETY: writing an initialized buffer.
    let n = unsafe { write(fd, buf.as_ptr().cast(), len) };
    if n < 0 && errno() == EBADF {
        // The program closed our descriptor (a "close every fd" loop): reopen and retry once.
        let fd = open_log();
        if fd >= 0 {
            // SAFETY: as above.
            unsafe { write(fd, buf.as_ptr().cast(), len) };
        }
    }
}

/// Records already written by this process, as 64-bit hashes (0: empty slot).
static SEEN: [AtomicU64; 1 << 15] = [const { AtomicU64::new(0) }; 1 << 15];

/// True the first time a record is seen (a full table only costs duplicate records).
fn first_time(record: &[u8]) -> bool {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in record {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let h = h | 1;
    let mask = SEEN.len() - 1;
    let mut i = (h as usize) & mask;
    for _ in 0..64 {
        match SEEN[i].compare_exchange(0, h, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return true,
            Err(existing) if existing == h => return false,
            Err(_) => i = (i + 1) & mask,
        }
    }
    true
}

// ---------------------------------------------------------------------------------------------
// Paths
// ---------------------------------------------------------------------------------------------

/// The bytes of a C string (at most PATH_MAX of them).
unsafe fn c_bytes<'a>(p: *const c_char) -> Option<&'a [u8]> {
    if p.is_null() {
        return None;
    }
    let mut n = 0;
    // SAFETY: the caller passes a NUL-terminated string.
    while n < PATH_MAX && unsafe { *p.add(n) } != 0 {
        n += 1;
    }
    // SAFETY: n bytes were just read.
    Some(unsafe { core::slice::from_raw_parts(p.cast(), n) })
}

/// `path` as an absolute path in `out` (relative to `dirfd`'s directory, or the cwd).
fn absolute<'a>(dirfd: c_int, path: &[u8], out: &'a mut [u8; 2 * PATH_MAX]) -> Option<&'a [u8]> {
    if path.first() == Some(&b'/') {
        out[..path.len()].copy_from_slice(path);
        return Some(&out[..path.len()]);
    }
    let base_len = if dirfd == AT_FDCWD {
        // SAFETY: the buffer holds PATH_MAX bytes.
        let p = unsafe { getcwd(out.as_mut_ptr().cast(), PATH_MAX) };
        if p.is_null() {
            return None;
        }
        out.iter().position(|&b| b == 0)?
    } else {
        fd_path(dirfd, out)?
    };
    let mut len = base_len;
    if len + 1 + path.len() > out.len() {
        return None;
    }
    if len == 0 || out[len - 1] != b'/' {
        out[len] = b'/';
        len += 1;
    }
    out[len..len + path.len()].copy_from_slice(path);
    Some(&out[..len + path.len()])
}

/// The path of an open descriptor, into the start of `out`; its length.
fn fd_path(fd: c_int, out: &mut [u8]) -> Option<usize> {
    let mut link = [0u8; 32];
    let prefix = b"/proc/self/fd/";
    link[..prefix.len()].copy_from_slice(prefix);
    let len = prefix.len() + write_int(fd as i64, &mut link[prefix.len()..]);
    link[len] = 0;
    let mut target = [0u8; PATH_MAX];
    let found = readlink_into(&link, &mut target)?;
    let n = found.len();
    out.get_mut(..n)?.copy_from_slice(found);
    Some(n)
}

fn readlink_into<'a>(path_nul: &[u8], buf: &'a mut [u8; PATH_MAX]) -> Option<&'a [u8]> {
    let readlink = real!(readlink: fn(*const c_char, *mut c_char, size_t) -> ssize_t)?;
    // SAFETY: path is NUL-terminated, buf has PATH_MAX bytes.
    let n = unsafe { readlink(path_nul.as_ptr().cast(), buf.as_mut_ptr().cast(), PATH_MAX) };
    (n > 0 && (n as usize) < PATH_MAX).then(|| &buf[..n as usize])
}

fn write_int(mut v: i64, out: &mut [u8]) -> usize {
    let mut digits = [0u8; 20];
    let mut n = 0;
    if v < 0 {
        out[0] = b'-';
        let len = write_int(-v, &mut out[1..]);
        return len + 1;
    }
    loop {
        digits[n] = b'0' + (v % 10) as u8;
        n += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for i in 0..n {
        out[i] = digits[n - 1 - i];
    }
    n
}

fn parse_int(text: &[u8]) -> Option<i64> {
    let mut v: i64 = 0;
    if text.is_empty() {
        return None;
    }
    for &b in text {
        if !b.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(i64::from(b - b'0'))?;
    }
    Some(v)
}

fn errno() -> c_int {
    // SAFETY: errno's location is always valid for this thread.
    unsafe { *__errno_location() }
}

fn set_errno(e: c_int) {
    // SAFETY: as above.
    unsafe { *__errno_location() = e };
}

/// Records `op` for `path` (relative to `dirfd`), keeping errno as the real call left it.
fn record(op: u8, dirfd: c_int, path: *const c_char) {
    let saved = errno();
    // SAFETY: libc callers pass a NUL-terminated path (or null, skipped).
    if let Some(raw) = unsafe { c_bytes(path) }
        && !raw.is_empty()
    {
        let mut buf = [0u8; 2 * PATH_MAX];
        match absolute(dirfd, raw, &mut buf) {
            Some(abs) => emit(op, &[abs]),
            None => emit(b'!', &[b"unresolvable-path", raw]),
        }
    }
    set_errno(saved);
}

/// The outcome of a lookup-style call: found (`ok`), absent, or some other failure.
fn record_lookup(ok: bool, found: u8, dirfd: c_int, path: *const c_char) {
    if ok {
        record(found, dirfd, path);
    } else {
        let e = errno();
        if e == ENOENT || e == ENOTDIR {
            record(b'a', dirfd, path);
        } else {
            record(b'e', dirfd, path);
        }
    }
}

fn record_open(dirfd: c_int, path: *const c_char, flags: c_int, ok: bool) {
    let writes = flags & O_ACCMODE != 0 || flags & (O_CREAT | O_TRUNC | O_APPEND) != 0;
    if writes {
        if ok {
            record(b'w', dirfd, path);
        } else if flags & O_CREAT == 0 {
            record_lookup(false, b'w', dirfd, path);
        }
    } else {
        record_lookup(ok, b'r', dirfd, path);
    }
}

// ---------------------------------------------------------------------------------------------
// The environment
// ---------------------------------------------------------------------------------------------

/// A variable's value read straight from `environ` (no libc call, no record).
fn env_value(name: &[u8]) -> Option<&'static [u8]> {
    // SAFETY: environ is a NULL-terminated array of NUL-terminated strings.
    unsafe {
        let mut p = environ;
        if p.is_null() {
            return None;
        }
        while !(*p).is_null() {
            let entry = c_bytes(*p)?;
            if entry.len() > name.len() && entry.starts_with(name) && entry[name.len()] == b'=' {
                return Some(&entry[name.len() + 1..]);
            }
            p = p.add(1);
        }
    }
    None
}

/// Does this environment (a NULL-terminated array) still carry the observer?
unsafe fn carries_observer(envp: *const *const c_char) -> bool {
    if envp.is_null() {
        return false;
    }
    let (mut preload, mut log) = (false, false);
    // SAFETY: the caller passes a NULL-terminated array of C strings.
    unsafe {
        let mut p = envp;
        while !(*p).is_null() {
            if let Some(entry) = c_bytes(*p) {
                preload |= entry.starts_with(b"LD_PRELOAD=") && contains(entry, b"libferry_observe");
                log |= entry.starts_with(b"FERRY_OBSERVE_LOG=");
            }
            p = p.add(1);
        }
    }
    preload && log
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

// ---------------------------------------------------------------------------------------------
// Programs started
// ---------------------------------------------------------------------------------------------

/// Records a program about to run: `x name resolved`, or `a` when it does not exist, and `!`
/// when the observer will not see inside it.
unsafe fn record_exec(name: *const c_char, search: bool, envp: *const *const c_char) {
    let saved = errno();
    // SAFETY: a NUL-terminated program name from the caller.
    let Some(raw) = (unsafe { c_bytes(name) }) else { return };
    let mut resolved = [0u8; 2 * PATH_MAX];
    let found = if search && !raw.contains(&b'/') { search_path(raw, &mut resolved) } else {
        absolute(AT_FDCWD, raw, &mut resolved).map(<[u8]>::len)
    };
    match found {
        Some(len) if exists(&resolved[..len]) => {
            let path = &resolved[..len];
            emit(b'x', &[raw, path]);
            check_loadable(path, 0);
            // SAFETY: the caller's environment array.
            if !unsafe { carries_observer(envp) } {
                emit(b'!', &[b"environment-drops-observer", path]);
            }
        }
        Some(len) => emit(b'a', &[&resolved[..len]]),
        None => emit(b'a', &[raw]),
    }
    set_errno(saved);
}

/// `name` searched in `PATH` as execvp does; the length of the hit written into `out`.
fn search_path(name: &[u8], out: &mut [u8; 2 * PATH_MAX]) -> Option<usize> {
    let path = env_value(b"PATH").unwrap_or(b"/bin:/usr/bin");
    for dir in path.split(|&b| b == b':') {
        let dir: &[u8] = if dir.is_empty() { b"." } else { dir };
        let len = dir.len() + 1 + name.len();
        if len >= out.len() {
            continue;
        }
        out[..dir.len()].copy_from_slice(dir);
        out[dir.len()] = b'/';
        out[dir.len() + 1..len].copy_from_slice(name);
        if exists(&out[..len]) {
            if dir[0] != b'/' {
                let mut abs = [0u8; 2 * PATH_MAX];
                let full = absolute(AT_FDCWD, &out[..len], &mut abs)?;
                let n = full.len();
                out[..n].copy_from_slice(&abs[..n]);
                return Some(n);
            }
            return Some(len);
        }
    }
    None
}

fn with_nul<R>(path: &[u8], f: impl FnOnce(*const c_char) -> R) -> Option<R> {
    let mut buf = [0u8; 2 * PATH_MAX + 1];
    if path.len() >= buf.len() {
        return None;
    }
    buf[..path.len()].copy_from_slice(path);
    Some(f(buf.as_ptr().cast()))
}

fn exists(path: &[u8]) -> bool {
    let Some(access) = real!(access: fn(*const c_char, c_int) -> c_int) else { return false };
    // SAFETY: a NUL-terminated path.
    with_nul(path, |p| unsafe { access(p, 0) } == 0).unwrap_or(false)
}

/// Records `!` when `path` is a program the interposer cannot load into: a statically linked ELF,
/// a 32-bit one, or a script whose interpreter is one of those.
fn check_loadable(path: &[u8], depth: u32) {
    let Some(open) = real!(open: fn(*const c_char, c_int, mode_t) -> c_int) else { return };
    // SAFETY: a NUL-terminated path.
    let Some(fd) = with_nul(path, |p| unsafe { open(p, O_CLOEXEC, 0) }) else { return };
    if fd < 0 {
        return;
    }
    let mut head = [0u8; 4096];
    // SAFETY: reading into a local buffer.
    let n = unsafe { pread(fd, head.as_mut_ptr().cast(), head.len(), 0) };
    let n = if n > 0 { n as usize } else { 0 };
    let head = &head[..n];
    if head.starts_with(b"#!") && depth < 2 {
        let line_end = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
        let line = &head[2..line_end];
        let start = line.iter().position(|&b| b != b' ' && b != b'\t').unwrap_or(line.len());
        let rest = &line[start..];
        let end = rest.iter().position(|&b| b == b' ' || b == b'\t').unwrap_or(rest.len());
        check_loadable(&rest[..end], depth + 1);
    } else if head.starts_with(b"\x7fELF") {
        if head.len() < 64 || head[4] != 2 {
            emit(b'!', &[b"foreign-executable", path]);
        } else {
            let phoff = u64::from_le_bytes(head[32..40].try_into().unwrap_or([0; 8])) as i64;
            let phentsize = usize::from(u16::from_le_bytes([head[54], head[55]]));
            let phnum = usize::from(u16::from_le_bytes([head[56], head[57]]));
            let mut headers = [0u8; 4096];
            let want = (phentsize * phnum).min(headers.len());
            // SAFETY: reading into a local buffer.
            let got = unsafe { pread(fd, headers.as_mut_ptr().cast(), want, phoff) };
            let got = if got > 0 { got as usize } else { 0 };
            let interp = phentsize >= 4
                && (0..phnum).any(|i| {
                    let at = i * phentsize;
                    at + 4 <= got && u32::from_le_bytes([headers[at], headers[at + 1], headers[at + 2], headers[at + 3]]) == 3
                });
            if !interp {
                emit(b'!', &[b"static-executable", path]);
            }
        }
    }
    // SAFETY: our own descriptor.
    unsafe { close(fd) };
}

/// Records the files mapped into this process (its shared libraries), except its executable.
fn record_maps(exe: &[u8]) {
    let Some(open) = real!(open: fn(*const c_char, c_int, mode_t) -> c_int) else { return };
    // SAFETY: a NUL-terminated literal.
    let fd = unsafe { open(b"/proc/self/maps\0".as_ptr().cast(), O_CLOEXEC, 0) };
    if fd < 0 {
        return;
    }
    let mut buf = [0u8; 8192];
    let mut have = 0;
    loop {
        // SAFETY: reading into the free part of a local buffer.
        let n = unsafe { read(fd, buf[have..].as_mut_ptr().cast(), buf.len() - have) };
        if n <= 0 {
            break;
        }
        have += n as usize;
        let mut start = 0;
        while let Some(nl) = buf[start..have].iter().position(|&b| b == b'\n') {
            let line = &buf[start..start + nl];
            if let Some(slash) = line.iter().position(|&b| b == b'/') {
                let path = &line[slash..];
                if path != exe && !path.ends_with(b" (deleted)") && !contains(path, b"libferry_observe") {
                    emit(b'm', &[path]);
                }
            }
            start += nl + 1;
        }
        buf.copy_within(start..have, 0);
        have -= start;
        if have == buf.len() {
            have = 0; // a line longer than the buffer: skip it
        }
    }
    // SAFETY: our own descriptor.
    unsafe { close(fd) };
}

// ---------------------------------------------------------------------------------------------
// The wrapped functions
// ---------------------------------------------------------------------------------------------

macro_rules! open_like {
    ($($name:ident),*) => {$(
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(path: *const c_char, flags: c_int, mode: mode_t) -> c_int {
            let Some(f) = real!($name: fn(*const c_char, c_int, mode_t) -> c_int) else { return -1 };
            // SAFETY: forwarding the caller's arguments.
            let fd = unsafe { f(path, flags, mode) };
            record_open(AT_FDCWD, path, flags, fd >= 0);
            fd
        }
    )*};
}
open_like!(open, open64);

macro_rules! openat_like {
    ($($name:ident),*) => {$(
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(dirfd: c_int, path: *const c_char, flags: c_int, mode: mode_t) -> c_int {
            let Some(f) = real!($name: fn(c_int, *const c_char, c_int, mode_t) -> c_int) else { return -1 };
            // SAFETY: forwarding the caller's arguments.
            let fd = unsafe { f(dirfd, path, flags, mode) };
            record_open(dirfd, path, flags, fd >= 0);
            fd
        }
    )*};
}
openat_like!(openat, openat64);

macro_rules! open2_like {
    ($($name:ident),*) => {$(
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(path: *const c_char, flags: c_int) -> c_int {
            let Some(f) = real!($name: fn(*const c_char, c_int) -> c_int) else { return -1 };
            // SAFETY: forwarding the caller's arguments.
            let fd = unsafe { f(path, flags) };
            record_open(AT_FDCWD, path, flags, fd >= 0);
            fd
        }
    )*};
}
open2_like!(__open_2, __open64_2);

macro_rules! openat2_like {
    ($($name:ident),*) => {$(
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(dirfd: c_int, path: *const c_char, flags: c_int) -> c_int {
            let Some(f) = real!($name: fn(c_int, *const c_char, c_int) -> c_int) else { return -1 };
            // SAFETY: forwarding the caller's arguments.
            let fd = unsafe { f(dirfd, path, flags) };
            record_open(dirfd, path, flags, fd >= 0);
            fd
        }
    )*};
}
openat2_like!(__openat_2, __openat64_2);

macro_rules! creat_like {
    ($($name:ident),*) => {$(
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(path: *const c_char, mode: mode_t) -> c_int {
            let Some(f) = real!($name: fn(*const c_char, mode_t) -> c_int) else { return -1 };
            // SAFETY: forwarding the caller's arguments.
            let fd = unsafe { f(path, mode) };
            if fd >= 0 {
                record(b'w', AT_FDCWD, path);
            }
            fd
        }
    )*};
}
creat_like!(creat, creat64);

macro_rules! fopen_like {
    ($($name:ident),*) => {$(
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(path: *const c_char, mode: *const c_char) -> *mut c_void {
            let Some(f) = real!($name: fn(*const c_char, *const c_char) -> *mut c_void) else {
                return core::ptr::null_mut();
            };
            // SAFETY: forwarding the caller's arguments.
            let file = unsafe { f(path, mode) };
            // SAFETY: fopen's mode is a NUL-terminated string.
            let mode = unsafe { c_bytes(mode) }.unwrap_or(b"r");
            let flags = if mode.first() == Some(&b'r') && !mode.contains(&b'+') { 0 } else { O_WRONLY | O_CREAT };
            record_open(AT_FDCWD, path, flags, !file.is_null());
            file
        }
    )*};
}
fopen_like!(fopen, fopen64);

macro_rules! freopen_like {
    ($($name:ident),*) => {$(
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(path: *const c_char, mode: *const c_char, stream: *mut c_void) -> *mut c_void {
            let Some(f) = real!($name: fn(*const c_char, *const c_char, *mut c_void) -> *mut c_void) else {
                return core::ptr::null_mut();
            };
            // SAFETY: forwarding the caller's arguments.
            let file = unsafe { f(path, mode, stream) };
            // SAFETY: as in fopen.
            let mode = unsafe { c_bytes(mode) }.unwrap_or(b"r");
            let flags = if mode.first() == Some(&b'r') && !mode.contains(&b'+') { 0 } else { O_WRONLY | O_CREAT };
            record_open(AT_FDCWD, path, flags, !file.is_null());
            file
        }
    )*};
}
freopen_like!(freopen, freopen64);

macro_rules! stat_like {
    ($($name:ident),*) => {$(
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(path: *const c_char, buf: *mut c_void) -> c_int {
            let Some(f) = real!($name: fn(*const c_char, *mut c_void) -> c_int) else { return -1 };
            // SAFETY: forwarding the caller's arguments.
            let r = unsafe { f(path, buf) };
            record_lookup(r == 0, b's', AT_FDCWD, path);
            r
        }
    )*};
}
stat_like!(stat, stat64, lstat, lstat64);

macro_rules! xstat_like {
    ($($name:ident),*) => {$(
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(ver: c_int, path: *const c_char, buf: *mut c_void) -> c_int {
            let Some(f) = real!($name: fn(c_int, *const c_char, *mut c_void) -> c_int) else { return -1 };
            // SAFETY: forwarding the caller's arguments.
            let r = unsafe { f(ver, path, buf) };
            record_lookup(r == 0, b's', AT_FDCWD, path);
            r
        }
    )*};
}
xstat_like!(__xstat, __xstat64, __lxstat, __lxstat64);

macro_rules! fstatat_like {
    ($($name:ident),*) => {$(
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(dirfd: c_int, path: *const c_char, buf: *mut c_void, flags: c_int) -> c_int {
            let Some(f) = real!($name: fn(c_int, *const c_char, *mut c_void, c_int) -> c_int) else { return -1 };
            // SAFETY: forwarding the caller's arguments.
            let r = unsafe { f(dirfd, path, buf, flags) };
            if flags & AT_EMPTY_PATH == 0 {
                record_lookup(r == 0, b's', dirfd, path);
            }
            r
        }
    )*};
}
fstatat_like!(fstatat, fstatat64, newfstatat);

macro_rules! fxstatat_like {
    ($($name:ident),*) => {$(
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(ver: c_int, dirfd: c_int, path: *const c_char, buf: *mut c_void, flags: c_int) -> c_int {
            let Some(f) = real!($name: fn(c_int, c_int, *const c_char, *mut c_void, c_int) -> c_int) else { return -1 };
            // SAFETY: forwarding the caller's arguments.
            let r = unsafe { f(ver, dirfd, path, buf, flags) };
            if flags & AT_EMPTY_PATH == 0 {
                record_lookup(r == 0, b's', dirfd, path);
            }
            r
        }
    )*};
}
fxstatat_like!(__fxstatat, __fxstatat64);

#[unsafe(no_mangle)]
pub unsafe extern "C" fn statx(dirfd: c_int, path: *const c_char, flags: c_int, mask: c_uint, buf: *mut c_void) -> c_int {
    let Some(f) = real!(statx: fn(c_int, *const c_char, c_int, c_uint, *mut c_void) -> c_int) else { return -1 };
    // SAFETY: forwarding the caller's arguments.
    let r = unsafe { f(dirfd, path, flags, mask, buf) };
    if flags & AT_EMPTY_PATH == 0 {
        record_lookup(r == 0, b's', dirfd, path);
    }
    r
}

macro_rules! access_like {
    ($($name:ident),*) => {$(
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(path: *const c_char, mode: c_int) -> c_int {
            let Some(f) = real!($name: fn(*const c_char, c_int) -> c_int) else { return -1 };
            // SAFETY: forwarding the caller's arguments.
            let r = unsafe { f(path, mode) };
            record_lookup(r == 0, b's', AT_FDCWD, path);
            r
        }
    )*};
}
access_like!(access, euidaccess, eaccess);

#[unsafe(no_mangle)]
pub unsafe extern "C" fn faccessat(dirfd: c_int, path: *const c_char, mode: c_int, flags: c_int) -> c_int {
    let Some(f) = real!(faccessat: fn(c_int, *const c_char, c_int, c_int) -> c_int) else { return -1 };
    // SAFETY: forwarding the caller's arguments.
    let r = unsafe { f(dirfd, path, mode, flags) };
    record_lookup(r == 0, b's', dirfd, path);
    r
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn readlink(path: *const c_char, buf: *mut c_char, size: size_t) -> ssize_t {
    let Some(f) = real!(readlink: fn(*const c_char, *mut c_char, size_t) -> ssize_t) else { return -1 };
    // SAFETY: forwarding the caller's arguments.
    let r = unsafe { f(path, buf, size) };
    record_readlink(r >= 0, AT_FDCWD, path);
    r
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn readlinkat(dirfd: c_int, path: *const c_char, buf: *mut c_char, size: size_t) -> ssize_t {
    let Some(f) = real!(readlinkat: fn(c_int, *const c_char, *mut c_char, size_t) -> ssize_t) else { return -1 };
    // SAFETY: forwarding the caller's arguments.
    let r = unsafe { f(dirfd, path, buf, size) };
    record_readlink(r >= 0, dirfd, path);
    r
}

fn record_readlink(ok: bool, dirfd: c_int, path: *const c_char) {
    // SAFETY: a NUL-terminated path from the caller.
    if unsafe { c_bytes(path) }.is_some_and(|p| p.starts_with(b"/proc/")) {
        return;
    }
    const EINVAL: c_int = 22;
    if !ok && errno() == EINVAL {
        record(b's', dirfd, path); // exists, not a link
    } else {
        record_lookup(ok, b'l', dirfd, path);
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn opendir(path: *const c_char) -> *mut c_void {
    let Some(f) = real!(opendir: fn(*const c_char) -> *mut c_void) else { return core::ptr::null_mut() };
    // SAFETY: forwarding the caller's arguments.
    let dir = unsafe { f(path) };
    record_lookup(!dir.is_null(), b'd', AT_FDCWD, path);
    dir
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fdopendir(fd: c_int) -> *mut c_void {
    let Some(f) = real!(fdopendir: fn(c_int) -> *mut c_void) else { return core::ptr::null_mut() };
    // SAFETY: forwarding the caller's arguments.
    let dir = unsafe { f(fd) };
    if !dir.is_null() {
        let saved = errno();
        let mut buf = [0u8; PATH_MAX];
        if let Some(n) = fd_path(fd, &mut buf) {
            emit(b'd', &[&buf[..n]]);
        }
        set_errno(saved);
    }
    dir
}

macro_rules! scandir_like {
    ($($name:ident),*) => {$(
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(path: *const c_char, list: *mut c_void, filter: *mut c_void, compare: *mut c_void) -> c_int {
            let Some(f) = real!($name: fn(*const c_char, *mut c_void, *mut c_void, *mut c_void) -> c_int) else { return -1 };
            // SAFETY: forwarding the caller's arguments.
            let n = unsafe { f(path, list, filter, compare) };
            record_lookup(n >= 0, b'd', AT_FDCWD, path);
            n
        }
    )*};
}
scandir_like!(scandir, scandir64);

#[unsafe(no_mangle)]
pub unsafe extern "C" fn mkdir(path: *const c_char, mode: mode_t) -> c_int {
    let Some(f) = real!(mkdir: fn(*const c_char, mode_t) -> c_int) else { return -1 };
    // SAFETY: forwarding the caller's arguments.
    let r = unsafe { f(path, mode) };
    if r == 0 {
        record(b'c', AT_FDCWD, path);
    }
    r
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn mkdirat(dirfd: c_int, path: *const c_char, mode: mode_t) -> c_int {
    let Some(f) = real!(mkdirat: fn(c_int, *const c_char, mode_t) -> c_int) else { return -1 };
    // SAFETY: forwarding the caller's arguments.
    let r = unsafe { f(dirfd, path, mode) };
    if r == 0 {
        record(b'c', dirfd, path);
    }
    r
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn mkdtemp(template: *mut c_char) -> *mut c_char {
    let Some(f) = real!(mkdtemp: fn(*mut c_char) -> *mut c_char) else { return core::ptr::null_mut() };
    // SAFETY: forwarding the caller's arguments.
    let r = unsafe { f(template) };
    if !r.is_null() {
        record(b'c', AT_FDCWD, r);
    }
    r
}

macro_rules! mkstemp_like {
    ($($name:ident),*) => {$(
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(template: *mut c_char) -> c_int {
            let Some(f) = real!($name: fn(*mut c_char) -> c_int) else { return -1 };
            // SAFETY: forwarding the caller's arguments.
            let fd = unsafe { f(template) };
            if fd >= 0 {
                record(b'w', AT_FDCWD, template);
            }
            fd
        }
    )*};
}
mkstemp_like!(mkstemp, mkstemp64);

macro_rules! mkstemp2_like {
    ($($name:ident),*) => {$(
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(template: *mut c_char, arg: c_int) -> c_int {
            let Some(f) = real!($name: fn(*mut c_char, c_int) -> c_int) else { return -1 };
            // SAFETY: forwarding the caller's arguments.
            let fd = unsafe { f(template, arg) };
            if fd >= 0 {
                record(b'w', AT_FDCWD, template);
            }
            fd
        }
    )*};
}
mkstemp2_like!(mkostemp, mkostemp64, mkstemps, mkstemps64);

macro_rules! mkstemp3_like {
    ($($name:ident),*) => {$(
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(template: *mut c_char, a: c_int, b: c_int) -> c_int {
            let Some(f) = real!($name: fn(*mut c_char, c_int, c_int) -> c_int) else { return -1 };
            // SAFETY: forwarding the caller's arguments.
            let fd = unsafe { f(template, a, b) };
            if fd >= 0 {
                record(b'w', AT_FDCWD, template);
            }
            fd
        }
    )*};
}
mkstemp3_like!(mkostemps, mkostemps64);

#[unsafe(no_mangle)]
pub unsafe extern "C" fn rename(from: *const c_char, to: *const c_char) -> c_int {
    let Some(f) = real!(rename: fn(*const c_char, *const c_char) -> c_int) else { return -1 };
    // SAFETY: forwarding the caller's arguments.
    let r = unsafe { f(from, to) };
    if r == 0 {
        record(b'w', AT_FDCWD, to);
    }
    r
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn renameat(fromfd: c_int, from: *const c_char, tofd: c_int, to: *const c_char) -> c_int {
    let Some(f) = real!(renameat: fn(c_int, *const c_char, c_int, *const c_char) -> c_int) else { return -1 };
    // SAFETY: forwarding the caller's arguments.
    let r = unsafe { f(fromfd, from, tofd, to) };
    if r == 0 {
        record(b'w', tofd, to);
    }
    r
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn renameat2(
    fromfd: c_int,
    from: *const c_char,
    tofd: c_int,
    to: *const c_char,
    flags: c_uint,
) -> c_int {
    let Some(f) = real!(renameat2: fn(c_int, *const c_char, c_int, *const c_char, c_uint) -> c_int) else {
        return -1;
    };
    // SAFETY: forwarding the caller's arguments.
    let r = unsafe { f(fromfd, from, tofd, to, flags) };
    if r == 0 {
        record(b'w', tofd, to);
    }
    r
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn link(from: *const c_char, to: *const c_char) -> c_int {
    let Some(f) = real!(link: fn(*const c_char, *const c_char) -> c_int) else { return -1 };
    // SAFETY: forwarding the caller's arguments.
    let r = unsafe { f(from, to) };
    if r == 0 {
        record(b'w', AT_FDCWD, to);
    }
    r
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn symlink(target: *const c_char, path: *const c_char) -> c_int {
    let Some(f) = real!(symlink: fn(*const c_char, *const c_char) -> c_int) else { return -1 };
    // SAFETY: forwarding the caller's arguments.
    let r = unsafe { f(target, path) };
    if r == 0 {
        record(b'w', AT_FDCWD, path);
    }
    r
}

macro_rules! getenv_like {
    ($($name:ident),*) => {$(
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(name: *const c_char) -> *mut c_char {
            let Some(f) = real!($name: fn(*const c_char) -> *mut c_char) else { return core::ptr::null_mut() };
            // SAFETY: forwarding the caller's arguments.
            let value = unsafe { f(name) };
            let saved = errno();
            // SAFETY: a NUL-terminated name from the caller.
            if let Some(n) = unsafe { c_bytes(name) } {
                emit(b'v', &[n]);
            }
            set_errno(saved);
            value
        }
    )*};
}
getenv_like!(getenv, secure_getenv);

#[unsafe(no_mangle)]
pub unsafe extern "C" fn execve(path: *const c_char, argv: *const *const c_char, envp: *const *const c_char) -> c_int {
    // SAFETY: the caller's arguments.
    unsafe { record_exec(path, false, envp) };
    let Some(f) = real!(execve: fn(*const c_char, *const *const c_char, *const *const c_char) -> c_int) else {
        return -1;
    };
    // SAFETY: forwarding the caller's arguments.
    unsafe { f(path, argv, envp) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn execv(path: *const c_char, argv: *const *const c_char) -> c_int {
    // SAFETY: the caller's arguments; the new image inherits this environment.
    unsafe { record_exec(path, false, environ) };
    let Some(f) = real!(execv: fn(*const c_char, *const *const c_char) -> c_int) else { return -1 };
    // SAFETY: forwarding the caller's arguments.
    unsafe { f(path, argv) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn execvp(file: *const c_char, argv: *const *const c_char) -> c_int {
    // SAFETY: as in execv.
    unsafe { record_exec(file, true, environ) };
    let Some(f) = real!(execvp: fn(*const c_char, *const *const c_char) -> c_int) else { return -1 };
    // SAFETY: forwarding the caller's arguments.
    unsafe { f(file, argv) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn execvpe(file: *const c_char, argv: *const *const c_char, envp: *const *const c_char) -> c_int {
    // SAFETY: as in execve.
    unsafe { record_exec(file, true, envp) };
    let Some(f) = real!(execvpe: fn(*const c_char, *const *const c_char, *const *const c_char) -> c_int) else {
        return -1;
    };
    // SAFETY: forwarding the caller's arguments.
    unsafe { f(file, argv, envp) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fexecve(fd: c_int, argv: *const *const c_char, envp: *const *const c_char) -> c_int {
    let mut buf = [0u8; PATH_MAX + 1];
    if let Some(n) = fd_path(fd, &mut buf[..PATH_MAX]) {
        buf[n] = 0;
        // SAFETY: a NUL-terminated path we built; the caller's environment.
        unsafe { record_exec(buf.as_ptr().cast(), false, envp) };
    }
    let Some(f) = real!(fexecve: fn(c_int, *const *const c_char, *const *const c_char) -> c_int) else { return -1 };
    // SAFETY: forwarding the caller's arguments.
    unsafe { f(fd, argv, envp) }
}

macro_rules! spawn_like {
    ($($name:ident, $search:expr);*) => {$(
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(
            pid: *mut pid_t,
            path: *const c_char,
            actions: *const c_void,
            attrs: *const c_void,
            argv: *const *const c_char,
            envp: *const *const c_char,
        ) -> c_int {
            // SAFETY: the caller's arguments.
            unsafe { record_exec(path, $search, envp) };
            let Some(f) = real!($name: fn(
                *mut pid_t, *const c_char, *const c_void, *const c_void, *const *const c_char, *const *const c_char
            ) -> c_int) else { return ENOENT };
            // SAFETY: forwarding the caller's arguments.
            unsafe { f(pid, path, actions, attrs, argv, envp) }
        }
    )*};
}
spawn_like!(posix_spawn, false; posix_spawnp, true);
