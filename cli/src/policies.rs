//! The cluster's `AuthorizationPolicy` objects as the CLI reads them: from
//! the cluster file (local mode) or the API (`authorizationpolicies.sealmesh.io`),
//! each with its spec or the reason it cannot be read, compiled as the
//! agents compile them (`sealmesh_common::authz`).

use std::{collections::BTreeMap, path::Path};

use sealmesh_common::{
    authz::{
        self, AuthorizationPolicy, AuthorizationPolicySpec, CompiledPolicy, InvalidPolicy,
        PolicyName, PolicySet,
    },
    cluster::{ClusterError, ClusterFile},
};
use serde_json::Value;

/// The cluster file's key for its policies.
const CLUSTER_FILE_KEY: &str = "authorizationPolicies";

/// One policy as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListedPolicy {
    pub name: PolicyName,
    pub annotations: BTreeMap<String, String>,
    /// The spec, or why it cannot be read (the agents then judge the policy
    /// as a DENY of everything it may select).
    pub spec: Result<AuthorizationPolicySpec, InvalidPolicy>,
}

impl ListedPolicy {
    pub fn of(policy: &AuthorizationPolicy) -> Self {
        Self {
            name: PolicyName {
                namespace: policy.namespace.clone(),
                name: policy.name.clone(),
            },
            annotations: policy.annotations.clone(),
            spec: Ok(policy.spec.clone()),
        }
    }

    /// A policy from its place, annotations and `spec` as JSON (absent or
    /// null: an empty spec, which Istio reads as "allow nothing").
    pub fn from_json(
        name: PolicyName,
        annotations: BTreeMap<String, String>,
        spec: Option<&Value>,
    ) -> Self {
        Self {
            name,
            annotations,
            spec: parse_spec(spec.unwrap_or(&Value::Null)),
        }
    }

    pub fn dry_run(&self) -> bool {
        authz::is_dry_run(&self.annotations)
    }

    /// Why the agents cannot use the policy as written: its spec is
    /// unreadable or invalid. The field is named from `spec`.
    pub fn invalid(&self) -> Option<InvalidPolicy> {
        match &self.spec {
            Err(error) => Some(error.clone()),
            Ok(spec) => authz::validate(spec).err().map(|error| InvalidPolicy {
                field: format!("spec.{}", error.field),
                problem: error.problem,
            }),
        }
    }

    pub fn compile(&self) -> CompiledPolicy {
        CompiledPolicy::from_spec(
            self.name.clone(),
            self.dry_run(),
            self.spec.as_ref().map_err(Clone::clone),
        )
    }

    /// The ports its rules name (`ports` and `notPorts`), where readable.
    pub fn named_ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.spec
            .iter()
            .flat_map(|spec| &spec.rules)
            .flat_map(|rule| &rule.to)
            .flat_map(|to| to.operation.ports.iter().chain(&to.operation.not_ports))
            .filter_map(|port| port.parse().ok())
    }
}

/// Every policy compiled, `root_namespace`'s applying to all namespaces.
pub fn policy_set(root_namespace: &str, policies: &[ListedPolicy]) -> PolicySet {
    PolicySet::new(root_namespace, policies.iter().map(ListedPolicy::compile))
}

/// A spec from JSON; an unreadable one names the field, from `spec`.
pub fn parse_spec(value: &Value) -> Result<AuthorizationPolicySpec, InvalidPolicy> {
    if value.is_null() {
        return Ok(AuthorizationPolicySpec::default());
    }
    serde_path_to_error::deserialize(value).map_err(|error| {
        let path = error.path().to_string();
        InvalidPolicy {
            field: if path == "." {
                "spec".to_owned()
            } else {
                format!("spec.{path}")
            },
            problem: error.into_inner().to_string(),
        }
    })
}

/// A cluster file whose policies do not all load, read leniently: the rest
/// of the file validated as usual, and each policy on its own, so that
/// `check` can name every bad policy instead of failing on the first. None
/// when the file is wrong elsewhere too (the caller reports its own error).
pub fn load_cluster_file_leniently(path: &Path) -> Option<(ClusterFile, Vec<ListedPolicy>)> {
    let text = std::fs::read_to_string(path).ok()?;
    leniently(&text).ok()
}

/// [`load_cluster_file_leniently`] of the file's text.
pub fn leniently(text: &str) -> Result<(ClusterFile, Vec<ListedPolicy>), ClusterError> {
    let mut document: serde_yaml_ng::Value = serde_yaml_ng::from_str(text)?;
    let raw = document
        .as_mapping_mut()
        .and_then(|map| map.remove(CLUSTER_FILE_KEY))
        .unwrap_or_default();
    let mut cluster: ClusterFile = serde_yaml_ng::from_value(document)?;
    let entries = match raw {
        serde_yaml_ng::Value::Null => Vec::new(),
        serde_yaml_ng::Value::Sequence(entries) => entries,
        _ => {
            return Err(ClusterError::Invalid(format!(
                "{CLUSTER_FILE_KEY} must be a list"
            )));
        }
    };
    let mut listed = Vec::new();
    for (i, entry) in entries.into_iter().enumerate() {
        let entry = serde_json::to_value(entry)
            .map_err(|e| ClusterError::Invalid(format!("{CLUSTER_FILE_KEY}[{i}]: {e}")))?;
        let text = |key: &str| {
            entry[key].as_str().map(str::to_owned).ok_or_else(|| {
                ClusterError::Invalid(format!("{CLUSTER_FILE_KEY}[{i}]: {key} must be a string"))
            })
        };
        let annotations = serde_json::from_value(entry["annotations"].clone()).unwrap_or_default();
        let name = PolicyName {
            namespace: text("namespace")?,
            name: text("name")?,
        };
        listed.push(ListedPolicy::from_json(
            name,
            annotations,
            entry.get("spec"),
        ));
    }
    // Everything else about the policies (declared namespaces, names,
    // duplicates) is checked by the file's own validation.
    cluster.authorization_policies = listed
        .iter()
        .filter(|p| p.invalid().is_none())
        .filter_map(|p| {
            Some(AuthorizationPolicy {
                name: p.name.name.clone(),
                namespace: p.name.namespace.clone(),
                annotations: p.annotations.clone(),
                spec: p.spec.clone().ok()?,
            })
        })
        .collect();
    cluster.validate()?;
    Ok((cluster, listed))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn name(ns: &str, name: &str) -> PolicyName {
        PolicyName {
            namespace: ns.into(),
            name: name.into(),
        }
    }

    #[test]
    fn specs_from_the_api_parse_and_unreadable_ones_name_the_field() {
        let good = ListedPolicy::from_json(
            name("shop", "web"),
            BTreeMap::from([("sealmesh.io/dry-run".to_owned(), "true".to_owned())]),
            Some(&json!({
                "selector": { "matchLabels": { "app": "web" } },
                "action": "ALLOW",
                "rules": [{ "to": [{ "operation": { "ports": ["8080", 9090] } }] }],
            })),
        );
        assert!(good.dry_run());
        assert_eq!(good.invalid(), None);
        assert_eq!(good.named_ports().collect::<Vec<_>>(), [8080, 9090]);

        let l7 = ListedPolicy::from_json(
            name("shop", "l7"),
            BTreeMap::new(),
            Some(&json!({ "rules": [{ "to": [{ "operation": { "methods": ["GET"] } }] }] })),
        );
        let error = l7.invalid().unwrap();
        assert_eq!(error.field, "spec.rules[0].to[0].operation.methods");
        assert!(
            error.problem.starts_with("unknown field `methods`"),
            "{error}"
        );
        let compiled = l7.compile();
        assert_eq!(
            compiled.action,
            authz::Action::Deny,
            "unreadable fails closed"
        );

        let action = ListedPolicy::from_json(
            name("shop", "a"),
            BTreeMap::new(),
            Some(&json!({ "action": "AUDIT" })),
        );
        assert_eq!(action.invalid().unwrap().field, "spec.action");

        let bad_port = ListedPolicy::from_json(
            name("shop", "p"),
            BTreeMap::new(),
            Some(&json!({ "rules": [{ "to": [{ "operation": { "ports": ["http"] } }] }] })),
        );
        assert_eq!(
            bad_port.invalid().unwrap().to_string(),
            "spec.rules[0].to[0].operation.ports[0]: \"http\" is not a port (1-65535)"
        );

        let empty = ListedPolicy::from_json(name("shop", "e"), BTreeMap::new(), None);
        assert_eq!(empty.spec, Ok(AuthorizationPolicySpec::default()));
    }

    const CLUSTER: &str = r#"
apiVersion: sealmesh.io/v1alpha1
kind: Cluster
name: tb-test
nodes:
  - { name: node-0, ip: 172.18.0.2, podCidr: 10.244.0.0/24, cgroup: /sys/fs/cgroup/x/node-0 }
namespaces:
  - { name: shop, labels: { sealmesh.io/mesh: enabled } }
pods:
  - { name: web, namespace: shop, serviceAccount: web, ip: 10.244.0.2, node: node-0, cgroup: /sys/fs/cgroup/x/node-0/web }
authorizationPolicies:
  - { name: good, namespace: shop, spec: { rules: [{ from: [{ source: { namespaces: [shop] } }] }] } }
  - { name: l7, namespace: shop, spec: { rules: [{ to: [{ operation: { methods: [GET] } }] }] } }
  - { name: star, namespace: shop, spec: { rules: [{ from: [{ source: { principals: ["a*b"] } }] }] } }
"#;

    #[test]
    fn a_cluster_file_with_bad_policies_loads_leniently_with_each_named() {
        assert!(ClusterFile::from_yaml(CLUSTER).is_err());
        let (cluster, listed) = leniently(CLUSTER).unwrap();
        assert_eq!(cluster.pods.len(), 1);
        assert_eq!(cluster.authorization_policies.len(), 1);
        let problems: Vec<String> = listed
            .iter()
            .filter_map(|p| p.invalid().map(|e| format!("{}: {e}", p.name)))
            .collect();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].starts_with(
            "shop/l7: spec.rules[0].to[0].operation.methods: unknown field `methods`"
        ));
        assert!(problems[1].starts_with(
            "shop/star: spec.rules[0].from[0].source.principals[0]: \"a*b\": `*` may only be"
        ));
        // Wrong elsewhere too: no lenient reading.
        assert!(leniently(&CLUSTER.replace("ip: 172.18.0.2", "ip: nowhere")).is_err());
        assert!(
            leniently(&CLUSTER.replace("namespace: shop, spec", "namespace: gone, spec")).is_err()
        );
    }
}
