#!/bin/sh
# A `--peer-cmd` for `xtask bench` that runs another build of the sealmesh
# agent as the `peer` column, so two builds are measured side by side in one
# run (docs/PERFORMANCE.md):
#
#   PEER_AGENT=/path/to/other/sealmesh-agent \
#       target/release/xtask bench --json --peer-cmd 'exec xtask/src/bench/peer-agent.sh'
#
# Environment given to the peer command (e.g. `--peer-cmd
# 'SEALMESH_WORKER_THREADS=1 exec xtask/src/bench/peer-agent.sh'`) reaches the agent.
# Its log goes to the testbed's logs/peer-agent-<node>.log; `ready` is printed
# once the agent logged that it started (its pods are redirected then).
# The agent replaces this shell (and, with `exec` in the peer command, the
# bench's `sh -c` too), and the watcher that prints `ready` exits then: the
# column's memory is the agent's alone, as in the sealmesh column.
set -eu
log="$(dirname "$CLUSTER_FILE")/logs/peer-agent-$NODE.log"
: >"$log"
agent=$$
(
    until grep -q '"agent started"' "$log"; do
        # Gone, or exited and not yet reaped (a zombie answers kill -0).
        state=$(sed 's/.*) //' "/proc/$agent/stat" 2>/dev/null | cut -d' ' -f1)
        if [ -z "$state" ] || [ "$state" = Z ]; then
            cat "$log" >&2
            exit 1
        fi
        sleep 0.1
    done
    echo ready
) &
exec "$PEER_AGENT" --cluster-file "$CLUSTER_FILE" --node "$NODE" --bpffs-dir "$BPFFS_DIR" \
    --handover-socket "$(dirname "$CLUSTER_FILE")/peer-handover-$NODE.sock" \
    --log-format json >"$log" 2>&1
