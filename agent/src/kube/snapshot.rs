//! Builds the registry's [`Snapshot`] from the reflectors' object views.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddrV4,
    sync::Arc,
};

use ipnet::Ipv4Net;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use sealmesh_common::{identity::TrustDomain, policy::InboundPolicyAnnotations};

use super::objects::{
    EndpointSliceView, EndpointTarget, NamespaceView, NodeView, PodFacts, PodView, ServiceView,
    namespace_inbound_policy, namespace_is_meshed, node_internal_ip, node_pod_cidrs,
    ready_endpoints, service_cluster_ip, service_tcp_ports, slice_port, slice_service,
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
}

/// The snapshot the objects describe, seen from `local` (whose address stays
/// the one the agent started with). `cgroup_of` finds a local pod's cgroup
/// id from its UID; `networks` are the configured pod and Service networks,
/// to which every Node's pod networks are added; local pods that would be
/// meshed but have no identity are added to `left_out`.
pub(super) fn build(
    objects: &ClusterObjects,
    local: &NodeInfo,
    trust_domain: &TrustDomain,
    networks: &[Ipv4Net],
    mut cgroup_of: impl FnMut(&str) -> Option<u64>,
    left_out: &mut Vec<LeftOut>,
) -> Snapshot {
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
            authz: Default::default(),
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

    use serde::de::DeserializeOwned;
    use serde_json::json;

    use super::*;

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
        };
        let mut looked_up = Vec::new();
        let mut left_out = Vec::new();
        let snapshot = build(
            &objects,
            &local(),
            &TrustDomain::default(),
            &[],
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
        };
        let mut left_out = Vec::new();
        let snapshot = build(
            &objects,
            &local(),
            &TrustDomain::default(),
            &[],
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
        };
        let snapshot = build(
            &objects,
            &local(),
            &TrustDomain::default(),
            &[],
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
        };
        let snapshot = build(
            &objects,
            &local(),
            &TrustDomain::default(),
            &[],
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
        };
        let snapshot = build(
            &objects,
            &local(),
            &TrustDomain::default(),
            &[],
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
        };
        let configured: Vec<Ipv4Net> = vec!["10.96.0.0/12".parse().unwrap()];
        let snapshot = build(
            &objects,
            &local(),
            &TrustDomain::default(),
            &configured,
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
}
