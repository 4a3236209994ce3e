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
//! record ops and their fields are listed in `../src/lib.rs` (its header, and `Record`). Records
//! are deduplicated per process through a lock-free table of hashes and an arena (except those
//! that account for processes, below). `errno` is preserved across the recording.
//!
//! The records that account for processes (the fields in `../src/lib.rs`): every process writes
//! `X exe pid` first; an exec-family call writes `x name resolved pid e` before the call (its own
//! pid, which the new program keeps) and `f pid` when the call returns (it failed); a successful
//! `posix_spawn` writes `x name resolved pid s` after the call, with the child's pid (a failed one
//! writes an `e` record with its own pid and an `f`). These are written every time (not
//! deduplicated), so the consumer can match each started program to the `X` it wrote and tell a
//! program that could not open the log (`ferry_observe::unaccounted`).
//!
//! What it cannot see is written as an `!` record, so the caller knows the observation is
//! incomplete: a program started that is statically linked or not an ELF it can load into, a
//! child whose environment dropped `LD_PRELOAD` or the log, a path too long to record, and what
//! glibc reads on its own behind an entry point: name-service lookups (`getpw*`, `getgr*`,
//! `gethostby*`, `getaddrinfo`, `getnameinfo`, `getservbyname`, `getprotobyname`: `!
//! name-service`), character set conversions and message catalogs (`iconv_open`, `catopen`) and
//! a locale other than the built-in C one (`setlocale`): `! locale-data`.
//! What it cannot see and cannot tell: raw system calls, `execl*` on architectures other than
//! x86_64 and aarch64 (C-variadic, wrapped by naked trampolines there; elsewhere a dynamic child
//! still observes itself), programs glibc starts itself (`system`, `popen`: their children observe
//! themselves), reading the whole environment (`environ`) instead of looking a variable up, files
//! the dynamic loader opens (recorded from `/proc/self/maps` at start), and other glibc-internal
//! reads (`newlocale`, time zone data for `localtime`).
#![no_std]
#![allow(clippy::missing_safety_doc, non_camel_case_types)]

use core::ffi::{c_char, c_int, c_uint, c_void};
use core::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicU64, AtomicUsize, Ordering};

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
    fn getpid() -> pid_t;
    fn fcntl(fd: c_int, cmd: c_int, arg: c_int) -> c_int;
    fn dl_iterate_phdr(
        callback: unsafe extern "C" fn(*mut DlPhdrInfo, size_t, *mut c_void) -> c_int,
        data: *mut c_void,
    ) -> c_int;
    static environ: *const *const c_char;
}

/// `struct dl_phdr_info` (64-bit ELF), as far as it is read here.
#[repr(C)]
struct DlPhdrInfo {
    addr: usize,
    name: *const c_char,
    phdr: *const Phdr,
    phnum: u16,
}

/// `Elf64_Phdr`.
#[repr(C)]
struct Phdr {
    kind: u32,
    flags: u32,
    offset: u64,
    vaddr: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
    align: u64,
}

const RTLD_NEXT: *mut c_void = -1isize as *mut c_void;
const AT_FDCWD: c_int = -100;
const O_ACCMODE: c_int = 3;
const O_WRONLY: c_int = 1;
const O_RDWR: c_int = 2;
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
    let mut pid = [0u8; 12];
    // SAFETY: getpid has no preconditions.
    let pid = pid_text(unsafe { getpid() }, &mut pid);
    // The first record of every process: with the pid, the consumer can tell that each program
    // an `x` record announced for that pid did write to the log.
    match exe {
        Some(exe) => emit_always(b'X', &[exe, pid]),
        None => emit(b'!', &[b"unknown-executable", pid]),
    }
    // SAFETY: getppid has no preconditions.
    let parent = unsafe { getppid() };
    let root = env_value(b"FERRY_OBSERVE_PARENT").and_then(parse_int) == Some(i64::from(parent));
    ROOT.store(root, Ordering::Relaxed);
    remember_own_preload();
    remember_initial_objects();
    // The files the loader mapped (shared libraries), for every process but the compiler itself,
    // whose libraries come with its toolchain.
    if !root {
        record_maps(exe.unwrap_or(b""));
    }
}

// ---------------------------------------------------------------------------------------------
// Whose code made a call
// ---------------------------------------------------------------------------------------------

/// Is this process the compile's first one (the compiler cargo named)?
static ROOT: AtomicBool = AtomicBool::new(false);

/// The executable segments of the objects loaded at process start: the program and its shared
/// libraries. Code outside them was loaded later (`dlopen`): a proc-macro, a plugin.
const MAX_SEGMENTS: usize = 512;
static mut INITIAL: [(usize, usize); MAX_SEGMENTS] = [(0, 0); MAX_SEGMENTS];
static INITIAL_LEN: AtomicUsize = AtomicUsize::new(0);
/// The load addresses of those objects (for telling which objects a `dlopen` added).
const MAX_OBJECTS: usize = 256;
static mut INITIAL_BASES: [usize; MAX_OBJECTS] = [0; MAX_OBJECTS];
static INITIAL_BASES_LEN: AtomicUsize = AtomicUsize::new(0);

fn remember_initial_objects() {
    unsafe extern "C" fn each(info: *mut DlPhdrInfo, _: size_t, _: *mut c_void) -> c_int {
        // SAFETY: the loader passes a valid record for the duration of the call; `init` runs
        // before any other thread of this process exists, so the tables have one writer.
        unsafe {
            let info = &*info;
            let bases = INITIAL_BASES_LEN.load(Ordering::Relaxed);
            if bases < MAX_OBJECTS {
                core::ptr::addr_of_mut!(INITIAL_BASES).cast::<usize>().add(bases).write(info.addr);
                INITIAL_BASES_LEN.store(bases + 1, Ordering::Relaxed);
            }
            for i in 0..usize::from(info.phnum) {
                let ph = &*info.phdr.add(i);
                const PT_LOAD: u32 = 1;
                const PF_X: u32 = 1;
                let n = INITIAL_LEN.load(Ordering::Relaxed);
                if ph.kind == PT_LOAD && ph.flags & PF_X != 0 && n < MAX_SEGMENTS {
                    let start = info.addr.wrapping_add(ph.vaddr as usize);
                    let slot = core::ptr::addr_of_mut!(INITIAL).cast::<(usize, usize)>().add(n);
                    slot.write((start, start.wrapping_add(ph.memsz as usize)));
                    INITIAL_LEN.store(n + 1, Ordering::Release);
                }
            }
        }
        0
    }
    // SAFETY: a plain libc call with a callback that only reads what it is given.
    unsafe { dl_iterate_phdr(each, core::ptr::null_mut()) };
}

/// Who looked something up, by the address the call returns to: `c` the compiler's own code (the
/// first process, code loaded at its start), `p` code loaded later (a proc-macro, a plugin; also
/// when the caller is unknown), `s` another process of the compile (the linker driver, a program
/// a proc-macro ran).
fn origin(caller: usize) -> u8 {
    let n = INITIAL_LEN.load(Ordering::Acquire);
    // SAFETY: the first `n` segments were written before `n` was published.
    let initial = caller != 0
        && (0..n).any(|i| {
            let (start, end) = unsafe { core::ptr::addr_of!(INITIAL).cast::<(usize, usize)>().add(i).read() };
            caller >= start && caller < end
        });
    if !initial {
        b'p'
    } else if ROOT.load(Ordering::Relaxed) {
        b'c'
    } else {
        b's'
    }
}

/// After a `dlopen`: records the objects loaded since the process started (what the call loaded,
/// with its dependencies) as mapped files, which the loader opened without going through `open`.
fn record_loaded_objects() {
    unsafe extern "C" fn each(info: *mut DlPhdrInfo, _: size_t, _: *mut c_void) -> c_int {
        // SAFETY: a valid record for the duration of the call; the base table is only read.
        unsafe {
            let info = &*info;
            let n = INITIAL_BASES_LEN.load(Ordering::Relaxed);
            let initial = (0..n).any(|i| core::ptr::addr_of!(INITIAL_BASES).cast::<usize>().add(i).read() == info.addr);
            // A name without a slash is the vDSO or the main program; a relative one was given to
            // dlopen relative to the cwd.
            if let Some(name) = c_bytes(info.name)
                && !initial
                && name.contains(&b'/')
                && !contains(name, b"libferry_observe")
            {
                let mut buf = [0u8; 2 * PATH_MAX];
                if let Some(abs) = absolute(AT_FDCWD, name, &mut buf) {
                    emit(b'm', &[abs]);
                }
            }
        }
        0
    }
    let saved = errno();
    // SAFETY: as in `remember_initial_objects`.
    unsafe { dl_iterate_phdr(each, core::ptr::null_mut()) };
    set_errno(saved);
}

/// Defines `$name` so that it calls `$inner` with the caller's return address as one more
/// argument (in the register after the last one), on the architectures where that can be had.
macro_rules! with_caller {
    ($name:ident($($arg:ident: $ty:ty),*) -> $ret:ty => $inner:ident, $x86:literal, $arm:literal) => {
        #[cfg(target_arch = "x86_64")]
        #[unsafe(naked)]
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name($($arg: $ty),*) -> $ret {
            core::arch::naked_asm!(concat!("mov ", $x86, ", [rsp]"), "jmp {inner}", inner = sym $inner)
        }
        #[cfg(target_arch = "aarch64")]
        #[unsafe(naked)]
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name($($arg: $ty),*) -> $ret {
            core::arch::naked_asm!(concat!("mov ", $arm, ", x30"), "b {inner}", inner = sym $inner)
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name($($arg: $ty),*) -> $ret {
            // SAFETY: forwarding the caller's arguments; the caller is unknown here.
            unsafe { $inner($($arg,)* 0) }
        }
    };
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
    write_record(op, fields, true);
}

/// Writes one record every time, even when this process wrote the same bytes before: the records
/// the consumer counts (`x`, `f`, `X`: a program run twice by one process must show twice).
fn emit_always(op: u8, fields: &[&[u8]]) {
    write_record(op, fields, false);
}

fn write_record(op: u8, fields: &[&[u8]], dedup: bool) {
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
    if dedup && !first_time(&buf[..len]) {
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

/// Records already written by this process: a table of (32-bit hash tag, offset) pairs whose
/// offsets point at a copy of the record in [`ARENA`]. A tag that matches is confirmed by comparing
/// the bytes, so a hash collision never drops a record; when the arena or a probe run is full,
/// the record is written again (a duplicate costs a few bytes, a dropped record a wrong key).
static SEEN: [AtomicU64; 1 << 15] = [const { AtomicU64::new(0) }; 1 << 15];

/// Bytes kept for de-duplication (`.bss`: only the pages used cost memory).
const ARENA_BYTES: usize = 1 << 20;

struct Arena(core::cell::UnsafeCell<[u8; ARENA_BYTES]>);

// SAFETY: each byte range is written once, by the thread that reserved it with `ARENA_USED`,
// before a Release store publishes its offset; readers load the offset with Acquire.
unsafe impl Sync for Arena {}

static ARENA: Arena = Arena(core::cell::UnsafeCell::new([0; ARENA_BYTES]));
static ARENA_USED: AtomicUsize = AtomicUsize::new(0);

/// True the first time a record is seen by this process.
fn first_time(record: &[u8]) -> bool {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in record {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let tag = (h >> 32) | 1;
    let mask = SEEN.len() - 1;
    let mut i = (h as usize) & mask;
    let mut copy: Option<u64> = None;
    for _ in 0..64 {
        let slot = SEEN[i].load(Ordering::Acquire);
        if slot == 0 {
            let offset = match copy {
                Some(o) => o,
                None => match arena_store(record) {
                    Some(o) => *copy.insert(o),
                    None => return true,
                },
            };
            match SEEN[i].compare_exchange(0, (tag << 32) | offset, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return true,
                Err(taken) if same(taken, tag, record) => return false,
                Err(_) => {}
            }
        } else if same(slot, tag, record) {
            return false;
        }
        i = (i + 1) & mask;
    }
    true
}

/// Copies a record into the arena (a 2-byte length, then the bytes); its offset.
fn arena_store(record: &[u8]) -> Option<u64> {
    let need = record.len() + 2;
    let start = ARENA_USED.fetch_add(need, Ordering::Relaxed);
    if start.checked_add(need)? > ARENA_BYTES || record.len() > usize::from(u16::MAX) {
        return None;
    }
    // SAFETY: [start, start + need) was reserved for this thread alone and lies in the arena.
    unsafe {
        let base = ARENA.0.get().cast::<u8>().add(start);
        let len = (record.len() as u16).to_le_bytes();
        core::ptr::copy_nonoverlapping(len.as_ptr(), base, 2);
        core::ptr::copy_nonoverlapping(record.as_ptr(), base.add(2), record.len());
    }
    Some(start as u64)
}

/// Does a table slot hold exactly this record?
fn same(slot: u64, tag: u64, record: &[u8]) -> bool {
    if slot >> 32 != tag {
        return false;
    }
    let start = (slot & 0xffff_ffff) as usize;
    // SAFETY: a published offset names a complete copy (written before the Release store).
    unsafe {
        let base = ARENA.0.get().cast::<u8>().add(start);
        let mut len = [0u8; 2];
        core::ptr::copy_nonoverlapping(base, len.as_mut_ptr(), 2);
        let len = usize::from(u16::from_le_bytes(len));
        len == record.len() && core::slice::from_raw_parts(base.add(2), len) == record
    }
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

/// A pid as decimal text, in `out`.
fn pid_text(pid: pid_t, out: &mut [u8; 12]) -> &[u8] {
    let n = write_int(i64::from(pid), out);
    &out[..n]
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

fn record_open(dirfd: c_int, path: *const c_char, flags: c_int, ok: bool, existed: bool) {
    let writes = flags & O_ACCMODE != 0 || flags & (O_CREAT | O_TRUNC | O_APPEND) != 0;
    if writes {
        if ok {
            // Opened for reading and writing without truncating what was there: its content
            // may have been read (an SQLite database a proc-macro queries), so it is an input.
            record(if existed { b'u' } else { b'w' }, dirfd, path);
        } else if flags & O_CREAT == 0 {
            record_lookup(false, b'w', dirfd, path);
        }
    } else {
        record_lookup(ok, b'r', dirfd, path);
    }
}

/// Whether an open with these flags can read a file's old content while writing it.
fn updates(flags: c_int) -> bool {
    flags & O_ACCMODE == O_RDWR && flags & O_TRUNC == 0
}

/// Whether `path` (relative to `dirfd`) exists, asked before an open that [`updates`] it: only
/// then is the file's old content an input. Not recorded (the open that follows is).
fn existed_before(dirfd: c_int, path: *const c_char, flags: c_int) -> bool {
    if !updates(flags) {
        return false;
    }
    if flags & O_CREAT == 0 {
        // Without O_CREAT an open succeeds only on a file that is there (and `existed` is read
        // only when it succeeded): no need to ask.
        return true;
    }
    let Some(f) = real!(faccessat: fn(c_int, *const c_char, c_int, c_int) -> c_int) else { return true };
    let saved = errno();
    // SAFETY: the caller's NUL-terminated path.
    let there = unsafe { f(dirfd, path, 0, 0) } == 0;
    set_errno(saved);
    there
}

/// The open(2) flags an `fopen` mode stands for, as far as recording needs them.
fn fopen_flags(mode: &[u8]) -> c_int {
    let plus = mode.contains(&b'+');
    match mode.first() {
        Some(b'r') if !plus => 0,
        Some(b'r') => O_RDWR,
        Some(b'a') if plus => O_RDWR | O_CREAT | O_APPEND,
        Some(b'w') if plus => O_RDWR | O_CREAT | O_TRUNC,
        _ => O_WRONLY | O_CREAT,
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
                preload |= entry.starts_with(b"LD_PRELOAD=") && contains(entry, own_preload());
                log |= entry.starts_with(b"FERRY_OBSERVE_LOG=");
            }
            p = p.add(1);
        }
    }
    preload && log
}

/// This library's path as the environment preloaded it (the first `LD_PRELOAD` entry at start:
/// ferry puts it first), which a child's environment must still name.
static mut OWN_PRELOAD: [u8; PATH_MAX] = [0; PATH_MAX];
static OWN_PRELOAD_LEN: AtomicUsize = AtomicUsize::new(0);

fn remember_own_preload() {
    let value = env_value(b"LD_PRELOAD").unwrap_or(b"");
    let first = &value[..value.iter().position(|&b| b == b':' || b == b' ').unwrap_or(value.len())];
    if first.len() < PATH_MAX {
        // SAFETY: called once from `init`, before any other thread exists.
        unsafe {
            core::ptr::copy_nonoverlapping(
                first.as_ptr(),
                core::ptr::addr_of_mut!(OWN_PRELOAD).cast::<u8>(),
                first.len(),
            )
        };
        OWN_PRELOAD_LEN.store(first.len(), Ordering::Release);
    }
}

fn own_preload() -> &'static [u8] {
    let n = OWN_PRELOAD_LEN.load(Ordering::Acquire);
    if n == 0 {
        return b"libferry_observe";
    }
    // SAFETY: written once in `init` before the length was published.
    unsafe { core::slice::from_raw_parts(core::ptr::addr_of!(OWN_PRELOAD).cast::<u8>(), n) }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

// ---------------------------------------------------------------------------------------------
// Programs started
// ---------------------------------------------------------------------------------------------

/// How a program is started: by an exec in the calling process (recorded before the call, with
/// the caller's pid), or by a spawn (recorded after it, with the child's pid: the child may have
/// written its `X` already).
#[derive(Clone, Copy, PartialEq)]
enum Start {
    Exec,
    Spawn,
}

/// Records a program about to run in process `pid`: `x name resolved pid how` (`how`: `e` for an
/// exec, `s` for a spawn), or `a` when it does not exist, and `!` when the observer will not see
/// inside it. True when the `x` record was written (so a failed exec is answered with
/// [`exec_failed`]).
unsafe fn record_exec(
    name: *const c_char,
    search: bool,
    envp: *const *const c_char,
    caller: usize,
    pid: pid_t,
    start: Start,
) -> bool {
    let saved = errno();
    if origin(caller) == b'p' {
        // A program started by a proc-macro may read its whole environment (a shell expanding
        // `$X` reads `environ`, never `getenv`): every variable it is given counts as looked up,
        // and so does which variables are set at all (`E`: one added later must miss).
        // SAFETY: the caller's environment array.
        unsafe { record_environment(envp) };
        // SAFETY: a NUL-terminated name from the caller (or null).
        if let Some(raw) = unsafe { c_bytes(name) } {
            emit(b'E', &[raw]);
        }
    }
    // SAFETY: a NUL-terminated program name from the caller.
    let Some(raw) = (unsafe { c_bytes(name) }) else {
        set_errno(saved);
        return false;
    };
    let mut resolved = [0u8; 2 * PATH_MAX];
    let found = if search && !raw.contains(&b'/') { search_path(raw, &mut resolved) } else {
        absolute(AT_FDCWD, raw, &mut resolved).map(<[u8]>::len)
    };
    let written = match found {
        Some(len) if exists(&resolved[..len]) => {
            let path = &resolved[..len];
            let mut text = [0u8; 12];
            let how: &[u8] = if start == Start::Spawn { b"s" } else { b"e" };
            emit_always(b'x', &[raw, path, pid_text(pid, &mut text), how]);
            check_loadable(path, 0);
            // SAFETY: the caller's environment array.
            if !unsafe { carries_observer(envp) } {
                emit(b'!', &[b"environment-drops-observer", path]);
            }
            true
        }
        Some(len) => {
            emit(b'a', &[&resolved[..len]]);
            false
        }
        None => {
            emit(b'a', &[raw]);
            false
        }
    };
    set_errno(saved);
    written
}

/// After an exec-family call returned (it failed): `f pid`, so the consumer expects no `X` from
/// the program the `x` record before it announced. Only when that `x` was written.
extern "C" fn exec_failed(written: usize) {
    if written != 0 {
        let saved = errno();
        let mut text = [0u8; 12];
        emit_always(b'f', &[pid_text(own_pid(), &mut text)]);
        set_errno(saved);
    }
}

/// This process's pid (the one an exec keeps).
fn own_pid() -> pid_t {
    // SAFETY: getpid has no preconditions.
    unsafe { getpid() }
}

/// Records every variable of an environment array as looked up by plugin code, except the
/// observer's own.
unsafe fn record_environment(envp: *const *const c_char) {
    if envp.is_null() {
        return;
    }
    // SAFETY: the caller passes a NULL-terminated array of C strings.
    unsafe {
        let mut p = envp;
        while !(*p).is_null() {
            if let Some(entry) = c_bytes(*p) {
                let name = &entry[..entry.iter().position(|&b| b == b'=').unwrap_or(entry.len())];
                if name != b"LD_PRELOAD" && !name.starts_with(b"FERRY_OBSERVE_") && !name.is_empty() {
                    emit(b'v', &[name, b"p"]);
                }
            }
            p = p.add(1);
        }
    }
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
            let existed = existed_before(AT_FDCWD, path, flags);
            // SAFETY: forwarding the caller's arguments.
            let fd = unsafe { f(path, flags, mode) };
            record_open(AT_FDCWD, path, flags, fd >= 0, existed);
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
            let existed = existed_before(dirfd, path, flags);
            // SAFETY: forwarding the caller's arguments.
            let fd = unsafe { f(dirfd, path, flags, mode) };
            record_open(dirfd, path, flags, fd >= 0, existed);
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
            let existed = existed_before(AT_FDCWD, path, flags);
            // SAFETY: forwarding the caller's arguments.
            let fd = unsafe { f(path, flags) };
            record_open(AT_FDCWD, path, flags, fd >= 0, existed);
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
            let existed = existed_before(dirfd, path, flags);
            // SAFETY: forwarding the caller's arguments.
            let fd = unsafe { f(dirfd, path, flags) };
            record_open(dirfd, path, flags, fd >= 0, existed);
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
            // SAFETY: fopen's mode is a NUL-terminated string.
            let flags = fopen_flags(unsafe { c_bytes(mode) }.unwrap_or(b"r"));
            let existed = existed_before(AT_FDCWD, path, flags);
            // SAFETY: forwarding the caller's arguments.
            let file = unsafe { f(path, mode) };
            record_open(AT_FDCWD, path, flags, !file.is_null(), existed);
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
            // SAFETY: as in fopen.
            let flags = fopen_flags(unsafe { c_bytes(mode) }.unwrap_or(b"r"));
            let existed = existed_before(AT_FDCWD, path, flags);
            // SAFETY: forwarding the caller's arguments.
            let file = unsafe { f(path, mode, stream) };
            record_open(AT_FDCWD, path, flags, !file.is_null(), existed);
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

with_caller!(getenv(name: *const c_char) -> *mut c_char => getenv_from, "rsi", "x1");
with_caller!(secure_getenv(name: *const c_char) -> *mut c_char => secure_getenv_from, "rsi", "x1");

macro_rules! getenv_like {
    ($($inner:ident => $name:ident),*) => {$(
        /// The lookup, recorded with who made it (see [`origin`]).
        unsafe extern "C" fn $inner(name: *const c_char, caller: usize) -> *mut c_char {
            let Some(f) = real!($name: fn(*const c_char) -> *mut c_char) else { return core::ptr::null_mut() };
            // SAFETY: forwarding the caller's arguments.
            let value = unsafe { f(name) };
            let saved = errno();
            // SAFETY: a NUL-terminated name from the caller.
            if let Some(n) = unsafe { c_bytes(name) } {
                emit(b'v', &[n, &[origin(caller)]]);
            }
            set_errno(saved);
            value
        }
    )*};
}
getenv_like!(getenv_from => getenv, secure_getenv_from => secure_getenv);

type Argv = *const *const c_char;

with_caller!(execve(path: *const c_char, argv: Argv, envp: Argv) -> c_int => execve_from, "rcx", "x3");
unsafe extern "C" fn execve_from(path: *const c_char, argv: Argv, envp: Argv, caller: usize) -> c_int {
    // SAFETY: the caller's arguments.
    let written = unsafe { record_exec(path, false, envp, caller, own_pid(), Start::Exec) };
    // SAFETY: forwarding the caller's arguments.
    exec_returned(written, || real!(execve: fn(*const c_char, Argv, Argv) -> c_int).map(|f| unsafe { f(path, argv, envp) }))
}

with_caller!(execv(path: *const c_char, argv: Argv) -> c_int => execv_from, "rdx", "x2");
unsafe extern "C" fn execv_from(path: *const c_char, argv: Argv, caller: usize) -> c_int {
    // SAFETY: the caller's arguments; the new image inherits this environment.
    let written = unsafe { record_exec(path, false, environ, caller, own_pid(), Start::Exec) };
    // SAFETY: forwarding the caller's arguments.
    exec_returned(written, || real!(execv: fn(*const c_char, Argv) -> c_int).map(|f| unsafe { f(path, argv) }))
}

with_caller!(execvp(file: *const c_char, argv: Argv) -> c_int => execvp_from, "rdx", "x2");
unsafe extern "C" fn execvp_from(file: *const c_char, argv: Argv, caller: usize) -> c_int {
    // SAFETY: as in execv.
    let written = unsafe { record_exec(file, true, environ, caller, own_pid(), Start::Exec) };
    // SAFETY: forwarding the caller's arguments.
    exec_returned(written, || real!(execvp: fn(*const c_char, Argv) -> c_int).map(|f| unsafe { f(file, argv) }))
}

with_caller!(execvpe(file: *const c_char, argv: Argv, envp: Argv) -> c_int => execvpe_from, "rcx", "x3");
unsafe extern "C" fn execvpe_from(file: *const c_char, argv: Argv, envp: Argv, caller: usize) -> c_int {
    // SAFETY: as in execve.
    let written = unsafe { record_exec(file, true, envp, caller, own_pid(), Start::Exec) };
    // SAFETY: forwarding the caller's arguments.
    exec_returned(written, || real!(execvpe: fn(*const c_char, Argv, Argv) -> c_int).map(|f| unsafe { f(file, argv, envp) }))
}

with_caller!(fexecve(fd: c_int, argv: Argv, envp: Argv) -> c_int => fexecve_from, "rcx", "x3");
unsafe extern "C" fn fexecve_from(fd: c_int, argv: Argv, envp: Argv, caller: usize) -> c_int {
    let mut buf = [0u8; PATH_MAX + 1];
    let mut written = false;
    if let Some(n) = fd_path(fd, &mut buf[..PATH_MAX]) {
        buf[n] = 0;
        // SAFETY: a NUL-terminated path we built; the caller's environment.
        written = unsafe { record_exec(buf.as_ptr().cast(), false, envp, caller, own_pid(), Start::Exec) };
    }
    // SAFETY: forwarding the caller's arguments.
    exec_returned(written, || real!(fexecve: fn(c_int, Argv, Argv) -> c_int).map(|f| unsafe { f(fd, argv, envp) }))
}

with_caller!(execveat(dirfd: c_int, path: *const c_char, argv: Argv, envp: Argv, flags: c_int) -> c_int
    => execveat_from, "r9", "x5");
unsafe extern "C" fn execveat_from(
    dirfd: c_int,
    path: *const c_char,
    argv: Argv,
    envp: Argv,
    flags: c_int,
    caller: usize,
) -> c_int {
    let mut buf = [0u8; 2 * PATH_MAX + 1];
    // SAFETY: a NUL-terminated path from the caller (or null).
    let raw = unsafe { c_bytes(path) }.unwrap_or(b"");
    let found = if raw.is_empty() && flags & AT_EMPTY_PATH != 0 {
        fd_path(dirfd, &mut buf[..PATH_MAX])
    } else {
        let mut abs = [0u8; 2 * PATH_MAX];
        absolute(dirfd, raw, &mut abs).map(|p| {
            buf[..p.len()].copy_from_slice(p);
            p.len()
        })
    };
    let mut written = false;
    if let Some(n) = found {
        buf[n] = 0;
        // SAFETY: a NUL-terminated path we built; the caller's environment.
        written = unsafe { record_exec(buf.as_ptr().cast(), false, envp, caller, own_pid(), Start::Exec) };
    }
    // SAFETY: forwarding the caller's arguments.
    exec_returned(written, || real!(execveat: fn(c_int, *const c_char, Argv, Argv, c_int) -> c_int).map(|f| unsafe { f(dirfd, path, argv, envp, flags) }))
}

/// The end of every exec wrapper: the real call's answer (-1 when libc lacks the function) and,
/// since it returned, the `f` record of an exec that failed (`written`: its `x` record was).
fn exec_returned(written: bool, call: impl FnOnce() -> Option<c_int>) -> c_int {
    let Some(r) = call() else { return -1 };
    exec_failed(usize::from(written));
    r
}

/// `execl`, `execlp` and `execle` take their arguments C-variadic (a NULL-terminated list, then
/// for `execle` the environment), which stable Rust cannot receive. On x86_64 and aarch64 a naked
/// trampoline saves the argument registers, lets [`execl_record`] walk the list (the registers,
/// then the caller's stack) and record the program, calls the real function with the registers
/// restored and the stack arguments copied below its own frame, and when that returns (the exec
/// failed) writes `f`. Elsewhere they are not wrapped: a dynamic child still observes itself, and
/// the consumer sees its `X` record without an `x` for it.
macro_rules! execl_like {
    ($($name:ident, $kind:expr);*) => {$(
        /// x86_64: integer arguments in rdi, rsi, rdx, rcx, r8, r9, then on the stack from
        /// [rsp+8]; al holds the number of vector registers a variadic call used (restored for the
        /// real function). The frame: rbp = entry rsp - 8 (16-byte aligned); [rbp-72..rbp-24] the
        /// six argument registers in order, [rbp-24] rax, [rbp-16] the number of stack words the
        /// list used, [rbp-8] whether an `x` was written.
        #[cfg(target_arch = "x86_64")]
        #[unsafe(naked)]
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(path: *const c_char, arg: *const c_char) -> c_int {
            core::arch::naked_asm!(
                "push rbp",
                "mov rbp, rsp",
                "sub rsp, 80",
                "mov [rbp - 72], rdi",
                "mov [rbp - 64], rsi",
                "mov [rbp - 56], rdx",
                "mov [rbp - 48], rcx",
                "mov [rbp - 40], r8",
                "mov [rbp - 32], r9",
                "mov [rbp - 24], rax",
                "lea rsi, [rbp - 72]",
                "lea rdx, [rbp + 16]",
                "mov rcx, [rbp + 8]",
                "mov r8d, {kind}",
                "lea r9, [rbp - 16]",
                "call {record}",
                "mov r11, rax",
                // Room for the stack arguments (an even number of words keeps rsp aligned).
                "mov rcx, [rbp - 16]",
                "lea rax, [rcx + 1]",
                "and rax, -2",
                "shl rax, 3",
                "sub rsp, rax",
                "xor eax, eax",
                "2:",
                "cmp rax, rcx",
                "jae 3f",
                "mov r10, [rbp + 16 + rax * 8]",
                "mov [rsp + rax * 8], r10",
                "inc rax",
                "jmp 2b",
                "3:",
                "mov rdi, [rbp - 72]",
                "mov rsi, [rbp - 64]",
                "mov rdx, [rbp - 56]",
                "mov rcx, [rbp - 48]",
                "mov r8, [rbp - 40]",
                "mov r9, [rbp - 32]",
                "mov rax, [rbp - 24]",
                "call r11",
                // Returned: the exec failed. Keep the result while `f` is written.
                "lea rsp, [rbp - 80]",
                "mov [rbp - 24], rax",
                "mov rdi, [rbp - 8]",
                "call {failed}",
                "mov rax, [rbp - 24]",
                "leave",
                "ret",
                kind = const $kind,
                record = sym execl_record,
                failed = sym exec_failed,
            )
        }

        /// aarch64 (AAPCS64 as Linux uses it): variadic integer arguments in x0-x7, then on the
        /// stack from the entry sp. The frame (96 bytes): x29/x30, then x0-x7 at [sp+16..sp+80],
        /// [sp+80] the number of stack words the list used (later the result), [sp+88] whether an
        /// `x` was written.
        #[cfg(target_arch = "aarch64")]
        #[unsafe(naked)]
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(path: *const c_char, arg: *const c_char) -> c_int {
            core::arch::naked_asm!(
                "stp x29, x30, [sp, #-96]!",
                "mov x29, sp",
                "stp x0, x1, [sp, #16]",
                "stp x2, x3, [sp, #32]",
                "stp x4, x5, [sp, #48]",
                "stp x6, x7, [sp, #64]",
                "add x1, sp, #16",
                "add x2, sp, #96",
                "mov x3, x30",
                "mov x4, #{kind}",
                "add x5, sp, #80",
                "bl {record}",
                "mov x16, x0",
                // Room for the stack arguments (an even number of words keeps sp aligned).
                "ldr x9, [x29, #80]",
                "add x10, x9, #1",
                "and x10, x10, #0xfffffffffffffffe",
                "lsl x10, x10, #3",
                "sub sp, sp, x10",
                "add x12, x29, #96",
                "mov x11, #0",
                "2:",
                "cmp x11, x9",
                "b.hs 3f",
                "ldr x13, [x12, x11, lsl #3]",
                "str x13, [sp, x11, lsl #3]",
                "add x11, x11, #1",
                "b 2b",
                "3:",
                "ldp x0, x1, [x29, #16]",
                "ldp x2, x3, [x29, #32]",
                "ldp x4, x5, [x29, #48]",
                "ldp x6, x7, [x29, #64]",
                "blr x16",
                // Returned: the exec failed. Keep the result while `f` is written.
                "mov sp, x29",
                "str x0, [sp, #80]",
                "ldr x0, [sp, #88]",
                "bl {failed}",
                "ldr x0, [sp, #80]",
                "ldp x29, x30, [sp], #96",
                "ret",
                kind = const $kind,
                record = sym execl_record,
                failed = sym exec_failed,
            )
        }
    )*};
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const EXECL: usize = 0;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const EXECLP: usize = 1;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const EXECLE: usize = 2;

/// How many integer arguments a variadic call passes in registers before the stack.
#[cfg(target_arch = "x86_64")]
const ARG_REGISTERS: usize = 6;
#[cfg(target_arch = "aarch64")]
const ARG_REGISTERS: usize = 8;

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
execl_like!(execl, EXECL; execlp, EXECLP; execle, EXECLE);

/// For the `execl*` trampolines: walks the argument list (word 0 is `path`, in the first saved
/// register; words past the registers are on the caller's stack), records the program, and
/// returns the real function to call. `out[0]` gets the number of words the list has on the
/// stack (the trampoline copies them for the real function), `out[1]` whether `x` was written.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
unsafe extern "C" fn execl_record(
    path: *const c_char,
    registers: *const usize,
    stack: *const usize,
    caller: usize,
    kind: usize,
    out: *mut [usize; 2],
) -> usize {
    // SAFETY: the trampoline saved ARG_REGISTERS words at `registers`; the caller passed a
    // NULL-terminated list (then, for execle, the environment), whose words past the registers
    // are at `stack`, one per argument.
    let word = |i: usize| unsafe { if i < ARG_REGISTERS { *registers.add(i) } else { *stack.add(i - ARG_REGISTERS) } };
    let mut end = 1;
    while word(end) != 0 {
        end += 1;
    }
    let (envp, words) = if kind == EXECLE { (word(end + 1) as Argv, end + 2) } else { (environ_now(), end + 1) };
    // SAFETY: the caller's program name and environment.
    let written = unsafe { record_exec(path, kind == EXECLP, envp, caller, own_pid(), Start::Exec) };
    // SAFETY: the trampoline passes its two out slots.
    unsafe { *out = [words.saturating_sub(ARG_REGISTERS), usize::from(written)] };
    let real = match kind {
        EXECL => real!(execl: fn(*const c_char, *const c_char) -> c_int),
        EXECLP => real!(execlp: fn(*const c_char, *const c_char) -> c_int),
        _ => real!(execle: fn(*const c_char, *const c_char) -> c_int),
    };
    match real {
        Some(f) => f as usize,
        None => exec_unavailable as *const () as usize,
    }
}

/// What an `execl*` trampoline calls when libc has no such function.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
extern "C" fn exec_unavailable() -> c_int {
    const ENOSYS: c_int = 38;
    set_errno(ENOSYS);
    -1
}

/// The environment a new image inherits.
fn environ_now() -> Argv {
    // SAFETY: reading libc's pointer to the current environment.
    unsafe { environ }
}

/// `posix_spawn` and `posix_spawnp` take six arguments, so the caller travels on the stack as the
/// seventh (x86_64) or in the seventh register (aarch64). The `x` record is written after the
/// call, with the child's pid (the real call stores it; into a local when the caller passed no
/// place for it); when the call fails, with this process's pid and an `f` after it.
macro_rules! spawn_like {
    ($($name:ident, $inner:ident, $search:expr);*) => {$(
        #[cfg(target_arch = "x86_64")]
        #[unsafe(naked)]
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(
            pid: *mut pid_t, path: *const c_char, actions: *const c_void, attrs: *const c_void, argv: Argv, envp: Argv,
        ) -> c_int {
            core::arch::naked_asm!(
                "mov rax, [rsp]",
                "push rax",
                "call {inner}",
                "add rsp, 8",
                "ret",
                inner = sym $inner,
            )
        }
        #[cfg(target_arch = "aarch64")]
        #[unsafe(naked)]
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(
            pid: *mut pid_t, path: *const c_char, actions: *const c_void, attrs: *const c_void, argv: Argv, envp: Argv,
        ) -> c_int {
            core::arch::naked_asm!("mov x6, x30", "b {inner}", inner = sym $inner)
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(
            pid: *mut pid_t, path: *const c_char, actions: *const c_void, attrs: *const c_void, argv: Argv, envp: Argv,
        ) -> c_int {
            // SAFETY: forwarding the caller's arguments; the caller is unknown here.
            unsafe { $inner(pid, path, actions, attrs, argv, envp, 0) }
        }

        unsafe extern "C" fn $inner(
            pid: *mut pid_t,
            path: *const c_char,
            actions: *const c_void,
            attrs: *const c_void,
            argv: Argv,
            envp: Argv,
            caller: usize,
        ) -> c_int {
            let Some(f) = real!($name: fn(*mut pid_t, *const c_char, *const c_void, *const c_void, Argv, Argv) -> c_int)
            else {
                return ENOENT;
            };
            let mut own: pid_t = 0;
            let child = if pid.is_null() { &raw mut own } else { pid };
            // SAFETY: forwarding the caller's arguments (a place for the pid of our own when the
            // caller gave none: the real call then stores it there instead of nowhere).
            let r = unsafe { f(child, path, actions, attrs, argv, envp) };
            if r == 0 {
                // SAFETY: the caller's arguments; the real call stored the child's pid.
                unsafe { record_exec(path, $search, envp, caller, *child, Start::Spawn) };
            } else {
                // No child runs it: recorded as an exec of this process that failed.
                // SAFETY: the caller's arguments.
                let written = unsafe { record_exec(path, $search, envp, caller, own_pid(), Start::Exec) };
                exec_failed(usize::from(written));
            }
            r
        }
    )*};
}
spawn_like!(posix_spawn, posix_spawn_from, false; posix_spawnp, posix_spawnp_from, true);

// ---------------------------------------------------------------------------------------------
// Code loaded at run time, and the network
// ---------------------------------------------------------------------------------------------

#[unsafe(no_mangle)]
pub unsafe extern "C" fn dlopen(file: *const c_char, mode: c_int) -> *mut c_void {
    let Some(f) = real!(dlopen: fn(*const c_char, c_int) -> *mut c_void) else { return core::ptr::null_mut() };
    // SAFETY: forwarding the caller's arguments.
    let handle = unsafe { f(file, mode) };
    if !handle.is_null() {
        record_loaded_objects();
    }
    handle
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn dlmopen(namespace: isize, file: *const c_char, mode: c_int) -> *mut c_void {
    let Some(f) = real!(dlmopen: fn(isize, *const c_char, c_int) -> *mut c_void) else {
        return core::ptr::null_mut();
    };
    // SAFETY: forwarding the caller's arguments.
    let handle = unsafe { f(namespace, file, mode) };
    if !handle.is_null() {
        record_loaded_objects();
    }
    handle
}

/// A socket address's family (the first two bytes of every `sockaddr`).
unsafe fn family(addr: *const c_void) -> u16 {
    if addr.is_null() {
        return 0;
    }
    let mut family = [0u8; 2];
    // SAFETY: every sockaddr starts with a 2-byte family.
    unsafe { core::ptr::copy_nonoverlapping(addr.cast::<u8>(), family.as_mut_ptr(), 2) };
    u16::from_ne_bytes(family)
}

/// Data from a socket can reach the output and cannot be keyed: the observation is incomplete.
/// Netlink (the kernel's own answers, e.g. `getifaddrs`) is not a peer.
fn record_network(what: &[u8], family: u16) {
    const AF_NETLINK: u16 = 16;
    if family == AF_NETLINK {
        return;
    }
    let saved = errno();
    let mut text = [0u8; 8];
    let n = write_int(i64::from(family), &mut text);
    emit(b'!', &[what, &text[..n]]);
    set_errno(saved);
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn connect(fd: c_int, addr: *const c_void, len: u32) -> c_int {
    // SAFETY: the caller's address.
    record_network(b"network-connect", unsafe { family(addr) });
    let Some(f) = real!(connect: fn(c_int, *const c_void, u32) -> c_int) else { return -1 };
    // SAFETY: forwarding the caller's arguments.
    unsafe { f(fd, addr, len) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn bind(fd: c_int, addr: *const c_void, len: u32) -> c_int {
    // SAFETY: the caller's address.
    record_network(b"network-bind", unsafe { family(addr) });
    let Some(f) = real!(bind: fn(c_int, *const c_void, u32) -> c_int) else { return -1 };
    // SAFETY: forwarding the caller's arguments.
    unsafe { f(fd, addr, len) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn sendto(
    fd: c_int,
    buf: *const c_void,
    n: size_t,
    flags: c_int,
    addr: *const c_void,
    len: u32,
) -> ssize_t {
    if !addr.is_null() {
        // SAFETY: the caller's address.
        record_network(b"network-send", unsafe { family(addr) });
    }
    let Some(f) = real!(sendto: fn(c_int, *const c_void, size_t, c_int, *const c_void, u32) -> ssize_t) else {
        return -1;
    };
    // SAFETY: forwarding the caller's arguments.
    unsafe { f(fd, buf, n, flags, addr, len) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn sendmsg(fd: c_int, msg: *const c_void, flags: c_int) -> ssize_t {
    if !msg.is_null() {
        // `struct msghdr` starts with `void *msg_name`.
        // SAFETY: the caller's message header.
        let name = unsafe { *msg.cast::<*const c_void>() };
        if !name.is_null() {
            // SAFETY: a sockaddr the caller named.
            record_network(b"network-send", unsafe { family(name) });
        }
    }
    let Some(f) = real!(sendmsg: fn(c_int, *const c_void, c_int) -> ssize_t) else { return -1 };
    // SAFETY: forwarding the caller's arguments.
    unsafe { f(fd, msg, flags) }
}

// ---------------------------------------------------------------------------------------------
// What glibc reads on its own
// ---------------------------------------------------------------------------------------------

/// Records `! reason function`, keeping errno as the real call left it.
fn record_unseen(reason: &[u8], function: &[u8]) {
    let saved = errno();
    emit(b'!', &[reason, function]);
    set_errno(saved);
}

type uid_t = c_uint;
type gid_t = c_uint;
type socklen_t = u32;

/// Functions through which glibc reads what the wrapped functions never see: each call is
/// forwarded, then recorded as `! reason function`; `else` is the answer when libc lacks it.
macro_rules! unseen {
    ($reason:literal; $($name:ident($($arg:ident: $ty:ty),*) -> $ret:ty, else $fail:expr;)*) => {$(
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name($($arg: $ty),*) -> $ret {
            let Some(f) = real!($name: fn($($ty),*) -> $ret) else { return $fail };
            // SAFETY: forwarding the caller's arguments.
            let r = unsafe { f($($arg),*) };
            record_unseen($reason, stringify!($name).as_bytes());
            r
        }
    )*};
}

/// What a lookup answers when libc has no such function: not found.
const NONE: *mut c_void = core::ptr::null_mut();
/// `EAI_FAIL`.
const EAI_FAIL: c_int = -4;

/// Name-service lookups: glibc answers them from what `/etc/nsswitch.conf` names (files it opens
/// internally, nscd over a socket, NIS, LDAP, DNS, systemd-resolved), none of which goes through
/// the wrapped functions: `! name-service function`.
unseen! {
    b"name-service";
    getpwnam(name: *const c_char) -> *mut c_void, else NONE;
    getpwuid(uid: uid_t) -> *mut c_void, else NONE;
    getpwnam_r(name: *const c_char, pwd: *mut c_void, buf: *mut c_char, len: size_t, result: *mut *mut c_void) -> c_int,
        else ENOENT;
    getpwuid_r(uid: uid_t, pwd: *mut c_void, buf: *mut c_char, len: size_t, result: *mut *mut c_void) -> c_int,
        else ENOENT;
    getpwent() -> *mut c_void, else NONE;
    getgrnam(name: *const c_char) -> *mut c_void, else NONE;
    getgrgid(gid: gid_t) -> *mut c_void, else NONE;
    getgrnam_r(name: *const c_char, grp: *mut c_void, buf: *mut c_char, len: size_t, result: *mut *mut c_void) -> c_int,
        else ENOENT;
    getgrgid_r(gid: gid_t, grp: *mut c_void, buf: *mut c_char, len: size_t, result: *mut *mut c_void) -> c_int,
        else ENOENT;
    getgrent() -> *mut c_void, else NONE;
    gethostbyname(name: *const c_char) -> *mut c_void, else NONE;
    gethostbyname2(name: *const c_char, family: c_int) -> *mut c_void, else NONE;
    gethostbyaddr(addr: *const c_void, len: socklen_t, family: c_int) -> *mut c_void, else NONE;
    getaddrinfo(node: *const c_char, service: *const c_char, hints: *const c_void, res: *mut *mut c_void) -> c_int,
        else EAI_FAIL;
    getnameinfo(
        addr: *const c_void, len: socklen_t, host: *mut c_char, hostlen: socklen_t, serv: *mut c_char,
        servlen: socklen_t, flags: c_int
    ) -> c_int, else EAI_FAIL;
    getservbyname(name: *const c_char, proto: *const c_char) -> *mut c_void, else NONE;
    getprotobyname(name: *const c_char) -> *mut c_void, else NONE;
}

/// Locale data glibc reads on its own (`! locale-data function`): character set conversions
/// (`gconv-modules` or its cache, and converter modules it loads) and message catalogs (found
/// through `NLSPATH` and the locale). Without the function: -1 (`(iconv_t) -1`, `(nl_catd) -1`).
unseen! {
    b"locale-data";
    iconv_open(to: *const c_char, from: *const c_char) -> *mut c_void, else usize::MAX as *mut c_void;
    catopen(name: *const c_char, flag: c_int) -> *mut c_void, else usize::MAX as *mut c_void;
}

with_caller!(setlocale(category: c_int, locale: *const c_char) -> *mut c_char => setlocale_from, "rdx", "x2");

/// Changing the locale: for `""` glibc picks each category's locale from the environment (read
/// internally: the variables are recorded here as looked up); any locale but the built-in `C` (or
/// `POSIX`) is loaded from files glibc opens internally (`locale-archive`, `LC_*` files under
/// `LOCPATH` or the system directory), and a locale asked for and missing was looked for there:
/// `! locale-data setlocale`. A query (null locale) changes nothing.
unsafe extern "C" fn setlocale_from(category: c_int, locale: *const c_char, caller: usize) -> *mut c_char {
    let Some(f) = real!(setlocale: fn(c_int, *const c_char) -> *mut c_char) else { return core::ptr::null_mut() };
    // SAFETY: forwarding the caller's arguments.
    let r = unsafe { f(category, locale) };
    if locale.is_null() {
        return r;
    }
    let saved = errno();
    // SAFETY: a NUL-terminated locale name from the caller.
    if unsafe { c_bytes(locale) } == Some(b"") {
        record_locale_variables(category, origin(caller));
    }
    // SAFETY: setlocale returns a NUL-terminated name, or null.
    let built_in = matches!(unsafe { c_bytes(r) }, Some(b"C" | b"POSIX"));
    if !built_in {
        emit(b'!', &[b"locale-data", b"setlocale"]);
    }
    set_errno(saved);
    r
}

/// The variables glibc consults for `setlocale(category, "")`: `LC_ALL`, the category's own,
/// `LANG` (for `LC_ALL`: every category's).
fn record_locale_variables(category: c_int, by: u8) {
    /// glibc's category numbers, in order (6 is `LC_ALL`).
    const NAMES: [&[u8]; 13] = [
        b"LC_CTYPE",
        b"LC_NUMERIC",
        b"LC_TIME",
        b"LC_COLLATE",
        b"LC_MONETARY",
        b"LC_MESSAGES",
        b"LC_ALL",
        b"LC_PAPER",
        b"LC_NAME",
        b"LC_ADDRESS",
        b"LC_TELEPHONE",
        b"LC_MEASUREMENT",
        b"LC_IDENTIFICATION",
    ];
    const LC_ALL: c_int = 6;
    emit(b'v', &[b"LC_ALL", &[by]]);
    emit(b'v', &[b"LANG", &[by]]);
    for (i, name) in NAMES.iter().enumerate() {
        if i as c_int != LC_ALL && (category == LC_ALL || category == i as c_int) {
            emit(b'v', &[name, &[by]]);
        }
    }
}
