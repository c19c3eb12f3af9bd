//! TLS settings both ends of HBONE share (TLS 1.3 only, ring, ALPN h2) and
//! the trust anchors as HBONE applies them. Verifying peers' chains and
//! reading their SPIFFE identities is `sealmesh_pki::verify`'s.

use std::{
    sync::{Arc, OnceLock},
    time::{Duration, SystemTime},
};

use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    server::ResolvesServerCert,
    sign::{CertifiedKey, SingleCertAndKey},
};
use rustls_pki_types::CertificateDer;
use sealmesh_common::identity::{Identity, TrustDomain};
use sealmesh_pki::verify::PeerVerifier;
pub use sealmesh_pki::verify::{PeerRole, SanNames, TlsError, peer_identity, server_name};

/// ALPN protocol of HBONE: HTTP/2 (CONNECT streams) over mTLS.
pub const ALPN_HBONE: &[u8] = b"h2";

/// A certificate's NotAfter; `None` if it does not parse (the handshake
/// that presented it verified it, so only for hand-made input).
pub fn not_after(cert: &CertificateDer<'_>) -> Option<SystemTime> {
    use x509_parser::{certificate::X509Certificate, prelude::FromDer};
    let (_, parsed) = X509Certificate::from_der(cert).ok()?;
    let seconds = u64::try_from(parsed.validity().not_after.timestamp()).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(seconds))
}

/// TLS 1.3 suites in the order the agent offers them (a rustls server
/// follows the client's order), for a CPU with or without AES instructions.
/// With them, AES-128-GCM first, the suite every TLS 1.3 implementation must
/// support: ring's default offers AES-256-GCM first, whose 14 rounds cost
/// more per byte on the data path. Without them (small ARM cores, some
/// virtual CPUs), ChaCha20-Poly1305 first: constant-time AES in software is
/// several times slower than ChaCha20.
fn cipher_suites(aes_in_hardware: bool) -> [rustls::SupportedCipherSuite; 3] {
    use rustls::crypto::ring::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    if aes_in_hardware {
        [
            TLS13_AES_128_GCM_SHA256,
            TLS13_AES_256_GCM_SHA384,
            TLS13_CHACHA20_POLY1305_SHA256,
        ]
    } else {
        [
            TLS13_CHACHA20_POLY1305_SHA256,
            TLS13_AES_128_GCM_SHA256,
            TLS13_AES_256_GCM_SHA384,
        ]
    }
}

/// Whether this CPU has the instructions ring's AES-GCM uses in hardware.
pub fn aes_in_hardware() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// The one crypto provider the agent uses (ring, like the rest of sealmesh),
/// its suites ordered for this CPU.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            Arc::new(CryptoProvider {
                cipher_suites: cipher_suites(aes_in_hardware()).to_vec(),
                ..rustls::crypto::ring::default_provider()
            })
        })
        .clone()
}

/// The trust anchors as HBONE applies them: the verifiers of peers' chains
/// and the TLS configs of both ends built on them. Immutable: a new bundle
/// (anchor rotation) means a new `HboneTrust`.
#[derive(Debug)]
pub struct HboneTrust {
    peers: PeerVerifier,
}

impl HboneTrust {
    /// Parses a PEM bundle of one or more root certificates. Clients must
    /// also carry one SPIFFE identity of `trust_domain`.
    pub fn from_pem(pem: &[u8], trust_domain: &TrustDomain) -> Result<Self, TlsError> {
        Ok(Self {
            peers: PeerVerifier::from_pem(pem, trust_domain, crypto_provider())?,
        })
    }

    pub fn len(&self) -> usize {
        self.peers.roots().len()
    }

    /// The root certificates themselves.
    pub fn roots(&self) -> Arc<RootCertStore> {
        self.peers.roots()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.roots().is_empty()
    }

    /// See [`PeerVerifier::verify_identity_chain`].
    pub fn verify_identity_chain(
        &self,
        chain: &[CertificateDer<'static>],
        id: &Identity,
    ) -> Result<(), TlsError> {
        self.peers.verify_identity_chain(chain, id)
    }

    /// See [`PeerVerifier::verify_peer_chain`].
    pub fn verify_peer_chain(
        &self,
        chain: &[CertificateDer<'static>],
        role: &PeerRole,
    ) -> Result<(), TlsError> {
        self.peers.verify_peer_chain(chain, role)
    }

    /// Client side of HBONE: presents `key`, verifies the server's chain
    /// against these anchors and its DNS SAN against the server name the
    /// caller connects with (see [`server_name`]).
    pub fn client_config(&self, key: Arc<CertifiedKey>) -> Result<ClientConfig, TlsError> {
        let mut config = ClientConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_webpki_verifier(self.peers.server_verifier())
            .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(key)));
        config.alpn_protocols = vec![ALPN_HBONE.to_vec()];
        Ok(config)
    }

    /// Server side of HBONE: the certificate comes from `resolver` (by SNI);
    /// a client certificate chaining to these anchors is mandatory.
    pub fn server_config(
        &self,
        resolver: Arc<dyn ResolvesServerCert>,
    ) -> Result<ServerConfig, TlsError> {
        let mut config = ServerConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(self.peers.client_verifier())
            .with_cert_resolver(resolver);
        config.alpn_protocols = vec![ALPN_HBONE.to_vec()];
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, KeyPair, SanType};

    use super::*;

    fn uri(text: &str) -> SanType {
        SanType::URI(text.try_into().unwrap())
    }

    /// Leaf for `id` with the identity service's SANs, signed by `root`.
    fn leaf(id: &Identity, root: &rcgen::Issuer<'_, KeyPair>) -> Arc<CertifiedKey> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![
            uri(&id.spiffe_uri()),
            SanType::DnsName(id.dns_name().try_into().unwrap()),
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, root).unwrap();
        let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        Arc::new(
            CertifiedKey::from_der(vec![cert.der().clone()], key_der, &crypto_provider()).unwrap(),
        )
    }

    #[test]
    fn suites_are_ordered_for_the_cpu() {
        let names = |aes| cipher_suites(aes).map(|s| s.suite());
        assert_eq!(
            names(true),
            [
                rustls::CipherSuite::TLS13_AES_128_GCM_SHA256,
                rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
                rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
            ]
        );
        assert_eq!(
            names(false),
            [
                rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
                rustls::CipherSuite::TLS13_AES_128_GCM_SHA256,
                rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
            ]
        );
    }

    #[test]
    fn hbone_handshakes_negotiate_the_cpus_first_suite() {
        let td = TrustDomain::default();
        let root_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let root = params.self_signed(&root_key).unwrap();
        let anchors = HboneTrust::from_pem(root.pem().as_bytes(), &td).unwrap();
        let root = rcgen::Issuer::new(params, root_key);
        let client_id = td.identity("app", "client").unwrap();
        let server_id = td.identity("app", "server").unwrap();
        let client_config = anchors.client_config(leaf(&client_id, &root)).unwrap();
        let server_config = anchors
            .server_config(Arc::new(SingleCertAndKey::from(leaf(&server_id, &root))))
            .unwrap();

        let mut client =
            rustls::ClientConnection::new(Arc::new(client_config), server_name(&server_id))
                .unwrap();
        let mut server = rustls::ServerConnection::new(Arc::new(server_config)).unwrap();
        while client.is_handshaking() || server.is_handshaking() {
            let mut wire = Vec::new();
            client.write_tls(&mut wire).unwrap();
            server.read_tls(&mut wire.as_slice()).unwrap();
            server.process_new_packets().unwrap();
            wire.clear();
            server.write_tls(&mut wire).unwrap();
            client.read_tls(&mut wire.as_slice()).unwrap();
            client.process_new_packets().unwrap();
        }
        for suite in [
            client.negotiated_cipher_suite(),
            server.negotiated_cipher_suite(),
        ] {
            assert_eq!(
                suite.map(|s| s.suite()),
                Some(cipher_suites(aes_in_hardware())[0].suite())
            );
        }
        assert_eq!(
            peer_identity(client.peer_certificates().unwrap(), &td).unwrap(),
            server_id
        );
        assert_eq!(
            peer_identity(server.peer_certificates().unwrap(), &td).unwrap(),
            client_id
        );
    }
}
