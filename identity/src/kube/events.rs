//! Issuer rotations recorded as core/v1 Events on the identity Deployment,
//! so `kubectl get events --field-selector reason=IssuerUpdated` shows them
//! (as with Linkerd). Recording is best effort: a failure is logged, never
//! fatal, and never delays the rotation itself.

use k8s_openapi::{
    Resource as _,
    api::{
        apps::v1::Deployment,
        core::v1::{Event, EventSource, ObjectReference},
    },
    apimachinery::pkg::apis::meta::v1::{MicroTime, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use sealmesh_common::consts::kube::{
    EVENT_ISSUER_UPDATE_SKIPPED, EVENT_ISSUER_UPDATED, IDENTITY_NAME,
};

use crate::{
    config::KubeSettings,
    rotation::{IssuerEvents, LoggingIssuerEvents},
};
use sealmesh_pki::CertInfo;

const EVENT_NORMAL: &str = "Normal";
const EVENT_WARNING: &str = "Warning";
/// `action` of both events (what was attempted). The API server requires
/// it, with `reportingComponent` and `reportingInstance`, of an Event that
/// carries `eventTime`.
const EVENT_ACTION: &str = "UpdateIssuer";
/// Longest `message` the API server accepts.
const MAX_MESSAGE_BYTES: usize = 1024;

/// [`IssuerEvents`] as Kubernetes Events (and log lines, as in local mode).
#[derive(Clone)]
pub struct KubeIssuerEvents {
    events: Api<Event>,
    deployments: Api<Deployment>,
    namespace: String,
    deployment: String,
    /// This replica (its pod's hostname), as `reportingInstance`.
    instance: String,
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for KubeIssuerEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeIssuerEvents")
            .field("namespace", &self.namespace)
            .field("deployment", &self.deployment)
            .finish_non_exhaustive()
    }
}

impl KubeIssuerEvents {
    /// Must be called within a tokio runtime: events are recorded on it.
    pub fn new(client: Client, settings: &KubeSettings) -> Self {
        let namespace = settings.namespace().to_owned();
        let instance = nix::unistd::gethostname()
            .ok()
            .and_then(|name| name.into_string().ok())
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| settings.deployment.clone());
        Self {
            events: Api::namespaced(client.clone(), &namespace),
            deployments: Api::namespaced(client, &namespace),
            deployment: settings.deployment.clone(),
            namespace,
            instance,
            runtime: tokio::runtime::Handle::current(),
        }
    }

    /// Records one Event on the Deployment; returns the created Event.
    pub async fn record(
        &self,
        event_type: &str,
        reason: &str,
        message: &str,
    ) -> Result<Event, kube::Error> {
        // The uid ties the Event to this incarnation of the Deployment; if
        // it is missing (renamed, or run outside one) name and namespace
        // still find it.
        let uid = match self.deployments.get_opt(&self.deployment).await {
            Ok(found) => found.and_then(|d| d.metadata.uid),
            Err(e) => {
                tracing::debug!(error = %e, deployment = self.deployment, "cannot look up the identity Deployment; recording the event without its uid");
                None
            }
        };
        let now = Timestamp::now();
        let event = Event {
            metadata: ObjectMeta {
                name: Some(format!(
                    "{}.{}",
                    self.deployment,
                    hex::encode(rand::random::<[u8; 8]>())
                )),
                namespace: Some(self.namespace.clone()),
                ..Default::default()
            },
            involved_object: ObjectReference {
                api_version: Some(Deployment::API_VERSION.to_owned()),
                kind: Some(Deployment::KIND.to_owned()),
                name: Some(self.deployment.clone()),
                namespace: Some(self.namespace.clone()),
                uid,
                ..Default::default()
            },
            type_: Some(event_type.to_owned()),
            reason: Some(reason.to_owned()),
            message: Some(truncated(message, MAX_MESSAGE_BYTES).to_owned()),
            action: Some(EVENT_ACTION.to_owned()),
            source: Some(EventSource {
                component: Some(IDENTITY_NAME.to_owned()),
                host: None,
            }),
            reporting_component: Some(IDENTITY_NAME.to_owned()),
            reporting_instance: Some(self.instance.clone()),
            first_timestamp: Some(Time(now)),
            last_timestamp: Some(Time(now)),
            event_time: Some(MicroTime(now)),
            count: Some(1),
            ..Default::default()
        };
        self.events.create(&PostParams::default(), &event).await
    }

    fn spawn_record(&self, event_type: &'static str, reason: &'static str, message: String) {
        let recorder = self.clone();
        self.runtime.spawn(async move {
            if let Err(e) = recorder.record(event_type, reason, &message).await {
                tracing::warn!(
                    error = %e,
                    reason,
                    deployment = recorder.deployment,
                    namespace = recorder.namespace,
                    "cannot record a Kubernetes Event (the rotation itself is unaffected); check the identity service's RBAC allows creating events"
                );
            }
        });
    }
}

/// The longest prefix of `text` of at most `max` bytes, on a char boundary.
fn truncated(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

impl IssuerEvents for KubeIssuerEvents {
    fn issuer_updated(&self, issuer: &CertInfo) {
        LoggingIssuerEvents.issuer_updated(issuer);
        self.spawn_record(
            EVENT_NORMAL,
            EVENT_ISSUER_UPDATED,
            format!(
                "Updated identity issuer: {} (serial {}, valid until {})",
                issuer.subject, issuer.serial, issuer.not_after
            ),
        );
    }

    fn issuer_update_skipped(&self, reason: &str) {
        LoggingIssuerEvents.issuer_update_skipped(reason);
        self.spawn_record(
            EVENT_WARNING,
            EVENT_ISSUER_UPDATE_SKIPPED,
            reason.to_owned(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_cut_to_the_api_limit_on_a_char_boundary() {
        assert_eq!(truncated("short", MAX_MESSAGE_BYTES), "short");
        let long = "é".repeat(600); // 1200 bytes
        let cut = truncated(&long, MAX_MESSAGE_BYTES);
        assert_eq!(cut.len(), 1024);
        assert_eq!(truncated("aé", 2), "a");
    }
}
