//! ferry's wire protocol: the generated `ferry.v1` messages and services.

#[allow(missing_debug_implementations, clippy::all)]
pub mod v1 {
    tonic::include_proto!("ferry.v1");
}
