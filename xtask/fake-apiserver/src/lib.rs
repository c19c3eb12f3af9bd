//! An in-process Kubernetes API server for tests and the local testbed.
//!
//! sealmesh's tests and testbed run without a kube-apiserver (which needs
//! etcd and a cluster's binaries), yet the agents, the identity service and
//! the testbed must run against the real API's paths, JSON shapes and
//! list/watch semantics, and work unchanged against a real kube-apiserver
//! (v1.28+). This crate serves that API over plain HTTP/1.1 on 127.0.0.1,
//! for kube-rs and `kubectl` alike.
//!
//! Modelled as the real server does it:
//! - paths of core/v1 (namespaces, nodes, pods, services, serviceaccounts,
//!   secrets, configmaps, events), events.k8s.io/v1, discovery.k8s.io/v1
//!   endpointslices, apps/v1 deployments and daemonsets,
//!   rbac.authorization.k8s.io/v1, apiextensions.k8s.io/v1
//!   customresourcedefinitions, namespaced and all-namespaces lists, and
//!   `/version`, `/api`, `/apis` discovery (see `resources::RESOURCES`);
//! - CustomResourceDefinitions: creating one (checked for the fields the
//!   real server requires: name `<plural>.<group>`, scope, one storage
//!   version) serves each of its served versions at once (discovery, CRUD,
//!   list/watch, `/status` when `subresources.status` is set, the CRD's
//!   scope) and sets its status (`NamesAccepted` and `Established` True,
//!   which the real server's controllers set moments later); until then,
//!   and after the CRD is deleted, requests for its resources get the real
//!   server's 404. Deleting a CRD deletes its objects (DELETED events), then
//!   ends the watches on them. Objects get the `default`s of their
//!   version's `openAPIV3Schema`; they are not validated against it (no
//!   schema, CEL or pruning of unknown fields). A CRD is served as it was
//!   created: later updates are stored but do not change what is served;
//!   versions do not share objects (no conversion); name conflicts between
//!   CRDs are not detected;
//! - get, list (`labelSelector`, `fieldSelector` on the fields the real server
//!   allows per resource, `limit`/`continue`), create (201, `generateName`,
//!   409 AlreadyExists, 404 for a missing namespace), update (409 Conflict on
//!   a stale resourceVersion; no-op updates keep the resourceVersion), merge
//!   and JSON patch (strategic merge and apply patches are applied as merge
//!   patches; apply creates; a JSON patch that does not apply gets 422), delete (with preconditions) and deletecollection, with
//!   `Status` error bodies carrying the real reasons and codes;
//! - `/status` subresources: writes to the main resource keep `status`,
//!   writes to `/status` change only `status`;
//! - one global resourceVersion; watches from a resourceVersion replay the
//!   history after it, or start with synthetic ADDED events (resourceVersion
//!   unset or "0", streaming lists ending in an `initial-events-end`
//!   BOOKMARK); updates that move an object into or out of a selector are
//!   sent as ADDED/DELETED; BOOKMARKs every second with
//!   `allowWatchBookmarks`; `timeoutSeconds`; a resourceVersion older than the
//!   history (see [`FakeApiServer::compact`]) gets a 410 Expired ERROR event;
//! - `pods/portforward` over WebSocket (kube-rs' `Api::portforward`), to
//!   pods' ports through a [`PortForwarder`] the caller registers, since no
//!   kubelet runs (`create` on `pods/portforward` is needed, see
//!   [`FakeApiServer::deny_access`]);
//! - bearer tokens: an admin token, and ServiceAccount tokens from
//!   TokenRequest (audiences, expiry, bound Pod) that TokenReview verifies
//!   and that authenticate API calls when they carry the API audience
//!   (`https://kubernetes.default.svc.cluster.local`, the default of a
//!   TokenRequest without audiences); unknown or invalid tokens get 401;
//!   SelfSubjectAccessReview. kubectl (client-go) sends no credentials to an
//!   `http://` server, so kubectl requests without any are served, as the
//!   real server's old insecure port served them; other clients must present
//!   a token;
//! - server defaulting that clients rely on: pods start `Pending`, Services
//!   get a ClusterIP, namespaces are `Active`, Secret `stringData` folds into
//!   `data`; deleting a namespace deletes its objects (the namespace
//!   controller's work, done at once; without one, see
//!   [`FakeApiServer::stop_namespace_controller`]).
//!
//! Not modelled: RBAC enforcement (every valid token may do everything
//! except what [`FakeApiServer::deny_access`] denies every caller: such
//! requests get 403 Forbidden in the real server's words, and
//! SelfSubjectAccessReviews answer from it; RBAC objects are stored and
//! served, not evaluated),
//! admission (beyond the namespace-must-exist check), validation beyond
//! names, garbage collection (ownerReferences), graceful deletion and
//! finalizers (deletes are immediate), controllers (no ServiceAccount token
//! controller, no endpoints, no scheduling, no kubelet), field management of
//! server-side apply, protobuf bodies (415: kubectl's
//! imperative `create namespace|secret|configmap` need a real server; `kubectl
//! apply --validate=false` works), OpenAPI documents, Table output (kubectl
//! falls back to its own columns), TLS (put a TLS relay in front if needed).
#![forbid(unsafe_code)]

mod auth;
mod crd;
mod portforward;
mod resources;
mod selector;
mod server;
mod status;
mod store;

use ipnet::Ipv4Net;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

use crate::server::{Shared, lock};

pub use crate::portforward::PortForwarder;

/// Name of the cluster, user and context in the generated kubeconfig.
const KUBECONFIG_NAME: &str = "fake-apiserver";

/// kube-apiserver's default `--service-cluster-ip-range`.
pub const DEFAULT_SERVICE_RANGE: Ipv4Net =
    Ipv4Net::new_assert(std::net::Ipv4Addr::new(10, 96, 0, 0), 12);

/// A running fake API server; dropping it stops it and ends every watch.
#[derive(Debug)]
pub struct FakeApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept_loop: JoinHandle<()>,
}

impl FakeApiServer {
    /// Starts a server on 127.0.0.1 with an ephemeral port, allocating
    /// Service ClusterIPs from kube-apiserver's default range.
    pub async fn start() -> anyhow::Result<FakeApiServer> {
        Self::start_with_service_range(DEFAULT_SERVICE_RANGE).await
    }

    /// Like [`FakeApiServer::start`], with `--service-cluster-ip-range`
    /// `service_range`: ClusterIPs are allocated from it, and a Service
    /// asking for one outside it is refused (422) as the real server does.
    pub async fn start_with_service_range(service_range: Ipv4Net) -> anyhow::Result<FakeApiServer> {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .context("binding the fake API server to 127.0.0.1:0")?;
        let addr = listener
            .local_addr()
            .context("reading the fake API server's address")?;
        let shared = Arc::new(Shared::new(addr.to_string(), service_range));
        let accept_loop = tokio::spawn(accept_connections(listener, shared.clone()));
        Ok(FakeApiServer {
            addr,
            shared,
            accept_loop,
        })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A token with full access (user `kubernetes-admin`, group `system:masters`).
    pub fn admin_token(&self) -> String {
        lock(&self.shared.auth).admin_token().to_string()
    }

    /// A kube client with the admin token. Needs a tokio runtime.
    pub fn client(&self) -> kube::Client {
        self.client_with_token(&self.admin_token())
    }

    /// A kube client presenting `token`. Needs a tokio runtime.
    pub fn client_with_token(&self, token: &str) -> kube::Client {
        let mut config =
            kube::Config::new(self.url().parse().expect("the server URL is a valid URI"));
        config.auth_info = serde_json::from_value(json!({"token": token}))
            .expect("an AuthInfo with a token deserializes");
        kube::Client::try_from(config)
            .expect("a plain-HTTP kube client builds from a URL and a token")
    }

    /// A kubeconfig (apiVersion v1, kind Config) with one cluster, user and
    /// context, the server at [`url`](Self::url), authenticating with `token`.
    pub fn kubeconfig_yaml(&self, token: &str) -> String {
        let config = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": KUBECONFIG_NAME, "cluster": {"server": self.url()}}],
            "users": [{"name": KUBECONFIG_NAME, "user": {"token": token}}],
            "contexts": [{"name": KUBECONFIG_NAME, "context": {"cluster": KUBECONFIG_NAME, "user": KUBECONFIG_NAME, "namespace": "default"}}],
            "current-context": KUBECONFIG_NAME,
            "preferences": {},
        });
        serde_yaml_ng::to_string(&config).expect("a JSON value serializes to YAML")
    }

    /// Writes [`kubeconfig_yaml`](Self::kubeconfig_yaml) to `path`, readable
    /// by its owner only (it holds a token).
    pub fn write_kubeconfig(&self, path: &Path, token: &str) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)?;
        file.write_all(self.kubeconfig_yaml(token).as_bytes())
    }

    /// Forgets the event history: watches resuming from an older
    /// resourceVersion get a 410 Expired ERROR event.
    pub fn compact(&self) {
        lock(&self.shared.store).compact();
    }

    /// Runs without a namespace controller, as a kube-apiserver without
    /// kube-controller-manager: a deleted namespace stays Terminating with
    /// its contents (creating there is refused, 403) until a client removes
    /// its finalizers through `namespaces/NAME/finalize`, which removes it
    /// whatever it still holds.
    pub fn stop_namespace_controller(&self) {
        lock(&self.shared.store).set_namespace_controller(false);
    }

    /// Ends every open watch stream (clients must re-watch).
    pub fn close_watches(&self) {
        self.shared.close_watches();
    }

    /// Refuses requests for this (group, resource, verb), from every caller,
    /// with 403 Forbidden as the real server words it (`list` on
    /// `clusterroles`, `create` on `pods/portforward`, ...), and answers
    /// SelfSubjectAccessReviews for it with allowed=false. The core group is
    /// ""; a subresource is written `plural/subresource`; verbs are RBAC's
    /// (`get`, `list`, `watch`, `create`, `update`, `patch`, `delete`,
    /// `deletecollection`).
    pub fn deny_access(&self, group: &str, resource: &str, verb: &str) {
        lock(&self.shared.auth).deny(group, resource, verb);
    }

    /// How `pods/portforward` reaches a pod's port (the kubelet's part):
    /// without one, port-forward requests get 500 as when the API server
    /// cannot dial a node's kubelet.
    pub fn set_port_forwarder(&self, forwarder: PortForwarder) {
        *lock(&self.shared.port_forwarder) = Some(portforward::Registered(forwarder));
    }

    /// Requests seen so far: (method, path with query) in arrival order.
    pub fn requests(&self) -> Vec<(String, String)> {
        lock(&self.shared.requests).clone()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every
        // connection; watch tasks end on the epoch bump.
        self.accept_loop.abort();
        self.shared.close_watches();
        self.shared.stopped.send_replace(true);
    }
}

async fn accept_connections(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of file descriptors and the like: keep serving.
                tracing::warn!(%error, "fake API server: accepting a connection failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        while connections.try_join_next().is_some() {}
        let shared = shared.clone();
        connections.spawn(async move {
            let service = service_fn(move |request| server::handle(shared.clone(), request));
            if let Err(error) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await
            {
                tracing::debug!(%error, "fake API server: connection ended with an error");
            }
        });
    }
}
