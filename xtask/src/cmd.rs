//! Running external programs with errors that say what failed and how to fix it.

use std::{
    fmt::Write as _,
    process::{Command, Stdio},
};

#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    #[error("cannot run `{program}`: {source}{hint}")]
    Spawn {
        program: String,
        source: std::io::Error,
        hint: &'static str,
    },
    #[error("`{command}` failed ({status}){stderr}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// A human-readable rendering of a command line for error messages.
pub fn display(cmd: &Command) -> String {
    let mut text = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        let _ = write!(text, " {}", arg.to_string_lossy());
    }
    text
}

fn spawn_error(cmd: &Command, source: std::io::Error) -> CmdError {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let hint = if source.kind() == std::io::ErrorKind::NotFound {
        " (not installed or not on PATH; `cargo xtask setup` installs what sealmesh needs)"
    } else {
        ""
    };
    CmdError::Spawn {
        program,
        source,
        hint,
    }
}

fn failed(cmd: &Command, status: std::process::ExitStatus, stderr: &[u8]) -> CmdError {
    let stderr = String::from_utf8_lossy(stderr);
    let stderr = stderr.trim();
    CmdError::Failed {
        command: display(cmd),
        status,
        stderr: if stderr.is_empty() {
            String::new()
        } else {
            format!(": {stderr}")
        },
    }
}

/// The cargo that runs this xtask (`$CARGO`), for cargo commands and cargo
/// subcommands (`cargo deny`, `cargo machete`). Without the package variables
/// `cargo run` sets for xtask itself: with `CARGO_PKG_NAME` set, a subcommand
/// such as cargo-machete takes itself for a direct run and its own name for a
/// path argument.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    for (name, _) in std::env::vars_os() {
        let is_package_var = name.to_str().is_some_and(|name| {
            name.starts_with("CARGO_PKG_")
                || matches!(
                    name,
                    "CARGO_MANIFEST_DIR"
                        | "CARGO_MANIFEST_PATH"
                        | "CARGO_CRATE_NAME"
                        | "CARGO_BIN_NAME"
                        | "CARGO_PRIMARY_PACKAGE"
                )
        });
        if is_package_var {
            cmd.env_remove(name);
        }
    }
    cmd
}

/// Runs `cmd` to completion, capturing its output; returns stdout.
pub fn output(cmd: &mut Command) -> Result<String, CmdError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| spawn_error(cmd, e))?;
    if !out.status.success() {
        return Err(failed(cmd, out.status, &out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `cmd` with inherited stdio (the user sees its progress); fails if it fails.
pub fn run_visible(cmd: &mut Command) -> Result<(), CmdError> {
    let status = cmd.status().map_err(|e| spawn_error(cmd, e))?;
    if status.success() {
        Ok(())
    } else {
        Err(failed(cmd, status, b""))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cargo_commands_do_not_inherit_this_packages_variables() {
        // `cargo test` sets them for this test binary as `cargo run` does for xtask.
        assert!(std::env::var_os("CARGO_PKG_NAME").is_some());
        let cmd = cargo();
        let removed: Vec<_> = cmd
            .get_envs()
            .filter(|(_, value)| value.is_none())
            .map(|(name, _)| name.to_string_lossy().into_owned())
            .collect();
        for name in ["CARGO_PKG_NAME", "CARGO_PKG_VERSION", "CARGO_MANIFEST_DIR"] {
            assert!(
                removed.iter().any(|r| r == name),
                "{name} not removed: {removed:?}"
            );
        }
        assert!(!removed.iter().any(|r| r == "CARGO_HOME" || r == "PATH"));
    }
}
