//! The small DSL the end-to-end tests are written in: find the built binaries, make isolated
//! environments (their own cache dir, HOME and config), run `ferry` and read what it says.
//! Everything runs for real: the installed rustc, cargo, processes on loopback.

pub mod oracle;

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Path of a binary built by this workspace (`ferry`, later `ferry-scheduler`, `ferry-worker`).
/// The test command builds them first (`cargo build --workspace`); a missing one is a clear panic.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/it-<hash> → target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(path.is_file(), "{} is missing: run `cargo build --workspace` before the tests", path.display());
    path
}

/// The sysroot of the `rustc` on PATH: the real installed toolchain.
pub fn installed_sysroot() -> PathBuf {
    let out = Command::new("rustc").args(["--print", "sysroot"]).output().expect("rustc runs");
    assert!(out.status.success(), "rustc --print sysroot failed");
    PathBuf::from(String::from_utf8(out.stdout).expect("utf-8").trim())
}

/// An isolated world for one test: a temp dir holding a cache dir, a HOME and work space.
#[derive(Debug)]
pub struct World {
    /// Declared first, so it runs before the directory is removed.
    pub unmounter: Unmounter,
    pub dir: tempfile::TempDir,
    /// Extra environment for every command run through [`World::command`].
    pub env: Vec<(String, String)>,
}

/// A worker killed by a test cannot unmount its jobs' size-limited trees (tmpfs and overlay,
/// when the tests run as root): unmount whatever is left under the world before it is removed, so
/// no test leaves mounts on the machine.
#[derive(Debug)]
pub struct Unmounter(std::path::PathBuf);

impl Drop for Unmounter {
    fn drop(&mut self) {
        let root = self.0.to_string_lossy().into_owned();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut under: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|point| point.starts_with(&format!("{root}/")))
            .collect();
        // Innermost first: an overlay on a directory under a tmpfs goes before the tmpfs.
        under.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for point in under {
            if let Ok(path) = std::ffi::CString::new(point) {
                // SAFETY: plain system call on a NUL-terminated path.
                unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
            }
        }
    }
}

impl Default for World {
    fn default() -> Self {
        Self::new()
    }
}

impl World {
    pub fn new() -> World {
        let dir = tempfile::Builder::new().prefix("ferry-test-").tempdir().expect("temp dir");
        // Traversable by the sandbox's unprivileged user, for worker data dirs and job inputs.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        let cache = dir.path().join("cache");
        let env = vec![
            ("FERRY_CACHE_DIR".to_owned(), cache.display().to_string()),
            // A config file the test controls (empty unless written): no user config leaks in.
            ("FERRY_CONFIG".to_owned(), dir.path().join("ferry.toml").display().to_string()),
            ("CARGO_INCREMENTAL".to_owned(), "0".to_owned()),
            ("FERRY_LOG".to_owned(), "debug".to_owned()),
        ];
        std::fs::write(dir.path().join("ferry.toml"), "").expect("write config");
        World { unmounter: Unmounter(dir.path().to_owned()), dir, env }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn cache_dir(&self) -> PathBuf {
        self.dir.path().join("cache")
    }

    pub fn set(&mut self, key: &str, value: impl AsRef<OsStr>) -> &mut Self {
        let value = value.as_ref().to_string_lossy().into_owned();
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_owned(), value));
        self
    }

    /// A command with this world's environment.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// Runs `ferry ARGS` and returns its output (whatever the exit status).
    pub fn ferry(&self, args: &[&str]) -> Output {
        self.command(bin("ferry")).args(args).output().expect("ferry runs")
    }

    /// Runs `ferry ARGS`, asserts success, returns stdout.
    pub fn ferry_ok(&self, args: &[&str]) -> String {
        let out = self.ferry(args);
        assert!(out.status.success(), "ferry {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).expect("utf-8 stdout")
    }

    /// Runs `ferry ARGS --json`-style commands and parses stdout as JSON.
    pub fn ferry_json(&self, args: &[&str]) -> serde_json::Value {
        let text = self.ferry_ok(args);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("ferry {args:?} printed bad JSON ({e}):\n{text}"))
    }

    /// `ferry stats --json`.
    pub fn stats(&self) -> serde_json::Value {
        self.ferry_json(&["stats", "--json"])
    }
}

/// Asserts a command succeeded, showing its output if not; returns stdout.
pub fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "command failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A running `ferry-scheduler` or `ferry-worker`, killed when dropped. Its stderr (the log) goes
/// to `<dir>/<name>.log`.
#[derive(Debug)]
pub struct Daemon {
    pub child: Child,
    /// The address it printed on its `listening on ADDR` line.
    pub addr: String,
    pub log: PathBuf,
    /// Every stdout line after the first (kept reading, so a later line never meets a closed pipe).
    stdout: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Daemon {
    /// Starts `program args`, waits (bounded) for its `listening on` line.
    pub fn start(mut cmd: Command, log: PathBuf) -> Daemon {
        let log_file = std::fs::File::create(&log).expect("log file");
        let mut child = cmd.stdout(Stdio::piped()).stderr(log_file).spawn().expect("daemon starts");
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        let later = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let lines = std::sync::Arc::clone(&later);
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let _ = tx.send(line);
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                lines.lock().unwrap_or_else(|p| p.into_inner()).push(line.trim_end().to_owned());
                line.clear();
            }
        });
        let line = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
        let Some(addr) = line.trim().strip_prefix("listening on ") else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "daemon did not print 'listening on': {line:?}\nlog:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        };
        Daemon { addr: addr.to_owned(), child, log, stdout: later }
    }

    /// The address of its `http on ADDR` line (printed right after `listening on` when started
    /// with `--http`), waiting for it up to 10 s.
    pub fn http_addr(&self) -> String {
        let start = std::time::Instant::now();
        loop {
            let lines = self.stdout.lock().unwrap_or_else(|p| p.into_inner()).clone();
            if let Some(addr) = lines.iter().find_map(|l| l.strip_prefix("http on ")) {
                return addr.to_owned();
            }
            assert!(start.elapsed() < Duration::from_secs(10), "no 'http on' line: {lines:?}\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// SIGKILL, and wait for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

impl World {
    /// `ferry-scheduler --listen 127.0.0.1:0 --data-dir <world>/scheduler [extra...]`.
    pub fn scheduler(&self, extra: &[&str]) -> Daemon {
        self.scheduler_at("127.0.0.1:0", extra)
    }

    pub fn scheduler_at(&self, listen: &str, extra: &[&str]) -> Daemon {
        let mut cmd = self.command(bin("ferry-scheduler"));
        cmd.args(["--listen", listen, "--data-dir"]).arg(self.path().join("scheduler")).args(extra);
        Daemon::start(cmd, self.path().join(format!("scheduler-{}.log", now_nanos())))
    }

    /// `ferry-worker --scheduler URL --listen 127.0.0.1:0 --data-dir <world>/<name> [extra...]`.
    /// The data dir is made traversable (the sandbox runs as an unprivileged user).
    pub fn worker(&self, name: &str, scheduler: &str, extra: &[&str]) -> Daemon {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(self.path(), std::fs::Permissions::from_mode(0o755));
        let mut cmd = self.command(bin("ferry-worker"));
        cmd.args(["--scheduler", scheduler, "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(self.path().join(name))
            .args(extra);
        Daemon::start(cmd, self.path().join(format!("{name}.log")))
    }

    /// Polls `ferry status --json` until `ready` holds (bounded by `limit`); returns the last one.
    pub fn wait_for_status(&self, limit: Duration, ready: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let start = Instant::now();
        loop {
            let out = self.ferry(&["status", "--json"]);
            if out.status.success()
                && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout)
                && (ready(&v) || start.elapsed() > limit)
            {
                return v;
            }
            assert!(start.elapsed() <= limit, "status never became ready: {}", String::from_utf8_lossy(&out.stderr));
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

/// A real `redis-server` on a loopback port, without persistence, killed when dropped.
#[derive(Debug)]
pub struct Redis {
    child: Child,
    pub port: u16,
    /// Served over TLS only (`rediss://`) with this PKI's server certificate; `redis-cli` uses its
    /// CA and client certificate.
    tls: Option<Pki>,
}

impl Redis {
    /// Starts one in `dir` (bounded retries: the free port is picked just before it binds).
    pub fn start(dir: &Path) -> Redis {
        Redis::start_with(dir, None, "no")
    }

    /// Starts one in `dir` that speaks TLS only (`--port 0 --tls-port P`) with `pki`'s server
    /// certificate; `auth_clients` is redis's `--tls-auth-clients`: `no`, or `yes` (clients must
    /// present a certificate `pki`'s CA signed).
    pub fn start_tls(dir: &Path, pki: &Pki, auth_clients: &str) -> Redis {
        Redis::start_with(dir, Some(pki), auth_clients)
    }

    fn start_with(dir: &Path, tls: Option<&Pki>, auth_clients: &str) -> Redis {
        for _ in 0..5 {
            let port =
                std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
            let mut cmd = Command::new("redis-server");
            cmd.args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]);
            match tls {
                None => cmd.args(["--port", &port.to_string()]),
                Some(pki) => cmd
                    .args(["--port", "0", "--tls-port", &port.to_string(), "--tls-auth-clients", auth_clients])
                    .arg("--tls-cert-file")
                    .arg(&pki.cert)
                    .arg("--tls-key-file")
                    .arg(&pki.key)
                    .arg("--tls-ca-cert-file")
                    .arg(&pki.ca),
            };
            let child = cmd
                .current_dir(dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server runs (scripts/test installs it)");
            let mut redis = Redis { child, port, tls: tls.cloned() };
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = redis.child.try_wait() {
                    break;
                }
                if redis.cli(&["ping"]).starts_with("PONG") {
                    return redis;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            // Dropping it kills it; the next try takes another port.
        }
        panic!("redis-server did not start");
    }

    /// `redis://127.0.0.1:PORT`, or `rediss://` for one started with [`Redis::start_tls`].
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// `redis-cli -p PORT args...` (with `--tls`, the CA and the client certificate for one
    /// started with [`Redis::start_tls`]), its stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let mut cmd = Command::new("redis-cli");
        cmd.args(["-p", &self.port.to_string()]);
        if let Some(pki) = &self.tls {
            cmd.arg("--tls").arg("--cacert").arg(&pki.ca);
            cmd.arg("--cert").arg(&pki.client_cert).arg("--key").arg(&pki.client_key);
        }
        let out = cmd.args(args).stdin(Stdio::null()).output().expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// A CA, a server certificate it signed for IP 127.0.0.1, a client certificate it signed, and
/// an unrelated second CA; all made by the `openssl` command line with P-256 keys.
#[derive(Debug, Clone)]
pub struct Pki {
    pub ca: PathBuf,
    pub other_ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl Pki {
    pub fn new(dir: &Path) -> Pki {
        std::fs::create_dir_all(dir).expect("mkdir");
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .stdin(Stdio::null())
                .output()
                .expect("openssl runs (scripts/test installs it)");
            ok(out);
        };
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        for name in ["ca", "other-ca"] {
            let (key, pem, subject) = (format!("{name}.key"), format!("{name}.pem"), format!("/CN=ferry test {name}"));
            let mut args = vec!["req", "-x509", "-days", "2", "-subj", &subject, "-keyout", &key, "-out", &pem];
            args.extend(ec);
            args.extend(["-addext", "basicConstraints=critical,CA:TRUE"]);
            args.extend(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
            openssl(&args);
        }
        for (name, subject, usage) in [
            ("server", "/CN=127.0.0.1", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
            ("client", "/CN=ferry test client", "extendedKeyUsage=clientAuth\n"),
        ] {
            let (key, csr, pem, ext) =
                (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"), format!("{name}.ext"));
            let mut args = vec!["req", "-subj", subject, "-keyout", &key, "-out", &csr];
            args.extend(ec);
            openssl(&args);
            let extensions = format!("{usage}basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n");
            std::fs::write(dir.join(&ext), extensions).expect("write extensions");
            openssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &ext,
                "-out",
                &pem,
            ]);
        }
        Pki {
            ca: dir.join("ca.pem"),
            other_ca: dir.join("other-ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real `memcached` on a loopback port (64 MiB, the default 1 MiB item size), killed when dropped.
#[derive(Debug)]
pub struct Memcached {
    child: Child,
    pub port: u16,
}

impl Memcached {
    /// Starts one (bounded retries: the free port is picked just before it binds).
    pub fn start() -> Memcached {
        for _ in 0..5 {
            let port =
                std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
            let mut child = Command::new("memcached")
                .args(["-l", "127.0.0.1", "-p", &port.to_string(), "-U", "0", "-m", "64", "-u", "nobody"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("memcached runs (scripts/test installs it)");
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if memcached_command(port, "version\r\n").starts_with("VERSION") {
                    return Memcached { child, port };
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("memcached did not start");
    }

    pub fn url(&self) -> String {
        format!("memcached://127.0.0.1:{}", self.port)
    }

    /// Sends `text` and reads until the answer's last line (`END`, `OK`, a status line); "" when
    /// the server cannot be reached.
    pub fn command(&self, text: &str) -> String {
        memcached_command(self.port, text)
    }

    /// Every key the server holds (`lru_crawler metadump all`, which URL-encodes them).
    pub fn keys(&self) -> Vec<String> {
        self.command("lru_crawler metadump all\r\n")
            .lines()
            .filter_map(|l| {
                l.strip_prefix("key=").map(|rest| percent_decode(rest.split(' ').next().unwrap_or_default()))
            })
            .collect()
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        stream.write_all(format!("get {key}\r\n").as_bytes()).ok()?;
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line).ok()?;
        let size: usize = line.trim_end().rsplit(' ').next()?.parse().ok()?;
        let mut value = vec![0u8; size + 2];
        std::io::Read::read_exact(&mut reader, &mut value).ok()?;
        value.truncate(size);
        Some(value)
    }

    /// Sets `key` to `value`.
    pub fn set(&self, key: &str, value: &[u8]) {
        let mut text = format!("set {key} 0 0 {}\r\n", value.len()).into_bytes();
        text.extend_from_slice(value);
        text.extend_from_slice(b"\r\n");
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.port)).expect("memcached");
        stream.write_all(&text).expect("set");
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).expect("answer");
        assert_eq!(line, "STORED\r\n", "set {key}");
    }
}

impl Drop for Memcached {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn memcached_command(port: u16, text: &str) -> String {
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return String::new() };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    if stream.write_all(text.as_bytes()).is_err() {
        return String::new();
    }
    let mut reader = BufReader::new(stream);
    let mut answer = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        answer.push_str(&line);
        let done = ["END\r\n", "OK\r\n", "STORED\r\n", "NOT_STORED\r\n", "DELETED\r\n", "NOT_FOUND\r\n"];
        if line.starts_with("VERSION")
            || line.starts_with("ERROR")
            || line.contains("_ERROR")
            || done.contains(&line.as_str())
        {
            break;
        }
    }
    answer
}

/// `%XX` escapes decoded.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
