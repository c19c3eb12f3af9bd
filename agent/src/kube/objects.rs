//! What the agent keeps of each watched object: the reflectors' `modify` step
//! cuts every object down to the fields the data path reads (a Pod keeps 9
//! of its hundreds), so the caches of a large cluster stay small. The
//! readers here are the only code that interprets those fields.

use std::{collections::BTreeMap, net::Ipv4Addr};

use k8s_openapi::{
    api::{
        core::v1::{
            Namespace, Node, NodeAddress, NodeStatus, ObjectReference, Pod, PodSpec, PodStatus,
            Service, ServicePort, ServiceSpec,
        },
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use sealmesh_common::consts::{
    MESH_LABEL, MESH_LABEL_ENABLED, MESH_OPT_OUT_ANNOTATION, MESH_OPT_OUT_VALUE,
    kube::ENDPOINTSLICE_SERVICE_LABEL,
};

const NODE_INTERNAL_IP: &str = "InternalIP";
const POD_RUNNING: &str = "Running";
const ADDRESS_TYPE_IPV4: &str = "IPv4";
const PROTOCOL_TCP: &str = "TCP";
const KIND_POD: &str = "Pod";
/// Pods that name no ServiceAccount run as this one.
const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// Identity and version of an object, plus the one label or annotation the
/// agent reads (if present).
fn slim_meta(meta: &mut ObjectMeta, label: Option<&str>, annotation: Option<&str>) {
    let keep = |map: Option<BTreeMap<String, String>>, key: Option<&str>| {
        let key = key?;
        let value = map?.remove(key)?;
        Some(BTreeMap::from([(key.to_owned(), value)]))
    };
    let full = std::mem::take(meta);
    *meta = ObjectMeta {
        name: full.name,
        namespace: full.namespace,
        uid: full.uid,
        resource_version: full.resource_version,
        labels: keep(full.labels, label),
        annotations: keep(full.annotations, annotation),
        ..ObjectMeta::default()
    };
}

pub(super) fn slim_pod(pod: &mut Pod) {
    slim_meta(&mut pod.metadata, None, Some(MESH_OPT_OUT_ANNOTATION));
    pod.spec = pod.spec.take().map(|spec| PodSpec {
        node_name: spec.node_name,
        host_network: spec.host_network,
        service_account_name: spec.service_account_name,
        ..PodSpec::default()
    });
    pod.status = pod.status.take().map(|status| PodStatus {
        phase: status.phase,
        pod_ip: status.pod_ip,
        host_ip: status.host_ip,
        ..PodStatus::default()
    });
}

pub(super) fn slim_node(node: &mut Node) {
    slim_meta(&mut node.metadata, None, None);
    node.spec = None;
    node.status = node.status.take().map(|status| NodeStatus {
        addresses: status.addresses.map(|addresses| {
            addresses
                .into_iter()
                .filter(|a| a.type_ == NODE_INTERNAL_IP)
                .collect()
        }),
        ..NodeStatus::default()
    });
}

pub(super) fn slim_namespace(namespace: &mut Namespace) {
    slim_meta(&mut namespace.metadata, Some(MESH_LABEL), None);
    namespace.spec = None;
    namespace.status = None;
}

pub(super) fn slim_service(service: &mut Service) {
    slim_meta(&mut service.metadata, None, None);
    service.spec = service.spec.take().map(|spec| ServiceSpec {
        cluster_ip: spec.cluster_ip,
        ports: spec.ports.map(|ports| {
            ports
                .into_iter()
                .map(|p| ServicePort {
                    name: p.name,
                    port: p.port,
                    protocol: p.protocol,
                    target_port: p.target_port,
                    ..ServicePort::default()
                })
                .collect()
        }),
        ..ServiceSpec::default()
    });
    service.status = None;
}

pub(super) fn slim_endpoint_slice(slice: &mut EndpointSlice) {
    slim_meta(&mut slice.metadata, Some(ENDPOINTSLICE_SERVICE_LABEL), None);
    slice.endpoints = std::mem::take(&mut slice.endpoints)
        .into_iter()
        .map(|e| Endpoint {
            addresses: e.addresses,
            conditions: e.conditions.map(|c| EndpointConditions {
                ready: c.ready,
                ..EndpointConditions::default()
            }),
            target_ref: e.target_ref.map(|r| ObjectReference {
                kind: r.kind,
                name: r.name,
                namespace: r.namespace,
                ..ObjectReference::default()
            }),
            ..Endpoint::default()
        })
        .collect();
    slice.ports = slice.ports.take().map(|ports| {
        ports
            .into_iter()
            .map(|p| EndpointPort {
                name: p.name,
                port: p.port,
                protocol: p.protocol,
                ..EndpointPort::default()
            })
            .collect()
    });
}

/// The IPv4 InternalIP a node reports, which agents listen and dial on.
pub(super) fn node_internal_ip(node: &Node) -> Option<Ipv4Addr> {
    node.status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .filter(|a: &&NodeAddress| a.type_ == NODE_INTERNAL_IP)
        .find_map(|a| a.address.parse().ok())
}

pub(super) fn namespace_is_meshed(namespace: &Namespace) -> bool {
    namespace
        .metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get(MESH_LABEL))
        .is_some_and(|value| value == MESH_LABEL_ENABLED)
}

/// The facts of a pod that has an address in the pod network: Running, with
/// an IPv4 pod IP, scheduled, and not sharing its node's network.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct PodFacts<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: &'a str,
    pub node: &'a str,
    pub service_account: &'a str,
    pub ip: Ipv4Addr,
    /// The node's address as the kubelet reported it with the pod IP; routes
    /// the pod while its Node object has no InternalIP (yet).
    pub host_ip: Option<Ipv4Addr>,
    pub opted_out: bool,
}

impl<'a> PodFacts<'a> {
    pub(super) fn of(pod: &'a Pod) -> Option<Self> {
        let spec = pod.spec.as_ref()?;
        let status = pod.status.as_ref()?;
        if status.phase.as_deref() != Some(POD_RUNNING) || spec.host_network == Some(true) {
            return None;
        }
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
            ip: status.pod_ip.as_deref()?.parse().ok()?,
            host_ip: status.host_ip.as_deref().and_then(|ip| ip.parse().ok()),
            opted_out: meta
                .annotations
                .as_ref()
                .and_then(|a| a.get(MESH_OPT_OUT_ANNOTATION))
                .is_some_and(|value| value == MESH_OPT_OUT_VALUE),
        })
    }
}

/// A Service's ClusterIP, when it has an IPv4 one (not headless, not
/// ExternalName).
pub(super) fn service_cluster_ip(service: &Service) -> Option<Ipv4Addr> {
    service.spec.as_ref()?.cluster_ip.as_deref()?.parse().ok()
}

/// The TCP ports of a Service.
pub(super) fn service_tcp_ports(service: &Service) -> impl Iterator<Item = &ServicePort> {
    service
        .spec
        .iter()
        .flat_map(|spec| spec.ports.iter().flatten())
        .filter(|p| p.protocol.as_deref().unwrap_or(PROTOCOL_TCP) == PROTOCOL_TCP)
}

/// The Service an EndpointSlice belongs to (its name label), if it is an
/// IPv4 slice.
pub(super) fn slice_service(slice: &EndpointSlice) -> Option<&str> {
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
pub(super) fn slice_port(slice: &EndpointSlice, service_port_name: Option<&str>) -> Option<u16> {
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
pub(super) fn ready_endpoints(slice: &EndpointSlice) -> impl Iterator<Item = EndpointTarget<'_>> {
    let slice_namespace = slice.metadata.namespace.as_deref().unwrap_or_default();
    slice
        .endpoints
        .iter()
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
                    .first()
                    .and_then(|a| a.parse().ok())
                    .map(EndpointTarget::Address),
            }
        })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Container;

    use super::*;

    #[test]
    fn slimmed_pod_keeps_only_what_the_data_path_reads() {
        let mut pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "web-0", "namespace": "emojivoto", "uid": "0a-1b", "resourceVersion": "7",
                "labels": {"app": "web"},
                "annotations": {"sealmesh.io/mesh": "disabled", "big": "x"},
                "managedFields": [{"manager": "kubectl"}]
            },
            "spec": {
                "nodeName": "n1", "serviceAccountName": "web",
                "containers": [{"name": "app", "image": "web:1"}]
            },
            "status": {"phase": "Running", "podIP": "10.244.1.5", "hostIP": "172.18.0.2", "qosClass": "BestEffort"}
        }))
        .unwrap();
        slim_pod(&mut pod);
        assert_eq!(
            serde_json::to_value(&pod).unwrap(),
            serde_json::json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {
                    "name": "web-0", "namespace": "emojivoto", "uid": "0a-1b", "resourceVersion": "7",
                    "annotations": {"sealmesh.io/mesh": "disabled"}
                },
                "spec": {"nodeName": "n1", "serviceAccountName": "web", "containers": []},
                "status": {"phase": "Running", "podIP": "10.244.1.5", "hostIP": "172.18.0.2"}
            })
        );
        assert_eq!(
            PodFacts::of(&pod),
            Some(PodFacts {
                namespace: "emojivoto",
                name: "web-0",
                uid: "0a-1b",
                node: "n1",
                service_account: "web",
                ip: Ipv4Addr::new(10, 244, 1, 5),
                host_ip: Some(Ipv4Addr::new(172, 18, 0, 2)),
                opted_out: true,
            })
        );
    }

    #[test]
    fn pods_outside_the_pod_network_have_no_facts() {
        let pod = |spec: PodSpec, phase: &str, ip: Option<&str>| Pod {
            metadata: ObjectMeta {
                name: Some("p".into()),
                namespace: Some("ns".into()),
                uid: Some("1".into()),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                containers: vec![Container::default()],
                ..spec
            }),
            status: Some(PodStatus {
                phase: Some(phase.into()),
                pod_ip: ip.map(Into::into),
                ..PodStatus::default()
            }),
        };
        let scheduled = || PodSpec {
            node_name: Some("n1".into()),
            ..PodSpec::default()
        };
        let running = pod(scheduled(), "Running", Some("10.0.0.1"));
        assert_eq!(PodFacts::of(&running).unwrap().service_account, "default");
        assert_eq!(
            PodFacts::of(&pod(scheduled(), "Pending", Some("10.0.0.1"))),
            None
        );
        assert_eq!(PodFacts::of(&pod(scheduled(), "Running", None)), None);
        assert_eq!(
            PodFacts::of(&pod(scheduled(), "Running", Some("fd00::1"))),
            None
        );
        assert_eq!(
            PodFacts::of(&pod(PodSpec::default(), "Running", Some("10.0.0.1"))),
            None
        );
        let host_network = PodSpec {
            host_network: Some(true),
            ..scheduled()
        };
        assert_eq!(
            PodFacts::of(&pod(host_network, "Running", Some("172.18.0.2"))),
            None
        );
    }

    #[test]
    fn slices_name_their_ready_endpoints_and_named_ports() {
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
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
        }))
        .unwrap();
        let mut slimmed = slice.clone();
        slim_endpoint_slice(&mut slimmed);
        assert_eq!(
            slimmed.metadata.labels.as_ref().unwrap().len(),
            1,
            "only the service-name label is kept"
        );
        assert_eq!(slice_service(&slimmed), Some("web"));
        assert_eq!(
            ready_endpoints(&slimmed).collect::<Vec<_>>(),
            [
                EndpointTarget::Pod {
                    namespace: "emojivoto",
                    name: "web-0"
                },
                EndpointTarget::Address(Ipv4Addr::new(10, 244, 2, 7)),
            ]
        );
        assert_eq!(slice_port(&slimmed, Some("http")), Some(8080));
        assert_eq!(slice_port(&slimmed, None), Some(9090));
        assert_eq!(slice_port(&slimmed, Some("grpc")), None);
    }
}
