//! `cargo xtask fuzz`: runs every cargo-fuzz target of `fuzz/` (the parsers
//! of untrusted input) for a while each, with the pinned nightly and
//! AddressSanitizer, and says which ran clean. A crash stops the run with
//! the input that caused it (under `fuzz/artifacts/<target>/`); make it a
//! regression test before fixing it.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use crate::{cmd, manifests::workspace_root, setup};

#[derive(Debug, clap::Args)]
pub struct FuzzArgs {
    /// How long each target runs.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Run only this target (see `fuzz/Cargo.toml`).
    #[arg(long)]
    pub only: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum FuzzError {
    #[error(transparent)]
    Setup(#[from] setup::SetupError),
    #[error("listing the fuzz targets: {0}")]
    List(cmd::CmdError),
    #[error("no fuzz target is named {0:?}; the targets are: {1}")]
    UnknownTarget(String, String),
    #[error(
        "fuzz target {target} failed after {elapsed:?} (a crash, a leak or a build error above; \
         the input is under fuzz/artifacts/{target}/, reproduce it with \
         `cargo +{toolchain} fuzz run {target} <file>`): {source}"
    )]
    Failed {
        target: String,
        toolchain: String,
        elapsed: Duration,
        source: cmd::CmdError,
    },
}

/// `rustup run <toolchain> cargo fuzz ...` in the workspace root, without the
/// outer cargo's environment (it would pin the stable toolchain).
fn cargo_fuzz(toolchain: &str) -> Command {
    let mut command = Command::new("rustup");
    command
        .args(["run", toolchain, "cargo", "fuzz"])
        .current_dir(workspace_root())
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .env_remove("RUSTUP_TOOLCHAIN");
    command
}

pub fn run(args: &FuzzArgs) -> Result<(), FuzzError> {
    let toolchain = setup::fuzz_toolchain()?;
    let listed = cmd::output(cargo_fuzz(&toolchain).arg("list")).map_err(FuzzError::List)?;
    let all: Vec<String> = listed.split_whitespace().map(str::to_owned).collect();
    let targets = match &args.only {
        Some(only) if all.contains(only) => vec![only.clone()],
        Some(only) => return Err(FuzzError::UnknownTarget(only.clone(), all.join(", "))),
        None => all,
    };
    let mut clean = Vec::new();
    for target in targets {
        println!("fuzz: {target} for {}s", args.seconds);
        let started = Instant::now();
        cmd::run_visible(
            cargo_fuzz(&toolchain)
                .args(["run", &target, "--"])
                .arg(format!("-max_total_time={}", args.seconds)),
        )
        .map_err(|source| FuzzError::Failed {
            target: target.clone(),
            toolchain: toolchain.clone(),
            elapsed: started.elapsed(),
            source,
        })?;
        clean.push(target);
    }
    for target in clean {
        println!("fuzz: {target}: ran clean for {}s", args.seconds);
    }
    Ok(())
}
