#!/usr/bin/env bash
# onestor-agent installer. Idempotent; run as root.
#
#   ./install.sh            hypervisor runtime: virsh, qemu-img, ssh client, Node >= 18, the agent
#   ./install.sh --dev      + what the tests and the demo need: libvirtd, QEMU, sshd
#
# The agent is installed to $PREFIX (default /usr/local/lib/onestor-agent) with a launcher in
# /usr/local/bin/onestor-agent. Later steps (systemd unit, replica key, probes) are documented in README.md.
set -euo pipefail

PREFIX=${PREFIX:-/usr/local/lib/onestor-agent}
BIN_DIR=${BIN_DIR:-/usr/local/bin}
MODE=runtime
for arg in "$@"; do
  case "$arg" in
    --dev) MODE=dev ;;
    -h|--help)
      sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
      exit 0 ;;
    *) echo "install.sh: unknown option '$arg' (try --help)" >&2; exit 2 ;;
  esac
done

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (it installs packages and writes under $PREFIX)"
HERE=$(cd "$(dirname "$0")" && pwd)

if ! command -v apt-get >/dev/null 2>&1; then
  die "only Debian/Ubuntu (apt) are automated. Elsewhere install: Node.js >= 18, npm, libvirt client (virsh), \
qemu-img, OpenSSH client, util-linux (flock); for --dev also libvirtd, qemu-system-x86, OpenSSH server. Then rerun."
fi

PKGS=(libvirt-clients qemu-utils openssh-client util-linux coreutils ca-certificates)
[ "$MODE" = dev ] && PKGS+=(libvirt-daemon-system qemu-system-x86 openssh-server procps iproute2)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
node_ok() { command -v node >/dev/null 2>&1 && node -e 'const [a,b]=process.versions.node.split(".").map(Number); process.exit(a>18||(a===18&&b>=18)?0:1)'; }
if ! node_ok; then missing+=(nodejs npm); fi
if [ ${#missing[@]} -gt 0 ]; then
  say "installing packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # libvirt-daemon-system's postinst tries to start services; without systemd that is harmless.
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
node_ok || die "Node.js >= 18.18 is required (found: $(node --version 2>/dev/null || echo none))"
command -v npm >/dev/null 2>&1 || die "npm is required"

say "building in $HERE (node $(node --version))"
cd "$HERE"
npm install --no-audit --no-fund --loglevel=error >/dev/null
npm run -s build

say "installing to $PREFIX"
mkdir -p "$PREFIX"
rm -rf "$PREFIX/dist.new"
cp -a dist "$PREFIX/dist.new"
rm -rf "$PREFIX/dist"
mv "$PREFIX/dist.new" "$PREFIX/dist"
cp package.json package-lock.json "$PREFIX/"
(cd "$PREFIX" && npm install --omit=dev --no-audit --no-fund --loglevel=error >/dev/null)
cat > "$BIN_DIR/onestor-agent.new" <<LAUNCH
#!/bin/sh
exec node "$PREFIX/dist/agent/main.js" "\$@"
LAUNCH
chmod 0755 "$BIN_DIR/onestor-agent.new"
mv "$BIN_DIR/onestor-agent.new" "$BIN_DIR/onestor-agent"

if [ "$MODE" = dev ]; then
  # sshd refuses to start as root without its privilege-separation dir.
  mkdir -p /run/sshd && chmod 0755 /run/sshd
  # libvirt's packaged daemons may have been started by the package scripts; the tests and the demo
  # run their own private libvirtd and sshd, so nothing here needs to keep running.
fi
say "done: $("$BIN_DIR/onestor-agent" --version)"
