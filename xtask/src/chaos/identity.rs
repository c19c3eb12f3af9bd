//! Identity service faults: `identity-outage` and `identity-flood`.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};
use sealmesh_common::{
    consts::{CERTIFICATE_OBTAINED_MESSAGE, IDENTITY_GRPC_PORT},
    identity::TrustDomain,
};
use sealmesh_identity::client;
use sealmesh_pki as pki;
use sealmesh_proto::identity::{CertifyRequest, identity_client::IdentityClient};
use serde_json::Value;
use tokio::sync::Semaphore;

use super::{
    Bed, CLIENT_NODE, CLIENT_POD, ChaosArgs, ChaosError, Findings, NAMESPACE, SERVER_NODE,
    load::{seconds_between, unix_micros},
    parse_debug_duration, quantile,
};
use crate::mesh::MeshOptions;

/// What an agent logs when it renews a certificate, and when an attempt fails.
const RENEWED_MESSAGE: &str = "certificate renewed";
const RENEWAL_FAILED_MESSAGE: &str = "cannot obtain certificate";
/// The agents' deadline for one Certify call (`RenewalPolicy::request_timeout`).
const RENEWAL_DEADLINE: Duration = Duration::from_secs(10);

/// Identity service flags for short-lived leaves: exactly `lifetime`, no
/// skew allowance, so renewal times follow from it.
fn short_leaves(lifetime: Duration) -> MeshOptions {
    MeshOptions {
        identity_args: vec![
            format!("--cert-lifetime={}s", lifetime.as_secs()),
            "--clock-skew=0s".into(),
        ],
        ..MeshOptions::default()
    }
}

/// Leaf lifetime of `identity-outage`: agents first try to renew 45–63 s
/// after issue, and retry 0.5–32 s apart by the time the service returns,
/// well before NotAfter.
const OUTAGE_LIFETIME: Duration = Duration::from_secs(90);
const RENEWAL_WAIT: Duration = Duration::from_secs(90);

/// Stops the identity service until every agent has failed to renew (the
/// outage is longer than their renewal period), under load, then starts it
/// again.
pub(super) fn identity_outage(args: &ChaosArgs) -> Result<Findings, ChaosError> {
    let mut bed = Bed::up(short_leaves(OUTAGE_LIFETIME))?;
    let load = bed.start_load(args)?;
    // The earliest NotAfter among the certificates held when it goes away.
    let mut not_after_us = u64::MAX;
    for node in [CLIENT_NODE, SERVER_NODE] {
        for cert in bed.certificates(node)?.certificates {
            let not_after = u64::try_from(cert.not_after_unix).unwrap_or(0) * 1_000_000;
            not_after_us = not_after_us.min(not_after);
        }
    }
    let stopped_us = unix_micros();
    bed.mesh.stop_identity();
    let deadline = Instant::now() + OUTAGE_LIFETIME;
    loop {
        let mut all_failed = true;
        for node in [CLIENT_NODE, SERVER_NODE] {
            all_failed &= bed
                .agent_log_times(node, RENEWAL_FAILED_MESSAGE)?
                .iter()
                .any(|(at, _)| *at >= stopped_us);
        }
        if all_failed {
            break;
        }
        if Instant::now() > deadline {
            return Err(ChaosError::Timeout {
                what: "every agent to fail a renewal while the identity service is down".into(),
                timeout: OUTAGE_LIFETIME,
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let back_us = unix_micros();
    bed.mesh.start_identity()?;

    // Each agent renews again after the return.
    let deadline = Instant::now() + RENEWAL_WAIT;
    let mut renewed_us = BTreeMap::new();
    for node in [CLIENT_NODE, SERVER_NODE] {
        loop {
            let renewal = bed
                .agent_log_times(node, RENEWED_MESSAGE)?
                .into_iter()
                .map(|(at, _)| at)
                .find(|at| *at >= back_us);
            if let Some(at) = renewal {
                renewed_us.insert(node, at);
                break;
            }
            if Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    std::thread::sleep(Duration::from_secs(2));

    let mut findings = Findings::default();
    let timeline = bed.finish(load, &mut findings)?;
    let failed_renewals: Vec<usize> = [CLIENT_NODE, SERVER_NODE]
        .iter()
        .map(|node| {
            bed.agent_log_times(node, RENEWAL_FAILED_MESSAGE)
                .map(|lines| {
                    lines
                        .iter()
                        .filter(|(at, _)| (stopped_us..=back_us).contains(at))
                        .count()
                })
        })
        .collect::<Result<_, _>>()?;
    let all_renewed_us = renewed_us.values().max().copied();
    // Certificates ran out (fail closed, by design) only if a renewal came after NotAfter.
    let expired = (not_after_us, all_renewed_us.unwrap_or(u64::MAX));
    let failed_while_valid = timeline
        .failed()
        .filter(|a| expired.0 >= expired.1 || !a.overlaps(expired.0, expired.1))
        .count();
    findings.figure("leaf_lifetime_s", OUTAGE_LIFETIME.as_secs());
    findings.figure("outage_s", seconds_between(stopped_us, back_us));
    findings.figure(
        "renewal_attempts_failed_in_outage_node0",
        failed_renewals[0],
    );
    findings.figure(
        "renewal_attempts_failed_in_outage_node1",
        failed_renewals[1],
    );
    for (node, key) in [
        (CLIENT_NODE, "recovery_node0_s"),
        (SERVER_NODE, "recovery_node1_s"),
    ] {
        findings.figure(
            key,
            renewed_us.get(node).map(|at| seconds_between(back_us, *at)),
        );
    }
    findings.figure(
        "certificates_expired",
        all_renewed_us.is_none_or(|at| at > not_after_us),
    );
    findings.figure("failed_while_valid", failed_while_valid);
    findings.check(failed_while_valid == 0, || {
        format!(
            "{failed_while_valid} connections failed while certificates were valid, first: {:?}",
            timeline.first_error()
        )
    });
    findings.check(renewed_us.len() == 2, || {
        format!("not every agent renewed within {RENEWAL_WAIT:?} of the return")
    });
    Ok(findings)
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

/// Leaf lifetime of `identity-flood`: agents renew every 5–7 s.
const FLOOD_LIFETIME: Duration = Duration::from_secs(10);
const FLOOD_FOR: Duration = Duration::from_secs(25);
/// Bogus calls in flight at most; beyond, ticks are skipped and counted.
const FLOOD_IN_FLIGHT: usize = 256;

/// What the flood did.
#[derive(Debug, Default)]
struct Flood {
    sent: u64,
    /// Ticks skipped because `FLOOD_IN_FLIGHT` calls were pending.
    skipped: u64,
    seconds: f64,
    /// gRPC status code → calls that ended with it.
    by_code: BTreeMap<String, u64>,
}

/// Sends bogus Certify calls (random tokens, a real CSR) from a pod while
/// agents renew short-lived certificates under load.
pub(super) fn identity_flood(args: &ChaosArgs) -> Result<Findings, ChaosError> {
    let mut bed = Bed::up(short_leaves(FLOOD_LIFETIME))?;
    let load = bed.start_load(args)?;
    let testbed = bed.mesh.testbed();
    let anchors_pem =
        std::fs::read(bed.mesh.pki_dir().join("ca-bundle.crt")).map_err(|source| {
            ChaosError::Io {
                what: "reading the trust anchors".into(),
                source,
            }
        })?;
    let cluster = testbed.cluster();
    let pod = cluster
        .pod(NAMESPACE, CLIENT_POD)
        .expect("the scenarios' spec has this pod");
    let identity = cluster
        .identity_of(pod)
        .map_err(crate::testbed::TestbedError::from)?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|e| ChaosError::Flood(e.to_string()))?;
    let csr = pki::identity_params(&identity)
        .and_then(|params| params.serialize_request(&key))
        .map_err(|e| ChaosError::Flood(e.to_string()))?
        .der()
        .to_vec();
    let address = SocketAddr::from((testbed.control_plane_ip(), IDENTITY_GRPC_PORT));
    let request = CertifyRequest {
        identity: identity.dns_name(),
        token: Vec::new(),
        certificate_signing_request: csr,
    };
    let rate = args.bogus_rate.max(1);
    let flood_start_us = unix_micros();
    let flood = testbed
        .thread_in_netns(testbed.pod_netns(NAMESPACE, CLIENT_POD)?, move || {
            flood(address, &anchors_pem, request, rate)
        })?
        .join()
        .map_err(|_| ChaosError::Flood("the flood thread panicked".into()))??;
    let flood_end_us = unix_micros();
    std::thread::sleep(Duration::from_secs(1));

    let mut findings = Findings::default();
    bed.finish(load, &mut findings)?;
    findings.figure("bogus_rate_asked_per_s", rate);
    findings.figure("bogus_calls", flood.sent);
    findings.figure("bogus_rate_per_s", flood.sent as f64 / flood.seconds);
    findings.figure("bogus_ticks_skipped", flood.skipped);
    for (code, count) in &flood.by_code {
        findings.figure(&format!("bogus_answered_{code}"), *count);
    }
    let mut latencies = Vec::new();
    for (node, label) in [(CLIENT_NODE, "node0"), (SERVER_NODE, "node1")] {
        let renewals = renewals(&bed, node)?;
        let during: Vec<f64> = renewals
            .iter()
            .filter(|(at, _)| (flood_start_us..=flood_end_us).contains(at))
            .map(|(_, latency)| *latency)
            .collect();
        let failures = bed
            .agent_log_times(node, RENEWAL_FAILED_MESSAGE)?
            .iter()
            .filter(|(at, _)| (flood_start_us..=flood_end_us).contains(at))
            .count();
        findings.figure(&format!("renewals_during_flood_{label}"), during.len());
        findings.figure(&format!("renewal_failures_during_flood_{label}"), failures);
        findings.check(!during.is_empty(), || {
            format!("the agent of {node} renewed nothing during the flood")
        });
        findings.check(failures == 0, || {
            format!("{failures} renewal attempts of {node} failed during the flood")
        });
        latencies.extend(during);
    }
    let p50 = quantile(&latencies, 0.5);
    let max = quantile(&latencies, 1.0);
    findings.figure("renewal_latency_p50_s", p50);
    findings.figure("renewal_latency_max_s", max);
    findings.check(
        max.is_some_and(|max| max < RENEWAL_DEADLINE.as_secs_f64()),
        || format!("a renewal took {max:?} s, beyond the agents' {RENEWAL_DEADLINE:?} deadline"),
    );
    let ok_bogus = flood.by_code.get("Ok").copied().unwrap_or(0);
    findings.check(ok_bogus == 0, || {
        format!("{ok_bogus} bogus calls were answered with a certificate")
    });
    Ok(findings)
}

/// Each renewal of `node`'s agent: when it was installed, and how long after
/// it was due (the previous certificate's arrival + its `renew_in`) in
/// seconds: the time the Certify round trip (with any retries) took.
fn renewals(bed: &Bed, node: &str) -> Result<Vec<(u64, f64)>, ChaosError> {
    let mut lines: Vec<(u64, Value)> = bed.agent_log_times(node, CERTIFICATE_OBTAINED_MESSAGE)?;
    lines.extend(bed.agent_log_times(node, RENEWED_MESSAGE)?);
    lines.sort_by_key(|(at, _)| *at);
    let mut due: BTreeMap<String, u64> = BTreeMap::new();
    let mut renewals = Vec::new();
    for (at, line) in lines {
        let identity = line["identity"].as_str().unwrap_or_default().to_owned();
        if let Some(due_us) = due.get(&identity)
            && line["message"] == RENEWED_MESSAGE
        {
            renewals.push((at, seconds_between(*due_us, at)));
        }
        if let Some(renew_in) = line["renew_in"].as_str().and_then(parse_debug_duration) {
            due.insert(identity, at + micros(renew_in));
        }
    }
    Ok(renewals)
}

/// Bogus Certify calls at `rate` a second for [`FLOOD_FOR`] over one TLS
/// connection, from the calling thread's network namespace.
fn flood(
    address: SocketAddr,
    anchors_pem: &[u8],
    request: CertifyRequest,
    rate: u32,
) -> Result<Flood, ChaosError> {
    let anchors = pki::parse_pem_certs(anchors_pem, "the mesh's trust anchors")
        .map_err(|e| ChaosError::Flood(e.to_string()))?;
    // Current-thread: every socket is made on this thread, in its namespace.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ChaosError::Flood(e.to_string()))?;
    runtime.block_on(async {
        let channel = client::channel_with_anchors(
            address,
            &anchors,
            &TrustDomain::default(),
            Duration::from_secs(10),
        )
        .map_err(|e| ChaosError::Flood(e.to_string()))?;
        let in_flight = Arc::new(Semaphore::new(FLOOD_IN_FLIGHT));
        let by_code = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
        let mut ticks = tokio::time::interval(Duration::from_secs(1) / rate);
        let mut flood = Flood::default();
        let started = Instant::now();
        while started.elapsed() < FLOOD_FOR {
            ticks.tick().await;
            let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                flood.skipped += 1;
                continue;
            };
            let mut call = request.clone();
            call.token = hex::encode(rand::random::<[u8; 32]>()).into_bytes();
            let mut client = IdentityClient::new(channel.clone());
            let by_code = by_code.clone();
            tokio::spawn(async move {
                let code = match client.certify(call).await {
                    Ok(_) => "Ok".to_owned(),
                    Err(status) => format!("{:?}", status.code()),
                };
                *by_code.lock().expect("flood lock").entry(code).or_default() += 1;
                drop(permit);
            });
            flood.sent += 1;
        }
        let all = u32::try_from(FLOOD_IN_FLIGHT).expect("a small constant");
        let _ = in_flight.acquire_many(all).await;
        flood.seconds = started.elapsed().as_secs_f64();
        flood.by_code = std::mem::take(&mut *by_code.lock().expect("flood lock"));
        Ok(flood)
    })
}
