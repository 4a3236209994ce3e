//! ferry's wire protocol: the generated `ferry.v1` messages and services, the conversions from
//! wire to domain values that validate (a digest is checked once, here), and bearer-token roles.
//! Core logic never sees an unchecked proto value; `tonic::Status` is built only at this edge and
//! in the service adapters.

mod auth;
mod cache;
pub mod daemon;
mod grant;
pub mod http;

pub use auth::{
    AuthError, Credential, Role, Roles, Tokens, bearer, check_exposure, check_not_placeholder, require, require_any,
    tokens_from_config,
};
pub use cache::{RemoteCache, SchedulerApi, SharedTierSpec, TokenInterceptor};
pub use grant::{
    GRANT_HEADER, GRANT_LIFETIME, Grant, GrantError, GrantKey, attach_grant, clock_offset, grant_bytes, new_grant_key,
    now_ms,
};

#[allow(missing_debug_implementations, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("ferry.v1");
}

/// A wire value that does not make sense; becomes `InvalidArgument` naming the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub field: &'static str,
    pub reason: String,
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid '{}': {}", self.field, self.reason)
    }
}

impl std::error::Error for Invalid {}

impl From<Invalid> for tonic::Status {
    fn from(e: Invalid) -> tonic::Status {
        tonic::Status::invalid_argument(e.to_string())
    }
}

/// A required 32-byte digest field.
/// The revision of the `ferry.v1` protocol this build speaks. Workers send it when they register
/// and clients when they allocate (0: a build from before the field, which spoke revision 1). A
/// revision adds fields only as long as it stays compatible; one that cannot be served is refused
/// by [`check_protocol`] with which side to upgrade, never misread.
pub const PROTOCOL: u32 = 1;

/// Whether a scheduler of this build serves a peer (`who`: `worker` or `client`) speaking
/// revision `theirs`. Err is FAILED_PRECONDITION naming both revisions and what to upgrade.
pub fn check_protocol(theirs: u32, who: &str) -> Result<(), tonic::Status> {
    let theirs = theirs.max(1);
    if theirs == PROTOCOL {
        return Ok(());
    }
    let (mine, version) = (PROTOCOL, env!("CARGO_PKG_VERSION"));
    let fix = if theirs > mine {
        "upgrade the scheduler first, then workers, then clients"
    } else {
        "upgrade it to this scheduler's release"
    };
    Err(tonic::Status::failed_precondition(format!(
        "this scheduler (ferry {version}) speaks protocol revision {mine}; the {who} speaks revision {theirs}: {fix} \
         (packaging/README.md, Upgrades)"
    )))
}

pub fn digest(d: Option<&v1::Digest>, field: &'static str) -> Result<[u8; 32], Invalid> {
    let d = d.ok_or(Invalid { field, reason: "missing".into() })?;
    d.blake3
        .as_slice()
        .try_into()
        .map_err(|_| Invalid { field, reason: format!("a digest has 32 bytes, not {}", d.blake3.len()) })
}

/// Every digest of a repeated field.
pub fn digests(ds: &[v1::Digest], field: &'static str) -> Result<Vec<[u8; 32]>, Invalid> {
    ds.iter().map(|d| digest(Some(d), field)).collect()
}

pub fn to_digest(bytes: [u8; 32]) -> v1::Digest {
    v1::Digest { blake3: bytes.to_vec() }
}

/// Checks an absolute, normal path from the wire: absolute, no `..`/`.`/empty components, no NUL.
pub fn absolute_path(path: &str, field: &'static str) -> Result<(), Invalid> {
    let bad = |reason: &str| Invalid { field, reason: format!("'{path}': {reason}") };
    if !path.starts_with('/') {
        return Err(bad("not an absolute path"));
    }
    if path.contains('\0') {
        return Err(bad("contains NUL"));
    }
    if path.len() > 4096 {
        return Err(bad("longer than 4096 bytes"));
    }
    if path[1..].split('/').any(|c| matches!(c, "" | "." | "..")) && path != "/" {
        return Err(bad("has an empty, '.' or '..' component"));
    }
    // NAME_MAX on Linux's file systems.
    if path.split('/').any(|c| c.len() > 255) {
        return Err(bad("has a component longer than 255 bytes"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_and_paths_are_checked() {
        assert!(digest(None, "id").is_err());
        assert!(digest(Some(&v1::Digest { blake3: vec![1; 31] }), "id").is_err());
        assert_eq!(digest(Some(&to_digest([7; 32])), "id").unwrap(), [7; 32]);
        for bad in ["rel/x", "/a/../b", "/a//b", "/a/./b", "/a/b/", "/a\0b"] {
            assert!(absolute_path(bad, "p").is_err(), "{bad}");
        }
        assert!(absolute_path("/home/u/p/src/lib.rs", "p").is_ok());
    }
}

/// Reads, on a blocking thread, the chunks an async task receives from a blob stream (a toolchain
/// being uploaded or fetched), so verifying or unpacking overlaps the transfer instead of
/// following it. The sender ends the stream by dropping its side, or fails it with a message.
#[derive(Debug)]
pub struct ChunkReader {
    rx: tokio::sync::mpsc::Receiver<Result<Vec<u8>, String>>,
    current: Vec<u8>,
    pos: usize,
}

impl ChunkReader {
    pub fn channel(depth: usize) -> (tokio::sync::mpsc::Sender<Result<Vec<u8>, String>>, ChunkReader) {
        let (tx, rx) = tokio::sync::mpsc::channel(depth);
        (tx, ChunkReader { rx, current: Vec::new(), pos: 0 })
    }
}

impl std::io::Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.current.len() {
            match self.rx.blocking_recv() {
                Some(Ok(chunk)) => {
                    self.current = chunk;
                    self.pos = 0;
                }
                Some(Err(message)) => return Err(std::io::Error::other(message)),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len() - self.pos);
        buf[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}
