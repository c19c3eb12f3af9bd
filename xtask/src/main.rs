//! `cargo xtask`: set up the host, run all tests, show the demo, run benchmarks,
//! and manage local testbeds by hand.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use nix::sys::signal::{SigSet, Signal};
use sealmesh_common::logging;
use xtask::{
    bench, chaos, demo, gates, kind, loadtest,
    mesh::{Mesh, MeshOptions},
    setup,
    testbed::{self, Testbed, TestbedId, TestbedSpec, kube::KubeMode},
};

#[derive(Parser)]
#[command(about = "sealmesh developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing needs (the eBPF build's pinned nightly
    /// with rust-src, bpf-linker, apt packages, bpffs, manifest validation
    /// tools, the static gates' tools); idempotent.
    Setup {
        /// Only what building needs (toolchain, bpf-linker, apt packages): for
        /// container image builds, where bpffs and cgroups are not the host's.
        #[arg(long)]
        build_only: bool,
    },
    /// Run setup, the static gates (as `lint`), build the workspace (including
    /// the eBPF programs), validate deploy/ and run all tests. Needs root.
    Test,
    /// The static gates alone: `cargo fmt --all --check`, `cargo machete`,
    /// `cargo deny check bans licenses sources` and `cargo clippy --workspace
    /// --all-targets -- -D warnings`; installs their tools when missing.
    Lint,
    /// Fuzz every parser of untrusted input (cargo-fuzz targets in fuzz/,
    /// AddressSanitizer, the pinned nightly) for --seconds each; installs
    /// cargo-fuzz when missing.
    Fuzz(xtask::fuzz::FuzzArgs),
    /// Show the main job on a local testbed: an app in a 2-node mesh, its live
    /// mTLS connections and edges. Needs root.
    Demo(demo::DemoArgs),
    /// Data-path benchmark against plaintext (and a peer proxy) on the testbed;
    /// `bench identity` benchmarks the identity service. Needs root. Measures
    /// the binaries next to this xtask: for real figures build them in release
    /// (`cargo build --release --workspace && sudo -E target/release/xtask bench`).
    Bench(BenchArgs),
    /// Connections between pods of every node through a Service at a rate and
    /// concurrency; fails on any error or any non-mTLS connection. Needs root.
    Loadtest(loadtest::LoadtestArgs),
    /// Fault-injection scenarios under a steady load of meshed cross-node
    /// connections (agent restart, identity outage and flood, issuer and
    /// anchor rotation, peer partition, scale); prints each one's PASS/FAIL
    /// and figures, and fails if any fails. Needs root and nftables.
    Chaos(chaos::ChaosArgs),
    /// Local testbeds (network namespaces + cgroups) for humans. Needs root.
    #[command(subcommand)]
    Testbed(TestbedTask),
    /// Render deploy/ with kustomize and validate every object against the
    /// Kubernetes schemas, the names the code uses and the binaries' flags.
    Manifests(ManifestsArgs),
    /// Deploy sealmesh on a local kind cluster and load-test it. Needs docker
    /// (with a daemon), kind and kubectl; `cargo xtask test` does not run it.
    ///
    /// Creates the kind cluster from deploy/kind/cluster.yaml (1 control
    /// plane, 2 workers), builds the agent, identity and testapp images from
    /// deploy/docker and loads them into the nodes, creates a trust anchor and
    /// issuer (the issuer Secret and trust-roots ConfigMap), applies
    /// deploy/base and waits for the rollouts, labels the demo namespace
    /// sealmesh-demo for the mesh, deploys the testapp echo server and a
    /// client, and runs the load test across the worker nodes (as `cargo
    /// xtask loadtest --kind`). Every command is printed before it runs.
    Kind(kind::KindArgs),
}

#[derive(Args)]
struct ManifestsArgs {
    /// Repository (or copy of it) whose deploy/ to validate.
    #[arg(long, default_value_os_t = xtask::manifests::workspace_root())]
    root: std::path::PathBuf,
    /// Directory with the built sealmesh-agent and sealmesh-identity whose
    /// --help the manifests' flags are checked against [default: next to this
    /// xtask; skipped with a note when they are not built].
    #[arg(long, conflicts_with = "skip_flags")]
    bin_dir: Option<std::path::PathBuf>,
    /// Do not check the flags against the binaries.
    #[arg(long)]
    skip_flags: bool,
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct BenchArgs {
    #[command(subcommand)]
    task: Option<BenchTask>,
    #[command(flatten)]
    options: bench::datapath::BenchOptions,
}

#[derive(Subcommand)]
enum BenchTask {
    /// Certificates issued per second by the identity service.
    Identity {
        #[arg(long, default_value_t = 1000)]
        certs: usize,
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
    },
}

#[derive(Subcommand)]
enum TestbedTask {
    /// Bring a testbed up (N nodes × M pods in the meshed namespace `mesh-demo`).
    /// It stays up after this command returns; `testbed down <ID>` removes it.
    /// With --foreground it stays until Ctrl-C and is then removed.
    Up {
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        /// Pods per node.
        #[arg(long, default_value_t = 2)]
        pods: usize,
        #[arg(long)]
        foreground: bool,
        /// Run the mesh in Kubernetes mode on an in-process API server: the
        /// identity service and an agent per node run with `--mode kubernetes`;
        /// an admin kubeconfig for the API server is written for kubectl and
        /// sealmesh. Stays up until Ctrl-C (implies --foreground).
        #[arg(long)]
        kubernetes: bool,
        /// Like --kubernetes, with an external API server (e.g. a real
        /// kube-apiserver) and admin credentials from this kubeconfig.
        #[arg(long, value_name = "FILE", conflicts_with = "kubernetes")]
        kubeconfig: Option<PathBuf>,
    },
    /// Remove a testbed, or with --all every testbed's leftovers (also of crashed
    /// runs; this destroys testbeds in use too).
    Down(DownArgs),
    /// Run a command in a pod (`<namespace>/<pod>` or a unique `<pod>`), a node
    /// (`node-<k>`) or `underlay`: its network namespace and cgroup.
    Exec {
        target: String,
        /// Testbed id; needed when more than one is up.
        #[arg(long)]
        testbed: Option<TestbedId>,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// List testbeds with their nodes and pods.
    List,
}

#[derive(Args)]
#[group(required = true, multiple = false)]
struct DownArgs {
    id: Option<TestbedId>,
    #[arg(long)]
    all: bool,
}

fn main() -> ExitCode {
    // SEALMESH_LOG, as for every sealmesh binary; netlink-packet-route warns
    // about every interface attribute a newer kernel adds, noise to whoever
    // reads the testbed's output.
    let level = std::env::var(logging::LOG_LEVEL_ENV)
        .unwrap_or_else(|_| "info,netlink_packet_route=error".to_owned());
    if let Err(error) = logging::init(&level, logging::LogFormat::Text) {
        eprintln!("{error}");
        return ExitCode::from(2);
    }
    match run(Cli::parse().command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, skipping causes that a message already
/// quotes (many of ours include their source).
fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
}

fn run(task: Task) -> anyhow::Result<ExitCode> {
    match task {
        Task::Setup { build_only: false } => setup::run()?,
        Task::Setup { build_only: true } => setup::run_scope(setup::Scope::BuildOnly)?,
        Task::Test => test()?,
        Task::Lint => {
            setup::gate_tools()?;
            gates::run_all()?;
        }
        Task::Fuzz(args) => xtask::fuzz::run(&args)?,
        Task::Manifests(args) => manifests(&args)?,
        Task::Kind(args) => kind::run(&args)?,
        Task::Demo(args) => demo::main(&args)?,
        Task::Bench(BenchArgs {
            task: Some(BenchTask::Identity { certs, concurrency }),
            ..
        }) => bench::identity::run(certs, concurrency)?,
        Task::Bench(BenchArgs {
            task: None,
            options,
        }) => {
            bench::datapath::run(&options)?;
        }
        Task::Loadtest(args) => {
            if !loadtest::run(&args)?.passed() {
                return Ok(ExitCode::FAILURE);
            }
        }
        Task::Chaos(args) => {
            if !chaos::run(&args)?.passed() {
                return Ok(ExitCode::FAILURE);
            }
        }
        Task::Testbed(task) => return testbed_task(task),
    }
    Ok(ExitCode::SUCCESS)
}

fn test() -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "`cargo xtask test` needs root: tests create network namespaces and cgroups and load eBPF programs; run `sudo -E cargo xtask test`"
        );
    }
    setup::run()?;
    gates::run_all()?;
    xtask::cmd::run_visible(xtask::cmd::cargo().args(["build", "--workspace"]))
        .context("building the workspace")?;
    manifests(&ManifestsArgs {
        root: xtask::manifests::workspace_root(),
        bin_dir: None,
        skip_flags: false,
    })?;
    let (status, totals) = xtask::test_totals::run_counting(xtask::cmd::cargo().args([
        "test",
        "--workspace",
        "--no-fail-fast",
    ]))
    .context("running the tests")?;
    if !status.success() || totals.failed > 0 {
        bail!("tests failed ({status}): {}", totals.closing_line());
    }
    Ok(())
}

fn manifests(args: &ManifestsArgs) -> anyhow::Result<()> {
    let tools = xtask::manifests::Tools::locate()?;
    let bin_dir = match &args.bin_dir {
        _ if args.skip_flags => None,
        Some(dir) => Some(dir.clone()),
        None => {
            let exe = std::env::current_exe().context("locating the running xtask")?;
            let dir = exe.parent().context("the running xtask has no directory")?;
            if ["sealmesh-agent", "sealmesh-identity"]
                .iter()
                .all(|binary| dir.join(binary).is_file())
            {
                Some(dir.to_owned())
            } else {
                println!(
                    "manifests: flags not checked: sealmesh-agent and sealmesh-identity are not built in {} (`cargo build --workspace`)",
                    dir.display()
                );
                None
            }
        }
    };
    let summary = xtask::manifests::validate_repository(&tools, &args.root, bin_dir.as_deref())?;
    println!("{}", summary.line());
    Ok(())
}

fn testbed_task(task: TestbedTask) -> anyhow::Result<ExitCode> {
    match task {
        TestbedTask::Up {
            nodes,
            pods,
            foreground,
            kubernetes,
            kubeconfig,
        } => {
            // Block the signals before any thread starts, so sigwait below gets them.
            let signals = SigSet::from_iter([Signal::SIGINT, Signal::SIGTERM]);
            let kube_mode = match (kubernetes, kubeconfig) {
                (_, Some(kubeconfig)) => Some(KubeMode::external(kubeconfig)),
                (true, None) => Some(KubeMode::fake()),
                (false, None) => None,
            };
            if foreground || kube_mode.is_some() {
                signals.thread_block()?;
            }
            if let Some(mode) = kube_mode {
                kube_testbed_up(&TestbedSpec::meshed(nodes, pods), mode, &signals)?;
                return Ok(ExitCode::SUCCESS);
            }
            let testbed = Testbed::up(&TestbedSpec::meshed(nodes, pods))?;
            print_testbed(&testbed);
            if foreground {
                println!("up until Ctrl-C");
                let signal = signals.wait()?;
                println!("{signal}: tearing down");
                testbed.down()?;
            } else {
                let id = testbed.leave_running();
                println!("left running; remove it with: sudo -E cargo xtask testbed down {id}");
            }
        }
        TestbedTask::Down(DownArgs { id: Some(id), .. }) => {
            testbed::require_root()?;
            testbed::down_by_id(&id)?;
            println!("removed {id}");
        }
        TestbedTask::Down(DownArgs { id: None, .. }) => {
            let ids = testbed::down_all()?;
            println!("swept {} testbed(s): {}", ids.len(), join(&ids));
        }
        TestbedTask::Exec {
            target,
            testbed,
            command,
        } => return exec(&target, testbed, &command),
        TestbedTask::List => {
            let ids = testbed::list();
            if ids.is_empty() {
                println!("no testbeds");
            }
            for id in ids {
                match Testbed::attach(&id) {
                    Ok(testbed) => print_testbed(&testbed),
                    Err(e) => println!(
                        "{id}: unusable ({e}); remove it with `sudo -E cargo xtask testbed down {id}`"
                    ),
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn join(ids: &[TestbedId]) -> String {
    ids.iter()
        .map(TestbedId::to_string)
        .collect::<Vec<_>>()
        .join(" ")
}

/// `testbed up --kubernetes`: the mesh on the API server until a signal;
/// children (agents, identity service) and the in-process API server live
/// as long as this process.
fn kube_testbed_up(spec: &TestbedSpec, mode: KubeMode, signals: &SigSet) -> anyhow::Result<()> {
    let mesh = Mesh::up(
        spec,
        MeshOptions {
            kubernetes: Some(mode),
            ..MeshOptions::default()
        },
    )?;
    print_testbed(mesh.testbed());
    let kube = mesh.kube().expect("the mesh runs in Kubernetes mode");
    if let Some(server) = kube.fake_server() {
        let kubeconfig = mesh.testbed().state_dir().join("admin.kubeconfig");
        server.write_kubeconfig(&kubeconfig, &server.admin_token())?;
        println!(
            "  API server {} (admin kubeconfig {})",
            server.url(),
            kubeconfig.display()
        );
    }
    for node in &mesh.testbed().cluster().nodes {
        println!(
            "  agent {:<9} log {}",
            node.name,
            mesh.agent_log(&node.name).display()
        );
    }
    println!("  identity  log {}", mesh.identity_log().display());
    println!("Kubernetes mode: up until Ctrl-C");
    let signal = signals.wait()?;
    println!("{signal}: tearing down");
    drop(mesh);
    Ok(())
}

fn print_testbed(testbed: &Testbed) {
    let cluster = testbed.cluster();
    println!(
        "{} (cluster file {})",
        testbed.id(),
        testbed.cluster_file_path().display()
    );
    println!(
        "  underlay  {:<12} netns {}",
        testbed.control_plane_ip(),
        testbed.underlay_netns()
    );
    for node in &cluster.nodes {
        println!(
            "  {:<9} {:<12} netns {} pods {}",
            node.name,
            node.ip,
            node.netns.as_deref().unwrap_or("-"),
            node.pod_cidr
        );
        for pod in cluster.pods_on(&node.name) {
            println!(
                "    {:<22} {:<12} netns {}",
                format!("{}/{}", pod.namespace, pod.name),
                pod.ip,
                pod.netns.as_deref().unwrap_or("-")
            );
        }
    }
}

fn exec(target: &str, id: Option<TestbedId>, command: &[String]) -> anyhow::Result<ExitCode> {
    testbed::require_root()?;
    let id = match id {
        Some(id) => id,
        None => match testbed::list().as_slice() {
            [only] => only.clone(),
            [] => bail!("no testbed is up; start one with `sudo -E cargo xtask testbed up`"),
            many => bail!(
                "several testbeds are up ({}); pick one with --testbed",
                join(many)
            ),
        },
    };
    let testbed = Testbed::attach(&id)?;
    let mut cmd = Command::new(&command[0]);
    cmd.args(&command[1..]);
    let child = if target == "underlay" {
        testbed.spawn_in_underlay(cmd)?
    } else if testbed.cluster().node(target).is_some() {
        testbed.spawn_in_node(target, cmd)?
    } else {
        let (namespace, pod) = match target.split_once('/') {
            Some((namespace, pod)) => (namespace.to_owned(), pod.to_owned()),
            None => {
                let matches: Vec<_> = testbed
                    .cluster()
                    .pods
                    .iter()
                    .filter(|p| p.name == target)
                    .collect();
                match matches.as_slice() {
                    [pod] => (pod.namespace.clone(), pod.name.clone()),
                    [] => bail!(
                        "testbed {id} has no pod or node {target:?}; `cargo xtask testbed list` shows them"
                    ),
                    _ => bail!(
                        "pod name {target:?} is in several namespaces; use <namespace>/{target}"
                    ),
                }
            }
        };
        testbed.spawn_in_pod(&namespace, &pod, cmd)?
    };
    let status = child.wait_with_output()?.status;
    Ok(match status.code() {
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        None => ExitCode::FAILURE,
    })
}
