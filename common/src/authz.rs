//! Identity-based L4 authorization: the `AuthorizationPolicy` resource
//! (`sealmesh.io/v1alpha1`, shaped like Istio's L4 subset) and how it is
//! judged. The agents enforce it, the CLI explains it and the cluster file
//! carries it in local mode; all of them use this module, so they agree on
//! every connection.
//!
//! Semantics (Istio's): a policy in a pod's namespace selects the pod when
//! its `selector.matchLabels` are among the pod's labels (no selector: every
//! pod of the namespace); a policy in the root (control) namespace selects
//! pods of every namespace. For a connection to a pod: any matching DENY
//! rule denies; else, if an ALLOW policy selects the pod, one of its rules
//! must match; else it is allowed. Rules OR; within a rule every `from` and
//! `to` clause must hold (their entries OR); within a source every field
//! must hold (its values OR). A policy without rules matches nothing.
//!
//! What a connection brings: the identity its certificate (or, same-node,
//! its kernel-attested pod) proves, if any, and its source address, if
//! known. `principals` and `namespaces` never match a plaintext source;
//! `notPrincipals`/`notNamespaces` always do (`notPrincipals: ["*"]` is
//! "any connection without mTLS", as in Istio). A condition on something
//! the connection cannot show (its address, when unknown) fails closed: it
//! holds for a DENY rule and not for an ALLOW rule.
//!
//! Policies annotated `sealmesh.io/dry-run: "true"` are judged and
//! reported, never enforced ([`Verdict::dry_run_denial`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
    sync::Arc,
};

use ipnet::Ipv4Net;
use serde::{Deserialize, Deserializer, Serialize};

use crate::identity::{Identity, SPIFFE_SCHEME};

/// API group, version and kind of the resource.
pub const API_GROUP: &str = "sealmesh.io";
pub const API_VERSION: &str = "v1alpha1";
pub const KIND: &str = "AuthorizationPolicy";
/// Plural resource name (`authorizationpolicies.sealmesh.io`).
pub const PLURAL: &str = "authorizationpolicies";
/// Annotation that makes a policy report without enforcing ...
pub const DRY_RUN_ANNOTATION: &str = "sealmesh.io/dry-run";
/// ... when set to this value.
pub const DRY_RUN_VALUE: &str = "true";

/// `spec` of an `AuthorizationPolicy`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub action: Action,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Rule>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Action {
    #[default]
    #[serde(rename = "ALLOW")]
    Allow,
    #[serde(rename = "DENY")]
    Deny,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "ALLOW",
            Self::Deny => "DENY",
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<RuleFrom>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<RuleTo>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleFrom {
    pub source: Source,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ip_blocks: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleTo {
    pub operation: Operation,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "port_texts"
    )]
    pub ports: Vec<String>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "port_texts"
    )]
    pub not_ports: Vec<String>,
}

/// Ports are strings in the resource (as Istio's); YAML written by hand
/// often has numbers, which mean the same.
fn port_texts<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum PortText {
        Number(u64),
        Text(String),
    }
    Ok(Vec::<PortText>::deserialize(deserializer)?
        .into_iter()
        .map(|port| match port {
            PortText::Number(n) => n.to_string(),
            PortText::Text(text) => text,
        })
        .collect())
}

/// A policy as stored: where it lives, its annotations and its spec.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicy {
    pub name: String,
    pub namespace: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    pub spec: AuthorizationPolicySpec,
}

impl AuthorizationPolicy {
    pub fn dry_run(&self) -> bool {
        is_dry_run(&self.annotations)
    }
}

/// Whether annotations mark a policy as dry run.
pub fn is_dry_run(annotations: &BTreeMap<String, String>) -> bool {
    annotations.get(DRY_RUN_ANNOTATION).map(String::as_str) == Some(DRY_RUN_VALUE)
}

/// Why a policy cannot be used; the message names the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct InvalidPolicy {
    /// Path of the field, e.g. `rules[0].from[1].source.principals[2]`.
    pub field: String,
    pub problem: String,
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> InvalidPolicy {
    InvalidPolicy {
        field: field.into(),
        problem: problem.into(),
    }
}

/// Names a policy: `<namespace>/<name>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyName {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for PolicyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A `*` pattern of `principals` or `namespaces`: exact, `prefix*`,
/// `*suffix`, or `*` (anything present).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Pattern {
    Any,
    Exact(String),
    Prefix(String),
    Suffix(String),
}

impl Pattern {
    fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Err("must not be empty".into());
        }
        let stars = text.matches('*').count();
        if text == "*" {
            Ok(Self::Any)
        } else if stars == 0 {
            Ok(Self::Exact(text.to_owned()))
        } else if stars == 1 && text.ends_with('*') {
            Ok(Self::Prefix(text[..text.len() - 1].to_owned()))
        } else if stars == 1 && text.starts_with('*') {
            Ok(Self::Suffix(text[1..].to_owned()))
        } else {
            Err(format!(
                "{text:?}: `*` may only be the whole value, its first or its last character"
            ))
        }
    }

    /// Matches a value made of `parts` joined (no allocation on the data path).
    fn matches(&self, parts: &[&str]) -> bool {
        let bytes = || parts.iter().flat_map(|part| part.bytes());
        let len: usize = parts.iter().map(|part| part.len()).sum();
        match self {
            Self::Any => true,
            Self::Exact(text) => len == text.len() && bytes().eq(text.bytes()),
            Self::Prefix(text) => len >= text.len() && bytes().take(text.len()).eq(text.bytes()),
            Self::Suffix(text) => {
                len >= text.len() && bytes().skip(len - text.len()).eq(text.bytes())
            }
        }
    }
}

/// An identity as principals name it: `<trust domain>/ns/<ns>/sa/<sa>`
/// (Istio's form), as parts.
fn principal_parts(identity: &Identity) -> [&str; 5] {
    [
        identity.trust_domain().domain(),
        "/ns/",
        identity.namespace(),
        "/sa/",
        identity.service_account(),
    ]
}

/// An identity as principals name it: `<trust domain>/ns/<ns>/sa/<sa>`.
pub fn principal(identity: &Identity) -> String {
    principal_parts(identity).concat()
}

/// The trust domain, namespace and ServiceAccount that an exact principal
/// (Istio's form or the SPIFFE URI) names; None for a `*` pattern or a
/// value of another shape, which no identity's principal equals.
pub fn exact_principal(text: &str) -> Option<(&str, &str, &str)> {
    let text = text.strip_prefix(SPIFFE_SCHEME).unwrap_or(text);
    if text.contains('*') {
        return None;
    }
    match text.split('/').collect::<Vec<_>>()[..] {
        [domain, "ns", namespace, "sa", account]
            if !domain.is_empty() && !namespace.is_empty() && !account.is_empty() =>
        {
            Some((domain, namespace, account))
        }
        _ => None,
    }
}

/// A principal pattern: Istio's `<td>/ns/<ns>/sa/<sa>` or the SPIFFE URI.
fn parse_principal(text: &str) -> Result<Pattern, String> {
    Pattern::parse(text.strip_prefix(SPIFFE_SCHEME).unwrap_or(text))
}

fn parse_ports(field: &str, texts: &[String]) -> Result<Vec<u16>, InvalidPolicy> {
    texts
        .iter()
        .enumerate()
        .map(|(i, text)| {
            text.parse::<u16>()
                .ok()
                .filter(|port| *port != 0)
                .ok_or_else(|| {
                    invalid(
                        format!("{field}[{i}]"),
                        format!("{text:?} is not a port (1-65535)"),
                    )
                })
        })
        .collect()
}

fn parse_blocks(field: &str, texts: &[String]) -> Result<Vec<Ipv4Net>, InvalidPolicy> {
    texts
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let net = text
                .parse::<Ipv4Net>()
                .or_else(|_| text.parse::<Ipv4Addr>().map(Ipv4Net::from))
                .map_err(|_| {
                    invalid(
                        format!("{field}[{i}]"),
                        format!("{text:?} is not an IPv4 address or CIDR (the mesh is IPv4 only)"),
                    )
                })?;
            // 10.0.0.1/8 is taken as 10.0.0.0/8, as Kubernetes and Istio do.
            Ok(net.trunc())
        })
        .collect()
}

fn parse_patterns(
    field: &str,
    texts: &[String],
    parse: fn(&str) -> Result<Pattern, String>,
) -> Result<Vec<Pattern>, InvalidPolicy> {
    texts
        .iter()
        .enumerate()
        .map(|(i, text)| parse(text).map_err(|problem| invalid(format!("{field}[{i}]"), problem)))
        .collect()
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct CompiledSource {
    principals: Vec<Pattern>,
    not_principals: Vec<Pattern>,
    namespaces: Vec<Pattern>,
    not_namespaces: Vec<Pattern>,
    ip_blocks: Vec<Ipv4Net>,
    not_ip_blocks: Vec<Ipv4Net>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct CompiledOperation {
    ports: Vec<u16>,
    not_ports: Vec<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct CompiledRule {
    from: Vec<CompiledSource>,
    to: Vec<CompiledOperation>,
}

/// What a rule is matched against. `ip_in` answers None when the address
/// is unknown.
trait Attributes {
    fn identity(&self) -> Option<&Identity>;
    fn ip_in(&self, nets: &[Ipv4Net]) -> Option<bool>;
    fn port_in(&self, ports: &[u16]) -> bool;
}

/// A connection to judge: the identity it proved (None: plaintext), its
/// source address when known, and the destination port.
#[derive(Clone, Copy, Debug)]
pub struct Connection<'a> {
    pub identity: Option<&'a Identity>,
    pub source_ip: Option<Ipv4Addr>,
    pub port: u16,
}

impl Attributes for Connection<'_> {
    fn identity(&self) -> Option<&Identity> {
        self.identity
    }

    fn ip_in(&self, nets: &[Ipv4Net]) -> Option<bool> {
        self.source_ip
            .map(|ip| nets.iter().any(|net| net.contains(&ip)))
    }

    fn port_in(&self, ports: &[u16]) -> bool {
        ports.contains(&self.port)
    }
}

impl CompiledSource {
    /// `unknown` is what a condition on an unknown address yields.
    fn matches(&self, attrs: &impl Attributes, unknown: bool) -> bool {
        let identity = attrs.identity();
        let principal = |patterns: &[Pattern]| {
            identity.is_some_and(|id| patterns.iter().any(|p| p.matches(&principal_parts(id))))
        };
        let namespace = |patterns: &[Pattern]| {
            identity.is_some_and(|id| patterns.iter().any(|p| p.matches(&[id.namespace()])))
        };
        (self.principals.is_empty() || principal(&self.principals))
            && (self.not_principals.is_empty() || !principal(&self.not_principals))
            && (self.namespaces.is_empty() || namespace(&self.namespaces))
            && (self.not_namespaces.is_empty() || !namespace(&self.not_namespaces))
            && (self.ip_blocks.is_empty() || attrs.ip_in(&self.ip_blocks).unwrap_or(unknown))
            && (self.not_ip_blocks.is_empty()
                || attrs
                    .ip_in(&self.not_ip_blocks)
                    .map_or(unknown, |inside| !inside))
    }

    /// Whether only a proven identity can satisfy it.
    fn requires_identity(&self) -> bool {
        !self.principals.is_empty() || !self.namespaces.is_empty()
    }
}

impl CompiledOperation {
    fn matches(&self, attrs: &impl Attributes) -> bool {
        (self.ports.is_empty() || attrs.port_in(&self.ports))
            && (self.not_ports.is_empty() || !attrs.port_in(&self.not_ports))
    }
}

impl CompiledRule {
    fn matches(&self, attrs: &impl Attributes, unknown: bool) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(attrs, unknown)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(attrs)))
    }
}

/// Checks a spec; the error names the first bad field.
pub fn validate(spec: &AuthorizationPolicySpec) -> Result<(), InvalidPolicy> {
    compile_rules(spec).map(drop)
}

fn compile_rules(spec: &AuthorizationPolicySpec) -> Result<Vec<CompiledRule>, InvalidPolicy> {
    if let Some(selector) = &spec.selector {
        for (key, value) in &selector.match_labels {
            if key.is_empty() {
                return Err(invalid(
                    "selector.matchLabels",
                    "a label key must not be empty",
                ));
            }
            if value.len() > 63 {
                return Err(invalid(
                    format!("selector.matchLabels[{key}]"),
                    "a label value has at most 63 characters",
                ));
            }
        }
    }
    spec.rules
        .iter()
        .enumerate()
        .map(|(r, rule)| {
            let from = rule
                .from
                .iter()
                .enumerate()
                .map(|(f, from)| {
                    let field = |name: &str| format!("rules[{r}].from[{f}].source.{name}");
                    let s = &from.source;
                    if *s == Source::default() {
                        return Err(invalid(
                            format!("rules[{r}].from[{f}].source"),
                            "sets no field; omit `from` to match every source",
                        ));
                    }
                    Ok(CompiledSource {
                        principals: parse_patterns(
                            &field("principals"),
                            &s.principals,
                            parse_principal,
                        )?,
                        not_principals: parse_patterns(
                            &field("notPrincipals"),
                            &s.not_principals,
                            parse_principal,
                        )?,
                        namespaces: parse_patterns(
                            &field("namespaces"),
                            &s.namespaces,
                            Pattern::parse,
                        )?,
                        not_namespaces: parse_patterns(
                            &field("notNamespaces"),
                            &s.not_namespaces,
                            Pattern::parse,
                        )?,
                        ip_blocks: parse_blocks(&field("ipBlocks"), &s.ip_blocks)?,
                        not_ip_blocks: parse_blocks(&field("notIpBlocks"), &s.not_ip_blocks)?,
                    })
                })
                .collect::<Result<_, _>>()?;
            let to = rule
                .to
                .iter()
                .enumerate()
                .map(|(t, to)| {
                    let field = |name: &str| format!("rules[{r}].to[{t}].operation.{name}");
                    let op = &to.operation;
                    if *op == Operation::default() {
                        return Err(invalid(
                            format!("rules[{r}].to[{t}].operation"),
                            "sets no field; omit `to` to match every port",
                        ));
                    }
                    Ok(CompiledOperation {
                        ports: parse_ports(&field("ports"), &op.ports)?,
                        not_ports: parse_ports(&field("notPorts"), &op.not_ports)?,
                    })
                })
                .collect::<Result<_, _>>()?;
            Ok(CompiledRule { from, to })
        })
        .collect()
}

/// One policy, compiled once per change of the policy.
#[derive(Debug, PartialEq, Eq)]
pub struct CompiledPolicy {
    pub name: PolicyName,
    pub action: Action,
    pub dry_run: bool,
    /// None: every pod of the namespace (or of the cluster, from the root
    /// namespace).
    pub match_labels: Option<BTreeMap<String, String>>,
    /// Why the spec cannot be used. Such a policy fails closed: an ALLOW
    /// one matches nothing, a DENY one matches everything, and with no
    /// readable selector it selects every pod it could.
    pub invalid: Option<InvalidPolicy>,
    rules: Vec<CompiledRule>,
}

impl CompiledPolicy {
    pub fn compile(policy: &AuthorizationPolicy) -> Self {
        Self::from_spec(
            PolicyName {
                namespace: policy.namespace.clone(),
                name: policy.name.clone(),
            },
            policy.dry_run(),
            Ok(&policy.spec),
        )
    }

    /// A policy whose spec was read (Ok) or could not be (Err: the reason;
    /// judged fail-closed as a DENY of everything when `action` is unknown).
    pub fn from_spec(
        name: PolicyName,
        dry_run: bool,
        spec: Result<&AuthorizationPolicySpec, InvalidPolicy>,
    ) -> Self {
        let (action, match_labels, compiled) = match spec {
            Ok(spec) => (
                spec.action,
                spec.selector
                    .as_ref()
                    .map(|s| s.match_labels.clone())
                    .filter(|labels| !labels.is_empty()),
                compile_rules(spec),
            ),
            Err(error) => (Action::Deny, None, Err(error)),
        };
        let (rules, invalid) = match compiled {
            Ok(rules) => (rules, None),
            Err(error) => (Vec::new(), Some(error)),
        };
        Self {
            name,
            action,
            dry_run,
            match_labels,
            invalid,
            rules,
        }
    }

    /// Number of rules (an invalid policy has none that it judges by).
    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// The index of the first rule matching, or for an invalid policy,
    /// whether it matches at all (None inside: no rule to name).
    fn first_match(&self, attrs: &impl Attributes) -> Option<Option<usize>> {
        if self.invalid.is_some() {
            return (self.action == Action::Deny).then_some(None);
        }
        let unknown = self.action == Action::Deny;
        self.rules
            .iter()
            .position(|rule| rule.matches(attrs, unknown))
            .map(Some)
    }

    fn selects(
        &self,
        root_namespace: &str,
        namespace: &str,
        labels: &BTreeMap<String, String>,
    ) -> bool {
        (self.name.namespace == namespace || self.name.namespace == root_namespace)
            && self
                .match_labels
                .as_ref()
                .is_none_or(|wanted| wanted.iter().all(|(k, v)| labels.get(k) == Some(v)))
    }
}

/// All the cluster's policies, compiled; [`PolicySet::for_pod`] picks
/// those selecting one pod.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PolicySet {
    root_namespace: String,
    /// Sorted by name, so reports and "first match" are stable.
    policies: Vec<Arc<CompiledPolicy>>,
}

impl PolicySet {
    /// `root_namespace`: the control namespace, whose policies apply to
    /// every namespace.
    pub fn new(root_namespace: &str, policies: impl IntoIterator<Item = CompiledPolicy>) -> Self {
        let mut policies: Vec<_> = policies.into_iter().map(Arc::new).collect();
        policies.sort_by(|a, b| a.name.cmp(&b.name));
        Self {
            root_namespace: root_namespace.to_owned(),
            policies,
        }
    }

    pub fn policies(&self) -> &[Arc<CompiledPolicy>] {
        &self.policies
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// The policies that select a pod of `namespace` with `labels`.
    pub fn for_pod(&self, namespace: &str, labels: &BTreeMap<String, String>) -> PodPolicies {
        PodPolicies {
            policies: self
                .policies
                .iter()
                .filter(|p| p.selects(&self.root_namespace, namespace, labels))
                .cloned()
                .collect(),
        }
    }
}

/// A policy and the rule of it that decided (None: no rule, e.g. no ALLOW
/// rule matched, or the policy is invalid).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decider {
    pub policy: Arc<CompiledPolicy>,
    pub rule: Option<usize>,
}

impl fmt::Display for Decider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.policy.name)?;
        match self.rule {
            Some(rule) => write!(f, " rule {rule}"),
            None => Ok(()),
        }
    }
}

/// How a connection was judged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// No enforced policy selects the pod.
    NoPolicy,
    /// An ALLOW rule matched and no DENY rule did.
    Allowed(Decider),
    /// A DENY rule matched (`rule`), or ALLOW policies select the pod and
    /// none matched (the first such policy, `rule` None).
    Denied(Decider),
}

/// The judgement of one connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub decision: Decision,
    /// Set when the connection is allowed but would be denied with the
    /// dry-run policies enforced: the dry-run policy that would deny it.
    pub dry_run_denial: Option<Decider>,
}

impl Verdict {
    pub fn allowed(&self) -> bool {
        !matches!(self.decision, Decision::Denied(_))
    }

    pub fn denied_by(&self) -> Option<&Decider> {
        match &self.decision {
            Decision::Denied(decider) => Some(decider),
            _ => None,
        }
    }
}

/// The policies selecting one pod, compiled when pods or policies change;
/// judging a connection allocates nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodPolicies {
    policies: Vec<Arc<CompiledPolicy>>,
}

impl PodPolicies {
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    pub fn policies(&self) -> &[Arc<CompiledPolicy>] {
        &self.policies
    }

    pub fn judge(&self, connection: &Connection<'_>) -> Verdict {
        let decision = self.decide(connection, false);
        let dry_run_denial = match &decision {
            Decision::Denied(_) => None,
            _ if !self.policies.iter().any(|p| p.dry_run) => None,
            _ => match self.decide(connection, true) {
                Decision::Denied(decider) => Some(decider),
                _ => None,
            },
        };
        Verdict {
            decision,
            dry_run_denial,
        }
    }

    /// Istio's order: DENY first, then ALLOW. `with_dry_run`: judge as if
    /// the dry-run policies were enforced.
    fn decide(&self, attrs: &impl Attributes, with_dry_run: bool) -> Decision {
        let active = || self.policies.iter().filter(|p| with_dry_run || !p.dry_run);
        for policy in active().filter(|p| p.action == Action::Deny) {
            if let Some(rule) = policy.first_match(attrs) {
                return Decision::Denied(Decider {
                    policy: policy.clone(),
                    rule,
                });
            }
        }
        let mut first_allow = None;
        for policy in active().filter(|p| p.action == Action::Allow) {
            if let Some(rule) = policy.first_match(attrs) {
                return Decision::Allowed(Decider {
                    policy: policy.clone(),
                    rule,
                });
            }
            first_allow.get_or_insert(policy);
        }
        match first_allow {
            Some(policy) => Decision::Denied(Decider {
                policy: policy.clone(),
                rule: None,
            }),
            None => Decision::NoPolicy,
        }
    }

    /// Whether an enforced ALLOW policy selecting the pod names principals
    /// or namespaces: plaintext is then refused unless another rule admits
    /// it by address or port (strict by implication).
    pub fn requires_identity(&self) -> bool {
        self.policies.iter().any(|p| {
            !p.dry_run
                && p.action == Action::Allow
                && p.rules
                    .iter()
                    .any(|r| r.from.iter().any(CompiledSource::requires_identity))
        })
    }

    /// What the enforced policies let in from sources without an identity,
    /// as the kernel must apply it to plaintext: [`PlaintextAccess::All`]
    /// when they deny no plaintext source, else the allowed regions.
    pub fn plaintext_access(&self) -> PlaintextAccess {
        let enforced: Vec<_> = self.policies.iter().filter(|p| !p.dry_run).collect();
        let mut nets = BTreeSet::from([Ipv4Net::default()]);
        let mut ports = BTreeSet::new();
        for policy in &enforced {
            for rule in &policy.rules {
                for source in &rule.from {
                    nets.extend(source.ip_blocks.iter().chain(&source.not_ip_blocks));
                }
                for op in &rule.to {
                    ports.extend(op.ports.iter().chain(&op.not_ports));
                }
            }
        }
        let mut regions = Vec::new();
        for port in ports.iter().copied().map(Some).chain([None]) {
            for net in &nets {
                let allow = matches!(
                    self.decide(&Region { net: *net, port }, false),
                    Decision::NoPolicy | Decision::Allowed(_)
                );
                regions.push(PlaintextRegion {
                    port,
                    net: *net,
                    allow,
                });
            }
        }
        if regions.iter().all(|r| r.allow) {
            PlaintextAccess::All
        } else {
            PlaintextAccess::Regions(regions)
        }
    }
}

/// The plaintext sources of one region: the addresses whose longest match
/// among the listed networks is `net`, to `port` (None: any port not
/// listed by the policies).
struct Region {
    net: Ipv4Net,
    port: Option<u16>,
}

impl Attributes for Region {
    fn identity(&self) -> Option<&Identity> {
        None
    }

    fn ip_in(&self, nets: &[Ipv4Net]) -> Option<bool> {
        // Listed networks nest or are disjoint; a more specific one has
        // its own region, so the region is inside exactly the listed
        // networks that contain all of `net`.
        Some(nets.iter().any(|n| n.contains(&self.net)))
    }

    fn port_in(&self, ports: &[u16]) -> bool {
        self.port.is_some_and(|port| ports.contains(&port))
    }
}

/// What plaintext may reach a pod, by longest-prefix match of the source
/// address under the destination port (an unlisted port: the `None` port).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlaintextAccess {
    /// No enforced policy refuses any plaintext source.
    All,
    /// Every (port, network) region and its decision; a lookup finds the
    /// destination port's regions (else the `None` port's), then the
    /// longest network containing the source. Each port's list includes
    /// 0.0.0.0/0.
    Regions(Vec<PlaintextRegion>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PlaintextRegion {
    pub port: Option<u16>,
    pub net: Ipv4Net,
    pub allow: bool,
}

impl PlaintextAccess {
    /// The decision for one source and port, as the kernel looks it up.
    pub fn allows(&self, source: Ipv4Addr, port: u16) -> bool {
        let PlaintextAccess::Regions(regions) = self else {
            return true;
        };
        let lookup = |port: Option<u16>| {
            regions
                .iter()
                .filter(|r| r.port == port && r.net.contains(&source))
                .max_by_key(|r| r.net.prefix_len())
                .map(|r| r.allow)
        };
        lookup(Some(port)).or_else(|| lookup(None)).unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::TrustDomain;

    fn policy(namespace: &str, name: &str, yaml: &str) -> CompiledPolicy {
        let spec: AuthorizationPolicySpec = serde_yaml_ng::from_str(yaml).unwrap();
        validate(&spec).unwrap();
        CompiledPolicy::compile(&AuthorizationPolicy {
            name: name.into(),
            namespace: namespace.into(),
            annotations: BTreeMap::new(),
            spec,
        })
    }

    fn dry(mut policy: CompiledPolicy) -> CompiledPolicy {
        policy.dry_run = true;
        policy
    }

    fn id(ns: &str, sa: &str) -> Identity {
        TrustDomain::default().identity(ns, sa).unwrap()
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn judge(pod: &PodPolicies, identity: Option<&Identity>, ip: &str, port: u16) -> Verdict {
        pod.judge(&Connection {
            identity,
            source_ip: Some(ip.parse().unwrap()),
            port,
        })
    }

    fn denier(verdict: &Verdict) -> Option<String> {
        verdict.denied_by().map(|d| d.to_string())
    }

    #[test]
    fn principals_name_identities_and_exact_ones_parse() {
        assert_eq!(
            principal(&id("shop", "web")),
            "cluster.local/ns/shop/sa/web"
        );
        let set = PolicySet::new(
            "sealmesh",
            [policy(
                "shop",
                "p",
                &format!(
                    "{{ rules: [{{ from: [{{ source: {{ principals: [\"{}\"] }} }}] }}] }}",
                    principal(&id("a", "b"))
                ),
            )],
        );
        let pod = set.for_pod("shop", &BTreeMap::new());
        assert!(judge(&pod, Some(&id("a", "b")), "10.0.0.1", 80).allowed());
        assert_eq!(
            exact_principal("cluster.local/ns/shop/sa/web"),
            Some(("cluster.local", "shop", "web"))
        );
        assert_eq!(
            exact_principal("spiffe://example.org/ns/a/sa/b.c"),
            Some(("example.org", "a", "b.c"))
        );
        for pattern in [
            "*/ns/shop/sa/web",
            "cluster.local/ns/shop/*",
            "shop/web",
            "a/ns//sa/b",
            "a/ns/b/sa/c/d",
        ] {
            assert_eq!(exact_principal(pattern), None, "{pattern}");
        }
    }

    #[test]
    fn allow_by_principal_namespace_and_port() {
        let set = PolicySet::new(
            "sealmesh",
            [policy(
                "shop",
                "web-allow",
                r#"
selector: { matchLabels: { app: web } }
action: ALLOW
rules:
  - from: [{ source: { principals: ["cluster.local/ns/shop/sa/frontend"] } }]
  - from: [{ source: { namespaces: ["ops-*"] } }]
    to: [{ operation: { ports: ["9090"] } }]
"#,
            )],
        );
        let web = set.for_pod("shop", &labels(&[("app", "web")]));
        let ip = "10.244.0.9";
        assert!(judge(&web, Some(&id("shop", "frontend")), ip, 80).allowed());
        assert_eq!(
            denier(&judge(&web, Some(&id("shop", "other")), ip, 80)).as_deref(),
            Some("shop/web-allow")
        );
        assert!(judge(&web, Some(&id("ops-1", "prom")), ip, 9090).allowed());
        assert!(!judge(&web, Some(&id("ops-1", "prom")), ip, 80).allowed());
        assert!(
            !judge(&web, None, ip, 9090).allowed(),
            "namespaces never match plaintext"
        );
        assert!(web.requires_identity());
        // A pod the selector misses, and a pod of another namespace: no policy.
        let db = set.for_pod("shop", &labels(&[("app", "db")]));
        assert_eq!(judge(&db, None, ip, 80).decision, Decision::NoPolicy);
        assert_eq!(
            judge(
                &set.for_pod("other", &labels(&[("app", "web")])),
                None,
                ip,
                80
            )
            .decision,
            Decision::NoPolicy
        );
    }

    #[test]
    fn deny_wins_over_allow_and_names_its_rule() {
        let set = PolicySet::new(
            "sealmesh",
            [
                policy("shop", "allow-all", "rules: [{}]"),
                policy(
                    "shop",
                    "deny-legacy",
                    r#"
action: DENY
rules:
  - to: [{ operation: { ports: [22] } }]
  - from: [{ source: { principals: ["spiffe://cluster.local/ns/legacy/*"] } }]
"#,
                ),
            ],
        );
        let pod = set.for_pod("shop", &BTreeMap::new());
        let verdict = judge(&pod, Some(&id("legacy", "app")), "10.0.0.1", 80);
        assert_eq!(denier(&verdict).as_deref(), Some("shop/deny-legacy rule 1"));
        assert_eq!(
            denier(&judge(&pod, Some(&id("shop", "a")), "10.0.0.1", 22)).as_deref(),
            Some("shop/deny-legacy rule 0")
        );
        match judge(&pod, Some(&id("shop", "a")), "10.0.0.1", 80).decision {
            Decision::Allowed(d) => assert_eq!(d.to_string(), "shop/allow-all rule 0"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn root_namespace_policies_apply_everywhere_and_not_principals_catches_plaintext() {
        let set = PolicySet::new(
            "sealmesh",
            [policy(
                "sealmesh",
                "require-mtls",
                r#"{ action: DENY, rules: [{ from: [{ source: { notPrincipals: ["*"] } }] }] }"#,
            )],
        );
        let pod = set.for_pod("anything", &labels(&[("x", "y")]));
        assert!(!judge(&pod, None, "10.0.0.1", 80).allowed());
        assert!(judge(&pod, Some(&id("a", "b")), "10.0.0.1", 80).allowed());
        assert_eq!(
            pod.plaintext_access(),
            PlaintextAccess::Regions(vec![PlaintextRegion {
                port: None,
                net: Ipv4Net::default(),
                allow: false
            }])
        );
    }

    #[test]
    fn another_trust_domain_never_matches_a_principal() {
        let set = PolicySet::new(
            "sealmesh",
            [policy(
                "shop",
                "p",
                r#"{ rules: [{ from: [{ source: { principals: ["*/ns/shop/sa/frontend"] } }] }] }"#,
            )],
        );
        let pod = set.for_pod("shop", &BTreeMap::new());
        let foreign = TrustDomain::new("evil.example", "sealmesh")
            .unwrap()
            .identity("shop", "frontend")
            .unwrap();
        // Suffix patterns are Istio's: they match any trust domain. The
        // exact form below does not.
        assert!(judge(&pod, Some(&foreign), "10.0.0.1", 80).allowed());
        let exact = PolicySet::new(
            "sealmesh",
            [policy(
                "shop",
                "p",
                r#"{ rules: [{ from: [{ source: { principals: ["cluster.local/ns/shop/sa/frontend"] } }] }] }"#,
            )],
        );
        let pod = exact.for_pod("shop", &BTreeMap::new());
        assert!(!judge(&pod, Some(&foreign), "10.0.0.1", 80).allowed());
        assert!(judge(&pod, Some(&id("shop", "frontend")), "10.0.0.1", 80).allowed());
    }

    #[test]
    fn dry_run_reports_without_enforcing() {
        let set = PolicySet::new(
            "sealmesh",
            [dry(policy(
                "shop",
                "only-frontend",
                r#"{ rules: [{ from: [{ source: { namespaces: [shop] } }] }] }"#,
            ))],
        );
        let pod = set.for_pod("shop", &BTreeMap::new());
        let verdict = judge(&pod, Some(&id("other", "x")), "10.0.0.1", 80);
        assert_eq!(verdict.decision, Decision::NoPolicy);
        assert_eq!(
            verdict.dry_run_denial.map(|d| d.to_string()).as_deref(),
            Some("shop/only-frontend")
        );
        assert_eq!(
            judge(&pod, Some(&id("shop", "x")), "10.0.0.1", 80).dry_run_denial,
            None
        );
        assert!(
            !pod.requires_identity(),
            "dry-run policies do not make a pod strict"
        );
        assert_eq!(pod.plaintext_access(), PlaintextAccess::All);
    }

    #[test]
    fn unknown_source_address_fails_closed() {
        let set = PolicySet::new(
            "sealmesh",
            [policy(
                "a",
                "allow-net",
                r#"{ rules: [{ from: [{ source: { ipBlocks: [10.244.0.0/16] } }] }] }"#,
            )],
        );
        let pod = set.for_pod("a", &BTreeMap::new());
        let conn = |ip| Connection {
            identity: None,
            source_ip: ip,
            port: 80,
        };
        assert!(
            pod.judge(&conn(Some("10.244.3.3".parse().unwrap())))
                .allowed()
        );
        assert!(
            !pod.judge(&conn(None)).allowed(),
            "ALLOW on an unknown address does not match"
        );
        let deny = PolicySet::new(
            "sealmesh",
            [policy(
                "a",
                "deny-net",
                r#"{ action: DENY, rules: [{ from: [{ source: { notIpBlocks: [10.244.0.0/16] } }] }] }"#,
            )],
        );
        let pod = deny.for_pod("a", &BTreeMap::new());
        assert!(
            !pod.judge(&conn(None)).allowed(),
            "DENY on an unknown address matches"
        );
        assert!(
            pod.judge(&conn(Some("10.244.3.3".parse().unwrap())))
                .allowed()
        );
    }

    #[test]
    fn plaintext_regions_follow_blocks_and_ports() {
        let set = PolicySet::new(
            "sealmesh",
            [
                policy(
                    "a",
                    "allow",
                    r#"
rules:
  - from: [{ source: { principals: ["*"] } }]
  - from: [{ source: { ipBlocks: [10.0.0.0/8] } }]
    to: [{ operation: { ports: ["8080"] } }]
  - to: [{ operation: { ports: ["9100"] } }]
"#,
                ),
                policy(
                    "a",
                    "deny",
                    r#"{ action: DENY, rules: [{ from: [{ source: { ipBlocks: [10.1.0.0/16] } }] }] }"#,
                ),
            ],
        );
        let access = set.for_pod("a", &BTreeMap::new()).plaintext_access();
        let allows = |ip: &str, port| access.allows(ip.parse().unwrap(), port);
        assert!(allows("10.2.3.4", 8080));
        assert!(
            !allows("10.1.3.4", 8080),
            "the DENY block inside the ALLOW block"
        );
        assert!(!allows("192.168.0.1", 8080));
        assert!(!allows("10.2.3.4", 80));
        assert!(allows("192.168.0.1", 9100));
        assert!(!allows("10.1.0.1", 9100));
        // Every region agrees with judging a plaintext connection directly.
        let pod = set.for_pod("a", &BTreeMap::new());
        for ip in [
            "10.2.3.4",
            "10.1.3.4",
            "192.168.0.1",
            "10.0.0.0",
            "10.1.0.0",
        ] {
            for port in [80, 8080, 9100] {
                assert_eq!(
                    allows(ip, port),
                    judge(&pod, None, ip, port).allowed(),
                    "{ip}:{port}"
                );
            }
        }
    }

    #[test]
    fn invalid_policies_fail_closed_and_name_the_field() {
        let cases = [
            (
                r#"{ rules: [{ from: [{ source: { principals: ["a*b"] } }] }] }"#,
                "rules[0].from[0].source.principals[0]: \"a*b\": `*` may only be",
            ),
            (
                r#"{ rules: [{ to: [{ operation: { ports: ["http"] } }] }] }"#,
                "rules[0].to[0].operation.ports[0]: \"http\" is not a port",
            ),
            (
                r#"{ rules: [{ from: [{ source: { ipBlocks: ["fd00::/8"] } }] }] }"#,
                "ipBlocks[0]: \"fd00::/8\" is not an IPv4 address or CIDR",
            ),
            (
                r#"{ rules: [{ from: [{ source: {} }] }] }"#,
                "rules[0].from[0].source: sets no field",
            ),
        ];
        for (yaml, expected) in cases {
            let spec: AuthorizationPolicySpec = serde_yaml_ng::from_str(yaml).unwrap();
            let error = validate(&spec).unwrap_err().to_string();
            assert!(
                error.starts_with(expected) || error.contains(expected),
                "{yaml}: {error}"
            );
        }
        let l7: Result<AuthorizationPolicySpec, _> =
            serde_yaml_ng::from_str(r#"{ rules: [{ to: [{ operation: { methods: [GET] } }] }] }"#);
        assert!(
            l7.unwrap_err()
                .to_string()
                .contains("unknown field `methods`")
        );

        let spec: AuthorizationPolicySpec = serde_yaml_ng::from_str(
            r#"{ rules: [{ from: [{ source: { principals: ["a*b"] } }] }] }"#,
        )
        .unwrap();
        let name = |n: &str| PolicyName {
            namespace: "a".into(),
            name: n.into(),
        };
        let allow = CompiledPolicy::from_spec(name("bad-allow"), false, Ok(&spec));
        let unreadable = CompiledPolicy::from_spec(
            name("unreadable"),
            false,
            Err(invalid("spec", "not an object")),
        );
        let set = PolicySet::new("sealmesh", [allow]);
        assert!(
            !judge(
                &set.for_pod("a", &BTreeMap::new()),
                Some(&id("a", "b")),
                "10.0.0.1",
                80
            )
            .allowed()
        );
        let set = PolicySet::new("sealmesh", [unreadable]);
        let pod = set.for_pod("a", &labels(&[("any", "pod")]));
        assert_eq!(
            denier(&judge(&pod, Some(&id("a", "b")), "10.0.0.1", 80)).as_deref(),
            Some("a/unreadable")
        );
    }
}
