//! The scheduler's shared cache tier as a [`ferry_cache::Store`], for the wrapper and the workers
//! (both call it from plain threads, so it blocks on a runtime it owns: a current-thread
//! runtime's I/O is driven only by `Runtime::block_on`, never through a `Handle`).

use std::time::Duration;

use ferry_cache::{CacheKey, Entry, EntryError, Error, PutOutcome, Store, Trust, WriterKey};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::v1::scheduler_client::SchedulerClient;
use crate::v1::{self, cache_upload};
use crate::{bearer, to_digest};

const CHUNK: usize = 1 << 20;

/// Adds a bearer token (if any) to every call.
#[derive(Debug, Clone)]
pub struct TokenInterceptor(Option<MetadataValue<Ascii>>);

impl TokenInterceptor {
    /// Err: the token has characters a header cannot carry.
    pub fn new(token: Option<&str>) -> Result<TokenInterceptor, String> {
        match token {
            Some(t) => bearer(t)
                .parse()
                .map(|v| TokenInterceptor(Some(v)))
                .map_err(|_| "the token contains characters a header cannot carry".to_string()),
            None => Ok(TokenInterceptor(None)),
        }
    }
}

impl tonic::service::Interceptor for TokenInterceptor {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// Which shared cache tier a client reads or a worker publishes to (`FERRY_SHARED_CACHE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SharedTierSpec {
    Off,
    /// The scheduler's cache service.
    Scheduler,
    /// `redis://[user:password@]host[:port][/db]`, or `rediss://…` for TLS
    Redis(String),
    /// `memcached://host:port[,host:port…]`
    Memcached(String),
}

impl SharedTierSpec {
    /// `off`, `scheduler`, or a valid `redis://`, `rediss://` or `memcached://` URL; Err is a
    /// sentence for the user.
    pub fn parse(text: &str) -> Result<SharedTierSpec, String> {
        match text {
            "off" => Ok(SharedTierSpec::Off),
            "scheduler" => Ok(SharedTierSpec::Scheduler),
            url if url.starts_with("redis://") || url.starts_with("rediss://") => {
                ferry_cache::check_redis_url(url)?;
                Ok(SharedTierSpec::Redis(url.to_owned()))
            }
            url if url.starts_with("memcached://") => {
                ferry_cache::parse_memcached_url(url)?;
                Ok(SharedTierSpec::Memcached(url.to_owned()))
            }
            other => Err(format!("'{other}' is not 'scheduler', 'off', a redis://, rediss:// or memcached:// URL")),
        }
    }
}

/// What `CacheGet` answered.
enum Fetched {
    Missing,
    /// The scheduler found its copy corrupt and removed it (`DATA_LOSS`).
    CorruptThere,
    Bytes(Vec<u8>),
}

pub type SchedulerApi = SchedulerClient<InterceptedService<Channel, TokenInterceptor>>;

/// The scheduler's cache service. Every call has a deadline; errors (including a refused write)
/// come back as [`Error::Io`] with a message saying what happened.
#[derive(Debug, Clone)]
pub struct RemoteCache {
    runtime: std::sync::Arc<tokio::runtime::Runtime>,
    client: SchedulerApi,
    deadline: Duration,
}

/// The most bytes a client takes from the scheduler's tier for one entry: the scheduler's
/// default `max_entry_bytes` (an entry it stored is never larger unless its operator raised it).
const MAX_FETCHED_BYTES: usize = 1 << 30;

impl RemoteCache {
    pub fn new(
        runtime: std::sync::Arc<tokio::runtime::Runtime>,
        client: SchedulerApi,
        deadline: Duration,
    ) -> RemoteCache {
        RemoteCache { runtime, client: client.max_decoding_message_size(64 << 20), deadline }
    }

    async fn fetch(&self, key: &CacheKey) -> Result<Fetched, tonic::Status> {
        let mut client = self.client.clone();
        let request = v1::CacheKeyRef { key: Some(to_digest(key.0)) };
        let mut stream = match client.cache_get(request).await {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == tonic::Code::NotFound => return Ok(Fetched::Missing),
            Err(s) if s.code() == tonic::Code::DataLoss => return Ok(Fetched::CorruptThere),
            Err(s) => return Err(s),
        };
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.message().await? {
            if bytes.len() + chunk.data.len() > MAX_FETCHED_BYTES {
                return Err(tonic::Status::out_of_range(format!(
                    "the tier sent more than {MAX_FETCHED_BYTES} bytes for one entry (the scheduler's largest is \
                     max_entry_bytes, 1 GiB by default)"
                )));
            }
            bytes.extend_from_slice(&chunk.data);
        }
        Ok(Fetched::Bytes(bytes))
    }

    async fn store(&self, key: &CacheKey, bytes: &[u8]) -> Result<bool, tonic::Status> {
        let mut client = self.client.clone();
        let header = v1::CacheHeader { key: Some(to_digest(key.0)), size: bytes.len() as u64 };
        let mut messages = vec![v1::CacheUpload { kind: Some(cache_upload::Kind::Header(header)) }];
        messages
            .extend(bytes.chunks(CHUNK).map(|c| v1::CacheUpload { kind: Some(cache_upload::Kind::Data(c.to_vec())) }));
        let response = client.cache_put(tokio_stream::iter(messages)).await?;
        Ok(response.into_inner().published)
    }

    /// Registers this writer's public key with the scheduler (`RegisterWriter`): Ok(false) when
    /// the key is revoked; a PermissionDenied I/O error without the `worker` or `cache-write` role.
    pub fn register_writer(&self, key: WriterKey, name: &str) -> Result<bool, Error> {
        let mut client = self.client.clone();
        let request = v1::RegisterWriterRequest { public_key: key.0.to_vec(), name: name.to_owned() };
        self.block("register writer", async move { Ok(client.register_writer(request).await?.into_inner().trusted) })
    }

    /// The writers the scheduler trusts, and the revoked keys (`TrustedWriters`).
    pub fn trusted_writers(&self) -> Result<Trust, Error> {
        let mut client = self.client.clone();
        let answer = self.block("trusted writers", async move {
            Ok(client.trusted_writers(v1::TrustedWritersRequest {}).await?.into_inner())
        })?;
        let key = |bytes: &[u8]| bytes.try_into().ok().map(WriterKey);
        Ok(Trust {
            trusted: answer.trusted.iter().filter_map(|w| key(&w.public_key)).collect(),
            revoked: answer.revoked.iter().filter_map(|k| key(k)).collect(),
        })
    }

    async fn delete(&self, key: &CacheKey) -> Result<bool, tonic::Status> {
        let mut client = self.client.clone();
        let response = client.cache_remove(v1::CacheKeyRef { key: Some(to_digest(key.0)) }).await?;
        Ok(response.into_inner().removed)
    }

    fn block<T>(&self, what: &str, call: impl Future<Output = Result<T, tonic::Status>>) -> Result<T, Error> {
        let result = self.runtime.block_on(async { tokio::time::timeout(self.deadline, call).await });
        let err =
            |kind, message: String| Error::Io { path: "scheduler".into(), source: std::io::Error::new(kind, message) };
        match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(s)) if s.code() == tonic::Code::PermissionDenied => {
                Err(err(std::io::ErrorKind::PermissionDenied, format!("{what}: {}", s.message())))
            }
            Ok(Err(s)) => Err(err(std::io::ErrorKind::Other, format!("{what}: {} ({:?})", s.message(), s.code()))),
            Err(_) => Err(err(std::io::ErrorKind::TimedOut, format!("{what}: no answer within {:?}", self.deadline))),
        }
    }
}

impl Store for RemoteCache {
    /// The scheduler refuses puts no writer it trusts signed, and replaces an entry it has that
    /// none signed (its `CachePut`).
    fn keeps_only_trusted(&self) -> bool {
        true
    }

    fn get(&self, key: &CacheKey) -> Result<Option<Entry>, Error> {
        let corrupt = |reason| Error::Corrupt { path: format!("scheduler cache entry {key}").into(), reason };
        match self.block("shared cache get", self.fetch(key))? {
            Fetched::Bytes(bytes) => Entry::decode_owned(bytes, key).map(Some).map_err(corrupt),
            Fetched::Missing => Ok(None),
            Fetched::CorruptThere => Err(corrupt(EntryError::CorruptAtSource)),
        }
    }

    fn get_encoded(&self, key: &CacheKey) -> Result<Option<Vec<u8>>, Error> {
        let corrupt = |reason| Error::Corrupt { path: format!("scheduler cache entry {key}").into(), reason };
        match self.block("shared cache get", self.fetch(key))? {
            Fetched::Bytes(bytes) => Entry::check(&bytes, key).map(|()| Some(bytes)).map_err(corrupt),
            Fetched::Missing => Ok(None),
            Fetched::CorruptThere => Err(corrupt(EntryError::CorruptAtSource)),
        }
    }

    fn put_encoded(&self, key: &CacheKey, bytes: &[u8]) -> Result<PutOutcome, Error> {
        let len = bytes.len() as u64;
        let published = self.block("shared cache put", self.store(key, bytes))?;
        Ok(if published { PutOutcome::Published { bytes: len } } else { PutOutcome::AlreadyPresent })
    }

    fn remove(&self, key: &CacheKey) -> Result<bool, Error> {
        self.block("shared cache remove", self.delete(key))
    }
}
