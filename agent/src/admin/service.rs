//! `sealmesh.admin.v1.Admin` over [`AgentState`].

use std::{
    pin::Pin,
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use futures::Stream;
use sealmesh_proto::admin as pb;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{AgentState, EdgeKey, EdgeStats, unix_ms};
use crate::proxy::{ConnectionEvent, Direction, Phase, PodRef};

/// Events buffered per tap client between the agent and the network.
const TAP_CLIENT_BUFFER: usize = 256;

/// The admin API implementation.
pub struct AdminService {
    state: Arc<AgentState>,
    /// Becomes true at shutdown: open tap streams end.
    stop: watch::Receiver<bool>,
}

impl AdminService {
    pub fn new(state: Arc<AgentState>, stop: watch::Receiver<bool>) -> Self {
        Self { state, stop }
    }
}

type TapStream = Pin<Box<dyn Stream<Item = Result<pb::ConnectionEvent, Status>> + Send>>;

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn get_status(
        &self,
        _: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::AgentStatus>, Status> {
        let readiness = self.state.readiness();
        Ok(Response::new(pb::AgentStatus {
            node: self.state.node.clone(),
            node_ip: self.state.node_ip.clone(),
            ready: readiness.is_ready(),
            not_ready_reasons: readiness.reasons,
            degraded_reasons: readiness.warnings,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            started_unix_ms: unix_ms_signed(self.state.started),
        }))
    }

    async fn get_connections(
        &self,
        _: Request<pb::GetConnectionsRequest>,
    ) -> Result<Response<pb::GetConnectionsResponse>, Status> {
        let node = &self.state.node;
        let table = &self.state.connections;
        let open = table
            .open_connections(unix_ms(SystemTime::now()))
            .iter()
            .map(|e| event_to_proto(e, node))
            .collect();
        let mut edges: Vec<pb::Edge> = table
            .edges()
            .into_iter()
            .map(|(key, stats)| edge_to_proto(key, &stats))
            .collect();
        edges.sort_by_key(edge_order);
        Ok(Response::new(pb::GetConnectionsResponse { open, edges }))
    }

    type TapStream = TapStream;

    async fn tap(
        &self,
        request: Request<pb::TapRequest>,
    ) -> Result<Response<Self::TapStream>, Status> {
        let filter = request.into_inner();
        let events = self.state.proxy.subscribe();
        let (tx, rx) = mpsc::channel(TAP_CLIENT_BUFFER);
        tokio::spawn(forward_tap(
            events,
            filter,
            self.state.node.clone(),
            tx,
            self.stop.clone(),
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_certificates(
        &self,
        _: Request<pb::GetCertificatesRequest>,
    ) -> Result<Response<pb::GetCertificatesResponse>, Status> {
        let secs = |t: Option<SystemTime>| t.map(unix_secs).unwrap_or(0);
        let certificates = self
            .state
            .certs
            .snapshot()
            .into_iter()
            .map(|s| pb::CertificateStatus {
                identity: s.identity.spiffe_uri(),
                serial: s.serial.clone().unwrap_or_default(),
                not_before_unix: secs(s.not_before),
                not_after_unix: secs(s.not_after),
                last_refresh_unix: secs(s.last_refresh),
                last_error: s.last_error.unwrap_or_default(),
                valid: s.valid,
                chain: s.chain.iter().map(|der| der.to_vec()).collect(),
            })
            .collect();
        Ok(Response::new(pb::GetCertificatesResponse {
            certificates,
            wanted: self.state.wanted_identities().into_iter().collect(),
            trust_anchors_pem: self.state.certs.trust_anchors_pem(),
        }))
    }

    async fn get_config(
        &self,
        _: Request<pb::GetConfigRequest>,
    ) -> Result<Response<pb::ConfigDump>, Status> {
        Ok(Response::new(pb::ConfigDump {
            yaml: self.state.config_yaml.clone(),
        }))
    }

    async fn get_ebpf_status(
        &self,
        _: Request<pb::GetEbpfStatusRequest>,
    ) -> Result<Response<pb::EbpfStatus>, Status> {
        let datapath = self.state.datapath.clone();
        let status = tokio::task::spawn_blocking(move || datapath.status())
            .await
            .map_err(|e| Status::internal(format!("reading the eBPF maps failed: {e}")))?;
        let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        Ok(Response::new(pb::EbpfStatus {
            attached_programs: status
                .attached_programs
                .iter()
                .map(|p| (*p).to_owned())
                .collect(),
            meshed_pods: count(status.meshed_pods),
            pending_connects: count(status.pending_connects),
            pending_accepts: count(status.pending_accepts),
            pin_dir: status.pin_dir.display().to_string(),
            unmeshed_pods: count(status.unmeshed_pods),
            pod_parent_cgroups: count(status.pod_parent_cgroups),
            agent_cgroups: count(status.agent_cgroups),
            strict_pods: count(status.strict_pods),
            trusted_connections: count(status.trusted_connections),
            plaintext_access_entries: count(status.plaintext_access_entries),
            sockmap_acceleration: status.sockmap_acceleration.unwrap_or(false),
            sockmap_acceleration_limits: status
                .sockmap_acceleration_limits
                .iter()
                .map(ToString::to_string)
                .collect(),
        }))
    }

    async fn get_inbound_policy(
        &self,
        _: Request<pb::GetInboundPolicyRequest>,
    ) -> Result<Response<pb::InboundPolicyStatus>, Status> {
        let inbound = &self.state.inbound;
        let pods = inbound
            .pods()
            .into_iter()
            .map(|p| pb::PodInboundPolicy {
                pod: pod_to_proto(&Some(p.pod)),
                meshed: p.meshed,
                policy: p.policy.as_str().to_owned(),
                source: p.source.as_str().to_owned(),
                source_description: p.source_description,
                enforced: p.enforced,
                refused_total: p.refused_total,
                ignored_annotations: p.ignored_annotations,
                required_by_authorization_policy: p.required_by_authorization_policy,
            })
            .collect();
        let recent_refusals = inbound
            .recent_refusals()
            .iter()
            .map(|e| event_to_proto(e, &self.state.node))
            .collect();
        Ok(Response::new(pb::InboundPolicyStatus {
            default_policy: inbound.default_policy().as_str().to_owned(),
            pods,
            recent_refusals,
        }))
    }
}

/// Copies matching events to one tap client until it goes away, the agent
/// stops, or the client falls so far behind that events were dropped for it.
async fn forward_tap(
    mut events: broadcast::Receiver<Arc<ConnectionEvent>>,
    filter: pb::TapRequest,
    node: String,
    tx: mpsc::Sender<Result<pb::ConnectionEvent, Status>>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let event = tokio::select! {
            () = tx.closed() => return,
            () = stopped(&mut stop) => {
                let _ = tx.send(Err(Status::unavailable("the agent is shutting down; tap again once it is back"))).await;
                return;
            }
            event = events.recv() => event,
        };
        match event {
            Ok(event) if matches(&filter, &event) => {
                if tx.send(Ok(event_to_proto(&event, &node))).await.is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::info!(missed, "tap client fell behind; ending its stream");
                let _ = tx
                    .send(Err(Status::resource_exhausted(format!(
                        "tap fell behind and {missed} connection events were dropped for it (the agent never slows connections for tap); tap again, with a namespace or pod filter on busy nodes"
                    ))))
                    .await;
                return;
            }
            Err(broadcast::error::RecvError::Closed) => {
                let _ = tx
                    .send(Err(Status::unavailable("the TLS engine stopped")))
                    .await;
                return;
            }
        }
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    // An error means the sender is gone: the agent is stopping too.
    let _ = stop.wait_for(|stop| *stop).await;
}

/// Source or destination pod matches the namespace and pod of the request
/// (an empty field matches anything).
fn matches(filter: &pb::TapRequest, event: &ConnectionEvent) -> bool {
    if filter.namespace.is_empty() && filter.pod.is_empty() {
        return true;
    }
    let pod_matches = |pod: &Option<PodRef>| {
        pod.as_ref().is_some_and(|p| {
            (filter.namespace.is_empty() || p.namespace == filter.namespace)
                && (filter.pod.is_empty() || p.name == filter.pod)
        })
    };
    pod_matches(&event.src) || pod_matches(&event.dst)
}

fn pod_to_proto(pod: &Option<PodRef>) -> Option<pb::PodRef> {
    pod.as_ref().map(|p| pb::PodRef {
        namespace: p.namespace.clone(),
        name: p.name.clone(),
    })
}

fn direction_to_proto(direction: Direction) -> pb::Direction {
    match direction {
        Direction::Outbound => pb::Direction::Outbound,
        Direction::Inbound => pb::Direction::Inbound,
    }
}

fn event_to_proto(e: &ConnectionEvent, node: &str) -> pb::ConnectionEvent {
    pb::ConnectionEvent {
        id: e.id,
        phase: match e.phase {
            Phase::Open => pb::Phase::Open,
            Phase::Close => pb::Phase::Close,
            Phase::Refused => pb::Phase::Refused,
        }
        .into(),
        direction: direction_to_proto(e.direction).into(),
        timestamp_unix_ms: i64::try_from(e.timestamp_ms).unwrap_or(i64::MAX),
        src_addr: e.src_addr.to_string(),
        dst_addr: e.dst_addr.map(|a| a.to_string()).unwrap_or_default(),
        src: pod_to_proto(&e.src),
        dst: pod_to_proto(&e.dst),
        client_id: e.client_id.clone().unwrap_or_default(),
        server_id: e.server_id.clone().unwrap_or_default(),
        tls: e.tls,
        no_tls_reason: e
            .no_tls_reason
            .map(|r| r.as_str().to_owned())
            .unwrap_or_default(),
        bytes_src_to_dst: e.bytes_src_to_dst,
        bytes_dst_to_src: e.bytes_dst_to_src,
        duration_ms: e.duration_ms,
        error: e.error.clone().unwrap_or_default(),
        node: node.to_owned(),
        refused_reason: e
            .refused_reason
            .map(|r| r.as_str().to_owned())
            .unwrap_or_default(),
        denied_policy: e
            .authz
            .as_ref()
            .and_then(|a| a.denied.as_ref())
            .map(|d| d.policy.clone())
            .unwrap_or_default(),
        denied_rule: e
            .authz
            .as_ref()
            .and_then(|a| a.denied.as_ref())
            .and_then(|d| d.rule),
        dry_run_denied_policy: e
            .authz
            .as_ref()
            .and_then(|a| a.dry_run_denied.as_ref())
            .map(|d| d.policy.clone())
            .unwrap_or_default(),
        dry_run_denied_rule: e
            .authz
            .as_ref()
            .and_then(|a| a.dry_run_denied.as_ref())
            .and_then(|d| d.rule),
    }
}

fn edge_to_proto(key: EdgeKey, stats: &EdgeStats) -> pb::Edge {
    pb::Edge {
        src: pod_to_proto(&key.src),
        dst: pod_to_proto(&key.dst),
        direction: direction_to_proto(key.direction).into(),
        client_id: key.client_id.unwrap_or_default(),
        server_id: key.server_id.unwrap_or_default(),
        tls: key.tls,
        no_tls_reason: key
            .no_tls_reason
            .map(|r| r.as_str().to_owned())
            .unwrap_or_default(),
        connections_total: stats.connections_total,
        connections_open: stats.connections_open,
        errors_total: stats.errors_total,
        refused_total: stats.refused_total,
        denied_total: stats.denied_total,
        denied_policy: stats.denied_policy.clone().unwrap_or_default(),
        dry_run_denied_policy: stats.dry_run_denied_policy.clone().unwrap_or_default(),
        last_seen_unix_ms: i64::try_from(stats.last_seen_ms).unwrap_or(i64::MAX),
    }
}

/// Stable order for edges: by source, destination, then direction.
fn edge_order(e: &pb::Edge) -> (String, String, i32, String) {
    let name = |p: &Option<pb::PodRef>| {
        p.as_ref()
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .unwrap_or_default()
    };
    (
        name(&e.src),
        name(&e.dst),
        e.direction,
        e.no_tls_reason.clone(),
    )
}

fn unix_secs(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

fn unix_ms_signed(t: SystemTime) -> i64 {
    i64::try_from(unix_ms(t)).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: u64) -> ConnectionEvent {
        ConnectionEvent {
            src: Some(PodRef {
                namespace: "shop".into(),
                name: "client".into(),
            }),
            ..ConnectionEvent::new(
                id,
                Phase::Open,
                Direction::Outbound,
                "10.244.0.2:1".parse().unwrap(),
            )
        }
    }

    #[tokio::test]
    async fn a_tap_client_that_falls_behind_gets_a_status_not_a_stalled_agent() {
        let (events_tx, events) = broadcast::channel(2);
        let (tx, mut rx) = mpsc::channel(TAP_CLIENT_BUFFER);
        let (_stop_tx, stop) = watch::channel(false);
        // Five events while the tap has not read any: three are dropped for it.
        for id in 0..5 {
            events_tx.send(Arc::new(event(id))).unwrap();
        }
        let tap = tokio::spawn(forward_tap(
            events,
            pb::TapRequest::default(),
            "node-0".into(),
            tx,
            stop,
        ));
        let status = rx.recv().await.unwrap().unwrap_err();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(
            status
                .message()
                .starts_with("tap fell behind and 3 connection events were dropped for it"),
            "{status}"
        );
        tap.await.unwrap();
        assert!(
            rx.recv().await.is_none(),
            "the stream ends after the status"
        );
    }

    #[tokio::test]
    async fn tap_streams_matching_events_until_the_agent_stops() {
        let (events_tx, events) = broadcast::channel(8);
        let (tx, mut rx) = mpsc::channel(TAP_CLIENT_BUFFER);
        let (stop_tx, stop) = watch::channel(false);
        let filter = pb::TapRequest {
            namespace: "shop".into(),
            pod: String::new(),
        };
        let tap = tokio::spawn(forward_tap(events, filter, "node-0".into(), tx, stop));
        let mut elsewhere = event(1);
        elsewhere.src.as_mut().unwrap().namespace = "other".into();
        events_tx.send(Arc::new(elsewhere)).unwrap();
        events_tx.send(Arc::new(event(2))).unwrap();
        let got = rx.recv().await.unwrap().unwrap();
        assert_eq!((got.id, got.node.as_str()), (2, "node-0"));
        stop_tx.send(true).unwrap();
        let status = rx.recv().await.unwrap().unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable);
        tap.await.unwrap();
    }

    #[test]
    fn tap_filter_matches_source_or_destination() {
        let pod = |ns: &str, name: &str| {
            Some(PodRef {
                namespace: ns.into(),
                name: name.into(),
            })
        };
        let event = ConnectionEvent {
            src: pod("shop", "client"),
            dst: pod("legacy", "plain"),
            ..ConnectionEvent::new(
                1,
                Phase::Open,
                Direction::Outbound,
                "10.244.0.2:1".parse().unwrap(),
            )
        };
        let filter = |namespace: &str, pod: &str| pb::TapRequest {
            namespace: namespace.into(),
            pod: pod.into(),
        };
        assert!(matches(&filter("", ""), &event));
        assert!(matches(&filter("shop", ""), &event));
        assert!(matches(&filter("legacy", "plain"), &event));
        assert!(matches(&filter("", "client"), &event));
        assert!(!matches(&filter("shop", "plain"), &event));
        assert!(!matches(&filter("other", ""), &event));
    }
}
