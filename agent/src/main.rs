//! sealmesh-agent: one per node. Loads the eBPF redirection, keeps a
//! certificate per local ServiceAccount, and runs the TLS engine until
//! SIGINT/SIGTERM.

use std::{
    collections::BTreeSet, future::Future, net::SocketAddrV4, process::ExitCode, sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result};
use sealmesh_agent::{
    certs::{CertStore, CertStoreConfig},
    config::{Config, LogFormat},
    ebpf::{EbpfError, MeshedCgroups, RedirectConfig, Redirector},
    proxy::{Proxy, ProxyConfig},
    registry::{DEFAULT_POLL_INTERVAL, LocalRegistry, WorkloadRegistry},
};
use sealmesh_common::consts::OUTBOUND_PORT;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};
use tracing_subscriber::EnvFilter;

/// After a failed map update, how soon the cgroup sync tries again even
/// without a registry change.
const CGROUP_SYNC_RETRY: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    let config = match Config::load() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("sealmesh-agent: {error}");
            return ExitCode::from(2);
        }
    };
    init_tracing(&config);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
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

fn init_tracing(config: &Config) {
    // Validated by Config, so this parse cannot fail.
    let filter = EnvFilter::try_new(&config.log_level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match config.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

async fn run(config: Config) -> Result<()> {
    tracing::info!(%config, "sealmesh-agent starting");
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };

    let registry = LocalRegistry::load(&config.cluster_file, &config.node).with_context(|| {
        format!(
            "loading workloads of node {} from {}",
            config.node,
            config.cluster_file.display()
        )
    })?;
    let certs = CertStore::new(CertStoreConfig {
        identity_addr: config.identity_addr,
        token_file: config.token_file.clone(),
        trust_anchors_file: config.trust_anchors.clone(),
        trust_domain: config.trust_domain.clone(),
        renewal: Default::default(),
    })
    .context("starting the certificate store")?;
    let listener = SocketAddrV4::new(config.node_ip, OUTBOUND_PORT);
    let redirector = Arc::new(
        Redirector::load(&RedirectConfig {
            node_cgroup: config.node_cgroup.clone(),
            bpffs_dir: config.bpffs_dir.clone(),
            listener,
            // The agent reaches the identity service itself, but pods that
            // call it directly (none should) must not loop through the agent.
            excluded_ports: vec![config.identity_addr.port()],
            excluded_cidrs: Vec::new(),
        })
        .with_context(|| {
            format!(
                "loading the eBPF redirection at cgroup {} (pins under {})",
                config.node_cgroup.display(),
                config.bpffs_dir.display()
            )
        })?,
    );
    let registry_dyn: Arc<dyn WorkloadRegistry> = registry.clone();
    let proxy = Proxy::bind(
        ProxyConfig::for_node(config.node_ip, config.policy),
        registry_dyn.clone(),
        redirector.clone(),
        certs.clone(),
    )
    .await
    .context("starting the TLS engine")?;

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(registry.watch(DEFAULT_POLL_INTERVAL, stopped()));
    tasks.spawn(certs.run(registry_dyn.clone(), stopped()));
    tasks.spawn(sync_meshed_cgroups(registry_dyn, redirector, stopped()));
    tasks.spawn(proxy.run(stopped()));

    wait_for_signal().await?;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    while let Some(done) = tasks.join_next().await {
        if let Err(error) = done {
            tracing::error!(%error, "agent task failed during shutdown");
        }
    }
    tracing::info!("sealmesh-agent stopped");
    Ok(())
}

async fn wait_for_signal() -> Result<()> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    Ok(())
}

/// Keeps the eBPF meshed-cgroup map equal to the cgroups of this node's
/// meshed pods, on every registry change, until `shutdown`.
async fn sync_meshed_cgroups(
    registry: Arc<dyn WorkloadRegistry>,
    cgroups: Arc<dyn MeshedCgroups>,
    shutdown: impl Future<Output = ()>,
) {
    let mut changes = registry.subscribe();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let failed = match sync_once(registry.as_ref(), cgroups.as_ref()) {
            Ok(()) => false,
            Err(error) => {
                tracing::error!(%error, retry_in = ?CGROUP_SYNC_RETRY, "cannot update the meshed-cgroup map; affected pods are not redirected (their traffic is not secured) until this succeeds");
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

fn sync_once(
    registry: &dyn WorkloadRegistry,
    cgroups: &dyn MeshedCgroups,
) -> Result<(), EbpfError> {
    let wanted: BTreeSet<u64> = registry
        .local_workloads()
        .iter()
        .filter(|w| w.meshed)
        .filter_map(|w| w.cgroup_id)
        .collect();
    let present: BTreeSet<u64> = cgroups.ids()?.into_iter().collect();
    for &id in wanted.difference(&present) {
        cgroups.insert(id)?;
        tracing::info!(cgroup = id, "pod cgroup meshed");
    }
    for &id in present.difference(&wanted) {
        cgroups.remove(id)?;
        tracing::info!(cgroup = id, "pod cgroup no longer meshed");
    }
    Ok(())
}
