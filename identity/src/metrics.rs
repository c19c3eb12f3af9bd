//! Prometheus metrics and the HTTP endpoint serving them with liveness and
//! readiness probes.

use std::{sync::Arc, time::Duration};

use http::StatusCode;
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use sealmesh_common::{
    consts::{HEALTH_LIVE_PATH, HEALTH_READY_PATH},
    probe::{self, Reply},
    process_metrics,
};
use time::OffsetDateTime;
use tokio::net::TcpListener;

use sealmesh_pki::CertInfo;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AnchorLabels {
    subject: String,
    serial: String,
}

/// The identity service's metrics, all prefixed `sealmesh_identity_`.
pub struct IdentityMetrics {
    registry: Registry,
    certificates_issued: Family<ResultLabels, Counter>,
    issuance_duration: Histogram,
    issuer_expiry: Gauge,
    anchor_expiry: Family<AnchorLabels, Gauge>,
    serving_certificate_expiry: Gauge,
}

impl std::fmt::Debug for IdentityMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for IdentityMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl IdentityMetrics {
    pub fn new() -> Self {
        let mut root = Registry::default();
        process_metrics::register(&mut root, "identity", env!("CARGO_PKG_VERSION"));
        let registry = root.sub_registry_with_prefix("sealmesh_identity");
        let certificates_issued = Family::<ResultLabels, Counter>::default();
        registry.register(
            "certificates_issued",
            "Certify calls by result: ok, or the gRPC status code name of the refusal",
            certificates_issued.clone(),
        );
        // 100µs .. ~1.6s
        let issuance_duration = Histogram::new(exponential_buckets(0.0001, 2.0, 15));
        registry.register(
            "issuance_duration_seconds",
            "Time to authorise a Certify call and sign its certificate",
            issuance_duration.clone(),
        );
        let issuer_expiry = Gauge::default();
        registry.register(
            "issuer_expiry_timestamp_seconds",
            "NotAfter of the issuer certificate currently signing, as a Unix timestamp",
            issuer_expiry.clone(),
        );
        let anchor_expiry = Family::<AnchorLabels, Gauge>::default();
        registry.register(
            "trust_anchor_expiry_timestamp_seconds",
            "NotAfter of each trust anchor, as a Unix timestamp",
            anchor_expiry.clone(),
        );
        let serving_certificate_expiry = Gauge::default();
        registry.register(
            "serving_certificate_expiry_timestamp_seconds",
            "NotAfter of the certificate the gRPC API is served with (TLS), as a Unix timestamp",
            serving_certificate_expiry.clone(),
        );
        Self {
            registry: root,
            certificates_issued,
            issuance_duration,
            issuer_expiry,
            anchor_expiry,
            serving_certificate_expiry,
        }
    }

    /// Counts one Certify call that ended with `result` after `elapsed`.
    pub fn record_certify(&self, result: &'static str, elapsed: Duration) {
        self.certificates_issued
            .get_or_create(&ResultLabels { result })
            .inc();
        self.issuance_duration.observe(elapsed.as_secs_f64());
    }

    pub fn set_issuer_expiry(&self, not_after: OffsetDateTime) {
        self.issuer_expiry.set(not_after.unix_timestamp());
    }

    pub fn set_serving_certificate_expiry(&self, not_after: std::time::SystemTime) {
        self.serving_certificate_expiry
            .set(OffsetDateTime::from(not_after).unix_timestamp());
    }

    pub fn set_anchor_expiries(&self, anchors: &[CertInfo]) {
        self.anchor_expiry.clear();
        for anchor in anchors {
            self.anchor_expiry
                .get_or_create(&AnchorLabels {
                    subject: anchor.subject.clone(),
                    serial: anchor.serial.clone(),
                })
                .set(anchor.not_after.unix_timestamp());
        }
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }
}

/// Serves `/metrics`, `/healthz/live` and `/healthz/ready` (200 while
/// `ready()` holds, else 503) on `listener` until `shutdown` resolves.
pub async fn serve_http(
    listener: TcpListener,
    metrics: Arc<IdentityMetrics>,
    ready: Arc<dyn Fn() -> bool + Send + Sync>,
    shutdown: impl Future<Output = ()>,
) {
    let routes = move |path: &str| match path {
        "/metrics" => Reply::openmetrics(metrics.encode()),
        HEALTH_LIVE_PATH => Reply::text(StatusCode::OK, "ok\n"),
        HEALTH_READY_PATH if ready() => Reply::text(StatusCode::OK, "ok\n"),
        HEALTH_READY_PATH => Reply::text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the issuer has expired; rotate it\n",
        ),
        _ => Reply::text(
            StatusCode::NOT_FOUND,
            format!("not found; try /metrics, {HEALTH_LIVE_PATH} or {HEALTH_READY_PATH}\n"),
        ),
    };
    probe::serve(listener, Arc::new(routes), shutdown).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_the_documented_series() {
        let metrics = IdentityMetrics::new();
        metrics.record_certify("ok", Duration::from_micros(150));
        metrics.set_issuer_expiry(OffsetDateTime::from_unix_timestamp(1_900_000_000).unwrap());
        let text = metrics.encode();
        assert!(
            text.contains("sealmesh_identity_certificates_issued_total{result=\"ok\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("sealmesh_identity_issuer_expiry_timestamp_seconds 1900000000\n"),
            "{text}"
        );
        assert!(
            text.contains("sealmesh_identity_issuance_duration_seconds_count 1\n"),
            "{text}"
        );
        assert!(
            text.contains("sealmesh_identity_issuance_duration_seconds_bucket{le=\"0.0002\"} 1\n"),
            "{text}"
        );
    }
}
