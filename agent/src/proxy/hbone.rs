//! HBONE framing shared by both ends: HTTP/2 settings tuned for bulk
//! throughput and the splice between a TCP socket and one h2 CONNECT stream.
//!
//! Hot-path rules: read into one reusable `BytesMut` per direction and hand
//! the filled part to h2 as `Bytes` without copying; send only as much as h2
//! has granted; give window back only once bytes are written to the socket so
//! a slow reader throttles the sender instead of growing buffers.

use std::{
    future::poll_fn,
    sync::{Arc, atomic::Ordering},
};

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

use super::event::ByteCounters;

/// Per-stream receive window: large enough for one stream to fill a fast
/// link across the round trip without waiting for WINDOW_UPDATEs.
const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// Whole-connection receive window, shared by the multiplexed streams.
const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Large DATA frames cut per-frame overhead; TLS still cuts 16 KiB records.
const MAX_FRAME: u32 = 256 * 1024;
/// How much h2 may buffer per stream before `poll_capacity` pushes back.
const MAX_SEND_BUFFER: usize = 1024 * 1024;
/// Bytes read from a TCP socket at a time.
const READ_CHUNK: usize = 64 * 1024;
/// Streams one HBONE connection carries at once; the pool opens another
/// connection before a peer's limit is reached.
pub(crate) const MAX_CONCURRENT_STREAMS: u32 = 256;

pub(crate) fn client_builder() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .enable_push(false);
    b
}

pub(crate) fn server_builder() -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS);
    b
}

#[derive(Debug, thiserror::Error)]
pub enum SpliceError {
    #[error("TCP side: {0}")]
    Tcp(#[from] std::io::Error),
    #[error("HTTP/2 stream: {0}")]
    H2(#[from] h2::Error),
    #[error("HTTP/2 stream was closed by the peer before the end of data")]
    StreamClosed,
}

/// Which way the TCP socket faces, to count bytes in the connection's terms.
#[derive(Clone, Copy, Debug)]
pub(crate) enum TcpSide {
    /// The socket is the source pod (outbound): TCP reads are src→dst.
    Source,
    /// The socket is the destination pod (inbound): TCP reads are dst→src.
    Destination,
}

/// Carries bytes both ways between `tcp` and an h2 stream until both
/// directions ended: TCP FIN ↔ END_STREAM each way, so half-closed
/// connections keep flowing in the other direction. An error in either
/// direction ends both (h2 resets the stream when its handles drop).
pub(crate) async fn splice(
    tcp: TcpStream,
    send: SendStream<Bytes>,
    recv: RecvStream,
    side: TcpSide,
    bytes: &Arc<ByteCounters>,
) -> Result<(), SpliceError> {
    let (read, write) = tcp.into_split();
    let (from_tcp, to_tcp) = match side {
        TcpSide::Source => (&bytes.src_to_dst, &bytes.dst_to_src),
        TcpSide::Destination => (&bytes.dst_to_src, &bytes.src_to_dst),
    };
    tokio::try_join!(
        tcp_to_h2(read, send, |n| {
            from_tcp.fetch_add(n, Ordering::Relaxed);
        }),
        h2_to_tcp(recv, write, |n| {
            to_tcp.fetch_add(n, Ordering::Relaxed);
        }),
    )?;
    Ok(())
}

async fn tcp_to_h2(
    mut read: impl AsyncRead + Unpin,
    mut send: SendStream<Bytes>,
    count: impl Fn(u64),
) -> Result<(), SpliceError> {
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    loop {
        // Reclaims the previous chunk's allocation once h2 has written it out.
        buf.reserve(READ_CHUNK);
        let n = read.read_buf(&mut buf).await?;
        if n == 0 {
            send.send_data(Bytes::new(), true)?;
            return Ok(());
        }
        count(n as u64);
        let mut data = buf.split().freeze();
        while !data.is_empty() {
            send.reserve_capacity(data.len());
            let granted = poll_fn(|cx| send.poll_capacity(cx))
                .await
                .ok_or(SpliceError::StreamClosed)??;
            let chunk = data.split_to(granted.min(data.len()));
            send.send_data(chunk, false)?;
        }
    }
}

async fn h2_to_tcp(
    mut recv: RecvStream,
    mut write: impl AsyncWrite + Unpin,
    count: impl Fn(u64),
) -> Result<(), SpliceError> {
    while let Some(chunk) = recv.data().await {
        let chunk = chunk?;
        let n = chunk.len();
        write.write_all(&chunk).await?;
        recv.flow_control().release_capacity(n)?;
        count(n as u64);
    }
    // END_STREAM: pass the half-close on as a FIN.
    write.shutdown().await?;
    Ok(())
}
