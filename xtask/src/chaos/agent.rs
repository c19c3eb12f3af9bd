//! Agent faults: `agent-restart`, `rolling-update`.

use std::time::Duration;

use nix::{sys::signal::Signal, unistd::Pid};

use super::{
    Bed, CLIENT_NODE, ChaosArgs, ChaosError, Findings, SERVER_NODE,
    load::{seconds_between, unix_micros},
};
use crate::mesh::{MeshError, MeshOptions};

/// How long the killed agent stays down before it is started again (a
/// kubelet restarts a crashed container at once the first time; this leaves
/// the load time to see the outage).
const DOWN_FOR: Duration = Duration::from_secs(2);
/// Load after the restart, to show it stays healthy.
const AFTER: Duration = Duration::from_secs(3);
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(30);

/// SIGKILLs the agent of the client's node under load, starts it again, and
/// checks that connections failed only while no agent was there.
pub(super) fn agent_restart(args: &ChaosArgs) -> Result<Findings, ChaosError> {
    let mut bed = Bed::up(MeshOptions::default())?;
    let load = bed.start_load(args)?;
    std::thread::sleep(Duration::from_secs(1));

    let pid = bed
        .mesh
        .agent_pid(CLIENT_NODE)
        .ok_or_else(|| MeshError::NoAgent(CLIENT_NODE.to_owned()))?;
    let killed_us = unix_micros();
    nix::sys::signal::kill(
        Pid::from_raw(i32::try_from(pid).expect("pids fit in i32")),
        Signal::SIGKILL,
    )
    .map_err(|errno| ChaosError::Io {
        what: format!("killing the agent of {CLIENT_NODE} (pid {pid})"),
        source: errno.into(),
    })?;
    // Reaped as the kubelet would see the container exit.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !bed
        .mesh
        .reap_exited_agents()?
        .iter()
        .any(|(node, _)| node == CLIENT_NODE)
    {
        if std::time::Instant::now() > deadline {
            return Err(ChaosError::Timeout {
                what: "the killed agent to exit".into(),
                timeout: Duration::from_secs(5),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(DOWN_FOR);
    let restart_us = unix_micros();
    bed.mesh.start_agent(CLIENT_NODE)?;
    let started_us = unix_micros();
    load.wait_for_successes(started_us, 5, RECOVERY_TIMEOUT)?;
    std::thread::sleep(AFTER);

    let mut findings = Findings::default();
    let timeline = bed.finish(load, &mut findings)?;
    // Down from the kill until the new agent said it started.
    let outside: Vec<_> = timeline
        .failed()
        .filter(|a| !a.overlaps(killed_us, started_us))
        .collect();
    let during = timeline
        .failed()
        .filter(|a| a.overlaps(killed_us, started_us))
        .count();
    let streams_outside = timeline
        .stream_breaks
        .iter()
        .filter(|b| b.end_us < killed_us || b.end_us > started_us)
        .count();
    let recovery = timeline
        .first_success_from(killed_us)
        .map(|a| seconds_between(killed_us, a.end_us));
    findings.figure("agent_down_s", seconds_between(killed_us, restart_us));
    findings.figure("agent_start_s", seconds_between(restart_us, started_us));
    findings.figure("recovery_s", recovery);
    findings.figure("failed_while_down", during);
    findings.figure("failed_while_up", outside.len());
    findings.figure("stream_breaks_while_up", streams_outside);
    findings.check(outside.is_empty(), || {
        format!(
            "{} connections failed while an agent was up, first: {:?}",
            outside.len(),
            outside[0].error
        )
    });
    findings.check(streams_outside == 0, || {
        format!("{streams_outside} long-lived streams broke while an agent was up")
    });
    findings.check(recovery.is_some(), || {
        "no connection succeeded after the restart".into()
    });
    Ok(findings)
}

/// Replaces the agent of each node as a rolling update does (the server's
/// node first, then the client's): a new agent starts beside the running
/// one and takes over its listening sockets, then the old one gets SIGTERM
/// and finishes its connections. No new connection may fail; a long-lived
/// stream the old agent carried may end when its drain does (the app
/// reconnects), never in clear.
pub(super) fn rolling_update(args: &ChaosArgs) -> Result<Findings, ChaosError> {
    let mut bed = Bed::up(MeshOptions::default())?;
    let load = bed.start_load(args)?;
    std::thread::sleep(Duration::from_secs(1));

    let mut findings = Findings::default();
    let rolling_us = unix_micros();
    for node in [SERVER_NODE, CLIENT_NODE] {
        let started = std::time::Instant::now();
        let old = bed.mesh.roll_agent(node)?;
        findings.figure(&format!("{node}_update_s"), started.elapsed().as_secs_f64());
        findings.check(old.success(), || {
            format!("the old agent of {node} did not stop cleanly: {old}")
        });
    }
    let rolled_us = unix_micros();
    load.wait_for_successes(rolled_us, 5, RECOVERY_TIMEOUT)?;
    std::thread::sleep(AFTER);

    let timeline = bed.finish(load, &mut findings)?;
    let failed: Vec<_> = timeline.failed().collect();
    let during = timeline
        .attempts
        .iter()
        .filter(|a| a.overlaps(rolling_us, rolled_us))
        .count();
    findings.figure("connections_during_update", during);
    findings.check(failed.is_empty(), || {
        format!(
            "{} new connections failed during the update, first: {:?}",
            failed.len(),
            failed[0].error
        )
    });
    findings.check(during > 0, || {
        "no connection was attempted while the agents were replaced".into()
    });
    Ok(findings)
}
