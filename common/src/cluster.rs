//! The cluster file: a YAML description of a cluster's nodes, pods and
//! Services. The local testbed writes it; local-mode agents, the identity
//! service and the CLI read it in place of the Kubernetes API.
//!
//! ```yaml
//! apiVersion: sealmesh.io/v1alpha1
//! kind: Cluster
//! name: tb-1a2b3c
//! trustDomain: cluster.local
//! identity: { address: 172.18.0.1:8080, trustAnchorsFile: /run/sealmesh/tb-1a2b3c/ca-bundle.crt }
//! nodes:
//!   - { name: node-0, ip: 172.18.0.2, podCidr: 10.244.0.0/24, cgroup: /sys/fs/cgroup/sealmesh/tb-1a2b3c/node-0, tokenFile: /run/.../node-0.token }
//! namespaces:
//!   - { name: emojivoto, labels: { sealmesh.io/mesh: enabled }, annotations: { sealmesh.io/inbound-policy: strict } }
//! pods:
//!   - { name: web-0, namespace: emojivoto, serviceAccount: web, ip: 10.244.0.2, node: node-0, cgroup: /sys/fs/cgroup/.../web-0, labels: { app: web } }
//! services:
//!   - { name: web-svc, namespace: emojivoto, vip: 10.96.0.10, ports: [{ port: 80, targetPort: 8080 }], selector: { app: web } }
//! serviceCidr: 10.96.0.0/16
//! authorizationPolicies:
//!   - { name: web-from-frontend, namespace: emojivoto, spec: { selector: { matchLabels: { app: web } }, rules: [{ from: [{ source: { principals: [cluster.local/ns/emojivoto/sa/frontend] } }] }] } }
//! ```

use std::{
    collections::{BTreeMap, HashSet},
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::{
    authz::{self, AuthorizationPolicy},
    consts::{
        DEFAULT_CONTROL_NAMESPACE, DEFAULT_TRUST_DOMAIN, INBOUND_POLICY_ANNOTATION, MESH_LABEL,
        MESH_OPT_OUT_ANNOTATION,
    },
    identity::{self, Identity, TrustDomain},
    mesh,
    policy::InboundPolicyAnnotations,
};

pub const API_VERSION: &str = "sealmesh.io/v1alpha1";
pub const KIND: &str = "Cluster";

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot read cluster file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write cluster file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cluster file is not valid YAML for the schema: {0}")]
    Parse(#[from] serde_yaml_ng::Error),
    #[error("cluster file has apiVersion/kind {found:?}; expected {API_VERSION}/{KIND}")]
    WrongKind { found: String },
    #[error("invalid cluster file: {0}")]
    Invalid(String),
}

fn invalid(msg: impl Into<String>) -> ClusterError {
    ClusterError::Invalid(msg.into())
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterFile {
    pub api_version: String,
    pub kind: String,
    /// Unique name of this cluster (the testbed id).
    pub name: String,
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    #[serde(default = "default_control_namespace")]
    pub control_namespace: String,
    /// Where the identity service is and which anchors it chains to; absent
    /// until a control plane is deployed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<IdentityEndpoint>,
    pub nodes: Vec<Node>,
    #[serde(default)]
    pub namespaces: Vec<Namespace>,
    #[serde(default)]
    pub service_accounts: Vec<ServiceAccount>,
    #[serde(default)]
    pub pods: Vec<Pod>,
    #[serde(default)]
    pub services: Vec<Service>,
    /// The range Service VIPs are allocated from (kube-apiserver's
    /// `--service-cluster-ip-range`); absent in files written before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_cidr: Option<Ipv4Net>,
    /// Who may connect to whom (`crate::authz`), as the cluster's
    /// `AuthorizationPolicy` objects would say.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub authorization_policies: Vec<AuthorizationPolicy>,
}

fn default_trust_domain() -> String {
    DEFAULT_TRUST_DOMAIN.to_owned()
}

fn default_control_namespace() -> String {
    DEFAULT_CONTROL_NAMESPACE.to_owned()
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IdentityEndpoint {
    /// gRPC address of the identity service, reachable from every node.
    pub address: SocketAddr,
    /// PEM bundle of trust anchors (may hold several roots during rotation).
    pub trust_anchors_file: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Node {
    pub name: String,
    /// Node IP on the underlay network (kind-like 172.18.0.0/16).
    pub ip: Ipv4Addr,
    /// CIDR the node's pods get addresses from.
    pub pod_cidr: Ipv4Net,
    /// Absolute path of the node's cgroup v2 directory; pod cgroups are below it.
    pub cgroup: PathBuf,
    /// File holding this node's agent credential for the identity service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// Network namespace the node lives in (testbed only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Namespace {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// E.g. `sealmesh.io/inbound-policy`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceAccount {
    pub name: String,
    pub namespace: String,
    /// File holding a token of this ServiceAccount (workload-mode Certify).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Pod {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub ip: Ipv4Addr,
    /// Name of the node the pod is scheduled on.
    pub node: String,
    /// Absolute path of the pod's cgroup v2 directory.
    pub cgroup: PathBuf,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// Network namespace the pod lives in (testbed only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    /// The Service's virtual (cluster) IP.
    pub vip: Ipv4Addr,
    pub ports: Vec<ServicePort>,
    /// Pods whose labels include all of these are the Service's endpoints.
    pub selector: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub port: u16,
    pub target_port: u16,
}

impl ClusterFile {
    /// An empty, valid cluster description.
    pub fn new(name: &str) -> Self {
        Self {
            api_version: API_VERSION.to_owned(),
            kind: KIND.to_owned(),
            name: name.to_owned(),
            trust_domain: default_trust_domain(),
            control_namespace: default_control_namespace(),
            identity: None,
            nodes: Vec::new(),
            namespaces: Vec::new(),
            service_accounts: Vec::new(),
            pods: Vec::new(),
            services: Vec::new(),
            service_cidr: None,
            authorization_policies: Vec::new(),
        }
    }

    /// Reads, parses and validates a cluster file.
    pub fn load(path: &Path) -> Result<Self, ClusterError> {
        let text = std::fs::read_to_string(path).map_err(|source| ClusterError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_yaml(&text)
    }

    /// Parses and validates a cluster description.
    pub fn from_yaml(text: &str) -> Result<Self, ClusterError> {
        let file: Self = serde_yaml_ng::from_str(text)?;
        file.validate()?;
        Ok(file)
    }

    pub fn to_yaml(&self) -> String {
        serde_yaml_ng::to_string(self).expect("cluster file serialises")
    }

    /// Validates, then writes the file atomically (write + rename) so readers
    /// never see half a file.
    pub fn save(&self, path: &Path) -> Result<(), ClusterError> {
        self.validate()?;
        let tmp = path.with_extension("yaml.tmp");
        let write = |source| ClusterError::Write {
            path: path.to_owned(),
            source,
        };
        std::fs::write(&tmp, self.to_yaml()).map_err(write)?;
        std::fs::rename(&tmp, path).map_err(write)
    }

    pub fn trust_domain(&self) -> Result<TrustDomain, ClusterError> {
        TrustDomain::new(&self.trust_domain, &self.control_namespace)
            .map_err(|e| invalid(e.to_string()))
    }

    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The nodes' names, comma-separated (for errors naming a missing node).
    pub fn node_names(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn pods_on<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Pod> + 'a {
        self.pods.iter().filter(move |p| p.node == node)
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<&Pod> {
        self.pods
            .iter()
            .find(|p| p.namespace == namespace && p.name == name)
    }

    pub fn pod_by_ip(&self, ip: Ipv4Addr) -> Option<&Pod> {
        self.pods.iter().find(|p| p.ip == ip)
    }

    pub fn namespace(&self, name: &str) -> Option<&Namespace> {
        self.namespaces.iter().find(|n| n.name == name)
    }

    pub fn service_by_vip(&self, vip: Ipv4Addr) -> Option<&Service> {
        self.services.iter().find(|s| s.vip == vip)
    }

    /// Pods selected by a Service (its endpoints), in file order.
    pub fn endpoints<'a>(&'a self, service: &'a Service) -> impl Iterator<Item = &'a Pod> + 'a {
        self.pods.iter().filter(move |p| {
            p.namespace == service.namespace
                && service
                    .selector
                    .iter()
                    .all(|(k, v)| p.labels.get(k) == Some(v))
        })
    }

    /// A pod is meshed when its namespace carries `sealmesh.io/mesh=enabled`
    /// and the pod has not opted out with the `sealmesh.io/mesh=disabled`
    /// annotation.
    pub fn is_meshed(&self, pod: &Pod) -> bool {
        mesh::is_meshed(
            self.namespace(&pod.namespace)
                .and_then(|ns| ns.labels.get(MESH_LABEL))
                .map(String::as_str),
            pod.annotations
                .get(MESH_OPT_OUT_ANNOTATION)
                .map(String::as_str),
        )
    }

    /// What the `sealmesh.io/inbound-policy` annotations of a pod and its
    /// namespace say (the agent's default applies where neither does).
    pub fn inbound_policy_annotations(&self, pod: &Pod) -> InboundPolicyAnnotations {
        let annotation = |annotations: &BTreeMap<String, String>| {
            annotations.get(INBOUND_POLICY_ANNOTATION).cloned()
        };
        let namespace = self
            .namespace(&pod.namespace)
            .and_then(|ns| annotation(&ns.annotations));
        InboundPolicyAnnotations::read(
            annotation(&pod.annotations).as_deref(),
            namespace.as_deref(),
        )
    }

    /// The identity of a pod's ServiceAccount.
    pub fn identity_of(&self, pod: &Pod) -> Result<Identity, ClusterError> {
        self.trust_domain()?
            .identity(&pod.namespace, &pod.service_account)
            .map_err(|e| invalid(format!("pod {}/{}: {e}", pod.namespace, pod.name)))
    }

    /// Checks everything the schema cannot express; messages name the
    /// offending entry.
    pub fn validate(&self) -> Result<(), ClusterError> {
        if self.api_version != API_VERSION || self.kind != KIND {
            return Err(ClusterError::WrongKind {
                found: format!("{}/{}", self.api_version, self.kind),
            });
        }
        if self.name.is_empty() {
            return Err(invalid("name must not be empty"));
        }
        let trust_domain = self.trust_domain()?;

        let mut node_names = HashSet::new();
        let mut node_ips = HashSet::new();
        for (i, node) in self.nodes.iter().enumerate() {
            let what = format!("nodes[{i}] ({})", node.name);
            if node.name.is_empty() {
                return Err(invalid(format!("{what}: name must not be empty")));
            }
            if !node_names.insert(node.name.as_str()) {
                return Err(invalid(format!("{what}: duplicate node name")));
            }
            if !node_ips.insert(node.ip) {
                return Err(invalid(format!(
                    "{what}: ip {} is used by another node",
                    node.ip
                )));
            }
            check_absolute(&what, "cgroup", &node.cgroup)?;
            if let Some(other) = self.nodes[..i].iter().find(|o| {
                o.pod_cidr.contains(&node.pod_cidr.network())
                    || node.pod_cidr.contains(&o.pod_cidr.network())
            }) {
                return Err(invalid(format!(
                    "{what}: podCidr {} overlaps podCidr {} of node {}",
                    node.pod_cidr, other.pod_cidr, other.name
                )));
            }
        }

        let mut namespaces = HashSet::new();
        for ns in &self.namespaces {
            identity::check_name(&ns.name).map_err(|e| invalid(format!("namespace: {e}")))?;
            if !namespaces.insert(ns.name.as_str()) {
                return Err(invalid(format!("namespace {} is listed twice", ns.name)));
            }
        }
        let declared = |what: &str, ns: &str| {
            if namespaces.contains(ns) {
                Ok(())
            } else {
                Err(invalid(format!(
                    "{what}: namespace {ns:?} is not listed under namespaces"
                )))
            }
        };

        for sa in &self.service_accounts {
            let what = format!("serviceAccount {}/{}", sa.namespace, sa.name);
            declared(&what, &sa.namespace)?;
            trust_domain
                .identity(&sa.namespace, &sa.name)
                .map_err(|e| invalid(format!("{what}: {e}")))?;
        }

        let mut pod_names = HashSet::new();
        let mut pod_ips = HashSet::new();
        for pod in &self.pods {
            let what = format!("pod {}/{}", pod.namespace, pod.name);
            declared(&what, &pod.namespace)?;
            trust_domain
                .identity(&pod.namespace, &pod.service_account)
                .map_err(|e| invalid(format!("{what}: serviceAccount: {e}")))?;
            if !pod_names.insert((pod.namespace.as_str(), pod.name.as_str())) {
                return Err(invalid(format!("{what}: duplicate pod")));
            }
            let node = self.node(&pod.node).ok_or_else(|| {
                invalid(format!(
                    "{what}: node {:?} is not listed under nodes",
                    pod.node
                ))
            })?;
            if !node.pod_cidr.contains(&pod.ip) {
                return Err(invalid(format!(
                    "{what}: ip {} is outside podCidr {} of node {}",
                    pod.ip, node.pod_cidr, node.name
                )));
            }
            if !pod_ips.insert(pod.ip) {
                return Err(invalid(format!(
                    "{what}: ip {} is used by another pod",
                    pod.ip
                )));
            }
            check_absolute(&what, "cgroup", &pod.cgroup)?;
        }

        let mut vips = HashSet::new();
        let mut services = HashSet::new();
        for svc in &self.services {
            let what = format!("service {}/{}", svc.namespace, svc.name);
            declared(&what, &svc.namespace)?;
            if !services.insert((svc.namespace.as_str(), svc.name.as_str())) {
                return Err(invalid(format!("{what}: duplicate service")));
            }
            if !vips.insert(svc.vip) || pod_ips.contains(&svc.vip) || node_ips.contains(&svc.vip) {
                return Err(invalid(format!("{what}: vip {} is already used", svc.vip)));
            }
            if let Some(range) = self.service_cidr
                && !range.contains(&svc.vip)
            {
                return Err(invalid(format!(
                    "{what}: vip {} is outside serviceCidr {range}",
                    svc.vip
                )));
            }
            if svc.ports.is_empty() {
                return Err(invalid(format!("{what}: needs at least one port")));
            }
            let mut ports = HashSet::new();
            for p in &svc.ports {
                if p.port == 0 || p.target_port == 0 {
                    return Err(invalid(format!("{what}: ports must be 1-65535")));
                }
                if !ports.insert(p.port) {
                    return Err(invalid(format!("{what}: port {} is listed twice", p.port)));
                }
            }
            if svc.selector.is_empty() {
                return Err(invalid(format!("{what}: selector must not be empty")));
            }
        }

        let mut policies = HashSet::new();
        for policy in &self.authorization_policies {
            let what = format!("authorizationPolicy {}/{}", policy.namespace, policy.name);
            declared(&what, &policy.namespace)?;
            identity::check_service_account_name(&policy.name).map_err(|_| {
                invalid(format!(
                    "{what}: name must be a lowercase RFC 1123 subdomain"
                ))
            })?;
            if !policies.insert((policy.namespace.as_str(), policy.name.as_str())) {
                return Err(invalid(format!("{what}: duplicate policy")));
            }
            authz::validate(&policy.spec).map_err(|e| invalid(format!("{what}: spec.{e}")))?;
        }
        Ok(())
    }
}

fn check_absolute(what: &str, field: &str, path: &Path) -> Result<(), ClusterError> {
    if path.is_absolute() {
        Ok(())
    } else {
        Err(invalid(format!(
            "{what}: {field} must be an absolute path, got {}",
            path.display()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{InboundPolicy, InboundPolicySource};

    const GOOD: &str = r#"
apiVersion: sealmesh.io/v1alpha1
kind: Cluster
name: tb-test
identity: { address: "172.18.0.1:8080", trustAnchorsFile: /tmp/ca.crt }
nodes:
  - { name: node-0, ip: 172.18.0.2, podCidr: 10.244.0.0/24, cgroup: /sys/fs/cgroup/x/node-0 }
  - { name: node-1, ip: 172.18.0.3, podCidr: 10.244.1.0/24, cgroup: /sys/fs/cgroup/x/node-1 }
namespaces:
  - { name: emojivoto, labels: { sealmesh.io/mesh: enabled }, annotations: { sealmesh.io/inbound-policy: strict } }
  - { name: plain }
pods:
  - { name: web-0, namespace: emojivoto, serviceAccount: web, ip: 10.244.0.2, node: node-0, cgroup: /sys/fs/cgroup/x/node-0/web-0, labels: { app: web } }
  - { name: web-1, namespace: emojivoto, serviceAccount: web, ip: 10.244.1.2, node: node-1, cgroup: /sys/fs/cgroup/x/node-1/web-1, labels: { app: web }, annotations: { sealmesh.io/mesh: disabled, sealmesh.io/inbound-policy: permissive } }
  - { name: curl, namespace: plain, serviceAccount: default, ip: 10.244.1.3, node: node-1, cgroup: /sys/fs/cgroup/x/node-1/curl }
services:
  - { name: web-svc, namespace: emojivoto, vip: 10.96.0.10, ports: [{ port: 80, targetPort: 8080 }], selector: { app: web } }
authorizationPolicies:
  - { name: web-allow, namespace: emojivoto, annotations: { sealmesh.io/dry-run: "true" }, spec: { selector: { matchLabels: { app: web } }, rules: [{ from: [{ source: { namespaces: [emojivoto] } }], to: [{ operation: { ports: [8080] } }] }] } }
"#;

    #[test]
    fn parses_a_good_file_and_answers_queries() {
        let c = ClusterFile::from_yaml(GOOD).unwrap();
        assert_eq!(c.trust_domain, "cluster.local");
        assert_eq!(c.control_namespace, "sealmesh");
        assert_eq!(c.pods_on("node-1").count(), 2);
        let web0 = c.pod("emojivoto", "web-0").unwrap();
        assert!(c.is_meshed(web0));
        assert!(
            !c.is_meshed(c.pod("emojivoto", "web-1").unwrap()),
            "opted out"
        );
        assert!(
            !c.is_meshed(c.pod("plain", "curl").unwrap()),
            "namespace not labelled"
        );
        let svc = c.service_by_vip("10.96.0.10".parse().unwrap()).unwrap();
        let eps: Vec<_> = c.endpoints(svc).map(|p| p.name.as_str()).collect();
        assert_eq!(eps, ["web-0", "web-1"]);
        assert_eq!(
            c.identity_of(web0).unwrap().spiffe_uri(),
            "spiffe://cluster.local/ns/emojivoto/sa/web"
        );
        let policy = |ns: &str, pod: &str| {
            c.inbound_policy_annotations(c.pod(ns, pod).unwrap())
                .resolve(InboundPolicy::Permissive)
        };
        assert_eq!(
            policy("emojivoto", "web-0"),
            (
                InboundPolicy::Strict,
                InboundPolicySource::NamespaceAnnotation
            )
        );
        assert_eq!(
            policy("emojivoto", "web-1"),
            (
                InboundPolicy::Permissive,
                InboundPolicySource::PodAnnotation
            )
        );
        assert_eq!(
            policy("plain", "curl"),
            (
                InboundPolicy::Permissive,
                InboundPolicySource::ClusterDefault
            )
        );
        // Round trip.
        assert_eq!(ClusterFile::from_yaml(&c.to_yaml()).unwrap(), c);
    }

    fn rejected(yaml: &str) -> String {
        ClusterFile::from_yaml(yaml).unwrap_err().to_string()
    }

    #[test]
    fn rejects_malformed_files_with_clear_messages() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "kind: Cluster",
                "kind: Pod",
                "apiVersion/kind \"sealmesh.io/v1alpha1/Pod\"",
            ),
            (
                "ip: 172.18.0.3",
                "ip: 172.18.0.2",
                "ip 172.18.0.2 is used by another node",
            ),
            (
                "podCidr: 10.244.1.0/24",
                "podCidr: 10.244.0.0/16",
                "overlaps podCidr 10.244.0.0/24 of node node-0",
            ),
            (
                "ip: 10.244.1.3",
                "ip: 10.244.0.3",
                "pod plain/curl: ip 10.244.0.3 is outside podCidr 10.244.1.0/24 of node node-1",
            ),
            (
                "node: node-0",
                "node: node-9",
                "pod emojivoto/web-0: node \"node-9\" is not listed under nodes",
            ),
            (
                "- { name: plain }",
                "- { name: other }",
                "pod plain/curl: namespace \"plain\" is not listed",
            ),
            (
                "serviceAccount: default",
                "serviceAccount: Default",
                "pod plain/curl: serviceAccount: \"Default\" is not a valid Kubernetes ServiceAccount name",
            ),
            (
                "serviceAccount: default",
                "serviceAccount: a.b-ok.c.but-this-part-is-longer-than-any-dns-label-may-be-at-sixty-four1",
                "pod plain/curl: serviceAccount: ServiceAccount plain/a.b-ok.c.but-this-part-is-longer-than-any-dns-label-may-be-at-sixty-four1 cannot be named in a certificate",
            ),
            (
                "cgroup: /sys/fs/cgroup/x/node-1/curl",
                "cgroup: relative/curl",
                "cgroup must be an absolute path",
            ),
            (
                "vip: 10.96.0.10",
                "vip: 10.244.0.2",
                "vip 10.244.0.2 is already used",
            ),
            (
                "name: tb-test",
                "name: tb-test\nserviceCidr: 10.97.0.0/16",
                "service emojivoto/web-svc: vip 10.96.0.10 is outside serviceCidr 10.97.0.0/16",
            ),
            ("targetPort: 8080", "targetPort: 0", "ports must be 1-65535"),
            (
                "selector: { app: web }",
                "selector: {}",
                "selector must not be empty",
            ),
            (
                "name: tb-test",
                "name: tb-test\ncolour: blue",
                "unknown field `colour`",
            ),
            (
                "ip: 172.18.0.2,",
                "ip: 999.1.1.1,",
                "invalid IPv4 address syntax",
            ),
            (
                "ports: [8080] }",
                "ports: [80800] }",
                "authorizationPolicy emojivoto/web-allow: spec.rules[0].to[0].operation.ports[0]: \"80800\" is not a port",
            ),
            (
                "name: web-allow, namespace: emojivoto",
                "name: web-allow, namespace: nowhere",
                "authorizationPolicy nowhere/web-allow: namespace \"nowhere\" is not listed",
            ),
            (
                "operation: { ports:",
                "operation: { methods: [GET], ports:",
                "unknown field `methods`",
            ),
        ];
        for (from, to, expected) in cases {
            assert!(GOOD.contains(from), "test case {from:?} does not apply");
            let msg = rejected(&GOOD.replacen(from, to, 1));
            assert!(
                msg.contains(expected),
                "{from} -> {to}: got {msg:?}, expected it to contain {expected:?}"
            );
        }
    }

    #[test]
    fn load_names_the_missing_file() {
        let err = ClusterFile::load(Path::new("/nonexistent/cluster.yaml")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot read cluster file /nonexistent/cluster.yaml"),
            "{err}"
        );
    }
}
