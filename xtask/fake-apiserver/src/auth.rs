//! Bearer tokens: the admin token, ServiceAccount tokens issued by
//! TokenRequest, TokenReview and SelfSubjectAccessReview.

use std::collections::{HashMap, HashSet};
use std::fmt;

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use sealmesh_common::consts::kube::{
    SERVICE_ACCOUNT_USERNAME_PREFIX, TOKEN_EXTRA_POD_NAME, TOKEN_EXTRA_POD_UID,
};
use serde_json::{Value, json};

use crate::resources::{by_id, id_of};
use crate::status::ApiError;
use crate::store::Store;

/// Audience of tokens meant for the API server itself (kind's and kubeadm's
/// default `--api-audiences`): a TokenRequest without audiences gets it, and
/// only tokens carrying it are accepted as API credentials.
pub(crate) const API_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";
const DEFAULT_EXPIRATION_SECONDS: i64 = 3600;
/// The real server rejects shorter TokenRequests.
const MIN_EXPIRATION_SECONDS: i64 = 600;
const ADMIN_USER: &str = "kubernetes-admin";
/// Who kubectl's requests without credentials are served as (the real
/// server's insecure port had this user).
const INSECURE_PORT_USER: &str = "system:unsecured";

/// What a ServiceAccount token stands for.
#[derive(Clone)]
struct ServiceAccountToken {
    namespace: String,
    service_account: String,
    service_account_uid: String,
    audiences: Vec<String>,
    expires: Timestamp,
    /// (name, uid) of the Pod the token is bound to.
    bound_pod: Option<(String, String)>,
    credential_id: String,
}

pub(crate) struct Auth {
    admin_token: String,
    tokens: HashMap<String, ServiceAccountToken>,
    /// (group, resource, verb) triples SelfSubjectAccessReviews deny.
    denied: HashSet<(String, String, String)>,
}

/// Tokens are credentials: only their number is shown.
impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth")
            .field("admin_token", &"<redacted>")
            .field("service_account_tokens", &self.tokens.len())
            .field("denied", &self.denied)
            .finish()
    }
}

fn random_token() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

fn string_list(value: Option<&Value>) -> Vec<String> {
    value
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

impl Auth {
    pub fn new() -> Auth {
        Auth {
            admin_token: random_token(),
            tokens: HashMap::new(),
            denied: HashSet::new(),
        }
    }

    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    pub fn deny(&mut self, group: &str, resource: &str, verb: &str) {
        self.denied
            .insert((group.to_string(), resource.to_string(), verb.to_string()));
    }

    /// Why a ServiceAccount token is not (or no longer) valid, if it is not:
    /// expired, or its ServiceAccount or bound Pod is gone or was recreated.
    fn invalidity(&self, token: &ServiceAccountToken, store: &Store) -> Option<String> {
        if Timestamp::now() >= token.expires {
            return Some("service account token has expired".to_string());
        }
        let service_accounts = id_of("", "serviceaccounts");
        match store.get(
            service_accounts,
            Some(&token.namespace),
            &token.service_account,
        ) {
            Ok(sa)
                if sa.pointer("/metadata/uid").and_then(Value::as_str)
                    == Some(&token.service_account_uid) => {}
            Ok(_) => {
                return Some(format!(
                    "service account {}/{} has been deleted and recreated",
                    token.namespace, token.service_account
                ));
            }
            Err(_) => {
                return Some(format!(
                    "service account {}/{} has been deleted",
                    token.namespace, token.service_account
                ));
            }
        }
        if let Some((pod_name, pod_uid)) = &token.bound_pod {
            match store.get(id_of("", "pods"), Some(&token.namespace), pod_name) {
                Ok(pod)
                    if pod.pointer("/metadata/uid").and_then(Value::as_str) == Some(pod_uid) => {}
                _ => {
                    return Some(format!(
                        "pod \"{pod_name}\" (uid {pod_uid}) the token is bound to no longer exists"
                    ));
                }
            }
        }
        None
    }

    /// Checks the credentials of an API request (the `Authorization` header
    /// value and the `User-Agent`) and returns the caller's user name.
    ///
    /// kubectl (client-go) never sends credentials to an `http://` server, so
    /// kubectl requests without credentials are served, as the real server's
    /// old insecure port served them. Every other client must present a valid
    /// bearer token.
    pub fn authenticate(
        &self,
        authorization: Option<&str>,
        user_agent: Option<&str>,
        store: &Store,
    ) -> Result<String, ApiError> {
        if authorization.is_none() && user_agent.is_some_and(|agent| agent.starts_with("kubectl")) {
            return Ok(INSECURE_PORT_USER.to_string());
        }
        let Some(token) = authorization
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::trim)
        else {
            return Err(ApiError::Unauthorized {
                hint: Some(
                    "send 'Authorization: Bearer <token>' (anonymous requests are disabled)"
                        .to_string(),
                ),
            });
        };
        if token == self.admin_token {
            return Ok(ADMIN_USER.to_string());
        }
        let Some(sa_token) = self.tokens.get(token) else {
            return Err(ApiError::Unauthorized { hint: None });
        };
        if let Some(problem) = self.invalidity(sa_token, store) {
            return Err(ApiError::Unauthorized {
                hint: Some(problem),
            });
        }
        if !sa_token
            .audiences
            .iter()
            .any(|audience| audience == API_AUDIENCE)
        {
            return Err(ApiError::Unauthorized {
                hint: Some(format!(
                    "token audiences {:?} do not include the API audience {API_AUDIENCE} (a real kube-apiserver rejects it too); request an API token without audiences",
                    sa_token.audiences
                )),
            });
        }
        Ok(format!(
            "{SERVICE_ACCOUNT_USERNAME_PREFIX}{}:{}",
            sa_token.namespace, sa_token.service_account
        ))
    }

    /// Whether a caller may `verb` `resource` (`plural` or
    /// `plural/subresource`) of `group`: RBAC is not enforced, so everything
    /// is allowed except what [`Auth::deny`] listed (for every caller).
    pub fn allows(&self, group: &str, resource: &str, verb: &str) -> bool {
        !self
            .denied
            .contains(&(group.to_string(), resource.to_string(), verb.to_string()))
    }

    /// `POST /api/v1/namespaces/{ns}/serviceaccounts/{name}/token`.
    pub fn token_request(
        &mut self,
        store: &Store,
        namespace: &str,
        service_account: &str,
        body: &Value,
    ) -> Result<Value, ApiError> {
        let invalid = |field: &str, detail: String| ApiError::Invalid {
            kind: "TokenRequest",
            name: service_account.to_string(),
            field: field.to_string(),
            detail,
        };
        let sa = store.get(
            id_of("", "serviceaccounts"),
            Some(namespace),
            service_account,
        )?;
        let spec = body.get("spec").cloned().unwrap_or_else(|| json!({}));
        let mut audiences = string_list(spec.get("audiences"));
        if audiences.is_empty() {
            audiences.push(API_AUDIENCE.to_string());
        }
        let expiration_seconds = spec
            .get("expirationSeconds")
            .and_then(Value::as_i64)
            .unwrap_or(DEFAULT_EXPIRATION_SECONDS);
        if expiration_seconds < MIN_EXPIRATION_SECONDS {
            return Err(invalid(
                "spec.expirationSeconds",
                format!(
                    "Invalid value: {expiration_seconds}: may not specify a duration less than 10 minutes"
                ),
            ));
        }
        let bound_pod = match spec.get("boundObjectRef").filter(|r| !r.is_null()) {
            None => None,
            Some(reference) => {
                let kind = reference
                    .get("kind")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                if kind != "Pod" {
                    return Err(invalid(
                        "spec.boundObjectRef.kind",
                        format!(
                            "Unsupported value: {kind:?}: this server binds tokens to Pods only"
                        ),
                    ));
                }
                let name = reference
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let pod = store.get(id_of("", "pods"), Some(namespace), name)?;
                let pod_uid = pod
                    .pointer("/metadata/uid")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                if let Some(requested_uid) = reference.get("uid").and_then(Value::as_str)
                    && !requested_uid.is_empty()
                    && requested_uid != pod_uid
                {
                    return Err(ApiError::Conflict {
                        resource: by_id(id_of("", "pods")),
                        name: name.to_string(),
                        detail: format!(
                            "the UID in the bound object reference ({requested_uid}) does not match the UID in record ({pod_uid}); the object might have been deleted and then recreated"
                        ),
                    });
                }
                Some((name.to_string(), pod_uid))
            }
        };
        let expires = Timestamp::now() + SignedDuration::from_secs(expiration_seconds);
        let token = random_token();
        self.tokens.insert(
            token.clone(),
            ServiceAccountToken {
                namespace: namespace.to_string(),
                service_account: service_account.to_string(),
                service_account_uid: sa
                    .pointer("/metadata/uid")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                audiences: audiences.clone(),
                expires,
                bound_pod: bound_pod.clone(),
                credential_id: crate::store::random_uid(),
            },
        );
        let mut response_spec = spec;
        response_spec["audiences"] = json!(audiences);
        response_spec["expirationSeconds"] = json!(expiration_seconds);
        Ok(json!({
            "kind": "TokenRequest",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"name": service_account, "namespace": namespace, "creationTimestamp": crate::store::now_timestamp()},
            "spec": response_spec,
            "status": {
                "token": token,
                "expirationTimestamp": expires.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
            },
        }))
    }

    /// `POST /apis/authentication.k8s.io/v1/tokenreviews`.
    pub fn token_review(&self, store: &Store, body: &Value) -> Value {
        let spec = body.get("spec").cloned().unwrap_or_else(|| json!({}));
        let token = spec
            .get("token")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let requested_audiences = {
            let requested = string_list(spec.get("audiences"));
            if requested.is_empty() {
                vec![API_AUDIENCE.to_string()]
            } else {
                requested
            }
        };
        let status = match self.review_status(store, token, &requested_audiences) {
            Ok(status) => status,
            Err(error) => json!({"authenticated": false, "user": {}, "error": error}),
        };
        json!({
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": null},
            "spec": spec,
            "status": status,
        })
    }

    fn review_status(
        &self,
        store: &Store,
        token: &str,
        requested_audiences: &[String],
    ) -> Result<Value, String> {
        if token == self.admin_token {
            return Ok(json!({
                "authenticated": true,
                "user": {"username": ADMIN_USER, "groups": ["system:masters", "system:authenticated"]},
                "audiences": requested_audiences,
            }));
        }
        let sa_token = self
            .tokens
            .get(token)
            .ok_or_else(|| "[invalid bearer token, token lookup failed]".to_string())?;
        let audiences: Vec<&String> = requested_audiences
            .iter()
            .filter(|audience| sa_token.audiences.contains(audience))
            .collect();
        if audiences.is_empty() {
            return Err(
                "[invalid bearer token, token audiences don't match the requested audiences]"
                    .to_string(),
            );
        }
        if let Some(problem) = self.invalidity(sa_token, store) {
            return Err(format!("[invalid bearer token, {problem}]"));
        }
        let mut extra = json!({
            "authentication.kubernetes.io/credential-id": [format!("JTI={}", sa_token.credential_id)],
        });
        if let Some((pod_name, pod_uid)) = &sa_token.bound_pod {
            extra[TOKEN_EXTRA_POD_NAME] = json!([pod_name]);
            extra[TOKEN_EXTRA_POD_UID] = json!([pod_uid]);
        }
        Ok(json!({
            "authenticated": true,
            "user": {
                "username": format!("system:serviceaccount:{}:{}", sa_token.namespace, sa_token.service_account),
                "uid": sa_token.service_account_uid,
                "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{}", sa_token.namespace), "system:authenticated"],
                "extra": extra,
            },
            "audiences": audiences,
        }))
    }

    /// `POST /apis/authorization.k8s.io/v1/selfsubjectaccessreviews`: RBAC is
    /// not enforced, so everything is allowed except what `deny` listed.
    pub fn self_subject_access_review(&self, body: &Value) -> Value {
        let spec = body.get("spec").cloned().unwrap_or_else(|| json!({}));
        let attribute = |name: &str| {
            spec.pointer(&format!("/resourceAttributes/{name}"))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        let resource = match attribute("subresource").as_str() {
            "" => attribute("resource"),
            subresource => format!("{}/{subresource}", attribute("resource")),
        };
        let key = (attribute("group"), resource, attribute("verb"));
        let status = if !self.allows(&key.0, &key.1, &key.2) {
            json!({"allowed": false, "denied": true, "reason": format!("denied by the test (deny_access {key:?})")})
        } else {
            json!({"allowed": true, "reason": "RBAC is not enforced by the fake API server"})
        };
        json!({
            "kind": "SelfSubjectAccessReview",
            "apiVersion": "authorization.k8s.io/v1",
            "metadata": {"creationTimestamp": null},
            "spec": spec,
            "status": status,
        })
    }
}
