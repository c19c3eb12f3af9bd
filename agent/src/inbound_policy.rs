//! Strict inbound mode: which local meshed pods accept connections only
//! through this node's agent, and what the kernel refused them.
//!
//! - Policy: the `sealmesh.io/inbound-policy` annotation of a pod, else of
//!   its namespace, else `--default-inbound-policy` ([`sealmesh_common::policy`]).
//!   Only meshed pods can be strict: the agent carries mTLS traffic to meshed
//!   pods only. Invalid values are ignored with a warning that says how to
//!   fix them.
//! - Enforcement ([`sync_strict_pods`]): the eBPF maps `STRICT_PODS` (cgroup
//!   ids) and `STRICT_POD_ADDRESSES` (their IPs) follow the registry. The
//!   kernel drops a SYN to such a pod unless the node itself or the agent made
//!   the connection (attested by its cgroup at connect, never by address) or
//!   it came over the pod's loopback; see `agent-ebpf`.
//! - Visibility ([`report_refusals`]): each refusal the kernel reports becomes
//!   a tap event (phase `Refused`, reason `strict_inbound`), a rate-limited
//!   access-log line and an entry of the admin API's latest refusals; the
//!   kernel's per-pod counters feed `sealmesh_inbound_refused_total`.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet, VecDeque},
    future::Future,
    net::{IpAddr, Ipv4Addr},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use agent_ebpf::{InboundRefusal, StrictPodCounters};
use sealmesh_common::{
    consts::ACCESS_LOG_TARGET,
    policy::{InboundPolicy, InboundPolicySource, describe_ignored, describe_source},
};

use crate::{
    ebpf::EbpfError,
    metrics::InboundRefusalCounts,
    proxy::{ConnectionEvent, Direction, Phase, PodRef, ProxyHandle, RefusalReason},
    registry::{Workload, WorkloadRegistry},
};

/// Refusals the admin API keeps for `why` and operators.
pub const RECENT_REFUSALS: usize = 64;
/// Access-log lines for refusals per second at most; the rest are counted
/// and the count is logged with the next line (a port scan must not flood
/// the log; the kernel counters stay exact).
const REFUSAL_LOG_LINES_PER_SECOND: u32 = 20;
/// After a failed map update, how soon the sync tries again even without a
/// registry change.
const SYNC_RETRY: Duration = Duration::from_secs(5);

/// The kernel's strict-inbound maps; the eBPF `Redirector` in the agent.
pub trait StrictPodMaps: Send + Sync + 'static {
    /// Pod cgroups enforced now, with what the kernel counted for each.
    fn strict_pods(&self) -> Result<Vec<(u64, StrictPodCounters)>, EbpfError>;
    /// Strict pods' addresses: connects to them from the node or the agent
    /// are recorded as trusted.
    fn strict_addresses(&self) -> Result<Vec<Ipv4Addr>, EbpfError>;
    fn add_strict_address(&self, ip: Ipv4Addr) -> Result<(), EbpfError>;
    fn remove_strict_address(&self, ip: Ipv4Addr) -> Result<(), EbpfError>;
    /// Starts enforcing (counters from zero; an enforced pod keeps its own).
    fn add_strict_pod(&self, cgroup_id: u64) -> Result<(), EbpfError>;
    fn remove_strict_pod(&self, cgroup_id: u64) -> Result<(), EbpfError>;
}

/// One pod's inbound policy as the agent applies it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodPolicy {
    pub pod: PodRef,
    pub meshed: bool,
    /// Effective: always permissive for a pod that is not meshed.
    pub policy: InboundPolicy,
    pub source: InboundPolicySource,
    pub source_description: String,
    /// The kernel enforces it (the pod's cgroup is in `STRICT_PODS`).
    pub enforced: bool,
    pub refused_total: u64,
    /// Warnings for annotation values that were ignored.
    pub ignored_annotations: Vec<String>,
}

/// The inbound policy a workload gets with the cluster default `default`,
/// and what decided it: its annotations, except that a pod which is not
/// meshed is always permissive. The kernel trusts every connect of the
/// agent, so any path that makes the agent connect to a local pod for a
/// source that did not prove an identity must refuse pods this calls strict.
pub fn effective_policy(
    workload: &Workload,
    default: InboundPolicy,
) -> (InboundPolicy, InboundPolicySource) {
    let (policy, source) = workload.inbound_policy.resolve(default);
    if workload.meshed {
        (policy, source)
    } else {
        (InboundPolicy::Permissive, source)
    }
}

/// What the admin API, the metrics and the sync share.
pub struct InboundPolicyState {
    default_policy: InboundPolicy,
    registry: Arc<dyn WorkloadRegistry>,
    maps: Arc<dyn StrictPodMaps>,
    recent: Mutex<VecDeque<ConnectionEvent>>,
}

impl std::fmt::Debug for InboundPolicyState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboundPolicyState")
            .field("default_policy", &self.default_policy)
            .finish_non_exhaustive()
    }
}

impl InboundPolicyState {
    pub fn new(
        default_policy: InboundPolicy,
        registry: Arc<dyn WorkloadRegistry>,
        maps: Arc<dyn StrictPodMaps>,
    ) -> Self {
        Self {
            default_policy,
            registry,
            maps,
            recent: Mutex::new(VecDeque::with_capacity(RECENT_REFUSALS)),
        }
    }

    pub fn default_policy(&self) -> InboundPolicy {
        self.default_policy
    }

    /// The policy a workload gets and what decided it.
    pub fn policy_of(&self, workload: &Workload) -> (InboundPolicy, InboundPolicySource) {
        effective_policy(workload, self.default_policy)
    }

    /// Every local pod's policy, with the kernel's state and counts, sorted
    /// by namespace and name.
    pub fn pods(&self) -> Vec<PodPolicy> {
        let counters: BTreeMap<u64, StrictPodCounters> = match self.maps.strict_pods() {
            Ok(pods) => pods.into_iter().collect(),
            Err(error) => {
                tracing::warn!(%error, "cannot read the strict-pod map; showing no pod as enforced");
                BTreeMap::new()
            }
        };
        let mut pods: Vec<PodPolicy> = self
            .registry
            .local_workloads()
            .iter()
            .map(|w| {
                let (policy, source) = self.policy_of(w);
                let kernel = w.cgroup_id.and_then(|id| counters.get(&id));
                PodPolicy {
                    pod: PodRef::of(w),
                    meshed: w.meshed,
                    policy,
                    source,
                    source_description: describe_source(policy, source, &w.namespace, &w.name),
                    enforced: kernel.is_some(),
                    refused_total: kernel.map_or(0, |c| c.refused),
                    ignored_annotations: w
                        .inbound_policy
                        .ignored
                        .iter()
                        .map(|ignored| describe_ignored(ignored, &w.namespace, &w.name))
                        .collect(),
                }
            })
            .collect();
        pods.sort_by(|a, b| (&a.pod.namespace, &a.pod.name).cmp(&(&b.pod.namespace, &b.pod.name)));
        pods
    }

    /// The latest refusals, oldest first.
    pub fn recent_refusals(&self) -> Vec<ConnectionEvent> {
        self.recent
            .lock()
            .expect("recent refusals lock poisoned")
            .iter()
            .cloned()
            .collect()
    }

    fn remember(&self, event: &ConnectionEvent) {
        let mut recent = self.recent.lock().expect("recent refusals lock poisoned");
        if recent.len() == RECENT_REFUSALS {
            recent.pop_front();
        }
        recent.push_back(event.clone());
    }

    /// The tap/admin event for a refusal the kernel reported.
    fn refusal_event(&self, refusal: &InboundRefusal) -> ConnectionEvent {
        let dst = self.registry.by_cgroup(refusal.pod_cgroup);
        let src_addr = refusal.flow.src();
        let src = match src_addr.ip() {
            IpAddr::V4(ip) => self.registry.by_ip(ip),
            IpAddr::V6(_) => None,
        };
        let why = match &dst {
            Some(w) => {
                let (policy, source) = self.policy_of(w);
                describe_source(policy, source, &w.namespace, &w.name)
            }
            None => format!(
                "pod cgroup {} is strict but no longer in the registry",
                refusal.pod_cgroup
            ),
        };
        ConnectionEvent {
            timestamp_ms: unix_ms(SystemTime::now()),
            dst_addr: Some(refusal.flow.dst()),
            src: src.as_deref().map(PodRef::of),
            dst: dst.as_deref().map(PodRef::of),
            server_id: dst.as_deref().map(|w| w.identity.spiffe_uri()),
            error: Some(format!(
                "plaintext connection refused by the kernel: the pod only accepts connections through its node's agent ({why})"
            )),
            refused_reason: Some(RefusalReason::StrictInbound),
            ..ConnectionEvent::new(0, Phase::Refused, Direction::Inbound, src_addr)
        }
    }
}

impl InboundRefusalCounts for InboundPolicyState {
    fn refused_by_pod(&self) -> Vec<(PodRef, u64, u64)> {
        let Ok(pods) = self.maps.strict_pods() else {
            return Vec::new();
        };
        pods.into_iter()
            .filter_map(|(cgroup, counters)| {
                let workload = self.registry.by_cgroup(cgroup)?;
                Some((PodRef::of(&workload), counters.refused, counters.unreported))
            })
            .collect()
    }
}

/// Keeps the strict-pod maps equal to the local meshed pods whose policy is
/// strict, on every registry change, until `shutdown`.
pub async fn sync_strict_pods(state: Arc<InboundPolicyState>, shutdown: impl Future<Output = ()>) {
    let mut changes = state.registry.subscribe();
    let mut shutdown = std::pin::pin!(shutdown);
    let mut warned = HashSet::new();
    loop {
        warn_ignored_annotations(&state, &mut warned);
        let failed = match sync_now(&state) {
            Ok(_) => false,
            Err(error) => {
                tracing::error!(%error, retry_in = ?SYNC_RETRY, "cannot update the strict-pod maps; pods may accept plaintext they should refuse, or refuse what they should accept, until this succeeds");
                true
            }
        };
        tokio::select! {
            () = &mut shutdown => return,
            changed = changes.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(SYNC_RETRY), if failed => {}
        }
    }
}

/// Logs each ignored annotation value of a local pod once (per pod and
/// value), and strict annotations on pods that cannot be strict.
fn warn_ignored_annotations(state: &InboundPolicyState, warned: &mut HashSet<String>) {
    for w in state.registry.local_workloads() {
        for ignored in &w.inbound_policy.ignored {
            let warning = describe_ignored(ignored, &w.namespace, &w.name);
            if warned.insert(format!("{}/{}: {warning}", w.namespace, w.name)) {
                tracing::warn!(pod = %PodRef::of(&w), "{warning}");
            }
        }
        let (annotated, source) = w.inbound_policy.resolve(state.default_policy);
        if !w.meshed
            && annotated == InboundPolicy::Strict
            && source != InboundPolicySource::ClusterDefault
        {
            let warning = format!(
                "{} but the pod is not meshed, so it stays permissive: only meshed pods are reached through the agent; mesh it or remove the annotation",
                describe_source(annotated, source, &w.namespace, &w.name)
            );
            if warned.insert(format!("{}/{}: {warning}", w.namespace, w.name)) {
                tracing::warn!(pod = %PodRef::of(&w), "{warning}");
            }
        }
    }
}

/// Brings the maps to the wanted state now; returns how many pods are
/// strict. Enforcement starts after the address is known (so the agent's own
/// connects are trusted from the first SYN) and ends before it is dropped.
pub fn sync_now(state: &InboundPolicyState) -> Result<usize, EbpfError> {
    let mut wanted: BTreeMap<u64, (Ipv4Addr, Arc<Workload>)> = BTreeMap::new();
    for w in state.registry.local_workloads() {
        // A pod without an address yet cannot be reached; it becomes strict with its address.
        if let (Some(cgroup), Some(ip), (InboundPolicy::Strict, _)) =
            (w.cgroup_id, w.ip, state.policy_of(&w))
        {
            wanted.insert(cgroup, (ip, w.clone()));
        }
    }
    let wanted_ips: BTreeSet<Ipv4Addr> = wanted.values().map(|(ip, _)| *ip).collect();
    let maps = state.maps.as_ref();
    let present: BTreeSet<u64> = maps.strict_pods()?.into_iter().map(|(id, _)| id).collect();
    let present_ips: BTreeSet<Ipv4Addr> = maps.strict_addresses()?.into_iter().collect();

    for &cgroup in present.iter().filter(|id| !wanted.contains_key(id)) {
        maps.remove_strict_pod(cgroup)?;
        tracing::info!(cgroup, "inbound policy no longer strict for pod cgroup");
    }
    for &ip in present_ips.difference(&wanted_ips) {
        maps.remove_strict_address(ip)?;
    }
    for &ip in wanted_ips.difference(&present_ips) {
        maps.add_strict_address(ip)?;
    }
    for (cgroup, (_, w)) in wanted.iter().filter(|(id, _)| !present.contains(id)) {
        maps.add_strict_pod(*cgroup)?;
        let (policy, source) = state.policy_of(w);
        tracing::info!(
            pod = %PodRef::of(w),
            cgroup,
            ip = ?w.ip,
            policy = %describe_source(policy, source, &w.namespace, &w.name),
            "strict inbound enforced: the kernel refuses plaintext to this pod"
        );
    }
    Ok(wanted.len())
}

/// A stream of the refusals the kernel reports.
pub trait RefusalSource: Send + 'static {
    /// Waits for the next refusals (at least one).
    fn next_batch(&mut self) -> impl Future<Output = std::io::Result<Vec<InboundRefusal>>> + Send;
}

/// Turns each refusal the kernel reports into a tap event, an access-log
/// line (rate-limited) and an entry of the latest refusals, until `shutdown`.
pub async fn report_refusals(
    state: Arc<InboundPolicyState>,
    mut source: impl RefusalSource,
    proxy: ProxyHandle,
    shutdown: impl Future<Output = ()>,
) {
    let mut shutdown = std::pin::pin!(shutdown);
    let mut budget = LogBudget::new(REFUSAL_LOG_LINES_PER_SECOND);
    loop {
        let batch = tokio::select! {
            () = &mut shutdown => return,
            batch = source.next_batch() => batch,
        };
        let refusals = match batch {
            Ok(refusals) => refusals,
            Err(error) => {
                tracing::error!(%error, "reading the kernel's refusal reports failed; refusals are still enforced and counted (sealmesh_inbound_refused_total) but no longer shown in tap or the access log");
                return;
            }
        };
        for refusal in &refusals {
            let mut event = state.refusal_event(refusal);
            proxy.publish_refusal(&mut event);
            if let Some(suppressed) = budget.take(Instant::now()) {
                log_refusal(&event, suppressed);
            }
            state.remember(&event);
        }
    }
}

fn log_refusal(e: &ConnectionEvent, suppressed: u64) {
    let pod = |p: &Option<PodRef>| p.as_ref().map(ToString::to_string).unwrap_or_default();
    tracing::warn!(
        target: ACCESS_LOG_TARGET,
        id = e.id,
        direction = e.direction.as_str(),
        src_addr = %e.src_addr,
        dst_addr = e.dst_addr.map(|a| a.to_string()).unwrap_or_default(),
        src = pod(&e.src),
        dst = pod(&e.dst),
        server_id = e.server_id.as_deref().unwrap_or(""),
        reason = RefusalReason::StrictInbound.as_str(),
        error = e.error.as_deref().unwrap_or(""),
        suppressed_before = suppressed,
        "connection refused"
    );
}

/// At most `per_second` lines a second; counts what it holds back.
struct LogBudget {
    per_second: u32,
    window_start: Option<Instant>,
    used: u32,
    suppressed: u64,
}

impl LogBudget {
    fn new(per_second: u32) -> Self {
        Self {
            per_second,
            window_start: None,
            used: 0,
            suppressed: 0,
        }
    }

    /// Some(lines held back since the last one logged) when this one may be
    /// logged; None when it must be held back.
    fn take(&mut self, now: Instant) -> Option<u64> {
        if self
            .window_start
            .is_none_or(|start| now.duration_since(start) >= Duration::from_secs(1))
        {
            self.window_start = Some(now);
            self.used = 0;
        }
        if self.used == self.per_second {
            self.suppressed += 1;
            return None;
        }
        self.used += 1;
        Some(std::mem::take(&mut self.suppressed))
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_budget_holds_back_lines_beyond_the_rate_and_counts_them() {
        let mut budget = LogBudget::new(2);
        let start = Instant::now();
        assert_eq!(budget.take(start), Some(0));
        assert_eq!(budget.take(start), Some(0));
        assert_eq!(budget.take(start), None);
        assert_eq!(budget.take(start + Duration::from_millis(500)), None);
        assert_eq!(
            budget.take(start + Duration::from_secs(1)),
            Some(2),
            "the next window's first line says how many were held back"
        );
        assert_eq!(budget.take(start + Duration::from_secs(1)), Some(0));
    }
}
