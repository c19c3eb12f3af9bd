//! What a testbed should contain, and the cluster file that describes it once built.

use std::collections::{BTreeMap, BTreeSet};

use sealmesh_common::{
    authz::AuthorizationPolicy,
    cluster::{self, ClusterError, ClusterFile, Namespace, Service},
    consts::{MESH_LABEL, MESH_LABEL_ENABLED},
    identity,
};

use super::layout::{self, Layout, MAX_NODES, MAX_PODS_PER_NODE, SERVICE_CIDR};

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("a testbed needs 1 to {MAX_NODES} nodes, not {0}")]
    NodeCount(usize),
    #[error(
        "pod {namespace}/{name}: node index {node} does not exist (the spec has {nodes} nodes: 0..{nodes})"
    )]
    NoSuchNode {
        namespace: String,
        name: String,
        node: usize,
        nodes: usize,
    },
    #[error("node {node} has {pods} pods; at most {MAX_PODS_PER_NODE} fit its /24 pod CIDR")]
    TooManyPods { node: usize, pods: usize },
    #[error("pod {namespace}/{name}: {source}")]
    PodName {
        namespace: String,
        name: String,
        // Boxed: the error is rare and large; every testbed result carries its size.
        source: Box<identity::IdentityError>,
    },
    #[error("service {namespace}/{name}: VIP {vip} is outside the Service range {SERVICE_CIDR}")]
    VipOutsideServiceRange {
        namespace: String,
        name: String,
        vip: std::net::Ipv4Addr,
    },
    #[error(transparent)]
    Cluster(#[from] ClusterError),
}

/// A pod to create: where it runs and what it looks like to the mesh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodSpec {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    /// Index of the node (0-based) the pod is scheduled on.
    pub node: usize,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

impl PodSpec {
    pub fn new(namespace: &str, name: &str, service_account: &str, node: usize) -> Self {
        Self {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            node,
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
        }
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.to_owned(), value.to_owned());
        self
    }

    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.annotations.insert(key.to_owned(), value.to_owned());
        self
    }
}

/// The topology of a testbed. Pods get addresses in the order they are listed
/// per node: the first pod of node k is 10.244.k.2.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestbedSpec {
    pub nodes: usize,
    pub namespaces: Vec<Namespace>,
    pub pods: Vec<PodSpec>,
    pub services: Vec<Service>,
    pub authorization_policies: Vec<AuthorizationPolicy>,
    /// None: the default trust domain.
    pub trust_domain: Option<String>,
}

/// Namespace used by [`TestbedSpec::meshed`].
pub const MESHED_NAMESPACE: &str = "mesh-demo";

impl TestbedSpec {
    /// `nodes` nodes and nothing else yet.
    pub fn new(nodes: usize) -> Self {
        Self {
            nodes,
            namespaces: Vec::new(),
            pods: Vec::new(),
            services: Vec::new(),
            authorization_policies: Vec::new(),
            trust_domain: None,
        }
    }

    /// Names identities in `domain` instead of the default (agents and the
    /// identity service are started with it).
    pub fn trust_domain(mut self, domain: &str) -> Self {
        self.trust_domain = Some(domain.to_owned());
        self
    }

    /// `nodes` × `pods_per_node` pods in the meshed namespace `mesh-demo`. Pod m of
    /// node k is `pod-<k>-<m>` with its own ServiceAccount `sa-<k>-<m>` and label
    /// `app: pod-<k>-<m>`.
    pub fn meshed(nodes: usize, pods_per_node: usize) -> Self {
        let mut spec = Self::new(nodes).meshed_namespace(MESHED_NAMESPACE);
        for node in 0..nodes {
            for pod in 0..pods_per_node {
                let name = format!("pod-{node}-{pod}");
                spec = spec.pod(
                    PodSpec::new(MESHED_NAMESPACE, &name, &format!("sa-{node}-{pod}"), node)
                        .label("app", &name),
                );
            }
        }
        spec
    }

    pub fn namespace(mut self, name: &str, labels: &[(&str, &str)]) -> Self {
        self.namespaces.push(Namespace {
            name: name.to_owned(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            annotations: BTreeMap::new(),
        });
        self
    }

    /// Annotates namespace `name` (e.g. `sealmesh.io/inbound-policy: strict`),
    /// declaring it without labels if the spec does not list it yet.
    pub fn namespace_annotation(mut self, name: &str, key: &str, value: &str) -> Self {
        if !self.namespaces.iter().any(|ns| ns.name == name) {
            self = self.namespace(name, &[]);
        }
        let namespace = self
            .namespaces
            .iter_mut()
            .find(|ns| ns.name == name)
            .expect("declared above");
        namespace
            .annotations
            .insert(key.to_owned(), value.to_owned());
        self
    }

    /// A namespace labelled `sealmesh.io/mesh: enabled`.
    pub fn meshed_namespace(self, name: &str) -> Self {
        self.namespace(name, &[(MESH_LABEL, MESH_LABEL_ENABLED)])
    }

    pub fn pod(mut self, pod: PodSpec) -> Self {
        self.pods.push(pod);
        self
    }

    pub fn service(mut self, service: Service) -> Self {
        self.services.push(service);
        self
    }

    /// An AuthorizationPolicy (in Kubernetes mode, an object of the CRD),
    /// declaring its namespace without labels if the spec does not list it
    /// yet (a policy of the control namespace applies to every namespace).
    pub fn authorization_policy(mut self, policy: AuthorizationPolicy) -> Self {
        if !self.namespaces.iter().any(|ns| ns.name == policy.namespace) {
            self = self.namespace(&policy.namespace, &[]);
        }
        self.authorization_policies.push(policy);
        self
    }

    /// Index of every pod within its node, in spec order.
    pub(crate) fn pod_slots(&self) -> Vec<usize> {
        let mut next = vec![0usize; self.nodes];
        self.pods
            .iter()
            .map(|p| {
                let slot = next[p.node];
                next[p.node] += 1;
                slot
            })
            .collect()
    }

    fn check_topology(&self) -> Result<(), SpecError> {
        if self.nodes == 0 || self.nodes > MAX_NODES {
            return Err(SpecError::NodeCount(self.nodes));
        }
        let mut per_node = vec![0usize; self.nodes];
        for pod in &self.pods {
            identity::check_name(&pod.name).map_err(|source| SpecError::PodName {
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                source: Box::new(source),
            })?;
            let count = per_node
                .get_mut(pod.node)
                .ok_or_else(|| SpecError::NoSuchNode {
                    namespace: pod.namespace.clone(),
                    name: pod.name.clone(),
                    node: pod.node,
                    nodes: self.nodes,
                })?;
            *count += 1;
            if *count > MAX_PODS_PER_NODE {
                return Err(SpecError::TooManyPods {
                    node: pod.node,
                    pods: *count,
                });
            }
        }
        for svc in &self.services {
            if !SERVICE_CIDR.contains(&svc.vip) {
                return Err(SpecError::VipOutsideServiceRange {
                    namespace: svc.namespace.clone(),
                    name: svc.name.clone(),
                    vip: svc.vip,
                });
            }
        }
        Ok(())
    }

    /// Checks the spec and returns the cluster file the testbed will write; nothing
    /// on the host is touched, so a bad spec fails before anything is created.
    pub fn to_cluster_file(&self, layout: &Layout) -> Result<ClusterFile, SpecError> {
        self.check_topology()?;
        let mut file = ClusterFile::new(layout.id().as_str());
        file.service_cidr = Some(SERVICE_CIDR);
        if let Some(domain) = &self.trust_domain {
            file.trust_domain.clone_from(domain);
        }
        file.nodes = (0..self.nodes)
            .map(|k| {
                let name = layout::node_name(k);
                cluster::Node {
                    ip: layout::node_ip(k),
                    pod_cidr: layout::pod_cidr(k),
                    cgroup: layout.node_cgroup(&name),
                    token_file: Some(layout.token_file(&name)),
                    netns: Some(layout.node_netns(k)),
                    name,
                }
            })
            .collect();
        file.namespaces = self.namespaces.clone();
        file.pods = self
            .pods
            .iter()
            .zip(self.pod_slots())
            .map(|(pod, slot)| {
                let node = layout::node_name(pod.node);
                cluster::Pod {
                    ip: layout::pod_ip(pod.node, slot),
                    cgroup: layout.pod_cgroup(&node, &pod.namespace, &pod.name),
                    netns: Some(layout.pod_netns(pod.node, slot)),
                    node,
                    name: pod.name.clone(),
                    namespace: pod.namespace.clone(),
                    service_account: pod.service_account.clone(),
                    labels: pod.labels.clone(),
                    annotations: pod.annotations.clone(),
                }
            })
            .collect();
        let service_accounts: BTreeSet<(&str, &str)> = self
            .pods
            .iter()
            .map(|p| (p.namespace.as_str(), p.service_account.as_str()))
            .collect();
        file.service_accounts = service_accounts
            .into_iter()
            .map(|(namespace, name)| cluster::ServiceAccount {
                name: name.to_owned(),
                namespace: namespace.to_owned(),
                token_file: Some(layout.service_account_token_file(namespace, name)),
            })
            .collect();
        file.services = self.services.clone();
        file.authorization_policies = self.authorization_policies.clone();
        file.validate()?;
        Ok(file)
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use sealmesh_common::cluster::ServicePort;

    use super::*;
    use crate::testbed::layout::{HostPaths, TestbedId};

    fn layout() -> Layout {
        Layout::new(
            "tb-0000aa".parse::<TestbedId>().unwrap(),
            HostPaths::for_tests("/cg", "/bpf"),
        )
    }

    fn web_service(vip: Ipv4Addr) -> Service {
        Service {
            name: "web".into(),
            namespace: MESHED_NAMESPACE.into(),
            vip,
            ports: vec![ServicePort {
                name: None,
                port: 80,
                target_port: 8080,
            }],
            selector: [("app".to_owned(), "pod-1-0".to_owned())].into(),
        }
    }

    #[test]
    fn meshed_spec_becomes_the_documented_cluster_file() {
        let spec = TestbedSpec::meshed(2, 2).service(web_service(Ipv4Addr::new(10, 96, 0, 10)));
        let file = spec.to_cluster_file(&layout()).unwrap();
        assert_eq!(file.name, "tb-0000aa");
        let nodes: Vec<_> = file
            .nodes
            .iter()
            .map(|n| (n.name.as_str(), n.ip.to_string(), n.pod_cidr.to_string()))
            .collect();
        assert_eq!(
            nodes,
            [
                ("node-0", "172.18.0.2".into(), "10.244.0.0/24".into()),
                ("node-1", "172.18.0.3".into(), "10.244.1.0/24".into()),
            ]
        );
        let node1 = file.node("node-1").unwrap();
        assert_eq!(node1.netns.as_deref(), Some("sm-tb-0000aa-n1"));
        assert_eq!(
            node1.cgroup.to_str(),
            Some("/cg/sealmesh-testbed/tb-0000aa/node-1")
        );
        assert_eq!(
            node1.token_file.as_deref().and_then(|p| p.to_str()),
            Some("/run/sealmesh/tb-0000aa/node-1.token")
        );
        let pods: Vec<_> = file
            .pods
            .iter()
            .map(|p| {
                (
                    p.name.as_str(),
                    p.ip.to_string(),
                    p.node.as_str(),
                    p.netns.as_deref().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            pods,
            [
                (
                    "pod-0-0",
                    "10.244.0.2".into(),
                    "node-0",
                    "sm-tb-0000aa-n0-p0"
                ),
                (
                    "pod-0-1",
                    "10.244.0.3".into(),
                    "node-0",
                    "sm-tb-0000aa-n0-p1"
                ),
                (
                    "pod-1-0",
                    "10.244.1.2".into(),
                    "node-1",
                    "sm-tb-0000aa-n1-p0"
                ),
                (
                    "pod-1-1",
                    "10.244.1.3".into(),
                    "node-1",
                    "sm-tb-0000aa-n1-p1"
                ),
            ]
        );
        let pod = file.pod(MESHED_NAMESPACE, "pod-1-1").unwrap();
        assert_eq!(pod.service_account, "sa-1-1");
        assert_eq!(
            pod.cgroup.to_str(),
            Some("/cg/sealmesh-testbed/tb-0000aa/node-1/mesh-demo_pod-1-1")
        );
        assert!(file.is_meshed(pod));
        let service_accounts: Vec<_> = file
            .service_accounts
            .iter()
            .map(|sa| {
                (
                    sa.namespace.as_str(),
                    sa.name.as_str(),
                    sa.token_file.as_deref().and_then(|p| p.to_str()).unwrap(),
                )
            })
            .collect();
        assert_eq!(
            service_accounts[..2],
            [
                (
                    MESHED_NAMESPACE,
                    "sa-0-0",
                    "/run/sealmesh/tb-0000aa/sa-mesh-demo_sa-0-0.token"
                ),
                (
                    MESHED_NAMESPACE,
                    "sa-0-1",
                    "/run/sealmesh/tb-0000aa/sa-mesh-demo_sa-0-1.token"
                ),
            ]
        );
        assert_eq!(service_accounts.len(), 4);
        let svc = file.service_by_vip(Ipv4Addr::new(10, 96, 0, 10)).unwrap();
        let endpoints: Vec<_> = file.endpoints(svc).map(|p| p.name.as_str()).collect();
        assert_eq!(endpoints, ["pod-1-0"]);
    }

    #[test]
    fn authorization_policies_go_to_the_cluster_file_with_their_namespace() {
        let policy = |namespace: &str, spec: &str| AuthorizationPolicy {
            name: "p".into(),
            namespace: namespace.into(),
            annotations: Default::default(),
            spec: serde_yaml_ng::from_str(spec).unwrap(),
        };
        let spec = TestbedSpec::meshed(1, 1)
            .authorization_policy(policy(MESHED_NAMESPACE, "{ rules: [{}] }"))
            .authorization_policy(policy("sealmesh", "{ action: DENY }"));
        let file = spec.to_cluster_file(&layout()).unwrap();
        assert_eq!(file.authorization_policies, spec.authorization_policies);
        let namespaces: Vec<_> = file.namespaces.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(namespaces, [MESHED_NAMESPACE, "sealmesh"]);
        // What the agents could not read fails before anything is built.
        let bad = TestbedSpec::meshed(1, 1).authorization_policy(policy(
            MESHED_NAMESPACE,
            "{ rules: [{ to: [{ operation: { ports: ['0'] } }] }] }",
        ));
        let error = bad.to_cluster_file(&layout()).unwrap_err().to_string();
        assert!(error.contains("is not a port"), "{error}");
    }

    #[test]
    fn pods_are_numbered_per_node_in_spec_order() {
        let spec = TestbedSpec::new(2)
            .namespace("plain", &[])
            .pod(PodSpec::new("plain", "a", "default", 1))
            .pod(PodSpec::new("plain", "b", "default", 0))
            .pod(PodSpec::new("plain", "c", "default", 1));
        let file = spec.to_cluster_file(&layout()).unwrap();
        let ips: Vec<_> = file.pods.iter().map(|p| p.ip.to_string()).collect();
        assert_eq!(ips, ["10.244.1.2", "10.244.0.2", "10.244.1.3"]);
        assert!(!file.is_meshed(file.pod("plain", "a").unwrap()));
        // Pods sharing a ServiceAccount share its entry.
        assert_eq!(file.service_accounts.len(), 1);
    }

    fn rejected(spec: TestbedSpec) -> String {
        spec.to_cluster_file(&layout()).unwrap_err().to_string()
    }

    #[test]
    fn rejects_bad_specs_with_clear_messages() {
        assert_eq!(
            rejected(TestbedSpec::new(0)),
            "a testbed needs 1 to 253 nodes, not 0"
        );
        assert_eq!(
            rejected(TestbedSpec::new(254)),
            "a testbed needs 1 to 253 nodes, not 254"
        );
        assert_eq!(
            rejected(TestbedSpec::meshed(1, 254)),
            "node 0 has 254 pods; at most 253 fit its /24 pod CIDR"
        );
        assert_eq!(
            rejected(TestbedSpec::meshed(1, 0).pod(PodSpec::new(MESHED_NAMESPACE, "x", "sa", 1))),
            "pod mesh-demo/x: node index 1 does not exist (the spec has 1 nodes: 0..1)"
        );
        assert!(
            rejected(TestbedSpec::meshed(1, 0).pod(PodSpec::new(
                MESHED_NAMESPACE,
                "Bad_Pod",
                "sa",
                0
            )))
            .starts_with("pod mesh-demo/Bad_Pod: \"Bad_Pod\" is not a valid Kubernetes name")
        );
        assert_eq!(
            rejected(TestbedSpec::meshed(2, 1).service(web_service(Ipv4Addr::new(10, 97, 0, 1)))),
            "service mesh-demo/web: VIP 10.97.0.1 is outside the Service range 10.96.0.0/16"
        );
        // What the cluster-file schema checks is reported through it.
        assert!(
            rejected(TestbedSpec::new(1).pod(PodSpec::new("undeclared", "a", "sa", 0)))
                .contains("namespace \"undeclared\" is not listed under namespaces")
        );
        assert!(
            rejected(TestbedSpec::meshed(1, 1).pod(PodSpec::new(
                MESHED_NAMESPACE,
                "pod-0-0",
                "sa",
                0
            )))
            .contains("duplicate pod")
        );
    }
}
