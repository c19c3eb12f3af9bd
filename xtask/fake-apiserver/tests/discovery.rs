//! Kubeconfig, discovery, events and the streaming-list watch: what kube-rs
//! and other components use beyond plain CRUD.

mod support;

use fake_apiserver::FakeApiServer;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Event};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::events::v1::Event as EventV1;
use k8s_openapi::api::rbac::v1::ClusterRole;
use kube::api::{DynamicObject, ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::discovery::{Discovery, Scope};
use kube::runtime::watcher::{self, Event as WatcherEvent};
use kube::{Api, Client};
use sealmesh_common::consts::kube::{
    ENDPOINTSLICE_SERVICE_LABEL, EVENT_ISSUER_UPDATED, IDENTITY_NAME,
};
use serde_json::json;
use support::{next_item, object_names};

#[tokio::test]
async fn kubeconfig_file_gives_a_working_client() {
    let server = FakeApiServer::start().await.unwrap();
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("kubeconfig");
    server
        .write_kubeconfig(&path, &server.admin_token())
        .unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let kubeconfig = Kubeconfig::read_from(&path).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    assert_eq!(config.cluster_url.to_string(), format!("{}/", server.url()));
    assert_eq!(config.default_namespace, "default");
    let client = Client::try_from(config).unwrap();
    let version = client.apiserver_version().await.unwrap();
    assert_eq!(
        (version.major.as_str(), version.minor.as_str()),
        ("1", "33")
    );

    let wrong = Kubeconfig::from_yaml(&server.kubeconfig_yaml("wrong-token")).unwrap();
    let client = Client::try_from(
        kube::Config::from_custom_kubeconfig(wrong, &KubeConfigOptions::default())
            .await
            .unwrap(),
    )
    .unwrap();
    let kube::Error::Api(status) = client.apiserver_version().await.unwrap_err() else {
        panic!("expected a Status")
    };
    assert_eq!((status.code, status.reason.as_str()), (401, "Unauthorized"));
}

#[tokio::test]
async fn discovery_lists_every_served_group() {
    let server = FakeApiServer::start().await.unwrap();
    let discovery = Discovery::new(server.client()).run().await.unwrap();
    let mut groups: Vec<String> = discovery
        .groups()
        .map(|group| group.name().to_string())
        .collect();
    groups.sort();
    assert_eq!(
        groups,
        [
            "",
            "apiextensions.k8s.io",
            "apps",
            "authentication.k8s.io",
            "authorization.k8s.io",
            "cert-manager.io",
            "discovery.k8s.io",
            "events.k8s.io",
            "networking.k8s.io",
            "policy",
            "rbac.authorization.k8s.io"
        ]
    );
    let (resource, capabilities) = discovery
        .get("rbac.authorization.k8s.io")
        .unwrap()
        .recommended_kind("ClusterRole")
        .unwrap();
    assert_eq!(resource.plural, "clusterroles");
    assert_eq!(capabilities.scope, Scope::Cluster);
    let (pods, capabilities) = discovery.get("").unwrap().recommended_kind("Pod").unwrap();
    assert_eq!(pods.plural, "pods");
    assert_eq!(capabilities.scope, Scope::Namespaced);
    assert!(
        capabilities
            .subresources
            .iter()
            .any(|(sub, _)| sub.plural == "pods/status" || sub.plural == "status")
    );
    assert!(
        capabilities
            .subresources
            .iter()
            .any(|(sub, _)| sub.plural == "pods/portforward" || sub.plural == "portforward")
    );

    // A dynamic client built from discovery creates what typed clients read.
    let roles: Api<DynamicObject> = Api::all_with(server.client(), &resource);
    let role: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": "sealmesh-agent"},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}],
    }))
    .unwrap();
    roles.create(&PostParams::default(), &role).await.unwrap();
    let typed: Api<ClusterRole> = Api::all(server.client());
    let fetched = typed.get("sealmesh-agent").await.unwrap();
    assert_eq!(fetched.rules.unwrap()[0].verbs, ["get", "list", "watch"]);
}

#[tokio::test]
async fn events_by_reason_and_endpointslices_by_service() {
    let server = FakeApiServer::start().await.unwrap();
    let events: Api<Event> = Api::namespaced(server.client(), "default");
    for (name, reason) in [("a", EVENT_ISSUER_UPDATED), ("b", "Other")] {
        let event: Event = serde_json::from_value(json!({
            "metadata": {"name": name},
            "involvedObject": {"kind": "Deployment", "apiVersion": "apps/v1", "name": IDENTITY_NAME, "namespace": "default"},
            "reason": reason,
            "type": "Normal",
            "source": {"component": IDENTITY_NAME},
        }))
        .unwrap();
        events.create(&PostParams::default(), &event).await.unwrap();
    }
    let selected = events
        .list(&ListParams::default().fields(&format!(
            "reason={EVENT_ISSUER_UPDATED},involvedObject.name={IDENTITY_NAME}"
        )))
        .await
        .unwrap();
    let names = object_names(&selected.items);
    assert_eq!(names, ["a"]);
    let by_source = events
        .list(&ListParams::default().fields(&format!("source={IDENTITY_NAME}")))
        .await
        .unwrap();
    assert_eq!(by_source.items.len(), 2);

    let events_v1: Api<EventV1> = Api::namespaced(server.client(), "default");
    let event: EventV1 = serde_json::from_value(json!({
        "metadata": {"name": "c"},
        "eventTime": "2026-01-01T00:00:00.000000Z",
        "regarding": {"kind": "Pod", "name": "web"},
        "reason": "Started",
        "reportingController": "sealmesh.io/agent",
        "reportingInstance": "node-1",
        "action": "Start",
        "type": "Normal",
    }))
    .unwrap();
    events_v1
        .create(&PostParams::default(), &event)
        .await
        .unwrap();
    let selected = events_v1
        .list(&ListParams::default().fields("regarding.name=web"))
        .await
        .unwrap();
    assert_eq!(selected.items.len(), 1);
    // Both event APIs are separate resources here (the real server stores them together).
    assert_eq!(
        events
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        2
    );

    let slices: Api<EndpointSlice> = Api::namespaced(server.client(), "default");
    for (name, service) in [("web-abc", "web"), ("db-def", "db")] {
        let slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {ENDPOINTSLICE_SERVICE_LABEL: service}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"ready": true}}],
        }))
        .unwrap();
        slices.create(&PostParams::default(), &slice).await.unwrap();
    }
    let web = slices
        .list(&ListParams::default().labels(&format!("{ENDPOINTSLICE_SERVICE_LABEL}=web")))
        .await
        .unwrap();
    let names = object_names(&web.items);
    assert_eq!(names, ["web-abc"]);
}

#[tokio::test]
async fn streaming_list_watcher() {
    let server = FakeApiServer::start().await.unwrap();
    let config_maps: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    let config_map: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "one"}})).unwrap();
    config_maps
        .create(&PostParams::default(), &config_map)
        .await
        .unwrap();

    let config = watcher::Config::default().streaming_lists();
    let mut stream = watcher::watcher(config_maps.clone(), config).boxed();
    let mut seen = Vec::new();
    loop {
        let event = next_item(&mut stream).await;
        let done = matches!(event, WatcherEvent::InitDone);
        seen.push(match event {
            WatcherEvent::Init => "Init".to_string(),
            WatcherEvent::InitApply(o) => format!("InitApply {}", o.metadata.name.unwrap()),
            WatcherEvent::InitDone => "InitDone".to_string(),
            other => panic!("unexpected {other:?}"),
        });
        if done {
            break;
        }
    }
    assert_eq!(seen, ["Init", "InitApply one", "InitDone"]);
    let watch = server
        .requests()
        .into_iter()
        .map(|(_, path)| path)
        .find(|path| path.contains("watch=true"))
        .unwrap();
    assert!(watch.contains("sendInitialEvents=true"), "{watch}");
    // No list request at all: the initial state came over the watch.
    assert!(
        server
            .requests()
            .iter()
            .filter(|(method, _)| method == "GET")
            .all(|(_, path)| path.contains("watch=true"))
    );

    let two: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "two"}})).unwrap();
    config_maps
        .create(&PostParams::default(), &two)
        .await
        .unwrap();
    let event = next_item(&mut stream).await;
    let WatcherEvent::Apply(applied) = event else {
        panic!("expected Apply, got {event:?}")
    };
    assert_eq!(applied.metadata.name.as_deref(), Some("two"));
}
