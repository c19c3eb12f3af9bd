//! The trust-roots ConfigMap against the in-process API server: read at
//! start-up, watched and hot-reloaded into a real cert store; bundles the
//! store cannot use are rejected with a log line naming the ConfigMap, and
//! the anchors in use stay.

mod kube_support;

use std::{
    io::Write,
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::{Api, api::DeleteParams};
use kube_support::{Cluster, eventually};
use sealmesh_agent::{
    certs::{CertStore, CertStoreConfig, RenewalPolicy},
    kube::{
        KubeRegistryError,
        trust_roots::{fetch_trust_roots, trust_roots_origin, watch_trust_roots},
    },
};
use sealmesh_common::identity::TrustDomain;
use sealmesh_pki::{CaSpec, generate_root};
use tokio::time::Instant;

const CONTROL_NS: &str = "sealmesh";
const ORIGIN: &str = "ConfigMap sealmesh/sealmesh-identity-trust-roots key ca-bundle.crt";

fn root_pem(name: &str) -> String {
    generate_root(&CaSpec::valid_for(name, Duration::from_secs(86_400)))
        .unwrap()
        .cert_pem
}

/// The log lines of everything running on this test's thread (the tokio
/// test runtime is single-threaded, so spawned tasks included).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    fn lines(&self) -> Vec<serde_json::Value> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    fn count(&self, message: &str) -> usize {
        self.lines()
            .iter()
            .filter(|line| line["message"] == message && line["configmap"] == ORIGIN)
            .count()
    }
}

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn store(anchors: &str) -> Arc<CertStore> {
    CertStore::with_trust_anchors_pem(
        CertStoreConfig {
            identity_addr: "127.0.0.1:9".parse().unwrap(),
            token_file: "/nonexistent/token".into(),
            trust_anchors_file: "/nonexistent/ca-bundle.crt".into(),
            trust_domain: TrustDomain::default(),
            renewal: RenewalPolicy::default(),
            cache_dir: None,
        },
        ORIGIN,
        anchors.as_bytes(),
    )
    .unwrap()
}

#[tokio::test]
async fn missing_trust_roots_fail_start_up_with_what_to_deploy() {
    let (_server, cluster) = Cluster::start().await;
    cluster.namespace(CONTROL_NS, false).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let err = fetch_trust_roots(&cluster.client, CONTROL_NS, deadline)
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "ConfigMap sealmesh/sealmesh-identity-trust-roots does not exist; the agent takes its trust anchors from it: deploy the control plane (deploy/base) first, or pass --namespace with the control namespace"
    );

    cluster.trust_roots(CONTROL_NS, "  \n").await;
    let err = fetch_trust_roots(&cluster.client, CONTROL_NS, deadline)
        .await
        .unwrap_err();
    assert!(
        matches!(err, KubeRegistryError::TrustRootsEmpty { .. }),
        "{err}"
    );
    assert_eq!(trust_roots_origin(CONTROL_NS), ORIGIN);
}

#[tokio::test]
async fn trust_roots_hot_reload_and_bad_bundles_keep_the_anchors_in_use() {
    let logs = Logs::default();
    let writer = logs.clone();
    let _logging = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_writer(move || writer.clone())
            .with_env_filter("sealmesh_agent=info")
            .finish(),
    );
    let (server, cluster) = Cluster::start().await;
    cluster.namespace(CONTROL_NS, false).await;
    let first = root_pem("root-a.test");
    cluster.trust_roots(CONTROL_NS, &first).await;

    let deadline = Instant::now() + Duration::from_secs(5);
    let fetched = fetch_trust_roots(&cluster.client, CONTROL_NS, deadline)
        .await
        .unwrap();
    assert_eq!(fetched, first);
    let certs = store(&fetched);
    let mut anchor_changes = certs.anchor_changes();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let watch = tokio::spawn(watch_trust_roots(
        cluster.client.clone(),
        CONTROL_NS.to_owned(),
        certs.clone(),
        async {
            let _ = stopped.await;
        },
    ));

    // Rotation: the new root is added next to the old one.
    let both = format!("{first}{}", root_pem("root-b.test"));
    cluster.trust_roots(CONTROL_NS, &both).await;
    eventually("the store to take the two-root bundle", || async {
        certs.trust_anchors_pem() == both
    })
    .await;
    assert!(
        anchor_changes.has_changed().unwrap(),
        "live connections are told to check their peers"
    );
    anchor_changes.mark_unchanged();

    cluster.trust_roots(CONTROL_NS, "not a certificate").await;
    eventually("the bad bundle to be rejected", || async {
        logs.count("trust roots bundle rejected; keeping the anchors in use") == 1
    })
    .await;
    assert_eq!(certs.trust_anchors_pem(), both);

    cluster.trust_roots(CONTROL_NS, "").await;
    eventually("the empty bundle to be rejected", || async {
        logs.count("trust roots ConfigMap has no bundle under its key; keeping the anchors in use (put the PEM root certificates there)") == 1
    })
    .await;
    assert_eq!(certs.trust_anchors_pem(), both);
    assert!(
        !anchor_changes.has_changed().unwrap(),
        "rejected bundles change nothing"
    );

    Api::<ConfigMap>::namespaced(cluster.client.clone(), CONTROL_NS)
        .delete("sealmesh-identity-trust-roots", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the deletion to be reported", || async {
        logs.count("trust roots ConfigMap is gone; keeping the anchors in use until it is back")
            == 1
    })
    .await;
    assert_eq!(certs.trust_anchors_pem(), both);

    // Back after the watch had to list again.
    server.compact();
    server.close_watches();
    let last = root_pem("root-c.test");
    cluster.trust_roots(CONTROL_NS, &last).await;
    eventually("the recreated ConfigMap to be loaded", || async {
        certs.trust_anchors_pem() == last
    })
    .await;
    assert_eq!(logs.count("trust anchors updated from the API"), 2);

    stop.send(()).unwrap();
    watch.await.unwrap();
}
