//! `sealmesh-identity`: the identity service binary.
#![forbid(unsafe_code)]

use anyhow::Context as _;
use clap::Parser as _;
use sealmesh_identity::Config;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    // RUST_LOG, when set, refines --log-level (e.g. to silence a module).
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(config.log_level.as_filter()));
    tracing_subscriber::fmt().with_env_filter(filter).init();

    sealmesh_identity::serve(config, shutdown_signal())
        .await
        .context("identity service failed")
}

/// Resolves on SIGTERM (Kubernetes) or Ctrl-C.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; stop with Ctrl-C");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down");
}
