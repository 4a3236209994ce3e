//! memcached as a shared cache tier (`FERRY_SHARED_CACHE=memcached://host:port[,host:port…]`):
//! several build servers share one secondary cache beside distributed compiles, on servers many
//! sites already run.
//!
//! Layout: an entry is found through its head item, `ferry:v1:<key hex>`, whose value is
//! `FERRYMC1`, the entry's length (u64 LE), its chunk count (u32 LE), its blake3 digest and 8 bytes
//! of blake3 over those fields (a damaged head is found as such), then — for an entry small
//! enough — the entry itself. A larger entry is cut into chunks of
//! [`CHUNK`] bytes (under memcached's default 1 MiB item size), stored under
//! `ferry:v1:<key hex>:<digest hex, 16>:<i>`: chunk names carry the content's digest, so two
//! writers of one key never mix their chunks. Chunks are written first, the head last with `add`
//! (first writer wins, never overwritten). A read takes the head, then the chunks, and checks the
//! whole against the head's digest before the caller verifies the entry itself; a chunk that
//! memcached evicted makes a miss, a digest that does not match makes a corrupt entry (its head is
//! deleted, so it is not delivered twice).
//!
//! Keys are spread across the servers by rendezvous hashing (each key goes to the server with the
//! highest blake3 of server and key), so adding a server moves only its share of keys.
//!
//! The protocol is memcached's text protocol over one lazily opened TCP connection per server,
//! with deadlines, no threads: the wrapper is a short-lived, single-threaded process that forks
//! its detached store (see ARCHITECTURE.md, "memcached").

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::Duration;

use crate::Entry;
use crate::key::CacheKey;
use crate::store::{Error, PutOutcome, Store};

/// Bytes of an entry per item: under memcached's default item size (1 MiB, `-I`), with room for
/// the key and the item header.
pub const CHUNK: usize = 1_000_000;
const MAGIC: &[u8; 8] = b"FERRYMC1";
const HEAD_LEN: usize = 8 + 8 + 4 + 32 + 8;
/// The largest entry read back (a bad server must not make a client allocate more).
const MAX_ENTRY: u64 = 1 << 30;

/// A memcached cluster holding entries.
#[derive(Debug)]
pub struct MemcachedStore {
    servers: Vec<Server>,
    timeout: Duration,
}

#[derive(Debug)]
struct Server {
    addr: String,
    conn: Mutex<Option<BufReader<TcpStream>>>,
}

/// The `host:port` list of a `memcached://` URL; Err is a sentence naming what is wrong.
pub fn parse_memcached_url(url: &str) -> Result<Vec<String>, String> {
    let rest = url.strip_prefix("memcached://").ok_or_else(|| format!("'{url}' is not a memcached:// URL"))?;
    let servers: Vec<String> = rest
        .trim_end_matches('/')
        .split(',')
        .map(|s| {
            let s = s.trim();
            match s.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(s.to_owned()),
                Some(_) => Err(format!("'{url}': '{s}' is not host:port")),
                None if !s.is_empty() => Ok(format!("{s}:11211")),
                None => Err(format!("'{url}' has an empty server")),
            }
        })
        .collect::<Result<_, _>>()?;
    Ok(servers)
}

impl MemcachedStore {
    /// Connects lazily: each server's connection opens on its first call, and a broken one is
    /// reopened once.
    pub fn new(url: &str, timeout: Duration) -> Result<MemcachedStore, String> {
        let servers =
            parse_memcached_url(url)?.into_iter().map(|addr| Server { addr, conn: Mutex::new(None) }).collect();
        Ok(MemcachedStore { servers, timeout })
    }

    /// The server holding `name`: the highest blake3(server, name).
    fn server(&self, name: &str) -> &Server {
        self.servers
            .iter()
            .max_by_key(|s| {
                let mut h = blake3::Hasher::new();
                h.update(s.addr.as_bytes()).update(&[0]).update(name.as_bytes());
                *h.finalize().as_bytes()
            })
            .expect("a memcached URL names at least one server")
    }

    fn io_error(&self, server: &Server, e: io::Error) -> Error {
        Error::Io { path: format!("memcached://{}", server.addr).into(), source: e }
    }

    /// Runs `exchange` on the server's connection, reconnecting once if it had broken.
    fn call<T>(
        &self,
        server: &Server,
        exchange: impl Fn(&mut BufReader<TcpStream>) -> io::Result<T>,
    ) -> Result<T, Error> {
        let mut guard = server.conn.lock().unwrap_or_else(|p| p.into_inner());
        for attempt in 0..2 {
            let fresh = guard.is_none();
            if fresh {
                *guard = Some(self.connect(server).map_err(|e| self.io_error(server, e))?);
            }
            let conn = guard.as_mut().expect("connected above");
            match exchange(conn) {
                Ok(value) => return Ok(value),
                Err(e) => {
                    *guard = None;
                    if fresh || attempt == 1 {
                        return Err(self.io_error(server, e));
                    }
                }
            }
        }
        unreachable!("the second attempt returns")
    }

    fn connect(&self, server: &Server) -> io::Result<BufReader<TcpStream>> {
        let addr = server
            .addr
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("cannot resolve {}", server.addr)))?;
        let stream = TcpStream::connect_timeout(&addr, self.timeout)?;
        stream.set_read_timeout(Some(self.timeout))?;
        stream.set_write_timeout(Some(self.timeout))?;
        stream.set_nodelay(true)?;
        Ok(BufReader::new(stream))
    }

    fn get_item(&self, name: &str, max: usize) -> Result<Option<Vec<u8>>, Error> {
        self.call(self.server(name), |conn| get(conn, name, max))
    }

    /// `set` (or `add` when `only_new`): whether it was stored.
    fn store_item(&self, name: &str, value: &[u8], only_new: bool) -> Result<bool, Error> {
        self.call(self.server(name), |conn| store(conn, if only_new { "add" } else { "set" }, name, value))
    }

    fn delete_item(&self, name: &str) {
        let _ = self.call(self.server(name), |conn| delete(conn, name));
    }

    /// The entry's bytes, assembled and checked against the head's digest: None on a miss (no
    /// head, or a chunk evicted), Corrupt (head deleted) when the digest does not match.
    fn fetch(&self, key: &CacheKey) -> Result<Option<Vec<u8>>, Error> {
        let head_name = head_name(key);
        let Some(head) = self.get_item(&head_name, HEAD_LEN + CHUNK)? else { return Ok(None) };
        let corrupt = |reason: &'static str| Error::Corrupt {
            path: format!("memcached item {head_name}").into(),
            reason: crate::EntryError::Truncated { what: reason, offset: 0 },
        };
        let Some((len, chunks, digest, inline)) = parse_head(&head) else {
            self.delete_item(&head_name);
            return Err(corrupt("memcached head"));
        };
        let bytes = if chunks == 0 {
            inline.to_vec()
        } else {
            let mut bytes = Vec::with_capacity(len as usize);
            for i in 0..chunks {
                match self.get_item(&chunk_name(key, &digest, i), CHUNK)? {
                    Some(piece) => bytes.extend_from_slice(&piece),
                    // Evicted: memcached drops items on its own; the entry is simply gone.
                    None => {
                        self.delete_item(&head_name);
                        return Ok(None);
                    }
                }
            }
            bytes
        };
        if bytes.len() as u64 != len || *blake3::hash(&bytes).as_bytes() != digest {
            self.delete_item(&head_name);
            return Err(corrupt("memcached entry (its chunks do not make the digest of its head)"));
        }
        Ok(Some(bytes))
    }

    /// The value under `key`, checked by `verify`; one that fails is deleted and reported corrupt.
    fn get_verified<T>(
        &self,
        key: &CacheKey,
        verify: impl FnOnce(Vec<u8>) -> Result<T, crate::EntryError>,
    ) -> Result<Option<T>, Error> {
        let Some(bytes) = self.fetch(key)? else { return Ok(None) };
        match verify(bytes) {
            Ok(found) => Ok(Some(found)),
            Err(reason) => {
                self.delete_item(&head_name(key));
                Err(Error::Corrupt { path: format!("memcached item {}", head_name(key)).into(), reason })
            }
        }
    }
}

impl Store for MemcachedStore {
    fn get(&self, key: &CacheKey) -> Result<Option<Entry>, Error> {
        self.get_verified(key, |bytes| Entry::decode_owned(bytes, key))
    }

    fn get_encoded(&self, key: &CacheKey) -> Result<Option<Vec<u8>>, Error> {
        self.get_verified(key, |bytes| Entry::check(&bytes, key).map(|()| bytes))
    }

    fn put_encoded(&self, key: &CacheKey, bytes: &[u8]) -> Result<PutOutcome, Error> {
        let digest = *blake3::hash(bytes).as_bytes();
        let inline = bytes.len() <= CHUNK;
        let pieces: Vec<&[u8]> = if inline { Vec::new() } else { bytes.chunks(CHUNK).collect() };
        for (i, piece) in pieces.iter().enumerate() {
            let name = chunk_name(key, &digest, i as u32);
            if !self.store_item(&name, piece, false)? {
                return Err(self.io_error(self.server(&name), refused(format!("{name} was not stored"))));
            }
        }
        let mut head = Vec::with_capacity(HEAD_LEN + if inline { bytes.len() } else { 0 });
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        head.extend_from_slice(&(pieces.len() as u32).to_le_bytes());
        head.extend_from_slice(&digest);
        let check = *blake3::hash(&head).as_bytes();
        head.extend_from_slice(&check[..8]);
        if inline {
            head.extend_from_slice(bytes);
        }
        // Twice at most: a head already there counts only once its entry checks out (one that
        // does not is deleted), so a damaged entry never blocks its own replacement.
        for _ in 0..2 {
            if self.store_item(&head_name(key), &head, true)? {
                return Ok(PutOutcome::Published { bytes: bytes.len() as u64 });
            }
            match self.get_verified(key, |b| Entry::check(&b, key)) {
                Ok(Some(())) => return Ok(PutOutcome::AlreadyPresent),
                Ok(None) | Err(Error::Corrupt { .. }) => self.delete_item(&head_name(key)),
                Err(e) => return Err(e),
            }
        }
        Ok(PutOutcome::AlreadyPresent)
    }

    fn remove(&self, key: &CacheKey) -> Result<bool, Error> {
        // The head names the chunks: without it they are unreachable, and memcached evicts them.
        let name = head_name(key);
        self.call(self.server(&name), |conn| delete(conn, &name)).map(|()| true)
    }
}

fn head_name(key: &CacheKey) -> String {
    format!("ferry:v1:{key}")
}

fn chunk_name(key: &CacheKey, digest: &[u8; 32], i: u32) -> String {
    let short: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("ferry:v1:{key}:{short}:{i}")
}

/// (entry length, chunk count, digest, inline entry) of a head item.
pub(crate) fn parse_head(head: &[u8]) -> Option<(u64, u32, [u8; 32], &[u8])> {
    if head.len() < HEAD_LEN || &head[..8] != MAGIC {
        return None;
    }
    let len = u64::from_le_bytes(head[8..16].try_into().ok()?);
    let chunks = u32::from_le_bytes(head[16..20].try_into().ok()?);
    let digest: [u8; 32] = head[20..52].try_into().ok()?;
    if blake3::hash(&head[..52]).as_bytes()[..8] != head[52..60] {
        return None;
    }
    let inline = &head[HEAD_LEN..];
    let fits = if chunks == 0 {
        inline.len() as u64 == len
    } else {
        inline.is_empty() && len <= MAX_ENTRY && u64::from(chunks) == len.div_ceil(CHUNK as u64)
    };
    fits.then_some((len, chunks, digest, inline))
}

fn refused(message: String) -> io::Error {
    io::Error::other(format!("memcached refused: {message}"))
}

fn protocol(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

fn read_line(conn: &mut impl BufRead) -> io::Result<String> {
    let mut line = Vec::new();
    conn.take(4096).read_until(b'\n', &mut line)?;
    if !line.ends_with(b"\r\n") {
        return Err(protocol("connection closed mid-reply".into()));
    }
    line.truncate(line.len() - 2);
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// `get NAME`: the value (at most `max` bytes), or None.
fn get(conn: &mut BufReader<TcpStream>, name: &str, max: usize) -> io::Result<Option<Vec<u8>>> {
    conn.get_mut().write_all(format!("get {name}\r\n").as_bytes())?;
    read_value(conn, name, max)
}

/// The answer to `get NAME`: the value (at most `max` bytes), or None.
pub(crate) fn read_value(conn: &mut impl BufRead, name: &str, max: usize) -> io::Result<Option<Vec<u8>>> {
    let line = read_line(conn)?;
    if line == "END" {
        return Ok(None);
    }
    // VALUE <key> <flags> <bytes>
    let mut words = line.split(' ');
    let (Some("VALUE"), Some(key), Some(_flags), Some(size), None) =
        (words.next(), words.next(), words.next(), words.next(), words.next())
    else {
        return Err(server_error(&line, "get"));
    };
    let size: usize = size.parse().map_err(|_| protocol(format!("get answered {line:?}")))?;
    if key != name || size > max {
        return Err(protocol(format!("get {name} answered {line:?}")));
    }
    let mut value = vec![0u8; size + 2];
    conn.read_exact(&mut value)?;
    if !value.ends_with(b"\r\n") {
        return Err(protocol(format!("get {name}: a value not followed by CRLF")));
    }
    value.truncate(size);
    let end = read_line(conn)?;
    if end != "END" {
        return Err(protocol(format!("get {name}: {end:?} after the value")));
    }
    Ok(Some(value))
}

/// `set`/`add NAME 0 0 LEN`: whether the server stored it (`add` finds a value there: false).
fn store(conn: &mut BufReader<TcpStream>, verb: &str, name: &str, value: &[u8]) -> io::Result<bool> {
    let mut out = format!("{verb} {name} 0 0 {}\r\n", value.len()).into_bytes();
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
    conn.get_mut().write_all(&out)?;
    let line = read_line(conn)?;
    match line.as_str() {
        "STORED" => Ok(true),
        "NOT_STORED" => Ok(false),
        _ => Err(server_error(&line, verb)),
    }
}

fn delete(conn: &mut BufReader<TcpStream>, name: &str) -> io::Result<()> {
    conn.get_mut().write_all(format!("delete {name}\r\n").as_bytes())?;
    match read_line(conn)?.as_str() {
        "DELETED" | "NOT_FOUND" => Ok(()),
        other => Err(server_error(other, "delete")),
    }
}

fn server_error(line: &str, what: &str) -> io::Error {
    if line.starts_with("SERVER_ERROR") || line.starts_with("CLIENT_ERROR") || line == "ERROR" {
        refused(format!("{what}: {line}"))
    } else {
        protocol(format!("{what} answered {line:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_every_server() {
        assert_eq!(parse_memcached_url("memcached://a:1,b:2").unwrap(), ["a:1", "b:2"]);
        assert_eq!(parse_memcached_url("memcached://a").unwrap(), ["a:11211"]);
        assert!(parse_memcached_url("memcached://a:x").unwrap_err().contains("'a:x' is not host:port"));
        assert!(parse_memcached_url("memcached://a:1,").unwrap_err().contains("empty server"));
        assert!(parse_memcached_url("redis://a").is_err());
    }

    #[test]
    fn heads_are_checked_before_use() {
        let head = |len: u64, chunks: u32, inline: &[u8]| {
            let mut head = MAGIC.to_vec();
            head.extend_from_slice(&len.to_le_bytes());
            head.extend_from_slice(&chunks.to_le_bytes());
            head.extend_from_slice(&[7; 32]);
            let check = *blake3::hash(&head).as_bytes();
            head.extend_from_slice(&check[..8]);
            head.extend_from_slice(inline);
            head
        };
        let good = head(3, 0, b"abc");
        assert_eq!(parse_head(&good).map(|h| h.3), Some(&b"abc"[..]));
        assert!(parse_head(&good[..good.len() - 1]).is_none(), "inline length differs");
        let mut flipped = good.clone();
        flipped[30] ^= 1;
        assert!(parse_head(&flipped).is_none(), "a flipped digest byte");
        assert!(parse_head(&head(2 * CHUNK as u64 + 1, 2, b"")).is_none(), "3 chunks are needed, 2 claimed");
        assert!(parse_head(&head(2 * CHUNK as u64 + 1, 3, b"")).is_some());
        assert!(parse_head(b"FERRYMC2").is_none());
    }
}
