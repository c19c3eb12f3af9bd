//! Builds the registry's [`Snapshot`] from the reflectors' (slimmed) objects.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use k8s_openapi::{
    api::{
        core::v1::{Namespace, Node, Pod, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use sealmesh_common::identity::TrustDomain;

use super::objects::{
    EndpointTarget, PodFacts, namespace_is_meshed, node_internal_ip, ready_endpoints,
    service_cluster_ip, service_tcp_ports, slice_port, slice_service,
};
use crate::registry::{Endpoint, NodeInfo, Snapshot, Workload};

/// The cached objects of every watched kind.
pub(super) struct ClusterObjects {
    pub pods: Vec<Arc<Pod>>,
    pub nodes: Vec<Arc<Node>>,
    pub namespaces: Vec<Arc<Namespace>>,
    pub services: Vec<Arc<Service>>,
    pub endpoint_slices: Vec<Arc<EndpointSlice>>,
}

/// The snapshot the objects describe, seen from `local` (whose address stays
/// the one the agent started with). `cgroup_of` finds a local pod's cgroup
/// id from its UID.
pub(super) fn build(
    objects: &ClusterObjects,
    local: &NodeInfo,
    trust_domain: &TrustDomain,
    mut cgroup_of: impl FnMut(&str) -> Option<u64>,
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

    let mut missing_cgroups = false;
    let mut workloads: Vec<Arc<Workload>> = Vec::new();
    for pod in objects.pods.iter().filter_map(|p| PodFacts::of(p)) {
        let Some(&node_ip) = node_ips.get(pod.node) else {
            tracing::debug!(
                pod.namespace,
                pod.name,
                pod.node,
                "pod's node has no InternalIP (yet); the pod is not routable through the mesh"
            );
            continue;
        };
        let identity = match trust_domain.identity(pod.namespace, pod.service_account) {
            Ok(identity) => identity,
            Err(error) => {
                tracing::warn!(pod.namespace, pod.name, %error, "pod has no valid identity; it is left out of the mesh");
                continue;
            }
        };
        let cgroup_id = if pod.node == local.name {
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
            meshed: meshed_namespaces.contains(pod.namespace) && !pod.opted_out,
            cgroup_id,
        }));
    }
    // Deterministic order: local workloads and endpoint lists compare equal
    // across rebuilds of the same state, so no-op rebuilds notify no one.
    workloads.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let by_name: HashMap<(&str, &str), Arc<Workload>> = workloads
        .iter()
        .map(|w| ((w.namespace.as_str(), w.name.as_str()), w.clone()))
        .collect();

    let mut slices_of: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
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
    for service in &objects.services {
        let (Some(namespace), Some(name), Some(vip)) = (
            service.metadata.namespace.as_deref(),
            service.metadata.name.as_deref(),
            service_cluster_ip(service),
        ) else {
            continue;
        };
        let slices = slices_of
            .get(&(namespace, name))
            .map(Vec::as_slice)
            .unwrap_or_default();
        for port in service_tcp_ports(service) {
            let Ok(service_port) = u16::try_from(port.port) else {
                continue;
            };
            let mut endpoints: Vec<Endpoint> = Vec::new();
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
                        EndpointTarget::Address(ip) => snapshot.workload_by_ip(ip).cloned(),
                    };
                    if let Some(workload) = workload {
                        endpoints.push(Endpoint {
                            workload,
                            port: target_port,
                        });
                    }
                }
            }
            endpoints.sort_by(|a, b| {
                (&a.workload.namespace, &a.workload.name, a.port).cmp(&(
                    &b.workload.namespace,
                    &b.workload.name,
                    b.port,
                ))
            });
            endpoints.dedup();
            snapshot.set_service_port(vip, service_port, endpoints);
        }
    }
    snapshot
}
