//! Workload identity names. The only module that formats or parses them.
//!
//! A ServiceAccount `<ns>/<sa>` in trust domain `<td>` is named two ways:
//! - SPIFFE URI SAN: `spiffe://<td>/ns/<ns>/sa/<sa>` (what peers authorise on);
//! - DNS SAN: `<sa>.<ns>.serviceaccount.identity.<control-ns>.<td>` (Linkerd's
//!   form; also the TLS SNI a client sends to ask for that identity).
//!
//! Namespaces are RFC 1123 labels; ServiceAccount names are RFC 1123
//! subdomains (`a.b` is valid), so the DNS form stays unambiguous: the label
//! before the suffix is the namespace, everything before it the
//! ServiceAccount. A name Kubernetes accepts but a certificate cannot carry
//! (a label over 63 characters, or a DNS name over 253) is refused as
//! [`IdentityError::Unrepresentable`].

use std::fmt;

use crate::consts::{
    DEFAULT_CONTROL_NAMESPACE, DEFAULT_TRUST_DOMAIN,
    kube::{CLUSTER_DNS_DOMAIN, IDENTITY_NAME},
};

pub const SPIFFE_SCHEME: &str = "spiffe://";
const DNS_SERVICEACCOUNT_LABEL: &str = "serviceaccount.identity";
/// Longest DNS name (RFC 1035, as TLS server names and DNS SANs are checked).
const MAX_DNS_NAME: usize = 253;
/// Longest DNS label, and longest Kubernetes namespace name.
const MAX_DNS_LABEL: usize = 63;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error(
        "{0:?} is not a valid Kubernetes name (lowercase RFC 1123 label, 1-63 characters of a-z, 0-9 and '-', starting and ending alphanumeric)"
    )]
    InvalidName(String),
    #[error(
        "{0:?} is not a valid Kubernetes ServiceAccount name (lowercase RFC 1123 subdomain: at most 253 characters of a-z, 0-9, '-' and '.', each dot-separated part starting and ending alphanumeric)"
    )]
    InvalidServiceAccountName(String),
    #[error(
        "ServiceAccount {namespace}/{service_account} cannot be named in a certificate: {reason}; rename the ServiceAccount (or use a shorter namespace) to mesh its pods"
    )]
    Unrepresentable {
        namespace: String,
        service_account: String,
        reason: String,
    },
    #[error("{0:?} is not a valid trust domain (lowercase DNS name such as cluster.local)")]
    InvalidTrustDomain(String),
    #[error(
        "trust domain {domain:?} with control namespace {control_namespace:?} leaves no room for identity DNS names \
         (<serviceaccount>.<namespace>.serviceaccount.identity.<control-namespace>.<trust-domain>, at most 253 characters, \
         the identity service's own among them); use a trust domain of at most {max} characters"
    )]
    TrustDomainTooLong {
        domain: String,
        control_namespace: String,
        max: usize,
    },
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
        let domain_ok = !domain.is_empty()
            && domain.len() <= MAX_DNS_NAME
            && domain.split('.').all(is_dns_label);
        if !domain_ok {
            return Err(IdentityError::InvalidTrustDomain(domain.to_owned()));
        }
        check_name(control_namespace)?;
        let trust_domain = Self {
            domain: domain.to_owned(),
            control_namespace: control_namespace.to_owned(),
        };
        // The longest name that must always fit: the identity service's own.
        let service_dns_len =
            IDENTITY_NAME.len() + 1 + control_namespace.len() + 1 + trust_domain.dns_suffix().len();
        if service_dns_len > MAX_DNS_NAME {
            return Err(IdentityError::TrustDomainTooLong {
                domain: domain.to_owned(),
                control_namespace: control_namespace.to_owned(),
                max: domain.len() - (service_dns_len - MAX_DNS_NAME),
            });
        }
        Ok(trust_domain)
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

    /// The identity of ServiceAccount `<namespace>/<service_account>`: a
    /// namespace name (RFC 1123 label) and a ServiceAccount name (RFC 1123
    /// subdomain) whose DNS form is a valid DNS name.
    pub fn identity(
        &self,
        namespace: &str,
        service_account: &str,
    ) -> Result<Identity, IdentityError> {
        check_name(namespace)?;
        check_service_account_name(service_account)?;
        let unrepresentable = |reason: String| IdentityError::Unrepresentable {
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            reason,
        };
        if let Some(label) = service_account
            .split('.')
            .find(|label| label.len() > MAX_DNS_LABEL)
        {
            return Err(unrepresentable(format!(
                "its part {label:?} has {} characters, and a DNS label at most {MAX_DNS_LABEL}",
                label.len()
            )));
        }
        let dns_len = service_account.len() + 1 + namespace.len() + 1 + self.dns_suffix().len();
        if dns_len > MAX_DNS_NAME {
            return Err(unrepresentable(format!(
                "its identity DNS name <serviceaccount>.<namespace>.{} would have {dns_len} characters, and a DNS name at most {MAX_DNS_NAME} (in this namespace the ServiceAccount name may have at most {} characters)",
                self.dns_suffix(),
                service_account.len().saturating_sub(dns_len - MAX_DNS_NAME)
            )));
        }
        Ok(Identity {
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            trust_domain: self.clone(),
        })
    }

    /// The identity service's own identity: its ServiceAccount
    /// (`sealmesh-identity`) in the control namespace. It serves its gRPC
    /// API with a certificate for this identity, and clients check it.
    pub fn identity_service(&self) -> Identity {
        Identity {
            namespace: self.control_namespace.clone(),
            service_account: IDENTITY_NAME.to_owned(),
            trust_domain: self.clone(),
        }
    }

    /// The DNS names of the identity service's Kubernetes Service
    /// (`sealmesh-identity.<control-ns>.svc` and
    /// `sealmesh-identity.<control-ns>.svc.cluster.local`), which its serving
    /// certificate carries besides its identity's names.
    pub fn identity_service_hostnames(&self) -> [String; 2] {
        let short = format!("{IDENTITY_NAME}.{}.svc", self.control_namespace);
        let full = format!("{short}.{CLUSTER_DNS_DOMAIN}");
        [short, full]
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
        // Namespaces are labels: the last label is the namespace, the rest
        // the ServiceAccount (which may itself hold dots).
        let (sa, ns) = head.rsplit_once('.').ok_or_else(bad)?;
        self.identity(ns, sa).map_err(|_| bad())
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
        && bytes.len() <= MAX_DNS_LABEL
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

/// Checks a Kubernetes namespace (or pod) name: an RFC 1123 label.
pub fn check_name(name: &str) -> Result<(), IdentityError> {
    if is_dns_label(name) {
        Ok(())
    } else {
        Err(IdentityError::InvalidName(name.to_owned()))
    }
}

/// Checks a Kubernetes ServiceAccount name as the API server does: an RFC
/// 1123 subdomain (dot-separated parts of a-z, 0-9 and '-', each starting
/// and ending alphanumeric, at most 253 characters). Whether a certificate
/// can name it is [`TrustDomain::identity`]'s concern.
pub fn check_service_account_name(name: &str) -> Result<(), IdentityError> {
    let part_ok = |part: &str| {
        let bytes = part.as_bytes();
        !bytes.is_empty()
            && bytes
                .iter()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
            && bytes[0] != b'-'
            && bytes[bytes.len() - 1] != b'-'
    };
    if name.len() <= MAX_DNS_NAME && name.split('.').all(part_ok) {
        Ok(())
    } else {
        Err(IdentityError::InvalidServiceAccountName(name.to_owned()))
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
            "emojivoto.serviceaccount.identity.sealmesh.cluster.local",
            "serviceaccount.identity.sealmesh.cluster.local",
            "web..emojivoto.serviceaccount.identity.sealmesh.cluster.local",
            "web.emojivoto",
        ] {
            assert!(
                matches!(td.parse(dns), Err(IdentityError::InvalidDnsName { .. })),
                "{dns}"
            );
        }
        assert_eq!(
            td.identity("-bad", "sa").unwrap_err(),
            IdentityError::InvalidName("-bad".into())
        );
        assert_eq!(
            td.identity("a.b", "sa").unwrap_err(),
            IdentityError::InvalidName("a.b".into()),
            "namespaces are labels"
        );
        assert!(TrustDomain::new("Bad_Domain", "sealmesh").is_err());
        for sa in ["-bad", "a..b", ".a", "a.", "A.b", "a_b", "a.-b", ""] {
            assert_eq!(
                td.identity("ns", sa).unwrap_err(),
                IdentityError::InvalidServiceAccountName(sa.into()),
                "{sa}"
            );
        }
    }

    #[test]
    fn service_account_names_with_dots_are_identities_both_ways() {
        let td = TrustDomain::default();
        let id = td.identity("shop", "a.b").unwrap();
        assert_eq!(id.spiffe_uri(), "spiffe://cluster.local/ns/shop/sa/a.b");
        assert_eq!(
            id.dns_name(),
            "a.b.shop.serviceaccount.identity.sealmesh.cluster.local"
        );
        assert_eq!(td.parse(&id.spiffe_uri()).unwrap(), id);
        assert_eq!(td.parse(&id.dns_name()).unwrap(), id);
        assert_eq!(td.parse(&id.dns_name()).unwrap().service_account(), "a.b");
        // The namespace is always the last label before the suffix.
        let deep = td
            .parse("x.y.z.web.serviceaccount.identity.sealmesh.cluster.local")
            .unwrap();
        assert_eq!((deep.namespace(), deep.service_account()), ("web", "x.y.z"));
    }

    #[test]
    fn names_a_certificate_cannot_carry_are_refused_with_the_limit() {
        let td = TrustDomain::default();
        // Valid in Kubernetes (a subdomain), but a 64-character DNS label.
        let long_label = "a".repeat(64);
        let error = td.identity("shop", &long_label).unwrap_err();
        assert!(
            matches!(error, IdentityError::Unrepresentable { .. }),
            "{error}"
        );
        assert!(
            error
                .to_string()
                .contains("has 64 characters, and a DNS label at most 63"),
            "{error}"
        );
        // The whole DNS name: suffix (46) + namespace "shop" + 2 dots leave
        // 201 characters for the ServiceAccount.
        let fits = format!(
            "{}.{}.{}.{}",
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(9)
        );
        assert_eq!(fits.len(), 201);
        let id = td.identity("shop", &fits).unwrap();
        assert_eq!(id.dns_name().len(), 253);
        let too_long = format!("{fits}e");
        let error = td.identity("shop", &too_long).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!(
                "ServiceAccount shop/{too_long} cannot be named in a certificate: its identity DNS name \
                 <serviceaccount>.<namespace>.serviceaccount.identity.sealmesh.cluster.local would have 254 \
                 characters, and a DNS name at most 253 (in this namespace the ServiceAccount name may have \
                 at most 201 characters); rename the ServiceAccount (or use a shorter namespace) to mesh its pods"
            )
        );
        assert_eq!(
            td.identity("shop", &"a".repeat(254)).unwrap_err(),
            IdentityError::InvalidServiceAccountName("a".repeat(254))
        );
    }

    #[test]
    fn a_trust_domain_must_leave_room_for_the_identity_services_name() {
        // sealmesh-identity.sealmesh.serviceaccount.identity.sealmesh. = 60
        let longest = format!("{}.{}.{}.d", "a".repeat(63), "b".repeat(63), "c".repeat(63));
        assert_eq!(longest.len(), 193);
        let td = TrustDomain::new(&longest, "sealmesh").unwrap();
        assert_eq!(td.identity_service().dns_name().len(), 253);
        let error = TrustDomain::new(&format!("{longest}d"), "sealmesh").unwrap_err();
        assert!(
            matches!(error, IdentityError::TrustDomainTooLong { max: 193, .. }),
            "{error}"
        );
    }

    #[test]
    fn the_identity_service_has_an_identity_and_service_names() {
        let td = TrustDomain::new("example.org", "mesh-system").unwrap();
        let id = td.identity_service();
        assert_eq!(
            id.spiffe_uri(),
            "spiffe://example.org/ns/mesh-system/sa/sealmesh-identity"
        );
        assert_eq!(
            id.dns_name(),
            "sealmesh-identity.mesh-system.serviceaccount.identity.mesh-system.example.org"
        );
        assert_eq!(td.parse(&id.dns_name()).unwrap(), id);
        assert_eq!(
            td.identity_service_hostnames(),
            [
                "sealmesh-identity.mesh-system.svc",
                "sealmesh-identity.mesh-system.svc.cluster.local"
            ]
        );
    }
}
