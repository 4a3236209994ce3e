//! What both daemons do the same way: read their TOML file, log to stderr (filter from
//! `FERRY_LOG`, default `info`), bind and announce `listening on ADDR` only once the address may
//! be served, serve HTTP/2 with the same settings, and turn SIGINT/SIGTERM into a cancelled
//! shutdown token.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;

use tokio_util::sync::CancellationToken;

/// The daemon's TOML file (defaults when none is given); errors name the file.
pub fn read_config<T: serde::de::DeserializeOwned + Default>(file: Option<&Path>) -> Result<T, String> {
    let Some(path) = file else { return Ok(T::default()) };
    let text = std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("{}: {}", path.display(), e.message()))
}

/// Binds `listen`, lets `check` refuse the bound address (the exposure rule), then prints
/// `listening on ADDR` as the first stdout line: whoever waits for it never sees a refused daemon.
pub async fn bind_and_announce(
    listen: &str,
    check: impl FnOnce(SocketAddr) -> Result<(), String>,
) -> Result<tokio::net::TcpListener, String> {
    let listener =
        tokio::net::TcpListener::bind(listen).await.map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    check(addr)?;
    println!("listening on {addr}");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    Ok(listener)
}

/// The connections a daemon serves, accepted on `listener` with Nagle off (the server's own
/// `tcp_nodelay` setting applies only to listeners it binds itself).
pub fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Logs to stderr with the `FERRY_LOG` filter (default `info`).
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
}

/// The HTTP/2 server settings every ferry daemon uses: large fixed flow-control windows (toolchain
/// archives are hundreds of megabytes; an adaptive window starts at 64 KiB and grows only over
/// round trips, which a short-lived wrapper connection never makes, so a 5 MB entry took ~200 ms
/// on loopback), keepalive (a dead peer is noticed within seconds), and no Nagle delay (a small
/// answer waiting for the peer's delayed ACK cost a control call 40 ms: see [`incoming`]).
pub fn server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(16 << 20))
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
}

/// A token cancelled on the first SIGINT or SIGTERM. Call inside a tokio runtime.
pub fn shutdown_on_signals() -> std::io::Result<CancellationToken> {
    use tokio::signal::unix::{SignalKind, signal};
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let cancel = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        cancel.cancel();
    });
    Ok(token)
}

/// A daemon's exit: success, or `program: error: ...` (with its causes) on stderr and failure.
pub fn exit(program: &str, result: Result<(), impl std::fmt::Display>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{program}: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Err names what is wrong with a PEM certificate and key pair.
pub fn check_tls_identity(cert: &[u8], key: &[u8]) -> Result<(), String> {
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    if !text(cert).contains("-----BEGIN CERTIFICATE-----") {
        return Err("the certificate file holds no PEM certificate".into());
    }
    let key_text = text(key);
    if !(key_text.contains("-----BEGIN") && key_text.contains("PRIVATE KEY-----")) {
        return Err("the key file holds no PEM private key".into());
    }
    let identity = tonic::transport::Identity::from_pem(cert, key);
    match tonic::transport::Server::builder().tls_config(tonic::transport::ServerTlsConfig::new().identity(identity)) {
        Ok(_) => Ok(()),
        // tonic's own message is "transport error"; what went wrong is in its sources.
        Err(e) => {
            let mut causes = Vec::new();
            let mut next = std::error::Error::source(&e);
            while let Some(source) = next {
                causes.push(source.to_string());
                next = source.source();
            }
            if causes.is_empty() {
                causes.push(e.to_string());
            }
            Err(format!("the certificate and key are not a usable pair: {}", causes.join(": ")))
        }
    }
}

/// Whether the first certificate of `cert` (PEM) names `address`'s host (`host:port`, `[v6]:port`
/// or a bare host), as a client connecting there checks it (a DNS name, or an IP address, among
/// the subject alternative names). Err says which names it holds instead: a worker that
/// advertises an address its certificate does not name is refused by every client's TLS.
pub fn check_certificate_names(cert: &[u8], address: &str) -> Result<(), String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let host = match address.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) && !host.is_empty() => host,
        _ => address,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let name =
        ServerName::try_from(host.to_owned()).map_err(|_| format!("'{host}' is not a host name or IP address"))?;
    let first = CertificateDer::pem_slice_iter(cert)
        .next()
        .and_then(Result::ok)
        .ok_or_else(|| "the certificate file holds no PEM certificate".to_owned())?;
    let parsed = rustls::server::ParsedCertificate::try_from(&first).map_err(|e| format!("the certificate: {e}"))?;
    rustls::client::verify_server_name(&parsed, &name)
        .map_err(|_| format!("the certificate does not name '{host}' (clients connecting to {address} refuse it)"))
}

/// Whether `dir` can be the data directory, leaving nothing behind: when it exists, a probe file
/// is made in it and removed; when it does not, the first missing directory on the way to it is
/// made and removed (a real start makes the whole path).
pub fn check_writable_dir(dir: &Path) -> Result<(), String> {
    use std::io::ErrorKind;
    let dir = std::path::absolute(dir).map_err(|e| format!("cannot resolve {}: {e}", dir.display()))?;
    let mut missing = None;
    for ancestor in dir.ancestors() {
        match std::fs::metadata(ancestor) {
            Ok(meta) if meta.is_dir() => break,
            Ok(_) => return Err(format!("{} is not a directory", ancestor.display())),
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => missing = Some(ancestor),
            Err(e) => return Err(format!("cannot reach {}: {e}", ancestor.display())),
        }
    }
    match missing {
        Some(first) => {
            std::fs::create_dir(first).map_err(|e| format!("cannot create {}: {e}", first.display()))?;
            let _ = std::fs::remove_dir(first);
        }
        None => {
            let probe = dir.join(format!(".ferry-check-{}", std::process::id()));
            std::fs::File::create_new(&probe).map_err(|e| format!("cannot write in {}: {e}", dir.display()))?;
            let _ = std::fs::remove_file(&probe);
        }
    }
    Ok(())
}
