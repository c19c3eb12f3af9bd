//! `cargo xtask bench identity`: certificates per second issued by the real
//! identity service over real gRPC (over TLS, as agents call it) on loopback.
//!
//! The service runs in its own tokio runtime with a freshly generated root,
//! issuer and cluster file (one node, several ServiceAccounts on it). Keys
//! and CSRs are generated before the clock starts, so the figure measures
//! authorisation, CSR verification, signing and gRPC, not client key
//! generation. The last line printed ends with `N certs/s`.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};
use sealmesh_common::{
    cluster::{ClusterFile, Namespace, Node, Pod},
    consts::{MESH_LABEL, MESH_LABEL_ENABLED},
    identity::{Identity, TrustDomain},
};
use sealmesh_identity::{IdentityConfig, ServerBuilder, client, config::Mode};
use sealmesh_pki::{self as pki, CaSpec, Layout, generate_issuer, generate_root};
use sealmesh_proto::identity::{CertifyRequest, identity_client::IdentityClient};
use tonic::transport::Channel;

const NAMESPACE: &str = "bench";
const NODE: &str = "node-0";
const SERVICE_ACCOUNTS: usize = 16;
/// Calls made before timing starts: connections up, caches and allocator warm.
const WARM_UP_CALLS: usize = 200;
/// HTTP/2 connections the calls are spread over (each is one tonic Channel),
/// as several agents would open.
const MAX_CONNECTIONS: usize = 4;
/// Deadline of connecting and of each call.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

pub fn run(certs: usize, concurrency: usize) -> anyhow::Result<()> {
    ensure!(certs > 0, "--certs must be at least 1");
    ensure!(concurrency > 0, "--concurrency must be at least 1");
    let workdir = tempfile::tempdir().context("cannot create a temporary directory")?;
    let (config, token, identities) = prepare(workdir.path())?;
    let anchors = match &config.mode {
        Mode::Local(local) => pki::parse_pem_certs(
            &std::fs::read(&local.trust_anchors)?,
            "the bench's trust anchors",
        )?,
        Mode::Kubernetes(_) => bail!("the bench runs the identity service in local mode"),
    };

    let server_runtime = runtime("identity-server")?;
    let server = server_runtime
        .block_on(ServerBuilder::new(config).bind())
        .context("identity service did not start")?;
    let address = server.grpc_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = server_runtime.spawn(server.run(async {
        let _ = stopped.await;
    }));

    eprintln!(
        "generating {} P-256 keys and CSRs ...",
        certs + WARM_UP_CALLS
    );
    let requests: Vec<CertifyRequest> = (0..certs + WARM_UP_CALLS)
        .map(|i| certify_request(&identities[i % identities.len()], &token))
        .collect::<anyhow::Result<_>>()?;

    let client_runtime = runtime("identity-bench-client")?;
    let outcome = client_runtime.block_on(async {
        let connections = concurrency.min(MAX_CONNECTIONS);
        // Each channel is one TLS connection, made by the warm-up calls.
        let channels = (0..connections)
            .map(|_| {
                client::channel_with_anchors(
                    address,
                    &anchors,
                    &TrustDomain::default(),
                    CALL_TIMEOUT,
                )
            })
            .collect::<Result<Vec<Channel>, _>>()
            .context("cannot configure TLS to the identity service")?;
        let mut requests = requests;
        let timed = requests.split_off(WARM_UP_CALLS);
        fire(&channels, requests, concurrency).await?;
        let cpu_before = process_cpu_time()?;
        let started = Instant::now();
        let latencies = fire(&channels, timed, concurrency).await?;
        let elapsed = started.elapsed();
        let cpu = process_cpu_time()?.saturating_sub(cpu_before);
        anyhow::Ok((elapsed, cpu, latencies, connections))
    });

    let _ = stop.send(());
    server_runtime
        .block_on(serving)
        .context("identity service task panicked")?
        .context("identity service failed")?;
    let (elapsed, cpu, mut latencies, connections) = outcome?;

    latencies.sort_unstable();
    let percentile = |p: usize| latencies[(latencies.len() * p / 100).min(latencies.len() - 1)];
    let rate = certs as f64 / elapsed.as_secs_f64();
    // CPU per certificate (service and client together) shows what the
    // machine could do when the rate is held down by other load.
    println!(
        "identity: {certs} certificates in {:.3}s, {concurrency} in flight over {connections} connections, \
         latency p50 {:?} p99 {:?}, cpu {:.0}µs/cert (service + client): {rate:.0} certs/s",
        elapsed.as_secs_f64(),
        percentile(50),
        percentile(99),
        cpu.as_secs_f64() * 1e6 / certs as f64,
    );
    Ok(())
}

/// User + system CPU time of this process, all threads (`/proc/self/stat`
/// fields 14 and 15, in USER_HZ = 100 ticks per second on Linux).
fn process_cpu_time() -> anyhow::Result<Duration> {
    const USER_HZ: u64 = 100;
    let stat = std::fs::read_to_string("/proc/self/stat").context("cannot read /proc/self/stat")?;
    // The command name (field 2) may hold spaces; fields after it are plain.
    let after_name = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("unexpected /proc/self/stat format")?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |field: usize| -> anyhow::Result<u64> {
        // fields[0] is field 3 (state)
        Ok(fields
            .get(field - 3)
            .context("unexpected /proc/self/stat format")?
            .parse()?)
    };
    let total = ticks(14)? + ticks(15)?;
    Ok(Duration::from_millis(total * 1000 / USER_HZ))
}

fn runtime(name: &str) -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .thread_name(name)
        .enable_all()
        .build()
        .with_context(|| format!("cannot start the {name} runtime"))
}

/// Writes root, issuer, a node token and a cluster file under `dir`.
fn prepare(dir: &std::path::Path) -> anyhow::Result<(IdentityConfig, String, Vec<Identity>)> {
    let root = generate_root(&CaSpec::valid_for(
        "root.bench",
        Duration::from_secs(86_400),
    ))?;
    let (issuer, _) = generate_issuer(
        &root.material(),
        &CaSpec::valid_for("issuer.bench", Duration::from_secs(3600)),
    )?;
    let anchors = dir.join("ca-bundle.crt");
    std::fs::write(&anchors, &root.cert_pem)?;
    let issuer_dir = dir.join("issuer");
    issuer.write_dir(&issuer_dir, Layout::Pem, false)?;
    let token = hex::encode(rand::random::<[u8; 32]>());
    let token_file = dir.join("node.token");
    std::fs::write(&token_file, &token)?;

    let mut cluster = ClusterFile::new("bench-identity");
    cluster.nodes.push(Node {
        name: NODE.into(),
        ip: "172.18.0.2".parse()?,
        pod_cidr: "10.244.0.0/24".parse()?,
        cgroup: "/sys/fs/cgroup/sealmesh-bench/node-0".into(),
        token_file: Some(token_file),
        netns: None,
    });
    cluster.namespaces.push(Namespace {
        name: NAMESPACE.into(),
        labels: [(MESH_LABEL.to_owned(), MESH_LABEL_ENABLED.to_owned())].into(),
        annotations: Default::default(),
    });
    for i in 0..SERVICE_ACCOUNTS {
        cluster.pods.push(Pod {
            name: format!("app-{i}"),
            namespace: NAMESPACE.into(),
            service_account: format!("sa-{i}"),
            ip: format!("10.244.0.{}", i + 2).parse()?,
            node: NODE.into(),
            cgroup: format!("/sys/fs/cgroup/sealmesh-bench/node-0/app-{i}").into(),
            labels: Default::default(),
            annotations: Default::default(),
            netns: None,
        });
    }
    let cluster_file = dir.join("cluster.yaml");
    cluster.save(&cluster_file)?;
    let identities = cluster
        .pods
        .iter()
        .map(|pod| cluster.identity_of(pod))
        .collect::<Result<_, _>>()?;

    let mut config = IdentityConfig::new(cluster_file, anchors, issuer_dir);
    config.listen = "127.0.0.1:0".parse()?;
    config.metrics_listen = "127.0.0.1:0".parse()?;
    // One client measuring the CA's own throughput: no per-caller rate.
    config.limits.caller_rate = None;
    Ok((config, token, identities))
}

fn certify_request(identity: &Identity, token: &str) -> anyhow::Result<CertifyRequest> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    // As Linkerd proxies do: CN = the identity's DNS name.
    let params = pki::identity_params(identity)?;
    Ok(CertifyRequest {
        identity: identity.dns_name(),
        token: token.as_bytes().to_vec(),
        certificate_signing_request: params.serialize_request(&key)?.der().to_vec(),
    })
}

/// Sends every request with `concurrency` in flight; fails on any refusal.
/// Returns each call's latency.
async fn fire(
    channels: &[Channel],
    requests: Vec<CertifyRequest>,
    concurrency: usize,
) -> anyhow::Result<Vec<Duration>> {
    let requests = Arc::new(requests);
    let next = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..concurrency)
        .map(|worker| {
            let mut client = IdentityClient::new(channels[worker % channels.len()].clone());
            let requests = requests.clone();
            let next = next.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(request) = requests.get(i) else {
                        return anyhow::Ok(latencies);
                    };
                    let started = Instant::now();
                    let response = client.certify(request.clone()).await?.into_inner();
                    latencies.push(started.elapsed());
                    if response.leaf_certificate.is_empty() {
                        bail!("the service returned an empty certificate");
                    }
                }
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(requests.len());
    for worker in workers {
        latencies.extend(worker.await.context("bench worker panicked")??);
    }
    Ok(latencies)
}
