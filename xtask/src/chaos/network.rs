//! Network faults: `peer-partition`.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use super::{
    Bed, ChaosArgs, ChaosError, Findings,
    load::{seconds_between, unix_micros},
    quantile,
};
use crate::{mesh::MeshOptions, testbed::layout};

/// nftables table (netdev family, in the underlay) that partitions the nodes.
const PARTITION_TABLE: &str = "sealmesh_chaos_partition";
/// Longer than a pooled HBONE connection's ping interval + timeout (15 s), so
/// the pool must find out by itself.
const PARTITION_FOR: Duration = Duration::from_secs(20);
/// The load's own give-up time (`chaosload --timeout-secs`): a connection
/// that fails only then was left hanging by the mesh.
const LOAD_TIMEOUT_S: f64 = 10.0;
/// How soon after the heal new connections must work again: the pool's
/// ping interval + timeout (15 s) + the agents' connect timeout (5 s).
const RECOVERY_BOUND_S: f64 = 20.0;
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(60);

/// Drops every packet between the two nodes' underlay addresses at the
/// bridge (both directions), as a partition between two hosts would.
fn partition_rules() -> String {
    let rule = |from: usize, to: usize| {
        format!(
            "  chain from_node_{from} {{ type filter hook ingress device \"{port}\" priority 0; policy accept; ip daddr {to_ip} drop; }}\n",
            port = layout::underlay_port(from),
            to_ip = layout::node_ip(to),
        )
    };
    format!(
        "table netdev {PARTITION_TABLE} {{\n{}{}}}\n",
        rule(0, 1),
        rule(1, 0)
    )
}

/// Runs `nft` in the underlay namespace with `script` on stdin.
fn nft(bed: &Bed, script: &str) -> Result<(), ChaosError> {
    use std::io::Write as _;
    let mut cmd = Command::new("nft");
    cmd.args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = bed
        .mesh
        .testbed()
        .spawn_in_underlay(cmd)
        .map_err(|e| ChaosError::Command {
            command: "nft".into(),
            detail: format!("{e} (nftables is missing? `sudo -E cargo xtask setup` installs it)"),
        })?;
    child
        .child_mut()
        .stdin
        .take()
        .expect("stdin is piped above")
        .write_all(script.as_bytes())
        .map_err(|source| ChaosError::Io {
            what: "writing nft rules".into(),
            source,
        })?;
    let output = child.wait_with_output().map_err(|source| ChaosError::Io {
        what: "waiting for nft".into(),
        source,
    })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(ChaosError::Command {
            command: format!("nft -f - <<<{script:?}"),
            detail: format!(
                "{}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        })
    }
}

/// Partitions the nodes' underlay under load, then heals it.
pub(super) fn peer_partition(args: &ChaosArgs) -> Result<Findings, ChaosError> {
    let mut bed = Bed::up(MeshOptions::default())?;
    let load = bed.start_load(args)?;
    std::thread::sleep(Duration::from_secs(1));

    let cut_us = unix_micros();
    nft(&bed, &partition_rules())?;
    std::thread::sleep(PARTITION_FOR);
    let healed_us = unix_micros();
    nft(&bed, &format!("delete table netdev {PARTITION_TABLE}\n"))?;
    load.wait_for_successes(healed_us, 5, RECOVERY_TIMEOUT)?;
    let recovered_us = load
        .timeline()
        .first_success_from(healed_us)
        .map_or(healed_us, |a| a.end_us);
    // After recovery the load must run clean.
    std::thread::sleep(Duration::from_secs(5));

    let mut findings = Findings::default();
    let timeline = bed.finish(load, &mut findings)?;
    let during: Vec<_> = timeline
        .attempts
        .iter()
        .filter(|a| a.start_us >= cut_us && a.start_us < healed_us)
        .collect();
    let failing: Vec<f64> = during
        .iter()
        .filter(|a| !a.ok())
        .map(|a| a.seconds())
        .collect();
    let hung = failing
        .iter()
        .filter(|s| **s >= LOAD_TIMEOUT_S - 0.05)
        .count();
    let failed_after_recovery: Vec<_> = timeline
        .failed()
        .filter(|a| a.start_us > recovered_us)
        .collect();
    let failed_before_cut = timeline.failed().filter(|a| a.end_us < cut_us).count();
    let stream_breaks: Vec<f64> = timeline
        .stream_breaks
        .iter()
        .filter(|b| b.echoes > 0 && b.end_us >= cut_us && b.end_us < healed_us)
        .map(|b| seconds_between(cut_us, b.end_us))
        .collect();
    let recovery_s = seconds_between(healed_us, recovered_us);

    findings.figure("partition_s", seconds_between(cut_us, healed_us));
    findings.figure("attempts_while_partitioned", during.len());
    findings.figure("failed_while_partitioned", failing.len());
    findings.figure("failing_connection_p50_s", quantile(&failing, 0.5));
    findings.figure("failing_connection_max_s", quantile(&failing, 1.0));
    findings.figure("left_hanging_to_the_app_timeout", hung);
    findings.figure("streams_cut_after_s_max", quantile(&stream_breaks, 1.0));
    findings.figure("recovery_after_heal_s", recovery_s);
    findings.figure("failed_after_recovery", failed_after_recovery.len());
    findings.check(hung == 0, || {
        format!("{hung} connections hung until the app's own {LOAD_TIMEOUT_S} s timeout instead of failing fast")
    });
    findings.check(recovery_s <= RECOVERY_BOUND_S, || {
        format!("new connections worked again only {recovery_s:.1} s after the heal (bound {RECOVERY_BOUND_S} s)")
    });
    findings.check(failed_after_recovery.is_empty(), || {
        format!(
            "{} connections failed after the recovery, first: {:?}",
            failed_after_recovery.len(),
            failed_after_recovery[0].error
        )
    });
    findings.check(failed_before_cut == 0, || {
        format!("{failed_before_cut} connections failed before the partition")
    });
    Ok(findings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_partition_drops_both_directions_between_the_node_ports() {
        let rules = partition_rules();
        assert!(
            rules.contains("device \"n0\" priority 0; policy accept; ip daddr 172.18.0.3 drop;"),
            "{rules}"
        );
        assert!(
            rules.contains("device \"n1\" priority 0; policy accept; ip daddr 172.18.0.2 drop;"),
            "{rules}"
        );
    }
}
