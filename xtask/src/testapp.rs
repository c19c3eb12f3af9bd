//! Driving the `testapp` binary (src/bin/testapp.rs) from tests, the demo and benchmarks.

use std::{
    io::{self, BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use crate::{
    cmd::{self, CmdError},
    testbed::{ChildGuard, Testbed},
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

/// `testapp line-server --listen <listen> --name <name>`, stdout piped for
/// [`wait_listening`].
pub fn line_server(testapp: &Path, listen: SocketAddr, name: &str) -> Command {
    let mut cmd = Command::new(testapp);
    cmd.args([
        "line-server",
        "--listen",
        &listen.to_string(),
        "--name",
        name,
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped());
    cmd
}

/// `testapp relay --listen <listen> --name <name> --backend <name>=<addr>...`,
/// stdout piped for [`wait_listening`].
pub fn relay(
    testapp: &Path,
    listen: SocketAddr,
    name: &str,
    backends: &[(&str, SocketAddr)],
) -> Command {
    let mut cmd = Command::new(testapp);
    cmd.args(["relay", "--listen", &listen.to_string(), "--name", name]);
    for (backend, addr) in backends {
        cmd.arg("--backend").arg(format!("{backend}={addr}"));
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::piped());
    cmd
}

/// `testapp bot --target <name>=<addr>... --interval-ms <interval>`: one
/// request per target and interval until killed; stdout (one line per
/// request, see [`BotReport`]) piped.
pub fn bot(testapp: &Path, targets: &[(&str, SocketAddr)], interval: Duration) -> Command {
    let mut cmd = Command::new(testapp);
    cmd.arg("bot");
    for (target, addr) in targets {
        cmd.arg("--target").arg(format!("{target}={addr}"));
    }
    cmd.args(["--interval-ms", &interval.as_millis().to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    cmd
}

/// One line of `testapp bot`'s output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BotReport {
    pub target: String,
    /// `fresh` or `persistent`.
    pub conn: String,
    pub seq: u64,
    /// The reply, or why there was none.
    pub outcome: Result<String, String>,
}

impl BotReport {
    /// Parses `ok target=T conn=C seq=N reply=R` or `fail ... error=E`.
    pub fn parse(line: &str) -> Option<Self> {
        let (ok, rest) = match line.split_once(' ')? {
            ("ok", rest) => (true, rest),
            ("fail", rest) => (false, rest),
            _ => return None,
        };
        let target = rest.strip_prefix("target=")?;
        let (target, rest) = target.split_once(" conn=")?;
        let (conn, rest) = rest.split_once(" seq=")?;
        let (seq, rest) = rest.split_once(' ')?;
        let outcome = if ok {
            Ok(rest.strip_prefix("reply=")?.to_owned())
        } else {
            Err(rest.strip_prefix("error=")?.to_owned())
        };
        Some(Self {
            target: target.to_owned(),
            conn: conn.to_owned(),
            seq: seq.parse().ok()?,
            outcome,
        })
    }
}

/// Starts `testapp echo-server` in a pod on `<pod IP>:<port>` and waits until
/// it listens; the guard stops it.
pub fn start_echo_server(
    testbed: &Testbed,
    testapp: &Path,
    namespace: &str,
    pod: &str,
    port: u16,
) -> io::Result<(ChildGuard, SocketAddr)> {
    let ip = testbed
        .cluster()
        .pod(namespace, pod)
        .ok_or_else(|| io::Error::other(format!("no pod {namespace}/{pod} in the testbed")))?
        .ip;
    let mut server = testbed
        .spawn_in_pod(
            namespace,
            pod,
            echo_server(testapp, SocketAddr::from((ip, port))),
        )
        .map_err(io::Error::other)?;
    let addr = wait_listening(&mut server)?;
    Ok((server, addr))
}

/// Waits for a server's (echo, line or relay) `listening on <addr>` line and returns the address.
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
