//! Redis as a shared cache tier (`FERRY_SHARED_CACHE=redis://[user:password@]host[:port][/db]`),
//! for sites that outgrow one cache node.
//!
//! Entries are the same self-verifying bytes as in a disk tier, stored as the value of
//! `ferry:<key hex>`. Publishing is `SET ... NX` (first writer wins, never overwritten; Redis
//! writes a value whole, so no reader sees a part). Every read is verified; a value that does not
//! verify is deleted (best effort: a read-only user cannot) and reported as corrupt. Size is
//! Redis's job: run it with `maxmemory` and `maxmemory-policy allkeys-lru`. Write access is
//! Redis's ACL: give clients a user that may only `GET` (and workers one that may `SET`).
//!
//! The protocol is RESP2 over one TCP connection with deadlines; the five commands used need no
//! client library.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::Duration;

use crate::Entry;
use crate::key::CacheKey;
use crate::store::{Error, PutOutcome, Store};

/// Largest value this client accepts from the server (a bad server must not make it allocate).
const MAX_VALUE: usize = 1 << 30;

/// A Redis server holding entries.
#[derive(Debug)]
pub struct RedisStore {
    url: RedisUrl,
    timeout: Duration,
    conn: Mutex<Option<BufReader<TcpStream>>>,
}

/// A parsed `redis://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisUrl {
    pub host: String,
    pub port: u16,
    pub user: Option<String>,
    pub password: Option<String>,
    pub db: u32,
}

impl RedisUrl {
    /// Err is a sentence naming what is wrong.
    pub fn parse(url: &str) -> Result<RedisUrl, String> {
        let rest = url.strip_prefix("redis://").ok_or_else(|| format!("'{url}' is not a redis:// URL"))?;
        let (auth, rest) = match rest.rsplit_once('@') {
            Some((auth, rest)) => (Some(auth), rest),
            None => (None, rest),
        };
        let (hostport, db) = match rest.split_once('/') {
            Some((hp, "")) => (hp, 0),
            Some((hp, db)) => (hp, db.parse().map_err(|_| format!("'{url}': '{db}' is not a database number"))?),
            None => (rest, 0),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().map_err(|_| format!("'{url}': '{p}' is not a port"))?),
            None => (hostport, 6379),
        };
        if host.is_empty() {
            return Err(format!("'{url}' has no host"));
        }
        let (user, password) = match auth {
            None => (None, None),
            Some(a) => match a.split_once(':') {
                Some(("", p)) => (None, Some(p.to_owned())),
                Some((u, p)) => (Some(u.to_owned()), Some(p.to_owned())),
                None => (None, Some(a.to_owned())),
            },
        };
        Ok(RedisUrl { host: host.trim_matches(['[', ']']).to_owned(), port, user, password, db })
    }
}

/// One RESP2 reply.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Reply {
    Status(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Reply>),
}

impl RedisStore {
    /// Connects lazily: the first call opens the connection, and a broken one is reopened once.
    pub fn new(url: &str, timeout: Duration) -> Result<RedisStore, String> {
        Ok(RedisStore { url: RedisUrl::parse(url)?, timeout, conn: Mutex::new(None) })
    }

    fn connect(&self) -> io::Result<BufReader<TcpStream>> {
        let addr = (self.url.host.as_str(), self.url.port)
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("cannot resolve {}", self.url.host)))?;
        let stream = TcpStream::connect_timeout(&addr, self.timeout)?;
        stream.set_read_timeout(Some(self.timeout))?;
        stream.set_write_timeout(Some(self.timeout))?;
        stream.set_nodelay(true)?;
        let mut conn = BufReader::new(stream);
        if let Some(password) = &self.url.password {
            let mut auth: Vec<&[u8]> = vec![b"AUTH"];
            if let Some(user) = &self.url.user {
                auth.push(user.as_bytes());
            }
            auth.push(password.as_bytes());
            expect_ok(call(&mut conn, &auth)?, "AUTH")?;
        }
        if self.url.db != 0 {
            expect_ok(call(&mut conn, &[b"SELECT", self.url.db.to_string().as_bytes()])?, "SELECT")?;
        }
        Ok(conn)
    }

    /// Runs one command, reconnecting once if the connection had broken.
    fn command(&self, args: &[&[u8]]) -> io::Result<Reply> {
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        for attempt in 0..2 {
            let fresh = guard.is_none();
            if fresh {
                *guard = Some(self.connect()?);
            }
            let conn = guard.as_mut().expect("connected above");
            match call(conn, args) {
                Ok(reply) => return Ok(reply),
                Err(e) => {
                    *guard = None;
                    if fresh || attempt == 1 {
                        return Err(e);
                    }
                }
            }
        }
        unreachable!("the second attempt returns")
    }

    fn io_error(&self, e: io::Error) -> Error {
        Error::Io { path: format!("redis://{}:{}", self.url.host, self.url.port).into(), source: e }
    }
}

impl RedisStore {
    /// The value under `key`, checked by `verify`; one that fails is deleted (if this user may:
    /// never deliver it twice) and reported as corrupt.
    fn get_verified<T>(
        &self,
        key: &CacheKey,
        verify: impl FnOnce(Vec<u8>) -> Result<T, crate::EntryError>,
    ) -> Result<Option<T>, Error> {
        let name = redis_key(key);
        let bytes = match self.command(&[b"GET", name.as_bytes()]).map_err(|e| self.io_error(e))? {
            Reply::Bulk(None) => return Ok(None),
            Reply::Bulk(Some(bytes)) => bytes,
            Reply::Error(e) => return Err(self.io_error(refused(&e))),
            other => return Err(self.io_error(protocol(format!("GET answered {other:?}")))),
        };
        match verify(bytes) {
            Ok(found) => Ok(Some(found)),
            Err(reason) => {
                let _ = self.command(&[b"DEL", name.as_bytes()]);
                Err(Error::Corrupt { path: format!("redis key {name}").into(), reason })
            }
        }
    }
}

impl Store for RedisStore {
    fn get(&self, key: &CacheKey) -> Result<Option<Entry>, Error> {
        self.get_verified(key, |bytes| Entry::decode_owned(bytes, key))
    }

    fn get_encoded(&self, key: &CacheKey) -> Result<Option<Vec<u8>>, Error> {
        self.get_verified(key, |bytes| Entry::check(&bytes, key).map(|()| bytes))
    }

    fn put_encoded(&self, key: &CacheKey, bytes: &[u8]) -> Result<PutOutcome, Error> {
        let name = redis_key(key);
        // Twice at most: a value already there counts only once it checks out (one that does not
        // is deleted), so a damaged entry never blocks its own replacement.
        for _ in 0..2 {
            match self.command(&[b"SET", name.as_bytes(), bytes, b"NX"]).map_err(|e| self.io_error(e))? {
                Reply::Status(s) if s == "OK" => return Ok(PutOutcome::Published { bytes: bytes.len() as u64 }),
                Reply::Bulk(None) => match self.get_verified(key, |b| Entry::check(&b, key)) {
                    Ok(Some(_)) => return Ok(PutOutcome::AlreadyPresent),
                    Ok(None) | Err(Error::Corrupt { .. }) => {}
                    Err(e) => return Err(e),
                },
                Reply::Error(e) => return Err(self.io_error(refused(&e))),
                other => return Err(self.io_error(protocol(format!("SET answered {other:?}")))),
            }
        }
        Ok(PutOutcome::AlreadyPresent)
    }
}

/// The Redis key of an entry.
pub fn redis_key(key: &CacheKey) -> String {
    format!("ferry:{key}")
}

fn refused(message: &str) -> io::Error {
    let kind = if message.starts_with("NOPERM") || message.starts_with("NOAUTH") || message.starts_with("WRONGPASS") {
        io::ErrorKind::PermissionDenied
    } else {
        io::ErrorKind::Other
    };
    io::Error::new(kind, format!("redis refused: {message}"))
}

fn protocol(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

fn expect_ok(reply: Reply, what: &str) -> io::Result<()> {
    match reply {
        Reply::Status(_) => Ok(()),
        Reply::Error(e) => Err(refused(&format!("{what}: {e}"))),
        other => Err(protocol(format!("{what} answered {other:?}"))),
    }
}

/// Sends a command as a RESP array of bulk strings and reads the reply.
fn call(conn: &mut BufReader<TcpStream>, args: &[&[u8]]) -> io::Result<Reply> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    conn.get_mut().write_all(&out)?;
    read_reply(conn, 0)
}

pub(crate) fn read_reply(conn: &mut impl BufRead, depth: u32) -> io::Result<Reply> {
    let mut line = Vec::new();
    // A reply line is short; a server that never ends one must not make this allocate.
    io::Read::take(&mut *conn, 64 << 10).read_until(b'\n', &mut line)?;
    if !line.ends_with(b"\r\n") {
        return Err(protocol("connection closed mid-reply".into()));
    }
    line.truncate(line.len() - 2);
    let text = String::from_utf8_lossy(line.get(1..).unwrap_or_default()).into_owned();
    let number = || text.parse::<i64>().map_err(|_| protocol(format!("bad length {text:?}")));
    match line.first() {
        Some(b'+') => Ok(Reply::Status(text)),
        Some(b'-') => Ok(Reply::Error(text)),
        Some(b':') => Ok(Reply::Int(number()?)),
        Some(b'$') => {
            let n = number()?;
            if n < 0 {
                return Ok(Reply::Bulk(None));
            }
            let n = usize::try_from(n)
                .ok()
                .filter(|&n| n <= MAX_VALUE)
                .ok_or_else(|| protocol("value too large".into()))?;
            let mut value = vec![0u8; n + 2];
            conn.read_exact(&mut value)?;
            value.truncate(n);
            Ok(Reply::Bulk(Some(value)))
        }
        Some(b'*') if depth < 4 => {
            let n = number()?;
            let mut items = Vec::new();
            for _ in 0..n.clamp(0, 1024) {
                items.push(read_reply(conn, depth + 1)?);
            }
            Ok(Reply::Array(items))
        }
        _ => Err(protocol(format!("unexpected reply {:?}", String::from_utf8_lossy(&line)))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found reading the parser for its fuzz target: an empty reply line indexed past its end.
    #[test]
    fn malformed_replies_are_errors_not_panics() {
        for reply in [&b"\r\n"[..], b"\n", b"$\r\n", b"*\r\n", b"$-\r\n", b"*3\r\n+a\r\n", b"$99999999999\r\n"] {
            assert!(read_reply(&mut &reply[..], 0).is_err(), "{reply:?}");
        }
        let endless = vec![b'+'; 1 << 20];
        assert!(read_reply(&mut &endless[..], 0).is_err(), "a line without end is refused, not read whole");
    }

    #[test]
    fn urls() {
        let u = RedisUrl::parse("redis://127.0.0.1:6380/2").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.db, u.user, u.password), ("127.0.0.1", 6380, 2, None, None));
        let u = RedisUrl::parse("redis://reader:secret@cache.example").unwrap();
        assert_eq!((u.port, u.user.as_deref(), u.password.as_deref()), (6379, Some("reader"), Some("secret")));
        let u = RedisUrl::parse("redis://:pw@h:1").unwrap();
        assert_eq!((u.user, u.password.as_deref()), (None, Some("pw")));
        assert!(RedisUrl::parse("http://h").is_err());
        assert!(RedisUrl::parse("redis://h:port").is_err());
        assert!(RedisUrl::parse("redis://h/x").is_err());
        assert!(RedisUrl::parse("redis://").is_err());
    }

    #[test]
    fn replies() {
        let parse = |bytes: &[u8]| read_reply(&mut io::Cursor::new(bytes.to_vec()), 0);
        assert_eq!(parse(b"+OK\r\n").unwrap(), Reply::Status("OK".into()));
        assert_eq!(parse(b"$-1\r\n").unwrap(), Reply::Bulk(None));
        assert_eq!(parse(b"$3\r\na\r\nb\r\n").unwrap(), Reply::Bulk(Some(b"a\r\nb"[..3].to_vec())));
        assert_eq!(parse(b":5\r\n").unwrap(), Reply::Int(5));
        assert_eq!(parse(b"-NOPERM no\r\n").unwrap(), Reply::Error("NOPERM no".into()));
        assert!(parse(b"$5\r\nab").is_err());
        assert!(parse(b"+OK").is_err());
    }
}
