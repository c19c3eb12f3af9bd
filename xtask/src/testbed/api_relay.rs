//! A TCP relay from the testbed's underlay to an API server on the host.
//!
//! API servers (the in-process fake one, or a real kube-apiserver) listen in
//! the host's network namespace, which agents (node namespaces) and the
//! identity service (underlay) cannot reach: no testbed namespace has a
//! default route. The relay's listener is created by a thread that entered
//! the underlay namespace — a socket keeps the namespace it was created in —
//! while the runtime that accepts on it and dials the API server runs on host
//! threads, so outgoing connections leave from the host namespace. Bytes are
//! copied unchanged (TLS stays end to end between component and API server).

use std::net::SocketAddr;

use tokio::{
    net::{TcpListener, TcpStream},
    runtime::Handle,
    task::{JoinHandle, JoinSet},
};

use super::{TestbedError, netns};

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Netns(#[from] TestbedError),
    #[error(
        "cannot listen on {listen} in network namespace {netns} for the API relay: {source} (is another relay of this testbed running?)"
    )]
    Listen {
        listen: SocketAddr,
        netns: String,
        source: std::io::Error,
    },
}

/// A running relay; dropping it stops accepting and cuts every relayed
/// connection.
#[derive(Debug)]
pub struct ApiRelay {
    listen: SocketAddr,
    upstream: SocketAddr,
    accept_loop: JoinHandle<()>,
}

impl ApiRelay {
    /// Listens on `listen` inside network namespace `netns` and relays every
    /// connection to `upstream`, dialled from the namespace of `runtime`'s
    /// threads (the host). `runtime` must outlive the relay.
    pub fn start(
        runtime: &Handle,
        netns: &str,
        listen: SocketAddr,
        upstream: SocketAddr,
    ) -> Result<Self, RelayError> {
        let listen_error = |source| RelayError::Listen {
            listen,
            netns: netns.to_owned(),
            source,
        };
        let std_listener = netns::run_in_netns(netns, || {
            let listener = std::net::TcpListener::bind(listen)?;
            listener.set_nonblocking(true)?;
            Ok(listener)
        })?
        .map_err(listen_error)?;
        let listener = {
            let _runtime = runtime.enter();
            TcpListener::from_std(std_listener).map_err(listen_error)?
        };
        let accept_loop = runtime.spawn(accept_loop(listener, upstream));
        tracing::debug!(%listen, %netns, %upstream, "API relay listening");
        Ok(Self {
            listen,
            upstream,
            accept_loop,
        })
    }

    /// Where components connect (in the underlay).
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    /// The API server connections are relayed to (on the host).
    pub fn upstream_addr(&self) -> SocketAddr {
        self.upstream
    }
}

impl Drop for ApiRelay {
    fn drop(&mut self) {
        // Aborting the loop drops its JoinSet, which aborts every connection.
        self.accept_loop.abort();
    }
}

async fn accept_loop(listener: TcpListener, upstream: SocketAddr) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, peer)) => {
                    connections.spawn(relay(client, peer, upstream));
                }
                Err(e) => {
                    // Transient (e.g. EMFILE): keep serving the others.
                    tracing::warn!(error = %e, "API relay: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            // Reap finished connections so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn relay(mut client: TcpStream, peer: SocketAddr, upstream: SocketAddr) {
    let mut server = match TcpStream::connect(upstream).await {
        Ok(server) => server,
        Err(e) => {
            tracing::warn!(%peer, %upstream, error = %e, "API relay: cannot reach the API server");
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut server).await {
        tracing::debug!(%peer, error = %e, "API relay: connection ended with an error");
    }
}
