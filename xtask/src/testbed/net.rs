//! The testbed's network: named namespaces (the `ip netns` convention: a bind
//! mount under /run/netns), veths, the underlay bridge, addresses and routes,
//! configured over rtnetlink from a thread inside each namespace.

use std::{
    fs::OpenOptions,
    net::{IpAddr, Ipv4Addr},
    os::fd::{AsRawFd, OwnedFd},
    sync::{Mutex, PoisonError},
};

use futures::TryStreamExt as _;
use ipnet::Ipv4Net;
use nix::{
    errno::Errno,
    mount::{MntFlags, MsFlags, mount, umount2},
    sched::{CloneFlags, unshare},
};
use rtnetlink::{
    Handle, LinkBridge, LinkUnspec, LinkVeth, RouteMessageBuilder,
    packet_route::{
        link::{InfoData, InfoVeth},
        route::{RouteProtocol, RouteScope},
    },
};
use sealmesh_common::cluster::ClusterFile;

use super::{
    TestbedError,
    layout::{
        self, Layout, NETNS_DIR, POD_SUPERNET, SERVICE_CIDR, UNDERLAY_CIDR, UNDERLAY_GATEWAY,
        UNDERLAY_PREFIX_LEN,
    },
    netns::{self, netns_path, open_netns},
};

/// Bridge in the underlay namespace that all nodes plug into.
const BRIDGE: &str = "br0";
/// Name of the main interface inside node and pod namespaces.
const ETH0: &str = "eth0";

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{what} in network namespace {netns}: {source}")]
    Netlink {
        netns: String,
        what: String,
        source: rtnetlink::Error,
    },
    #[error("network namespace {netns}: {what}: {source}")]
    Namespace {
        netns: String,
        what: &'static str,
        source: Errno,
    },
    #[error("network namespace {netns}: no interface named {name}")]
    NoSuchLink { netns: String, name: String },
    #[error("cannot start an async runtime for netlink in {netns}: {source}")]
    Runtime {
        netns: String,
        source: std::io::Error,
    },
}

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
    let node_fds = nodes
        .iter()
        .map(|node| open_netns(&node.netns))
        .collect::<Result<Vec<_>, _>>()?;
    in_netns(&underlay, async |rtnl| {
        rtnl.set_up("lo").await?;
        rtnl.add(LinkBridge::new(BRIDGE).build(), BRIDGE).await?;
        let bridge = rtnl.index(BRIDGE).await?;
        rtnl.add_address(BRIDGE, UNDERLAY_GATEWAY, UNDERLAY_PREFIX_LEN)
            .await?;
        for (node, fd) in nodes.iter().zip(&node_fds) {
            let port = layout::underlay_port(node.index);
            rtnl.add_veth(&port, ETH0, fd).await?;
            rtnl.set(
                LinkUnspec::new_with_name(&port)
                    .controller(bridge)
                    .up()
                    .build(),
                &format!("attach {port} to {BRIDGE}"),
            )
            .await?;
        }
        Ok(())
    })?;

    for node in &nodes {
        let gateway = layout::pod_gateway(node.index);
        let pod_fds = node
            .pods
            .iter()
            .map(|(pod_netns, _)| open_netns(pod_netns))
            .collect::<Result<Vec<_>, _>>()?;
        in_netns(&node.netns, async |rtnl| {
            rtnl.set_up("lo").await?;
            rtnl.add_address(ETH0, node.ip, UNDERLAY_PREFIX_LEN).await?;
            rtnl.set_up(ETH0).await?;
            for other in nodes.iter().filter(|o| o.index != node.index) {
                rtnl.add_route(layout::pod_cidr(other.index), Some(other.ip), ETH0, None)
                    .await?;
            }
            for (slot, ((_, pod_ip), fd)) in node.pods.iter().zip(&pod_fds).enumerate() {
                // Calico-style point-to-point: every pod veth carries the same gateway /32.
                let port = format!("p{slot}");
                rtnl.add_veth(&port, ETH0, fd).await?;
                rtnl.add_address(&port, gateway, 32).await?;
                rtnl.set_up(&port).await?;
                let host_route = Ipv4Net::new_assert(*pod_ip, 32);
                rtnl.add_route(host_route, None, &port, Some(gateway))
                    .await?;
            }
            Ok(())
        })?;
        netns::run_in_netns(&node.netns, || {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
        })?
        .map_err(|source| TestbedError::Io {
            what: "cannot enable ip_forward in node namespace",
            path: netns_path(&node.netns),
            source,
        })?;

        for (pod_netns, pod_ip) in &node.pods {
            in_netns(pod_netns, async |rtnl| {
                rtnl.set_up("lo").await?;
                rtnl.add_address(ETH0, *pod_ip, 32).await?;
                rtnl.set_up(ETH0).await?;
                let gateway_route = Ipv4Net::new_assert(gateway, 32);
                rtnl.add_route(gateway_route, None, ETH0, Some(*pod_ip))
                    .await?;
                for dest in [POD_SUPERNET, UNDERLAY_CIDR, SERVICE_CIDR] {
                    rtnl.add_route(dest, Some(gateway), ETH0, Some(*pod_ip))
                        .await?;
                }
                Ok(())
            })?;
        }
    }

    // Replies from the control plane to pods go back through the pod's node.
    in_netns(&underlay, async |rtnl| {
        for node in &nodes {
            rtnl.add_route(layout::pod_cidr(node.index), Some(node.ip), BRIDGE, None)
                .await?;
        }
        Ok(())
    })
}

/// An rtnetlink handle bound to one namespace, with errors that name it.
struct Rtnl {
    handle: Handle,
    netns: String,
}

impl Rtnl {
    fn failed(&self, what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
        let (netns, what) = (self.netns.clone(), what.into());
        move |source| NetError::Netlink {
            netns,
            what,
            source,
        }
    }

    async fn index(&self, name: &str) -> Result<u32, NetError> {
        self.handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute()
            .try_next()
            .await
            .map_err(self.failed(format!("looking up {name}")))?
            .map(|link| link.header.index)
            .ok_or_else(|| NetError::NoSuchLink {
                netns: self.netns.clone(),
                name: name.to_owned(),
            })
    }

    async fn add(
        &self,
        link: rtnetlink::packet_route::link::LinkMessage,
        name: &str,
    ) -> Result<(), NetError> {
        self.handle
            .link()
            .add(link)
            .execute()
            .await
            .map_err(self.failed(format!("creating {name}")))
    }

    async fn set(
        &self,
        link: rtnetlink::packet_route::link::LinkMessage,
        what: &str,
    ) -> Result<(), NetError> {
        self.handle
            .link()
            .set(link)
            .execute()
            .await
            .map_err(self.failed(what))
    }

    async fn set_up(&self, name: &str) -> Result<(), NetError> {
        self.set(
            LinkUnspec::new_with_name(name).up().build(),
            &format!("setting {name} up"),
        )
        .await
    }

    /// A veth `name` here whose peer `peer` is created directly in the namespace
    /// `peer_netns` (so names never clash here).
    async fn add_veth(&self, name: &str, peer: &str, peer_netns: &OwnedFd) -> Result<(), NetError> {
        let peer = LinkUnspec::new_with_name(peer)
            .setns_by_fd(peer_netns.as_raw_fd())
            .build();
        let veth = LinkVeth::new(name, "")
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .build();
        self.add(veth, &format!("veth {name}")).await
    }

    async fn add_address(&self, dev: &str, ip: Ipv4Addr, prefix_len: u8) -> Result<(), NetError> {
        let index = self.index(dev).await?;
        self.handle
            .address()
            .add(index, IpAddr::V4(ip), prefix_len)
            .execute()
            .await
            .map_err(self.failed(format!("adding {ip}/{prefix_len} to {dev}")))
    }

    /// A route like `ip route add`'s: via `gateway`, or on-link (scope link) without.
    async fn add_route(
        &self,
        dest: Ipv4Net,
        gateway: Option<Ipv4Addr>,
        dev: &str,
        source: Option<Ipv4Addr>,
    ) -> Result<(), NetError> {
        let index = self.index(dev).await?;
        let mut route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dest.network(), dest.prefix_len())
            .output_interface(index);
        route = match gateway {
            Some(gateway) => route.gateway(gateway),
            None => route.scope(RouteScope::Link),
        };
        if let Some(source) = source {
            route = route.pref_source(source);
        }
        // `ip route add` marks routes as set up at boot by an administrator.
        route.get_mut().header.protocol = RouteProtocol::Boot;
        self.handle
            .route()
            .add(route.build())
            .execute()
            .await
            .map_err(self.failed(format!("adding route {dest} on {dev}")))
    }
}

/// Runs `ops` with an rtnetlink connection opened inside `netns` (the socket stays
/// bound to the namespace it was created in).
fn in_netns<T: Send>(
    netns: &str,
    ops: impl AsyncFnOnce(&Rtnl) -> Result<T, NetError> + Send,
) -> Result<T, TestbedError> {
    let result = netns::run_in_netns(netns, || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(|source| NetError::Runtime {
                netns: netns.to_owned(),
                source,
            })?;
        runtime.block_on(async {
            let (connection, handle, _) =
                rtnetlink::new_connection().map_err(|source| NetError::Runtime {
                    netns: netns.to_owned(),
                    source,
                })?;
            let connection = tokio::spawn(connection);
            let rtnl = Rtnl {
                handle,
                netns: netns.to_owned(),
            };
            let result = ops(&rtnl).await;
            connection.abort();
            result
        })
    })?;
    Ok(result?)
}

/// Makes /run/netns a shared mount point, as `ip netns` does, so namespaces mounted
/// there are visible in every mount namespace.
fn share_netns_dir() -> Result<(), TestbedError> {
    let failed = |what| {
        move |source| NetError::Namespace {
            netns: NETNS_DIR.to_owned(),
            what,
            source,
        }
    };
    std::fs::create_dir_all(NETNS_DIR).map_err(|source| TestbedError::Io {
        what: "cannot create",
        path: NETNS_DIR.into(),
        source,
    })?;
    let make_shared = || {
        mount(
            None::<&str>,
            NETNS_DIR,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    match make_shared() {
        Ok(()) => Ok(()),
        // Not a mount point yet: bind it onto itself first.
        Err(Errno::EINVAL) => {
            mount(
                Some(NETNS_DIR),
                NETNS_DIR,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(failed("cannot bind-mount"))?;
            make_shared().map_err(failed("cannot make shared"))?;
            Ok(())
        }
        Err(e) => Err(failed("cannot make shared")(e).into()),
    }
}

/// Creates named network namespaces: a fresh thread unshares its network
/// namespace and bind-mounts it on `/run/netns/<name>`, which keeps it alive.
fn add_namespaces(names: &[String]) -> Result<(), TestbedError> {
    // Making /run/netns shared twice at once could stack two mounts there.
    static SHARE_NETNS_DIR: Mutex<()> = Mutex::new(());
    {
        let _serialised = SHARE_NETNS_DIR
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        share_netns_dir()?;
    }
    for name in names {
        let path = netns_path(name);
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|source| TestbedError::Io {
                what: "cannot create network namespace mount point",
                path: path.clone(),
                source,
            })?;
        let target = path.clone();
        let created = std::thread::spawn(move || -> Result<(), (&'static str, Errno)> {
            unshare(CloneFlags::CLONE_NEWNET).map_err(|e| ("cannot unshare", e))?;
            mount(
                Some("/proc/thread-self/ns/net"),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| ("cannot bind-mount", e))
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        if let Err((what, source)) = created {
            let _ = std::fs::remove_file(&path);
            return Err(NetError::Namespace {
                netns: name.clone(),
                what,
                source,
            }
            .into());
        }
    }
    Ok(())
}

/// Deletes the named namespaces (their veths go with them once no process holds
/// them); keeps going past errors.
pub fn delete_namespaces(names: &[String]) -> Result<(), String> {
    let mut problems = Vec::new();
    for name in names {
        let path = netns_path(name);
        // EINVAL: not mounted (a half-created namespace); the file still goes.
        if let Err(e) = umount2(&path, MntFlags::MNT_DETACH)
            && e != Errno::EINVAL
            && e != Errno::ENOENT
        {
            problems.push(format!("cannot unmount {}: {e}", path.display()));
            continue;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => problems.push(format!("cannot remove {}: {e}", path.display())),
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
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
