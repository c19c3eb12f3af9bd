//! The resource table: every built-in resource is one row, and routing,
//! discovery, field-selector validation and status-subresource handling are
//! all driven by it. Resources that CustomResourceDefinitions define join it
//! at run time ([`intern`]); which of them a server serves is its store's
//! business (`Store::find`).

use std::sync::{PoisonError, RwLock};

/// What the server stores and does for one resource type.
#[derive(Debug)]
pub(crate) struct ResourceType {
    /// API group; "" for the core group.
    pub group: &'static str,
    pub version: &'static str,
    /// URL path segment (lowercase plural).
    pub plural: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    /// Has a `/status` subresource: writes to the main resource keep the
    /// stored `status`, writes to `/status` change only `status`.
    pub status_subresource: bool,
    /// Create-only virtual resources (reviews): never stored, not listable.
    pub review: bool,
    pub short_names: &'static [&'static str],
    /// Field-selector paths the real server accepts for this resource, in
    /// addition to `metadata.name` and `metadata.namespace`.
    pub selectable_fields: &'static [&'static str],
}

impl ResourceType {
    /// `apiVersion` as written in objects: `v1` or `group/version`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `pods` or `deployments.apps`: how the real server names a resource in
    /// error messages.
    pub fn qualified_plural(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }

    pub fn field_selectable(&self, field: &str) -> bool {
        field == "metadata.name"
            || (self.namespaced && field == "metadata.namespace")
            || self.selectable_fields.contains(&field)
    }
}

const fn stored(
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    singular: &'static str,
    kind: &'static str,
    namespaced: bool,
) -> ResourceType {
    ResourceType {
        group,
        version,
        plural,
        singular,
        kind,
        namespaced,
        status_subresource: false,
        review: false,
        short_names: &[],
        selectable_fields: &[],
    }
}

const fn with_status(mut resource: ResourceType) -> ResourceType {
    resource.status_subresource = true;
    resource
}

const fn review(mut resource: ResourceType) -> ResourceType {
    resource.review = true;
    resource
}

const fn short(mut resource: ResourceType, short_names: &'static [&'static str]) -> ResourceType {
    resource.short_names = short_names;
    resource
}

const fn fields(mut resource: ResourceType, fields: &'static [&'static str]) -> ResourceType {
    resource.selectable_fields = fields;
    resource
}

const CORE_EVENT_FIELDS: &[&str] = &[
    "involvedObject.kind",
    "involvedObject.namespace",
    "involvedObject.name",
    "involvedObject.uid",
    "involvedObject.apiVersion",
    "involvedObject.resourceVersion",
    "involvedObject.fieldPath",
    "reason",
    "reportingComponent",
    "source",
    "type",
];

const EVENTS_V1_FIELDS: &[&str] = &[
    "regarding.kind",
    "regarding.namespace",
    "regarding.name",
    "regarding.uid",
    "regarding.apiVersion",
    "regarding.resourceVersion",
    "regarding.fieldPath",
    "reason",
    "reportingController",
    "type",
];

/// Every built-in resource. Adding a resource is one line here.
pub(crate) static RESOURCES: &[ResourceType] = &[
    short(
        fields(
            with_status(stored(
                "",
                "v1",
                "namespaces",
                "namespace",
                "Namespace",
                false,
            )),
            &["status.phase"],
        ),
        &["ns"],
    ),
    short(
        fields(
            with_status(stored("", "v1", "nodes", "node", "Node", false)),
            &["spec.unschedulable"],
        ),
        &["no"],
    ),
    short(
        fields(
            with_status(stored("", "v1", "pods", "pod", "Pod", true)),
            &[
                "spec.nodeName",
                "spec.restartPolicy",
                "spec.schedulerName",
                "spec.serviceAccountName",
                "spec.hostNetwork",
                "status.phase",
                "status.podIP",
                "status.nominatedNodeName",
            ],
        ),
        &["po"],
    ),
    short(
        with_status(stored("", "v1", "services", "service", "Service", true)),
        &["svc"],
    ),
    short(
        stored(
            "",
            "v1",
            "serviceaccounts",
            "serviceaccount",
            "ServiceAccount",
            true,
        ),
        &["sa"],
    ),
    fields(
        stored("", "v1", "secrets", "secret", "Secret", true),
        &["type"],
    ),
    short(
        stored("", "v1", "configmaps", "configmap", "ConfigMap", true),
        &["cm"],
    ),
    short(
        fields(
            stored("", "v1", "events", "event", "Event", true),
            CORE_EVENT_FIELDS,
        ),
        &["ev"],
    ),
    short(
        fields(
            stored("events.k8s.io", "v1", "events", "event", "Event", true),
            EVENTS_V1_FIELDS,
        ),
        &["ev"],
    ),
    stored(
        "discovery.k8s.io",
        "v1",
        "endpointslices",
        "endpointslice",
        "EndpointSlice",
        true,
    ),
    short(
        with_status(stored(
            "apps",
            "v1",
            "deployments",
            "deployment",
            "Deployment",
            true,
        )),
        &["deploy"],
    ),
    short(
        with_status(stored(
            "apps",
            "v1",
            "daemonsets",
            "daemonset",
            "DaemonSet",
            true,
        )),
        &["ds"],
    ),
    // cert-manager's, as on a cluster that runs it (the issuer overlay).
    with_status(stored(
        "cert-manager.io",
        "v1",
        "certificates",
        "certificate",
        "Certificate",
        true,
    )),
    short(
        stored(
            "networking.k8s.io",
            "v1",
            "networkpolicies",
            "networkpolicy",
            "NetworkPolicy",
            true,
        ),
        &["netpol"],
    ),
    short(
        with_status(stored(
            "policy",
            "v1",
            "poddisruptionbudgets",
            "poddisruptionbudget",
            "PodDisruptionBudget",
            true,
        )),
        &["pdb"],
    ),
    short(
        with_status(stored(
            "apiextensions.k8s.io",
            "v1",
            "customresourcedefinitions",
            "customresourcedefinition",
            "CustomResourceDefinition",
            false,
        )),
        &["crd", "crds"],
    ),
    stored(
        "rbac.authorization.k8s.io",
        "v1",
        "roles",
        "role",
        "Role",
        true,
    ),
    stored(
        "rbac.authorization.k8s.io",
        "v1",
        "rolebindings",
        "rolebinding",
        "RoleBinding",
        true,
    ),
    stored(
        "rbac.authorization.k8s.io",
        "v1",
        "clusterroles",
        "clusterrole",
        "ClusterRole",
        false,
    ),
    stored(
        "rbac.authorization.k8s.io",
        "v1",
        "clusterrolebindings",
        "clusterrolebinding",
        "ClusterRoleBinding",
        false,
    ),
    review(stored(
        "authentication.k8s.io",
        "v1",
        "tokenreviews",
        "tokenreview",
        "TokenReview",
        false,
    )),
    review(stored(
        "authorization.k8s.io",
        "v1",
        "selfsubjectaccessreviews",
        "selfsubjectaccessreview",
        "SelfSubjectAccessReview",
        false,
    )),
];

/// Index of a resource in [`RESOURCES`], or past its end in [`DEFINED`]:
/// the store's key.
pub(crate) type ResourceId = usize;

/// Resource types CustomResourceDefinitions define, interned: each distinct
/// definition is leaked once and keeps its id for the life of the process
/// (a test process defines a handful), so every part of the server holds
/// `&'static ResourceType` for them as for the built-in ones.
static DEFINED: RwLock<Vec<&'static ResourceType>> = RwLock::new(Vec::new());

/// A built-in resource by group, version and plural.
pub(crate) fn find_builtin(group: &str, version: &str, plural: &str) -> Option<ResourceId> {
    RESOURCES
        .iter()
        .position(|r| r.group == group && r.version == version && r.plural == plural)
}

pub(crate) fn by_id(id: ResourceId) -> &'static ResourceType {
    match id.checked_sub(RESOURCES.len()) {
        None => &RESOURCES[id],
        Some(index) => DEFINED.read().unwrap_or_else(PoisonError::into_inner)[index],
    }
}

/// Built-in resource ids by group and plural (for the lookups of pods,
/// service accounts and the like that the server's own code needs).
pub(crate) fn id_of(group: &str, plural: &str) -> ResourceId {
    RESOURCES
        .iter()
        .position(|r| r.group == group && r.plural == plural)
        .unwrap_or_else(|| panic!("resource {plural}.{group} is not in the resource table"))
}

/// Whether a resource is one a CRD defined.
pub(crate) fn is_custom(id: ResourceId) -> bool {
    id >= RESOURCES.len()
}

/// One served version of a CustomResourceDefinition, as a resource type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Definition {
    pub group: String,
    pub version: String,
    pub plural: String,
    pub singular: String,
    pub kind: String,
    pub namespaced: bool,
    pub status_subresource: bool,
    pub short_names: Vec<String>,
}

impl Definition {
    fn describes(&self, resource: &ResourceType) -> bool {
        resource.group == self.group
            && resource.version == self.version
            && resource.plural == self.plural
            && resource.singular == self.singular
            && resource.kind == self.kind
            && resource.namespaced == self.namespaced
            && resource.status_subresource == self.status_subresource
            && resource.short_names.iter().eq(self.short_names.iter())
    }
}

/// The id of a defined resource type (the same for the same definition).
pub(crate) fn intern(definition: &Definition) -> ResourceId {
    let mut defined = DEFINED.write().unwrap_or_else(PoisonError::into_inner);
    if let Some(index) = defined.iter().position(|r| definition.describes(r)) {
        return RESOURCES.len() + index;
    }
    let leak = |text: &str| -> &'static str { text.to_owned().leak() };
    let short_names: Vec<&'static str> = definition.short_names.iter().map(|s| leak(s)).collect();
    defined.push(Box::leak(Box::new(ResourceType {
        group: leak(&definition.group),
        version: leak(&definition.version),
        plural: leak(&definition.plural),
        singular: leak(&definition.singular),
        kind: leak(&definition.kind),
        namespaced: definition.namespaced,
        status_subresource: definition.status_subresource,
        review: false,
        short_names: short_names.leak(),
        selectable_fields: &[],
    })));
    RESOURCES.len() + defined.len() - 1
}

/// `pods`, `deployments.apps`: the name the real server uses in messages.
impl std::fmt::Display for ResourceType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.qualified_plural())
    }
}
