//! The TLS engine end to end over real loopback TCP and real mTLS: two
//! engines, "node A" and "node B", each on its own loopback address, with
//! certificates from a test CA built like the identity service's (root →
//! issuer → leaf with the SPIFFE URI and DNS SANs). The redirect table is a
//! test seam: the test records what eBPF would have recorded for each client
//! socket before it connects (the kernel path is tested on the testbed).
//!
//! Every test uses its own 127.77.<n>.0/24 addresses so tests run in parallel
//! on the well-known ports.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use http::{Method, Request, StatusCode};
use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::{HandshakeKind, server::ResolvesServerCertUsingSni, sign::CertifiedKey};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sealmesh_agent::{
    certs::NoCertificate,
    config::{Policy, ServiceName},
    ebpf::{Redirect, RedirectSource, RedirectTable},
    proxy::{
        ConnectionEvent, Direction, NoTlsReason, Phase, Proxy, ProxyConfig, ProxyHandle,
        RefusalReason, TlsCredentials,
    },
    registry::{Endpoint, NodeInfo, Workload, WorkloadRegistry},
    tls::{self, HboneTrust, PeerRole, TlsError},
};
use sealmesh_common::{
    consts::{HBONE_PORT, OUTBOUND_PORT},
    identity::{Identity, TrustDomain},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream},
    sync::{broadcast, oneshot, watch},
};
use tokio_rustls::TlsConnector;

const NAMESPACE: &str = "app";
const EVENT_WAIT: Duration = Duration::from_secs(10);
const DRAIN_TIMEOUT: Duration = Duration::from_millis(500);

// ---------------------------------------------------------------- PKI

/// A CA like the identity service's: a root and an issuer below it.
struct TestCa {
    root_pem: String,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    fn new(name: &str) -> Self {
        let root_key = KeyPair::generate().unwrap();
        let root =
            CertifiedIssuer::self_signed(ca_params(&format!("{name} root")), root_key).unwrap();
        let issuer_key = KeyPair::generate().unwrap();
        let issuer =
            CertifiedIssuer::signed_by(ca_params(&format!("{name} issuer")), issuer_key, &root)
                .unwrap();
        Self {
            root_pem: root.pem(),
            issuer,
        }
    }

    fn anchors(&self) -> HboneTrust {
        HboneTrust::from_pem(self.root_pem.as_bytes(), &TrustDomain::default()).unwrap()
    }

    /// Leaf + issuer chain and key for `id`, with the identity service's profile.
    fn leaf(&self, id: &Identity) -> CertifiedKey {
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![
            SanType::URI(id.spiffe_uri().try_into().unwrap()),
            SanType::DnsName(id.dns_name().try_into().unwrap()),
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().unwrap();
        let leaf = params.signed_by(&key, &self.issuer).unwrap();
        let chain = vec![leaf.der().clone(), self.issuer.der().clone()];
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        CertifiedKey::from_der(chain, key_der, &tls::crypto_provider()).unwrap()
    }
}

fn ca_params(common_name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

/// Certificates of one node's identities (what the cert store would hold):
/// like the cert store, one client config per identity for as long as its
/// certificate lasts, so TLS sessions can be resumed across connections.
/// Live connections' peers are checked again against `anchors` whenever
/// [`TestCredentials::replace_anchors`] swaps them.
struct TestCredentials {
    clients: HashMap<Identity, Arc<rustls::ClientConfig>>,
    server: Arc<rustls::ServerConfig>,
    anchors: Mutex<Arc<HboneTrust>>,
    anchor_changes: watch::Sender<u64>,
}

impl TestCredentials {
    fn new(ca: &TestCa, identities: &[&Identity]) -> Arc<Self> {
        let anchors = ca.anchors();
        let mut resolver = ResolvesServerCertUsingSni::new();
        let mut clients = HashMap::new();
        for id in identities {
            let key = ca.leaf(id);
            resolver.add(&id.dns_name(), key.clone()).unwrap();
            let client = anchors.client_config(Arc::new(key)).unwrap();
            clients.insert((*id).clone(), Arc::new(client));
        }
        let server = Arc::new(anchors.server_config(Arc::new(resolver)).unwrap());
        Arc::new(Self {
            clients,
            server,
            anchors: Mutex::new(Arc::new(anchors)),
            anchor_changes: watch::Sender::new(0),
        })
    }

    /// What an anchor rotation does to the cert store: new anchors, and
    /// every live connection told to check its peer.
    fn replace_anchors(&self, bundle_pem: &str) {
        *self.anchors.lock().unwrap() =
            Arc::new(HboneTrust::from_pem(bundle_pem.as_bytes(), &TrustDomain::default()).unwrap());
        self.anchor_changes.send_modify(|epoch| *epoch += 1);
    }
}

impl TlsCredentials for TestCredentials {
    fn client_config(&self, source: &Identity) -> Result<Arc<rustls::ClientConfig>, NoCertificate> {
        self.clients
            .get(source)
            .cloned()
            .ok_or_else(|| NoCertificate {
                identity: source.clone(),
                reason: "never issued in this test".into(),
            })
    }

    fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.server.clone()
    }

    fn has_valid_cert(&self, id: &Identity) -> bool {
        self.clients.contains_key(id)
    }

    fn not_after(&self, _id: &Identity) -> Option<SystemTime> {
        // Test leaves outlive the tests; peers' certificates still count.
        None
    }

    fn anchor_changes(&self) -> watch::Receiver<u64> {
        self.anchor_changes.subscribe()
    }

    fn verify_peer_chain(
        &self,
        chain: &[CertificateDer<'static>],
        role: &PeerRole,
    ) -> Result<(), TlsError> {
        let anchors = self.anchors.lock().unwrap().clone();
        anchors.verify_peer_chain(chain, role)
    }
}

// ---------------------------------------------------------------- registry and redirects

struct TestRegistry {
    node: NodeInfo,
    trust_domain: TrustDomain,
    workloads: Mutex<Vec<Arc<Workload>>>,
    /// Service VIP:port -> (endpoint pod, target port).
    services: HashMap<SocketAddrV4, (Arc<Workload>, u16)>,
    /// Service VIP -> that Service's namespace/name.
    service_names: Mutex<HashMap<Ipv4Addr, ServiceName>>,
    version: watch::Sender<u64>,
}

impl WorkloadRegistry for TestRegistry {
    fn local_node(&self) -> &NodeInfo {
        &self.node
    }

    fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    fn by_cgroup(&self, cgroup_id: u64) -> Option<Arc<Workload>> {
        self.workloads
            .lock()
            .unwrap()
            .iter()
            .find(|w| w.node == self.node.name && w.cgroup_id == Some(cgroup_id))
            .cloned()
    }

    fn by_ip(&self, ip: Ipv4Addr) -> Option<Arc<Workload>> {
        self.workloads
            .lock()
            .unwrap()
            .iter()
            .find(|w| w.ip == Some(ip))
            .cloned()
    }

    fn resolve(&self, dst: SocketAddrV4) -> Option<Endpoint> {
        if let Some((workload, port)) = self.services.get(&dst) {
            return Some(Endpoint {
                addr: SocketAddrV4::new(workload.ip.unwrap(), *port),
                workload: workload.clone(),
            });
        }
        self.by_ip(*dst.ip()).map(|workload| Endpoint {
            workload,
            addr: dst,
        })
    }

    fn local_workloads(&self) -> Vec<Arc<Workload>> {
        self.workloads
            .lock()
            .unwrap()
            .iter()
            .filter(|w| w.node == self.node.name)
            .cloned()
            .collect()
    }

    fn in_cluster_network(&self, ip: Ipv4Addr) -> bool {
        // The test's pods and Services are 127.77.<n>.2-98; .99 is "outside".
        ip.octets()[3] != OUTSIDE_HOST
    }

    fn served_outside_pods(&self, _: SocketAddrV4) -> bool {
        false
    }

    fn pod_parent_cgroups(&self) -> Vec<u64> {
        Vec::new()
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    fn service_at(&self, ip: Ipv4Addr) -> Option<ServiceName> {
        self.service_names.lock().unwrap().get(&ip).cloned()
    }
}

impl TestRegistry {
    /// A pod appears (the API and its cgroup seen): subscribers are told.
    fn add(&self, workload: Arc<Workload>) {
        self.workloads.lock().unwrap().push(workload);
        self.version.send_modify(|v| *v += 1);
    }

    /// Makes `vip` the ClusterIP of the Service `namespace/name`.
    fn name_service(&self, vip: Ipv4Addr, service: &str) {
        self.service_names
            .lock()
            .unwrap()
            .insert(vip, service.parse().unwrap());
    }
}

/// Stands in for the eBPF sock_ops map: (client, listener) -> record, taken once.
#[derive(Default)]
struct TestRedirects(Mutex<HashMap<(SocketAddrV4, SocketAddrV4), Redirect>>);

impl RedirectTable for TestRedirects {
    fn take(&self, client: SocketAddrV4, listener: SocketAddrV4) -> Option<Redirect> {
        self.0.lock().unwrap().remove(&(client, listener))
    }
}

// ---------------------------------------------------------------- the cluster

/// Pods of the test cluster; `n` picks the test's own 127.77.n.0/24.
struct Pods {
    /// Meshed, node A, has a certificate.
    client: Arc<Workload>,
    /// Meshed, node A, no certificate was ever issued.
    lonely: Arc<Workload>,
    /// Meshed, node A: same-node destination.
    local: Arc<Workload>,
    /// Meshed, node B: the usual destination.
    server: Arc<Workload>,
    /// Meshed, node B, another ServiceAccount.
    other: Arc<Workload>,
    /// Not meshed, node B.
    plain: Arc<Workload>,
}

const CLIENT_CGROUP: u64 = 1001;
const LONELY_CGROUP: u64 = 1002;
/// The cgroup of a pod node A's registry learns only during a test.
const NEWCOMER_CGROUP: u64 = 1009;
/// The host part of the test's one address outside the cluster's networks.
const OUTSIDE_HOST: u8 = 99;
/// How long the engines hold a connection of (or to) a pod they do not know.
const POD_RESOLVE_TIMEOUT: Duration = Duration::from_millis(1500);

fn ip(n: u8, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 77, n, host)
}

fn node_a(n: u8) -> NodeInfo {
    NodeInfo {
        name: "node-a".into(),
        ip: ip(n, 2),
    }
}

fn node_b(n: u8) -> NodeInfo {
    NodeInfo {
        name: "node-b".into(),
        ip: ip(n, 3),
    }
}

fn pod(
    name: &str,
    node: &NodeInfo,
    host_ip: Ipv4Addr,
    meshed: bool,
    cgroup: Option<u64>,
) -> Arc<Workload> {
    Arc::new(Workload {
        name: format!("{name}-0"),
        namespace: NAMESPACE.into(),
        service_account: name.into(),
        identity: TrustDomain::default().identity(NAMESPACE, name).unwrap(),
        ip: Some(host_ip),
        node: node.name.clone(),
        node_ip: node.ip,
        meshed,
        inbound_policy: Default::default(),
        cgroup_id: cgroup,
        authz: Default::default(),
    })
}

impl Pods {
    fn new(n: u8) -> Self {
        let (a, b) = (node_a(n), node_b(n));
        Self {
            client: pod("client", &a, ip(n, 10), true, Some(CLIENT_CGROUP)),
            lonely: pod("lonely", &a, ip(n, 11), true, Some(LONELY_CGROUP)),
            local: pod("local", &a, ip(n, 21), true, Some(1003)),
            server: pod("server", &b, ip(n, 20), true, None),
            other: pod("other", &b, ip(n, 22), true, None),
            plain: pod("plain", &b, ip(n, 30), false, None),
        }
    }

    fn all(&self) -> Vec<Arc<Workload>> {
        [
            &self.client,
            &self.lonely,
            &self.local,
            &self.server,
            &self.other,
            &self.plain,
        ]
        .into_iter()
        .cloned()
        .collect()
    }
}

/// The VIP of a Service in front of `server` (port 80 → `target_port`).
fn service_vip(n: u8) -> SocketAddrV4 {
    SocketAddrV4::new(ip(n, 100), 80)
}

/// One running engine and what the test needs to drive it.
struct Node {
    handle: ProxyHandle,
    registry: Arc<TestRegistry>,
    events: broadcast::Receiver<Arc<ConnectionEvent>>,
    outbound: SocketAddrV4,
    redirects: Arc<TestRedirects>,
    stop: oneshot::Sender<()>,
    running: tokio::task::JoinHandle<()>,
}

impl Node {
    /// Asks the engine to shut down and waits until it has.
    async fn shut_down(self) {
        self.stop.send(()).unwrap();
        self.running.await.unwrap();
    }
}

struct Cluster {
    n: u8,
    pods: Pods,
    ca: TestCa,
    services: HashMap<SocketAddrV4, (Arc<Workload>, u16)>,
    creds_a: Arc<TestCredentials>,
    creds_b: Arc<TestCredentials>,
    a: Node,
    b: Node,
}

impl Cluster {
    async fn start(n: u8, policy_a: Policy, service_target_port: u16) -> Self {
        let pods = Pods::new(n);
        let ca = TestCa::new("sealmesh test");
        let creds_a = TestCredentials::new(&ca, &[&pods.client.identity, &pods.local.identity]);
        let creds_b = TestCredentials::new(&ca, &[&pods.server.identity, &pods.other.identity]);
        let services =
            HashMap::from([(service_vip(n), (pods.server.clone(), service_target_port))]);
        let a = start_node(
            node_a(n),
            &pods,
            services.clone(),
            creds_a.clone(),
            policy_a,
        )
        .await;
        let b = start_node(
            node_b(n),
            &pods,
            services.clone(),
            creds_b.clone(),
            Policy::default(),
        )
        .await;
        Self {
            n,
            pods,
            ca,
            services,
            creds_a,
            creds_b,
            a,
            b,
        }
    }

    /// An unmeshed pod `legacy` on node A, known to its registry only now.
    fn add_unmeshed_newcomer(&self) -> Arc<Workload> {
        let legacy = pod(
            "legacy",
            &node_a(self.n),
            ip(self.n, 13),
            false,
            Some(NEWCOMER_CGROUP),
        );
        self.a.registry.add(legacy.clone());
        legacy
    }

    /// Shuts node A's engine down and starts a fresh one (an empty HBONE
    /// pool) with the same credentials, as a long-running agent keeps them.
    async fn restart_a(mut self, policy_a: Policy) -> Self {
        self.a.shut_down().await;
        self.a = start_node(
            node_a(self.n),
            &self.pods,
            self.services.clone(),
            self.creds_a.clone(),
            policy_a,
        )
        .await;
        self
    }

    /// Shuts node B's engine down (draining, then cutting its connections)
    /// and starts a fresh one in its place.
    async fn restart_b(mut self) -> Self {
        self.b.shut_down().await;
        self.creds_b = TestCredentials::new(
            &self.ca,
            &[&self.pods.server.identity, &self.pods.other.identity],
        );
        self.b = start_node(
            node_b(self.n),
            &self.pods,
            self.services.clone(),
            self.creds_b.clone(),
            Policy::default(),
        )
        .await;
        self
    }

    /// Connects from `source` to `original_dst` as if eBPF had redirected
    /// the socket to node A's outbound listener.
    async fn connect_as(&self, source: &Workload, original_dst: SocketAddrV4) -> TcpStream {
        self.connect_from(
            source.ip.unwrap(),
            source.cgroup_id.unwrap(),
            RedirectSource::MeshedPod,
            original_dst,
        )
        .await
    }

    /// Like [`Cluster::connect_as`] for a pod the kernel did not know (in
    /// none of the agent's cgroup maps): `cgroup` at `ip`.
    async fn connect_as_unknown(
        &self,
        ip: Ipv4Addr,
        cgroup: u64,
        original_dst: SocketAddrV4,
    ) -> TcpStream {
        self.connect_from(ip, cgroup, RedirectSource::UnknownPod, original_dst)
            .await
    }

    async fn connect_from(
        &self,
        ip: Ipv4Addr,
        source_cgroup: u64,
        source: RedirectSource,
        original_dst: SocketAddrV4,
    ) -> TcpStream {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from((ip, 0))).unwrap();
        let SocketAddr::V4(client) = socket.local_addr().unwrap() else {
            unreachable!()
        };
        self.a.redirects.0.lock().unwrap().insert(
            (client, self.a.outbound),
            Redirect {
                original_dst,
                source_cgroup,
                source,
            },
        );
        socket.connect(self.a.outbound.into()).await.unwrap()
    }
}

async fn start_node(
    node: NodeInfo,
    pods: &Pods,
    services: HashMap<SocketAddrV4, (Arc<Workload>, u16)>,
    credentials: Arc<TestCredentials>,
    policy: Policy,
) -> Node {
    let mut cfg = ProxyConfig::for_node(node.ip, policy);
    cfg.connect_timeout = Duration::from_secs(2);
    cfg.drain_timeout = DRAIN_TIMEOUT;
    cfg.pod_resolve_timeout = POD_RESOLVE_TIMEOUT;
    let registry = Arc::new(TestRegistry {
        node,
        trust_domain: TrustDomain::default(),
        workloads: Mutex::new(pods.all()),
        services,
        service_names: Mutex::default(),
        version: watch::Sender::new(0),
    });
    let redirects = Arc::new(TestRedirects::default());
    let proxy = Proxy::bind(cfg, registry.clone(), redirects.clone(), credentials)
        .await
        .unwrap();
    let SocketAddr::V4(outbound) = proxy.outbound_addr() else {
        unreachable!()
    };
    assert_eq!(outbound.port(), OUTBOUND_PORT);
    assert_eq!(proxy.inbound_addr().port(), HBONE_PORT);
    let handle = proxy.handle();
    let events = handle.subscribe();
    let (stop, stopped) = oneshot::channel::<()>();
    let running = tokio::spawn(proxy.run(async move {
        let _ = stopped.await;
    }));
    Node {
        handle,
        registry,
        events,
        outbound,
        redirects,
        stop,
        running,
    }
}

// ---------------------------------------------------------------- servers and helpers

/// Echoes every connection until the client's FIN, then closes its side.
async fn echo_server(addr: Ipv4Addr) -> SocketAddrV4 {
    let listener = TcpListener::bind((addr, 0)).await.unwrap();
    let SocketAddr::V4(bound) = listener.local_addr().unwrap() else {
        unreachable!()
    };
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut read, mut write) = socket.split();
                tokio::io::copy(&mut read, &mut write).await.unwrap();
                write.shutdown().await.unwrap();
            });
        }
    });
    bound
}

fn random_bytes(len: usize) -> Vec<u8> {
    let mut data = vec![0; len];
    rand::rng().fill_bytes(&mut data);
    data
}

/// Sends `payload`, half-closes, and returns everything read until EOF.
async fn round_trip(mut stream: TcpStream, payload: Vec<u8>) -> Vec<u8> {
    let (mut read, mut write) = stream.split();
    let send = async {
        write.write_all(&payload).await.unwrap();
        write.shutdown().await.unwrap();
    };
    let mut received = Vec::with_capacity(payload.len());
    let recv = read.read_to_end(&mut received);
    let ((), read_result) = tokio::join!(send, recv);
    read_result.unwrap();
    received
}

/// Asserts the peer closes the connection without sending anything.
async fn assert_closed_without_data(mut stream: TcpStream) {
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(EVENT_WAIT, stream.read(&mut buf))
        .await
        .expect("refused connection is closed promptly");
    match read {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!("refused connection delivered {n} bytes"),
    }
}

/// The next close event of `direction` on `node`.
async fn next_close(node: &mut Node, direction: Direction) -> ConnectionEvent {
    tokio::time::timeout(EVENT_WAIT, async {
        loop {
            let event = Arc::unwrap_or_clone(node.events.recv().await.unwrap());
            if event.phase == Phase::Close && event.direction == direction {
                return event;
            }
        }
    })
    .await
    .expect("a close event arrives")
}

/// The next `count` close events on `node`, in arrival order.
async fn next_closes(node: &mut Node, count: usize) -> Vec<ConnectionEvent> {
    tokio::time::timeout(EVENT_WAIT, async {
        let mut closes = Vec::new();
        while closes.len() < count {
            let event = Arc::unwrap_or_clone(node.events.recv().await.unwrap());
            if event.phase == Phase::Close {
                closes.push(event);
            }
        }
        closes
    })
    .await
    .expect("close events arrive")
}

/// A raw HBONE client (what a forged or confused peer would do): mTLS with
/// `client_key` asking for `sni`, then one CONNECT; returns the status.
async fn raw_connect(
    anchors: &HboneTrust,
    client_key: CertifiedKey,
    inbound: SocketAddrV4,
    sni: &Identity,
    method: Method,
    authority: &str,
) -> Result<StatusCode, String> {
    let config = anchors.client_config(Arc::new(client_key)).unwrap();
    let tcp = TcpStream::connect(inbound)
        .await
        .map_err(|e| e.to_string())?;
    let tls = TlsConnector::from(Arc::new(config))
        .connect(tls::server_name(sni), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let (send, connection) = h2::client::handshake(tls)
        .await
        .map_err(|e| format!("h2 handshake: {e}"))?;
    tokio::spawn(connection);
    let mut send = send.ready().await.map_err(|e| format!("h2 ready: {e}"))?;
    let uri = if method == Method::CONNECT {
        authority.to_owned()
    } else {
        format!("https://{authority}/")
    };
    let request = Request::builder().method(method).uri(uri).body(()).unwrap();
    let (response, _stream) = send
        .send_request(request, true)
        .map_err(|e| format!("send: {e}"))?;
    let response = tokio::time::timeout(EVENT_WAIT, response)
        .await
        .map_err(|_| "no response".to_owned())?
        .map_err(|e| format!("response: {e}"))?;
    Ok(response.status())
}

fn inbound_of(node: &NodeInfo) -> SocketAddrV4 {
    SocketAddrV4::new(node.ip, HBONE_PORT)
}

// ---------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_streams_arrive_byte_for_byte_over_one_pooled_connection() {
    let n = 1;
    let echo = echo_server(ip(n, 20)).await;
    let mut cluster = Cluster::start(n, Policy::default(), echo.port()).await;

    // One big transfer and many concurrent smaller ones, all to the same
    // (source, destination, node), so all share one HBONE connection.
    let mut sizes = vec![8 * 1024 * 1024];
    sizes.extend(std::iter::repeat_n(256 * 1024 + 17, 40));
    let mut transfers = Vec::new();
    for (i, size) in sizes.iter().enumerate() {
        // Half go to the pod directly, half through the Service VIP.
        let dst = if i % 2 == 0 { echo } else { service_vip(n) };
        let stream = cluster.connect_as(&cluster.pods.client, dst).await;
        let payload = random_bytes(*size);
        transfers.push(tokio::spawn(async move {
            let received = round_trip(stream, payload.clone()).await;
            assert!(
                received == payload,
                "{} bytes sent, {} received, content differs",
                payload.len(),
                received.len()
            );
        }));
    }
    for t in transfers {
        t.await.unwrap();
    }
    assert_eq!(
        cluster.a.handle.pooled_connections(),
        1,
        "all streams shared one pooled connection"
    );

    let total: u64 = sizes.iter().map(|s| *s as u64).sum();
    let (mut a_bytes, mut b_bytes) = (0, 0);
    for _ in &sizes {
        let out = next_close(&mut cluster.a, Direction::Outbound).await;
        assert!(out.tls, "{out:?}");
        assert_eq!(out.no_tls_reason, None);
        assert_eq!(out.error, None, "{out:?}");
        assert_eq!(out.bytes_src_to_dst, out.bytes_dst_to_src);
        assert_eq!(
            out.client_id.as_deref(),
            Some("spiffe://cluster.local/ns/app/sa/client")
        );
        assert_eq!(
            out.server_id.as_deref(),
            Some("spiffe://cluster.local/ns/app/sa/server")
        );
        assert_eq!(out.dst.as_ref().unwrap().name, "server-0");
        assert_eq!(
            out.dst_addr,
            Some(echo.into()),
            "the VIP resolved to the endpoint"
        );
        a_bytes += out.bytes_src_to_dst;

        let inbound = next_close(&mut cluster.b, Direction::Inbound).await;
        assert_eq!(inbound.error, None, "{inbound:?}");
        assert!(inbound.tls);
        // The receiving agent reports the sender's SPIFFE identity.
        assert_eq!(
            inbound.client_id.as_deref(),
            Some("spiffe://cluster.local/ns/app/sa/client")
        );
        assert_eq!(inbound.src.as_ref().unwrap().name, "client-0");
        assert_eq!(inbound.dst.as_ref().unwrap().name, "server-0");
        b_bytes += inbound.bytes_dst_to_src;
    }
    assert_eq!(a_bytes, total);
    assert_eq!(b_bytes, total);
}

#[tokio::test]
async fn half_close_works_both_ways() {
    let n = 2;
    let listener = TcpListener::bind((ip(n, 20), 0)).await.unwrap();
    let SocketAddr::V4(server_addr) = listener.local_addr().unwrap() else {
        unreachable!()
    };
    let cluster = Cluster::start(n, Policy::default(), server_addr.port()).await;

    // The server speaks first and closes its side while still listening.
    let (got_tx, got_rx) = oneshot::channel();
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        socket.write_all(b"greeting").await.unwrap();
        socket.shutdown().await.unwrap();
        let mut received = Vec::new();
        socket.read_to_end(&mut received).await.unwrap();
        got_tx.send(received).unwrap();
    });

    let mut stream = cluster.connect_as(&cluster.pods.client, server_addr).await;
    let mut greeting = Vec::new();
    stream.read_to_end(&mut greeting).await.unwrap();
    assert_eq!(
        greeting, b"greeting",
        "server FIN reaches the client as EOF"
    );
    // The client's direction still flows after the server's FIN.
    stream.write_all(b"late reply").await.unwrap();
    stream.shutdown().await.unwrap();
    let received = tokio::time::timeout(EVENT_WAIT, got_rx)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        received, b"late reply",
        "client FIN reaches the server as EOF"
    );
}

#[tokio::test]
async fn connection_without_redirect_record_is_refused() {
    let n = 3;
    let cluster = Cluster::start(n, Policy::default(), 9).await;
    let direct = TcpStream::connect(cluster.a.outbound).await.unwrap();
    assert_closed_without_data(direct).await;
    assert!(cluster.a.redirects.0.lock().unwrap().is_empty());
}

#[tokio::test]
async fn inbound_answers_each_refusal_with_its_status() {
    let n = 4;
    let mut cluster = Cluster::start(n, Policy::default(), 9).await;
    let b = inbound_of(&node_b(n));
    let anchors = cluster.ca.anchors();
    let client = &cluster.pods.client.identity;
    let server = &cluster.pods.server.identity;
    let other = &cluster.pods.other.identity;
    // Nothing listens on this port of the server pod's address.
    let closed_port = TcpListener::bind((ip(n, 20), 0))
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server_ip = ip(n, 20);
    let cases = [
        (
            server,
            Method::CONNECT,
            format!("{server_ip}:{closed_port}"),
            StatusCode::SERVICE_UNAVAILABLE,
            RefusalReason::TargetRefused,
        ),
        // SNI asks for "other" but the pod runs as "server".
        (
            other,
            Method::CONNECT,
            format!("{server_ip}:{closed_port}"),
            StatusCode::FORBIDDEN,
            RefusalReason::IdentityMismatch,
        ),
        // Not meshed, and not a pod at all.
        (
            server,
            Method::CONNECT,
            format!("{}:80", ip(n, 30)),
            StatusCode::NOT_FOUND,
            RefusalReason::NotLocalMeshedPod,
        ),
        (
            server,
            Method::CONNECT,
            format!("{}:80", ip(n, OUTSIDE_HOST)),
            StatusCode::NOT_FOUND,
            RefusalReason::NotLocalMeshedPod,
        ),
        // A meshed pod, but on node A.
        (
            server,
            Method::CONNECT,
            format!("{}:80", ip(n, 21)),
            StatusCode::NOT_FOUND,
            RefusalReason::NotLocalMeshedPod,
        ),
        (
            server,
            Method::CONNECT,
            "server.example:80".into(),
            StatusCode::BAD_REQUEST,
            RefusalReason::BadAuthority,
        ),
        (
            server,
            Method::GET,
            format!("{server_ip}:80"),
            StatusCode::METHOD_NOT_ALLOWED,
            RefusalReason::NotConnect,
        ),
    ];
    for (sni, method, authority, expected, reason) in cases {
        let status = raw_connect(
            &anchors,
            cluster.ca.leaf(client),
            b,
            sni,
            method.clone(),
            &authority,
        )
        .await
        .unwrap();
        assert_eq!(status, expected, "{method} {authority} asking for {sni}");
        let event = next_close(&mut cluster.b, Direction::Inbound).await;
        assert_eq!(
            event.refused_reason,
            Some(reason),
            "{method} {authority} asking for {sni}: {event:?}"
        );
        assert!(event.error.is_some(), "{event:?}");
    }
}

#[tokio::test]
async fn oversized_connect_headers_are_refused() {
    let n = 20;
    let echo = echo_server(ip(n, 33)).await;
    let cluster = Cluster::start(n, Policy::default(), echo.port()).await;
    let key = cluster.ca.leaf(&cluster.pods.client.identity);
    let config = cluster.ca.anchors().client_config(Arc::new(key)).unwrap();
    let tcp = TcpStream::connect(inbound_of(&node_b(n))).await.unwrap();
    let tls = TlsConnector::from(Arc::new(config))
        .connect(tls::server_name(&cluster.pods.server.identity), tcp)
        .await
        .unwrap();
    let (send, connection) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(connection);
    let mut send = send.ready().await.unwrap();
    let request = Request::builder()
        .method(Method::CONNECT)
        .uri(SocketAddrV4::new(cluster.pods.server.ip.unwrap(), echo.port()).to_string())
        .header("x-padding", "p".repeat(64 * 1024))
        .body(())
        .unwrap();
    let (response, _stream) = send.send_request(request, true).unwrap();
    let answer = tokio::time::timeout(EVENT_WAIT, response)
        .await
        .expect("the peer answers at once");
    match answer {
        Ok(response) => assert_eq!(
            response.status(),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        ),
        Err(error) => assert!(error.is_reset() || error.is_go_away(), "{error}"),
    }
}

#[tokio::test]
async fn sni_of_an_identity_the_node_does_not_serve_is_refused() {
    let n = 5;
    let cluster = Cluster::start(n, Policy::default(), 9).await;
    let anchors = cluster.ca.anchors();
    let client = &cluster.pods.client.identity;
    // Node B holds no certificate for "client": no handshake.
    let result = raw_connect(
        &anchors,
        cluster.ca.leaf(client),
        inbound_of(&node_b(n)),
        client,
        Method::CONNECT,
        &format!("{}:80", ip(n, 20)),
    )
    .await;
    assert!(
        result.as_ref().is_err_and(|e| e.starts_with("handshake")),
        "{result:?}"
    );
}

#[tokio::test]
async fn client_certificate_from_another_ca_is_refused() {
    let n = 6;
    let echo = echo_server(ip(n, 20)).await;
    let cluster = Cluster::start(n, Policy::default(), echo.port()).await;
    let forger = TestCa::new("forger");
    // The client trusts the real CA (so the server looks fine to it) but
    // presents a certificate for a real identity from its own CA.
    let result = raw_connect(
        &cluster.ca.anchors(),
        forger.leaf(&cluster.pods.client.identity),
        inbound_of(&node_b(n)),
        &cluster.pods.server.identity,
        Method::CONNECT,
        &echo.to_string(),
    )
    .await;
    assert!(result.is_err(), "forged client got {result:?}");
}

#[tokio::test]
async fn unmeshed_and_outside_destinations_are_plaintext_with_the_reason() {
    let n = 7;
    let plain = echo_server(ip(n, 30)).await;
    let outside = echo_server(ip(n, OUTSIDE_HOST)).await;
    let mut cluster = Cluster::start(n, Policy::default(), 9).await;

    for (dst, reason) in [
        (plain, NoTlsReason::NotMeshed),
        (outside, NoTlsReason::OutsideCluster),
    ] {
        let payload = random_bytes(100_000);
        let stream = cluster.connect_as(&cluster.pods.client, dst).await;
        assert_eq!(round_trip(stream, payload.clone()).await, payload);
        let event = next_close(&mut cluster.a, Direction::Outbound).await;
        assert!(!event.tls);
        assert_eq!(event.no_tls_reason, Some(reason));
        assert_eq!(event.error, None);
        assert_eq!(event.refused_reason, None, "carried, not refused");
        assert_eq!(
            (event.bytes_src_to_dst, event.bytes_dst_to_src),
            (100_000, 100_000)
        );
        assert_eq!(event.dst_addr, Some(dst.into()));
    }
    assert_eq!(
        cluster.a.handle.pooled_connections(),
        0,
        "no HBONE for plaintext"
    );
}

#[tokio::test]
async fn deny_plaintext_refuses_unmeshed_destinations() {
    let n = 8;
    let listener = TcpListener::bind((ip(n, 30), 0)).await.unwrap();
    let SocketAddr::V4(plain) = listener.local_addr().unwrap() else {
        unreachable!()
    };
    let deny = Policy {
        deny_plaintext: true,
        ..Policy::default()
    };
    let mut cluster = Cluster::start(n, deny, 9).await;
    let stream = cluster.connect_as(&cluster.pods.client, plain).await;
    assert_closed_without_data(stream).await;
    let event = next_close(&mut cluster.a, Direction::Outbound).await;
    assert_eq!(event.no_tls_reason, Some(NoTlsReason::NotMeshed));
    assert_eq!(event.refused_reason, Some(RefusalReason::PlaintextDenied));
    assert!(
        event.error.as_deref().unwrap().contains("--deny-plaintext"),
        "{event:?}"
    );
    let accepted = tokio::time::timeout(Duration::from_millis(200), listener.accept()).await;
    assert!(accepted.is_err(), "the unmeshed pod was never connected to");
}

/// The steps of an HBONE connection that can fail before its stream is
/// admitted each refuse with their own reason, never in plaintext.
#[tokio::test]
async fn hbone_failures_before_the_stream_opens_are_refused_with_their_reason() {
    let n = 30;
    let mut cluster = Cluster::start(n, Policy::default(), 9).await;
    // A meshed pod on a node whose agent does not listen.
    let gone = NodeInfo {
        name: "node-gone".into(),
        ip: ip(n, 4),
    };
    let orphan = pod("orphan", &gone, ip(n, 40), true, None);
    // A meshed pod on node B whose identity B holds no certificate for: B's
    // TLS server has nothing to answer its SNI with.
    let stranger = pod("stranger", &node_b(n), ip(n, 41), true, None);
    cluster.a.registry.add(orphan.clone());
    cluster.a.registry.add(stranger.clone());
    for (destination, reason, error) in [
        (
            &orphan,
            RefusalReason::PeerUnreachable,
            format!("cannot connect to the agent at {}:{HBONE_PORT}", ip(n, 4)),
        ),
        (
            &stranger,
            RefusalReason::PeerHandshakeFailed,
            format!(
                "mTLS handshake with the agent at {}",
                inbound_of(&node_b(n))
            ),
        ),
    ] {
        let target = SocketAddrV4::new(destination.ip.unwrap(), 8080);
        let stream = cluster.connect_as(&cluster.pods.client, target).await;
        assert_closed_without_data(stream).await;
        let event = next_close(&mut cluster.a, Direction::Outbound).await;
        assert_eq!(event.refused_reason, Some(reason), "{event:?}");
        assert_eq!(event.no_tls_reason, None, "never plaintext: {event:?}");
        assert!(
            event.error.as_deref().unwrap().starts_with(&error),
            "{error} in {event:?}"
        );
    }
}

#[tokio::test]
async fn source_without_certificate_fails_closed() {
    let n = 9;
    let listener = TcpListener::bind((ip(n, 20), 0)).await.unwrap();
    let SocketAddr::V4(server) = listener.local_addr().unwrap() else {
        unreachable!()
    };
    let mut cluster = Cluster::start(n, Policy::default(), server.port()).await;
    let stream = cluster.connect_as(&cluster.pods.lonely, server).await;
    assert_closed_without_data(stream).await;
    let event = next_close(&mut cluster.a, Direction::Outbound).await;
    assert!(!event.tls);
    assert_eq!(event.no_tls_reason, None, "never plaintext");
    assert_eq!(
        event.refused_reason,
        Some(RefusalReason::NoSourceCertificate)
    );
    let error = event.error.unwrap();
    assert!(
        error.starts_with(
            "no valid certificate for source identity spiffe://cluster.local/ns/app/sa/lonely"
        ),
        "{error}"
    );
    let accepted = tokio::time::timeout(Duration::from_millis(200), listener.accept()).await;
    assert!(accepted.is_err(), "nothing reached the destination");
    assert_eq!(cluster.a.handle.pooled_connections(), 0);
}

#[tokio::test]
async fn a_new_pods_connection_is_held_until_the_registry_knows_it_then_secured() {
    let n = 23;
    let echo = echo_server(ip(n, 20)).await;
    let mut cluster = Cluster::start(n, Policy::default(), echo.port()).await;
    // A second pod of the client's ServiceAccount starts; its first connect
    // comes before the agent learnt its cgroup.
    let newcomer = pod("client", &node_a(n), ip(n, 12), true, Some(NEWCOMER_CGROUP));
    let stream = cluster
        .connect_as_unknown(newcomer.ip.unwrap(), NEWCOMER_CGROUP, echo)
        .await;
    let payload = random_bytes(10_000);
    let exchange = tokio::spawn(round_trip(stream, payload.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!exchange.is_finished(), "held while the pod is unknown");
    cluster.a.registry.add(newcomer);
    assert_eq!(exchange.await.unwrap(), payload);
    let event = next_close(&mut cluster.a, Direction::Outbound).await;
    assert!(event.tls, "{event:?}");
    assert_eq!(event.error, None);
    assert!(event.duration_ms >= 300, "{event:?}");
    assert_eq!(event.src.unwrap().name, "client-0");
    let inbound = next_close(&mut cluster.b, Direction::Inbound).await;
    assert_eq!(
        inbound.client_id.as_deref(),
        Some("spiffe://cluster.local/ns/app/sa/client")
    );
}

#[tokio::test]
async fn a_new_unmeshed_pods_first_connection_goes_out_as_without_the_agent() {
    let n = 24;
    let echo = echo_server(ip(n, 20)).await;
    let mut cluster = Cluster::start(n, Policy::default(), echo.port()).await;
    let legacy = cluster.add_unmeshed_newcomer();
    let stream = cluster
        .connect_as_unknown(legacy.ip.unwrap(), NEWCOMER_CGROUP, echo)
        .await;
    let payload = random_bytes(1000);
    assert_eq!(round_trip(stream, payload.clone()).await, payload);
    let event = next_close(&mut cluster.a, Direction::Outbound).await;
    assert!(!event.tls);
    assert_eq!(event.no_tls_reason, Some(NoTlsReason::NotMeshed));
    assert_eq!(event.error, None);
    assert_eq!(event.src.unwrap().name, "legacy-0");
    assert_eq!(event.dst.unwrap().name, "server-0");
    assert_eq!(cluster.a.handle.pooled_connections(), 0, "no HBONE");
}

#[tokio::test]
async fn a_source_the_registry_never_learns_is_refused_after_the_timeout() {
    let n = 25;
    let listener = TcpListener::bind((ip(n, 20), 0)).await.unwrap();
    let SocketAddr::V4(server) = listener.local_addr().unwrap() else {
        unreachable!()
    };
    let mut cluster = Cluster::start(n, Policy::default(), server.port()).await;
    let started = std::time::Instant::now();
    let stream = cluster
        .connect_as_unknown(ip(n, 14), NEWCOMER_CGROUP, server)
        .await;
    assert_closed_without_data(stream).await;
    assert!(started.elapsed() >= POD_RESOLVE_TIMEOUT);
    let event = next_close(&mut cluster.a, Direction::Outbound).await;
    assert!(!event.tls);
    assert_eq!(event.no_tls_reason, None);
    assert_eq!(event.refused_reason, Some(RefusalReason::UnknownSource));
    assert!(
        event
            .error
            .as_deref()
            .unwrap()
            .starts_with(&format!("source cgroup {NEWCOMER_CGROUP} of a redirected connection is not a pod of this node the agent knows")),
        "{event:?}"
    );
    let accepted = tokio::time::timeout(Duration::from_millis(200), listener.accept()).await;
    assert!(accepted.is_err(), "nothing reached the destination");
}

#[tokio::test]
async fn a_destination_pod_the_registry_learns_after_the_dial_is_held_then_secured() {
    let n = 26;
    let echo = echo_server(ip(n, 40)).await;
    let mut cluster = Cluster::start(n, Policy::default(), 9).await;
    // A second server pod on node B: the client dials its address before
    // either agent has seen the pod.
    let server_1 = pod("server", &node_b(n), ip(n, 40), true, None);
    let stream = cluster.connect_as(&cluster.pods.client, echo).await;
    let payload = random_bytes(10_000);
    let exchange = tokio::spawn(round_trip(stream, payload.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !exchange.is_finished(),
        "held while the destination is unknown"
    );
    // The client's agent learns the pod first: node B's waits for it too.
    cluster.a.registry.add(server_1.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !exchange.is_finished(),
        "held at node B while it does not know the pod"
    );
    cluster.b.registry.add(server_1);
    assert_eq!(exchange.await.unwrap(), payload);
    let event = next_close(&mut cluster.a, Direction::Outbound).await;
    assert!(event.tls, "{event:?}");
    assert_eq!(event.error, None);
    assert_eq!(event.dst_addr, Some(echo.into()));
    assert!(event.duration_ms >= 600, "held: {} ms", event.duration_ms);
    let inbound = next_close(&mut cluster.b, Direction::Inbound).await;
    assert!(inbound.tls && inbound.error.is_none(), "{inbound:?}");
}

#[tokio::test]
async fn an_unknown_destination_in_the_cluster_is_refused_after_the_timeout() {
    let n = 27;
    let listener = TcpListener::bind((ip(n, 41), 0)).await.unwrap();
    let SocketAddr::V4(unknown) = listener.local_addr().unwrap() else {
        unreachable!()
    };
    let mut cluster = Cluster::start(n, Policy::default(), 9).await;
    let started = std::time::Instant::now();
    let stream = cluster.connect_as(&cluster.pods.client, unknown).await;
    assert_closed_without_data(stream).await;
    assert!(started.elapsed() >= POD_RESOLVE_TIMEOUT);
    let event = next_close(&mut cluster.a, Direction::Outbound).await;
    assert!(!event.tls);
    assert_eq!(event.no_tls_reason, None);
    assert_eq!(
        event.refused_reason,
        Some(RefusalReason::UnknownDestination)
    );
    assert!(
        event.error.as_deref().unwrap().starts_with(&format!(
            "{unknown} is in the cluster's pod or Service networks but no pod or Service endpoint the agent knows"
        )),
        "{event:?}"
    );
    let accepted = tokio::time::timeout(Duration::from_millis(200), listener.accept()).await;
    assert!(accepted.is_err(), "nothing was sent in plaintext");
}

#[tokio::test]
async fn same_node_is_secured_local_unless_mtls_is_forced() {
    for (n, force) in [(10, false), (11, true)] {
        let echo = echo_server(ip(n, 21)).await;
        let policy = Policy {
            force_mtls_local: force,
            ..Policy::default()
        };
        let mut cluster = Cluster::start(n, policy, 9).await;
        let payload = random_bytes(300_000);
        let stream = cluster.connect_as(&cluster.pods.client, echo).await;
        assert_eq!(round_trip(stream, payload.clone()).await, payload);
        // Forced, node A's own inbound serves the stream too.
        let mut closes = next_closes(&mut cluster.a, if force { 2 } else { 1 }).await;
        let out = closes.remove(
            closes
                .iter()
                .position(|e| e.direction == Direction::Outbound)
                .unwrap(),
        );
        assert_eq!(out.error, None, "{out:?}");
        assert_eq!(
            out.server_id.as_deref(),
            Some("spiffe://cluster.local/ns/app/sa/local")
        );
        if force {
            assert!(out.tls);
            assert_eq!(out.no_tls_reason, None);
            let inbound = closes.pop().unwrap();
            assert_eq!(inbound.direction, Direction::Inbound);
            assert_eq!(
                inbound.client_id.as_deref(),
                Some("spiffe://cluster.local/ns/app/sa/client")
            );
            assert_eq!(inbound.bytes_src_to_dst, 300_000);
        } else {
            assert!(!out.tls);
            assert_eq!(out.no_tls_reason, Some(NoTlsReason::SecuredLocal));
            assert_eq!(cluster.a.handle.pooled_connections(), 0);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_connections_spread_over_pooled_connections_near_their_limit() {
    let n = 12;
    let echo = echo_server(ip(n, 20)).await;
    let mut cluster = Cluster::start(n, Policy::default(), echo.port()).await;
    // One connection carries at most 231 streams: the peer's advertised 256
    // minus 10% headroom, so 1000 need 5 (4 × 231 + 76).
    const STREAMS: usize = 1000;
    let mut open = Vec::new();
    for _ in 0..STREAMS {
        let mut stream = cluster.connect_as(&cluster.pods.client, echo).await;
        stream.write_all(b"x").await.unwrap();
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await.unwrap();
        assert_eq!(&byte, b"x");
        open.push(stream);
    }
    assert_eq!(cluster.a.handle.pooled_connections(), 5);
    // Every stream still works while all are open.
    for stream in &mut open {
        stream.write_all(b"y").await.unwrap();
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await.unwrap();
        assert_eq!(&byte, b"y");
    }
    for stream in open {
        assert_eq!(round_trip(stream, b"z".to_vec()).await, b"z");
    }
    // Each side reports every connection as a clean mTLS connection.
    for node in [&mut cluster.a, &mut cluster.b] {
        let closes = next_closes(node, STREAMS).await;
        assert!(
            closes
                .iter()
                .all(|e| e.tls && e.error.is_none() && e.bytes_src_to_dst == 3),
            "{:?}",
            closes
                .iter()
                .find(|e| !e.tls || e.error.is_some() || e.bytes_src_to_dst != 3)
        );
    }
}

#[tokio::test]
async fn broken_pooled_connections_are_replaced() {
    let n = 13;
    let echo = echo_server(ip(n, 20)).await;
    let cluster = Cluster::start(n, Policy::default(), echo.port()).await;
    let payload = random_bytes(50_000);
    let stream = cluster.connect_as(&cluster.pods.client, echo).await;
    assert_eq!(round_trip(stream, payload.clone()).await, payload);

    // A connection left open across node B's restart is cut after B's drain
    // timeout; the pooled HBONE connection dies with it.
    let mut lingering = cluster.connect_as(&cluster.pods.client, echo).await;
    lingering.write_all(b"x").await.unwrap();
    let mut byte = [0u8; 1];
    lingering.read_exact(&mut byte).await.unwrap();
    let cluster = tokio::time::timeout(EVENT_WAIT, cluster.restart_b())
        .await
        .expect("B stops within its drain timeout");
    assert_closed_without_data(lingering).await;

    let stream = cluster.connect_as(&cluster.pods.client, echo).await;
    assert_eq!(round_trip(stream, payload.clone()).await, payload);
    assert_eq!(
        cluster.a.handle.pooled_connections(),
        1,
        "the broken connection left the pool"
    );
}

/// Opens a connection through the pool and checks it carries bytes; left
/// open for the caller.
async fn open_echoing(cluster: &Cluster, echo: SocketAddrV4) -> TcpStream {
    let mut stream = cluster.connect_as(&cluster.pods.client, echo).await;
    stream.write_all(b"x").await.unwrap();
    let mut byte = [0u8; 1];
    stream.read_exact(&mut byte).await.unwrap();
    stream
}

#[tokio::test]
async fn removing_a_trust_anchor_closes_the_connections_it_authenticated() {
    let n = 19;
    let echo = echo_server(ip(n, 20)).await;
    let cluster = Cluster::start(n, Policy::default(), echo.port()).await;
    let next_root = TestCa::new("next").root_pem;

    // Adding an anchor (the first step of a rotation) keeps every session.
    let mut kept = open_echoing(&cluster, echo).await;
    let both = format!("{}{next_root}", cluster.ca.root_pem);
    cluster.creds_a.replace_anchors(&both);
    cluster.creds_b.replace_anchors(&both);
    tokio::time::sleep(Duration::from_millis(300)).await;
    kept.write_all(b"y").await.unwrap();
    let mut byte = [0u8; 1];
    kept.read_exact(&mut byte).await.unwrap();
    assert_eq!(&byte, b"y", "the session survives an added anchor");
    assert_eq!(cluster.a.handle.pooled_connections(), 1);

    // The server's agent drops the old root: it cuts the client agent's
    // HBONE connection, and with it the pod's connection.
    cluster.creds_b.replace_anchors(&next_root);
    assert_closed_without_data(kept).await;
    tokio::time::timeout(EVENT_WAIT, async {
        while cluster.a.handle.pooled_connections() != 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the cut connection leaves the client agent's pool");

    // The client's agent drops it alone: it closes its pooled connection.
    cluster.creds_b.replace_anchors(&both);
    let cut = open_echoing(&cluster, echo).await;
    assert_eq!(cluster.a.handle.pooled_connections(), 1);
    cluster.creds_a.replace_anchors(&next_root);
    assert_closed_without_data(cut).await;
    assert_eq!(
        cluster.a.handle.pooled_connections(),
        0,
        "the distrusted connection left the pool"
    );
}

#[tokio::test]
async fn a_fresh_pool_resumes_the_tls_session_and_still_proves_the_peer_identity() {
    let n = 15;
    let echo = echo_server(ip(n, 20)).await;
    let cluster = Cluster::start(n, Policy::default(), echo.port()).await;
    let client = cluster.pods.client.identity.clone();
    let server = cluster.pods.server.identity.clone();
    let payload = random_bytes(10_000);
    let stream = cluster.connect_as(&cluster.pods.client, echo).await;
    assert_eq!(round_trip(stream, payload.clone()).await, payload);
    let first = cluster.a.handle.hbone_connections();
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(first[0].handshake, HandshakeKind::Full);
    assert_eq!((&first[0].source, &first[0].peer), (&client, &server));

    // A fresh pool (nothing to reuse) with the same client config: the new
    // mTLS connection resumes the session, and the peer identity read from
    // the resumed session is still checked and right.
    let mut cluster = cluster.restart_a(Policy::default()).await;
    assert_eq!(cluster.a.handle.pooled_connections(), 0);
    let stream = cluster.connect_as(&cluster.pods.client, echo).await;
    assert_eq!(round_trip(stream, payload.clone()).await, payload);
    let second = cluster.a.handle.hbone_connections();
    assert_eq!(second.len(), 1, "{second:?}");
    assert_eq!(second[0].handshake, HandshakeKind::Resumed);
    assert_eq!(
        (&second[0].source, &second[0].destination, &second[0].peer),
        (&client, &server, &server)
    );
    let close = next_close(&mut cluster.a, Direction::Outbound).await;
    assert_eq!(
        (
            close.tls,
            close.server_id.as_deref(),
            close.error.as_deref()
        ),
        (true, Some(server.spiffe_uri().as_str()), None)
    );

    // Same node, another identity (another SNI): no session of "server"
    // may stand in for it, so a full handshake proves "other".
    let other = cluster.pods.other.identity.clone();
    let other_echo = echo_server(ip(n, 22)).await;
    let stream = cluster.connect_as(&cluster.pods.client, other_echo).await;
    assert_eq!(round_trip(stream, payload.clone()).await, payload);
    let third = cluster
        .a
        .handle
        .hbone_connections()
        .into_iter()
        .find(|c| c.destination == other)
        .expect("a connection to the other identity is pooled");
    assert_eq!(
        (third.handshake, &third.peer, third.node),
        (
            HandshakeKind::Full,
            &other,
            SocketAddr::from(inbound_of(&node_b(n)))
        )
    );
}

#[tokio::test]
async fn bytes_sent_before_a_refused_connect_close_the_client_and_are_not_counted() {
    let n = 16;
    // Nothing listens on this port of the server pod's address: node B
    // answers the CONNECT with 503 after the client's bytes went out.
    let closed_port = TcpListener::bind((ip(n, 20), 0))
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cluster = Cluster::start(n, Policy::default(), closed_port).await;
    let target = SocketAddrV4::new(ip(n, 20), closed_port);
    let mut stream = cluster.connect_as(&cluster.pods.client, target).await;
    stream.write_all(&random_bytes(1000)).await.unwrap();
    assert_closed_without_data(stream).await;
    let close = next_close(&mut cluster.a, Direction::Outbound).await;
    assert_eq!(
        (close.tls, close.bytes_src_to_dst, close.bytes_dst_to_src),
        (true, 0, 0)
    );
    assert_eq!(
        close.error.as_deref(),
        Some(
            format!(
                "the agent at {} refused CONNECT {target} with HTTP 503 Service Unavailable",
                inbound_of(&node_b(n))
            )
            .as_str()
        )
    );
    // Both agents record the same reason: the peer's 503 reads back as it.
    assert_eq!(close.refused_reason, Some(RefusalReason::TargetRefused));
    let inbound = next_close(&mut cluster.b, Direction::Inbound).await;
    assert_eq!(inbound.bytes_src_to_dst, 0);
    assert_eq!(inbound.refused_reason, Some(RefusalReason::TargetRefused));
}

/// Everything real but eBPF: the identity service issuing over gRPC, each
/// node's cert store fetching its ServiceAccounts' certificates with its node
/// token, each node's registry reading the cluster file, and a Service VIP
/// resolved by the registry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_identity_service_cert_stores_and_registries_carry_bytes_across_nodes() {
    use sealmesh_agent::{
        certs::{CertStore, CertStoreConfig},
        registry::LocalRegistry,
    };
    use sealmesh_common::{
        cluster::{ClusterFile, Namespace, Node as ClusterNode, Pod, Service, ServicePort},
        consts::{MESH_LABEL, MESH_LABEL_ENABLED},
    };
    use sealmesh_identity::{IdentityConfig, ServerBuilder};
    use sealmesh_pki::{CaSpec, Layout, generate_issuer, generate_root};

    const DAY: Duration = Duration::from_secs(86_400);
    let n = 14;
    let echo = echo_server(ip(n, 33)).await;
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);

    let root = generate_root(&CaSpec::valid_for("root.hbone-test", 365 * DAY)).unwrap();
    let (issuer, _) = generate_issuer(
        &root.material(),
        &CaSpec::valid_for("issuer.hbone-test", 30 * DAY),
    )
    .unwrap();
    std::fs::write(path("ca-bundle.crt"), &root.cert_pem).unwrap();
    issuer
        .write_dir(&path("issuer"), Layout::Pem, false)
        .unwrap();

    let mut cluster = ClusterFile::new("tb-hbone");
    for (name, host, cidr) in [("node-a", 2, 16), ("node-b", 3, 32)] {
        std::fs::write(path(&format!("{name}.token")), format!("{name}-token")).unwrap();
        cluster.nodes.push(ClusterNode {
            name: name.into(),
            ip: ip(n, host),
            pod_cidr: format!("{}/28", ip(n, cidr)).parse().unwrap(),
            cgroup: path(name),
            token_file: Some(path(&format!("{name}.token"))),
            netns: None,
        });
    }
    cluster.namespaces.push(Namespace {
        name: NAMESPACE.into(),
        labels: [(MESH_LABEL.into(), MESH_LABEL_ENABLED.into())].into(),
        annotations: Default::default(),
    });
    for (name, node, host) in [("client", "node-a", 17), ("server", "node-b", 33)] {
        // The registry takes a local pod's cgroup id from its directory.
        let cgroup = path(node).join(name);
        std::fs::create_dir_all(&cgroup).unwrap();
        cluster.pods.push(Pod {
            name: format!("{name}-0"),
            namespace: NAMESPACE.into(),
            service_account: name.into(),
            ip: ip(n, host),
            node: node.into(),
            cgroup,
            labels: [("app".into(), name.into())].into(),
            annotations: Default::default(),
            netns: None,
        });
    }
    let vip = service_vip(n);
    cluster.services.push(Service {
        name: "server".into(),
        namespace: NAMESPACE.into(),
        vip: *vip.ip(),
        ports: vec![ServicePort {
            name: None,
            port: vip.port(),
            target_port: echo.port(),
        }],
        selector: [("app".into(), "server".into())].into(),
    });
    cluster.save(&path("cluster.yaml")).unwrap();

    let mut identity_config =
        IdentityConfig::new(path("cluster.yaml"), path("ca-bundle.crt"), path("issuer"));
    identity_config.listen = "127.0.0.1:0".parse().unwrap();
    identity_config.metrics_listen = "127.0.0.1:0".parse().unwrap();
    let identity = ServerBuilder::new(identity_config).bind().await.unwrap();
    let identity_addr = identity.grpc_addr();
    let (stop_identity, identity_stopped) = oneshot::channel::<()>();
    tokio::spawn(identity.run(async move {
        let _ = identity_stopped.await;
    }));

    let (stop, stopped) = watch::channel(false);
    let until_stopped = || {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        }
    };
    let mut nodes = Vec::new();
    for node in ["node-a", "node-b"] {
        let registry = LocalRegistry::load(&path("cluster.yaml"), node, Vec::new()).unwrap();
        let certs = CertStore::new(CertStoreConfig {
            identity_addr,
            token_file: path(&format!("{node}.token")),
            trust_anchors_file: path("ca-bundle.crt"),
            trust_domain: TrustDomain::default(),
            renewal: Default::default(),
            cache_dir: None,
        })
        .unwrap();
        tokio::spawn(certs.clone().run(registry.clone(), until_stopped()));
        let local_sa = if node == "node-a" { "client" } else { "server" };
        let local_id = TrustDomain::default()
            .identity(NAMESPACE, local_sa)
            .unwrap();
        tokio::time::timeout(EVENT_WAIT, async {
            while !certs.has_valid_cert(&local_id) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{node} got no certificate for {local_id}"));
        let redirects = Arc::new(TestRedirects::default());
        let mut cfg = ProxyConfig::for_node(registry.local_node().ip, Policy::default());
        cfg.drain_timeout = DRAIN_TIMEOUT;
        let proxy = Proxy::bind(cfg, registry.clone(), redirects.clone(), certs)
            .await
            .unwrap();
        let mut events = proxy.handle().subscribe();
        tokio::spawn(proxy.run(until_stopped()));
        let client_cgroup = registry.local_workloads().iter().find_map(|w| w.cgroup_id);
        nodes.push((redirects, client_cgroup, async move {
            loop {
                let event = Arc::unwrap_or_clone(events.recv().await.unwrap());
                if event.phase == Phase::Close {
                    return event;
                }
            }
        }));
    }
    let (_, _, b_close) = nodes.pop().unwrap();
    let (a_redirects, client_cgroup, a_close) = nodes.pop().unwrap();

    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((ip(n, 17), 0))).unwrap();
    let SocketAddr::V4(client) = socket.local_addr().unwrap() else {
        unreachable!()
    };
    let outbound = SocketAddrV4::new(ip(n, 2), OUTBOUND_PORT);
    a_redirects.0.lock().unwrap().insert(
        (client, outbound),
        Redirect {
            original_dst: vip,
            source_cgroup: client_cgroup.unwrap(),
            source: RedirectSource::MeshedPod,
        },
    );
    let stream = socket.connect(outbound.into()).await.unwrap();
    let payload = random_bytes(2 * 1024 * 1024 + 5);
    assert!(
        round_trip(stream, payload.clone()).await == payload,
        "bytes differ"
    );

    let (out, inbound) = tokio::time::timeout(EVENT_WAIT, async { tokio::join!(a_close, b_close) })
        .await
        .expect("both agents report the connection");
    assert!(out.tls && inbound.tls);
    assert_eq!(out.error, None, "{out:?}");
    assert_eq!(
        out.dst_addr,
        Some(echo.into()),
        "the VIP resolved to the server pod"
    );
    assert_eq!(
        inbound.client_id.as_deref(),
        Some("spiffe://cluster.local/ns/app/sa/client")
    );
    assert_eq!(
        inbound.server_id.as_deref(),
        Some("spiffe://cluster.local/ns/app/sa/server")
    );
    assert_eq!(inbound.src.map(|p| p.name).as_deref(), Some("client-0"));
    assert_eq!(
        inbound.src_addr,
        SocketAddr::from(client),
        "the verified source pod's address"
    );
    assert_eq!(
        (inbound.bytes_src_to_dst, inbound.bytes_dst_to_src),
        (payload.len() as u64, payload.len() as u64)
    );

    stop.send(true).unwrap();
    stop_identity.send(()).unwrap();
}

/// The kernel trusts the agent's connects to strict pods; a new unmeshed
/// pod's held connection, which the agent would carry in plaintext, must
/// therefore never reach a local strict pod.
#[tokio::test]
async fn a_new_unmeshed_pods_connection_never_reaches_a_local_strict_pod() {
    let n = 28;
    let strict_a = Policy {
        default_inbound_policy: sealmesh_common::policy::InboundPolicy::Strict,
        ..Policy::default()
    };
    let echo = echo_server(ip(n, 20)).await;
    let mut cluster = Cluster::start(n, strict_a, echo.port()).await;
    let local = cluster.pods.local.clone();
    let listener = TcpListener::bind((local.ip.unwrap(), 0)).await.unwrap();
    let SocketAddr::V4(strict_target) = listener.local_addr().unwrap() else {
        unreachable!()
    };
    let legacy = cluster.add_unmeshed_newcomer();
    let stream = cluster
        .connect_as_unknown(legacy.ip.unwrap(), NEWCOMER_CGROUP, strict_target)
        .await;
    assert_closed_without_data(stream).await;
    let event = next_close(&mut cluster.a, Direction::Outbound).await;
    assert!(!event.tls);
    assert_eq!(event.refused_reason, Some(RefusalReason::StrictInbound));
    assert_eq!(
        event.error.as_deref(),
        Some(
            format!(
                "app/local-0 ({strict_target}) accepts only mutual TLS from meshed pods (strict inbound policy); an unmeshed pod's connection cannot reach it"
            )
            .as_str()
        )
    );
    let accepted = tokio::time::timeout(Duration::from_millis(200), listener.accept()).await;
    assert!(accepted.is_err(), "the strict pod was never connected to");
}

/// `--deny-plaintext` must not break what every in-cluster client needs: the
/// API server (and cluster DNS) by its Service's ClusterIP, DNS over TCP
/// anywhere. Everything else outside the mesh stays refused.
#[tokio::test]
async fn deny_plaintext_lets_the_exempt_services_and_ports_through() {
    let n = 29;
    let deny = Policy {
        deny_plaintext: true,
        ..Policy::default()
    };
    let mut cluster = Cluster::start(n, deny, 9).await;
    // A ClusterIP with no pod behind it, like the API server's.
    let api = echo_server(ip(n, OUTSIDE_HOST)).await;
    cluster
        .a
        .registry
        .name_service(*api.ip(), "default/kubernetes");
    let payload = random_bytes(1000);
    let stream = cluster.connect_as(&cluster.pods.client, api).await;
    assert_eq!(round_trip(stream, payload.clone()).await, payload);
    let event = next_close(&mut cluster.a, Direction::Outbound).await;
    assert_eq!(event.no_tls_reason, Some(NoTlsReason::OutsideCluster));
    assert_eq!(event.error, None, "{event:?}");

    // The same address as another Service's ClusterIP is refused.
    cluster.a.registry.name_service(*api.ip(), "shop/database");
    let stream = cluster.connect_as(&cluster.pods.client, api).await;
    assert_closed_without_data(stream).await;
    let event = next_close(&mut cluster.a, Direction::Outbound).await;
    assert_eq!(event.refused_reason, Some(RefusalReason::PlaintextDenied));
    assert!(
        event.error.as_deref().unwrap().contains("--deny-plaintext"),
        "{event:?}"
    );

    // DNS over TCP (port 53) is exempt wherever it goes.
    let dns = SocketAddrV4::new(ip(n, OUTSIDE_HOST), 53);
    let Ok(listener) = TcpListener::bind(dns).await else {
        panic!("port 53 on {dns} is taken");
    };
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let (mut read, mut write) = socket.split();
        tokio::io::copy(&mut read, &mut write).await.unwrap();
    });
    let mut stream = cluster.connect_as(&cluster.pods.client, dns).await;
    stream.write_all(b"query").await.unwrap();
    let mut answer = [0u8; 5];
    stream.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"query");
}

/// The same for a local pod guarded by its authorization policies: the
/// agent carries a new unmeshed pod's plaintext only where the policies
/// admit its source address and port, as the kernel would.
#[tokio::test]
async fn a_new_unmeshed_pods_connection_to_a_local_pod_follows_its_plaintext_policies() {
    let n = 41;
    let mut cluster = Cluster::start(n, Policy::default(), 9).await;
    let legacy = cluster.add_unmeshed_newcomer();
    let admitted = echo_server(ip(n, 24)).await;
    let other_port = echo_server(ip(n, 24)).await;
    let spec = format!(
        "{{ rules: [{{ from: [{{ source: {{ ipBlocks: [{}/32] }} }}], to: [{{ operation: {{ ports: [{}] }} }}] }}] }}",
        legacy.ip.unwrap(),
        admitted.port()
    );
    let policies = sealmesh_common::authz::PolicySet::new(
        "sealmesh",
        [sealmesh_common::authz::CompiledPolicy::compile(
            &sealmesh_common::authz::AuthorizationPolicy {
                name: "legacy-on-one-port".into(),
                namespace: NAMESPACE.into(),
                annotations: Default::default(),
                spec: serde_yaml_ng::from_str(&spec).unwrap(),
            },
        )],
    );
    let guarded = Arc::into_inner(pod("guarded", &node_a(n), ip(n, 24), true, Some(1010))).unwrap();
    cluster.a.registry.add(Arc::new(Workload {
        authz: policies.for_pod(NAMESPACE, &Default::default()),
        ..guarded
    }));

    let stream = cluster
        .connect_as_unknown(legacy.ip.unwrap(), NEWCOMER_CGROUP, admitted)
        .await;
    let payload = random_bytes(1000);
    assert_eq!(round_trip(stream, payload.clone()).await, payload);
    let event = next_close(&mut cluster.a, Direction::Outbound).await;
    assert_eq!((event.error, event.refused_reason), (None, None));

    let stream = cluster
        .connect_as_unknown(legacy.ip.unwrap(), NEWCOMER_CGROUP, other_port)
        .await;
    assert_closed_without_data(stream).await;
    let event = next_close(&mut cluster.a, Direction::Outbound).await;
    assert_eq!(event.refused_reason, Some(RefusalReason::PolicyDenied));
    assert_eq!(
        event
            .authz
            .as_ref()
            .and_then(|a| a.denied.as_ref())
            .map(ToString::to_string)
            .as_deref(),
        Some("app/legacy-on-one-port")
    );
    assert_eq!(
        event.error.as_deref(),
        Some(
            format!(
                "app/guarded-0 ({other_port}) refuses plaintext from {}: no rule of ALLOW policy app/legacy-on-one-port matches it; an unmeshed pod's connection cannot reach it",
                legacy.ip.unwrap()
            )
            .as_str()
        )
    );
}
