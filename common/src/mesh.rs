//! Which pods are meshed. One rule, read by the agent (what it redirects and
//! requests certificates for), the identity service (what an agent's token
//! may obtain) and the cluster file's readers alike. Its two halves are
//! public for readers that index namespaces and pods separately.

use crate::consts::{MESH_LABEL_ENABLED, MESH_OPT_OUT_VALUE};

/// A pod is meshed when its namespace's `sealmesh.io/mesh` label
/// (`namespace_label`) is `enabled` and the pod has not opted out with the
/// `sealmesh.io/mesh: disabled` annotation (`pod_annotation`).
pub fn is_meshed(namespace_label: Option<&str>, pod_annotation: Option<&str>) -> bool {
    namespace_is_meshed(namespace_label) && !pod_opted_out(pod_annotation)
}

/// Whether a namespace with this `sealmesh.io/mesh` label value meshes its pods.
pub fn namespace_is_meshed(namespace_label: Option<&str>) -> bool {
    namespace_label == Some(MESH_LABEL_ENABLED)
}

/// Whether a pod with this `sealmesh.io/mesh` annotation value opted out.
pub fn pod_opted_out(pod_annotation: Option<&str>) -> bool {
    pod_annotation == Some(MESH_OPT_OUT_VALUE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meshed_needs_the_namespace_label_and_no_opt_out() {
        assert!(is_meshed(Some("enabled"), None));
        assert!(is_meshed(Some("enabled"), Some("enabled")));
        assert!(!is_meshed(Some("enabled"), Some("disabled")));
        assert!(!is_meshed(None, None));
        assert!(!is_meshed(Some("disabled"), None));
        assert!(!is_meshed(Some("Enabled"), None));
    }
}
