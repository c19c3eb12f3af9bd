//! sealmesh identity service: the CA that issues short-lived certificates to
//! ServiceAccounts, in the style of Linkerd's identity controller. Trust
//! anchors and issuers (loading, validation, generation) are `sealmesh_pki`'s.
//!
//! - [`config`]: the one `IdentityConfig` (flags) of the service;
//! - [`ca`]: CSR verification and leaf signing;
//! - [`auth`]: who is calling (`TokenValidator`) and what they may request;
//! - [`limits`]: per-caller rate, concurrency and deadline of requests;
//! - [`service`]: the Certify gRPC API under both package names;
//! - [`serving`]: the service's own TLS: its serving certificate (issued,
//!   renewed, re-issued on issuer rotation) and the TLS 1.3 listener;
//! - [`client`]: how clients reach it: TLS verified against the trust
//!   anchors and the identity service's own identity;
//! - [`rotation`]: atomic issuer reload from a watched directory;
//! - [`kube`]: Kubernetes mode: TokenReview, pod placements, the issuer
//!   Secret and trust-roots ConfigMap (watched), Events;
//! - [`metrics`]: Prometheus metrics, liveness and readiness over HTTP.
//!
//! Library use (tests, testbed): `ServerBuilder::new(config).bind().await?`
//! returns a [`Server`] with its bound addresses; `run(shutdown)` serves.
#![forbid(unsafe_code)]

pub mod auth;
pub mod ca;
pub mod client;
pub mod config;
pub mod kube;
pub mod limits;
pub mod metrics;
pub mod rotation;
mod server;
pub mod service;
pub mod serving;

pub use config::IdentityConfig;
pub use server::{ServeError, Server, ServerBuilder, serve};
