//! API errors and their `Status` bodies, with the real server's reasons,
//! codes and message wording.

use serde_json::{Value, json};

use crate::resources::ResourceType;

/// A failed API call. The HTTP code and `reason` are those the real
/// kube-apiserver uses for the same situation.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    #[error("{resource} \"{name}\" not found")]
    NotFound {
        resource: &'static ResourceType,
        name: String,
    },
    #[error("the server could not find the requested resource")]
    NoRoute,
    #[error("{resource} \"{name}\" already exists")]
    AlreadyExists {
        resource: &'static ResourceType,
        name: String,
    },
    #[error("Operation cannot be fulfilled on {resource} \"{name}\": {detail}")]
    Conflict {
        resource: &'static ResourceType,
        name: String,
        detail: String,
    },
    #[error("{kind} \"{name}\" is invalid: {field}: {detail}")]
    Invalid {
        kind: &'static str,
        name: String,
        field: String,
        detail: String,
    },
    #[error("{0}")]
    BadRequest(String),
    /// A JSON patch whose operations do not apply to the object (a `test`
    /// that fails, a path that is missing); the real server words it as any
    /// unexpected 422 and names the cause in `details.causes`.
    #[error("the server rejected our request due to an error in our request")]
    PatchFailed(String),
    #[error("Unauthorized{}", hint.as_deref().map(|h| format!(": {h}")).unwrap_or_default())]
    Unauthorized { hint: Option<String> },
    #[error("the server does not allow this method on the requested resource")]
    MethodNotAllowed,
    #[error(
        "the body of the request was in an unknown format - accepted media types include: {accepted}"
    )]
    UnsupportedMediaType { accepted: &'static str },
    #[error("too old resource version: {requested} ({oldest})")]
    Expired { requested: u64, oldest: u64 },
    #[error("the request body is larger than {limit} bytes")]
    TooLarge { limit: usize },
    /// RBAC denied the request (as the real server words it).
    #[error("{}", forbidden_message(resource, name.as_deref(), user, verb, subresource.as_deref(), namespace.as_deref()))]
    Forbidden {
        user: String,
        verb: &'static str,
        resource: &'static ResourceType,
        subresource: Option<String>,
        name: Option<String>,
        namespace: Option<String>,
    },
    /// The server cannot reach what the request needs (a pod's node).
    #[error("{0}")]
    Internal(String),
    /// Creating in a namespace being deleted.
    #[error(
        "namespaces \"{0}\" is forbidden: unable to create new content in namespace {0} because it is being terminated"
    )]
    NamespaceTerminating(String),
}

impl ApiError {
    pub fn code(&self) -> u16 {
        match self {
            ApiError::NotFound { .. } | ApiError::NoRoute => 404,
            ApiError::AlreadyExists { .. } | ApiError::Conflict { .. } => 409,
            ApiError::Invalid { .. } | ApiError::PatchFailed(_) => 422,
            ApiError::BadRequest(_) => 400,
            ApiError::Unauthorized { .. } => 401,
            ApiError::MethodNotAllowed => 405,
            ApiError::UnsupportedMediaType { .. } => 415,
            ApiError::Expired { .. } => 410,
            ApiError::TooLarge { .. } => 413,
            ApiError::Forbidden { .. } | ApiError::NamespaceTerminating(_) => 403,
            ApiError::Internal(_) => 500,
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            ApiError::NotFound { .. } | ApiError::NoRoute => "NotFound",
            ApiError::AlreadyExists { .. } => "AlreadyExists",
            ApiError::Conflict { .. } => "Conflict",
            ApiError::Invalid { .. } | ApiError::PatchFailed(_) => "Invalid",
            ApiError::BadRequest(_) => "BadRequest",
            ApiError::Unauthorized { .. } => "Unauthorized",
            ApiError::MethodNotAllowed => "MethodNotAllowed",
            ApiError::UnsupportedMediaType { .. } => "UnsupportedMediaType",
            ApiError::Expired { .. } => "Expired",
            ApiError::TooLarge { .. } => "RequestEntityTooLarge",
            ApiError::Forbidden { .. } | ApiError::NamespaceTerminating(_) => "Forbidden",
            ApiError::Internal(_) => "InternalError",
        }
    }

    fn details(&self) -> Option<Value> {
        let named = |resource: &ResourceType, name: &str| {
            let mut details = json!({"name": name, "kind": resource.plural});
            if !resource.group.is_empty() {
                details["group"] = json!(resource.group);
            }
            details
        };
        match self {
            ApiError::NotFound { resource, name }
            | ApiError::AlreadyExists { resource, name }
            | ApiError::Conflict { resource, name, .. } => Some(named(resource, name)),
            ApiError::Invalid {
                kind,
                name,
                field,
                detail,
            } => Some(json!({
                "name": name,
                "kind": kind,
                "causes": [{"reason": cause_reason(detail), "message": detail, "field": field}],
            })),
            ApiError::PatchFailed(cause) => Some(json!({
                "causes": [{"reason": "UnexpectedServerResponse", "message": cause}],
            })),
            ApiError::NoRoute => Some(json!({})),
            ApiError::NamespaceTerminating(namespace) => {
                Some(json!({"name": namespace, "kind": "namespaces"}))
            }
            ApiError::Forbidden { resource, name, .. } => {
                let mut details = named(resource, name.as_deref().unwrap_or_default());
                if name.is_none() {
                    details
                        .as_object_mut()
                        .expect("details are an object")
                        .remove("name");
                }
                Some(details)
            }
            _ => None,
        }
    }

    /// The `Status` object the real server sends for this error.
    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.to_string(),
            "reason": self.reason(),
            "code": self.code(),
        });
        if let Some(details) = self.details() {
            status["details"] = details;
        }
        status
    }

    pub fn stale_object(resource: &'static ResourceType, name: &str) -> ApiError {
        ApiError::Conflict {
            resource,
            name: name.to_string(),
            detail: "the object has been modified; please apply your changes to the latest version and try again"
                .to_string(),
        }
    }
}

/// kube-apiserver's words for a request RBAC denied:
/// `pods "x" is forbidden: User "u" cannot get resource "pods" in API group ""
/// in the namespace "ns"` (no name for collections, `at the cluster scope`
/// for cluster-wide requests).
fn forbidden_message(
    resource: &ResourceType,
    name: Option<&str>,
    user: &str,
    verb: &str,
    subresource: Option<&str>,
    namespace: Option<&str>,
) -> String {
    let object = match name {
        Some(name) => format!("{resource} \"{name}\""),
        None => resource.to_string(),
    };
    let requested = match subresource {
        Some(subresource) => format!("{}/{subresource}", resource.plural),
        None => resource.plural.to_string(),
    };
    let scope = match namespace {
        Some(namespace) => format!("in the namespace \"{namespace}\""),
        None => "at the cluster scope".to_string(),
    };
    format!(
        "{object} is forbidden: User \"{user}\" cannot {verb} resource \"{requested}\" in API group \"{}\" {scope}",
        resource.group
    )
}

/// The `causes[].reason` of a field error, from the real server's message
/// prefix ("Required value: ...", "Invalid value: ...", ...).
fn cause_reason(detail: &str) -> &'static str {
    if detail.starts_with("Required value") {
        "FieldValueRequired"
    } else if detail.starts_with("Unsupported value") {
        "FieldValueNotSupported"
    } else {
        "FieldValueInvalid"
    }
}
