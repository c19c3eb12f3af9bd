//! Running external programs with errors that say what failed and how to fix it.

use std::{
    fmt::Write as _,
    io::Write as _,
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

/// Runs `cmd` to completion, feeding `input` on stdin; returns stdout.
pub fn output_with_input(cmd: &mut Command, input: &str) -> Result<String, CmdError> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| spawn_error(cmd, e))?;
    // Write from a thread so a child that fills its output pipes before reading all of
    // stdin cannot deadlock us; a write error means the child exited early, which its
    // status reports.
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let input = input.to_owned();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(input.as_bytes());
    });
    let out = child.wait_with_output().map_err(|e| spawn_error(cmd, e))?;
    let _ = writer.join();
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

/// Whether `cmd` runs and exits successfully (for "is it installed?" probes).
pub fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
