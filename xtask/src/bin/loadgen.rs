//! Load generator that `cargo xtask bench` and `cargo xtask loadtest` run in
//! testbed pods. Every mode prints exactly one JSON result line
//! (`xtask::bench::loadgen::Report`) on stdout; servers print theirs once
//! bound. Failures go to stderr with exit status 1.
//!
//! - `echo --listen A`: echoes every connection; half-closes after the client does.
//! - `sink --listen A`: reads each connection to EOF, then answers with the
//!   byte count (8 bytes, big endian) and closes.
//! - `bulk --connect A --seconds S --streams N`: N connections to a sink send
//!   for S seconds; reports the bytes the sink confirmed.
//! - `rr --connect A --count N --size B`: N round trips of B bytes on one
//!   connection to an echo server; reports latency percentiles (µs).
//! - `connrate --connect A --seconds S [--size B]`: connect + B-byte echo +
//!   close, back to back, for S seconds.
//! - `idle --connect A --connections N --hold S`: opens N connections, echoes
//!   once on each, reports, and holds them S seconds.
//! - `load --connect A --rate R --concurrency C --seconds S [--size B]`:
//!   connect + echo + close started at R per second (0: as fast as possible)
//!   by at most C at once; reports a latency histogram.
#![forbid(unsafe_code)]

use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    process::ExitCode,
    sync::{
        Arc, Barrier,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use xtask::bench::loadgen::{Histogram, Report, rank};

/// Size of the writes of `bulk` and of the buffers of the servers.
const BUFFER: usize = 128 * 1024;
/// Connect and read timeout of every client mode.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Round trips before `rr` starts measuring (connection set-up, caches).
const RR_WARMUP: usize = 200;

#[derive(Parser)]
#[command(about = "load generator for sealmesh benchmarks and load tests")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Echo server.
    Echo {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Byte sink that confirms how much it received.
    Sink {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Bulk throughput to a sink.
    Bulk {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        seconds: f64,
        #[arg(long, default_value_t = 1)]
        streams: usize,
    },
    /// Request/response latency on one persistent connection to an echo server.
    Rr {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 64)]
        size: usize,
    },
    /// New connections per second (connect + echo + close) to an echo server.
    Connrate {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        seconds: f64,
        #[arg(long, default_value_t = 64)]
        size: usize,
    },
    /// Open idle connections to an echo server and hold them.
    Idle {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        connections: usize,
        #[arg(long)]
        hold: f64,
    },
    /// Connections at a rate with bounded concurrency to an echo server.
    Load {
        #[arg(long)]
        connect: SocketAddr,
        /// Connections started per second; 0 starts them as fast as `concurrency` allows.
        #[arg(long)]
        rate: f64,
        #[arg(long)]
        concurrency: usize,
        #[arg(long)]
        seconds: f64,
        #[arg(long, default_value_t = 64)]
        size: usize,
    },
}

fn main() -> ExitCode {
    let result = match Cli::parse().mode {
        Mode::Echo { listen } => serve(listen, Service::Echo),
        Mode::Sink { listen } => serve(listen, Service::Sink),
        Mode::Bulk {
            connect,
            seconds,
            streams,
        } => bulk(connect, seconds, streams),
        Mode::Rr {
            connect,
            count,
            size,
        } => rr(connect, count, size),
        Mode::Connrate {
            connect,
            seconds,
            size,
        } => connrate(connect, seconds, size),
        Mode::Idle {
            connect,
            connections,
            hold,
        } => idle(connect, connections, hold),
        Mode::Load {
            connect,
            rate,
            concurrency,
            seconds,
            size,
        } => load(connect, rate, concurrency, seconds, size),
    };
    match result {
        Ok(report) => {
            println!("{}", report.to_line());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}

fn seconds(value: f64) -> io::Result<Duration> {
    Duration::try_from_secs_f64(value)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{value} s: {e}")))
}

fn context(error: io::Error, what: String) -> io::Error {
    io::Error::new(error.kind(), format!("{what}: {error}"))
}

fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, TIMEOUT)
        .map_err(|e| io::Error::new(e.kind(), format!("connecting to {addr}: {e}")))?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// What a server does with each connection.
#[derive(Clone, Copy)]
enum Service {
    Echo,
    Sink,
}

/// Binds, reports, and serves every connection as a task; never returns
/// unless accepting fails. Async so that a new connection costs the server a
/// task, not a thread: the connection-rate figure is then the data path's,
/// not thread creation's.
fn serve(listen: SocketAddr, service: Service) -> io::Result<Report> {
    raise_open_files_limit()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_io()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        println!(
            "{}",
            Report::Listening {
                addr: listener.local_addr()?
            }
            .to_line()
        );
        io::stdout().flush()?;
        loop {
            let (stream, _) = listener.accept().await?;
            tokio::spawn(async move {
                // Peers that reset (benchmark clients being killed) are routine.
                let _ = match stream.set_nodelay(true) {
                    Ok(()) => match service {
                        Service::Echo => echo(stream).await,
                        Service::Sink => sink(stream).await,
                    },
                    Err(e) => Err(e),
                };
            });
        }
    })
}

async fn echo(mut stream: tokio::net::TcpStream) -> io::Result<()> {
    let (mut reader, mut writer) = stream.split();
    tokio::io::copy(&mut reader, &mut writer).await?;
    writer.shutdown().await
}

async fn sink(mut stream: tokio::net::TcpStream) -> io::Result<()> {
    let mut buffer = vec![0u8; BUFFER];
    let mut received: u64 = 0;
    loop {
        let n = stream.read(&mut buffer).await?;
        if n == 0 {
            break;
        }
        received += n as u64;
    }
    stream.write_all(&received.to_be_bytes()).await?;
    stream.shutdown().await
}

fn bulk(addr: SocketAddr, secs: f64, streams: usize) -> io::Result<Report> {
    let duration = seconds(secs)?;
    let streams = streams.max(1);
    let connections = (0..streams)
        .map(|_| connect(addr))
        .collect::<io::Result<Vec<_>>>()?;
    let start_line = Arc::new(Barrier::new(streams + 1));
    let workers: Vec<_> = connections
        .into_iter()
        .map(|mut stream| {
            let start_line = start_line.clone();
            std::thread::spawn(move || -> io::Result<u64> {
                let payload = vec![0x5au8; BUFFER];
                start_line.wait();
                let deadline = Instant::now() + duration;
                let mut sent: u64 = 0;
                while Instant::now() < deadline {
                    stream
                        .write_all(&payload)
                        .map_err(|e| context(e, format!("sending after {sent} bytes")))?;
                    sent += payload.len() as u64;
                }
                stream
                    .shutdown(Shutdown::Write)
                    .map_err(|e| context(e, format!("closing after {sent} bytes")))?;
                let mut confirmed = [0u8; 8];
                stream
                    .read_exact(&mut confirmed)
                    .map_err(|e| context(e, format!("reading the sink's count of {sent} bytes")))?;
                Ok(u64::from_be_bytes(confirmed))
            })
        })
        .collect();
    start_line.wait();
    let started = Instant::now();
    let mut bytes = 0;
    for worker in workers {
        bytes += worker
            .join()
            .map_err(|_| io::Error::other("a bulk stream panicked"))??;
    }
    Ok(Report::Bulk {
        streams,
        bytes,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn round_trip(stream: &mut TcpStream, request: &[u8], response: &mut [u8]) -> io::Result<()> {
    stream.write_all(request)?;
    stream.read_exact(response)?;
    if response != request {
        return Err(io::Error::other("the echo differs from what was sent"));
    }
    Ok(())
}

fn rr(addr: SocketAddr, count: usize, size: usize) -> io::Result<Report> {
    let mut stream = connect(addr)?;
    let request = vec![0xa5u8; size];
    let mut response = vec![0u8; size];
    for _ in 0..RR_WARMUP {
        round_trip(&mut stream, &request, &mut response)?;
    }
    let mut latencies = Vec::with_capacity(count);
    for _ in 0..count {
        let started = Instant::now();
        round_trip(&mut stream, &request, &mut response)?;
        latencies.push(started.elapsed());
    }
    latencies.sort_unstable();
    let percentile = |q: f64| {
        rank(q, latencies.len() as u64)
            .map(|r| latencies[r as usize - 1].as_secs_f64() * 1e6)
            .unwrap_or(f64::NAN)
    };
    Ok(Report::Rr {
        count,
        size,
        p50_us: percentile(0.50),
        p90_us: percentile(0.90),
        p99_us: percentile(0.99),
    })
}

/// One short-lived connection: connect, echo `size` bytes, close.
fn exchange(addr: SocketAddr, size: usize) -> io::Result<()> {
    let mut stream = connect(addr)?;
    let request = vec![0x3cu8; size];
    let mut response = vec![0u8; size];
    round_trip(&mut stream, &request, &mut response)
}

fn connrate(addr: SocketAddr, secs: f64, size: usize) -> io::Result<Report> {
    let duration = seconds(secs)?;
    let started = Instant::now();
    let (mut connections, mut errors, mut first_error) = (0, 0, None);
    while started.elapsed() < duration {
        match exchange(addr, size) {
            Ok(()) => connections += 1,
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(e.to_string());
            }
        }
    }
    Ok(Report::Connrate {
        connections,
        errors,
        seconds: started.elapsed().as_secs_f64(),
        first_error,
    })
}

fn idle(addr: SocketAddr, connections: usize, hold: f64) -> io::Result<Report> {
    let hold = seconds(hold)?;
    raise_open_files_limit()?;
    let request = [0x42u8; 64];
    let mut response = [0u8; 64];
    let mut held = Vec::with_capacity(connections);
    for i in 0..connections {
        let mut stream = connect(addr)?;
        round_trip(&mut stream, &request, &mut response)
            .map_err(|e| io::Error::new(e.kind(), format!("connection {i}: {e}")))?;
        held.push(stream);
    }
    // Reported before holding: the harness measures while the connections idle.
    println!("{}", Report::Idle { connections }.to_line());
    io::stdout().flush()?;
    std::thread::sleep(hold);
    Ok(Report::Idle { connections })
}

fn load(
    addr: SocketAddr,
    rate: f64,
    concurrency: usize,
    secs: f64,
    size: usize,
) -> io::Result<Report> {
    let duration = seconds(secs)?;
    if !(rate >= 0.0 && rate.is_finite()) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("--rate {rate}: give connections per second, or 0 for unlimited"),
        ));
    }
    raise_open_files_limit()?;
    // Connection i is due at i / rate; workers take the next due one.
    let next_ticket = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency.max(1))
        .map(|_| {
            let next_ticket = next_ticket.clone();
            std::thread::spawn(move || {
                let mut tally = Tally::default();
                loop {
                    let ticket = next_ticket.fetch_add(1, Ordering::Relaxed);
                    let due = if rate > 0.0 {
                        Duration::from_secs_f64(ticket as f64 / rate)
                    } else {
                        started.elapsed()
                    };
                    if due >= duration {
                        return tally;
                    }
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        std::thread::sleep(wait);
                    }
                    let begun = Instant::now();
                    match exchange(addr, size) {
                        Ok(()) => {
                            tally.latency.record(begun.elapsed());
                            tally.connections += 1;
                        }
                        Err(e) => {
                            tally.errors += 1;
                            tally.first_error.get_or_insert(e.to_string());
                        }
                    }
                }
            })
        })
        .collect();
    let mut total = Tally::default();
    for worker in workers {
        total.add(
            worker
                .join()
                .map_err(|_| io::Error::other("a load worker panicked"))?,
        );
    }
    Ok(Report::Load {
        connections: total.connections,
        errors: total.errors,
        bytes: total.connections * 2 * size as u64,
        seconds: started.elapsed().as_secs_f64(),
        latency: total.latency,
        first_error: total.first_error,
    })
}

#[derive(Default)]
struct Tally {
    connections: u64,
    errors: u64,
    latency: Histogram,
    first_error: Option<String>,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.connections += other.connections;
        self.errors += other.errors;
        self.latency.merge(&other.latency);
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

/// Many open sockets need more than the default soft limit of 1024 files.
fn raise_open_files_limit() -> io::Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    Ok(())
}
