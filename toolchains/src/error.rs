//! The one error type of the toolchains crate: each variant carries what a caller needs to tell a
//! person what went wrong and what to do about it.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("compiler '{}' does not exist; pass --rustc with the path of a rustc binary", path.display())]
    CompilerNotFound { path: PathBuf },
    #[error("compiler '{}' is not an executable file; pass --rustc with the path of a rustc binary", path.display())]
    NotExecutable { path: PathBuf },
    #[error("'{}' is not a rustc: {reason}", path.display())]
    NotRustc { path: PathBuf, reason: String },
    #[error("target '{target}' is not installed in toolchain '{}'; install it with 'rustup target add {target}'", root.display())]
    UnknownTarget { target: String, root: PathBuf },
    #[error("cannot resolve rustup toolchain '{name}': {reason}")]
    Rustup { name: String, reason: String },
    // The cause is part of the message (not a chained source) so a CLI prints it exactly once.
    #[error("{}: {error}", path.display())]
    Io { path: PathBuf, error: std::io::Error },
    #[error("toolchain file '{}' changed while it was being read; try again", path.display())]
    Changed { path: PathBuf },
    #[error("archive entry '{entry}' refused: {reason}")]
    UnsafeEntry { entry: String, reason: String },
    #[error("archive is corrupt: {reason}")]
    CorruptArchive { reason: String },
    #[error("archive holds toolchain {actual}, not the expected {expected}")]
    IdMismatch { expected: String, actual: String },
    #[error("cache dir '{}' is not usable ({error}); set FERRY_CACHE_DIR to a writable directory", path.display())]
    CacheDir { path: PathBuf, error: std::io::Error },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |error| Error::Io { path, error }
    }
}
