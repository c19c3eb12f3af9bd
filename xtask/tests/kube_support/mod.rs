//! Shared by the kube_* test suites: the fake API server behind TLS, reached
//! only through a kubeconfig, the way a real kube-apiserver is.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use fake_apiserver::FakeApiServer;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::json;

/// The fake server behind a TLS front on 127.0.0.1 whose certificate names
/// only `localhost`, with an admin kubeconfig for `https://localhost:<port>`.
/// Everything stops on drop.
pub struct HttpsFakeServer {
    pub kubeconfig: PathBuf,
    pub server: FakeApiServer,
    _dir: tempfile::TempDir,
    // Last: the server and the front run on it.
    _runtime: tokio::runtime::Runtime,
}

impl HttpsFakeServer {
    pub fn start() -> Self {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let server = runtime.block_on(FakeApiServer::start()).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let port = runtime.block_on(tls_front(
            server.addr(),
            cert.der().clone(),
            PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        ));
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("ca.crt");
        std::fs::write(&ca_file, cert.pem()).unwrap();
        let kubeconfig = dir.path().join("admin.kubeconfig");
        write_kubeconfig(&kubeconfig, port, &ca_file, &server.admin_token());
        Self {
            kubeconfig,
            server,
            _dir: dir,
            _runtime: runtime,
        }
    }
}

fn write_kubeconfig(path: &Path, port: u16, ca_file: &Path, token: &str) {
    let config = json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{ "name": "real", "cluster": {
            "server": format!("https://localhost:{port}"),
            "certificate-authority": ca_file,
        } }],
        "users": [{ "name": "admin", "user": { "token": token } }],
        "contexts": [{ "name": "real", "context": { "cluster": "real", "user": "admin" } }],
        "current-context": "real",
    });
    std::fs::write(path, serde_json::to_string(&config).unwrap()).unwrap();
}

/// Terminates TLS on 127.0.0.1 and relays to `upstream`; returns the port.
async fn tls_front(
    upstream: SocketAddr,
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
) -> u16 {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut server).await;
            });
        }
    });
    port
}
