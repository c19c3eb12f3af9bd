//! The testbed's network: namespaces, veths, the underlay bridge, addresses and
//! routes. Configured with iproute2 batches (one `ip` process per namespace),
//! which `cargo xtask setup` installs.

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    process::Command,
    sync::{Mutex, PoisonError},
};

use sealmesh_common::cluster::ClusterFile;

use super::{
    TestbedError,
    layout::{
        self, Layout, NETNS_DIR, POD_SUPERNET, SERVICE_CIDR, UNDERLAY_CIDR, UNDERLAY_GATEWAY,
        UNDERLAY_PREFIX_LEN,
    },
    netns,
};
use crate::cmd;

/// Bridge in the underlay namespace that all nodes plug into.
const BRIDGE: &str = "br0";
/// Name of the main interface inside node and pod namespaces.
const ETH0: &str = "eth0";

struct NodePlan {
    index: usize,
    netns: String,
    ip: Ipv4Addr,
    /// Pods in slot order: (netns, ip).
    pods: Vec<(String, Ipv4Addr)>,
}

fn plan(cluster: &ClusterFile) -> Result<Vec<NodePlan>, TestbedError> {
    cluster
        .nodes
        .iter()
        .enumerate()
        .map(|(index, node)| {
            let pods = cluster
                .pods_on(&node.name)
                .map(|pod| {
                    let netns = pod.netns.clone().ok_or_else(|| TestbedError::NotATestbed {
                        what: format!("pod {}/{} has no netns", pod.namespace, pod.name),
                    })?;
                    Ok((netns, pod.ip))
                })
                .collect::<Result<_, TestbedError>>()?;
            let netns = node
                .netns
                .clone()
                .ok_or_else(|| TestbedError::NotATestbed {
                    what: format!("node {} has no netns", node.name),
                })?;
            Ok(NodePlan {
                index,
                netns,
                ip: node.ip,
                pods,
            })
        })
        .collect()
}

/// Creates every namespace and link of the testbed described by `cluster`.
pub fn build(layout: &Layout, cluster: &ClusterFile) -> Result<(), TestbedError> {
    let nodes = plan(cluster)?;
    let underlay = layout.underlay_netns();

    let mut all = vec![underlay.clone()];
    for node in &nodes {
        all.push(node.netns.clone());
        all.extend(node.pods.iter().map(|(ns, _)| ns.clone()));
    }
    add_namespaces(&all)?;

    // Underlay: the bridge, and one veth per node whose other end is the node's eth0.
    let mut batch = String::new();
    let _ = writeln!(batch, "link set lo up");
    let _ = writeln!(batch, "link add {BRIDGE} type bridge");
    let _ = writeln!(
        batch,
        "addr add {UNDERLAY_GATEWAY}/{UNDERLAY_PREFIX_LEN} dev {BRIDGE}"
    );
    let _ = writeln!(batch, "link set {BRIDGE} up");
    for node in &nodes {
        let port = format!("n{}", node.index);
        let _ = writeln!(
            batch,
            "link add {port} type veth peer name {ETH0} netns {}",
            node.netns
        );
        let _ = writeln!(batch, "link set {port} master {BRIDGE}");
        let _ = writeln!(batch, "link set {port} up");
    }
    ip_batch(&underlay, &batch)?;

    for node in &nodes {
        let mut batch = String::new();
        let _ = writeln!(batch, "link set lo up");
        let _ = writeln!(
            batch,
            "addr add {}/{UNDERLAY_PREFIX_LEN} dev {ETH0}",
            node.ip
        );
        let _ = writeln!(batch, "link set {ETH0} up");
        for other in nodes.iter().filter(|o| o.index != node.index) {
            let _ = writeln!(
                batch,
                "route add {} via {} dev {ETH0}",
                layout::pod_cidr(other.index),
                other.ip
            );
        }
        let gateway = layout::pod_gateway(node.index);
        for (slot, (pod_netns, pod_ip)) in node.pods.iter().enumerate() {
            // Calico-style point-to-point: every pod veth carries the same gateway /32.
            let port = format!("p{slot}");
            let _ = writeln!(
                batch,
                "link add {port} type veth peer name {ETH0} netns {pod_netns}"
            );
            let _ = writeln!(batch, "addr add {gateway}/32 dev {port}");
            let _ = writeln!(batch, "link set {port} up");
            let _ = writeln!(batch, "route add {pod_ip}/32 dev {port} src {gateway}");
        }
        ip_batch(&node.netns, &batch)?;
        netns::run_in_netns(&node.netns, || {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
        })?
        .map_err(|source| TestbedError::Io {
            what: "cannot enable ip_forward in node namespace",
            path: format!("{NETNS_DIR}/{}", node.netns).into(),
            source,
        })?;

        for (pod_netns, pod_ip) in &node.pods {
            let mut batch = String::new();
            let _ = writeln!(batch, "link set lo up");
            let _ = writeln!(batch, "addr add {pod_ip}/32 dev {ETH0}");
            let _ = writeln!(batch, "link set {ETH0} up");
            let _ = writeln!(
                batch,
                "route add {gateway}/32 dev {ETH0} scope link src {pod_ip}"
            );
            for dest in [POD_SUPERNET, UNDERLAY_CIDR, SERVICE_CIDR] {
                let _ = writeln!(
                    batch,
                    "route add {dest} via {gateway} dev {ETH0} src {pod_ip}"
                );
            }
            ip_batch(pod_netns, &batch)?;
        }
    }

    // Replies from the control plane to pods go back through the pod's node.
    let mut batch = String::new();
    for node in &nodes {
        let _ = writeln!(
            batch,
            "route add {} via {}",
            layout::pod_cidr(node.index),
            node.ip
        );
    }
    ip_batch(&underlay, &batch)
}

fn ip_batch(netns: &str, batch: &str) -> Result<(), TestbedError> {
    if batch.is_empty() {
        return Ok(());
    }
    cmd::output_with_input(Command::new("ip").args(["-n", netns, "-batch", "-"]), batch)?;
    Ok(())
}

fn add_namespaces(names: &[String]) -> Result<(), TestbedError> {
    // The first `ip netns add` on a host turns /run/netns into a shared mount; two
    // doing that at once can stack two mounts there. Serialise this process's
    // testbeds (tests start several at once).
    static NETNS_ADD: Mutex<()> = Mutex::new(());
    let _serialised = NETNS_ADD.lock().unwrap_or_else(PoisonError::into_inner);
    let batch: String = names.iter().map(|n| format!("netns add {n}\n")).collect();
    cmd::output_with_input(Command::new("ip").args(["-batch", "-"]), &batch)?;
    Ok(())
}

/// Deletes the named namespaces (their veths go with them); keeps going past errors.
pub fn delete_namespaces(names: &[String]) -> Result<(), String> {
    if names.is_empty() {
        return Ok(());
    }
    let batch: String = names.iter().map(|n| format!("netns del {n}\n")).collect();
    cmd::output_with_input(Command::new("ip").args(["-force", "-batch", "-"]), &batch)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// Named namespaces whose name starts with `prefix`, sorted.
pub fn namespaces_with_prefix(prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(NETNS_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| name.starts_with(prefix))
        .collect();
    names.sort();
    names
}
