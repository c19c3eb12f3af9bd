//! Many connections at once: `scale`.

use std::time::Duration;

use nix::sys::resource::{Resource, setrlimit};

use super::{
    Bed, CLIENT_NODE, CLIENT_POD, ChaosArgs, ChaosError, Findings, MARKER, NAMESPACE, SERVER_NODE,
    load::{LoadEvent, RunningLoad},
    rss_bytes,
};
use crate::mesh::{MeshError, MeshOptions};

/// Open files every process of the scenario may have: a source-side agent
/// holds two descriptors per pod connection (the socket and the handle kept
/// to reset it), so 10,000 connections need more than this machine's default
/// hard limit of 20,000. A node's container runtime gives ~1M.
const OPEN_FILES: u64 = 1 << 20;
/// Connections being opened at once by the holding client.
const OPENING_CONCURRENCY: usize = 128;
/// Opening every connection may take this long at most.
const OPEN_TIMEOUT: Duration = Duration::from_secs(600);
const MIB: f64 = 1024.0 * 1024.0;

/// Holds `--connections` connections from the client pod to the server pod
/// (one agent pair) for `--hold`, beside the steady load.
pub(super) fn scale(args: &ChaosArgs) -> Result<Findings, ChaosError> {
    // Inherited by every process the mesh starts from here on.
    setrlimit(Resource::RLIMIT_NOFILE, OPEN_FILES, OPEN_FILES).map_err(|errno| ChaosError::Io {
        what: format!("raising the open-files limit to {OPEN_FILES}"),
        source: errno.into(),
    })?;
    let mut bed = Bed::up(MeshOptions::default())?;
    let load = bed.start_load(args)?;
    let pid = |node: &str| {
        bed.mesh
            .agent_pid(node)
            .ok_or_else(|| MeshError::NoAgent(node.to_owned()))
    };
    let pids = [pid(CLIENT_NODE)?, pid(SERVER_NODE)?];
    let before = [rss_bytes(pids[0])?, rss_bytes(pids[1])?];

    let log = bed.log_path("chaosload-hold");
    let hold = RunningLoad::start(
        bed.mesh.testbed(),
        NAMESPACE,
        CLIENT_POD,
        &[
            "hold".into(),
            "--connect".into(),
            bed.server_addr().to_string(),
            "--connections".into(),
            args.connections.to_string(),
            "--concurrency".into(),
            OPENING_CONCURRENCY.to_string(),
            "--marker".into(),
            MARKER.into(),
            "--hold-secs".into(),
            args.hold.as_secs_f64().to_string(),
        ],
        &log,
    )?;
    let is_held = |e: &LoadEvent| matches!(e, LoadEvent::Held { .. });
    let events = hold.wait_for("the connections to open", OPEN_TIMEOUT, |events| {
        events.iter().any(is_held)
    })?;
    let Some(LoadEvent::Held {
        connections,
        errors: open_errors,
        seconds: open_seconds,
        latency,
        first_error: open_error,
    }) = events.into_iter().find(is_held)
    else {
        unreachable!("waited for it above");
    };
    // Measured half-way through the hold, once the agents settled.
    std::thread::sleep(args.hold / 2);
    let held = [rss_bytes(pids[0])?, rss_bytes(pids[1])?];
    let is_released = |e: &LoadEvent| matches!(e, LoadEvent::Released { .. });
    let events = hold.wait_for(
        "the held connections to echo again",
        args.hold + OPEN_TIMEOUT,
        |events| events.iter().any(is_released),
    )?;
    hold.stop();
    let Some(LoadEvent::Released {
        still_working,
        errors: release_errors,
        first_error: release_error,
    }) = events.into_iter().find(is_released)
    else {
        unreachable!("waited for it above");
    };

    let mut findings = Findings::default();
    let timeline = bed.finish(load, &mut findings)?;
    let asked = args.connections as u64;
    findings.figure("connections_asked", asked);
    findings.figure("connections_held", connections);
    findings.figure("open_errors", open_errors);
    findings.figure("open_seconds", open_seconds);
    findings.figure("hold_s", args.hold.as_secs_f64());
    let ms = |q: f64| latency.quantile_us(q).map(|us| us as f64 / 1000.0);
    findings.figure("accept_latency_p50_ms", ms(0.50));
    findings.figure("accept_latency_p99_ms", ms(0.99));
    for (index, label) in ["node0", "node1"].iter().enumerate() {
        findings.figure(
            &format!("agent_rss_before_{label}_mib"),
            before[index] as f64 / MIB,
        );
        findings.figure(
            &format!("agent_rss_holding_{label}_mib"),
            held[index] as f64 / MIB,
        );
        findings.figure(
            &format!("agent_bytes_per_connection_{label}"),
            (held[index].saturating_sub(before[index])) / connections.max(1),
        );
    }
    findings.figure("still_working_after_hold", still_working);
    findings.figure("errors_after_hold", release_errors);
    findings.check(open_errors == 0 && connections == asked, || {
        format!("{open_errors} of {asked} connections failed to open, first: {open_error:?}")
    });
    findings.check(release_errors == 0 && still_working == connections, || {
        format!("{release_errors} held connections failed after the hold, first: {release_error:?}")
    });
    let failed = timeline.failed().count();
    findings.check(failed == 0 && timeline.stream_breaks.is_empty(), || {
        format!(
            "the steady load beside them failed {failed} connections and {} streams, first: {:?}",
            timeline.stream_breaks.len(),
            timeline.first_error()
        )
    });
    Ok(findings)
}
