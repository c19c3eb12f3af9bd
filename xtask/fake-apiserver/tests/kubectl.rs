//! `kubectl` against the fake server, when kubectl is installed.

use std::process::Command;

use fake_apiserver::FakeApiServer;
use k8s_openapi::api::core::v1::{Event, Pod};
use kube::Api;
use kube::api::PostParams;
use serde_json::{Value, json};

/// Runs kubectl with `args` against `kubeconfig` and returns its stdout, or
/// None when kubectl is not on PATH.
async fn kubectl_output(kubeconfig: &std::path::Path, args: &[&str]) -> Option<Vec<u8>> {
    let mut command = tokio::process::Command::new("kubectl");
    command.arg("--kubeconfig").arg(kubeconfig).args(args);
    let output = match command.output().await {
        Ok(output) => output,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return None,
        Err(error) => panic!("running kubectl: {error}"),
    };
    assert!(
        output.status.success(),
        "kubectl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Some(output.stdout)
}

/// Runs kubectl with `args` (which ask for `-o json`) and parses its output.
async fn kubectl(kubeconfig: &std::path::Path, args: &[&str]) -> Option<Value> {
    let stdout = kubectl_output(kubeconfig, args).await?;
    Some(serde_json::from_slice(&stdout).expect("kubectl prints JSON"))
}

fn kubectl_installed() -> bool {
    let found = Command::new("kubectl")
        .arg("version")
        .arg("--client")
        .output()
        .is_ok();
    if !found {
        eprintln!("note: kubectl is not on PATH; skipping the kubectl test");
    }
    found
}

#[tokio::test]
async fn kubectl_get_pods_and_events() {
    if !kubectl_installed() {
        return;
    }
    let server = FakeApiServer::start().await.unwrap();
    let directory = tempfile::tempdir().unwrap();
    let kubeconfig = directory.path().join("kubeconfig");
    server
        .write_kubeconfig(&kubeconfig, &server.admin_token())
        .unwrap();

    let pods: Api<Pod> = Api::namespaced(server.client(), "kube-system");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"nodeName": "node-1", "containers": [{"name": "app", "image": "app:1"}]},
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let events: Api<Event> = Api::namespaced(server.client(), "default");
    for (name, reason) in [("e1", "IssuerUpdated"), ("e2", "Other")] {
        let event: Event = serde_json::from_value(json!({
            "metadata": {"name": name},
            "involvedObject": {"kind": "Deployment", "name": "sealmesh-identity", "namespace": "default"},
            "reason": reason,
            "type": "Normal",
        }))
        .unwrap();
        events.create(&PostParams::default(), &event).await.unwrap();
    }

    let listed = kubectl(&kubeconfig, &["get", "pods", "-A", "-o", "json"])
        .await
        .unwrap();
    assert_eq!(listed["kind"], "List");
    let items = listed["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["metadata"]["name"], "web");
    assert_eq!(items[0]["metadata"]["namespace"], "kube-system");

    let selected = kubectl(
        &kubeconfig,
        &[
            "get",
            "events",
            "--field-selector",
            "reason=IssuerUpdated",
            "-o",
            "json",
        ],
    )
    .await
    .unwrap();
    let names: Vec<&str> = selected["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["e1"]);

    // Client-side apply (kubectl validates against OpenAPI, which this server
    // does not serve), then a label and a merge patch.
    let manifest = directory.path().join("config.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\n  namespace: default\ndata:\n  mode: a\n",
    )
    .unwrap();
    let manifest = manifest.to_str().unwrap();
    kubectl_output(&kubeconfig, &["apply", "--validate=false", "-f", manifest])
        .await
        .unwrap();
    kubectl_output(
        &kubeconfig,
        &["label", "configmap", "settings", "tier=front"],
    )
    .await
    .unwrap();
    kubectl_output(
        &kubeconfig,
        &[
            "patch",
            "configmap",
            "settings",
            "-p",
            r#"{"data":{"extra":"b"}}"#,
        ],
    )
    .await
    .unwrap();
    let settings = kubectl(&kubeconfig, &["get", "configmap", "settings", "-o", "json"])
        .await
        .unwrap();
    assert_eq!(settings["data"], json!({"mode": "a", "extra": "b"}));
    assert_eq!(settings["metadata"]["labels"], json!({"tier": "front"}));
}
