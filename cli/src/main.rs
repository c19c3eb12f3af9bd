//! `sealmesh`: operator commands, one module per command group.
#![forbid(unsafe_code)]

mod agent_config;
mod agents;
mod certs;
mod certs_inspect;
mod certview;
mod check;
mod edges;
mod install;
mod kube;
mod output;
mod policies;
mod rbac;
mod selector;
mod tap;
mod trust_bundle;
mod why;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sealmesh_common::logging::{self, LogArgs};

#[derive(Debug, Parser)]
#[command(name = "sealmesh", version, about = "Operate a sealmesh mesh")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    log: LogArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the mesh's trust anchor and issuer; inspect certificates.
    #[command(subcommand)]
    Certs(certs::CertsCommand),
    /// Check the trust anchors and issuer, on Kubernetes the control plane's
    /// workloads, ServiceAccounts and RBAC, the authorization policies (valid,
    /// and aimed at existing accounts and meshed pods), with --proxy every agent's live
    /// certificates, and with --trust-bundle whether a new anchor bundle keeps
    /// the anchors still in use. Exits 1 when a check fails (×); warnings (‼)
    /// do not fail.
    Check(check::CheckArgs),
    /// Pod-to-pod edges the agents saw and whether they are mTLS. An agent
    /// that does not answer is asked again for a few seconds; exits 1 when it
    /// still did not (the table then lacks its edges).
    Edges(edges::EdgesArgs),
    /// Live connection events from every agent, until Ctrl-C, --max or
    /// --timeout. An agent that cannot be reached or restarts is reconnected
    /// with back-off (told once per outage on stderr); events of its outage
    /// are not shown.
    Tap(tap::TapArgs),
    /// Whether traffic from one pod to another is mTLS, and if not why and
    /// what to change; and which authorization policy and rule allows or
    /// denies it. Exits 0 when it is secured and allowed, 1 when it is not.
    Why(why::WhyArgs),
    /// Print the manifests that install sealmesh, for `kubectl apply -f -`:
    /// everything of deploy/base with a trust anchor and issuer (generated,
    /// or from the --identity-* files).
    Install(install::InstallArgs),
    /// Print what removes sealmesh, for `kubectl delete -f -`: the agents'
    /// DaemonSet first (each agent removes sealmesh from its node as it
    /// stops), the Namespace last.
    Uninstall(install::UninstallArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(error) = logging::init(&cli.log.log_level, cli.log.log_format) {
        // Validated when the flags were parsed.
        eprintln!("{error}");
    }
    let result = match cli.command {
        Command::Certs(command) => certs::run(command),
        Command::Check(args) => check::run(args),
        Command::Edges(args) => edges::run(args),
        Command::Tap(args) => tap::run(args),
        Command::Why(args) => why::run(args),
        Command::Install(args) => install::install(&args),
        Command::Uninstall(args) => install::uninstall(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // One line with every cause: operators need the reason, not a backtrace.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
