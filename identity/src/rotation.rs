//! Issuer rotation. The current issuer sits behind an atomic pointer; a new
//! one replaces it only once it validates. Changes are noticed by a watcher
//! on the issuer directory (kubelet's `..data` symlink swaps and plain
//! rewrites) and by a periodic content-hash poll that backs the watcher up.
//!
//! [`IssuerEvents`] is where rotations are reported: [`LoggingIssuerEvents`]
//! logs them; in Kubernetes mode `kube::KubeIssuerEvents` records Events, and
//! the Secret and trust-roots ConfigMap watches call [`IssuerStore::offer`]
//! and [`IssuerStore::replace_anchors`].

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use arc_swap::ArcSwap;
use notify::{RecursiveMode, Watcher};
use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};

use sealmesh_common::consts::kube::{EVENT_ISSUER_UPDATE_SKIPPED, EVENT_ISSUER_UPDATED};

use crate::metrics::IdentityMetrics;
use sealmesh_pki::{CaMaterial, CertInfo, Issuer, PkiError, TrustAnchors};

/// After a file event, wait until the directory has been quiet this long, so
/// a writer replacing several files is read once, when done.
const SETTLE_TIME: Duration = Duration::from_millis(150);
/// ... but no longer than this after the first event.
const MAX_SETTLE_TIME: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    #[error(
        "cannot watch issuer directory {dir}: {source}; check that it exists and inotify limits allow another watch"
    )]
    Watch { dir: PathBuf, source: notify::Error },
}

/// Where issuer changes are reported.
pub trait IssuerEvents: Send + Sync + 'static {
    /// A new issuer was validated and is now signing.
    fn issuer_updated(&self, issuer: &CertInfo);
    /// A changed issuer was refused; the previous one keeps signing.
    fn issuer_update_skipped(&self, reason: &str);
}

/// Reports issuer events to the log.
#[derive(Clone, Copy, Debug, Default)]
pub struct LoggingIssuerEvents;

impl IssuerEvents for LoggingIssuerEvents {
    fn issuer_updated(&self, issuer: &CertInfo) {
        tracing::info!(
            event = EVENT_ISSUER_UPDATED,
            subject = %issuer.subject,
            serial = %issuer.serial,
            not_after = %issuer.not_after,
            "updated identity issuer"
        );
    }

    fn issuer_update_skipped(&self, reason: &str) {
        tracing::warn!(
            event = EVENT_ISSUER_UPDATE_SKIPPED,
            reason,
            "skipped identity issuer update; the previous issuer keeps signing"
        );
    }
}

/// What became of an offered issuer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offer {
    /// Same content as last offered; nothing to do.
    Unchanged,
    Updated,
    Skipped,
}

/// The issuer currently signing, and how it may be replaced.
pub struct IssuerStore {
    current: ArcSwap<Issuer>,
    anchors: ArcSwap<TrustAnchors>,
    events: Arc<dyn IssuerEvents>,
    metrics: Arc<IdentityMetrics>,
    /// Content hash of the last material offered (valid or not), so each
    /// distinct version is judged and reported once.
    last_offered: Mutex<[u8; 32]>,
    /// What `current` was built from, to judge it against new anchors.
    current_material: Mutex<CaMaterial>,
    /// Counts issuer replacements, so what is signed by the issuer (the
    /// service's own serving certificate) follows it.
    replaced: watch::Sender<u64>,
}

impl IssuerStore {
    /// Validates the initial issuer: the service refuses to start without one.
    pub fn new(
        material: &CaMaterial,
        anchors: TrustAnchors,
        events: Arc<dyn IssuerEvents>,
        metrics: Arc<IdentityMetrics>,
    ) -> Result<Self, PkiError> {
        let issuer = Issuer::from_material(material, &anchors, OffsetDateTime::now_utc())?;
        metrics.set_issuer_expiry(issuer.info().not_after);
        Ok(Self {
            current: ArcSwap::from_pointee(issuer),
            anchors: ArcSwap::from_pointee(anchors),
            events,
            metrics,
            last_offered: Mutex::new(material.content_hash()),
            current_material: Mutex::new(material.clone()),
            replaced: watch::Sender::new(0),
        })
    }

    /// Notified whenever a new issuer takes over.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.replaced.subscribe()
    }

    pub fn current(&self) -> Arc<Issuer> {
        self.current.load_full()
    }

    pub fn anchors(&self) -> Arc<TrustAnchors> {
        self.anchors.load_full()
    }

    /// Makes `anchors` the bundle new issuers must chain to (a root rotation
    /// adds the new root first). The current issuer keeps signing; if it no
    /// longer chains to the bundle that is logged, since peers trusting only
    /// the new bundle will refuse its leaves. A refused issuer offered again
    /// is judged again: it may chain to the new anchors.
    pub fn replace_anchors(&self, anchors: TrustAnchors) {
        let mut last = self.last_offered.lock().unwrap_or_else(|p| p.into_inner());
        let current = self
            .current_material
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        *last = current.content_hash();
        self.metrics.set_anchor_expiries(anchors.infos());
        if let Err(e) = Issuer::from_material(&current, &anchors, OffsetDateTime::now_utc()) {
            tracing::warn!(
                issuer = self.current().info().subject,
                error = %e,
                "the current issuer does not validate against the new trust anchors; replace the issuer, or peers that trust only the new bundle will refuse its certificates"
            );
        }
        self.anchors.store(Arc::new(anchors));
    }

    /// Validates `material` and, if it is new and valid, makes it the issuer.
    pub fn offer(&self, material: &CaMaterial) -> Offer {
        let hash = material.content_hash();
        let mut last = self.last_offered.lock().unwrap_or_else(|p| p.into_inner());
        if *last == hash {
            return Offer::Unchanged;
        }
        *last = hash;
        match Issuer::from_material(material, &self.anchors.load(), OffsetDateTime::now_utc()) {
            Ok(issuer) => {
                self.metrics.set_issuer_expiry(issuer.info().not_after);
                self.events.issuer_updated(issuer.info());
                self.current.store(Arc::new(issuer));
                *self
                    .current_material
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = material.clone();
                self.replaced.send_modify(|count| *count += 1);
                Offer::Updated
            }
            Err(e) => {
                self.events.issuer_update_skipped(&e.to_string());
                Offer::Skipped
            }
        }
    }

    /// Reports material that could not even be read, once per distinct
    /// reason (`last_reason` is the caller's memory of the previous one).
    pub fn unreadable(&self, reason: String, last_reason: &mut Option<String>) {
        if last_reason.as_deref() != Some(reason.as_str()) {
            self.events.issuer_update_skipped(&reason);
            *last_reason = Some(reason);
        }
    }
}

/// Watches `dir` and polls it every `poll_interval`, offering each change to
/// `store`, until `shutdown` resolves.
pub fn spawn_directory_watch(
    store: Arc<IssuerStore>,
    dir: PathBuf,
    poll_interval: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<tokio::task::JoinHandle<()>, RotationError> {
    let (changed_tx, mut changed_rx) = mpsc::channel::<()>(1);
    // Any event (or watcher error) is only a hint to re-read the directory;
    // a full channel already holds one.
    let mut watcher = notify::recommended_watcher(move |_: notify::Result<notify::Event>| {
        let _ = changed_tx.try_send(());
    })
    .map_err(|source| RotationError::Watch {
        dir: dir.clone(),
        source,
    })?;
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .map_err(|source| RotationError::Watch {
            dir: dir.clone(),
            source,
        })?;

    Ok(tokio::spawn(async move {
        let _watcher = watcher; // dropping it stops the watch
        let mut poll = tokio::time::interval(poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_read_error = None;
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                _ = poll.tick() => {}
                Some(()) = changed_rx.recv() => settle(&mut changed_rx).await,
            }
            let read = {
                let dir = dir.clone();
                tokio::task::spawn_blocking(move || CaMaterial::read_dir(&dir)).await
            };
            match read {
                Ok(Ok(material)) => {
                    last_read_error = None;
                    let offer = store.offer(&material);
                    if offer != Offer::Unchanged {
                        tracing::debug!(?offer, dir = %dir.display(), "issuer directory changed");
                    }
                }
                Ok(Err(e)) => store.unreadable(e.to_string(), &mut last_read_error),
                Err(e) => tracing::error!(error = %e, "issuer reload task failed"),
            }
        }
    }))
}

/// Waits until no event arrived for [`SETTLE_TIME`] (at most [`MAX_SETTLE_TIME`]).
async fn settle(events: &mut mpsc::Receiver<()>) {
    let deadline = tokio::time::Instant::now() + MAX_SETTLE_TIME;
    while tokio::time::timeout_at(
        deadline.min(tokio::time::Instant::now() + SETTLE_TIME),
        events.recv(),
    )
    .await
    .is_ok_and(|event| event.is_some())
    {}
}
