#!/bin/sh
# onestor-agent replacement of OpenNebula's vm/snapshot/recovery.rb (same path, so the upstream probe
# no longer takes overlay snapshots itself). Prints, per VM with protected disks:
#   VM = [ ID="VMID", MONITOR="<base64 of DISK_RECOVERY_SNAPSHOT = [ ID=N, TIMESTAMP=... | MSG=... ] lines>" ]
# It only reads the agent's state. When the agent is not installed it still reports: every disk laid out
# for recovery snapshots (disk.N.snap/base.1 in an ssh datastore) gets an ERROR line.
DIR=$(dirname "$0")
. "$DIR/../../lib-onestor.sh" 2>/dev/null || . "$DIR/lib-onestor.sh" 2>/dev/null

AGENT=$(onestor_find_agent 2>/dev/null)
if [ -n "$AGENT" ]; then
    onestor_run_probe "$AGENT" vm-snapshot
    exit 0
fi

# No agent: find protected disks the way the ssh driver lays them out, without any agent code.
XML=$(cat 2>/dev/null)
DS_LOC=$(printf '%s' "$XML" | sed -n 's:.*<DATASTORE_LOCATION>\(<!\[CDATA\[\)\{0,1\}\(/[^]<]*\).*:\2:p' | head -n 1)
[ -n "$DS_LOC" ] || DS_LOC=/var/lib/one/datastores
for ds in "$DS_LOC"/*/; do
    ds=${ds%/}
    case "${ds##*/}" in *[!0-9]*|'') continue ;; esac
    [ "$(cat "$ds/.monitor" 2>/dev/null)" = ssh ] || continue
    for vm in "$ds"/*/; do
        vm=${vm%/}
        id=${vm##*/}
        case "$id" in *[!0-9]*|'') continue ;; esac
        lines=''
        for base1 in "$vm"/disk.*.snap/base.1; do
            [ -f "$base1" ] || continue
            n=${base1%.snap/base.1}; n=${n##*/disk.}
            case "$n" in *[!0-9]*|'') continue ;; esac
            line="DISK_RECOVERY_SNAPSHOT = [ ID=$n, MSG=\"ERROR onestor-agent is not installed on this host: no recovery snapshots are taken\", ERROR_CODE=\"E_AGENT_DOWN\" ]"
            if [ -z "$lines" ]; then lines=$line; else lines=$(printf '%s\n%s' "$lines" "$line"); fi
        done
        [ -n "$lines" ] || continue
        printf 'VM = [ ID="%s", MONITOR="%s" ]\n' "$id" "$(printf '%s' "$lines" | base64 | tr -d '\n')"
    done
done
exit 0
