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
//!   and prints `ok connections=N bytes=..`. `--hold-secs N`: after the
//!   round trips prints `open local=.. peer=..`, keeps the connection idle
//!   for N seconds, and fails with `ended=reset|eof` if the path closes it
//!   meanwhile (e.g. a policy change revoked it).
//!
//! Line protocol (the demo's emojivoto-like app): a request is one line, a
//! reply is one line.
//! - `testapp line-server --listen ADDR --name NAME`: prints `listening on
//!   <addr>`, then answers every request line with `NAME: <line>`.
//! - `testapp relay --listen ADDR --name NAME --backend B=ADDR...`: for every
//!   request line, asks each backend (one connection per backend and client
//!   connection, reused for its later lines) and answers `NAME: <reply of
//!   B1> | <reply of B2>`; if a backend fails, it closes the client's
//!   connection without an answer (never a partial reply).
//! - `testapp bot --target T=ADDR... [--interval-ms N] [--count N]`: every
//!   interval sends one request line `vote <seq>` to each target, alternating
//!   between a fresh connection and one persistent connection per target, and
//!   prints `ok target=T conn=fresh|persistent seq=N reply=..` or `fail target=T
//!   conn=.. seq=N error=..` per request; runs until killed or N rounds.
#![forbid(unsafe_code)]

use std::{
    fmt,
    io::{self, BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    process::ExitCode,
    str::FromStr,
    time::{Duration, Instant},
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
        /// Keep the connection idle this long after the round trips.
        #[arg(long, conflicts_with_all = ["connections", "random_bytes"])]
        hold_secs: Option<u64>,
    },
    /// Answer every request line with `NAME: <line>`.
    LineServer {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        name: String,
    },
    /// Answer every request line with the replies of all backends.
    Relay {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        name: String,
        /// `NAME=ADDR` of a line server to ask; repeat for several.
        #[arg(long = "backend", required = true)]
        backends: Vec<NamedAddr>,
        /// Give up on a backend after this many seconds.
        #[arg(long, default_value_t = 5)]
        timeout_secs: u64,
    },
    /// Send request lines to targets continuously and report each answer.
    Bot {
        /// `NAME=ADDR` of a line server or relay; repeat for several.
        #[arg(long = "target", required = true)]
        targets: Vec<NamedAddr>,
        /// Time between rounds (one request to each target per round).
        #[arg(long, default_value_t = 200)]
        interval_ms: u64,
        /// Stop after this many rounds [default: run until killed].
        #[arg(long)]
        count: Option<u64>,
        /// Give up on a request after this many seconds.
        #[arg(long, default_value_t = 5)]
        timeout_secs: u64,
    },
}

/// `NAME=ADDR`: a peer of the line protocol and the name its replies go by.
#[derive(Clone, Debug)]
struct NamedAddr {
    name: String,
    addr: SocketAddr,
}

impl FromStr for NamedAddr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (name, addr) = text.split_once('=').ok_or_else(|| {
            format!("expected NAME=ADDR (e.g. emoji=10.96.0.11:80), got {text:?}")
        })?;
        let addr = addr
            .parse()
            .map_err(|e| format!("{text:?}: invalid address {addr:?}: {e}"))?;
        Ok(Self {
            name: name.to_owned(),
            addr,
        })
    }
}

impl fmt::Display for NamedAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.name, self.addr)
    }
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
            hold_secs,
        } => {
            let timeout = Duration::from_secs(timeout_secs);
            let hold = hold_secs.map(Duration::from_secs);
            match (random_bytes, connections) {
                (Some(len), _) => random_client(connect, len, timeout),
                (None, Some(n)) => many_clients(connect, &send, n, timeout),
                (None, None) => client(connect, &send, repeat, timeout, hold),
            }
        }
        Mode::LineServer { listen, name } => line_server(listen, &name),
        Mode::Relay {
            listen,
            name,
            backends,
            timeout_secs,
        } => relay(listen, name, backends, Duration::from_secs(timeout_secs)),
        Mode::Bot {
            targets,
            interval_ms,
            count,
            timeout_secs,
        } => {
            bot(
                &targets,
                Duration::from_millis(interval_ms),
                count,
                Duration::from_secs(timeout_secs),
            );
            Ok(())
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
    serve_connections(listen, echo)
}

/// Binds, announces the address (what `wait_listening` reads) and runs
/// `serve` on a thread per connection.
fn serve_connections(
    listen: SocketAddr,
    serve: impl Fn(TcpStream) -> io::Result<()> + Clone + Send + 'static,
) -> io::Result<()> {
    let listener = TcpListener::bind(listen)?;
    println!("listening on {}", listener.local_addr()?);
    io::stdout().flush()?;
    for stream in listener.incoming() {
        let stream = stream?;
        let serve = serve.clone();
        std::thread::spawn(move || {
            let peer = stream.peer_addr().ok();
            if let Err(e) = serve(stream) {
                eprintln!("testapp: connection from {peer:?}: {e}");
            }
        });
    }
    Ok(())
}

fn line_server(listen: SocketAddr, name: &str) -> io::Result<()> {
    let name = name.to_owned();
    serve_connections(listen, move |stream| {
        let mut writer = stream.try_clone()?;
        for line in BufReader::new(stream).lines() {
            writeln!(writer, "{name}: {}", line?)?;
        }
        writer.shutdown(Shutdown::Write)
    })
}

fn relay(
    listen: SocketAddr,
    name: String,
    backends: Vec<NamedAddr>,
    timeout: Duration,
) -> io::Result<()> {
    serve_connections(listen, move |stream| {
        let mut writer = stream.try_clone()?;
        // Opened at the first request, so a connection that never asks
        // anything costs the backends nothing.
        let mut connections: Vec<LineConnection> = Vec::with_capacity(backends.len());
        for line in BufReader::new(stream).lines() {
            let line = line?;
            if connections.is_empty() {
                for backend in &backends {
                    connections.push(LineConnection::open(backend, timeout)?);
                }
            }
            let mut replies = Vec::with_capacity(backends.len());
            for connection in &mut connections {
                replies.push(connection.ask(&line)?);
            }
            writeln!(writer, "{name}: {}", replies.join(" | "))?;
        }
        for connection in connections {
            connection.close()?;
        }
        writer.shutdown(Shutdown::Write)
    })
}

/// A client connection of the line protocol.
struct LineConnection {
    peer: String,
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl LineConnection {
    fn open(peer: &NamedAddr, timeout: Duration) -> io::Result<Self> {
        let stream = TcpStream::connect_timeout(&peer.addr, timeout)
            .map_err(|e| io::Error::new(e.kind(), format!("connecting to {peer}: {e}")))?;
        stream.set_read_timeout(Some(timeout))?;
        Ok(Self {
            peer: peer.to_string(),
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
        })
    }

    /// Sends one request line and returns the reply line.
    fn ask(&mut self, request: &str) -> io::Result<String> {
        writeln!(self.writer, "{request}")
            .map_err(|e| io::Error::new(e.kind(), format!("sending to {}: {e}", self.peer)))?;
        let mut reply = String::new();
        let read = self
            .reader
            .read_line(&mut reply)
            .map_err(|e| io::Error::new(e.kind(), format!("reading from {}: {e}", self.peer)))?;
        if read == 0 || !reply.ends_with('\n') {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{} closed the connection without a full reply", self.peer),
            ));
        }
        reply.pop();
        Ok(reply)
    }

    /// Half-closes and expects the peer's clean EOF with nothing left over.
    fn close(mut self) -> io::Result<()> {
        self.writer
            .shutdown(Shutdown::Write)
            .map_err(|e| io::Error::new(e.kind(), format!("closing to {}: {e}", self.peer)))?;
        let mut rest = Vec::new();
        self.reader
            .read_to_end(&mut rest)
            .map_err(|e| io::Error::new(e.kind(), format!("awaiting {}'s end: {e}", self.peer)))?;
        if rest.is_empty() {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "{}: {} unexpected bytes before EOF",
                self.peer,
                rest.len()
            )))
        }
    }
}

/// One request on a fresh connection: connect, ask, close.
fn ask_fresh(target: &NamedAddr, request: &str, timeout: Duration) -> io::Result<String> {
    let mut connection = LineConnection::open(target, timeout)?;
    let reply = connection.ask(request)?;
    connection.close()?;
    Ok(reply)
}

/// A reply answers the request only if it quotes it (every server of the
/// line protocol does, relays through each backend).
fn check_reply(request: &str, reply: String) -> io::Result<String> {
    if reply.contains(request) {
        Ok(reply)
    } else {
        Err(io::Error::other(format!(
            "reply {reply:?} does not answer {request:?}"
        )))
    }
}

fn bot(targets: &[NamedAddr], interval: Duration, count: Option<u64>, timeout: Duration) {
    let mut persistent: Vec<Option<LineConnection>> = targets.iter().map(|_| None).collect();
    let mut next_round = Instant::now();
    for seq in (1..).take_while(|seq| count.is_none_or(|count| *seq <= count)) {
        let fresh = seq % 2 == 1;
        let request = format!("vote {seq}");
        for (target, kept) in targets.iter().zip(&mut persistent) {
            let result = if fresh {
                ask_fresh(target, &request, timeout)
            } else {
                ask_persistent(kept, target, &request, timeout)
            };
            let conn = if fresh { "fresh" } else { "persistent" };
            match result.and_then(|reply| check_reply(&request, reply)) {
                Ok(reply) => println!(
                    "ok target={} conn={conn} seq={seq} reply={reply}",
                    target.name
                ),
                Err(e) => println!(
                    "fail target={} conn={conn} seq={seq} error={e}",
                    target.name
                ),
            }
        }
        next_round += interval;
        std::thread::sleep(next_round.saturating_duration_since(Instant::now()));
    }
}

/// Asks on the target's persistent connection, opening it when needed; a
/// failed connection is dropped so the next round opens a new one.
fn ask_persistent(
    kept: &mut Option<LineConnection>,
    target: &NamedAddr,
    request: &str,
    timeout: Duration,
) -> io::Result<String> {
    let connection = match kept {
        Some(connection) => connection,
        None => kept.insert(LineConnection::open(target, timeout)?),
    };
    let result = connection.ask(request);
    if result.is_err() {
        *kept = None;
    }
    result
}

fn echo(stream: TcpStream) -> io::Result<()> {
    let mut reader = stream.try_clone()?;
    let mut writer = stream;
    io::copy(&mut reader, &mut writer)?;
    // The client half-closed and got all its bytes back: half-close our side too.
    writer.shutdown(Shutdown::Write)
}

fn client(
    connect: SocketAddr,
    text: &str,
    repeat: u32,
    timeout: Duration,
    hold: Option<Duration>,
) -> io::Result<()> {
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
    if let Some(hold) = hold {
        println!("open local={local} peer={peer}");
        io::stdout().flush()?;
        stream.set_read_timeout(Some(hold))?;
        let ended = match stream.read(&mut [0u8; 1]) {
            Ok(0) => "eof",
            Ok(_) => "data",
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                ""
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => "reset",
            Err(e) => return Err(e),
        };
        if !ended.is_empty() {
            println!("ended={ended}");
            return Err(io::Error::other(format!(
                "the connection ended while held: {ended}"
            )));
        }
        stream.set_read_timeout(Some(timeout))?;
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
