//! `cargo xtask kind`: sealmesh on a real Kubernetes cluster made by kind. It
//! needs Docker with a running daemon, kind and kubectl, so `cargo xtask test`
//! does not run it. Every step prints the command it runs, so a failed run
//! can be resumed by hand.
//!
//! Steps: create the cluster from `deploy/kind/cluster.yaml`; build the
//! agent, identity and testapp images and load them into the nodes; create a
//! trust anchor and issuer with the identity crate's PKI functions (as
//! `sealmesh certs` does) into the issuer Secret and the trust-roots
//! ConfigMap; apply `deploy/base` through a temporary overlay (image tag,
//! trust anchors); wait for the rollouts; deploy the testapp echo server and
//! a client in a meshed demo namespace; run the load test across the nodes.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use sealmesh_common::consts::{self, MESH_LABEL, MESH_LABEL_ENABLED};
use sealmesh_pki::{self as pki, CaSpec, DEFAULT_ISSUER_COMMON_NAME, DEFAULT_ROOT_COMMON_NAME};
use serde_json::{Value, json};

use crate::{
    bench::loadgen::Report,
    cmd::{self, CmdError},
    loadtest::{LoadtestArgs, Outcome},
    manifests::{relative_path, workspace_root},
};

/// Tools `cargo xtask kind` drives, and where to get them.
const TOOLS: [(&str, &str); 3] = [
    ("docker", "https://docs.docker.com/engine/install/"),
    (
        "kind",
        "https://kind.sigs.k8s.io/docs/user/quick-start/#installation",
    ),
    ("kubectl", "https://kubernetes.io/docs/tasks/tools/"),
];
/// Images built from `deploy/docker/<name>.Dockerfile`.
const IMAGES: [&str; 3] = ["agent", "identity", "testapp"];
const IMAGE_REPOSITORY: &str = "ghcr.io/sealmesh";
/// The meshed namespace of the demo workload and the load test.
pub const DEMO_NAMESPACE: &str = "sealmesh-demo";
const ECHO_PORT: u16 = 8080;
const SERVICE_PORT: u16 = 80;
const ROLLOUT_TIMEOUT: &str = "300s";
/// How long the agents get to log the last connections of a load test.
const ACCESS_LOG_GRACE: Duration = Duration::from_secs(15);

/// Cluster name and image tag `cargo xtask kind` uses unless told otherwise,
/// and that `cargo xtask loadtest --kind` expects.
pub const DEFAULT_CLUSTER: &str = "sealmesh";
pub const DEFAULT_TAG: &str = "dev";

#[derive(Clone, Debug, clap::Args)]
pub struct KindArgs {
    /// Name of the kind cluster (and of its kubectl context, `kind-<name>`).
    #[arg(long, default_value = DEFAULT_CLUSTER)]
    pub name: String,
    /// Keep the cluster afterwards (default: delete it, also on failure; a
    /// cluster that existed before is never deleted).
    #[arg(long)]
    pub keep: bool,
    /// Tag of the images built and deployed.
    #[arg(long, default_value = DEFAULT_TAG)]
    pub tag: String,
}

#[derive(Debug, thiserror::Error)]
pub enum KindError {
    #[error(
        "{missing} not found on PATH: `cargo xtask kind` and `loadtest --kind` need docker (with a running daemon), kind and kubectl; install them ({hints}) or use the local testbed (`cargo xtask demo`, `cargo xtask loadtest`)"
    )]
    MissingTools { missing: String, hints: String },
    #[error("{step}: {source}")]
    Command {
        step: String,
        #[source]
        source: CmdError,
    },
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("creating the trust anchor and issuer: {0}")]
    Pki(#[from] pki::GenerateError),
    #[error("{0}")]
    Unexpected(String),
}

/// Fails with what is missing unless docker, kind and kubectl are on PATH.
pub fn require_tools() -> Result<(), KindError> {
    let missing: Vec<(&str, &str)> = TOOLS
        .into_iter()
        .filter(|(tool, _)| !on_path(tool))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(KindError::MissingTools {
        missing: missing
            .iter()
            .map(|(t, _)| *t)
            .collect::<Vec<_>>()
            .join(", "),
        hints: missing
            .iter()
            .map(|(t, url)| format!("{t}: {url}"))
            .collect::<Vec<_>>()
            .join("; "),
    })
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
}

/// Prints `cmd` and runs it with the output visible.
fn step(what: &str, cmd: &mut Command) -> Result<(), KindError> {
    println!("kind: {what}\n  $ {}", cmd::display(cmd));
    cmd::run_visible(cmd).map_err(|source| KindError::Command {
        step: what.to_owned(),
        source,
    })
}

/// Prints `cmd`, runs it and returns its stdout.
fn query(what: &str, cmd: &mut Command) -> Result<String, KindError> {
    println!("kind: {what}\n  $ {}", cmd::display(cmd));
    cmd::output(cmd).map_err(|source| KindError::Command {
        step: what.to_owned(),
        source,
    })
}

/// `kubectl --context kind-<name> ...`: never whatever context is current.
fn kubectl(cluster: &str) -> Command {
    let mut cmd = Command::new("kubectl");
    cmd.args(["--context", &format!("kind-{cluster}")]);
    cmd
}

/// `kubectl apply -f -` of one object (JSON is YAML).
fn apply(cluster: &str, what: &str, object: &Value) -> Result<(), KindError> {
    let mut cmd = kubectl(cluster);
    cmd.args(["apply", "-f", "-"]);
    println!(
        "kind: {what}\n  $ {} <<< {}",
        cmd::display(&cmd),
        redact_secret(object)
    );
    let mut child = cmd
        .stdin(Stdio::piped())
        .spawn()
        .map_err(|e| KindError::Command {
            step: what.to_owned(),
            source: CmdError::Spawn {
                program: "kubectl".into(),
                source: e,
                hint: "",
            },
        })?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(object.to_string().as_bytes())
        .map_err(|source| KindError::Io {
            what: "cannot write to kubectl's stdin for",
            path: PathBuf::from(what),
            source,
        })?;
    let status = child.wait().map_err(|source| KindError::Io {
        what: "kubectl did not finish",
        path: PathBuf::from(what),
        source,
    })?;
    if status.success() {
        Ok(())
    } else {
        Err(KindError::Unexpected(format!(
            "{what}: kubectl apply failed ({status})"
        )))
    }
}

/// What gets printed of an object: a Secret's data never is.
fn redact_secret(object: &Value) -> String {
    let mut shown = object.clone();
    if shown["kind"] == "Secret"
        && let Some(data) = shown["stringData"].as_object_mut()
    {
        for value in data.values_mut() {
            *value = json!("<redacted>");
        }
    }
    shown.to_string()
}

/// Deletes the kind cluster when dropped, unless told to keep it.
struct ClusterGuard {
    name: String,
    keep: bool,
}

impl Drop for ClusterGuard {
    fn drop(&mut self) {
        if self.keep {
            println!(
                "kind: cluster {} kept; delete it with `kind delete cluster --name {}`",
                self.name, self.name
            );
            return;
        }
        let _ = step(
            "deleting the cluster",
            Command::new("kind").args(["delete", "cluster", "--name", &self.name]),
        );
    }
}

/// The whole workflow; see the module docs.
pub fn run(args: &KindArgs) -> Result<(), KindError> {
    require_tools()?;
    let root = workspace_root();
    let clusters = query(
        "listing kind clusters",
        Command::new("kind").args(["get", "clusters"]),
    )?;
    let existed = clusters.lines().any(|c| c.trim() == args.name);
    // A cluster this run did not create is never deleted by it.
    let _guard = ClusterGuard {
        name: args.name.clone(),
        keep: args.keep || existed,
    };
    if existed {
        println!("kind: cluster {} exists; reusing it", args.name);
    } else {
        step(
            "creating the kind cluster (1 control plane, 2 workers)",
            Command::new("kind")
                .args(["create", "cluster", "--name", &args.name, "--config"])
                .arg(root.join("deploy/kind/cluster.yaml")),
        )?;
    }
    for image in IMAGES {
        let reference = format!("{IMAGE_REPOSITORY}/{image}:{}", args.tag);
        step(
            &format!("building {reference}"),
            Command::new("docker")
                .args(["build", "-f"])
                .arg(root.join(format!("deploy/docker/{image}.Dockerfile")))
                .args(["-t", &reference])
                .arg(&root),
        )?;
        step(
            &format!("loading {reference} into the nodes"),
            Command::new("kind").args(["load", "docker-image", &reference, "--name", &args.name]),
        )?;
    }
    deploy(args, &root)?;
    deploy_demo(&args.name, &args.tag)?;
    let outcome = loadtest_on(
        &args.name,
        &args.tag,
        &LoadtestArgs {
            nodes: 2,
            clients_per_node: 2,
            rate: 200.0,
            concurrency: 8,
            duration: Duration::from_secs(10),
            json: false,
            kind: true,
        },
    )?;
    print!("{}", outcome.table());
    if !outcome.passed() {
        return Err(KindError::Unexpected(
            "the load test failed (see the table above)".into(),
        ));
    }
    Ok(())
}

/// Trust anchor + issuer, the issuer Secret, and `deploy/base` with this
/// run's image tag and trust anchor.
fn deploy(args: &KindArgs, root: &Path) -> Result<(), KindError> {
    let namespace = consts::DEFAULT_CONTROL_NAMESPACE;
    let day = Duration::from_secs(86_400);
    println!("kind: creating a trust anchor (1 year) and an issuer (30 days)");
    let anchor = pki::generate_root(&CaSpec::valid_for(DEFAULT_ROOT_COMMON_NAME, 365 * day))?;
    let (issuer, _) = pki::generate_issuer(
        &anchor.material(),
        &CaSpec::valid_for(DEFAULT_ISSUER_COMMON_NAME, 30 * day),
    )?;

    step(
        "creating the control namespace",
        kubectl(&args.name)
            .args(["apply", "-f"])
            .arg(root.join("deploy/base/namespace.yaml")),
    )?;
    apply(
        &args.name,
        "storing the issuer in its Secret",
        &json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": consts::kube::ISSUER_SECRET, "namespace": namespace},
            "stringData": {"crt.pem": issuer.cert_pem, "key.pem": issuer.key_pem},
        }),
    )?;

    // An overlay over deploy/base in a temp dir: this run's trust anchor and
    // image tag, the repository's files untouched.
    let overlay = tempfile::tempdir().map_err(|source| KindError::Io {
        what: "cannot create a temp dir",
        path: std::env::temp_dir(),
        source,
    })?;
    let overlay_dir = overlay
        .path()
        .canonicalize()
        .map_err(|source| KindError::Io {
            what: "cannot resolve",
            path: overlay.path().to_owned(),
            source,
        })?;
    let base = root
        .join("deploy/base")
        .canonicalize()
        .map_err(|source| KindError::Io {
            what: "cannot find",
            path: root.join("deploy/base"),
            source,
        })?;
    let write = |name: &str, text: &str| {
        let path = overlay_dir.join(name);
        std::fs::write(&path, text).map_err(|source| KindError::Io {
            what: "cannot write",
            path,
            source,
        })
    };
    write(consts::kube::TRUST_ROOTS_KEY, &anchor.cert_pem)?;
    let images: Vec<Value> = ["agent", "identity"]
        .iter()
        .map(|image| json!({"name": format!("{IMAGE_REPOSITORY}/{image}"), "newTag": args.tag}))
        .collect();
    let kustomization = json!({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        // kustomize accepts only relative paths to other kustomizations.
        "resources": [relative_path(&overlay_dir, &base)],
        "configMapGenerator": [{
            "name": consts::kube::TRUST_ROOTS_CONFIGMAP,
            "namespace": namespace,
            "behavior": "replace",
            "files": [consts::kube::TRUST_ROOTS_KEY],
            "options": {"disableNameSuffixHash": true},
        }],
        "images": images,
    });
    write("kustomization.yaml", &kustomization.to_string())?;
    step(
        "applying deploy/base (with this run's trust anchor and image tag)",
        kubectl(&args.name).arg("apply").arg("-k").arg(&overlay_dir),
    )?;
    for workload in [
        format!("deployment/{}", consts::kube::IDENTITY_NAME),
        format!("daemonset/{}", consts::kube::AGENT_DAEMONSET),
    ] {
        step(
            &format!("waiting for {workload}"),
            kubectl(&args.name).args([
                "-n",
                namespace,
                "rollout",
                "status",
                &workload,
                "--timeout",
                ROLLOUT_TIMEOUT,
            ]),
        )?;
    }
    Ok(())
}

/// A labelled, meshed demo namespace with the testapp echo server behind a
/// Service and a client Job that must get its echo back.
fn deploy_demo(cluster: &str, tag: &str) -> Result<(), KindError> {
    apply(
        cluster,
        "creating the meshed demo namespace",
        &json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": DEMO_NAMESPACE, "labels": {MESH_LABEL: MESH_LABEL_ENABLED}},
        }),
    )?;
    let image = format!("{IMAGE_REPOSITORY}/testapp:{tag}");
    apply(
        cluster,
        "deploying the echo server",
        &server_deployment("echo", &image, &["testapp", "echo-server"], 2),
    )?;
    apply(cluster, "exposing the echo server", &service("echo"))?;
    wait_rollout(cluster, "deployment/echo")?;
    let vip = cluster_ip(cluster, "echo")?;
    let connect = format!("{vip}:{SERVICE_PORT}");
    apply(
        cluster,
        "running the demo client",
        &job(
            "demo-client",
            &image,
            None,
            &[
                "testapp",
                "client",
                "--connect",
                &connect,
                "--send",
                "hello mesh",
                "--repeat",
                "10",
            ],
        ),
    )?;
    step(
        "waiting for the demo client to get its echoes",
        kubectl(cluster).args([
            "-n",
            DEMO_NAMESPACE,
            "wait",
            "--for=condition=complete",
            "job/demo-client",
            "--timeout",
            ROLLOUT_TIMEOUT,
        ]),
    )
}

fn server_deployment(name: &str, image: &str, command: &[&str], replicas: usize) -> Value {
    let mut args: Vec<String> = command[1..].iter().map(|s| (*s).to_owned()).collect();
    args.extend(["--listen".into(), format!("0.0.0.0:{ECHO_PORT}")]);
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": DEMO_NAMESPACE},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    // One replica per node, so connections cross nodes (HBONE).
                    "topologySpreadConstraints": [{
                        "maxSkew": 1,
                        "topologyKey": "kubernetes.io/hostname",
                        "whenUnsatisfiable": "DoNotSchedule",
                        "labelSelector": {"matchLabels": {"app": name}},
                    }],
                    "containers": [{
                        "name": name,
                        "image": image,
                        "command": [format!("/usr/local/bin/{}", command[0])],
                        "args": args,
                        "ports": [{"containerPort": ECHO_PORT}],
                    }],
                },
            },
        },
    })
}

fn service(name: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": DEMO_NAMESPACE},
        "spec": {
            "selector": {"app": name},
            "ports": [{"port": SERVICE_PORT, "targetPort": ECHO_PORT}],
        },
    })
}

/// A run-once pod (`node` pins it to a node).
fn job(name: &str, image: &str, node: Option<&str>, command: &[&str]) -> Value {
    let mut pod = json!({
        "restartPolicy": "Never",
        "containers": [{
            "name": name,
            "image": image,
            "command": [format!("/usr/local/bin/{}", command[0])],
            "args": &command[1..],
        }],
    });
    if let Some(node) = node {
        pod["nodeName"] = json!(node);
    }
    json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": DEMO_NAMESPACE, "labels": {"app": "load-client"}},
        "spec": {"backoffLimit": 0, "template": {"metadata": {"labels": {"app": "load-client"}}, "spec": pod}},
    })
}

fn wait_rollout(cluster: &str, workload: &str) -> Result<(), KindError> {
    step(
        &format!("waiting for {workload}"),
        kubectl(cluster).args([
            "-n",
            DEMO_NAMESPACE,
            "rollout",
            "status",
            workload,
            "--timeout",
            ROLLOUT_TIMEOUT,
        ]),
    )
}

fn cluster_ip(cluster: &str, service: &str) -> Result<String, KindError> {
    let ip = query(
        &format!("reading the ClusterIP of Service {service}"),
        kubectl(cluster).args([
            "-n",
            DEMO_NAMESPACE,
            "get",
            "service",
            service,
            "-o",
            "jsonpath={.spec.clusterIP}",
        ]),
    )?;
    Ok(ip.trim().to_owned())
}

/// `cargo xtask loadtest --kind`: the load test on the kind cluster that
/// `cargo xtask kind --keep` left ([`DEFAULT_CLUSTER`], context
/// `kind-sealmesh`), with its [`DEFAULT_TAG`] images.
pub fn loadtest(args: &LoadtestArgs) -> Result<Outcome, KindError> {
    require_tools()?;
    loadtest_on(DEFAULT_CLUSTER, DEFAULT_TAG, args)
}

/// loadgen echo servers (one per node) behind a Service, loadgen load
/// clients pinned to each worker node, their reports merged, and the
/// agents' access logs counted: every client connection must be mTLS.
fn loadtest_on(cluster: &str, tag: &str, args: &LoadtestArgs) -> Result<Outcome, KindError> {
    let image = format!("{IMAGE_REPOSITORY}/testapp:{tag}");
    let nodes = query(
        "listing the worker nodes",
        kubectl(cluster).args([
            "get",
            "nodes",
            "-l",
            "!node-role.kubernetes.io/control-plane",
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ]),
    )?;
    let nodes: Vec<&str> = nodes.split_whitespace().take(args.nodes).collect();
    if nodes.is_empty() {
        return Err(KindError::Unexpected(
            "the cluster has no worker nodes to run the load on".into(),
        ));
    }
    apply(
        cluster,
        "deploying the load servers",
        &server_deployment("load-server", &image, &["loadgen", "echo"], nodes.len()),
    )?;
    apply(
        cluster,
        "exposing the load servers",
        &service("load-server"),
    )?;
    wait_rollout(cluster, "deployment/load-server")?;
    let connect = format!("{}:{SERVICE_PORT}", cluster_ip(cluster, "load-server")?);
    let clients = nodes.len() * args.clients_per_node;
    let rate = (args.rate / clients as f64).to_string();
    let seconds = args.duration.as_secs_f64().to_string();
    let concurrency = args.concurrency.to_string();
    let mut jobs = Vec::new();
    // Jobs are immutable: a previous run's must go first.
    step(
        "removing the previous load clients",
        kubectl(cluster).args([
            "-n",
            DEMO_NAMESPACE,
            "delete",
            "job",
            "-l",
            "app=load-client",
            "--ignore-not-found",
            "--wait",
        ]),
    )?;
    let started = Instant::now();
    for node in &nodes {
        for index in 0..args.clients_per_node {
            let name = format!("load-client-{index}-{node}");
            apply(
                cluster,
                &format!("starting load client {name}"),
                &job(
                    &name,
                    &image,
                    Some(node),
                    &[
                        "loadgen",
                        "load",
                        "--connect",
                        &connect,
                        "--rate",
                        &rate,
                        "--concurrency",
                        &concurrency,
                        "--seconds",
                        &seconds,
                    ],
                ),
            )?;
            jobs.push(name);
        }
    }
    let timeout = format!("{}s", args.duration.as_secs() + 120);
    let mut outcome = Outcome::default();
    for name in &jobs {
        step(
            &format!("waiting for {name}"),
            kubectl(cluster).args([
                "-n",
                DEMO_NAMESPACE,
                "wait",
                "--for=condition=complete",
                &format!("job/{name}"),
                "--timeout",
                &timeout,
            ]),
        )?;
        let logs = query(
            &format!("reading {name}'s report"),
            kubectl(cluster).args(["-n", DEMO_NAMESPACE, "logs", &format!("job/{name}")]),
        )?;
        let report = logs
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str::<Report>(l).ok());
        if report.is_none_or(|report| outcome.add_client_report(name, report).is_err()) {
            return Err(KindError::Unexpected(format!(
                "{name} printed no load report; its log:\n{logs}"
            )));
        }
    }
    count_access_log(cluster, started, &mut outcome)?;
    Ok(outcome)
}

/// Counts the load clients' outbound connections in the agents' access logs
/// (JSON lines of `consts::ACCESS_LOG_TARGET`), waiting for the last ones.
fn count_access_log(cluster: &str, since: Instant, outcome: &mut Outcome) -> Result<(), KindError> {
    let client_prefix = format!("{DEMO_NAMESPACE}/load-client-");
    let since = format!("{}s", since.elapsed().as_secs() + 60);
    let deadline = Instant::now() + ACCESS_LOG_GRACE;
    loop {
        let logs = query(
            "reading the agents' access logs",
            kubectl(cluster).args([
                "-n",
                consts::DEFAULT_CONTROL_NAMESPACE,
                "logs",
                "-l",
                &format!("app.kubernetes.io/name={}", consts::kube::AGENT_DAEMONSET),
                "--tail=-1",
                "--since",
                &since,
                "--max-log-requests",
                "20",
            ]),
        )?;
        let events: Vec<Value> = logs
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            // The agent's JSON lines carry the event's fields at the top level.
            .filter(|line| line["target"] == consts::ACCESS_LOG_TARGET)
            .collect();
        outcome.tally_client_connections(&events, &client_prefix);
        if outcome.logged >= outcome.connections || Instant::now() > deadline {
            return Ok(());
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_when_printed() {
        let secret = json!({"kind": "Secret", "stringData": {"key.pem": "PRIVATE"}});
        assert_eq!(
            redact_secret(&secret),
            r#"{"kind":"Secret","stringData":{"key.pem":"<redacted>"}}"#
        );
        let config = json!({"kind": "ConfigMap", "data": {"a": "b"}});
        assert_eq!(redact_secret(&config), config.to_string());
    }

    #[test]
    fn load_clients_are_pinned_jobs_that_never_retry() {
        let job = job(
            "c",
            "img:dev",
            Some("w1"),
            &["loadgen", "load", "--rate", "1"],
        );
        assert_eq!(job["spec"]["backoffLimit"], 0);
        assert_eq!(job["spec"]["template"]["spec"]["nodeName"], "w1");
        assert_eq!(
            job["spec"]["template"]["spec"]["containers"][0]["command"],
            json!(["/usr/local/bin/loadgen"])
        );
        assert_eq!(
            job["spec"]["template"]["spec"]["containers"][0]["args"],
            json!(["load", "--rate", "1"])
        );
    }
}
