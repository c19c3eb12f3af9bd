//! HTTP/1.1 front end: routing of the real API paths onto the store, the
//! token code and discovery, and streaming watches.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, USER_AGENT};
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc, watch};

use crate::auth::Auth;
use crate::crd;
use crate::portforward::{self, Registered};
use crate::resources::{self, ResourceId, ResourceType, by_id};
use crate::selector::{FieldSelector, LabelSelector};
use crate::status::ApiError;
use crate::store::{EventType, Preconditions, Scope, Store, decode_continue, translate_event};

/// The real server's default request body limit (3 MiB).
const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;
/// Watches without `timeoutSeconds` end after this long (the real server
/// picks 30–60 minutes).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);
/// How often a watch with `allowWatchBookmarks=true` gets a BOOKMARK.
const BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);
/// Annotation on the BOOKMARK that ends the initial events of a streaming list.
const INITIAL_EVENTS_END_ANNOTATION: &str = "k8s.io/initial-events-end";
const SERVER_GIT_VERSION: &str = "v1.33.0-sealmesh.fake";

pub(crate) type Body = BoxBody<Bytes, Infallible>;

/// State shared by every connection.
#[derive(Debug)]
pub(crate) struct Shared {
    pub store: Mutex<Store>,
    pub auth: Mutex<Auth>,
    pub requests: Mutex<Vec<(String, String)>>,
    /// Bumped to end every open watch (`close_watches`, server drop).
    pub watch_epoch: watch::Sender<u64>,
    pub server_address: String,
    /// How port-forward reaches pods (the testbed's stand-in for kubelets).
    pub port_forwarder: Mutex<Option<Registered>>,
    /// Set when the server stops: ends port-forward sessions.
    pub stopped: watch::Sender<bool>,
}

/// Locks a mutex; a panic while holding one leaves plain data behind, which
/// stays usable.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    pub fn new(server_address: String, service_range: ipnet::Ipv4Net) -> Shared {
        Shared {
            store: Mutex::new(Store::new(service_range)),
            auth: Mutex::new(Auth::new()),
            requests: Mutex::new(Vec::new()),
            watch_epoch: watch::Sender::new(0),
            server_address,
            port_forwarder: Mutex::new(None),
            stopped: watch::Sender::new(false),
        }
    }

    pub fn close_watches(&self) {
        self.watch_epoch.send_modify(|epoch| *epoch += 1);
    }
}

fn json_response(code: StatusCode, value: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(value.to_string())).boxed())
        .expect("static response parts are valid")
}

fn error_response(error: &ApiError) -> Response<Body> {
    json_response(
        StatusCode::from_u16(error.code()).expect("API error codes are valid HTTP codes"),
        &error.to_status(),
    )
}

/// The query parameters; a repeated one counts with its first value, as the
/// real server reads `url.Values`.
fn parse_query(query: Option<&str>) -> HashMap<String, String> {
    let mut parameters = HashMap::new();
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        parameters
            .entry(key.into_owned())
            .or_insert_with(|| value.into_owned());
    }
    parameters
}

fn truthy(query: &HashMap<String, String>, key: &str) -> bool {
    query
        .get(key)
        .is_some_and(|value| matches!(value.as_str(), "true" | "1"))
}

/// A request path resolved against the resource table.
#[derive(Debug)]
struct Target {
    resource: ResourceId,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

/// What a path names.
#[derive(Debug)]
enum Route {
    Version,
    ApiVersions,
    ApiGroups,
    ResourceList { group: String, version: String },
    Resource(Target),
}

/// Resolves a path against what `store` serves (the built-in resources and
/// those of its CRDs; anything else is the real server's 404).
fn route(path: &str, store: &Store) -> Option<Route> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segments.as_slice() {
        ["version"] => return Some(Route::Version),
        ["api"] => return Some(Route::ApiVersions),
        ["apis"] => return Some(Route::ApiGroups),
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    let namespaced_collection = |plural: &str| {
        store
            .find(group, version, plural)
            .filter(|&id| by_id(id).namespaced)
    };
    let target =
        |resource, namespace: Option<&str>, name: Option<&str>, subresource: Option<&str>| {
            Some(Route::Resource(Target {
                resource,
                namespace: namespace.map(str::to_string),
                name: name.map(str::to_string),
                subresource: subresource.map(str::to_string),
            }))
        };
    match rest {
        [] if store
            .served()
            .any(|r| r.group == group && r.version == version) =>
        {
            Some(Route::ResourceList {
                group: group.to_string(),
                version: version.to_string(),
            })
        }
        ["namespaces", namespace, plural, tail @ ..] if namespaced_collection(plural).is_some() => {
            let resource = namespaced_collection(plural)?;
            match tail {
                [] => target(resource, Some(namespace), None, None),
                [name] => target(resource, Some(namespace), Some(name), None),
                [name, subresource] => {
                    target(resource, Some(namespace), Some(name), Some(subresource))
                }
                _ => None,
            }
        }
        [plural, tail @ ..] => {
            let resource = store.find(group, version, plural)?;
            let namespaced = by_id(resource).namespaced;
            match tail {
                [] => target(resource, None, None, None),
                [name] if !namespaced => target(resource, None, Some(name), None),
                [name, subresource] if !namespaced => {
                    target(resource, None, Some(name), Some(subresource))
                }
                _ => None,
            }
        }
        _ => None,
    }
}

/// Serves one request.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path_and_query = request
        .uri()
        .path_and_query()
        .map(|pq| pq.as_str().to_string())
        .unwrap_or_else(|| request.uri().path().to_string());
    lock(&shared.requests).push((request.method().to_string(), path_and_query));
    Ok(match serve(&shared, request).await {
        Ok(response) => response,
        Err(error) => error_response(&error),
    })
}

async fn read_body(request: Request<Incoming>) -> Result<(Option<String>, Bytes), ApiError> {
    let content_type = request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .map(|value| {
            value
                .split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_string()
        });
    let body = Limited::new(request.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
        .map_err(|_| ApiError::TooLarge {
            limit: MAX_BODY_BYTES,
        })?
        .to_bytes();
    Ok((content_type, body))
}

/// A create/update body: JSON or YAML, as the real server accepts; not
/// protobuf (kubectl's imperative `create namespace|secret|configmap` send
/// it; `kubectl apply` sends JSON).
async fn read_object(request: Request<Incoming>) -> Result<Value, ApiError> {
    let (content_type, body) = read_body(request).await?;
    match content_type.as_deref() {
        None | Some("application/json") => parse_json(&body),
        Some("application/yaml") => serde_yaml_ng::from_slice(&body).map_err(|error| {
            ApiError::BadRequest(format!("the request body is not valid YAML: {error}"))
        }),
        Some(_) => Err(ApiError::UnsupportedMediaType {
            accepted: "application/json, application/yaml",
        }),
    }
}

fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|error| {
        ApiError::BadRequest(format!("the request body is not valid JSON: {error}"))
    })
}

async fn serve(
    shared: &Arc<Shared>,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let path = request.uri().path().to_string();
    if matches!(path.as_str(), "/healthz" | "/readyz" | "/livez") {
        return Ok(Response::new(Full::new(Bytes::from_static(b"ok")).boxed()));
    }
    let authorization = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .map(str::to_string);
    let user = {
        let auth = lock(&shared.auth);
        let store = lock(&shared.store);
        let user_agent = request
            .headers()
            .get(USER_AGENT)
            .and_then(|value| value.to_str().ok());
        auth.authenticate(authorization.as_deref(), user_agent, &store)?
    };
    let query = parse_query(request.uri().query());
    let method = request.method().clone();
    let route = route(&path, &lock(&shared.store)).ok_or(ApiError::NoRoute)?;
    if let Route::Resource(target) = &route {
        authorize(shared, &user, &method, target, &query)?;
    }
    match route {
        Route::Version if method == Method::GET => Ok(json_response(StatusCode::OK, &version())),
        Route::ApiVersions if method == Method::GET => Ok(json_response(
            StatusCode::OK,
            &json!({
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": shared.server_address}],
            }),
        )),
        Route::ApiGroups if method == Method::GET => Ok(json_response(
            StatusCode::OK,
            &api_groups(&lock(&shared.store)),
        )),
        Route::ResourceList { group, version } if method == Method::GET => Ok(json_response(
            StatusCode::OK,
            &resource_list(&lock(&shared.store), &group, &version),
        )),
        Route::Resource(Target {
            resource,
            namespace: Some(namespace),
            name: Some(name),
            subresource: Some(subresource),
        }) if resource == resources::id_of("", "pods") && subresource == "portforward" => {
            portforward::serve(shared, request, &namespace, &name, &query).await
        }
        Route::Resource(target) => serve_resource(shared, request, method, target, query).await,
        _ => Err(ApiError::MethodNotAllowed),
    }
}

/// Refuses (403) a request for what [`Auth::deny`] listed, before anything
/// is looked up, as the real server's authorizer does. The verb is the one
/// RBAC sees: `get`/`list`/`watch` for reads, `create` for a port-forward.
fn authorize(
    shared: &Shared,
    user: &str,
    method: &Method,
    target: &Target,
    query: &HashMap<String, String>,
) -> Result<(), ApiError> {
    let verb = match (method, target.name.is_some(), target.subresource.as_deref()) {
        (_, _, Some("portforward")) => "create",
        (&Method::GET, true, _) => "get",
        (&Method::GET, false, _) if truthy(query, "watch") => "watch",
        (&Method::GET, false, _) => "list",
        (&Method::POST, _, _) => "create",
        (&Method::PUT, _, _) => "update",
        (&Method::PATCH, _, _) => "patch",
        (&Method::DELETE, true, _) => "delete",
        (&Method::DELETE, false, _) => "deletecollection",
        // Not served: answered 405 after this.
        _ => return Ok(()),
    };
    let resource = by_id(target.resource);
    let requested = match &target.subresource {
        Some(subresource) => format!("{}/{subresource}", resource.plural),
        None => resource.plural.to_string(),
    };
    if lock(&shared.auth).allows(resource.group, &requested, verb) {
        return Ok(());
    }
    Err(ApiError::Forbidden {
        user: user.to_string(),
        verb,
        resource,
        subresource: target.subresource.clone(),
        name: target.name.clone(),
        namespace: target.namespace.clone(),
    })
}

fn scope(
    resource_id: ResourceId,
    namespace: Option<String>,
    query: &HashMap<String, String>,
) -> Result<Scope, ApiError> {
    let resource = by_id(resource_id);
    let bad = |error: crate::selector::SelectorError| ApiError::BadRequest(error.to_string());
    Ok(Scope {
        resource: resource_id,
        namespace,
        labels: LabelSelector::parse(
            query
                .get("labelSelector")
                .map(String::as_str)
                .unwrap_or_default(),
        )
        .map_err(bad)?,
        fields: FieldSelector::parse(
            query
                .get("fieldSelector")
                .map(String::as_str)
                .unwrap_or_default(),
            resource,
        )
        .map_err(bad)?,
    })
}

fn list_response(
    resource: &ResourceType,
    items: Vec<Value>,
    resource_version: u64,
    continue_token: Option<String>,
    remaining: usize,
) -> Value {
    let mut metadata = json!({"resourceVersion": resource_version.to_string()});
    if let Some(token) = continue_token {
        metadata["continue"] = json!(token);
        metadata["remainingItemCount"] = json!(remaining);
    }
    json!({
        "kind": resource.list_kind(),
        "apiVersion": resource.api_version(),
        "metadata": metadata,
        "items": items,
    })
}

async fn serve_resource(
    shared: &Arc<Shared>,
    request: Request<Incoming>,
    method: Method,
    target: Target,
    query: HashMap<String, String>,
) -> Result<Response<Body>, ApiError> {
    let resource = by_id(target.resource);
    let namespace = target.namespace.as_deref();
    if resource.review {
        if method != Method::POST || target.name.is_some() {
            return Err(ApiError::MethodNotAllowed);
        }
        let review = read_object(request).await?;
        let auth = lock(&shared.auth);
        let response = if resource.plural == "tokenreviews" {
            auth.token_review(&lock(&shared.store), &review)
        } else {
            auth.self_subject_access_review(&review)
        };
        return Ok(json_response(StatusCode::CREATED, &response));
    }
    match (
        &method,
        target.name.as_deref(),
        target.subresource.as_deref(),
    ) {
        (&Method::GET, None, None) if truthy(&query, "watch") => {
            start_watch(shared, &target, &query)
        }
        (&Method::GET, None, None) => {
            let scope = scope(target.resource, target.namespace.clone(), &query)?;
            let limit = query.get("limit").and_then(|limit| limit.parse().ok());
            let after = query
                .get("continue")
                .filter(|token| !token.is_empty())
                .map(|token| decode_continue(token))
                .transpose()?;
            let page = lock(&shared.store).list(&scope, limit, after.as_ref());
            Ok(json_response(
                StatusCode::OK,
                &list_response(
                    resource,
                    page.items,
                    page.resource_version,
                    page.continue_token,
                    page.remaining,
                ),
            ))
        }
        (&Method::GET, Some(name), subresource @ (None | Some("status"))) => {
            check_status_subresource(resource, subresource)?;
            Ok(json_response(
                StatusCode::OK,
                &lock(&shared.store).get(target.resource, namespace, name)?,
            ))
        }
        (&Method::POST, None, None) => {
            let object = read_object(request).await?;
            let created = lock(&shared.store).create(target.resource, namespace, object)?;
            Ok(json_response(StatusCode::CREATED, &created))
        }
        (&Method::POST, Some(name), Some("token"))
            if resource.group.is_empty() && resource.plural == "serviceaccounts" =>
        {
            let token_request = read_object(request).await?;
            let response = {
                let mut auth = lock(&shared.auth);
                auth.token_request(
                    &lock(&shared.store),
                    namespace.unwrap_or_default(),
                    name,
                    &token_request,
                )?
            };
            Ok(json_response(StatusCode::CREATED, &response))
        }
        (&Method::PUT, Some(name), Some("finalize"))
            if resource.group.is_empty() && resource.plural == "namespaces" =>
        {
            let object = read_object(request).await?;
            let finalized = lock(&shared.store).finalize_namespace(name, &object)?;
            Ok(json_response(StatusCode::OK, &finalized))
        }
        (&Method::PUT, Some(name), subresource @ (None | Some("status"))) => {
            check_status_subresource(resource, subresource)?;
            let object = read_object(request).await?;
            let updated = lock(&shared.store).update(
                target.resource,
                namespace,
                name,
                object,
                subresource.is_some(),
            )?;
            Ok(json_response(StatusCode::OK, &updated))
        }
        (&Method::PATCH, Some(name), subresource @ (None | Some("status"))) => {
            check_status_subresource(resource, subresource)?;
            let (content_type, body) = read_body(request).await?;
            let patch = parse_patch(content_type.as_deref(), &body)?;
            if matches!(patch, PatchBody::Apply(_))
                && query.get("fieldManager").is_none_or(String::is_empty)
            {
                return Err(ApiError::BadRequest(
                    "PATCH /apply requires fieldManager: set ?fieldManager=<your controller>"
                        .to_string(),
                ));
            }
            let (code, object) = patch_object(
                &mut lock(&shared.store),
                target.resource,
                namespace,
                name,
                patch,
                subresource.is_some(),
            )?;
            Ok(json_response(code, &object))
        }
        (&Method::DELETE, Some(name), None) => {
            let (_, body) = read_body(request).await?;
            let preconditions = delete_preconditions(&body)?;
            let deleted =
                lock(&shared.store).delete(target.resource, namespace, name, &preconditions)?;
            Ok(json_response(StatusCode::OK, &deleted))
        }
        (&Method::DELETE, None, None) => {
            let scope = scope(target.resource, target.namespace.clone(), &query)?;
            let mut store = lock(&shared.store);
            let page = store.list(&scope, None, None);
            let mut deleted = Vec::with_capacity(page.items.len());
            for object in page.items {
                let object_namespace = object
                    .pointer("/metadata/namespace")
                    .and_then(Value::as_str)
                    .map(str::to_string);
                let name = object
                    .pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                deleted.push(store.delete(
                    target.resource,
                    object_namespace.as_deref(),
                    &name,
                    &Preconditions::default(),
                )?);
            }
            let resource_version = store.resource_version();
            Ok(json_response(
                StatusCode::OK,
                &list_response(resource, deleted, resource_version, None, 0),
            ))
        }
        (_, Some(_), Some(subresource)) if subresource != "status" => Err(ApiError::NoRoute),
        _ => Err(ApiError::MethodNotAllowed),
    }
}

fn check_status_subresource(
    resource: &ResourceType,
    subresource: Option<&str>,
) -> Result<(), ApiError> {
    if subresource.is_some() && !resource.status_subresource {
        return Err(ApiError::NoRoute);
    }
    Ok(())
}

/// A PATCH body by its content type, as the real server tells them apart.
enum PatchBody {
    /// RFC 7386; strategic merge patches are applied as merge patches too
    /// (no patch strategies of list fields).
    Merge(Value),
    /// RFC 6902 operations.
    Json(json_patch::Patch),
    /// Server-side apply (without field management): a merge patch that
    /// creates a missing object.
    Apply(Value),
}

fn parse_patch(content_type: Option<&str>, body: &[u8]) -> Result<PatchBody, ApiError> {
    const ACCEPTED: &str = "application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json, application/apply-patch+yaml";
    match content_type {
        Some("application/merge-patch+json" | "application/strategic-merge-patch+json") => {
            Ok(PatchBody::Merge(parse_json(body)?))
        }
        Some("application/json-patch+json") => serde_json::from_slice(body)
            .map(PatchBody::Json)
            .map_err(|error| ApiError::BadRequest(format!("invalid JSON patch: {error}"))),
        Some("application/apply-patch+yaml") => {
            let patch: Value = serde_yaml_ng::from_slice(body).map_err(|error| {
                ApiError::BadRequest(format!(
                    "the apply patch is not valid YAML or JSON: {error}"
                ))
            })?;
            Ok(PatchBody::Apply(patch))
        }
        _ => Err(ApiError::UnsupportedMediaType { accepted: ACCEPTED }),
    }
}

fn patch_object(
    store: &mut Store,
    resource_id: ResourceId,
    namespace: Option<&str>,
    name: &str,
    patch: PatchBody,
    status_only: bool,
) -> Result<(StatusCode, Value), ApiError> {
    let current = match (store.get(resource_id, namespace, name), patch) {
        (Ok(current), patch) => (current, patch),
        (Err(ApiError::NotFound { .. }), PatchBody::Apply(mut object)) if !status_only => {
            json_patch::merge(&mut object, &json!({"metadata": {"name": name}}));
            return Ok((
                StatusCode::CREATED,
                store.create(resource_id, namespace, object)?,
            ));
        }
        (Err(error), _) => return Err(error),
    };
    let (mut patched, patch) = current;
    match patch {
        PatchBody::Merge(patch) | PatchBody::Apply(patch) => {
            json_patch::merge(&mut patched, &patch)
        }
        PatchBody::Json(operations) => json_patch::patch(&mut patched, &operations)
            .map_err(|error| ApiError::PatchFailed(error.to_string()))?,
    }
    Ok((
        StatusCode::OK,
        store.update(resource_id, namespace, name, patched, status_only)?,
    ))
}

fn delete_preconditions(body: &[u8]) -> Result<Preconditions, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Preconditions::default());
    }
    let options = parse_json(body)?;
    let field = |name: &str| {
        options
            .pointer(&format!("/preconditions/{name}"))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    Ok(Preconditions {
        uid: field("uid"),
        resource_version: field("resourceVersion"),
    })
}

fn version() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "gitVersion": SERVER_GIT_VERSION,
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "go1.24.0",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

/// The API groups `store` serves (core excluded), in discovery order: the
/// built-in ones, then those of CRDs.
fn api_groups(store: &Store) -> Value {
    let mut names: Vec<&'static str> = Vec::new();
    for resource in store.served() {
        if !resource.group.is_empty() && !names.contains(&resource.group) {
            names.push(resource.group);
        }
    }
    let groups: Vec<Value> = names
        .into_iter()
        .map(|group| {
            let mut versions: Vec<&str> = Vec::new();
            for resource in store.served().filter(|r| r.group == group) {
                if !versions.contains(&resource.version) {
                    versions.push(resource.version);
                }
            }
            let versions: Vec<Value> = versions
                .into_iter()
                .map(|version| json!({"groupVersion": format!("{group}/{version}"), "version": version}))
                .collect();
            json!({"name": group, "versions": versions, "preferredVersion": versions[0]})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn resource_list(store: &Store, group: &str, version: &str) -> Value {
    let mut entries = Vec::new();
    for resource in store
        .served()
        .filter(|r| r.group == group && r.version == version)
    {
        let verbs: &[&str] = if resource.review {
            &["create"]
        } else {
            &[
                "create",
                "delete",
                "deletecollection",
                "get",
                "list",
                "patch",
                "update",
                "watch",
            ]
        };
        entries.push(json!({
            "name": resource.plural,
            "singularName": resource.singular,
            "namespaced": resource.namespaced,
            "kind": resource.kind,
            "verbs": verbs,
            "shortNames": resource.short_names,
        }));
        if resource.status_subresource {
            entries.push(json!({
                "name": format!("{}/status", resource.plural),
                "singularName": "",
                "namespaced": resource.namespaced,
                "kind": resource.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
        if group.is_empty() && resource.plural == "pods" {
            entries.push(json!({
                "name": "pods/portforward",
                "singularName": "",
                "namespaced": true,
                "kind": "PodPortForwardOptions",
                "verbs": ["create", "get"],
            }));
        }
        if group.is_empty() && resource.plural == "serviceaccounts" {
            entries.push(json!({
                "name": "serviceaccounts/token",
                "singularName": "",
                "namespaced": true,
                "group": "authentication.k8s.io",
                "version": "v1",
                "kind": "TokenRequest",
                "verbs": ["create"],
            }));
        }
    }
    let group_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": entries})
}

fn event_line(event_type: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": event_type, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn bookmark(resource: &ResourceType, resource_version: u64, initial_events_end: bool) -> Bytes {
    let mut metadata = json!({"resourceVersion": resource_version.to_string()});
    if initial_events_end {
        metadata["annotations"] = json!({INITIAL_EVENTS_END_ANNOTATION: "true"});
    }
    event_line(
        "BOOKMARK",
        &json!({"kind": resource.kind, "apiVersion": resource.api_version(), "metadata": metadata}),
    )
}

/// Options of one watch request.
#[derive(Debug)]
struct WatchOptions {
    bookmarks: bool,
    /// Streaming list (`sendInitialEvents=true`): end the initial ADDED
    /// events with a BOOKMARK annotated `k8s.io/initial-events-end`.
    send_initial_events: bool,
    timeout: Duration,
}

fn start_watch(
    shared: &Arc<Shared>,
    target: &Target,
    query: &HashMap<String, String>,
) -> Result<Response<Body>, ApiError> {
    let scope = scope(target.resource, target.namespace.clone(), query)?;
    let options = WatchOptions {
        bookmarks: truthy(query, "allowWatchBookmarks"),
        send_initial_events: truthy(query, "sendInitialEvents"),
        timeout: query
            .get("timeoutSeconds")
            .and_then(|seconds| seconds.parse().ok())
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_WATCH_TIMEOUT),
    };
    let requested = query
        .get("resourceVersion")
        .map(String::as_str)
        .unwrap_or_default();
    let from = if options.send_initial_events || requested.is_empty() || requested == "0" {
        None
    } else {
        Some(requested.parse::<u64>().map_err(|_| {
            ApiError::BadRequest(format!(
                "resourceVersion {requested:?} is not a resourceVersion this server returned"
            ))
        })?)
    };
    let resource = by_id(target.resource);
    let (sender, receiver) = mpsc::channel::<Bytes>(64);
    // The watch task owns the sender; the body ends when it does.
    let body = StreamBody::new(futures::stream::unfold(
        receiver,
        |mut receiver| async move {
            let chunk = receiver.recv().await?;
            Some((Ok::<_, Infallible>(Frame::data(chunk)), receiver))
        },
    ))
    .boxed();
    let start = lock(&shared.store).watch(&scope, from);
    match start {
        // As the real server: the watch is accepted, and its only event is the 410.
        Err(error @ ApiError::Expired { .. }) => {
            let line = event_line("ERROR", &error.to_status());
            sender.try_send(line).expect("a new channel has room");
        }
        Err(error) => return Err(error),
        Ok(start) => {
            let epoch = shared.watch_epoch.subscribe();
            tokio::spawn(run_watch(sender, scope, resource, start, options, epoch));
        }
    }
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(CONTENT_TYPE, "application/json")
        .body(body)
        .expect("static response parts are valid"))
}

async fn run_watch(
    sender: mpsc::Sender<Bytes>,
    scope: Scope,
    resource: &'static ResourceType,
    start: crate::store::WatchStart,
    options: WatchOptions,
    mut epoch: watch::Receiver<u64>,
) {
    epoch.mark_unchanged();
    let mut live = start.live;
    let mut progress = start.resource_version;
    for (event_type, object) in start.backlog {
        if sender
            .send(event_line(event_type.as_str(), &object))
            .await
            .is_err()
        {
            return;
        }
    }
    if options.send_initial_events
        && sender
            .send(bookmark(resource, progress, true))
            .await
            .is_err()
    {
        return;
    }
    let deadline = tokio::time::sleep(options.timeout);
    tokio::pin!(deadline);
    let mut bookmarks = tokio::time::interval_at(
        tokio::time::Instant::now() + BOOKMARK_INTERVAL,
        BOOKMARK_INTERVAL,
    );
    let crds = resources::id_of("apiextensions.k8s.io", "customresourcedefinitions");
    loop {
        let line = tokio::select! {
            event = live.recv() => match event {
                // The resource is no longer served: as the real server tears
                // down a deleted CRD's storage, its watches end (after the
                // DELETED events of its objects).
                Ok(event)
                    if event.resource == crds
                        && event.event_type == EventType::Deleted
                        && crd::defines(&event.object, resource) =>
                {
                    return;
                }
                Ok(event) if event.resource_version > progress => {
                    progress = event.resource_version;
                    match translate_event(&scope, &event) {
                        Some((event_type, object)) => event_line(event_type.as_str(), &object),
                        None => continue,
                    }
                }
                Ok(_) => continue,
                // Too far behind, or the store is gone: end the watch; the
                // client re-watches from its last resourceVersion.
                Err(broadcast::error::RecvError::Lagged(_) | broadcast::error::RecvError::Closed) => return,
            },
            _ = bookmarks.tick(), if options.bookmarks => bookmark(resource, progress, false),
            () = &mut deadline => return,
            _ = epoch.changed() => return,
            () = sender.closed() => return,
        };
        if sender.send(line).await.is_err() {
            return;
        }
    }
}
