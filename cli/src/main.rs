//! `sealmesh`: operator commands, one module per command group.
#![forbid(unsafe_code)]

mod certs;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "sealmesh", version, about = "Operate a sealmesh mesh")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the mesh's trust anchor (root) and identity issuer.
    #[command(subcommand)]
    Certs(certs::CertsCommand),
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Certs(command) => certs::run(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line with every cause: operators need the reason, not a backtrace.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
