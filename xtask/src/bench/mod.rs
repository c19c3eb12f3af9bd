//! `cargo xtask bench ...`: benchmarks that run against a local testbed.

pub mod datapath;
pub mod identity;
pub mod loadgen;
