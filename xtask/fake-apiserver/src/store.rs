//! The object store: `serde_json::Value` objects keyed by (resource,
//! namespace, name), one global resourceVersion counter, and a bounded event
//! history that watches resume from.

use std::collections::{BTreeMap, VecDeque};
use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnet::Ipv4Net;
use k8s_openapi::jiff::Timestamp;
use serde_json::{Map, Value, json};
use tokio::sync::broadcast;

use crate::crd;
use crate::resources::{self, RESOURCES, ResourceId, ResourceType, by_id, id_of};
use crate::selector::{FieldSelector, LabelSelector};
use crate::status::ApiError;

/// Events kept for resuming watches; older resourceVersions get 410 Expired.
const HISTORY_LIMIT: usize = 10_000;
/// Live-event fan-out capacity; a watcher that falls this far behind is ended
/// (the client re-watches, as after any closed watch).
const BROADCAST_CAPACITY: usize = 4_096;
/// Namespaces the real server creates at start-up.
const SYSTEM_NAMESPACES: &[&str] = &["default", "kube-system", "kube-public", "kube-node-lease"];
/// Offset in the service range of the first ClusterIP handed out when a
/// Service has none (.1 is the `kubernetes` Service).
const FIRST_ALLOCATED_CLUSTER_IP_OFFSET: u32 = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change, as stored in the history and fanned out to watches.
#[derive(Debug)]
pub(crate) struct StoredEvent {
    pub resource_version: u64,
    pub resource: ResourceId,
    pub namespace: String,
    pub event_type: EventType,
    /// The object after the change (for deletes: its last state, carrying the
    /// deletion's resourceVersion, as etcd3-backed watches report it).
    pub object: Value,
    /// The object before the change, so selector watches can turn updates
    /// that enter or leave the selection into ADDED/DELETED.
    pub previous: Option<Value>,
}

/// Which objects a list or watch covers.
#[derive(Debug, Clone)]
pub(crate) struct Scope {
    pub resource: ResourceId,
    /// `None`: all namespaces (or a cluster-scoped resource).
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Scope {
    pub fn matches(&self, resource: ResourceId, namespace: &str, object: &Value) -> bool {
        resource == self.resource
            && self.namespace.as_deref().is_none_or(|ns| ns == namespace)
            && self.labels.matches(object)
            && self.fields.matches(object)
    }
}

/// Preconditions of a delete (`DeleteOptions.preconditions`) or update.
#[derive(Debug, Default)]
pub(crate) struct Preconditions {
    pub uid: Option<String>,
    pub resource_version: Option<String>,
}

/// One page of a list.
#[derive(Debug)]
pub(crate) struct ListPage {
    pub items: Vec<Value>,
    pub resource_version: u64,
    pub continue_token: Option<String>,
    pub remaining: usize,
}

/// Where a new watch starts.
#[derive(Debug)]
pub(crate) struct WatchStart {
    /// Events to send before live ones: synthetic ADDED for the current state,
    /// or the history after the requested resourceVersion.
    pub backlog: Vec<(EventType, Value)>,
    pub resource_version: u64,
    pub live: broadcast::Receiver<Arc<StoredEvent>>,
}

type ObjectKey = (ResourceId, String, String);

/// One resource a CustomResourceDefinition serves, and its version's schema.
#[derive(Debug)]
struct CustomResource {
    id: ResourceId,
    schema: Option<Value>,
}

fn crd_id() -> ResourceId {
    id_of("apiextensions.k8s.io", "customresourcedefinitions")
}

pub(crate) struct Store {
    objects: BTreeMap<ObjectKey, Value>,
    resource_version: u64,
    history: VecDeque<Arc<StoredEvent>>,
    /// Every event with a resourceVersion above this is in `history`.
    history_start: u64,
    events: broadcast::Sender<Arc<StoredEvent>>,
    next_cluster_ip: u32,
    service_range: Ipv4Net,
    /// Whether a namespace controller runs: it empties a deleted namespace
    /// and finalizes it (at once here). Without one, a deleted namespace
    /// stays Terminating, contents and all, until a client finalizes it.
    namespace_controller: bool,
    /// The resources of every stored CustomResourceDefinition, by its name,
    /// as defined when it was created.
    crds: BTreeMap<String, Vec<CustomResource>>,
}

/// Objects include Secrets: only counts are shown.
impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("objects", &self.objects.len())
            .field("resource_version", &self.resource_version)
            .field("history", &self.history.len())
            .field("history_start", &self.history_start)
            .finish_non_exhaustive()
    }
}

pub(crate) fn now_timestamp() -> String {
    Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// A random RFC 4122 version-4 UUID, as the real server's `metadata.uid`.
pub(crate) fn random_uid() -> String {
    let mut bytes: [u8; 16] = rand::random();
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex = hex::encode(bytes);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

fn name_of(object: &Value) -> &str {
    object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn metadata_mut(object: &mut Value) -> &mut Map<String, Value> {
    if !object.get("metadata").is_some_and(Value::is_object) {
        object["metadata"] = json!({});
    }
    object["metadata"]
        .as_object_mut()
        .expect("metadata was just made an object")
}

/// Fills what the real server's registry strategies default on create.
fn default_on_create(
    resource: &ResourceType,
    object: &mut Value,
    next_cluster_ip: &mut u32,
    service_range: Ipv4Net,
) -> Result<(), ApiError> {
    let name = name_of(object).to_string();
    match (resource.group, resource.plural) {
        ("", "pods") => {
            // Pod status is the kubelet's; a new pod is Pending.
            object["status"] = json!({"phase": "Pending", "qosClass": "BestEffort"});
        }
        ("", "namespaces") => {
            object["spec"] = json!({"finalizers": ["kubernetes"]});
            object["status"] = json!({"phase": "Active"});
            metadata_mut(object)
                .entry("labels")
                .or_insert_with(|| json!({}))
                .as_object_mut()
                .map(|labels| {
                    labels.insert("kubernetes.io/metadata.name".to_string(), json!(name))
                });
        }
        ("", "services") => {
            let spec = object
                .as_object_mut()
                .expect("objects are JSON objects")
                .entry("spec")
                .or_insert_with(|| json!({}));
            if spec.get("type").is_none() {
                spec["type"] = json!("ClusterIP");
            }
            let cluster_ip = match spec.get("clusterIP").and_then(Value::as_str) {
                Some("None") => "None".to_string(),
                Some(ip) if !ip.is_empty() => {
                    if !ip
                        .parse::<Ipv4Addr>()
                        .is_ok_and(|ip| service_range.contains(&ip))
                    {
                        return Err(ApiError::Invalid {
                            kind: "Service",
                            name,
                            field: "spec.clusterIPs".to_string(),
                            detail: format!(
                                "Invalid value: [\"{ip}\"]: failed to allocate IP {ip}: provided IP is not in the valid range. The range of valid IPs is {service_range}"
                            ),
                        });
                    }
                    ip.to_string()
                }
                _ => {
                    let ip = std::net::Ipv4Addr::from(*next_cluster_ip).to_string();
                    *next_cluster_ip += 1;
                    spec["clusterIP"] = json!(ip);
                    ip
                }
            };
            if spec.get("clusterIPs").is_none() && cluster_ip != "None" {
                spec["clusterIPs"] = json!([cluster_ip]);
            }
            if object.get("status").is_none() {
                object["status"] = json!({"loadBalancer": {}});
            }
        }
        ("", "secrets") => {
            if object.get("type").is_none() {
                object["type"] = json!("Opaque");
            }
            fold_string_data(object);
        }
        ("apiextensions.k8s.io", "customresourcedefinitions") => crd::prepare(object)?,
        _ => {}
    }
    Ok(())
}

/// Secrets: `stringData` is write-only; the server merges it into `data`
/// (base64) and drops it.
fn fold_string_data(object: &mut Value) {
    let Some(Value::Object(string_data)) =
        object.as_object_mut().and_then(|o| o.remove("stringData"))
    else {
        return;
    };
    let data = object
        .as_object_mut()
        .expect("objects are JSON objects")
        .entry("data")
        .or_insert_with(|| json!({}));
    for (key, value) in string_data {
        let bytes = value.as_str().unwrap_or_default().as_bytes().to_vec();
        data[key] = serde_json::to_value(k8s_openapi::ByteString(bytes)).expect("bytes serialize");
    }
}

impl Store {
    pub fn new(service_range: Ipv4Net) -> Store {
        let (events, _) = broadcast::channel(BROADCAST_CAPACITY);
        let mut store = Store {
            objects: BTreeMap::new(),
            resource_version: 0,
            history: VecDeque::new(),
            history_start: 0,
            events,
            next_cluster_ip: u32::from(service_range.network()) + FIRST_ALLOCATED_CLUSTER_IP_OFFSET,
            service_range,
            namespace_controller: true,
            crds: BTreeMap::new(),
        };
        let namespaces = id_of("", "namespaces");
        for namespace in SYSTEM_NAMESPACES {
            store
                .create(namespaces, None, json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}))
                .expect("system namespaces are created in an empty store");
        }
        store
    }

    pub fn set_namespace_controller(&mut self, runs: bool) {
        self.namespace_controller = runs;
    }

    pub fn resource_version(&self) -> u64 {
        self.resource_version
    }

    /// A served resource: built in, or of a stored CRD.
    pub fn find(&self, group: &str, version: &str, plural: &str) -> Option<ResourceId> {
        resources::find_builtin(group, version, plural).or_else(|| {
            self.custom_resources().find(|&id| {
                let r = by_id(id);
                r.group == group && r.version == version && r.plural == plural
            })
        })
    }

    /// Every served resource: the built-in ones, then those of the CRDs.
    pub fn served(&self) -> impl Iterator<Item = &'static ResourceType> + '_ {
        RESOURCES.iter().chain(self.custom_resources().map(by_id))
    }

    fn custom_resources(&self) -> impl Iterator<Item = ResourceId> + '_ {
        self.crds.values().flatten().map(|custom| custom.id)
    }

    /// Serves what a just-stored CRD defines.
    fn serve_crd(&mut self, name: &str, crd: &Value) {
        let served = crd::served_versions(crd)
            .into_iter()
            .map(|(definition, schema)| CustomResource {
                id: resources::intern(&definition),
                schema,
            })
            .collect();
        self.crds.insert(name.to_string(), served);
    }

    /// Sets the schema's defaults in an object of a CRD's resource.
    fn apply_schema_defaults(&self, resource_id: ResourceId, object: &mut Value) {
        if let Some(schema) = self
            .crds
            .values()
            .flatten()
            .find(|custom| custom.id == resource_id)
            .and_then(|custom| custom.schema.as_ref())
        {
            crd::apply_defaults(schema, object);
        }
    }

    fn record(
        &mut self,
        resource: ResourceId,
        namespace: &str,
        event_type: EventType,
        object: Value,
        previous: Option<Value>,
    ) {
        let event = Arc::new(StoredEvent {
            resource_version: self.resource_version,
            resource,
            namespace: namespace.to_string(),
            event_type,
            object,
            previous,
        });
        if self.history.len() == HISTORY_LIMIT
            && let Some(dropped) = self.history.pop_front()
        {
            self.history_start = dropped.resource_version;
        }
        self.history.push_back(event.clone());
        // No receivers is fine: nobody is watching.
        let _ = self.events.send(event);
    }

    /// Drops the event history: watches from any resourceVersion before now
    /// get 410 Expired.
    pub fn compact(&mut self) {
        self.history.clear();
        self.history_start = self.resource_version;
    }

    fn check_namespace(
        &self,
        resource: &ResourceType,
        namespace: Option<&str>,
    ) -> Result<String, ApiError> {
        match (resource.namespaced, namespace) {
            (false, _) => Ok(String::new()),
            (true, None) => Err(ApiError::BadRequest(format!(
                "{resource} must be created, read and written in a namespace: use /namespaces/<namespace>/{}",
                resource.plural
            ))),
            (true, Some(namespace)) => {
                let namespaces = id_of("", "namespaces");
                if self
                    .objects
                    .contains_key(&(namespaces, String::new(), namespace.to_string()))
                {
                    Ok(namespace.to_string())
                } else {
                    Err(ApiError::NotFound {
                        resource: by_id(namespaces),
                        name: namespace.to_string(),
                    })
                }
            }
        }
    }

    /// Checks `apiVersion`/`kind` and the namespace of a written body against
    /// the URL it was sent to.
    fn check_body(
        resource: &ResourceType,
        namespace: &str,
        object: &Value,
    ) -> Result<(), ApiError> {
        if !object.is_object() {
            return Err(ApiError::BadRequest(
                "the request body must be a JSON object".to_string(),
            ));
        }
        for (field, expected) in [
            ("apiVersion", resource.api_version()),
            ("kind", resource.kind.to_string()),
        ] {
            if let Some(actual) = object.get(field).and_then(Value::as_str)
                && !actual.is_empty()
                && actual != expected
            {
                return Err(ApiError::BadRequest(format!(
                    "the {field} of the provided object ({actual}) does not match the {field} of the URL ({expected})"
                )));
            }
        }
        if let Some(body_namespace) = object
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            && !body_namespace.is_empty()
            && body_namespace != namespace
            && resource.namespaced
        {
            return Err(ApiError::BadRequest(
                "the namespace of the provided object does not match the namespace sent on the request".to_string(),
            ));
        }
        Ok(())
    }

    pub fn create(
        &mut self,
        resource_id: ResourceId,
        namespace: Option<&str>,
        mut object: Value,
    ) -> Result<Value, ApiError> {
        let resource = by_id(resource_id);
        let namespace = self.check_namespace(resource, namespace)?;
        if self.is_terminating(&namespace) {
            return Err(ApiError::NamespaceTerminating(namespace));
        }
        Self::check_body(resource, &namespace, &object)?;
        let metadata = metadata_mut(&mut object);
        let mut name = metadata
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if name.is_empty() {
            let prefix = metadata
                .get("generateName")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if prefix.is_empty() {
                return Err(ApiError::Invalid {
                    kind: resource.kind,
                    name: String::new(),
                    field: "metadata.name".to_string(),
                    detail: "Required value: name or generateName is required".to_string(),
                });
            }
            name = format!("{prefix}{}", &hex::encode(rand::random::<[u8; 3]>())[..5]);
        }
        if !valid_object_name(&name) {
            return Err(ApiError::Invalid {
                kind: resource.kind,
                name: name.clone(),
                field: "metadata.name".to_string(),
                detail: format!(
                    "Invalid value: {name:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
                ),
            });
        }
        let key = (resource_id, namespace.clone(), name.clone());
        if self.objects.contains_key(&key) {
            return Err(ApiError::AlreadyExists { resource, name });
        }
        self.resource_version += 1;
        metadata.insert("name".to_string(), json!(name));
        if resource.namespaced {
            metadata.insert("namespace".to_string(), json!(namespace));
        } else {
            metadata.remove("namespace");
        }
        metadata.insert("uid".to_string(), json!(random_uid()));
        metadata.insert("creationTimestamp".to_string(), json!(now_timestamp()));
        metadata.insert(
            "resourceVersion".to_string(),
            json!(self.resource_version.to_string()),
        );
        metadata.remove("deletionTimestamp");
        object["apiVersion"] = json!(resource.api_version());
        object["kind"] = json!(resource.kind);
        default_on_create(
            resource,
            &mut object,
            &mut self.next_cluster_ip,
            self.service_range,
        )?;
        if resource.status_subresource && resources::is_custom(resource_id) {
            // Status is the controller's: a custom resource's create ignores it.
            object
                .as_object_mut()
                .expect("checked to be an object")
                .remove("status");
        }
        self.apply_schema_defaults(resource_id, &mut object);
        self.objects.insert(key, object.clone());
        self.record(
            resource_id,
            &namespace,
            EventType::Added,
            object.clone(),
            None,
        );
        if resource_id == crd_id() {
            self.serve_crd(&name, &object);
        }
        Ok(object)
    }

    pub fn get(
        &self,
        resource_id: ResourceId,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value, ApiError> {
        let resource = by_id(resource_id);
        let namespace = if resource.namespaced {
            namespace.unwrap_or_default()
        } else {
            ""
        };
        self.objects
            .get(&(resource_id, namespace.to_string(), name.to_string()))
            .cloned()
            .ok_or_else(|| ApiError::NotFound {
                resource,
                name: name.to_string(),
            })
    }

    /// Replaces an object (PUT), or only its status (`status_only`, PUT to
    /// `/status`). A stale `metadata.resourceVersion` is a Conflict; an empty
    /// one is an unconditional update. Unchanged objects keep their
    /// resourceVersion and produce no event, as on the real server.
    pub fn update(
        &mut self,
        resource_id: ResourceId,
        namespace: Option<&str>,
        name: &str,
        mut object: Value,
        status_only: bool,
    ) -> Result<Value, ApiError> {
        let resource = by_id(resource_id);
        let current = self.get(resource_id, namespace, name)?;
        let namespace = if resource.namespaced {
            namespace.unwrap_or_default().to_string()
        } else {
            String::new()
        };
        Self::check_body(resource, &namespace, &object)?;
        let body_name = object
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if !body_name.is_empty() && body_name != name {
            return Err(ApiError::BadRequest(
                "the name of the object does not match the name on the URL".to_string(),
            ));
        }
        let current_rv = current
            .pointer("/metadata/resourceVersion")
            .cloned()
            .unwrap_or(Value::Null);
        if let Some(requested_rv) = object
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            && !requested_rv.is_empty()
            && Some(requested_rv) != current_rv.as_str()
        {
            return Err(ApiError::stale_object(resource, name));
        }
        if let Some(requested_uid) = object.pointer("/metadata/uid").and_then(Value::as_str)
            && !requested_uid.is_empty()
            && Some(requested_uid) != current.pointer("/metadata/uid").and_then(Value::as_str)
        {
            return Err(ApiError::Conflict {
                resource,
                name: name.to_string(),
                detail: format!(
                    "Precondition failed: UID in precondition: {requested_uid}, UID in object meta: {}",
                    current
                        .pointer("/metadata/uid")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                ),
            });
        }
        let mut updated = if status_only {
            let mut updated = current.clone();
            updated["status"] = object.get("status").cloned().unwrap_or_else(|| json!({}));
            updated
        } else {
            if resource.status_subresource {
                match current.get("status") {
                    Some(status) => object["status"] = status.clone(),
                    None => {
                        object
                            .as_object_mut()
                            .expect("checked to be an object")
                            .remove("status");
                    }
                }
            }
            if resource.group.is_empty() && resource.plural == "secrets" {
                fold_string_data(&mut object);
            }
            self.apply_schema_defaults(resource_id, &mut object);
            object
        };
        // Server-owned metadata survives any write.
        let current_metadata = current["metadata"].clone();
        let metadata = metadata_mut(&mut updated);
        for field in [
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "resourceVersion",
            "deletionTimestamp",
        ] {
            match current_metadata.get(field) {
                Some(value) => metadata.insert(field.to_string(), value.clone()),
                None => metadata.remove(field),
            };
        }
        updated["apiVersion"] = json!(resource.api_version());
        updated["kind"] = json!(resource.kind);
        if updated == current {
            return Ok(current);
        }
        Ok(self.store_modified(resource_id, &namespace, name, updated, current))
    }

    /// Stores a changed object under a new resourceVersion and records the
    /// MODIFIED event.
    fn store_modified(
        &mut self,
        resource_id: ResourceId,
        namespace: &str,
        name: &str,
        mut updated: Value,
        current: Value,
    ) -> Value {
        self.resource_version += 1;
        metadata_mut(&mut updated).insert(
            "resourceVersion".to_string(),
            json!(self.resource_version.to_string()),
        );
        self.objects.insert(
            (resource_id, namespace.to_string(), name.to_string()),
            updated.clone(),
        );
        self.record(
            resource_id,
            namespace,
            EventType::Modified,
            updated.clone(),
            Some(current),
        );
        updated
    }

    pub fn delete(
        &mut self,
        resource_id: ResourceId,
        namespace: Option<&str>,
        name: &str,
        preconditions: &Preconditions,
    ) -> Result<Value, ApiError> {
        let resource = by_id(resource_id);
        let current = self.get(resource_id, namespace, name)?;
        let precondition_failed = |field: &str, expected: &str, actual: &str| ApiError::Conflict {
            resource,
            name: name.to_string(),
            detail: format!(
                "Precondition failed: {field} in precondition: {expected}, {field} in object meta: {actual}"
            ),
        };
        let current_uid = current
            .pointer("/metadata/uid")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if let Some(uid) = &preconditions.uid
            && uid != current_uid
        {
            return Err(precondition_failed("UID", uid, current_uid));
        }
        let current_rv = current
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if let Some(rv) = &preconditions.resource_version
            && rv != current_rv
        {
            return Err(precondition_failed("ResourceVersion", rv, current_rv));
        }
        let namespace = if resource.namespaced {
            namespace.unwrap_or_default().to_string()
        } else {
            String::new()
        };
        if resource.group.is_empty()
            && resource.plural == "namespaces"
            && !self.namespace_controller
        {
            return Ok(self.mark_terminating(resource_id, name, current));
        }
        if resource_id == crd_id() {
            // The CRD's finalizer deletes its objects before the CRD goes;
            // done at once here.
            let served = self.crds.remove(name).unwrap_or_default();
            let contained: Vec<ObjectKey> = self
                .objects
                .keys()
                .filter(|(rid, _, _)| served.iter().any(|custom| custom.id == *rid))
                .cloned()
                .collect();
            for (rid, ns, object_name) in contained {
                self.remove(rid, &ns, &object_name);
            }
        }
        if resource.group.is_empty() && resource.plural == "namespaces" {
            // The namespace controller empties a deleted namespace; done at once here.
            let contained: Vec<ObjectKey> = self
                .objects
                .keys()
                .filter(|(rid, ns, _)| by_id(*rid).namespaced && ns == name)
                .cloned()
                .collect();
            for (rid, ns, object_name) in contained {
                self.remove(rid, &ns, &object_name);
            }
        }
        Ok(self.remove(resource_id, &namespace, name))
    }

    fn is_terminating(&self, namespace: &str) -> bool {
        !namespace.is_empty()
            && self
                .objects
                .get(&(
                    id_of("", "namespaces"),
                    String::new(),
                    namespace.to_string(),
                ))
                .is_some_and(|ns| ns.pointer("/metadata/deletionTimestamp").is_some())
    }

    /// A deleted namespace without a namespace controller: Terminating, with
    /// its contents, until its finalizers are removed (`finalize`).
    fn mark_terminating(&mut self, resource_id: ResourceId, name: &str, current: Value) -> Value {
        if current.pointer("/metadata/deletionTimestamp").is_some() {
            return current;
        }
        let mut updated = current.clone();
        metadata_mut(&mut updated).insert("deletionTimestamp".to_string(), json!(now_timestamp()));
        updated["status"]["phase"] = json!("Terminating");
        self.store_modified(resource_id, "", name, updated, current)
    }

    /// `PUT namespaces/NAME/finalize`: sets the namespace's spec.finalizers;
    /// a Terminating namespace left without finalizers is removed at once,
    /// whatever it still holds (those objects stay in storage, orphaned, as
    /// in etcd: emptying it first is the caller's job).
    pub fn finalize_namespace(&mut self, name: &str, object: &Value) -> Result<Value, ApiError> {
        let namespaces = id_of("", "namespaces");
        let current = self.get(namespaces, None, name)?;
        let finalizers = object
            .pointer("/spec/finalizers")
            .cloned()
            .unwrap_or_else(|| json!([]));
        let done = finalizers.as_array().is_none_or(Vec::is_empty);
        if done && current.pointer("/metadata/deletionTimestamp").is_some() {
            return Ok(self.remove(namespaces, "", name));
        }
        let mut updated = current.clone();
        updated["spec"]["finalizers"] = finalizers;
        if updated == current {
            return Ok(current);
        }
        Ok(self.store_modified(namespaces, "", name, updated, current))
    }

    fn remove(&mut self, resource_id: ResourceId, namespace: &str, name: &str) -> Value {
        let mut object = self
            .objects
            .remove(&(resource_id, namespace.to_string(), name.to_string()))
            .expect("removed objects exist");
        self.resource_version += 1;
        let previous = object.clone();
        metadata_mut(&mut object).insert(
            "resourceVersion".to_string(),
            json!(self.resource_version.to_string()),
        );
        self.record(
            resource_id,
            namespace,
            EventType::Deleted,
            object.clone(),
            Some(previous),
        );
        object
    }

    /// Objects in `scope`, sorted by namespace and name, paginated with
    /// `limit` and a continue token (the last key returned).
    pub fn list(
        &self,
        scope: &Scope,
        limit: Option<usize>,
        continue_after: Option<&(String, String)>,
    ) -> ListPage {
        let mut matching = self
            .objects
            .iter()
            .filter(|((rid, ns, name), object)| {
                scope.matches(*rid, ns, object)
                    && continue_after
                        .is_none_or(|(after_ns, after_name)| (ns, name) > (after_ns, after_name))
            })
            .map(|(_, object)| object.clone());
        let items: Vec<Value> = match limit {
            Some(limit) if limit > 0 => matching.by_ref().take(limit).collect(),
            _ => matching.by_ref().collect(),
        };
        let remaining = matching.count();
        let continue_token = (remaining > 0).then(|| {
            let last = items.last().expect("a full page is not empty");
            let namespace = last
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or_default();
            encode_continue(self.resource_version, namespace, name_of(last))
        });
        ListPage {
            items,
            resource_version: self.resource_version,
            continue_token,
            remaining,
        }
    }

    /// Starts a watch: from `from` (events after that resourceVersion), or
    /// with synthetic ADDED events for the current state when `from` is None
    /// (resourceVersion unset or "0", or a streaming list).
    pub fn watch(&self, scope: &Scope, from: Option<u64>) -> Result<WatchStart, ApiError> {
        let live = self.events.subscribe();
        let backlog = match from {
            None => self
                .list(scope, None, None)
                .items
                .into_iter()
                .map(|object| (EventType::Added, object))
                .collect(),
            Some(requested) if requested < self.history_start => {
                return Err(ApiError::Expired {
                    requested,
                    oldest: self.history_start,
                });
            }
            Some(requested) => self
                .history
                .iter()
                .filter(|event| event.resource_version > requested)
                .filter_map(|event| translate_event(scope, event))
                .collect(),
        };
        Ok(WatchStart {
            backlog,
            resource_version: self.resource_version.max(from.unwrap_or_default()),
            live,
        })
    }
}

/// What a watch on `scope` sees of a stored event: updates that move an
/// object into or out of a selector become ADDED or DELETED.
pub(crate) fn translate_event(scope: &Scope, event: &StoredEvent) -> Option<(EventType, Value)> {
    let now = scope.matches(event.resource, &event.namespace, &event.object);
    let before = event
        .previous
        .as_ref()
        .is_some_and(|previous| scope.matches(event.resource, &event.namespace, previous));
    match event.event_type {
        EventType::Added if now => Some((EventType::Added, event.object.clone())),
        EventType::Deleted if before || now => Some((EventType::Deleted, event.object.clone())),
        EventType::Modified => match (before, now) {
            (true, true) => Some((EventType::Modified, event.object.clone())),
            (false, true) => Some((EventType::Added, event.object.clone())),
            (true, false) => Some((EventType::Deleted, event.object.clone())),
            (false, false) => None,
        },
        _ => None,
    }
}

fn valid_object_name(name: &str) -> bool {
    name.len() <= 253
        && name.chars().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.' || c == ':'
        })
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
}

fn encode_continue(resource_version: u64, namespace: &str, name: &str) -> String {
    hex::encode(json!({"rv": resource_version, "ns": namespace, "name": name}).to_string())
}

/// The last (namespace, name) a continue token names.
pub(crate) fn decode_continue(token: &str) -> Result<(String, String), ApiError> {
    let invalid = || {
        ApiError::BadRequest(format!(
            "continue key is not valid: {token:?}; start the list again without it"
        ))
    };
    let bytes = hex::decode(token).map_err(|_| invalid())?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|_| invalid())?;
    let field = |key: &str| {
        value
            .get(key)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(invalid)
    };
    Ok((field("ns")?, field("name")?))
}
