//! The static gates: formatting, clippy, the dependency policy (`deny.toml`)
//! and unused dependencies. `cargo xtask test` runs them before the build and
//! the tests, `cargo xtask lint` alone; `cargo xtask setup` installs their
//! tools. Every gate runs even when an earlier one failed, so one run names
//! everything to fix.

use std::time::{Duration, Instant};

use crate::cmd;

/// One gate: a cargo command that must succeed, and what to do when it fails.
pub struct Gate {
    pub name: &'static str,
    /// Arguments to `cargo`.
    pub args: &'static [&'static str],
    pub fix: &'static str,
}

/// In the order they run: the quick ones first.
pub const GATES: &[Gate] = &[
    Gate {
        name: "format",
        args: &["fmt", "--all", "--check"],
        fix: "run `cargo fmt --all`",
    },
    Gate {
        name: "unused dependencies",
        args: &["machete"],
        fix: "run `cargo machete` and remove what it names from that Cargo.toml (a dependency only \
              generated code uses goes under [package.metadata.cargo-machete] ignored, with the reason)",
    },
    Gate {
        name: "dependency policy",
        args: &["deny", "check", "bans", "licenses", "sources"],
        fix: "run `cargo deny check bans licenses sources`: drop or replace the crate it names, or, \
              if its license or source is acceptable, allow it in deny.toml",
    },
    Gate {
        name: "clippy",
        args: &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
        fix: "run `cargo clippy --workspace --all-targets -- -D warnings` and fix what it reports \
              (`cargo clippy --fix` applies the machine-applicable suggestions)",
    },
];

#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("{}", failures_message(.0))]
    Failed(Vec<Failure>),
}

#[derive(Debug)]
pub struct Failure {
    pub gate: &'static str,
    pub reason: String,
    pub fix: &'static str,
}

fn failures_message(failures: &[Failure]) -> String {
    let list: Vec<String> = failures
        .iter()
        .map(|f| format!("gate `{}` failed ({}); to fix: {}", f.gate, f.reason, f.fix))
        .collect();
    format!(
        "{} of {} static gates failed: {}",
        failures.len(),
        GATES.len(),
        list.join("; ")
    )
}

/// Runs every gate in the workspace, printing each result and its time.
pub fn run_all() -> Result<(), GateError> {
    let root = crate::manifests::workspace_root();
    let mut failures = Vec::new();
    for gate in GATES {
        println!("gate {}: cargo {}", gate.name, gate.args.join(" "));
        let started = Instant::now();
        let result = cmd::run_visible(cmd::cargo().args(gate.args).current_dir(&root));
        let took = seconds(started.elapsed());
        match result {
            Ok(()) => println!("gate {}: passed in {took}", gate.name),
            Err(error) => {
                println!("gate {}: FAILED in {took}: {}", gate.name, gate.fix);
                failures.push(Failure {
                    gate: gate.name,
                    reason: error.to_string(),
                    fix: gate.fix,
                });
            }
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(GateError::Failed(failures))
    }
}

fn seconds(took: Duration) -> String {
    format!("{:.1}s", took.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_failure_message_names_each_failed_gate_and_its_fix() {
        let message = GateError::Failed(vec![Failure {
            gate: "format",
            reason: "`cargo fmt --all --check` failed (exit status: 1)".into(),
            fix: "run `cargo fmt --all`",
        }])
        .to_string();
        assert_eq!(
            message,
            format!(
                "1 of {} static gates failed: gate `format` failed (`cargo fmt --all --check` failed (exit status: 1)); to fix: run `cargo fmt --all`",
                GATES.len()
            )
        );
    }

    #[test]
    fn every_gate_says_how_to_fix_it_with_the_command_it_runs() {
        for gate in GATES {
            let command = format!("cargo {}", gate.args.join(" "));
            let shown = command.trim_end_matches(" --check");
            assert!(
                gate.fix.contains(shown),
                "gate {}: the fix should name `{shown}`: {}",
                gate.name,
                gate.fix
            );
        }
    }
}
