//! The toolchain archive: a deterministic tar, gzip-compressed in parallel, and its checked unpacking.
//!
//! Determinism: entries in manifest order, the manifest first (at [`ARCHIVE_MANIFEST_PATH`]), mtime,
//! uid and gid zeroed, no user or group names, modes normalised to 0755/0644. The tar stream is cut
//! into fixed 1 MiB chunks, each compressed on its own into a gzip member, at a level fixed by its
//! position ([`LEVELS`]); members are concatenated in order (a valid multi-member gzip that
//! `tar -xzf` reads). Fixed cut points make the bytes the same however many threads compress them.
//!
//! Unpacking trusts nothing: every entry is checked against the carried manifest, the manifest against
//! the expected id, paths and link targets against the root, sizes against limits; a refused archive
//! leaves nothing behind.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};

use flate2::Compression;

use crate::manifest::{check_rel_path, hash_file};
use crate::set::stays_inside;
use crate::{Error, Manifest, ManifestKind, ToolchainId, ToolchainSet};

/// Where the manifest lives inside an archive (always the first entry).
pub const ARCHIVE_MANIFEST_PATH: &str = ".ferry/manifest";
const CHUNK: usize = 1 << 20;
/// Deflate levels, taken chunk by chunk in turn. Level 1 is twice as fast as level 2 but its
/// output is a fifth larger; alternating buys half of each. On rustc 1.95's 514 MiB set: level 2
/// alone 4.8 CPU-s and 188 MiB, level 1 alone 2.6 CPU-s and 224 MiB, alternating about 3.7 CPU-s
/// and 206 MiB (`tar -czf`: 171 MiB). Packaging runs on a developer's machine during their first
/// build, so its CPU is what the trade buys back.
const LEVELS: [u32; 2] = [2, 1];
const MAX_MANIFEST_BYTES: u64 = 16 << 20;

/// Bounds for unpacking an archive received from elsewhere.
#[derive(Debug, Clone)]
pub struct UnpackLimits {
    pub max_file_bytes: u64,
    pub max_total_bytes: u64,
    pub max_entries: usize,
}

impl Default for UnpackLimits {
    fn default() -> Self {
        UnpackLimits { max_file_bytes: 2 << 30, max_total_bytes: 8 << 30, max_entries: 100_000 }
    }
}

/// Writes the archive of `set` (whose manifest is `manifest`) to `out`; returns the bytes written.
/// Every file is re-hashed as it is archived: a file that changed since the manifest was computed
/// is an error, so an archive never carries content its manifest does not describe.
pub fn write_archive(set: &ToolchainSet, manifest: &Manifest, out: &mut dyn Write) -> Result<u64, Error> {
    let threads = pool_threads();
    // When the compressors stop (an output error), the producer's next send fails.
    let (chunk_tx, receivers) = work_queue::<(u64, Vec<u8>)>(threads);
    let (done_tx, done_rx) = sync_channel::<(u64, io::Result<Vec<u8>>)>(threads * 2);
    std::thread::scope(|s| {
        let producer = s.spawn(move || produce_tar(set, manifest, ChunkWriter::new(chunk_tx)));
        for rx in receivers {
            let tx = done_tx.clone();
            s.spawn(move || compress_chunks(&rx, &tx));
        }
        drop(done_tx);
        let written = collect_in_order(done_rx, out);
        let produced = producer.join().expect("tar producer panicked");
        produced?;
        written.map_err(|error| Error::Io { path: PathBuf::from("<archive output>"), error })
    })
}

/// Unpacks an archive into `dest` (which must not exist) and returns its manifest, after checking
/// every entry, the limits and that the manifest's id is `expected`.
pub fn unpack_archive(
    reader: impl Read + Send,
    dest: &Path,
    expected: &ToolchainId,
    limits: &UnpackLimits,
) -> Result<Manifest, Error> {
    let parent = dest.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(Error::io(parent))?;
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = parent.join(format!(".{name}.unpack-{}-{}", std::process::id(), nanos()));
    let result = unpack_into(reader, &tmp, expected, limits);
    match result {
        Ok(manifest) => match fs::rename(&tmp, dest) {
            Ok(()) => Ok(manifest),
            Err(_) if dest.is_dir() => {
                // Someone else unpacked the same id first; theirs is as good as ours.
                let _ = fs::remove_dir_all(&tmp);
                Ok(manifest)
            }
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp);
                Err(Error::Io { path: dest.to_owned(), error: e })
            }
        },
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

fn produce_tar(set: &ToolchainSet, manifest: &Manifest, sink: ChunkWriter) -> Result<(), Error> {
    let out_err = |error| Error::Io { path: PathBuf::from("<archive stream>"), error };
    let mut tar = tar::Builder::new(sink);
    let text = manifest.to_text();
    let mut header = base_header(tar::EntryType::Regular, 0o644, text.len() as u64);
    tar.append_data(&mut header, ARCHIVE_MANIFEST_PATH, text.as_bytes()).map_err(out_err)?;
    let by_path: BTreeMap<&str, &crate::SetFile> = set.files.iter().map(|f| (f.rel.as_str(), f)).collect();
    for entry in &manifest.entries {
        let file = by_path.get(entry.path.as_str()).ok_or_else(|| Error::CorruptArchive {
            reason: format!("manifest entry '{}' is not in the toolchain set", entry.path),
        })?;
        match &entry.kind {
            ManifestKind::Symlink { target } => {
                let mut header = base_header(tar::EntryType::Symlink, 0o777, 0);
                tar.append_link(&mut header, &entry.path, target).map_err(out_err)?;
            }
            ManifestKind::File { executable, size, digest } => {
                let mode = if *executable { 0o755 } else { 0o644 };
                let mut header = base_header(tar::EntryType::Regular, mode, *size);
                let f = File::open(&file.abs).map_err(Error::io(&file.abs))?;
                // tar copies in 8 KiB pieces: read the file in 1 MiB ones.
                let inner = io::BufReader::with_capacity(CHUNK, f.take(*size));
                let mut reader = HashingReader { inner, hasher: blake3::Hasher::new(), len: 0 };
                tar.append_data(&mut header, &entry.path, &mut reader)
                    .map_err(|_| Error::Changed { path: file.abs.clone() })?;
                if reader.len != *size || reader.hasher.finalize().as_bytes() != digest {
                    return Err(Error::Changed { path: file.abs.clone() });
                }
            }
        }
    }
    let sink = tar.into_inner().map_err(out_err)?;
    sink.finish().map_err(out_err)
}

fn base_header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h
}

fn compress_chunks(rx: &Mutex<Receiver<(u64, Vec<u8>)>>, tx: &SyncSender<(u64, io::Result<Vec<u8>>)>) {
    loop {
        let next = rx.lock().expect("chunk queue poisoned").recv();
        let Ok((seq, chunk)) = next else { return };
        let level = LEVELS[(seq % LEVELS.len() as u64) as usize];
        if tx.send((seq, gzip_member(&chunk, level))).is_err() {
            return;
        }
    }
}

/// One gzip member holding `data`, with its own total size in an `FR` extra subfield (like BGZF's
/// `BC`): readers split the stream into members without inflating it, and inflate them on every
/// core. Still plain gzip to any other reader.
fn gzip_member(data: &[u8], level: u32) -> io::Result<Vec<u8>> {
    let mut deflate = flate2::write::DeflateEncoder::new(Vec::with_capacity(data.len() / 2), Compression::new(level));
    deflate.write_all(data)?;
    let body = deflate.finish()?;
    let mut crc = flate2::Crc::new();
    crc.update(data);
    let total = MEMBER_HEADER + body.len() + 8;
    let total32 = u32::try_from(total).map_err(|_| io::Error::other("gzip member over 4 GiB"))?;
    let mut out = Vec::with_capacity(total);
    // magic, deflate, FEXTRA, mtime 0, no extra flags, OS unknown; XLEN 8; subfield FR, 4 bytes.
    out.extend_from_slice(&[0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 0xff, 8, 0, b'F', b'R', 4, 0]);
    out.extend_from_slice(&total32.to_le_bytes());
    out.extend_from_slice(&body);
    out.extend_from_slice(&crc.sum().to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    Ok(out)
}

/// Bytes of a member's header up to the deflate data.
const MEMBER_HEADER: usize = 20;

/// Inflates a gzip stream into `tx` in order. Members that carry their size (archives made by
/// [`write_archive`]) are inflated in parallel; any other gzip falls back to one thread.
fn inflate(mut reader: impl Read + Send, tx: SyncSender<io::Result<Vec<u8>>>) {
    let mut header = [0u8; MEMBER_HEADER];
    let got = read_full(&mut reader, &mut header);
    let sized = |h: &[u8; MEMBER_HEADER]| h[..4] == [0x1f, 0x8b, 8, 4] && h[10..16] == [8, 0, b'F', b'R', 4, 0];
    if got.as_ref().is_ok_and(|&n| n == MEMBER_HEADER) && sized(&header) {
        inflate_parallel(reader, header, &tx);
        return;
    }
    let Ok(n) = got else {
        let _ = tx.send(Err(got.unwrap_err()));
        return;
    };
    let mut decoder = flate2::read::MultiGzDecoder::new(io::Cursor::new(header[..n].to_vec()).chain(reader));
    loop {
        let mut buf = vec![0u8; 256 << 10];
        match decoder.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                buf.truncate(n);
                if tx.send(Ok(buf)).is_err() {
                    return;
                }
            }
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        }
    }
}

/// Threads for compressing or inflating: the machine's cores, 1 to 8.
fn pool_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(1, 8)
}

/// One worker's handle on a [`work_queue`].
type SharedReceiver<T> = Arc<Mutex<Receiver<T>>>;

/// A bounded queue shared by `threads` workers, one receiver handle each. Only the workers hold
/// its receiving end, so once they all stop the sender's next send fails instead of blocking
/// forever.
fn work_queue<T>(threads: usize) -> (SyncSender<T>, Vec<SharedReceiver<T>>) {
    let (tx, rx) = sync_channel::<T>(threads * 2);
    let rx = Arc::new(Mutex::new(rx));
    (tx, (0..threads).map(|_| Arc::clone(&rx)).collect())
}

fn inflate_parallel(mut reader: impl Read + Send, first: [u8; MEMBER_HEADER], tx: &SyncSender<io::Result<Vec<u8>>>) {
    let threads = pool_threads();
    // When the reader stops early (a refused archive), the inflaters stop, and the splitter's next
    // send fails.
    let (job_tx, receivers) = work_queue::<(u64, Vec<u8>)>(threads);
    let (done_tx, done_rx) = sync_channel::<(u64, io::Result<Vec<u8>>)>(threads * 2);
    std::thread::scope(|s| {
        for rx in receivers {
            let done = done_tx.clone();
            s.spawn(move || {
                loop {
                    let next = rx.lock().expect("member queue poisoned").recv();
                    let Ok((seq, member)) = next else { return };
                    // A member holds one chunk: it may inflate to at most that much (a member of
                    // deflated zeros would otherwise inflate a thousandfold, in memory).
                    let mut out = Vec::with_capacity(CHUNK);
                    let mut decoder = flate2::read::GzDecoder::new(&member[..]);
                    let result = (&mut decoder).take(CHUNK as u64 + 1).read_to_end(&mut out).and_then(|_| {
                        if out.len() > CHUNK {
                            Err(io::Error::other(format!("a gzip member inflates to more than {CHUNK} bytes")))
                        } else if decoder.into_inner().is_empty() {
                            Ok(out)
                        } else {
                            Err(io::Error::other("gzip member is longer than its data"))
                        }
                    });
                    if done.send((seq, result)).is_err() {
                        return;
                    }
                }
            });
        }
        drop(done_tx);
        // The splitter: reads whole members by their recorded size.
        s.spawn(move || {
            let mut header = first;
            for seq in 0u64.. {
                let total = u32::from_le_bytes(header[16..20].try_into().expect("4 bytes")) as usize;
                // A chunk's member is never much larger than the chunk (deflate's worst case).
                if !(MEMBER_HEADER + 8..=2 * CHUNK).contains(&total) {
                    let _ = job_tx.send((seq, header.to_vec())); // inflating it reports the damage
                    return;
                }
                let mut member = header.to_vec();
                member.resize(total, 0);
                match read_full(&mut reader, &mut member[MEMBER_HEADER..]) {
                    Ok(n) if n == total - MEMBER_HEADER => {}
                    _ => {
                        member.truncate(MEMBER_HEADER);
                        let _ = job_tx.send((seq, member));
                        return;
                    }
                }
                if job_tx.send((seq, member)).is_err() {
                    return;
                }
                match read_full(&mut reader, &mut header) {
                    Ok(0) => return,
                    Ok(n) if n == MEMBER_HEADER => {}
                    _ => {
                        let _ = job_tx.send((seq + 1, header.to_vec()));
                        return;
                    }
                }
            }
        });
        let mut pending = BTreeMap::new();
        let mut next = 0u64;
        for (seq, result) in done_rx {
            pending.insert(seq, result);
            while let Some(result) = pending.remove(&next) {
                let failed = result.is_err();
                if tx.send(result).is_err() || failed {
                    return;
                }
                next += 1;
            }
        }
    });
}

/// Reads until `buf` is full or the stream ends; the count read.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match reader.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn collect_in_order(rx: Receiver<(u64, io::Result<Vec<u8>>)>, out: &mut dyn Write) -> io::Result<u64> {
    let mut pending = BTreeMap::new();
    let mut next = 0u64;
    let mut written = 0u64;
    for (seq, result) in rx {
        pending.insert(seq, result?);
        while let Some(bytes) = pending.remove(&next) {
            out.write_all(&bytes)?;
            written += bytes.len() as u64;
            next += 1;
        }
    }
    if !pending.is_empty() {
        return Err(io::Error::other("archive chunks went missing"));
    }
    out.flush()?;
    Ok(written)
}

/// Cuts the tar stream into fixed-size chunks for the compressors.
struct ChunkWriter {
    buf: Vec<u8>,
    seq: u64,
    tx: SyncSender<(u64, Vec<u8>)>,
}

impl ChunkWriter {
    fn new(tx: SyncSender<(u64, Vec<u8>)>) -> Self {
        ChunkWriter { buf: Vec::with_capacity(CHUNK), seq: 0, tx }
    }

    fn send(&mut self) -> io::Result<()> {
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx.send((self.seq, chunk)).map_err(|_| io::Error::other("archive compressors stopped"))?;
        self.seq += 1;
        Ok(())
    }

    fn finish(mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.send()?;
        }
        Ok(())
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct HashingReader<R> {
    inner: R,
    hasher: blake3::Hasher,
    len: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
}

/// Checks an archive completely — every entry against the manifest, the manifest against
/// `expected`, the limits — without writing anything: what a scheduler does with an upload.
pub fn verify_archive(
    reader: impl Read + Send,
    expected: &ToolchainId,
    limits: &UnpackLimits,
) -> Result<Manifest, Error> {
    walk_archive(reader, None, expected, limits)
}

fn unpack_into(
    reader: impl Read + Send,
    tmp: &Path,
    expected: &ToolchainId,
    limits: &UnpackLimits,
) -> Result<Manifest, Error> {
    fs::create_dir(tmp).map_err(Error::io(tmp))?;
    walk_archive(reader, Some(tmp), expected, limits)
}

/// The checks shared by unpacking (`dest` set: files are written there) and verifying (`None`).
fn walk_archive(
    reader: impl Read + Send,
    dest: Option<&Path>,
    expected: &ToolchainId,
    limits: &UnpackLimits,
) -> Result<Manifest, Error> {
    // Inflating on other threads (members in parallel), feeding the tar walk (hashing, writing)
    // through a bounded channel: the work uses every core.
    let (tx, rx) = sync_channel::<io::Result<Vec<u8>>>(16);
    std::thread::scope(|s| {
        s.spawn(move || inflate(reader, tx));
        walk_tar(ChannelReader { rx, current: Vec::new(), pos: 0 }, dest, expected, limits)
    })
}

/// Reads what another thread sends; dropping it stops the sender.
struct ChannelReader {
    rx: Receiver<io::Result<Vec<u8>>>,
    current: Vec<u8>,
    pos: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.current.len() {
            match self.rx.recv() {
                Ok(chunk) => {
                    self.current = chunk?;
                    self.pos = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len() - self.pos);
        buf[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// `io::copy` through `buf`: its 8 KiB stack buffer would hash and write in pieces too small for
/// blake3's SIMD and cost a system call per 8 KiB.
fn copy_through(buf: &mut [u8], reader: &mut impl Read, writer: &mut impl Write) -> io::Result<()> {
    loop {
        match reader.read(buf) {
            Ok(0) => return Ok(()),
            Ok(n) => writer.write_all(&buf[..n])?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn walk_tar(
    reader: impl Read,
    dest: Option<&Path>,
    expected: &ToolchainId,
    limits: &UnpackLimits,
) -> Result<Manifest, Error> {
    let corrupt = |e: io::Error| Error::CorruptArchive { reason: e.to_string() };
    let mut archive = tar::Archive::new(reader);
    let mut entries = archive.entries().map_err(corrupt)?;

    let first = entries.next().ok_or_else(|| Error::CorruptArchive { reason: "archive is empty".into() })?;
    let mut first = first.map_err(corrupt)?;
    let first_path = entry_path(&first)?;
    if first_path != ARCHIVE_MANIFEST_PATH || first.header().entry_type() != tar::EntryType::Regular {
        return Err(Error::CorruptArchive { reason: format!("first entry is '{first_path}', not the manifest") });
    }
    if first.size() > MAX_MANIFEST_BYTES {
        return Err(Error::UnsafeEntry { entry: first_path, reason: "manifest is too large".into() });
    }
    let mut text = String::new();
    first.read_to_string(&mut text).map_err(corrupt)?;
    let manifest = Manifest::parse(&text)?;
    let actual = manifest.id();
    if actual != *expected {
        return Err(Error::IdMismatch { expected: expected.to_hex(), actual: actual.to_hex() });
    }
    if manifest.entries.len() > limits.max_entries {
        return Err(Error::CorruptArchive {
            reason: format!("{} entries is over the limit of {}", manifest.entries.len(), limits.max_entries),
        });
    }

    check_symlink_walks(&manifest)?;
    let mut wanted = manifest.entries.iter();
    let mut total = 0u64;
    // Symlinks unpacked so far: no later entry may be written through one (a chain of links that
    // each look harmless can still point out of the root).
    let mut links: Vec<String> = Vec::new();
    let mut buf = vec![0; CHUNK];
    for entry in entries {
        let mut entry = entry.map_err(corrupt)?;
        let path = entry_path(&entry)?;
        let refuse = |reason: &str| Error::UnsafeEntry { entry: path.clone(), reason: reason.to_owned() };
        check_rel_path(&path).map_err(|r| refuse(&r))?;
        let kind = entry.header().entry_type();
        let size = entry.size();
        match kind {
            tar::EntryType::Regular | tar::EntryType::Symlink => {}
            tar::EntryType::Link => return Err(refuse("hard links are not allowed")),
            tar::EntryType::Char | tar::EntryType::Block => return Err(refuse("device files are not allowed")),
            tar::EntryType::Fifo => return Err(refuse("fifos are not allowed")),
            other => return Err(refuse(&format!("entry type {other:?} is not allowed"))),
        }
        if size > limits.max_file_bytes {
            return Err(refuse(&format!("{size} bytes is over the per-file limit of {}", limits.max_file_bytes)));
        }
        total += size;
        if total > limits.max_total_bytes {
            return Err(refuse(&format!("archive exceeds the total limit of {} bytes", limits.max_total_bytes)));
        }
        if links.iter().any(|l| path.starts_with(l.as_str()) && path.as_bytes().get(l.len()) == Some(&b'/')) {
            return Err(refuse("path goes through a symlink"));
        }
        let Some(want) = wanted.next().filter(|w| w.path == path) else {
            return Err(refuse("not listed in the manifest (or out of order)"));
        };
        let dest = dest.map(|root| root.join(&path));
        if let Some(parent) = dest.as_deref().and_then(Path::parent) {
            fs::create_dir_all(parent).map_err(Error::io(parent))?;
        }
        match (&want.kind, kind) {
            (ManifestKind::Symlink { target }, tar::EntryType::Symlink) => {
                let link = entry.link_name_bytes().map(|b| String::from_utf8_lossy(&b).into_owned());
                if link.as_deref() != Some(target.as_str()) {
                    return Err(refuse("symlink target differs from the manifest"));
                }
                if !stays_inside(&path, Path::new(target)) {
                    return Err(refuse(&format!("symlink target '{target}' leaves the toolchain")));
                }
                if let Some(dest) = &dest {
                    symlink(target, dest).map_err(Error::io(dest))?;
                }
                links.push(path.clone());
            }
            (ManifestKind::File { executable, size: want_size, digest }, tar::EntryType::Regular) => {
                if size != *want_size {
                    return Err(refuse("size differs from the manifest"));
                }
                let mut reader = HashingReader { inner: &mut entry, hasher: blake3::Hasher::new(), len: 0 };
                match &dest {
                    Some(dest) => {
                        let mode = if *executable { 0o755 } else { 0o644 };
                        let file = OpenOptions::new().write(true).create_new(true).mode(mode).open(dest);
                        copy_through(&mut buf, &mut reader, &mut file.map_err(Error::io(dest))?).map_err(corrupt)?;
                    }
                    None => {
                        copy_through(&mut buf, &mut reader, &mut io::sink()).map_err(corrupt)?;
                    }
                }
                if reader.len != size || reader.hasher.finalize().as_bytes() != digest {
                    return Err(refuse("content does not match the manifest"));
                }
            }
            _ => return Err(refuse("entry kind differs from the manifest")),
        }
    }
    if let Some(missing) = wanted.next() {
        return Err(Error::CorruptArchive { reason: format!("entry '{}' is missing", missing.path) });
    }
    Ok(manifest)
}

/// Refuses symlinks whose target, resolved step by step from the link's directory, passes through
/// another symlink of the archive (`lib/q -> p/..` with `lib/p -> ..`): each link may look contained
/// on its own while the chain leaves the root. A link to a link (as the last step) is fine: that
/// link is checked in its own right.
fn check_symlink_walks(manifest: &Manifest) -> Result<(), Error> {
    let links: std::collections::HashSet<&str> = manifest
        .entries
        .iter()
        .filter(|e| matches!(e.kind, ManifestKind::Symlink { .. }))
        .map(|e| e.path.as_str())
        .collect();
    for entry in &manifest.entries {
        let ManifestKind::Symlink { target } = &entry.kind else { continue };
        let refuse = |reason: String| Error::UnsafeEntry { entry: entry.path.clone(), reason };
        if !stays_inside(&entry.path, Path::new(target)) {
            return Err(refuse(format!("symlink target '{target}' leaves the toolchain")));
        }
        let mut parts: Vec<&str> = entry.path.split('/').collect();
        parts.pop();
        let steps: Vec<&str> = target.split('/').filter(|c| !c.is_empty() && *c != ".").collect();
        for (i, step) in steps.iter().enumerate() {
            if *step == ".." {
                parts.pop();
                continue;
            }
            parts.push(step);
            if i + 1 < steps.len() && links.contains(parts.join("/").as_str()) {
                return Err(refuse(format!("symlink target '{target}' goes through another symlink")));
            }
        }
    }
    Ok(())
}

fn entry_path<R: Read>(entry: &tar::Entry<R>) -> Result<String, Error> {
    String::from_utf8(entry.path_bytes().into_owned())
        .map_err(|_| Error::UnsafeEntry { entry: "<non-utf-8 path>".into(), reason: "path is not utf-8".into() })
}

fn nanos() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

/// blake3 of a whole file, for checking stored archives.
pub(crate) fn file_digest(path: &Path) -> Result<([u8; 32], u64), Error> {
    hash_file(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A member of deflated zeros (what a gzip bomb is made of): it would inflate to 64 MiB; the
    /// reader stops at one chunk and says why, without holding the rest in memory.
    #[test]
    fn a_member_that_inflates_past_its_chunk_is_refused() {
        let bomb = gzip_member(&vec![0u8; 64 << 20], 9).unwrap();
        assert!(bomb.len() < 2 * CHUNK, "64 MiB of zeros deflate to {} bytes", bomb.len());
        let (tx, rx) = sync_channel(4);
        std::thread::scope(|s| {
            s.spawn(|| inflate(&bomb[..], tx));
            let results: Vec<io::Result<Vec<u8>>> = rx.iter().collect();
            let err = results.into_iter().find_map(Result::err).expect("the bomb is refused");
            assert!(err.to_string().contains("inflates to more than"), "{err}");
        });
        // A well-formed member inflates as before.
        let fine = gzip_member(b"a chunk", 1).unwrap();
        let (tx, rx) = sync_channel(4);
        std::thread::scope(|s| {
            s.spawn(|| inflate(&fine[..], tx));
            let out: Vec<u8> = rx.iter().flat_map(|r| r.unwrap()).collect();
            assert_eq!(out, b"a chunk");
        });
    }
}
