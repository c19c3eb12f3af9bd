//! PKI rotations under load: `issuer-rotation` and `anchor-rotation`.

use std::time::Duration;

use sealmesh_pki::{self as pki, CaMaterial, CaSpec, Layout};
use sealmesh_proto::admin as pb;

use super::{
    Bed, CLIENT_POD, ChaosArgs, ChaosError, Findings, MARKER, NAMESPACE,
    load::{self, LoadEvent, RunningLoad, Timeline, seconds_between, unix_micros},
};
use crate::{mesh::MeshOptions, testbed::kube::KubeMode};

/// Short leaves, so that every agent renews under a new issuer within seconds.
const LEAF_LIFETIME: Duration = Duration::from_secs(10);
const STEP_TIMEOUT: Duration = Duration::from_secs(60);
const ISSUER_VALIDITY: Duration = Duration::from_secs(48 * 3600);
const ROOT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// New connections per second of the load started after the issuer moved.
const LATE_RATE: f64 = 10.0;
/// Load after the last step, to show it stays healthy.
const AFTER: Duration = Duration::from_secs(3);

fn short_leaves() -> Vec<String> {
    vec![
        format!("--cert-lifetime={}s", LEAF_LIFETIME.as_secs()),
        "--clock-skew=0s".into(),
    ]
}

fn first_der(pem: &str, what: &str) -> Result<Vec<u8>, ChaosError> {
    Ok(pki::parse_pem_certs(pem.as_bytes(), what)
        .map_err(pki::PkiError::from)?
        .remove(0)
        .to_vec())
}

/// Every certificate the agent holds is valid and presented under `issuer`.
fn all_under(issuer_der: &[u8]) -> impl Fn(&pb::GetCertificatesResponse) -> bool + '_ {
    move |certs| {
        !certs.certificates.is_empty()
            && certs
                .certificates
                .iter()
                .all(|c| c.valid && c.chain.get(1).map(Vec::as_slice) == Some(issuer_der))
    }
}

/// What `issuer-rotation` checks once the load stopped: nothing failed.
fn judge(findings: &mut Findings, timeline: &super::load::Timeline) {
    let failed = timeline.failed().count();
    findings.check(failed == 0, || {
        format!(
            "{failed} connections failed during the rotation, first: {:?}",
            timeline.first_error()
        )
    });
    let breaks = timeline.stream_breaks.len();
    findings.check(breaks == 0, || {
        format!(
            "{breaks} long-lived streams broke during the rotation, first: {:?}",
            timeline
                .stream_breaks
                .first()
                .map(|b| format!("stream {}: {}", b.stream, b.error))
        )
    });
}

/// Writes a new issuer (same root) into the identity service's issuer
/// directory under load, as cert-manager renewing it would.
pub(super) fn issuer_rotation(args: &ChaosArgs) -> Result<Findings, ChaosError> {
    let mut identity_args = short_leaves();
    // The issuer directory's poll backs up its watch.
    identity_args.push("--issuer-poll-interval=1s".into());
    let mut bed = Bed::up(MeshOptions {
        identity_args,
        ..MeshOptions::default()
    })?;
    let load = bed.start_load(args)?;
    std::thread::sleep(Duration::from_secs(1));

    let pki_dir = bed.mesh.pki_dir().to_owned();
    let root = CaMaterial::read_dir(&pki_dir.join("root")).map_err(pki::PkiError::from)?;
    let (issuer, _) = pki::generate_issuer(
        &root,
        &CaSpec::valid_for("identity-2.sealmesh.cluster.local", ISSUER_VALIDITY),
    )
    .map_err(pki::PkiError::from)?;
    let issuer_der = first_der(&issuer.cert_pem, "the new issuer")?;
    let rotated_us = unix_micros();
    issuer
        .write_dir(&pki_dir.join("issuer"), Layout::Tls, true)
        .map_err(pki::PkiError::from)?;
    bed.wait_certificates(
        "every leaf under the new issuer",
        STEP_TIMEOUT,
        all_under(&issuer_der),
    )?;
    let moved_us = unix_micros();
    std::thread::sleep(AFTER);

    let mut findings = Findings::default();
    let timeline = bed.finish(load, &mut findings)?;
    findings.figure(
        "every_leaf_under_new_issuer_s",
        seconds_between(rotated_us, moved_us),
    );
    judge(&mut findings, &timeline);
    Ok(findings)
}

/// A root rotation in Kubernetes mode (the trust-roots ConfigMap and the
/// issuer Secret, which agents and identity service watch; local mode reads
/// the anchors file only at start): add the new root to the bundle, move the
/// issuer under it, then remove the old root.
pub(super) fn anchor_rotation(args: &ChaosArgs) -> Result<Findings, ChaosError> {
    let mut bed = Bed::up(MeshOptions {
        kubernetes: Some(KubeMode::fake()),
        identity_args: short_leaves(),
        ..MeshOptions::default()
    })?;
    let load = bed.start_load(args)?;
    std::thread::sleep(Duration::from_secs(1));

    let old_root =
        std::fs::read_to_string(bed.mesh.pki_dir().join("ca-bundle.crt")).map_err(|source| {
            ChaosError::Io {
                what: "reading the trust anchors".into(),
                source,
            }
        })?;
    let new_root = pki::generate_root(&CaSpec::valid_for(
        "root-2.sealmesh.cluster.local",
        ROOT_VALIDITY,
    ))
    .map_err(pki::PkiError::from)?;
    let kube = bed.mesh.kube().expect("the mesh runs in Kubernetes mode");
    let started_us = unix_micros();
    let both = format!("{old_root}{}", new_root.cert_pem);
    kube.update_trust_roots(both.as_bytes())?;
    bed.wait_certificates("both roots trusted", STEP_TIMEOUT, |c| {
        c.trust_anchors_pem == both
    })?;
    let added_us = unix_micros();

    let (issuer, _) = pki::generate_issuer(
        &new_root.material(),
        &CaSpec::valid_for("identity-2.sealmesh.cluster.local", ISSUER_VALIDITY),
    )
    .map_err(pki::PkiError::from)?;
    let issuer_der = first_der(&issuer.cert_pem, "the new issuer")?;
    let mut material = issuer.material();
    material.ca_pem = Some(issuer.ca_pem.clone().into_bytes());
    kube.update_issuer(&material, Layout::Tls)?;
    bed.wait_certificates(
        "every leaf under the issuer of the new root",
        STEP_TIMEOUT,
        all_under(&issuer_der),
    )?;
    let moved_us = unix_micros();
    // As an operator waits before removing the old root: every leaf it
    // signed has expired by then.
    std::thread::sleep(LEAF_LIFETIME);
    let old_leaves_expired_us = unix_micros();
    // Connections and streams opened from here on are the new root's business:
    // removing the old root must not cut them.
    let late_log = bed.log_path("chaosload-late");
    let late = RunningLoad::start(
        bed.mesh.testbed(),
        NAMESPACE,
        CLIENT_POD,
        &load::steady_args(bed.server_addr(), LATE_RATE, args.streams, MARKER),
        &late_log,
    )?;
    late.wait_for("the late load's streams to be up", STEP_TIMEOUT, |events| {
        events
            .iter()
            .filter(|e| matches!(e, LoadEvent::StreamUp { .. }))
            .count()
            >= args.streams
    })?;
    let late_up_us = unix_micros();

    let kube = bed.mesh.kube().expect("the mesh runs in Kubernetes mode");
    kube.update_trust_roots(new_root.cert_pem.as_bytes())?;
    bed.wait_certificates("only the new root trusted", STEP_TIMEOUT, |c| {
        c.trust_anchors_pem == new_root.cert_pem
    })?;
    let removed_us = unix_micros();
    std::thread::sleep(AFTER);

    let late = Timeline::from_events(&late.stop());
    let mut findings = Findings::default();
    let timeline = bed.finish(load, &mut findings)?;
    findings.figure("add_anchor_s", seconds_between(started_us, added_us));
    findings.figure(
        "every_leaf_under_new_root_s",
        seconds_between(added_us, moved_us),
    );
    findings.figure(
        "old_leaves_expiry_wait_s",
        seconds_between(moved_us, old_leaves_expired_us),
    );
    findings.figure(
        "remove_old_anchor_s",
        seconds_between(late_up_us, removed_us),
    );
    let removal = late_up_us..=removed_us + 1_000_000;
    let failed_at_removal = timeline
        .failed()
        .chain(late.failed())
        .filter(|a| a.overlaps(*removal.start(), *removal.end()))
        .count();
    let early_breaks_before_removal = timeline
        .stream_breaks
        .iter()
        .filter(|b| b.end_us < late_up_us)
        .count();
    let early_cut_at_removal = timeline
        .stream_breaks
        .iter()
        .filter(|b| removal.contains(&b.end_us))
        .count();
    findings.figure("failed_at_old_anchor_removal", failed_at_removal);
    findings.figure("streams_broken_before_removal", early_breaks_before_removal);
    findings.figure(
        "streams_from_before_the_move_cut_at_removal",
        early_cut_at_removal,
    );
    findings.figure("late_connections_ok", late.ok());
    findings.figure("late_connections_failed", late.failed().count());
    findings.figure("late_streams_cut", late.stream_breaks.len());
    let failed = timeline.failed().count() + late.failed().count();
    findings.check(failed == 0, || {
        format!(
            "{failed} connections failed during the rotation, first: {:?}",
            timeline.first_error().or_else(|| late.first_error())
        )
    });
    findings.check(early_breaks_before_removal == 0, || {
        format!(
            "{early_breaks_before_removal} long-lived streams broke before the old root was removed"
        )
    });
    findings.check(late.stream_breaks.is_empty(), || {
        format!(
            "{} of {} streams opened after every leaf had moved to the new root were cut when the old root was removed ({:?}): new streams still ride HBONE connections authenticated by old-root leaves",
            late.stream_breaks.len(),
            args.streams,
            late.stream_breaks.first().map(|b| &b.error)
        )
    });
    Ok(findings)
}
