//! sealmesh certificates and keys, shared by the identity service, the agent,
//! the CLI and the testbed:
//!
//! - [`pem`]: PEM text to DER certificates and P-256 signing keys;
//! - [`files`]: CA directories in both layouts, read and written atomically;
//! - [`cert`]: facts of one certificate (hex serials, fingerprints, key
//!   type) and the names an identity's certificates carry;
//! - [`chain`]: trust anchors, and issuers validated against them;
//! - [`generate`]: creating roots and issuers;
//! - [`verify`]: verifying peers' chains and SPIFFE identities in TLS
//!   handshakes (HBONE both ways, clients of the identity service);
//! - `test_support` (feature `test-support`): fixtures for other crates'
//!   tests.
#![forbid(unsafe_code)]

pub mod cert;
pub mod chain;
pub mod files;
pub mod generate;
pub mod pem;
#[cfg(feature = "test-support")]
pub mod test_support;
pub mod verify;

pub use cert::{fingerprint, identity_params, is_p256, serial_hex};
pub use chain::{CertInfo, ChainError, Issuer, TrustAnchors};
pub use files::{
    CaMaterial, FileError, Layout, PEM_CERT_FILE, PEM_KEY_FILE, TLS_CA_FILE, TLS_CERT_FILE,
    TLS_KEY_FILE,
};
pub use generate::{
    CaSpec, DEFAULT_ISSUER_COMMON_NAME, DEFAULT_ROOT_COMMON_NAME, GenerateError, GeneratedCa,
    generate_issuer, generate_root, random_serial,
};
pub use pem::{PemError, parse_cert, parse_key, parse_pem_certs};

/// Any failure of this crate, for callers that combine reading, validating
/// and generating.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error(transparent)]
    Pem(#[from] PemError),
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error(transparent)]
    Generate(#[from] GenerateError),
}
