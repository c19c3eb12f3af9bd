//! Watches through kube-rs: the runtime watcher, raw watches with bookmarks,
//! resuming, 410 Expired after compaction, selectors and closed streams.

mod support;

use fake_apiserver::FakeApiServer;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::runtime::watcher::{self, Event};
use serde_json::json;
use support::{STEP, next_item, object_names};

fn config_map(name: &str, labels: serde_json::Value) -> ConfigMap {
    serde_json::from_value(
        json!({"metadata": {"name": name, "labels": labels}, "data": {"k": "v"}}),
    )
    .unwrap()
}

fn name(config_map: &ConfigMap) -> &str {
    config_map.metadata.name.as_deref().unwrap()
}

/// The next watcher event, as (kind, name), with a timeout.
async fn next<S>(stream: &mut S) -> (&'static str, String)
where
    S: futures::Stream<Item = Result<Event<ConfigMap>, watcher::Error>> + Unpin,
{
    let event = match tokio::time::timeout(STEP, stream.next())
        .await
        .expect("a watcher event within the timeout")
        .expect("the watcher stream does not end")
    {
        Ok(event) => event,
        // kube's watcher reports watch errors as items, then recovers.
        Err(watcher::Error::WatchError(status)) => {
            return ("WatchError", format!("{} {}", status.code, status.reason));
        }
        Err(other) => panic!("unexpected watcher error {other:?}"),
    };
    match event {
        Event::Init => ("Init", String::new()),
        Event::InitApply(object) => ("InitApply", name(&object).to_string()),
        Event::InitDone => ("InitDone", String::new()),
        Event::Apply(object) => ("Apply", name(&object).to_string()),
        Event::Delete(object) => ("Delete", name(&object).to_string()),
    }
}

fn list_requests(server: &FakeApiServer) -> usize {
    server
        .requests()
        .iter()
        .filter(|(method, path)| {
            method == "GET"
                && path.starts_with("/api/v1/namespaces/default/configmaps?")
                && !path.contains("watch=true")
        })
        .count()
}

#[tokio::test]
async fn runtime_watcher_sees_creates_updates_deletes() {
    let server = FakeApiServer::start().await.unwrap();
    let config_maps: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    config_maps
        .create(&PostParams::default(), &config_map("before", json!({})))
        .await
        .unwrap();

    let mut stream = watcher::watcher(config_maps.clone(), watcher::Config::default()).boxed();
    assert_eq!(next(&mut stream).await, ("Init", String::new()));
    assert_eq!(next(&mut stream).await, ("InitApply", "before".to_string()));
    assert_eq!(next(&mut stream).await, ("InitDone", String::new()));

    config_maps
        .create(&PostParams::default(), &config_map("after", json!({})))
        .await
        .unwrap();
    assert_eq!(next(&mut stream).await, ("Apply", "after".to_string()));
    config_maps
        .patch(
            "after",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"k": "w"}})),
        )
        .await
        .unwrap();
    assert_eq!(next(&mut stream).await, ("Apply", "after".to_string()));
    config_maps
        .delete("before", &DeleteParams::default())
        .await
        .unwrap();
    assert_eq!(next(&mut stream).await, ("Delete", "before".to_string()));
    assert_eq!(list_requests(&server), 1);
}

#[tokio::test]
async fn compaction_makes_the_watcher_relist() {
    let server = FakeApiServer::start().await.unwrap();
    let config_maps: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    config_maps
        .create(&PostParams::default(), &config_map("one", json!({})))
        .await
        .unwrap();

    let config = watcher::Config::default().disable_bookmarks();
    let mut stream = watcher::watcher(config_maps.clone(), config).boxed();
    assert_eq!(next(&mut stream).await, ("Init", String::new()));
    assert_eq!(next(&mut stream).await, ("InitApply", "one".to_string()));
    assert_eq!(next(&mut stream).await, ("InitDone", String::new()));
    assert_eq!(list_requests(&server), 1);

    // A change the watch does not see (another resource; no bookmarks to
    // carry its resourceVersion), then the history is gone: resuming from the
    // watcher's resourceVersion is 410 Expired, and the watcher re-lists.
    let secrets: Api<Secret> = Api::namespaced(server.client(), "default");
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "unseen"}})).unwrap(),
        )
        .await
        .unwrap();
    server.compact();
    server.close_watches();

    let mut seen = Vec::new();
    while seen.last().map(|(kind, _): &(&str, String)| *kind) != Some("InitDone") {
        seen.push(next(&mut stream).await);
    }
    assert_eq!(
        seen,
        [
            ("WatchError", "410 Expired".to_string()),
            ("Init", String::new()),
            ("InitApply", "one".to_string()),
            ("InitDone", String::new())
        ]
    );
    assert_eq!(list_requests(&server), 2);
}

#[tokio::test]
async fn raw_watch_gets_expired_error_after_compaction() {
    let server = FakeApiServer::start().await.unwrap();
    let config_maps: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    let created = config_maps
        .create(&PostParams::default(), &config_map("one", json!({})))
        .await
        .unwrap();
    config_maps
        .create(&PostParams::default(), &config_map("two", json!({})))
        .await
        .unwrap();
    server.compact();
    let old = created.metadata.resource_version.unwrap();
    let mut events = config_maps
        .watch(&WatchParams::default(), &old)
        .await
        .unwrap()
        .boxed();
    let event = next_item(&mut events).await;
    let WatchEvent::Error(status) = event else {
        panic!("expected an ERROR event, got {event:?}")
    };
    assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
    assert_eq!(
        status.status,
        Some(kube::core::response::StatusSummary::Failure)
    );
}

#[tokio::test]
async fn raw_watch_resumes_and_sends_bookmarks() {
    let server = FakeApiServer::start().await.unwrap();
    let config_maps: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    let first = config_maps
        .create(&PostParams::default(), &config_map("one", json!({})))
        .await
        .unwrap();
    let second = config_maps
        .create(&PostParams::default(), &config_map("two", json!({})))
        .await
        .unwrap();
    let from = first.metadata.resource_version.unwrap();

    let params = WatchParams::default().timeout(30);
    assert!(params.bookmarks, "kube asks for bookmarks by default");
    let mut events = config_maps.watch(&params, &from).await.unwrap().boxed();
    let event = next_item(&mut events).await;
    let WatchEvent::Added(added) = event else {
        panic!("expected ADDED, got {event:?}")
    };
    assert_eq!(
        added.metadata.resource_version,
        second.metadata.resource_version
    );

    let event = next_item(&mut events).await;
    let WatchEvent::Bookmark(bookmark) = event else {
        panic!("expected BOOKMARK, got {event:?}")
    };
    assert_eq!(
        Some(bookmark.metadata.resource_version),
        second.metadata.resource_version
    );
    assert_eq!(bookmark.types.kind, "ConfigMap");
    assert_eq!(bookmark.types.api_version, "v1");

    let watch_path = server
        .requests()
        .into_iter()
        .map(|(_, path)| path)
        .find(|path| path.contains("watch=true"))
        .unwrap();
    assert!(
        watch_path.contains("allowWatchBookmarks=true"),
        "{watch_path}"
    );
    assert!(
        watch_path.contains(&format!("resourceVersion={from}")),
        "{watch_path}"
    );
}

#[tokio::test]
async fn watch_timeout_ends_the_stream() {
    let server = FakeApiServer::start().await.unwrap();
    let config_maps: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    let mut events = config_maps
        .watch(&WatchParams::default().disable_bookmarks().timeout(1), "0")
        .await
        .unwrap()
        .boxed();
    let ended = tokio::time::timeout(STEP, events.try_next())
        .await
        .unwrap()
        .unwrap();
    assert!(
        ended.is_none(),
        "the stream ends after timeoutSeconds, got {ended:?}"
    );
}

#[tokio::test]
async fn selector_watch_turns_label_changes_into_added_and_deleted() {
    let server = FakeApiServer::start().await.unwrap();
    let config_maps: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    config_maps
        .create(
            &PostParams::default(),
            &config_map("a", json!({"mesh": "on"})),
        )
        .await
        .unwrap();
    config_maps
        .create(
            &PostParams::default(),
            &config_map("b", json!({"mesh": "off"})),
        )
        .await
        .unwrap();

    let params = WatchParams::default().labels("mesh in (on)").timeout(30);
    // resourceVersion "0": synthetic ADDED for the current matching objects.
    let mut events = config_maps.watch(&params, "0").await.unwrap().boxed();
    let mut next_event = async || {
        let event = next_item(&mut events).await;
        match event {
            WatchEvent::Added(o) => ("ADDED", name(&o).to_string()),
            WatchEvent::Modified(o) => ("MODIFIED", name(&o).to_string()),
            WatchEvent::Deleted(o) => ("DELETED", name(&o).to_string()),
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(next_event().await, ("ADDED", "a".to_string()));
    let relabel = |value: &str| Patch::Merge(json!({"metadata": {"labels": {"mesh": value}}}));
    config_maps
        .patch("b", &PatchParams::default(), &relabel("on"))
        .await
        .unwrap();
    assert_eq!(next_event().await, ("ADDED", "b".to_string()));
    config_maps
        .patch("a", &PatchParams::default(), &relabel("off"))
        .await
        .unwrap();
    assert_eq!(next_event().await, ("DELETED", "a".to_string()));
    config_maps
        .patch(
            "b",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"k": "x"}})),
        )
        .await
        .unwrap();
    assert_eq!(next_event().await, ("MODIFIED", "b".to_string()));
}

#[tokio::test]
async fn pods_by_node_field_selector() {
    let server = FakeApiServer::start().await.unwrap();
    let pods: Api<Pod> = Api::all(server.client());
    let namespaced: Api<Pod> = Api::namespaced(server.client(), "default");
    for (pod_name, node) in [("a", "node-1"), ("b", "node-2"), ("c", "node-1")] {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": pod_name},
            "spec": {"nodeName": node, "containers": [{"name": "x", "image": "x"}]},
        }))
        .unwrap();
        namespaced
            .create(&PostParams::default(), &pod)
            .await
            .unwrap();
    }
    let on_node_1 = pods
        .list(&kube::api::ListParams::default().fields("spec.nodeName=node-1"))
        .await
        .unwrap();
    let names = object_names(&on_node_1.items);
    assert_eq!(names, ["a", "c"]);
    let kube::Error::Api(status) = pods
        .list(&kube::api::ListParams::default().fields("spec.containers=x"))
        .await
        .unwrap_err()
    else {
        panic!("expected a Status")
    };
    assert_eq!((status.code, status.reason.as_str()), (400, "BadRequest"));
    assert_eq!(status.message, "field label not supported: spec.containers");
}

#[tokio::test]
async fn dropping_the_server_ends_open_watches() {
    let server = FakeApiServer::start().await.unwrap();
    let config_maps: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    let mut events = config_maps
        .watch(&WatchParams::default().disable_bookmarks(), "0")
        .await
        .unwrap()
        .boxed();
    drop(server);
    let ended = tokio::time::timeout(STEP, events.next()).await.unwrap();
    assert!(
        matches!(ended, None | Some(Err(_))),
        "the stream ends when the server goes away, got {ended:?}"
    );
}
