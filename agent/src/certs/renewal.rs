//! When certificates are obtained and renewed: one task per wanted identity
//! obtains a certificate, renews it at a random 50–70 % of the validity it
//! had left, retries failures with capped, jittered back-off, and drops the
//! certificate when it expires without a successor.
//!
//! Bounds (see [`RenewalPolicy`]): consecutive requests for one identity are
//! never closer than `min_renew_delay` after a success, nor than
//! `initial_backoff / 2` after a failure; no wait is longer than
//! `max_backoff` after a failure.

use std::{collections::HashMap, future::Future, sync::Arc, time::Duration, time::SystemTime};

use rand::Rng;
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls_pki_types::PrivatePkcs8KeyDer;
use sealmesh_common::{consts::CERTIFICATE_OBTAINED_MESSAGE, identity::Identity};
use tokio::{
    task::JoinHandle,
    time::{Instant, sleep_until},
};

use super::{
    ca_client::csr_der,
    cache::CachedCert,
    store::{CertStore, IssuedCert, ObtainError, humanize},
};
use crate::{backoff::CappedBackoff, registry::WorkloadRegistry};

/// When to renew and how to retry.
#[derive(Clone, Debug, PartialEq)]
pub struct RenewalPolicy {
    /// A certificate is renewed after a random fraction, between these two,
    /// of the validity it had left when it was received (spreads renewals of
    /// many agents over time).
    pub renew_fraction_min: f64,
    pub renew_fraction_max: f64,
    /// The shortest wait before renewing a certificate just received. A leaf
    /// clamped to an issuer about to expire has little validity left, and
    /// the next one (same issuer) even less: without this floor the renewals
    /// would come ever closer until the issuer expires. With it, one identity
    /// asks at most once per `min_renew_delay`; a leaf shorter than that
    /// expires before its renewal, and its identity's connections fail
    /// closed until the identity service signs with a new issuer.
    pub min_renew_delay: Duration,
    /// Retry delay after the first failure: a random 50–100 % of a step that
    /// starts here and doubles per failure up to `max_backoff`
    /// ([`CappedBackoff`]), so every retry waits between `initial_backoff / 2`
    /// and `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Deadline of one Certify call, including connecting.
    pub request_timeout: Duration,
}

impl Default for RenewalPolicy {
    fn default() -> Self {
        Self {
            renew_fraction_min: 0.5,
            renew_fraction_max: 0.7,
            min_renew_delay: Duration::from_secs(5),
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            request_timeout: Duration::from_secs(10),
        }
    }
}

impl RenewalPolicy {
    /// How long to wait before renewing a certificate with `remaining` validity.
    fn renew_delay(&self, remaining: Duration) -> Duration {
        remaining
            .mul_f64(rand::rng().random_range(self.renew_fraction_min..=self.renew_fraction_max))
            .max(self.min_renew_delay)
    }

    /// Retry delays after consecutive failures.
    fn backoff(&self) -> impl backon::Backoff {
        CappedBackoff {
            first: self.initial_backoff,
            cap: self.max_backoff,
        }
        .delays()
    }
}

/// A certificate just installed.
struct Installed {
    serial: String,
    /// Validity it had left when installed.
    valid_for: Duration,
    renew_in: Duration,
}

impl CertStore {
    /// Keeps a cert for every ServiceAccount of local meshed workloads until
    /// shutdown resolves.
    pub async fn run(
        self: Arc<Self>,
        registry: Arc<dyn WorkloadRegistry>,
        shutdown: impl Future<Output = ()> + Send,
    ) {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut changes = registry.subscribe();
        let mut maintainers: HashMap<Identity, JoinHandle<()>> = HashMap::new();
        loop {
            changes.mark_unchanged();
            let wanted = self.wanted_identities(registry.as_ref());
            // Inherited certificates of ServiceAccounts that left while the
            // agent was down.
            for id in self.held_identities() {
                if !wanted.contains(&id) && !maintainers.contains_key(&id) {
                    self.take_inherited(&id);
                    self.forget(&id);
                    tracing::info!(identity = %id, "ServiceAccount no longer on the node; inherited certificate dropped");
                }
            }
            let gone: Vec<Identity> = maintainers
                .keys()
                .filter(|id| !wanted.contains(id))
                .cloned()
                .collect();
            for id in gone {
                if let Some(task) = maintainers.remove(&id) {
                    self.stop(&id, task).await;
                }
            }
            for id in wanted {
                maintainers
                    .entry(id.clone())
                    .or_insert_with(|| self.clone().start_maintaining(id));
            }
            tokio::select! {
                () = &mut shutdown => break,
                changed = changes.changed() => if changed.is_err() {
                    // The registry is gone; keep what we have until shutdown.
                    shutdown.as_mut().await;
                    break;
                },
            }
        }
        for (_, task) in maintainers {
            task.abort();
            let _ = task.await;
        }
    }

    /// Waits (with [`CertStore::run`] running) until every local meshed
    /// ServiceAccount holds a valid certificate, for at most `timeout`, so
    /// that an agent listens with its node's identities in hand; returns
    /// those still missing then.
    pub async fn wait_for_local_certificates(
        &self,
        registry: &dyn WorkloadRegistry,
        timeout: Duration,
    ) -> Vec<Identity> {
        // A start-up wait: polling is simpler than a notification on every install.
        const POLL: Duration = Duration::from_millis(20);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let missing: Vec<Identity> = self
                .wanted_identities(registry)
                .into_iter()
                .filter(|id| !self.has_valid_cert(id))
                .collect();
            if missing.is_empty() {
                return missing;
            }
            if tokio::time::Instant::now() >= deadline {
                return missing;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    fn wanted_identities(&self, registry: &dyn WorkloadRegistry) -> Vec<Identity> {
        let mut wanted: Vec<Identity> = Vec::new();
        for workload in registry.local_workloads() {
            if !workload.meshed || wanted.contains(&workload.identity) {
                continue;
            }
            if workload.identity.trust_domain() != &self.cfg.trust_domain {
                tracing::error!(
                    identity = %workload.identity,
                    pod = %workload.name,
                    "pod's trust domain differs from the agent's; no certificate is requested for it"
                );
                continue;
            }
            wanted.push(workload.identity.clone());
        }
        wanted
    }

    /// Starts reporting on `id` and the task keeping its certificate.
    fn start_maintaining(self: Arc<Self>, id: Identity) -> JoinHandle<()> {
        self.want(&id);
        tokio::spawn(self.maintain(id))
    }

    async fn stop(&self, id: &Identity, task: JoinHandle<()>) {
        task.abort();
        // Wait until it has stopped so it cannot store a certificate after removal.
        let _ = task.await;
        self.forget(id);
        tracing::info!(identity = %id, "ServiceAccount left the node; certificate dropped");
    }

    /// Obtains, then renews, `id`'s certificate forever (until aborted).
    async fn maintain(self: Arc<Self>, id: Identity) {
        let policy = &self.cfg.renewal;
        let mut backoff = policy.backoff();
        // The certificate held and when it runs out, on the runtime's clock.
        let mut held: Option<(String, Instant)> = None;
        // A certificate inherited from the previous run is renewed when the
        // policy says, not at once: a restarted agent needs no identity service.
        if let Some((serial, not_after)) = self.take_inherited(&id) {
            let left = not_after
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            held = Some((serial, Instant::now() + left));
            sleep_until(Instant::now() + policy.renew_delay(left)).await;
        }
        loop {
            let refreshed = self.refresh(&id).await;
            self.count_refresh(&id, refreshed.is_ok());
            let wait = match refreshed {
                Ok(installed) => {
                    backoff = policy.backoff();
                    held = Some((installed.serial, Instant::now() + installed.valid_for));
                    installed.renew_in
                }
                Err(error) => {
                    // The sequence never ends; the cap is only a fallback.
                    let delay = backoff.next().unwrap_or(policy.max_backoff);
                    tracing::warn!(
                        identity = %id,
                        %error,
                        still_valid = self.has_valid_cert(&id),
                        retry_in = ?delay,
                        "cannot obtain certificate"
                    );
                    self.set_error(&id, Some(error.to_string()));
                    delay
                }
            };
            let next_attempt = Instant::now() + wait;
            if let Some((serial, expiry)) = held.take_if(|(_, expiry)| *expiry <= next_attempt) {
                sleep_until(expiry).await;
                self.drop_expired(&id, &serial);
            }
            sleep_until(next_attempt).await;
        }
    }

    /// Obtains and installs a certificate.
    async fn refresh(&self, id: &Identity) -> Result<Installed, ObtainError> {
        let (issued, kept) = self.obtain(id).await?;
        let remaining = issued
            .not_after
            .duration_since(issued.received)
            .unwrap_or_default();
        let renew_in = self.cfg.renewal.renew_delay(remaining);
        let (serial, not_after) = (issued.serial.clone(), issued.not_after);
        let renewed = self.certs.load().contains_key(id);
        self.install(id, issued).map_err(ObtainError::Untrusted)?;
        self.keep(id, &kept);
        tracing::info!(
            identity = %id,
            %serial,
            not_after = %humanize(not_after),
            renew_in = ?renew_in,
            "{}",
            if renewed { "certificate renewed" } else { CERTIFICATE_OBTAINED_MESSAGE }
        );
        Ok(Installed {
            serial,
            valid_for: not_after
                .duration_since(SystemTime::now())
                .unwrap_or_default(),
            renew_in,
        })
    }

    /// One Certify round trip with a fresh key, checked before use.
    /// Also returns the chain and key as kept for a restart.
    async fn obtain(&self, id: &Identity) -> Result<(IssuedCert, CachedCert), ObtainError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let chain = self.authority.certify(id, csr_der(id, &key)?).await?;
        let kept = CachedCert {
            chain: chain.clone(),
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
        };
        Ok((self.accept(id, chain, key)?, kept))
    }
}

#[cfg(test)]
mod tests {
    use super::{
        super::{
            CertStatus,
            test_support::{FakeCa, TestCa, handshake, store_keeping, store_with, web},
        },
        *,
    };

    const HOUR: Duration = Duration::from_secs(3600);
    const DAY: Duration = Duration::from_secs(24 * 3600);

    /// Starts maintaining `id`'s certificate, as `run` does for a wanted identity.
    fn maintain(store: &Arc<CertStore>, id: &Identity) -> JoinHandle<()> {
        store.clone().start_maintaining(id.clone())
    }

    fn status(store: &CertStore, id: &Identity) -> CertStatus {
        store
            .snapshot()
            .into_iter()
            .find(|s| &s.identity == id)
            .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_restarted_store_serves_its_kept_certificate_without_the_authority() {
        use std::os::unix::fs::PermissionsExt;
        // A tmpfs, as the agent requires for keys.
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let ca = FakeCa::new(TestCa::new(), DAY);
        let id = web();
        let first = store_keeping(
            &ca.ca,
            ca.clone(),
            RenewalPolicy::default(),
            Some(dir.path()),
        );
        let task = maintain(&first, &id);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let kept_serial = status(&first, &id).serial;
        task.abort();
        drop(first);
        let file = dir.path().join("emojivoto_web.pem");
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "only the agent may read the key");

        // The authority is down: the restarted store serves the kept
        // certificate at once and renews it when the policy says, not before.
        ca.set_up(false);
        let second = store_keeping(
            &ca.ca,
            ca.clone(),
            RenewalPolicy::default(),
            Some(dir.path()),
        );
        assert!(second.has_valid_cert(&id));
        let _task = maintain(&second, &id);
        tokio::time::sleep(DAY.mul_f64(0.45)).await;
        assert_eq!(
            ca.requests().len(),
            1,
            "no request while the kept one is fresh"
        );
        let inherited = status(&second, &id);
        assert!(inherited.valid);
        assert_eq!(inherited.serial, kept_serial);
        let client = second
            .client_config(&id)
            .expect("a client config from the kept certificate");
        handshake(second.server_config(), client, &id)
            .await
            .expect("served with the kept certificate");

        // Under other anchors the kept certificate is not trusted: deleted.
        let other = FakeCa::new(TestCa::new(), DAY);
        let third = store_keeping(
            &other.ca,
            other.clone(),
            RenewalPolicy::default(),
            Some(dir.path()),
        );
        assert!(!third.has_valid_cert(&id));
        assert!(!file.exists());
    }

    fn gaps(requests: &[Instant]) -> Vec<Duration> {
        requests.windows(2).map(|w| w[1] - w[0]).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn renews_at_half_to_seventy_percent_of_the_validity_left() {
        let ca = FakeCa::new(TestCa::new(), DAY);
        let store = store_with(&ca.ca, ca.clone(), RenewalPolicy::default());
        let id = web();
        let _task = maintain(&store, &id);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let first = status(&store, &id);
        assert!(first.valid, "{first:?}");

        tokio::time::sleep(DAY.mul_f64(0.8)).await;
        let requests = ca.requests();
        assert_eq!(requests.len(), 2, "one renewal in 80 % of a day");
        let renewed_after = requests[1] - requests[0];
        // NotAfter has whole seconds: up to 1 s less than a day was left.
        assert!(
            renewed_after >= (DAY - Duration::from_secs(1)).mul_f64(0.5)
                && renewed_after <= DAY.mul_f64(0.7),
            "{renewed_after:?}"
        );
        let renewed = status(&store, &id);
        assert!(renewed.valid);
        assert_ne!(renewed.serial, first.serial);
        assert_eq!(renewed.last_error, None);
        assert_eq!(renewed.refreshes_succeeded, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_with_growing_capped_jittered_delays_until_the_authority_returns() {
        let ca = FakeCa::new(TestCa::new(), DAY);
        ca.set_up(false);
        let policy = RenewalPolicy {
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(16),
            ..RenewalPolicy::default()
        };
        let store = store_with(&ca.ca, ca.clone(), policy);
        let id = web();
        let _task = maintain(&store, &id);
        tokio::time::sleep(Duration::from_secs(200)).await;

        let requests = ca.requests();
        let gaps = gaps(&requests);
        // Steps 1, 2, 4, 8, then the 16 s cap; each delay 50–100 % of its step.
        let steps: Vec<Duration> = (0..gaps.len())
            .map(|i| Duration::from_secs(1 << i.min(4)))
            .collect();
        assert!((15..=28).contains(&gaps.len()), "{gaps:?}");
        for (gap, step) in gaps.iter().zip(&steps) {
            assert!(
                *gap >= *step / 2 && gap <= step,
                "{gap:?} for a {step:?} step: {gaps:?}"
            );
        }
        assert!(
            gaps.iter()
                .zip(&steps)
                .any(|(gap, step)| *gap < step.mul_f64(0.9)),
            "not jittered: {gaps:?}"
        );
        let failing = status(&store, &id);
        assert!(!failing.valid);
        assert_eq!(failing.refreshes_failed, requests.len() as u64);
        let refused = store.client_config(&id).unwrap_err().to_string();
        assert!(
            refused.contains(": not issued yet; last attempt: cannot connect to the test CA"),
            "{refused}"
        );

        ca.set_up(true);
        tokio::time::sleep(Duration::from_secs(17)).await;
        let recovered = status(&store, &id);
        assert!(recovered.valid, "{recovered:?}");
        assert_eq!(recovered.last_error, None);
        assert_eq!(recovered.refreshes_succeeded, 1);
        let recovered_at = *ca.requests().last().unwrap();

        // What comes next is the renewal, and its failure backs off from the
        // first step again, while the certificate held stays in use.
        ca.set_up(false);
        tokio::time::sleep(DAY.mul_f64(0.7) + Duration::from_secs(5)).await;
        let after: Vec<Instant> = ca
            .requests()
            .into_iter()
            .filter(|t| *t > recovered_at)
            .collect();
        assert!(after.len() >= 2, "{after:?}");
        assert!(
            after[0] - recovered_at >= (DAY - Duration::from_secs(1)).mul_f64(0.5),
            "renewed {:?} after recovery",
            after[0] - recovered_at
        );
        let retry = after[1] - after[0];
        assert!(
            retry >= Duration::from_millis(500) && retry <= Duration::from_secs(1),
            "{retry:?}"
        );
        assert!(store.has_valid_cert(&id));
    }

    #[tokio::test(start_paused = true)]
    async fn a_leaf_clamped_to_an_expiring_issuer_is_renewed_no_sooner_than_the_minimum_delay() {
        // Every leaf ends with the issuer, 20 s from now: 50–70 % of what is
        // left would come ever sooner.
        let issuer_expiry = SystemTime::now() + Duration::from_secs(20);
        let ca = FakeCa::new(TestCa::with_issuer_until(Some(issuer_expiry)), DAY);
        let policy = RenewalPolicy {
            min_renew_delay: Duration::from_secs(30),
            ..RenewalPolicy::default()
        };
        let store = store_with(&ca.ca, ca.clone(), policy);
        let id = web();
        let _task = maintain(&store, &id);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let clamped = status(&store, &id);
        assert!(clamped.valid);
        assert!(clamped.not_after.unwrap() <= issuer_expiry, "{clamped:?}");

        tokio::time::sleep(Duration::from_secs(5 * 60 + 24)).await;
        let requests = ca.requests();
        assert_eq!(requests.len(), 11, "one request per 30 s over 5 min");
        for gap in gaps(&requests) {
            assert!(
                gap >= Duration::from_secs(30) && gap < Duration::from_secs(31),
                "{gap:?}"
            );
        }
        // A leaf shorter than the minimum delay expires before its renewal.
        assert!(!store.has_valid_cert(&id));
        let refused = store.client_config(&id).unwrap_err().to_string();
        assert!(
            refused.contains(": the certificate expired at "),
            "{refused}"
        );
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert!(store.has_valid_cert(&id));
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_certificate_leaves_the_store_and_its_sni_lookup_fails_closed() {
        let ca = FakeCa::new(TestCa::new(), HOUR);
        let store = store_with(&ca.ca, ca.clone(), RenewalPolicy::default());
        let id = web();
        let _task = maintain(&store, &id);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let client = store.client_config(&id).unwrap();
        assert_eq!(
            handshake(store.server_config(), client.clone(), &id).await,
            Ok(())
        );

        // The renewal (at 30–42 min) and every retry fail until the leaf expires.
        ca.set_up(false);
        tokio::time::sleep(HOUR - Duration::from_secs(70)).await;
        assert!(store.has_valid_cert(&id), "kept while valid");
        assert_eq!(
            handshake(store.server_config(), client.clone(), &id).await,
            Ok(())
        );
        tokio::time::sleep(Duration::from_secs(70)).await;
        assert!(!store.has_valid_cert(&id));
        let expired = status(&store, &id);
        assert!(!expired.valid && expired.serial.is_none() && expired.chain.is_empty());
        assert!(expired.not_after.is_some(), "{expired:?}");
        let refused = handshake(store.server_config(), client, &id).await;
        assert!(refused.is_err(), "{refused:?}");
        let refused = store.client_config(&id).unwrap_err().to_string();
        assert!(
            refused.contains(": the certificate expired at ")
                && refused.contains("; last attempt: cannot connect to the test CA"),
            "{refused}"
        );

        ca.set_up(true);
        tokio::time::sleep(RenewalPolicy::default().max_backoff).await;
        let client = store.client_config(&id).unwrap();
        assert_eq!(handshake(store.server_config(), client, &id).await, Ok(()));
    }

    #[test]
    fn renewal_falls_between_half_and_seventy_percent() {
        let policy = RenewalPolicy::default();
        let remaining = Duration::from_secs(24 * 3600);
        for _ in 0..100 {
            let delay = policy.renew_delay(remaining);
            assert!(
                delay >= remaining / 2 && delay <= remaining.mul_f64(0.7),
                "{delay:?}"
            );
        }
    }

    #[test]
    fn renewal_waits_at_least_the_minimum_delay() {
        let policy = RenewalPolicy::default();
        for remaining in [
            Duration::ZERO,
            Duration::from_secs(1),
            Duration::from_secs(7),
        ] {
            assert_eq!(policy.renew_delay(remaining), policy.min_renew_delay);
        }
    }
}
