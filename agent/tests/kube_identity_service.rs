//! The identity service found through the Kubernetes API (no cluster DNS):
//! a ready endpoint of its Service, read from the in-process API server, and
//! followed when its endpoints move.

mod kube_support;

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
};

use kube_support::{Cluster, eventually};
use sealmesh_agent::{config::ServiceName, kube};
use serde_json::json;

const CONTROL_NS: &str = "sealmesh";

fn identity() -> ServiceName {
    ServiceName {
        namespace: CONTROL_NS.into(),
        name: "sealmesh-identity".into(),
    }
}

fn endpoint(ip: &str, ready: bool) -> serde_json::Value {
    json!({ "addresses": [ip], "conditions": { "ready": ready } })
}

#[tokio::test]
async fn ready_endpoints_of_the_service_port_are_found_and_followed() {
    let (_server, cluster) = Cluster::start().await;
    cluster.namespace(CONTROL_NS, false).await;
    // Service port 8080 -> the pods' port named grpc (9443 here).
    cluster
        .service(
            CONTROL_NS,
            "sealmesh-identity",
            Ipv4Addr::new(10, 96, 0, 20),
            json!([{ "name": "grpc", "port": 8080, "targetPort": "grpc" },
                   { "name": "metrics", "port": 9990 }]),
        )
        .await;
    cluster
        .endpoint_slice(
            CONTROL_NS,
            "sealmesh-identity-a",
            "sealmesh-identity",
            json!([endpoint("10.244.1.7", true), endpoint("10.244.1.8", false)]),
            json!([{ "name": "grpc", "port": 9443 }, { "name": "metrics", "port": 9990 }]),
        )
        .await;
    let client = cluster.client.clone();
    let found = kube::service_endpoints(&client, &identity(), 8080)
        .await
        .unwrap();
    let first: SocketAddr = "10.244.1.7:9443".parse().unwrap();
    assert_eq!(
        found,
        [first],
        "the ready endpoint, on the grpc target port"
    );

    let moved_to = Arc::new(Mutex::new(Vec::new()));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let follow = tokio::spawn(kube::follow_service_endpoints(
        client,
        identity(),
        8080,
        first,
        {
            let moved_to = moved_to.clone();
            move |addr| moved_to.lock().unwrap().push(addr)
        },
        async {
            let _ = stop_rx.await;
        },
    ));
    // The pod moves: the old endpoint is gone, a new one is ready.
    cluster
        .patch_endpoint_slice(
            CONTROL_NS,
            "sealmesh-identity-a",
            json!({ "endpoints": [endpoint("10.244.2.9", true)] }),
        )
        .await;
    eventually("the agent to follow the identity service", || {
        let moved_to = moved_to.clone();
        async move { !moved_to.lock().unwrap().is_empty() }
    })
    .await;
    assert_eq!(
        *moved_to.lock().unwrap(),
        ["10.244.2.9:9443".parse::<SocketAddr>().unwrap()]
    );
    let _ = stop_tx.send(());
    follow.await.unwrap();
}
