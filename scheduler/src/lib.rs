//! ferry's scheduler. Today: the pure allocation state machine ([`Scheduler`]), unit-tested without
//! sockets. The gRPC service and the `ferry-scheduler` daemon are built on top of it.

mod state;

pub use state::{
    Allocation, Assignment, ClientId, Effects, JobId, JobOutcome, Registration, Scheduler, StateError, Status, WaitId,
    WorkerId, WorkerStatus,
};
