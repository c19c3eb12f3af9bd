//! The certificate authority the store obtains certificates from: a seam
//! ([`CertificateAuthority`]) and its implementation, the identity service
//! reached over TLS 1.3 with the node token ([`IdentityService`]). Also the
//! CSR the agent sends.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use futures::future::BoxFuture;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls::ClientConfig;
use rustls_pki_types::CertificateDer;
use sealmesh_common::identity::{Identity, TrustDomain};
use sealmesh_identity::client::{self as identity_tls, ConnectError};
use sealmesh_proto::identity::{CertifyRequest, identity_client::IdentityClient};
use tonic::transport::Channel;

/// Signs the agent's CSRs. The store checks whatever comes back (identity,
/// chain to the anchors, key) before using it.
pub trait CertificateAuthority: Send + Sync + std::fmt::Debug {
    /// Has `csr` (DER, for `identity`) signed; returns the chain, leaf first.
    fn certify<'a>(
        &'a self,
        identity: &'a Identity,
        csr: Vec<u8>,
    ) -> BoxFuture<'a, Result<Vec<CertificateDer<'static>>, CaError>>;

    /// The authority moved to `addr` (a new endpoint of its Service); later
    /// requests go there. Authorities with no address ignore it.
    fn retarget(&self, _addr: SocketAddr) {}
}

/// Why the certificate authority issued nothing.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error(
        "cannot read the node token file {path}: {source}; it must hold this node's credential for the identity service (local mode: the cluster file's nodes[].tokenFile; kubernetes mode: the agent pod's projected ServiceAccount token)"
    )]
    Token {
        path: PathBuf,
        source: std::io::Error,
    },
    /// No TLS connection to the identity service (unreachable, or it failed
    /// verification); the token was not sent.
    #[error("{0}")]
    Unreachable(String),
    #[error("identity service at {addr} failed the request ({code:?}): {message}")]
    Refused {
        addr: SocketAddr,
        code: tonic::Code,
        message: String,
    },
    #[error("identity service returned an empty leaf certificate")]
    EmptyLeaf,
}

/// The identity service's `Certify`, over TLS 1.3 verified against the
/// store's current anchors and the identity service's own identity
/// (`sealmesh_identity::client`): the node token never leaves the agent
/// unencrypted, nor goes to any other server.
#[derive(Debug)]
pub struct IdentityService {
    target: ArcSwap<Target>,
    /// The node's credential; re-read on every request because it is rotated.
    token_file: PathBuf,
    /// What a channel to a new address is built with.
    identity_service: Identity,
    tls: Arc<ArcSwap<ClientConfig>>,
    request_timeout: Duration,
}

/// Where requests go now, and the channel there.
#[derive(Debug)]
struct Target {
    addr: SocketAddr,
    client: IdentityClient<Channel>,
}

impl IdentityService {
    /// Connects lazily, on the first request, and again after a broken
    /// connection; each new connection verifies the server with the config
    /// `tls` holds then. Call within a tokio runtime: the channel lives on it.
    pub fn new(
        addr: SocketAddr,
        token_file: PathBuf,
        trust_domain: &TrustDomain,
        tls: Arc<ArcSwap<ClientConfig>>,
        request_timeout: Duration,
    ) -> Self {
        let identity_service = trust_domain.identity_service();
        let target = Target::new(addr, &identity_service, &tls, request_timeout);
        Self {
            target: ArcSwap::from_pointee(target),
            token_file,
            identity_service,
            tls,
            request_timeout,
        }
    }

    async fn call(
        &self,
        identity: &Identity,
        csr: Vec<u8>,
    ) -> Result<Vec<CertificateDer<'static>>, CaError> {
        let token = tokio::fs::read(&self.token_file)
            .await
            .map_err(|source| CaError::Token {
                path: self.token_file.clone(),
                source,
            })?;
        let request = CertifyRequest {
            identity: identity.dns_name(),
            token,
            certificate_signing_request: csr,
        };
        let target = self.target.load();
        let response = target
            .client
            .clone()
            .certify(request)
            .await
            .map_err(|status| match connect_failure(&status) {
                Some(error) => CaError::Unreachable(error.to_string()),
                None => CaError::Refused {
                    addr: target.addr,
                    code: status.code(),
                    message: status.message().to_owned(),
                },
            })?
            .into_inner();
        if response.leaf_certificate.is_empty() {
            return Err(CaError::EmptyLeaf);
        }
        Ok(std::iter::once(response.leaf_certificate)
            .chain(response.intermediate_certificates)
            .map(CertificateDer::from)
            .collect())
    }
}

impl CertificateAuthority for IdentityService {
    fn certify<'a>(
        &'a self,
        identity: &'a Identity,
        csr: Vec<u8>,
    ) -> BoxFuture<'a, Result<Vec<CertificateDer<'static>>, CaError>> {
        Box::pin(self.call(identity, csr))
    }

    fn retarget(&self, addr: SocketAddr) {
        if self.target.load().addr != addr {
            self.target.store(Arc::new(Target::new(
                addr,
                &self.identity_service,
                &self.tls,
                self.request_timeout,
            )));
        }
    }
}

impl Target {
    /// Connects lazily, on the first request, and again after a broken
    /// connection.
    fn new(
        addr: SocketAddr,
        identity_service: &Identity,
        tls: &Arc<ArcSwap<ClientConfig>>,
        timeout: Duration,
    ) -> Self {
        let channel = identity_tls::lazy_channel(addr, identity_service, tls.clone(), timeout);
        Self {
            addr,
            client: IdentityClient::new(channel),
        }
    }
}

/// The connection failure behind a call's status, if the call never reached
/// the identity service.
fn connect_failure(status: &tonic::Status) -> Option<&ConnectError> {
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        if let Some(failure) = error.downcast_ref::<ConnectError>() {
            return Some(failure);
        }
        source = error.source();
    }
    None
}

/// A PKCS#10 CSR for `id` (SAN URI + SAN DNS, empty subject) signed by `key`.
pub(super) fn csr_der(id: &Identity, key: &KeyPair) -> Result<Vec<u8>, rcgen::Error> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![
        SanType::URI(id.spiffe_uri().try_into()?),
        SanType::DnsName(id.dns_name().try_into()?),
    ];
    Ok(params.serialize_request(key)?.der().to_vec())
}

#[cfg(test)]
mod tests {
    use rcgen::PKCS_ECDSA_P256_SHA256;
    use x509_parser::{
        certification_request::X509CertificationRequest,
        extensions::{GeneralName, ParsedExtension},
        prelude::FromDer,
    };

    use super::*;

    #[test]
    fn csr_carries_exactly_the_identity() {
        let web = TrustDomain::default().identity("emojivoto", "web").unwrap();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let der = csr_der(&web, &key).unwrap();
        let (_, csr) = X509CertificationRequest::from_der(&der).unwrap();
        csr.verify_signature().unwrap();
        assert_eq!(csr.certification_request_info.subject.iter().count(), 0);
        let names: Vec<String> = csr
            .requested_extensions()
            .unwrap()
            .flat_map(|ext| match ext {
                ParsedExtension::SubjectAlternativeName(san) => san.general_names.clone(),
                _ => vec![],
            })
            .map(|name| match name {
                GeneralName::URI(uri) => format!("URI:{uri}"),
                GeneralName::DNSName(dns) => format!("DNS:{dns}"),
                other => format!("other:{other:?}"),
            })
            .collect();
        assert_eq!(
            names,
            [
                "URI:spiffe://cluster.local/ns/emojivoto/sa/web",
                "DNS:web.emojivoto.serviceaccount.identity.sealmesh.cluster.local",
            ]
        );
    }
}
