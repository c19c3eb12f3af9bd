//! Kubernetes label selectors (`matchLabels` and `matchExpressions`), as the
//! API server evaluates them, to find a workload's pods.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SelectorError {
    #[error(
        "selector requirement on {key:?} has unknown operator {operator:?} (In, NotIn, Exists, DoesNotExist)"
    )]
    UnknownOperator { key: String, operator: String },
    #[error("selector requirement {key:?} {operator} needs at least one value")]
    NoValues { key: String, operator: String },
    #[error("selector requirement {key:?} {operator} takes no values")]
    UnexpectedValues { key: String, operator: String },
}

/// A validated label selector. Empty selects everything, as in the API; a
/// workload's selector is never empty (the API server refuses one).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Requirement {
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

impl Requirement {
    fn parse(r: &LabelSelectorRequirement) -> Result<Self, SelectorError> {
        let key = r.key.clone();
        let values = r.values.clone().unwrap_or_default();
        let needs_values = |make: fn(String, Vec<String>) -> Self| {
            if values.is_empty() {
                Err(SelectorError::NoValues {
                    key: key.clone(),
                    operator: r.operator.clone(),
                })
            } else {
                Ok(make(key.clone(), values.clone()))
            }
        };
        let takes_none = |make: fn(String) -> Self| {
            if values.is_empty() {
                Ok(make(key.clone()))
            } else {
                Err(SelectorError::UnexpectedValues {
                    key: key.clone(),
                    operator: r.operator.clone(),
                })
            }
        };
        match r.operator.as_str() {
            "In" => needs_values(Self::In),
            "NotIn" => needs_values(Self::NotIn),
            "Exists" => takes_none(Self::Exists),
            "DoesNotExist" => takes_none(Self::DoesNotExist),
            other => Err(SelectorError::UnknownOperator {
                key,
                operator: other.to_owned(),
            }),
        }
    }

    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Self::In(key, values) => labels.get(key).is_some_and(|v| values.contains(v)),
            // As in the API: a pod without the label is not in the set.
            Self::NotIn(key, values) => labels.get(key).is_none_or(|v| !values.contains(v)),
            Self::Exists(key) => labels.contains_key(key),
            Self::DoesNotExist(key) => !labels.contains_key(key),
        }
    }
}

impl Selector {
    pub fn parse(selector: &LabelSelector) -> Result<Self, SelectorError> {
        let labels = selector.match_labels.iter().flatten();
        let mut requirements: Vec<Requirement> = labels
            .map(|(k, v)| Requirement::In(k.clone(), vec![v.clone()]))
            .collect();
        for expression in selector.match_expressions.iter().flatten() {
            requirements.push(Requirement::parse(expression)?);
        }
        Ok(Self { requirements })
    }

    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// Whether a pod with `labels` is selected: every requirement holds.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn requirement(key: &str, operator: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.to_owned(),
            operator: operator.to_owned(),
            values: (!values.is_empty()).then(|| values.iter().map(|v| (*v).to_owned()).collect()),
        }
    }

    #[test]
    fn match_labels_and_every_expression_must_hold() {
        let selector = Selector::parse(&LabelSelector {
            match_labels: Some(labels(&[("app", "web")])),
            match_expressions: Some(vec![
                requirement("tier", "In", &["front", "edge"]),
                requirement("canary", "NotIn", &["true"]),
                requirement("team", "Exists", &[]),
                requirement("legacy", "DoesNotExist", &[]),
            ]),
        })
        .unwrap();
        let base = [("app", "web"), ("tier", "edge"), ("team", "a")];
        assert!(selector.matches(&labels(&base)));
        let with = |extra: (&'static str, &'static str)| {
            let mut l = labels(&base);
            l.insert(extra.0.to_owned(), extra.1.to_owned());
            selector.matches(&l)
        };
        assert!(with(("canary", "false")));
        assert!(!with(("canary", "true")));
        assert!(!with(("legacy", "")));
        assert!(!with(("tier", "back")));
        assert!(!with(("app", "api")));
        assert!(!selector.matches(&labels(&[("app", "web"), ("tier", "edge")])));
    }

    #[test]
    fn malformed_requirements_are_refused_by_name() {
        let parse = |r| {
            Selector::parse(&LabelSelector {
                match_labels: None,
                match_expressions: Some(vec![r]),
            })
        };
        assert_eq!(
            parse(requirement("tier", "Gt", &["1"]))
                .unwrap_err()
                .to_string(),
            "selector requirement on \"tier\" has unknown operator \"Gt\" (In, NotIn, Exists, DoesNotExist)"
        );
        assert_eq!(
            parse(requirement("tier", "In", &[])).unwrap_err(),
            SelectorError::NoValues {
                key: "tier".into(),
                operator: "In".into()
            }
        );
        assert_eq!(
            parse(requirement("tier", "Exists", &["x"])).unwrap_err(),
            SelectorError::UnexpectedValues {
                key: "tier".into(),
                operator: "Exists".into()
            }
        );
        assert!(
            Selector::parse(&LabelSelector::default())
                .unwrap()
                .is_empty()
        );
    }
}
