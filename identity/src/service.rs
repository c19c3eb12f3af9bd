//! The Certify gRPC API, served under both `sealmesh.identity.v1.Identity`
//! and Linkerd's `io.linkerd.proxy.identity.Identity` by one implementation.

use std::{net::SocketAddr, num::NonZeroU32, sync::Arc, time::Instant};

use sealmesh_common::identity::TrustDomain;
use sealmesh_proto::{identity as pb, linkerd_identity as linkerd};
use time::OffsetDateTime;
use tonic::{Code, Request, Response, Status};

use crate::{
    auth::{AuthError, Authorizer},
    ca::{self, CaError, LeafPolicy},
    limits::CallerLimiter,
    metrics::IdentityMetrics,
    rotation::IssuerStore,
};

/// Everything a Certify call needs.
#[derive(Clone)]
pub struct CertifyService {
    inner: Arc<Inner>,
}

struct Inner {
    /// `None`: no per-caller rate limit.
    callers: Option<CallerLimiter>,
    trust_domain: TrustDomain,
    authorizer: Authorizer,
    issuers: Arc<IssuerStore>,
    policy: LeafPolicy,
    metrics: Arc<IdentityMetrics>,
}

impl std::fmt::Debug for CertifyService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertifyService")
            .field("trust_domain", &self.inner.trust_domain)
            .field("policy", &self.inner.policy)
            .finish_non_exhaustive()
    }
}

impl CertifyService {
    pub fn new(
        trust_domain: TrustDomain,
        authorizer: Authorizer,
        issuers: Arc<IssuerStore>,
        policy: LeafPolicy,
        metrics: Arc<IdentityMetrics>,
        caller_rate: Option<NonZeroU32>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                callers: caller_rate.map(CallerLimiter::new),
                trust_domain,
                authorizer,
                issuers,
                policy,
                metrics,
            }),
        }
    }

    /// Admits the caller (its rate, by source address), authorises it,
    /// verifies the CSR and signs the leaf.
    pub async fn handle(
        &self,
        caller: Option<SocketAddr>,
        request: pb::CertifyRequest,
    ) -> Result<pb::CertifyResponse, Status> {
        let started = Instant::now();
        let admitted = match (&self.inner.callers, caller) {
            (Some(limiter), Some(caller)) => limiter.admit(caller.ip()),
            _ => Ok(()),
        };
        let result = match admitted {
            Ok(()) => self.certify_unmetered(&request).await,
            Err(refused) => Err(refused),
        };
        let label = match &result {
            Ok(_) => "ok",
            Err(status) => code_label(status.code()),
        };
        self.inner.metrics.record_certify(label, started.elapsed());
        if let Err(status) = &result {
            tracing::info!(
                identity = request.identity,
                code = label,
                reason = status.message(),
                "refused certificate"
            );
        }
        result
    }

    async fn certify_unmetered(
        &self,
        request: &pb::CertifyRequest,
    ) -> Result<pb::CertifyResponse, Status> {
        let inner = &self.inner;
        let identity = inner
            .trust_domain
            .parse(&request.identity)
            .map_err(|e| Status::invalid_argument(format!("identity: {e}")))?;
        let caller = inner
            .authorizer
            .authorize(&request.token, &identity)
            .await
            .map_err(auth_status)?;
        let csr =
            ca::verify_csr(&request.certificate_signing_request, &identity).map_err(ca_status)?;
        tracing::debug!(%identity, %caller, csr_subject = csr.subject, "verified CSR");

        let issuer = inner.issuers.current();
        let leaf = ca::issue(
            &issuer,
            &csr,
            &identity,
            &inner.policy,
            OffsetDateTime::now_utc(),
        )
        .map_err(ca_status)?;
        tracing::debug!(
            serial = leaf.serial,
            san_uri = identity.spiffe_uri(),
            san_dns = identity.dns_name(),
            not_after = %leaf.not_after,
            issuer = issuer.info().subject,
            "issued certificate"
        );
        Ok(pb::CertifyResponse {
            leaf_certificate: leaf.certificate.to_vec(),
            intermediate_certificates: leaf.chain.iter().map(|c| c.to_vec()).collect(),
            valid_until: Some(prost_types::Timestamp {
                seconds: leaf.not_after.unix_timestamp(),
                nanos: 0,
            }),
        })
    }
}

fn code_label(code: Code) -> &'static str {
    match code {
        Code::InvalidArgument => "invalid_argument",
        Code::Unauthenticated => "unauthenticated",
        Code::PermissionDenied => "permission_denied",
        Code::FailedPrecondition => "failed_precondition",
        Code::Unavailable => "unavailable",
        Code::ResourceExhausted => "resource_exhausted",
        _ => "internal",
    }
}

fn auth_status(error: AuthError) -> Status {
    let message = error.to_string();
    match error {
        AuthError::MissingToken
        | AuthError::UnknownToken
        | AuthError::TokenRejected { .. }
        | AuthError::UnboundAgentToken { .. }
        | AuthError::AgentPodInvalid { .. } => Status::unauthenticated(message),
        AuthError::NotOnNode { .. }
        | AuthError::OtherWorkload { .. }
        | AuthError::NotServiceAccount { .. } => Status::permission_denied(message),
        AuthError::Unavailable(_) => Status::unavailable(message),
    }
}

fn ca_status(error: CaError) -> Status {
    let message = error.to_string();
    match error {
        CaError::MalformedCsr(_)
        | CaError::BadCsrSignature
        | CaError::UnsupportedKey { .. }
        | CaError::NoIdentity { .. }
        | CaError::ForeignName { .. } => Status::invalid_argument(message),
        CaError::IssuerExpired { .. } => Status::failed_precondition(message),
        CaError::Sign(_) => Status::internal(message),
    }
}

#[tonic::async_trait]
impl pb::identity_server::Identity for CertifyService {
    async fn certify(
        &self,
        request: Request<pb::CertifyRequest>,
    ) -> Result<Response<pb::CertifyResponse>, Status> {
        let caller = request.remote_addr();
        self.handle(caller, request.into_inner())
            .await
            .map(Response::new)
    }
}

#[tonic::async_trait]
impl linkerd::identity_server::Identity for CertifyService {
    async fn certify(
        &self,
        request: Request<linkerd::CertifyRequest>,
    ) -> Result<Response<linkerd::CertifyResponse>, Status> {
        let caller = request.remote_addr();
        let linkerd::CertifyRequest {
            identity,
            token,
            certificate_signing_request,
        } = request.into_inner();
        let response = self
            .handle(
                caller,
                pb::CertifyRequest {
                    identity,
                    token,
                    certificate_signing_request,
                },
            )
            .await?;
        Ok(Response::new(linkerd::CertifyResponse {
            leaf_certificate: response.leaf_certificate,
            intermediate_certificates: response.intermediate_certificates,
            valid_until: response.valid_until,
        }))
    }
}
