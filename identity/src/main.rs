//! `sealmesh-identity`: the identity service binary.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use sealmesh_common::host;
use sealmesh_identity::{Config, config::LogLevel};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let config = Config::from_args();
    tracing_subscriber::fmt()
        .with_env_filter(log_filter(config.log_level))
        .with_writer(std::io::stderr)
        .init();
    // Before the runtime's threads start: they inherit the signal mask.
    if let Err(error) = host::unblock_termination_signals() {
        tracing::warn!(%error, "cannot unblock SIGTERM and SIGINT; a graceful stop may not be possible");
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "cannot start the tokio runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(sealmesh_identity::serve(config, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The message says what to fix; a backtrace would bury it.
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// RUST_LOG, when set, wins. Otherwise `--log-level debug|trace` applies to
/// sealmesh's own modules only (the gRPC stack stays at info), as the seed's
/// `-log-level=debug` shows the controller's decisions, not HTTP/2 frames.
fn log_filter(level: LogLevel) -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| match level {
        LogLevel::Debug | LogLevel::Trace => EnvFilter::new(format!(
            "info,sealmesh_identity={0},sealmesh_common={0}",
            level.as_filter()
        )),
        _ => EnvFilter::new(level.as_filter()),
    })
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
