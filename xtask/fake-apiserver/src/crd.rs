//! CustomResourceDefinitions: what creating one checks and fills in (as the
//! real server's validation, defaulting and its naming and establishing
//! controllers would, at once), the resources it makes the server serve, and
//! the `default`s of their schemas.

use serde_json::{Value, json};

use crate::resources::{Definition, ResourceType};
use crate::status::ApiError;
use crate::store::now_timestamp;

/// How the real server names the kind in a CRD's validation errors.
const QUALIFIED_KIND: &str = "CustomResourceDefinition.apiextensions.k8s.io";
const SCOPES: [&str; 2] = ["Cluster", "Namespaced"];

fn text<'a>(object: &'a Value, pointer: &str) -> &'a str {
    object
        .pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn invalid(name: &str, field: &str, detail: String) -> ApiError {
    ApiError::Invalid {
        kind: QUALIFIED_KIND,
        name: name.to_string(),
        field: field.to_string(),
        detail,
    }
}

/// Checks a CRD being created and fills in what the server would: the
/// defaulted names and conversion, and a status with the names accepted
/// and the CRD Established (the real server's controllers set these within
/// milliseconds; here they are there from the start).
pub(crate) fn prepare(object: &mut Value) -> Result<(), ApiError> {
    let name = text(object, "/metadata/name").to_string();
    let group = text(object, "/spec/group").to_string();
    let plural = text(object, "/spec/names/plural").to_string();
    let kind = text(object, "/spec/names/kind").to_string();
    let scope = text(object, "/spec/scope").to_string();
    for (field, value) in [
        ("spec.group", &group),
        ("spec.names.plural", &plural),
        ("spec.names.kind", &kind),
        ("spec.scope", &scope),
    ] {
        if value.is_empty() {
            return Err(invalid(&name, field, "Required value".to_string()));
        }
    }
    if !group.contains('.') {
        return Err(invalid(
            &name,
            "spec.group",
            format!("Invalid value: {group:?}: should be a domain with at least one dot"),
        ));
    }
    if name != format!("{plural}.{group}") {
        return Err(invalid(
            &name,
            "metadata.name",
            format!("Invalid value: {name:?}: must be spec.names.plural+\".\"+spec.group"),
        ));
    }
    if !SCOPES.contains(&scope.as_str()) {
        return Err(invalid(
            &name,
            "spec.scope",
            format!("Unsupported value: {scope:?}: supported values: \"Cluster\", \"Namespaced\""),
        ));
    }
    let versions = object
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let storage: Vec<&str> = versions
        .iter()
        .filter(|v| v["storage"] == true)
        .map(|v| v["name"].as_str().unwrap_or_default())
        .collect();
    if storage.len() != 1 || versions.iter().any(|v| text(v, "/name").is_empty()) {
        return Err(invalid(
            &name,
            "spec.versions",
            "Invalid value: must have exactly one version marked as storage version, and every version a name".to_string(),
        ));
    }
    let names = &mut object["spec"]["names"];
    if text(names, "/singular").is_empty() {
        names["singular"] = json!(kind.to_lowercase());
    }
    if text(names, "/listKind").is_empty() {
        names["listKind"] = json!(format!("{kind}List"));
    }
    let accepted = names.clone();
    if object.pointer("/spec/conversion").is_none() {
        object["spec"]["conversion"] = json!({"strategy": "None"});
    }
    let now = now_timestamp();
    object["status"] = json!({
        "acceptedNames": accepted,
        "storedVersions": storage,
        "conditions": [
            {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
             "message": "no conflicts found", "lastTransitionTime": now},
            {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
             "message": "the initial names have been accepted", "lastTransitionTime": now},
        ],
    });
    Ok(())
}

/// The resources a stored CRD serves, one per served version, each with
/// its schema (`openAPIV3Schema`) when it has one.
pub(crate) fn served_versions(crd: &Value) -> Vec<(Definition, Option<Value>)> {
    let names = &crd["spec"]["names"];
    let short_names: Vec<String> = names["shortNames"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(str::to_string)
        .collect();
    crd.pointer("/spec/versions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|version| version["served"] == true)
        .map(|version| {
            let definition = Definition {
                group: text(crd, "/spec/group").to_string(),
                version: text(version, "/name").to_string(),
                plural: text(names, "/plural").to_string(),
                singular: text(names, "/singular").to_string(),
                kind: text(names, "/kind").to_string(),
                namespaced: text(crd, "/spec/scope") == "Namespaced",
                status_subresource: version.pointer("/subresources/status").is_some(),
                short_names: short_names.clone(),
            };
            (
                definition,
                version.pointer("/schema/openAPIV3Schema").cloned(),
            )
        })
        .collect()
}

/// Whether `crd` is the definition of `resource`.
pub(crate) fn defines(crd: &Value, resource: &ResourceType) -> bool {
    text(crd, "/spec/group") == resource.group && text(crd, "/spec/names/plural") == resource.plural
}

/// Fills in the `default` of every property `object` lacks, in every
/// object and array element present, as the real server defaults custom
/// resources by their structural schema.
pub(crate) fn apply_defaults(schema: &Value, object: &mut Value) {
    match object {
        Value::Object(fields) => {
            if let Some(properties) = schema["properties"].as_object() {
                for (key, property) in properties {
                    match fields.get_mut(key) {
                        Some(value) => apply_defaults(property, value),
                        None => {
                            if let Some(default) = property.get("default") {
                                fields.insert(key.clone(), default.clone());
                            }
                        }
                    }
                }
            } else if schema["additionalProperties"].is_object() {
                for value in fields.values_mut() {
                    apply_defaults(&schema["additionalProperties"], value);
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                apply_defaults(&schema["items"], item);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_missing_properties_at_every_depth() {
        let schema = json!({"type": "object", "properties": {
            "spec": {"type": "object", "properties": {
                "action": {"type": "string", "default": "ALLOW"},
                "rules": {"type": "array", "items": {"type": "object", "properties": {
                    "weight": {"type": "integer", "default": 1},
                }}},
                "labels": {"type": "object", "additionalProperties": {"type": "object", "properties": {
                    "on": {"type": "boolean", "default": true},
                }}},
            }},
        }});
        let mut object = json!({"spec": {"rules": [{}, {"weight": 5}], "labels": {"a": {}}}});
        apply_defaults(&schema, &mut object);
        assert_eq!(
            object,
            json!({"spec": {"action": "ALLOW", "rules": [{"weight": 1}, {"weight": 5}], "labels": {"a": {"on": true}}}})
        );
        // An absent parent is not created, as on the real server.
        let mut bare = json!({});
        apply_defaults(&schema, &mut bare);
        assert_eq!(bare, json!({}));
        let mut set = json!({"spec": {"action": "DENY"}});
        apply_defaults(&schema, &mut set);
        assert_eq!(set["spec"]["action"], "DENY");
    }
}
