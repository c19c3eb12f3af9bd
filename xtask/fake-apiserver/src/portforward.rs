//! `pods/portforward` over WebSocket, as kube-apiserver proxies it to the
//! pod's kubelet: channel protocol `v4.channel.k8s.io` (or
//! `portforward.k8s.io`), per requested port a data channel `2*i` and an
//! error channel `2*i+1`, each opened with a frame carrying the port (2 bytes,
//! little-endian); then binary frames prefixed by their channel byte.
//!
//! The server has no kubelet to ask: whoever runs pods registers a
//! [`PortForwarder`] that opens a TCP connection to a pod's port (the testbed
//! dials inside the node's or pod's network namespace).

use std::collections::HashMap;
use std::io;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{SinkExt, StreamExt};
use http::header::{
    CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_PROTOCOL, UPGRADE,
};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

use crate::resources::id_of;
use crate::server::{Body, Shared, lock};
use crate::status::ApiError;

/// Opens a connection to `port` of pod `namespace/name`, as the pod's
/// kubelet would.
pub type PortForwarder =
    Arc<dyn Fn(String, String, u16) -> BoxFuture<'static, io::Result<TcpStream>> + Send + Sync>;

/// The registered [`PortForwarder`] (a closure, shown by name only).
#[derive(Clone)]
pub(crate) struct Registered(pub PortForwarder);

impl std::fmt::Debug for Registered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PortForwarder")
    }
}

/// Subprotocols the kubelet's WebSocket port-forward speaks, preferred first.
const PROTOCOLS: [&str; 2] = ["v4.channel.k8s.io", "portforward.k8s.io"];
/// At most this many ports per request (channel numbers are one byte).
const MAX_PORTS: usize = 64;
/// How long a closing session waits for the client's Close frame.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);
/// Bytes read from a pod connection per data frame.
const FRAME_BYTES: usize = 32 * 1024;

/// `GET /api/v1/namespaces/{namespace}/pods/{name}/portforward?ports=N[,M]`.
pub(crate) async fn serve(
    shared: &Arc<Shared>,
    request: Request<Incoming>,
    namespace: &str,
    name: &str,
    query: &HashMap<String, String>,
) -> Result<Response<Body>, ApiError> {
    if !matches!(*request.method(), Method::GET | Method::POST) {
        return Err(ApiError::MethodNotAllowed);
    }
    lock(&shared.store).get(id_of("", "pods"), Some(namespace), name)?;
    let ports = parse_ports(query)?;
    let headers = request.headers();
    let upgrade = headers
        .get(UPGRADE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.eq_ignore_ascii_case("websocket"));
    let key = headers.get(SEC_WEBSOCKET_KEY).cloned();
    let (true, Some(key)) = (upgrade, key) else {
        return Err(ApiError::BadRequest(
            "Upgrade request required: port-forward is served over WebSocket (Upgrade: websocket, subprotocol v4.channel.k8s.io)"
                .to_string(),
        ));
    };
    let offered: Vec<String> = headers
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|protocol| protocol.trim().to_string())
        .collect();
    // As the real server: with none of its subprotocols offered it speaks the
    // unnamed binary one.
    let protocol = PROTOCOLS
        .into_iter()
        .find(|protocol| offered.iter().any(|offered| offered == protocol));
    let Some(Registered(forwarder)) = lock(&shared.port_forwarder).clone() else {
        return Err(ApiError::Internal(format!(
            "error dialing backend: no kubelet serves pod {namespace}/{name} (no port forwarder registered with the fake API server)"
        )));
    };

    let mut response = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(UPGRADE, "websocket")
        .header(CONNECTION, "Upgrade")
        .header(SEC_WEBSOCKET_ACCEPT, derive_accept_key(key.as_bytes()));
    if let Some(protocol) = protocol {
        response = response.header(SEC_WEBSOCKET_PROTOCOL, protocol);
    }
    let (namespace, name) = (namespace.to_string(), name.to_string());
    let mut stopped = shared.stopped.subscribe();
    tokio::spawn(async move {
        let upgraded = match hyper::upgrade::on(request).await {
            Ok(upgraded) => upgraded,
            Err(error) => {
                tracing::debug!(%error, "fake API server: port-forward upgrade failed");
                return;
            }
        };
        let socket =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        let dial = move |port| forwarder(namespace.clone(), name.clone(), port);
        tokio::select! {
            () = forward(socket, ports, dial) => {}
            _ = stopped.wait_for(|stopped| *stopped) => {}
        }
    });
    Ok(response
        .body(Empty::new().map_err(|never| match never {}).boxed())
        .expect("static response parts are valid"))
}

fn parse_ports(query: &HashMap<String, String>) -> Result<Vec<u16>, ApiError> {
    let text = query.get("ports").map(String::as_str).unwrap_or_default();
    if text.is_empty() {
        return Err(ApiError::BadRequest(
            "query parameter \"ports\" is required (e.g. ?ports=8080)".to_string(),
        ));
    }
    if text.split(',').count() > MAX_PORTS {
        return Err(ApiError::BadRequest(format!(
            "at most {MAX_PORTS} ports can be forwarded at once"
        )));
    }
    text.split(',')
        .map(|port| match port.trim().parse::<u16>() {
            Ok(port) if port > 0 => Ok(port),
            _ => Err(ApiError::BadRequest(format!(
                "invalid port {port:?} in \"ports\": ports must be between 1 and 65535"
            ))),
        })
        .collect()
}

/// Runs one port-forward session: announces every port's channels, dials
/// each port, and copies bytes both ways until the client closes or every
/// pod connection ended. A port that cannot be dialled gets its error on
/// its error channel, as the kubelet sends it.
async fn forward<S>(
    socket: WebSocketStream<S>,
    ports: Vec<u16>,
    dial: impl Fn(u16) -> BoxFuture<'static, io::Result<TcpStream>>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut sink, mut incoming) = socket.split();
    for (index, port) in ports.iter().enumerate() {
        for channel in [data_channel(index), data_channel(index) + 1] {
            let [low, high] = port.to_le_bytes();
            if sink
                .send(Message::binary(vec![channel, low, high]))
                .await
                .is_err()
            {
                return;
            }
        }
    }
    let (to_client, mut from_pods) = mpsc::channel::<Message>(16);
    let mut pumps = JoinSet::new();
    let mut writers: Vec<Option<OwnedWriteHalf>> = Vec::with_capacity(ports.len());
    for (index, &port) in ports.iter().enumerate() {
        match dial(port).await {
            Ok(connection) => {
                let (reader, writer) = connection.into_split();
                writers.push(Some(writer));
                pumps.spawn(pump_to_client(
                    reader,
                    data_channel(index),
                    to_client.clone(),
                ));
            }
            Err(error) => {
                writers.push(None);
                let message = format!(
                    "an error occurred forwarding {port} -> {port}: error forwarding port {port} to pod: dial tcp4 127.0.0.1:{port}: {error}"
                );
                let mut frame = vec![data_channel(index) + 1];
                frame.extend_from_slice(message.as_bytes());
                if sink.send(Message::binary(frame)).await.is_err() {
                    return;
                }
            }
        }
    }
    drop(to_client);
    loop {
        tokio::select! {
            frame = from_pods.recv() => match frame {
                Some(frame) => if sink.send(frame).await.is_err() { return },
                // Every pod connection ended (or none could be dialled).
                None => break,
            },
            message = incoming.next() => match message {
                Some(Ok(Message::Binary(bytes))) if bytes.len() > 1 => {
                    let channel = usize::from(bytes[0]);
                    let Some(writer) = writers.get_mut(channel / 2).filter(|_| channel % 2 == 0) else {
                        tracing::debug!(channel, "fake API server: port-forward frame on an unknown channel");
                        break;
                    };
                    if let Some(connection) = writer
                        && connection.write_all(&bytes[1..]).await.is_err()
                    {
                        *writer = None;
                    }
                }
                Some(Ok(Message::Close(_)) | Err(_)) | None => break,
                Some(Ok(_)) => {}
            },
        }
    }
    for writer in writers.iter_mut().flatten() {
        let _ = writer.shutdown().await;
    }
    // The closing handshake: our Close (or the reply to the client's, which
    // tungstenite queued), then the client's answer, briefly.
    let _ = sink.send(Message::Close(None)).await;
    let _ = sink.close().await;
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        while let Some(Ok(message)) = incoming.next().await {
            if message.is_close() {
                break;
            }
        }
    })
    .await;
}

fn data_channel(index: usize) -> u8 {
    u8::try_from(2 * index).expect("parse_ports allows at most MAX_PORTS ports")
}

async fn pump_to_client(
    mut reader: tokio::net::tcp::OwnedReadHalf,
    channel: u8,
    to_client: mpsc::Sender<Message>,
) {
    let mut buffer = vec![0; FRAME_BYTES + 1];
    buffer[0] = channel;
    loop {
        match reader.read(&mut buffer[1..]).await {
            Ok(0) | Err(_) => return,
            Ok(read) => {
                let frame = Bytes::copy_from_slice(&buffer[..=read]);
                if to_client.send(Message::Binary(frame)).await.is_err() {
                    return;
                }
            }
        }
    }
}
