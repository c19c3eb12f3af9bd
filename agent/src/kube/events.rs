//! Warning Events on local pods the mesh has to leave out because their
//! ServiceAccount name cannot be carried by a certificate (see
//! `sealmesh_common::identity`), so `kubectl describe pod` says why the pod
//! is not meshed. The agent of the pod's node reports each pod once (a log
//! line and an Event); recording is best effort: a failure is logged, never
//! fatal.

use std::{collections::HashSet, sync::Mutex};

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{MicroTime, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, PostParams},
};
use sealmesh_common::consts::kube::{AGENT_DAEMONSET, EVENT_IDENTITY_UNREPRESENTABLE};
use serde_json::json;

use super::snapshot::LeftOut;

/// `action` of the Event (what was attempted); the API server requires it,
/// with `reportingComponent` and `reportingInstance`, of an Event that
/// carries `eventTime`.
const EVENT_ACTION: &str = "Mesh";
const EVENT_WARNING: &str = "Warning";
/// Longest `message` the API server accepts.
const MAX_MESSAGE_BYTES: usize = 1024;

/// Records the Events of one node's agent.
pub(super) struct PodEvents {
    client: Client,
    node: String,
    /// UIDs of the pods reported, so each is reported once; pods no longer
    /// left out are forgotten.
    reported: Mutex<HashSet<String>>,
}

impl PodEvents {
    pub(super) fn new(client: Client, node: &str) -> Self {
        Self {
            client,
            node: node.to_owned(),
            reported: Mutex::default(),
        }
    }

    /// Reports every pod of `left_out` not reported yet. Call within a tokio
    /// runtime: the Events are recorded on it.
    pub(super) fn report(&self, left_out: &[LeftOut]) {
        let mut reported = self.reported.lock().expect("pod events lock poisoned");
        reported.retain(|uid| left_out.iter().any(|pod| &pod.uid == uid));
        for pod in left_out {
            if !reported.insert(pod.uid.clone()) {
                continue;
            }
            tracing::warn!(
                pod.namespace,
                pod.name,
                reason = pod.reason,
                "pod left out of the mesh: its ServiceAccount has no identity"
            );
            let (client, node, pod) = (self.client.clone(), self.node.clone(), pod.clone());
            tokio::spawn(async move {
                if let Err(error) = record(client, &node, &pod).await {
                    tracing::warn!(
                        %error,
                        pod.namespace,
                        pod.name,
                        "cannot record a Kubernetes Event on the pod; check that the agent's RBAC allows creating events"
                    );
                }
            });
        }
    }
}

async fn record(client: Client, node: &str, pod: &LeftOut) -> Result<DynamicObject, kube::Error> {
    let resource = ApiResource {
        group: String::new(),
        version: "v1".to_owned(),
        api_version: "v1".to_owned(),
        kind: "Event".to_owned(),
        plural: "events".to_owned(),
    };
    let now = Timestamp::now();
    let event: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {
            "name": format!("{}.{}", pod.name, hex_suffix()),
            "namespace": pod.namespace,
        },
        "involvedObject": {
            "apiVersion": "v1",
            "kind": "Pod",
            "name": pod.name,
            "namespace": pod.namespace,
            "uid": pod.uid,
        },
        "type": EVENT_WARNING,
        "reason": EVENT_IDENTITY_UNREPRESENTABLE,
        "message": truncated(&pod.reason, MAX_MESSAGE_BYTES),
        "action": EVENT_ACTION,
        "source": { "component": AGENT_DAEMONSET, "host": node },
        "reportingComponent": AGENT_DAEMONSET,
        "reportingInstance": node,
        "firstTimestamp": Time(now),
        "lastTimestamp": Time(now),
        "eventTime": MicroTime(now),
        "count": 1,
    }))
    .map_err(kube::Error::SerdeError)?;
    Api::<DynamicObject>::namespaced_with(client, &pod.namespace, &resource)
        .create(&PostParams::default(), &event)
        .await
}

/// A random suffix making Event names unique, as client-go's recorder does.
fn hex_suffix() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// The longest prefix of `text` of at most `max` bytes, on a char boundary.
fn truncated(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}
