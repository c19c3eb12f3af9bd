//! A tiny TCP application that tests, the demo and benchmarks run inside pods.
//!
//! - `testapp echo-server --listen ADDR`: prints `listening on <addr>` once bound,
//!   then echoes every byte of every connection; when a client half-closes, it
//!   finishes echoing and half-closes too.
//! - `testapp client --connect ADDR --send TEXT [--repeat N]`: sends TEXT N times on
//!   one connection, checks that each echo matches, half-closes, expects the server's
//!   EOF, and prints `ok local=.. peer=.. round_trips=N bytes=..`; exits 1 otherwise.
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
        } => client(connect, &send, repeat, Duration::from_secs(timeout_secs)),
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
