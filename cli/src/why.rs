//! `sealmesh why SRC DST`: whether traffic from one pod to another is mTLS,
//! and if not exactly why and what to change. Reads the cluster file and the
//! agents of both pods' nodes (status, certificates, eBPF, policy, inbound
//! policy and the kernel's refusals, edges).

use std::{collections::BTreeMap, fmt::Write as _, net::SocketAddr, process::ExitCode};

use anyhow::{Context as _, bail};
use clap::Args;
use sealmesh_common::{
    cluster::{ClusterFile, Pod},
    consts::{
        INBOUND_POLICY_ANNOTATION, INBOUND_POLICY_PERMISSIVE, MESH_LABEL, MESH_LABEL_ENABLED,
        MESH_OPT_OUT_ANNOTATION, MESH_OPT_OUT_VALUE,
    },
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
    agents::{AgentDirectory, AgentError, ClusterArgs, call, join, session},
    certview::{self, CertFacts},
    edges::{self, DEFAULT_NAMESPACE, MergedEdge},
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
    let (dst, dst_note) =
        resolve_destination(&cluster, &agent_networks, &args.dst, &args.namespace)?;
    if !views.contains_key(&dst.node) {
        let view = ask(&dst.node)?;
        views.insert(dst.node.clone(), view);
    }

    let now = OffsetDateTime::now_utc();
    let mut explanation = explain(&cluster, src, dst, &views, now)?;
    if let Some(note) = dst_note {
        explanation.notes.insert(0, note);
    }
    let observed = last_edge(src, dst, &views);
    print!("{}", render(src, dst, &explanation, observed.as_ref(), now));
    Ok(match explanation.verdict {
        Verdict::Mtls | Verdict::SecuredLocal => ExitCode::SUCCESS,
        Verdict::Plaintext | Verdict::Refused => ExitCode::FAILURE,
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

/// A destination pod, and a note when it was reached through a Service.
fn resolve_destination<'a>(
    cluster: &'a ClusterFile,
    agent_networks: &ClusterNetworks,
    text: &str,
    namespace: &str,
) -> anyhow::Result<(&'a Pod, Option<String>)> {
    let ip = text
        .parse::<SocketAddr>()
        .map(|a| a.ip())
        .or_else(|_| text.parse());
    let Ok(ip) = ip else {
        return Ok((resolve_pod(cluster, text, namespace)?, None));
    };
    let std::net::IpAddr::V4(ip) = ip else {
        bail!("{text} is IPv6; the mesh carries IPv4 pod traffic only");
    };
    if let Some(pod) = cluster.pod_by_ip(ip) {
        return Ok((pod, None));
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
        return Ok((
            first,
            Some(format!(
                "{text} is Service {}/{} with endpoints {}; explaining {}",
                service.namespace,
                service.name,
                names.join(", "),
                first.name
            )),
        ));
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
        "{}/{} -> {}/{}: {verdict}\n",
        src.namespace, src.name, dst.namespace, dst.name
    );
    for (why, fix) in &explanation.reasons {
        let _ = writeln!(out, "  why: {why}");
        let _ = writeln!(out, "  fix: {fix}");
    }
    for note in &explanation.notes {
        let _ = writeln!(out, "  {note}");
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
    out
}
