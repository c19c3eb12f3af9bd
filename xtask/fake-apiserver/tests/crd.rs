//! CustomResourceDefinitions: a created CRD makes its resources served
//! (discovery, CRUD, list/watch, scope, `/status`, schema defaults) and
//! Established; before it exists and after it is deleted its resources are
//! the real server's 404, and deleting it deletes its objects.

mod support;

use std::path::Path;

use fake_apiserver::FakeApiServer;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
    PostParams, WatchEvent, WatchParams,
};
use kube::discovery::{self, Discovery, Scope};
use kube::{Api, Client};
use sealmesh_common::authz;
use serde_json::{Value, json};
use support::{STEP, next_item};

fn api_error(error: kube::Error) -> (u16, String, String) {
    match error {
        kube::Error::Api(status) => (status.code, status.reason, status.message),
        other => panic!("expected an API error Status, got {other:?}"),
    }
}

/// deploy/base's AuthorizationPolicy CRD, as the testbed and `sealmesh
/// install` apply it.
fn policy_crd() -> CustomResourceDefinition {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy/base/authorizationpolicy-crd.yaml");
    serde_yaml_ng::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn policy_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(authz::API_GROUP, authz::API_VERSION, authz::KIND),
        authz::PLURAL,
    )
}

fn policy(name: &str, spec: Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": format!("{}/{}", authz::API_GROUP, authz::API_VERSION),
        "kind": authz::KIND,
        "metadata": {"name": name},
        "spec": spec,
    }))
    .unwrap()
}

/// A cluster-scoped CRD with a status subresource and two served versions.
fn widget_crd() -> CustomResourceDefinition {
    serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.com"},
        "spec": {
            "group": "example.com",
            "names": {"kind": "Widget", "plural": "widgets"},
            "scope": "Cluster",
            "versions": [
                {"name": "v1", "served": true, "storage": true,
                 "subresources": {"status": {}},
                 "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                     "spec": {"type": "object", "properties": {"size": {"type": "integer", "default": 3}}},
                     "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                 }}}},
                {"name": "v1beta1", "served": true, "storage": false,
                 "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}},
                {"name": "v1alpha1", "served": false, "storage": false,
                 "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}},
            ],
        },
    }))
    .unwrap()
}

fn condition(crd: &CustomResourceDefinition, kind: &str) -> Option<String> {
    crd.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == kind)
        .map(|c| c.status.clone())
}

async fn served_groups(client: &Client) -> Vec<String> {
    Discovery::new(client.clone())
        .run()
        .await
        .unwrap()
        .groups()
        .map(|group| group.name().to_string())
        .collect()
}

#[tokio::test]
async fn a_crd_serves_its_resource_until_it_is_deleted_with_its_objects() {
    let server = FakeApiServer::start().await.unwrap();
    let client = server.client();
    let policies: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), "default", &policy_resource());

    // Before the CRD: the real server's 404 for an unknown path.
    let (code, reason, message) =
        api_error(policies.list(&ListParams::default()).await.unwrap_err());
    assert_eq!(
        (code, reason.as_str(), message.as_str()),
        (
            404,
            "NotFound",
            "the server could not find the requested resource"
        )
    );
    assert!(
        !served_groups(&client)
            .await
            .contains(&authz::API_GROUP.to_string())
    );

    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let created = crds
        .create(&PostParams::default(), &policy_crd())
        .await
        .unwrap();
    assert_eq!(
        condition(&created, "NamesAccepted").as_deref(),
        Some("True")
    );
    assert_eq!(condition(&created, "Established").as_deref(), Some("True"));
    let status = created.status.as_ref().unwrap();
    assert_eq!(status.accepted_names.as_ref().unwrap().kind, authz::KIND);
    assert_eq!(
        status.stored_versions.as_deref(),
        Some(&[authz::API_VERSION.to_string()][..])
    );

    // Discovery names the resource with the CRD's scope and short names.
    let gvk = GroupVersionKind::gvk(authz::API_GROUP, authz::API_VERSION, authz::KIND);
    let (resource, capabilities) = discovery::pinned_kind(&client, &gvk).await.unwrap();
    assert_eq!(resource.plural, authz::PLURAL);
    assert_eq!(capabilities.scope, Scope::Namespaced);
    let list: Value = client
        .request(
            http::Request::get(format!("/apis/{}/{}", authz::API_GROUP, authz::API_VERSION))
                .body(Vec::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(list["resources"][0]["shortNames"], json!(["smap"]));
    assert_eq!(
        list["resources"].as_array().unwrap().len(),
        1,
        "no /status: the CRD has none"
    );

    let mut watch = policies
        .watch(&WatchParams::default().disable_bookmarks(), "0")
        .await
        .unwrap()
        .boxed();

    // The schema's default: an unset action is ALLOW, a set one stays.
    let allow = policies
        .create(
            &PostParams::default(),
            &policy(
                "allow-frontend",
                json!({"rules": [{"from": [{"source": {"namespaces": ["shop"]}}]}]}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(allow.data["spec"]["action"], "ALLOW");
    assert_eq!(allow.metadata.namespace.as_deref(), Some("default"));
    let deny = policies
        .create(
            &PostParams::default(),
            &policy("deny-all", json!({"action": "DENY", "rules": [{}]})),
        )
        .await
        .unwrap();
    assert_eq!(deny.data["spec"]["action"], "DENY");
    let (code, reason, _) = api_error(
        policies
            .create(&PostParams::default(), &policy("deny-all", json!({})))
            .await
            .unwrap_err(),
    );
    assert_eq!((code, reason.as_str()), (409, "AlreadyExists"));
    // A patch that drops the action gets the default again.
    let patched = policies
        .patch(
            "deny-all",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"action": null}})),
        )
        .await
        .unwrap();
    assert_eq!(patched.data["spec"]["action"], "ALLOW");
    for expected in ["allow-frontend", "deny-all"] {
        match next_item(&mut watch).await {
            WatchEvent::Added(object) => {
                assert_eq!(object.metadata.name.as_deref(), Some(expected))
            }
            other => panic!("expected ADDED {expected}, got {other:?}"),
        }
    }
    assert!(matches!(
        next_item(&mut watch).await,
        WatchEvent::Modified(_)
    ));
    let all: Api<DynamicObject> = Api::all_with(client.clone(), &policy_resource());
    assert_eq!(
        all.list(&ListParams::default()).await.unwrap().items.len(),
        2
    );

    // Deleting the CRD deletes its objects, then ends the watch; the
    // resource is 404 again and a new CRD starts empty.
    crds.delete(
        &created.metadata.name.clone().unwrap(),
        &DeleteParams::default(),
    )
    .await
    .unwrap();
    for _ in 0..2 {
        assert!(matches!(
            next_item(&mut watch).await,
            WatchEvent::Deleted(_)
        ));
    }
    let ended = tokio::time::timeout(STEP, watch.next()).await.unwrap();
    assert!(
        ended.is_none(),
        "the watch ends with its resource, got {ended:?}"
    );
    let (code, _, _) = api_error(all.list(&ListParams::default()).await.unwrap_err());
    assert_eq!(code, 404);
    assert!(
        !served_groups(&client)
            .await
            .contains(&authz::API_GROUP.to_string())
    );
    crds.create(&PostParams::default(), &policy_crd())
        .await
        .unwrap();
    assert!(
        all.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
}

#[tokio::test]
async fn cluster_scope_served_versions_and_status_follow_the_crd() {
    let server = FakeApiServer::start().await.unwrap();
    let client = server.client();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(&PostParams::default(), &widget_crd())
        .await
        .unwrap();

    let discovery = Discovery::new(client.clone()).run().await.unwrap();
    let group = discovery.get("example.com").unwrap();
    let versions: Vec<&str> = group.versions().collect();
    assert_eq!(versions, ["v1", "v1beta1"], "v1alpha1 is not served");
    let (resource, capabilities) = group.recommended_kind("Widget").unwrap();
    assert_eq!(capabilities.scope, Scope::Cluster);
    assert_eq!(resource.plural, "widgets");
    let widgets: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
    let widget: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "example.com/v1", "kind": "Widget",
        "metadata": {"name": "w"}, "spec": {}, "status": {"ignored": true},
    }))
    .unwrap();
    let created = widgets
        .create(&PostParams::default(), &widget)
        .await
        .unwrap();
    assert_eq!(created.metadata.namespace, None);
    assert_eq!(created.data["spec"]["size"], 3);
    // With a status subresource, the main resource does not write status.
    let replaced = widgets
        .patch(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "x"}})),
        )
        .await
        .unwrap();
    assert_eq!(replaced.data.get("status"), created.data.get("status"));
    let status = widgets
        .patch_status(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Ready"}})),
        )
        .await
        .unwrap();
    assert_eq!(status.data["status"]["phase"], "Ready");
    // A cluster-scoped resource has no namespaced path.
    let namespaced: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &resource);
    let (code, _, _) = api_error(namespaced.get("w").await.unwrap_err());
    assert_eq!(code, 404);

    // Deleting a namespace deletes the namespaced custom objects in it.
    crds.create(&PostParams::default(), &policy_crd())
        .await
        .unwrap();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "shop"}})).unwrap(),
        )
        .await
        .unwrap();
    let policies: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), "shop", &policy_resource());
    policies
        .create(&PostParams::default(), &policy("p", json!({})))
        .await
        .unwrap();
    namespaces
        .delete("shop", &DeleteParams::default())
        .await
        .unwrap();
    let all: Api<DynamicObject> = Api::all_with(client.clone(), &policy_resource());
    assert!(
        all.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    assert_eq!(
        widgets
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        1
    );
}

/// A change to a CRD's JSON.
type Edit = dyn Fn(&mut Value);

#[tokio::test]
async fn crds_the_real_server_refuses_are_refused() {
    let server = FakeApiServer::start().await.unwrap();
    let crds: Api<CustomResourceDefinition> = Api::all(server.client());
    let broken = |edit: &Edit| {
        let mut crd = serde_json::to_value(widget_crd()).unwrap();
        edit(&mut crd);
        serde_json::from_value::<CustomResourceDefinition>(crd).unwrap()
    };
    let cases: [(&Edit, &str); 4] = [
        (
            &|crd| crd["metadata"]["name"] = json!("gadgets.example.com"),
            "metadata.name: Invalid value: \"gadgets.example.com\": must be spec.names.plural+\".\"+spec.group",
        ),
        (
            &|crd| crd["spec"]["scope"] = json!("Global"),
            "spec.scope: Unsupported value: \"Global\"",
        ),
        (
            &|crd| crd["spec"]["versions"][1]["storage"] = json!(true),
            "spec.versions: Invalid value: must have exactly one version marked as storage version",
        ),
        (
            &|crd| {
                crd["metadata"]["name"] = json!("widgets.example");
                crd["spec"]["group"] = json!("example");
            },
            "spec.group: Invalid value: \"example\": should be a domain with at least one dot",
        ),
    ];
    for (edit, expected) in cases {
        let (code, reason, message) = api_error(
            crds.create(&PostParams::default(), &broken(edit))
                .await
                .unwrap_err(),
        );
        assert_eq!((code, reason.as_str()), (422, "Invalid"), "{message}");
        assert!(message.contains(expected), "{message}");
    }
    assert!(
        crds.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
}
