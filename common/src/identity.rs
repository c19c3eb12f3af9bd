//! Workload identity names. The only module that formats or parses them.
//!
//! A ServiceAccount `<ns>/<sa>` in trust domain `<td>` is named two ways:
//! - SPIFFE URI SAN: `spiffe://<td>/ns/<ns>/sa/<sa>` (what peers authorise on);
//! - DNS SAN: `<sa>.<ns>.serviceaccount.identity.<control-ns>.<td>` (Linkerd's
//!   form; also the TLS SNI a client sends to ask for that identity).

use std::fmt;

use crate::consts::{DEFAULT_CONTROL_NAMESPACE, DEFAULT_TRUST_DOMAIN};

const SPIFFE_SCHEME: &str = "spiffe://";
const DNS_SERVICEACCOUNT_LABEL: &str = "serviceaccount.identity";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error(
        "{0:?} is not a valid Kubernetes name (lowercase RFC 1123 label, 1-63 characters of a-z, 0-9 and '-', starting and ending alphanumeric)"
    )]
    InvalidName(String),
    #[error("{0:?} is not a valid trust domain (lowercase DNS name such as cluster.local)")]
    InvalidTrustDomain(String),
    #[error(
        "{uri:?} is not a sealmesh SPIFFE identity: expected spiffe://{trust_domain}/ns/<namespace>/sa/<serviceaccount>"
    )]
    InvalidSpiffeUri { uri: String, trust_domain: String },
    #[error(
        "{name:?} is not a sealmesh identity DNS name: expected <serviceaccount>.<namespace>.{suffix}"
    )]
    InvalidDnsName { name: String, suffix: String },
}

/// Names the trust domain and control namespace identities live in.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TrustDomain {
    domain: String,
    control_namespace: String,
}

impl Default for TrustDomain {
    fn default() -> Self {
        Self {
            domain: DEFAULT_TRUST_DOMAIN.to_owned(),
            control_namespace: DEFAULT_CONTROL_NAMESPACE.to_owned(),
        }
    }
}

impl TrustDomain {
    pub fn new(domain: &str, control_namespace: &str) -> Result<Self, IdentityError> {
        let domain_ok =
            !domain.is_empty() && domain.len() <= 253 && domain.split('.').all(is_dns_label);
        if !domain_ok {
            return Err(IdentityError::InvalidTrustDomain(domain.to_owned()));
        }
        check_name(control_namespace)?;
        Ok(Self {
            domain: domain.to_owned(),
            control_namespace: control_namespace.to_owned(),
        })
    }

    pub fn domain(&self) -> &str {
        &self.domain
    }

    pub fn control_namespace(&self) -> &str {
        &self.control_namespace
    }

    /// `serviceaccount.identity.<control-ns>.<td>`: the DNS suffix of identities.
    pub fn dns_suffix(&self) -> String {
        format!(
            "{DNS_SERVICEACCOUNT_LABEL}.{}.{}",
            self.control_namespace, self.domain
        )
    }

    pub fn identity(
        &self,
        namespace: &str,
        service_account: &str,
    ) -> Result<Identity, IdentityError> {
        check_name(namespace)?;
        check_name(service_account)?;
        Ok(Identity {
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            trust_domain: self.clone(),
        })
    }

    /// Parses `spiffe://<td>/ns/<ns>/sa/<sa>` of this trust domain.
    pub fn parse_spiffe_uri(&self, uri: &str) -> Result<Identity, IdentityError> {
        let bad = || IdentityError::InvalidSpiffeUri {
            uri: uri.to_owned(),
            trust_domain: self.domain.clone(),
        };
        let rest = uri.strip_prefix(SPIFFE_SCHEME).ok_or_else(bad)?;
        let path = rest
            .strip_prefix(self.domain.as_str())
            .and_then(|p| p.strip_prefix('/'))
            .ok_or_else(bad)?;
        match path.split('/').collect::<Vec<_>>().as_slice() {
            ["ns", ns, "sa", sa] => self.identity(ns, sa).map_err(|_| bad()),
            _ => Err(bad()),
        }
    }

    /// Parses `<sa>.<ns>.serviceaccount.identity.<control-ns>.<td>`.
    pub fn parse_dns_name(&self, name: &str) -> Result<Identity, IdentityError> {
        let suffix = self.dns_suffix();
        let bad = || IdentityError::InvalidDnsName {
            name: name.to_owned(),
            suffix: suffix.clone(),
        };
        let head = name
            .strip_suffix(suffix.as_str())
            .and_then(|h| h.strip_suffix('.'))
            .ok_or_else(bad)?;
        match head.split('.').collect::<Vec<_>>().as_slice() {
            [sa, ns] => self.identity(ns, sa).map_err(|_| bad()),
            _ => Err(bad()),
        }
    }

    /// Parses either form: a SPIFFE URI or an identity DNS name.
    pub fn parse(&self, text: &str) -> Result<Identity, IdentityError> {
        if text.starts_with(SPIFFE_SCHEME) {
            self.parse_spiffe_uri(text)
        } else {
            self.parse_dns_name(text)
        }
    }
}

/// A ServiceAccount's identity within a trust domain.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Identity {
    namespace: String,
    service_account: String,
    trust_domain: TrustDomain,
}

impl Identity {
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// `spiffe://<td>/ns/<ns>/sa/<sa>`
    pub fn spiffe_uri(&self) -> String {
        format!(
            "{SPIFFE_SCHEME}{}/ns/{}/sa/{}",
            self.trust_domain.domain, self.namespace, self.service_account
        )
    }

    /// `<sa>.<ns>.serviceaccount.identity.<control-ns>.<td>`
    pub fn dns_name(&self) -> String {
        format!(
            "{}.{}.{}",
            self.service_account,
            self.namespace,
            self.trust_domain.dns_suffix()
        )
    }
}

/// Displays the SPIFFE URI, the form operators see in logs and `tap`.
impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.spiffe_uri())
    }
}

fn is_dns_label(label: &str) -> bool {
    let bytes = label.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

/// Checks a Kubernetes namespace or ServiceAccount name (RFC 1123 label).
pub fn check_name(name: &str) -> Result<(), IdentityError> {
    if is_dns_label(name) {
        Ok(())
    } else {
        Err(IdentityError::InvalidName(name.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_both_names() {
        let id = TrustDomain::default().identity("emojivoto", "web").unwrap();
        assert_eq!(
            id.spiffe_uri(),
            "spiffe://cluster.local/ns/emojivoto/sa/web"
        );
        assert_eq!(
            id.dns_name(),
            "web.emojivoto.serviceaccount.identity.sealmesh.cluster.local"
        );
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/emojivoto/sa/web");
    }

    #[test]
    fn parses_what_it_formats() {
        let td = TrustDomain::new("example.org", "mesh-system").unwrap();
        let id = td.identity("ns1", "sa-1").unwrap();
        assert_eq!(td.parse(&id.spiffe_uri()).unwrap(), id);
        assert_eq!(td.parse(&id.dns_name()).unwrap(), id);
        assert_eq!(
            id.dns_name(),
            "sa-1.ns1.serviceaccount.identity.mesh-system.example.org"
        );
    }

    #[test]
    fn rejects_foreign_or_malformed_names() {
        let td = TrustDomain::default();
        for uri in [
            "spiffe://other.domain/ns/a/sa/b",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            "spiffe://cluster.local/ns/a/x/b",
            "spiffe://cluster.local/ns/A/sa/b",
            "spiffe://cluster.localx/ns/a/sa/b",
        ] {
            assert!(
                matches!(td.parse(uri), Err(IdentityError::InvalidSpiffeUri { .. })),
                "{uri}"
            );
        }
        for dns in [
            "web.emojivoto.serviceaccount.identity.other.cluster.local",
            "a.b.web.serviceaccount.identity.sealmesh.cluster.local",
            "serviceaccount.identity.sealmesh.cluster.local",
            "web.emojivoto",
        ] {
            assert!(
                matches!(td.parse(dns), Err(IdentityError::InvalidDnsName { .. })),
                "{dns}"
            );
        }
        assert_eq!(
            td.identity("ns", "-bad").unwrap_err(),
            IdentityError::InvalidName("-bad".into())
        );
        assert!(TrustDomain::new("Bad_Domain", "sealmesh").is_err());
    }
}
