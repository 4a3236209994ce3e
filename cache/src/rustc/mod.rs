//! Everything about a rustc compile that decides its cache keys: the command line
//! ([`classify`]), what a compile read ([`depinfo`] for
//! cargo's dep-info files, [`observed`] for what the compile was observed doing), and the key recipe
//! ([`recipe`]).
//!
//! The wrapper and the workers both derive keys here: a worker writes the shared tier from the
//! jobs it ran, so it must compute exactly the keys a client will look up, from the job alone.

pub mod args;
pub mod depinfo;
pub mod observed;
pub mod recipe;

pub use args::{Classified, RustcArgs, classify};
pub use observed::{
    Incomplete, LocaleInputs, Observation, Scope, ToolchainFiles, input_list, is_secret, keyed_lookup, never_keyed,
};
pub use recipe::{Bases, Found, InputList, Inputs, MAX_MANIFESTS};
