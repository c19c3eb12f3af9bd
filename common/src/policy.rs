//! Inbound policy: whether a meshed pod accepts plaintext from outside the
//! mesh (`permissive`) or only connections through its node's agent
//! (`strict`). Set by the `sealmesh.io/inbound-policy` annotation on a pod or
//! its namespace (the pod's wins), else by the agent's
//! `--default-inbound-policy`. The agent, the testbed and the CLI all read
//! the annotations here, so they agree on every pod.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

use crate::consts::{INBOUND_POLICY_ANNOTATION, INBOUND_POLICY_PERMISSIVE, INBOUND_POLICY_STRICT};

/// How a meshed pod treats inbound connections that do not come through its
/// node's agent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InboundPolicy {
    /// Plaintext from unmeshed pods, other nodes and hosts is accepted too.
    #[default]
    Permissive,
    /// Only the node's agent (mTLS-authenticated traffic), the node itself
    /// and the pod's own loopback may connect; the kernel drops the rest.
    Strict,
}

impl InboundPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Permissive => INBOUND_POLICY_PERMISSIVE,
            Self::Strict => INBOUND_POLICY_STRICT,
        }
    }
}

impl fmt::Display for InboundPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not an inbound policy; use {INBOUND_POLICY_STRICT} or {INBOUND_POLICY_PERMISSIVE}"
)]
pub struct InvalidInboundPolicy(pub String);

impl FromStr for InboundPolicy {
    type Err = InvalidInboundPolicy;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            INBOUND_POLICY_STRICT => Ok(Self::Strict),
            INBOUND_POLICY_PERMISSIVE => Ok(Self::Permissive),
            other => Err(InvalidInboundPolicy(other.to_owned())),
        }
    }
}

/// What decided a pod's inbound policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InboundPolicySource {
    /// The pod's `sealmesh.io/inbound-policy` annotation.
    PodAnnotation,
    /// Its namespace's annotation.
    NamespaceAnnotation,
    /// Neither: the agent's `--default-inbound-policy`.
    ClusterDefault,
}

impl InboundPolicySource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PodAnnotation => "pod_annotation",
            Self::NamespaceAnnotation => "namespace_annotation",
            Self::ClusterDefault => "cluster_default",
        }
    }
}

/// An annotation value that is not a policy; it is ignored (the namespace's
/// annotation, else the cluster default applies).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct IgnoredInboundPolicy {
    /// The pod's or the namespace's annotation.
    pub on: InboundPolicySource,
    pub value: String,
}

/// What the annotations of a pod and its namespace say about its inbound
/// policy, before the cluster default is known.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct InboundPolicyAnnotations {
    /// The policy the annotations set and which one set it; None: neither
    /// sets a valid one.
    pub set: Option<(InboundPolicy, InboundPolicySource)>,
    /// Invalid values, ignored.
    pub ignored: Vec<IgnoredInboundPolicy>,
}

impl InboundPolicyAnnotations {
    /// Reads the values of the pod's and its namespace's
    /// `sealmesh.io/inbound-policy` annotations (None: not annotated).
    pub fn read(pod: Option<&str>, namespace: Option<&str>) -> Self {
        let mut annotations = Self::default();
        for (value, on) in [
            (pod, InboundPolicySource::PodAnnotation),
            (namespace, InboundPolicySource::NamespaceAnnotation),
        ] {
            let Some(value) = value else { continue };
            match value.parse::<InboundPolicy>() {
                Ok(policy) if annotations.set.is_none() => annotations.set = Some((policy, on)),
                Ok(_) => {}
                Err(_) => annotations.ignored.push(IgnoredInboundPolicy {
                    on,
                    value: value.to_owned(),
                }),
            }
        }
        annotations
    }

    /// The pod's policy and what decided it, given the cluster default.
    pub fn resolve(&self, default: InboundPolicy) -> (InboundPolicy, InboundPolicySource) {
        self.set
            .unwrap_or((default, InboundPolicySource::ClusterDefault))
    }
}

/// Says where a pod's policy comes from, for operators: `annotation
/// sealmesh.io/inbound-policy=strict on namespace shop`, or `the agent's
/// --default-inbound-policy=strict`.
pub fn describe_source(
    policy: InboundPolicy,
    source: InboundPolicySource,
    namespace: &str,
    pod: &str,
) -> String {
    match source {
        InboundPolicySource::PodAnnotation => {
            format!("annotation {INBOUND_POLICY_ANNOTATION}={policy} on pod {namespace}/{pod}")
        }
        InboundPolicySource::NamespaceAnnotation => {
            format!("annotation {INBOUND_POLICY_ANNOTATION}={policy} on namespace {namespace}")
        }
        InboundPolicySource::ClusterDefault => {
            format!(
                "the agent's --default-inbound-policy={policy} (no annotation on the pod or its namespace)"
            )
        }
    }
}

/// The warning for an ignored value, with what to do about it.
pub fn describe_ignored(ignored: &IgnoredInboundPolicy, namespace: &str, pod: &str) -> String {
    let (object, fix) = match ignored.on {
        InboundPolicySource::NamespaceAnnotation => (
            format!("namespace {namespace}"),
            format!(
                "kubectl annotate namespace {namespace} --overwrite {INBOUND_POLICY_ANNOTATION}={INBOUND_POLICY_STRICT}"
            ),
        ),
        _ => (
            format!("pod {namespace}/{pod}"),
            format!(
                "kubectl annotate pod {pod} -n {namespace} --overwrite {INBOUND_POLICY_ANNOTATION}={INBOUND_POLICY_STRICT}"
            ),
        ),
    };
    format!(
        "annotation {INBOUND_POLICY_ANNOTATION}={:?} on {object} is neither {INBOUND_POLICY_STRICT} nor {INBOUND_POLICY_PERMISSIVE} and is ignored; fix it, e.g. `{fix}` (or {INBOUND_POLICY_PERMISSIVE})",
        ignored.value
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pods_annotation_wins_over_its_namespaces() {
        let a = InboundPolicyAnnotations::read(Some("permissive"), Some("strict"));
        assert_eq!(
            a.resolve(InboundPolicy::Strict),
            (
                InboundPolicy::Permissive,
                InboundPolicySource::PodAnnotation
            )
        );
        assert!(a.ignored.is_empty());
        let a = InboundPolicyAnnotations::read(None, Some("strict"));
        assert_eq!(
            a.resolve(InboundPolicy::Permissive),
            (
                InboundPolicy::Strict,
                InboundPolicySource::NamespaceAnnotation
            )
        );
    }

    #[test]
    fn without_annotations_the_cluster_default_applies() {
        let a = InboundPolicyAnnotations::read(None, None);
        assert_eq!(a, InboundPolicyAnnotations::default());
        assert_eq!(
            a.resolve(InboundPolicy::Strict),
            (InboundPolicy::Strict, InboundPolicySource::ClusterDefault)
        );
    }

    #[test]
    fn a_bad_value_is_ignored_and_reported_and_the_next_level_applies() {
        let a = InboundPolicyAnnotations::read(Some("Strict"), Some("strict"));
        assert_eq!(
            a.resolve(InboundPolicy::Permissive),
            (
                InboundPolicy::Strict,
                InboundPolicySource::NamespaceAnnotation
            )
        );
        assert_eq!(
            a.ignored,
            [IgnoredInboundPolicy {
                on: InboundPolicySource::PodAnnotation,
                value: "Strict".into()
            }]
        );
        let a = InboundPolicyAnnotations::read(None, Some("on"));
        assert_eq!(
            a.resolve(InboundPolicy::Permissive),
            (
                InboundPolicy::Permissive,
                InboundPolicySource::ClusterDefault
            )
        );
        assert_eq!(
            describe_ignored(&a.ignored[0], "shop", "web"),
            "annotation sealmesh.io/inbound-policy=\"on\" on namespace shop is neither strict nor permissive and is ignored; fix it, e.g. `kubectl annotate namespace shop --overwrite sealmesh.io/inbound-policy=strict` (or permissive)"
        );
    }

    #[test]
    fn policies_parse_and_print_as_the_annotation_values() {
        for policy in [InboundPolicy::Strict, InboundPolicy::Permissive] {
            assert_eq!(policy.to_string().parse::<InboundPolicy>(), Ok(policy));
        }
        assert_eq!(
            "STRICT".parse::<InboundPolicy>().unwrap_err().to_string(),
            "\"STRICT\" is not an inbound policy; use strict or permissive"
        );
        assert_eq!(
            describe_source(
                InboundPolicy::Strict,
                InboundPolicySource::NamespaceAnnotation,
                "shop",
                "web"
            ),
            "annotation sealmesh.io/inbound-policy=strict on namespace shop"
        );
    }
}
