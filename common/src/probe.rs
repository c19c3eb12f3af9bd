//! The plain-HTTP endpoint both the agent and the identity service serve
//! metrics and probes on: one GET-only HTTP/1 server loop; each binary
//! supplies its routes.

use std::{convert::Infallible, future::Future, net::SocketAddr, sync::Arc, time::Duration};

use http::{Method, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// Content type of Prometheus' OpenMetrics text exposition.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// One answer of a route.
#[derive(Debug, PartialEq, Eq)]
pub struct Reply {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: String,
}

impl Reply {
    pub fn text(status: StatusCode, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain",
            body: body.into(),
        }
    }

    pub fn openmetrics(body: String) -> Self {
        Self {
            status: StatusCode::OK,
            content_type: OPENMETRICS_CONTENT_TYPE,
            body,
        }
    }
}

/// Maps a request path to its reply.
pub type Routes = Arc<dyn Fn(&str) -> Reply + Send + Sync>;

/// Decides from a connection's peer and local addresses whether it is served;
/// refused connections are closed at once.
pub type Admission = Arc<dyn Fn(SocketAddr, SocketAddr) -> bool + Send + Sync>;

/// Serves GET requests on `listener` with `routes` until `shutdown` resolves;
/// other methods get 405.
pub async fn serve(listener: TcpListener, routes: Routes, shutdown: impl Future<Output = ()>) {
    serve_admitting(listener, routes, Arc::new(|_, _| true), shutdown).await;
}

/// [`serve`], for the connections `admit` accepts.
pub async fn serve_admitting(
    listener: TcpListener,
    routes: Routes,
    admit: Admission,
    shutdown: impl Future<Output = ()>,
) {
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let local = stream.local_addr().unwrap_or(peer);
                    if !admit(peer, local) {
                        continue;
                    }
                    stream
                }
                Err(error) => {
                    // Usually EMFILE: back off instead of spinning.
                    tracing::warn!(%error, "metrics endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let routes = routes.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: http::Request<_>| {
                let reply = if request.method() == Method::GET {
                    routes(request.uri().path())
                } else {
                    Reply::text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n")
                };
                let response = Response::builder()
                    .status(reply.status)
                    .header(header::CONTENT_TYPE, reply.content_type)
                    .body(Full::new(Bytes::from(reply.body)))
                    .expect("status and content type are valid");
                async move { Ok::<_, Infallible>(response) }
            });
            if let Err(error) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%error, "metrics endpoint: connection ended with an error");
            }
        });
    }
}
