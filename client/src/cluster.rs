//! Talking to the cluster from the command line: connecting to the scheduler (TLS with `FERRY_CA`,
//! bearer token from `FERRY_TOKEN`), `ferry toolchain upload`, the cluster's toolchain list and
//! `ferry status`.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use anyhow::{Context, bail};
use ferry_proto::v1::scheduler_client::SchedulerClient;
use ferry_proto::v1::{self, toolchain_upload};
use ferry_proto::{SchedulerApi, TokenInterceptor, to_digest};
use ferry_toolchains::Packaged;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::config::Config;

pub type Scheduler = SchedulerApi;

/// A channel to `url` with the configured TLS trust and token.
pub async fn channel(config: &Config, url: &str) -> anyhow::Result<(Channel, TokenInterceptor)> {
    let mut endpoint = Endpoint::from_shared(url.to_owned())
        .with_context(|| format!("'{url}' is not a valid URL"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .initial_stream_window_size(8 << 20)
        .initial_connection_window_size(16 << 20)
        // A peer that stops answering (frozen, or its machine gone) is noticed within ~10 s.
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    if url.starts_with("https://") {
        let mut tls = ClientTlsConfig::new().with_enabled_roots();
        if let Some(ca) = &config.ca {
            let pem = std::fs::read(ca).with_context(|| format!("reading CA file {}", ca.display()))?;
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        endpoint = endpoint.tls_config(tls).context("configuring TLS")?;
    }
    let channel = endpoint.connect().await.map_err(|e| {
        // tonic repeats a cause in its own text: each said once.
        let mut causes: Vec<String> = Vec::new();
        let mut next: Option<&dyn std::error::Error> = Some(&e);
        while let Some(cause) = next {
            let text = cause.to_string();
            if !causes.iter().any(|c| c.contains(&text)) {
                causes.push(text);
            }
            next = cause.source();
        }
        let text = causes.join(": ");
        let hint = hint(&text, url).map(|h| format!("; {h}")).unwrap_or_default();
        anyhow::anyhow!("cannot connect to {url}: {text}{hint}")
    })?;
    let token = TokenInterceptor::new(config.token.as_deref()).map_err(|e| anyhow::anyhow!("FERRY_TOKEN: {e}"))?;
    Ok((channel, token))
}

pub async fn scheduler(config: &Config) -> anyhow::Result<Scheduler> {
    let Some(url) = &config.scheduler else {
        bail!("no scheduler configured; set FERRY_SCHEDULER (e.g. http://127.0.0.1:7700) or 'cluster.scheduler'");
    };
    let (channel, token) = channel(config, url).await?;
    Ok(SchedulerClient::with_interceptor(channel, token).max_decoding_message_size(64 << 20))
}

/// Uploads a packaged toolchain unless the scheduler already has it. Returns bytes sent.
pub async fn upload(client: &mut Scheduler, packaged: &Packaged) -> anyhow::Result<u64> {
    let id = to_digest(packaged.identified.id.0);
    let present = client.has_toolchain(v1::ToolchainRef { id: Some(id.clone()) }).await.map_err(status)?;
    if present.into_inner().present {
        return Ok(0);
    }
    let size = packaged.archive_bytes;
    let header = v1::ToolchainHeader {
        id: Some(id),
        size,
        rustc_version: packaged.identified.probe.version.clone(),
        targets: packaged.identified.targets.clone(),
    };
    let path = packaged.archive.clone();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let reader = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        use std::io::Read;
        let first = v1::ToolchainUpload { kind: Some(toolchain_upload::Kind::Header(header)) };
        if tx.blocking_send(first).is_err() {
            return Ok(());
        }
        let mut file = std::fs::File::open(&path).with_context(|| format!("reading {}", path.display()))?;
        let progress = std::io::stderr().is_terminal();
        let mut sent = 0u64;
        loop {
            let mut buf = vec![0u8; 1 << 20];
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            buf.truncate(n);
            sent += n as u64;
            if tx.blocking_send(v1::ToolchainUpload { kind: Some(toolchain_upload::Kind::Data(buf)) }).is_err() {
                break;
            }
            if progress {
                let _ = write!(std::io::stderr(), "\ruploading {:>3}% ({} MiB)", sent * 100 / size.max(1), sent >> 20);
            }
        }
        if progress {
            let _ = writeln!(std::io::stderr());
        }
        Ok(())
    });
    let response = client.upload_toolchain(tokio_stream::wrappers::ReceiverStream::new(rx)).await.map_err(status)?;
    reader.await.context("reading the archive")??;
    Ok(if response.into_inner().stored { size } else { 0 })
}

/// A gRPC status as an error a person can read, with what to do when the status says.
pub fn status(s: tonic::Status) -> anyhow::Error {
    let hint = match s.code() {
        tonic::Code::Unimplemented => Some(
            "this address answers gRPC but is not a ferry scheduler (a worker's port?): FERRY_SCHEDULER must name \
             the scheduler's address",
        ),
        _ => hint(s.message(), ""),
    };
    let hint = hint.map(|h| format!("; {h}")).unwrap_or_default();
    anyhow::anyhow!("scheduler refused: {} ({:?}){hint}", s.message(), s.code())
}

/// What to do about a failed connection or call, from its text and the URL (empty when unknown):
/// the TLS failures people meet setting a cluster up, and plain HTTP against a TLS port.
pub fn hint(text: &str, url: &str) -> Option<&'static str> {
    let tls_url = url.starts_with("https://");
    Some(if text.contains("UnknownIssuer") {
        "the server's certificate is not signed by a CA this machine trusts: set FERRY_CA (or cluster.ca) to the \
         cluster's ca.pem"
    } else if text.contains("not valid for name") || text.contains("NotValidForName") {
        "the server's certificate does not name this host: use the name (or address) it was issued for"
    } else if text.contains("Expired") || text.contains("expired") {
        "the server's certificate has expired (or this machine's clock is wrong): renew it"
    } else if tls_url && (text.contains("InvalidContentType") || text.contains("corrupt message")) {
        "the server does not speak TLS here: use http://, or give the server its TLS certificate"
    } else if !tls_url && ["transport error", "h2 protocol error", "connection reset"].iter().any(|t| text.contains(t))
    {
        "the connection broke during the call: if the scheduler serves TLS, the URL must start with https:// \
         (and FERRY_CA name its CA)"
    } else {
        return None;
    })
}

pub fn hex(d: &Option<v1::Digest>) -> String {
    d.as_ref().map(|d| d.blake3.iter().map(|b| format!("{b:02x}")).collect()).unwrap_or_default()
}
