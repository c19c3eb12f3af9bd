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
