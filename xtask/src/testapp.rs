//! Driving the `testapp` binary (src/bin/testapp.rs) from tests, the demo and benchmarks.

use std::{
    io::{self, BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use crate::{
    cmd::{self, CmdError},
    testbed::ChildGuard,
};

/// Builds `testapp` with the same cargo and profile as the running xtask and
/// returns its path.
pub fn build() -> Result<PathBuf, CmdError> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    cmd::output(Command::new(cargo).args([
        "build",
        "--quiet",
        "--package",
        "xtask",
        "--bin",
        "testapp",
    ]))?;
    locate().map_err(|source| CmdError::Spawn {
        program: "testapp".into(),
        source,
        hint: "",
    })
}

/// Finds an already built `testapp` in the target dir of the running binary (an
/// xtask binary, or a test binary in `deps/`). `cargo build --workspace` and
/// `cargo test --workspace` build it, so tests of other crates can use this.
pub fn locate() -> io::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe
        .parent()
        .ok_or_else(|| io::Error::other("the running binary has no parent directory"))?;
    if dir.file_name().is_some_and(|name| name == "deps") {
        dir = dir.parent().unwrap_or(dir);
    }
    let path = dir.join("testapp");
    if path.is_file() {
        Ok(path)
    } else {
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "{} is not built: run `cargo build --package xtask --bin testapp`",
                path.display()
            ),
        ))
    }
}

/// `testapp echo-server --listen <listen>`, stdout piped for [`wait_listening`].
pub fn echo_server(testapp: &Path, listen: SocketAddr) -> Command {
    let mut cmd = Command::new(testapp);
    cmd.args(["echo-server", "--listen", &listen.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    cmd
}

/// `testapp client --connect <connect> --send <text> --repeat <repeat>`, output piped.
pub fn client(testapp: &Path, connect: SocketAddr, text: &str, repeat: u32) -> Command {
    let mut cmd = Command::new(testapp);
    cmd.args(["client", "--connect", &connect.to_string(), "--send", text])
        .args(["--repeat", &repeat.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Waits for an echo server's `listening on <addr>` line and returns the address.
pub fn wait_listening(server: &mut ChildGuard) -> io::Result<SocketAddr> {
    let stdout = server
        .child_mut()
        .stdout
        .take()
        .ok_or_else(|| io::Error::other("echo server stdout is not piped"))?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    line.trim()
        .strip_prefix("listening on ")
        .and_then(|addr| addr.parse().ok())
        .ok_or_else(|| io::Error::other(format!("echo server did not start: printed {line:?}")))
}
