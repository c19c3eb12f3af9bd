//! A whole mesh on the testbed: trust anchor and issuer, the identity service
//! in the underlay (the control plane), and one agent per node. Used by the
//! data-path tests, the demo and benchmarks.
//!
//! With [`MeshOptions::kubernetes`] the same mesh runs in Kubernetes mode: the
//! testbed registers with an API server ([`KubeCluster`]), the identity
//! service and the agents start with `--mode kubernetes` and read everything
//! through the API relay; logs, waits and helpers are the same.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use sealmesh_common::{
    authz::AuthorizationPolicy,
    cluster::IdentityEndpoint,
    consts::{
        ACCESS_LOG_TARGET, AGENT_STARTED_MESSAGE, CERTIFICATE_INHERITED_MESSAGE,
        CERTIFICATE_OBTAINED_MESSAGE, IDENTITY_GRPC_PORT,
    },
};
use sealmesh_pki::{self as pki, CaSpec, GeneratedCa, Layout};
use serde_json::Value;

use crate::testbed::{
    ChildGuard, Testbed, TestbedError, TestbedSpec,
    kube::{KubeCluster, KubeMode, KubePki, RegisteredPod, TestbedKubeError},
    netns,
};

/// How long agents get to obtain their first certificates.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stopped agent may take (the DaemonSet's
/// terminationGracePeriodSeconds): its drain and a successor's start.
const AGENT_STOP_GRACE: Duration = Duration::from_secs(45);
const POLL: Duration = Duration::from_millis(50);
const ROOT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
const ISSUER_VALIDITY: Duration = Duration::from_secs(48 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error(transparent)]
    Testbed(#[from] TestbedError),
    #[error("cannot create the mesh's certificates: {0}")]
    Pki(#[from] pki::PkiError),
    #[error("{binary} is not built ({path}): run `cargo build --workspace` first")]
    MissingBinary { binary: &'static str, path: PathBuf },
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("timed out after {timeout:?} waiting for {what}; last lines of {log}:\n{tail}")]
    Timeout {
        what: String,
        timeout: Duration,
        log: PathBuf,
        tail: String,
    },
    #[error("{what} exited while starting; last lines of {log}:\n{tail}")]
    Exited {
        what: String,
        log: PathBuf,
        tail: String,
    },
    #[error("no agent runs on node {0}")]
    NoAgent(String),
    /// Boxed: the Kubernetes errors are large, and every mesh call returns this.
    #[error(transparent)]
    Kube(Box<TestbedKubeError>),
    #[error("the mesh runs in local mode; {0} needs MeshOptions::kubernetes")]
    NotKubernetes(&'static str),
}

impl From<TestbedKubeError> for MeshError {
    fn from(error: TestbedKubeError) -> Self {
        Self::Kube(Box::new(error))
    }
}

/// A root and an issuer it signed, written to `pki_dir` (`root/` in the pem
/// layout, `issuer/` in the tls layout, as cert-manager writes it); returns
/// the root and the issuer as the identity service reads it.
fn create_pki(pki_dir: &Path) -> Result<(GeneratedCa, pki::CaMaterial), pki::PkiError> {
    let root = pki::generate_root(&CaSpec::valid_for(
        "root.sealmesh.cluster.local",
        ROOT_VALIDITY,
    ))?;
    let (issuer, _) = pki::generate_issuer(
        &root.material(),
        &CaSpec::valid_for("identity.sealmesh.cluster.local", ISSUER_VALIDITY),
    )?;
    root.write_dir(&pki_dir.join("root"), Layout::Pem, false)?;
    issuer.write_dir(&pki_dir.join("issuer"), Layout::Tls, false)?;
    Ok((root, pki::CaMaterial::read_dir(&pki_dir.join("issuer"))?))
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> MeshError {
    let what = what.into();
    move |source| MeshError::Io { what, source }
}

/// How to run the mesh's processes.
#[derive(Clone, Debug)]
pub struct MeshOptions {
    /// Extra arguments for every agent (e.g. `--deny-plaintext`).
    pub agent_args: Vec<String>,
    /// Extra arguments for the identity service (e.g. `--cert-lifetime 10s`).
    pub identity_args: Vec<String>,
    /// `--log-level` of agents and the identity service.
    pub log_level: String,
    /// The agents' `--log-level` instead, when set: tracing directives such
    /// as `info,sealmesh_agent::proxy=debug` (the identity service takes a
    /// level only).
    pub agent_log_level: Option<String>,
    /// Start the identity service with the mesh.
    pub start_identity: bool,
    /// Start an agent on every node (off: the bare testbed, for baselines).
    pub start_agents: bool,
    /// Wait until every agent holds a certificate for each local meshed
    /// ServiceAccount.
    pub wait_for_certificates: bool,
    /// Kubernetes mode: register the testbed with this API server and run
    /// the identity service and agents with `--mode kubernetes`.
    pub kubernetes: Option<KubeMode>,
    /// Local mode: pods (namespace, name) of the spec left out of the
    /// cluster file until [`Mesh::list_pod`] (network and cgroup exist from
    /// the start): pods the agents do not know yet.
    pub unlisted_pods: Vec<(String, String)>,
}

impl Default for MeshOptions {
    fn default() -> Self {
        Self {
            agent_args: Vec::new(),
            identity_args: Vec::new(),
            log_level: "info".to_owned(),
            agent_log_level: None,
            start_identity: true,
            start_agents: true,
            wait_for_certificates: true,
            kubernetes: None,
            unlisted_pods: Vec::new(),
        }
    }
}

/// A running mesh; everything stops and is removed on drop.
pub struct Mesh {
    // Agents and identity are dropped (killed) before the testbed.
    agents: BTreeMap<String, ChildGuard>,
    /// Per node, how many JSON lines of its agent log earlier agents wrote:
    /// waits for the running agent look past them.
    agent_log_starts: BTreeMap<String, usize>,
    identity: Option<ChildGuard>,
    // The API registration goes after its clients and before the testbed.
    kube: Option<KubeCluster>,
    testbed: Testbed,
    options: MeshOptions,
    pki_dir: PathBuf,
    logs_dir: PathBuf,
}

impl Mesh {
    /// Builds the testbed, its PKI, and starts the identity service and one
    /// agent per node.
    pub fn up(spec: &TestbedSpec, options: MeshOptions) -> Result<Self, MeshError> {
        let mut testbed = match options.kubernetes {
            Some(_) => Testbed::up_for_kubelet(spec)?,
            None => Testbed::up(spec)?,
        };
        let state = testbed.state_dir();
        let pki_dir = state.join("pki");
        let logs_dir = state.join("logs");
        std::fs::create_dir_all(&logs_dir)
            .map_err(io_err(format!("creating {}", logs_dir.display())))?;

        let (root, issuer) = create_pki(&pki_dir)?;
        let anchors = pki_dir.join("ca-bundle.crt");
        std::fs::write(&anchors, &root.cert_pem)
            .map_err(io_err(format!("writing {}", anchors.display())))?;
        testbed.set_identity(IdentityEndpoint {
            address: SocketAddr::from((testbed.control_plane_ip(), IDENTITY_GRPC_PORT)),
            trust_anchors_file: anchors,
        })?;
        for (namespace, pod) in &options.unlisted_pods {
            testbed.unlist_pod(namespace, pod)?;
        }
        let kube = match &options.kubernetes {
            Some(mode) => Some(KubeCluster::start(
                &mut testbed,
                mode.clone(),
                &KubePki {
                    trust_anchors_pem: root.cert_pem.as_bytes(),
                    issuer: &issuer,
                    issuer_layout: Layout::Tls,
                },
            )?),
            None => None,
        };

        let mut mesh = Self {
            agents: BTreeMap::new(),
            agent_log_starts: BTreeMap::new(),
            identity: None,
            kube,
            testbed,
            options,
            pki_dir,
            logs_dir,
        };
        if mesh.options.start_identity {
            mesh.start_identity()?;
        }
        let nodes: Vec<String> = mesh
            .testbed
            .cluster()
            .nodes
            .iter()
            .map(|n| n.name.clone())
            .collect();
        if !mesh.options.start_agents {
            return Ok(mesh);
        }
        for node in &nodes {
            mesh.start_agent(node)?;
        }
        if mesh.options.wait_for_certificates {
            for node in &nodes {
                mesh.wait_for_certificates(node)?;
            }
        }
        Ok(mesh)
    }

    pub fn testbed(&self) -> &Testbed {
        &self.testbed
    }

    /// The testbed's API registration (Kubernetes mode only).
    pub fn kube(&self) -> Option<&KubeCluster> {
        self.kube.as_ref()
    }

    /// Kubernetes mode: creates a pod of the spec in the API (it must have
    /// been listed in [`KubeMode::pending_pods`]), as scheduler and kubelet
    /// would; running agents pick it up through their watches.
    pub fn create_pod(&mut self, namespace: &str, name: &str) -> Result<RegisteredPod, MeshError> {
        let kube = self
            .kube
            .as_mut()
            .ok_or(MeshError::NotKubernetes("create_pod"))?;
        Ok(kube.create_pod(&mut self.testbed, namespace, name)?.clone())
    }

    /// Kubernetes mode: the first half of [`Mesh::create_pod`], the pod bound
    /// to its node with its cgroups but not reported yet (no IP): processes
    /// started in it now are what a pod runs before it is Running.
    pub fn schedule_pod(
        &mut self,
        namespace: &str,
        name: &str,
    ) -> Result<RegisteredPod, MeshError> {
        let kube = self
            .kube
            .as_mut()
            .ok_or(MeshError::NotKubernetes("schedule_pod"))?;
        Ok(kube
            .schedule_pod(&mut self.testbed, namespace, name)?
            .clone())
    }

    /// Kubernetes mode: reports a scheduled pod Running with its IP.
    pub fn report_pod_running(&mut self, namespace: &str, name: &str) -> Result<(), MeshError> {
        let kube = self
            .kube
            .as_mut()
            .ok_or(MeshError::NotKubernetes("report_pod_running"))?;
        kube.report_running(&self.testbed, namespace, name)?;
        Ok(())
    }

    /// Local mode: writes a pod of [`MeshOptions::unlisted_pods`] into the
    /// cluster file, where the agents learn of it.
    pub fn list_pod(&mut self, namespace: &str, name: &str) -> Result<(), MeshError> {
        Ok(self.testbed.list_pod(namespace, name)?)
    }

    /// Creates or replaces (by namespace and name) an AuthorizationPolicy
    /// where the agents read policies: in local mode the cluster file
    /// (rewritten atomically; agents poll it), in Kubernetes mode the API
    /// (replaced in place, agents watch it), keeping the cluster file the
    /// testbed's description there too. A policy the cluster file cannot
    /// hold (`authz::validate` refuses it) is an error in both modes; write
    /// invalid objects through [`KubeCluster::client`] to test how agents
    /// treat them.
    pub fn apply_authorization_policy(
        &mut self,
        policy: AuthorizationPolicy,
    ) -> Result<(), MeshError> {
        self.testbed.set_authorization_policy(policy.clone())?;
        if let Some(kube) = self.kube.as_mut() {
            kube.apply_authorization_policy(&policy)?;
        }
        Ok(())
    }

    /// Deletes an AuthorizationPolicy, in the cluster file and, in
    /// Kubernetes mode, in the API.
    pub fn delete_authorization_policy(
        &mut self,
        namespace: &str,
        name: &str,
    ) -> Result<(), MeshError> {
        self.testbed.remove_authorization_policy(namespace, name)?;
        if let Some(kube) = &self.kube {
            kube.delete_authorization_policy(namespace, name)?;
        }
        Ok(())
    }

    /// Kubernetes mode: deletes a pod from the API, kills its processes and
    /// removes its cgroup.
    pub fn delete_pod(&mut self, namespace: &str, name: &str) -> Result<(), MeshError> {
        let kube = self
            .kube
            .as_mut()
            .ok_or(MeshError::NotKubernetes("delete_pod"))?;
        Ok(kube.delete_pod(&self.testbed, namespace, name)?)
    }

    /// Directory holding `root/`, `issuer/` and `ca-bundle.crt`.
    pub fn pki_dir(&self) -> &Path {
        &self.pki_dir
    }

    /// Process id of the agent running on `node`, if one runs there.
    pub fn agent_pid(&self, node: &str) -> Option<u32> {
        self.agents.get(node).map(ChildGuard::id)
    }

    pub fn identity_log(&self) -> PathBuf {
        self.logs_dir.join("identity.log")
    }

    pub fn agent_log(&self, node: &str) -> PathBuf {
        self.logs_dir.join(format!("agent-{node}.log"))
    }

    /// Starts the identity service in the underlay (the control plane).
    pub fn start_identity(&mut self) -> Result<(), MeshError> {
        let binary = locate_binary("sealmesh-identity")?;
        let mut cmd = Command::new(binary);
        match &self.kube {
            // Issuer and anchors come from the API; the kubeconfig's token
            // is the identity ServiceAccount's.
            Some(kube) => cmd
                .args([
                    "--mode",
                    "kubernetes",
                    "--namespace",
                    kube.control_namespace(),
                ])
                .args(["--trust-domain", &self.testbed.cluster().trust_domain])
                .env("KUBECONFIG", kube.identity_kubeconfig()),
            None => cmd
                .arg("--cluster-file")
                .arg(self.testbed.cluster_file_path())
                .arg("--trust-anchors")
                .arg(self.pki_dir.join("ca-bundle.crt"))
                .arg("--issuer-dir")
                .arg(self.pki_dir.join("issuer")),
        };
        cmd.arg("--listen")
            .arg(
                SocketAddr::from((self.testbed.control_plane_ip(), IDENTITY_GRPC_PORT)).to_string(),
            )
            .args(["--log-level", &self.options.log_level])
            .args(&self.options.identity_args);
        redirect_output(&mut cmd, &self.identity_log())?;
        self.identity = Some(self.testbed.spawn_in_underlay(cmd)?);
        if let Some(kube) = &self.kube {
            kube.report_identity_available(true)?;
        }
        Ok(())
    }

    /// Stops the identity service (as an outage would).
    pub fn stop_identity(&mut self) {
        if let Some(identity) = self.identity.take() {
            identity.kill();
            if let Some(kube) = &self.kube
                && let Err(error) = kube.report_identity_available(false)
            {
                tracing::warn!(%error, "cannot report the identity service down in its Deployment");
            }
        }
    }

    /// Freezes the identity service (SIGSTOP) or thaws it (SIGCONT): it stays
    /// reachable meanwhile but answers nothing, as an overloaded one would.
    pub fn freeze_identity(&self, frozen: bool) -> Result<(), MeshError> {
        let signal = if frozen {
            Signal::SIGSTOP
        } else {
            Signal::SIGCONT
        };
        let what = format!("sending {signal} to the identity service");
        let identity = self.identity.as_ref().ok_or_else(|| MeshError::Io {
            what: what.clone(),
            source: io::Error::other("it is not running"),
        })?;
        let pid = Pid::from_raw(i32::try_from(identity.id()).expect("pids fit in i32"));
        kill(pid, signal).map_err(|errno| MeshError::Io {
            what,
            source: errno.into(),
        })
    }

    /// Kubernetes mode: the agents' DaemonSet status says how many run.
    fn report_agents(&self) -> Result<(), MeshError> {
        if let Some(kube) = &self.kube {
            kube.report_agents_ready(self.agents.len())?;
        }
        Ok(())
    }

    /// Starts the agent of `node` in the node's network namespace, in its
    /// cgroup (local mode) or its agent Pod's container cgroup below the
    /// kubelet's pod cgroups (Kubernetes mode, as a DaemonSet pod runs), and
    /// waits until it redirects the node's meshed pods.
    pub fn start_agent(&mut self, node: &str) -> Result<(), MeshError> {
        let binary = locate_binary("sealmesh-agent")?;
        let mut cmd = Command::new(binary);
        match &self.kube {
            // Everything else comes from the API, as in a DaemonSet pod.
            Some(kube) => {
                let node_entry = self
                    .testbed
                    .cluster()
                    .node(node)
                    .ok_or_else(|| MeshError::NoAgent(node.to_owned()))?;
                let token_file = node_entry
                    .token_file
                    .clone()
                    .ok_or_else(|| MeshError::NoAgent(node.to_owned()))?;
                cmd.args([
                    "--mode",
                    "kubernetes",
                    "--namespace",
                    kube.control_namespace(),
                ])
                .args(["--trust-domain", &self.testbed.cluster().trust_domain])
                .arg("--cgroup-root")
                .arg(&node_entry.cgroup)
                .arg("--token-file")
                .arg(token_file)
                // No --identity-addr: the agent finds the identity service's
                // endpoint through the API, as in the DaemonSet.
                .env("KUBECONFIG", kube.agent_kubeconfig(node))
            }
            None => cmd
                .arg("--cluster-file")
                .arg(self.testbed.cluster_file_path()),
        };
        cmd.args(["--node", node])
            .arg("--bpffs-dir")
            .arg(self.testbed.node_bpffs_dir(node)?)
            .args(["--log-format", "json"]);
        // A level the user passes (e.g. `--agent-arg=--log-level=debug`)
        // replaces the testbed's: clap refuses a flag given twice.
        if !sets_flag(&self.options.agent_args, "--log-level") {
            cmd.args([
                "--log-level",
                self.options
                    .agent_log_level
                    .as_deref()
                    .unwrap_or(&self.options.log_level),
            ]);
        }
        // Per node, as each node's DaemonSet pods share the node's /run/sealmesh.
        if !sets_flag(&self.options.agent_args, "--cert-cache-dir") {
            cmd.arg("--cert-cache-dir")
                .arg(self.testbed.cert_cache_dir(node)?);
        }
        if !sets_flag(&self.options.agent_args, "--handover-socket") {
            cmd.arg("--handover-socket")
                .arg(self.testbed.handover_socket(node));
        }
        // Without an identity service no certificate can come.
        if !self.options.start_identity
            && !sets_flag(&self.options.agent_args, "--certificate-wait")
        {
            cmd.args(["--certificate-wait", "0s"]);
        }
        cmd.args(&self.options.agent_args);
        // A restarted agent appends to the log of the ones before it.
        let log_start = self.agent_log_lines(node)?.len();
        redirect_output(&mut cmd, &self.agent_log(node))?;
        let agent_pod = self.kube.as_ref().and_then(|kube| kube.agent_pod(node));
        let agent = match agent_pod {
            Some(pod) => {
                // The DaemonSet passes it as SEALMESH_POD_UID.
                cmd.args(["--agent-pod-uid", &pod.uid]);
                netns::spawn_in(self.testbed.node_netns(node)?, &pod.container_cgroup, cmd)?
            }
            None => self.testbed.spawn_in_node(node, cmd)?,
        };
        self.agents.insert(node.to_owned(), agent);
        self.agent_log_starts.insert(node.to_owned(), log_start);
        self.wait_for_agent_log(node, "the agent to start", |lines| {
            lines[log_start.min(lines.len())..]
                .iter()
                .any(|l| l["message"] == AGENT_STARTED_MESSAGE)
        })?;
        self.report_agents()
    }

    /// Replaces the agent of `node` as a rolling update does: a new agent
    /// starts beside the running one and takes over its listening sockets,
    /// then the old one gets SIGTERM and is waited for (its open connections
    /// have the drain time). Returns how the old agent ended.
    pub fn roll_agent(&mut self, node: &str) -> Result<ExitStatus, MeshError> {
        let old = self
            .agents
            .remove(node)
            .ok_or_else(|| MeshError::NoAgent(node.to_owned()))?;
        self.start_agent(node)?;
        old.terminate(AGENT_STOP_GRACE)
            .map_err(io_err(format!("stopping the previous agent of {node}")))
    }

    /// Stops the agent of `node` as a kubelet stops a pod (SIGTERM, then
    /// SIGKILL after the grace period), with no successor; returns how it
    /// ended.
    pub fn terminate_agent(&mut self, node: &str) -> Result<ExitStatus, MeshError> {
        let status = self
            .agents
            .remove(node)
            .ok_or_else(|| MeshError::NoAgent(node.to_owned()))?
            .terminate(AGENT_STOP_GRACE)
            .map_err(io_err(format!("stopping the agent of {node}")))?;
        self.report_agents()?;
        Ok(status)
    }

    pub fn stop_agent(&mut self, node: &str) -> Result<(), MeshError> {
        self.agents
            .remove(node)
            .ok_or_else(|| MeshError::NoAgent(node.to_owned()))?
            .kill();
        self.report_agents()
    }

    /// Agents that exited by themselves (crashed, or were killed from
    /// outside) since the last call, with how they ended; they no longer
    /// count as running, and [`Mesh::start_agent`] starts a new one.
    pub fn reap_exited_agents(&mut self) -> Result<Vec<(String, ExitStatus)>, MeshError> {
        let mut exited = Vec::new();
        for (node, agent) in &mut self.agents {
            let status = agent
                .child_mut()
                .try_wait()
                .map_err(io_err(format!("checking the agent of {node}")))?;
            if let Some(status) = status {
                exited.push((node.clone(), status));
            }
        }
        for (node, _) in &exited {
            self.agents.remove(node);
        }
        if !exited.is_empty() {
            self.report_agents()?;
        }
        Ok(exited)
    }

    /// Waits until the running agent of `node` logged a certificate for
    /// every ServiceAccount of the node's meshed pods.
    pub fn wait_for_certificates(&self, node: &str) -> Result<(), MeshError> {
        let cluster = self.testbed.cluster();
        let mut wanted: BTreeSet<String> = BTreeSet::new();
        // Only pods the agents can know so far: in the API (Kubernetes
        // mode), in the cluster file (local mode).
        let registered = |pod: &&sealmesh_common::cluster::Pod| match self.kube.as_ref() {
            Some(kube) => kube.pod(&pod.namespace, &pod.name).is_some(),
            None => self.testbed.is_listed(&pod.namespace, &pod.name),
        };
        for pod in cluster
            .pods_on(node)
            .filter(registered)
            .filter(|p| cluster.is_meshed(p))
        {
            wanted.insert(
                cluster
                    .identity_of(pod)
                    .map_err(TestbedError::from)?
                    .spiffe_uri(),
            );
        }
        let log_start = self.agent_log_starts.get(node).copied().unwrap_or(0);
        self.wait_for_agent_log(node, &format!("certificates for {wanted:?}"), |lines| {
            let obtained: BTreeSet<String> = lines[log_start.min(lines.len())..]
                .iter()
                // Obtained, or (after a restart) taken over from the previous run.
                .filter(|l| {
                    l["message"] == CERTIFICATE_OBTAINED_MESSAGE
                        || l["message"] == CERTIFICATE_INHERITED_MESSAGE
                })
                .filter_map(|l| l["identity"].as_str().map(str::to_owned))
                .collect();
            wanted.is_subset(&obtained)
        })
    }

    /// The agent's JSON log lines so far.
    pub fn agent_log_lines(&self, node: &str) -> Result<Vec<Value>, MeshError> {
        read_json_lines(&self.agent_log(node))
    }

    /// The access-log events an agent logged so far.
    pub fn access_log(&self, node: &str) -> Result<Vec<Value>, MeshError> {
        Ok(self
            .agent_log_lines(node)?
            .into_iter()
            .filter(|l| l["target"] == ACCESS_LOG_TARGET)
            .collect())
    }

    /// Polls the agent's log until `done` holds for its lines.
    pub fn wait_for_agent_log(
        &self,
        node: &str,
        what: &str,
        mut done: impl FnMut(&[Value]) -> bool,
    ) -> Result<(), MeshError> {
        let log = self.agent_log(node);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if done(&read_json_lines(&log)?) {
                return Ok(());
            }
            // A component that exits at start (a bad flag, a taken port) is
            // reported at once, not after the whole timeout.
            let components = [
                (
                    format!("the agent of {node}"),
                    self.agents.get(node),
                    log.clone(),
                ),
                (
                    "the identity service".to_owned(),
                    self.identity.as_ref(),
                    self.identity_log(),
                ),
            ];
            for (component, process, component_log) in components {
                if process.is_some_and(ChildGuard::has_exited) {
                    return Err(MeshError::Exited {
                        what: component,
                        tail: tail(&component_log),
                        log: component_log,
                    });
                }
            }
            if Instant::now() > deadline {
                return Err(MeshError::Timeout {
                    what: format!("agent {node}: {what}"),
                    timeout: READY_TIMEOUT,
                    tail: tail(&log),
                    log,
                });
            }
            std::thread::sleep(POLL);
        }
    }
}

fn redirect_output(cmd: &mut Command, log: &Path) -> Result<(), MeshError> {
    let open = |log: &Path| {
        File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(io_err(format!("opening {}", log.display())))
    };
    cmd.stdin(Stdio::null())
        .stdout(open(log)?)
        .stderr(open(log)?);
    Ok(())
}

/// JSON lines of a log file; other lines (e.g. a panic message) are skipped.
fn read_json_lines(log: &Path) -> Result<Vec<Value>, MeshError> {
    let text = match std::fs::read_to_string(log) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io_err(format!("reading {}", log.display()))(e)),
    };
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Finds a workspace binary next to the running one (an xtask binary, or a
/// test binary in `deps/`).
pub fn locate_binary(binary: &'static str) -> Result<PathBuf, MeshError> {
    let exe = std::env::current_exe().map_err(io_err("locating the running binary"))?;
    let mut dir = exe.parent().unwrap_or(Path::new("."));
    if dir.file_name().is_some_and(|name| name == "deps") {
        dir = dir.parent().unwrap_or(dir);
    }
    let path = dir.join(binary);
    if path.is_file() {
        Ok(path)
    } else {
        Err(MeshError::MissingBinary { binary, path })
    }
}

/// Whether `args` give `flag`, as `--flag value` or `--flag=value`.
fn sets_flag(args: &[String], flag: &str) -> bool {
    args.iter().any(|arg| {
        arg == flag
            || arg
                .strip_prefix(flag)
                .is_some_and(|rest| rest.starts_with('='))
    })
}

#[cfg(test)]
mod flag_tests {
    use super::sets_flag;

    #[test]
    fn a_flag_counts_in_both_spellings_and_not_as_a_prefix() {
        let args = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(sets_flag(&args(&["--log-level=debug"]), "--log-level"));
        assert!(sets_flag(
            &args(&["--deny-plaintext", "--log-level", "debug"]),
            "--log-level"
        ));
        assert!(!sets_flag(&args(&["--log-levels=debug"]), "--log-level"));
        assert!(!sets_flag(&args(&["--deny-plaintext"]), "--log-level"));
    }
}
