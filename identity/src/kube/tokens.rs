//! Callers through Kubernetes TokenReview: the agent ServiceAccount's
//! pod-bound tokens are node-mode callers (the node of the bound pod); every
//! other ServiceAccount is a workload asking for its own identity.
//!
//! An accepted token's caller is remembered for a few seconds (as the API
//! server caches token authentication), so an agent renewing many
//! certificates at once costs one review, not one per certificate.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec, UserInfo},
    core::v1::Pod,
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use sealmesh_common::{
    consts::kube::{SERVICE_ACCOUNT_USERNAME_PREFIX, TOKEN_EXTRA_POD_NAME, TOKEN_EXTRA_POD_UID},
    identity::TrustDomain,
};
use sha2::{Digest as _, Sha256};
use tonic::async_trait;

use super::pods::terminated_phase;
use crate::{
    auth::{AuthError, Caller, TokenValidator},
    config::KubeSettings,
};

/// How long an accepted token's caller is remembered.
const ACCEPTED_TOKEN_TTL: Duration = Duration::from_secs(10);
/// How long a rejected token's refusal is remembered: a flood of bogus
/// tokens costs one TokenReview per distinct token and this period, not one
/// per request. Short, so a token that becomes valid (a pod just created)
/// waits at most this long.
const REJECTED_TOKEN_TTL: Duration = Duration::from_secs(5);
/// At most this many remembered tokens per cache (a burst beyond it starts afresh).
const TOKEN_CACHE_CAPACITY: usize = 4096;

/// Outcomes of recent token reviews, by SHA-256 of the token (the tokens
/// themselves are not kept).
struct TokenCache<V> {
    ttl: Duration,
    entries: Mutex<HashMap<[u8; 32], (V, Instant)>>,
}

impl<V: Clone> TokenCache<V> {
    fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: Mutex::default(),
        }
    }

    fn get(&self, digest: &[u8; 32], now: Instant) -> Option<V> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .get(digest)
            .filter(|(_, at)| now.duration_since(*at) < self.ttl)
            .map(|(value, _)| value.clone())
    }

    fn insert(&self, digest: [u8; 32], value: V, now: Instant) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= TOKEN_CACHE_CAPACITY {
            entries.retain(|_, (_, at)| now.duration_since(*at) < self.ttl);
            if entries.len() >= TOKEN_CACHE_CAPACITY {
                entries.clear();
            }
        }
        entries.insert(digest, (value, now));
    }
}

/// Authenticates bearer tokens with TokenReview (`spec.audiences` = the
/// configured audience), then resolves agents to their node through their
/// bound pod.
#[derive(Clone)]
pub struct KubeTokenValidator {
    reviews: Api<TokenReview>,
    control_pods: Api<Pod>,
    trust_domain: TrustDomain,
    audience: String,
    agent_service_account: String,
    accepted: Arc<TokenCache<Caller>>,
    /// Definitive refusals only; the API being unavailable is never cached.
    rejected: Arc<TokenCache<AuthError>>,
}

impl std::fmt::Debug for KubeTokenValidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeTokenValidator")
            .field("trust_domain", &self.trust_domain)
            .field("audience", &self.audience)
            .field("agent_service_account", &self.agent_service_account)
            .finish_non_exhaustive()
    }
}

impl KubeTokenValidator {
    pub fn new(client: Client, settings: &KubeSettings) -> Self {
        Self {
            reviews: Api::all(client.clone()),
            control_pods: Api::namespaced(client, settings.namespace()),
            trust_domain: settings.trust_domain.clone(),
            audience: settings.token_audience.clone(),
            agent_service_account: settings.agent_service_account.clone(),
            accepted: Arc::new(TokenCache::new(ACCEPTED_TOKEN_TTL)),
            rejected: Arc::new(TokenCache::new(REJECTED_TOKEN_TTL)),
        }
    }

    /// The authenticated user of `token`, if TokenReview accepts it for our audience.
    async fn review(&self, token: &str) -> Result<UserInfo, AuthError> {
        let review = TokenReview {
            metadata: ObjectMeta::default(),
            spec: TokenReviewSpec {
                audiences: Some(vec![self.audience.clone()]),
                token: Some(token.to_owned()),
            },
            status: None,
        };
        let reviewed = self
            .reviews
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| AuthError::Unavailable(format!("TokenReview failed: {e}")))?;
        let status = reviewed.status.unwrap_or_default();
        let rejected = |reason: String| AuthError::TokenRejected {
            reason,
            audience: self.audience.clone(),
        };
        if status.authenticated != Some(true) {
            return Err(rejected(status.error.unwrap_or_else(|| {
                "not authenticated (no reason given)".to_owned()
            })));
        }
        // An authenticator that ignores audiences reports none; one that
        // checked them reports the ones the token is valid for.
        if let Some(audiences) = &status.audiences
            && !audiences.contains(&self.audience)
        {
            return Err(rejected(format!(
                "the token is valid for {audiences:?}, not for {:?}",
                self.audience
            )));
        }
        status
            .user
            .ok_or_else(|| rejected("the review names no user".to_owned()))
    }

    /// Reviews `token` and resolves its user to a caller.
    async fn authenticate(&self, token: &str) -> Result<Caller, AuthError> {
        let user = self.review(token).await?;
        let username = user.username.clone().unwrap_or_default();
        let Some((namespace, service_account)) = username
            .strip_prefix(SERVICE_ACCOUNT_USERNAME_PREFIX)
            .and_then(|rest| rest.split_once(':'))
        else {
            return Err(AuthError::NotServiceAccount { username });
        };
        if namespace == self.trust_domain.control_namespace()
            && service_account == self.agent_service_account
        {
            return self.agent_node(&user).await.map(Caller::Node);
        }
        self.trust_domain
            .identity(namespace, service_account)
            .map(Caller::Workload)
            .map_err(|_| AuthError::NotServiceAccount { username })
    }

    /// The node of the agent pod `user`'s token is bound to.
    async fn agent_node(&self, user: &UserInfo) -> Result<String, AuthError> {
        let extra = |key: &str| {
            user.extra
                .as_ref()
                .and_then(|extra| extra.get(key))
                .and_then(|values| values.first())
                .cloned()
        };
        let (Some(pod_name), Some(pod_uid)) =
            (extra(TOKEN_EXTRA_POD_NAME), extra(TOKEN_EXTRA_POD_UID))
        else {
            return Err(AuthError::UnboundAgentToken {
                service_account: format!(
                    "{}/{}",
                    self.trust_domain.control_namespace(),
                    self.agent_service_account
                ),
            });
        };
        let pod_ref = format!("{}/{pod_name}", self.trust_domain.control_namespace());
        let invalid = |problem: String| AuthError::AgentPodInvalid {
            pod: pod_ref.clone(),
            problem,
        };
        let pod = self
            .control_pods
            .get_opt(&pod_name)
            .await
            .map_err(|e| AuthError::Unavailable(format!("cannot read pod {pod_ref}: {e}")))?
            .ok_or_else(|| invalid("does not exist".to_owned()))?;
        let uid = pod.metadata.uid.as_deref().unwrap_or_default();
        if uid != pod_uid {
            return Err(invalid(format!(
                "has uid {uid}, not the token's {pod_uid} (the pod was replaced)"
            )));
        }
        if let Some(phase) = terminated_phase(&pod) {
            return Err(invalid(format!("has terminated (phase {phase})")));
        }
        pod.spec
            .and_then(|spec| spec.node_name)
            .filter(|node| !node.is_empty())
            .ok_or_else(|| invalid("is not scheduled to a node (no spec.nodeName)".to_owned()))
    }
}

#[async_trait]
impl TokenValidator for KubeTokenValidator {
    async fn validate(&self, token: &[u8]) -> Result<Caller, AuthError> {
        let token =
            std::str::from_utf8(token.trim_ascii()).map_err(|_| AuthError::TokenRejected {
                reason: "the token is not UTF-8 text".to_owned(),
                audience: self.audience.clone(),
            })?;
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(caller) = self.accepted.get(&digest, Instant::now()) {
            return Ok(caller);
        }
        if let Some(refusal) = self.rejected.get(&digest, Instant::now()) {
            return Err(refusal);
        }
        match self.authenticate(token).await {
            Ok(caller) => {
                self.accepted.insert(digest, caller.clone(), Instant::now());
                Ok(caller)
            }
            Err(AuthError::Unavailable(reason)) => Err(AuthError::Unavailable(reason)),
            Err(refusal) => {
                self.rejected
                    .insert(digest, refusal.clone(), Instant::now());
                Err(refusal)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn review_outcomes_are_remembered_briefly_and_boundedly() {
        let accepted = TokenCache::new(ACCEPTED_TOKEN_TTL);
        let start = Instant::now();
        let node = Caller::Node("n1".into());
        accepted.insert([1; 32], node.clone(), start);
        assert_eq!(
            accepted.get(&[1; 32], start + Duration::from_secs(9)),
            Some(node.clone())
        );
        assert_eq!(accepted.get(&[1; 32], start + ACCEPTED_TOKEN_TTL), None);
        assert_eq!(accepted.get(&[2; 32], start), None);

        for i in 0..TOKEN_CACHE_CAPACITY {
            let mut digest = [0; 32];
            digest[..8].copy_from_slice(&(i as u64).to_be_bytes());
            accepted.insert(digest, node.clone(), start);
        }
        // Full of live entries: started afresh with the newest one.
        assert_eq!(accepted.entries.lock().unwrap().len(), 1);

        let rejected = TokenCache::new(REJECTED_TOKEN_TTL);
        rejected.insert([3; 32], AuthError::UnknownToken, start);
        assert_eq!(
            rejected.get(&[3; 32], start + Duration::from_secs(4)),
            Some(AuthError::UnknownToken)
        );
        assert_eq!(rejected.get(&[3; 32], start + REJECTED_TOKEN_TTL), None);
    }
}
