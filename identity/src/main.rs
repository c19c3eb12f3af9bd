//! `sealmesh-identity`: the identity service binary.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use sealmesh_common::{host, logging};
use sealmesh_identity::IdentityConfig;

fn main() -> ExitCode {
    let config = IdentityConfig::from_args();
    if let Err(error) = logging::init(&config.log.log_level, config.log.log_format) {
        // Validated when the flags were parsed.
        eprintln!("{error}");
    }
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
