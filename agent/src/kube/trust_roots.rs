//! The trust-anchor bundle from the ConfigMap `sealmesh-identity-trust-roots`
//! (key `ca-bundle.crt`) of the control namespace: read at start-up, then
//! watched and hot-reloaded into the cert store. A bundle the store rejects
//! (empty, not PEM, no certificate) is logged with the ConfigMap's name and
//! the anchors in use stay.

use std::{future::Future, sync::Arc};

use futures::StreamExt;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, watcher},
};
use sealmesh_common::consts::kube::{TRUST_ROOTS_CONFIGMAP, TRUST_ROOTS_KEY};
use tokio::time::Instant;

use super::{KubeRegistryError, objects::ConfigMapView, retry_until};
use crate::certs::CertStore;

/// How the bundle is named in logs and errors:
/// `ConfigMap <ns>/sealmesh-identity-trust-roots key ca-bundle.crt`.
pub fn trust_roots_origin(namespace: &str) -> String {
    format!("ConfigMap {namespace}/{TRUST_ROOTS_CONFIGMAP} key {TRUST_ROOTS_KEY}")
}

/// The bundle a ConfigMap holds under the trust-roots key, if non-empty.
fn bundle_of(config_map: &ConfigMapView) -> Option<&str> {
    config_map
        .data
        .as_ref()?
        .get(TRUST_ROOTS_KEY)
        .map(String::as_str)
        .filter(|pem| !pem.trim().is_empty())
}

/// Reads the bundle at start-up. A missing ConfigMap or key is an error
/// (the agent cannot verify any peer without anchors); transient API
/// failures are retried until `deadline`.
pub async fn fetch_trust_roots(
    client: &Client,
    namespace: &str,
    deadline: Instant,
) -> Result<String, KubeRegistryError> {
    let api: Api<ConfigMapView> = Api::namespaced(client.clone(), namespace);
    let doing = format!("reading ConfigMap {namespace}/{TRUST_ROOTS_CONFIGMAP}");
    let config_map = retry_until(deadline, &doing, || async {
        api.get_opt(TRUST_ROOTS_CONFIGMAP)
            .await
            .map_err(|error| KubeRegistryError::from_api(doing.clone(), error))
    })
    .await?
    .ok_or_else(|| KubeRegistryError::TrustRootsMissing {
        namespace: namespace.to_owned(),
        name: TRUST_ROOTS_CONFIGMAP.to_owned(),
    })?;
    bundle_of(&config_map)
        .map(str::to_owned)
        .ok_or_else(|| KubeRegistryError::TrustRootsEmpty {
            origin: trust_roots_origin(namespace),
        })
}

/// Watches the ConfigMap and hands every new bundle to `certs`, until
/// `shutdown` resolves. Watch failures are retried with backoff (and
/// `410 Gone` re-lists); meanwhile the anchors in use stay.
pub async fn watch_trust_roots(
    client: Client,
    namespace: String,
    certs: Arc<CertStore>,
    shutdown: impl Future<Output = ()>,
) {
    let api: Api<ConfigMapView> = Api::namespaced(client, &namespace);
    let origin = trust_roots_origin(&namespace);
    let config =
        watcher::Config::default().fields(&format!("metadata.name={TRUST_ROOTS_CONFIGMAP}"));
    let events = watcher(api, config).default_backoff();
    let mut events = std::pin::pin!(events);
    let mut shutdown = std::pin::pin!(shutdown);
    // Whether the ConfigMap was seen during the current (re-)list.
    let mut listed = false;
    loop {
        let event = tokio::select! {
            () = &mut shutdown => return,
            event = events.next() => match event {
                Some(event) => event,
                None => return,
            },
        };
        match event {
            Ok(watcher::Event::Init) => listed = false,
            Ok(watcher::Event::InitApply(config_map)) => {
                listed = true;
                apply(&certs, &origin, &config_map);
            }
            Ok(watcher::Event::Apply(config_map)) => apply(&certs, &origin, &config_map),
            Ok(watcher::Event::InitDone) if !listed => missing(&origin),
            Ok(watcher::Event::InitDone) => {}
            Ok(watcher::Event::Delete(_)) => missing(&origin),
            Err(error) => tracing::warn!(%error, configmap = %origin,
                "watching the trust roots failed; retrying with backoff (the anchors in use stay)"),
        }
    }
}

fn apply(certs: &CertStore, origin: &str, config_map: &ConfigMapView) {
    let Some(pem) = bundle_of(config_map) else {
        tracing::error!(configmap = %origin,
            "trust roots ConfigMap has no bundle under its key; keeping the anchors in use (put the PEM root certificates there)");
        return;
    };
    match certs.reload_trust_anchors_pem(pem.as_bytes()) {
        Ok(true) => tracing::info!(configmap = %origin, "trust anchors updated from the API"),
        Ok(false) => {}
        Err(error) => tracing::error!(configmap = %origin, %error,
            "trust roots bundle rejected; keeping the anchors in use"),
    }
}

fn missing(origin: &str) {
    tracing::error!(configmap = %origin,
        "trust roots ConfigMap is gone; keeping the anchors in use until it is back");
}
