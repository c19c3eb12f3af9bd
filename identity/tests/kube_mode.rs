//! Kubernetes mode end to end: the real gRPC service bound in kube mode
//! against the in-process fake API server (real paths, JSON, watches),
//! called by a real tonic client with real CSRs and real
//! TokenRequest-issued ServiceAccount tokens.

mod support;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use fake_apiserver::FakeApiServer;
use k8s_openapi::{
    ByteString,
    api::{
        apps::v1::Deployment,
        authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
        core::v1::{ConfigMap, Event, Namespace, ObjectReference, Pod, Secret, ServiceAccount},
    },
};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams},
};
use rustls_pki_types::CertificateDer;
use sealmesh_common::{
    consts::{
        MESH_LABEL, MESH_LABEL_ENABLED, MESH_OPT_OUT_ANNOTATION, MESH_OPT_OUT_VALUE,
        kube::{
            AGENT_SERVICE_ACCOUNT, IDENTITY_NAME, IDENTITY_TOKEN_AUDIENCE, ISSUER_SECRET,
            TRUST_ROOTS_CONFIGMAP, TRUST_ROOTS_KEY,
        },
    },
    identity::{Identity, TrustDomain},
};
use sealmesh_identity::{
    IdentityConfig, ServeError, ServerBuilder, config::KubeSettings, kube::KubeModeError,
};
use sealmesh_pki::{CaMaterial, GeneratedCa, Issuer, Layout, TrustAnchors};
use sealmesh_proto::identity::{CertifyResponse, identity_client::IdentityClient};
use serde_json::json;
use support::*;
use time::OffsetDateTime;
use tokio::sync::oneshot;
use tonic::{Code, transport::Channel};

const CONTROL_NS: &str = "sealmesh";
const WAIT: Duration = Duration::from_secs(15);

/// A cluster on the fake API server: nodes n1 and n2, each with an agent pod
/// (`sealmesh-agent-n1`, `-n2`); in the meshed namespace `emojivoto`,
/// `web-0` (sa web) on n1 and `emoji-0` (sa emoji) on n2; the identity Deployment, the issuer
/// Secret and the trust-roots ConfigMap in `sealmesh`.
struct KubeCluster {
    api: FakeApiServer,
    client: Client,
    root: GeneratedCa,
    issuer: GeneratedCa,
    deployment_uid: String,
}

impl KubeCluster {
    async fn new() -> Self {
        Self::with_layout(Layout::Pem).await
    }

    async fn with_layout(layout: Layout) -> Self {
        let cluster = Self::without_pki().await;
        cluster.create_pki(layout).await;
        cluster
    }

    /// Everything but the issuer Secret and the trust-roots ConfigMap.
    async fn without_pki() -> Self {
        let api = FakeApiServer::start().await.unwrap();
        let client = api.client();
        let root = new_root();
        let issuer = new_issuer(&root, "issuer-1.test", 30 * DAY);
        create(
            &Api::<Namespace>::all(client.clone()),
            json!({"metadata": {"name": CONTROL_NS}}),
        )
        .await;
        create(
            &Api::<Namespace>::all(client.clone()),
            json!({"metadata": {"name": NAMESPACE, "labels": {MESH_LABEL: MESH_LABEL_ENABLED}}}),
        )
        .await;
        for (namespace, sa) in [
            (CONTROL_NS, AGENT_SERVICE_ACCOUNT),
            (CONTROL_NS, IDENTITY_NAME),
            (NAMESPACE, "web"),
            (NAMESPACE, "emoji"),
        ] {
            create(
                &Api::<ServiceAccount>::namespaced(client.clone(), namespace),
                json!({"metadata": {"name": sa}}),
            )
            .await;
        }
        let deployment: Deployment = create(
            &Api::namespaced(client.clone(), CONTROL_NS),
            json!({
                "metadata": {"name": IDENTITY_NAME, "labels": {"app": IDENTITY_NAME}},
                "spec": {
                    "selector": {"matchLabels": {"app": IDENTITY_NAME}},
                    "template": {
                        "metadata": {"labels": {"app": IDENTITY_NAME}},
                        "spec": {
                            "serviceAccountName": IDENTITY_NAME,
                            "containers": [{"name": "identity", "image": "sealmesh/identity:test"}]
                        }
                    }
                }
            }),
        )
        .await;
        let cluster = Self {
            deployment_uid: deployment.metadata.uid.unwrap(),
            api,
            client,
            root,
            issuer,
        };
        for node in ["n1", "n2"] {
            cluster
                .create_pod(
                    CONTROL_NS,
                    &format!("{AGENT_SERVICE_ACCOUNT}-{node}"),
                    AGENT_SERVICE_ACCOUNT,
                    node,
                )
                .await;
        }
        cluster.create_pod(NAMESPACE, "web-0", "web", "n1").await;
        cluster
            .create_pod(NAMESPACE, "emoji-0", "emoji", "n2")
            .await;
        cluster
    }

    async fn create_pki(&self, layout: Layout) {
        create(
            &Api::<ConfigMap>::namespaced(self.client.clone(), CONTROL_NS),
            json!({
                "metadata": {"name": TRUST_ROOTS_CONFIGMAP},
                "data": {TRUST_ROOTS_KEY: self.root.cert_pem}
            }),
        )
        .await;
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(ISSUER_SECRET.into()),
                ..Default::default()
            },
            type_: Some(secret_type(layout).into()),
            data: Some(secret_data(&self.issuer, layout)),
            ..Default::default()
        };
        self.secrets()
            .create(&PostParams::default(), &secret)
            .await
            .unwrap();
    }

    async fn create_pod(&self, namespace: &str, name: &str, sa: &str, node: &str) -> Pod {
        create(
            &Api::namespaced(self.client.clone(), namespace),
            json!({
                "metadata": {"name": name},
                "spec": {
                    "nodeName": node,
                    "serviceAccountName": sa,
                    "containers": [{"name": "main", "image": "test"}]
                }
            }),
        )
        .await
    }

    fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), CONTROL_NS)
    }

    fn pods(&self, namespace: &str) -> Api<Pod> {
        Api::namespaced(self.client.clone(), namespace)
    }

    /// A ServiceAccount token from TokenRequest, optionally bound to a pod
    /// of the same namespace (as a projected volume's token is).
    async fn token(
        &self,
        namespace: &str,
        sa: &str,
        audience: &str,
        bound_pod: Option<&str>,
    ) -> String {
        let bound_object_ref = match bound_pod {
            Some(name) => {
                let pod = self.pods(namespace).get(name).await.unwrap();
                Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: Some(name.into()),
                    uid: pod.metadata.uid,
                })
            }
            None => None,
        };
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec![audience.into()],
                bound_object_ref,
                expiration_seconds: Some(3600),
            },
            ..Default::default()
        };
        Api::<ServiceAccount>::namespaced(self.client.clone(), namespace)
            .create_token_request(sa, &PostParams::default(), &request)
            .await
            .unwrap()
            .status
            .unwrap()
            .token
    }

    /// The projected token of the agent pod on `node`.
    async fn agent_token(&self, node: &str) -> String {
        self.token(
            CONTROL_NS,
            AGENT_SERVICE_ACCOUNT,
            IDENTITY_TOKEN_AUDIENCE,
            Some(&format!("{AGENT_SERVICE_ACCOUNT}-{node}")),
        )
        .await
    }

    fn config() -> IdentityConfig {
        let mut config = IdentityConfig::kubernetes(KubeSettings::new(TrustDomain::default()));
        config.listen = "127.0.0.1:0".parse().unwrap();
        config.metrics_listen = "127.0.0.1:0".parse().unwrap();
        config
    }

    fn builder(&self) -> ServerBuilder {
        ServerBuilder::new(Self::config()).kube_client(self.client.clone())
    }

    async fn start(&self) -> KubeService {
        let server = self
            .builder()
            .bind()
            .await
            .expect("identity service starts");
        let addr = server.grpc_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        KubeService {
            addr,
            anchors: pem_certs(&self.root.cert_pem),
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Replaces the issuer Secret's content (as `kubectl apply` or
    /// cert-manager would).
    async fn put_issuer(&self, ca: &GeneratedCa, layout: Layout) {
        let mut secret = self.secrets().get(ISSUER_SECRET).await.unwrap();
        secret.data = Some(secret_data(ca, layout));
        secret.type_ = Some(secret_type(layout).into());
        self.secrets()
            .replace(ISSUER_SECRET, &PostParams::default(), &secret)
            .await
            .unwrap();
    }

    async fn put_trust_roots(&self, bundle: &str) {
        Api::<ConfigMap>::namespaced(self.client.clone(), CONTROL_NS)
            .patch(
                TRUST_ROOTS_CONFIGMAP,
                &PatchParams::default(),
                &Patch::Merge(json!({"data": {TRUST_ROOTS_KEY: bundle}})),
            )
            .await
            .unwrap();
    }

    /// Events in the control namespace with `reason`, waiting until there
    /// are `count` of them.
    async fn events(&self, reason: &str, count: usize) -> Vec<Event> {
        let events = Api::<Event>::namespaced(self.client.clone(), CONTROL_NS);
        let params = ListParams::default().fields(&format!("reason={reason}"));
        let deadline = Instant::now() + WAIT;
        loop {
            let listed = events.list(&params).await.unwrap().items;
            if listed.len() >= count {
                return listed;
            }
            assert!(
                Instant::now() < deadline,
                "expected {count} {reason} events, have {}",
                listed.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The involvedObject every issuer event must carry.
    fn deployment_ref(&self) -> ObjectReference {
        ObjectReference {
            api_version: Some("apps/v1".into()),
            kind: Some("Deployment".into()),
            name: Some(IDENTITY_NAME.into()),
            namespace: Some(CONTROL_NS.into()),
            uid: Some(self.deployment_uid.clone()),
            ..Default::default()
        }
    }
}

async fn create<K>(api: &Api<K>, object: serde_json::Value) -> K
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let object: K = serde_json::from_value(object).unwrap();
    api.create(&PostParams::default(), &object).await.unwrap()
}

fn secret_type(layout: Layout) -> &'static str {
    match layout {
        Layout::Pem => "Opaque",
        Layout::Tls => "kubernetes.io/tls",
    }
}

fn secret_data(ca: &GeneratedCa, layout: Layout) -> BTreeMap<String, ByteString> {
    let mut data = BTreeMap::from([
        (
            layout.cert_file().to_owned(),
            ByteString(ca.cert_pem.clone().into_bytes()),
        ),
        (
            layout.key_file().to_owned(),
            ByteString(ca.key_pem.clone().into_bytes()),
        ),
    ]);
    if let Some(ca_file) = layout.ca_file() {
        data.insert(
            ca_file.to_owned(),
            ByteString(ca.ca_pem.clone().into_bytes()),
        );
    }
    data
}

/// A running kube-mode identity service; stops when dropped.
struct KubeService {
    addr: SocketAddr,
    anchors: Vec<CertificateDer<'static>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), ServeError>>>,
}

impl KubeService {
    async fn client(&self) -> IdentityClient<Channel> {
        IdentityClient::new(tls_channel(self.addr, &self.anchors))
    }

    async fn certify(
        &self,
        identity: &Identity,
        token: &str,
    ) -> Result<CertifyResponse, tonic::Status> {
        self.client()
            .await
            .certify(request(identity, token, csr_for(identity)))
            .await
            .map(tonic::Response::into_inner)
    }

    /// Certifies until the leaf is signed by `issuer` (the watch delivered it).
    async fn certify_until_signed_by(
        &self,
        identity: &Identity,
        token: &str,
        issuer: &GeneratedCa,
    ) -> CertifyResponse {
        let expected = issuer_der(issuer);
        let deadline = Instant::now() + WAIT;
        loop {
            let response = self.certify(identity, token).await.unwrap();
            if response.intermediate_certificates.first() == Some(&expected) {
                return response;
            }
            assert!(Instant::now() < deadline, "the new issuer never signed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), self.task.take().unwrap())
            .await
            .expect("stops within 10s")
            .unwrap()
            .expect("serves without error");
    }
}

impl Drop for KubeService {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

fn issuer_der(ca: &GeneratedCa) -> Vec<u8> {
    pem_certs(&ca.cert_pem)[0].to_vec()
}

/// The refusal of an identity that has no meshed pod on `node`.
fn refused(node: &str, identity: &Identity) -> String {
    format!(
        "node {node} runs no meshed pod with the identity {identity}; an agent may only request identities of \
         meshed pods (namespace labelled sealmesh.io/mesh=enabled, no sealmesh.io/mesh: disabled annotation) \
         scheduled on its node"
    )
}

fn assert_status(result: Result<CertifyResponse, tonic::Status>, code: Code, message: &str) {
    let status = result.expect_err("the call is refused");
    assert_eq!((status.code(), status.message()), (code, message));
}

/// What the identity service says about `ca` offered from the issuer Secret
/// against `anchors` (so expected messages come from the validator itself).
fn issuer_from_secret(ca: &GeneratedCa, anchors_pem: &str) -> Result<Issuer, String> {
    let material = CaMaterial {
        source: format!("Secret {CONTROL_NS}/{ISSUER_SECRET}"),
        ..ca.material()
    };
    let anchors = TrustAnchors::from_pem(anchors_pem.as_bytes(), "test").unwrap();
    Issuer::from_material(&material, &anchors, OffsetDateTime::now_utc()).map_err(|e| e.to_string())
}

#[tokio::test]
async fn an_agent_gets_certificates_for_service_accounts_on_its_node() {
    let cluster = KubeCluster::new().await;
    let service = cluster.start().await;
    let web = identity("web");
    let response = service
        .certify(&web, &cluster.agent_token("n1").await)
        .await
        .unwrap();
    assert_issued_for(&response, &pem_certs(&cluster.root.cert_pem), &web);
    assert_eq!(
        response.intermediate_certificates,
        [issuer_der(&cluster.issuer)]
    );
    // One TokenReview serves a burst of calls with the same token: one
    // review per distinct token.
    let token = cluster.agent_token("n1").await;
    for _ in 0..3 {
        service.certify(&web, &token).await.unwrap();
    }
    let requests = cluster.api.requests();
    let reviews = requests
        .iter()
        .filter(|(method, path)| {
            method == "POST" && path.starts_with("/apis/authentication.k8s.io/v1/tokenreviews")
        })
        .count();
    assert_eq!(reviews, 2, "{requests:#?}");
    assert!(
        requests.iter().any(|(method, path)| method == "GET"
            && path.starts_with("/api/v1/namespaces/sealmesh/pods/sealmesh-agent-n1")),
        "{requests:?}"
    );
    service.stop().await;
}

#[tokio::test]
async fn an_agent_is_denied_service_accounts_that_run_only_on_other_nodes() {
    let cluster = KubeCluster::new().await;
    let service = cluster.start().await;
    let emoji = identity("emoji");
    assert_status(
        service
            .certify(&emoji, &cluster.agent_token("n1").await)
            .await,
        Code::PermissionDenied,
        &refused("n1", &emoji),
    );
    // The agent of n2 may.
    service
        .certify(&emoji, &cluster.agent_token("n2").await)
        .await
        .unwrap();
}

#[tokio::test]
async fn placements_follow_pods_as_they_come_go_and_finish() {
    let cluster = KubeCluster::new().await;
    let service = cluster.start().await;
    let token = cluster.agent_token("n1").await;
    let web = identity("web");

    // Once the pod watch has listed, positive answers need no API call.
    let node_lists = |requests: Vec<(String, String)>| {
        requests
            .iter()
            .filter(|(_, path)| path.contains("fieldSelector=spec.nodeName"))
            .count()
    };
    let deadline = Instant::now() + WAIT;
    loop {
        let before = node_lists(cluster.api.requests());
        service.certify(&web, &token).await.unwrap();
        if node_lists(cluster.api.requests()) == before {
            break;
        }
        assert!(Instant::now() < deadline, "the pod watch never synced");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let late = identity("late");
    cluster.create_pod(NAMESPACE, "late-0", "late", "n1").await;
    service.certify(&late, &token).await.unwrap();

    let refused = refused("n1", &late);
    cluster
        .pods(NAMESPACE)
        .patch_status(
            "late-0",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Succeeded"}})),
        )
        .await
        .unwrap();
    assert_status(
        service.certify(&late, &token).await,
        Code::PermissionDenied,
        &refused,
    );

    cluster.create_pod(NAMESPACE, "late-1", "late", "n1").await;
    service.certify(&late, &token).await.unwrap();
    for pod in ["late-0", "late-1"] {
        cluster
            .pods(NAMESPACE)
            .delete(pod, &DeleteParams::default())
            .await
            .unwrap();
    }
    assert_status(
        service.certify(&late, &token).await,
        Code::PermissionDenied,
        &refused,
    );
}

#[tokio::test]
async fn an_agent_obtains_only_identities_of_meshed_pods_on_its_node() {
    let cluster = KubeCluster::new().await;
    // n1 also runs a pod of an unmeshed namespace and one that opted out.
    create(
        &Api::<Namespace>::all(cluster.client.clone()),
        json!({"metadata": {"name": "plain"}}),
    )
    .await;
    for (namespace, sa) in [("plain", "default"), (NAMESPACE, "db")] {
        create(
            &Api::<ServiceAccount>::namespaced(cluster.client.clone(), namespace),
            json!({"metadata": {"name": sa}}),
        )
        .await;
    }
    cluster.create_pod("plain", "curl", "default", "n1").await;
    let _: Pod = create(
        &cluster.pods(NAMESPACE),
        json!({
            "metadata": {"name": "db-0", "annotations": {MESH_OPT_OUT_ANNOTATION: MESH_OPT_OUT_VALUE}},
            "spec": {
                "nodeName": "n1",
                "serviceAccountName": "db",
                "containers": [{"name": "main", "image": "test"}]
            }
        }),
    )
    .await;
    let service = cluster.start().await;
    let token = cluster.agent_token("n1").await;
    let unmeshed = TrustDomain::default().identity("plain", "default").unwrap();
    let db = identity("db");
    // Asked before and after the watches have listed: refused either way.
    for _ in 0..2 {
        for identity in [&unmeshed, &db] {
            assert_status(
                service.certify(identity, &token).await,
                Code::PermissionDenied,
                &refused("n1", identity),
            );
        }
        service.certify(&identity("web"), &token).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Labelling the namespace and dropping the opt-out mesh them.
    Api::<Namespace>::all(cluster.client.clone())
        .patch(
            "plain",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {MESH_LABEL: MESH_LABEL_ENABLED}}})),
        )
        .await
        .unwrap();
    cluster
        .pods(NAMESPACE)
        .patch(
            "db-0",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {MESH_OPT_OUT_ANNOTATION: null}}})),
        )
        .await
        .unwrap();
    service.certify(&unmeshed, &token).await.unwrap();
    service.certify(&db, &token).await.unwrap();

    // Unlabelling it again is followed by the namespace watch.
    Api::<Namespace>::all(cluster.client.clone())
        .patch(
            "plain",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {MESH_LABEL: null}}})),
        )
        .await
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while service.certify(&unmeshed, &token).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "the unlabelled namespace still gets certificates"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_status(
        service.certify(&unmeshed, &token).await,
        Code::PermissionDenied,
        &refused("n1", &unmeshed),
    );
}

#[tokio::test]
async fn an_agent_gets_the_identity_of_a_service_account_name_with_dots() {
    let cluster = KubeCluster::new().await;
    create(
        &Api::<ServiceAccount>::namespaced(cluster.client.clone(), NAMESPACE),
        json!({"metadata": {"name": "api.v2"}}),
    )
    .await;
    cluster.create_pod(NAMESPACE, "api-0", "api.v2", "n1").await;
    let service = cluster.start().await;
    let api = identity("api.v2");
    let response = service
        .certify(&api, &cluster.agent_token("n1").await)
        .await
        .unwrap();
    assert_issued_for(&response, &pem_certs(&cluster.root.cert_pem), &api);
}

#[tokio::test]
async fn an_agent_token_without_a_pod_binding_is_refused() {
    let cluster = KubeCluster::new().await;
    let service = cluster.start().await;
    let token = cluster
        .token(
            CONTROL_NS,
            AGENT_SERVICE_ACCOUNT,
            IDENTITY_TOKEN_AUDIENCE,
            None,
        )
        .await;
    assert_status(
        service.certify(&identity("web"), &token).await,
        Code::Unauthenticated,
        "the token of sealmesh/sealmesh-agent is not bound to a pod; agents must present their projected ServiceAccount token (a serviceAccountToken volume), not a Secret-based or unbound token",
    );
}

#[tokio::test]
async fn a_token_for_another_audience_is_unauthenticated() {
    let cluster = KubeCluster::new().await;
    let service = cluster.start().await;
    let token = cluster
        .token(
            CONTROL_NS,
            AGENT_SERVICE_ACCOUNT,
            "https://kubernetes.default.svc",
            Some("sealmesh-agent-n1"),
        )
        .await;
    assert_status(
        service.certify(&identity("web"), &token).await,
        Code::Unauthenticated,
        "Kubernetes TokenReview rejected the token: [invalid bearer token, token audiences don't match the requested audiences]; \
         send a ServiceAccount token projected for the audience \"identity.sealmesh.io\"",
    );
    // A flood of one bogus token costs one TokenReview, not one per call:
    // refusals are remembered briefly, with the same answer.
    for _ in 0..20 {
        assert_status(
            service.certify(&identity("web"), "not-a-token").await,
            Code::Unauthenticated,
            "Kubernetes TokenReview rejected the token: [invalid bearer token, token lookup failed]; \
             send a ServiceAccount token projected for the audience \"identity.sealmesh.io\"",
        );
    }
    let reviews = cluster
        .api
        .requests()
        .iter()
        .filter(|(method, path)| {
            method == "POST" && path.starts_with("/apis/authentication.k8s.io/v1/tokenreviews")
        })
        .count();
    assert_eq!(reviews, 2, "one review per distinct token");
}

#[tokio::test]
async fn an_agent_token_of_a_deleted_or_unscheduled_pod_is_refused() {
    let cluster = KubeCluster::new().await;
    let service = cluster.start().await;
    let token = cluster.agent_token("n1").await;
    cluster
        .pods(CONTROL_NS)
        .delete("sealmesh-agent-n1", &DeleteParams::default())
        .await
        .unwrap();
    let status = service
        .certify(&identity("web"), &token)
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(
        status
            .message()
            .starts_with("Kubernetes TokenReview rejected the token: "),
        "{status:?}"
    );

    // A finished agent pod speaks for its node no more.
    let token = cluster.agent_token("n2").await;
    cluster
        .pods(CONTROL_NS)
        .patch_status(
            "sealmesh-agent-n2",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Failed"}})),
        )
        .await
        .unwrap();
    assert_status(
        service.certify(&identity("emoji"), &token).await,
        Code::Unauthenticated,
        "the agent token is bound to pod sealmesh/sealmesh-agent-n2, which has terminated (phase Failed); \
         agents must present the current projected token of their own running pod",
    );

    // A pod no scheduler has placed yet has no node to speak for.
    create::<Pod>(
        &cluster.pods(CONTROL_NS),
        json!({
            "metadata": {"name": "sealmesh-agent-pending"},
            "spec": {
                "serviceAccountName": AGENT_SERVICE_ACCOUNT,
                "containers": [{"name": "agent", "image": "test"}]
            }
        }),
    )
    .await;
    let token = cluster
        .token(
            CONTROL_NS,
            AGENT_SERVICE_ACCOUNT,
            IDENTITY_TOKEN_AUDIENCE,
            Some("sealmesh-agent-pending"),
        )
        .await;
    assert_status(
        service.certify(&identity("web"), &token).await,
        Code::Unauthenticated,
        "the agent token is bound to pod sealmesh/sealmesh-agent-pending, which is not scheduled to a node \
         (no spec.nodeName); agents must present the current projected token of their own running pod",
    );
}

#[tokio::test]
async fn a_workload_gets_only_its_own_identity() {
    let cluster = KubeCluster::new().await;
    let service = cluster.start().await;
    let token = cluster
        .token(NAMESPACE, "web", IDENTITY_TOKEN_AUDIENCE, Some("web-0"))
        .await;
    let web = identity("web");
    let response = service.certify(&web, &token).await.unwrap();
    assert_issued_for(&response, &pem_certs(&cluster.root.cert_pem), &web);
    let emoji = identity("emoji");
    assert_status(
        service.certify(&emoji, &token).await,
        Code::PermissionDenied,
        &format!(
            "workload {web} may not request {emoji}; a workload may only request its own identity"
        ),
    );
    // A user that is not a ServiceAccount gets nothing.
    assert_status(
        service.certify(&web, &cluster.api.admin_token()).await,
        Code::PermissionDenied,
        &format!(
            "{} is not a ServiceAccount; only ServiceAccount tokens (agents' or workloads') may request certificates",
            admin_username(&cluster).await
        ),
    );
}

/// The fake API server's admin user name, as TokenReview reports it.
async fn admin_username(cluster: &KubeCluster) -> String {
    use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(cluster.api.admin_token()),
            audiences: Some(vec![IDENTITY_TOKEN_AUDIENCE.into()]),
        },
        ..Default::default()
    };
    Api::<TokenReview>::all(cluster.client.clone())
        .create(&PostParams::default(), &review)
        .await
        .unwrap()
        .status
        .unwrap()
        .user
        .unwrap()
        .username
        .unwrap()
}

#[tokio::test]
async fn a_valid_new_issuer_in_the_secret_signs_and_is_recorded_as_an_event() {
    let cluster = KubeCluster::new().await;
    let service = cluster.start().await;
    let web = identity("web");
    let token = cluster.agent_token("n1").await;
    service.certify(&web, &token).await.unwrap();

    let next = new_issuer(&cluster.root, "issuer-2.test", 30 * DAY);
    cluster.put_issuer(&next, Layout::Pem).await;
    let response = service.certify_until_signed_by(&web, &token, &next).await;
    assert_issued_for(&response, &pem_certs(&cluster.root.cert_pem), &web);

    let events = cluster.events("IssuerUpdated", 1).await;
    assert_eq!(events.len(), 1, "{events:?}");
    let event = &events[0];
    let info = issuer_from_secret(&next, &cluster.root.cert_pem)
        .unwrap()
        .info()
        .clone();
    assert_eq!(event.involved_object, cluster.deployment_ref());
    assert_eq!(event.type_.as_deref(), Some("Normal"));
    assert_eq!(
        event.message.as_deref(),
        Some(
            format!(
                "Updated identity issuer: {} (serial {}, valid until {})",
                info.subject, info.serial, info.not_after
            )
            .as_str()
        )
    );
    assert_eq!(
        event.source.as_ref().and_then(|s| s.component.as_deref()),
        Some(IDENTITY_NAME)
    );
    assert_eq!(event.reporting_component.as_deref(), Some(IDENTITY_NAME));
    // An Event with eventTime must name its action and reporting instance.
    assert_eq!(event.action.as_deref(), Some("UpdateIssuer"));
    assert_eq!(
        event.reporting_instance,
        Some(nix::unistd::gethostname().unwrap().into_string().unwrap())
    );
    assert_eq!(event.count, Some(1));
    assert!(event.first_timestamp.is_some() && event.last_timestamp.is_some());
    assert!(event.event_time.is_some());
    let name = event.metadata.name.as_deref().unwrap();
    let suffix = name.strip_prefix("sealmesh-identity.").unwrap();
    assert!(
        suffix.len() == 16 && suffix.bytes().all(|b| b.is_ascii_hexdigit()),
        "{name}"
    );
    assert!(cluster.events("IssuerUpdateSkipped", 0).await.is_empty());
    service.stop().await;
}

#[tokio::test]
async fn an_invalid_issuer_in_the_secret_is_skipped_with_a_warning_event() {
    let cluster = KubeCluster::new().await;
    let service = cluster.start().await;
    let web = identity("web");
    let token = cluster.agent_token("n1").await;

    // Signed by a root that is not a trust anchor.
    let stranger = new_issuer(&new_root(), "stranger.test", 30 * DAY);
    let reason = issuer_from_secret(&stranger, &cluster.root.cert_pem).unwrap_err();
    cluster.put_issuer(&stranger, Layout::Pem).await;
    let events = cluster.events("IssuerUpdateSkipped", 1).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].involved_object, cluster.deployment_ref());
    assert_eq!(events[0].type_.as_deref(), Some("Warning"));
    assert_eq!(events[0].message.as_deref(), Some(reason.as_str()));
    assert!(
        reason.contains("does not chain to any trust anchor"),
        "{reason}"
    );
    let response = service.certify(&web, &token).await.unwrap();
    assert_eq!(
        response.intermediate_certificates,
        [issuer_der(&cluster.issuer)]
    );

    // Not a CA: a leaf-like certificate with its key, signed by the root.
    let not_ca = leaf_signed_by(&cluster.root);
    let reason = issuer_from_secret(&not_ca, &cluster.root.cert_pem).unwrap_err();
    assert!(reason.contains("is not a CA"), "{reason}");
    cluster.put_issuer(&not_ca, Layout::Pem).await;
    let events = cluster.events("IssuerUpdateSkipped", 2).await;
    let messages: Vec<_> = events.iter().filter_map(|e| e.message.clone()).collect();
    assert!(messages.contains(&reason), "{messages:?}");
    let response = service.certify(&web, &token).await.unwrap();
    assert_eq!(
        response.intermediate_certificates,
        [issuer_der(&cluster.issuer)]
    );
    assert!(cluster.events("IssuerUpdated", 0).await.is_empty());
}

/// A non-CA certificate (and its key) signed by `root`.
fn leaf_signed_by(root: &GeneratedCa) -> GeneratedCa {
    let root_key = rcgen::KeyPair::from_pem(&root.key_pem).unwrap();
    let root_issuer = rcgen::Issuer::from_ca_cert_pem(&root.cert_pem, root_key).unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["leaf.test".into()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "leaf.test");
    let cert = params.signed_by(&key, &root_issuer).unwrap();
    GeneratedCa {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        ca_pem: root.cert_pem.clone(),
    }
}

#[tokio::test]
async fn the_cert_manager_secret_layout_is_read_and_followed() {
    let cluster = KubeCluster::with_layout(Layout::Tls).await;
    let service = cluster.start().await;
    let web = identity("web");
    let token = cluster.agent_token("n1").await;
    let response = service.certify(&web, &token).await.unwrap();
    assert_eq!(
        response.intermediate_certificates,
        [issuer_der(&cluster.issuer)]
    );
    let renewed = new_issuer(&cluster.root, "issuer-renewed.test", 2 * DAY);
    cluster.put_issuer(&renewed, Layout::Tls).await;
    let response = service
        .certify_until_signed_by(&web, &token, &renewed)
        .await;
    assert_issued_for(&response, &pem_certs(&cluster.root.cert_pem), &web);
    assert_eq!(cluster.events("IssuerUpdated", 1).await.len(), 1);
}

#[tokio::test]
async fn a_secret_update_after_an_interrupted_and_expired_watch_is_seen() {
    let cluster = KubeCluster::new().await;
    let service = cluster.start().await;
    let web = identity("web");
    let token = cluster.agent_token("n1").await;
    service.certify(&web, &token).await.unwrap();
    // Give the watches time to be established before cutting them.
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Some unrelated history, then forget it and cut every watch: the
    // resumed watch gets 410 Gone and must re-list.
    cluster.create_pod(NAMESPACE, "filler-0", "web", "n2").await;
    cluster.api.compact();
    cluster.api.close_watches();
    let next = new_issuer(&cluster.root, "issuer-after-410.test", 30 * DAY);
    cluster.put_issuer(&next, Layout::Pem).await;
    service.certify_until_signed_by(&web, &token, &next).await;
    assert_eq!(cluster.events("IssuerUpdated", 1).await.len(), 1);

    // It was seen through a re-list after 410 Gone: two lists in all.
    let secret_lists = cluster
        .api
        .requests()
        .iter()
        .filter(|(method, path)| {
            method == "GET"
                && path.starts_with("/api/v1/namespaces/sealmesh/secrets?")
                && path.contains("fieldSelector=metadata.name%3Dsealmesh-identity-issuer")
                && !path.contains("watch=true")
        })
        .count();
    assert_eq!(secret_lists, 2);
    // The pod watch recovered too: a pod created now is seen.
    cluster
        .create_pod(NAMESPACE, "after-0", "after", "n1")
        .await;
    service.certify(&identity("after"), &token).await.unwrap();
    service.stop().await;
}

#[tokio::test]
async fn a_new_root_in_the_trust_roots_lets_an_issuer_it_signed_take_over() {
    let cluster = KubeCluster::new().await;
    let mut service = cluster.start().await;
    let web = identity("web");
    let token = cluster.agent_token("n1").await;
    let new_root = new_root();
    let next = new_issuer(&new_root, "issuer-new-root.test", 30 * DAY);

    // The issuer arrives before its root: skipped ...
    cluster.put_issuer(&next, Layout::Pem).await;
    assert_eq!(cluster.events("IssuerUpdateSkipped", 1).await.len(), 1);
    // ... a bad bundle is refused and the old anchors kept ...
    cluster.put_trust_roots("not a certificate").await;
    // ... then the bundle gains the new root: the same Secret is judged again.
    cluster
        .put_trust_roots(&format!("{}{}", cluster.root.cert_pem, new_root.cert_pem))
        .await;
    // Clients follow the bundle too (agents watch the same ConfigMap): the
    // service's own certificate comes from the new issuer as well.
    service.anchors.extend(pem_certs(&new_root.cert_pem));
    let response = service.certify_until_signed_by(&web, &token, &next).await;
    assert_issued_for(&response, &pem_certs(&new_root.cert_pem), &web);
    assert_eq!(cluster.events("IssuerUpdated", 1).await.len(), 1);
}

#[tokio::test]
async fn start_up_fails_when_token_reviews_are_not_allowed() {
    let cluster = KubeCluster::new().await;
    cluster
        .api
        .deny_access("authentication.k8s.io", "tokenreviews", "create");
    let error = cluster.builder().bind().await.unwrap_err();
    assert!(
        matches!(
            error,
            ServeError::Kube(KubeModeError::TokenReviewDenied { .. })
        ),
        "{error}"
    );
    assert_eq!(
        error.to_string(),
        "the identity service may not create tokenreviews.authentication.k8s.io \
         (denied by the test (deny_access (\"authentication.k8s.io\", \"tokenreviews\", \"create\"))), \
         so it cannot authenticate any caller; apply deploy/base/identity-rbac.yaml (its ClusterRole grants `create` \
         on tokenreviews and its ClusterRoleBinding binds it to the ServiceAccount sealmesh/sealmesh-identity), \
         or bind an equivalent role to the ServiceAccount this service runs as"
    );
}

#[tokio::test]
async fn start_up_fails_without_the_issuer_secret_or_trust_roots_and_says_how_to_create_them() {
    let cluster = KubeCluster::without_pki().await;
    let error = cluster.builder().bind().await.unwrap_err();
    assert_eq!(
        error.to_string(),
        "ConfigMap sealmesh/sealmesh-identity-trust-roots does not exist, so there are no trust anchors; \
         create it from the root: `kubectl -n sealmesh create configmap sealmesh-identity-trust-roots \
         --from-file=ca-bundle.crt=root/crt.pem`"
    );
    create(
        &Api::<ConfigMap>::namespaced(cluster.client.clone(), CONTROL_NS),
        json!({
            "metadata": {"name": TRUST_ROOTS_CONFIGMAP},
            "data": {TRUST_ROOTS_KEY: cluster.root.cert_pem}
        }),
    )
    .await;
    let error = cluster.builder().bind().await.unwrap_err();
    assert_eq!(
        error.to_string(),
        "Secret sealmesh/sealmesh-identity-issuer does not exist, so there is no issuer to sign with; create one: \
         `sealmesh certs create-root --out root && sealmesh certs create-issuer --root root --out issuer && \
         kubectl -n sealmesh create secret generic sealmesh-identity-issuer --from-file=issuer/crt.pem \
         --from-file=issuer/key.pem` (or deploy the cert-manager overlay, which maintains it)"
    );
}

#[tokio::test]
async fn start_up_fails_on_an_unusable_issuer_secret_and_names_it() {
    let cluster = KubeCluster::new().await;
    let mut secret = cluster.secrets().get(ISSUER_SECRET).await.unwrap();
    secret.data = Some(BTreeMap::from([(
        "issuer.pem".to_owned(),
        ByteString(cluster.issuer.cert_pem.clone().into_bytes()),
    )]));
    cluster
        .secrets()
        .replace(ISSUER_SECRET, &PostParams::default(), &secret)
        .await
        .unwrap();
    let error = cluster.builder().bind().await.unwrap_err();
    assert_eq!(
        error.to_string(),
        "Secret sealmesh/sealmesh-identity-issuer holds no issuer: expected the keys crt.pem + key.pem, \
         or tls.crt + tls.key (+ ca.crt); it has [\"issuer.pem\"]"
    );

    // A certificate that is not a CA is refused by the same validation as
    // local mode, naming the Secret.
    let not_ca = leaf_signed_by(&cluster.root);
    cluster.put_issuer(&not_ca, Layout::Pem).await;
    let error = cluster.builder().bind().await.unwrap_err();
    assert_eq!(
        error.to_string(),
        format!(
            "issuer from Secret sealmesh/sealmesh-identity-issuer: {}; refusing to start without a valid issuer",
            issuer_from_secret(&not_ca, &cluster.root.cert_pem).unwrap_err()
        )
    );
}

/// Kills the child if the test fails before it is stopped.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn identity_binary() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sealmesh-identity"));
    for env in [
        sealmesh_common::logging::LOG_LEVEL_ENV,
        "SEALMESH_MODE",
        "SEALMESH_CLUSTER_FILE",
        "SEALMESH_TRUST_ANCHORS",
        "SEALMESH_ISSUER_DIR",
        "SEALMESH_NAMESPACE",
        "SEALMESH_TRUST_DOMAIN",
    ] {
        command.env_remove(env);
    }
    command
}

#[tokio::test]
async fn the_binary_serves_in_kubernetes_mode_from_kubeconfig() {
    let cluster = KubeCluster::new().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    cluster
        .api
        .write_kubeconfig(&kubeconfig, &cluster.api.admin_token())
        .unwrap();
    let port = free_port();
    let metrics_port = free_port();
    let _child = ChildGuard(
        identity_binary()
            .env("KUBECONFIG", &kubeconfig)
            .env("SEALMESH_MODE", "kubernetes")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let metrics_addr: SocketAddr = format!("127.0.0.1:{metrics_port}").parse().unwrap();
    let deadline = Instant::now() + WAIT;
    while tokio::net::TcpStream::connect(metrics_addr).await.is_err() {
        assert!(Instant::now() < deadline, "the service never came up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let web = identity("web");
    let response = IdentityClient::new(tls_channel(
        format!("127.0.0.1:{port}").parse().unwrap(),
        &pem_certs(&cluster.root.cert_pem),
    ))
    .certify(request(
        &web,
        &cluster.agent_token("n1").await,
        csr_for(&web),
    ))
    .await
    .unwrap()
    .into_inner();
    assert_issued_for(&response, &pem_certs(&cluster.root.cert_pem), &web);
}

#[test]
fn the_binary_refuses_local_flags_in_kubernetes_mode() {
    let output = identity_binary()
        .args(["--mode", "kubernetes", "--issuer-dir", "/etc/issuer"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains("--issuer-dir is a local-mode flag; remove it, or run with --mode local"),
        "{stderr}"
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
