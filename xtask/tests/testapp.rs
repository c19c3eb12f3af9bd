//! The testapp binary on loopback: echo, half-close, and mismatch detection.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    path::Path,
    process::{Command, Stdio},
};

fn testapp() -> Command {
    Command::new(Path::new(env!("CARGO_BIN_EXE_testapp")))
}

#[test]
fn echo_server_echoes_and_half_closes_and_client_verifies() {
    let mut server = testapp()
        .args(["echo-server", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_owned();

    // Raw client: the server echoes everything, then answers our FIN with its own.
    let mut stream = TcpStream::connect(&addr).unwrap();
    stream.write_all(b"half-close aware").unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    let mut echoed = String::new();
    stream.read_to_string(&mut echoed).unwrap();
    assert_eq!(echoed, "half-close aware");

    let out = testapp()
        .args([
            "client",
            "--connect",
            &addr,
            "--send",
            "hello",
            "--repeat",
            "4",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result = String::from_utf8(out.stdout).unwrap();
    assert!(result.starts_with("ok local=127.0.0.1:"), "{result}");
    assert!(
        result.ends_with(&format!(" peer={addr} round_trips=4 bytes=20\n")),
        "{result}"
    );
    server.kill().unwrap();
    server.wait().unwrap();
}

#[test]
fn client_fails_when_the_echo_differs() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let shouting_server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut buf = [0u8; 3];
        conn.read_exact(&mut buf).unwrap();
        conn.write_all(&buf.to_ascii_uppercase()).unwrap();
    });
    let out = testapp()
        .args(["client", "--connect", &addr, "--send", "abc"])
        .output()
        .unwrap();
    shouting_server.join().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(out.stdout, b"");
    assert_eq!(
        String::from_utf8(out.stderr).unwrap(),
        "testapp: round trip 1: sent \"abc\", got back \"ABC\"\n"
    );
}
