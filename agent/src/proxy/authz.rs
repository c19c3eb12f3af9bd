//! Authorization at the destination's agent. A connection to a local pod
//! is judged against the pod's `AuthorizationPolicy`s before anything
//! reaches the pod: inbound HBONE on the identity the client certificate
//! proved, same-node on the kernel-attested source pod's identity. Never on
//! anything a client could claim without proof: the source address feeds
//! `ipBlocks` only when the registry says it is a pod of that identity.
//!
//! Admitted connections stay in [`OpenAdmissions`] while they are open.
//! On every registry change (policies, pods, labels) each one is judged
//! again, and one the policies now deny is reset: a new DENY, or an ALLOW
//! policy that no longer admits it, ends what it would refuse (dry-run
//! policies never close anything).

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    sync::{Arc, Mutex},
};

use sealmesh_common::{
    authz::{Connection, Verdict},
    identity::Identity,
};
use tokio::sync::oneshot;

use super::event::{AuthzNote, ConnectionTracker, PolicyRule};
use crate::registry::{Workload, WorkloadRegistry};

/// A connection the destination pod's policies deny.
#[derive(Debug, thiserror::Error)]
#[error(
    "authorization policy {denied} of {pod} denies {source_identity}; change that policy (`sealmesh why` shows the rule) to admit it"
)]
pub struct PolicyDenied {
    pub pod: String,
    pub source_identity: String,
    pub denied: PolicyRule,
}

/// An open connection a policy change now denies; it was reset.
#[derive(Debug, thiserror::Error)]
#[error(
    "closed: authorization policy {denied} now denies this connection (the policies changed after it opened)"
)]
pub struct Revoked {
    pub denied: PolicyRule,
}

/// Who opened a connection, as far as it was proven.
#[derive(Clone, Debug)]
pub(crate) enum ProvenSource {
    /// Same node: the source pod, attested by its cgroup.
    Pod(Arc<Workload>),
    /// Another node: the identity the client certificate proved.
    Peer(Arc<Identity>),
}

impl ProvenSource {
    fn identity(&self) -> &Identity {
        match self {
            Self::Pod(pod) => &pod.identity,
            Self::Peer(identity) => identity,
        }
    }
}

/// What a connection to a local pod is judged on.
#[derive(Clone, Debug)]
pub(crate) struct Subject {
    pub source: ProvenSource,
    /// The source pod's address, when it is known to be a pod of the
    /// proven identity.
    pub source_ip: Option<Ipv4Addr>,
    /// The destination pod's address and port.
    pub pod_ip: Ipv4Addr,
    pub port: u16,
}

impl Subject {
    fn judge(&self, pod: &Workload) -> Verdict {
        pod.authz.judge(&Connection {
            identity: Some(self.source.identity()),
            source_ip: self.source_ip,
            port: self.port,
        })
    }
}

/// Judges `subject` for `pod` and notes the outcome on the tracker's event
/// (a denial, or a dry-run policy that would deny).
fn judge(
    pod: &Workload,
    subject: &Subject,
    tracker: &mut ConnectionTracker,
) -> Result<(), PolicyDenied> {
    let verdict = subject.judge(pod);
    let note = AuthzNote::of(&verdict);
    let denied = note.as_ref().and_then(|note| note.denied.clone());
    tracker.event_mut().authz = note;
    match denied {
        None => Ok(()),
        Some(denied) => Err(PolicyDenied {
            pod: format!("{}/{}", pod.namespace, pod.name),
            source_identity: subject.source.identity().to_string(),
            denied,
        }),
    }
}

struct Admission {
    subject: Subject,
    revoke: oneshot::Sender<Box<AuthzNote>>,
}

/// The open connections to local pods the policies admitted.
#[derive(Default)]
pub(crate) struct OpenAdmissions {
    open: Mutex<HashMap<u64, Admission>>,
}

impl OpenAdmissions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Admission>> {
        self.open.lock().expect("admissions lock poisoned")
    }

    /// Judges connection `id` to `pod` and, if the policies admit it,
    /// records it as open until the guard drops; the guard's
    /// [`AdmissionGuard::revoked`] resolves if a policy change denies it
    /// later. Recorded first, then judged on the registry's current view of
    /// the pod: a change at any moment is either seen by this judgement or
    /// judges this connection again.
    pub(crate) fn admit(
        &self,
        id: u64,
        subject: Subject,
        pod: &Arc<Workload>,
        registry: &dyn WorkloadRegistry,
        tracker: &mut ConnectionTracker,
    ) -> Result<AdmissionGuard<'_>, PolicyDenied> {
        let pod_ip = subject.pod_ip;
        let (revoke, revoked) = oneshot::channel();
        self.lock().insert(
            id,
            Admission {
                subject: subject.clone(),
                revoke,
            },
        );
        let guard = AdmissionGuard {
            admissions: self,
            id,
            revoked: Some(revoked),
        };
        let current = registry
            .by_ip(pod_ip)
            .filter(|now| now.namespace == pod.namespace && now.name == pod.name);
        judge(current.as_ref().unwrap_or(pod), &subject, tracker)?;
        Ok(guard)
    }

    /// Judges every open connection again against what the registry says
    /// now and revokes those now denied; returns how many.
    pub(crate) fn rejudge(&self, registry: &dyn WorkloadRegistry) -> usize {
        let mut open = self.lock();
        let denied: Vec<(u64, Box<AuthzNote>)> = open
            .iter()
            .filter_map(|(id, admission)| {
                let pod = registry.by_ip(admission.subject.pod_ip)?;
                let note = AuthzNote::of(&admission.subject.judge(&pod))?;
                note.denied.is_some().then_some((*id, note))
            })
            .collect();
        let revoked = denied.len();
        for (id, note) in denied {
            if let Some(admission) = open.remove(&id) {
                let _ = admission.revoke.send(note);
            }
        }
        revoked
    }
}

/// An admitted connection's place in [`OpenAdmissions`].
pub(crate) struct AdmissionGuard<'a> {
    admissions: &'a OpenAdmissions,
    id: u64,
    revoked: Option<oneshot::Receiver<Box<AuthzNote>>>,
}

impl AdmissionGuard<'_> {
    /// Resolves with the denial once a policy change denies the
    /// connection; never otherwise.
    pub(crate) async fn revoked(&mut self) -> Box<AuthzNote> {
        match self.revoked.take() {
            Some(receiver) => match receiver.await {
                Ok(note) => note,
                Err(_) => std::future::pending().await,
            },
            None => std::future::pending().await,
        }
    }
}

impl Drop for AdmissionGuard<'_> {
    fn drop(&mut self) {
        self.admissions.lock().remove(&self.id);
    }
}

/// Re-judges the open connections on every registry change until the
/// registry goes away.
pub(crate) async fn follow_policy_changes(
    admissions: &OpenAdmissions,
    registry: &dyn WorkloadRegistry,
) {
    let mut changes = registry.subscribe();
    while changes.changed().await.is_ok() {
        let revoked = admissions.rejudge(registry);
        if revoked > 0 {
            tracing::info!(
                revoked,
                "authorization policies changed; reset the open connections they now deny"
            );
        }
    }
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

    fn pod(policies: &[(&str, &str)]) -> Workload {
        let compiled = policies.iter().map(|(name, yaml)| {
            CompiledPolicy::compile(&AuthorizationPolicy {
                name: (*name).into(),
                namespace: "shop".into(),
                annotations: BTreeMap::new(),
                spec: serde_yaml_ng::from_str(yaml).unwrap(),
            })
        });
        let set = PolicySet::new("sealmesh", compiled);
        Workload {
            name: "web-0".into(),
            namespace: "shop".into(),
            service_account: "web".into(),
            identity: TrustDomain::default().identity("shop", "web").unwrap(),
            ip: Some(Ipv4Addr::new(10, 244, 0, 5)),
            node: "node-0".into(),
            node_ip: Ipv4Addr::new(172, 18, 0, 2),
            meshed: true,
            inbound_policy: InboundPolicyAnnotations::default(),
            cgroup_id: Some(7),
            authz: set.for_pod("shop", &BTreeMap::new()),
        }
    }

    /// A registry that knows no pod: admission judges the pod it is given.
    struct NoPods;

    impl WorkloadRegistry for NoPods {
        fn local_node(&self) -> &crate::registry::NodeInfo {
            unimplemented!("not asked by admission")
        }
        fn trust_domain(&self) -> &TrustDomain {
            unimplemented!("not asked by admission")
        }
        fn by_cgroup(&self, _: u64) -> Option<Arc<Workload>> {
            None
        }
        fn by_ip(&self, _: Ipv4Addr) -> Option<Arc<Workload>> {
            None
        }
        fn resolve(&self, _: std::net::SocketAddrV4) -> Option<crate::registry::Endpoint> {
            None
        }
        fn local_workloads(&self) -> Vec<Arc<Workload>> {
            Vec::new()
        }
        fn in_cluster_network(&self, _: Ipv4Addr) -> bool {
            false
        }
        fn served_outside_pods(&self, _: std::net::SocketAddrV4) -> bool {
            false
        }
        fn pod_parent_cgroups(&self) -> Vec<u64> {
            Vec::new()
        }
        fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
            tokio::sync::watch::channel(0).1
        }
    }

    fn subject(sa: &str) -> Subject {
        Subject {
            source: ProvenSource::Peer(Arc::new(
                TrustDomain::default().identity("shop", sa).unwrap(),
            )),
            source_ip: Some(Ipv4Addr::new(10, 244, 1, 9)),
            pod_ip: Ipv4Addr::new(10, 244, 0, 5),
            port: 8080,
        }
    }

    #[test]
    fn the_denying_policy_and_rule_are_named() {
        let web = pod(&[(
            "deny-bots",
            r#"{ action: DENY, rules: [{ from: [{ source: { principals: ["cluster.local/ns/shop/sa/bot"] } }] }] }"#,
        )]);
        let (events, _) = tokio::sync::broadcast::channel(1);
        let sink = super::super::event::EventSink {
            events,
            observers: Default::default(),
        };
        let mut tracker = ConnectionTracker::new(
            sink,
            1,
            super::super::event::Direction::Inbound,
            "10.244.1.9:4000".parse().unwrap(),
        );
        let denied = judge(&web, &subject("bot"), &mut tracker).unwrap_err();
        assert_eq!(denied.denied.to_string(), "shop/deny-bots rule 0");
        assert_eq!(
            denied.to_string(),
            "authorization policy shop/deny-bots rule 0 of shop/web-0 denies spiffe://cluster.local/ns/shop/sa/bot; change that policy (`sealmesh why` shows the rule) to admit it"
        );
        assert!(judge(&web, &subject("frontend"), &mut tracker).is_ok());
        // Denied at admission: not kept open.
        let admissions = OpenAdmissions::default();
        let registry = NoPods;
        let web = Arc::new(web);
        assert!(
            admissions
                .admit(2, subject("bot"), &web, &registry, &mut tracker)
                .is_err()
        );
        assert!(admissions.lock().is_empty());
        let guard = admissions
            .admit(3, subject("frontend"), &web, &registry, &mut tracker)
            .unwrap();
        assert_eq!(admissions.lock().len(), 1);
        drop(guard);
        assert!(admissions.lock().is_empty());
        assert_eq!(tracker.event.authz, None);
        tracker.refuse(super::super::event::RefusalReason::Aborted, "test over");
    }
}
