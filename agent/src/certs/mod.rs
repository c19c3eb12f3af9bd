//! Certificates of the node's identities: the store (`store`: certificates
//! held, trust anchors, SNI resolution, status), the certificate authority
//! that signs them (`ca_client`: a seam and the identity service behind it)
//! and when they are obtained and renewed (`renewal`).

mod ca_client;
mod renewal;
mod store;
#[cfg(test)]
mod test_support;

pub use self::{
    ca_client::{CaError, CertificateAuthority, IdentityService},
    renewal::RenewalPolicy,
    store::{CertStatus, CertStore, CertStoreConfig, CertStoreError, NoCertificate, ObtainError},
};
