//! TokenRequest, TokenReview, bearer authentication and
//! SelfSubjectAccessReview.

use fake_apiserver::FakeApiServer;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenReview};
use k8s_openapi::api::authorization::v1::SelfSubjectAccessReview;
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client};
use sealmesh_common::consts::kube::{
    IDENTITY_TOKEN_AUDIENCE, TOKEN_EXTRA_POD_NAME, TOKEN_EXTRA_POD_UID,
};
use serde_json::json;

async fn service_account(client: &Client, namespace: &str, name: &str) -> ServiceAccount {
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    accounts
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": name}})).unwrap(),
        )
        .await
        .unwrap()
}

async fn request_token(
    client: &Client,
    namespace: &str,
    account: &str,
    spec: serde_json::Value,
) -> String {
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let request: TokenRequest = serde_json::from_value(json!({"spec": spec})).unwrap();
    let response = accounts
        .create_token_request(account, &PostParams::default(), &request)
        .await
        .unwrap();
    response.status.unwrap().token
}

async fn review(client: &Client, token: &str, audiences: &[&str]) -> TokenReview {
    let reviews: Api<TokenReview> = Api::all(client.clone());
    let review: TokenReview =
        serde_json::from_value(json!({"spec": {"token": token, "audiences": audiences}})).unwrap();
    reviews
        .create(&PostParams::default(), &review)
        .await
        .unwrap()
}

#[tokio::test]
async fn pod_bound_token_review() {
    let server = FakeApiServer::start().await.unwrap();
    let client = server.client();
    let account = service_account(&client, "default", "sealmesh-agent").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "agent-1"},
        "spec": {"nodeName": "node-1", "serviceAccountName": "sealmesh-agent", "containers": [{"name": "a", "image": "a"}]},
    }))
    .unwrap();
    let pod = pods.create(&PostParams::default(), &pod).await.unwrap();
    let pod_uid = pod.metadata.uid.clone().unwrap();

    let token = request_token(
        &client,
        "default",
        "sealmesh-agent",
        json!({"audiences": [IDENTITY_TOKEN_AUDIENCE], "expirationSeconds": 3600, "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": "agent-1", "uid": pod_uid}}),
    )
    .await;

    let accepted = review(&client, &token, &[IDENTITY_TOKEN_AUDIENCE])
        .await
        .status
        .unwrap();
    assert_eq!(accepted.authenticated, Some(true));
    assert_eq!(
        accepted.audiences,
        Some(vec![IDENTITY_TOKEN_AUDIENCE.to_string()])
    );
    assert_eq!(accepted.error, None);
    let user = accepted.user.unwrap();
    assert_eq!(
        user.username.as_deref(),
        Some("system:serviceaccount:default:sealmesh-agent")
    );
    assert_eq!(user.uid, account.metadata.uid);
    assert_eq!(
        user.groups,
        Some(vec![
            "system:serviceaccounts".to_string(),
            "system:serviceaccounts:default".to_string(),
            "system:authenticated".to_string()
        ])
    );
    let extra = user.extra.unwrap();
    assert_eq!(extra[TOKEN_EXTRA_POD_NAME], ["agent-1"]);
    assert_eq!(extra[TOKEN_EXTRA_POD_UID], [pod_uid.as_str()]);

    let wrong_audience = review(&client, &token, &["someone-else"])
        .await
        .status
        .unwrap();
    assert_eq!(wrong_audience.authenticated, Some(false));
    assert!(wrong_audience.error.unwrap().contains("audiences"));

    let unknown = review(&client, "not-a-token", &[IDENTITY_TOKEN_AUDIENCE])
        .await
        .status
        .unwrap();
    assert_eq!(unknown.authenticated, Some(false));

    // A token bound to a deleted pod is no longer valid.
    pods.delete("agent-1", &DeleteParams::default())
        .await
        .unwrap();
    let after_delete = review(&client, &token, &[IDENTITY_TOKEN_AUDIENCE])
        .await
        .status
        .unwrap();
    assert_eq!(after_delete.authenticated, Some(false));
}

#[tokio::test]
async fn bearer_authentication_of_api_calls() {
    let server = FakeApiServer::start().await.unwrap();
    let client = server.client();
    service_account(&client, "default", "reader").await;

    let unknown: Api<Pod> = Api::namespaced(server.client_with_token("not-a-token"), "default");
    let kube::Error::Api(status) = unknown.list(&Default::default()).await.unwrap_err() else {
        panic!("expected a Status");
    };
    assert_eq!((status.code, status.reason.as_str()), (401, "Unauthorized"));

    // A token for the API audience is an API credential of its ServiceAccount ...
    let api_token = request_token(&client, "default", "reader", json!({})).await;
    let as_reader: Api<Pod> = Api::namespaced(server.client_with_token(&api_token), "default");
    assert_eq!(
        as_reader
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .len(),
        0
    );

    // ... one for another audience is not, as on a real server.
    let identity_token = request_token(
        &client,
        "default",
        "reader",
        json!({"audiences": [IDENTITY_TOKEN_AUDIENCE]}),
    )
    .await;
    let as_identity: Api<Pod> =
        Api::namespaced(server.client_with_token(&identity_token), "default");
    let kube::Error::Api(status) = as_identity.list(&Default::default()).await.unwrap_err() else {
        panic!("expected a Status");
    };
    assert_eq!(status.code, 401);

    // TokenRequest validation: too short, unknown ServiceAccount.
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
    let short: TokenRequest =
        serde_json::from_value(json!({"spec": {"audiences": [], "expirationSeconds": 60}}))
            .unwrap();
    let kube::Error::Api(status) = accounts
        .create_token_request("reader", &PostParams::default(), &short)
        .await
        .unwrap_err()
    else {
        panic!("expected a Status");
    };
    assert_eq!((status.code, status.reason.as_str()), (422, "Invalid"));
    let fine: TokenRequest = serde_json::from_value(json!({"spec": {"audiences": []}})).unwrap();
    let kube::Error::Api(status) = accounts
        .create_token_request("ghost", &PostParams::default(), &fine)
        .await
        .unwrap_err()
    else {
        panic!("expected a Status");
    };
    assert_eq!((status.code, status.reason.as_str()), (404, "NotFound"));
}

#[tokio::test]
async fn self_subject_access_review_and_deny_access() {
    let server = FakeApiServer::start().await.unwrap();
    let reviews: Api<SelfSubjectAccessReview> = Api::all(server.client());
    let ask = |verb: &str| -> SelfSubjectAccessReview {
        serde_json::from_value(json!({"spec": {"resourceAttributes": {"group": "authentication.k8s.io", "resource": "tokenreviews", "verb": verb}}}))
            .unwrap()
    };
    let allowed = reviews
        .create(&PostParams::default(), &ask("create"))
        .await
        .unwrap();
    assert!(allowed.status.unwrap().allowed);

    server.deny_access("authentication.k8s.io", "tokenreviews", "create");
    let denied = reviews
        .create(&PostParams::default(), &ask("create"))
        .await
        .unwrap()
        .status
        .unwrap();
    assert!(!denied.allowed);
    assert_eq!(denied.denied, Some(true));
    let other_verb = reviews
        .create(&PostParams::default(), &ask("list"))
        .await
        .unwrap();
    assert!(other_verb.status.unwrap().allowed);
}
