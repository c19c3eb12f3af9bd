//! Kubernetes mode: the identity service on the Kubernetes API instead of
//! the cluster file and PKI files.
//!
//! - [`KubeTokenValidator`]: callers through TokenReview (node mode for the
//!   agent ServiceAccount's pod-bound tokens, workload mode otherwise);
//! - [`KubeWorkloadDirectory`]: which ServiceAccounts run on which node, from
//!   a pod watch;
//! - [`PkiObjects`]: issuer Secret and trust-roots ConfigMap, read and watched;
//! - [`KubeIssuerEvents`]: issuer rotations as Events on the Deployment;
//! - [`check_token_review_access`]: the start-up RBAC check.
//!
//! Nothing is stored: replicas are interchangeable (serials are random).

mod events;
mod issuer;
mod pods;
mod tokens;

use k8s_openapi::{
    Resource as _,
    api::{
        authentication::v1::TokenReview,
        authorization::v1::{
            ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
        },
    },
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use sealmesh_common::consts::kube::{
    IDENTITY_NAME, ISSUER_SECRET, TRUST_ROOTS_CONFIGMAP, TRUST_ROOTS_KEY,
};

pub use events::KubeIssuerEvents;
pub use issuer::{AnchorBundle, PkiObjects};
pub use pods::KubeWorkloadDirectory;
pub use tokens::KubeTokenValidator;

use sealmesh_pki::{PEM_CERT_FILE, PEM_KEY_FILE, PkiError, TLS_CERT_FILE, TLS_KEY_FILE};

/// The RBAC the identity service needs, as shipped.
const IDENTITY_RBAC_FILE: &str = "deploy/base/identity-rbac.yaml";

#[derive(Debug, thiserror::Error)]
pub enum KubeModeError {
    #[error(
        "cannot configure a Kubernetes client: {0}; in a pod, mount the ServiceAccount token (automountServiceAccountToken: true); elsewhere set KUBECONFIG"
    )]
    Client(#[source] kube::Error),
    #[error(
        "cannot {action}: {source}; check that the API server is reachable and that {IDENTITY_RBAC_FILE} is applied"
    )]
    Api {
        action: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "the identity service may not create tokenreviews.authentication.k8s.io{reason}, so it cannot authenticate any caller; \
         apply {IDENTITY_RBAC_FILE} (its ClusterRole grants `create` on tokenreviews and its ClusterRoleBinding binds it to \
         the ServiceAccount {namespace}/{IDENTITY_NAME}), or bind an equivalent role to the ServiceAccount this service runs as"
    )]
    TokenReviewDenied { namespace: String, reason: String },
    #[error(
        "Secret {namespace}/{ISSUER_SECRET} does not exist, so there is no issuer to sign with; create one: \
         `sealmesh certs create-root --out root && sealmesh certs create-issuer --root root --out issuer && \
         kubectl -n {namespace} create secret generic {ISSUER_SECRET} --from-file=issuer/{PEM_CERT_FILE} --from-file=issuer/{PEM_KEY_FILE}` \
         (or deploy the cert-manager overlay, which maintains it)"
    )]
    IssuerSecretMissing { namespace: String },
    #[error(
        "ConfigMap {namespace}/{TRUST_ROOTS_CONFIGMAP} does not exist, so there are no trust anchors; create it from the root: \
         `kubectl -n {namespace} create configmap {TRUST_ROOTS_CONFIGMAP} --from-file={TRUST_ROOTS_KEY}=root/{PEM_CERT_FILE}`"
    )]
    TrustRootsMissing { namespace: String },
    #[error("{object} has no key {key}; add it")]
    MissingKey { object: String, key: &'static str },
    #[error(
        "{object} holds no issuer: expected the keys {PEM_CERT_FILE} + {PEM_KEY_FILE}, or {TLS_CERT_FILE} + {TLS_KEY_FILE} (+ ca.crt); it has {keys:?}"
    )]
    NoIssuer { object: String, keys: Vec<String> },
    #[error(
        "{object} holds both layouts ({PEM_CERT_FILE} and {TLS_CERT_FILE}); remove one so it is clear which issuer to use"
    )]
    AmbiguousIssuer { object: String },
    #[error("{object}: {source}")]
    Content {
        object: String,
        #[source]
        source: PkiError,
    },
}

/// Refuses to start unless this service may create TokenReviews (asked with
/// a SelfSubjectAccessReview), naming the RBAC to apply otherwise.
pub async fn check_token_review_access(
    client: &Client,
    namespace: &str,
) -> Result<(), KubeModeError> {
    let review = SelfSubjectAccessReview {
        metadata: ObjectMeta::default(),
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                group: Some(TokenReview::GROUP.to_owned()),
                resource: Some(TokenReview::URL_PATH_SEGMENT.to_owned()),
                verb: Some("create".to_owned()),
                ..Default::default()
            }),
            non_resource_attributes: None,
        },
        status: None,
    };
    let reviewed = Api::<SelfSubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .map_err(|source| KubeModeError::Api {
            action:
                "ask whether the identity service may create TokenReviews (SelfSubjectAccessReview)"
                    .to_owned(),
            source,
        })?;
    let status = reviewed.status.unwrap_or_default();
    if status.allowed {
        return Ok(());
    }
    let reason = [status.reason, status.evaluation_error]
        .into_iter()
        .flatten()
        .filter(|text| !text.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    Err(KubeModeError::TokenReviewDenied {
        namespace: namespace.to_owned(),
        reason: if reason.is_empty() {
            String::new()
        } else {
            format!(" ({reason})")
        },
    })
}
