//! The vocabulary every sealmesh crate shares. One source of truth for the
//! cluster-file schema, identity names, and well-known ports and labels.
#![forbid(unsafe_code)]

pub mod authz;
pub mod backoff;
pub mod cluster;
pub mod consts;
pub mod file_watch;
pub mod hbone;
pub mod host;
pub mod identity;
pub mod logging;
pub mod mesh;
pub mod policy;
pub mod probe;
pub mod process_metrics;
