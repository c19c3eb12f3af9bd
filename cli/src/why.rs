//! `sealmesh why SRC DST`: whether traffic from one pod to another is mTLS,
//! and if not exactly why and what to change; and which authorization
//! policy and rule allows or denies it, judged as the destination's agent
//! judges it. Reads the cluster file (or the API's pods, Services,
//! namespaces, nodes and `AuthorizationPolicy` objects) and the agents of
//! both pods' nodes (status, certificates, eBPF, policy, inbound policy and
//! the kernel's refusals, edges).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::SocketAddr,
    process::ExitCode,
};

use anyhow::{Context as _, bail};
use clap::Args;
use sealmesh_common::{
    authz::{
        self, Action, Connection, DRY_RUN_ANNOTATION, DRY_RUN_VALUE, Decider, Decision,
        PodPolicies, Verdict as AuthzVerdict,
    },
    cluster::{ClusterFile, Pod},
    consts::{
        INBOUND_POLICY_ANNOTATION, INBOUND_POLICY_PERMISSIVE, MESH_LABEL, MESH_LABEL_ENABLED,
        MESH_OPT_OUT_ANNOTATION, MESH_OPT_OUT_VALUE,
    },
    identity::Identity,
    policy::{InboundPolicy, InboundPolicySource, describe_source},
};
use sealmesh_proto::admin::{
    AgentStatus, ConnectionEvent, EbpfStatus, GetCertificatesRequest, GetCertificatesResponse,
    GetConfigRequest, GetConnectionsRequest, GetEbpfStatusRequest, GetInboundPolicyRequest,
    GetStatusRequest, InboundPolicyStatus,
};
use time::OffsetDateTime;

use crate::{
    agent_config::{ClusterNetworks, ConfigDumpView, PlaintextExemptions, Policy},
    agents::{AgentDirectory, AgentError, ClusterArgs, ClusterSource, call, join, session},
    certview::{self, CertFacts},
    edges::{self, DEFAULT_NAMESPACE, MergedEdge},
    policies::{ListedPolicy, policy_set},
};

#[derive(Debug, Args)]
pub struct WhyArgs {
    /// Source pod: `NAMESPACE/POD` or `POD` (in -n).
    src: String,
    /// Destination: `NAMESPACE/POD`, `POD` (in -n), or an address `IP[:PORT]`
    /// (a pod IP or a Service VIP).
    dst: String,
    #[arg(short, long, default_value = DEFAULT_NAMESPACE)]
    namespace: String,
    /// The destination port the authorization policies are judged for (a
    /// Service's port when DST is its address). Default: the port of
    /// `IP:PORT`, else every port the policies tell apart.
    #[arg(short, long, value_parser = clap::value_parser!(u16).range(1..))]
    port: Option<u16>,
    #[command(flatten)]
    cluster: ClusterArgs,
}

/// What one agent tells about its node.
struct AgentView {
    status: AgentStatus,
    certificates: GetCertificatesResponse,
    ebpf: EbpfStatus,
    policy: Policy,
    /// What --deny-plaintext lets through; None from an agent that predates
    /// the exemptions.
    plaintext_exemptions: Option<PlaintextExemptions>,
    /// None from an agent that predates strict inbound mode.
    inbound: Option<InboundPolicyStatus>,
    edges: Vec<sealmesh_proto::admin::Edge>,
    /// The trust domain the agent names identities in (None: an older agent).
    trust_domain: Option<String>,
    cluster_networks: ClusterNetworks,
}

/// The verdict on a pod pair.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Mtls,
    SecuredLocal,
    Plaintext,
    Refused,
}

struct Explanation {
    verdict: Verdict,
    /// Why (one line per cause) and what to change.
    reasons: Vec<(String, String)>,
    notes: Vec<String>,
}

impl Explanation {
    fn new(verdict: Verdict) -> Self {
        Self {
            verdict,
            reasons: Vec::new(),
            notes: Vec::new(),
        }
    }

    fn because(mut self, why: String, fix: String) -> Self {
        self.reasons.push((why, fix));
        self
    }
}

pub fn run(args: WhyArgs) -> anyhow::Result<ExitCode> {
    let source = args.cluster.source()?;
    let mut cluster = source.cluster_file()?.into_owned();
    let directory = AgentDirectory::of(&source)?;
    let ask = |node: &str| -> anyhow::Result<Result<AgentView, AgentError>> {
        let agent = directory
            .agent(node)
            .with_context(|| format!("node {node} runs no agent sealmesh knows of"))?;
        Ok(directory
            .spawn(agent, view_session(node.to_owned()))
            .and_then(|h| join(node, h)))
    };
    // The source's agent first: the destination is classified with the
    // networks and trust domain the agents enforce, not assumed defaults.
    let src_node = resolve_pod(&cluster, &args.src, &args.namespace)?
        .node
        .clone();
    let mut views: BTreeMap<String, Result<AgentView, AgentError>> = BTreeMap::new();
    views.insert(src_node.clone(), ask(&src_node)?);
    let agent_networks = match &views[&src_node] {
        Ok(view) => {
            if let Some(domain) = &view.trust_domain {
                cluster.trust_domain.clone_from(domain);
            }
            view.cluster_networks.clone()
        }
        Err(_) => ClusterNetworks::default(),
    };
    let src = resolve_pod(&cluster, &args.src, &args.namespace)?;
    let Destination {
        pod: dst,
        note: dst_note,
        port,
    } = resolve_destination(
        &cluster,
        &agent_networks,
        &args.dst,
        &args.namespace,
        args.port,
    )?;
    if !views.contains_key(&dst.node) {
        let view = ask(&dst.node)?;
        views.insert(dst.node.clone(), view);
    }

    let now = OffsetDateTime::now_utc();
    let mut explanation = explain(&cluster, src, dst, &views, now)?;
    if let Some(note) = dst_note {
        explanation.notes.insert(0, note);
    }
    let policies = match &source {
        ClusterSource::Local(file) => Ok(Some(
            file.authorization_policies
                .iter()
                .map(ListedPolicy::of)
                .collect(),
        )),
        ClusterSource::Kubernetes(api) => api.authorization_policies(),
    };
    let authorization = match policies {
        // No such resource on the server: no policies.
        Ok(policies) => authorize(&cluster, &policies.unwrap_or_default(), src, dst, port)?,
        Err(error) => Some(Authorization::unknown(format!(
            "authorization: not judged: {error}"
        ))),
    };
    let observed = last_edge(src, dst, &views);
    print!(
        "{}",
        render(
            src,
            dst,
            &explanation,
            authorization.as_ref(),
            observed.as_ref(),
            now
        )
    );
    let denied = authorization.is_some_and(|a| a.denied_by.is_some());
    Ok(match explanation.verdict {
        Verdict::Mtls | Verdict::SecuredLocal if !denied => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    })
}

fn view_session(node: String) -> crate::agents::Session<AgentView> {
    session(move |mut client| async move {
        let status = call(&node, "GetStatus", client.get_status(GetStatusRequest {})).await?;
        let certificates = call(
            &node,
            "GetCertificates",
            client.get_certificates(GetCertificatesRequest {}),
        )
        .await?;
        let ebpf = call(
            &node,
            "GetEbpfStatus",
            client.get_ebpf_status(GetEbpfStatusRequest {}),
        )
        .await?;
        let config = call(&node, "GetConfig", client.get_config(GetConfigRequest {})).await?;
        let edges = call(
            &node,
            "GetConnections",
            client.get_connections(GetConnectionsRequest {}),
        )
        .await?
        .edges;
        let config = ConfigDumpView::parse(&config.yaml);
        let inbound = match client.get_inbound_policy(GetInboundPolicyRequest {}).await {
            Ok(response) => Some(response.into_inner()),
            Err(status) if status.code() == tonic::Code::Unimplemented => None,
            Err(status) => {
                return Err(AgentError::rpc(&node, "GetInboundPolicy", status));
            }
        };
        Ok(AgentView {
            status,
            certificates,
            ebpf,
            policy: config.policy,
            plaintext_exemptions: config.plaintext_exemptions,
            inbound,
            edges,
            trust_domain: config.trust_domain,
            cluster_networks: config.cluster_networks,
        })
    })
}

fn resolve_pod<'a>(
    cluster: &'a ClusterFile,
    text: &str,
    namespace: &str,
) -> anyhow::Result<&'a Pod> {
    let (ns, name) = text.split_once('/').unwrap_or((namespace, text));
    cluster.pod(ns, name).with_context(|| {
        format!("no pod {name} in namespace {ns}; name it NAMESPACE/POD or pass -n NAMESPACE")
    })
}

/// The pod `why` explains traffic to.
#[derive(Debug)]
struct Destination<'a> {
    pod: &'a Pod,
    /// Said first when the pod was reached through a Service.
    note: Option<String>,
    /// The pod's port, when the command named one.
    port: Option<u16>,
}

/// A destination pod, and a note when it was reached through a Service;
/// its port from `IP:PORT` or `--port` (a Service's port becomes its
/// target port).
fn resolve_destination<'a>(
    cluster: &'a ClusterFile,
    agent_networks: &ClusterNetworks,
    text: &str,
    namespace: &str,
    port_flag: Option<u16>,
) -> anyhow::Result<Destination<'a>> {
    let address = text.parse::<SocketAddr>().ok();
    let port = match (address.map(|a| a.port()), port_flag) {
        (Some(written), Some(flag)) if written != flag => {
            bail!("{text} names port {written} and --port {flag}: give the port once")
        }
        (written, flag) => written.or(flag),
    };
    let ip = address.map(|a| a.ip()).ok_or(()).or_else(|()| text.parse());
    let Ok(ip) = ip else {
        return Ok(Destination {
            pod: resolve_pod(cluster, text, namespace)?,
            note: None,
            port,
        });
    };
    let std::net::IpAddr::V4(ip) = ip else {
        bail!("{text} is IPv6; the mesh carries IPv4 pod traffic only");
    };
    if let Some(pod) = cluster.pod_by_ip(ip) {
        return Ok(Destination {
            pod,
            note: None,
            port,
        });
    }
    if let Some(service) = cluster.service_by_vip(ip) {
        let endpoints: Vec<&Pod> = cluster.endpoints(service).collect();
        let first = endpoints.first().with_context(|| {
            format!(
                "Service {}/{} ({ip}) selects no pod: connections to it fail; fix its selector",
                service.namespace, service.name
            )
        })?;
        let names: Vec<&str> = endpoints.iter().map(|p| p.name.as_str()).collect();
        let mut note = format!(
            "{text} is Service {}/{} with endpoints {}; explaining {}",
            service.namespace,
            service.name,
            names.join(", "),
            first.name
        );
        let target = port.and_then(|port| {
            let target = service.ports.iter().find(|p| p.port == port);
            if target.is_none() {
                let ports: Vec<String> = service.ports.iter().map(|p| p.port.to_string()).collect();
                note.push_str(&format!(
                    " (the Service has no port {port}, only {}: authorization is judged for every port)",
                    ports.join(", ")
                ));
            }
            target.map(|p| p.target_port)
        });
        return Ok(Destination {
            pod: first,
            note: Some(note),
            port: target,
        });
    }
    let in_cluster = cluster.nodes.iter().any(|n| n.pod_cidr.contains(&ip))
        || cluster
            .service_cidr
            .is_some_and(|range| range.contains(&ip))
        || agent_networks.contains(ip);
    if in_cluster {
        bail!(
            "{text} is in the cluster's pod or Service networks but no pod or Service of the cluster: meshed pods' connections to it are held, then refused (unknown_destination), never sent in plaintext"
        )
    }
    bail!(
        "{text} is neither a pod nor a Service of the cluster: traffic to it leaves the mesh (outside_cluster) and is never mTLS"
    )
}

/// Why a pod is not meshed and the change that meshes it (None: meshed).
fn unmeshed_reason(cluster: &ClusterFile, pod: &Pod) -> Option<(String, String)> {
    if cluster.is_meshed(pod) {
        return None;
    }
    let opted_out = pod
        .annotations
        .get(MESH_OPT_OUT_ANNOTATION)
        .is_some_and(|v| v == MESH_OPT_OUT_VALUE);
    Some(if opted_out {
        (
            format!(
                "pod {}/{} opted out with annotation {MESH_OPT_OUT_ANNOTATION}={MESH_OPT_OUT_VALUE}",
                pod.namespace, pod.name
            ),
            format!(
                "remove the annotation: kubectl annotate pod {} -n {} {MESH_OPT_OUT_ANNOTATION}-",
                pod.name, pod.namespace
            ),
        )
    } else {
        (
            format!(
                "namespace {} lacks the label {MESH_LABEL}={MESH_LABEL_ENABLED}",
                pod.namespace
            ),
            format!(
                "label the namespace: kubectl label namespace {} {MESH_LABEL}={MESH_LABEL_ENABLED}",
                pod.namespace
            ),
        )
    })
}

/// A meshed destination's strict inbound policy, as its agent (or, when it
/// does not answer, the cluster file) tells.
struct StrictDestination {
    /// Which annotation or flag made it strict.
    because: String,
    /// The command that makes it permissive instead.
    relax: String,
    /// What the destination's agent says the kernel does.
    enforcement: Option<(bool, u64)>,
    /// The latest refusal of the source's attempts, if the agent saw one.
    last_refusal: Option<ConnectionEvent>,
}

fn strict_destination(
    cluster: &ClusterFile,
    src: &Pod,
    dst: &Pod,
    views: &BTreeMap<String, Result<AgentView, AgentError>>,
) -> Option<StrictDestination> {
    if !cluster.is_meshed(dst) {
        return None;
    }
    let view = views[&dst.node].as_ref().ok();
    let default = view
        .map(|v| v.policy.default_inbound_policy)
        .unwrap_or_default();
    let (policy, source) = cluster.inbound_policy_annotations(dst).resolve(default);
    let status = view.and_then(|v| v.inbound.as_ref());
    let reported = status.and_then(|s| {
        s.pods.iter().find(|p| {
            p.pod
                .as_ref()
                .is_some_and(|r| r.namespace == dst.namespace && r.name == dst.name)
        })
    });
    let (strict, because, source) = match reported {
        Some(p) => (
            p.policy == InboundPolicy::Strict.as_str(),
            p.source_description.clone(),
            p.source.clone(),
        ),
        None => (
            policy == InboundPolicy::Strict,
            describe_source(policy, source, &dst.namespace, &dst.name),
            source.as_str().to_owned(),
        ),
    };
    if !strict {
        return None;
    }
    let relax = if source == InboundPolicySource::PodAnnotation.as_str() {
        format!(
            "kubectl annotate pod {} -n {} --overwrite {INBOUND_POLICY_ANNOTATION}={INBOUND_POLICY_PERMISSIVE}",
            dst.name, dst.namespace
        )
    } else if source == InboundPolicySource::NamespaceAnnotation.as_str() {
        format!(
            "kubectl annotate namespace {} --overwrite {INBOUND_POLICY_ANNOTATION}={INBOUND_POLICY_PERMISSIVE} (or only this pod: kubectl annotate pod {} -n {} {INBOUND_POLICY_ANNOTATION}={INBOUND_POLICY_PERMISSIVE})",
            dst.namespace, dst.name, dst.namespace
        )
    } else {
        format!(
            "kubectl annotate pod {} -n {} {INBOUND_POLICY_ANNOTATION}={INBOUND_POLICY_PERMISSIVE} (the agents run with --default-inbound-policy=strict)",
            dst.name, dst.namespace
        )
    };
    let last_refusal = status.and_then(|s| {
        s.recent_refusals
            .iter()
            .rev()
            .find(|e| {
                e.src
                    .as_ref()
                    .is_some_and(|p| p.namespace == src.namespace && p.name == src.name)
                    && e.dst
                        .as_ref()
                        .is_some_and(|p| p.namespace == dst.namespace && p.name == dst.name)
            })
            .cloned()
    });
    Some(StrictDestination {
        because,
        relax,
        enforcement: reported.map(|p| (p.enforced, p.refused_total)),
        last_refusal,
    })
}

fn explain(
    cluster: &ClusterFile,
    src: &Pod,
    dst: &Pod,
    views: &BTreeMap<String, Result<AgentView, AgentError>>,
    now: OffsetDateTime,
) -> anyhow::Result<Explanation> {
    let pod_name = |p: &Pod| format!("{}/{}", p.namespace, p.name);
    let strict = strict_destination(cluster, src, dst, views);
    if let (Some((why, fix)), Some(strict)) = (unmeshed_reason(cluster, src), &strict) {
        let mut refused = Explanation::new(Verdict::Refused).because(
            format!(
                "destination {} accepts connections only through its node's agent (strict inbound policy: {}), and source {} is not meshed ({why}): the kernel on {} refuses its plaintext connections",
                pod_name(dst),
                strict.because,
                pod_name(src),
                dst.node
            ),
            format!("mesh the source ({fix}), or let the destination accept plaintext: {}", strict.relax),
        );
        refused.notes.extend(strict_notes(strict, &dst.node, now));
        return Ok(refused);
    }
    if let Some((why, fix)) = unmeshed_reason(cluster, src) {
        return Ok(Explanation::new(Verdict::Plaintext).because(
            format!(
                "source {} is not meshed ({why}): its connections are not redirected to the agent",
                pod_name(src)
            ),
            fix,
        ));
    }
    let src_view = match &views[&src.node] {
        Ok(view) => view,
        Err(e) => {
            return Ok(Explanation::new(Verdict::Refused).because(
                format!(
                    "the agent on {} (the source's node) does not answer: {e}",
                    src.node
                ),
                format!("start the agent on node {} and read its log", src.node),
            ));
        }
    };
    if let Some((why, fix)) = unmeshed_reason(cluster, dst) {
        let why = format!("destination {} is not meshed ({why})", pod_name(dst));
        return Ok(if src_view.policy.deny_plaintext {
            let exempt = match &src_view.plaintext_exemptions {
                Some(exemptions) => {
                    let mut exempt = format!(" (it lets through only {})", exemptions.describe());
                    for service in cluster.services.iter().filter(|s| {
                        exemptions
                            .services
                            .contains(&format!("{}/{}", s.namespace, s.name))
                            && cluster
                                .endpoints(s)
                                .any(|p| p.namespace == dst.namespace && p.name == dst.name)
                    }) {
                        exempt.push_str(&format!(
                            "; through its Service {}/{} ({}) it is reached in plaintext",
                            service.namespace, service.name, service.vip
                        ));
                    }
                    exempt
                }
                None => String::new(),
            };
            Explanation::new(Verdict::Refused).because(
                format!(
                    "{why}, and the agent on {} runs with --deny-plaintext: the connection is refused{exempt}",
                    src.node
                ),
                fix,
            )
        } else {
            Explanation::new(Verdict::Plaintext).because(
                format!(
                    "{why}: the agent on {} forwards the connection in plaintext (not_meshed)",
                    src.node
                ),
                fix,
            )
        });
    }

    // Both meshed: everything on the way must work, or the connection fails closed.
    let mut broken = Explanation::new(Verdict::Refused);
    for (pod, role) in [(src, "source"), (dst, "destination")] {
        let view = match &views[&pod.node] {
            Ok(view) => view,
            Err(e) => {
                broken = broken.because(
                    format!(
                        "the agent on {} (the {role}'s node) does not answer: {e}",
                        pod.node
                    ),
                    format!("start the agent on node {} and read its log", pod.node),
                );
                continue;
            }
        };
        if !view.status.ready {
            broken = broken.because(
                format!(
                    "the agent on {} is not ready: {}",
                    pod.node,
                    view.status.not_ready_reasons.join("; ")
                ),
                format!(
                    "fix what the agent on {} reports; its log has details",
                    pod.node
                ),
            );
        }
        if role == "source" {
            let meshed_here = cluster
                .pods_on(&pod.node)
                .filter(|p| cluster.is_meshed(p))
                .count() as u64;
            if view.ebpf.attached_programs.is_empty() {
                broken = broken.because(
                    format!(
                        "redirect missing: no eBPF program is attached on {} (pin dir {})",
                        pod.node, view.ebpf.pin_dir
                    ),
                    format!(
                        "restart the agent on {} and read its log for the eBPF load error",
                        pod.node
                    ),
                );
            } else if view.ebpf.meshed_pods < meshed_here {
                broken = broken.because(
                    format!(
                        "redirect missing: the eBPF meshed map on {} holds {} pod cgroup(s) but {meshed_here} meshed pod(s) run there, so {}'s cgroup ({}) may not be in it and its connections bypass the agent",
                        pod.node,
                        view.ebpf.meshed_pods,
                        pod_name(pod),
                        pod.cgroup.display()
                    ),
                    format!("check that the cgroup exists, then restart the agent on {}", pod.node),
                );
            }
        }
        let identity = cluster.identity_of(pod)?.spiffe_uri();
        let held = view
            .certificates
            .certificates
            .iter()
            .find(|c| c.identity == identity);
        match held {
            Some(c) if c.valid && !c.chain.is_empty() => {
                let left = CertFacts::parse(&c.chain[0], &identity, 0)
                    .map(|f| certview::time_left(&f, now))
                    .unwrap_or_default();
                broken.notes.push(format!(
                    "{role} identity {identity}: certificate on {} valid ({left})",
                    pod.node
                ));
            }
            other => {
                let because = match other.map(|c| c.last_error.as_str()) {
                    Some(e) if !e.is_empty() => e.to_owned(),
                    Some(_) => "it expired and was not renewed".to_owned(),
                    None => {
                        "the agent never requested one (is the ServiceAccount in the cluster file?)"
                            .to_owned()
                    }
                };
                broken = broken.because(
                    format!(
                        "no certificate for the {role} identity {identity} on {} because {because}",
                        pod.node
                    ),
                    "make sure the identity service runs and is reachable from the node and that it accepts the agent's token".to_owned(),
                );
            }
        }
    }
    if !broken.reasons.is_empty() {
        return Ok(broken);
    }
    if let Some(strict) = &strict {
        broken.notes.push(format!(
            "destination {} is strict ({}): only connections through its node's agent reach it",
            pod_name(dst),
            strict.because
        ));
        broken.notes.extend(strict_notes(strict, &dst.node, now));
    }
    let mut good = if src.node == dst.node && !src_view.policy.force_mtls_local {
        let mut e = Explanation::new(Verdict::SecuredLocal);
        e.notes.push(format!(
            "both pods run on {} and are meshed: the agent hands the connection over inside the node, which never reaches the network (start the agent with --force-mtls-local to use mTLS here too)",
            src.node
        ));
        e
    } else {
        Explanation::new(Verdict::Mtls)
    };
    good.notes.extend(broken.notes);
    Ok(good)
}

/// What the destination's agent says about enforcing the policy.
fn strict_notes(strict: &StrictDestination, node: &str, now: OffsetDateTime) -> Vec<String> {
    let mut notes = vec![match strict.enforcement {
        Some((true, refused)) => format!(
            "the kernel on {node} enforces it: {refused} plaintext connection attempt(s) refused so far"
        ),
        Some((false, _)) => format!(
            "the agent on {node} does not enforce it yet (the pod's cgroup is not known to it): check the agent's log"
        ),
        None => format!("the agent on {node} did not report the pod's inbound policy"),
    }];
    if let Some(refusal) = &strict.last_refusal {
        let ago = std::time::Duration::try_from(
            now - OffsetDateTime::UNIX_EPOCH
                - time::Duration::milliseconds(refusal.timestamp_unix_ms),
        )
        .unwrap_or_default();
        notes.push(format!(
            "last refused: {} ago, from {} ({})",
            certview::approx(ago),
            refusal.src_addr,
            refusal.refused_reason
        ));
    }
    notes
}

/// What the destination's authorization policies say about the source.
#[derive(Debug, Default)]
struct Authorization {
    /// One line per group of ports judged alike, with what to change.
    lines: Vec<(String, Option<String>)>,
    /// The policy (and rule) denying the connection on the port asked, or
    /// on every port when none was.
    denied_by: Option<String>,
}

impl Authorization {
    fn unknown(line: String) -> Self {
        Self {
            lines: vec![(line, None)],
            denied_by: None,
        }
    }
}

/// The ports judged for a pair: the one asked, else each port the policies
/// name and one that stands for every other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum JudgedPort {
    Asked(u16),
    Named(u16),
    /// A port no policy names; every such port is judged alike.
    Other(u16),
}

impl JudgedPort {
    fn number(self) -> u16 {
        match self {
            Self::Asked(port) | Self::Named(port) | Self::Other(port) => port,
        }
    }
}

/// Judges the pair as the destination's agent does: the source's identity
/// when both pods are meshed (mTLS or the same-node hand-over), else
/// plaintext from the source pod's address. None when the cluster has no
/// policies (nothing to say).
fn authorize(
    cluster: &ClusterFile,
    policies: &[ListedPolicy],
    src: &Pod,
    dst: &Pod,
    port: Option<u16>,
) -> anyhow::Result<Option<Authorization>> {
    if policies.is_empty() {
        return Ok(None);
    }
    let pod_name = |p: &Pod| format!("{}/{}", p.namespace, p.name);
    let set = policy_set(&cluster.control_namespace, policies);
    let selecting = set.for_pod(&dst.namespace, &dst.labels);
    let names = |pod: &PodPolicies| -> Vec<String> {
        pod.policies().iter().map(|p| p.name.to_string()).collect()
    };
    if let Some((why, fix)) = unmeshed_reason(cluster, dst) {
        if selecting.is_empty() {
            return Ok(None);
        }
        return Ok(Some(Authorization {
            lines: vec![(
                format!(
                    "authorization: not enforced: {} is selected by {} but is not meshed ({why}), and the agents judge only meshed pods' connections",
                    pod_name(dst),
                    names(&selecting).join(", ")
                ),
                Some(fix),
            )],
            denied_by: None,
        }));
    }
    let identity = if cluster.is_meshed(src) {
        Some(cluster.identity_of(src)?)
    } else {
        None
    };
    let source = match &identity {
        Some(identity) => format!("as {}", authz::principal(identity)),
        None => format!("plaintext from {}", src.ip),
    };
    let listed = |decider: &Decider| policies.iter().find(|p| p.name == decider.policy.name);
    let ports: Vec<JudgedPort> = match port {
        Some(port) => vec![JudgedPort::Asked(port)],
        None => {
            let named: BTreeSet<u16> = policies
                .iter()
                .filter(|p| selecting.policies().iter().any(|s| s.name == p.name))
                .flat_map(ListedPolicy::named_ports)
                .collect();
            let other = (1..=u16::MAX).find(|p| !named.contains(p)).unwrap_or(1);
            named
                .iter()
                .map(|port| JudgedPort::Named(*port))
                .chain([JudgedPort::Other(other)])
                .collect()
        }
    };
    // Ports judged alike share a line.
    let mut groups: Vec<(Vec<JudgedPort>, AuthzVerdict)> = Vec::new();
    for port in &ports {
        let verdict = selecting.judge(&Connection {
            identity: identity.as_ref(),
            source_ip: Some(src.ip),
            port: port.number(),
        });
        match groups.iter_mut().find(|(_, v)| *v == verdict) {
            Some((ports, _)) => ports.push(*port),
            None => groups.push((vec![*port], verdict)),
        }
    }
    let named: Vec<u16> = ports
        .iter()
        .filter_map(|p| match p {
            JudgedPort::Named(port) => Some(*port),
            _ => None,
        })
        .collect();
    let label = |group: &[JudgedPort]| -> String {
        let listed = |ports: &[u16]| {
            let texts: Vec<String> = ports.iter().map(u16::to_string).collect();
            format!(
                "port{} {}",
                if ports.len() == 1 { "" } else { "s" },
                texts.join(", ")
            )
        };
        match group {
            [JudgedPort::Asked(port)] => format!("port {port}"),
            _ if groups.len() == 1 => "any port".to_owned(),
            _ if group.iter().any(|p| matches!(p, JudgedPort::Other(_))) => {
                let elsewhere: Vec<u16> = named
                    .iter()
                    .copied()
                    .filter(|n| !group.contains(&JudgedPort::Named(*n)))
                    .collect();
                let texts: Vec<String> = elsewhere.iter().map(u16::to_string).collect();
                format!("any port but {}", texts.join(", "))
            }
            _ => listed(&group.iter().map(|p| p.number()).collect::<Vec<_>>()),
        }
    };
    let mut authorization = Authorization::default();
    for (group, verdict) in &groups {
        let head = format!("authorization ({}, {source})", label(group));
        let (line, fix) = match &verdict.decision {
            Decision::NoPolicy => (
                format!(
                    "{head}: allowed: no enforced policy selects {}",
                    pod_name(dst)
                ),
                None,
            ),
            Decision::Allowed(decider) => {
                (format!("{head}: allowed by {}", rule_of(decider)), None)
            }
            Decision::Denied(decider) => {
                let (why, fix) = denial(
                    decider,
                    listed(decider),
                    identity.as_ref(),
                    src,
                    dst,
                    &selecting,
                );
                (format!("{head}: DENIED: {why}"), Some(fix))
            }
        };
        authorization.lines.push((line, fix));
        if let Some(dry) = &verdict.dry_run_denial {
            authorization.lines.push((
                format!(
                    "authorization ({}, {source}): dry run: {} would deny it: the policy is annotated {DRY_RUN_ANNOTATION}={DRY_RUN_VALUE}, so the agents only report it (tap: would-deny); once it is enforced these connections are refused",
                    label(group),
                    if dry.rule.is_some() || dry.policy.action == Action::Deny {
                        rule_of(dry)
                    } else {
                        format!("ALLOW policy {} (none of its rules matches)", dry.policy.name)
                    }
                ),
                None,
            ));
        }
    }
    let denier = |verdict: &AuthzVerdict| verdict.denied_by().map(ToString::to_string);
    authorization.denied_by = if groups.iter().all(|(_, v)| !v.allowed()) {
        groups.first().and_then(|(_, v)| denier(v))
    } else {
        None
    };
    Ok(Some(authorization))
}

/// `rule N of ALLOW policy NS/NAME`.
fn rule_of(decider: &Decider) -> String {
    let policy = &decider.policy;
    match decider.rule {
        Some(rule) => format!(
            "rule {rule} of {} policy {}",
            policy.action.as_str(),
            policy.name
        ),
        None => format!("{} policy {}", policy.action.as_str(), policy.name),
    }
}

/// Why a policy denies the connection, and what to change.
fn denial(
    decider: &Decider,
    listed: Option<&ListedPolicy>,
    identity: Option<&Identity>,
    src: &Pod,
    dst: &Pod,
    selecting: &PodPolicies,
) -> (String, String) {
    let policy = &decider.policy;
    let edit = format!(
        "kubectl edit authorizationpolicy {} -n {}",
        policy.name.name, policy.name.namespace
    );
    let dst_name = format!("{}/{}", dst.namespace, dst.name);
    if let Some(invalid) = listed.and_then(ListedPolicy::invalid) {
        let effect = match policy.action {
            Action::Deny => "denying every connection to the pods it selects",
            Action::Allow => "admitting nothing",
        };
        return (
            format!(
                "{} policy {} is invalid ({invalid}) and fails closed, {effect}",
                policy.action.as_str(),
                policy.name
            ),
            format!(
                "correct {} of {}: {edit} (`sealmesh check` lists every invalid policy)",
                invalid.field, policy.name
            ),
        );
    }
    if let Some(rule) = decider.rule {
        let plaintext_catch = identity.is_none()
            && listed
                .and_then(|p| p.spec.as_ref().ok())
                .and_then(|spec| spec.rules.get(rule))
                .is_some_and(|r| {
                    r.from.iter().any(|f| {
                        !f.source.not_principals.is_empty() || !f.source.not_namespaces.is_empty()
                    })
                });
        let mesh = if plaintext_catch {
            format!(
                "; it matches because the source sends plaintext, which has no principal or namespace: meshing {}/{} gives it one",
                src.namespace, src.name
            )
        } else {
            String::new()
        };
        return (
            format!(
                "rule {rule} of DENY policy {} matches the source{mesh}",
                policy.name
            ),
            format!(
                "change rule {rule} of {} so that it no longer matches the source, or delete the policy: {edit}",
                policy.name
            ),
        );
    }
    let allows: Vec<String> = selecting
        .policies()
        .iter()
        .filter(|p| !p.dry_run && p.action == Action::Allow)
        .map(|p| p.name.to_string())
        .collect();
    let why = if allows.len() > 1 {
        format!(
            "ALLOW policies {} select {dst_name} and no rule of theirs matches the source",
            allows.join(", ")
        )
    } else {
        format!(
            "ALLOW policy {} selects {dst_name} and none of its rules matches the source",
            policy.name
        )
    };
    let fix = match identity {
        Some(identity) => format!(
            "add the source's principal {} (or its namespace {}) to a rule of {}: {edit}",
            authz::principal(identity),
            identity.namespace(),
            policy.name
        ),
        None => format!(
            "the source sends plaintext, which principals and namespaces never match: mesh {}/{} so it connects as its ServiceAccount, or add its address {} to an ipBlocks rule of {}: {edit}",
            src.namespace, src.name, src.ip, policy.name
        ),
    };
    (why, fix)
}

fn last_edge(
    src: &Pod,
    dst: &Pod,
    views: &BTreeMap<String, Result<AgentView, AgentError>>,
) -> Option<MergedEdge> {
    let all = views
        .values()
        .filter_map(|v| v.as_ref().ok())
        .flat_map(|v| v.edges.iter().cloned());
    edges::merge(all).into_iter().find(|e| {
        e.src_ns == src.namespace
            && e.src == src.name
            && e.dst_ns == dst.namespace
            && e.dst == dst.name
    })
}

fn render(
    src: &Pod,
    dst: &Pod,
    explanation: &Explanation,
    authorization: Option<&Authorization>,
    observed: Option<&MergedEdge>,
    now: OffsetDateTime,
) -> String {
    let verdict = match explanation.verdict {
        Verdict::Mtls => "mTLS",
        Verdict::SecuredLocal => "secured (same node, no network hop)",
        Verdict::Plaintext => "NOT mTLS: plaintext",
        Verdict::Refused => "NOT mTLS: connections are refused",
    };
    let mut out = format!(
        "{}/{} -> {}/{}: {verdict}",
        src.namespace, src.name, dst.namespace, dst.name
    );
    if let Some(denier) = authorization.and_then(|a| a.denied_by.as_ref()) {
        let _ = write!(out, "; DENIED by authorization policy {denier}");
    }
    out.push('\n');
    for (why, fix) in &explanation.reasons {
        let _ = writeln!(out, "  why: {why}");
        let _ = writeln!(out, "  fix: {fix}");
    }
    for note in &explanation.notes {
        let _ = writeln!(out, "  {note}");
    }
    for (line, fix) in authorization.iter().flat_map(|a| &a.lines) {
        let _ = writeln!(out, "  {line}");
        if let Some(fix) = fix {
            let _ = writeln!(out, "  fix: {fix}");
        }
    }
    match observed {
        Some(edge) => {
            let ago = std::time::Duration::try_from(
                now - OffsetDateTime::UNIX_EPOCH
                    - time::Duration::milliseconds(edge.last_seen_unix_ms),
            )
            .unwrap_or_default();
            let dash = |s: &str| {
                if s.is_empty() {
                    "-".to_owned()
                } else {
                    s.to_owned()
                }
            };
            let _ = writeln!(
                out,
                "  last observed: {} ago, {} connection(s), secured={} client_id={} server_id={}",
                certview::approx(ago),
                edge.connections_total,
                edge.secured_column(),
                dash(&edge.client_id),
                dash(&edge.server_id)
            );
        }
        None => out.push_str("  last observed: no connection between them seen yet\n"),
    }
    if let Some(edge) =
        observed.filter(|e| e.denied_total > 0 || !e.dry_run_denied_policy.is_empty())
    {
        let _ = writeln!(
            out,
            "  observed authorization: {} ({} connection(s) denied)",
            edge.authz_column(),
            edge.denied_total
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use sealmesh_common::authz::PolicyName;

    use super::*;

    const CLUSTER: &str = r#"
apiVersion: sealmesh.io/v1alpha1
kind: Cluster
name: tb-test
nodes:
  - { name: node-0, ip: 172.18.0.2, podCidr: 10.244.0.0/24, cgroup: /sys/fs/cgroup/x/node-0 }
namespaces:
  - { name: shop, labels: { sealmesh.io/mesh: enabled } }
  - { name: legacy }
pods:
  - { name: client, namespace: shop, serviceAccount: client, ip: 10.244.0.2, node: node-0, cgroup: /sys/fs/cgroup/x/node-0/client, labels: { app: client } }
  - { name: server, namespace: shop, serviceAccount: server, ip: 10.244.0.3, node: node-0, cgroup: /sys/fs/cgroup/x/node-0/server, labels: { app: web } }
  - { name: other, namespace: shop, serviceAccount: other, ip: 10.244.0.4, node: node-0, cgroup: /sys/fs/cgroup/x/node-0/other }
  - { name: plain, namespace: legacy, serviceAccount: default, ip: 10.244.0.5, node: node-0, cgroup: /sys/fs/cgroup/x/node-0/plain, labels: { app: web } }
authorizationPolicies:
  - name: web-allow
    namespace: shop
    spec:
      selector: { matchLabels: { app: web } }
      rules:
        - from: [{ source: { principals: [cluster.local/ns/shop/sa/client] } }]
          to: [{ operation: { ports: [8080] } }]
  - name: no-ssh
    namespace: shop
    spec:
      selector: { matchLabels: { app: web } }
      action: DENY
      rules: [{ to: [{ operation: { ports: [22] } }] }]
  - name: legacy-web
    namespace: legacy
    spec: { rules: [{ from: [{ source: { namespaces: [shop] } }] }] }
"#;

    fn cluster(yaml: &str) -> ClusterFile {
        ClusterFile::from_yaml(yaml).unwrap()
    }

    fn judged(
        cluster: &ClusterFile,
        policies: &[ListedPolicy],
        src: &str,
        dst: &str,
        port: Option<u16>,
    ) -> Option<Authorization> {
        let pod = |text: &str| resolve_pod(cluster, text, "shop").unwrap();
        authorize(cluster, policies, pod(src), pod(dst), port).unwrap()
    }

    fn listed(cluster: &ClusterFile) -> Vec<ListedPolicy> {
        cluster
            .authorization_policies
            .iter()
            .map(ListedPolicy::of)
            .collect()
    }

    fn lines(authorization: &Authorization) -> Vec<String> {
        authorization
            .lines
            .iter()
            .flat_map(|(line, fix)| {
                std::iter::once(line.clone()).chain(fix.iter().map(|f| format!("fix: {f}")))
            })
            .collect()
    }

    #[test]
    fn an_allowed_pair_names_the_rule_and_every_port_group_is_judged() {
        let cluster = cluster(CLUSTER);
        let policies = listed(&cluster);
        let allowed = judged(&cluster, &policies, "client", "server", Some(8080)).unwrap();
        assert_eq!(
            lines(&allowed),
            [
                "authorization (port 8080, as cluster.local/ns/shop/sa/client): allowed by rule 0 of ALLOW policy shop/web-allow"
            ]
        );
        assert_eq!(allowed.denied_by, None);

        // No port: 22 (DENY), 8080 (ALLOW) and every other port apart.
        let all = judged(&cluster, &policies, "client", "server", None).unwrap();
        assert_eq!(
            lines(&all),
            [
                "authorization (port 22, as cluster.local/ns/shop/sa/client): DENIED: rule 0 of DENY policy shop/no-ssh matches the source",
                "fix: change rule 0 of shop/no-ssh so that it no longer matches the source, or delete the policy: kubectl edit authorizationpolicy no-ssh -n shop",
                "authorization (port 8080, as cluster.local/ns/shop/sa/client): allowed by rule 0 of ALLOW policy shop/web-allow",
                "authorization (any port but 22, 8080, as cluster.local/ns/shop/sa/client): DENIED: ALLOW policy shop/web-allow selects shop/server and none of its rules matches the source",
                "fix: add the source's principal cluster.local/ns/shop/sa/client (or its namespace shop) to a rule of shop/web-allow: kubectl edit authorizationpolicy web-allow -n shop",
            ]
        );
        assert_eq!(all.denied_by, None, "allowed on a port");
    }

    #[test]
    fn a_denied_pair_says_what_to_add_for_mtls_and_plaintext_sources() {
        let cluster = cluster(CLUSTER);
        let policies = listed(&cluster);
        let other = judged(&cluster, &policies, "other", "server", Some(8080)).unwrap();
        assert_eq!(other.denied_by.as_deref(), Some("shop/web-allow"));
        assert_eq!(
            lines(&other)[1],
            "fix: add the source's principal cluster.local/ns/shop/sa/other (or its namespace shop) to a rule of shop/web-allow: kubectl edit authorizationpolicy web-allow -n shop"
        );
        let plain = judged(&cluster, &policies, "legacy/plain", "server", Some(8080)).unwrap();
        assert_eq!(
            lines(&plain),
            [
                "authorization (port 8080, plaintext from 10.244.0.5): DENIED: ALLOW policy shop/web-allow selects shop/server and none of its rules matches the source",
                "fix: the source sends plaintext, which principals and namespaces never match: mesh legacy/plain so it connects as its ServiceAccount, or add its address 10.244.0.5 to an ipBlocks rule of shop/web-allow: kubectl edit authorizationpolicy web-allow -n shop",
            ]
        );

        let src = cluster.pod("shop", "other").unwrap();
        let dst = cluster.pod("shop", "server").unwrap();
        let out = render(
            src,
            dst,
            &Explanation::new(Verdict::Mtls),
            Some(&other),
            None,
            OffsetDateTime::now_utc(),
        );
        assert!(
            out.starts_with(
                "shop/other -> shop/server: mTLS; DENIED by authorization policy shop/web-allow\n  authorization (port 8080, "
            ),
            "{out}"
        );
    }

    #[test]
    fn unmeshed_destinations_dry_runs_and_invalid_policies_are_explained() {
        let cluster = cluster(CLUSTER);
        let mut policies = listed(&cluster);
        // legacy is not meshed: its policy is not enforced.
        let plain = judged(&cluster, &policies, "client", "legacy/plain", None).unwrap();
        assert_eq!(
            lines(&plain),
            [
                "authorization: not enforced: legacy/plain is selected by legacy/legacy-web but is not meshed (namespace legacy lacks the label sealmesh.io/mesh=enabled), and the agents judge only meshed pods' connections",
                "fix: label the namespace: kubectl label namespace legacy sealmesh.io/mesh=enabled",
            ]
        );
        // A pod no policy selects, in a cluster that has policies.
        let none = judged(&cluster, &policies, "server", "client", Some(80)).unwrap();
        assert_eq!(
            lines(&none),
            [
                "authorization (port 80, as cluster.local/ns/shop/sa/server): allowed: no enforced policy selects shop/client"
            ]
        );
        // A dry-run policy that would deny.
        policies.push(ListedPolicy::from_json(
            PolicyName {
                namespace: "shop".into(),
                name: "only-web".into(),
            },
            BTreeMap::from([(DRY_RUN_ANNOTATION.to_owned(), DRY_RUN_VALUE.to_owned())]),
            Some(&serde_json::json!({
                "selector": { "matchLabels": { "app": "client" } },
                "rules": [{ "from": [{ "source": { "principals": ["cluster.local/ns/shop/sa/web"] } }] }],
            })),
        ));
        let dry = judged(&cluster, &policies, "server", "client", Some(80)).unwrap();
        assert_eq!(
            lines(&dry)[1],
            "authorization (port 80, as cluster.local/ns/shop/sa/server): dry run: ALLOW policy shop/only-web (none of its rules matches) would deny it: the policy is annotated sealmesh.io/dry-run=true, so the agents only report it (tap: would-deny); once it is enforced these connections are refused"
        );
        assert_eq!(dry.denied_by, None);
        // An unreadable policy denies everything it may select.
        policies.push(ListedPolicy::from_json(
            PolicyName {
                namespace: "shop".into(),
                name: "broken".into(),
            },
            BTreeMap::new(),
            Some(&serde_json::json!({ "rules": [{ "to": [{ "operation": { "methods": ["GET"] } }] }] })),
        ));
        let broken = judged(&cluster, &policies, "server", "client", Some(80)).unwrap();
        assert_eq!(broken.denied_by.as_deref(), Some("shop/broken"));
        assert!(
            lines(&broken)[0].ends_with(
                ": DENIED: DENY policy shop/broken is invalid (spec.rules[0].to[0].operation.methods: unknown field `methods`, expected `ports` or `notPorts`) and fails closed, denying every connection to the pods it selects"
            ),
            "{:?}",
            lines(&broken)
        );
        // No policies at all: nothing to say.
        assert!(judged(&cluster, &[], "client", "server", None).is_none());
    }

    #[test]
    fn a_service_port_is_judged_as_its_target_port() {
        let cluster = cluster(&format!(
            "{CLUSTER}services:\n  - {{ name: web, namespace: shop, vip: 10.96.0.10, ports: [{{ port: 80, targetPort: 8080 }}], selector: {{ app: web }} }}\n"
        ));
        let networks = ClusterNetworks::default();
        let dst = resolve_destination(&cluster, &networks, "10.96.0.10:80", "shop", None).unwrap();
        assert_eq!((dst.pod.name.as_str(), dst.port), ("server", Some(8080)));
        let dst = resolve_destination(&cluster, &networks, "10.96.0.10", "shop", Some(80)).unwrap();
        assert_eq!(dst.port, Some(8080));
        let dst = resolve_destination(&cluster, &networks, "10.96.0.10:81", "shop", None).unwrap();
        assert_eq!(dst.port, None);
        assert!(dst.note.unwrap().ends_with(
            "(the Service has no port 81, only 80: authorization is judged for every port)"
        ));
        let dst = resolve_destination(&cluster, &networks, "server", "shop", Some(9090)).unwrap();
        assert_eq!(dst.port, Some(9090));
        let error = resolve_destination(&cluster, &networks, "10.244.0.3:80", "shop", Some(81))
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "10.244.0.3:80 names port 80 and --port 81: give the port once"
        );
    }
}
