//! What the control plane's ServiceAccounts need from RBAC, and whether a
//! cluster grants it. What they need is what `deploy/base` grants them (its
//! Roles, ClusterRoles and bindings, as `sealmesh install` embeds them);
//! whether a cluster grants it is decided from its roles and bindings the way
//! the Kubernetes RBAC authorizer decides a request: verbs, API groups and
//! resources with their `*` wildcards (and `*/subresource`), resourceNames,
//! and ServiceAccount, User and Group subjects.

use std::{collections::BTreeMap, fmt};

use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
};
use sealmesh_common::consts::kube::SERVICE_ACCOUNT_USERNAME_PREFIX;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::install;

/// RBAC's wildcard, in verbs, apiGroups and resources.
const ALL: &str = "*";
/// Groups every ServiceAccount's requests carry.
const ALL_SERVICE_ACCOUNTS_GROUP: &str = "system:serviceaccounts";
const AUTHENTICATED_GROUP: &str = "system:authenticated";

/// A ServiceAccount, as RBAC subjects name it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Account {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServiceAccount {}/{}", self.namespace, self.name)
    }
}

/// One request RBAC decides: `verb` on `resource` (`plural`, or
/// `plural/subresource`) of API `group` ("" is core), one object (`name`)
/// or any, in `namespace` or cluster-wide (`None`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Permission {
    pub verb: String,
    pub group: String,
    pub resource: String,
    pub name: Option<String>,
    pub namespace: Option<String>,
}

/// The permissions one ServiceAccount needs.
#[derive(Debug, PartialEq, Eq)]
pub struct Need {
    pub account: Account,
    pub permissions: Vec<Permission>,
}

/// Roles and bindings: every ClusterRole and ClusterRoleBinding, and the
/// Roles and RoleBindings of the namespaces that matter (the others can
/// grant nothing there).
#[derive(Debug, Default)]
pub struct Rbac {
    pub cluster_roles: Vec<ClusterRole>,
    pub cluster_role_bindings: Vec<ClusterRoleBinding>,
    pub roles: Vec<Role>,
    pub role_bindings: Vec<RoleBinding>,
}

impl Rbac {
    /// The RBAC objects of `deploy/base`, moved to `namespace` as
    /// `sealmesh install --namespace` moves them.
    fn of_base(namespace: &str) -> Self {
        fn parse<T: DeserializeOwned>(object: Value) -> T {
            serde_json::from_value(object).expect("deploy/base's RBAC objects are valid (tested)")
        }
        let mut rbac = Self::default();
        for mut object in install::base_objects().expect("the embedded deploy/base parses (tested)")
        {
            install::place(&mut object, namespace);
            match object["kind"].as_str() {
                Some("ClusterRole") => rbac.cluster_roles.push(parse(object)),
                Some("ClusterRoleBinding") => rbac.cluster_role_bindings.push(parse(object)),
                Some("Role") => rbac.roles.push(parse(object)),
                Some("RoleBinding") => rbac.role_bindings.push(parse(object)),
                _ => {}
            }
        }
        rbac
    }

    /// Whether some binding of `account` grants `permission`: a
    /// ClusterRoleBinding anywhere, a RoleBinding in the permission's
    /// namespace only.
    pub fn allows(&self, account: &Account, permission: &Permission) -> bool {
        let cluster_wide = self
            .cluster_role_bindings
            .iter()
            .filter(|binding| binds(binding.subjects.as_deref(), "", account))
            .any(|binding| {
                self.rules(&binding.role_ref, None)
                    .iter()
                    .any(|rule| grants(rule, permission))
            });
        let Some(namespace) = permission.namespace.as_deref() else {
            return cluster_wide;
        };
        cluster_wide
            || self
                .role_bindings
                .iter()
                .filter(|binding| binding.metadata.namespace.as_deref() == Some(namespace))
                .filter(|binding| binds(binding.subjects.as_deref(), namespace, account))
                .any(|binding| {
                    self.rules(&binding.role_ref, Some(namespace))
                        .iter()
                        .any(|rule| grants(rule, permission))
                })
    }

    /// The rules a binding's roleRef points at: a ClusterRole, or (from a
    /// RoleBinding in `namespace`) a Role there. A missing role grants
    /// nothing.
    fn rules(&self, role: &RoleRef, namespace: Option<&str>) -> &[PolicyRule] {
        let rules = match (role.kind.as_str(), namespace) {
            ("ClusterRole", _) => self
                .cluster_roles
                .iter()
                .find(|r| r.metadata.name.as_deref() == Some(&role.name))
                .and_then(|r| r.rules.as_deref()),
            ("Role", Some(namespace)) => self
                .roles
                .iter()
                .find(|r| {
                    r.metadata.name.as_deref() == Some(&role.name)
                        && r.metadata.namespace.as_deref() == Some(namespace)
                })
                .and_then(|r| r.rules.as_deref()),
            _ => None,
        };
        rules.unwrap_or_default()
    }
}

/// Whether `subjects` of a binding in `namespace` ("" for a
/// ClusterRoleBinding) include `account`: by name, as its user name, or by
/// one of the groups its requests carry.
fn binds(subjects: Option<&[Subject]>, namespace: &str, account: &Account) -> bool {
    subjects.unwrap_or_default().iter().any(|subject| {
        match subject.kind.as_str() {
            // A ServiceAccount subject without a namespace means the binding's.
            "ServiceAccount" => {
                subject.name == account.name
                    && subject
                        .namespace
                        .as_deref()
                        .filter(|ns| !ns.is_empty())
                        .unwrap_or(namespace)
                        == account.namespace
            }
            "User" => {
                subject.name
                    == format!(
                        "{SERVICE_ACCOUNT_USERNAME_PREFIX}{}:{}",
                        account.namespace, account.name
                    )
            }
            "Group" => {
                subject.name == ALL_SERVICE_ACCOUNTS_GROUP
                    || subject.name == format!("{ALL_SERVICE_ACCOUNTS_GROUP}:{}", account.namespace)
                    || subject.name == AUTHENTICATED_GROUP
            }
            _ => false,
        }
    })
}

/// Whether `rule` grants `permission`, as the RBAC authorizer matches a
/// request: `*` or the verb, `*` or the group, `*`, the resource (with its
/// subresource) or `*/subresource`, and no resourceNames or the object's.
fn grants(rule: &PolicyRule, permission: &Permission) -> bool {
    let lists = |list: &Option<Vec<String>>, wanted: &str| {
        list.iter().flatten().any(|v| v == ALL || v == wanted)
    };
    let subresource = permission.resource.split_once('/').map(|(_, sub)| sub);
    let resource_matches = rule.resources.iter().flatten().any(|r| {
        r == ALL
            || *r == permission.resource
            || subresource.is_some_and(|sub| r.strip_prefix("*/") == Some(sub))
    });
    let name_matches = match rule.resource_names.as_deref() {
        None | Some([]) => true,
        Some(names) => permission
            .name
            .as_ref()
            .is_some_and(|name| names.contains(name)),
    };
    rule.verbs.iter().any(|v| v == ALL || *v == permission.verb)
        && lists(&rule.api_groups, &permission.group)
        && resource_matches
        && name_matches
}

/// What each ServiceAccount `deploy/base` binds needs, with the base moved to
/// `namespace`: every permission the roles bound to it grant, cluster-wide
/// through a ClusterRoleBinding, in the binding's namespace through a
/// RoleBinding.
pub fn required(namespace: &str) -> Vec<Need> {
    let base = Rbac::of_base(namespace);
    let mut needs: BTreeMap<Account, Vec<Permission>> = BTreeMap::new();
    let mut add = |subjects: Option<&[Subject]>, binding_ns: &str, rules: &[PolicyRule]| {
        for subject in subjects.unwrap_or_default() {
            if subject.kind != "ServiceAccount" {
                continue;
            }
            let account = Account {
                namespace: subject
                    .namespace
                    .clone()
                    .unwrap_or_else(|| binding_ns.to_owned()),
                name: subject.name.clone(),
            };
            let permissions = needs.entry(account).or_default();
            let scope = (!binding_ns.is_empty()).then(|| binding_ns.to_owned());
            for permission in rules.iter().flat_map(|rule| expand(rule, &scope)) {
                if !permissions.contains(&permission) {
                    permissions.push(permission);
                }
            }
        }
    };
    for binding in &base.cluster_role_bindings {
        add(
            binding.subjects.as_deref(),
            "",
            base.rules(&binding.role_ref, None),
        );
    }
    for binding in &base.role_bindings {
        let ns = binding.metadata.namespace.as_deref().unwrap_or(namespace);
        add(
            binding.subjects.as_deref(),
            ns,
            base.rules(&binding.role_ref, Some(ns)),
        );
    }
    needs
        .into_iter()
        .map(|(account, permissions)| Need {
            account,
            permissions,
        })
        .collect()
}

/// Every single permission a rule grants, in `namespace`.
fn expand(rule: &PolicyRule, namespace: &Option<String>) -> Vec<Permission> {
    let names: Vec<Option<String>> = match rule.resource_names.as_deref() {
        None | Some([]) => vec![None],
        Some(names) => names.iter().cloned().map(Some).collect(),
    };
    let mut permissions = Vec::new();
    for group in rule.api_groups.iter().flatten() {
        for resource in rule.resources.iter().flatten() {
            for name in &names {
                for verb in &rule.verbs {
                    permissions.push(Permission {
                        verb: verb.clone(),
                        group: group.clone(),
                        resource: resource.clone(),
                        name: name.clone(),
                        namespace: namespace.clone(),
                    });
                }
            }
        }
    }
    permissions
}

/// What `rbac` does not grant of `needs`, one line per ServiceAccount and
/// resource (object, scope) with the verbs missing:
/// `ServiceAccount sealmesh/sealmesh-agent cannot get, list, watch pods cluster-wide`.
pub fn missing(rbac: &Rbac, needs: &[Need]) -> Vec<String> {
    // Keyed by the permission without its verb, in the base's order.
    let mut lines: Vec<(&Account, Permission, Vec<&str>)> = Vec::new();
    for need in needs {
        for p in &need.permissions {
            if rbac.allows(&need.account, p) {
                continue;
            }
            let target = Permission {
                verb: String::new(),
                ..p.clone()
            };
            match lines
                .iter_mut()
                .find(|(account, t, _)| *account == &need.account && *t == target)
            {
                Some((_, _, verbs)) => verbs.push(&p.verb),
                None => lines.push((&need.account, target, vec![&p.verb])),
            }
        }
    }
    lines
        .into_iter()
        .map(|(account, target, verbs)| {
            let resource = match (target.group.as_str(), target.resource.split_once('/')) {
                ("", _) => target.resource.clone(),
                (group, None) => format!("{}.{group}", target.resource),
                (group, Some((plural, sub))) => format!("{plural}.{group}/{sub}"),
            };
            let object = target.name.map(|n| format!(" {n:?}")).unwrap_or_default();
            let scope = target.namespace.map_or_else(
                || "cluster-wide".to_owned(),
                |ns| format!("in namespace {ns}"),
            );
            format!(
                "{account} cannot {} {resource}{object} {scope}",
                verbs.join(", ")
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use sealmesh_common::consts::kube::{AGENT_SERVICE_ACCOUNT, IDENTITY_NAME};
    use serde_json::json;

    use super::*;

    fn account(name: &str) -> Account {
        Account {
            namespace: "sealmesh".into(),
            name: name.into(),
        }
    }

    fn permission(verb: &str, group: &str, resource: &str, name: Option<&str>) -> Permission {
        Permission {
            verb: verb.into(),
            group: group.into(),
            resource: resource.into(),
            name: name.map(Into::into),
            namespace: Some("sealmesh".into()),
        }
    }

    fn rule(value: Value) -> PolicyRule {
        serde_json::from_value(value).unwrap()
    }

    /// `rules` in a ClusterRole bound cluster-wide to `sealmesh/agent`.
    fn cluster_wide(rules: Value) -> Rbac {
        Rbac {
            cluster_roles: vec![
                serde_json::from_value(json!({ "metadata": { "name": "r" }, "rules": rules }))
                    .unwrap(),
            ],
            cluster_role_bindings: vec![
                serde_json::from_value(json!({
                    "metadata": { "name": "b" },
                    "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "r" },
                    "subjects": [{ "kind": "ServiceAccount", "name": "agent", "namespace": "sealmesh" }],
                }))
                .unwrap(),
            ],
            ..Rbac::default()
        }
    }

    #[test]
    fn wildcards_match_every_verb_group_and_resource() {
        let wanted = permission("watch", "discovery.k8s.io", "endpointslices", None);
        for granted in [
            json!({ "apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["*"] }),
            json!({ "apiGroups": ["*"], "resources": ["endpointslices"], "verbs": ["watch"] }),
            json!({ "apiGroups": ["discovery.k8s.io"], "resources": ["*"], "verbs": ["watch"] }),
        ] {
            assert!(grants(&rule(granted.clone()), &wanted), "{granted}");
        }
        for granted in [
            json!({ "apiGroups": [""], "resources": ["endpointslices"], "verbs": ["*"] }),
            json!({ "apiGroups": ["*"], "resources": ["endpoints"], "verbs": ["*"] }),
            json!({ "apiGroups": ["*"], "resources": ["*"], "verbs": ["get", "list"] }),
            json!({ "nonResourceURLs": ["*"], "verbs": ["*"] }),
        ] {
            assert!(!grants(&rule(granted.clone()), &wanted), "{granted}");
        }
    }

    #[test]
    fn the_core_group_is_not_another_groups_resource_of_the_same_name() {
        let core_events =
            rule(json!({ "apiGroups": [""], "resources": ["events"], "verbs": ["create"] }));
        assert!(grants(
            &core_events,
            &permission("create", "", "events", None)
        ));
        assert!(!grants(
            &core_events,
            &permission("create", "events.k8s.io", "events", None)
        ));
    }

    #[test]
    fn resource_names_restrict_a_grant_and_are_not_needed_for_one() {
        let one = rule(json!({
            "apiGroups": [""], "resources": ["configmaps"],
            "resourceNames": ["sealmesh-identity-trust-roots"], "verbs": ["get"],
        }));
        let any = rule(json!({ "apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"] }));
        let trust_roots = permission(
            "get",
            "",
            "configmaps",
            Some("sealmesh-identity-trust-roots"),
        );
        assert!(grants(&one, &trust_roots));
        assert!(grants(&any, &trust_roots), "no resourceNames: every object");
        assert!(!grants(
            &one,
            &permission("get", "", "configmaps", Some("other"))
        ));
        assert!(
            !grants(&one, &permission("get", "", "configmaps", None)),
            "a grant for one object does not cover every object"
        );
    }

    #[test]
    fn subresources_match_exactly_or_by_star_slash() {
        let portforward = permission("create", "", "pods/portforward", None);
        for (resources, granted) in [
            (json!(["pods/portforward"]), true),
            (json!(["*/portforward"]), true),
            (json!(["*"]), true),
            (json!(["pods"]), false),
            (json!(["pods/*"]), false),
            (json!(["*/exec"]), false),
        ] {
            let r = rule(json!({ "apiGroups": [""], "resources": resources, "verbs": ["create"] }));
            assert_eq!(grants(&r, &portforward), granted, "{resources}");
        }
    }

    #[test]
    fn bindings_grant_to_their_subjects_in_their_scope() {
        let rules = json!([{ "apiGroups": [""], "resources": ["pods"], "verbs": ["list"] }]);
        let mut rbac = cluster_wide(rules.clone());
        let list_pods = permission("list", "", "pods", None);
        let cluster_list_pods = Permission {
            namespace: None,
            ..list_pods.clone()
        };
        assert!(rbac.allows(&account("agent"), &list_pods));
        assert!(rbac.allows(&account("agent"), &cluster_list_pods));
        assert!(!rbac.allows(&account("identity"), &list_pods));
        let elsewhere = Account {
            namespace: "other".into(),
            name: "agent".into(),
        };
        assert!(!rbac.allows(&elsewhere, &list_pods));

        // Groups and the user name count as the ServiceAccount.
        for subject in [
            json!({ "kind": "Group", "name": "system:serviceaccounts" }),
            json!({ "kind": "Group", "name": "system:serviceaccounts:sealmesh" }),
            json!({ "kind": "Group", "name": "system:authenticated" }),
            json!({ "kind": "User", "name": "system:serviceaccount:sealmesh:identity" }),
        ] {
            rbac.cluster_role_bindings[0].subjects =
                Some(vec![serde_json::from_value(subject.clone()).unwrap()]);
            assert!(rbac.allows(&account("identity"), &list_pods), "{subject}");
        }
        rbac.cluster_role_bindings[0].subjects = Some(vec![
            serde_json::from_value(
                json!({ "kind": "Group", "name": "system:serviceaccounts:other" }),
            )
            .unwrap(),
        ]);
        assert!(!rbac.allows(&account("identity"), &list_pods));

        // A RoleBinding grants in its namespace only, never cluster-wide; to a
        // ClusterRole's rules or its own namespace's Role; a ServiceAccount
        // subject without a namespace is in the binding's.
        let mut rbac = cluster_wide(rules.clone());
        rbac.cluster_role_bindings.clear();
        rbac.roles.push(
            serde_json::from_value(
                json!({ "metadata": { "name": "role", "namespace": "sealmesh" }, "rules": rules }),
            )
            .unwrap(),
        );
        for role_ref in [
            json!({ "kind": "ClusterRole", "name": "r" }),
            json!({ "kind": "Role", "name": "role" }),
        ] {
            let mut role_ref = role_ref;
            role_ref["apiGroup"] = json!("rbac.authorization.k8s.io");
            rbac.role_bindings = vec![
                serde_json::from_value(json!({
                    "metadata": { "name": "b", "namespace": "sealmesh" },
                    "roleRef": role_ref,
                    "subjects": [{ "kind": "ServiceAccount", "name": "agent" }],
                }))
                .unwrap(),
            ];
            assert!(rbac.allows(&account("agent"), &list_pods), "{role_ref}");
            assert!(
                !rbac.allows(&account("agent"), &cluster_list_pods),
                "{role_ref}"
            );
            let other_ns = Permission {
                namespace: Some("other".into()),
                ..list_pods.clone()
            };
            assert!(!rbac.allows(&account("agent"), &other_ns), "{role_ref}");
        }
        // A binding to a role that does not exist grants nothing.
        rbac.roles.clear();
        assert!(!rbac.allows(&account("agent"), &list_pods));
    }

    #[test]
    fn the_base_grants_what_it_requires_in_any_namespace() {
        for namespace in ["sealmesh", "mesh-system"] {
            let needs = required(namespace);
            let accounts: Vec<&str> = needs.iter().map(|n| n.account.name.as_str()).collect();
            assert_eq!(accounts, [AGENT_SERVICE_ACCOUNT, IDENTITY_NAME]);
            for need in &needs {
                assert_eq!(need.account.namespace, namespace);
            }
            assert_eq!(
                missing(&Rbac::of_base(namespace), &needs),
                Vec::<String>::new()
            );
        }
        // The base in another namespace grants nothing here.
        let elsewhere = Rbac::of_base("elsewhere");
        for need in required("sealmesh") {
            for p in &need.permissions {
                assert!(!elsewhere.allows(&need.account, p), "{p:?}");
            }
        }
    }

    #[test]
    fn the_agents_needs_come_from_agent_rbac_yaml() {
        let needs = required("sealmesh");
        let agent = &needs[0];
        assert!(agent.permissions.contains(&Permission {
            namespace: None,
            ..permission("watch", "discovery.k8s.io", "endpointslices", None)
        }));
        assert!(agent.permissions.contains(&permission(
            "get",
            "apps",
            "daemonsets",
            Some("sealmesh-agent")
        )));
        assert!(!agent.permissions.iter().any(|p| p.resource == "secrets"));
    }

    #[test]
    fn missing_permissions_are_named_per_account_resource_and_scope() {
        let mut rbac = Rbac::of_base("sealmesh");
        rbac.cluster_role_bindings
            .retain(|b| b.metadata.name.as_deref() != Some(AGENT_SERVICE_ACCOUNT));
        rbac.roles
            .iter_mut()
            .find(|r| r.metadata.name.as_deref() == Some(IDENTITY_NAME))
            .unwrap()
            .rules
            .as_mut()
            .unwrap()
            .retain(|r| r.resources.as_deref() != Some(&["secrets".to_owned()][..]));
        assert_eq!(
            missing(&rbac, &required("sealmesh")),
            [
                "ServiceAccount sealmesh/sealmesh-agent cannot get, list, watch pods cluster-wide",
                "ServiceAccount sealmesh/sealmesh-agent cannot get, list, watch nodes cluster-wide",
                "ServiceAccount sealmesh/sealmesh-agent cannot get, list, watch services cluster-wide",
                "ServiceAccount sealmesh/sealmesh-agent cannot get, list, watch namespaces cluster-wide",
                "ServiceAccount sealmesh/sealmesh-agent cannot get, list, watch endpointslices.discovery.k8s.io cluster-wide",
                "ServiceAccount sealmesh/sealmesh-agent cannot get, list, watch authorizationpolicies.sealmesh.io cluster-wide",
                "ServiceAccount sealmesh/sealmesh-agent cannot create events cluster-wide",
                "ServiceAccount sealmesh/sealmesh-identity cannot get, list, watch secrets \"sealmesh-identity-issuer\" in namespace sealmesh",
            ]
        );
    }
}
