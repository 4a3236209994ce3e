//! The result cache of ferry: cache keys, the on-disk entry format, and the storage tiers.
//!
//! A [`KeyBuilder`] hashes everything a compile can observe into a [`CacheKey`] and remembers
//! the readable parts so `ferry explain` can print and diff them. What a compile produced is a
//! [`CompileOutput`]; it travels as the payload of an [`Entry`], a self-verifying blob (magic,
//! version, the full key, the toolchain id, sizes, optional lz4, a blake3 checksum over all of
//! it). Tiers implement [`Store`]; [`DiskStore`] is the local one: one file per entry, published
//! with link(2) so nothing is ever overwritten, verified on every read, and kept under its size
//! limit by an opportunistic LRU eviction that the hit path never waits for.
//!
//! This crate knows nothing of sockets, gRPC or ferry's config files.

pub mod cc;
mod disk;
mod entry;
#[doc(hidden)]
pub mod fuzzing;
mod key;
mod memcached;
mod output;
mod redis;
pub mod rustc;
mod signature;
mod signed;
mod store;
mod tempname;

pub use disk::{DiskConfig, DiskStore, EvictReport, Usage, format_size, parse_size};
pub use entry::{Entry, EntryError, EntryKind, check_stream};
pub use key::{CacheKey, KeyBuilder, KeyPart, ParseKeyError};
pub use memcached::{CHUNK as MEMCACHED_CHUNK, MemcachedStore, parse_memcached_url};
pub use output::{CompileOutput, OutputFile};
pub use redis::{RedisStore, RedisTls, check_redis_url, redis_key, without_password};
pub use signature::{Signer, Trust, WriterKey, sign, signer_of, verify, verify_stream};
pub use signed::Signed;
pub use store::{Error, PutOutcome, Store};
pub use tempname::{TempPath, create_temp, random_bytes, unpredictable_name, write_replacing};
