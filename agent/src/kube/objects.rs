//! What the agent reads of each watched object. Every kind is parsed into a
//! view holding only the fields the data path reads (a Pod keeps 11 of its
//! hundreds); the rest of the JSON is skipped while parsing, so the caches of
//! a large cluster stay small and the agent carries no code for the full
//! API types. The readers here are the only code that interprets those
//! fields.

use std::{borrow::Cow, collections::BTreeMap, net::Ipv4Addr};

use ipnet::Ipv4Net;
use k8s_openapi::{
    api::{
        core::v1::{ConfigMap, Namespace, Node, Pod, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use sealmesh_common::{
    authz::{self, AuthorizationPolicySpec, InvalidPolicy},
    consts::{
        INBOUND_POLICY_ANNOTATION, MESH_LABEL, MESH_OPT_OUT_ANNOTATION,
        kube::ENDPOINTSLICE_SERVICE_LABEL,
    },
    mesh,
};
use serde::{Deserialize, Deserializer};

const NODE_INTERNAL_IP: &str = "InternalIP";
/// Phases of a pod whose containers are all gone for good.
const POD_FINISHED: [&str; 2] = ["Succeeded", "Failed"];
const ADDRESS_TYPE_IPV4: &str = "IPv4";
const PROTOCOL_TCP: &str = "TCP";
const KIND_POD: &str = "Pod";
/// Pods that name no ServiceAccount run as this one.
const DEFAULT_SERVICE_ACCOUNT: &str = "default";
/// The labels of a pod that has none.
static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();

/// The labels and the annotations a kind's view keeps; the others are
/// dropped while parsing.
trait KeptMetadata {
    const LABELS: KeptLabels = KeptLabels::Only(&[]);
    const ANNOTATIONS: &'static [&'static str] = &[];
}

enum KeptLabels {
    /// These keys.
    Only(&'static [&'static str]),
    /// Every label (a Pod's: policies select pods by any of them).
    All,
}

/// The metadata fields every view reads.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MetadataFields {
    name: Option<String>,
    namespace: Option<String>,
    uid: Option<String>,
    resource_version: Option<String>,
    labels: Option<BTreeMap<String, String>>,
    annotations: Option<BTreeMap<String, String>>,
}

/// Parses an object's metadata into identity and version, plus the label
/// and annotations `K` reads (the reflector's cache needs an `ObjectMeta`).
fn kept_metadata<'de, K: KeptMetadata, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<ObjectMeta, D::Error> {
    let keep = |map: Option<BTreeMap<String, String>>, keys: &[&str]| {
        let mut map = map?;
        let kept: BTreeMap<String, String> = keys
            .iter()
            .filter_map(|key| Some(((*key).to_owned(), map.remove(*key)?)))
            .collect();
        (!kept.is_empty()).then_some(kept)
    };
    let fields = MetadataFields::deserialize(deserializer)?;
    let labels = match K::LABELS {
        KeptLabels::Only(keys) => keep(fields.labels, keys),
        KeptLabels::All => fields.labels.filter(|labels| !labels.is_empty()),
    };
    Ok(ObjectMeta {
        name: fields.name,
        namespace: fields.namespace,
        uid: fields.uid,
        resource_version: fields.resource_version,
        labels,
        annotations: keep(fields.annotations, K::ANNOTATIONS),
        ..ObjectMeta::default()
    })
}

/// Makes `$view` a resource of the same API kind as `$full` (group, version,
/// plural and scope come from k8s-openapi), so kube-rs can list and watch it.
macro_rules! view_of {
    ($view:ty, $full:ty) => {
        impl k8s_openapi::Resource for $view {
            const API_VERSION: &'static str = <$full as k8s_openapi::Resource>::API_VERSION;
            const GROUP: &'static str = <$full as k8s_openapi::Resource>::GROUP;
            const KIND: &'static str = <$full as k8s_openapi::Resource>::KIND;
            const VERSION: &'static str = <$full as k8s_openapi::Resource>::VERSION;
            const URL_PATH_SEGMENT: &'static str =
                <$full as k8s_openapi::Resource>::URL_PATH_SEGMENT;
            type Scope = <$full as k8s_openapi::Resource>::Scope;
        }

        impl k8s_openapi::Metadata for $view {
            type Ty = ObjectMeta;

            fn metadata(&self) -> &ObjectMeta {
                &self.metadata
            }

            fn metadata_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

/// A Node: its InternalIP and pod networks.
#[derive(Clone, Debug, Deserialize)]
pub(super) struct NodeView {
    #[serde(deserialize_with = "kept_metadata::<NodeView, _>")]
    pub metadata: ObjectMeta,
    pub spec: Option<NodeSpecView>,
    pub status: Option<NodeStatusView>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct NodeSpecView {
    #[serde(rename = "podCIDR")]
    pub pod_cidr: Option<String>,
    #[serde(rename = "podCIDRs")]
    pub pod_cidrs: Option<Vec<String>>,
}
impl KeptMetadata for NodeView {}
view_of!(NodeView, Node);

#[derive(Clone, Debug, Deserialize)]
pub(super) struct NodeStatusView {
    pub addresses: Option<Vec<NodeAddressView>>,
}

#[derive(Clone, Debug, Deserialize)]
pub(super) struct NodeAddressView {
    #[serde(rename = "type")]
    pub type_: String,
    pub address: String,
}

/// A Namespace: whether it is meshed (its mesh label) and its pods' inbound
/// policy (its annotation).
#[derive(Clone, Debug, Deserialize)]
pub(super) struct NamespaceView {
    #[serde(deserialize_with = "kept_metadata::<NamespaceView, _>")]
    pub metadata: ObjectMeta,
}
impl KeptMetadata for NamespaceView {
    const LABELS: KeptLabels = KeptLabels::Only(&[MESH_LABEL]);
    const ANNOTATIONS: &'static [&'static str] = &[INBOUND_POLICY_ANNOTATION];
}
view_of!(NamespaceView, Namespace);

/// A Pod: where it runs, as whom, at which address, whether it opted out, its
/// inbound policy annotation, and its labels (which authorization policies
/// select it).
#[derive(Clone, Debug, Deserialize)]
pub(super) struct PodView {
    #[serde(deserialize_with = "kept_metadata::<PodView, _>")]
    pub metadata: ObjectMeta,
    pub spec: Option<PodSpecView>,
    pub status: Option<PodStatusView>,
}
impl KeptMetadata for PodView {
    const LABELS: KeptLabels = KeptLabels::All;
    const ANNOTATIONS: &'static [&'static str] =
        &[MESH_OPT_OUT_ANNOTATION, INBOUND_POLICY_ANNOTATION];
}
view_of!(PodView, Pod);

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct PodSpecView {
    pub node_name: Option<String>,
    pub host_network: Option<bool>,
    pub service_account_name: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct PodStatusView {
    pub phase: Option<String>,
    #[serde(rename = "podIP")]
    pub pod_ip: Option<String>,
    #[serde(rename = "hostIP")]
    pub host_ip: Option<String>,
}

/// A Service: its ClusterIP and ports.
#[derive(Clone, Debug, Deserialize)]
pub(super) struct ServiceView {
    #[serde(deserialize_with = "kept_metadata::<ServiceView, _>")]
    pub metadata: ObjectMeta,
    pub spec: Option<ServiceSpecView>,
}
impl KeptMetadata for ServiceView {}
view_of!(ServiceView, Service);

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ServiceSpecView {
    #[serde(rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    pub ports: Option<Vec<ServicePortView>>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ServicePortView {
    pub name: Option<String>,
    pub port: i32,
    pub protocol: Option<String>,
    pub target_port: Option<IntOrString>,
}

/// An EndpointSlice: its Service, ready endpoints and named ports.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct EndpointSliceView {
    #[serde(deserialize_with = "kept_metadata::<EndpointSliceView, _>")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub address_type: String,
    /// The API writes an empty list as `null`.
    pub endpoints: Option<Vec<EndpointView>>,
    pub ports: Option<Vec<EndpointPortView>>,
}
impl KeptMetadata for EndpointSliceView {
    const LABELS: KeptLabels = KeptLabels::Only(&[ENDPOINTSLICE_SERVICE_LABEL]);
}
view_of!(EndpointSliceView, EndpointSlice);

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct EndpointView {
    pub addresses: Option<Vec<String>>,
    pub conditions: Option<EndpointConditionsView>,
    pub target_ref: Option<ObjectReferenceView>,
}

#[derive(Clone, Debug, Deserialize)]
pub(super) struct EndpointConditionsView {
    pub ready: Option<bool>,
}

#[derive(Clone, Debug, Deserialize)]
pub(super) struct ObjectReferenceView {
    pub kind: Option<String>,
    pub name: Option<String>,
    pub namespace: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub(super) struct EndpointPortView {
    pub name: Option<String>,
    pub port: Option<i32>,
}

/// A ConfigMap: its data (the trust-roots bundle lives there).
#[derive(Clone, Debug, Deserialize)]
pub(super) struct ConfigMapView {
    #[serde(deserialize_with = "kept_metadata::<ConfigMapView, _>")]
    pub metadata: ObjectMeta,
    pub data: Option<BTreeMap<String, String>>,
}
impl KeptMetadata for ConfigMapView {}
view_of!(ConfigMapView, ConfigMap);

/// An AuthorizationPolicy: where it lives, whether it is a dry run, and its
/// spec. The spec is read leniently: one the agent cannot read (a field it
/// does not know, such as an L7 one, or a wrong type) is kept as the reason,
/// so the policy still counts and fails closed
/// ([`authz::CompiledPolicy::from_spec`]), and the list carrying it does not
/// fail as a whole.
#[derive(Clone, Debug, Deserialize)]
pub(super) struct AuthorizationPolicyView {
    #[serde(deserialize_with = "kept_metadata::<AuthorizationPolicyView, _>")]
    pub metadata: ObjectMeta,
    #[serde(default = "empty_spec", deserialize_with = "lenient_spec")]
    pub spec: Result<AuthorizationPolicySpec, InvalidPolicy>,
}
impl KeptMetadata for AuthorizationPolicyView {
    const ANNOTATIONS: &'static [&'static str] = &[authz::DRY_RUN_ANNOTATION];
}

/// No spec is an empty one (Istio's: an ALLOW policy that matches nothing).
fn empty_spec() -> Result<AuthorizationPolicySpec, InvalidPolicy> {
    Ok(AuthorizationPolicySpec::default())
}

fn lenient_spec<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Result<AuthorizationPolicySpec, InvalidPolicy>, D::Error> {
    Ok(
        match Option::<serde_json::Value>::deserialize(deserializer)? {
            None => empty_spec(),
            Some(value) => {
                AuthorizationPolicySpec::deserialize(value).map_err(|error| InvalidPolicy {
                    field: "spec".to_owned(),
                    problem: error.to_string(),
                })
            }
        },
    )
}

/// The custom resource has no k8s-openapi type to borrow its coordinates
/// from; they come from `sealmesh_common::authz`.
impl kube::Resource for AuthorizationPolicyView {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        authz::KIND.into()
    }

    fn group(_: &()) -> Cow<'_, str> {
        authz::API_GROUP.into()
    }

    fn version(_: &()) -> Cow<'_, str> {
        authz::API_VERSION.into()
    }

    fn plural(_: &()) -> Cow<'_, str> {
        authz::PLURAL.into()
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The policy compiled for judging (None without a name or namespace, which
/// the API always sets).
pub(super) fn compiled_policy(policy: &AuthorizationPolicyView) -> Option<authz::CompiledPolicy> {
    let meta = &policy.metadata;
    let name = authz::PolicyName {
        namespace: meta.namespace.clone()?,
        name: meta.name.clone()?,
    };
    let dry_run = meta.annotations.as_ref().is_some_and(authz::is_dry_run);
    Some(authz::CompiledPolicy::from_spec(
        name,
        dry_run,
        policy.spec.as_ref().map_err(Clone::clone),
    ))
}

/// The IPv4 InternalIP a node reports, which agents listen and dial on.
pub(super) fn node_internal_ip(node: &NodeView) -> Option<Ipv4Addr> {
    node.status
        .as_ref()?
        .addresses
        .iter()
        .flatten()
        .filter(|a| a.type_ == NODE_INTERNAL_IP)
        .find_map(|a| a.address.parse().ok())
}

/// The value of a namespace's inbound policy annotation, if it has one.
pub(super) fn namespace_inbound_policy(namespace: &NamespaceView) -> Option<&str> {
    annotation(&namespace.metadata, INBOUND_POLICY_ANNOTATION)
}

fn annotation<'a>(metadata: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    metadata.annotations.as_ref()?.get(key).map(String::as_str)
}

/// The IPv4 networks a node's pods get addresses from (`spec.podCIDRs`,
/// or the older single `spec.podCIDR`).
pub(super) fn node_pod_cidrs(node: &NodeView) -> impl Iterator<Item = Ipv4Net> + '_ {
    let spec = node.spec.as_ref();
    spec.and_then(|s| s.pod_cidrs.as_ref())
        .into_iter()
        .flatten()
        .chain(spec.and_then(|s| s.pod_cidr.as_ref()))
        .filter_map(|cidr| cidr.parse().ok())
}

pub(super) fn namespace_is_meshed(namespace: &NamespaceView) -> bool {
    mesh::namespace_is_meshed(
        namespace
            .metadata
            .labels
            .as_ref()
            .and_then(|labels| labels.get(MESH_LABEL))
            .map(String::as_str),
    )
}

/// Drops the labels of a pod not bound to `node`: the node's agent judges
/// connections to its own pods only, and a Deployment pod's two labels take
/// about 580 bytes of heap (a B-tree node and four strings), more than the
/// rest of its view; kept for every pod of the cluster, on every node, they
/// would cost about 6 MB per 10,000 pods. Each watch event carries the whole
/// object, so a pod bound to the node later arrives with its labels.
pub(super) fn keep_labels_if_on(pod: &mut PodView, node: &str) {
    let bound_here = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node);
    if !bound_here {
        pod.metadata.labels = None;
    }
}

/// The facts of a pod scheduled to a node that has not finished: from the
/// moment it is bound to its node (init containers run, and connect, long
/// before it is Running), whether or not it has an address yet.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct PodFacts<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: &'a str,
    pub node: &'a str,
    pub service_account: &'a str,
    /// Its IPv4 address in the pod network: None until the kubelet reports
    /// one, and for pods on their node's network (whose address is the node's).
    pub ip: Option<Ipv4Addr>,
    pub host_network: bool,
    /// The node's address as the kubelet reported it with the pod IP; routes
    /// the pod while its Node object has no InternalIP (yet).
    pub host_ip: Option<Ipv4Addr>,
    pub opted_out: bool,
    /// The value of the pod's inbound policy annotation, if it has one.
    pub inbound_policy: Option<&'a str>,
    pub labels: &'a BTreeMap<String, String>,
}

impl<'a> PodFacts<'a> {
    pub(super) fn of(pod: &'a PodView) -> Option<Self> {
        let spec = pod.spec.as_ref()?;
        let status = pod.status.as_ref();
        let phase = status.and_then(|s| s.phase.as_deref());
        if phase.is_some_and(|phase| POD_FINISHED.contains(&phase)) {
            return None;
        }
        let host_network = spec.host_network == Some(true);
        let meta = &pod.metadata;
        Some(Self {
            namespace: meta.namespace.as_deref()?,
            name: meta.name.as_deref()?,
            uid: meta.uid.as_deref()?,
            node: spec.node_name.as_deref()?,
            service_account: spec
                .service_account_name
                .as_deref()
                .filter(|sa| !sa.is_empty())
                .unwrap_or(DEFAULT_SERVICE_ACCOUNT),
            ip: status
                .and_then(|s| s.pod_ip.as_deref())
                .and_then(|ip| ip.parse().ok())
                .filter(|_| !host_network),
            host_network,
            host_ip: status
                .and_then(|s| s.host_ip.as_deref())
                .and_then(|ip| ip.parse().ok()),
            opted_out: mesh::pod_opted_out(
                meta.annotations
                    .as_ref()
                    .and_then(|a| a.get(MESH_OPT_OUT_ANNOTATION))
                    .map(String::as_str),
            ),
            inbound_policy: annotation(meta, INBOUND_POLICY_ANNOTATION),
            labels: meta.labels.as_ref().unwrap_or(&NO_LABELS),
        })
    }
}

/// A Service's ClusterIP, when it has an IPv4 one (not headless, not
/// ExternalName).
pub(super) fn service_cluster_ip(service: &ServiceView) -> Option<Ipv4Addr> {
    service.spec.as_ref()?.cluster_ip.as_deref()?.parse().ok()
}

/// The TCP ports of a Service.
pub(super) fn service_tcp_ports(service: &ServiceView) -> impl Iterator<Item = &ServicePortView> {
    service
        .spec
        .iter()
        .flat_map(|spec| spec.ports.iter().flatten())
        .filter(|p| p.protocol.as_deref().unwrap_or(PROTOCOL_TCP) == PROTOCOL_TCP)
}

/// The Service an EndpointSlice belongs to (its name label), if it is an
/// IPv4 slice.
pub(super) fn slice_service(slice: &EndpointSliceView) -> Option<&str> {
    if slice.address_type != ADDRESS_TYPE_IPV4 {
        return None;
    }
    slice
        .metadata
        .labels
        .as_ref()?
        .get(ENDPOINTSLICE_SERVICE_LABEL)
        .map(String::as_str)
}

/// The port number a slice lists under a Service port's name (the endpoint
/// controller's resolution of a named targetPort).
pub(super) fn slice_port(
    slice: &EndpointSliceView,
    service_port_name: Option<&str>,
) -> Option<u16> {
    let wanted = service_port_name.unwrap_or_default();
    slice
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref().unwrap_or_default() == wanted)
        .and_then(|p| u16::try_from(p.port?).ok())
        .filter(|port| *port != 0)
}

/// Where a ready endpoint of a slice points: the pod it references, or else
/// its address.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum EndpointTarget<'a> {
    Pod { namespace: &'a str, name: &'a str },
    Address(Ipv4Addr),
}

/// The slice's ready endpoints (an unset `ready` counts as ready, as the API
/// documents for consumers).
pub(super) fn ready_endpoints(
    slice: &EndpointSliceView,
) -> impl Iterator<Item = EndpointTarget<'_>> {
    let slice_namespace = slice.metadata.namespace.as_deref().unwrap_or_default();
    slice
        .endpoints
        .iter()
        .flatten()
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
        .filter_map(move |e| {
            let pod_ref = e
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some(KIND_POD));
            match pod_ref.and_then(|r| r.name.as_deref()) {
                Some(name) => Some(EndpointTarget::Pod {
                    namespace: pod_ref
                        .and_then(|r| r.namespace.as_deref())
                        .unwrap_or(slice_namespace),
                    name,
                }),
                None => e
                    .addresses
                    .iter()
                    .flatten()
                    .next()
                    .and_then(|a| a.parse().ok())
                    .map(EndpointTarget::Address),
            }
        })
}

#[cfg(test)]
mod tests {
    use kube::Resource;
    use sealmesh_common::consts::MESH_LABEL_ENABLED;
    use serde::de::DeserializeOwned;
    use serde_json::json;

    use super::*;

    fn parse<K: DeserializeOwned>(value: serde_json::Value) -> K {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn views_are_the_api_kinds_they_stand_for() {
        let coordinates = |kind: &str, api_version: &str, plural: &str| {
            (kind.to_owned(), api_version.to_owned(), plural.to_owned())
        };
        fn of<K: Resource<DynamicType = ()>>() -> (String, String, String) {
            (
                K::kind(&()).into_owned(),
                K::api_version(&()).into_owned(),
                K::plural(&()).into_owned(),
            )
        }
        assert_eq!(of::<NodeView>(), coordinates("Node", "v1", "nodes"));
        assert_eq!(
            of::<NamespaceView>(),
            coordinates("Namespace", "v1", "namespaces")
        );
        assert_eq!(of::<PodView>(), coordinates("Pod", "v1", "pods"));
        assert_eq!(
            of::<ServiceView>(),
            coordinates("Service", "v1", "services")
        );
        assert_eq!(
            of::<EndpointSliceView>(),
            coordinates("EndpointSlice", "discovery.k8s.io/v1", "endpointslices")
        );
        assert_eq!(
            of::<ConfigMapView>(),
            coordinates("ConfigMap", "v1", "configmaps")
        );
        assert_eq!(
            of::<AuthorizationPolicyView>(),
            coordinates(
                "AuthorizationPolicy",
                "sealmesh.io/v1alpha1",
                "authorizationpolicies"
            )
        );
        assert_eq!(
            AuthorizationPolicyView::url_path(&(), Some("shop")),
            "/apis/sealmesh.io/v1alpha1/namespaces/shop/authorizationpolicies"
        );
    }

    #[test]
    fn a_pod_is_read_with_only_what_the_data_path_reads() {
        let pod: PodView = parse(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": "web-0", "namespace": "emojivoto", "uid": "0a-1b", "resourceVersion": "7",
                "labels": {"app": "web", "pod-template-hash": "5d8f9"},
                "annotations": {"sealmesh.io/mesh": "disabled", "big": "x",
                                "sealmesh.io/inbound-policy": "strict"},
                "managedFields": [{"manager": "kubectl"}],
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web", "uid": "r"}]
            },
            "spec": {
                "nodeName": "n1", "serviceAccountName": "web",
                "containers": [{"name": "app", "image": "web:1", "ports": [{"containerPort": 80}]}],
                "volumes": [{"name": "token", "projected": {"sources": []}}]
            },
            "status": {"phase": "Running", "podIP": "10.244.1.5", "hostIP": "172.18.0.2",
                       "qosClass": "BestEffort", "podIPs": [{"ip": "10.244.1.5"}]}
        }));
        assert_eq!(
            pod.metadata,
            ObjectMeta {
                name: Some("web-0".into()),
                namespace: Some("emojivoto".into()),
                uid: Some("0a-1b".into()),
                resource_version: Some("7".into()),
                labels: Some(BTreeMap::from([
                    ("app".into(), "web".into()),
                    ("pod-template-hash".into(), "5d8f9".into()),
                ])),
                annotations: Some(BTreeMap::from([
                    ("sealmesh.io/mesh".into(), "disabled".into()),
                    ("sealmesh.io/inbound-policy".into(), "strict".into()),
                ])),
                ..ObjectMeta::default()
            },
            "every label (policies select by any), only the annotations read"
        );
        assert_eq!(
            PodFacts::of(&pod),
            Some(PodFacts {
                namespace: "emojivoto",
                name: "web-0",
                uid: "0a-1b",
                node: "n1",
                service_account: "web",
                ip: Some(Ipv4Addr::new(10, 244, 1, 5)),
                host_network: false,
                host_ip: Some(Ipv4Addr::new(172, 18, 0, 2)),
                opted_out: true,
                inbound_policy: Some("strict"),
                labels: pod.metadata.labels.as_ref().unwrap(),
            })
        );
    }

    #[test]
    fn only_the_nodes_own_pods_keep_their_labels() {
        let pod = |node: Option<&str>| -> PodView {
            parse(json!({
                "metadata": {"name": "p", "namespace": "ns", "uid": "1",
                             "labels": {"app": "web", "pod-template-hash": "5d8f9c7b6"}},
                "spec": {"nodeName": node},
            }))
        };
        let mut local = pod(Some("n1"));
        keep_labels_if_on(&mut local, "n1");
        assert_eq!(
            PodFacts::of(&local).map(|f| f.labels.len()),
            Some(2),
            "policies select this node's pods by their labels"
        );
        for node in [Some("n2"), None] {
            let mut other = pod(node);
            keep_labels_if_on(&mut other, "n1");
            assert_eq!(other.metadata.labels, None, "{node:?}");
        }
    }

    #[test]
    fn pods_count_from_their_binding_to_a_node_until_they_finish() {
        let pod = |spec: serde_json::Value, status: serde_json::Value| -> PodView {
            parse(json!({
                "metadata": {"name": "p", "namespace": "ns", "uid": "1"},
                "spec": spec,
                "status": status,
            }))
        };
        let scheduled = || json!({"nodeName": "n1", "containers": [{"name": "app"}]});
        let facts = |spec, status| {
            let pod = pod(spec, status);
            PodFacts::of(&pod).map(|f| (f.ip, f.host_network, f.service_account.to_owned()))
        };
        let ip = Some(Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(
            facts(
                scheduled(),
                json!({"phase": "Running", "podIP": "10.0.0.1"})
            ),
            Some((ip, false, "default".to_owned()))
        );
        // Bound to its node, before the kubelet reported anything: a source.
        assert_eq!(
            facts(scheduled(), json!(null)),
            Some((None, false, "default".to_owned()))
        );
        assert_eq!(
            facts(scheduled(), json!({"phase": "Pending"})),
            Some((None, false, "default".to_owned()))
        );
        assert_eq!(
            facts(
                scheduled(),
                json!({"phase": "Pending", "podIP": "10.0.0.1"})
            ),
            Some((ip, false, "default".to_owned()))
        );
        assert_eq!(
            facts(scheduled(), json!({"phase": "Running", "podIP": "fd00::1"})),
            Some((None, false, "default".to_owned()))
        );
        // Finished, or not scheduled yet: not a pod of any node.
        for phase in ["Succeeded", "Failed"] {
            assert_eq!(
                facts(scheduled(), json!({"phase": phase, "podIP": "10.0.0.1"})),
                None
            );
        }
        assert_eq!(
            facts(json!({}), json!({"phase": "Running", "podIP": "10.0.0.1"})),
            None
        );
        // On the node's network: its address is the node's, not a pod's.
        let host_network = json!({"nodeName": "n1", "hostNetwork": true});
        assert_eq!(
            facts(
                host_network,
                json!({"phase": "Running", "podIP": "172.18.0.2"})
            ),
            Some((None, true, "default".to_owned()))
        );
    }

    #[test]
    fn namespaces_and_nodes_keep_the_mesh_label_and_the_internal_ip() {
        let namespace: NamespaceView = parse(json!({"metadata": {"name": "emojivoto",
            "labels": {"sealmesh.io/mesh": "enabled", "team": "a"},
            "annotations": {"owner": "x", "sealmesh.io/inbound-policy": "strict"}},
            "spec": {"finalizers": ["kubernetes"]}}));
        assert!(namespace_is_meshed(&namespace));
        assert_eq!(
            namespace.metadata.labels,
            Some(BTreeMap::from([(
                MESH_LABEL.into(),
                MESH_LABEL_ENABLED.into()
            )]))
        );
        assert_eq!(
            namespace.metadata.annotations,
            Some(BTreeMap::from([(
                INBOUND_POLICY_ANNOTATION.into(),
                "strict".into()
            )])),
            "only the inbound policy annotation is kept"
        );
        assert_eq!(namespace_inbound_policy(&namespace), Some("strict"));
        let plain: NamespaceView = parse(json!({"metadata": {"name": "plain",
            "annotations": {"owner": "x"}}}));
        assert_eq!(plain.metadata.annotations, None);
        assert_eq!(namespace_inbound_policy(&plain), None);
        let node: NodeView = parse(json!({"metadata": {"name": "n1"},
            "status": {"addresses": [{"type": "Hostname", "address": "n1"},
                                     {"type": "InternalIP", "address": "172.18.0.2"}],
                       "capacity": {"cpu": "2"}}}));
        assert_eq!(node_internal_ip(&node), Some(Ipv4Addr::new(172, 18, 0, 2)));
        let node: NodeView = parse(json!({"metadata": {"name": "n1"},
            "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24", "fd00:10:244:1::/64"],
                     "providerID": "kind://n1"}}));
        assert_eq!(
            node_pod_cidrs(&node).collect::<Vec<_>>(),
            [
                "10.244.1.0/24".parse::<Ipv4Net>().unwrap(),
                "10.244.1.0/24".parse().unwrap()
            ],
            "IPv6 networks are skipped"
        );
    }

    #[test]
    fn slices_name_their_ready_endpoints_and_named_ports() {
        let slice: EndpointSliceView = parse(json!({
            "metadata": {"name": "web-abc", "namespace": "emojivoto",
                         "labels": {"kubernetes.io/service-name": "web", "other": "x"}},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.244.1.5"], "conditions": {"ready": true},
                 "targetRef": {"kind": "Pod", "name": "web-0", "namespace": "emojivoto", "uid": "u"}},
                {"addresses": ["10.244.1.6"], "conditions": {"ready": false},
                 "targetRef": {"kind": "Pod", "name": "web-1", "namespace": "emojivoto"}},
                {"addresses": ["10.244.2.7"]}
            ],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "", "port": 9090}]
        }));
        assert_eq!(
            slice.metadata.labels.as_ref().unwrap().len(),
            1,
            "only the service-name label is kept"
        );
        assert_eq!(slice_service(&slice), Some("web"));
        assert_eq!(
            ready_endpoints(&slice).collect::<Vec<_>>(),
            [
                EndpointTarget::Pod {
                    namespace: "emojivoto",
                    name: "web-0"
                },
                EndpointTarget::Address(Ipv4Addr::new(10, 244, 2, 7)),
            ]
        );
        assert_eq!(slice_port(&slice, Some("http")), Some(8080));
        assert_eq!(slice_port(&slice, None), Some(9090));
        assert_eq!(slice_port(&slice, Some("grpc")), None);
    }

    #[test]
    fn a_slice_without_endpoints_is_read_as_empty() {
        // The API server writes a slice whose endpoints all went away as
        // `"endpoints": null`.
        let slice: EndpointSliceView = parse(json!({
            "metadata": {"name": "web-abc", "namespace": "emojivoto",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4", "endpoints": null, "ports": null
        }));
        assert_eq!(ready_endpoints(&slice).count(), 0);
        assert_eq!(slice_port(&slice, None), None);
    }

    #[test]
    fn a_policy_keeps_its_spec_or_why_it_cannot_be_read() {
        let policy = |spec: serde_json::Value| -> AuthorizationPolicyView {
            parse(json!({
                "apiVersion": "sealmesh.io/v1alpha1", "kind": "AuthorizationPolicy",
                "metadata": {"name": "web", "namespace": "shop", "uid": "u", "resourceVersion": "9",
                             "generation": 2, "labels": {"team": "a"},
                             "annotations": {"sealmesh.io/dry-run": "true",
                                             "kubectl.kubernetes.io/last-applied-configuration": "{}"}},
                "spec": spec,
            }))
        };
        let read = policy(json!({
            "selector": {"matchLabels": {"app": "web"}},
            "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/frontend"]}}],
                       "to": [{"operation": {"ports": ["8080", 9090]}}]}],
        }));
        assert_eq!(
            read.metadata,
            ObjectMeta {
                name: Some("web".into()),
                namespace: Some("shop".into()),
                uid: Some("u".into()),
                resource_version: Some("9".into()),
                annotations: Some(BTreeMap::from([(
                    authz::DRY_RUN_ANNOTATION.into(),
                    authz::DRY_RUN_VALUE.into()
                )])),
                ..ObjectMeta::default()
            }
        );
        let spec = read.spec.as_ref().unwrap();
        assert_eq!(spec.action, authz::Action::Allow);
        assert_eq!(spec.rules[0].to[0].operation.ports, ["8080", "9090"]);
        let compiled = compiled_policy(&read).unwrap();
        assert_eq!(compiled.name.to_string(), "shop/web");
        assert!(compiled.dry_run);
        assert_eq!(compiled.invalid, None);

        // An L7 field this mesh does not enforce, and a spec of the wrong
        // type: read, kept with the reason, compiled to fail closed.
        for (spec, problem) in [
            (
                json!({"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}),
                "unknown field `methods`",
            ),
            (json!("allow-all"), "invalid type: string"),
            (json!({"action": "AUDIT"}), "unknown variant `AUDIT`"),
        ] {
            let unreadable = policy(spec);
            let error = unreadable.spec.as_ref().unwrap_err();
            assert_eq!(error.field, "spec");
            assert!(error.problem.contains(problem), "{error}");
            let compiled = compiled_policy(&unreadable).unwrap();
            assert_eq!(
                (compiled.action, compiled.match_labels.as_ref()),
                (authz::Action::Deny, None)
            );
            assert!(compiled.invalid.is_some());
        }

        // No spec at all: Istio's empty policy (ALLOW, no rules: allows nothing).
        let empty: AuthorizationPolicyView =
            parse(json!({"metadata": {"name": "deny-all", "namespace": "shop"}}));
        assert_eq!(empty.spec, Ok(AuthorizationPolicySpec::default()));
        assert_eq!(empty.metadata.annotations, None);
        let null: AuthorizationPolicyView =
            parse(json!({"metadata": {"name": "deny-all", "namespace": "shop"}, "spec": null}));
        assert_eq!(null.spec, Ok(AuthorizationPolicySpec::default()));
        assert!(!compiled_policy(&empty).unwrap().dry_run);
    }
}
