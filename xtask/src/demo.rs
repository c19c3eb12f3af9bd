//! `cargo xtask demo`: sealmesh's main job, shown on a local 2-node testbed.
//!
//! An emojivoto-like app runs in the meshed namespace `emojivoto`, whose
//! inbound policy is strict (annotation `sealmesh.io/inbound-policy: strict`):
//! `vote-bot` asks `web` (same node) through its Service every interval, on
//! fresh and persistent connections; `web` relays each request to `emoji` and
//! `voting` (the other node) through their Services. `vote-bot` also asks
//! `legacy/leaderboard`, a pod of an unmeshed namespace. The demo prints the
//! cluster, then runs the operator's commands against the agents' admin API:
//! `sealmesh edges` (every meshed pair secured, with both identities; the
//! unmeshed one with the reason it is not), `sealmesh tap` (live connections)
//! for the duration, during which `leaderboard` tries plaintext to `voting`
//! and the kernel refuses it (a `refused` tap line), and `vote-bot` tries
//! `voting` directly, which the authorization policy `voting-from-web`
//! (only `web` may call `voting`) denies at once (a `denied policy=` tap
//! line), `sealmesh why` for both attempts, and `sealmesh edges` again after
//! the run, with one denied pair among the allowed ones. During the live part
//! an agent that exits is reported and started again, as the kubelet
//! restarts a DaemonSet pod; `sealmesh tap` reconnects to it by itself, and
//! its notes (an agent away, back) are shown with its lines.

use std::{
    collections::BTreeMap,
    io::{self, BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use nix::sys::signal::{SigSet, Signal};
use sealmesh_common::{
    authz::AuthorizationPolicy,
    cluster::{ClusterFile, Service, ServicePort},
    consts::{
        DEFAULT_TRUST_DOMAIN, INBOUND_POLICY_ANNOTATION, INBOUND_POLICY_STRICT, MESH_LABEL,
        MESH_LABEL_ENABLED,
    },
};
use serde::Deserialize;

use crate::{
    cmd,
    mesh::{Mesh, MeshError, MeshOptions, locate_binary},
    testapp::{self, BotReport},
    testbed::{
        ChildGuard, PodSpec, TestbedError, TestbedSpec,
        kube::{KubeApi, KubeMode},
        layout::SERVICE_CIDR,
    },
};

/// The meshed application's namespace.
pub const APP_NAMESPACE: &str = "emojivoto";
/// A namespace without the mesh label: its pods are not meshed.
pub const LEGACY_NAMESPACE: &str = "legacy";
/// Port every app pod listens on.
const APP_PORT: u16 = 8080;
/// Port every Service exposes.
const SERVICE_PORT: u16 = 80;
/// How often the demo forwards the tap's lines and the bot's reports.
const POLL: Duration = Duration::from_millis(100);
/// Traffic before the first edges table, so that every edge is there.
const WARM_UP: Duration = Duration::from_secs(2);
/// How long `sealmesh tap` may take to reach the agents before its timeout
/// starts counting.
const TAP_START_MARGIN: Duration = Duration::from_secs(5);
/// Time for the agents to record the connections that closed when the bot
/// stopped.
const CLOSE_GRACE: Duration = Duration::from_millis(500);
/// The plaintext attempt on the strict namespace: from this unmeshed pod ...
const PLAINTEXT_FROM: (&str, &str) = (LEGACY_NAMESPACE, "leaderboard");
/// ... to this pod, directly at its address (not through its Service).
const PLAINTEXT_TO: (&str, &str) = (APP_NAMESPACE, "voting");
/// The attempt's connect timeout: the kernel drops its SYN, so it times out.
const PLAINTEXT_TIMEOUT_SECS: &str = "2";
/// The authorization policy of the app: only `web` may call `voting` ...
pub const VOTING_POLICY: &str = "voting-from-web";
/// ... so this mTLS attempt from a meshed pod is denied.
const DENIED_FROM: (&str, &str) = (APP_NAMESPACE, "vote-bot");
const DENIED_TO: (&str, &str) = (APP_NAMESPACE, "voting");
/// A denied client is reset at once; this only bounds a misbehaving mesh.
const DENIED_TIMEOUT_SECS: &str = "5";

/// A workload of the demo app: pod, ServiceAccount, node and Service.
struct Workload {
    namespace: &'static str,
    name: &'static str,
    node: usize,
    /// Offset of the Service VIP in the Service range; None: no Service.
    vip_offset: Option<u32>,
}

const WORKLOADS: [Workload; 5] = [
    Workload {
        namespace: APP_NAMESPACE,
        name: "vote-bot",
        node: 0,
        vip_offset: None,
    },
    Workload {
        namespace: APP_NAMESPACE,
        name: "web",
        node: 0,
        vip_offset: Some(10),
    },
    Workload {
        namespace: APP_NAMESPACE,
        name: "emoji",
        node: 1,
        vip_offset: Some(11),
    },
    Workload {
        namespace: APP_NAMESPACE,
        name: "voting",
        node: 1,
        vip_offset: Some(12),
    },
    Workload {
        namespace: LEGACY_NAMESPACE,
        name: "leaderboard",
        node: 1,
        vip_offset: Some(20),
    },
];

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(
        "`cargo xtask demo` needs root: it creates network namespaces and cgroups and loads eBPF programs; run `sudo -E cargo xtask demo`"
    )]
    NotRoot,
    #[error(transparent)]
    Mesh(#[from] MeshError),
    #[error(transparent)]
    Testbed(#[from] TestbedError),
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("the testbed lacks the app's pod {0} (a bug in the demo's spec)")]
    MissingPod(String),
    #[error("the testbed lacks the app's Service {0} (a bug in the demo's spec)")]
    MissingService(String),
    #[error("writing the demo's output: {0}")]
    Output(io::Error),
    #[error("`{command}` failed ({status}): {stderr}")]
    Cli {
        command: String,
        status: ExitStatus,
        stderr: String,
    },
    #[error(
        "`{command}` printed JSON the demo cannot read (is sealmesh built from this tree?): {source}"
    )]
    CliOutput {
        command: String,
        source: serde_json::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> DemoError {
    let what = what.into();
    move |source| DemoError::Io { what, source }
}

/// `cargo xtask demo` flags.
#[derive(Clone, Debug, clap::Args)]
pub struct DemoArgs {
    /// How long to show live traffic before tearing down.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Show live traffic until Ctrl-C instead.
    #[arg(long, conflicts_with = "duration")]
    pub follow: bool,
    /// One more flag for every agent, e.g. `--agent-arg=--force-mtls-local`;
    /// repeat for several.
    #[arg(long = "agent-arg", value_name = "FLAG", allow_hyphen_values = true)]
    pub agent_args: Vec<String>,
    /// Run the identity service and the agents in Kubernetes mode: the testbed registers its
    /// nodes, pods and Services with an API server as kubelets and controllers would (no
    /// kubelet, scheduler or controller-manager needed) [default API server: an in-process
    /// fake one].
    #[arg(long)]
    pub kubernetes: bool,
    /// Admin kubeconfig of a real API server (kube-apiserver v1.28+) for --kubernetes, e.g.
    /// `--kubeconfig "$KUBECONFIG"`. Never read from the environment implicitly: the demo
    /// creates and deletes objects there.
    #[arg(long, requires = "kubernetes", value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
}

/// What [`run`] does.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// How long to show live traffic; None: until `stop` is set.
    pub duration: Option<Duration>,
    /// Time between the vote-bot's rounds (one request to each target).
    pub bot_interval: Duration,
    /// Flags for every agent beyond what the mesh harness passes (cluster,
    /// node, pins, logging).
    pub agent_args: Vec<String>,
    /// Kubernetes mode and its API server; None: local mode (cluster file).
    pub kubernetes: Option<KubeMode>,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            duration: Some(Duration::from_secs(20)),
            bot_interval: Duration::from_millis(200),
            agent_args: Vec::new(),
            kubernetes: None,
        }
    }
}

/// `cargo xtask demo`: builds the workspace, runs the demo, fails if the mesh
/// misbehaved.
pub fn main(args: &DemoArgs) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        return Err(DemoError::NotRoot.into());
    }
    // Before any thread starts, so that every thread inherits the blocked mask.
    let stop = stop_on_signals()?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let built = cmd::run_visible(Command::new(cargo).args(["build", "--workspace"]));
    if stop.load(Ordering::SeqCst) {
        bail!("interrupted while building the workspace");
    }
    built.context("building the workspace")?;
    let options = DemoOptions {
        duration: (!args.follow).then_some(args.duration),
        agent_args: args.agent_args.clone(),
        kubernetes: args.kubernetes.then(|| match &args.kubeconfig {
            Some(kubeconfig) => KubeMode::external(kubeconfig),
            None => KubeMode::fake(),
        }),
        ..DemoOptions::default()
    };
    let summary = match run(&options, &stop, &mut io::stdout()) {
        Ok(summary) => summary,
        // Ctrl-C also stops the agents and the app; whatever failed after it
        // is no news. The testbed is gone either way.
        Err(e) if stop.load(Ordering::SeqCst) => {
            println!("interrupted ({e}); everything torn down");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    println!("testbed {} torn down", summary.testbed);
    if summary.interrupted {
        return Ok(());
    }
    let problems = summary.problems();
    if !problems.is_empty() {
        bail!("the mesh misbehaved: {}", problems.join("; "));
    }
    Ok(())
}

/// Blocks SIGINT and SIGTERM in the calling thread (and the threads it
/// starts later) and sets the returned flag when one arrives, so Ctrl-C ends
/// the demo through its normal teardown. Call before starting threads.
pub fn stop_on_signals() -> Result<Arc<AtomicBool>, DemoError> {
    let signals = SigSet::from_iter([Signal::SIGINT, Signal::SIGTERM]);
    signals
        .thread_block()
        .map_err(|e| io_err("blocking SIGINT and SIGTERM")(e.into()))?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    std::thread::Builder::new()
        .name("demo-signals".into())
        .spawn(move || {
            if let Ok(signal) = signals.wait() {
                eprintln!("{signal}: stopping the demo and tearing everything down");
                flag.store(true, Ordering::SeqCst);
            }
        })
        .map_err(io_err("starting the signal thread"))?;
    Ok(stop)
}

/// The demo's testbed: 2 nodes, the app's pods, ServiceAccounts and Services;
/// the app's namespace is meshed and strict.
pub fn spec() -> TestbedSpec {
    let mut spec = TestbedSpec::new(2)
        .namespace(APP_NAMESPACE, &[(MESH_LABEL, MESH_LABEL_ENABLED)])
        .namespace_annotation(
            APP_NAMESPACE,
            INBOUND_POLICY_ANNOTATION,
            INBOUND_POLICY_STRICT,
        )
        .namespace(LEGACY_NAMESPACE, &[]);
    for w in &WORKLOADS {
        spec = spec.pod(PodSpec::new(w.namespace, w.name, w.name, w.node).label("app", w.name));
        if let Some(offset) = w.vip_offset {
            spec = spec.service(Service {
                name: w.name.into(),
                namespace: w.namespace.into(),
                vip: service_vip(offset),
                ports: vec![ServicePort {
                    name: None,
                    port: SERVICE_PORT,
                    target_port: APP_PORT,
                }],
                selector: BTreeMap::from([("app".into(), w.name.into())]),
            });
        }
    }
    spec.authorization_policy(voting_policy())
}

/// `voting` admits only `web`'s identity (ALLOW by principal).
fn voting_policy() -> AuthorizationPolicy {
    let spec = format!(
        "{{ selector: {{ matchLabels: {{ app: voting }} }}, action: ALLOW, rules: [{{ from: [{{ source: {{ principals: [\"{DEFAULT_TRUST_DOMAIN}/ns/{APP_NAMESPACE}/sa/web\"] }} }}] }}] }}"
    );
    AuthorizationPolicy {
        name: VOTING_POLICY.into(),
        namespace: APP_NAMESPACE.into(),
        annotations: BTreeMap::new(),
        spec: serde_yaml_ng::from_str(&spec).expect("the demo's policy is valid YAML"),
    }
}

fn service_vip(offset: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(SERVICE_CIDR.network()) + offset)
}

/// Brings the mesh and the app up, shows the edges, live connections for
/// `options.duration` (or until `stop`) and the edges again through the
/// operator CLI, tears everything down and returns what it saw.
pub fn run(
    options: &DemoOptions,
    stop: &AtomicBool,
    out: &mut dyn Write,
) -> Result<DemoSummary, DemoError> {
    let testapp = testapp::locate().map_err(io_err("locating testapp"))?;
    let sealmesh = locate_binary("sealmesh")?;
    let mode = match options.kubernetes.as_ref().map(|k| &k.api) {
        None => "local mode: a cluster file".to_owned(),
        Some(KubeApi::Fake) => "Kubernetes mode: an in-process API server".to_owned(),
        Some(KubeApi::Kubeconfig(path)) => {
            format!("Kubernetes mode: the API server of {}", path.display())
        }
    };
    writeln!(
        out,
        "bringing up a 2-node testbed, the identity service and one agent per node ({mode})"
    )
    .map_err(DemoError::Output)?;
    let mut mesh = Mesh::up(
        &spec(),
        MeshOptions {
            agent_args: options.agent_args.clone(),
            kubernetes: options.kubernetes.clone(),
            ..MeshOptions::default()
        },
    )?;
    let cluster = mesh.testbed().cluster().clone();
    print_cluster(&mesh, out).map_err(DemoError::Output)?;
    let cli = OperatorCli {
        binary: &sealmesh,
        mesh: &mesh,
    };
    let mut summary = DemoSummary {
        testbed: mesh.testbed().id().to_string(),
        ..DemoSummary::default()
    };

    let mut app = App::start(&mesh, &testapp, options.bot_interval)?;
    // A few rounds of traffic, so that every edge exists for the table.
    let warm_up_end = Instant::now() + WARM_UP;
    while Instant::now() < warm_up_end && !stop.load(Ordering::SeqCst) {
        std::thread::sleep(POLL);
        app.tally_bot(&mut summary.bot, out)?;
    }
    cli.show_edges(out)?;

    let (tap, tap_lines, tap_notes) = cli.start_tap(options.duration, out)?;
    // The tap ends by itself after the duration; the margin covers its start.
    let deadline = options
        .duration
        .map(|d| Instant::now() + d + TAP_START_MARGIN);
    let plaintext_node = cluster
        .pod(PLAINTEXT_TO.0, PLAINTEXT_TO.1)
        .map(|p| p.node.clone())
        .ok_or_else(|| DemoError::MissingPod(format!("{}/{}", PLAINTEXT_TO.0, PLAINTEXT_TO.1)))?;
    let mut attempt = PlaintextAttempt::NotYet;
    let mut denied_attempt = None;
    loop {
        let tap_ended = loop {
            match tap_lines.try_recv() {
                Ok(line) => {
                    writeln!(out, "{line}").map_err(DemoError::Output)?;
                    // Once the strict pod's agent streams, its refusal will show.
                    if matches!(attempt, PlaintextAttempt::NotYet)
                        && line.contains(&format!(" id={plaintext_node}:"))
                    {
                        attempt = PlaintextAttempt::Running(app.try_plaintext(&mesh, out)?);
                        denied_attempt = Some(app.try_denied(&mesh, out)?);
                    }
                    summary.tap_lines.push(line);
                }
                Err(mpsc::TryRecvError::Empty) => break false,
                Err(mpsc::TryRecvError::Disconnected) => break true,
            }
        };
        // tap's notes on stderr (it started; an agent is away or back).
        for note in tap_notes.try_iter() {
            writeln!(out, "{note}").map_err(DemoError::Output)?;
        }
        if let PlaintextAttempt::Running(client) = &mut attempt
            && let Some(outcome) = plaintext_outcome(client, out)?
        {
            summary.plaintext_refused = Some(outcome);
            attempt = PlaintextAttempt::Done;
        }
        app.tally_bot(&mut summary.bot, out)?;
        if !stop.load(Ordering::SeqCst) {
            restart_exited_agents(&mut mesh, stop, &mut summary, out)?;
        }
        if tap_ended || stop.load(Ordering::SeqCst) || deadline.is_some_and(|d| Instant::now() >= d)
        {
            break;
        }
        std::thread::sleep(POLL);
    }
    tap.kill();
    summary.interrupted = stop.load(Ordering::SeqCst);
    if let PlaintextAttempt::Running(client) = attempt {
        client.kill();
    }
    let cli = OperatorCli {
        binary: &sealmesh,
        mesh: &mesh,
    };
    if summary.plaintext_refused.is_some() {
        summary.why = Some(cli.show_why(PLAINTEXT_FROM, PLAINTEXT_TO, out)?);
    }
    if let Some(client) = denied_attempt {
        let output = client
            .wait_with_output()
            .map_err(io_err("waiting for the denied attempt"))?;
        let denied = !output.status.success();
        let verdict = if denied {
            format!(
                "# denied: authorization policy {APP_NAMESPACE}/{VOTING_POLICY} reset vote-bot's connection (see the denied line)"
            )
        } else {
            format!(
                "# ACCEPTED: vote-bot reached voting despite {APP_NAMESPACE}/{VOTING_POLICY} (the mesh misbehaved)"
            )
        };
        writeln!(out, "{verdict}").map_err(DemoError::Output)?;
        summary.policy_denied = Some(denied);
        summary.policy_why = Some(cli.show_why(DENIED_FROM, DENIED_TO, out)?);
    }
    // Stop the bot before the last table: its persistent connections close
    // while the agents still run, so they are counted too.
    app.stop_bot();
    std::thread::sleep(CLOSE_GRACE);
    app.tally_bot(&mut summary.bot, out)?;
    match cli.show_edges(out).and_then(|()| cli.edges(&cluster)) {
        Ok(edges) => summary.edges = edges,
        // Ctrl-C in a terminal reaches the agents too (they share its process
        // group): there may be nobody left to ask.
        Err(e) if summary.interrupted => {
            writeln!(out, "no final edges: {e}").map_err(DemoError::Output)?;
        }
        Err(e) => return Err(e),
    }
    writeln!(
        out,
        "\nvote-bot: {} requests answered, {} failed",
        summary.bot.ok, summary.bot.failed
    )
    .map_err(DemoError::Output)?;
    writeln!(out, "tearing down").map_err(DemoError::Output)?;
    drop(app);
    drop(mesh);
    Ok(summary)
}

/// Starts a new agent for each one that exited, as the kubelet restarts a
/// DaemonSet's pod, and says so; `sealmesh tap` reconnects by itself.
fn restart_exited_agents(
    mesh: &mut Mesh,
    stop: &AtomicBool,
    summary: &mut DemoSummary,
    out: &mut dyn Write,
) -> Result<(), DemoError> {
    for (node, status) in mesh.reap_exited_agents()? {
        writeln!(
            out,
            "\n# the agent of {node} exited ({status}); starting a new one, as the kubelet restarts a DaemonSet pod (log {})",
            mesh.agent_log(&node).display()
        )
        .map_err(DemoError::Output)?;
        summary.agent_exits.push(format!("{node} ({status})"));
        // Ctrl-C reaches the agents too: no restart once the demo stops.
        if stop.load(Ordering::SeqCst) {
            break;
        }
        mesh.start_agent(&node)?;
        writeln!(out, "# the agent of {node} is running again").map_err(DemoError::Output)?;
    }
    Ok(())
}

fn print_cluster(mesh: &Mesh, out: &mut dyn Write) -> io::Result<()> {
    let testbed = mesh.testbed();
    let cluster = testbed.cluster();
    writeln!(
        out,
        "\ncluster {} (cluster file {})",
        testbed.id(),
        testbed.cluster_file_path().display()
    )?;
    if let Some(identity) = &cluster.identity {
        writeln!(out, "  identity service  {}", identity.address)?;
    }
    for namespace in &cluster.namespaces {
        let meshed = namespace
            .labels
            .get(MESH_LABEL)
            .is_some_and(|v| v == MESH_LABEL_ENABLED);
        let policy = namespace
            .annotations
            .get(INBOUND_POLICY_ANNOTATION)
            .map(|p| format!(", inbound {p} ({INBOUND_POLICY_ANNOTATION}={p}: plaintext from outside the mesh is refused by the kernel)"))
            .unwrap_or_default();
        writeln!(
            out,
            "  namespace {}: {}{policy}",
            namespace.name,
            if meshed { "meshed" } else { "not meshed" }
        )?;
    }
    for node in &cluster.nodes {
        writeln!(
            out,
            "  {}  {}  pods {}  agent log {}",
            node.name,
            node.ip,
            node.pod_cidr,
            mesh.agent_log(&node.name).display()
        )?;
        for pod in cluster.pods_on(&node.name) {
            let identity = if cluster.is_meshed(pod) {
                cluster
                    .identity_of(pod)
                    .map(|id| id.spiffe_uri())
                    .unwrap_or_else(|e| format!("invalid identity: {e}"))
            } else {
                format!(
                    "not meshed (namespace {} lacks {MESH_LABEL}={MESH_LABEL_ENABLED})",
                    pod.namespace
                )
            };
            writeln!(
                out,
                "    {:<20} {:<11} {identity}",
                format!("{}/{}", pod.namespace, pod.name),
                pod.ip
            )?;
        }
    }
    writeln!(out, "  services")?;
    for service in &cluster.services {
        for port in &service.ports {
            writeln!(
                out,
                "    {:<20} {}:{} -> pods app={}:{}",
                format!("{}/{}", service.namespace, service.name),
                service.vip,
                port.port,
                service.name,
                port.target_port
            )?;
        }
    }
    Ok(())
}

/// The app's processes; killed on drop.
struct App {
    // The bot first, so it stops before the servers it talks to.
    bot: Option<ChildGuard>,
    bot_reports: mpsc::Receiver<String>,
    _servers: Vec<ChildGuard>,
    testapp: PathBuf,
}

/// Where the plaintext attempt on the strict namespace stands.
enum PlaintextAttempt {
    /// Waiting for the strict pod's agent to stream tap events.
    NotYet,
    Running(ChildGuard),
    Done,
}

/// Whether the plaintext attempt ended, and if so whether it was refused
/// (printed).
fn plaintext_outcome(
    client: &mut ChildGuard,
    out: &mut dyn Write,
) -> Result<Option<bool>, DemoError> {
    let Some(status) = client
        .child_mut()
        .try_wait()
        .map_err(io_err("waiting for the plaintext attempt"))?
    else {
        return Ok(None);
    };
    let refused = !status.success();
    let verdict = if refused {
        "# refused: the connect timed out, the kernel dropped its SYN (see the refused line)"
    } else {
        "# ACCEPTED: the strict pod took plaintext (the mesh misbehaved)"
    };
    writeln!(out, "{verdict}").map_err(DemoError::Output)?;
    Ok(Some(refused))
}

impl App {
    fn start(mesh: &Mesh, testapp: &Path, bot_interval: Duration) -> Result<Self, DemoError> {
        let testbed = mesh.testbed();
        let cluster = testbed.cluster();
        let listen = |namespace: &str, name: &str| -> Result<SocketAddr, DemoError> {
            let pod = cluster
                .pod(namespace, name)
                .ok_or_else(|| DemoError::MissingPod(format!("{namespace}/{name}")))?;
            Ok(SocketAddr::from((pod.ip, APP_PORT)))
        };
        // The ClusterIP the API server allocated (Kubernetes mode), which
        // need not be the one the spec asked for.
        let service = |name: &str| -> Result<SocketAddr, DemoError> {
            let namespace = WORKLOADS
                .iter()
                .find(|w| w.name == name)
                .map_or(APP_NAMESPACE, |w| w.namespace);
            let service = cluster
                .services
                .iter()
                .find(|s| s.namespace == namespace && s.name == name)
                .ok_or_else(|| DemoError::MissingService(format!("{namespace}/{name}")))?;
            Ok(SocketAddr::from((service.vip, SERVICE_PORT)))
        };
        let mut servers = Vec::new();
        let mut start_server = |namespace: &str, name: &str, cmd: Command| {
            let mut server = testbed.spawn_in_pod(namespace, name, cmd)?;
            testapp::wait_listening(&mut server)
                .map_err(io_err(format!("starting {namespace}/{name}")))?;
            servers.push(server);
            Ok::<_, DemoError>(())
        };
        for name in ["emoji", "voting"] {
            let cmd = testapp::line_server(testapp, listen(APP_NAMESPACE, name)?, name);
            start_server(APP_NAMESPACE, name, cmd)?;
        }
        let leaderboard = "leaderboard";
        let cmd =
            testapp::line_server(testapp, listen(LEGACY_NAMESPACE, leaderboard)?, leaderboard);
        start_server(LEGACY_NAMESPACE, leaderboard, cmd)?;
        let web = testapp::relay(
            testapp,
            listen(APP_NAMESPACE, "web")?,
            "web",
            &[("emoji", service("emoji")?), ("voting", service("voting")?)],
        );
        start_server(APP_NAMESPACE, "web", web)?;

        let bot_cmd = testapp::bot(
            testapp,
            &[
                ("web", service("web")?),
                (leaderboard, service(leaderboard)?),
            ],
            bot_interval,
        );
        let mut bot = testbed.spawn_in_pod(APP_NAMESPACE, "vote-bot", bot_cmd)?;
        let bot_reports = forward_lines(bot.child_mut().stdout.take(), "vote-bot")?;
        Ok(Self {
            bot: Some(bot),
            bot_reports,
            _servers: servers,
            testapp: testapp.to_owned(),
        })
    }

    /// Starts the plaintext attempt on the strict namespace.
    fn try_plaintext(&self, mesh: &Mesh, out: &mut dyn Write) -> Result<ChildGuard, DemoError> {
        let testbed = mesh.testbed();
        let cluster = testbed.cluster();
        let (to_ns, to_pod) = PLAINTEXT_TO;
        let target = cluster
            .pod(to_ns, to_pod)
            .map(|p| SocketAddr::from((p.ip, APP_PORT)))
            .ok_or_else(|| DemoError::MissingPod(format!("{to_ns}/{to_pod}")))?;
        let (from_ns, from_pod) = PLAINTEXT_FROM;
        writeln!(
            out,
            "\n# {from_ns}/{from_pod} (not meshed) tries plaintext to {to_ns}/{to_pod} at {target} (strict)"
        )
        .map_err(DemoError::Output)?;
        let mut cmd = testapp::client(&self.testapp, target, "plaintext", 1);
        cmd.args(["--timeout-secs", PLAINTEXT_TIMEOUT_SECS]);
        Ok(testbed.spawn_in_pod(from_ns, from_pod, cmd)?)
    }

    /// Starts vote-bot's direct call of voting, which the app's
    /// authorization policy denies.
    fn try_denied(&self, mesh: &Mesh, out: &mut dyn Write) -> Result<ChildGuard, DemoError> {
        let testbed = mesh.testbed();
        let (to_ns, to_pod) = DENIED_TO;
        let target = testbed
            .cluster()
            .pod(to_ns, to_pod)
            .map(|p| SocketAddr::from((p.ip, APP_PORT)))
            .ok_or_else(|| DemoError::MissingPod(format!("{to_ns}/{to_pod}")))?;
        let (from_ns, from_pod) = DENIED_FROM;
        writeln!(
            out,
            "\n# {from_ns}/{from_pod} (meshed) calls {to_ns}/{to_pod} at {target} directly; policy {APP_NAMESPACE}/{VOTING_POLICY} admits only web"
        )
        .map_err(DemoError::Output)?;
        let mut cmd = testapp::client(&self.testapp, target, "vote 0\n", 1);
        cmd.args(["--timeout-secs", DENIED_TIMEOUT_SECS]);
        Ok(testbed.spawn_in_pod(from_ns, from_pod, cmd)?)
    }

    fn stop_bot(&mut self) {
        if let Some(bot) = self.bot.take() {
            bot.kill();
        }
    }

    /// Counts the bot's reports so far and prints its failures.
    fn tally_bot(&self, tally: &mut BotTally, out: &mut dyn Write) -> Result<(), DemoError> {
        for line in self.bot_reports.try_iter() {
            match BotReport::parse(&line) {
                Some(BotReport { outcome: Ok(_), .. }) => tally.ok += 1,
                Some(BotReport {
                    outcome: Err(error),
                    target,
                    conn,
                    seq,
                }) => {
                    tally.failed += 1;
                    let failure = format!("vote-bot -> {target} ({conn}, #{seq}): {error}");
                    writeln!(out, "FAILED {failure}").map_err(DemoError::Output)?;
                    tally.failures.push(failure);
                }
                None => {
                    tally.failed += 1;
                    tally
                        .failures
                        .push(format!("vote-bot printed an unexpected line: {line:?}"));
                }
            }
        }
        Ok(())
    }
}

/// `sealmesh` (the operator CLI) run against the demo's cluster from the
/// underlay, the control plane's network, in the testbed's cgroup (so
/// teardown stops it whatever happens).
struct OperatorCli<'a> {
    binary: &'a Path,
    mesh: &'a Mesh,
}

impl OperatorCli<'_> {
    /// `sealmesh <args> --cluster-file <file>`.
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(self.binary);
        cmd.args(args)
            .arg("--cluster-file")
            .arg(self.mesh.testbed().cluster_file_path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// Runs a command to completion and returns its stdout.
    fn output(&self, args: &[&str]) -> Result<String, DemoError> {
        let (output, command) = self.run(args)?;
        if !output.status.success() {
            return Err(DemoError::Cli {
                command,
                status: output.status,
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    fn run(&self, args: &[&str]) -> Result<(std::process::Output, String), DemoError> {
        let command = format!("sealmesh {}", args.join(" "));
        let output = self
            .mesh
            .testbed()
            .spawn_in_underlay(self.command(args))?
            .wait_with_output()
            .map_err(io_err(format!("running `{command}`")))?;
        Ok((output, command))
    }

    /// Shows `sealmesh why SRC DST` (which exits 1 when the pair is not
    /// secured) and returns what it printed.
    fn show_why(
        &self,
        (src_ns, src): (&str, &str),
        (dst_ns, dst): (&str, &str),
        out: &mut dyn Write,
    ) -> Result<String, DemoError> {
        let (src, dst) = (format!("{src_ns}/{src}"), format!("{dst_ns}/{dst}"));
        let args = ["why", src.as_str(), dst.as_str()];
        writeln!(out, "\n$ sealmesh {}", args.join(" ")).map_err(DemoError::Output)?;
        let (output, _) = self.run(&args)?;
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        write!(out, "{text}").map_err(DemoError::Output)?;
        Ok(text)
    }

    /// Shows `sealmesh edges -n <app namespace> -o wide`.
    fn show_edges(&self, out: &mut dyn Write) -> Result<(), DemoError> {
        let args = ["edges", "-n", APP_NAMESPACE, "-o", "wide"];
        writeln!(out, "\n$ sealmesh {}", args.join(" ")).map_err(DemoError::Output)?;
        let table = self.output(&args)?;
        write!(out, "{table}").map_err(DemoError::Output)
    }

    /// The app namespace's edges from `sealmesh edges -o json`.
    fn edges(&self, cluster: &ClusterFile) -> Result<Vec<Edge>, DemoError> {
        let args = ["edges", "-n", APP_NAMESPACE, "-o", "json"];
        let json = self.output(&args)?;
        let mut edges: Vec<Edge> =
            serde_json::from_str(&json).map_err(|source| DemoError::CliOutput {
                command: format!("sealmesh {}", args.join(" ")),
                source,
            })?;
        for edge in &mut edges {
            let pod = cluster.pod(&edge.src_ns, &edge.src);
            edge.src_node = pod.map(|p| p.node.clone());
            let pod = cluster.pod(&edge.dst_ns, &edge.dst);
            edge.dst_node = pod.map(|p| p.node.clone());
            edge.dst_meshed = pod.is_some_and(|p| cluster.is_meshed(p));
        }
        Ok(edges)
    }

    /// Starts `sealmesh tap -n <app namespace>` (for `duration`, or until
    /// killed) with threads forwarding its stdout lines (events) and its
    /// stderr lines (notes).
    fn start_tap(
        &self,
        duration: Option<Duration>,
        out: &mut dyn Write,
    ) -> Result<(ChildGuard, mpsc::Receiver<String>, mpsc::Receiver<String>), DemoError> {
        let timeout = duration.map(|d| humantime::format_duration(d).to_string());
        let mut args = vec!["tap", "-n", APP_NAMESPACE];
        if let Some(timeout) = &timeout {
            args.extend(["--timeout", timeout]);
        }
        writeln!(out, "\n$ sealmesh {}", args.join(" ")).map_err(DemoError::Output)?;
        let mut tap = self.mesh.testbed().spawn_in_underlay(self.command(&args))?;
        let lines = forward_lines(tap.child_mut().stdout.take(), "sealmesh tap")?;
        let notes = forward_lines(tap.child_mut().stderr.take(), "sealmesh tap notes")?;
        Ok((tap, lines, notes))
    }
}

/// Forwards the lines of a child's output pipe to a channel from a thread;
/// the channel disconnects when the child closes the pipe.
fn forward_lines(
    pipe: Option<impl Read + Send + 'static>,
    what: &str,
) -> Result<mpsc::Receiver<String>, DemoError> {
    let pipe = pipe.ok_or_else(|| {
        io_err(format!("reading the output of {what}"))(io::ErrorKind::BrokenPipe.into())
    })?;
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name(format!("{what} output"))
        .spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        })
        .map_err(io_err(format!("starting a reader for {what}")))?;
    Ok(rx)
}

/// A pod pair as `sealmesh edges -o json` reports it (the CLI merges both
/// agents' views), with the pods' placement added by the demo.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Edge {
    pub src: String,
    pub dst: String,
    pub src_ns: String,
    pub dst_ns: String,
    /// mTLS, or same-node after the same identity checks.
    pub secured: bool,
    pub tls: bool,
    /// Why not mTLS (empty when tls).
    pub no_tls_reason: String,
    pub client_id: String,
    pub server_id: String,
    pub connections_total: u64,
    pub errors_total: u64,
    /// Of `connections_total`, those an authorization policy denied, and
    /// the policy.
    pub denied_total: u64,
    pub denied_policy: String,
    #[serde(skip)]
    pub src_node: Option<String>,
    #[serde(skip)]
    pub dst_node: Option<String>,
    /// The destination is a meshed pod.
    #[serde(skip)]
    pub dst_meshed: bool,
}

impl Edge {
    pub fn crosses_nodes(&self) -> bool {
        matches!((&self.src_node, &self.dst_node), (Some(s), Some(d)) if s != d)
    }
}

/// The vote-bot's requests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BotTally {
    pub ok: u64,
    pub failed: u64,
    pub failures: Vec<String>,
}

/// What a demo run saw.
#[derive(Clone, Debug, Default)]
pub struct DemoSummary {
    /// Id of the (now removed) testbed.
    pub testbed: String,
    /// The app namespace's edges after the run.
    pub edges: Vec<Edge>,
    /// What `sealmesh tap` printed.
    pub tap_lines: Vec<String>,
    pub bot: BotTally,
    /// Whether the plaintext attempt on the strict namespace was refused;
    /// None if it did not end during the run.
    pub plaintext_refused: Option<bool>,
    /// What `sealmesh why` said about that attempt.
    pub why: Option<String>,
    /// Whether the authorization policy denied vote-bot's call of voting;
    /// None if it was not tried.
    pub policy_denied: Option<bool>,
    /// What `sealmesh why` said about it.
    pub policy_why: Option<String>,
    /// Stopped by SIGINT or SIGTERM before the duration ended.
    pub interrupted: bool,
    /// Agents that exited during the run (and were started again).
    pub agent_exits: Vec<String>,
}

impl DemoSummary {
    /// Everything that should not have happened: unsecured meshed edges,
    /// connection errors, failed or missing bot requests, a silent tap.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for e in &self.edges {
            let edge = format!("{}/{} -> {}/{}", e.src_ns, e.src, e.dst_ns, e.dst);
            // A pair whose every connection a policy denied carried nothing
            // to secure; the attempt is checked below.
            let only_denied = e.denied_total > 0 && e.denied_total == e.connections_total;
            if e.dst_meshed && !e.secured && !only_denied {
                problems.push(format!(
                    "meshed edge {edge} is not secured ({})",
                    e.no_tls_reason
                ));
            }
            if e.errors_total > e.denied_total {
                problems.push(format!(
                    "{} of {} connections {edge} failed (see the agents' logs)",
                    e.errors_total - e.denied_total,
                    e.connections_total
                ));
            }
        }
        if self.bot.ok == 0 {
            problems.push("vote-bot got no answer at all".to_owned());
        }
        if self.tap_lines.is_empty() {
            problems.push("sealmesh tap showed no connection".to_owned());
        }
        let (from_ns, from) = PLAINTEXT_FROM;
        let (to_ns, to) = PLAINTEXT_TO;
        let attempt = format!("plaintext from {from_ns}/{from} to the strict {to_ns}/{to}");
        match self.plaintext_refused {
            Some(true) => {}
            Some(false) => problems.push(format!("{attempt} was accepted")),
            None => problems.push(format!("{attempt} did not end during the run")),
        }
        let refused_line =
            format!(" src_pod={from_ns}/{from} dst_pod={to_ns}/{to} reason=strict_inbound");
        if self.plaintext_refused.is_some()
            && !self
                .tap_lines
                .iter()
                .any(|l| l.starts_with("refused ") && l.contains(&refused_line))
        {
            problems.push(format!("sealmesh tap showed no refusal of the {attempt}"));
        }
        let denial = format!(
            "{}/{} calling {}/{} (policy {APP_NAMESPACE}/{VOTING_POLICY})",
            DENIED_FROM.0, DENIED_FROM.1, DENIED_TO.0, DENIED_TO.1
        );
        match self.policy_denied {
            Some(true) => {}
            Some(false) => problems.push(format!("{denial} was accepted")),
            None => problems.push(format!("{denial} was not tried")),
        }
        let denied_line = format!("denied policy={APP_NAMESPACE}/{VOTING_POLICY}");
        if self.policy_denied == Some(true)
            && !self.tap_lines.iter().any(|l| l.contains(&denied_line))
        {
            problems.push(format!("sealmesh tap showed no denial of {denial}"));
        }
        for exit in &self.agent_exits {
            problems.push(format!("the agent of {exit} exited during the run"));
        }
        problems.extend(self.bot.failures.iter().cloned());
        problems
    }
}
