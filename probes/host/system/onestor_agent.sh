#!/bin/sh
# onestor-agent status for the host template (host/system is the probe directory whose custom
# attributes OpenNebula keeps): ONESTOR_AGENT = [ STATUS, VERSION, PROTECTED_DISKS, FAILING_DISKS, ... ].
DIR=$(dirname "$0")
. "$DIR/../../lib-onestor.sh" 2>/dev/null
AGENT=$(onestor_find_agent 2>/dev/null)
if [ -n "$AGENT" ]; then
    onestor_run_probe "$AGENT" host-monitor
else
    cat >/dev/null 2>&1
    echo 'ONESTOR_AGENT = [ STATUS="NOT_INSTALLED" ]'
fi
exit 0
