//! Carrying bytes between a TCP socket and an HBONE stream, or between two
//! TCP sockets, both ways with half-close.
//!
//! Hot-path rules: read into a `BytesMut` that is reused while data flows
//! (the allocation is reclaimed once h2 has written the previous chunk) and
//! hand the filled part on as `Bytes` without copying; hold no buffer while
//! a socket is idle, so idle connections cost almost no memory; send only as
//! much as h2 has granted; give window back only once bytes are written to
//! the socket, so a slow reader throttles the sender instead of growing
//! buffers. Counters are updated once per chunk.

use std::{
    future::{Future, poll_fn},
    io,
    pin::pin,
    sync::{Arc, atomic::AtomicU64, atomic::Ordering},
    task::{Context, Waker},
};

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, Interest},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
};

use super::event::ByteCounters;

/// First read after a socket was idle: most messages are small, and an
/// idle connection's last allocation stays small.
const FIRST_READ: usize = 16 * 1024;
/// Reads double up to this while they keep filling the buffer (bulk): a
/// quarter of the syscalls and h2 frames of fixed 64 KiB reads, −11 % agent
/// CPU per GB in `xtask bench` (docs/PERFORMANCE.md).
const MAX_READ: usize = 256 * 1024;
/// The pipe a burst is spliced through, and so the most one splice(2)
/// moves: 1 MiB measured −34 % CPU per GB against copying, 64 KiB (the
/// default) +19 % (docs/PERFORMANCE.md).
const PIPE_SIZE: i32 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SpliceError {
    #[error("TCP side: {0}")]
    Tcp(#[from] io::Error),
    #[error("HTTP/2 stream: {0}")]
    H2(#[from] h2::Error),
    #[error("HTTP/2 stream was closed by the peer before the end of data")]
    StreamClosed,
}

/// Carries bytes both ways between `tcp` and an h2 stream until both
/// directions ended: TCP FIN ↔ END_STREAM each way, so a half-closed
/// connection keeps flowing in the other direction. An error in either
/// direction ends both (h2 resets the stream when its handles drop).
/// `from_tcp` counts the bytes read from the socket, `to_tcp` those written
/// to it. If `revoked` resolves first, the socket is reset and the stream
/// dropped (reset), and its value returned.
pub(crate) async fn tcp_h2<R>(
    tcp: TcpStream,
    send: SendStream<Bytes>,
    recv: RecvStream,
    from_tcp: &AtomicU64,
    to_tcp: &AtomicU64,
    revoked: impl Future<Output = R>,
) -> Result<Option<R>, SpliceError> {
    let (mut read, mut write) = tcp.into_split();
    let outcome = tokio::select! {
        done = async {
            tokio::try_join!(
                tcp_to_h2(&mut read, send, from_tcp),
                h2_to_tcp(recv, &mut write, to_tcp)
            )
        } => {
            done?;
            None
        }
        revoked = revoked => Some(revoked),
    };
    if outcome.is_some() {
        reset(read, write);
    }
    Ok(outcome)
}

/// Carries bytes both ways between two sockets (plaintext and
/// secured-local), passing each FIN on. If `revoked` resolves first, both
/// sockets are reset and its value returned.
pub(crate) async fn tcp_tcp<R>(
    source: TcpStream,
    destination: TcpStream,
    bytes: &Arc<ByteCounters>,
    revoked: impl Future<Output = R>,
) -> Result<Option<R>, SpliceError> {
    let (mut source_read, mut source_write) = source.into_split();
    let (mut destination_read, mut destination_write) = destination.into_split();
    let outcome = tokio::select! {
        done = async {
            tokio::try_join!(
                tcp_to_tcp(&mut source_read, &mut destination_write, &bytes.src_to_dst),
                tcp_to_tcp(&mut destination_read, &mut source_write, &bytes.dst_to_src)
            )
        } => {
            done?;
            None
        }
        revoked = revoked => Some(revoked),
    };
    if outcome.is_some() {
        reset(source_read, source_write);
        reset(destination_read, destination_write);
    }
    Ok(outcome)
}

/// Closes a socket with a reset (SO_LINGER 0), so its peer fails at once
/// instead of reading an orderly end of a cut stream. The halves are
/// reunited first: a dropped write half would send a FIN before the reset.
pub(crate) fn reset(read: OwnedReadHalf, write: OwnedWriteHalf) {
    if let Ok(socket) = read.reunite(write) {
        let abort = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        let _ = nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Linger, &abort);
    }
}

/// Reads a socket in chunks sized to the traffic: small after idleness,
/// growing while reads fill the buffer.
struct ChunkReader<'a> {
    read: &'a mut OwnedReadHalf,
    buf: BytesMut,
    read_size: usize,
    /// The last read filled a buffer of `MAX_READ`: bulk traffic.
    saturated: bool,
}

impl<'a> ChunkReader<'a> {
    fn new(read: &'a mut OwnedReadHalf) -> Self {
        Self {
            read,
            buf: BytesMut::new(),
            read_size: FIRST_READ,
            saturated: false,
        }
    }

    /// Gives the buffer back and starts small again: while the socket idles,
    /// or while a burst is spliced past the reader.
    fn rest(&mut self) {
        self.buf = BytesMut::new();
        self.read_size = FIRST_READ;
        self.saturated = false;
    }

    /// The next chunk, None at EOF. Waits without holding a buffer.
    async fn next(&mut self) -> io::Result<Option<Bytes>> {
        // Not readable right now: the socket idles, so give the buffer back
        // before waiting and start small again afterwards.
        let idle = pin!(self.read.readable())
            .poll(&mut Context::from_waker(Waker::noop()))
            .is_pending();
        if idle {
            self.rest();
            self.read.readable().await?;
        }
        self.buf.reserve(self.read_size);
        let room = self.buf.capacity() - self.buf.len();
        // Through AsyncRead rather than try_read: tokio takes a short read
        // as "socket drained" and clears the readiness, which saves the
        // EAGAIN read per message that try_read needs to learn the same.
        let n = self.read.read_buf(&mut self.buf).await?;
        if n == 0 {
            return Ok(None);
        }
        self.saturated = n == room && self.read_size == MAX_READ;
        if n == room {
            self.read_size = (self.read_size * 2).min(MAX_READ);
        }
        Ok(Some(self.buf.split().freeze()))
    }
}

pub(crate) async fn tcp_to_h2(
    read: &mut OwnedReadHalf,
    mut send: SendStream<Bytes>,
    counter: &AtomicU64,
) -> Result<(), SpliceError> {
    let mut reader = ChunkReader::new(read);
    while let Some(mut data) = reader.next().await? {
        counter.fetch_add(data.len() as u64, Ordering::Relaxed);
        while !data.is_empty() {
            send.reserve_capacity(data.len());
            let granted = poll_fn(|cx| send.poll_capacity(cx))
                .await
                .ok_or(SpliceError::StreamClosed)??;
            send.send_data(data.split_to(granted.min(data.len())), false)?;
        }
    }
    send.send_data(Bytes::new(), true)?;
    Ok(())
}

pub(crate) async fn h2_to_tcp(
    mut recv: RecvStream,
    write: &mut OwnedWriteHalf,
    counter: &AtomicU64,
) -> Result<(), SpliceError> {
    while let Some(chunk) = recv.data().await {
        let chunk = chunk?;
        write.write_all(&chunk).await?;
        recv.flow_control().release_capacity(chunk.len())?;
        counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
    }
    // END_STREAM: pass the half-close on as a FIN.
    write.shutdown().await?;
    Ok(())
}

/// Copies while traffic is light; during bulk (a read filled `MAX_READ`)
/// moves bytes inside the kernel instead, until the source idles.
async fn tcp_to_tcp(
    read: &mut OwnedReadHalf,
    write: &mut OwnedWriteHalf,
    counter: &AtomicU64,
) -> Result<(), SpliceError> {
    let mut reader = ChunkReader::new(read);
    while let Some(chunk) = reader.next().await? {
        write.write_all(&chunk).await?;
        counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        if reader.saturated {
            reader.rest();
            if splice_burst(reader.read, write, counter).await? == Burst::Ended {
                break;
            }
        }
    }
    write.shutdown().await?;
    Ok(())
}

#[derive(Debug, PartialEq)]
enum Burst {
    /// The source has nothing to read right now.
    Idle,
    /// The source sent its FIN.
    Ended,
}

/// Moves what `read` receives to `write` without copying it into the agent
/// (splice(2) through a pipe, a pipe's worth at a time: nothing more is
/// taken until `write` accepted it all), until `read` has nothing more to
/// give. The pipe lives for the burst only, so a connection between bursts
/// holds no descriptors beyond its sockets. −33 % agent CPU per GB on one
/// node (docs/PERFORMANCE.md).
async fn splice_burst(
    read: &OwnedReadHalf,
    write: &OwnedWriteHalf,
    counter: &AtomicU64,
) -> Result<Burst, SpliceError> {
    let (pipe_out, pipe_in) = match nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC) {
        Ok(pipe) => pipe,
        Err(error) => {
            // Out of descriptors: the burst is copied instead.
            tracing::debug!(%error, "no pipe to splice a burst through; copying it");
            return Ok(Burst::Idle);
        }
    };
    // A bigger pipe moves a burst in fewer, larger steps; the default
    // (64 KiB) is kept if the node's pipe limits refuse it.
    let _ = fcntl(&pipe_in, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
    let flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
    let (source, destination) = (read.as_ref(), write.as_ref());
    loop {
        let taken = match source.try_io(Interest::READABLE, || {
            splice(source, None, &pipe_in, None, PIPE_SIZE as usize, flags).map_err(io::Error::from)
        }) {
            Ok(0) => return Ok(Burst::Ended),
            Ok(taken) => taken,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(Burst::Idle),
            Err(error) => return Err(error.into()),
        };
        let mut left = taken;
        while left > 0 {
            destination.writable().await?;
            match destination.try_io(Interest::WRITABLE, || {
                splice(&pipe_out, None, destination, None, left, flags).map_err(io::Error::from)
            }) {
                Ok(given) => left -= given,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => return Err(error.into()),
            }
        }
        counter.fetch_add(taken as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::AsyncReadExt,
        net::{TcpListener, TcpStream},
    };

    use super::*;

    /// Two ends of a loopback TCP connection.
    async fn connected() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let near = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (far, _) = listener.accept().await.unwrap();
        (near, far)
    }

    #[tokio::test]
    async fn a_burst_is_moved_in_the_kernel_byte_for_byte_until_the_source_idles_or_ends() {
        // sender -> (source) agent (destination) -> receiver
        let (mut sender, source) = connected().await;
        let (destination, mut receiver) = connected().await;
        let (read, _source_write) = source.into_split();
        let (_destination_read, write) = destination.into_split();
        // More than the pipe holds, so the burst takes several splices, and
        // more than loopback buffers, so the destination pushes back.
        let payload: Vec<u8> = (0..5 * 1024 * 1024 + 17).map(|i| (i % 251) as u8).collect();
        let len = payload.len();
        let sent = payload.clone();
        let writing = tokio::spawn(async move {
            sender.write_all(&sent).await.unwrap();
            sender
        });
        let reading = tokio::spawn(async move {
            let mut got = vec![0; len];
            receiver.read_exact(&mut got).await.unwrap();
            (receiver, got)
        });
        let moved = AtomicU64::new(0);
        while moved.load(Ordering::Relaxed) < len as u64 {
            read.as_ref().readable().await.unwrap();
            let burst = splice_burst(&read, &write, &moved).await.unwrap();
            assert_eq!(burst, Burst::Idle, "the sender has not closed yet");
        }
        let mut sender = writing.await.unwrap();
        let (mut receiver, got) = reading.await.unwrap();
        assert!(got == payload, "the bytes arrived changed or out of order");

        sender.shutdown().await.unwrap();
        read.as_ref().readable().await.unwrap();
        assert_eq!(
            splice_burst(&read, &write, &moved).await.unwrap(),
            Burst::Ended
        );
        assert_eq!(moved.load(Ordering::Relaxed), len as u64);
        // Nothing more than the payload reached the receiver.
        drop(write);
        let mut rest = Vec::new();
        receiver.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "{} bytes too many", rest.len());
    }

    #[tokio::test]
    async fn bulk_both_ways_with_half_closes_is_carried_whole() {
        let (mut client, agent_client_side) = connected().await;
        let (agent_server_side, mut server) = connected().await;
        let bytes = Arc::new(ByteCounters::default());
        let counters = bytes.clone();
        let carrying = tokio::spawn(async move {
            tcp_tcp(
                agent_client_side,
                agent_server_side,
                &counters,
                std::future::pending::<()>(),
            )
            .await
        });
        let request: Vec<u8> = (0..3 * 1024 * 1024).map(|i| (i % 241) as u8).collect();
        let answer: Vec<u8> = (0..2 * 1024 * 1024).map(|i| (i % 239) as u8).collect();
        let (request_len, answer_len) = (request.len(), answer.len());
        // The server reads the whole request (to the client's FIN), then
        // answers and closes; the client sends, half-closes, reads to EOF.
        let serving = {
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                server.read_to_end(&mut got).await.unwrap();
                server.write_all(&answer).await.unwrap();
                server.shutdown().await.unwrap();
                got
            })
        };
        let sent = request.clone();
        let (mut client_read, mut client_write) = client.split();
        let (_, answered) = tokio::join!(
            async {
                client_write.write_all(&sent).await.unwrap();
                client_write.shutdown().await.unwrap();
            },
            async {
                let mut got = Vec::new();
                client_read.read_to_end(&mut got).await.unwrap();
                got
            }
        );
        assert!(
            serving.await.unwrap() == request,
            "request changed on the way"
        );
        assert!(answered == answer, "answer changed on the way");
        assert!(carrying.await.unwrap().unwrap().is_none());
        assert_eq!(bytes.src_to_dst.load(Ordering::Relaxed), request_len as u64);
        assert_eq!(bytes.dst_to_src.load(Ordering::Relaxed), answer_len as u64);
    }
}
