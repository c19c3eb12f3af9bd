//! sealmesh node agent: redirects meshed pods' sockets into itself with eBPF
//! and carries them over mTLS (HBONE) with per-ServiceAccount certificates.

pub mod admin;
pub mod backoff;
pub mod certs;
pub mod config;
pub mod dir_watch;
pub mod ebpf;
pub mod handover;
pub mod inbound_policy;
pub mod kube;
pub mod metrics;
pub mod proxy;
pub mod registry;
pub mod tls;
