//! ferry's worker: the sandbox every compile job runs in ([`run`], synchronous, called from a
//! blocking thread), the blob store and toolchain cache, the `Worker` gRPC service, the scheduler
//! session, and [`serve`], which runs all of it until told to stop. A job may load a
//! client-supplied proc-macro — arbitrary code — so nothing a client sends runs outside the sandbox.

mod beneath;
mod blobs;
mod check;
mod config;
mod http;
mod limits;
mod observe;
mod publish;
mod sandbox;
mod server;
mod service;
mod session;
mod toolchain_cache;

pub use check::{CheckFailed, CheckReport, prepare_data_dir, self_check};
pub use config::{Overrides, WorkerConfig};
pub use limits::{JOB_CPU_WEIGHT, JobCgroups, disk_quota_usable};
pub use server::run as serve;

pub use sandbox::{Bind, Limit, SandboxConfig, SandboxError, SandboxJob, SandboxOutcome, Stream, run};
