//! A tiny TCP application that tests, the demo and benchmarks run inside pods.
//!
//! - `testapp echo-server --listen ADDR`: prints `listening on <addr>` once bound,
//!   then echoes every byte of every connection; when a client half-closes, it
//!   finishes echoing and half-closes too.
//! - `testapp client --connect ADDR --send TEXT [--repeat N]`: sends TEXT N times on
//!   one connection, checks that each echo matches, half-closes, expects the server's
//!   EOF, and prints `ok local=.. peer=.. round_trips=N bytes=..`; exits 1 otherwise.
//!   `--random-bytes N` sends N random bytes instead (any binary protocol);
//!   `--connections N` holds N connections open at once, each doing the exchange,
//!   and prints `ok connections=N bytes=..`.
#![forbid(unsafe_code)]

use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    process::ExitCode,
    time::Duration,
};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "TCP echo server and checking client for sealmesh testbeds")]
struct Cli {
    #[command(subcommand)]
    command: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Echo every byte back on every connection.
    EchoServer {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Send TEXT, read the echo, verify it.
    Client {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        send: String,
        /// Round trips on the one connection.
        #[arg(long, default_value_t = 1)]
        repeat: u32,
        /// Give up on connecting or on a missing echo after this many seconds.
        #[arg(long, default_value_t = 10)]
        timeout_secs: u64,
        /// Send this many random bytes instead of TEXT.
        #[arg(long, conflicts_with = "connections")]
        random_bytes: Option<usize>,
        /// Open this many connections at once; each sends TEXT once.
        #[arg(long)]
        connections: Option<usize>,
    },
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Mode::EchoServer { listen } => echo_server(listen),
        Mode::Client {
            connect,
            send,
            repeat,
            timeout_secs,
            random_bytes,
            connections,
        } => {
            let timeout = Duration::from_secs(timeout_secs);
            match (random_bytes, connections) {
                (Some(len), _) => random_client(connect, len, timeout),
                (None, Some(n)) => many_clients(connect, &send, n, timeout),
                (None, None) => client(connect, &send, repeat, timeout),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("testapp: {e}");
            ExitCode::FAILURE
        }
    }
}

fn echo_server(listen: SocketAddr) -> io::Result<()> {
    let listener = TcpListener::bind(listen)?;
    println!("listening on {}", listener.local_addr()?);
    io::stdout().flush()?;
    for stream in listener.incoming() {
        let stream = stream?;
        std::thread::spawn(move || {
            if let Err(e) = echo(stream) {
                eprintln!("testapp: echo: {e}");
            }
        });
    }
    Ok(())
}

fn echo(stream: TcpStream) -> io::Result<()> {
    let mut reader = stream.try_clone()?;
    let mut writer = stream;
    io::copy(&mut reader, &mut writer)?;
    // The client half-closed and got all its bytes back: half-close our side too.
    writer.shutdown(Shutdown::Write)
}

fn client(connect: SocketAddr, text: &str, repeat: u32, timeout: Duration) -> io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&connect, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    // Taken now: once both sides have closed, the socket no longer knows them.
    let (local, peer) = (stream.local_addr()?, stream.peer_addr()?);
    let mut echoed = vec![0u8; text.len()];
    for round in 1..=repeat {
        stream.write_all(text.as_bytes())?;
        stream.read_exact(&mut echoed)?;
        if echoed != text.as_bytes() {
            return Err(io::Error::other(format!(
                "round trip {round}: sent {text:?}, got back {:?}",
                String::from_utf8_lossy(&echoed)
            )));
        }
    }
    stream.shutdown(Shutdown::Write)?;
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest)?;
    if !rest.is_empty() {
        return Err(io::Error::other(format!(
            "{} unexpected bytes after the last echo",
            rest.len()
        )));
    }
    println!(
        "ok local={local} peer={peer} round_trips={repeat} bytes={}",
        text.len() * repeat as usize
    );
    Ok(())
}

/// Sends `len` random bytes while reading the echo on another thread (a
/// payload larger than the socket buffers would otherwise deadlock).
fn random_client(connect: SocketAddr, len: usize, timeout: Duration) -> io::Result<()> {
    let mut payload = vec![0u8; len];
    rand::fill(&mut payload[..]);
    let stream = TcpStream::connect_timeout(&connect, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    let (local, peer) = (stream.local_addr()?, stream.peer_addr()?);
    let mut writer = stream.try_clone()?;
    let sent = payload.clone();
    let write = std::thread::spawn(move || -> io::Result<()> {
        writer.write_all(&sent)?;
        writer.shutdown(Shutdown::Write)
    });
    let mut echoed = Vec::with_capacity(len);
    (&stream).read_to_end(&mut echoed)?;
    write
        .join()
        .map_err(|_| io::Error::other("writer thread panicked"))??;
    if echoed != payload {
        let first_difference = echoed.iter().zip(&payload).position(|(a, b)| a != b);
        return Err(io::Error::other(format!(
            "echo differs: sent {len} bytes, got {} back, first difference at {first_difference:?}",
            echoed.len()
        )));
    }
    println!("ok local={local} peer={peer} round_trips=1 bytes={len}");
    Ok(())
}

/// Opens `count` connections, then does the exchange on each while all stay
/// open, then closes them all.
fn many_clients(
    connect: SocketAddr,
    text: &str,
    count: usize,
    timeout: Duration,
) -> io::Result<()> {
    raise_open_files_limit()?;
    let mut streams = Vec::with_capacity(count);
    for i in 0..count {
        let stream = TcpStream::connect_timeout(&connect, timeout)
            .map_err(|e| io::Error::new(e.kind(), format!("connection {i}: {e}")))?;
        stream.set_read_timeout(Some(timeout))?;
        streams.push(stream);
    }
    for stream in &mut streams {
        stream.write_all(text.as_bytes())?;
    }
    let mut echoed = vec![0u8; text.len()];
    for (i, stream) in streams.iter_mut().enumerate() {
        stream.read_exact(&mut echoed)?;
        if echoed != text.as_bytes() {
            return Err(io::Error::other(format!("connection {i}: echo differs")));
        }
        stream.shutdown(Shutdown::Write)?;
    }
    for (i, stream) in streams.iter_mut().enumerate() {
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest)?;
        if !rest.is_empty() {
            return Err(io::Error::other(format!(
                "connection {i}: {} unexpected bytes",
                rest.len()
            )));
        }
    }
    println!("ok connections={count} bytes={}", text.len() * count);
    Ok(())
}

/// Many open sockets need more than the default soft limit of 1024 files.
fn raise_open_files_limit() -> io::Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    Ok(())
}
