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
