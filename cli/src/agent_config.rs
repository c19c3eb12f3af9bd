//! An agent's effective configuration as its admin API dumps it (YAML,
//! secrets redacted), read by the commands that explain its behaviour.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use sealmesh_common::policy::InboundPolicy;

/// The agent's policy flags, read from its configuration dump.
#[derive(Debug, Default, serde::Deserialize)]
pub struct Policy {
    #[serde(default)]
    pub deny_plaintext: bool,
    #[serde(default)]
    pub force_mtls_local: bool,
    #[serde(default)]
    pub default_inbound_policy: InboundPolicy,
}

/// What the CLI reads of an agent's configuration dump (GetConfig): the
/// settings the agent enforces, so the CLI explains with the agent's values
/// rather than assumed defaults. Fields an older agent lacks are defaults.
#[derive(Debug, Default, serde::Deserialize)]
pub struct ConfigDumpView {
    #[serde(default)]
    pub policy: Policy,
    pub plaintext_exemptions: Option<PlaintextExemptions>,
    pub trust_domain: Option<String>,
    #[serde(default)]
    pub cluster_networks: ClusterNetworks,
}

impl ConfigDumpView {
    /// An unreadable dump tells nothing: every setting is its default.
    pub fn parse(yaml: &str) -> Self {
        serde_yaml_ng::from_str(yaml).unwrap_or_default()
    }
}

/// The networks an agent holds connections to as the cluster's (besides, in
/// Kubernetes mode, every Node's podCIDRs).
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub struct ClusterNetworks {
    #[serde(default)]
    pub service_cidrs: Vec<Ipv4Net>,
    #[serde(default)]
    pub pod_cidrs: Vec<Ipv4Net>,
}

impl ClusterNetworks {
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        self.service_cidrs
            .iter()
            .chain(&self.pod_cidrs)
            .any(|net| net.contains(&ip))
    }
}

/// The destinations an agent's --deny-plaintext still lets through, from its
/// configuration dump.
#[derive(Debug, Default, serde::Deserialize)]
pub struct PlaintextExemptions {
    #[serde(default)]
    pub services: Vec<String>,
    #[serde(default)]
    pub cidrs: Vec<String>,
    #[serde(default)]
    pub ports: Vec<u16>,
}

impl PlaintextExemptions {
    /// E.g. "the Services default/kubernetes, kube-system/kube-dns by ClusterIP, port 53".
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.services.is_empty() {
            parts.push(format!(
                "the Services {} by ClusterIP",
                self.services.join(", ")
            ));
        }
        if !self.cidrs.is_empty() {
            parts.push(format!("the networks {}", self.cidrs.join(", ")));
        }
        if !self.ports.is_empty() {
            let ports: Vec<String> = self.ports.iter().map(u16::to_string).collect();
            parts.push(format!("port {}", ports.join(", ")));
        }
        if parts.is_empty() {
            "nothing".into()
        } else {
            parts.join(", ")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_settings_the_agent_enforces_and_defaults_what_it_lacks() {
        let dump = ConfigDumpView::parse(
            "mode: kubernetes\ntrust_domain: example.org\npolicy:\n  deny_plaintext: true\n\
             cluster_networks:\n  service_cidrs: [10.0.0.0/24]\n  pod_cidrs: []\n  also: spec.podCIDRs\n",
        );
        assert_eq!(dump.trust_domain.as_deref(), Some("example.org"));
        assert!(dump.policy.deny_plaintext);
        assert!(dump.cluster_networks.contains(Ipv4Addr::new(10, 0, 0, 171)));
        assert!(!dump.cluster_networks.contains(Ipv4Addr::new(10, 96, 0, 10)));
        let old = ConfigDumpView::parse("node: node-0\n");
        assert_eq!(old.trust_domain, None);
        assert!(old.cluster_networks.service_cidrs.is_empty());
        assert!(
            ConfigDumpView::parse(": not yaml [")
                .plaintext_exemptions
                .is_none()
        );
    }
}
