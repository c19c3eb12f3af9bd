//! Issuer rotation while serving: plain rewrites and kubelet `..data`
//! symlink swaps switch to the new issuer; invalid issuers are skipped.

mod support;

use std::{os::unix::fs::symlink, path::Path};

use sealmesh_pki::{GeneratedCa, Layout};
use support::*;

async fn certify_web(service: &Running) -> sealmesh_proto::identity::CertifyResponse {
    let web = identity("web");
    service
        .client()
        .await
        .certify(request(&web, NODE0_TOKEN, csr_for(&web)))
        .await
        .unwrap()
        .into_inner()
}

fn issuer_der(issuer: &GeneratedCa) -> Vec<u8> {
    pem_certs(&issuer.cert_pem)[0].to_vec()
}

/// Files are replaced one by one, so the watcher may see a new certificate
/// with the old key for a moment; that transient mismatch is skipped (and
/// reported) before the complete issuer is taken.
fn is_transient(event: &Event) -> bool {
    matches!(event, Event::Skipped(reason) if reason.contains("the private key does not match"))
}

async fn expect_updated_to(service: &mut Running, common_name: &str) {
    loop {
        match service.next_event().await {
            Event::Updated(info) => return assert_eq!(info.subject, format!("CN={common_name}")),
            event if is_transient(&event) => continue,
            other => panic!("expected IssuerUpdated to {common_name}, got {other:?}"),
        }
    }
}

async fn expect_skipped_because(service: &mut Running, reason_part: &str) {
    loop {
        match service.next_event().await {
            Event::Skipped(reason) if reason.contains(reason_part) => return,
            event if is_transient(&event) => continue,
            other => panic!("expected IssuerUpdateSkipped for {reason_part:?}, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn rewritten_issuer_files_take_over_and_old_leaves_still_verify() {
    let cluster = TestCluster::new();
    let mut service = Running::start(cluster.config()).await;
    let web = identity("web");
    let old_leaf = certify_web(&service).await;
    assert_eq!(
        old_leaf.intermediate_certificates,
        [issuer_der(&cluster.issuer)]
    );

    let next = new_issuer(&cluster.root, "issuer-2.test", 30 * DAY);
    next.write_dir(&cluster.issuer_dir, Layout::Pem, true)
        .unwrap();
    expect_updated_to(&mut service, "issuer-2.test").await;

    let new_leaf = certify_web(&service).await;
    assert_eq!(new_leaf.intermediate_certificates, [issuer_der(&next)]);
    let anchors = cluster.anchors();
    assert_issued_for(&new_leaf, &anchors, &web);
    assert_issued_for(&old_leaf, &anchors, &web);
    service.stop().await;
}

/// Lays out `issuer` the way kubelet projects a Secret: files in a
/// timestamped directory, `..data` pointing at it, and top-level symlinks
/// through `..data`.
fn kubelet_project(dir: &Path, version: &str, issuer: &GeneratedCa) {
    let versioned = dir.join(version);
    issuer.write_dir(&versioned, Layout::Tls, false).unwrap();
    let tmp_link = dir.join("..data_tmp");
    symlink(version, &tmp_link).unwrap();
    std::fs::rename(&tmp_link, dir.join("..data")).unwrap();
    for file in ["tls.crt", "tls.key", "ca.crt"] {
        let top = dir.join(file);
        if std::fs::symlink_metadata(&top).is_err() {
            symlink(format!("..data/{file}"), top).unwrap();
        }
    }
}

#[tokio::test]
async fn kubelet_data_symlink_swap_is_followed() {
    let cluster = TestCluster::new();
    let issuer_dir = cluster.dir.path().join("projected");
    std::fs::create_dir(&issuer_dir).unwrap();
    kubelet_project(&issuer_dir, "..2026_01_01_00_00_00.1", &cluster.issuer);
    let mut config = cluster.config();
    local_sources(&mut config).issuer_dir = issuer_dir.clone();
    let mut service = Running::start(config).await;
    let old_leaf = certify_web(&service).await;

    let next = new_issuer(&cluster.root, "issuer-2.test", 30 * DAY);
    kubelet_project(&issuer_dir, "..2026_01_02_00_00_00.2", &next);
    std::fs::remove_dir_all(issuer_dir.join("..2026_01_01_00_00_00.1")).unwrap();
    expect_updated_to(&mut service, "issuer-2.test").await;

    let new_leaf = certify_web(&service).await;
    assert_eq!(new_leaf.intermediate_certificates, [issuer_der(&next)]);
    let web = identity("web");
    let anchors = cluster.anchors();
    assert_issued_for(&new_leaf, &anchors, &web);
    assert_issued_for(&old_leaf, &anchors, &web);
    service.stop().await;
}

#[tokio::test]
async fn invalid_issuers_are_skipped_and_the_old_one_keeps_signing() {
    let cluster = TestCluster::new();
    let mut service = Running::start(cluster.config()).await;

    // Signed by a root that is not a trust anchor.
    let foreign = new_issuer(&new_root(), "foreign.test", DAY);
    foreign
        .write_dir(&cluster.issuer_dir, Layout::Pem, true)
        .unwrap();
    expect_skipped_because(
        &mut service,
        "issuer \"CN=foreign.test\" does not chain to any trust anchor",
    )
    .await;
    let leaf = certify_web(&service).await;
    assert_eq!(
        leaf.intermediate_certificates,
        [issuer_der(&cluster.issuer)]
    );

    // A key that does not belong to the certificate.
    let next = new_issuer(&cluster.root, "issuer-2.test", DAY);
    let mismatched = GeneratedCa {
        key_pem: new_issuer(&cluster.root, "other.test", DAY).key_pem,
        ..next.clone()
    };
    mismatched
        .write_dir(&cluster.issuer_dir, Layout::Pem, true)
        .unwrap();
    match service.next_event().await {
        Event::Skipped(reason) => assert!(
            reason.contains("the private key does not match certificate"),
            "{reason}"
        ),
        other => panic!("expected IssuerUpdateSkipped, got {other:?}"),
    }
    let leaf = certify_web(&service).await;
    assert_eq!(
        leaf.intermediate_certificates,
        [issuer_der(&cluster.issuer)]
    );

    // Fixing it is picked up.
    next.write_dir(&cluster.issuer_dir, Layout::Pem, true)
        .unwrap();
    expect_updated_to(&mut service, "issuer-2.test").await;
    let leaf = certify_web(&service).await;
    assert_eq!(leaf.intermediate_certificates, [issuer_der(&next)]);
    service.stop().await;
}

#[tokio::test]
async fn the_hash_poll_catches_changes_the_watcher_cannot_see() {
    let cluster = TestCluster::new();
    let issuer_dir = cluster.dir.path().join("projected");
    std::fs::create_dir(&issuer_dir).unwrap();
    let version = "..2026_01_01_00_00_00.1";
    kubelet_project(&issuer_dir, version, &cluster.issuer);
    let mut config = cluster.config();
    local_sources(&mut config).issuer_dir = issuer_dir.clone();
    local_sources(&mut config).issuer_poll_interval = std::time::Duration::from_millis(300);
    let mut service = Running::start(config).await;

    // Rewriting inside the versioned directory raises no event in the
    // watched directory itself; only the content-hash poll notices.
    let next = new_issuer(&cluster.root, "issuer-2.test", 30 * DAY);
    next.write_dir(&issuer_dir.join(version), Layout::Tls, true)
        .unwrap();
    expect_updated_to(&mut service, "issuer-2.test").await;
    let leaf = certify_web(&service).await;
    assert_eq!(leaf.intermediate_certificates, [issuer_der(&next)]);
    service.stop().await;
}
