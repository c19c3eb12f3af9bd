//! `sealmesh tap`: live connection events from every agent, like
//! `linkerd viz tap` (`tcp` when a connection opens, `end` when it closes),
//! and `refused` when the kernel refused a connection attempt to a strict pod.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    process::ExitCode,
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::bail;
use clap::Args;
use sealmesh_common::cluster::{self, ClusterFile};
use sealmesh_proto::admin::{ConnectionEvent, Direction, Phase, PodRef, TapRequest};
use serde_json::json;

use crate::{
    agents::{
        AgentDirectory, AgentError, AgentLink, ClusterArgs, ClusterSource, RECONNECT, call, join,
        link_session,
    },
    edges::DEFAULT_NAMESPACE,
    kube::{KubeCluster, WorkloadKind},
};

/// Label whose value names a pod's deployment (`deploy/NAME`), as kubectl
/// users label apps.
const APP_LABEL: &str = "app";
/// How often the deadline is looked at.
const POLL: Duration = Duration::from_millis(100);

#[derive(Debug, Args)]
pub struct TapArgs {
    /// What to tap: `pod/NAME`, `deploy/NAME`, `ds/NAME`, `sts/NAME` (the
    /// pods its selector matches; in local mode deploy/NAME is the pods
    /// labelled app=NAME or named NAME-*), `ns/NAME`, or `NAME` (a pod, else
    /// a deployment). Default: every pod of the namespace.
    target: Option<String>,
    #[arg(short, long, default_value = DEFAULT_NAMESPACE)]
    namespace: String,
    /// Tap every namespace (no target).
    #[arg(short = 'A', long, conflicts_with = "target")]
    all_namespaces: bool,
    /// `json`: one JSON object per line.
    #[arg(short, long, value_enum)]
    output: Option<TapFormat>,
    /// Stop after this many events.
    #[arg(long)]
    max: Option<usize>,
    /// Stop after this long (e.g. `30s`).
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
    #[command(flatten)]
    cluster: ClusterArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum TapFormat {
    Json,
}

/// Pods an event must touch to be shown.
#[derive(Debug, PartialEq, Eq)]
enum Filter {
    All,
    Namespace(String),
    Pods(BTreeSet<(String, String)>),
}

impl Filter {
    /// The pods `args` names. On Kubernetes (`api`) a workload's pods are
    /// those its selector matches; in local mode (no workload objects) a
    /// deployment's are those labelled `app=NAME` or named `NAME-*`.
    fn resolve(
        args: &TapArgs,
        cluster: &ClusterFile,
        api: Option<&KubeCluster>,
    ) -> anyhow::Result<Self> {
        if args.all_namespaces {
            return Ok(Self::All);
        }
        let Some(target) = &args.target else {
            return Ok(Self::Namespace(args.namespace.clone()));
        };
        let ns = &args.namespace;
        let in_ns = || cluster.pods.iter().filter(|p| &p.namespace == ns);
        let keys = |pods: Vec<&cluster::Pod>| -> BTreeSet<(String, String)> {
            pods.into_iter()
                .map(|p| (p.namespace.clone(), p.name.clone()))
                .collect()
        };
        let workload = |kind: WorkloadKind,
                        name: &str|
         -> anyhow::Result<BTreeSet<(String, String)>> {
            match api {
                Some(api) => {
                    let selector = api.workload_selector(kind, ns, name)?;
                    if selector.is_empty() {
                        bail!("{} {ns}/{name} has an empty selector", kind.kind());
                    }
                    Ok(keys(
                        in_ns().filter(|p| selector.matches(&p.labels)).collect(),
                    ))
                }
                None if kind == WorkloadKind::Deployment => Ok(keys(
                    in_ns()
                        .filter(|p| {
                            p.labels.get(APP_LABEL).is_some_and(|v| v == name)
                                || p.name
                                    .strip_prefix(name)
                                    .is_some_and(|r| r.starts_with('-'))
                        })
                        .collect(),
                )),
                None => bail!(
                    "{} targets need the Kubernetes API (their selector); in local mode tap pod/NAME or deploy/NAME",
                    kind.kind()
                ),
            }
        };
        let pod = |name: &str| keys(in_ns().filter(|p| p.name == name).collect());
        let (kind, pods) = match target.split_once('/') {
            Some(("pod" | "po" | "pods", name)) => ("pod", pod(name)),
            Some(("ns" | "namespace" | "namespaces", name)) => {
                return Ok(Self::Namespace(name.to_owned()));
            }
            Some(("deploy" | "deployment" | "deployments", name)) => {
                ("deployment", workload(WorkloadKind::Deployment, name)?)
            }
            Some(("ds" | "daemonset" | "daemonsets", name)) => {
                ("daemonset", workload(WorkloadKind::DaemonSet, name)?)
            }
            Some(("sts" | "statefulset" | "statefulsets", name)) => {
                ("statefulset", workload(WorkloadKind::StatefulSet, name)?)
            }
            Some((kind, _)) => bail!(
                "cannot tap {kind:?} resources: use pod/NAME, deploy/NAME, ds/NAME, sts/NAME, ns/NAME or NAME"
            ),
            None => {
                let pods = pod(target);
                if pods.is_empty() {
                    // A bare name that is no pod may be a deployment.
                    let deployment = workload(WorkloadKind::Deployment, target).unwrap_or_default();
                    ("pod or deployment", deployment)
                } else {
                    ("pod", pods)
                }
            }
        };
        if pods.is_empty() {
            let name = target.rsplit('/').next().unwrap_or(target);
            bail!("no {kind} {name} in namespace {ns}; pass -n NAMESPACE if it lives elsewhere");
        }
        Ok(Self::Pods(pods))
    }

    /// What to ask agents for; the rest is filtered here.
    fn request(&self) -> TapRequest {
        match self {
            Self::All => TapRequest::default(),
            Self::Namespace(ns) => TapRequest {
                namespace: ns.clone(),
                pod: String::new(),
            },
            Self::Pods(pods) => match pods.iter().collect::<Vec<_>>().as_slice() {
                [(ns, pod)] => TapRequest {
                    namespace: ns.clone(),
                    pod: pod.clone(),
                },
                _ => TapRequest {
                    namespace: pods.first().map(|(ns, _)| ns.clone()).unwrap_or_default(),
                    pod: String::new(),
                },
            },
        }
    }

    fn matches(&self, event: &ConnectionEvent) -> bool {
        let touches = |pred: &dyn Fn(&PodRef) -> bool| {
            event.src.as_ref().is_some_and(pred) || event.dst.as_ref().is_some_and(pred)
        };
        match self {
            Self::All => true,
            Self::Namespace(ns) => touches(&|p| &p.namespace == ns),
            Self::Pods(pods) => touches(&|p| pods.contains(&(p.namespace.clone(), p.name.clone()))),
        }
    }
}

/// What each agent's tap thread reports.
enum TapMessage {
    /// The agent's event stream is open (again).
    Streaming {
        node: String,
    },
    /// The agent cannot be reached or its stream ended; its thread tries
    /// again after a back-off.
    Lost {
        node: String,
        reason: String,
    },
    Event(Box<ConnectionEvent>),
}

/// Taps one agent until the receiver is gone: streams its events, and when
/// the agent is unreachable or its stream ends, reports the outage and
/// reconnects with [`RECONNECT`] delays (reset by each stream that opens).
async fn follow_agent(link: AgentLink, request: TapRequest, events: mpsc::Sender<TapMessage>) {
    let node = link.node().to_owned();
    let mut delays = RECONNECT.delays();
    loop {
        let reason = match open_stream(&link, request.clone()).await {
            Ok(mut stream) => {
                delays = RECONNECT.delays();
                if events
                    .send(TapMessage::Streaming { node: node.clone() })
                    .is_err()
                {
                    return;
                }
                loop {
                    match stream.message().await {
                        Ok(Some(event)) => {
                            if events.send(TapMessage::Event(Box::new(event))).is_err() {
                                return;
                            }
                        }
                        Ok(None) => break "the agent ended its event stream".to_owned(),
                        Err(status) => {
                            break format!("its event stream broke: {}", status.message());
                        }
                    }
                }
            }
            Err(e) => e.to_string(),
        };
        let lost = TapMessage::Lost {
            node: node.clone(),
            reason,
        };
        if events.send(lost).is_err() {
            return;
        }
        tokio::time::sleep(delays.next().unwrap_or(RECONNECT.cap)).await;
    }
}

async fn open_stream(
    link: &AgentLink,
    request: TapRequest,
) -> Result<tonic::Streaming<ConnectionEvent>, AgentError> {
    let mut client = link.connect().await?;
    call(link.node(), "Tap", client.tap(request)).await
}

/// What the stderr notes have said about one agent, so that each outage is
/// told once.
#[derive(Debug, Default)]
struct AgentWatch {
    /// Its first attempt succeeded or failed.
    answered: bool,
    streaming: bool,
    /// Its current outage was reported.
    outage_told: bool,
}

pub fn run(args: TapArgs) -> anyhow::Result<ExitCode> {
    let source = args.cluster.source()?;
    // Only a pod or deployment target needs the cluster's pods.
    let filter = match (&source, &args.target) {
        (ClusterSource::Kubernetes(_), None) => {
            Filter::resolve(&args, &ClusterFile::new("kubernetes"), None)?
        }
        (ClusterSource::Kubernetes(api), Some(_)) => {
            Filter::resolve(&args, &*source.cluster_file()?, Some(api))?
        }
        (ClusterSource::Local(_), _) => Filter::resolve(&args, &*source.cluster_file()?, None)?,
    };
    let directory = AgentDirectory::of(&source)?;
    let (events_tx, events_rx) = mpsc::channel::<TapMessage>();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let request = filter.request();
    let handles = directory.spawn_all_linked(|_| {
        let events = events_tx.clone();
        let mut stop = stop_rx.clone();
        let request = request.clone();
        link_session(move |link| async move {
            tokio::select! {
                _ = stop.changed() => {}
                () = follow_agent(link, request, events) => {}
            }
            Ok(())
        })
    });
    drop(events_tx);

    let mut running = Vec::new();
    let mut watches = BTreeMap::new();
    let mut failures = 0;
    for (agent, handle) in handles {
        match handle {
            Ok(handle) => {
                watches.insert(agent.node.clone(), AgentWatch::default());
                running.push((agent.node, handle));
            }
            Err(e) => {
                eprintln!("warning: not tapping node {}: {e}", agent.node);
                failures += 1;
            }
        }
    }
    let deadline = args.timeout.map(|t| Instant::now() + t);
    let mut announced = false;
    let mut shown = 0;
    let json = args.output == Some(TapFormat::Json);
    while args.max.is_none_or(|max| shown < max) && !running.is_empty() {
        // A thread ends early only when it cannot work in its node at all
        // (an unreachable agent is retried): said at once, not at exit.
        let (ended, still_running): (Vec<_>, Vec<_>) =
            running.into_iter().partition(|(_, h)| h.is_finished());
        running = still_running;
        for (node, handle) in ended {
            watches.remove(&node);
            if let Err(e) = join(&node, handle) {
                eprintln!("warning: not tapping node {node}: {e}");
            }
            failures += 1;
        }
        let now = Instant::now();
        if deadline.is_some_and(|d| d <= now) {
            break;
        }
        let tick = deadline.map_or(POLL, |d| POLL.min(d - now));
        match events_rx.recv_timeout(tick) {
            Ok(TapMessage::Streaming { node }) => {
                if let Some(watch) = watches.get_mut(&node) {
                    if watch.outage_told {
                        eprintln!("tap: agent {node} back");
                    }
                    *watch = AgentWatch {
                        answered: true,
                        streaming: true,
                        outage_told: false,
                    };
                }
            }
            Ok(TapMessage::Lost { node, reason }) => {
                if let Some(watch) = watches.get_mut(&node) {
                    if !watch.outage_told {
                        eprintln!("tap: agent {node} unreachable ({reason}); reconnecting");
                    }
                    *watch = AgentWatch {
                        answered: true,
                        streaming: false,
                        outage_told: true,
                    };
                }
            }
            Ok(TapMessage::Event(event)) if filter.matches(&event) => {
                println!(
                    "{}",
                    if json {
                        json_line(&event)
                    } else {
                        text_line(&event)
                    }
                );
                shown += 1;
            }
            Ok(TapMessage::Event(_)) | Err(mpsc::RecvTimeoutError::Timeout) => {}
            // Every thread is ending; the next round joins them.
            Err(mpsc::RecvTimeoutError::Disconnected) => std::thread::sleep(tick),
        }
        let streaming = watches.values().filter(|w| w.streaming).count();
        if !announced && streaming > 0 && watches.values().all(|w| w.answered) {
            // Scripts wait for this line before making traffic.
            eprintln!("tapping {streaming} agent(s)");
            announced = true;
        }
    }
    // Stopping: every thread leaves its select at once.
    let _ = stop_tx.send(true);
    for (node, handle) in running {
        if let Err(e) = join(&node, handle) {
            eprintln!("warning: tap of node {node} failed: {e}");
            failures += 1;
        }
    }
    if failures == directory.agents().len() {
        bail!("no agent could be tapped");
    }
    Ok(ExitCode::SUCCESS)
}

fn direction(event: &ConnectionEvent) -> &'static str {
    match event.direction() {
        Direction::Outbound => "out",
        Direction::Inbound => "in",
        Direction::Unspecified => "unknown",
    }
}

fn pod_name(pod: Option<&PodRef>) -> Option<String> {
    pod.map(|p| format!("{}/{}", p.namespace, p.name))
}

/// `tcp id=node-0:7 proxy=out src=… dst=… src_pod=ns/a dst_pod=ns/b tls=true
/// client_id=… server_id=…`, and for `end` also bytes, duration and error
/// (`reason=…` for a connection the agent refused before it opened);
/// `refused … reason=strict_inbound error=…` for an attempt the kernel refused.
/// A policy's denial follows the reason (`denied policy=<ns>/<name> rule=<n>`);
/// a dry-run policy that would have denied an allowed connection shows as
/// `would-deny policy=<ns>/<name> rule=<n>`.
pub fn text_line(event: &ConnectionEvent) -> String {
    let phase = event.phase();
    let closing = phase == Phase::Close;
    let refused = phase == Phase::Refused;
    let mut line = format!(
        "{} id={}:{} proxy={} src={} dst={}",
        phase_word(phase),
        event.node,
        event.id,
        direction(event),
        event.src_addr,
        event.dst_addr
    );
    field(
        &mut line,
        "src_pod",
        &pod_name(event.src.as_ref()).unwrap_or_default(),
    );
    field(
        &mut line,
        "dst_pod",
        &pod_name(event.dst.as_ref()).unwrap_or_default(),
    );
    if !refused {
        field(&mut line, "tls", if event.tls { "true" } else { "false" });
        field(&mut line, "no_tls_reason", &event.no_tls_reason);
    }
    field(&mut line, "reason", &event.refused_reason);
    if let Some(denied) = policy_rule(&event.denied_policy, event.denied_rule) {
        let _ = write!(line, " denied {denied}");
    }
    if let Some(would) = policy_rule(&event.dry_run_denied_policy, event.dry_run_denied_rule) {
        let _ = write!(line, " would-deny {would}");
    }
    field(&mut line, "client_id", &event.client_id);
    field(&mut line, "server_id", &event.server_id);
    if closing {
        field(&mut line, "bytes_out", &event.bytes_src_to_dst.to_string());
        field(&mut line, "bytes_in", &event.bytes_dst_to_src.to_string());
        field(&mut line, "duration", &format!("{}ms", event.duration_ms));
    }
    if !event.error.is_empty() {
        field(&mut line, "error", &format!("{:?}", event.error));
    }
    line
}

/// ` key=value`, unless the value is empty.
fn field(line: &mut String, key: &str, value: &str) {
    if !value.is_empty() {
        let _ = write!(line, " {key}={value}");
    }
}

/// `policy=<ns>/<name> rule=<n>` (no `rule=` when the policy as a whole
/// decided, e.g. an ALLOW policy none of whose rules matched).
fn policy_rule(policy: &str, rule: Option<u32>) -> Option<String> {
    if policy.is_empty() {
        return None;
    }
    Some(match rule {
        Some(rule) => format!("policy={policy} rule={rule}"),
        None => format!("policy={policy}"),
    })
}

fn phase_word(phase: Phase) -> &'static str {
    match phase {
        Phase::Close => "end",
        Phase::Refused => "refused",
        Phase::Open | Phase::Unspecified => "tcp",
    }
}

pub fn json_line(event: &ConnectionEvent) -> String {
    let pod = |p: Option<&PodRef>| p.map(|p| json!({"namespace": p.namespace, "name": p.name}));
    let phase = match event.phase() {
        Phase::Close => "close",
        Phase::Refused => "refused",
        Phase::Open | Phase::Unspecified => "open",
    };
    json!({
        "id": event.id,
        "node": event.node,
        "phase": phase,
        "proxy": direction(event),
        "timestamp_unix_ms": event.timestamp_unix_ms,
        "src": event.src_addr,
        "dst": event.dst_addr,
        "src_pod": pod(event.src.as_ref()),
        "dst_pod": pod(event.dst.as_ref()),
        "tls": event.tls,
        "no_tls_reason": event.no_tls_reason,
        "client_id": event.client_id,
        "server_id": event.server_id,
        "bytes_out": event.bytes_src_to_dst,
        "bytes_in": event.bytes_dst_to_src,
        "duration_ms": event.duration_ms,
        "error": event.error,
        "refused_reason": event.refused_reason,
        "denied_policy": event.denied_policy,
        "denied_rule": event.denied_rule,
        "dry_run_denied_policy": event.dry_run_denied_policy,
        "dry_run_denied_rule": event.dry_run_denied_rule,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_read_like_linkerd_tap() {
        let mut event = ConnectionEvent {
            id: 7,
            node: "node-0".into(),
            phase: Phase::Open as i32,
            direction: Direction::Outbound as i32,
            src_addr: "10.244.0.2:40000".into(),
            dst_addr: "10.244.1.2:8080".into(),
            src: Some(PodRef {
                namespace: "shop".into(),
                name: "client".into(),
            }),
            dst: None,
            tls: true,
            client_id: "spiffe://cluster.local/ns/shop/sa/client".into(),
            server_id: "spiffe://cluster.local/ns/shop/sa/server".into(),
            ..Default::default()
        };
        assert_eq!(
            text_line(&event),
            "tcp id=node-0:7 proxy=out src=10.244.0.2:40000 dst=10.244.1.2:8080 src_pod=shop/client tls=true \
             client_id=spiffe://cluster.local/ns/shop/sa/client server_id=spiffe://cluster.local/ns/shop/sa/server"
        );
        event.phase = Phase::Close as i32;
        event.bytes_src_to_dst = 5;
        event.bytes_dst_to_src = 8;
        event.duration_ms = 12;
        event.error = "peer reset".into();
        assert!(
            text_line(&event)
                .ends_with(" bytes_out=5 bytes_in=8 duration=12ms error=\"peer reset\""),
            "{}",
            text_line(&event)
        );
        let json: serde_json::Value = serde_json::from_str(&json_line(&event)).unwrap();
        assert_eq!(json["phase"], "close");
        assert_eq!(json["src_pod"]["name"], "client");
        assert_eq!(json["dst_pod"], serde_json::Value::Null);
        assert_eq!(json["bytes_in"], 8);
    }

    #[test]
    fn refusals_read_as_refused_with_their_reason() {
        let event = ConnectionEvent {
            id: 9,
            node: "node-1".into(),
            phase: Phase::Refused as i32,
            direction: Direction::Inbound as i32,
            src_addr: "10.244.1.4:40000".into(),
            dst_addr: "10.244.1.2:8080".into(),
            src: Some(PodRef {
                namespace: "legacy".into(),
                name: "plain".into(),
            }),
            dst: Some(PodRef {
                namespace: "shop".into(),
                name: "server".into(),
            }),
            server_id: "spiffe://cluster.local/ns/shop/sa/server".into(),
            error: "refused".into(),
            refused_reason: "strict_inbound".into(),
            ..Default::default()
        };
        assert_eq!(
            text_line(&event),
            "refused id=node-1:9 proxy=in src=10.244.1.4:40000 dst=10.244.1.2:8080 src_pod=legacy/plain \
             dst_pod=shop/server reason=strict_inbound server_id=spiffe://cluster.local/ns/shop/sa/server error=\"refused\""
        );
        let json: serde_json::Value = serde_json::from_str(&json_line(&event)).unwrap();
        assert_eq!(json["phase"], "refused");
        assert_eq!(json["refused_reason"], "strict_inbound");
    }

    #[test]
    fn policy_denials_and_dry_run_denials_name_the_policy_and_rule() {
        let mut event = ConnectionEvent {
            id: 3,
            node: "node-1".into(),
            phase: Phase::Refused as i32,
            direction: Direction::Inbound as i32,
            src_addr: "10.244.0.2:40000".into(),
            dst_addr: "10.244.1.2:8080".into(),
            src: Some(PodRef {
                namespace: "shop".into(),
                name: "client".into(),
            }),
            dst: Some(PodRef {
                namespace: "shop".into(),
                name: "server".into(),
            }),
            client_id: "spiffe://cluster.local/ns/shop/sa/client".into(),
            refused_reason: "policy_denied".into(),
            denied_policy: "shop/deny-legacy".into(),
            denied_rule: Some(1),
            ..Default::default()
        };
        assert_eq!(
            text_line(&event),
            "refused id=node-1:3 proxy=in src=10.244.0.2:40000 dst=10.244.1.2:8080 src_pod=shop/client \
             dst_pod=shop/server reason=policy_denied denied policy=shop/deny-legacy rule=1 \
             client_id=spiffe://cluster.local/ns/shop/sa/client"
        );
        let json: serde_json::Value = serde_json::from_str(&json_line(&event)).unwrap();
        assert_eq!(json["denied_policy"], "shop/deny-legacy");
        assert_eq!(json["denied_rule"], 1);
        assert_eq!(json["dry_run_denied_rule"], serde_json::Value::Null);
        // An ALLOW policy none of whose rules matched: no rule to name.
        event.denied_policy = "shop/web-allow".into();
        event.denied_rule = None;
        assert!(
            text_line(&event)
                .contains(" reason=policy_denied denied policy=shop/web-allow client_id="),
            "{}",
            text_line(&event)
        );

        let allowed = ConnectionEvent {
            phase: Phase::Open as i32,
            refused_reason: String::new(),
            denied_policy: String::new(),
            tls: true,
            dry_run_denied_policy: "shop/only-frontend".into(),
            dry_run_denied_rule: None,
            ..event
        };
        assert_eq!(
            text_line(&allowed),
            "tcp id=node-1:3 proxy=in src=10.244.0.2:40000 dst=10.244.1.2:8080 src_pod=shop/client \
             dst_pod=shop/server tls=true would-deny policy=shop/only-frontend \
             client_id=spiffe://cluster.local/ns/shop/sa/client"
        );
        let json: serde_json::Value = serde_json::from_str(&json_line(&allowed)).unwrap();
        assert_eq!(json["dry_run_denied_policy"], "shop/only-frontend");
        assert_eq!(json["denied_policy"], "");
    }

    #[test]
    fn a_connection_the_agent_refused_ends_with_its_reason() {
        let event = ConnectionEvent {
            id: 4,
            node: "node-0".into(),
            phase: Phase::Close as i32,
            direction: Direction::Outbound as i32,
            src_addr: "10.244.0.2:40000".into(),
            dst_addr: "10.244.0.9:80".into(),
            src: Some(PodRef {
                namespace: "shop".into(),
                name: "client".into(),
            }),
            no_tls_reason: "not_meshed".into(),
            error: "plaintext to 10.244.0.9:80 (not_meshed) is denied by --deny-plaintext".into(),
            refused_reason: "plaintext_denied".into(),
            ..Default::default()
        };
        assert_eq!(
            text_line(&event),
            "end id=node-0:4 proxy=out src=10.244.0.2:40000 dst=10.244.0.9:80 src_pod=shop/client tls=false \
             no_tls_reason=not_meshed reason=plaintext_denied bytes_out=0 bytes_in=0 duration=0ms \
             error=\"plaintext to 10.244.0.9:80 (not_meshed) is denied by --deny-plaintext\""
        );
        let json: serde_json::Value = serde_json::from_str(&json_line(&event)).unwrap();
        assert_eq!(json["phase"], "close");
        assert_eq!(json["refused_reason"], "plaintext_denied");
    }
}
