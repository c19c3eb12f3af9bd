//! Create, get, list, update, patch and delete through kube-rs, with the
//! exact codes and reasons the real server answers with.

mod support;

use fake_apiserver::FakeApiServer;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod, Secret, Service};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use support::object_names;

fn api_error(error: kube::Error) -> (u16, String) {
    match error {
        kube::Error::Api(status) => (status.code, status.reason),
        other => panic!("expected an API error Status, got {other:?}"),
    }
}

fn pod(name: &str, node: &str, labels: serde_json::Value) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {"nodeName": node, "serviceAccountName": "default", "containers": [{"name": "app", "image": "app:1"}]},
    }))
    .unwrap()
}

async fn namespace(client: &Client, name: &str) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": name}})).unwrap(),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn create_get_list_delete_with_real_codes() {
    let server = FakeApiServer::start().await.unwrap();
    let client = server.client();
    namespace(&client, "apps").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "apps");

    let created = pods
        .create(
            &PostParams::default(),
            &pod("web", "node-1", json!({"app": "web"})),
        )
        .await
        .unwrap();
    assert_eq!(created.metadata.namespace.as_deref(), Some("apps"));
    assert_eq!(created.metadata.uid.as_ref().map(String::len), Some(36));
    assert!(created.metadata.creation_timestamp.is_some());
    assert_eq!(
        created.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Pending")
    );

    let fetched = pods.get("web").await.unwrap();
    assert_eq!(fetched.metadata.uid, created.metadata.uid);
    assert_eq!(
        fetched.metadata.resource_version,
        created.metadata.resource_version
    );

    assert_eq!(
        api_error(
            pods.create(&PostParams::default(), &pod("web", "node-1", json!({})))
                .await
                .unwrap_err()
        ),
        (409, "AlreadyExists".to_string())
    );
    assert_eq!(
        api_error(pods.get("nope").await.unwrap_err()),
        (404, "NotFound".to_string())
    );
    assert_eq!(
        api_error(
            pods.delete("nope", &DeleteParams::default())
                .await
                .unwrap_err()
        ),
        (404, "NotFound".to_string())
    );
    let missing_namespace: Api<Pod> = Api::namespaced(client.clone(), "absent");
    assert_eq!(
        api_error(
            missing_namespace
                .create(&PostParams::default(), &pod("a", "n", json!({})))
                .await
                .unwrap_err()
        ),
        (404, "NotFound".to_string())
    );
    let nameless: ConfigMap = serde_json::from_value(json!({"metadata": {}})).unwrap();
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), "apps");
    assert_eq!(
        api_error(
            config_maps
                .create(&PostParams::default(), &nameless)
                .await
                .unwrap_err()
        ),
        (422, "Invalid".to_string())
    );
    let generated: ConfigMap =
        serde_json::from_value(json!({"metadata": {"generateName": "cfg-"}})).unwrap();
    let generated = config_maps
        .create(&PostParams::default(), &generated)
        .await
        .unwrap();
    assert!(
        generated
            .metadata
            .name
            .as_deref()
            .unwrap()
            .starts_with("cfg-")
    );
    assert_eq!(
        generated.metadata.name.as_deref().unwrap().len(),
        "cfg-".len() + 5
    );

    pods.create(
        &PostParams::default(),
        &pod("db", "node-2", json!({"app": "db"})),
    )
    .await
    .unwrap();
    let listed = pods.list(&ListParams::default()).await.unwrap();
    let names = object_names(&listed.items);
    assert_eq!(names, ["db", "web"]);
    let list_rv: u64 = listed.metadata.resource_version.unwrap().parse().unwrap();
    let newest: u64 = listed
        .items
        .iter()
        .map(|p| {
            p.metadata
                .resource_version
                .clone()
                .unwrap()
                .parse::<u64>()
                .unwrap()
        })
        .max()
        .unwrap();
    assert_eq!(list_rv, newest);

    let all_pods: Api<Pod> = Api::all(client.clone());
    assert_eq!(
        all_pods
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        2
    );

    let deleted = pods.delete("web", &DeleteParams::default()).await.unwrap();
    let deleted = deleted
        .left()
        .expect("the real server returns the deleted object");
    assert_eq!(deleted.metadata.uid, created.metadata.uid);
    assert_eq!(
        api_error(pods.get("web").await.unwrap_err()),
        (404, "NotFound".to_string())
    );

    let paths: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|(method, _)| method == "DELETE")
        .collect();
    assert_eq!(
        paths[0],
        (
            "DELETE".to_string(),
            "/api/v1/namespaces/apps/pods/nope?".to_string()
        )
    );
}

#[tokio::test]
async fn pagination_with_limit_and_continue() {
    let server = FakeApiServer::start().await.unwrap();
    let client = server.client();
    let config_maps: Api<ConfigMap> = Api::namespaced(client, "default");
    for index in 0..5 {
        let config_map: ConfigMap =
            serde_json::from_value(json!({"metadata": {"name": format!("cm-{index}")}})).unwrap();
        config_maps
            .create(&PostParams::default(), &config_map)
            .await
            .unwrap();
    }
    let first = config_maps
        .list(&ListParams::default().limit(2))
        .await
        .unwrap();
    assert_eq!(first.items.len(), 2);
    assert_eq!(first.metadata.remaining_item_count, Some(3));
    let token = first.metadata.continue_.clone().unwrap();
    let second = config_maps
        .list(&ListParams::default().limit(10).continue_token(&token))
        .await
        .unwrap();
    let names = object_names(&second.items);
    assert_eq!(names, ["cm-2", "cm-3", "cm-4"]);
    assert_eq!(second.metadata.continue_, None);
}

#[tokio::test]
async fn update_conflicts_on_stale_resource_version() {
    let server = FakeApiServer::start().await.unwrap();
    let config_maps: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    let original: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "settings"}, "data": {"mode": "a"}}))
            .unwrap();
    let created = config_maps
        .create(&PostParams::default(), &original)
        .await
        .unwrap();

    let mut first = created.clone();
    first.data = Some([("mode".to_string(), "b".to_string())].into());
    let updated = config_maps
        .replace("settings", &PostParams::default(), &first)
        .await
        .unwrap();
    assert_ne!(
        updated.metadata.resource_version,
        created.metadata.resource_version
    );

    // Same write again with the old resourceVersion: the real server's 409.
    let error = config_maps
        .replace("settings", &PostParams::default(), &first)
        .await
        .unwrap_err();
    let kube::Error::Api(status) = error else {
        panic!("expected a Status")
    };
    assert_eq!((status.code, status.reason.as_str()), (409, "Conflict"));
    assert_eq!(
        status.message,
        "Operation cannot be fulfilled on configmaps \"settings\": the object has been modified; please apply your changes to the latest version and try again"
    );

    // An update that changes nothing keeps the resourceVersion.
    let unchanged = config_maps
        .replace("settings", &PostParams::default(), &updated)
        .await
        .unwrap();
    assert_eq!(
        unchanged.metadata.resource_version,
        updated.metadata.resource_version
    );
}

#[tokio::test]
async fn merge_patch_and_status_subresource() {
    let server = FakeApiServer::start().await.unwrap();
    let client = server.client();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    pods.create(
        &PostParams::default(),
        &pod("web", "node-1", json!({"app": "web"})),
    )
    .await
    .unwrap();

    // Main-resource patches ignore status, as with a status subresource.
    let patched = pods
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"tier": "front", "app": null}}, "status": {"phase": "Failed"}})),
        )
        .await
        .unwrap();
    assert_eq!(
        patched.metadata.labels,
        Some([("tier".to_string(), "front".to_string())].into())
    );
    assert_eq!(
        patched.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Pending")
    );

    let running = pods
        .patch_status(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"ignored": "yes"}}, "status": {"phase": "Running", "podIP": "10.0.0.5"}})),
        )
        .await
        .unwrap();
    let status = running.status.unwrap();
    assert_eq!(
        (status.phase.as_deref(), status.pod_ip.as_deref()),
        (Some("Running"), Some("10.0.0.5"))
    );
    assert_eq!(
        running.metadata.labels,
        Some([("tier".to_string(), "front".to_string())].into())
    );

    // Strategic merge is applied as a merge patch; apply creates.
    let nodes: Api<Node> = Api::all(client.clone());
    let node = nodes
        .patch(
            "node-1",
            &PatchParams::apply("test").force(),
            &Patch::Apply(
                json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"}}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(node.metadata.name.as_deref(), Some("node-1"));
    let node = nodes
        .patch_status(
            "node-1",
            &PatchParams::default(),
            &Patch::Strategic(
                json!({"status": {"addresses": [{"type": "InternalIP", "address": "10.1.0.1"}]}}),
            ),
        )
        .await
        .unwrap();
    let addresses = node.status.unwrap().addresses.unwrap();
    assert_eq!(
        (addresses[0].type_.as_str(), addresses[0].address.as_str()),
        ("InternalIP", "10.1.0.1")
    );

    let config_maps: Api<ConfigMap> = Api::namespaced(client, "default");
    assert_eq!(
        api_error(
            config_maps
                .patch_status("x", &PatchParams::default(), &Patch::Merge(json!({})))
                .await
                .unwrap_err()
        ),
        (404, "NotFound".to_string())
    );
}

/// A raw request through the client's authentication; the decoded body, or
/// the API error's code and reason.
async fn raw(
    client: &Client,
    request: http::Request<Vec<u8>>,
) -> Result<serde_json::Value, (u16, String)> {
    client.request(request).await.map_err(api_error)
}

fn patch_request(
    path: &str,
    content_type: &str,
    body: serde_json::Value,
) -> http::Request<Vec<u8>> {
    http::Request::patch(path)
        .header(http::header::CONTENT_TYPE, content_type)
        .body(body.to_string().into_bytes())
        .unwrap()
}

#[tokio::test]
async fn merge_patch_null_deletes_and_json_patch_operations() {
    let server = FakeApiServer::start().await.unwrap();
    let client = server.client();
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    config_maps
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "settings", "labels": {"app": "web"}},
                "data": {"mode": "strict", "level": "debug", "keep": "yes"},
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let path = "/api/v1/namespaces/default/configmaps/settings";

    // null deletes a key, and a whole object; other keys merge.
    let merged = raw(
        &client,
        patch_request(
            path,
            "application/merge-patch+json",
            json!({"metadata": {"labels": null}, "data": {"level": null, "mode": "permissive"}}),
        ),
    )
    .await
    .unwrap();
    assert_eq!(merged["data"], json!({"mode": "permissive", "keep": "yes"}));
    assert_eq!(merged["metadata"].get("labels"), None);

    let patched = raw(
        &client,
        patch_request(
            path,
            "application/json-patch+json",
            json!([
                {"op": "test", "path": "/data/mode", "value": "permissive"},
                {"op": "remove", "path": "/data/keep"},
                {"op": "add", "path": "/data/extra", "value": "1"},
            ]),
        ),
    )
    .await
    .unwrap();
    assert_eq!(patched["data"], json!({"mode": "permissive", "extra": "1"}));

    // A failing test operation changes nothing: 422, as the real server answers.
    let failed = raw(
        &client,
        patch_request(
            path,
            "application/json-patch+json",
            json!([
                {"op": "remove", "path": "/data/extra"},
                {"op": "test", "path": "/data/mode", "value": "strict"},
            ]),
        ),
    )
    .await
    .unwrap_err();
    assert_eq!(failed, (422, "Invalid".to_string()));
    let unchanged = config_maps.get("settings").await.unwrap();
    assert_eq!(
        unchanged.data,
        Some(
            [
                ("mode".to_string(), "permissive".to_string()),
                ("extra".to_string(), "1".to_string())
            ]
            .into()
        )
    );

    // Not a list of operations: 400.
    let malformed = raw(
        &client,
        patch_request(path, "application/json-patch+json", json!({"op": "remove"})),
    )
    .await
    .unwrap_err();
    assert_eq!(malformed, (400, "BadRequest".to_string()));
}

#[tokio::test]
async fn percent_encoded_label_selectors() {
    let server = FakeApiServer::start().await.unwrap();
    let client = server.client();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    for (name, labels) in [
        ("front", json!({"tier": "front", "app": "web"})),
        ("back", json!({"tier": "back", "app": "db"})),
        ("edge", json!({"tier": "edge", "app": "web"})),
    ] {
        pods.create(&PostParams::default(), &pod(name, "node-1", labels))
            .await
            .unwrap();
    }
    let names = |list: serde_json::Value| {
        let mut names: Vec<String> = list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|pod| pod["metadata"]["name"].as_str().unwrap().to_string())
            .collect();
        names.sort();
        names
    };

    // `tier in (front, back),app!=db`: %-escapes and `+` for spaces.
    let list = raw(
        &client,
        http::Request::get(
            "/api/v1/namespaces/default/pods?labelSelector=tier+in+%28front%2C%20back%29%2Capp%21%3Ddb",
        )
        .body(Vec::new())
        .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(names(list), ["front"]);

    // kube-rs encodes its selectors itself; the server decodes them alike.
    let listed = pods
        .list(&ListParams::default().labels("tier notin (back),app=web"))
        .await
        .unwrap();
    let mut listed: Vec<_> = listed
        .items
        .iter()
        .filter_map(|pod| pod.metadata.name.clone())
        .collect();
    listed.sort();
    assert_eq!(listed, ["edge", "front"]);
    assert!(
        server
            .requests()
            .iter()
            .any(|(_, path)| path.contains("labelSelector=tier+notin+%28back%29%2Capp%3Dweb")),
        "kube-rs sent the selector percent-encoded: {:?}",
        server.requests()
    );
}

#[tokio::test]
async fn server_defaults_and_namespace_deletion() {
    let server = FakeApiServer::start().await.unwrap();
    let client = server.client();
    namespace(&client, "doomed").await;
    let services: Api<Service> = Api::namespaced(client.clone(), "doomed");
    let service: Service = serde_json::from_value(
        json!({"metadata": {"name": "web"}, "spec": {"ports": [{"port": 80}]}}),
    )
    .unwrap();
    let service = services
        .create(&PostParams::default(), &service)
        .await
        .unwrap();
    let spec = service.spec.unwrap();
    assert_eq!(spec.cluster_ip.as_deref(), Some("10.96.0.10"));
    assert_eq!(spec.cluster_ips, Some(vec!["10.96.0.10".to_string()]));
    assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));

    let secrets: Api<Secret> = Api::namespaced(client.clone(), "doomed");
    let secret: Secret = serde_json::from_value(
        json!({"metadata": {"name": "s"}, "stringData": {"key.pem": "PEM"}}),
    )
    .unwrap();
    let secret = secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    assert_eq!(secret.data.unwrap()["key.pem"].0, b"PEM");
    assert_eq!(secret.string_data, None);
    assert_eq!(secret.type_.as_deref(), Some("Opaque"));

    let namespaces: Api<Namespace> = Api::all(client.clone());
    assert_eq!(
        namespaces
            .get("doomed")
            .await
            .unwrap()
            .status
            .unwrap()
            .phase
            .as_deref(),
        Some("Active")
    );
    namespaces
        .delete("doomed", &DeleteParams::default())
        .await
        .unwrap();
    assert_eq!(
        api_error(services.get("web").await.unwrap_err()),
        (404, "NotFound".to_string())
    );
    assert_eq!(
        api_error(secrets.get("s").await.unwrap_err()),
        (404, "NotFound".to_string())
    );
    let names: Vec<_> = namespaces
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|n| n.metadata.name.unwrap())
        .collect();
    assert_eq!(
        names,
        ["default", "kube-node-lease", "kube-public", "kube-system"]
    );
}

#[tokio::test]
async fn delete_preconditions_and_delete_collection() {
    let server = FakeApiServer::start().await.unwrap();
    let config_maps: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    for (name, tier) in [("a", "front"), ("b", "front"), ("c", "back")] {
        let config_map: ConfigMap =
            serde_json::from_value(json!({"metadata": {"name": name, "labels": {"tier": tier}}}))
                .unwrap();
        config_maps
            .create(&PostParams::default(), &config_map)
            .await
            .unwrap();
    }
    let stale = DeleteParams {
        preconditions: Some(kube::api::Preconditions {
            uid: Some("00000000-0000-4000-8000-000000000000".to_string()),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    assert_eq!(
        api_error(config_maps.delete("a", &stale).await.unwrap_err()),
        (409, "Conflict".to_string())
    );
    let uid = config_maps.get("a").await.unwrap().metadata.uid;
    let current = DeleteParams {
        preconditions: Some(kube::api::Preconditions {
            uid,
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    config_maps.delete("a", &current).await.unwrap();

    let deleted = config_maps
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels("tier=front"),
        )
        .await
        .unwrap()
        .left()
        .expect("the real server returns the deleted objects as a list");
    let names = object_names(&deleted.items);
    assert_eq!(names, ["b"]);
    let left: Vec<_> = config_maps
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|c| c.metadata.name.unwrap())
        .collect();
    assert_eq!(left, ["c"]);
}

/// ClusterIPs come from the server's service range; one asked for outside
/// it is refused as kube-apiserver refuses it.
#[tokio::test]
async fn cluster_ips_come_from_the_service_range() {
    let server = FakeApiServer::start_with_service_range("10.0.0.0/24".parse().unwrap())
        .await
        .unwrap();
    let client = server.client();
    namespace(&client, "shop").await;
    let services: Api<Service> = Api::namespaced(client.clone(), "shop");
    let service = |name: &str, cluster_ip: Option<&str>| -> Service {
        let mut spec = json!({"ports": [{"port": 80}]});
        if let Some(ip) = cluster_ip {
            spec["clusterIP"] = json!(ip);
        }
        serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).unwrap()
    };
    let allocated = services
        .create(&PostParams::default(), &service("web", None))
        .await
        .unwrap();
    assert_eq!(
        allocated.spec.unwrap().cluster_ip.as_deref(),
        Some("10.0.0.10")
    );
    let chosen = services
        .create(&PostParams::default(), &service("api", Some("10.0.0.77")))
        .await
        .unwrap();
    assert_eq!(
        chosen.spec.unwrap().cluster_ip.as_deref(),
        Some("10.0.0.77")
    );
    let outside = services
        .create(&PostParams::default(), &service("old", Some("10.96.0.10")))
        .await
        .unwrap_err();
    let kube::Error::Api(status) = outside else {
        panic!("expected an API error, got {outside:?}")
    };
    assert_eq!((status.code, status.reason.as_str()), (422, "Invalid"));
    assert_eq!(
        status.message,
        "Service \"old\" is invalid: spec.clusterIPs: Invalid value: [\"10.96.0.10\"]: failed to allocate IP 10.96.0.10: provided IP is not in the valid range. The range of valid IPs is 10.0.0.0/24"
    );
    // Headless Services ask for no IP.
    services
        .create(&PostParams::default(), &service("headless", Some("None")))
        .await
        .unwrap();
}

/// What `sealmesh check` reads of RBAC: ServiceAccounts, roles and bindings,
/// listed and read like any object, and refused (403, the real server's
/// words) when access is denied.
#[tokio::test]
async fn rbac_objects_are_served_and_denied_reads_are_forbidden() {
    use k8s_openapi::api::{
        core::v1::ServiceAccount,
        rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
    };
    let server = FakeApiServer::start().await.unwrap();
    let client = server.client();
    namespace(&client, "sealmesh").await;
    let create = |api: Api<kube::api::DynamicObject>, object: serde_json::Value| async move {
        api.create(
            &PostParams::default(),
            &serde_json::from_value(object).unwrap(),
        )
        .await
        .unwrap();
    };
    let resource = |kind: &str, plural: &str| {
        kube::api::ApiResource::from_gvk_with_plural(
            &kube::api::GroupVersionKind::gvk("rbac.authorization.k8s.io", "v1", kind),
            plural,
        )
    };
    let rule = json!([{ "apiGroups": [""], "resources": ["pods"], "verbs": ["list"] }]);
    let binding = json!({
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "reader" },
        "subjects": [{ "kind": "ServiceAccount", "name": "agent", "namespace": "sealmesh" }],
    });
    Api::<ServiceAccount>::namespaced(client.clone(), "sealmesh")
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({ "metadata": { "name": "agent" } })).unwrap(),
        )
        .await
        .unwrap();
    create(
        Api::all_with(client.clone(), &resource("ClusterRole", "clusterroles")),
        json!({ "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": { "name": "reader" }, "rules": rule }),
    )
    .await;
    let binding = |kind: &str| {
        let mut object = binding.clone();
        object["apiVersion"] = json!("rbac.authorization.k8s.io/v1");
        object["kind"] = json!(kind);
        object["metadata"] = json!({ "name": "reader" });
        object
    };
    create(
        Api::all_with(
            client.clone(),
            &resource("ClusterRoleBinding", "clusterrolebindings"),
        ),
        binding("ClusterRoleBinding"),
    )
    .await;
    create(
        Api::namespaced_with(
            client.clone(),
            "sealmesh",
            &resource("RoleBinding", "rolebindings"),
        ),
        binding("RoleBinding"),
    )
    .await;
    create(
        Api::namespaced_with(client.clone(), "sealmesh", &resource("Role", "roles")),
        json!({ "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": { "name": "reader" }, "rules": rule }),
    )
    .await;

    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), "sealmesh");
    assert!(accounts.get("agent").await.is_ok());
    assert_eq!(
        api_error(accounts.get("identity").await.unwrap_err()),
        (404, "NotFound".into())
    );
    let cluster_roles: Api<ClusterRole> = Api::all(client.clone());
    let listed = cluster_roles.list(&ListParams::default()).await.unwrap();
    assert_eq!(object_names(&listed.items), ["reader"]);
    assert_eq!(
        listed.items[0].rules.as_ref().unwrap()[0].verbs,
        ["list".to_owned()]
    );
    let roles: Api<Role> = Api::namespaced(client.clone(), "sealmesh");
    assert_eq!(
        object_names(&roles.list(&ListParams::default()).await.unwrap().items),
        ["reader"]
    );
    let bindings: Api<RoleBinding> = Api::namespaced(client.clone(), "sealmesh");
    let reader = bindings.get("reader").await.unwrap();
    assert_eq!(reader.subjects.unwrap()[0].name, "agent");
    let cluster_bindings: Api<ClusterRoleBinding> = Api::all(client.clone());
    cluster_bindings
        .delete("reader", &DeleteParams::default())
        .await
        .unwrap();
    let kube::Error::Api(status) = cluster_bindings.get("reader").await.unwrap_err() else {
        panic!("expected an API error");
    };
    assert_eq!(
        (status.code, status.message.as_str()),
        (
            404,
            "clusterrolebindings.rbac.authorization.k8s.io \"reader\" not found"
        )
    );

    // Denied: a cluster-wide list, a namespaced get; other verbs still work.
    server.deny_access("rbac.authorization.k8s.io", "clusterroles", "list");
    server.deny_access("rbac.authorization.k8s.io", "roles", "get");
    let kube::Error::Api(status) = cluster_roles
        .list(&ListParams::default())
        .await
        .unwrap_err()
    else {
        panic!("expected an API error");
    };
    assert_eq!((status.code, status.reason.as_str()), (403, "Forbidden"));
    assert_eq!(
        status.message,
        "clusterroles.rbac.authorization.k8s.io is forbidden: User \"kubernetes-admin\" cannot list resource \"clusterroles\" in API group \"rbac.authorization.k8s.io\" at the cluster scope"
    );
    assert!(cluster_roles.get("reader").await.is_ok());
    let kube::Error::Api(status) = roles.get("reader").await.unwrap_err() else {
        panic!("expected an API error");
    };
    assert_eq!(
        (status.code, status.message.as_str()),
        (
            403,
            "roles.rbac.authorization.k8s.io \"reader\" is forbidden: User \"kubernetes-admin\" cannot get resource \"roles\" in API group \"rbac.authorization.k8s.io\" in the namespace \"sealmesh\""
        )
    );
    assert!(roles.list(&ListParams::default()).await.is_ok());
}

#[tokio::test]
async fn without_a_namespace_controller_a_deleted_namespace_terminates_until_finalized() {
    let server = FakeApiServer::start().await.unwrap();
    server.stop_namespace_controller();
    let client = server.client();
    namespace(&client, "apps").await;
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), "apps");
    let config_map = |name: &str| -> ConfigMap {
        serde_json::from_value(json!({"metadata": {"name": name}})).unwrap()
    };
    config_maps
        .create(&PostParams::default(), &config_map("kept"))
        .await
        .unwrap();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .delete("apps", &DeleteParams::default())
        .await
        .unwrap();
    let terminating = namespaces.get("apps").await.unwrap();
    assert!(terminating.metadata.deletion_timestamp.is_some());
    assert_eq!(
        terminating.status.unwrap().phase.as_deref(),
        Some("Terminating")
    );
    let refused = config_maps
        .create(&PostParams::default(), &config_map("late"))
        .await
        .unwrap_err();
    let kube::Error::Api(status) = refused else {
        panic!("expected a Status, got {refused:?}")
    };
    assert_eq!(
        (status.code, status.reason.as_str(), status.message.as_str()),
        (
            403,
            "Forbidden",
            "namespaces \"apps\" is forbidden: unable to create new content in namespace apps because it is being terminated"
        )
    );

    // Finalizing removes the namespace whatever it holds: its objects stay
    // in storage, as in etcd.
    let mut finalized = namespaces.get("apps").await.unwrap();
    finalized.spec.as_mut().unwrap().finalizers = Some(Vec::new());
    namespaces
        .replace_subresource("finalize", "apps", &PostParams::default(), &finalized)
        .await
        .unwrap();
    assert_eq!(
        api_error(namespaces.get("apps").await.unwrap_err()),
        (404, "NotFound".to_string())
    );
    assert_eq!(
        object_names(
            &config_maps
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
        ),
        ["kept"]
    );
}
