//! The identity service's own TLS, through real handshakes on loopback: it
//! serves TLS 1.3 only with a certificate for its own identity, a client
//! that speaks plaintext (a replayed token) gets nothing, and the serving
//! certificate follows issuer rotation.

mod support;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use rustls::{ClientConfig, ProtocolVersion, RootCertStore};
use rustls_pki_types::{CertificateDer, ServerName};
use sealmesh_common::identity::TrustDomain;
use sealmesh_pki::Layout;
use support::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_rustls::TlsConnector;
use x509_parser::prelude::{FromDer, X509Certificate};

/// What a plain webpki client (anchors only, no sealmesh code) sees of the
/// server when it asks for `server_name`.
struct Seen {
    chain: Vec<CertificateDer<'static>>,
    version: Option<ProtocolVersion>,
    alpn: Option<Vec<u8>>,
}

async fn handshake(
    addr: SocketAddr,
    anchors: &[CertificateDer<'static>],
    server_name: &str,
) -> Result<Seen, std::io::Error> {
    let mut roots = RootCertStore::empty();
    for anchor in anchors {
        roots.add(anchor.clone()).unwrap();
    }
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(addr).await?;
    let tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(server_name.to_owned()).unwrap(), tcp)
        .await?;
    let (_, connection) = tls.get_ref();
    Ok(Seen {
        chain: connection.peer_certificates().unwrap_or_default().to_vec(),
        version: connection.protocol_version(),
        alpn: connection.alpn_protocol().map(<[u8]>::to_vec),
    })
}

#[tokio::test]
async fn the_api_is_served_over_tls13_with_a_certificate_for_its_own_identity() {
    let cluster = TestCluster::new();
    let service = Running::start(cluster.config()).await;
    let identity_service = TrustDomain::default().identity_service();
    let seen = handshake(
        service.addr,
        &cluster.anchors(),
        &identity_service.dns_name(),
    )
    .await
    .unwrap();
    assert_eq!(seen.version, Some(ProtocolVersion::TLSv1_3));
    assert_eq!(seen.alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(
        san_strings(&seen.chain[0]),
        [
            "URI(spiffe://cluster.local/ns/sealmesh/sa/sealmesh-identity)",
            "DNSName(sealmesh-identity.sealmesh.serviceaccount.identity.sealmesh.cluster.local)",
            "DNSName(sealmesh-identity.sealmesh.svc)",
            "DNSName(sealmesh-identity.sealmesh.svc.cluster.local)",
        ]
    );
    assert_eq!(seen.chain[1..], pem_certs(&cluster.issuer.cert_pem)[..]);
    let (_, leaf) = X509Certificate::from_der(&seen.chain[0]).unwrap();
    let usages = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(
        usages.server_auth && !usages.client_auth,
        "a serving certificate only"
    );
    assert!(!leaf.is_ca());

    // The Service's names verify too (for clients that dial them).
    for name in TrustDomain::default().identity_service_hostnames() {
        handshake(service.addr, &cluster.anchors(), &name)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    // A client without the mesh's anchors does not trust it.
    let stranger = new_root_named("stranger.test");
    let error = handshake(
        service.addr,
        &pem_certs(&stranger.cert_pem),
        &identity_service.dns_name(),
    )
    .await
    .err()
    .expect("untrusted");
    assert!(error.to_string().contains("UnknownIssuer"), "{error}");
    service.stop().await;
}

#[tokio::test]
async fn a_plaintext_client_with_a_valid_token_gets_no_certificate() {
    let cluster = TestCluster::new();
    let service = Running::start(cluster.config()).await;
    let web = identity("web");

    // The replay: a captured node token sent the way the API used to be
    // served, gRPC over cleartext HTTP/2.
    let mut plaintext = sealmesh_proto::identity::identity_client::IdentityClient::new(
        tonic::transport::Endpoint::from_shared(format!("http://{}", service.addr))
            .unwrap()
            .timeout(Duration::from_secs(5))
            .connect_lazy(),
    );
    let status = plaintext
        .certify(request(&web, NODE0_TOKEN, csr_for(&web)))
        .await
        .expect_err("no certificate over plaintext");
    assert!(
        matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Internal
        ),
        "a transport failure, not an answer of the service: {status:?}"
    );

    // On the wire: the HTTP/2 preface is answered with a TLS alert and a
    // close, never with HTTP/2 (whose first frame would be SETTINGS).
    let mut tcp = TcpStream::connect(service.addr).await.unwrap();
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer))
        .await
        .expect("the server closes the connection")
        .ok();
    assert!(
        answer.is_empty() || answer[0] == 0x15,
        "only a TLS alert record (content type 21) may come back: {answer:?}"
    );

    // Not one Certify call reached the service; over TLS the same request
    // is served.
    let (_, metrics) = http_get(service.metrics_addr, "/metrics").await;
    assert!(
        !metrics.contains("sealmesh_identity_certificates_issued_total{"),
        "{metrics}"
    );
    service
        .client()
        .await
        .certify(request(&web, NODE0_TOKEN, csr_for(&web)))
        .await
        .unwrap();
    service.stop().await;
}

#[tokio::test]
async fn the_serving_certificate_is_reissued_when_the_issuer_rotates() {
    let cluster = TestCluster::new();
    let mut service = Running::start(cluster.config()).await;
    let name = TrustDomain::default().identity_service().dns_name();
    let before = handshake(service.addr, &cluster.anchors(), &name)
        .await
        .unwrap();
    assert_eq!(before.chain[1..], pem_certs(&cluster.issuer.cert_pem)[..]);

    let next = new_issuer(&cluster.root, "issuer-2.test", 30 * DAY);
    next.write_dir(&cluster.issuer_dir, Layout::Pem, true)
        .unwrap();
    loop {
        match service.next_event().await {
            Event::Updated(info) => {
                assert_eq!(info.subject, "CN=issuer-2.test");
                break;
            }
            // Files are replaced one by one: a transient key mismatch.
            Event::Skipped(reason) if reason.contains("the private key does not match") => {}
            other => panic!("expected the new issuer, got {other:?}"),
        }
    }
    // New handshakes get a certificate from the new issuer, and a client
    // verifying against the (unchanged) anchors connects and is served.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let after = loop {
        let seen = handshake(service.addr, &cluster.anchors(), &name)
            .await
            .unwrap();
        if seen.chain[1..] == pem_certs(&next.cert_pem)[..] {
            break seen;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the serving certificate was not re-issued by the new issuer"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_ne!(after.chain[0], before.chain[0]);
    assert_eq!(san_strings(&after.chain[0]), san_strings(&before.chain[0]));
    let web = identity("web");
    let issued = service
        .client()
        .await
        .certify(request(&web, NODE0_TOKEN, csr_for(&web)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        issued.intermediate_certificates,
        [pem_certs(&next.cert_pem)[0].to_vec()]
    );
    service.stop().await;
}

#[tokio::test]
async fn the_serving_certificate_is_renewed_before_it_expires() {
    let cluster = TestCluster::new();
    let mut config = cluster.config();
    // Leaves (the serving certificate too) live 4s + 1s skew: renewed at half.
    config.cert_lifetime = Duration::from_secs(4);
    config.clock_skew = Duration::from_secs(1);
    let service = Running::start(config).await;
    let name = TrustDomain::default().identity_service().dns_name();
    let first = handshake(service.addr, &cluster.anchors(), &name)
        .await
        .unwrap();
    let (_, leaf) = X509Certificate::from_der(&first.chain[0]).unwrap();
    let first_not_after = leaf.validity().not_after.timestamp();

    let started = std::time::Instant::now();
    let renewed = loop {
        let seen = handshake(service.addr, &cluster.anchors(), &name)
            .await
            .expect("a valid certificate is served all along");
        if seen.chain[0] != first.chain[0] {
            break seen;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "not renewed before the first one expired"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (_, leaf) = X509Certificate::from_der(&renewed.chain[0]).unwrap();
    assert!(leaf.validity().not_after.timestamp() > first_not_after);
    assert_eq!(san_strings(&renewed.chain[0]), san_strings(&first.chain[0]));
    let (_, metrics) = http_get(service.metrics_addr, "/metrics").await;
    assert!(
        metrics.contains(&format!(
            "sealmesh_identity_serving_certificate_expiry_timestamp_seconds {}",
            leaf.validity().not_after.timestamp()
        )),
        "{metrics}"
    );
    service.stop().await;
}
