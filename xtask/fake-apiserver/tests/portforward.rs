//! `pods/portforward` over WebSocket, driven by kube-rs' own port-forwarder.

use std::sync::{Arc, Mutex};

use fake_apiserver::{FakeApiServer, PortForwarder};
use futures::FutureExt;
use k8s_openapi::api::authorization::v1::SelfSubjectAccessReview;
use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use kube::{Api, Client};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

mod support;
use support::STEP;

async fn create_pod(client: &Client, name: &str) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    pods.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"nodeName": "node-0", "containers": [{"name": "app", "image": "app:1"}]},
        }))
        .unwrap(),
    )
    .await
    .unwrap();
}

/// An echo server on 127.0.0.1 that answers each line upper-cased.
async fn upper_echo_server() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut connection, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buffer = [0; 1024];
                loop {
                    match connection.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(read) => {
                            let upper = buffer[..read].to_ascii_uppercase();
                            if connection.write_all(&upper).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    address
}

/// A forwarder that dials `target` for port 80 and a closed port otherwise,
/// recording what it was asked for.
fn forwarder(
    target: std::net::SocketAddr,
    closed: std::net::SocketAddr,
    asked: Arc<Mutex<Vec<(String, String, u16)>>>,
) -> PortForwarder {
    Arc::new(move |namespace, pod, port| {
        asked.lock().unwrap().push((namespace, pod, port));
        let address = if port == 80 { target } else { closed };
        TcpStream::connect(address).boxed()
    })
}

async fn closed_address() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

#[tokio::test]
async fn bytes_flow_both_ways_through_the_forwarded_port() {
    let server = FakeApiServer::start().await.unwrap();
    let asked = Arc::new(Mutex::new(Vec::new()));
    server.set_port_forwarder(forwarder(
        upper_echo_server().await,
        closed_address().await,
        asked.clone(),
    ));
    let client = server.client();
    create_pod(&client, "web").await;
    let pods: Api<Pod> = Api::namespaced(client, "default");

    let mut forwarder = tokio::time::timeout(STEP, pods.portforward("web", &[80]))
        .await
        .unwrap()
        .unwrap();
    let mut stream = forwarder.take_stream(80).unwrap();
    for word in ["hello", "port-forward"] {
        stream.write_all(word.as_bytes()).await.unwrap();
        let mut answer = vec![0; word.len()];
        tokio::time::timeout(STEP, stream.read_exact(&mut answer))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(answer, word.to_ascii_uppercase().as_bytes());
    }
    assert_eq!(
        *asked.lock().unwrap(),
        [("default".to_string(), "web".to_string(), 80)]
    );
    drop(stream);
    tokio::time::timeout(STEP, forwarder.join())
        .await
        .unwrap()
        .unwrap();
    assert!(
        server
            .requests()
            .iter()
            .any(|(method, path)| method == "GET"
                && path == "/api/v1/namespaces/default/pods/web/portforward?&ports=80")
    );
}

#[tokio::test]
async fn a_port_nobody_listens_on_gets_the_kubelet_error_and_ends() {
    let server = FakeApiServer::start().await.unwrap();
    let closed = closed_address().await;
    server.set_port_forwarder(forwarder(closed, closed, Arc::default()));
    let client = server.client();
    create_pod(&client, "web").await;
    let pods: Api<Pod> = Api::namespaced(client, "default");

    let mut forwarder = pods.portforward("web", &[15000]).await.unwrap();
    let mut stream = forwarder.take_stream(15000).unwrap();
    let error = tokio::time::timeout(STEP, forwarder.take_error(15000).unwrap())
        .await
        .unwrap()
        .expect("an error message on the port's error channel");
    assert!(
        error.starts_with("an error occurred forwarding 15000 -> 15000")
            && error.contains("refused"),
        "{error}"
    );
    let mut rest = Vec::new();
    let read = tokio::time::timeout(STEP, stream.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(read, 0, "the data stream ends without data");
}

#[tokio::test]
async fn an_unknown_pod_is_not_found() {
    let server = FakeApiServer::start().await.unwrap();
    server.set_port_forwarder(forwarder(
        closed_address().await,
        closed_address().await,
        Arc::default(),
    ));
    let pods: Api<Pod> = Api::namespaced(server.client(), "default");
    let Err(kube::Error::Api(status)) = pods.portforward("missing", &[80]).await else {
        panic!("expected an API error");
    };
    assert_eq!(status.code, 404);
    assert_eq!(status.reason, "NotFound");
    assert_eq!(status.message, "pods \"missing\" not found");
}

#[tokio::test]
async fn port_forward_needs_create_on_pods_portforward() {
    let server = FakeApiServer::start().await.unwrap();
    server.set_port_forwarder(forwarder(
        upper_echo_server().await,
        closed_address().await,
        Arc::default(),
    ));
    let client = server.client();
    create_pod(&client, "web").await;
    server.deny_access("", "pods/portforward", "create");
    let pods: Api<Pod> = Api::namespaced(client, "default");
    let Err(kube::Error::Api(status)) = pods.portforward("web", &[80]).await else {
        panic!("expected an API error");
    };
    assert_eq!(status.code, 403);
    assert_eq!(status.reason, "Forbidden");
    assert_eq!(
        status.message,
        "pods \"web\" is forbidden: User \"kubernetes-admin\" cannot create resource \"pods/portforward\" in API group \"\" in the namespace \"default\""
    );
    // `kubectl auth can-i create pods --subresource=portforward` agrees.
    let reviews: Api<SelfSubjectAccessReview> = Api::all(server.client());
    let review = reviews
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"spec": {"resourceAttributes": {
                "namespace": "default", "verb": "create", "resource": "pods", "subresource": "portforward",
            }}}))
            .unwrap(),
        )
        .await
        .unwrap();
    assert!(!review.status.unwrap().allowed);
}

#[tokio::test]
async fn without_a_forwarder_the_backend_cannot_be_dialled() {
    let server = FakeApiServer::start().await.unwrap();
    let client = server.client();
    create_pod(&client, "web").await;
    let pods: Api<Pod> = Api::namespaced(client, "default");
    let Err(kube::Error::Api(status)) = pods.portforward("web", &[80]).await else {
        panic!("expected an API error");
    };
    assert_eq!(status.code, 500);
    assert!(
        status.message.starts_with("error dialing backend"),
        "{status:?}"
    );
}
