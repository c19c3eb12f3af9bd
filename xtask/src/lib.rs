//! Library behind `cargo xtask`: host setup, the static gates, the local
//! testbed, the demo and benchmarks. Integration tests and other crates'
//! tests use [`testbed`].
#![deny(unsafe_code)]

pub mod bench;
pub mod capture;
pub mod chaos;
pub mod cmd;
pub mod demo;
pub mod fuzz;
pub mod gates;
pub mod kind;
pub mod loadtest;
pub mod manifests;
pub mod mesh;
pub mod setup;
pub mod test_totals;
pub mod testapp;
pub mod testbed;
