#!/bin/sh
# onestor-agent replacement of OpenNebula's vm/snapshot/recovery.rb (same path, so the upstream probe
# no longer takes overlay snapshots itself). Prints, per VM with protected disks:
#   VM = [ ID="VMID", MONITOR="<base64 of DISK_RECOVERY_SNAPSHOT = [ ID=N, TIMESTAMP=... | MSG=... ] lines>" ]
# It only reads the agent's state. When the agent is not installed it still reports: every disk that asked
# for protection (RECOVERY_SNAPSHOT_FREQ) and is laid out for it (disk.N.snap/base.1 in an ssh datastore)
# gets an ERROR line.
DIR=$(dirname "$0")
. "$DIR/../../lib-onestor.sh" 2>/dev/null || . "$DIR/lib-onestor.sh" 2>/dev/null

AGENT=$(onestor_find_agent 2>/dev/null)
if [ -n "$AGENT" ]; then
    onestor_run_probe "$AGENT" vm-snapshot
    exit 0
fi

# No agent: name the disks that asked for protection (RECOVERY_SNAPSHOT_FREQ in vm.xml) and are laid out
# for it, without any agent code. OneStor lays out every disk of an ssh datastore as disk.N.snap/base.1,
# so the layout alone would put errors on VMs that never asked for recovery snapshots.
XML=$(cat 2>/dev/null)
DS_LOC=$(printf '%s' "$XML" | sed -n 's:.*<DATASTORE_LOCATION>\(<!\[CDATA\[\)\{0,1\}\(/[^]<]*\).*:\2:p' | head -n 1)
[ -n "$DS_LOC" ] || DS_LOC=/var/lib/one/datastores
onestor_protected_disks "$DS_LOC" | {
    cur=''
    lines=''
    flush() {
        [ -n "$cur" ] || return 0
        printf 'VM = [ ID="%s", MONITOR="%s" ]\n' "$cur" "$(printf '%s' "$lines" | base64 | tr -d '\n')"
    }
    while read -r id n _freq; do
        line="DISK_RECOVERY_SNAPSHOT = [ ID=$n, MSG=\"ERROR onestor-agent is not installed on this host: no recovery snapshots are taken\", ERROR_CODE=\"E_AGENT_DOWN\" ]"
        if [ "$id" != "$cur" ]; then
            flush
            cur=$id
            lines=$line
        else
            lines=$(printf '%s\n%s' "$lines" "$line")
        fi
    done
    flush
}
exit 0
