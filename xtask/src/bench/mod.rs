//! `cargo xtask bench ...`: benchmarks that run against a local testbed.

pub mod identity;
