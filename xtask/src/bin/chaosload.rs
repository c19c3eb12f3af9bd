//! The load `cargo xtask chaos` runs in a testbed pod while it injects
//! faults. It prints one JSON line per event (`xtask::chaos::load::LoadEvent`)
//! as it happens, timestamped in microseconds since the Unix epoch, so the
//! harness can line events up with the faults it injects.
//!
//! - `steady --connect A --rate R --streams S --marker M`: runs until killed.
//!   Starts a new connection (connect, echo of one marker-bearing message,
//!   close) every 1/R s whatever the earlier ones are doing, and keeps S
//!   long-lived streams that echo a marker-bearing message every
//!   `--interval-ms`; a broken stream is reported and opened again.
//! - `hold --connect A --connections N --concurrency C --marker M --hold-secs H`:
//!   opens N connections (C at a time), each echoing once, reports the
//!   connect + first-echo latencies, holds them H seconds, echoes once more on
//!   each and reports how many still worked.
#![forbid(unsafe_code)]

use std::{
    convert::Infallible,
    io,
    net::SocketAddr,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    sync::Semaphore,
};
use xtask::{
    bench::loadgen::Histogram,
    chaos::load::{LoadEvent, unix_micros},
};

#[derive(Parser)]
#[command(about = "steady load with per-event reports for cargo xtask chaos")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// New connections at a rate plus long-lived streams, until killed.
    Steady {
        #[arg(long)]
        connect: SocketAddr,
        /// New connections started per second.
        #[arg(long)]
        rate: f64,
        /// Long-lived streams kept open.
        #[arg(long, default_value_t = 4)]
        streams: usize,
        /// Text every message carries (what an underlay capture looks for).
        #[arg(long)]
        marker: String,
        /// Time between two echoes on a stream.
        #[arg(long, default_value_t = 200)]
        interval_ms: u64,
        /// Give up on a connection (or a stream's echo) after this long.
        #[arg(long, default_value_t = 10)]
        timeout_secs: u64,
    },
    /// Many concurrent connections held open.
    Hold {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        connections: usize,
        /// Connections being opened at once.
        #[arg(long, default_value_t = 128)]
        concurrency: usize,
        #[arg(long)]
        marker: String,
        #[arg(long)]
        hold_secs: f64,
        #[arg(long, default_value_t = 30)]
        timeout_secs: u64,
    },
}

fn main() -> ExitCode {
    let result = raise_open_files_limit().and_then(|()| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
    });
    let runtime = match result {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("chaosload: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        match Cli::parse().mode {
            Mode::Steady {
                connect,
                rate,
                streams,
                marker,
                interval_ms,
                timeout_secs,
            } => {
                steady(
                    connect,
                    rate,
                    streams,
                    &marker,
                    Duration::from_millis(interval_ms),
                    Duration::from_secs(timeout_secs),
                )
                .await
            }
            Mode::Hold {
                connect,
                connections,
                concurrency,
                marker,
                hold_secs,
                timeout_secs,
            } => {
                hold(
                    connect,
                    connections,
                    concurrency,
                    &marker,
                    hold_secs,
                    Duration::from_secs(timeout_secs),
                )
                .await
            }
        }
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chaosload: {e}");
            ExitCode::FAILURE
        }
    }
}

fn emit(event: &LoadEvent) {
    // Piped stdout is line-buffered in Rust: each event leaves at once.
    println!("{}", event.to_line());
}

async fn echo_once(stream: &mut TcpStream, message: &[u8]) -> io::Result<()> {
    stream.write_all(message).await?;
    let mut answer = vec![0u8; message.len()];
    stream.read_exact(&mut answer).await?;
    if answer != message {
        return Err(io::Error::other("the echo differs from what was sent"));
    }
    Ok(())
}

async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Connect, one echo, orderly close (the server's end of stream expected).
async fn exchange(addr: SocketAddr, message: &[u8]) -> io::Result<()> {
    let mut stream = connect(addr).await?;
    echo_once(&mut stream, message).await?;
    stream.shutdown().await?;
    let mut rest = [0u8; 1];
    match stream.read(&mut rest).await? {
        0 => Ok(()),
        _ => Err(io::Error::other("bytes after the echo")),
    }
}

async fn with_timeout<T>(
    timeout: Duration,
    what: impl std::future::Future<Output = io::Result<T>>,
) -> io::Result<T> {
    tokio::time::timeout(timeout, what)
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "timed out")))
}

async fn steady(
    addr: SocketAddr,
    rate: f64,
    streams: usize,
    marker: &str,
    interval: Duration,
    timeout: Duration,
) -> io::Result<()> {
    if !(rate > 0.0 && rate.is_finite()) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("--rate {rate}: give new connections per second, more than 0"),
        ));
    }
    for stream in 0..streams {
        let marker = marker.to_owned();
        tokio::spawn(async move { keep_stream(addr, stream, marker, interval, timeout).await });
    }
    let sequence = Arc::new(AtomicU64::new(0));
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let seq = sequence.fetch_add(1, Ordering::Relaxed);
        let message = format!("{marker} connection {seq:08}\n").into_bytes();
        tokio::spawn(async move {
            let start_us = unix_micros();
            let result = with_timeout(timeout, exchange(addr, &message)).await;
            emit(&LoadEvent::Attempt {
                start_us,
                end_us: unix_micros(),
                error: result.err().map(|e| e.to_string()),
            });
        });
    }
}

/// One long-lived stream, opened again whenever it breaks.
async fn keep_stream(
    addr: SocketAddr,
    stream: usize,
    marker: String,
    interval: Duration,
    timeout: Duration,
) {
    loop {
        let start_us = unix_micros();
        let mut echoes = 0u64;
        let outcome: io::Result<Infallible> = async {
            let mut socket = with_timeout(timeout, connect(addr)).await?;
            loop {
                let message = format!("{marker} stream {stream} echo {echoes:08}\n").into_bytes();
                with_timeout(timeout, echo_once(&mut socket, &message)).await?;
                if echoes == 0 {
                    emit(&LoadEvent::StreamUp {
                        stream,
                        start_us,
                        up_us: unix_micros(),
                    });
                }
                echoes += 1;
                tokio::time::sleep(interval).await;
            }
        }
        .await;
        let error = match outcome {
            Err(e) => e.to_string(),
            Ok(never) => match never {},
        };
        emit(&LoadEvent::StreamDown {
            stream,
            start_us,
            end_us: unix_micros(),
            echoes,
            error,
        });
        // Not a tight loop while the path is down.
        tokio::time::sleep(interval).await;
    }
}

async fn hold(
    addr: SocketAddr,
    connections: usize,
    concurrency: usize,
    marker: &str,
    hold_secs: f64,
    timeout: Duration,
) -> io::Result<()> {
    let hold = Duration::try_from_secs_f64(hold_secs)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("--hold-secs: {e}")))?;
    let slots = Arc::new(Semaphore::new(concurrency.max(1)));
    let started = Instant::now();
    let opening: Vec<_> = (0..connections)
        .map(|i| {
            let slots = slots.clone();
            let message = format!("{marker} held {i:08}\n").into_bytes();
            tokio::spawn(async move {
                let _slot = slots.acquire().await.expect("the semaphore stays open");
                let begun = Instant::now();
                let result = with_timeout(timeout, async {
                    let mut stream = connect(addr).await?;
                    echo_once(&mut stream, &message).await?;
                    Ok(stream)
                })
                .await;
                (result, begun.elapsed(), message)
            })
        })
        .collect();
    let mut held = Vec::with_capacity(connections);
    let mut latency = Histogram::default();
    let (mut errors, mut first_error) = (0u64, None);
    for task in opening {
        let (result, elapsed, message) = task.await.map_err(io::Error::other)?;
        match result {
            Ok(stream) => {
                latency.record(elapsed);
                held.push((stream, message));
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(e.to_string());
            }
        }
    }
    emit(&LoadEvent::Held {
        connections: held.len() as u64,
        errors,
        seconds: started.elapsed().as_secs_f64(),
        latency,
        first_error,
    });
    tokio::time::sleep(hold).await;
    let checking: Vec<_> = held
        .into_iter()
        .map(|(mut stream, message)| {
            tokio::spawn(
                async move { with_timeout(timeout, echo_once(&mut stream, &message)).await },
            )
        })
        .collect();
    let (mut ok, mut errors, mut first_error) = (0u64, 0u64, None);
    for task in checking {
        match task.await.map_err(io::Error::other)? {
            Ok(()) => ok += 1,
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(e.to_string());
            }
        }
    }
    emit(&LoadEvent::Released {
        still_working: ok,
        errors,
        first_error,
    });
    Ok(())
}

/// Many open sockets need more than the default soft limit of 1024 files.
fn raise_open_files_limit() -> io::Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    Ok(())
}
