/**
 * Which disks asked for protection, found without Node: a POSIX sh + awk reader. Used where the agent
 * cannot or should not do discovery itself:
 *  - the probe, when the daemon is down (its state then cannot be trusted to list the disks): starting
 *    a second Node process to run lib/discover cost ~100 ms on every probe run; `sh` costs a few ms,
 *    and a child can still be abandoned when a filesystem hangs (see usage.ts);
 *  - probes/vm/snapshot/recovery.rb when the agent is not installed at all (probes/lib-onestor.sh holds
 *    the same function, checked by test/unit/shell-discover.test.ts).
 *
 * A disk is reported when it is laid out for recovery snapshots (DS/VMID/disk.N.snap/base.1 is a file,
 * DS is a numeric dir whose .monitor reads `ssh`) AND /VM/TEMPLATE/DISK[DISK_ID=N] in vm.xml has a
 * RECOVERY_SNAPSHOT_FREQ. OneStor lays out every disk that way, so the layout alone says nothing about
 * protection. Output: one `VMID DISK_ID FREQ` line per disk. The awk reader splits on `<`, follows the
 * element path and handles CDATA (which is how OpenNebula writes template values).
 */

/** The shell function, byte for byte as in probes/lib-onestor.sh (between the ONESTOR-DISCOVER markers). */
// String.raw keeps the backslashes as they are; `$\{` stands for `${`, which a template literal cannot hold as text.
export const PROTECTED_DISKS_SH = String.raw`onestor_protected_disks() {
    loc=$1
    laid=''
    set --
    for ds in "$loc"/*/; do
        ds=$\{ds%/}
        case "$\{ds##*/}" in *[!0-9]*|'') continue ;; esac
        [ "$(cat "$ds/.monitor" 2>/dev/null)" = ssh ] || continue
        for vm in "$ds"/*/; do
            vm=$\{vm%/}
            id=$\{vm##*/}
            case "$id" in *[!0-9]*|'') continue ;; esac
            [ -f "$vm/vm.xml" ] && [ -r "$vm/vm.xml" ] || continue
            found=''
            for base1 in "$vm"/disk.*.snap/base.1; do
                [ -f "$base1" ] || continue
                n=$\{base1%.snap/base.1}; n=$\{n##*/disk.}
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
}`.replaceAll('$\\{', '${');

/** The script a bounded child runs: `sh -c SCRIPT sh DATASTORE_LOCATION`. */
export const PROTECTED_DISKS_SCRIPT = `${PROTECTED_DISKS_SH}\nonestor_protected_disks "$1"\n`;

export interface ShellDisk {
  vmId: number;
  diskId: number;
  /** undefined when the template value is not a whole number of seconds */
  freqSeconds?: number;
}

/** Pure: the reader's output, deduplicated and sorted. */
export function parseProtectedDisks(out: string): ShellDisk[] {
  const seen = new Map<string, ShellDisk>();
  for (const line of out.split('\n')) {
    const m = /^(\d+) (\d+) (.*)$/.exec(line);
    if (!m) continue;
    const vmId = Number(m[1]);
    const diskId = Number(m[2]);
    const freq = /^\d+$/.test(m[3]!.trim()) ? Number(m[3]!.trim()) : undefined;
    seen.set(`${vmId}.${diskId}`, { vmId, diskId, ...(freq !== undefined ? { freqSeconds: freq } : {}) });
  }
  return [...seen.values()].sort((a, b) => a.vmId - b.vmId || a.diskId - b.diskId);
}
