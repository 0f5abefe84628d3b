#!/bin/sh
# onestor-agent replacement of OpenNebula's host/system/monitor_ds.rb (same path): the same DS_LOCATION_*
# and DS = [ ... ] lines, with the replica cache size as a number of MB, the effective cache limit
# (REPLICA_MAX_SIZE_MB / REPLICA_MAX_USED_PERC), the recovery-snapshot area, and a time bound so a dead
# mount cannot stall host monitoring. Without the agent, the upstream script (still shipped in
# node-probes.d) does the job.
DIR=$(dirname "$0")
. "$DIR/../../lib-onestor.sh" 2>/dev/null
AGENT=$(onestor_find_agent 2>/dev/null)
if [ -n "$AGENT" ]; then
    onestor_run_probe "$AGENT" replica-ds
    exit 0
fi
UPSTREAM="$DIR/../../../node-probes.d/monitor_ds.rb"
if [ -x "$UPSTREAM" ]; then
    "$UPSTREAM" "$@"
fi
exit 0
