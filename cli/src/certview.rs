//! Reading certificates for people: facts, chain verification, rendering.
//! Parsing is x509-parser's, leaf chain verification rustls-webpki's (the
//! same verifier the agents' TLS uses); nothing here re-implements X.509.

use std::{
    fmt::Write as _,
    net::IpAddr,
    time::{Duration, SystemTime},
};

use rustls_pki_types::{CertificateDer, UnixTime};
use sealmesh_pki::{self as pki, PemError};
use time::OffsetDateTime;
use x509_parser::{certificate::X509Certificate, extensions::GeneralName, oid_registry};

#[derive(Debug, thiserror::Error)]
pub enum CertViewError {
    #[error(transparent)]
    Pem(#[from] PemError),
    #[error("{what} holds no certificate")]
    Empty { what: String },
}

/// The facts of one certificate an operator checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertFacts {
    pub subject: String,
    pub issuer: String,
    pub serial: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    pub key_algorithm: String,
    /// ECDSA P-256: the only algorithm sealmesh issues and accepts.
    pub key_is_p256: bool,
    pub is_ca: bool,
    /// CA that may sign certificates (basicConstraints CA and keyCertSign when a
    /// key usage is present).
    pub may_sign_certificates: bool,
    pub key_usage: Option<String>,
    pub ext_key_usage: Vec<String>,
    pub sans: Vec<String>,
}

impl CertFacts {
    pub fn parse(der: &[u8], what: &str, index: usize) -> Result<Self, CertViewError> {
        let cert = pki::parse_cert(der, what, index)?;
        let spki = cert.public_key();
        let key_is_p256 = pki::is_p256(spki);
        let key_algorithm = if key_is_p256 {
            "ECDSA P-256".to_owned()
        } else if spki.algorithm.algorithm == oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY {
            "ECDSA (unsupported curve)".to_owned()
        } else if spki.algorithm.algorithm == oid_registry::OID_PKCS1_RSAENCRYPTION {
            "RSA".to_owned()
        } else if spki.algorithm.algorithm == oid_registry::OID_SIG_ED25519 {
            "Ed25519".to_owned()
        } else {
            format!("OID {}", spki.algorithm.algorithm)
        };
        let key_usage = cert
            .key_usage()
            .ok()
            .flatten()
            .map(|ku| ku.value.to_string());
        let may_sign_certificates = cert.is_ca()
            && cert
                .key_usage()
                .ok()
                .flatten()
                .is_none_or(|ku| ku.value.key_cert_sign());
        let ext_key_usage = cert
            .extended_key_usage()
            .ok()
            .flatten()
            .map(|eku| {
                let eku = eku.value;
                [
                    (eku.any, "Any"),
                    (eku.server_auth, "TLS Web Server Authentication"),
                    (eku.client_auth, "TLS Web Client Authentication"),
                    (eku.code_signing, "Code Signing"),
                    (eku.email_protection, "E-mail Protection"),
                    (eku.time_stamping, "Time Stamping"),
                    (eku.ocsp_signing, "OCSP Signing"),
                ]
                .into_iter()
                .filter(|(set, _)| *set)
                .map(|(_, name)| name.to_owned())
                .chain(eku.other.iter().map(|oid| format!("OID {oid}")))
                .collect()
            })
            .unwrap_or_default();
        let sans = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|san| san.value.general_names.iter().map(describe_name).collect())
            .unwrap_or_default();
        Ok(Self {
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            serial: pki::serial_hex(cert.raw_serial()),
            not_before: cert.validity().not_before.to_datetime(),
            not_after: cert.validity().not_after.to_datetime(),
            key_algorithm,
            key_is_p256,
            is_ca: cert.is_ca(),
            may_sign_certificates,
            key_usage,
            ext_key_usage,
            sans,
        })
    }

    pub fn is_valid_at(&self, now: OffsetDateTime) -> bool {
        self.not_before <= now && now < self.not_after
    }

    pub fn lifetime(&self) -> Duration {
        (self.not_after - self.not_before)
            .try_into()
            .unwrap_or_default()
    }

    /// Time until expiry (zero once expired).
    pub fn remaining(&self, now: OffsetDateTime) -> Duration {
        (self.not_after - now).try_into().unwrap_or_default()
    }

    /// `2026-11-28T19:00:00Z to 2026-11-29T19:00:00Z (23h59m left)`
    pub fn validity_line(&self, now: OffsetDateTime) -> String {
        format!(
            "{} to {} ({})",
            rfc3339(self.not_before),
            rfc3339(self.not_after),
            time_left(self, now)
        )
    }

    /// Indented, one fact per line.
    pub fn render(&self, now: OffsetDateTime) -> String {
        let mut out = String::new();
        let mut line = |label: &str, value: &str| {
            let _ = writeln!(out, "  {label:<15}{value}");
        };
        line("Subject:", &self.subject);
        line("Issuer:", &self.issuer);
        line("Serial:", &self.serial);
        line("Validity:", &self.validity_line(now));
        line("Key:", &self.key_algorithm);
        line(
            "CA:",
            match (self.is_ca, self.may_sign_certificates) {
                (true, true) => "yes (may issue certificates)",
                (true, false) => "yes, but its key usage forbids signing certificates",
                (false, _) => "no",
            },
        );
        line("Key usage:", self.key_usage.as_deref().unwrap_or("-"));
        line("Ext key usage:", &or_dash(&self.ext_key_usage.join(", ")));
        line("SANs:", &or_dash(&self.sans.join(", ")));
        out
    }
}

fn or_dash(text: &str) -> String {
    if text.is_empty() {
        "-".to_owned()
    } else {
        text.to_owned()
    }
}

fn describe_name(name: &GeneralName<'_>) -> String {
    match name {
        GeneralName::URI(uri) => format!("URI:{uri}"),
        GeneralName::DNSName(dns) => format!("DNS:{dns}"),
        GeneralName::IPAddress(bytes) => match bytes.len() {
            4 => format!("IP:{}", IpAddr::from(<[u8; 4]>::try_from(*bytes).unwrap())),
            16 => format!("IP:{}", IpAddr::from(<[u8; 16]>::try_from(*bytes).unwrap())),
            _ => name.to_string(),
        },
        other => other.to_string(),
    }
}

pub fn rfc3339(at: OffsetDateTime) -> String {
    humantime::format_rfc3339_seconds(SystemTime::from(at)).to_string()
}

/// `23h59m left`, `59d left`, `expired 2h0m ago`, `not valid for 5m yet`.
pub fn time_left(facts: &CertFacts, now: OffsetDateTime) -> String {
    if now < facts.not_before {
        let wait: Duration = (facts.not_before - now).try_into().unwrap_or_default();
        format!("not valid for {} yet", approx(wait))
    } else if now >= facts.not_after {
        let ago: Duration = (now - facts.not_after).try_into().unwrap_or_default();
        format!("expired {} ago", approx(ago))
    } else {
        format!("{} left", approx(facts.remaining(now)))
    }
}

/// A duration at the precision a person needs: days beyond two days, hours
/// and minutes beyond an hour, then minutes and seconds.
pub fn approx(d: Duration) -> String {
    let secs = d.as_secs();
    match secs {
        s if s >= 2 * 86_400 => format!("{}d", s / 86_400),
        s if s >= 3_600 => format!("{}h{}m", s / 3_600, s % 3_600 / 60),
        s if s >= 60 => format!("{}m{}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

/// Certificates of a file: a PEM bundle, or one DER certificate.
pub fn read_certificates(
    bytes: &[u8],
    what: &str,
) -> Result<Vec<CertificateDer<'static>>, CertViewError> {
    let looks_pem = bytes
        .windows(b"-----BEGIN".len())
        .any(|w| w == b"-----BEGIN");
    if looks_pem {
        return Ok(pki::parse_pem_certs(bytes, what)?);
    }
    if bytes.is_empty() {
        return Err(CertViewError::Empty {
            what: what.to_owned(),
        });
    }
    pki::parse_cert(bytes, what, 0)?;
    Ok(vec![CertificateDer::from(bytes.to_vec())])
}

/// Verifies that `chain` (leaf or CA first, then intermediates) chains to one
/// of `anchors` at `now`. Returns the anchor's subject, or why not.
pub fn verify_chain(
    chain: &[CertificateDer<'_>],
    anchors: &[CertificateDer<'_>],
    now: OffsetDateTime,
) -> Result<String, String> {
    let first = chain.first().ok_or("the chain is empty")?;
    let first_cert = pki::parse_cert(first, "chain", 0).map_err(|e| e.to_string())?;
    let anchor_certs = parse_all(anchors, "trust anchors")?;
    if first_cert.is_ca() {
        // webpki verifies end-entity certificates only; a CA (issuer or an
        // anchor itself) is checked by signature up to an anchor.
        return verify_ca_chain(chain, &anchor_certs, Some(now));
    }
    let trust_anchors = anchors
        .iter()
        .map(|der| webpki::anchor_from_trusted_cert(der).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    let leaf = webpki::EndEntityCert::try_from(first).map_err(|e| e.to_string())?;
    let at = UnixTime::since_unix_epoch(
        Duration::try_from(now - OffsetDateTime::UNIX_EPOCH).unwrap_or_default(),
    );
    let path = leaf
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &trust_anchors,
            &chain[1..],
            at,
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| describe_webpki_error(&e))?;
    // webpki keeps the Name's contents; x509-parser's raw Name has the DER
    // header (tag and length) in front of them.
    let anchor_subject = path.anchor().subject.as_ref();
    Ok(anchor_certs
        .iter()
        .find(|a| {
            let raw = a.subject().as_raw();
            raw.ends_with(anchor_subject) && raw.len() - anchor_subject.len() <= 4
        })
        .map(|a| a.subject().to_string())
        .unwrap_or_else(|| "a trust anchor".to_owned()))
}

/// Verifies only the signatures from a CA certificate (first in `chain`) up
/// to one of `anchors`, whatever the validity periods: whether the CA was
/// issued by the anchors at all.
pub fn verify_ca_signatures(
    chain: &[CertificateDer<'_>],
    anchors: &[CertificateDer<'_>],
) -> Result<String, String> {
    let anchor_certs = parse_all(anchors, "trust anchors")?;
    verify_ca_chain(chain, &anchor_certs, None)
}

/// webpki's verdicts in words, keeping its name for searching.
fn describe_webpki_error(error: &webpki::Error) -> String {
    let words = match error {
        webpki::Error::UnknownIssuer => "no trust anchor or intermediate of the chain issued it",
        webpki::Error::CertExpired { .. } => "a certificate of the chain has expired",
        webpki::Error::CertNotValidYet { .. } => "a certificate of the chain is not valid yet",
        webpki::Error::InvalidSignatureForPublicKey => {
            "a signature does not verify with its issuer's key (an issuer of the same name but another key?)"
        }
        webpki::Error::RequiredEkuNotFoundContext(_) => {
            "the certificate may not be used for mTLS (extended key usage)"
        }
        _ => "verification failed",
    };
    format!("{words} ({error:?})")
}

/// Parses every certificate of `ders` (named `what` in errors).
fn parse_all<'a>(
    ders: &'a [CertificateDer<'_>],
    what: &str,
) -> Result<Vec<X509Certificate<'a>>, String> {
    ders.iter()
        .enumerate()
        .map(|(i, der)| pki::parse_cert(der, what, i))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())
}

/// Walks signatures from `chain[0]` through the chain's other certificates to
/// an anchor; with `now`, every certificate on the way must be valid then.
fn verify_ca_chain(
    chain: &[CertificateDer<'_>],
    anchors: &[X509Certificate<'_>],
    now: Option<OffsetDateTime>,
) -> Result<String, String> {
    let certs = parse_all(chain, "chain")?;
    let valid_then = |cert: &X509Certificate<'_>| match now {
        Some(now) => {
            let validity = cert.validity();
            validity.not_before.to_datetime() <= now && now < validity.not_after.to_datetime()
        }
        None => true,
    };
    let first = certs.first().ok_or("the chain is empty")?;
    let mut current = first;
    for _ in 0..=certs.len() {
        if !valid_then(current) {
            return Err(format!(
                "{} is not within its validity period",
                current.subject()
            ));
        }
        if let Some(anchor) = anchors.iter().find(|a| signed_by(current, a)) {
            if !valid_then(anchor) {
                return Err(format!(
                    "anchor {} is not within its validity period",
                    anchor.subject()
                ));
            }
            return Ok(anchor.subject().to_string());
        }
        match certs
            .iter()
            .find(|c| !std::ptr::eq(*c, current) && signed_by(current, c))
        {
            Some(parent) => current = parent,
            None => {
                return Err(format!(
                    "no trust anchor signed {} (its issuer is {})",
                    current.subject(),
                    current.issuer()
                ));
            }
        }
    }
    Err("the chain loops".to_owned())
}

/// Whether `parent` signed `child` (names match and the signature verifies).
pub fn signed_by(child: &X509Certificate<'_>, parent: &X509Certificate<'_>) -> bool {
    child.issuer().as_raw() == parent.subject().as_raw()
        && child.verify_signature(Some(parent.public_key())).is_ok()
}

#[cfg(test)]
mod tests {
    use sealmesh_pki::{
        GeneratedCa,
        test_support::{DAY, new_issuer, new_root, pem_certs, workload_leaf},
    };

    use super::*;

    fn der(pem: &str) -> CertificateDer<'static> {
        pem_certs(pem).remove(0)
    }

    #[test]
    fn a_leaf_chains_to_its_root_only_while_valid() {
        let root = new_root();
        let issuer = new_issuer(&root, "issuer.test", DAY);
        let chain = [
            workload_leaf(&issuer, "spiffe://cluster.local/ns/shop/sa/web"),
            der(&issuer.cert_pem),
        ];
        let now = OffsetDateTime::now_utc();
        assert_eq!(
            verify_chain(&chain, &[der(&root.cert_pem)], now).unwrap(),
            "CN=root.test"
        );
        let stranger = root_named_other();
        assert_eq!(
            verify_chain(&chain, &[der(&stranger.cert_pem)], now).unwrap_err(),
            "a signature does not verify with its issuer's key (an issuer of the same name but another key?) \
             (InvalidSignatureForPublicKey)"
        );
        assert_eq!(
            verify_chain(&chain[..1], &[der(&root.cert_pem)], now).unwrap_err(),
            "no trust anchor or intermediate of the chain issued it (UnknownIssuer)"
        );
        assert!(
            verify_chain(&chain, &[der(&root.cert_pem)], now + 2 * DAY)
                .unwrap_err()
                .starts_with("a certificate of the chain has expired (CertExpired {")
        );
        // The issuer itself (a CA) is checked by signature.
        assert_eq!(
            verify_chain(&chain[1..], &[der(&root.cert_pem)], now).unwrap(),
            "CN=root.test"
        );
        assert_eq!(
            verify_ca_signatures(&chain[1..], &[der(&stranger.cert_pem)]).unwrap_err(),
            "no trust anchor signed CN=issuer.test (its issuer is CN=root.test)"
        );
        let facts = CertFacts::parse(&chain[0], "leaf", 0).unwrap();
        assert_eq!(facts.sans, ["URI:spiffe://cluster.local/ns/shop/sa/web"]);
        assert_eq!(
            facts.ext_key_usage,
            [
                "TLS Web Server Authentication",
                "TLS Web Client Authentication"
            ]
        );
        assert!(facts.key_is_p256 && !facts.is_ca);
    }

    fn root_named_other() -> GeneratedCa {
        // Same name as the real root, other key: names alone must not chain.
        new_root()
    }

    #[test]
    fn durations_read_at_a_useful_precision() {
        assert_eq!(approx(Duration::from_secs(75 * 86_400 + 5)), "75d");
        assert_eq!(approx(Duration::from_secs(86_399)), "23h59m");
        assert_eq!(approx(Duration::from_secs(125)), "2m5s");
        assert_eq!(approx(Duration::from_secs(9)), "9s");
    }
}
