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
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
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
}

impl<'a> ChunkReader<'a> {
    fn new(read: &'a mut OwnedReadHalf) -> Self {
        Self {
            read,
            buf: BytesMut::new(),
            read_size: FIRST_READ,
        }
    }

    /// The next chunk, None at EOF. Waits without holding a buffer.
    async fn next(&mut self) -> io::Result<Option<Bytes>> {
        {
            // Not readable right now: the socket idles, so give the buffer
            // back before waiting and start small again afterwards.
            let mut readable = pin!(self.read.readable());
            if readable
                .as_mut()
                .poll(&mut Context::from_waker(Waker::noop()))
                .is_pending()
            {
                self.buf = BytesMut::new();
                self.read_size = FIRST_READ;
                readable.await?;
            }
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

async fn tcp_to_tcp(
    read: &mut OwnedReadHalf,
    write: &mut OwnedWriteHalf,
    counter: &AtomicU64,
) -> Result<(), SpliceError> {
    let mut reader = ChunkReader::new(read);
    while let Some(chunk) = reader.next().await? {
        write.write_all(&chunk).await?;
        counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
    }
    write.shutdown().await?;
    Ok(())
}
