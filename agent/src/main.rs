//! sealmesh-agent: one per node. Loads the eBPF redirection, keeps a
//! certificate per local ServiceAccount, and runs the TLS engine until
//! SIGINT/SIGTERM.

use std::{
    collections::BTreeSet,
    future::Future,
    net::{IpAddr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    process::ExitCode,
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result};
use ipnet::Ipv4Net;
use sealmesh_agent::{
    admin::{self, AgentState, ConnectionTable},
    backoff,
    certs::{CertStore, CertStoreConfig},
    config::{
        AgentConfig, IdentityAddr, IdentityLocation, KubeSettings, LocalSettings, ServiceName,
        Source,
    },
    ebpf::{
        self, CgroupRole, CgroupRoles, EbpfError, RedirectConfig, Redirector,
        acceleration::{self, AccelerationChoice, KernelLimit},
        sync_roles,
    },
    handover::{HandoverServer, Listeners, Predecessor, Succession},
    inbound_policy::{self, InboundPolicyState},
    kube::{
        self as kube_mode, DEFAULT_STARTUP_TIMEOUT, KubeRegistry, KubeRegistryConfig, PodCgroups,
        trust_roots::{fetch_trust_roots, trust_roots_origin, watch_trust_roots},
    },
    metrics::{self, AgentMetrics, MetricsAccessCheck},
    proxy::{Proxy, ProxyConfig},
    registry::{DEFAULT_POLL_INTERVAL, LocalRegistry, WorkloadRegistry},
};
use sealmesh_common::{
    consts::{AGENT_STARTED_MESSAGE, OUTBOUND_PORT, SEALMESH_REMOVED_MESSAGE},
    host, logging,
};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};

/// After a failed map update, how soon the cgroup sync tries again even
/// without a registry change.
const CGROUP_SYNC_RETRY: Duration = Duration::from_secs(5);

/// How long a stopping agent asks the API whether its DaemonSet is gone.
const REMOVAL_CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a stopping agent waits for an announced successor to take its
/// listeners: a successor's start (eBPF, certificates) takes well under it.
const SUCCESSOR_WAIT: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    if args
        .next()
        .is_some_and(|first| first == acceleration::PROBE_ARG)
    {
        return acceleration::run_probe_process(args.next().map(PathBuf::from));
    }
    let config = match AgentConfig::load() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("sealmesh-agent: {error}");
            return ExitCode::from(2);
        }
    };
    init_tracing(&config);
    if config.uninstall {
        return match remove_from_node(&config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(()) => ExitCode::FAILURE,
        };
    }
    if let Err(error) = host::unblock_termination_signals() {
        tracing::warn!(%error, "cannot unblock SIGTERM and SIGINT; a graceful stop may not be possible");
    }
    raise_open_files_limit();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(usize::from(config.worker_threads))
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "cannot start the tokio runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("sealmesh-agent failed: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Every proxied connection holds two sockets: lift the soft limit on open
/// files to the hard limit, as a node proxy must serve thousands at once.
fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let raised = getrlimit(Resource::RLIMIT_NOFILE)
        .and_then(|(_, hard)| setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map(|()| hard));
    match raised {
        Ok(limit) => tracing::debug!(limit, "open files limit raised"),
        Err(error) => {
            tracing::warn!(%error, "cannot raise the open files limit; busy nodes may run out of sockets")
        }
    }
}

/// Loading the eBPF object parses the kernel's BTF: ~18 MB of heap at the
/// peak (heaptrack), all freed right after. glibc keeps most of those pages
/// because allocations that outlive the load sit between them, so they would
/// stay in the agent's RSS for its whole life: hand them back once.
fn release_freed_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim takes no pointers; it only returns the allocator's
    // own free pages to the kernel, and is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn init_tracing(config: &AgentConfig) {
    if let Err(error) = logging::init(&config.log_level, config.log_format) {
        // Validated when the flags were parsed.
        eprintln!("{error}");
    }
}

async fn run(config: AgentConfig) -> Result<()> {
    tracing::info!(%config, "sealmesh-agent starting");
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };

    let started = SystemTime::now();
    // Before the agent opens any connection: a previous agent's programs must see them as the
    // agent's (a pod cgroup nobody knows would be redirected).
    let agent_cgroups = agent_pod_cgroups(&config)?;
    Redirector::admit_agent(&config.bpffs_dir, &agent_cgroups).with_context(|| {
        format!(
            "marking the agent's cgroups in the pinned maps under {}",
            config.bpffs_dir.display()
        )
    })?;
    let predecessor = announce_to_running_agent(config.handover_socket.clone()).await;
    ebpf::lift_memlock_limit_if_charged()?;
    let kube_client = match &config.source {
        Source::Kubernetes(_) => Some(kube_mode::connect().await?),
        Source::Local(_) => None,
    };
    let identity_addr = match (&config.identity_addr, &kube_client) {
        (IdentityLocation::Address(addr), _) => resolve_identity_addr(addr).await?,
        (IdentityLocation::Service { service, port }, Some(client)) => {
            find_identity_service(client, service, *port).await?
        }
        (IdentityLocation::Service { .. }, None) => {
            unreachable!("a Service location is chosen only in kubernetes mode")
        }
    };
    let cert_config = CertStoreConfig {
        identity_addr,
        token_file: config.token_file.clone(),
        // Local mode reads the anchors from this file (set below);
        // kubernetes mode hands the store the ConfigMap's PEM instead.
        trust_anchors_file: PathBuf::new(),
        trust_domain: config.trust_domain.clone(),
        renewal: Default::default(),
        cache_dir: config.cert_cache_dir.clone(),
    };
    let (source, registry_dyn, certs) = match &config.source {
        Source::Local(local) => start_local(&config, local, cert_config)?,
        Source::Kubernetes(kube) => {
            let client = kube_client
                .clone()
                .expect("kubernetes mode connected above");
            start_kubernetes(&config, kube, cert_config, client).await?
        }
    };
    let node_ip = registry_dyn.local_node().ip;
    let listener = SocketAddrV4::new(node_ip, OUTBOUND_PORT);
    let redirector = Arc::new(
        Redirector::load(&RedirectConfig {
            node_cgroup: config.node_cgroup.clone(),
            bpffs_dir: config.bpffs_dir.clone(),
            listener,
            // Pods' connections to the identity service stay direct. Its
            // address, not its port, is excluded: excluding a port would
            // unmesh every app that listens on the same port.
            excluded_ports: Vec::new(),
            excluded_cidrs: identity_service_cidr(identity_addr).into_iter().collect(),
            sockmap_acceleration: AccelerationChoice::decide(config.sockmap_acceleration, || {
                match std::env::current_exe() {
                    Ok(agent_binary) => acceleration::probe_in_child(
                        &agent_binary,
                        &acceleration::probe_pin_dir(&config.bpffs_dir),
                    ),
                    Err(error) => vec![KernelLimit::Unsupported(format!(
                        "cannot find the agent's own binary to probe with: {error}"
                    ))],
                }
            }),
            pod_parent_cgroups: registry_dyn.pod_parent_cgroups(),
            meshed_pods: local_pod_cgroups(registry_dyn.as_ref(), true)
                .into_iter()
                .collect(),
            unmeshed_pods: local_pod_cgroups(registry_dyn.as_ref(), false)
                .into_iter()
                .collect(),
            agent_cgroups,
        })
        .with_context(|| {
            format!(
                "loading the eBPF redirection at cgroup {} (pins under {})",
                config.node_cgroup.display(),
                config.bpffs_dir.display()
            )
        })?,
    );
    release_freed_heap();
    let mut tasks = tokio::task::JoinSet::new();
    // Certificates first: connections arrive as soon as the agent listens.
    tasks.spawn(certs.clone().run(registry_dyn.clone(), stopped()));
    let missing = certs
        .wait_for_local_certificates(registry_dyn.as_ref(), config.certificate_wait)
        .await;
    if !missing.is_empty() {
        let missing: Vec<String> = missing.iter().map(ToString::to_string).collect();
        tracing::warn!(?missing, wait = ?config.certificate_wait,
            "listening without certificates for these identities; their pods' connections fail (closed, never in plaintext) until they are issued");
    }
    let mut listeners = match predecessor {
        Some(predecessor) => take_listeners(predecessor).await,
        None => Listeners::default(),
    };
    let mut proxy_config = ProxyConfig {
        pod_resolve_timeout: config.pod_resolve_timeout,
        plaintext_exemptions: config.plaintext_exemptions.clone(),
        max_connections_per_listener: config.max_connections_per_listener,
        ..ProxyConfig::for_node(node_ip, config.policy)
    };
    proxy_config
        .protected_local_ports
        .push(config.metrics_listen.port());
    let proxy = Proxy::bind_from(
        proxy_config,
        registry_dyn.clone(),
        redirector.clone(),
        certs.clone(),
        &mut listeners,
    )
    .await
    .context("starting the TLS engine")?;
    let admin_listener = admin::bind(config.admin_listen, &mut listeners)?;
    let metrics_listener = listeners
        .tcp(config.metrics_listen, std::net::TcpListener::bind)
        .with_context(|| {
            format!(
                "cannot listen on {} for metrics and health probes; choose another address with --metrics-listen",
                config.metrics_listen
            )
        })?;
    let connections = Arc::new(ConnectionTable::default());
    let inbound = Arc::new(InboundPolicyState::new(
        config.policy.default_inbound_policy,
        registry_dyn.clone(),
        redirector.clone(),
    ));
    let metrics = Arc::new(
        AgentMetrics::new(certs.clone(), inbound.clone()).with_source_health(registry_dyn.clone()),
    );
    let proxy_handle = proxy.handle();
    proxy_handle.add_observer(connections.clone());
    proxy_handle.add_observer(metrics.clone());
    let state = Arc::new(AgentState {
        node: config.node.clone(),
        node_ip: node_ip.to_string(),
        config_yaml: config.to_redacted_yaml(),
        started,
        registry: registry_dyn.clone(),
        certs: certs.clone(),
        datapath: redirector.clone(),
        proxy: proxy_handle.clone(),
        connections,
        inbound: inbound.clone(),
    });

    // Redirect the node's meshed pods before announcing the start, so that
    // "started" means their connections are secured (or fail closed).
    let meshed_pods = sync_once(registry_dyn.as_ref(), redirector.as_ref())
        .context("classifying the node's pod cgroups in the eBPF maps")?;
    let strict_pods = inbound_policy::sync_now(&inbound)
        .context("enforcing the strict inbound policy of the node's pods")?;
    let refusals = redirector
        .take_refusals()
        .context("watching the kernel's refusal reports")?;

    let handover = HandoverServer::listen(&config.handover_socket).with_context(|| {
        "a new agent could not take over this one's listeners, so the next rolling update would refuse connections"
    })?;
    let handover_file = handover.file();
    let mut succession = handover.spawn(listeners);
    // Accepting stops when the agent stops or a successor took the listeners.
    let accepting = {
        let succession = succession.clone();
        let stopped = stopped.clone();
        move || {
            let mut succession = succession.clone();
            let stopped = stopped();
            async move {
                tokio::select! {
                    () = stopped => {}
                    _ = succession.wait_for(|s| matches!(s, Succession::HandedOver { .. })) => {}
                }
            }
        }
    };
    // Kubernetes mode: asked at stop whether sealmesh is being removed.
    let removal_check = match &source {
        RegistrySource::Kubernetes { client, namespace } => {
            Some((client.clone(), namespace.clone()))
        }
        RegistrySource::Local(_) => None,
    };
    match source {
        RegistrySource::Local(registry) => {
            tasks.spawn(registry.watch(DEFAULT_POLL_INTERVAL, stopped()));
        }
        RegistrySource::Kubernetes { client, namespace } => {
            tasks.spawn(watch_trust_roots(
                client,
                namespace,
                certs.clone(),
                stopped(),
            ));
        }
    }
    if let (IdentityLocation::Service { service, port }, Some(client)) =
        (&config.identity_addr, kube_client)
    {
        let certs = certs.clone();
        let redirector = redirector.clone();
        tasks.spawn(kube_mode::follow_service_endpoints(
            client,
            service.clone(),
            *port,
            identity_addr,
            move |addr| {
                certs.retarget_identity_service(addr);
                // The old address may become a meshed pod's: it must be
                // redirected again, and the new one not.
                let excluded: Vec<Ipv4Net> = identity_service_cidr(addr).into_iter().collect();
                if let Err(error) = redirector.replace_excluded_cidrs(&excluded) {
                    tracing::error!(%error, identity = %addr, "cannot move the redirect's exclusion to the identity service's new address");
                }
            },
            stopped(),
        ));
    }
    tasks.spawn(sync_cgroup_roles(registry_dyn, redirector, stopped()));
    tasks.spawn(inbound_policy::sync_strict_pods(inbound.clone(), stopped()));
    if let Some(refusals) = refusals {
        tasks.spawn(inbound_policy::report_refusals(
            inbound,
            refusals,
            proxy_handle,
            stopped(),
        ));
    }
    tasks.spawn(proxy.run_until(accepting(), stopped()));
    tasks.spawn(state.clone().forget_departed(metrics.clone(), stopped()));
    tasks.spawn(metrics::serve_http(
        metrics_listener,
        metrics,
        state.clone(),
        MetricsAccessCheck::new(config.metrics_access.clone()),
        accepting(),
    ));
    tasks.spawn(async move {
        if let Err(error) = admin::serve(admin_listener, state, accepting()).await {
            tracing::error!(%error, "admin API stopped; the CLI cannot reach this agent");
        }
    });
    tracing::info!(meshed_pods, strict_pods, "{AGENT_STARTED_MESSAGE}");

    wait_for_signal(&mut succession).await?;
    wait_for_successor(&mut succession).await;
    let handed_over = *succession.borrow() != Succession::None;
    if !handed_over {
        HandoverServer::remove_file(&config.handover_socket, handover_file);
    }
    let uninstalling = !handed_over && sealmesh_removed(removal_check).await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    while let Some(done) = tasks.join_next().await {
        if let Err(error) = done {
            tracing::error!(%error, "agent task failed during shutdown");
        }
    }
    if uninstalling {
        tracing::info!(
            "sealmesh is being removed (the agent DaemonSet or its credentials are gone): removing it from this node"
        );
        let _ = remove_from_node(&config);
    }
    tracing::info!("sealmesh-agent stopped");
    Ok(())
}

/// What keeps the registry and trust anchors current, by mode.
enum RegistrySource {
    /// Polls the cluster file.
    Local(Arc<LocalRegistry>),
    /// The registry watches the API by itself; the trust roots watch runs
    /// with this client.
    Kubernetes {
        client: ::kube::Client,
        namespace: String,
    },
}

type Started = (RegistrySource, Arc<dyn WorkloadRegistry>, Arc<CertStore>);

fn start_local(
    config: &AgentConfig,
    local: &LocalSettings,
    cert_config: CertStoreConfig,
) -> Result<Started> {
    let registry = LocalRegistry::load(
        &local.cluster_file,
        &config.node,
        config.cluster_networks.all(),
    )
    .with_context(|| {
        format!(
            "loading workloads of node {} from {}",
            config.node,
            local.cluster_file.display()
        )
    })?;
    let certs = CertStore::new(CertStoreConfig {
        trust_anchors_file: local.trust_anchors.clone(),
        ..cert_config
    })
    .context("starting the certificate store")?;
    Ok((RegistrySource::Local(registry.clone()), registry, certs))
}

/// Reads this node, every watched kind and the trust roots from the API.
async fn start_kubernetes(
    config: &AgentConfig,
    kube: &KubeSettings,
    cert_config: CertStoreConfig,
    client: ::kube::Client,
) -> Result<Started> {
    let registry = KubeRegistry::start(
        client.clone(),
        KubeRegistryConfig {
            cluster_networks: config.cluster_networks.all(),
            ..KubeRegistryConfig::new(
                &config.node,
                config.trust_domain.clone(),
                kube.cgroup_root.clone(),
                &kube.namespace,
            )
        },
    )
    .await
    .with_context(|| {
        format!(
            "loading workloads of node {} from the Kubernetes API",
            config.node
        )
    })?;
    let deadline = tokio::time::Instant::now() + DEFAULT_STARTUP_TIMEOUT;
    let pem = fetch_trust_roots(&client, &kube.namespace, deadline).await?;
    let origin = trust_roots_origin(&kube.namespace);
    let certs = CertStore::with_trust_anchors_pem(cert_config, &origin, pem.as_bytes())
        .context("starting the certificate store")?;
    let source = RegistrySource::Kubernetes {
        client,
        namespace: kube.namespace.clone(),
    };
    Ok((source, registry, certs))
}

/// The identity service's address, resolving a DNS name (a Service's name in
/// kubernetes mode; cluster DNS may answer only after a while at boot).
async fn resolve_identity_addr(addr: &IdentityAddr) -> Result<SocketAddr> {
    let deadline = tokio::time::Instant::now() + DEFAULT_STARTUP_TIMEOUT;
    let resolved = backoff::STARTUP
        .retry_until(
            deadline,
            || addr.resolve(),
            |_| true,
            |error, delay| {
                tracing::warn!(%addr, %error, retry_in = ?delay, "cannot resolve the identity service address; retrying");
            },
        )
        .await
        .with_context(|| {
            format!("cannot resolve the identity service address {addr}; check --identity-addr and the node's DNS")
        })?;
    tracing::debug!(%addr, %resolved, "identity service address resolved");
    Ok(resolved)
}

/// A ready endpoint of the identity service's Service, from the API: the
/// agent needs no cluster DNS (which may itself wait for the mesh) to start.
async fn find_identity_service(
    client: &::kube::Client,
    service: &ServiceName,
    port: u16,
) -> Result<SocketAddr> {
    let deadline = tokio::time::Instant::now() + DEFAULT_STARTUP_TIMEOUT;
    let found = backoff::STARTUP
        .retry_until(
            deadline,
            || async {
                match kube_mode::service_endpoints(client, service, port).await {
                    Ok(endpoints) => endpoints.first().copied().ok_or_else(|| {
                        anyhow::anyhow!("the Service has no ready endpoint yet")
                    }),
                    Err(error) => Err(anyhow::Error::from(error)),
                }
            },
            |_| true,
            |error, delay| {
                tracing::warn!(%service, %error, retry_in = ?delay, "cannot find the identity service through the API; retrying");
            },
        )
        .await
        .with_context(|| {
            format!("no ready endpoint of the identity service's Service {service} port {port}; check that it runs (`kubectl -n {} get endpointslices -l kubernetes.io/service-name={}`), or pass --identity-addr", service.namespace, service.name)
        })?;
    tracing::info!(%service, endpoint = %found, "identity service found through the API");
    Ok(found)
}

/// The identity service's address as a /32, when it is IPv4 (the only
/// family the redirect programs handle).
fn identity_service_cidr(addr: SocketAddr) -> Option<Ipv4Net> {
    match addr.ip() {
        IpAddr::V4(ip) => Some(Ipv4Net::from(ip)),
        IpAddr::V6(_) => None,
    }
}

/// Waits for SIGTERM or SIGINT, saying when a successor took the listeners
/// meanwhile (this agent then only finishes its connections: exiting by
/// itself would make a kubelet restart it).
async fn wait_for_signal(succession: &mut watch::Receiver<Succession>) -> Result<()> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut announced_hand_over = false;
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM received"); return Ok(()) }
            _ = int.recv() => { tracing::info!("SIGINT received"); return Ok(()) }
            changed = succession.changed(), if !announced_hand_over => {
                if changed.is_err() {
                    announced_hand_over = true;
                } else if let Succession::HandedOver { pid } = *succession.borrow_and_update() {
                    tracing::info!(successor_pid = pid, "the new agent accepts this node's connections now; finishing the open ones, then idle until stopped");
                    announced_hand_over = true;
                }
            }
        }
    }
}

/// A successor that announced itself is waited for (at most
/// [`SUCCESSOR_WAIT`]) before stopping: while this agent still holds the
/// listeners, stopping first would refuse connections until the successor
/// binds its own.
async fn wait_for_successor(succession: &mut watch::Receiver<Succession>) {
    let Succession::Announced { pid } = *succession.borrow() else {
        return;
    };
    tracing::info!(successor_pid = pid, wait = ?SUCCESSOR_WAIT, "waiting for the new agent to take over the listeners before stopping");
    let settled = succession.wait_for(|s| !matches!(s, Succession::Announced { .. }));
    match tokio::time::timeout(SUCCESSOR_WAIT, settled).await {
        Ok(_) => {}
        Err(_) => tracing::warn!(
            successor_pid = pid,
            "the new agent did not take over the listeners in time; stopping anyway (connections are refused until it listens)"
        ),
    }
}

/// Whether sealmesh is being removed (Kubernetes mode: the agent's DaemonSet
/// or its credentials are gone): this stop is then not a restart.
async fn sealmesh_removed(removal_check: Option<(::kube::Client, String)>) -> bool {
    let Some((client, namespace)) = removal_check else {
        return false;
    };
    match tokio::time::timeout(
        REMOVAL_CHECK_TIMEOUT,
        kube_mode::sealmesh_being_removed(&client, &namespace),
    )
    .await
    {
        Ok(Ok(removed)) => removed,
        Ok(Err(error)) => {
            tracing::warn!(%error, "cannot tell whether the agent DaemonSet was deleted; keeping the redirection (meshed pods' connections fail closed until an agent runs again)");
            false
        }
        Err(_) => {
            tracing::warn!(timeout = ?REMOVAL_CHECK_TIMEOUT, "the API did not say whether the agent DaemonSet was deleted; keeping the redirection (meshed pods' connections fail closed until an agent runs again)");
            false
        }
    }
}

/// Removes sealmesh from this node: the eBPF pins (the programs detach once
/// no process holds them: this one exits next), the kept certificates and
/// the hand-over socket; the node's pods connect directly again.
fn remove_from_node(config: &AgentConfig) -> Result<(), ()> {
    let removed = Redirector::remove_pins(&config.bpffs_dir);
    if let Some(dir) = &config.cert_cache_dir
        && let Err(error) = std::fs::remove_dir_all(dir)
        && error.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(%error, dir = %dir.display(), "cannot delete the kept certificates");
    }
    if let Err(error) = std::fs::remove_file(&config.handover_socket)
        && error.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(%error, path = %config.handover_socket.display(), "cannot delete the hand-over socket");
    }
    match removed {
        Ok(()) => {
            tracing::info!(node = %config.node, bpffs_dir = %config.bpffs_dir.display(), "{SEALMESH_REMOVED_MESSAGE}");
            Ok(())
        }
        Err(error) => {
            tracing::error!(%error, bpffs_dir = %config.bpffs_dir.display(),
                "the redirection could not be removed; meshed pods' connections fail until `sealmesh-agent --uninstall` succeeds on this node");
            Err(())
        }
    }
}

/// Announces this agent to the one running on the node, if any.
async fn announce_to_running_agent(socket: PathBuf) -> Option<Predecessor> {
    let path = socket.clone();
    match tokio::task::spawn_blocking(move || Predecessor::announce(&path)).await {
        Ok(Ok(Some(predecessor))) => {
            tracing::info!(predecessor_pid = predecessor.pid(), handover_socket = %socket.display(),
                "an agent runs on this node; taking over its listening sockets once ready");
            Some(predecessor)
        }
        Ok(Ok(None)) => None,
        Ok(Err(error)) => {
            tracing::warn!(%error, "not taking over the running agent's listeners; binding the ports instead");
            None
        }
        Err(error) => {
            tracing::warn!(%error, "the hand-over announcement failed");
            None
        }
    }
}

/// The running agent's listening sockets; none (bind afresh) when it does
/// not hand them over.
async fn take_listeners(predecessor: Predecessor) -> Listeners {
    match tokio::task::spawn_blocking(move || predecessor.take_listeners()).await {
        Ok(Ok(inherited)) => Listeners::inheriting(inherited),
        Ok(Err(error)) => {
            tracing::warn!(%error, "the running agent did not hand over its listeners; binding the ports instead");
            Listeners::default()
        }
        Err(error) => {
            tracing::warn!(%error, "taking over the listeners failed; binding the ports instead");
            Listeners::default()
        }
    }
}

/// The agent's pod cgroup in Kubernetes mode, when its UID is given (the
/// redirector adds the cgroup the agent runs in by itself).
fn agent_pod_cgroups(config: &AgentConfig) -> Result<Vec<u64>> {
    let Source::Kubernetes(KubeSettings {
        cgroup_root,
        agent_pod_uid: Some(uid),
        ..
    }) = &config.source
    else {
        return Ok(Vec::new());
    };
    let cgroups = PodCgroups::new(cgroup_root.clone());
    let found = cgroups.find(uid).with_context(|| {
        format!(
            "the agent's pod (UID {uid}, SEALMESH_POD_UID) has no cgroup under --cgroup-root {}; \
             point --cgroup-root at the host's cgroup2 mount as the kubelet uses it",
            cgroup_root.display()
        )
    })?;
    tracing::debug!(uid, cgroup = %found.dir.display(), "agent pod cgroup found");
    Ok(vec![found.id])
}

/// Keeps the eBPF cgroup maps equal to the registry's view of this node
/// (meshed and unmeshed pods, pod parents), on every registry change,
/// until `shutdown`.
async fn sync_cgroup_roles(
    registry: Arc<dyn WorkloadRegistry>,
    cgroups: Arc<dyn CgroupRoles>,
    shutdown: impl Future<Output = ()>,
) {
    let mut changes = registry.subscribe();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let failed = match sync_once(registry.as_ref(), cgroups.as_ref()) {
            Ok(_) => false,
            Err(error) => {
                tracing::error!(%error, retry_in = ?CGROUP_SYNC_RETRY, "cannot update the eBPF cgroup maps; affected pods are classified from stale entries (new pods are held or refused) until this succeeds");
                true
            }
        };
        tokio::select! {
            () = &mut shutdown => return,
            changed = changes.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(CGROUP_SYNC_RETRY), if failed => {}
        }
    }
}

/// The cgroups of this node's pods that are (or are not) meshed.
fn local_pod_cgroups(registry: &dyn WorkloadRegistry, meshed: bool) -> BTreeSet<u64> {
    registry
        .local_workloads()
        .iter()
        .filter(|w| w.meshed == meshed)
        .filter_map(|w| w.cgroup_id)
        .collect()
}

/// Returns how many pod cgroups are meshed now.
fn sync_once(
    registry: &dyn WorkloadRegistry,
    cgroups: &dyn CgroupRoles,
) -> Result<usize, EbpfError> {
    let meshed = local_pod_cgroups(registry, true);
    let meshed_count = meshed.len();
    let wanted = [
        (CgroupRole::MeshedPod, meshed),
        (CgroupRole::UnmeshedPod, local_pod_cgroups(registry, false)),
        (
            CgroupRole::PodParent,
            registry.pod_parent_cgroups().into_iter().collect(),
        ),
    ];
    let synced = sync_roles(cgroups, &wanted);
    let applied = match &synced {
        Ok(applied) | Err(EbpfError::CgroupSyncIncomplete { applied, .. }) => applied.clone(),
        Err(_) => Vec::new(),
    };
    for (role, changes) in applied {
        for cgroup in changes.added {
            tracing::info!(cgroup, role = role.describe(), "cgroup classified");
        }
        for cgroup in changes.removed {
            tracing::info!(
                cgroup,
                role = role.describe(),
                "cgroup no longer classified"
            );
        }
    }
    synced.map(|_| meshed_count)
}

#[cfg(test)]
mod tests {
    use std::{
        net::{Ipv4Addr, SocketAddrV4},
        sync::Mutex,
    };

    use sealmesh_agent::registry::{Endpoint, NodeInfo, Workload};
    use sealmesh_common::identity::TrustDomain;

    use super::*;

    struct Workloads {
        node: NodeInfo,
        trust_domain: TrustDomain,
        local: Vec<Arc<Workload>>,
        version: watch::Sender<u64>,
    }

    impl WorkloadRegistry for Workloads {
        fn local_node(&self) -> &NodeInfo {
            &self.node
        }
        fn trust_domain(&self) -> &TrustDomain {
            &self.trust_domain
        }
        fn by_cgroup(&self, _: u64) -> Option<Arc<Workload>> {
            None
        }
        fn by_ip(&self, _: Ipv4Addr) -> Option<Arc<Workload>> {
            None
        }
        fn resolve(&self, _: SocketAddrV4) -> Option<Endpoint> {
            None
        }
        fn local_workloads(&self) -> Vec<Arc<Workload>> {
            self.local.clone()
        }
        fn in_cluster_network(&self, _: Ipv4Addr) -> bool {
            false
        }
        fn served_outside_pods(&self, _: SocketAddrV4) -> bool {
            false
        }
        fn pod_parent_cgroups(&self) -> Vec<u64> {
            vec![1]
        }
        fn subscribe(&self) -> watch::Receiver<u64> {
            self.version.subscribe()
        }
    }

    /// The maps as sets, recording every change in order.
    #[derive(Default)]
    struct Maps {
        sets: Mutex<std::collections::BTreeMap<CgroupRole, BTreeSet<u64>>>,
        log: Mutex<Vec<(&'static str, CgroupRole, u64)>>,
        /// Insertions of this id fail (a full map, a kernel error).
        failing: Mutex<Option<u64>>,
    }

    impl CgroupRoles for Maps {
        fn insert(&self, role: CgroupRole, id: u64) -> Result<(), EbpfError> {
            if *self.failing.lock().unwrap() == Some(id) {
                return Err(EbpfError::PinDir {
                    path: "MESHED_PODS".into(),
                    source: std::io::Error::from_raw_os_error(libc::E2BIG),
                });
            }
            self.sets
                .lock()
                .unwrap()
                .entry(role)
                .or_default()
                .insert(id);
            self.log.lock().unwrap().push(("insert", role, id));
            Ok(())
        }
        fn remove(&self, role: CgroupRole, id: u64) -> Result<(), EbpfError> {
            self.sets
                .lock()
                .unwrap()
                .entry(role)
                .or_default()
                .remove(&id);
            self.log.lock().unwrap().push(("remove", role, id));
            Ok(())
        }
        fn ids(&self, role: CgroupRole) -> Result<Vec<u64>, EbpfError> {
            let sets = self.sets.lock().unwrap();
            Ok(sets.get(&role).into_iter().flatten().copied().collect())
        }
    }

    fn pod(name: &str, meshed: bool, cgroup_id: Option<u64>) -> Arc<Workload> {
        Arc::new(Workload {
            name: name.into(),
            namespace: "app".into(),
            service_account: name.into(),
            identity: TrustDomain::default().identity("app", name).unwrap(),
            ip: Some(Ipv4Addr::new(10, 244, 0, 2)),
            node: "node-0".into(),
            node_ip: Ipv4Addr::new(172, 18, 0, 2),
            meshed,
            inbound_policy: Default::default(),
            cgroup_id,
            authz: Default::default(),
        })
    }

    #[test]
    fn maps_hold_exactly_the_local_pods_by_meshing_and_the_pod_parents() {
        let mut registry = Workloads {
            node: NodeInfo {
                name: "node-0".into(),
                ip: Ipv4Addr::new(172, 18, 0, 2),
            },
            trust_domain: TrustDomain::default(),
            local: vec![
                pod("web", true, Some(11)),
                pod("vote", true, Some(12)),
                pod("opted-out", false, Some(13)),
                pod("no-cgroup-yet", true, None),
            ],
            version: watch::Sender::new(0),
        };
        let maps = Maps::default();
        // 99: a pod that left the node; 12: already there.
        for id in [12, 99] {
            maps.insert(CgroupRole::MeshedPod, id).unwrap();
        }
        assert_eq!(sync_once(&registry, &maps).unwrap(), 2);
        assert_eq!(maps.ids(CgroupRole::MeshedPod).unwrap(), [11, 12]);
        assert_eq!(maps.ids(CgroupRole::UnmeshedPod).unwrap(), [13]);
        assert_eq!(maps.ids(CgroupRole::PodParent).unwrap(), [1]);

        // web leaves the mesh, opted-out joins it: each is added to its new
        // map before it leaves the old one.
        registry.local = vec![
            pod("web", false, Some(11)),
            pod("opted-out", true, Some(13)),
        ];
        maps.log.lock().unwrap().clear();
        sync_once(&registry, &maps).unwrap();
        assert_eq!(maps.ids(CgroupRole::MeshedPod).unwrap(), [13]);
        assert_eq!(maps.ids(CgroupRole::UnmeshedPod).unwrap(), [11]);
        assert_eq!(
            *maps.log.lock().unwrap(),
            [
                ("insert", CgroupRole::MeshedPod, 13),
                ("insert", CgroupRole::UnmeshedPod, 11),
                ("remove", CgroupRole::MeshedPod, 11),
                ("remove", CgroupRole::MeshedPod, 12),
                ("remove", CgroupRole::UnmeshedPod, 13),
            ]
        );

        // One failed update does not hold back the others: 14 joins, 13
        // cannot move (it keeps its old role, never none), 11 leaves.
        registry.local = vec![
            pod("opted-out", false, Some(13)),
            pod("new", true, Some(14)),
        ];
        *maps.failing.lock().unwrap() = Some(13);
        let error = sync_once(&registry, &maps).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("1 cgroup map update(s) failed, the others were applied"),
            "{error}"
        );
        assert_eq!(maps.ids(CgroupRole::MeshedPod).unwrap(), [13, 14]);
        assert_eq!(maps.ids(CgroupRole::UnmeshedPod).unwrap(), [] as [u64; 0]);
        // The next sync completes it.
        *maps.failing.lock().unwrap() = None;
        sync_once(&registry, &maps).unwrap();
        assert_eq!(maps.ids(CgroupRole::MeshedPod).unwrap(), [14]);
        assert_eq!(maps.ids(CgroupRole::UnmeshedPod).unwrap(), [13]);
    }

    #[test]
    fn excludes_the_identity_service_address_not_its_port() {
        assert_eq!(
            identity_service_cidr("172.18.0.1:8080".parse().unwrap()),
            Some("172.18.0.1/32".parse().unwrap())
        );
        assert_eq!(identity_service_cidr("[::1]:8080".parse().unwrap()), None);
    }
}
