//! The issuer from the Secret `sealmesh-identity-issuer` and the trust
//! anchors from the ConfigMap `sealmesh-identity-trust-roots`, read at start
//! and then followed through API watches (re-listed after `410 Gone`, backed
//! off on errors), not through mounted files.
//!
//! A changed Secret is offered to the [`IssuerStore`], which validates it
//! and reports `IssuerUpdated` / `IssuerUpdateSkipped`. A changed anchor
//! bundle replaces the anchors when it parses (the old bundle stays
//! otherwise), and the latest Secret is offered again: an issuer signed by a
//! newly added root validates from then on.

use std::{collections::BTreeMap, sync::Arc};

use futures::StreamExt as _;
use k8s_openapi::{
    ByteString,
    api::core::v1::{ConfigMap, Secret},
};
use kube::{
    Api, Client, Resource,
    runtime::{WatchStreamExt as _, watcher},
};
use sealmesh_common::consts::kube::{ISSUER_SECRET, TRUST_ROOTS_CONFIGMAP, TRUST_ROOTS_KEY};

use super::KubeModeError;
use crate::rotation::{IssuerStore, Offer};
use sealmesh_pki::{
    CaMaterial, PEM_CERT_FILE, PEM_KEY_FILE, TLS_CA_FILE, TLS_CERT_FILE, TLS_KEY_FILE, TrustAnchors,
};

/// The issuer Secret and trust-roots ConfigMap of the control namespace.
#[derive(Clone)]
pub struct PkiObjects {
    secrets: Api<Secret>,
    config_maps: Api<ConfigMap>,
    namespace: String,
}

impl std::fmt::Debug for PkiObjects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PkiObjects")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

/// The anchors as parsed, with the bundle they came from (to notice changes).
#[derive(Clone, Debug)]
pub struct AnchorBundle {
    pub pem: Vec<u8>,
    pub anchors: TrustAnchors,
}

impl PkiObjects {
    pub fn new(client: Client, namespace: &str) -> Self {
        Self {
            secrets: Api::namespaced(client.clone(), namespace),
            config_maps: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
        }
    }

    /// The trust anchors now; a missing ConfigMap is an error saying how to create it.
    pub async fn trust_anchors(&self) -> Result<AnchorBundle, KubeModeError> {
        let config_map = self
            .config_maps
            .get_opt(TRUST_ROOTS_CONFIGMAP)
            .await
            .map_err(|source| KubeModeError::Api {
                action: format!("read ConfigMap {}/{TRUST_ROOTS_CONFIGMAP}", self.namespace),
                source,
            })?
            .ok_or_else(|| KubeModeError::TrustRootsMissing {
                namespace: self.namespace.clone(),
            })?;
        anchors_of(&config_map, &self.namespace)
    }

    /// The issuer now; a missing Secret is an error saying how to create it.
    pub async fn issuer(&self) -> Result<CaMaterial, KubeModeError> {
        let secret = self
            .secrets
            .get_opt(ISSUER_SECRET)
            .await
            .map_err(|source| KubeModeError::Api {
                action: format!("read Secret {}/{ISSUER_SECRET}", self.namespace),
                source,
            })?
            .ok_or_else(|| KubeModeError::IssuerSecretMissing {
                namespace: self.namespace.clone(),
            })?;
        material_of(&secret, &self.namespace)
    }

    /// Follows both objects, feeding `store`, until `shutdown` resolves.
    /// `anchors` is the bundle `store` holds now.
    pub async fn watch(
        self,
        store: Arc<IssuerStore>,
        anchors: AnchorBundle,
        shutdown: impl Future<Output = ()>,
    ) {
        let by_name =
            |name: &str| watcher::Config::default().fields(&format!("metadata.name={name}"));
        let secrets = watcher(self.secrets.clone(), by_name(ISSUER_SECRET)).default_backoff();
        let config_maps =
            watcher(self.config_maps.clone(), by_name(TRUST_ROOTS_CONFIGMAP)).default_backoff();
        tokio::pin!(secrets, config_maps, shutdown);
        let mut follower = Follower {
            namespace: self.namespace,
            store,
            anchors_pem: anchors.pem,
            secret: None,
            secret_listed: false,
            config_map_listed: false,
            last_secret_error: None,
        };
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                event = secrets.next() => match event {
                    Some(Ok(event)) => follower.secret_event(event),
                    Some(Err(e)) => tracing::warn!(error = %e, secret = ISSUER_SECRET, "issuer Secret watch failed; retrying with backoff"),
                    None => return,
                },
                event = config_maps.next() => match event {
                    Some(Ok(event)) => follower.config_map_event(event),
                    Some(Err(e)) => tracing::warn!(error = %e, config_map = TRUST_ROOTS_CONFIGMAP, "trust-roots ConfigMap watch failed; retrying with backoff"),
                    None => return,
                },
            }
        }
    }
}

/// State of the two watches.
struct Follower {
    namespace: String,
    store: Arc<IssuerStore>,
    /// The bundle the store's anchors were parsed from.
    anchors_pem: Vec<u8>,
    /// The Secret's latest readable content, offered again after an anchor change.
    secret: Option<CaMaterial>,
    /// Whether the (re)list in progress has shown the object.
    secret_listed: bool,
    config_map_listed: bool,
    /// The last reason the Secret could not be used, reported once.
    last_secret_error: Option<String>,
}

impl Follower {
    fn secret_event(&mut self, event: watcher::Event<Secret>) {
        match event {
            watcher::Event::Init => self.secret_listed = false,
            watcher::Event::InitApply(secret) | watcher::Event::Apply(secret) => {
                self.secret_listed = true;
                self.secret_changed(&secret);
            }
            watcher::Event::InitDone if self.secret_listed => {}
            watcher::Event::InitDone | watcher::Event::Delete(_) => self.secret_gone(),
        }
    }

    fn secret_changed(&mut self, secret: &Secret) {
        match material_of(secret, &self.namespace) {
            Ok(material) => {
                self.last_secret_error = None;
                self.offer(&material);
                self.secret = Some(material);
            }
            Err(e) => self
                .store
                .unreadable(e.to_string(), &mut self.last_secret_error),
        }
    }

    fn offer(&self, material: &CaMaterial) {
        let offer = self.store.offer(material);
        if offer != Offer::Unchanged {
            tracing::debug!(?offer, secret = ISSUER_SECRET, "issuer Secret changed");
        }
    }

    fn secret_gone(&mut self) {
        self.secret = None;
        let current = self.store.current();
        let reason = format!(
            "Secret {}/{ISSUER_SECRET} was deleted; the current issuer {:?} keeps signing until it expires at {}; recreate the Secret",
            self.namespace,
            current.info().subject,
            current.info().not_after
        );
        self.store.unreadable(reason, &mut self.last_secret_error);
    }

    fn config_map_event(&mut self, event: watcher::Event<ConfigMap>) {
        match event {
            watcher::Event::Init => self.config_map_listed = false,
            watcher::Event::InitApply(config_map) | watcher::Event::Apply(config_map) => {
                self.config_map_listed = true;
                self.config_map_changed(&config_map);
            }
            watcher::Event::InitDone if self.config_map_listed => {}
            watcher::Event::InitDone | watcher::Event::Delete(_) => tracing::warn!(
                namespace = self.namespace,
                config_map = TRUST_ROOTS_CONFIGMAP,
                "the trust-roots ConfigMap was deleted; keeping the current trust anchors; recreate it"
            ),
        }
    }

    fn config_map_changed(&mut self, config_map: &ConfigMap) {
        let bundle = match anchors_of(config_map, &self.namespace) {
            Ok(bundle) => bundle,
            Err(e) => {
                tracing::warn!(error = %e, "refusing the changed trust-anchor bundle; keeping the current anchors");
                return;
            }
        };
        if bundle.pem == self.anchors_pem {
            return;
        }
        tracing::info!(
            anchors = ?bundle.anchors.infos().iter().map(|a| a.subject.as_str()).collect::<Vec<_>>(),
            "trust anchors updated"
        );
        self.store.replace_anchors(bundle.anchors);
        self.anchors_pem = bundle.pem;
        if let Some(material) = &self.secret {
            self.offer(material);
        }
    }
}

fn object_name<K: Resource<DynamicType = ()>>(namespace: &str, name: &str) -> String {
    format!("{} {namespace}/{name}", K::kind(&()))
}

/// A trust-anchor bundle from the ConfigMap's `ca-bundle.crt` (`data` or `binaryData`).
fn anchors_of(config_map: &ConfigMap, namespace: &str) -> Result<AnchorBundle, KubeModeError> {
    let object = object_name::<ConfigMap>(namespace, TRUST_ROOTS_CONFIGMAP);
    let pem = config_map
        .data
        .as_ref()
        .and_then(|data| data.get(TRUST_ROOTS_KEY))
        .map(|text| text.as_bytes().to_vec())
        .or_else(|| {
            config_map
                .binary_data
                .as_ref()
                .and_then(|data| data.get(TRUST_ROOTS_KEY))
                .map(|bytes| bytes.0.clone())
        })
        .ok_or_else(|| KubeModeError::MissingKey {
            object: object.clone(),
            key: TRUST_ROOTS_KEY,
        })?;
    let anchors =
        TrustAnchors::from_pem(&pem, &object).map_err(|source| KubeModeError::Content {
            object,
            source: source.into(),
        })?;
    Ok(AnchorBundle { pem, anchors })
}

/// The issuer from a Secret in either layout: `crt.pem` + `key.pem`, or
/// cert-manager's `tls.crt` + `tls.key` (+ `ca.crt`).
fn material_of(secret: &Secret, namespace: &str) -> Result<CaMaterial, KubeModeError> {
    let object = object_name::<Secret>(namespace, ISSUER_SECRET);
    let empty = BTreeMap::new();
    let data: &BTreeMap<String, ByteString> = secret.data.as_ref().unwrap_or(&empty);
    let get = |key: &str| data.get(key).map(|value| value.0.clone());
    let (cert_file, key_file, ca_file) = match (
        data.contains_key(PEM_CERT_FILE),
        data.contains_key(TLS_CERT_FILE),
    ) {
        (true, false) => (PEM_CERT_FILE, PEM_KEY_FILE, None),
        (false, true) => (TLS_CERT_FILE, TLS_KEY_FILE, Some(TLS_CA_FILE)),
        (true, true) => return Err(KubeModeError::AmbiguousIssuer { object }),
        (false, false) => {
            return Err(KubeModeError::NoIssuer {
                object,
                keys: data.keys().cloned().collect(),
            });
        }
    };
    let key_pem = get(key_file).ok_or_else(|| KubeModeError::MissingKey {
        object: object.clone(),
        key: key_file,
    })?;
    Ok(CaMaterial {
        cert_pem: get(cert_file).unwrap_or_default(),
        key_pem,
        // cert-manager leaves ca.crt empty when the signer's CA is unknown.
        ca_pem: ca_file.and_then(get).filter(|ca| !ca.is_empty()),
        source: object,
    })
}
