//! The `sealmesh-agent` binary in kubernetes mode: started with a kubeconfig
//! pointing at the in-process API server, it finds its node, redirects the
//! node's meshed pods (real eBPF, attached at a private cgroup), follows pods
//! as they come and go, and hot-reloads the trust-roots ConfigMap.
//!
//! The agent runs in its own network namespace (it listens on its node's
//! InternalIP, which must not be loopback); the test thread joins that
//! namespace, so the API server it starts and the agent it spawns share it.

mod kube_support;
mod support;

use std::{
    fs::File,
    net::Ipv4Addr,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use kube_support::{CgroupRoot, Cluster, PodSpec, eventually};
use nix::sched::{CloneFlags, setns};
use sealmesh_common::{consts::AGENT_STARTED_MESSAGE, host};
use sealmesh_pki::{CaSpec, generate_root};
use serde_json::Value;
use support::{Process, Spec, Testbed};

const NODE: &str = "n1";
const NODE_IP: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 2);
const MESHED_NS: &str = "emojivoto";
const CONTROL_NS: &str = "sealmesh";

fn root_pem(name: &str) -> String {
    generate_root(&CaSpec::valid_for(name, Duration::from_secs(86_400)))
        .unwrap()
        .cert_pem
}

fn log_lines(log: &Path) -> Vec<Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

/// Whether the agent logged that `cgroup` entered (or left) the eBPF map of `role`.
fn classified(log: &Path, message: &str, role: &str, cgroup: u64) -> bool {
    log_lines(log)
        .iter()
        .any(|line| line["message"] == message && line["role"] == role && line["cgroup"] == cgroup)
}

fn logged(log: &Path, message: &str, field: &str, value: &Value) -> bool {
    log_lines(log)
        .iter()
        .any(|line| line["message"] == message && &line[field] == value)
}

#[test]
fn kubernetes_mode_agent_follows_the_api() {
    let testbed = Testbed::new(&Spec {
        name: "kube-agent",
        tests: "the kubernetes-mode agent test",
        addrs: &[(NODE_IP, 24)],
        child_cgroup: false,
    });
    let netns = File::open(Path::new(host::NETNS_RUN_DIR).join(&testbed.netns)).unwrap();
    let bpffs_dir = testbed.pin_dir();
    // The thread joins the namespace; the test's result is the thread's.
    std::thread::spawn(move || {
        setns(&netns, CloneFlags::CLONE_NEWNET).expect("join the test's network namespace");
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(run_agent_against_the_api(&bpffs_dir));
    })
    .join()
    .expect("the agent scenario passes");
    drop(testbed);
}

async fn run_agent_against_the_api(bpffs_dir: &Path) {
    let cgroups = CgroupRoot::new("kube-agent");
    let (server, cluster) = Cluster::start().await;
    kube_support::install_policy_crd(&cluster).await;
    cluster.node(NODE, NODE_IP).await;
    cluster.namespace(CONTROL_NS, false).await;
    cluster.namespace(MESHED_NS, true).await;
    let first_root = root_pem("root-a.test");
    cluster.trust_roots(CONTROL_NS, &first_root).await;
    let web = cluster
        .running_pod(PodSpec::new(
            MESHED_NS,
            "web-0",
            "web",
            NODE,
            [10, 244, 1, 2],
        ))
        .await;
    let web_cgroup = host::cgroup_id(&cgroups.create_systemd("besteffort", &web)).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    server
        .write_kubeconfig(&kubeconfig, &server.admin_token())
        .unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "node-token").unwrap();
    let log = dir.path().join("agent.log");
    let agent = Process(
        Command::new(env!("CARGO_BIN_EXE_sealmesh-agent"))
            .args(["--mode", "kubernetes", "--node", NODE])
            .arg("--cgroup-root")
            .arg(cgroups.path())
            .arg("--node-cgroup")
            .arg(cgroups.path())
            .arg("--bpffs-dir")
            .arg(bpffs_dir)
            .arg("--token-file")
            .arg(&token)
            // Not the DaemonSet's path: this test leaves nothing on the host.
            .arg("--cert-cache-dir")
            .arg(dir.path().join("certs"))
            .arg("--handover-socket")
            .arg(dir.path().join("agent.sock"))
            .args([
                "--identity-addr",
                "172.31.0.1:8080",
                "--admin-listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
                "--log-format",
                "json",
            ])
            .env("KUBECONFIG", &kubeconfig)
            .env_remove("SEALMESH_CLUSTER_FILE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            // Every sealmesh binary logs to stderr.
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );

    eventually("the agent to start with web-0 meshed", || async {
        logged(&log, AGENT_STARTED_MESSAGE, "meshed_pods", &1.into())
    })
    .await;
    // web-0 was in the meshed map before the programs attached (its removal below is logged).
    // A pod arrives, its cgroup a moment later (cgroupfs naming this time).
    let vote = cluster
        .running_pod(PodSpec::new(
            MESHED_NS,
            "vote-0",
            "vote",
            NODE,
            [10, 244, 1, 3],
        ))
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let vote_cgroup = host::cgroup_id(&cgroups.create_cgroupfs("burstable", &vote)).unwrap();
    eventually("vote-0's cgroup to be meshed", || async {
        classified(&log, "cgroup classified", "meshed pod", vote_cgroup)
    })
    .await;

    cluster.delete_pod(MESHED_NS, "web-0").await;
    eventually("web-0's cgroup to be unmeshed", || async {
        classified(
            &log,
            "cgroup no longer classified",
            "meshed pod",
            web_cgroup,
        )
    })
    .await;

    cluster
        .trust_roots(
            CONTROL_NS,
            &format!("{first_root}{}", root_pem("root-b.test")),
        )
        .await;
    eventually("the agent to reload the trust roots", || async {
        log_lines(&log)
            .iter()
            .any(|line| line["message"] == "trust anchors updated from the API")
    })
    .await;
    let config_line = log_lines(&log)
        .into_iter()
        .find(|line| line["message"] == "sealmesh-agent starting")
        .expect("the agent logs its configuration");
    let config = config_line["config"].as_str().unwrap();
    assert!(
        config.starts_with("mode=kubernetes node=n1 namespace=sealmesh "),
        "{config}"
    );
    drop(agent);
}
