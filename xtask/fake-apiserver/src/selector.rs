//! Label and field selectors, parsed as the real server parses them.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::resources::ResourceType;

#[derive(Debug, thiserror::Error, PartialEq)]
pub(crate) enum SelectorError {
    #[error("unable to parse requirement: {requirement:?}: {problem}")]
    Label {
        requirement: String,
        problem: &'static str,
    },
    #[error(
        "invalid field selector {selector:?}: expected field=value, field==value or field!=value"
    )]
    FieldSyntax { selector: String },
    #[error("field label not supported: {field}")]
    FieldNotSupported { field: String },
}

#[derive(Debug, Clone, PartialEq)]
enum LabelRequirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

impl LabelRequirement {
    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            LabelRequirement::Equals(key, value) => labels.get(key) == Some(value),
            LabelRequirement::NotEquals(key, value) => labels.get(key) != Some(value),
            LabelRequirement::In(key, values) => {
                labels.get(key).is_some_and(|v| values.contains(v))
            }
            LabelRequirement::NotIn(key, values) => {
                labels.get(key).is_none_or(|v| !values.contains(v))
            }
            LabelRequirement::Exists(key) => labels.contains_key(key),
            LabelRequirement::DoesNotExist(key) => !labels.contains_key(key),
        }
    }
}

/// A parsed `labelSelector`; empty matches everything.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct LabelSelector(Vec<LabelRequirement>);

/// Splits on commas outside parentheses (`a in (x,y),b` has two parts).
fn split_requirements(selector: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (index, c) in selector.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&selector[start..index]);
                start = index + 1;
            }
            _ => {}
        }
    }
    parts.push(&selector[start..]);
    parts
}

fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

fn valid_value(value: &str) -> bool {
    value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl LabelSelector {
    pub fn parse(selector: &str) -> Result<LabelSelector, SelectorError> {
        let selector = selector.trim();
        if selector.is_empty() {
            return Ok(LabelSelector::default());
        }
        split_requirements(selector)
            .into_iter()
            .map(parse_label_requirement)
            .collect::<Result<_, _>>()
            .map(LabelSelector)
    }

    pub fn matches(&self, object: &Value) -> bool {
        if self.0.is_empty() {
            return true;
        }
        let labels: BTreeMap<String, String> = object
            .pointer("/metadata/labels")
            .and_then(Value::as_object)
            .map(|labels| {
                labels
                    .iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                    .collect()
            })
            .unwrap_or_default();
        self.0
            .iter()
            .all(|requirement| requirement.matches(&labels))
    }
}

fn parse_label_requirement(raw: &str) -> Result<LabelRequirement, SelectorError> {
    let requirement = raw.trim();
    let error = |problem| SelectorError::Label {
        requirement: requirement.to_string(),
        problem,
    };
    let checked_key = |key: &str| {
        let key = key.trim();
        if valid_key(key) {
            Ok(key.to_string())
        } else {
            Err(error("invalid label key"))
        }
    };
    let checked_value = |value: &str| {
        let value = value.trim();
        if valid_value(value) {
            Ok(value.to_string())
        } else {
            Err(error("invalid label value"))
        }
    };
    if let Some(key) = requirement.strip_prefix('!') {
        return Ok(LabelRequirement::DoesNotExist(checked_key(key)?));
    }
    if let Some((key, value)) = requirement.split_once("!=") {
        return Ok(LabelRequirement::NotEquals(
            checked_key(key)?,
            checked_value(value)?,
        ));
    }
    if let Some((key, value)) = requirement.split_once("==") {
        return Ok(LabelRequirement::Equals(
            checked_key(key)?,
            checked_value(value)?,
        ));
    }
    if let Some((key, value)) = requirement.split_once('=') {
        return Ok(LabelRequirement::Equals(
            checked_key(key)?,
            checked_value(value)?,
        ));
    }
    let mut words = requirement.splitn(2, char::is_whitespace);
    let key = words.next().unwrap_or_default();
    let Some(rest) = words.next().map(str::trim) else {
        return Ok(LabelRequirement::Exists(checked_key(key)?));
    };
    let (negated, set) = if let Some(set) = rest.strip_prefix("notin") {
        (true, set)
    } else if let Some(set) = rest.strip_prefix("in") {
        (false, set)
    } else {
        return Err(error("expected one of =, ==, !=, in, notin"));
    };
    let set = set.trim();
    let inner = set
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .ok_or_else(|| error("a set must be written as (value1,value2)"))?;
    let values = inner
        .split(',')
        .map(checked_value)
        .collect::<Result<Vec<_>, _>>()?;
    if values.iter().any(String::is_empty) && !(values.len() == 1 && inner.trim().is_empty()) {
        return Err(error("empty value in set"));
    }
    let key = checked_key(key)?;
    Ok(if negated {
        LabelRequirement::NotIn(key, values)
    } else {
        LabelRequirement::In(key, values)
    })
}

#[derive(Debug, Clone, PartialEq)]
struct FieldRequirement {
    path: String,
    value: String,
    negated: bool,
}

/// A parsed `fieldSelector`; empty matches everything.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct FieldSelector(Vec<FieldRequirement>);

impl FieldSelector {
    pub fn parse(selector: &str, resource: &ResourceType) -> Result<FieldSelector, SelectorError> {
        let selector = selector.trim();
        if selector.is_empty() {
            return Ok(FieldSelector::default());
        }
        let mut requirements = Vec::new();
        for part in selector.split(',') {
            let (path, value, negated) = if let Some((path, value)) = part.split_once("!=") {
                (path, value, true)
            } else if let Some((path, value)) = part.split_once("==") {
                (path, value, false)
            } else if let Some((path, value)) = part.split_once('=') {
                (path, value, false)
            } else {
                return Err(SelectorError::FieldSyntax {
                    selector: selector.to_string(),
                });
            };
            let path = path.trim();
            if !resource.field_selectable(path) {
                return Err(SelectorError::FieldNotSupported {
                    field: path.to_string(),
                });
            }
            requirements.push(FieldRequirement {
                path: path.to_string(),
                value: value.trim().to_string(),
                negated,
            });
        }
        Ok(FieldSelector(requirements))
    }

    pub fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|requirement| {
            let actual = field_value(object, &requirement.path);
            (actual == requirement.value) != requirement.negated
        })
    }
}

/// A field's value as the real server's field sets render it: strings as is,
/// booleans as `true`/`false`, absent fields as "" (`spec.hostNetwork` and
/// `spec.unschedulable` as `false`).
fn field_value(object: &Value, path: &str) -> String {
    let pointer = format!("/{}", path.replace('.', "/"));
    match object.pointer(&pointer) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::Null) | None if matches!(path, "spec.hostNetwork" | "spec.unschedulable") => {
            "false".to_string()
        }
        Some(Value::Object(source)) if path == "source" => source
            .get("component")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::resources::{by_id, id_of};

    fn labelled(labels: Value) -> Value {
        json!({"metadata": {"labels": labels}})
    }

    #[test]
    fn label_selector_operators() {
        let object = labelled(json!({"app": "web", "tier": "front"}));
        let cases = [
            ("app=web", true),
            ("app==web", true),
            ("app!=web", false),
            ("app!=db", true),
            ("app", true),
            ("!app", false),
            ("!missing", true),
            ("app in (db,web)", true),
            ("app in (db)", false),
            ("app notin (db)", true),
            ("app notin (db, web)", false),
            ("missing notin (x)", true),
            ("app=web,tier in (front,back)", true),
            ("app=web,tier=back", false),
            ("", true),
        ];
        for (selector, expected) in cases {
            let parsed = LabelSelector::parse(selector).unwrap();
            assert_eq!(parsed.matches(&object), expected, "selector {selector:?}");
        }
    }

    #[test]
    fn label_selector_rejects_garbage() {
        for selector in ["app in db", "app ~ web", "a b=c", "app=we b"] {
            assert!(
                LabelSelector::parse(selector).is_err(),
                "selector {selector:?}"
            );
        }
    }

    #[test]
    fn field_selector_paths_and_allowlist() {
        let pods = by_id(id_of("", "pods"));
        let pod =
            json!({"metadata": {"name": "a", "namespace": "ns"}, "spec": {"nodeName": "node-1"}});
        assert!(
            FieldSelector::parse("spec.nodeName=node-1", pods)
                .unwrap()
                .matches(&pod)
        );
        assert!(
            FieldSelector::parse("spec.nodeName==node-1,metadata.namespace=ns", pods)
                .unwrap()
                .matches(&pod)
        );
        assert!(
            !FieldSelector::parse("spec.nodeName!=node-1", pods)
                .unwrap()
                .matches(&pod)
        );
        assert!(
            FieldSelector::parse("spec.hostNetwork=false", pods)
                .unwrap()
                .matches(&pod)
        );
        assert!(
            FieldSelector::parse("status.podIP=", pods)
                .unwrap()
                .matches(&pod)
        );
        assert_eq!(
            FieldSelector::parse("spec.containers=x", pods),
            Err(SelectorError::FieldNotSupported {
                field: "spec.containers".to_string()
            })
        );
        let events = by_id(id_of("", "events"));
        let event = json!({"involvedObject": {"name": "d"}, "reason": "IssuerUpdated"});
        assert!(
            FieldSelector::parse("reason=IssuerUpdated,involvedObject.name=d", events)
                .unwrap()
                .matches(&event)
        );
    }
}
