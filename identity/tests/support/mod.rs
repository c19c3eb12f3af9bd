//! Shared fixtures: a generated PKI, a cluster file with token files, a real
//! identity service on loopback, gRPC clients and certificate checks.
#![allow(dead_code)] // each test binary uses a different subset

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use rustls_pki_types::CertificateDer;
use sealmesh_common::{
    cluster::{ClusterFile, Namespace, Node, Pod, ServiceAccount},
    identity::{Identity, TrustDomain},
};
use sealmesh_identity::{
    IdentityConfig, ServerBuilder, client,
    config::{LocalSources, Mode},
    rotation::IssuerEvents,
};
pub use sealmesh_pki::test_support::*;
use sealmesh_pki::{CertInfo, GeneratedCa, Layout};
use sealmesh_proto::{identity as pb, linkerd_identity as linkerd};
use tokio::sync::{mpsc, oneshot};
use tonic::transport::Channel;

pub const NAMESPACE: &str = "emojivoto";

pub fn identity(sa: &str) -> Identity {
    TrustDomain::default().identity(NAMESPACE, sa).unwrap()
}

/// A cluster: node-0 runs web-0 (sa web); node-1 runs emoji-0 (sa emoji).
/// Both nodes and the web ServiceAccount have token files.
pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub cluster_file: PathBuf,
    pub anchors_file: PathBuf,
    pub issuer_dir: PathBuf,
    pub root: GeneratedCa,
    pub issuer: GeneratedCa,
    pub file: ClusterFile,
}

pub const NODE0_TOKEN: &str = "node-0-secret-token";
pub const NODE1_TOKEN: &str = "node-1-secret-token";
pub const WEB_TOKEN: &str = "web-sa-secret-token";

impl TestCluster {
    pub fn new() -> Self {
        let root = new_root();
        let issuer = new_issuer(&root, "issuer-1.test", 30 * DAY);
        Self::with(root, issuer, Layout::Pem)
    }

    pub fn with(root: GeneratedCa, issuer: GeneratedCa, layout: Layout) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = |name: &str| dir.path().join(name);
        let anchors_file = path("ca-bundle.crt");
        std::fs::write(&anchors_file, &root.cert_pem).unwrap();
        let issuer_dir = path("issuer");
        issuer.write_dir(&issuer_dir, layout, false).unwrap();
        for (name, token) in [
            ("node-0.token", NODE0_TOKEN),
            ("node-1.token", NODE1_TOKEN),
            ("web.token", WEB_TOKEN),
        ] {
            // A trailing newline, as `echo` writes it, must not matter.
            std::fs::write(path(name), format!("{token}\n")).unwrap();
        }

        let mut file = ClusterFile::new("tb-identity-test");
        for (i, name) in ["node-0", "node-1"].into_iter().enumerate() {
            file.nodes.push(Node {
                name: name.into(),
                ip: format!("172.18.0.{}", i + 2).parse().unwrap(),
                pod_cidr: format!("10.244.{i}.0/24").parse().unwrap(),
                cgroup: format!("/sys/fs/cgroup/sealmesh-test/{name}").into(),
                token_file: Some(path(&format!("{name}.token"))),
                netns: None,
            });
        }
        file.namespaces.push(Namespace {
            name: NAMESPACE.into(),
            labels: [("sealmesh.io/mesh".into(), "enabled".into())].into(),
            annotations: Default::default(),
        });
        file.service_accounts.push(ServiceAccount {
            name: "web".into(),
            namespace: NAMESPACE.into(),
            token_file: Some(path("web.token")),
        });
        file.pods.push(pod("web-0", "web", "node-0", "10.244.0.2"));
        file.pods
            .push(pod("emoji-0", "emoji", "node-1", "10.244.1.2"));
        let cluster_file = path("cluster.yaml");
        file.save(&cluster_file).unwrap();
        Self {
            cluster_file,
            anchors_file,
            issuer_dir,
            root,
            issuer,
            file,
            dir,
        }
    }

    pub fn config(&self) -> IdentityConfig {
        let mut config = IdentityConfig::new(
            self.cluster_file.clone(),
            self.anchors_file.clone(),
            self.issuer_dir.clone(),
        );
        config.listen = "127.0.0.1:0".parse().unwrap();
        config.metrics_listen = "127.0.0.1:0".parse().unwrap();
        local_sources(&mut config).issuer_poll_interval = Duration::from_secs(1);
        config
    }

    /// Saves a changed cluster description (atomically, as the testbed does).
    pub fn save(&self) {
        self.file.save(&self.cluster_file).unwrap();
    }

    pub fn anchors(&self) -> Vec<CertificateDer<'static>> {
        pem_certs(&self.root.cert_pem)
    }
}

/// The file sources of a local-mode config.
pub fn local_sources(config: &mut IdentityConfig) -> &mut LocalSources {
    match &mut config.mode {
        Mode::Local(local) => local,
        Mode::Kubernetes(_) => panic!("a local-mode config"),
    }
}

pub fn pod(name: &str, sa: &str, node: &str, ip: &str) -> Pod {
    Pod {
        name: name.into(),
        namespace: NAMESPACE.into(),
        service_account: sa.into(),
        ip: ip.parse().unwrap(),
        node: node.into(),
        cgroup: format!("/sys/fs/cgroup/sealmesh-test/{node}/{name}").into(),
        labels: Default::default(),
        annotations: Default::default(),
        netns: None,
    }
}

/// Issuer events as the test sees them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Updated(CertInfo),
    Skipped(String),
}

pub struct RecordingEvents(Mutex<mpsc::UnboundedSender<Event>>);

impl IssuerEvents for RecordingEvents {
    fn issuer_updated(&self, issuer: &CertInfo) {
        let _ = self.0.lock().unwrap().send(Event::Updated(issuer.clone()));
    }

    fn issuer_update_skipped(&self, reason: &str) {
        let _ = self
            .0
            .lock()
            .unwrap()
            .send(Event::Skipped(reason.to_owned()));
    }
}

/// A gRPC channel to the identity service at `addr` over TLS, as agents
/// connect: the server must chain to `anchors` and be the identity service
/// of the default trust domain.
pub fn tls_channel(addr: SocketAddr, anchors: &[CertificateDer<'static>]) -> Channel {
    client::channel_with_anchors(
        addr,
        anchors,
        &TrustDomain::default(),
        Duration::from_secs(10),
    )
    .unwrap()
}

/// A running identity service; stops when dropped.
pub struct Running {
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    /// The anchors of its config, which clients verify it with.
    pub anchors: Vec<CertificateDer<'static>>,
    pub events: mpsc::UnboundedReceiver<Event>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), sealmesh_identity::ServeError>>>,
}

impl Running {
    pub async fn start(config: IdentityConfig) -> Self {
        let anchors = match &config.mode {
            Mode::Local(local) => {
                pem_certs(&std::fs::read_to_string(&local.trust_anchors).unwrap())
            }
            Mode::Kubernetes(_) => panic!("a local-mode config"),
        };
        let (events_tx, events) = mpsc::unbounded_channel();
        let server = ServerBuilder::new(config)
            .issuer_events(Arc::new(RecordingEvents(Mutex::new(events_tx))))
            .bind()
            .await
            .expect("identity service starts");
        let (stop, stopped) = oneshot::channel();
        let addr = server.grpc_addr();
        let metrics_addr = server.metrics_addr();
        let task = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            metrics_addr,
            anchors,
            events,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// A Certify client over TLS, verifying the service as agents do.
    pub async fn client(&self) -> pb::identity_client::IdentityClient<Channel> {
        pb::identity_client::IdentityClient::new(tls_channel(self.addr, &self.anchors))
    }

    pub async fn linkerd_client(&self) -> linkerd::identity_client::IdentityClient<Channel> {
        linkerd::identity_client::IdentityClient::new(tls_channel(self.addr, &self.anchors))
    }

    pub async fn next_event(&mut self) -> Event {
        tokio::time::timeout(Duration::from_secs(15), self.events.recv())
            .await
            .expect("an issuer event within 15s")
            .expect("event channel open")
    }

    /// Stops the service and waits until it has shut down cleanly.
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let task = self.task.take().unwrap();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("stops within 10s")
            .unwrap()
            .expect("serves without error");
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

pub fn request(identity: &Identity, token: &str, csr: Vec<u8>) -> pb::CertifyRequest {
    pb::CertifyRequest {
        identity: identity.dns_name(),
        token: token.as_bytes().to_vec(),
        certificate_signing_request: csr,
    }
}

/// Asserts that `response` holds a leaf for `identity` whose chain leads to
/// `anchors`, as mTLS peers verify it.
pub fn assert_issued_for(
    response: &pb::CertifyResponse,
    anchors: &[CertificateDer<'static>],
    identity: &Identity,
) {
    verify_chain(
        &response.leaf_certificate,
        &response.intermediate_certificates,
        anchors,
        identity,
    )
    .unwrap_or_else(|e| panic!("the leaf for {identity} does not verify: {e}"));
}

/// GETs `path` from the metrics endpoint; returns (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response.split_once("\r\n\r\n").unwrap().1.to_owned();
    (status, body)
}

pub fn write_file(path: &Path, content: &str) {
    std::fs::write(path, content).unwrap();
}
