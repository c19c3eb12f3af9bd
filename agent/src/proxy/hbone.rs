//! HBONE's HTTP/2 and socket settings, shared by both ends: tuned for bulk
//! throughput without per-connection memory cost (windows are credit, not
//! buffers), bounded against hostile peers, and keepalives that find dead
//! ones.

use std::time::Duration;

use nix::sys::socket::{setsockopt, sockopt};
use tokio::net::TcpStream;

/// Per-stream receive window: large enough for one stream to fill a fast
/// link across the round trip without waiting for WINDOW_UPDATEs.
const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// Whole-connection receive window, shared by the multiplexed streams.
const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Large DATA frames cut per-frame overhead; TLS still cuts 16 KiB records.
const MAX_FRAME: u32 = 256 * 1024;
/// How much h2 may buffer per stream before `poll_capacity` pushes back.
const MAX_SEND_BUFFER: usize = 1024 * 1024;
/// Streams one HBONE connection carries at once; the pool opens another
/// connection before a peer's limit is reached.
pub(crate) const MAX_CONCURRENT_STREAMS: u32 = 256;
/// Header block a peer may send (a CONNECT carries an authority and one
/// `forwarded` header); h2's default, 16 MiB, would let one peer make the
/// agent buffer that much per stream.
const MAX_HEADER_LIST: u32 = 16 * 1024;
/// TCP keepalive on HBONE sockets: a peer whose host vanished without a FIN
/// or RST is found by the kernel after idle + interval × probes...
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_PROBES: u32 = 3;
/// ... and sent data that stays unacknowledged this long ends the connection
/// (without it, retransmissions would hold a dead connection for ~15 min).
const USER_TIMEOUT: Duration = Duration::from_secs(60);

/// Sets TCP keepalive and the user timeout on an HBONE socket (both ends).
pub(crate) fn set_keepalive(socket: &TcpStream) -> nix::Result<()> {
    setsockopt(socket, sockopt::KeepAlive, &true)?;
    setsockopt(socket, sockopt::TcpKeepIdle, &secs(KEEPALIVE_IDLE))?;
    setsockopt(socket, sockopt::TcpKeepInterval, &secs(KEEPALIVE_INTERVAL))?;
    setsockopt(socket, sockopt::TcpKeepCount, &KEEPALIVE_PROBES)?;
    let user_timeout_ms = u32::try_from(USER_TIMEOUT.as_millis()).unwrap_or(u32::MAX);
    setsockopt(socket, sockopt::TcpUserTimeout, &user_timeout_ms)
}

fn secs(duration: Duration) -> u32 {
    u32::try_from(duration.as_secs()).unwrap_or(u32::MAX)
}

pub(crate) fn client_builder() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .max_header_list_size(MAX_HEADER_LIST)
        .enable_push(false);
    b
}

pub(crate) fn server_builder() -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS);
    b
}

#[cfg(test)]
mod tests {
    use nix::sys::socket::getsockopt;
    use tokio::net::TcpListener;

    use super::*;

    #[tokio::test]
    async fn hbone_sockets_get_keepalive_and_a_user_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let socket = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        set_keepalive(&socket).unwrap();
        assert!(getsockopt(&socket, sockopt::KeepAlive).unwrap());
        assert_eq!(getsockopt(&socket, sockopt::TcpKeepIdle).unwrap(), 30);
        assert_eq!(getsockopt(&socket, sockopt::TcpKeepInterval).unwrap(), 10);
        assert_eq!(getsockopt(&socket, sockopt::TcpKeepCount).unwrap(), 3);
        assert_eq!(
            getsockopt(&socket, sockopt::TcpUserTimeout).unwrap(),
            60_000
        );
    }
}
