//! Strict inbound mode: which local meshed pods accept connections only
//! through this node's agent (or, guarded by authorization policies, plaintext
//! only from the sources those allow), and what the kernel refused them.
//!
//! - Policy: the `sealmesh.io/inbound-policy` annotation of a pod, else of
//!   its namespace, else `--default-inbound-policy` ([`sealmesh_common::policy`]).
//!   Only meshed pods can be strict: the agent carries mTLS traffic to meshed
//!   pods only. Invalid values are ignored with a warning that says how to
//!   fix them.
//! - Strict by implication ([`kernel_guard`]): plaintext to a meshed pod never
//!   passes its agent, so a permissive pod whose enforced authorization
//!   policies refuse some plaintext source is guarded by the kernel too, which
//!   then admits the plaintext regions those policies allow
//!   ([`PlaintextAccess`]), and only those.
//! - Enforcement ([`sync_strict_pods`]): the eBPF maps `STRICT_PODS` (cgroup
//!   ids), `STRICT_POD_ADDRESSES` (their IPs) and `PLAINTEXT_ACCESS` (the
//!   admitted regions) follow the registry. The kernel drops a SYN to such a
//!   pod unless the node itself or the agent made the connection (attested by
//!   its cgroup at connect, never by address), it came over the pod's
//!   loopback or the pod's regions admit its source and port; see `agent-ebpf`.
//!   The agent's own plaintext path checks the same ([`plaintext_refusal`]).
//! - Visibility ([`report_refusals`]): each refusal the kernel reports becomes
//!   a tap event (phase `Refused`, reason `strict_inbound`, or `policy_denied`
//!   with the denying policy for a pod guarded by its authorization policies),
//!   a rate-limited access-log line and an entry of the admin API's latest
//!   refusals; the kernel's per-pod counters feed
//!   `sealmesh_inbound_refused_total`.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet, VecDeque},
    future::Future,
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use agent_ebpf::{InboundRefusal, StrictPodCounters, capacity};
use ipnet::Ipv4Net;
use sealmesh_common::{
    authz::{Action, Connection, Decider, PlaintextAccess, PlaintextRegion, Verdict},
    consts::ACCESS_LOG_TARGET,
    policy::{InboundPolicy, InboundPolicySource, describe_ignored, describe_source},
};

use crate::{
    ebpf::EbpfError,
    metrics::{InboundRefusalCounts, PodRefusals},
    proxy::{AuthzNote, ConnectionEvent, Direction, Phase, PodRef, ProxyHandle, RefusalReason},
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
    /// The plaintext regions the kernel admits or refuses to enforced pods
    /// (true: admits).
    fn plaintext_entries(&self) -> Result<Vec<(PlaintextEntry, bool)>, EbpfError>;
    /// Adds or changes a region; [`EbpfError::MapFull`] when the map has no
    /// room for another.
    fn set_plaintext_entry(&self, entry: &PlaintextEntry, allow: bool) -> Result<(), EbpfError>;
    fn remove_plaintext_entry(&self, entry: &PlaintextEntry) -> Result<(), EbpfError>;
}

/// One region of an enforced pod's plaintext in `PLAINTEXT_ACCESS`: sources
/// in `net` (the longest listed network containing them) to `port` (None:
/// every port no policy names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PlaintextEntry {
    pub pod_cgroup: u64,
    pub port: Option<u16>,
    pub net: Ipv4Net,
}

/// Why the kernel guards a local pod's inbound plaintext.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelGuard {
    /// Its inbound policy is strict: every plaintext source is refused,
    /// whatever its authorization policies allow.
    StrictPolicy,
    /// Its inbound policy is permissive, but enforced authorization policies
    /// refuse some plaintext: the kernel admits these regions' allowed
    /// sources only.
    AuthorizationPolicy(Vec<PlaintextRegion>),
}

/// Whether and why the kernel must guard `workload` with the cluster default
/// `default`: a meshed pod that is strict, or whose authorization policies
/// refuse some plaintext (its plaintext never passes its agent, which could
/// judge it otherwise).
pub fn kernel_guard(workload: &Workload, default: InboundPolicy) -> Option<KernelGuard> {
    if !workload.meshed {
        return None;
    }
    if effective_policy(workload, default).0 == InboundPolicy::Strict {
        return Some(KernelGuard::StrictPolicy);
    }
    match workload.authz.plaintext_access() {
        PlaintextAccess::All => None,
        PlaintextAccess::Regions(regions) => Some(KernelGuard::AuthorizationPolicy(regions)),
    }
}

/// Why the agent refuses to carry a plaintext connection to a local pod.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct PlaintextRefusal {
    pub reason: RefusalReason,
    /// The policy that denied it ([`RefusalReason::PolicyDenied`]).
    pub authz: Option<Box<AuthzNote>>,
    message: String,
}

/// Whether the agent must refuse to carry plaintext from `source` to
/// `target` on `pod`, a pod of this node: the kernel trusts every connect of
/// the agent, so the agent refuses what the kernel would refuse the source
/// itself ([`kernel_guard`]).
pub fn plaintext_refusal(
    pod: &Workload,
    default: InboundPolicy,
    source: IpAddr,
    target: SocketAddrV4,
) -> Option<PlaintextRefusal> {
    let name = PodRef::of(pod);
    match kernel_guard(pod, default)? {
        KernelGuard::StrictPolicy => Some(PlaintextRefusal {
            reason: RefusalReason::StrictInbound,
            authz: None,
            message: format!(
                "{name} ({target}) accepts only mutual TLS from meshed pods (strict inbound policy); an unmeshed pod's connection cannot reach it"
            ),
        }),
        KernelGuard::AuthorizationPolicy(_) => {
            let verdict = judge_plaintext(pod, source, target.port());
            if verdict.allowed() && matches!(source, IpAddr::V4(_)) {
                return None;
            }
            Some(PlaintextRefusal {
                reason: RefusalReason::PolicyDenied,
                authz: AuthzNote::of(&verdict),
                message: format!(
                    "{name} ({target}) refuses plaintext from {source}: {}; an unmeshed pod's connection cannot reach it",
                    describe_plaintext_denial(&verdict, source, false)
                ),
            })
        }
    }
}

/// How the pod's authorization policies judge a plaintext connection.
fn judge_plaintext(pod: &Workload, source: IpAddr, port: u16) -> Verdict {
    let source_ip = match source {
        IpAddr::V4(ip) => Some(ip),
        IpAddr::V6(_) => None,
    };
    pod.authz.judge(&Connection {
        identity: None,
        source_ip,
        port,
    })
}

/// Why a pod guarded by its authorization policies refuses a plaintext
/// connection. `unfit`: its regions did not fit in the kernel's map.
fn describe_plaintext_denial(verdict: &Verdict, source: IpAddr, unfit: bool) -> String {
    if let Some(decider) = verdict.denied_by() {
        return describe_denial(decider);
    }
    if unfit {
        return format!(
            "the pod's authorization policies admit more plaintext regions than fit in the kernel's map ({} entries for the node), so all its plaintext is refused (fail closed); simplify the policies' ipBlocks and ports",
            capacity::PLAINTEXT_ACCESS
        );
    }
    if source.is_ipv6() {
        return "authorization policies name IPv4 sources only, so IPv6 plaintext to a pod they guard is refused".to_owned();
    }
    "the authorization policies in force when it arrived denied it".to_owned()
}

fn describe_denial(decider: &Decider) -> String {
    let policy = &decider.policy;
    if let Some(invalid) = &policy.invalid {
        return format!(
            "authorization policy {} is invalid ({invalid}) and fails closed",
            policy.name
        );
    }
    match (policy.action, decider.rule) {
        (Action::Deny, Some(rule)) => {
            format!("rule {rule} of DENY policy {} matches it", policy.name)
        }
        (Action::Deny, None) => format!("DENY policy {} denies it", policy.name),
        (Action::Allow, _) => format!("no rule of ALLOW policy {} matches it", policy.name),
    }
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
    /// The kernel guards the permissive pod because its authorization
    /// policies refuse some plaintext ([`KernelGuard::AuthorizationPolicy`]).
    pub required_by_authorization_policy: bool,
    pub refused_total: u64,
    /// Warnings for annotation values that were ignored.
    pub ignored_annotations: Vec<String>,
}

/// The inbound policy a workload gets with the cluster default `default`,
/// and what decided it: its annotations, except that a pod which is not
/// meshed is always permissive. The kernel trusts every connect of the
/// agent, so any path that makes the agent connect to a local pod for a
/// source that did not prove an identity must ask [`plaintext_refusal`],
/// which also applies the pod's authorization policies.
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
    /// Guarded pods whose plaintext regions did not fit in the map at the
    /// last sync: they refuse all plaintext.
    unfit: Mutex<BTreeSet<u64>>,
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
            unfit: Mutex::new(BTreeSet::new()),
        }
    }

    pub fn default_policy(&self) -> InboundPolicy {
        self.default_policy
    }

    /// The policy a workload gets and what decided it.
    pub fn policy_of(&self, workload: &Workload) -> (InboundPolicy, InboundPolicySource) {
        effective_policy(workload, self.default_policy)
    }

    /// Whether and why the kernel guards a workload.
    pub fn guard_of(&self, workload: &Workload) -> Option<KernelGuard> {
        kernel_guard(workload, self.default_policy)
    }

    fn guarded_by_authorization_policy(&self, workload: &Workload) -> bool {
        matches!(
            self.guard_of(workload),
            Some(KernelGuard::AuthorizationPolicy(_))
        )
    }

    fn is_unfit(&self, cgroup: u64) -> bool {
        self.unfit
            .lock()
            .expect("unfit pods lock poisoned")
            .contains(&cgroup)
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
                    required_by_authorization_policy: self.guarded_by_authorization_policy(w),
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
        let (reason, authz, error) = match dst.as_deref() {
            Some(w) if self.guarded_by_authorization_policy(w) => {
                let verdict = judge_plaintext(w, src_addr.ip(), refusal.flow.dst_port);
                let why = describe_plaintext_denial(
                    &verdict,
                    src_addr.ip(),
                    self.is_unfit(refusal.pod_cgroup),
                );
                (
                    RefusalReason::PolicyDenied,
                    AuthzNote::of(&verdict),
                    format!(
                        "plaintext connection refused by the kernel: {why} (the pod's authorization policies admit plaintext only from the sources and ports they allow)"
                    ),
                )
            }
            dst => {
                let why = match dst {
                    Some(w) => {
                        let (policy, source) = self.policy_of(w);
                        describe_source(policy, source, &w.namespace, &w.name)
                    }
                    None => format!(
                        "pod cgroup {} is strict but no longer in the registry",
                        refusal.pod_cgroup
                    ),
                };
                (
                    RefusalReason::StrictInbound,
                    None,
                    format!(
                        "plaintext connection refused by the kernel: the pod only accepts connections through its node's agent ({why})"
                    ),
                )
            }
        };
        ConnectionEvent {
            timestamp_ms: unix_ms(SystemTime::now()),
            dst_addr: Some(refusal.flow.dst()),
            src: src.as_deref().map(PodRef::of),
            dst: dst.as_deref().map(PodRef::of),
            server_id: dst.as_deref().map(|w| w.identity.spiffe_uri()),
            error: Some(error),
            refused_reason: Some(reason),
            authz,
            ..ConnectionEvent::new(0, Phase::Refused, Direction::Inbound, src_addr)
        }
    }
}

impl InboundRefusalCounts for InboundPolicyState {
    fn refused_by_pod(&self) -> Vec<PodRefusals> {
        let Ok(pods) = self.maps.strict_pods() else {
            return Vec::new();
        };
        pods.into_iter()
            .filter_map(|(cgroup, counters)| {
                let workload = self.registry.by_cgroup(cgroup)?;
                Some(PodRefusals {
                    pod: PodRef::of(&workload),
                    reason: if self.guarded_by_authorization_policy(&workload) {
                        RefusalReason::PolicyDenied
                    } else {
                        RefusalReason::StrictInbound
                    },
                    refused: counters.refused,
                    unreported: counters.unreported,
                })
            })
            .collect()
    }
}

/// Keeps the strict-pod maps equal to the local pods the kernel guards
/// ([`kernel_guard`]), on every registry change, until `shutdown`.
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
/// guarded. Enforcement starts after the address and the admitted plaintext
/// are in place (so the agent's own connects are trusted from the first SYN,
/// and allowed plaintext is never refused on the way) and ends before they
/// are dropped. New plaintext regions go in before stale ones go out.
pub fn sync_now(state: &InboundPolicyState) -> Result<usize, EbpfError> {
    let mut wanted: BTreeMap<u64, (Ipv4Addr, Arc<Workload>, KernelGuard)> = BTreeMap::new();
    for w in state.registry.local_workloads() {
        // A pod without an address yet cannot be reached; it becomes strict with its address.
        if let (Some(cgroup), Some(ip), Some(guard)) = (w.cgroup_id, w.ip, state.guard_of(&w)) {
            wanted.insert(cgroup, (ip, w.clone(), guard));
        }
    }
    let wanted_ips: BTreeSet<Ipv4Addr> = wanted.values().map(|(ip, ..)| *ip).collect();
    let maps = state.maps.as_ref();
    let present: BTreeSet<u64> = maps.strict_pods()?.into_iter().map(|(id, _)| id).collect();
    let present_ips: BTreeSet<Ipv4Addr> = maps.strict_addresses()?.into_iter().collect();
    let present_entries: BTreeMap<PlaintextEntry, bool> =
        maps.plaintext_entries()?.into_iter().collect();
    let regions: BTreeMap<u64, &[PlaintextRegion]> = wanted
        .iter()
        .filter_map(|(cgroup, (.., guard))| match guard {
            KernelGuard::AuthorizationPolicy(regions) => Some((*cgroup, regions.as_slice())),
            KernelGuard::StrictPolicy => None,
        })
        .collect();
    let (wanted_entries, unfit) = plaintext_entries_within(
        &regions,
        &present_entries,
        capacity::PLAINTEXT_ACCESS as usize,
    );
    note_unfit_pods(state, &wanted, unfit);

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
    // Until stale regions go, the map may hold both sets: what finds no room
    // now goes in after them.
    let mut deferred = Vec::new();
    for (entry, &allow) in &wanted_entries {
        if present_entries.get(entry) == Some(&allow) {
            continue;
        }
        match maps.set_plaintext_entry(entry, allow) {
            Ok(()) => {}
            Err(EbpfError::MapFull { .. }) => deferred.push((*entry, allow)),
            Err(error) => return Err(error),
        }
    }
    for (cgroup, (_, w, guard)) in wanted.iter().filter(|(id, _)| !present.contains(id)) {
        maps.add_strict_pod(*cgroup)?;
        match guard {
            KernelGuard::StrictPolicy => {
                let (policy, source) = state.policy_of(w);
                tracing::info!(
                    pod = %PodRef::of(w),
                    cgroup,
                    ip = ?w.ip,
                    policy = %describe_source(policy, source, &w.namespace, &w.name),
                    "strict inbound enforced: the kernel refuses plaintext to this pod"
                );
            }
            KernelGuard::AuthorizationPolicy(regions) => tracing::info!(
                pod = %PodRef::of(w),
                cgroup,
                ip = ?w.ip,
                regions = regions.len(),
                "authorization policies enforced in the kernel: plaintext to this pod is admitted only from the sources and ports they allow"
            ),
        }
    }
    for entry in present_entries
        .keys()
        .filter(|entry| !wanted_entries.contains_key(entry))
    {
        maps.remove_plaintext_entry(entry)?;
    }
    for (entry, allow) in &deferred {
        maps.set_plaintext_entry(entry, *allow)?;
    }
    Ok(wanted.len())
}

/// The plaintext regions the map is to hold, within `capacity` entries, and
/// the pods whose regions do not fit: each guarded pod gets all its regions
/// or none (then the kernel refuses all its plaintext: fail closed). Pods
/// with regions in the map already come first, so a new pod never takes the
/// place of one enforced before it.
fn plaintext_entries_within(
    regions: &BTreeMap<u64, &[PlaintextRegion]>,
    present: &BTreeMap<PlaintextEntry, bool>,
    capacity: usize,
) -> (BTreeMap<PlaintextEntry, bool>, BTreeSet<u64>) {
    let holding: BTreeSet<u64> = present.keys().map(|entry| entry.pod_cgroup).collect();
    let mut order: Vec<(&u64, &&[PlaintextRegion])> = regions.iter().collect();
    order.sort_by_key(|(cgroup, _)| (!holding.contains(cgroup), **cgroup));
    let mut entries = BTreeMap::new();
    let mut unfit = BTreeSet::new();
    for (&pod_cgroup, pod_regions) in order {
        if entries.len() + pod_regions.len() > capacity {
            unfit.insert(pod_cgroup);
            continue;
        }
        entries.extend(pod_regions.iter().map(|region| {
            (
                PlaintextEntry {
                    pod_cgroup,
                    port: region.port,
                    net: region.net,
                },
                region.allow,
            )
        }));
    }
    (entries, unfit)
}

/// Warns once when a pod's regions stop fitting, and says when they fit again.
fn note_unfit_pods(
    state: &InboundPolicyState,
    wanted: &BTreeMap<u64, (Ipv4Addr, Arc<Workload>, KernelGuard)>,
    unfit: BTreeSet<u64>,
) {
    let mut known = state.unfit.lock().expect("unfit pods lock poisoned");
    for cgroup in unfit.difference(&known) {
        if let Some((_, w, KernelGuard::AuthorizationPolicy(regions))) = wanted.get(cgroup) {
            tracing::warn!(
                pod = %PodRef::of(w),
                cgroup,
                regions = regions.len(),
                capacity = capacity::PLAINTEXT_ACCESS,
                "the plaintext regions of this pod's authorization policies do not fit in the kernel's map: all its plaintext is refused (fail closed) until they fit; simplify the policies' ipBlocks and ports"
            );
        }
    }
    for cgroup in known.difference(&unfit) {
        if let Some((_, w, _)) = wanted.get(cgroup) {
            tracing::info!(pod = %PodRef::of(w), cgroup, "the plaintext regions of this pod fit in the kernel's map again");
        }
    }
    *known = unfit;
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
        refused_reason = e.refused_reason.map(RefusalReason::as_str),
        denied_by = e.authz.as_ref().and_then(|a| a.denied.as_ref()).map(|d| d.to_string()),
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
    use std::collections::BTreeMap;

    use sealmesh_common::{
        authz::{AuthorizationPolicy, CompiledPolicy, PolicySet},
        identity::TrustDomain,
        policy::InboundPolicyAnnotations,
    };

    use super::*;

    /// A meshed pod of namespace `shop` selected by the policies given as
    /// (name, YAML spec).
    fn pod(inbound_policy: InboundPolicyAnnotations, policies: &[(&str, &str)]) -> Workload {
        let set = PolicySet::new(
            "sealmesh",
            policies.iter().map(|(name, spec)| {
                CompiledPolicy::compile(&AuthorizationPolicy {
                    name: (*name).into(),
                    namespace: "shop".into(),
                    annotations: BTreeMap::new(),
                    spec: serde_yaml_ng::from_str(spec).unwrap(),
                })
            }),
        );
        Workload {
            name: "web".into(),
            namespace: "shop".into(),
            service_account: "web".into(),
            identity: TrustDomain::default().identity("shop", "web").unwrap(),
            ip: Some(Ipv4Addr::new(10, 244, 1, 2)),
            node: "node-1".into(),
            node_ip: Ipv4Addr::new(172, 18, 0, 3),
            meshed: true,
            inbound_policy,
            cgroup_id: Some(7),
            authz: set.for_pod("shop", &BTreeMap::new()),
        }
    }

    const ALLOW_NET_ON_8080: (&str, &str) = (
        "office",
        "{ rules: [{ from: [{ source: { ipBlocks: [10.1.0.0/16] } }], to: [{ operation: { ports: [8080] } }] }] }",
    );
    const DENY_LAB: (&str, &str) = (
        "no-lab",
        "{ action: DENY, rules: [{ from: [{ source: { ipBlocks: [10.1.9.0/24] } }] }] }",
    );

    fn target(port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 2), port)
    }

    #[test]
    fn authorization_policies_that_refuse_plaintext_make_a_permissive_pod_guarded() {
        let permissive = InboundPolicyAnnotations::default();
        let open = pod(permissive.clone(), &[]);
        assert_eq!(kernel_guard(&open, InboundPolicy::Permissive), None);
        assert_eq!(
            kernel_guard(&open, InboundPolicy::Strict),
            Some(KernelGuard::StrictPolicy)
        );
        let guarded = pod(permissive, &[ALLOW_NET_ON_8080, DENY_LAB]);
        let Some(KernelGuard::AuthorizationPolicy(regions)) =
            kernel_guard(&guarded, InboundPolicy::Permissive)
        else {
            panic!("guarded by its policies");
        };
        assert!(regions.iter().any(|r| r.allow), "{regions:?}");
        // A strict policy wins: nothing is admitted whatever the policies allow.
        assert_eq!(
            kernel_guard(&guarded, InboundPolicy::Strict),
            Some(KernelGuard::StrictPolicy)
        );
        // Unmeshed pods are never guarded (their plaintext goes around the agent).
        let unmeshed = Workload {
            meshed: false,
            ..pod(InboundPolicyAnnotations::default(), &[DENY_LAB])
        };
        assert_eq!(kernel_guard(&unmeshed, InboundPolicy::Strict), None);
    }

    #[test]
    fn the_agent_refuses_the_plaintext_the_kernel_would() {
        let guarded = pod(
            InboundPolicyAnnotations::default(),
            &[ALLOW_NET_ON_8080, DENY_LAB],
        );
        let refusal = |source: &str, port| {
            plaintext_refusal(
                &guarded,
                InboundPolicy::Permissive,
                source.parse().unwrap(),
                target(port),
            )
        };
        assert!(refusal("10.1.2.3", 8080).is_none());
        let other_port = refusal("10.1.2.3", 9090).expect("port not allowed");
        assert_eq!(other_port.reason, RefusalReason::PolicyDenied);
        assert_eq!(
            other_port.to_string(),
            "shop/web (10.244.1.2:9090) refuses plaintext from 10.1.2.3: no rule of ALLOW policy shop/office matches it; an unmeshed pod's connection cannot reach it"
        );
        let lab = refusal("10.1.9.3", 8080).expect("the DENY block inside the ALLOW block");
        assert_eq!(
            lab.authz
                .as_ref()
                .and_then(|a| a.denied.as_ref())
                .map(ToString::to_string)
                .as_deref(),
            Some("shop/no-lab rule 0")
        );
        assert!(
            lab.to_string()
                .contains("rule 0 of DENY policy shop/no-lab matches it")
        );
        assert!(refusal("192.168.0.1", 8080).is_some());
        // The agent and the kernel agree on every region.
        let Some(KernelGuard::AuthorizationPolicy(regions)) =
            kernel_guard(&guarded, InboundPolicy::Permissive)
        else {
            panic!("guarded");
        };
        let access = PlaintextAccess::Regions(regions);
        for source in ["10.1.2.3", "10.1.9.3", "10.2.0.1", "192.168.0.1"] {
            for port in [80, 8080, 9090] {
                assert_eq!(
                    refusal(source, port).is_none(),
                    access.allows(source.parse().unwrap(), port),
                    "{source}:{port}"
                );
            }
        }
        // Strict: refused as before, whatever the policies allow.
        let strict = plaintext_refusal(
            &guarded,
            InboundPolicy::Strict,
            "10.1.2.3".parse().unwrap(),
            target(8080),
        )
        .expect("strict refuses all plaintext");
        assert_eq!(
            (strict.reason, strict.authz),
            (RefusalReason::StrictInbound, None)
        );
        assert_eq!(
            strict.message,
            "shop/web (10.244.1.2:8080) accepts only mutual TLS from meshed pods (strict inbound policy); an unmeshed pod's connection cannot reach it"
        );
    }

    fn regions(n: usize) -> Vec<PlaintextRegion> {
        (0..n)
            .map(|i| PlaintextRegion {
                port: (i > 0).then_some(8000 + i as u16),
                net: Ipv4Net::default(),
                allow: i % 2 == 0,
            })
            .collect()
    }

    #[test]
    fn a_pod_whose_regions_do_not_fit_gets_none_and_enforced_pods_keep_theirs() {
        let (three, two, four) = (regions(3), regions(2), regions(4));
        let wanted: BTreeMap<u64, &[PlaintextRegion]> = BTreeMap::from([
            (1, three.as_slice()),
            (2, two.as_slice()),
            (3, four.as_slice()),
        ]);
        // Pod 3 holds its regions already: it keeps them; pod 1 comes next
        // and fits; pod 2 does not (4 + 3 + 2 > 8).
        let present = BTreeMap::from([(
            PlaintextEntry {
                pod_cgroup: 3,
                port: None,
                net: Ipv4Net::default(),
            },
            true,
        )]);
        let (entries, unfit) = plaintext_entries_within(&wanted, &present, 8);
        assert_eq!(unfit, BTreeSet::from([2]));
        let pods: BTreeSet<u64> = entries.keys().map(|e| e.pod_cgroup).collect();
        assert_eq!(pods, BTreeSet::from([1, 3]));
        assert_eq!(entries.len(), 7);
        let denied = PlaintextEntry {
            pod_cgroup: 1,
            port: Some(8001),
            net: Ipv4Net::default(),
        };
        assert!(!entries[&denied], "each region keeps its decision");
        // With room for everything, every pod gets every region.
        let (entries, unfit) = plaintext_entries_within(&wanted, &BTreeMap::new(), 9);
        assert_eq!((entries.len(), unfit.len()), (9, 0));
    }

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
