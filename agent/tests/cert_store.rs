//! The cert store against the real identity service (in-process, real gRPC on
//! loopback) and real rustls handshakes over loopback TCP.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose, SanType};
use rustls::{ClientConfig, ProtocolVersion, RootCertStore, ServerConfig};
use rustls_pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, pem::PemObject,
};
use sealmesh_agent::{
    certs::{CertStore, CertStoreConfig, RenewalPolicy},
    registry::{LocalRegistry, WorkloadRegistry},
    tls::{self, ALPN_HBONE},
};
use sealmesh_common::{
    cluster::{ClusterFile, Namespace, Node, Pod},
    consts::{MESH_LABEL, MESH_LABEL_ENABLED, MESH_OPT_OUT_ANNOTATION, MESH_OPT_OUT_VALUE},
    identity::{Identity, TrustDomain},
};
use sealmesh_identity::{IdentityConfig, ServerBuilder};
use sealmesh_pki::{CaSpec, GeneratedCa, Layout, generate_issuer, generate_root};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{oneshot, watch},
    task::JoinHandle,
};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const DAY: Duration = Duration::from_secs(86_400);
const MESHED_NS: &str = "emojivoto";
const LOCAL_NODE: &str = "node-0";

fn id(sa: &str) -> Identity {
    TrustDomain::default().identity(MESHED_NS, sa).unwrap()
}

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "sealmesh_agent=debug,sealmesh_identity=info".into()),
        )
        .try_init();
}

fn new_ca(name: &str) -> (GeneratedCa, GeneratedCa) {
    let root = generate_root(&CaSpec::valid_for(&format!("root.{name}"), 365 * DAY)).unwrap();
    let issuer = generate_issuer(
        &root.material(),
        &CaSpec::valid_for(&format!("issuer.{name}"), 30 * DAY),
    )
    .unwrap()
    .0;
    (root, issuer)
}

/// A cluster file with its PKI and tokens in a tempdir. node-0 (the agent's
/// node) runs web-0 and web-1 (sa web), vote-0 (sa voting), db-0 (sa db,
/// opted out) and curl (unmeshed namespace); node-1 runs emoji-0 (sa emoji).
struct TestCluster {
    dir: tempfile::TempDir,
    cluster_file: PathBuf,
    anchors_file: PathBuf,
    issuer_dir: PathBuf,
    issuer: GeneratedCa,
    file: ClusterFile,
}

impl TestCluster {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = |name: &str| dir.path().join(name);
        let (root, issuer) = new_ca("test");
        let anchors_file = path("ca-bundle.crt");
        std::fs::write(&anchors_file, &root.cert_pem).unwrap();
        let issuer_dir = path("issuer");
        issuer.write_dir(&issuer_dir, Layout::Pem, false).unwrap();

        let mut file = ClusterFile::new("tb-cert-store");
        for (i, name) in ["node-0", "node-1"].into_iter().enumerate() {
            let token_file = path(&format!("{name}.token"));
            std::fs::write(&token_file, format!("{name}-token-v1")).unwrap();
            file.nodes.push(Node {
                name: name.into(),
                ip: format!("172.18.0.{}", i + 2).parse().unwrap(),
                pod_cidr: format!("10.244.{i}.0/24").parse().unwrap(),
                cgroup: path(name),
                token_file: Some(token_file),
                netns: None,
            });
        }
        file.namespaces.push(Namespace {
            name: MESHED_NS.into(),
            labels: [(MESH_LABEL.into(), MESH_LABEL_ENABLED.into())].into(),
            annotations: Default::default(),
        });
        file.namespaces.push(Namespace {
            name: "plain".into(),
            labels: Default::default(),
            annotations: Default::default(),
        });
        let pod = |name: &str, ns: &str, sa: &str, node: &str, ip: &str| {
            let cgroup = dir.path().join(node).join(name);
            std::fs::create_dir_all(&cgroup).unwrap();
            Pod {
                name: name.into(),
                namespace: ns.into(),
                service_account: sa.into(),
                ip: ip.parse().unwrap(),
                node: node.into(),
                cgroup,
                labels: Default::default(),
                annotations: Default::default(),
                netns: None,
            }
        };
        file.pods = vec![
            pod("web-0", MESHED_NS, "web", "node-0", "10.244.0.2"),
            pod("web-1", MESHED_NS, "web", "node-0", "10.244.0.3"),
            pod("vote-0", MESHED_NS, "voting", "node-0", "10.244.0.4"),
            Pod {
                annotations: [(MESH_OPT_OUT_ANNOTATION.into(), MESH_OPT_OUT_VALUE.into())].into(),
                ..pod("db-0", MESHED_NS, "db", "node-0", "10.244.0.5")
            },
            pod("curl", "plain", "default", "node-0", "10.244.0.6"),
            pod("emoji-0", MESHED_NS, "emoji", "node-1", "10.244.1.2"),
        ];
        let cluster_file = path("cluster.yaml");
        file.save(&cluster_file).unwrap();
        Self {
            dir,
            cluster_file,
            anchors_file,
            issuer_dir,
            issuer,
            file,
        }
    }

    fn save(&self) {
        self.file.save(&self.cluster_file).unwrap();
    }

    fn token_file(&self, node: &str) -> PathBuf {
        self.dir.path().join(format!("{node}.token"))
    }

    fn identity_config(&self, listen: SocketAddr, lifetime: Duration) -> IdentityConfig {
        let mut config = IdentityConfig::new(
            self.cluster_file.clone(),
            self.anchors_file.clone(),
            self.issuer_dir.clone(),
        );
        config.listen = listen;
        config.metrics_listen = "127.0.0.1:0".parse().unwrap();
        config.cert_lifetime = lifetime;
        config.clock_skew = Duration::from_secs(1);
        config
    }

    /// Roots the agents trust, for hand-built clients.
    fn roots(&self) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&self.anchors_file).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        Arc::new(roots)
    }
}

/// The real identity service on its own runtime and thread, so killing it
/// drops its listener and every open connection at once, like a crash.
struct IdentityService {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl IdentityService {
    fn start(config: IdentityConfig) -> Self {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let server = ServerBuilder::new(config).bind().await;
                let server = match server {
                    Ok(server) => server,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                ready_tx.send(Ok(server.grpc_addr())).unwrap();
                tokio::select! {
                    served = server.run(std::future::pending()) => panic!("identity service ended: {served:?}"),
                    _ = stopped => {}
                }
            });
            runtime.shutdown_background();
        });
        let addr = ready_rx
            .recv()
            .unwrap()
            .unwrap_or_else(|e| panic!("identity service does not start: {e}"));
        Self {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn kill(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

impl Drop for IdentityService {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The registry and cert store of node-0's agent, stopped when dropped.
struct Agent {
    store: Arc<CertStore>,
    registry: Arc<LocalRegistry>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Agent {
    fn start(cluster: &TestCluster, identity_addr: SocketAddr) -> Self {
        let registry = LocalRegistry::load(&cluster.cluster_file, LOCAL_NODE, Vec::new()).unwrap();
        let store = CertStore::new(CertStoreConfig {
            identity_addr,
            token_file: cluster.token_file(LOCAL_NODE),
            trust_anchors_file: cluster.anchors_file.clone(),
            trust_domain: TrustDomain::default(),
            renewal: RenewalPolicy {
                // The identity service here issues leaves of a few seconds.
                min_renew_delay: Duration::from_millis(500),
                initial_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_millis(400),
                request_timeout: Duration::from_secs(2),
                ..RenewalPolicy::default()
            },
            cache_dir: None,
        })
        .unwrap();
        let (stop, stopped) = watch::channel(false);
        let shutdown = move || {
            let mut stopped = stopped.clone();
            async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            }
        };
        let tasks = vec![
            tokio::spawn(
                registry
                    .clone()
                    .watch(Duration::from_millis(50), shutdown()),
            ),
            tokio::spawn(store.clone().run(registry.clone(), shutdown())),
        ];
        Self {
            store,
            registry,
            stop,
            tasks,
        }
    }

    async fn shutdown(mut self) {
        self.stop.send_replace(true);
        for task in std::mem::take(&mut self.tasks) {
            tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .expect("agent tasks stop on shutdown")
                .unwrap();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop.send_replace(true);
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn eventually<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn serial_of(store: &CertStore, identity: &Identity) -> Option<String> {
    store
        .snapshot()
        .into_iter()
        .find(|s| &s.identity == identity)
        .and_then(|s| s.serial)
}

/// What one side of a handshake + ping/pong exchange saw.
#[derive(Debug)]
struct Seen {
    peer: Vec<CertificateDer<'static>>,
    alpn: Option<Vec<u8>>,
    version: Option<ProtocolVersion>,
}

/// A TLS server (`server`) and client (`client`, asking for `sni`) over a
/// real loopback TCP connection; the client sends "ping", the server answers
/// "pong". Each side's outcome, errors as text.
async fn exchange(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    sni: ServerName<'static>,
) -> (Result<Seen, String>, Result<Seen, String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server_side = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = TlsAcceptor::from(server)
            .accept(tcp)
            .await
            .map_err(|e| e.to_string())?;
        let (_, conn) = tls.get_ref();
        let seen = Seen {
            peer: conn.peer_certificates().unwrap_or_default().to_vec(),
            alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
            version: conn.protocol_version(),
        };
        let mut ping = [0u8; 4];
        tls.read_exact(&mut ping).await.map_err(|e| e.to_string())?;
        assert_eq!(&ping, b"ping");
        tls.write_all(b"pong").await.map_err(|e| e.to_string())?;
        tls.shutdown().await.map_err(|e| e.to_string())?;
        Ok(seen)
    });
    let client_side = async move {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut tls = TlsConnector::from(client)
            .connect(sni, tcp)
            .await
            .map_err(|e| e.to_string())?;
        let (_, conn) = tls.get_ref();
        let seen = Seen {
            peer: conn.peer_certificates().unwrap_or_default().to_vec(),
            alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
            version: conn.protocol_version(),
        };
        tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
        let mut pong = [0u8; 4];
        tls.read_exact(&mut pong).await.map_err(|e| e.to_string())?;
        assert_eq!(&pong, b"pong");
        Ok(seen)
    }
    .await;
    let server_side = tokio::time::timeout(Duration::from_secs(5), server_side)
        .await
        .expect("server side finishes")
        .unwrap();
    (server_side, client_side)
}

/// A client config presenting a leaf for `uri` signed by `issuer`, trusting
/// the cluster's roots for the server side.
fn forged_client(
    cluster: &TestCluster,
    issuer: &GeneratedCa,
    uri: &str,
    dns: &str,
) -> Arc<ClientConfig> {
    let signer = rcgen::Issuer::from_ca_cert_pem(
        &issuer.cert_pem,
        KeyPair::from_pem(&issuer.key_pem).unwrap(),
    )
    .unwrap();
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![
        SanType::URI(uri.try_into().unwrap()),
        SanType::DnsName(dns.try_into().unwrap()),
    ];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let leaf = params.signed_by(&key, &signer).unwrap();
    let issuer_der = CertificateDer::from_pem_slice(issuer.cert_pem.as_bytes()).unwrap();
    let mut config = ClientConfig::builder_with_provider(tls::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(cluster.roots())
        .with_client_auth_cert(
            vec![leaf.der().clone(), issuer_der],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
    config.alpn_protocols = vec![ALPN_HBONE.to_vec()];
    Arc::new(config)
}

async fn agent_with_certs(cluster: &TestCluster, identity: &IdentityService) -> Agent {
    let agent = Agent::start(cluster, identity.addr);
    eventually(
        "certificates for web and voting",
        Duration::from_secs(10),
        || {
            (agent.store.has_valid_cert(&id("web")) && agent.store.has_valid_cert(&id("voting")))
                .then_some(())
        },
    )
    .await;
    agent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certs_for_exactly_the_local_meshed_service_accounts_and_mutual_tls_between_them() {
    init_logs();
    let cluster = TestCluster::new();
    let identity =
        IdentityService::start(cluster.identity_config("127.0.0.1:0".parse().unwrap(), DAY));
    let agent = agent_with_certs(&cluster, &identity).await;
    let store = &agent.store;

    let status = store.snapshot();
    let maintained: Vec<&Identity> = status.iter().map(|s| &s.identity).collect();
    assert_eq!(maintained, [&id("voting"), &id("web")]);
    for s in &status {
        assert_eq!(s.last_error, None, "{s:?}");
        let left = s
            .not_after
            .unwrap()
            .duration_since(s.last_refresh.unwrap())
            .unwrap();
        assert!(
            left > DAY - Duration::from_secs(60) && left <= DAY + Duration::from_secs(2),
            "{left:?}"
        );
    }
    assert_ne!(status[0].serial, status[1].serial);
    for not_here in [
        id("db"),
        id("emoji"),
        TrustDomain::default().identity("plain", "default").unwrap(),
    ] {
        assert!(!store.has_valid_cert(&not_here), "{not_here}");
    }
    assert_eq!(
        store.client_config(&id("emoji")).unwrap_err().to_string(),
        "no valid certificate for spiffe://cluster.local/ns/emojivoto/sa/emoji: no meshed pod of \
         this ServiceAccount runs on this node; meshed connections from it are refused until the \
         identity service issues one"
    );

    // web -> voting: both sides learn the other's exact identity.
    let (server, client) = exchange(
        store.server_config(),
        store.client_config(&id("web")).unwrap(),
        tls::server_name(&id("voting")),
    )
    .await;
    let (server, client) = (server.unwrap(), client.unwrap());
    let td = TrustDomain::default();
    assert_eq!(tls::peer_identity(&server.peer, &td).unwrap(), id("web"));
    assert_eq!(tls::peer_identity(&client.peer, &td).unwrap(), id("voting"));
    for seen in [&server, &client] {
        assert_eq!(seen.alpn.as_deref(), Some(ALPN_HBONE));
        assert_eq!(seen.version, Some(ProtocolVersion::TLSv1_3));
    }
    // The registry the store follows is the one the proxy resolves with.
    assert_eq!(agent.registry.local_node().name, LOCAL_NODE);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_refuses_foreign_ca_foreign_trust_domain_and_non_local_sni() {
    init_logs();
    let cluster = TestCluster::new();
    let identity =
        IdentityService::start(cluster.identity_config("127.0.0.1:0".parse().unwrap(), DAY));
    let agent = agent_with_certs(&cluster, &identity).await;
    let store = &agent.store;
    let web = id("web");

    // A valid-looking web certificate from another CA.
    let (_, other_issuer) = new_ca("other");
    let forged = forged_client(&cluster, &other_issuer, &web.spiffe_uri(), &web.dns_name());
    let (server, client) = exchange(
        store.server_config(),
        forged,
        tls::server_name(&id("voting")),
    )
    .await;
    let server = server.unwrap_err();
    assert!(server.contains("UnknownIssuer"), "{server}");
    assert!(client.is_err());

    // Signed by the mesh's own issuer, but for another trust domain.
    let evil = TrustDomain::new("evil.org", "sealmesh")
        .unwrap()
        .identity(MESHED_NS, "web")
        .unwrap();
    let foreign = forged_client(
        &cluster,
        &cluster.issuer,
        &evil.spiffe_uri(),
        &evil.dns_name(),
    );
    let (server, client) = exchange(
        store.server_config(),
        foreign,
        tls::server_name(&id("voting")),
    )
    .await;
    let server = server.unwrap_err();
    assert!(
        server.contains("ForeignIdentity")
            && server.contains(
                r#"uri: "spiffe://evil.org/ns/emojivoto/sa/web", trust_domain: "cluster.local""#
            ),
        "{server}"
    );
    assert!(client.is_err());

    // A genuine client asking for an identity that does not run here.
    for sni in [
        tls::server_name(&id("emoji")),
        ServerName::try_from("web.emojivoto.svc.cluster.local").unwrap(),
    ] {
        let (server, client) = exchange(
            store.server_config(),
            store.client_config(&web).unwrap(),
            sni.clone(),
        )
        .await;
        let server = server.unwrap_err();
        assert!(
            server.contains("no server certificate chain resolved"),
            "{sni:?}: {server}"
        );
        let client = client.unwrap_err();
        assert_eq!(client, "received fatal alert: AccessDenied", "{sni:?}");
    }
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certs_are_kept_through_an_identity_outage() {
    init_logs();
    let cluster = TestCluster::new();
    // Short-lived leaves, so a renewal falls inside the outage.
    let mut identity = IdentityService::start(
        cluster.identity_config("127.0.0.1:0".parse().unwrap(), Duration::from_secs(8)),
    );
    let agent = agent_with_certs(&cluster, &identity).await;
    let store = &agent.store;
    let serial = serial_of(store, &id("web")).unwrap();
    identity.kill();

    let error = eventually("a failed renewal", Duration::from_secs(15), || {
        store
            .snapshot()
            .into_iter()
            .find(|s| s.identity == id("web"))
            .and_then(|s| s.last_error)
    })
    .await;
    // The open connection breaks mid-call, or the next one cannot be made.
    assert!(
        error.starts_with(&format!(
            "identity service at {} failed the request (Unavailable)",
            identity.addr
        )) || error.starts_with(&format!(
            "cannot connect to the identity service at {}",
            identity.addr
        )),
        "{error}"
    );
    assert_eq!(
        serial_of(store, &id("web")).unwrap(),
        serial,
        "the old certificate is kept"
    );
    assert!(store.has_valid_cert(&id("web")));
    let (server, client) = exchange(
        store.server_config(),
        store.client_config(&id("web")).unwrap(),
        tls::server_name(&id("voting")),
    )
    .await;
    assert_eq!(
        tls::peer_identity(&server.unwrap().peer, &TrustDomain::default()).unwrap(),
        id("web")
    );
    assert!(client.is_ok());
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_identity_service_means_no_client_config_until_it_comes_up() {
    init_logs();
    let cluster = TestCluster::new();
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let agent = Agent::start(&cluster, free);
    let store = &agent.store;

    let reason = eventually("the failure recorded", Duration::from_secs(10), || {
        let message = store.client_config(&id("web")).unwrap_err().to_string();
        message.contains("last attempt").then_some(message)
    })
    .await;
    assert!(reason.starts_with(
        "no valid certificate for spiffe://cluster.local/ns/emojivoto/sa/web: not issued yet"
    ));
    assert!(
        reason.contains(&format!(
            ": not issued yet; last attempt: cannot connect to the identity service at {free}: "
        )),
        "{reason}"
    );
    assert!(
        reason.ends_with(
            "meshed connections from it are refused until the identity service issues one"
        )
    );

    // Retries with backoff: once the service is up, the certificates come.
    let _identity = IdentityService::start(cluster.identity_config(free, DAY));
    eventually(
        "certificates after the outage",
        Duration::from_secs(10),
        || {
            (store.client_config(&id("web")).is_ok() && store.client_config(&id("voting")).is_ok())
                .then_some(())
        },
    )
    .await;
    assert!(store.snapshot().iter().all(|s| s.last_error.is_none()));
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renews_before_expiry_with_the_rotated_token() {
    init_logs();
    let cluster = TestCluster::new();
    let identity = IdentityService::start(
        cluster.identity_config("127.0.0.1:0".parse().unwrap(), Duration::from_secs(4)),
    );
    let agent = agent_with_certs(&cluster, &identity).await;
    let store = &agent.store;
    let first = store
        .snapshot()
        .into_iter()
        .find(|s| s.identity == id("web"))
        .unwrap();

    // Kubernetes rotates the token: the next request must carry the new one.
    std::fs::write(cluster.token_file(LOCAL_NODE), "node-0-token-v2").unwrap();
    let renewed = eventually("a renewed certificate", Duration::from_secs(10), || {
        store
            .snapshot()
            .into_iter()
            .find(|s| s.identity == id("web") && s.serial != first.serial)
    })
    .await;
    assert!(renewed.not_after > first.not_after);
    assert_eq!(renewed.last_error, None);
    // Renewed at 50–70% of the ~5s the first one had left, i.e. before it expired.
    let first_left = first
        .not_after
        .unwrap()
        .duration_since(first.last_refresh.unwrap())
        .unwrap();
    let renewed_after = renewed
        .last_refresh
        .unwrap()
        .duration_since(first.last_refresh.unwrap())
        .unwrap();
    assert!(
        renewed_after < first_left,
        "renewed {renewed_after:?} after, with {first_left:?} left"
    );
    assert!(
        renewed_after >= first_left.mul_f64(0.5) - Duration::from_millis(100),
        "{renewed_after:?}"
    );
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_account_leaving_the_node_loses_its_cert() {
    init_logs();
    let mut cluster = TestCluster::new();
    let identity =
        IdentityService::start(cluster.identity_config("127.0.0.1:0".parse().unwrap(), DAY));
    let agent = agent_with_certs(&cluster, &identity).await;
    let store = &agent.store;
    let web_serial = serial_of(store, &id("web"));

    // vote-0 moves to node-1; one of the two web pods goes away (web stays).
    for pod in &mut cluster.file.pods {
        if pod.name == "vote-0" {
            pod.node = "node-1".into();
            pod.ip = "10.244.1.4".parse().unwrap();
        }
    }
    cluster.file.pods.retain(|p| p.name != "web-1");
    cluster.save();

    eventually(
        "voting's certificate dropped",
        Duration::from_secs(10),
        || (!store.has_valid_cert(&id("voting"))).then_some(()),
    )
    .await;
    let maintained: Vec<Identity> = store.snapshot().into_iter().map(|s| s.identity).collect();
    assert_eq!(maintained, [id("web")]);
    assert_eq!(serial_of(store, &id("web")), web_serial);
    assert!(
        store
            .client_config(&id("voting"))
            .unwrap_err()
            .to_string()
            .contains("no meshed pod of this ServiceAccount runs on this node")
    );
    let (server, _) = exchange(
        store.server_config(),
        store.client_config(&id("web")).unwrap(),
        tls::server_name(&id("voting")),
    )
    .await;
    assert!(
        server
            .unwrap_err()
            .contains("no server certificate chain resolved")
    );
    agent.shutdown().await;
}

/// A TLS server on loopback that presents a certificate for `identity`
/// signed by `issuer`, and keeps whatever a client that completes the
/// handshake sends it.
struct Impostor {
    addr: SocketAddr,
    received: Arc<std::sync::Mutex<Vec<u8>>>,
    task: JoinHandle<()>,
}

impl Impostor {
    async fn start(issuer: &GeneratedCa, identity: &Identity) -> Self {
        let signer = rcgen::Issuer::from_ca_cert_pem(
            &issuer.cert_pem,
            KeyPair::from_pem(&issuer.key_pem).unwrap(),
        )
        .unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![
            SanType::URI(identity.spiffe_uri().try_into().unwrap()),
            SanType::DnsName(identity.dns_name().try_into().unwrap()),
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let leaf = params.signed_by(&key, &signer).unwrap();
        let chain = vec![
            leaf.der().clone(),
            CertificateDer::from_pem_slice(issuer.cert_pem.as_bytes()).unwrap(),
        ];
        let mut config = ServerConfig::builder_with_provider(tls::crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                chain,
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = received.clone();
        let task = tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let (acceptor, kept) = (acceptor.clone(), kept.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut buffer = [0u8; 4096];
                    while let Ok(n @ 1..) = tls.read(&mut buffer).await {
                        kept.lock().unwrap().extend_from_slice(&buffer[..n]);
                    }
                });
            }
        });
        Self {
            addr,
            received,
            task,
        }
    }

    fn received(&self) -> Vec<u8> {
        self.received.lock().unwrap().clone()
    }
}

impl Drop for Impostor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn first_error(store: &CertStore, identity: &Identity) -> String {
    eventually("a failed attempt", Duration::from_secs(10), || {
        store
            .snapshot()
            .into_iter()
            .find(|s| &s.identity == identity)
            .and_then(|s| s.last_error)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_token_goes_only_to_the_identity_service_of_the_anchors() {
    init_logs();
    let cluster = TestCluster::new();
    let identity_service = TrustDomain::default().identity_service();

    // A server with the identity service's names, from a CA the agent does
    // not trust.
    let (_, foreign_issuer) = new_ca("foreign");
    let impostor = Impostor::start(&foreign_issuer, &identity_service).await;
    let agent = Agent::start(&cluster, impostor.addr);
    let error = first_error(&agent.store, &id("web")).await;
    assert_eq!(
        error,
        format!(
            "TLS handshake with the identity service at {} failed: the server's certificate is not trusted \
             (it is not issued under any of the trust anchors); the identity service's certificate must chain \
             to the mesh's trust anchors: check that the address is this mesh's identity service and that the \
             trust anchors are current",
            impostor.addr
        )
    );
    assert!(!agent.store.has_valid_cert(&id("web")));
    agent.shutdown().await;
    assert_eq!(impostor.received(), b"", "nothing, least of all the token");

    // A server with a genuine certificate of the mesh, for another identity
    // (a workload's, say): refused all the same.
    let other = TrustDomain::default()
        .identity("sealmesh", "impostor")
        .unwrap();
    let impostor = Impostor::start(&cluster.issuer, &other).await;
    let agent = Agent::start(&cluster, impostor.addr);
    let error = first_error(&agent.store, &id("web")).await;
    assert_eq!(
        error,
        format!(
            "TLS handshake with the identity service at {} failed: the server's certificate names \
             spiffe://cluster.local/ns/sealmesh/sa/impostor, not the identity service's identity \
             spiffe://cluster.local/ns/sealmesh/sa/sealmesh-identity; check that the address is this mesh's \
             sealmesh identity service (ServiceAccount sealmesh-identity in the control namespace sealmesh) and \
             that the trust domain and control namespace match it",
            impostor.addr
        )
    );
    agent.shutdown().await;
    assert_eq!(impostor.received(), b"");

    // The real one: certificates come.
    let identity =
        IdentityService::start(cluster.identity_config("127.0.0.1:0".parse().unwrap(), DAY));
    let agent = agent_with_certs(&cluster, &identity).await;
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_identity_service_is_verified_against_the_anchors_in_use_now() {
    init_logs();
    let cluster = TestCluster::new();
    let identity =
        IdentityService::start(cluster.identity_config("127.0.0.1:0".parse().unwrap(), DAY));
    // The agent starts with a bundle that lacks the mesh's root...
    let mesh_root = std::fs::read_to_string(&cluster.anchors_file).unwrap();
    let (other_root, _) = new_ca("other");
    std::fs::write(&cluster.anchors_file, &other_root.cert_pem).unwrap();
    let agent = Agent::start(&cluster, identity.addr);
    let error = first_error(&agent.store, &id("web")).await;
    assert!(
        error.contains("the server's certificate is not trusted"),
        "{error}"
    );

    // ... and trusts the identity service once the bundle holds it, with no
    // restart.
    std::fs::write(
        &cluster.anchors_file,
        format!("{}{mesh_root}", other_root.cert_pem),
    )
    .unwrap();
    agent.store.reload_trust_anchors().unwrap();
    eventually(
        "certificates after the anchors reload",
        Duration::from_secs(15),
        || agent.store.has_valid_cert(&id("web")).then_some(()),
    )
    .await;
    agent.shutdown().await;
}
