//! Builds the registry's [`Snapshot`] from the reflectors' object views.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddrV4,
    sync::Arc,
};

use ipnet::Ipv4Net;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use sealmesh_common::{
    authz::{PodPolicies, PolicySet},
    identity::TrustDomain,
    policy::InboundPolicyAnnotations,
};

use super::objects::{
    AuthorizationPolicyView, EndpointSliceView, EndpointTarget, NamespaceView, NodeView, PodFacts,
    PodView, ServiceView, compiled_policy, namespace_inbound_policy, namespace_is_meshed,
    node_internal_ip, node_pod_cidrs, ready_endpoints, service_cluster_ip, service_tcp_ports,
    slice_port, slice_service,
};
use crate::{
    config::ServiceName,
    registry::{Endpoint, NodeInfo, Snapshot, Workload},
};

/// A local pod the mesh would carry, left out because its ServiceAccount
/// has no identity (a name no certificate can carry).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct LeftOut {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// Why, and what to do.
    pub reason: String,
}

/// The cached objects of every watched kind.
pub(super) struct ClusterObjects {
    pub pods: Vec<Arc<PodView>>,
    pub nodes: Vec<Arc<NodeView>>,
    pub namespaces: Vec<Arc<NamespaceView>>,
    pub services: Vec<Arc<ServiceView>>,
    pub endpoint_slices: Vec<Arc<EndpointSliceView>>,
    pub authorization_policies: Vec<Arc<AuthorizationPolicyView>>,
}

/// The snapshot the objects describe, seen from `local` (whose address stays
/// the one the agent started with). `cgroup_of` finds a local pod's cgroup
/// id from its UID; `networks` are the configured pod and Service networks,
/// to which every Node's pod networks are added; the policies of
/// `root_namespace` (the control namespace) apply to every namespace; local
/// pods that would be meshed but have no identity are added to `left_out`.
pub(super) fn build(
    objects: &ClusterObjects,
    local: &NodeInfo,
    trust_domain: &TrustDomain,
    networks: &[Ipv4Net],
    root_namespace: &str,
    mut cgroup_of: impl FnMut(&str) -> Option<u64>,
    left_out: &mut Vec<LeftOut>,
) -> Snapshot {
    let policies = PolicySet::new(
        root_namespace,
        objects
            .authorization_policies
            .iter()
            .filter_map(|p| compiled_policy(p)),
    );
    let mut node_ips: HashMap<&str, _> = objects
        .nodes
        .iter()
        .filter_map(|n| Some((n.metadata.name.as_deref()?, node_internal_ip(n)?)))
        .collect();
    node_ips.insert(&local.name, local.ip);
    let meshed_namespaces: HashSet<&str> = objects
        .namespaces
        .iter()
        .filter(|ns| namespace_is_meshed(ns))
        .filter_map(|ns| ns.metadata.name.as_deref())
        .collect();
    let namespace_policies: HashMap<&str, &str> = objects
        .namespaces
        .iter()
        .filter_map(|ns| Some((ns.metadata.name.as_deref()?, namespace_inbound_policy(ns)?)))
        .collect();

    let mut missing_cgroups = false;
    let mut workloads: Vec<Arc<Workload>> = Vec::new();
    for pod in objects.pods.iter().filter_map(|p| PodFacts::of(p)) {
        let is_local = pod.node == local.name;
        // A remote pod matters only as a destination, which needs an address.
        if !is_local && pod.ip.is_none() {
            continue;
        }
        let Some(node_ip) = node_ips.get(pod.node).copied().or(pod.host_ip) else {
            tracing::debug!(
                pod.namespace,
                pod.name,
                pod.node,
                "neither the pod's node nor the pod names the node's address (yet); the pod is not routable through the mesh"
            );
            continue;
        };
        let meshed =
            meshed_namespaces.contains(pod.namespace) && !pod.opted_out && !pod.host_network;
        let identity = match trust_domain.identity(pod.namespace, pod.service_account) {
            Ok(identity) => identity,
            Err(error) if meshed && pod.node == local.name => {
                left_out.push(LeftOut {
                    namespace: pod.namespace.to_owned(),
                    name: pod.name.to_owned(),
                    uid: pod.uid.to_owned(),
                    reason: error.to_string(),
                });
                continue;
            }
            Err(error) => {
                // Reported by the agent of the pod's node, if it is meshed.
                tracing::debug!(pod.namespace, pod.name, %error, "pod has no identity; it is left out of the registry");
                continue;
            }
        };
        // The agent judges connections to its own meshed pods only.
        let authz = if meshed && is_local {
            policies.for_pod(pod.namespace, pod.labels)
        } else {
            PodPolicies::default()
        };
        let cgroup_id = if is_local {
            let id = cgroup_of(pod.uid);
            if id.is_none() {
                tracing::debug!(
                    pod.namespace,
                    pod.name,
                    pod.uid,
                    "local pod's cgroup is not there (yet)"
                );
                missing_cgroups = true;
            }
            id
        } else {
            None
        };
        workloads.push(Arc::new(Workload {
            name: pod.name.to_owned(),
            namespace: pod.namespace.to_owned(),
            service_account: pod.service_account.to_owned(),
            identity,
            ip: pod.ip,
            node: pod.node.to_owned(),
            node_ip,
            meshed,
            inbound_policy: InboundPolicyAnnotations::read(
                pod.inbound_policy,
                namespace_policies.get(pod.namespace).copied(),
            ),
            cgroup_id,
            authz,
        }));
    }
    // Deterministic order: local workloads and endpoint lists compare equal
    // across rebuilds of the same state, so no-op rebuilds notify no one.
    workloads.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let by_name: HashMap<(&str, &str), Arc<Workload>> = workloads
        .iter()
        .map(|w| ((w.namespace.as_str(), w.name.as_str()), w.clone()))
        .collect();

    let mut slices_of: HashMap<(&str, &str), Vec<&EndpointSliceView>> = HashMap::new();
    for slice in &objects.endpoint_slices {
        if let (Some(namespace), Some(service)) =
            (slice.metadata.namespace.as_deref(), slice_service(slice))
        {
            slices_of
                .entry((namespace, service))
                .or_default()
                .push(slice);
        }
    }

    let mut snapshot = Snapshot::with_workloads(workloads.iter().cloned(), &local.name);
    snapshot.missing_cgroups = missing_cgroups;
    snapshot.policies = Arc::new(policies);
    let mut cluster_networks = networks.to_vec();
    cluster_networks.extend(objects.nodes.iter().flat_map(|n| node_pod_cidrs(n)));
    cluster_networks.sort_unstable();
    cluster_networks.dedup();
    snapshot.cluster_networks = cluster_networks;
    for service in &objects.services {
        let (Some(namespace), Some(name), Some(vip)) = (
            service.metadata.namespace.as_deref(),
            service.metadata.name.as_deref(),
            service_cluster_ip(service),
        ) else {
            continue;
        };
        snapshot.service_names.insert(
            vip,
            ServiceName {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            },
        );
        let slices = slices_of
            .get(&(namespace, name))
            .map(Vec::as_slice)
            .unwrap_or_default();
        for port in service_tcp_ports(service) {
            let Ok(service_port) = u16::try_from(port.port) else {
                continue;
            };
            let mut endpoints: Vec<Endpoint> = Vec::new();
            let mut outside_pods = false;
            for slice in slices {
                let target_port = match &port.target_port {
                    None => Some(service_port),
                    Some(IntOrString::Int(number)) => u16::try_from(*number).ok(),
                    Some(IntOrString::String(_)) => slice_port(slice, port.name.as_deref()),
                };
                let Some(target_port) = target_port.filter(|p| *p != 0) else {
                    continue;
                };
                for target in ready_endpoints(slice) {
                    let workload = match target {
                        EndpointTarget::Pod { namespace, name } => {
                            by_name.get(&(namespace, name)).cloned()
                        }
                        EndpointTarget::Address(ip) => {
                            let pod = snapshot.workload_by_ip(ip).cloned();
                            // An address outside the cluster's networks is
                            // no pod: the API server, an external database.
                            let outside = pod.is_none() && !snapshot.in_cluster_network(ip);
                            outside_pods |= outside;
                            if outside {
                                // Such an endpoint is that Service's too, as
                                // clients that read the endpoints dial it.
                                snapshot
                                    .service_names
                                    .entry(ip)
                                    .or_insert_with(|| ServiceName {
                                        namespace: namespace.to_owned(),
                                        name: name.to_owned(),
                                    });
                            }
                            pod
                        }
                    };
                    // A pod without an address yet cannot serve.
                    if let Some((workload, ip)) = workload.and_then(|w| Some((w.clone(), w.ip?))) {
                        endpoints.push(Endpoint {
                            workload,
                            addr: SocketAddrV4::new(ip, target_port),
                        });
                    }
                }
            }
            endpoints.sort_by(|a, b| {
                (&a.workload.namespace, &a.workload.name, a.addr.port()).cmp(&(
                    &b.workload.namespace,
                    &b.workload.name,
                    b.addr.port(),
                ))
            });
            endpoints.dedup();
            if endpoints.is_empty() && outside_pods {
                snapshot
                    .served_outside_pods
                    .insert(SocketAddrV4::new(vip, service_port));
            }
            snapshot.set_service_port(vip, service_port, endpoints);
        }
    }
    snapshot
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddrV4};

    use sealmesh_common::authz::Connection;
    use serde::de::DeserializeOwned;
    use serde_json::json;

    use super::*;
    use crate::registry::Published;

    /// The control namespace, whose policies apply everywhere.
    const ROOT: &str = "sealmesh";

    fn object<K: DeserializeOwned>(value: serde_json::Value) -> Arc<K> {
        Arc::new(serde_json::from_value(value).unwrap())
    }

    fn node(name: &str, ip: &str) -> Arc<NodeView> {
        object(json!({ "metadata": { "name": name },
            "status": { "addresses": [{ "type": "InternalIP", "address": ip }] } }))
    }

    fn pod(namespace: &str, name: &str, sa: &str, node: &str, ip: &str) -> Arc<PodView> {
        pod_with_status(
            namespace,
            name,
            sa,
            node,
            json!({ "phase": "Running", "podIP": ip }),
        )
    }

    fn pod_with_status(
        namespace: &str,
        name: &str,
        sa: &str,
        node: &str,
        status: serde_json::Value,
    ) -> Arc<PodView> {
        object(json!({
            "metadata": { "name": name, "namespace": namespace, "uid": format!("uid-{name}") },
            "spec": { "nodeName": node, "serviceAccountName": sa, "containers": [] },
            "status": status,
        }))
    }

    fn local() -> NodeInfo {
        NodeInfo {
            name: "n1".into(),
            ip: Ipv4Addr::new(172, 18, 0, 2),
        }
    }

    fn resolve_all(snapshot: &Snapshot, vip: [u8; 4], port: u16, n: usize) -> Vec<(String, u16)> {
        (0..n)
            .filter_map(|_| snapshot.resolve(SocketAddrV4::new(Ipv4Addr::from(vip), port)))
            .map(|e| (e.workload.name.clone(), e.addr.port()))
            .collect()
    }

    #[test]
    fn leaves_out_what_cannot_be_routed_and_records_missing_cgroups() {
        let objects = ClusterObjects {
            pods: vec![
                pod("app", "local-0", "web", "n1", "10.244.1.2"),
                pod("app", "local-1", "web", "n1", "10.244.1.3"),
                pod("app", "on-unknown-node", "web", "n9", "10.244.9.2"),
                pod_with_status(
                    "app",
                    "host-ip-only",
                    "web",
                    "n8",
                    json!({ "phase": "Running", "podIP": "10.244.8.2", "hostIP": "172.18.0.8" }),
                ),
                pod("app", "bad-sa", "Not_A_Name", "n1", "10.244.1.4"),
            ],
            nodes: vec![node("n1", "172.18.0.99")],
            namespaces: Vec::new(),
            services: Vec::new(),
            endpoint_slices: Vec::new(),
            authorization_policies: Vec::new(),
        };
        let mut looked_up = Vec::new();
        let mut left_out = Vec::new();
        let snapshot = build(
            &objects,
            &local(),
            &TrustDomain::default(),
            &[],
            ROOT,
            |uid| {
                looked_up.push(uid.to_owned());
                (uid == "uid-local-0").then_some(42)
            },
            &mut left_out,
        );
        assert_eq!(looked_up, ["uid-local-0", "uid-local-1"]);
        assert_eq!(left_out, [], "bad-sa is not meshed: nothing to report");
        assert!(snapshot.missing_cgroups);
        let local_0 = snapshot
            .workload_by_ip(Ipv4Addr::new(10, 244, 1, 2))
            .unwrap();
        assert_eq!(
            (local_0.cgroup_id, local_0.meshed, local_0.node_ip),
            (Some(42), false, local().ip),
            "unlabelled namespace; the node keeps the address the agent started with"
        );
        assert_eq!(snapshot.workload_by_ip(Ipv4Addr::new(10, 244, 9, 2)), None);
        assert_eq!(
            snapshot
                .workload_by_ip(Ipv4Addr::new(10, 244, 8, 2))
                .map(|w| w.node_ip),
            Some(Ipv4Addr::new(172, 18, 0, 8)),
            "a Node without an InternalIP is reached at the hostIP its pods report"
        );
        assert_eq!(snapshot.workload_by_ip(Ipv4Addr::new(10, 244, 1, 4)), None);
    }

    #[test]
    fn service_accounts_with_dots_are_meshed_and_unnameable_local_ones_reported() {
        let too_long = "a".repeat(64);
        let objects = ClusterObjects {
            pods: vec![
                pod("app", "dotted", "a.b", "n1", "10.244.1.2"),
                pod("app", "unnameable", &too_long, "n1", "10.244.1.3"),
                pod("app", "unnameable-remote", &too_long, "n2", "10.244.2.3"),
            ],
            nodes: vec![node("n1", "172.18.0.2"), node("n2", "172.18.0.3")],
            namespaces: vec![object(json!({ "metadata": { "name": "app",
                "labels": { "sealmesh.io/mesh": "enabled" } } }))],
            services: Vec::new(),
            endpoint_slices: Vec::new(),
            authorization_policies: Vec::new(),
        };
        let mut left_out = Vec::new();
        let snapshot = build(
            &objects,
            &local(),
            &TrustDomain::default(),
            &[],
            ROOT,
            |_| Some(7),
            &mut left_out,
        );
        let dotted = snapshot
            .workload_by_ip(Ipv4Addr::new(10, 244, 1, 2))
            .unwrap();
        assert!(dotted.meshed);
        assert_eq!(
            dotted.identity.dns_name(),
            "a.b.app.serviceaccount.identity.sealmesh.cluster.local"
        );
        assert_eq!(snapshot.workload_by_ip(Ipv4Addr::new(10, 244, 1, 3)), None);
        assert_eq!(left_out.len(), 1, "only the local pod: {left_out:?}");
        assert_eq!(
            (left_out[0].name.as_str(), left_out[0].uid.as_str()),
            ("unnameable", "uid-unnameable")
        );
        assert!(
            left_out[0]
                .reason
                .contains("cannot be named in a certificate"),
            "{}",
            left_out[0].reason
        );
    }

    #[test]
    fn inbound_policy_comes_from_the_pod_then_its_namespace() {
        let annotated_pod = |name: &str, ip: &str, policy: Option<&str>| -> Arc<PodView> {
            let annotations = match policy {
                Some(value) => json!({ "sealmesh.io/inbound-policy": value }),
                None => json!({}),
            };
            object(json!({
                "metadata": { "name": name, "namespace": "app", "uid": format!("uid-{name}"),
                              "annotations": annotations },
                "spec": { "nodeName": "n1", "serviceAccountName": "web" },
                "status": { "phase": "Running", "podIP": ip },
            }))
        };
        let objects = ClusterObjects {
            pods: vec![
                annotated_pod("plain", "10.244.1.2", None),
                annotated_pod("relaxed", "10.244.1.3", Some("permissive")),
                annotated_pod("typo", "10.244.1.4", Some("strikt")),
                pod("other", "web", "web", "n1", "10.244.1.5"),
            ],
            nodes: vec![node("n1", "172.18.0.2")],
            namespaces: vec![
                object(json!({ "metadata": { "name": "app",
                    "labels": { "sealmesh.io/mesh": "enabled" },
                    "annotations": { "sealmesh.io/inbound-policy": "strict" } } })),
                object(json!({ "metadata": { "name": "other" } })),
            ],
            services: Vec::new(),
            endpoint_slices: Vec::new(),
            authorization_policies: Vec::new(),
        };
        let snapshot = build(
            &objects,
            &local(),
            &TrustDomain::default(),
            &[],
            ROOT,
            |_| None,
            &mut Vec::new(),
        );
        let policy = |ip: [u8; 4]| {
            snapshot
                .workload_by_ip(Ipv4Addr::from(ip))
                .unwrap()
                .inbound_policy
                .clone()
        };
        use sealmesh_common::policy::{InboundPolicy, InboundPolicySource};
        assert_eq!(
            policy([10, 244, 1, 2]).resolve(InboundPolicy::Permissive),
            (
                InboundPolicy::Strict,
                InboundPolicySource::NamespaceAnnotation
            )
        );
        assert_eq!(
            policy([10, 244, 1, 3]).resolve(InboundPolicy::Strict),
            (
                InboundPolicy::Permissive,
                InboundPolicySource::PodAnnotation
            )
        );
        let typo = policy([10, 244, 1, 4]);
        assert_eq!(
            typo.resolve(InboundPolicy::Permissive),
            (
                InboundPolicy::Strict,
                InboundPolicySource::NamespaceAnnotation
            ),
            "a bad pod value is ignored; the namespace's applies"
        );
        assert_eq!(typo.ignored[0].value, "strikt");
        assert_eq!(policy([10, 244, 1, 5]), InboundPolicyAnnotations::default());
    }

    #[test]
    fn services_route_by_slice_address_and_skip_what_does_not_match() {
        let slice = |name: &str, endpoints: serde_json::Value, ports: serde_json::Value| {
            object::<EndpointSliceView>(json!({
                "metadata": { "name": name, "namespace": "app",
                              "labels": { "kubernetes.io/service-name": "web" } },
                "addressType": "IPv4", "endpoints": endpoints, "ports": ports,
            }))
        };
        let objects = ClusterObjects {
            pods: vec![
                pod("app", "web-0", "web", "n1", "10.244.1.2"),
                pod("app", "web-1", "web", "n1", "10.244.1.3"),
            ],
            nodes: vec![node("n1", "172.18.0.2")],
            namespaces: Vec::new(),
            services: vec![
                object(json!({ "metadata": { "name": "web", "namespace": "app" },
                    "spec": { "clusterIP": "10.96.0.10", "ports": [
                        { "name": "http", "port": 80, "targetPort": "http" },
                    ] } })),
                object(
                    json!({ "metadata": { "name": "headless", "namespace": "app" },
                    "spec": { "clusterIP": "None", "ports": [{ "port": 80 }] } }),
                ),
            ],
            endpoint_slices: vec![
                // By address (no targetRef), listed in two slices: one endpoint.
                slice(
                    "web-a",
                    json!([{ "addresses": ["10.244.1.2"] }]),
                    json!([{ "name": "http", "port": 8080 }]),
                ),
                slice(
                    "web-b",
                    json!([{ "addresses": ["10.244.1.2"] }]),
                    json!([{ "name": "http", "port": 8080 }]),
                ),
                // No port named "http": its endpoints cannot serve port 80.
                slice(
                    "web-c",
                    json!([{ "addresses": ["10.244.1.3"] }]),
                    json!([{ "name": "metrics", "port": 9090 }]),
                ),
                // Not a pod of the cluster.
                slice(
                    "web-d",
                    json!([{ "addresses": ["192.168.5.5"] }]),
                    json!([{ "name": "http", "port": 8080 }]),
                ),
            ],
            authorization_policies: Vec::new(),
        };
        let snapshot = build(
            &objects,
            &local(),
            &TrustDomain::default(),
            &[],
            ROOT,
            |_| None,
            &mut Vec::new(),
        );
        assert_eq!(
            resolve_all(&snapshot, [10, 96, 0, 10], 80, 3),
            vec![("web-0".to_owned(), 8080); 3]
        );
        assert_eq!(resolve_all(&snapshot, [10, 96, 0, 10], 8080, 1), []);
    }

    #[test]
    fn local_pods_count_from_scheduling_remote_ones_once_they_have_an_address() {
        let meshed_ns: Arc<NamespaceView> = object(json!({ "metadata": { "name": "app",
            "labels": { "sealmesh.io/mesh": "enabled" } } }));
        let mut host_network_pod = (*pod("app", "agent", "agent", "n1", "172.18.0.2")).clone();
        host_network_pod.spec.as_mut().unwrap().host_network = Some(true);
        let objects = ClusterObjects {
            pods: vec![
                pod_with_status("app", "starting", "web", "n1", json!(null)),
                pod_with_status(
                    "app",
                    "remote-starting",
                    "web",
                    "n2",
                    json!({ "phase": "Pending" }),
                ),
                Arc::new(host_network_pod),
                pod("app", "running", "web", "n1", "10.244.1.2"),
            ],
            nodes: vec![node("n1", "172.18.0.2"), node("n2", "172.18.0.3")],
            namespaces: vec![meshed_ns],
            services: Vec::new(),
            endpoint_slices: Vec::new(),
            authorization_policies: Vec::new(),
        };
        let snapshot = build(
            &objects,
            &local(),
            &TrustDomain::default(),
            &[],
            ROOT,
            |uid| {
                Some(match uid {
                    "uid-starting" => 7,
                    "uid-agent" => 8,
                    _ => 9,
                })
            },
            &mut Vec::new(),
        );
        let local: Vec<(&str, Option<Ipv4Addr>, bool, Option<u64>)> = snapshot
            .local()
            .iter()
            .map(|w| (w.name.as_str(), w.ip, w.meshed, w.cgroup_id))
            .collect();
        assert_eq!(
            local,
            [
                ("agent", None, false, Some(8)),
                ("running", Some(Ipv4Addr::new(10, 244, 1, 2)), true, Some(9)),
                ("starting", None, true, Some(7)),
            ],
            "a pod without an address is a source by its cgroup; a host-network pod is never meshed"
        );
        assert_eq!(
            snapshot.workload_by_ip(Ipv4Addr::new(172, 18, 0, 2)),
            None,
            "the node's address is not the host-network pod's"
        );
    }

    #[test]
    fn knows_the_cluster_networks_and_services_served_outside_pods() {
        let node_with_cidr: Arc<NodeView> = object(json!({ "metadata": { "name": "n1" },
            "spec": { "podCIDR": "10.244.1.0/24" },
            "status": { "addresses": [{ "type": "InternalIP", "address": "172.18.0.2" }] } }));
        let service = |name: &str, vip: &str| -> Arc<ServiceView> {
            object(
                json!({ "metadata": { "name": name, "namespace": "default" },
                "spec": { "clusterIP": vip, "ports": [{ "name": "https", "port": 443, "targetPort": 6443 }] } }),
            )
        };
        let slice = |service: &str, address: &str| -> Arc<EndpointSliceView> {
            object(json!({
                "metadata": { "name": service, "namespace": "default",
                              "labels": { "kubernetes.io/service-name": service } },
                "addressType": "IPv4", "endpoints": [{ "addresses": [address] }],
                "ports": [{ "name": "https", "port": 6443 }],
            }))
        };
        let objects = ClusterObjects {
            pods: Vec::new(),
            nodes: vec![node_with_cidr],
            namespaces: Vec::new(),
            services: vec![
                service("kubernetes", "10.96.0.1"),
                service("not-yet", "10.96.0.2"),
            ],
            endpoint_slices: vec![
                // The API server: an address outside the pod networks.
                slice("kubernetes", "172.18.0.9"),
                // A pod address the registry has no pod for (yet).
                slice("not-yet", "10.244.1.77"),
            ],
            authorization_policies: Vec::new(),
        };
        let configured: Vec<Ipv4Net> = vec!["10.96.0.0/12".parse().unwrap()];
        let snapshot = build(
            &objects,
            &local(),
            &TrustDomain::default(),
            &configured,
            ROOT,
            |_| None,
            &mut Vec::new(),
        );
        for (ip, inside) in [
            ("10.244.1.77", true),
            ("10.96.0.2", true),
            ("10.244.2.1", false),
            ("172.18.0.9", false),
        ] {
            assert_eq!(
                snapshot.in_cluster_network(ip.parse().unwrap()),
                inside,
                "{ip}"
            );
        }
        let api = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 1), 443);
        assert_eq!(snapshot.resolve(api), None);
        let kubernetes: ServiceName = "default/kubernetes".parse().unwrap();
        assert_eq!(
            snapshot.service_names.get(api.ip()),
            Some(&kubernetes),
            "by its ClusterIP"
        );
        assert_eq!(
            snapshot.service_names.get(&Ipv4Addr::new(172, 18, 0, 9)),
            Some(&kubernetes),
            "and by its endpoint outside the cluster"
        );
        assert_eq!(
            snapshot.service_names.get(&Ipv4Addr::new(10, 244, 1, 77)),
            None,
            "a pod address is never a Service's"
        );
        assert!(snapshot.served_outside_pods.contains(&api));
        assert!(
            !snapshot
                .served_outside_pods
                .contains(&SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 2), 443)),
            "an unknown pod address is not outside the cluster"
        );
    }

    fn labelled_pod(
        namespace: &str,
        name: &str,
        node: &str,
        ip: &str,
        labels: serde_json::Value,
    ) -> Arc<PodView> {
        object(json!({
            "metadata": { "name": name, "namespace": namespace, "uid": format!("uid-{name}"),
                          "labels": labels },
            "spec": { "nodeName": node, "serviceAccountName": "web" },
            "status": { "phase": "Running", "podIP": ip },
        }))
    }

    fn meshed_namespace(name: &str) -> Arc<NamespaceView> {
        object(json!({ "metadata": { "name": name,
            "labels": { "sealmesh.io/mesh": "enabled" } } }))
    }

    fn authorization_policy(
        namespace: &str,
        name: &str,
        spec: serde_json::Value,
    ) -> Arc<AuthorizationPolicyView> {
        object(json!({
            "apiVersion": "sealmesh.io/v1alpha1", "kind": "AuthorizationPolicy",
            "metadata": { "name": name, "namespace": namespace, "resourceVersion": "1" },
            "spec": spec,
        }))
    }

    /// Two meshed namespaces and an unmeshed one: `shop/web-0` (app=web),
    /// `shop/db-0` (app=db), `shop/opted-out` (app=web, opted out) and
    /// `ops/prom-0` on this node, `shop/web-1` (app=web) on n2, `plain/curl`
    /// (app=web) on this node.
    fn policy_cluster(authorization_policies: Vec<Arc<AuthorizationPolicyView>>) -> ClusterObjects {
        let web = || json!({ "app": "web" });
        let mut opted_out = (*labelled_pod("shop", "opted-out", "n1", "10.244.1.5", web())).clone();
        opted_out.metadata.annotations =
            Some([("sealmesh.io/mesh".to_owned(), "disabled".to_owned())].into());
        ClusterObjects {
            pods: vec![
                labelled_pod("shop", "web-0", "n1", "10.244.1.2", web()),
                labelled_pod("shop", "db-0", "n1", "10.244.1.3", json!({ "app": "db" })),
                Arc::new(opted_out),
                labelled_pod("ops", "prom-0", "n1", "10.244.1.4", json!({})),
                labelled_pod("shop", "web-1", "n2", "10.244.2.2", web()),
                labelled_pod("plain", "curl", "n1", "10.244.1.6", web()),
            ],
            nodes: vec![node("n1", "172.18.0.2"), node("n2", "172.18.0.3")],
            namespaces: vec![
                meshed_namespace("shop"),
                meshed_namespace("ops"),
                object(json!({ "metadata": { "name": "plain" } })),
            ],
            services: Vec::new(),
            endpoint_slices: Vec::new(),
            authorization_policies,
        }
    }

    fn build_policies(objects: &ClusterObjects) -> Snapshot {
        build(
            objects,
            &local(),
            &TrustDomain::default(),
            &[],
            ROOT,
            |_| None,
            &mut Vec::new(),
        )
    }

    /// The names of the policies selecting the pod at `ip`.
    fn selecting(snapshot: &Snapshot, ip: [u8; 4]) -> Vec<String> {
        snapshot
            .workload_by_ip(Ipv4Addr::from(ip))
            .unwrap()
            .authz
            .policies()
            .iter()
            .map(|p| p.name.to_string())
            .collect()
    }

    #[test]
    fn local_meshed_pods_carry_the_policies_selecting_them_by_label_or_from_the_root_namespace() {
        let objects = policy_cluster(vec![
            authorization_policy(
                "shop",
                "web-only",
                json!({ "selector": { "matchLabels": { "app": "web" } },
                        "rules": [{ "from": [{ "source": { "namespaces": ["shop"] } }] }] }),
            ),
            authorization_policy(
                ROOT,
                "require-mtls",
                json!({ "action": "DENY",
                        "rules": [{ "from": [{ "source": { "notPrincipals": ["*"] } }] }] }),
            ),
            // A namespace's policy never reaches another namespace's pods.
            authorization_policy("ops", "ops-all", json!({ "rules": [{}] })),
        ]);
        let snapshot = build_policies(&objects);
        assert_eq!(
            selecting(&snapshot, [10, 244, 1, 2]),
            ["sealmesh/require-mtls", "shop/web-only"],
            "web-0: its namespace's policy by its label, and the root namespace's"
        );
        assert_eq!(
            selecting(&snapshot, [10, 244, 1, 3]),
            ["sealmesh/require-mtls"],
            "db-0: not app=web"
        );
        assert_eq!(
            selecting(&snapshot, [10, 244, 1, 4]),
            ["ops/ops-all", "sealmesh/require-mtls"],
            "prom-0: no labels; its namespace's and the root's policies select every pod"
        );
        assert_eq!(snapshot.policies.policies().len(), 3);

        // The compiled policies judge as written.
        let web0 = snapshot
            .workload_by_ip(Ipv4Addr::new(10, 244, 1, 2))
            .unwrap();
        let from = |ns: &str| TrustDomain::default().identity(ns, "client").unwrap();
        let judge = |identity: Option<&sealmesh_common::identity::Identity>| {
            web0.authz.judge(&Connection {
                identity,
                source_ip: Some(Ipv4Addr::new(10, 244, 1, 9)),
                port: 8080,
            })
        };
        assert!(judge(Some(&from("shop"))).allowed());
        assert_eq!(
            judge(Some(&from("ops"))).denied_by().map(|d| d.to_string()),
            Some("shop/web-only".to_owned())
        );
        assert_eq!(
            judge(None).denied_by().map(|d| d.to_string()),
            Some("sealmesh/require-mtls rule 0".to_owned())
        );
    }

    #[test]
    fn remote_and_unmeshed_pods_carry_no_policies() {
        let objects = policy_cluster(vec![
            authorization_policy(ROOT, "everything", json!({ "rules": [{}] })),
            authorization_policy(
                "shop",
                "web",
                json!({ "selector": { "matchLabels": { "app": "web" } }, "rules": [{}] }),
            ),
        ]);
        let snapshot = build_policies(&objects);
        for (pod, ip) in [
            ("web-1, on another node", [10, 244, 2, 2]),
            ("opted-out", [10, 244, 1, 5]),
            ("curl, in an unmeshed namespace", [10, 244, 1, 6]),
        ] {
            assert_eq!(
                selecting(&snapshot, ip),
                Vec::<String>::new(),
                "{pod} is not judged by this agent"
            );
        }
        assert_eq!(
            selecting(&snapshot, [10, 244, 1, 2]),
            ["sealmesh/everything", "shop/web"]
        );
        assert_eq!(
            snapshot
                .policies
                .policies()
                .iter()
                .map(|p| p.name.to_string())
                .collect::<Vec<_>>(),
            ["sealmesh/everything", "shop/web"],
            "the snapshot holds every policy of the cluster"
        );
    }

    #[test]
    fn a_policy_the_agent_cannot_read_fails_closed() {
        let objects = policy_cluster(vec![authorization_policy(
            "shop",
            "l7",
            // An L7 rule: its selector cannot be trusted either.
            json!({ "selector": { "matchLabels": { "app": "db" } },
                    "rules": [{ "to": [{ "operation": { "methods": ["GET"] } }] }] }),
        )]);
        let snapshot = build_policies(&objects);
        for ip in [[10, 244, 1, 2], [10, 244, 1, 3]] {
            assert_eq!(selecting(&snapshot, ip), ["shop/l7"], "every pod of shop");
            let pod = snapshot.workload_by_ip(Ipv4Addr::from(ip)).unwrap();
            let identity = TrustDomain::default().identity("shop", "web").unwrap();
            let verdict = pod.authz.judge(&Connection {
                identity: Some(&identity),
                source_ip: Some(Ipv4Addr::new(10, 244, 1, 9)),
                port: 80,
            });
            assert_eq!(
                verdict.denied_by().map(|d| d.to_string()),
                Some("shop/l7".to_owned())
            );
        }
        let policy = &snapshot.policies.policies()[0];
        assert!(
            policy
                .invalid
                .as_ref()
                .is_some_and(|e| e.problem.contains("unknown field `methods`")),
            "{policy:?}"
        );
        assert_eq!(
            selecting(&snapshot, [10, 244, 1, 4]),
            Vec::<String>::new(),
            "another namespace's pods are not affected"
        );
    }

    #[test]
    fn a_policy_change_is_a_new_snapshot_and_an_unrelated_change_is_not() {
        let web_only = |ns: &str, metadata: serde_json::Value| -> Arc<AuthorizationPolicyView> {
            object(json!({
                "metadata": metadata,
                "spec": { "selector": { "matchLabels": { "app": "web" } },
                          "rules": [{ "from": [{ "source": { "namespaces": [ns] } }] }] },
            }))
        };
        let first = || json!({ "name": "web", "namespace": "shop", "resourceVersion": "1" });
        let published = Published::new(build_policies(&policy_cluster(vec![web_only(
            "shop",
            first(),
        )])));
        let changes = published.subscribe();

        // The same policy at a later resourceVersion, with a label and an
        // annotation the agent does not read: the same judgement.
        let relabelled = json!({ "name": "web", "namespace": "shop", "resourceVersion": "2",
            "labels": { "owner": "team-a" }, "annotations": { "note": "reviewed" } });
        assert!(
            !published.publish(build_policies(&policy_cluster(vec![web_only(
                "shop", relabelled
            )])))
        );
        assert!(!changes.has_changed().unwrap());

        // The rule changes.
        assert!(
            published.publish(build_policies(&policy_cluster(vec![web_only(
                "ops",
                first()
            )])))
        );
        assert!(changes.has_changed().unwrap(), "subscribers are told");
        let web0 = published.by_ip(Ipv4Addr::new(10, 244, 1, 2)).unwrap();
        let shop = TrustDomain::default().identity("shop", "a").unwrap();
        assert!(
            !web0
                .authz
                .judge(&Connection {
                    identity: Some(&shop),
                    source_ip: None,
                    port: 80
                })
                .allowed(),
            "the new rule applies"
        );

        // A policy selecting no local pod still counts (the snapshot lists
        // every policy), and a deleted one no longer applies.
        let elsewhere = authorization_policy("plain", "p", json!({ "rules": [{}] }));
        assert!(published.publish(build_policies(&policy_cluster(vec![
            web_only("ops", first()),
            elsewhere,
        ]))));
        assert_eq!(published.policies().policies().len(), 2);
        assert!(published.publish(build_policies(&policy_cluster(Vec::new()))));
        assert!(
            published
                .by_ip(Ipv4Addr::new(10, 244, 1, 2))
                .unwrap()
                .authz
                .is_empty()
        );
    }
}
