//! Certify through the real gRPC service on loopback: issuance, every
//! refusal, both package names, health, metrics and concurrency.

mod support;

use std::{collections::HashSet, time::Duration};

use rcgen::{PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PKCS_ED25519, SanType};
use sealmesh_identity::{ServeError, ServerBuilder};
use sealmesh_pki::Layout;
use support::*;
use time::OffsetDateTime;
use tonic::Code;
use x509_parser::prelude::{FromDer, X509Certificate};

#[tokio::test]
async fn node_gets_a_24h_leaf_that_chains_to_the_anchors() {
    let cluster = TestCluster::new();
    let service = Running::start(cluster.config()).await;
    let web = identity("web");
    let before = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let response = service
        .client()
        .await
        .certify(request(&web, NODE0_TOKEN, csr_for(&web)))
        .await
        .unwrap()
        .into_inner();
    let after = OffsetDateTime::now_utc();

    assert_issued_for(&response, &cluster.anchors(), &web);
    assert_eq!(
        response.intermediate_certificates,
        [pem_certs(&cluster.issuer.cert_pem)[0].to_vec()]
    );

    let (_, leaf) = X509Certificate::from_der(&response.leaf_certificate).unwrap();
    assert_eq!(
        san_strings(&response.leaf_certificate),
        [
            "URI(spiffe://cluster.local/ns/emojivoto/sa/web)",
            "DNSName(web.emojivoto.serviceaccount.identity.sealmesh.cluster.local)"
        ]
    );
    let not_before = leaf.validity().not_before.to_datetime();
    let not_after = leaf.validity().not_after.to_datetime();
    // NotBefore = issuance time − 20s skew; lifetime 24h plus skew at both ends.
    assert!(
        not_before >= before - Duration::from_secs(20)
            && not_before <= after - Duration::from_secs(20),
        "{not_before} not 20s before issuance ({before}..{after})"
    );
    assert_eq!(not_after - not_before, time::Duration::seconds(86_400 + 40));
    assert_eq!(
        response.valid_until,
        Some(prost_types::Timestamp {
            seconds: not_after.unix_timestamp(),
            nanos: 0
        })
    );
    let serial = leaf.tbs_certificate.raw_serial();
    assert_eq!(serial.len(), 16, "128-bit serial");
    assert!(serial[0] < 0x80, "positive serial");
    service.stop().await;
}

#[tokio::test]
async fn served_under_linkerds_package_name_too() {
    let cluster = TestCluster::new();
    let service = Running::start(cluster.config()).await;
    let emoji = identity("emoji");
    let response = service
        .linkerd_client()
        .await
        .certify(sealmesh_proto::linkerd_identity::CertifyRequest {
            // Linkerd proxies send the DNS-form identity; the SPIFFE URI works too.
            identity: emoji.spiffe_uri(),
            token: NODE1_TOKEN.into(),
            certificate_signing_request: csr_for(&emoji),
        })
        .await
        .unwrap()
        .into_inner();
    verify_chain(
        &response.leaf_certificate,
        &response.intermediate_certificates,
        &cluster.anchors(),
        &emoji,
    )
    .unwrap();
    service.stop().await;
}

#[tokio::test]
async fn leaf_lifetime_is_clamped_to_the_issuer_and_follows_config() {
    let root = new_root();
    let short_issuer = new_issuer(&root, "short.test", Duration::from_secs(3600));
    let cluster = TestCluster::with(root, short_issuer, Layout::Tls);
    let issuer_not_after = {
        let der = &pem_certs(&cluster.issuer.cert_pem)[0];
        X509Certificate::from_der(der)
            .unwrap()
            .1
            .validity()
            .not_after
            .to_datetime()
    };
    let web = identity("web");

    let service = Running::start(cluster.config()).await;
    let response = service
        .client()
        .await
        .certify(request(&web, NODE0_TOKEN, csr_for(&web)))
        .await
        .unwrap()
        .into_inner();
    let (_, leaf) = X509Certificate::from_der(&response.leaf_certificate).unwrap();
    assert_eq!(leaf.validity().not_after.to_datetime(), issuer_not_after);
    assert_eq!(
        response.valid_until.unwrap().seconds,
        issuer_not_after.unix_timestamp()
    );
    service.stop().await;

    let mut config = cluster.config();
    config.cert_lifetime = Duration::from_secs(600);
    config.clock_skew = Duration::from_secs(5);
    let service = Running::start(config).await;
    let response = service
        .client()
        .await
        .certify(request(&web, NODE0_TOKEN, csr_for(&web)))
        .await
        .unwrap()
        .into_inner();
    let (_, leaf) = X509Certificate::from_der(&response.leaf_certificate).unwrap();
    let validity = leaf.validity();
    assert_eq!(
        validity.not_after.to_datetime() - validity.not_before.to_datetime(),
        time::Duration::seconds(610)
    );
    service.stop().await;
}

#[tokio::test]
async fn every_refusal_has_its_status_and_an_actionable_message() {
    let cluster = TestCluster::new();
    let service = Running::start(cluster.config()).await;
    let mut client = service.client().await;
    let web = identity("web");
    let emoji = identity("emoji");
    let mut extra_san = names_of(&web);
    extra_san.push(SanType::DnsName("evil.example.com".try_into().unwrap()));
    let mut bad_signature = csr_for(&web);
    let last = bad_signature.len() - 1;
    bad_signature[last] ^= 0x55;

    let cases: Vec<(&str, _, Code, &str)> = vec![
        (
            "unknown token",
            request(&web, "not-a-token", csr_for(&web)),
            Code::Unauthenticated,
            "not a known node or ServiceAccount credential",
        ),
        (
            "no token",
            request(&web, "", csr_for(&web)),
            Code::Unauthenticated,
            "no token was sent",
        ),
        (
            "node asks for an SA not on its node",
            request(&emoji, NODE0_TOKEN, csr_for(&emoji)),
            Code::PermissionDenied,
            "node node-0 runs no meshed pod with the identity spiffe://cluster.local/ns/emojivoto/sa/emoji",
        ),
        (
            "workload asks for another SA",
            request(&emoji, WEB_TOKEN, csr_for(&emoji)),
            Code::PermissionDenied,
            "workload spiffe://cluster.local/ns/emojivoto/sa/web may not request spiffe://cluster.local/ns/emojivoto/sa/emoji",
        ),
        (
            "CSR for another identity",
            request(&web, NODE0_TOKEN, csr_for(&identity("voting"))),
            Code::InvalidArgument,
            "the CSR asks for URI SAN spiffe://cluster.local/ns/emojivoto/sa/voting",
        ),
        (
            "CSR with an extra SAN",
            request(
                &web,
                NODE0_TOKEN,
                csr_with(&PKCS_ECDSA_P256_SHA256, extra_san),
            ),
            Code::InvalidArgument,
            "DNS SAN evil.example.com",
        ),
        (
            "CSR without identity",
            request(&web, NODE0_TOKEN, csr_with(&PKCS_ECDSA_P256_SHA256, vec![])),
            Code::InvalidArgument,
            "the CSR names no identity",
        ),
        (
            "Ed25519 key",
            request(&web, NODE0_TOKEN, csr_with(&PKCS_ED25519, names_of(&web))),
            Code::InvalidArgument,
            "the CSR's key is Ed25519; only ECDSA P-256",
        ),
        (
            "P-384 key",
            request(
                &web,
                NODE0_TOKEN,
                csr_with(&PKCS_ECDSA_P384_SHA384, names_of(&web)),
            ),
            Code::InvalidArgument,
            "the CSR's key is ECDSA P-384; only ECDSA P-256",
        ),
        (
            "bad CSR signature",
            request(&web, NODE0_TOKEN, bad_signature),
            Code::InvalidArgument,
            "signature does not verify",
        ),
        (
            "garbage CSR",
            request(&web, NODE0_TOKEN, b"garbage".to_vec()),
            Code::InvalidArgument,
            "not a DER-encoded PKCS#10 CSR",
        ),
        (
            "malformed identity",
            pb_request("web.emojivoto", NODE0_TOKEN, csr_for(&web)),
            Code::InvalidArgument,
            "is not a sealmesh identity DNS name",
        ),
        (
            "foreign trust domain",
            pb_request(
                "spiffe://evil.org/ns/emojivoto/sa/web",
                NODE0_TOKEN,
                csr_for(&web),
            ),
            Code::InvalidArgument,
            "expected spiffe://cluster.local/ns/<namespace>/sa/<serviceaccount>",
        ),
    ];
    for (what, request, code, message) in cases {
        let status = client.certify(request).await.expect_err(what);
        assert_eq!(status.code(), code, "{what}: {}", status.message());
        assert!(
            status.message().contains(message),
            "{what}: {:?} lacks {message:?}",
            status.message()
        );
        assert!(
            !status.message().contains("secret-token"),
            "{what}: message leaks a token"
        );
    }

    // Workload mode: a workload's own identity is fine.
    client
        .certify(request(&web, WEB_TOKEN, csr_for(&web)))
        .await
        .unwrap();
    service.stop().await;
}

fn pb_request(
    identity: &str,
    token: &str,
    csr: Vec<u8>,
) -> sealmesh_proto::identity::CertifyRequest {
    sealmesh_proto::identity::CertifyRequest {
        identity: identity.into(),
        token: token.as_bytes().to_vec(),
        certificate_signing_request: csr,
    }
}

#[tokio::test]
async fn pods_and_nodes_added_to_the_cluster_file_later_are_seen() {
    let mut cluster = TestCluster::new();
    let service = Running::start(cluster.config()).await;
    let mut client = service.client().await;
    let emoji = identity("emoji");
    let status = client
        .certify(request(&emoji, NODE0_TOKEN, csr_for(&emoji)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);

    cluster
        .file
        .pods
        .push(pod("emoji-1", "emoji", "node-0", "10.244.0.3"));
    let node2_token = cluster.dir.path().join("node-2.token");
    write_file(&node2_token, "node-2-secret-token");
    cluster.file.nodes.push(sealmesh_common::cluster::Node {
        name: "node-2".into(),
        ip: "172.18.0.4".parse().unwrap(),
        pod_cidr: "10.244.2.0/24".parse().unwrap(),
        cgroup: "/sys/fs/cgroup/sealmesh-test/node-2".into(),
        token_file: Some(node2_token.clone()),
        netns: None,
    });
    cluster
        .file
        .pods
        .push(pod("web-2", "web", "node-2", "10.244.2.2"));
    cluster.save();

    client
        .certify(request(&emoji, NODE0_TOKEN, csr_for(&emoji)))
        .await
        .unwrap();
    let web = identity("web");
    client
        .certify(request(&web, "node-2-secret-token", csr_for(&web)))
        .await
        .unwrap();

    // A token file rewritten in place (cluster file unchanged) is picked up too.
    write_file(&node2_token, "node-2-rotated-token");
    client
        .certify(request(&web, "node-2-rotated-token", csr_for(&web)))
        .await
        .unwrap();
    let status = client
        .certify(request(&web, "node-2-secret-token", csr_for(&web)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    service.stop().await;
}

#[tokio::test]
async fn an_expired_issuer_is_refused_at_start() {
    let root = new_root();
    let now = OffsetDateTime::now_utc();
    let (expired, _) = sealmesh_pki::generate_issuer(
        &root.material(),
        &sealmesh_pki::CaSpec {
            common_name: "expired.test".into(),
            not_before: now - Duration::from_secs(7200),
            not_after: now - Duration::from_secs(3600),
        },
    )
    .unwrap();
    let cluster = TestCluster::with(root, expired, Layout::Pem);
    let err = ServerBuilder::new(cluster.config())
        .bind()
        .await
        .unwrap_err();
    assert!(matches!(err, ServeError::Issuer { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("certificate \"CN=expired.test\" expired at")
            && message.contains("issue a new one")
            && message.contains("refusing to start without a valid issuer"),
        "{message}"
    );
}

#[tokio::test]
async fn an_issuer_from_another_root_is_refused_at_start() {
    let other_root = new_root();
    let foreign = new_issuer(&other_root, "foreign.test", DAY);
    let mut cluster = TestCluster::new();
    std::fs::remove_dir_all(&cluster.issuer_dir).unwrap();
    foreign
        .write_dir(&cluster.issuer_dir, Layout::Pem, false)
        .unwrap();
    cluster.issuer = foreign;
    let err = ServerBuilder::new(cluster.config())
        .bind()
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("does not chain to any trust anchor"),
        "{err}"
    );
}

#[tokio::test]
async fn two_hundred_parallel_calls_all_succeed_with_distinct_serials() {
    let cluster = TestCluster::new();
    let service = Running::start(cluster.config()).await;
    let client = service.client().await;
    let web = identity("web");
    let calls = (0..200).map(|_| {
        let mut client = client.clone();
        let request = request(&web, NODE0_TOKEN, csr_for(&web));
        tokio::spawn(async move { client.certify(request).await.map(|r| r.into_inner()) })
    });
    let mut serials = HashSet::new();
    for call in futures::future::join_all(calls).await {
        let response = call.unwrap().unwrap();
        let (_, leaf) = X509Certificate::from_der(&response.leaf_certificate).unwrap();
        serials.insert(leaf.tbs_certificate.raw_serial().to_vec());
    }
    assert_eq!(serials.len(), 200);
    service.stop().await;
}

#[tokio::test]
async fn metrics_health_and_probes() {
    let cluster = TestCluster::new();
    let service = Running::start(cluster.config()).await;
    let mut client = service.client().await;
    let web = identity("web");
    for _ in 0..2 {
        client
            .certify(request(&web, NODE0_TOKEN, csr_for(&web)))
            .await
            .unwrap();
    }
    client
        .certify(request(&web, "wrong", csr_for(&web)))
        .await
        .unwrap_err();
    client
        .certify(request(&web, NODE0_TOKEN, b"x".to_vec()))
        .await
        .unwrap_err();

    let (status, text) = http_get(service.metrics_addr, "/metrics").await;
    assert_eq!(status, 200);
    let issuer_not_after = X509Certificate::from_der(&pem_certs(&cluster.issuer.cert_pem)[0])
        .unwrap()
        .1
        .validity()
        .not_after
        .timestamp();
    let anchors = cluster.anchors();
    let (_, root) = X509Certificate::from_der(&anchors[0]).unwrap();
    let expected = [
        "sealmesh_identity_certificates_issued_total{result=\"ok\"} 2".to_owned(),
        "sealmesh_identity_certificates_issued_total{result=\"unauthenticated\"} 1".to_owned(),
        "sealmesh_identity_certificates_issued_total{result=\"invalid_argument\"} 1".to_owned(),
        "sealmesh_identity_issuance_duration_seconds_count 4".to_owned(),
        format!("sealmesh_identity_issuer_expiry_timestamp_seconds {issuer_not_after}"),
        format!(
            "sealmesh_identity_trust_anchor_expiry_timestamp_seconds{{subject=\"CN=root.test\",serial=\"{}\"}} {}",
            root.raw_serial_as_string(),
            root.validity().not_after.timestamp()
        ),
    ];
    for line in expected {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    assert_eq!(
        http_get(service.metrics_addr, "/healthz/live").await,
        (200, "ok\n".into())
    );
    assert_eq!(
        http_get(service.metrics_addr, "/healthz/ready").await,
        (200, "ok\n".into())
    );
    assert_eq!(http_get(service.metrics_addr, "/nope").await.0, 404);

    let mut health = tonic_health::pb::health_client::HealthClient::new(tls_channel(
        service.addr,
        &service.anchors,
    ));
    for name in [
        "",
        "sealmesh.identity.v1.Identity",
        "io.linkerd.proxy.identity.Identity",
    ] {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: name.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{name:?}"
        );
    }
    service.stop().await;
}

#[tokio::test]
async fn a_node_obtains_only_identities_of_its_meshed_pods() {
    let mut cluster = TestCluster::new();
    // node-0 also runs a pod of an unmeshed namespace and one that opted out.
    cluster
        .file
        .namespaces
        .push(sealmesh_common::cluster::Namespace {
            name: "plain".into(),
            labels: Default::default(),
            annotations: Default::default(),
        });
    cluster.file.pods.push(sealmesh_common::cluster::Pod {
        namespace: "plain".into(),
        ..pod("curl", "default", "node-0", "10.244.0.3")
    });
    cluster.file.pods.push(sealmesh_common::cluster::Pod {
        annotations: [("sealmesh.io/mesh".into(), "disabled".into())].into(),
        ..pod("db-0", "db", "node-0", "10.244.0.4")
    });
    cluster.save();
    let service = Running::start(cluster.config()).await;
    let mut client = service.client().await;
    let unmeshed = sealmesh_common::identity::TrustDomain::default()
        .identity("plain", "default")
        .unwrap();
    for (identity, why) in [
        (&unmeshed, "namespace not meshed"),
        (&identity("db"), "opted out"),
    ] {
        let status = client
            .certify(request(identity, NODE0_TOKEN, csr_for(identity)))
            .await
            .expect_err(why);
        assert_eq!(status.code(), Code::PermissionDenied, "{why}");
        assert_eq!(
            status.message(),
            format!(
                "node node-0 runs no meshed pod with the identity {identity}; an agent may only request \
                 identities of meshed pods (namespace labelled sealmesh.io/mesh=enabled, no sealmesh.io/mesh: \
                 disabled annotation) scheduled on its node"
            ),
            "{why}"
        );
    }
    // Its meshed pod's identity it still obtains.
    let web = identity("web");
    client
        .certify(request(&web, NODE0_TOKEN, csr_for(&web)))
        .await
        .unwrap();

    // Meshing the namespace (a label in the cluster file) is followed.
    cluster.file.namespaces.last_mut().unwrap().labels =
        [("sealmesh.io/mesh".into(), "enabled".into())].into();
    cluster.save();
    client
        .certify(request(&unmeshed, NODE0_TOKEN, csr_for(&unmeshed)))
        .await
        .unwrap();
    service.stop().await;
}

#[tokio::test]
async fn a_service_account_name_with_dots_gets_its_identity() {
    let mut cluster = TestCluster::new();
    cluster
        .file
        .pods
        .push(pod("api-0", "api.v2", "node-0", "10.244.0.3"));
    cluster.save();
    let service = Running::start(cluster.config()).await;
    let api = identity("api.v2");
    let response = service
        .client()
        .await
        .certify(request(&api, NODE0_TOKEN, csr_for(&api)))
        .await
        .unwrap()
        .into_inner();
    assert_issued_for(&response, &cluster.anchors(), &api);
    assert_eq!(
        san_strings(&response.leaf_certificate),
        [
            "URI(spiffe://cluster.local/ns/emojivoto/sa/api.v2)",
            "DNSName(api.v2.emojivoto.serviceaccount.identity.sealmesh.cluster.local)"
        ]
    );
    service.stop().await;
}

#[tokio::test]
async fn a_caller_over_its_rate_is_refused_before_its_token_is_checked() {
    let cluster = TestCluster::new();
    let mut config = cluster.config();
    config.limits.caller_rate = std::num::NonZeroU32::new(1);
    let service = Running::start(config).await;
    let web = identity("web");
    let mut client = service.client().await;
    // The burst (ten times the rate) is admitted and answered on its merits...
    for call in 0..10 {
        let refused = client
            .certify(request(&web, "bogus-token", csr_for(&web)))
            .await
            .expect_err("a bogus token is refused");
        assert_eq!(
            refused.code(),
            Code::Unauthenticated,
            "call {call}: {refused:?}"
        );
    }
    // ...then the caller, known by its address through the TLS listener, is
    // refused at once, whatever it sends.
    let limited = client
        .certify(request(&web, NODE0_TOKEN, csr_for(&web)))
        .await
        .expect_err("over the rate");
    assert_eq!(limited.code(), Code::ResourceExhausted, "{limited:?}");
    assert_eq!(
        limited.message(),
        "caller 127.0.0.1 exceeded 1 certificate requests per second; retry with back-off"
    );
    // One token a second later.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    client
        .certify(request(&web, NODE0_TOKEN, csr_for(&web)))
        .await
        .expect("admitted again after the rate's period");
    service.stop().await;
}
