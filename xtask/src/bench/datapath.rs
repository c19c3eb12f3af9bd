//! `cargo xtask bench`: the data path against plaintext (and an
//! optional peer proxy) on the same testbed topology, in one run.
//!
//! Every column is its own testbed, all up at once: client pod on node-0,
//! server pod (echo + sink) on node-1, so every byte crosses nodes
//! (`--same-node`: both on node-0, carried as `secured_local`).
//! - `plaintext`: no agents, no identity service (the kernel alone);
//! - one column per `--variant` (default `sealmesh`, no extra agent flags):
//!   the identity service and an agent per node started with the variant's
//!   flags, each waiting for its certificates; with `--kubernetes` they run
//!   in Kubernetes mode, as deployed, against an in-process fake API server
//!   that the testbed registers its nodes, pods and Services with (like
//!   `xtask demo --kubernetes`);
//! - `peer` with `--peer-cmd CMD`: `sh -c CMD` spawned once per node, in the
//!   node's network namespace and cgroup, with the environment NODE (node
//!   name), NODE_IP, CLUSTER_FILE (the testbed's cluster file, which also names
//!   the identity service, started for it) and BPFFS_DIR (a per-node bpffs
//!   directory it may pin in). It must print a line `ready` on stdout once it
//!   intercepts the node's pods (60 s at most); its output goes to
//!   `<state dir>/logs/peer-<node>.log`. It, and whatever it started, is
//!   killed when its testbed is torn down (the testbed kills its cgroups).
//!
//! Rounds alternate the columns (the order rotates each round) and the
//! figures are medians over rounds, because the machine is noisy; the added
//! latency is a per-round difference to plaintext first. Memory and CPU
//! figures sum the proxy processes and their descendants per node. With a
//! peer, every sealmesh column's figures are also divided by the peer's.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs::File,
    io::{self, BufRead, BufReader, Write as _},
    net::SocketAddr,
    path::PathBuf,
    process::{Command, Stdio},
    str::FromStr,
    sync::mpsc,
    time::Duration,
};

use sealmesh_common::{authz::AuthorizationPolicy, consts::DEFAULT_TRUST_DOMAIN};
use serde_json::{Map, Value, json};

use super::loadgen::{Loadgen, LoadgenError, Report, tune_sysctls};
use crate::{
    mesh::{self, Mesh, MeshError, MeshOptions},
    testbed::{ChildGuard, PodSpec, TestbedError, TestbedSpec, kube::KubeMode},
};

const NAMESPACE: &str = "bench";
const CLIENT: &str = "client";
const SERVER: &str = "server";
const ECHO_PORT: u16 = 8080;
const SINK_PORT: u16 = 5001;
/// Column names of the baseline and of `--peer-cmd`, which no variant takes.
const PLAINTEXT: &str = "plaintext";
const PEER: &str = "peer";
const PEER_READY_LINE: &str = "ready";
const PEER_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Time for freed memory and background work to settle before sampling RSS.
const SETTLE: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Mesh(#[from] MeshError),
    #[error(transparent)]
    Testbed(#[from] TestbedError),
    #[error(transparent)]
    Loadgen(#[from] LoadgenError),
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error(
        "invalid --variant {0:?}: write NAME=AGENT-FLAGS, e.g. `sockmap=--sockmap-acceleration on` (NAME: letters, digits, '-', not `plaintext` or `peer`)"
    )]
    BadVariant(String),
    #[error(
        "the peer command did not print `{PEER_READY_LINE}` on node {node} within {PEER_READY_TIMEOUT:?}; see {log}"
    )]
    PeerNotReady { node: String, log: PathBuf },
    #[error(
        "the peer command on node {node} closed its output without printing `{PEER_READY_LINE}` (did it exit?); see {log}"
    )]
    PeerExited { node: String, log: PathBuf },
    #[error("loadgen {mode} in {column} reported {report:?}, expected a {mode} report")]
    UnexpectedReport {
        column: String,
        mode: &'static str,
        report: Box<Report>,
    },
    #[error(
        "measurements failed (their figures are missing above; rerun with SEALMESH_LOG=debug for more): {0}"
    )]
    MeasurementsFailed(String),
    #[error("process {pid} of the {column} column is gone: it crashed? see its log")]
    ProxyGone { column: String, pid: u32 },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> BenchError {
    let what = what.into();
    move |source| BenchError::Io { what, source }
}

/// A sealmesh configuration to measure: agent flags under a column name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Variant {
    pub name: String,
    pub agent_args: Vec<String>,
}

impl Default for Variant {
    fn default() -> Self {
        Self {
            name: "sealmesh".into(),
            agent_args: Vec::new(),
        }
    }
}

impl FromStr for Variant {
    type Err = BenchError;

    /// `NAME=FLAGS`, flags separated by whitespace (`NAME=` for none).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || BenchError::BadVariant(text.to_owned());
        let (name, flags) = text.split_once('=').ok_or_else(bad)?;
        let valid_name = !name.is_empty()
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && ![PLAINTEXT, PEER].contains(&name);
        if !valid_name {
            return Err(bad());
        }
        Ok(Self {
            name: name.to_owned(),
            agent_args: flags.split_whitespace().map(str::to_owned).collect(),
        })
    }
}

/// What to run and how long.
#[derive(Clone, Debug, clap::Args)]
pub struct BenchOptions {
    /// Print one JSON object with every figure as the last line.
    #[arg(long)]
    pub json: bool,
    /// Measure another node proxy as a third column: `sh -c CMD` runs once per
    /// node in its network namespace and cgroup with NODE, NODE_IP,
    /// CLUSTER_FILE and BPFFS_DIR set, and must print `ready` on stdout once
    /// it intercepts the node's pods. Every sealmesh figure is then also
    /// given divided by the peer's (`vs peer`, JSON `vs_peer`).
    #[arg(long, value_name = "CMD")]
    pub peer_cmd: Option<String>,
    /// sealmesh column to measure, as NAME=AGENT-FLAGS (repeatable, e.g.
    /// `--variant sealmesh= --variant "sockmap=--sockmap-acceleration on"`); the first is
    /// the one compared in the top-level ratios. Default: `sealmesh=`.
    #[arg(long = "variant", value_name = "NAME=FLAGS")]
    pub variants: Vec<Variant>,
    /// Tiny durations and one round: checks that the harness works, nothing more.
    #[arg(long)]
    pub quick: bool,
    /// Run only these measurements (comma-separated; default: all), e.g.
    /// `--only connrate,rr` while working on one figure. Figures not measured
    /// are `-` in the table and null in the JSON.
    #[arg(long, value_delimiter = ',', value_name = "MEASURE")]
    pub only: Vec<Measure>,
    /// Also measure the first sealmesh variant with this many
    /// AuthorizationPolicies in force, as column `<variant>+<N>policies`:
    /// one admits the client, half of the rest are DENY rules the server's
    /// agent judges (and passes) on every connection, the others select
    /// pods that do not exist.
    #[arg(long, value_name = "N")]
    pub policies: Option<usize>,
    /// Rounds to take the medians over (default 3, 1 with --quick): more
    /// rounds for tighter medians on a noisy machine.
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub rounds: Option<usize>,
    /// Run the sealmesh columns' agents and identity service in Kubernetes
    /// mode, as deployed: they read nodes, pods and Services from an in-process
    /// fake API server that the testbed registers with (as `xtask demo
    /// --kubernetes`). The peer column runs as its command says.
    #[arg(long)]
    pub kubernetes: bool,
    /// Put the server pod on the client's node (node-0), so connections stay
    /// on one node: the agent carries them as `secured_local` instead of
    /// over HBONE.
    #[arg(long)]
    pub same_node: bool,
}

/// `count` policies of the bench namespace: the first admits the client to
/// the server (so the server is selected by an ALLOW policy and every
/// connection needs a match); of the others, the odd ones are DENY policies
/// selecting the server whose principals never match (judged and passed on
/// every connection), the even ones ALLOW policies selecting pods that do
/// not exist.
fn bench_policies(count: usize) -> Vec<AuthorizationPolicy> {
    let policy = |name: String, spec: String| AuthorizationPolicy {
        name,
        namespace: NAMESPACE.into(),
        annotations: BTreeMap::new(),
        spec: serde_yaml_ng::from_str(&spec).expect("bench policies are valid YAML"),
    };
    let mut policies = vec![policy(
        "allow-client".into(),
        format!(
            r#"{{ selector: {{ matchLabels: {{ app: {SERVER} }} }}, rules: [{{ from: [{{ source: {{ principals: ["{DEFAULT_TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{CLIENT}"] }} }}] }}] }}"#
        ),
    )];
    for i in 1..count {
        policies.push(if i % 2 == 1 {
            policy(
                format!("deny-{i}"),
                format!(
                    r#"{{ selector: {{ matchLabels: {{ app: {SERVER} }} }}, action: DENY, rules: [{{ from: [{{ source: {{ principals: ["{DEFAULT_TRUST_DOMAIN}/ns/other-{i}/sa/*"], namespaces: ["other-{i}"] }} }}], to: [{{ operation: {{ ports: ["{i}"] }} }}] }}] }}"#
                ),
            )
        } else {
            policy(
                format!("allow-{i}"),
                format!(
                    r#"{{ selector: {{ matchLabels: {{ app: svc-{i} }} }}, rules: [{{ from: [{{ source: {{ namespaces: [{NAMESPACE}] }} }}] }}] }}"#
                ),
            )
        });
    }
    policies
}

/// One measurement of a round (or the memory one, made once per column).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Measure {
    /// 1-stream bulk throughput (and CPU per GB).
    Bulk1,
    /// 16-stream bulk throughput (and CPU per GB).
    Bulk16,
    /// 64 B request/response latency.
    Rr,
    /// New connections per second.
    Connrate,
    /// Idle RSS and memory per idle proxied connection.
    Memory,
}

impl BenchOptions {
    fn measures(&self, measure: Measure) -> bool {
        self.only.is_empty() || self.only.contains(&measure)
    }
}

/// Durations and sizes of one run.
#[derive(Clone, Copy, Debug)]
struct Plan {
    rounds: usize,
    bulk_seconds: f64,
    rr_count: usize,
    connrate_seconds: f64,
    idle_connections: usize,
    /// The server pod on the client's node (`--same-node`).
    same_node: bool,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                rounds: 1,
                bulk_seconds: 0.3,
                rr_count: 500,
                connrate_seconds: 0.3,
                idle_connections: 100,
                same_node: false,
            }
        } else {
            Self {
                rounds: 3,
                bulk_seconds: 3.0,
                rr_count: 20_000,
                connrate_seconds: 3.0,
                idle_connections: 1000,
                same_node: false,
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Kind {
    Plaintext,
    Sealmesh,
    Peer,
}

/// One system under test: its own testbed with servers running.
struct Column {
    name: String,
    kind: Kind,
    // Dropped (killed) before the mesh tears the testbed down.
    _servers: Vec<ChildGuard>,
    peers: Vec<ChildGuard>,
    mesh: Mesh,
    loadgen: PathBuf,
    echo: SocketAddr,
    sink: SocketAddr,
}

/// Raw figures of one column. The per-round ones hold one sample per round
/// of the measurements run, `None` where it failed, so the samples of one
/// round line up across columns (`rr_p50_added_us` pairs them).
#[derive(Clone, Debug, Default)]
struct Figures {
    /// Whether the column runs node proxies (all but plaintext).
    proxied: bool,
    bulk1_gbps: Vec<Option<f64>>,
    bulk16_gbps: Vec<Option<f64>>,
    rr_p50_us: Vec<Option<f64>>,
    rr_p90_us: Vec<Option<f64>>,
    rr_p99_us: Vec<Option<f64>>,
    conn_per_s: Vec<Option<f64>>,
    conn_errors: u64,
    bulk_bytes: u64,
    proxy_cpu_seconds: f64,
    /// Per node: RSS of the idle proxy after start-up.
    idle_rss_bytes: BTreeMap<String, u64>,
    /// Per node: the anonymous part of `idle_rss_bytes`.
    idle_anon_rss_bytes: BTreeMap<String, u64>,
    /// Per node: RSS growth for each idle proxied connection.
    rss_per_conn_bytes: BTreeMap<String, f64>,
    /// Measurements that failed, with the reason.
    failures: Vec<String>,
}

impl Column {
    fn up(
        name: &str,
        kind: Kind,
        options: MeshOptions,
        peer_cmd: Option<&str>,
        policies: Vec<AuthorizationPolicy>,
        server_node: usize,
    ) -> Result<Self, BenchError> {
        tracing::info!(column = name, "bringing the testbed up");
        let spec = policies.into_iter().fold(
            TestbedSpec::new(2)
                .meshed_namespace(NAMESPACE)
                .pod(PodSpec::new(NAMESPACE, CLIENT, CLIENT, 0).label("app", CLIENT))
                .pod(PodSpec::new(NAMESPACE, SERVER, SERVER, server_node).label("app", SERVER)),
            TestbedSpec::authorization_policy,
        );
        let mesh = Mesh::up(&spec, options)?;
        tune_sysctls(&mesh)?;
        let loadgen = mesh::locate_binary("loadgen")?;
        let server_ip = mesh
            .testbed()
            .cluster()
            .pod(NAMESPACE, SERVER)
            .expect("the spec has a server pod")
            .ip;
        let mut column = Self {
            name: name.to_owned(),
            kind,
            _servers: Vec::new(),
            peers: Vec::new(),
            mesh,
            loadgen,
            echo: SocketAddr::from((server_ip, ECHO_PORT)),
            sink: SocketAddr::from((server_ip, SINK_PORT)),
        };
        for (mode, addr) in [("echo", column.echo), ("sink", column.sink)] {
            let (server, _) =
                column
                    .loadgen(SERVER)
                    .start(&args(&[mode, "--listen", &addr.to_string()]))?;
            column._servers.push(server);
        }
        if let Some(cmd) = peer_cmd {
            column.start_peers(cmd)?;
        }
        Ok(column)
    }

    fn loadgen<'a>(&'a self, pod: &'a str) -> Loadgen<'a> {
        Loadgen {
            binary: &self.loadgen,
            testbed: self.mesh.testbed(),
            namespace: NAMESPACE,
            pod,
        }
    }

    fn nodes(&self) -> Vec<String> {
        let cluster = self.mesh.testbed().cluster();
        cluster.nodes.iter().map(|n| n.name.clone()).collect()
    }

    fn start_peers(&mut self, cmd: &str) -> Result<(), BenchError> {
        let testbed = self.mesh.testbed();
        for node in testbed.cluster().nodes.clone() {
            let log_path = testbed
                .state_dir()
                .join("logs")
                .join(format!("peer-{}.log", node.name));
            let mut log = File::create(&log_path)
                .map_err(io_err(format!("creating {}", log_path.display())))?;
            let stderr = log
                .try_clone()
                .map_err(io_err(format!("opening {}", log_path.display())))?;
            let mut command = Command::new("sh");
            command
                .args(["-c", cmd])
                .env("NODE", &node.name)
                .env("NODE_IP", node.ip.to_string())
                .env("CLUSTER_FILE", testbed.cluster_file_path())
                .env("BPFFS_DIR", testbed.node_bpffs_dir(&node.name)?)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(stderr);
            let mut peer = testbed.spawn_in_node(&node.name, command)?;
            let stdout = peer.child_mut().stdout.take().expect("stdout is piped");
            self.peers.push(peer);
            let (ready_tx, ready_rx) = mpsc::channel();
            // Copies the peer's output to its log for as long as it runs, so
            // the pipe never fills up.
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if line.trim() == PEER_READY_LINE {
                        let _ = ready_tx.send(());
                    }
                    let _ = writeln!(log, "{line}");
                }
            });
            ready_rx.recv_timeout(PEER_READY_TIMEOUT).map_err(|error| {
                let node = node.name.clone();
                match error {
                    mpsc::RecvTimeoutError::Timeout => BenchError::PeerNotReady {
                        node,
                        log: log_path,
                    },
                    mpsc::RecvTimeoutError::Disconnected => BenchError::PeerExited {
                        node,
                        log: log_path,
                    },
                }
            })?;
        }
        Ok(())
    }

    /// Root processes of the node proxies, per node (none for plaintext).
    fn proxies(&self) -> BTreeMap<String, u32> {
        match self.kind {
            Kind::Plaintext => BTreeMap::new(),
            Kind::Sealmesh => self
                .nodes()
                .into_iter()
                .filter_map(|node| self.mesh.agent_pid(&node).map(|pid| (node, pid)))
                .collect(),
            Kind::Peer => self
                .nodes()
                .into_iter()
                .zip(self.peers.iter().map(ChildGuard::id))
                .collect(),
        }
    }

    fn proxy_rss(&self) -> Result<BTreeMap<String, u64>, BenchError> {
        self.per_proxy(proc_stats::tree_rss_bytes)
    }

    fn per_proxy(&self, read: fn(u32) -> Option<u64>) -> Result<BTreeMap<String, u64>, BenchError> {
        self.proxies()
            .into_iter()
            .map(|(node, pid)| Ok((node, self.alive(pid, read(pid))?)))
            .collect()
    }

    fn proxy_cpu_seconds(&self) -> Result<f64, BenchError> {
        let mut total = 0.0;
        for pid in self.proxies().into_values() {
            total += self.alive(pid, proc_stats::tree_cpu_seconds(pid))?;
        }
        Ok(total)
    }

    fn alive<T>(&self, pid: u32, value: Option<T>) -> Result<T, BenchError> {
        value.ok_or_else(|| BenchError::ProxyGone {
            column: self.name.clone(),
            pid,
        })
    }

    fn run(&self, mode: &'static str, args: &[String]) -> Result<Report, BenchError> {
        tracing::debug!(column = self.name, mode, "running loadgen");
        Ok(self.loadgen(CLIENT).run(args)?)
    }

    fn unexpected(&self, mode: &'static str, report: Report) -> BenchError {
        BenchError::UnexpectedReport {
            column: self.name.clone(),
            mode,
            report: Box::new(report),
        }
    }

    /// Bulk throughput over `streams` connections; counts proxy CPU and bytes.
    fn bulk(&self, plan: &Plan, streams: usize, figures: &mut Figures) -> Result<f64, BenchError> {
        let cpu_before = self.proxy_cpu_seconds()?;
        let report = self.run(
            "bulk",
            &args(&[
                "bulk",
                "--connect",
                &self.sink.to_string(),
                "--seconds",
                &plan.bulk_seconds.to_string(),
                "--streams",
                &streams.to_string(),
            ]),
        )?;
        figures.proxy_cpu_seconds += self.proxy_cpu_seconds()? - cpu_before;
        match report {
            Report::Bulk { bytes, seconds, .. } => {
                figures.bulk_bytes += bytes;
                Ok(bytes as f64 * 8.0 / seconds / 1e9)
            }
            other => Err(self.unexpected("bulk", other)),
        }
    }

    /// One round of every measurement: each of its figures gets a sample,
    /// `None` for a failed one, which is recorded in `figures.failures`
    /// while the others still run.
    fn round(&self, plan: &Plan, options: &BenchOptions, figures: &mut Figures) {
        if options.measures(Measure::Bulk1) {
            let gbps = self.bulk(plan, 1, figures);
            let gbps = self.sample("1-stream bulk", gbps, &mut figures.failures);
            figures.bulk1_gbps.push(gbps);
        }
        if options.measures(Measure::Bulk16) {
            let gbps = self.bulk(plan, 16, figures);
            let gbps = self.sample("16-stream bulk", gbps, &mut figures.failures);
            figures.bulk16_gbps.push(gbps);
        }
        if options.measures(Measure::Rr) {
            let rr = self.request_response(plan);
            let rr = self.sample("request/response", rr, &mut figures.failures);
            figures.rr_p50_us.push(rr.map(|[p50, _, _]| p50));
            figures.rr_p90_us.push(rr.map(|[_, p90, _]| p90));
            figures.rr_p99_us.push(rr.map(|[_, _, p99]| p99));
        }
        if options.measures(Measure::Connrate) {
            let rate = self.connection_rate(plan, figures);
            let rate = self.sample("connection rate", rate, &mut figures.failures);
            figures.conn_per_s.push(rate);
        }
    }

    /// The measurement's value, or `None` with the failure recorded.
    fn sample<T>(
        &self,
        what: &str,
        result: Result<T, BenchError>,
        failures: &mut Vec<String>,
    ) -> Option<T> {
        result
            .map_err(|e| {
                tracing::warn!(column = self.name, "{what} failed: {e}");
                failures.push(format!("{what}: {e}"));
            })
            .ok()
    }

    /// p50, p90 and p99 of 64 B round trips, in µs.
    fn request_response(&self, plan: &Plan) -> Result<[f64; 3], BenchError> {
        let echo = self.echo.to_string();
        match self.run(
            "rr",
            &args(&[
                "rr",
                "--connect",
                &echo,
                "--count",
                &plan.rr_count.to_string(),
                "--size",
                "64",
            ]),
        )? {
            Report::Rr {
                p50_us,
                p90_us,
                p99_us,
                ..
            } => Ok([p50_us, p90_us, p99_us]),
            other => Err(self.unexpected("rr", other)),
        }
    }

    /// New connections per second; counts the connection errors.
    fn connection_rate(&self, plan: &Plan, figures: &mut Figures) -> Result<f64, BenchError> {
        let echo = self.echo.to_string();
        match self.run(
            "connrate",
            &args(&[
                "connrate",
                "--connect",
                &echo,
                "--seconds",
                &plan.connrate_seconds.to_string(),
                "--size",
                "64",
            ]),
        )? {
            Report::Connrate {
                connections,
                errors,
                seconds,
                first_error,
            } => {
                if let Some(error) = first_error {
                    tracing::warn!(column = self.name, errors, error, "connrate had errors");
                }
                figures.conn_errors += errors;
                Ok(connections as f64 / seconds)
            }
            other => Err(self.unexpected("connrate", other)),
        }
    }

    /// Idle RSS of the fresh proxies, then their growth per idle connection.
    fn memory(&self, plan: &Plan, figures: &mut Figures) -> Result<(), BenchError> {
        if self.kind == Kind::Plaintext {
            return Ok(());
        }
        // One connection first, so pooled mTLS connections and lazily built
        // state are in the baseline rather than charged to the idle ones.
        self.run(
            "rr",
            &args(&["rr", "--connect", &self.echo.to_string(), "--count", "10"]),
        )?;
        std::thread::sleep(SETTLE);
        let before = self.proxy_rss()?;
        figures.idle_rss_bytes = before.clone();
        figures.idle_anon_rss_bytes = self.per_proxy(proc_stats::tree_anon_rss_bytes)?;
        let (idle, report) = self.loadgen(CLIENT).start(&args(&[
            "idle",
            "--connect",
            &self.echo.to_string(),
            "--connections",
            &plan.idle_connections.to_string(),
            "--hold",
            "600",
        ]))?;
        if !matches!(report, Report::Idle { .. }) {
            return Err(self.unexpected("idle", report));
        }
        std::thread::sleep(SETTLE);
        let after = self.proxy_rss()?;
        idle.kill();
        for (node, rss) in after {
            let growth = rss.saturating_sub(before.get(&node).copied().unwrap_or(rss));
            figures
                .rss_per_conn_bytes
                .insert(node, growth as f64 / plan.idle_connections as f64);
        }
        Ok(())
    }
}

fn args(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

/// Runs the benchmark and prints the table (and the JSON line).
pub fn run(options: &BenchOptions) -> Result<Value, BenchError> {
    crate::testbed::require_root()?;
    let plan = Plan {
        rounds: options.rounds.unwrap_or(Plan::new(options.quick).rounds),
        same_node: options.same_node,
        ..Plan::new(options.quick)
    };
    let profile = build_profile();
    if cfg!(debug_assertions) {
        eprintln!(
            "warning: these are unoptimized ({profile}) binaries, far slower than release ones; for real figures run `cargo build --release --workspace && sudo -E target/release/xtask bench`"
        );
    }
    let server_node = if plan.same_node { 0 } else { 1 };
    let variants = if options.variants.is_empty() {
        vec![Variant::default()]
    } else {
        options.variants.clone()
    };

    let bare = MeshOptions {
        start_agents: false,
        start_identity: false,
        wait_for_certificates: false,
        ..MeshOptions::default()
    };
    let mut columns = vec![Column::up(
        PLAINTEXT,
        Kind::Plaintext,
        bare.clone(),
        None,
        Vec::new(),
        server_node,
    )?];
    for variant in &variants {
        let options = MeshOptions {
            agent_args: variant.agent_args.clone(),
            kubernetes: options.kubernetes.then(KubeMode::fake),
            ..MeshOptions::default()
        };
        columns.push(Column::up(
            &variant.name,
            Kind::Sealmesh,
            options,
            None,
            Vec::new(),
            server_node,
        )?);
    }
    if let Some(count) = options.policies.filter(|n| *n > 0) {
        let variant = &variants[0];
        let mesh_options = MeshOptions {
            agent_args: variant.agent_args.clone(),
            kubernetes: options.kubernetes.then(KubeMode::fake),
            ..MeshOptions::default()
        };
        columns.push(Column::up(
            &format!("{}+{count}policies", variant.name),
            Kind::Sealmesh,
            mesh_options,
            None,
            bench_policies(count),
            server_node,
        )?);
    }
    if let Some(cmd) = &options.peer_cmd {
        let options = MeshOptions {
            start_identity: true,
            ..bare
        };
        columns.push(Column::up(
            PEER,
            Kind::Peer,
            options,
            Some(cmd),
            Vec::new(),
            server_node,
        )?);
    }

    let mut figures: Vec<Figures> = columns
        .iter()
        .map(|column| Figures {
            proxied: column.kind != Kind::Plaintext,
            ..Figures::default()
        })
        .collect();
    if options.measures(Measure::Memory) {
        for (column, figures) in columns.iter().zip(&mut figures) {
            tracing::info!(column = column.name, "memory");
            if let Err(e) = column.memory(&plan, figures) {
                tracing::warn!(column = column.name, "memory failed: {e}");
                figures.failures.push(format!("memory: {e}"));
            }
        }
    }
    for round in 0..plan.rounds {
        for offset in 0..columns.len() {
            let index = (round + offset) % columns.len();
            tracing::info!(
                round,
                column = columns[index].name,
                "throughput, latency, connections"
            );
            columns[index].round(&plan, options, &mut figures[index]);
        }
    }

    let names: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
    let summary = summarise(&names, &figures, &plan, &profile, options.kubernetes);
    if options.kubernetes {
        println!("sealmesh agents in Kubernetes mode (in-process fake API server)");
    }
    print!("{}", table(&names, &figures));
    if options.json {
        println!("{summary}");
    }
    let failures: Vec<String> = names
        .iter()
        .zip(&figures)
        .flat_map(|(name, f)| {
            f.failures
                .iter()
                .map(move |failure| format!("{name}: {failure}"))
        })
        .collect();
    if !failures.is_empty() {
        return Err(BenchError::MeasurementsFailed(failures.join("; ")));
    }
    Ok(summary)
}

/// The cargo profile the measured binaries were built with: the directory
/// they share with this xtask (`target/<profile>/`): `release`, `dist`, `debug`.
fn build_profile() -> String {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.file_name()?.to_str()?.to_owned()))
        .unwrap_or_else(|| "unknown".to_owned())
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Median of the rounds that have a sample (NaN without any).
fn median_of(samples: &[Option<f64>]) -> f64 {
    median(&samples.iter().flatten().copied().collect::<Vec<_>>())
}

/// Per round, a sample minus the baseline's of the same round (`None` where
/// either failed): the baseline moves with the machine's load from round to
/// round, so a difference is only meaningful within one.
fn per_round_differences(samples: &[Option<f64>], baseline: &[Option<f64>]) -> Vec<Option<f64>> {
    samples
        .iter()
        .zip(baseline)
        .map(|(sample, base)| Some((*sample)? - (*base)?))
        .collect()
}

/// `value ÷ base`; `None` where either is missing or it is not finite.
fn quotient(value: Option<f64>, base: Option<f64>) -> Option<f64> {
    Some(value? / base?).filter(|q| q.is_finite())
}

/// Medians of a column's raw figures.
struct Medians {
    bulk1_gbps: f64,
    bulk16_gbps: f64,
    rr_p50_us: f64,
    rr_p90_us: f64,
    rr_p99_us: f64,
    /// Median over rounds of (rr p50 − plaintext's rr p50 of the same
    /// round); `None` for plaintext itself.
    rr_p50_added_us: Option<f64>,
    conn_per_s: f64,
    /// Per-side figures are means over the nodes' proxies.
    idle_rss_bytes: Option<f64>,
    idle_anon_rss_bytes: Option<f64>,
    mem_per_conn_bytes: Option<f64>,
    cpu_seconds_per_gb: Option<f64>,
}

/// Every column's medians, plaintext (the first) being the baseline.
fn medians(figures: &[Figures]) -> Vec<Medians> {
    figures
        .iter()
        .map(|f| Medians::of(f, &figures[0]))
        .collect()
}

impl Medians {
    fn of(figures: &Figures, plaintext: &Figures) -> Self {
        let mean = |values: Vec<f64>| {
            (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
        };
        Self {
            bulk1_gbps: median_of(&figures.bulk1_gbps),
            bulk16_gbps: median_of(&figures.bulk16_gbps),
            rr_p50_us: median_of(&figures.rr_p50_us),
            rr_p90_us: median_of(&figures.rr_p90_us),
            rr_p99_us: median_of(&figures.rr_p99_us),
            rr_p50_added_us: figures.proxied.then(|| {
                median_of(&per_round_differences(
                    &figures.rr_p50_us,
                    &plaintext.rr_p50_us,
                ))
            }),
            conn_per_s: median_of(&figures.conn_per_s),
            idle_rss_bytes: mean(figures.idle_rss_bytes.values().map(|&b| b as f64).collect()),
            idle_anon_rss_bytes: mean(
                figures
                    .idle_anon_rss_bytes
                    .values()
                    .map(|&b| b as f64)
                    .collect(),
            ),
            mem_per_conn_bytes: mean(figures.rss_per_conn_bytes.values().copied().collect()),
            cpu_seconds_per_gb: (figures.proxied && figures.bulk_bytes > 0)
                .then(|| figures.proxy_cpu_seconds / (figures.bulk_bytes as f64 / 1e9)),
        }
    }

    /// The figures compared between columns, under their JSON keys.
    fn figures(&self) -> [(&'static str, Option<f64>); 11] {
        [
            ("throughput_gbps", Some(self.bulk1_gbps)),
            ("throughput_16_gbps", Some(self.bulk16_gbps)),
            ("rr_p50_us", Some(self.rr_p50_us)),
            ("rr_p90_us", Some(self.rr_p90_us)),
            ("rr_p99_us", Some(self.rr_p99_us)),
            ("rr_p50_added_us", self.rr_p50_added_us),
            ("conn_per_s", Some(self.conn_per_s)),
            ("idle_rss_bytes", self.idle_rss_bytes),
            ("idle_anon_rss_bytes", self.idle_anon_rss_bytes),
            ("mem_per_conn_bytes", self.mem_per_conn_bytes),
            ("cpu_seconds_per_gb", self.cpu_seconds_per_gb),
        ]
    }

    fn raw(&self, figures: &Figures, plaintext: &Figures) -> Value {
        let mut raw = json!({
            "conn_errors": figures.conn_errors,
            "idle_rss_bytes_by_node": figures.idle_rss_bytes,
            "mem_per_conn_bytes_by_node": figures.rss_per_conn_bytes,
            "failures": figures.failures,
            "samples": {
                "throughput_gbps": figures.bulk1_gbps,
                "throughput_16_gbps": figures.bulk16_gbps,
                "rr_p50_us": figures.rr_p50_us,
                "rr_p50_added_us": figures.proxied.then(|| {
                    per_round_differences(&figures.rr_p50_us, &plaintext.rr_p50_us)
                }),
                "rr_p99_us": figures.rr_p99_us,
                "conn_per_s": figures.conn_per_s,
            },
        });
        let object = raw.as_object_mut().expect("an object");
        for (key, value) in self.figures() {
            // NaN (not measured) becomes null.
            object.insert(key.into(), json!(value));
        }
        raw
    }

    /// This column ÷ plaintext.
    fn ratios(&self, plaintext: &Medians) -> Map<String, Value> {
        let mut ratios = Map::new();
        for (key, value, base) in [
            ("throughput_ratio", self.bulk1_gbps, plaintext.bulk1_gbps),
            (
                "throughput_16_ratio",
                self.bulk16_gbps,
                plaintext.bulk16_gbps,
            ),
            ("rr_p50_ratio", self.rr_p50_us, plaintext.rr_p50_us),
            ("rr_p90_ratio", self.rr_p90_us, plaintext.rr_p90_us),
            ("rr_p99_ratio", self.rr_p99_us, plaintext.rr_p99_us),
            ("conn_rate_ratio", self.conn_per_s, plaintext.conn_per_s),
        ] {
            ratios.insert(key.into(), json!(value / base));
        }
        ratios
    }

    /// Every figure of this column ÷ the peer's, under the figure's key:
    /// above 1 is better for throughput and conn/s, below 1 for the others.
    fn vs_peer(&self, peer: &Medians) -> Map<String, Value> {
        self.figures()
            .into_iter()
            .zip(peer.figures())
            .map(|((key, value), (_, base))| (key.to_owned(), json!(quotient(value, base))))
            .collect()
    }
}

/// The JSON object: the first sealmesh column's ratios and memory at the top
/// level, every column's raw figures (and ratios) under `columns`.
fn summarise(
    names: &[&str],
    figures: &[Figures],
    plan: &Plan,
    profile: &str,
    kubernetes: bool,
) -> Value {
    let medians = medians(figures);
    let plaintext = &medians[0];
    let peer = names.iter().position(|n| *n == PEER).map(|i| &medians[i]);
    let mut columns = Map::new();
    for ((name, m), f) in names.iter().zip(&medians).zip(figures) {
        let mut column = m.raw(f, &figures[0]);
        if *name != PLAINTEXT {
            let column = column.as_object_mut().expect("raw() is an object");
            column.extend(m.ratios(plaintext));
            if let Some(peer) = peer.filter(|_| *name != PEER) {
                column.insert("vs_peer".into(), Value::Object(m.vs_peer(peer)));
            }
        }
        columns.insert((*name).to_owned(), column);
    }
    let sealmesh = &medians[1];
    let mut summary = sealmesh.ratios(plaintext);
    summary.insert("rr_p50_added_us".into(), json!(sealmesh.rr_p50_added_us));
    if let Some(peer) = peer {
        summary.insert("vs_peer".into(), Value::Object(sealmesh.vs_peer(peer)));
    }
    summary.insert(
        "mem_per_conn_bytes".into(),
        json!(sealmesh.mem_per_conn_bytes),
    );
    summary.insert("idle_rss_bytes".into(), json!(sealmesh.idle_rss_bytes));
    summary.insert(
        "idle_anon_rss_bytes".into(),
        json!(sealmesh.idle_anon_rss_bytes),
    );
    summary.insert(
        "cpu_seconds_per_gb".into(),
        json!(sealmesh.cpu_seconds_per_gb),
    );
    summary.insert("compared".into(), json!(names[1]));
    summary.insert("profile".into(), json!(profile));
    summary.insert(
        "agent_mode".into(),
        json!(if kubernetes { "kubernetes" } else { "local" }),
    );
    summary.insert(
        "plan".into(),
        json!({
            "rounds": plan.rounds,
            "bulk_seconds": plan.bulk_seconds,
            "rr_count": plan.rr_count,
            "rr_size": 64,
            "connrate_seconds": plan.connrate_seconds,
            "idle_connections": plan.idle_connections,
            "same_node": plan.same_node,
        }),
    );
    summary.insert("columns".into(), Value::Object(columns));
    Value::Object(summary)
}

/// The human table: every column, each non-plaintext column's ratio to
/// plaintext and, with a peer, each sealmesh column's ratio to the peer.
fn table(names: &[&str], figures: &[Figures]) -> String {
    let medians = medians(figures);
    let plaintext = &medians[0];
    let peer = names.iter().position(|n| *n == PEER);
    // The column's index, when it has a "vs peer" column beside it.
    let beside_peer = |i: usize| peer.filter(|&p| i > 0 && i != p);
    type Pick = fn(&Medians) -> Option<f64>;
    let rows: [(&str, Pick, bool, &str); 11] = [
        ("1-stream Gbit/s", |m| Some(m.bulk1_gbps), true, ">= 0.32x"),
        ("16-stream Gbit/s", |m| Some(m.bulk16_gbps), true, ""),
        ("64 B rr p50 us", |m| Some(m.rr_p50_us), true, "<= 2.0x"),
        ("  p50 added us", |m| m.rr_p50_added_us, false, ""),
        ("64 B rr p90 us", |m| Some(m.rr_p90_us), true, ""),
        ("64 B rr p99 us", |m| Some(m.rr_p99_us), true, "<= 2.5x"),
        ("new conn/s", |m| Some(m.conn_per_s), true, ">= 0.7x"),
        (
            "idle RSS MiB/agent",
            |m| m.idle_rss_bytes.map(|b| b / 1048576.0),
            false,
            "<= 16 MB",
        ),
        (
            "  of it anonymous",
            |m| m.idle_anon_rss_bytes.map(|b| b / 1048576.0),
            false,
            "",
        ),
        (
            "KiB/idle conn/side",
            |m| m.mem_per_conn_bytes.map(|b| b / 1024.0),
            false,
            "<= 5 KB",
        ),
        ("proxy CPU s/GB", |m| m.cpu_seconds_per_gb, false, ""),
    ];
    let ratio_cell = |out: &mut String, ratio: Option<f64>| {
        let _ = match ratio {
            Some(ratio) => write!(out, " {ratio:>6.2}x"),
            None => write!(out, " {:>7}", ""),
        };
    };
    let mut out = format!("{:<20}", "metric");
    for (i, name) in names.iter().enumerate() {
        let _ = write!(out, " {name:>12}");
        if i > 0 {
            let _ = write!(out, " {:>7}", "ratio");
        }
        if beside_peer(i).is_some() {
            let _ = write!(out, " {:>7}", "vs peer");
        }
    }
    let _ = writeln!(out, "  target ({})", names.get(1).unwrap_or(&""));
    for (label, pick, has_ratio, target) in &rows {
        let _ = write!(out, "{label:<20}");
        for (i, m) in medians.iter().enumerate() {
            match pick(m).filter(|v| v.is_finite()) {
                Some(value) => {
                    let _ = write!(out, " {value:>12.2}");
                }
                None => {
                    let _ = write!(out, " {:>12}", "-");
                }
            }
            if i > 0 {
                let ratio = has_ratio.then(|| quotient(pick(m), pick(plaintext)));
                ratio_cell(&mut out, ratio.flatten());
            }
            if let Some(p) = beside_peer(i) {
                ratio_cell(&mut out, quotient(pick(m), pick(&medians[p])));
            }
        }
        let _ = writeln!(out, "  {target}");
    }
    if peer.is_some() {
        let _ = writeln!(
            out,
            "vs peer: the column's figure / the peer's; higher is better for Gbit/s and conn/s, lower for the others"
        );
    }
    for (name, f) in names.iter().zip(figures) {
        if f.conn_errors > 0 {
            let _ = writeln!(out, "warning: {name}: {} connection errors", f.conn_errors);
        }
        for failure in &f.failures {
            let _ = writeln!(out, "FAILED {name}: {failure}");
        }
    }
    out
}

/// Memory and CPU of a process and its descendants, from /proc.
mod proc_stats {
    use std::collections::{BTreeMap, BTreeSet};

    /// (ppid, utime + stime in clock ticks) from /proc/<pid>/stat.
    fn stat(pid: u32) -> Option<(u32, u64)> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name (field 2) may hold spaces and parentheses: fields
        // are counted after its closing parenthesis, from field 3 (state).
        let fields: Vec<&str> = text.rsplit_once(')')?.1.split_whitespace().collect();
        let ppid = fields.get(1)?.parse().ok()?;
        let utime: u64 = fields.get(11)?.parse().ok()?;
        let stime: u64 = fields.get(12)?.parse().ok()?;
        Some((ppid, utime + stime))
    }

    /// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `RssAnon`), in bytes.
    fn status_bytes(pid: u32, field: &str) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()?;
        Some(kib * 1024)
    }

    /// `root` and its living descendants; `None` if `root` is gone.
    fn tree(root: u32) -> Option<BTreeSet<u32>> {
        stat(root)?;
        let mut children: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        for entry in std::fs::read_dir("/proc").ok()?.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            if let Some((ppid, _)) = stat(pid) {
                children.entry(ppid).or_default().push(pid);
            }
        }
        let mut tree = BTreeSet::from([root]);
        let mut queue = vec![root];
        while let Some(pid) = queue.pop() {
            for &child in children.get(&pid).into_iter().flatten() {
                if tree.insert(child) {
                    queue.push(child);
                }
            }
        }
        Some(tree)
    }

    /// Resident memory of `root` and its descendants.
    pub fn tree_rss_bytes(root: u32) -> Option<u64> {
        tree_status_bytes(root, "VmRSS")
    }

    /// The anonymous part of it (heap, stacks): what is not mapped files
    /// such as the binary's code, which processes mapping it share.
    pub fn tree_anon_rss_bytes(root: u32) -> Option<u64> {
        tree_status_bytes(root, "RssAnon")
    }

    fn tree_status_bytes(root: u32, field: &str) -> Option<u64> {
        Some(
            tree(root)?
                .into_iter()
                .filter_map(|pid| status_bytes(pid, field))
                .sum(),
        )
    }

    pub fn tree_cpu_seconds(root: u32) -> Option<f64> {
        let ticks_per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()? as f64;
        let ticks: u64 = tree(root)?
            .into_iter()
            .filter_map(|pid| stat(pid).map(|(_, ticks)| ticks))
            .sum();
        Some(ticks as f64 / ticks_per_second)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bench_policies_are_valid_and_admit_only_the_client() {
        use sealmesh_common::{
            authz::{CompiledPolicy, Connection, Decision, PolicySet, validate},
            identity::TrustDomain,
        };
        let policies = bench_policies(100);
        assert_eq!(policies.len(), 100);
        for policy in &policies {
            validate(&policy.spec).unwrap();
        }
        let set = PolicySet::new("sealmesh", policies.iter().map(CompiledPolicy::compile));
        let server = set.for_pod(NAMESPACE, &BTreeMap::from([("app".into(), SERVER.into())]));
        assert_eq!(
            server.policies().len(),
            51,
            "the ALLOW and the 50 DENY policies"
        );
        let judge = |sa: &str| {
            let id = TrustDomain::default().identity(NAMESPACE, sa).unwrap();
            server
                .judge(&Connection {
                    identity: Some(&id),
                    source_ip: None,
                    port: 8080,
                })
                .decision
        };
        assert!(matches!(judge(CLIENT), Decision::Allowed(_)));
        assert!(matches!(judge("intruder"), Decision::Denied(_)));
    }

    #[test]
    fn variants_parse_name_and_flags() {
        assert_eq!(
            "no-accel=--no-sockmap  --force-mtls-local"
                .parse::<Variant>()
                .unwrap(),
            Variant {
                name: "no-accel".into(),
                agent_args: vec!["--no-sockmap".into(), "--force-mtls-local".into()],
            }
        );
        assert_eq!(
            "base=".parse::<Variant>().unwrap(),
            Variant {
                name: "base".into(),
                agent_args: vec![],
            }
        );
        for bad in ["noflags", "=--x", "plaintext=", "a b=--x"] {
            assert!(bad.parse::<Variant>().is_err(), "{bad}");
        }
    }

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn added_latency_is_the_median_of_per_round_differences() {
        // The baseline jumps between rounds; the per-round differences do not.
        let plaintext = [Some(22.0), Some(57.0), Some(30.0), Some(40.0)];
        let sealmesh = [Some(150.0), Some(180.0), Some(160.0), None];
        let added = per_round_differences(&sealmesh, &plaintext);
        assert_eq!(added, [Some(128.0), Some(123.0), Some(130.0), None]);
        assert_eq!(median_of(&added), 128.0);
        // Not the difference of the medians (160 - 35 = 125).
        assert_eq!(median_of(&sealmesh) - median_of(&plaintext), 125.0);
        assert_eq!(
            per_round_differences(&[Some(1.0)], &[None]),
            [None],
            "a failed baseline round pairs with nothing"
        );
        assert!(median_of(&[None, None]).is_nan());
    }

    #[test]
    fn quotients_are_finite_or_none() {
        assert_eq!(quotient(Some(3.0), Some(4.0)), Some(0.75));
        assert_eq!(quotient(Some(3.0), Some(0.0)), None);
        assert_eq!(quotient(Some(f64::NAN), Some(4.0)), None);
        assert_eq!(quotient(None, Some(4.0)), None);
        assert_eq!(quotient(Some(3.0), None), None);
    }

    /// Figures of a column measured in two rounds (connrate failing in the
    /// second), with memory and CPU for proxied ones.
    fn two_rounds(proxied: bool, rr_p50_us: [f64; 2], gbps: f64, rss: u64) -> Figures {
        let mut figures = Figures {
            proxied,
            bulk1_gbps: vec![Some(gbps); 2],
            rr_p50_us: rr_p50_us.map(Some).to_vec(),
            conn_per_s: vec![Some(gbps * 100.0), None],
            ..Figures::default()
        };
        if proxied {
            figures.bulk_bytes = 4_000_000_000;
            figures.proxy_cpu_seconds = 10.0;
            for node in ["node-0", "node-1"] {
                figures.idle_rss_bytes.insert(node.into(), rss);
                figures
                    .rss_per_conn_bytes
                    .insert(node.into(), rss as f64 / 4096.0);
            }
        }
        figures
    }

    #[test]
    fn summary_pairs_rounds_with_plaintext_and_divides_by_the_peer() {
        let names = [PLAINTEXT, "sealmesh", PEER];
        let figures = [
            two_rounds(false, [22.0, 57.0], 20.0, 0),
            two_rounds(true, [150.0, 190.0], 5.0, 8 << 20),
            two_rounds(true, [200.0, 250.0], 4.0, 16 << 20),
        ];
        let plan = Plan::new(true);
        let summary = summarise(&names, &figures, &plan, "debug", false);
        let columns = &summary["columns"];
        // (150 - 22, 190 - 57) = (128, 133): median 130.5.
        assert_eq!(columns["sealmesh"]["rr_p50_added_us"], 130.5);
        assert_eq!(
            columns["sealmesh"]["samples"]["rr_p50_added_us"],
            json!([128.0, 133.0])
        );
        // (178, 193): median 185.5.
        assert_eq!(columns[PEER]["rr_p50_added_us"], 185.5);
        assert!(columns[PLAINTEXT]["rr_p50_added_us"].is_null());
        assert!(columns[PLAINTEXT]["samples"]["rr_p50_added_us"].is_null());
        assert_eq!(summary["rr_p50_added_us"], 130.5);
        // A failed round is null in the samples and left out of the median.
        assert_eq!(
            columns["sealmesh"]["samples"]["conn_per_s"],
            json!([500.0, null])
        );
        assert_eq!(columns["sealmesh"]["conn_per_s"], 500.0);

        let vs_peer = &columns["sealmesh"]["vs_peer"];
        assert_eq!(vs_peer, &summary["vs_peer"]);
        assert_eq!(
            vs_peer,
            &json!({
                "throughput_gbps": 5.0 / 4.0,
                "throughput_16_gbps": null,
                "rr_p50_us": 170.0 / 225.0,
                "rr_p90_us": null,
                "rr_p99_us": null,
                "rr_p50_added_us": 130.5 / 185.5,
                "conn_per_s": 500.0 / 400.0,
                "idle_rss_bytes": 0.5,
                "idle_anon_rss_bytes": null,
                "mem_per_conn_bytes": 0.5,
                // The same CPU time over the same bytes.
                "cpu_seconds_per_gb": 1.0,
            })
        );
        assert!(columns[PEER].get("vs_peer").is_none());
        assert!(columns[PLAINTEXT].get("vs_peer").is_none());

        let without_peer = summarise(&names[..2], &figures[..2], &plan, "debug", false);
        assert!(without_peer.get("vs_peer").is_none());
        assert!(without_peer["columns"]["sealmesh"].get("vs_peer").is_none());

        let table = table(&names, &figures);
        let lines: Vec<&str> = table.lines().collect();
        assert!(
            lines[0].contains("  ratio vs peer         peer   ratio  target"),
            "{table}"
        );
        let added = lines
            .iter()
            .find(|l| l.starts_with("  p50 added us"))
            .unwrap();
        assert_eq!(
            added.split_whitespace().collect::<Vec<_>>(),
            ["p50", "added", "us", "-", "130.50", "0.70x", "185.50"],
            "{table}"
        );
        assert!(
            table.contains("vs peer: the column's figure / the peer's"),
            "{table}"
        );
    }

    #[test]
    fn own_process_tree_has_memory_and_cpu() {
        let me = std::process::id();
        assert!(proc_stats::tree_rss_bytes(me).unwrap() > 0);
        assert!(proc_stats::tree_cpu_seconds(me).unwrap() >= 0.0);
        assert_eq!(proc_stats::tree_rss_bytes(u32::MAX), None);
    }
}
