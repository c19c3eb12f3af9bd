//! The AuthorizationPolicy CRD (`deploy/base/authorizationpolicy-crd.yaml`)
//! against the Rust model the agents read policies with
//! (`sealmesh_common::authz`), and the example policies
//! (`deploy/examples/authorization-policies.yaml`) against both.
//!
//! The CRD must name the resource as the code does, be a structural schema
//! (the API server refuses others), and mirror the Rust types field for
//! field. Policies are validated against its `openAPIV3Schema` with Python's
//! `jsonschema` (a dependency of kubernetes-validate, so in the same venv),
//! with unknown fields refused as kubectl's strict field validation does,
//! and read with `authz::validate`. The schema's CEL rules
//! (`x-kubernetes-validations`) need an API server to run: the Rust side
//! covers what they check.

use std::{collections::BTreeMap, path::Path, process::Command};

use sealmesh_common::authz::{
    self, Action, AuthorizationPolicy, AuthorizationPolicySpec, Operation, Rule, RuleFrom, RuleTo,
    Source, WorkloadSelector,
};
use serde_json::{Value, json};

use super::{ManifestError, ManifestObject, Tools, into_result, io_error};
use crate::cmd::CmdError;

/// The CRD, relative to the repository root.
pub const CRD_FILE: &str = "deploy/base/authorizationpolicy-crd.yaml";
/// The example policies, relative to the repository root.
pub const EXAMPLES_FILE: &str = "deploy/examples/authorization-policies.yaml";

/// `authorizationpolicies.sealmesh.io`.
pub fn crd_name() -> String {
    format!("{}.{}", authz::PLURAL, authz::API_GROUP)
}

/// `sealmesh.io/v1alpha1`.
pub fn api_version() -> String {
    format!("{}/{}", authz::API_GROUP, authz::API_VERSION)
}

/// The `openAPIV3Schema` of the CRD's storage version.
pub fn policy_schema(crd: &Value) -> Option<&Value> {
    crd["spec"]["versions"]
        .as_array()?
        .iter()
        .find(|version| version["storage"] == true)?
        .pointer("/schema/openAPIV3Schema")
}

/// Validates `documents` against `schema` (an `openAPIV3Schema`) with
/// Python's jsonschema, refusing fields the schema does not name (the API
/// server would prune them; kubectl's strict validation refuses them).
/// Returns each document's errors (`path: message`), in order.
pub fn schema_errors(
    tools: &Tools,
    schema: &Value,
    documents: &[Value],
) -> Result<Vec<Vec<String>>, ManifestError> {
    // Draft 4 is what OpenAPI v3 schemas extend; `default`, `description`
    // and the x-kubernetes-* keywords are annotations to it.
    const SCRIPT: &str = r#"
import json, sys
import jsonschema

def strict(node):
    if isinstance(node, dict):
        if node.get("type") == "object" and "properties" in node \
                and "additionalProperties" not in node \
                and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
        for value in node.values():
            strict(value)
    elif isinstance(node, list):
        for value in node:
            strict(value)

data = json.load(sys.stdin)
schema = data["schema"]
strict(schema)
validator = jsonschema.Draft4Validator(schema)
def path(error):
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path).lstrip(".") or "(root)"
print(json.dumps([
    [f"{path(e)}: {e.message}" for e in sorted(validator.iter_errors(doc), key=lambda e: (path(e), e.message))]
    for doc in data["documents"]
]))
"#;
    let python = tools.python();
    let input = json!({ "schema": schema, "documents": documents }).to_string();
    let spawn_error = |source: std::io::Error| ManifestError::Command {
        what: "validating against the AuthorizationPolicy CRD's schema".into(),
        source: CmdError::Spawn {
            program: python.display().to_string(),
            source,
            hint: " (run `cargo xtask setup`)",
        },
    };
    let mut child = Command::new(&python)
        .args(["-c", SCRIPT])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(spawn_error)?;
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().expect("stdin is piped");
        stdin.write_all(input.as_bytes()).map_err(spawn_error)?;
    }
    let output = child.wait_with_output().map_err(spawn_error)?;
    let failed = |reason: String| ManifestError::Invalid {
        kustomization: CRD_FILE.to_owned(),
        problems: vec![format!("jsonschema could not validate: {reason}")],
    };
    if !output.status.success() {
        return Err(failed(format!(
            "{}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    serde_json::from_slice(&output.stdout).map_err(|e| failed(e.to_string()))
}

/// Reads a policy object as the agents do: metadata, the spec through the
/// Rust types (unknown fields refused), `authz::validate`, and a dry-run
/// annotation that is `"true"` if present at all (anything else would
/// silently enforce).
pub fn read_policy(object: &Value) -> Result<AuthorizationPolicy, String> {
    if object["apiVersion"] != api_version().as_str() || object["kind"] != authz::KIND {
        return Err(format!(
            "not a {} {}: apiVersion {}, kind {}",
            api_version(),
            authz::KIND,
            object["apiVersion"],
            object["kind"]
        ));
    }
    let text = |field: &str| {
        object["metadata"][field]
            .as_str()
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| format!("metadata.{field} is required"))
    };
    let annotations: BTreeMap<String, String> = match &object["metadata"]["annotations"] {
        Value::Null => BTreeMap::new(),
        value => serde_json::from_value(value.clone())
            .map_err(|_| "metadata.annotations must map strings to strings".to_owned())?,
    };
    if let Some(value) = annotations.get(authz::DRY_RUN_ANNOTATION)
        && value != authz::DRY_RUN_VALUE
    {
        return Err(format!(
            "annotation {} is {value:?}: only {:?} makes a dry run, anything else enforces",
            authz::DRY_RUN_ANNOTATION,
            authz::DRY_RUN_VALUE
        ));
    }
    let spec: AuthorizationPolicySpec = serde_json::from_value(object["spec"].clone())
        .map_err(|e| format!("spec does not read as sealmesh_common::authz has it: {e}"))?;
    authz::validate(&spec).map_err(|e| format!("spec.{e}"))?;
    Ok(AuthorizationPolicy {
        name: text("name")?,
        namespace: text("namespace")?,
        annotations,
        spec,
    })
}

/// The objects of a `---`-separated YAML file (empty documents skipped).
pub fn read_documents(path: &Path) -> Result<Vec<Value>, ManifestError> {
    let text = std::fs::read_to_string(path).map_err(io_error("cannot read", path))?;
    let mut documents = Vec::new();
    for document in serde_yaml_ng::Deserializer::from_str(&text) {
        let value: Value =
            serde::Deserialize::deserialize(document).map_err(|e| ManifestError::Rendered {
                kustomization: path.display().to_string(),
                reason: e.to_string(),
            })?;
        if !value.is_null() {
            documents.push(value);
        }
    }
    Ok(documents)
}

/// Validates the example policies under `root` against the CRD's schema and
/// the Rust model; returns how many there are.
pub fn validate_examples(tools: &Tools, root: &Path) -> Result<usize, ManifestError> {
    let crd = read_documents(&root.join(CRD_FILE))?
        .into_iter()
        .next()
        .unwrap_or_default();
    let schema = policy_schema(&crd).ok_or_else(|| ManifestError::Invalid {
        kustomization: CRD_FILE.to_owned(),
        problems: vec!["no openAPIV3Schema in the storage version".to_owned()],
    })?;
    let examples = read_documents(&root.join(EXAMPLES_FILE))?;
    let mut problems = Vec::new();
    let errors = schema_errors(tools, schema, &examples)?;
    for (example, errors) in examples.iter().zip(errors) {
        let name = format!(
            "{} {}/{}",
            authz::KIND,
            example["metadata"]["namespace"].as_str().unwrap_or("?"),
            example["metadata"]["name"].as_str().unwrap_or("?")
        );
        problems.extend(
            errors
                .into_iter()
                .map(|e| format!("{name}: the CRD's schema refuses {e}")),
        );
        if let Err(e) = read_policy(example) {
            problems.push(format!("{name}: {e}"));
        }
    }
    if examples.is_empty() {
        problems.push("holds no policy".to_owned());
    }
    into_result(EXAMPLES_FILE, problems)?;
    Ok(examples.len())
}

/// A spec setting every field the Rust model has, so that its JSON names
/// them all (a new field fails to compile here until it is added).
pub fn full_spec() -> AuthorizationPolicySpec {
    let strings = |values: &[&str]| values.iter().map(|v| (*v).to_owned()).collect::<Vec<_>>();
    AuthorizationPolicySpec {
        selector: Some(WorkloadSelector {
            match_labels: BTreeMap::from([("app".to_owned(), "web".to_owned())]),
        }),
        action: Action::Deny,
        rules: vec![Rule {
            from: vec![RuleFrom {
                source: Source {
                    principals: strings(&["cluster.local/ns/shop/sa/frontend"]),
                    not_principals: strings(&["*"]),
                    namespaces: strings(&["shop"]),
                    not_namespaces: strings(&["legacy-*"]),
                    ip_blocks: strings(&["10.0.0.0/8"]),
                    not_ip_blocks: strings(&["10.1.0.0/16"]),
                },
            }],
            to: vec![RuleTo {
                operation: Operation {
                    ports: strings(&["8080"]),
                    not_ports: strings(&["22"]),
                },
            }],
        }],
    }
}

/// Whether the CRD in `objects` (if any) names the resource as the code
/// does, is structural, and mirrors the Rust model.
pub fn crd_problems(objects: &[ManifestObject]) -> Vec<String> {
    let Some(crd) = objects
        .iter()
        .find(|o| o.kind() == "CustomResourceDefinition" && o.name() == crd_name())
    else {
        return Vec::new();
    };
    let mut problems = Vec::new();
    let mut expect = |ok: bool, what: String| {
        if !ok {
            problems.push(what);
        }
    };
    let spec = &crd.document["spec"];
    for (field, expected) in [
        ("/group", authz::API_GROUP),
        ("/names/kind", authz::KIND),
        ("/names/plural", authz::PLURAL),
        ("/scope", "Namespaced"),
    ] {
        expect(
            spec.pointer(field) == Some(&json!(expected)),
            format!("spec{} must be {expected:?}", field.replace('/', ".")),
        );
    }
    let versions = spec["versions"].as_array().cloned().unwrap_or_default();
    expect(
        versions.len() == 1
            && versions[0]["name"] == authz::API_VERSION
            && versions[0]["served"] == true
            && versions[0]["storage"] == true,
        format!("must serve and store one version, {}", authz::API_VERSION),
    );
    let dry_run_path = format!(
        ".metadata.annotations.{}",
        authz::DRY_RUN_ANNOTATION.replace('.', "\\.")
    );
    let columns = versions
        .first()
        .and_then(|v| v["additionalPrinterColumns"].as_array().cloned())
        .unwrap_or_default();
    for path in [
        ".spec.action",
        dry_run_path.as_str(),
        ".metadata.creationTimestamp",
    ] {
        expect(
            columns.iter().any(|c| c["jsonPath"] == path),
            format!("needs a printer column for {path}"),
        );
    }
    let Some(schema) = policy_schema(&crd.document) else {
        return vec![format!(
            "{}: {}: has no openAPIV3Schema",
            crd.origin,
            crd.describe()
        )];
    };
    let action = &schema["properties"]["spec"]["properties"]["action"];
    expect(
        action["enum"] == json!([Action::Allow.as_str(), Action::Deny.as_str()])
            && action["default"] == Action::default().as_str(),
        format!(
            "spec.action must be an enum of {} and {} defaulting to {}, as sealmesh_common::authz::Action",
            Action::Allow.as_str(),
            Action::Deny.as_str(),
            Action::default().as_str()
        ),
    );
    structural_problems(schema, "openAPIV3Schema", true, &mut problems);
    let full = serde_json::to_value(full_spec()).expect("a spec serializes");
    mirror_problems(&full, &schema["properties"]["spec"], "spec", &mut problems);
    problems
        .into_iter()
        .map(|p| format!("{}: {}: {p}", crd.origin, crd.describe()))
        .collect()
}

/// What makes a schema non-structural, which the API server refuses: a
/// node without `type`, `properties` beside `additionalProperties`,
/// `uniqueItems`, types or defaults inside logical junctors, and a
/// `metadata` schema restricting more than its type.
fn structural_problems(node: &Value, path: &str, typed: bool, problems: &mut Vec<String>) {
    let preserves = node["x-kubernetes-preserve-unknown-fields"] == true
        || node["x-kubernetes-int-or-string"] == true;
    if typed && node.get("type").is_none() && !preserves {
        problems.push(format!("{path}: has no type (not a structural schema)"));
    }
    if node.get("properties").is_some() && node.get("additionalProperties").is_some() {
        problems.push(format!(
            "{path}: properties and additionalProperties exclude each other in a structural schema"
        ));
    }
    if node["uniqueItems"] == true {
        problems.push(format!(
            "{path}: uniqueItems is refused by the API server (use x-kubernetes-list-type: set)"
        ));
    }
    if let Some(default) = node.get("default")
        && let Some(allowed) = node["enum"].as_array()
        && !allowed.contains(default)
    {
        problems.push(format!("{path}: default {default} is not in its enum"));
    }
    for junctor in ["allOf", "anyOf", "oneOf", "not"] {
        let nested: Vec<&Value> = match &node[junctor] {
            Value::Array(items) => items.iter().collect(),
            Value::Object(_) => vec![&node[junctor]],
            _ => Vec::new(),
        };
        for inner in nested {
            for forbidden in [
                "type",
                "description",
                "default",
                "additionalProperties",
                "nullable",
            ] {
                if inner.get(forbidden).is_some() {
                    problems.push(format!(
                        "{path}.{junctor}: sets {forbidden}, which a structural schema forbids there"
                    ));
                }
            }
        }
    }
    if let Some(properties) = node["properties"].as_object() {
        for (name, property) in properties {
            let child = format!("{path}.{name}");
            if path == "openAPIV3Schema"
                && name == "metadata"
                && property
                    .as_object()
                    .is_some_and(|m| m.keys().any(|k| k != "type"))
            {
                problems.push(format!(
                    "{child}: the API server allows only its type (metadata is its own)"
                ));
            }
            structural_problems(property, &child, true, problems);
        }
    }
    if node["additionalProperties"].is_object() {
        structural_problems(
            &node["additionalProperties"],
            &format!("{path}.additionalProperties"),
            true,
            problems,
        );
    }
    if node["items"].is_object() {
        structural_problems(&node["items"], &format!("{path}.items"), true, problems);
    }
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// `value` (the JSON of a spec with every field set) and `schema` name the
/// same fields with the same types, all the way down.
fn mirror_problems(value: &Value, schema: &Value, path: &str, problems: &mut Vec<String>) {
    let declared = schema["type"].as_str().unwrap_or("none");
    if declared != json_type(value) {
        problems.push(format!(
            "{path}: the schema says {declared}, sealmesh_common::authz writes {}",
            json_type(value)
        ));
        return;
    }
    match value {
        Value::Object(fields) => {
            if schema["additionalProperties"].is_object() {
                for (key, field) in fields {
                    mirror_problems(
                        field,
                        &schema["additionalProperties"],
                        &format!("{path}[{key}]"),
                        problems,
                    );
                }
                return;
            }
            let properties = schema["properties"]
                .as_object()
                .cloned()
                .unwrap_or_default();
            for (key, field) in fields {
                match properties.get(key) {
                    Some(property) => {
                        mirror_problems(field, property, &format!("{path}.{key}"), problems);
                    }
                    None => problems.push(format!(
                        "{path}.{key}: in sealmesh_common::authz, missing from the schema"
                    )),
                }
            }
            for key in properties.keys().filter(|k| !fields.contains_key(*k)) {
                problems.push(format!(
                    "{path}.{key}: in the schema, not in sealmesh_common::authz"
                ));
            }
        }
        Value::Array(items) => {
            for item in items {
                mirror_problems(item, &schema["items"], &format!("{path}[]"), problems);
            }
        }
        _ => {}
    }
}
