# Sourced by the onestor-agent probe wrappers (distributed by `onehost sync`). Finds the installed agent.
# The wrappers never forward monitord's arguments (the agent's CLI is strict) and always exit 0:
# monitord drops the output of every probe in a directory when one exits non-zero.
onestor_find_agent() {
    if [ -n "${ONESTOR_AGENT_BIN:-}" ] && [ -x "$ONESTOR_AGENT_BIN" ]; then
        echo "$ONESTOR_AGENT_BIN"; return 0
    fi
    for c in /usr/local/bin/onestor-agent /usr/bin/onestor-agent /opt/onestor-agent/bin/onestor-agent; do
        if [ -x "$c" ]; then echo "$c"; return 0; fi
    done
    command -v onestor-agent 2>/dev/null
}

# Runs the agent's probe with an outer time bound (the agent bounds itself; this covers a broken install).
onestor_run_probe() {
    if command -v timeout >/dev/null 2>&1; then
        timeout -k 2 20 "$1" probe "$2"
    else
        "$1" probe "$2"
    fi
}

# Disks that asked for protection (RECOVERY_SNAPSHOT_FREQ in vm.xml) and are laid out for recovery
# snapshots, without any agent code: prints "VMID DISK_ID FREQ" lines. The agent runs the same text
# (lib/monitor/shell-discover.ts; a unit test keeps the two identical).
# ONESTOR-DISCOVER BEGIN
onestor_protected_disks() {
    loc=$1
    laid=''
    set --
    for ds in "$loc"/*/; do
        ds=${ds%/}
        case "${ds##*/}" in *[!0-9]*|'') continue ;; esac
        [ "$(cat "$ds/.monitor" 2>/dev/null)" = ssh ] || continue
        for vm in "$ds"/*/; do
            vm=${vm%/}
            id=${vm##*/}
            case "$id" in *[!0-9]*|'') continue ;; esac
            [ -f "$vm/vm.xml" ] && [ -r "$vm/vm.xml" ] || continue
            found=''
            for base1 in "$vm"/disk.*.snap/base.1; do
                [ -f "$base1" ] || continue
                n=${base1%.snap/base.1}; n=${n##*/disk.}
                case "$n" in *[!0-9]*|'') continue ;; esac
                laid="$laid $id:$n"
                found=1
            done
            [ -z "$found" ] || set -- "$@" "$vm/vm.xml"
        done
    done
    [ $# -gt 0 ] || return 0
    # one awk for every vm.xml (a process per VM would cost a fork each)
    awk -v laid="$laid" '
        function trim(s) { gsub(/^[ \t\r\n]+|[ \t\r\n]+$/, "", s); return s }
        BEGIN { RS = "<"; n = split(laid, a, " "); for (i = 1; i <= n; i++) has[a[i]] = 1 }
        FNR == 1 { depth = 0; incdata = 0; text = ""; id = FILENAME; sub(/\/vm\.xml$/, "", id); sub(/.*\//, "", id) }
        {
            rec = $0
            if (incdata) {
                j = index(rec, "]]>")
                if (j) { text = text "<" substr(rec, 1, j - 1); incdata = 0 } else text = text "<" rec
                next
            }
            if (substr(rec, 1, 8) == "![CDATA[") {
                body = substr(rec, 9); j = index(body, "]]>")
                if (j) text = text substr(body, 1, j - 1); else { text = text body; incdata = 1 }
                next
            }
            c = substr(rec, 1, 1)
            if (rec == "" || c == "?" || c == "!") next
            gt = index(rec, ">"); if (!gt) next
            tag = substr(rec, 1, gt - 1)
            if (c == "/") {
                if (depth == 4 && path[1] == "VM" && path[2] == "TEMPLATE" && path[3] == "DISK") {
                    if (path[4] == "DISK_ID") did = trim(text)
                    else if (path[4] == "RECOVERY_SNAPSHOT_FREQ") freq = trim(text)
                }
                if (depth == 3 && path[1] == "VM" && path[2] == "TEMPLATE" && path[3] == "DISK" && did != "" && freq != "" && ((id ":" did) in has)) print id, did, freq
                depth--
                next
            }
            if (substr(tag, length(tag), 1) == "/") next
            sub(/[ \t\r\n].*/, "", tag)
            depth++; path[depth] = tag; text = substr(rec, gt + 1)
            if (depth == 3) { did = ""; freq = "" }
        }' "$@" 2>/dev/null
}
# ONESTOR-DISCOVER END
