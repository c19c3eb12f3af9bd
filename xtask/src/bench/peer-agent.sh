#!/bin/sh
# A `--peer-cmd` for `xtask bench` that runs another build of the sealmesh
# agent as the `peer` column, so two builds are measured side by side in one
# run (docs/PERFORMANCE.md):
#
#   PEER_AGENT=/path/to/other/sealmesh-agent \
#       target/release/xtask bench --json --peer-cmd xtask/src/bench/peer-agent.sh
#
# Environment given to the peer command (e.g. `--peer-cmd
# 'SEALMESH_WORKER_THREADS=1 xtask/src/bench/peer-agent.sh'`) reaches the agent.
# Its log goes to the testbed's logs/peer-agent-<node>.log; `ready` is printed
# once the agent logged that it started (its pods are redirected then).
set -eu
log="$(dirname "$CLUSTER_FILE")/logs/peer-agent-$NODE.log"
"$PEER_AGENT" --cluster-file "$CLUSTER_FILE" --node "$NODE" --bpffs-dir "$BPFFS_DIR" \
    --log-format json >"$log" 2>&1 &
agent=$!
until grep -q '"agent started"' "$log"; do
    if ! kill -0 "$agent" 2>/dev/null; then
        cat "$log" >&2
        exit 1
    fi
    sleep 0.1
done
echo ready
wait "$agent"
