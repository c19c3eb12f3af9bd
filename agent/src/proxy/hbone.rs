//! HBONE's HTTP/2 settings, shared by both ends and tuned for bulk
//! throughput without per-connection memory cost (windows are credit, not
//! buffers).

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
