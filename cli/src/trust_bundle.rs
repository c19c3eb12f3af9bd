//! `sealmesh check --trust-bundle <candidate.pem>`: before a trust-anchor
//! bundle replaces the current one (the file, or the
//! `sealmesh-identity-trust-roots` ConfigMap in Kubernetes), find the current
//! anchors that still sign the live issuer or a live leaf and that the
//! candidate would drop: removing such an anchor makes every agent reject
//! those certificates.

use rustls_pki_types::CertificateDer;
use sealmesh_pki::fingerprint;
use x509_parser::prelude::{FromDer as _, X509Certificate};

use crate::certview;

/// A certificate chain in use (leaf or CA first) and how to name it.
#[derive(Clone, Debug)]
pub struct LiveChain {
    /// e.g. `issuer CN=issuer.test` or `node-0 spiffe://.../sa/client`.
    pub label: String,
    pub chain: Vec<CertificateDer<'static>>,
}

/// A current anchor the candidate bundle lacks although live chains need it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemovedAnchor {
    pub subject: String,
    /// SHA-256 of the DER, as `openssl x509 -fingerprint -sha256` prints it.
    pub fingerprint: String,
    /// Labels of the live chains it signs.
    pub signs: Vec<String>,
}

impl RemovedAnchor {
    /// One line naming the anchor and (at most a few of) the chains it signs.
    pub fn describe(&self) -> String {
        const SHOWN: usize = 3;
        let mut signs = self.signs[..self.signs.len().min(SHOWN)].join(", ");
        if self.signs.len() > SHOWN {
            signs.push_str(&format!(" and {} more", self.signs.len() - SHOWN));
        }
        format!(
            "trust anchor {} (SHA256 fingerprint {}) is not in the candidate bundle but signs {signs}",
            self.subject, self.fingerprint
        )
    }
}

/// Subject and public key (DER) of a certificate: an anchor is "kept" when
/// the candidate has a certificate with both, since such a certificate (e.g.
/// the same root re-issued with a later expiry) verifies the same signatures.
fn identity_of(der: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    Some((
        cert.subject().as_raw().to_vec(),
        cert.public_key().raw.to_vec(),
    ))
}

fn subject_of(der: &[u8]) -> String {
    X509Certificate::from_der(der)
        .map(|(_, cert)| cert.subject().to_string())
        .unwrap_or_else(|_| "(unparsable certificate)".to_owned())
}

/// The anchors of `current` that sign (by signature, whatever the validity
/// periods) at least one of `live` and that `candidate` lacks, in `current`'s
/// order.
pub fn removed_signing_anchors(
    current: &[CertificateDer<'static>],
    candidate: &[CertificateDer<'static>],
    live: &[LiveChain],
) -> Vec<RemovedAnchor> {
    let kept: Vec<(Vec<u8>, Vec<u8>)> = candidate
        .iter()
        .filter_map(|der| identity_of(der))
        .collect();
    current
        .iter()
        .filter(|anchor| identity_of(anchor).is_none_or(|id| !kept.contains(&id)))
        .filter_map(|anchor| {
            let signs: Vec<String> = live
                .iter()
                .filter(|chain| {
                    certview::verify_ca_signatures(&chain.chain, std::slice::from_ref(anchor))
                        .is_ok()
                })
                .map(|chain| chain.label.clone())
                .collect();
            (!signs.is_empty()).then(|| RemovedAnchor {
                subject: subject_of(anchor),
                fingerprint: fingerprint(anchor),
                signs,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    use sealmesh_pki::{
        GeneratedCa,
        test_support::{DAY, new_issuer, new_root_named, pem_certs, workload_leaf},
    };

    use super::*;

    fn root(name: &str) -> GeneratedCa {
        new_root_named(name)
    }

    fn der(pem: &str) -> CertificateDer<'static> {
        pem_certs(pem).remove(0)
    }

    fn issuer(root: &GeneratedCa, name: &str) -> GeneratedCa {
        new_issuer(root, name, 10 * DAY)
    }

    /// A leaf signed by `issuer`, with the chain an agent reports (leaf, issuer).
    fn leaf_chain(issuer: &GeneratedCa, label: &str) -> LiveChain {
        LiveChain {
            label: label.to_owned(),
            chain: vec![
                workload_leaf(issuer, "spiffe://cluster.local/ns/shop/sa/client"),
                der(&issuer.cert_pem),
            ],
        }
    }

    #[test]
    fn an_anchor_signing_a_live_leaf_may_not_be_dropped_while_an_unused_one_may() {
        let old = root("old-root.test");
        let new = root("new-root.test");
        let old_issuer = issuer(&old, "issuer.test");
        let live = vec![
            leaf_chain(&old_issuer, "node-0 client"),
            leaf_chain(&old_issuer, "node-1 client"),
        ];
        let current = vec![der(&old.cert_pem), der(&new.cert_pem)];

        let removed = removed_signing_anchors(&current, &[der(&new.cert_pem)], &live);
        assert_eq!(
            removed,
            [RemovedAnchor {
                subject: "CN=old-root.test".into(),
                fingerprint: fingerprint(&der(&old.cert_pem)),
                signs: vec!["node-0 client".into(), "node-1 client".into()],
            }]
        );
        assert_eq!(
            removed[0].describe(),
            format!(
                "trust anchor CN=old-root.test (SHA256 fingerprint {}) is not in the candidate bundle but signs node-0 client, node-1 client",
                fingerprint(&der(&old.cert_pem))
            )
        );
        // Dropping the root nothing uses is fine.
        assert_eq!(
            removed_signing_anchors(&current, &[der(&old.cert_pem)], &live),
            []
        );
    }

    #[test]
    fn a_reissued_root_with_the_same_key_and_subject_counts_as_kept() {
        let old = root("root.test");
        // The same subject and key, signed again with another validity and serial.
        let key = KeyPair::from_pem(&old.key_pem).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "root.test");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_after = time::OffsetDateTime::now_utc() + 365 * DAY;
        let renewed = params.self_signed(&key).unwrap();
        let live = vec![LiveChain {
            label: "issuer CN=issuer.test".into(),
            chain: vec![der(&issuer(&old, "issuer.test").cert_pem)],
        }];
        assert_ne!(renewed.der().as_ref(), der(&old.cert_pem).as_ref());
        assert_eq!(
            removed_signing_anchors(&[der(&old.cert_pem)], &[renewed.der().clone()], &live),
            []
        );
    }

    #[test]
    fn many_signed_chains_are_summarised() {
        let anchor = RemovedAnchor {
            subject: "CN=r".into(),
            fingerprint: "AA".into(),
            signs: (0..5).map(|i| format!("c{i}")).collect(),
        };
        assert!(
            anchor
                .describe()
                .ends_with("but signs c0, c1, c2 and 2 more")
        );
    }
}
