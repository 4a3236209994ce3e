//! Redis as a shared cache tier (`FERRY_SHARED_CACHE=redis://[user:password@]host[:port][/db]`,
//! or `rediss://` for TLS), for sites that outgrow one cache node.
//!
//! Entries are the same self-verifying bytes as in a disk tier, stored as the value of
//! `ferry:<key hex>`. Publishing is `SET ... NX` (first writer wins, never overwritten; Redis
//! writes a value whole, so no reader sees a part). Every read is verified; a value that does not
//! verify is deleted (best effort: a read-only user cannot) and reported as corrupt. Size is
//! Redis's job: run it with `maxmemory` and `maxmemory-policy allkeys-lru`. Write access is
//! Redis's ACL: give clients a user that may only `GET` (and workers one that may `SET`).
//!
//! The client is redis-rs, its blocking connection only: one connection, reused, opened on the
//! first call and reopened once when it broke, every wait bounded by the store's deadline. TLS
//! (`rediss://`) is rustls with the *ring* provider, trusting the system's roots or the CA given
//! in [`RedisTls`], and presenting a client certificate to a server that asks for one.

use std::io;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use redis::{ConnectionLike, IntoConnectionInfo, Value};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::Entry;
use crate::key::CacheKey;
use crate::store::{Error, PutOutcome, Store};

/// A Redis server holding entries.
pub struct RedisStore {
    client: redis::Client,
    /// The URL without its password: what messages name.
    shown: String,
    /// Bounds connecting (TLS handshake and `AUTH` included) and every read and write.
    timeout: Duration,
    conn: Mutex<Option<redis::Connection>>,
}

/// What a `rediss://` connection trusts and presents, as PEM (read and checked by the caller's
/// configuration with [`RedisTls::read_ca`] and [`RedisTls::read_identity`]).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct RedisTls {
    /// CA certificates the server's certificate must chain to; `None`: the system's roots.
    pub ca: Option<Vec<u8>>,
    /// A certificate chain and its private key, for a server that authenticates clients by
    /// certificate (mutual TLS); `None`: no client certificate.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

/// Checks a `redis://` or `rediss://` URL without connecting. Err is a sentence for the user that
/// never shows the password.
pub fn check_redis_url(url: &str) -> Result<(), String> {
    connection_info(url).map(|_| ())
}

impl RedisStore {
    /// Connects lazily: the first call opens the connection, and a broken one is reopened once.
    /// `tls` applies to `rediss://` URLs only.
    pub fn new(url: &str, tls: &RedisTls, timeout: Duration) -> Result<RedisStore, String> {
        let info = connection_info(url)?;
        let shown = without_password(url);
        let client = if url.starts_with("rediss://") {
            // redis-rs builds its rustls configuration with the process's default provider:
            // make that ring's, whichever providers the build happens to link.
            let _ = rustls::crypto::ring::default_provider().install_default();
            let certificates = redis::TlsCertificates {
                client_tls: tls
                    .identity
                    .as_ref()
                    .map(|(cert, key)| redis::ClientTlsConfig { client_cert: cert.clone(), client_key: key.clone() }),
                root_cert: tls.ca.clone(),
            };
            redis::Client::build_with_tls(info, certificates)
        } else {
            redis::Client::open(info)
        }
        .map_err(|e| format!("'{shown}': {e}"))?;
        Ok(RedisStore { client, shown, timeout, conn: Mutex::new(None) })
    }

    fn connect(&self) -> redis::RedisResult<redis::Connection> {
        let conn = self.client.get_connection_with_timeout(self.timeout)?;
        conn.set_read_timeout(Some(self.timeout))?;
        conn.set_write_timeout(Some(self.timeout))?;
        Ok(conn)
    }

    /// Runs one command, reconnecting once if the connection had broken. An error the server
    /// answered is a [`Value::ServerError`], not an `Err`: the connection stays usable.
    fn command(&self, cmd: &redis::Cmd) -> Result<Value, Error> {
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        for attempt in 0..2 {
            let fresh = guard.is_none();
            if fresh {
                *guard = Some(self.connect().map_err(|e| self.io_error(connection_error(e)))?);
            }
            let conn = guard.as_mut().expect("connected above");
            match conn.req_command(cmd) {
                Ok(value) => return Ok(value),
                Err(e) => {
                    // The reply was not read whole (or not at all): nothing more can be read here.
                    *guard = None;
                    if fresh || attempt == 1 {
                        return Err(self.io_error(connection_error(e)));
                    }
                }
            }
        }
        unreachable!("the second attempt returns")
    }

    fn io_error(&self, e: io::Error) -> Error {
        Error::Io { path: self.shown.clone().into(), source: e }
    }
}

impl RedisTls {
    /// The PEM CA certificates in `path`, checked: at least one, each a usable trust anchor.
    /// Err is a sentence naming the file.
    pub fn read_ca(path: &Path) -> Result<Vec<u8>, String> {
        let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| format!("{}: {e}", path.display()))?;
            roots.add(cert).map_err(|e| format!("{}: a certificate is not usable as a CA: {e}", path.display()))?;
        }
        if roots.is_empty() {
            return Err(format!("{} holds no PEM certificate", path.display()));
        }
        Ok(pem)
    }

    /// A PEM certificate chain and its unencrypted PEM private key, checked to belong together.
    /// Err is a sentence naming the files.
    pub fn read_identity(cert: &Path, key: &Path) -> Result<(Vec<u8>, Vec<u8>), String> {
        let read = |path: &Path| std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()));
        let (cert_pem, key_pem) = (read(cert)?, read(key)?);
        let chain = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{}: {e}", cert.display()))?;
        if chain.is_empty() {
            return Err(format!("{} holds no PEM certificate", cert.display()));
        }
        let private = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| format!("{}: no unencrypted PEM private key ({e})", key.display()))?;
        rustls::ClientConfig::builder_with_provider(rustls::crypto::ring::default_provider().into())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_client_auth_cert(chain, private)
            .map_err(|e| format!("certificate {} with key {}: {e}", cert.display(), key.display()))?;
        Ok((cert_pem, key_pem))
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
        let bytes = match self.command(redis::cmd("GET").arg(&name))? {
            Value::Nil => return Ok(None),
            Value::BulkString(bytes) => bytes,
            Value::ServerError(e) => return Err(self.io_error(refused(&e))),
            other => return Err(self.io_error(protocol(format!("GET answered {}", shown(&other))))),
        };
        match verify(bytes) {
            Ok(found) => Ok(Some(found)),
            Err(reason) => {
                let _ = self.command(redis::cmd("DEL").arg(&name));
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
            match self.command(redis::cmd("SET").arg(&name).arg(bytes).arg("NX"))? {
                Value::Okay => return Ok(PutOutcome::Published { bytes: bytes.len() as u64 }),
                Value::Nil => match self.get_verified(key, |b| Entry::check(&b, key)) {
                    Ok(Some(_)) => return Ok(PutOutcome::AlreadyPresent),
                    Ok(None) | Err(Error::Corrupt { .. }) => {}
                    Err(e) => return Err(e),
                },
                Value::ServerError(e) => return Err(self.io_error(refused(&e))),
                other => return Err(self.io_error(protocol(format!("SET answered {}", shown(&other))))),
            }
        }
        Ok(PutOutcome::AlreadyPresent)
    }

    fn remove(&self, key: &CacheKey) -> Result<bool, Error> {
        match self.command(redis::cmd("DEL").arg(redis_key(key)))? {
            Value::Int(n) => Ok(n > 0),
            Value::ServerError(e) => Err(self.io_error(refused(&e))),
            other => Err(self.io_error(protocol(format!("DEL answered {}", shown(&other))))),
        }
    }
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore").field("url", &self.shown).field("timeout", &self.timeout).finish_non_exhaustive()
    }
}

impl std::fmt::Debug for RedisTls {
    /// Never the key; whether each part is set is what a reader needs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTls")
            .field("ca", &if self.ca.is_some() { "configured" } else { "system roots" })
            .field("identity", &self.identity.is_some())
            .finish()
    }
}

/// The Redis key of an entry.
pub fn redis_key(key: &CacheKey) -> String {
    format!("ferry:{key}")
}

/// The URL checked and parsed, with Nagle off (a command is one small write waiting for its
/// answer) and without redis-rs's `CLIENT SETINFO` round trip on connecting.
fn connection_info(url: &str) -> Result<redis::ConnectionInfo, String> {
    let shown = without_password(url);
    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
        return Err(format!("'{shown}' is not a redis:// or rediss:// URL"));
    }
    // redis-rs would take `#insecure` as "do not check the server's certificate", and queries
    // as settings of its own: neither belongs in ferry's configuration.
    if url.contains(['#', '?']) {
        return Err(format!(
            "'{shown}' has a query or fragment ('?', '#'); give redis[s]://[user:password@]host[:port][/db], \
             with '#' and '?' in a password written %23 and %3F"
        ));
    }
    let info = url.into_connection_info().map_err(|e| format!("'{shown}' is not a usable Redis URL: {e}"))?;
    let redis = info.redis_settings().clone().set_skip_set_lib_name();
    Ok(info.set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true)).set_redis_settings(redis))
}

/// `redis://user:secret@host/0` → `redis://user:***@host/0`: a shared-tier URL fit for logs and
/// `--check-config`.
pub fn without_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rsplit_once('@') {
        Some((userinfo, _)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
            format!("{scheme}://{user}:***@{}", &rest[userinfo.len() + 1..])
        }
        None => url.to_owned(),
    }
}

/// A failure to connect or to read a reply, as the I/O error it is (timeouts stay timeouts, so
/// callers can tell a slow server from a broken one; a refused `AUTH` is a refusal).
fn connection_error(e: redis::RedisError) -> io::Error {
    if e.is_timeout() {
        return io::Error::new(io::ErrorKind::TimedOut, e.to_string());
    }
    if e.kind() == redis::ErrorKind::AuthenticationFailed
        || e.code().is_some_and(|code| ["NOPERM", "NOAUTH", "WRONGPASS"].contains(&code))
    {
        return io::Error::new(io::ErrorKind::PermissionDenied, format!("redis refused: {e}"));
    }
    if let Some(tls) = tls_error(&e) {
        let hint = match tls {
            rustls::Error::InvalidCertificate(_) => {
                "; the server's certificate does not check out against the Redis CA setting \
                 (FERRY_REDIS_CA; unset: the system's roots)"
            }
            _ => "",
        };
        return io::Error::other(format!("tls: {tls}{hint}"));
    }
    let kind = match e.kind() {
        redis::ErrorKind::Io => io::ErrorKind::Other,
        _ => io::ErrorKind::InvalidData,
    };
    io::Error::new(kind, e.to_string())
}

/// The TLS failure behind `e`, if that is what it is: rustls's stream reports it inside an
/// `io::Error`, which redis-rs keeps behind an `Arc`.
fn tls_error(e: &redis::RedisError) -> Option<&rustls::Error> {
    type Shared = std::sync::Arc<dyn std::error::Error + Send + Sync>;
    let source = std::error::Error::source(e)?;
    let inner: &(dyn std::error::Error + 'static) = match source.downcast_ref::<Shared>() {
        Some(shared) => &**shared,
        None => source,
    };
    inner.downcast_ref::<rustls::Error>().or_else(|| inner.downcast_ref::<io::Error>()?.get_ref()?.downcast_ref())
}

fn refused(e: &redis::ServerError) -> io::Error {
    let kind = if ["NOPERM", "NOAUTH", "WRONGPASS"].contains(&e.code()) {
        io::ErrorKind::PermissionDenied
    } else {
        io::ErrorKind::Other
    };
    io::Error::new(kind, format!("redis refused: {e}"))
}

fn protocol(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// A reply in a message: its kind, never its content (which could be large).
fn shown(value: &Value) -> &'static str {
    match value {
        Value::Okay | Value::SimpleString(_) => "a status",
        Value::Int(_) => "an integer",
        Value::BulkString(_) => "a value",
        Value::Nil => "nil",
        Value::Array(_) | Value::Set(_) | Value::Map(_) | Value::Push { .. } => "an aggregate",
        _ => "an unexpected type",
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;
    use std::time::Instant;

    use super::*;

    /// Replies a hostile or broken server could send to `GET`: each is an error (the client never
    /// panics, never takes a declared length as a size to allocate, never reads a line without
    /// end to its end, never waits past its deadline), and the next call connects afresh.
    #[test]
    fn malformed_replies_are_errors_not_panics() {
        let endless = vec![b'+'; 1 << 20];
        let oversized = b"$99999999999\r\nabc".to_vec();
        let mut replies: Vec<Vec<u8>> = [
            &b"\r\n"[..],
            b"\n",
            b"$\r\n",
            b"*\r\n",
            b"$-\r\n",
            b"*3\r\n+a\r\n",
            b"$5\r\nab",
            b"+OK",
            b"+OK\r\n",
            b":5\r\n",
            b"*1\r\n$1\r\na\r\n",
            b"?\r\n",
        ]
        .iter()
        .map(|r| r.to_vec())
        .collect();
        replies.extend([oversized, endless]);
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let served = replies.clone();
        let server = std::thread::spawn(move || {
            for reply in served.iter().map(Some).chain([None]) {
                let (stream, _) = listener.accept().expect("accept");
                let mut reader = BufReader::new(stream);
                // The command: an array header, then each argument's length line and value line.
                let mut line = String::new();
                reader.read_line(&mut line).expect("command");
                let args: usize = line.trim_start_matches('*').trim().parse().expect("array");
                for _ in 0..2 * args {
                    line.clear();
                    reader.read_line(&mut line).expect("argument");
                }
                match reply {
                    Some(reply) => {
                        let _ = reader.get_mut().write_all(reply);
                        // Dropped: closed after the reply.
                    }
                    None => {
                        // Says nothing at all: the client must give up at its deadline (and then
                        // close the connection, which ends this read).
                        let _ = reader.read_line(&mut line);
                    }
                }
            }
        });
        let timeout = Duration::from_millis(500);
        let store = RedisStore::new(&format!("redis://127.0.0.1:{port}"), &RedisTls::default(), timeout).expect("url");
        let key = CacheKey([7; 32]);
        for reply in &replies {
            let shown = String::from_utf8_lossy(&reply[..reply.len().min(20)]).into_owned();
            match store.get(&key) {
                Err(Error::Io { .. }) => {}
                other => panic!("{shown:?} gave {other:?}"),
            }
        }
        let start = Instant::now();
        match store.get(&key) {
            Err(Error::Io { source, .. }) => assert_eq!(source.kind(), io::ErrorKind::TimedOut, "{source}"),
            other => panic!("a silent server gave {other:?}"),
        }
        assert!(start.elapsed() < Duration::from_secs(2), "waited {:?} past a 500 ms deadline", start.elapsed());
        server.join().expect("server");
    }

    #[test]
    fn urls() {
        for good in ["redis://127.0.0.1:6380/2", "redis://reader:secret@cache.example", "redis://:pw@h:1", "rediss://h"]
        {
            assert_eq!(check_redis_url(good), Ok(()), "{good}");
        }
        for bad in [
            "http://h",
            "redis://h:port",
            "redis://h/x",
            "redis://",
            "rediss://h/#insecure",
            "redis://h/?protocol=resp3",
            "unix:///tmp/redis.sock",
        ] {
            assert!(check_redis_url(bad).is_err(), "{bad}");
        }
        let message = check_redis_url("redis://u:hunter2@h:port").unwrap_err();
        assert!(!message.contains("hunter2") && message.contains("redis://u:***@h:port"), "{message}");
    }

    #[test]
    fn tls_files_are_checked_when_read() {
        let dir = tempfile::tempdir().expect("temp dir");
        let missing = dir.path().join("missing.pem");
        assert!(RedisTls::read_ca(&missing).unwrap_err().contains("missing.pem"));
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate\n").expect("write");
        assert!(RedisTls::read_ca(&garbage).unwrap_err().contains("holds no PEM certificate"));
        let broken = dir.path().join("broken.pem");
        std::fs::write(&broken, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").expect("write");
        assert!(RedisTls::read_ca(&broken).is_err());
        assert!(RedisTls::read_identity(&garbage, &garbage).unwrap_err().contains("holds no PEM certificate"));
    }
}
