//! Many connections at once: `scale`.

use std::time::Duration;

use nix::sys::resource::{Resource, getrlimit, setrlimit};

use super::{
    Bed, CLIENT_NODE, CLIENT_POD, ChaosArgs, ChaosError, Findings, MARKER, NAMESPACE, SERVER_NODE,
    load::{LoadEvent, RunningLoad},
    rss_bytes,
};
use crate::mesh::{MeshError, MeshOptions};

/// Open files every process of the scenario should be allowed, as a node's
/// container runtime allows (~1M): an agent holds a descriptor per
/// connection on each side it serves.
const OPEN_FILES: u64 = 1 << 20;
/// Connections being opened at once by the holding client.
const OPENING_CONCURRENCY: usize = 128;
/// Opening every connection may take this long at most.
const OPEN_TIMEOUT: Duration = Duration::from_secs(600);
const MIB: f64 = 1024.0 * 1024.0;

/// Holds `--connections` connections from the client pod to the server pod
/// (one agent pair) for `--hold`, beside the steady load.
pub(super) fn scale(args: &ChaosArgs) -> Result<Findings, ChaosError> {
    let open_files_limit = raise_open_files_limit()?;
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
    let open_files_held = [open_files(pids[0])?, open_files(pids[1])?];
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
    findings.figure("open_files_limit", open_files_limit);
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
            &format!("agent_open_files_holding_{label}"),
            open_files_held[index],
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

/// Raises this process's open-files limit, inherited by every process the
/// mesh starts from here on, to [`OPEN_FILES`], or as far as the hard limit
/// goes without `CAP_SYS_RESOURCE` (containers often lack it); returns it.
fn raise_open_files_limit() -> Result<u64, ChaosError> {
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(|errno| ChaosError::Io {
        what: "reading the open-files limit".into(),
        source: errno.into(),
    })?;
    let wanted = OPEN_FILES.max(hard);
    let limit = match setrlimit(Resource::RLIMIT_NOFILE, wanted, wanted) {
        Ok(()) => wanted,
        Err(nix::errno::Errno::EPERM) => {
            tracing::warn!(
                hard,
                wanted,
                "cannot raise the open-files hard limit (no CAP_SYS_RESOURCE); the mesh's processes keep {hard}"
            );
            setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(|errno| ChaosError::Io {
                what: "raising the open-files soft limit".into(),
                source: errno.into(),
            })?;
            hard
        }
        Err(errno) => {
            return Err(ChaosError::Io {
                what: format!("raising the open-files limit to {wanted}"),
                source: errno.into(),
            });
        }
    };
    Ok(limit)
}

/// Descriptors a process has open (entries of /proc/<pid>/fd).
fn open_files(pid: u32) -> Result<u64, ChaosError> {
    let dir = format!("/proc/{pid}/fd");
    let entries = std::fs::read_dir(&dir).map_err(|source| ChaosError::Io {
        what: format!("listing {dir}"),
        source,
    })?;
    Ok(entries.count() as u64)
}
