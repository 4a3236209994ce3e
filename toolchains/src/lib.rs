//! Toolchain identity for ferry: which compiler really runs, and exactly which bytes it is made of.
//!
//! The flow is: [`resolve_compiler`] turns a compiler path (possibly a rustup proxy) into the real
//! toolchain root; [`ToolchainSet::collect`] lists the files the compiler needs; [`Manifest::compute`]
//! hashes them into the canonical manifest whose blake3 is the [`ToolchainId`]. Because hashing
//! ~500 MB is too slow for every compile, [`LocalStore`] keeps a persisted weak-key → id map: the weak
//! key is a cheap fingerprint (paths, sizes, mtimes, ctimes, inodes) of the same files.
//! [`write_archive`] builds the deterministic archive a cluster ships around, and [`unpack_archive`]
//! unpacks one only after checking every entry and the id.
//!
//! This crate knows nothing of sockets, gRPC or ferry's config files.

mod archive;
mod error;
mod manifest;
mod resolve;
mod set;
mod store;

pub use archive::{ARCHIVE_MANIFEST_PATH, UnpackLimits, unpack_archive, verify_archive, write_archive};
pub use error::Error;
pub use manifest::{Manifest, ManifestEntry, ManifestKind, ToolchainId};
pub use resolve::{Compiler, Probe, Spawn, is_rustup_proxy, resolve_compiler, resolve_compiler_with, spawn_output};
pub use set::{SetFile, ToolchainSet};
pub use store::{Identified, LocalStore, Packaged, StoredToolchain};

/// The target triple ferry itself was built for: the usual host of the toolchains it meets.
pub const BUILD_HOST: &str = env!("FERRY_BUILD_TARGET");
