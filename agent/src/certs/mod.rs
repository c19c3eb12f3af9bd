//! Certificates of the node's identities: the store (`store`: certificates
//! held, trust anchors, SNI resolution, status), the certificate authority
//! that signs them (`ca_client`: a seam and the identity service behind it),
//! when they are obtained and renewed (`renewal`) and how they are kept
//! across a restart (`cache`).

mod ca_client;
mod cache;
mod renewal;
mod store;
#[cfg(test)]
mod test_support;

pub use self::{
    ca_client::{CaError, CertificateAuthority, IdentityService},
    cache::CertCacheError,
    renewal::RenewalPolicy,
    store::{CertStatus, CertStore, CertStoreConfig, CertStoreError, NoCertificate, ObtainError},
};
