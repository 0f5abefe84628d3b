#!/usr/bin/env bash
# onestor-agent installer. Idempotent; run as root.
#
#   ./install.sh              KVM host: virsh, qemu-img, ssh client, Node >= 18, the agent, the systemd
#                             unit (enabled), the state dir and a dedicated replica key; prints the
#                             authorized_keys line to put on the replica
#   ./install.sh --dev        + what the tests and the demo need: libvirtd, QEMU, sshd, rsync
#   ./install.sh --replica [--authorize 'ssh-ed25519 AAAA... host']
#                             replica host: the agent (for `onestor-agent receive`), SNAPS owned by
#                             oneadmin, and the hypervisor key authorized for the receiver ONLY
#   ./install.sh --frontend   front-end: the monitoring probes into remotes/ (then `onehost sync -f`) and
#                             the live-migration hook (remotes/hooks/onestor/, registered with onehook)
#   ./install.sh --uninstall  removes everything install.sh added (listed in $PREFIX/installed-files)
#
# The agent goes to $PREFIX (default /usr/local/lib/onestor-agent), the launcher to /usr/local/bin.
set -euo pipefail

PREFIX=${PREFIX:-/usr/local/lib/onestor-agent}
BIN_DIR=${BIN_DIR:-/usr/local/bin}
MODE=runtime
ROLE=host
AUTHORIZE=''
ONE_USER=${ONE_USER:-oneadmin}
ONE_VAR=${ONE_VAR:-/var/lib/one}
REMOTES=${REMOTES:-$ONE_VAR/remotes}
UNIT_DIR=${UNIT_DIR:-/etc/systemd/system}
while [ $# -gt 0 ]; do
  case "$1" in
    --dev) MODE=dev ;;
    --replica) ROLE=replica ;;
    --frontend) ROLE=frontend ;;
    --uninstall) ROLE=uninstall ;;
    --authorize) shift; AUTHORIZE=${1:-} ;;
    -h|--help)
      sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
      exit 0 ;;
    *) echo "install.sh: unknown option '$1' (try --help)" >&2; exit 2 ;;
  esac
  shift
done

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (it installs packages and writes under $PREFIX)"
HERE=$(cd "$(dirname "$0")" && pwd)
MANIFEST=$PREFIX/installed-files
record() { mkdir -p "$PREFIX"; grep -qxF "$1" "$MANIFEST" 2>/dev/null || echo "$1" >> "$MANIFEST"; }

if [ "$ROLE" = uninstall ]; then
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl disable --now onestor-agent.service 2>/dev/null || true
  fi
  if [ -f "$MANIFEST" ]; then
    # newest first, so files go before the dirs that held them
    tac "$MANIFEST" | while IFS= read -r f; do
      [ -n "$f" ] || continue
      if [ -d "$f" ] && [ ! -L "$f" ]; then rmdir "$f" 2>/dev/null || rm -rf -- "$f"; else rm -f -- "$f"; fi
      echo "removed $f"
      # a probe we replaced (upstream recovery.rb) comes back
      if [ -e "$f.onestor-orig" ]; then mv -f -- "$f.onestor-orig" "$f"; echo "restored $f"; fi
    done
  fi
  command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ] && systemctl daemon-reload || true
  rm -f "$BIN_DIR/onestor-agent"
  rm -rf -- "$PREFIX"
  say "onestor-agent removed (packages installed from apt were left in place)"
  exit 0
fi

if [ "$ROLE" = frontend ]; then
  dest=$REMOTES/im/kvm-probes.d
  [ -d "$dest" ] || die "$dest not found: run on the OpenNebula front-end (or set REMOTES)"
  (cd "$HERE/probes" && find . -type f) | while IFS= read -r f; do
    f=${f#./}
    t="$dest/$f"
    if [ -e "$t" ] && [ ! -e "$t.onestor-orig" ] && ! grep -q onestor "$t" 2>/dev/null; then cp -p "$t" "$t.onestor-orig"; fi
    install -D -m 0755 "$HERE/probes/$f" "$t"
    record "$t"
  done
  say "probes installed under $dest; distribute them with: onehost sync -f"
  # Live migration: a state hook for ACTIVE/MIGRATE asks the agent on the source host to yield (README).
  hook=$REMOTES/hooks/onestor/yield-on-migrate
  install -D -m 0755 "$HERE/hooks/yield-on-migrate" "$hook"
  record "$hook"
  if command -v onehook >/dev/null 2>&1; then
    if onehook list --no-header 2>/dev/null | grep -q 'onestor-yield-on-migrate'; then
      say "hook onestor-yield-on-migrate already registered"
    else
      onehook create "$HERE/hooks/onestor-yield-on-migrate.tmpl" && say "hook onestor-yield-on-migrate registered"
    fi
  else
    say "onehook not found: register the hook as oneadmin with: onehook create $HERE/hooks/onestor-yield-on-migrate.tmpl"
  fi
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  die "only Debian/Ubuntu (apt) are automated. Elsewhere install: Node.js >= 18, npm, libvirt client (virsh), \
qemu-img, OpenSSH client, util-linux (flock); for --dev also libvirtd, qemu-system-x86, OpenSSH server. Then rerun."
fi

PKGS=(libvirt-clients qemu-utils openssh-client util-linux coreutils ca-certificates)
[ "$MODE" = dev ] && PKGS+=(libvirt-daemon-system qemu-system-x86 openssh-server procps iproute2 rsync systemd python3)

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

record "$BIN_DIR/onestor-agent"
record "$PREFIX"

have_one_user() { id "$ONE_USER" >/dev/null 2>&1; }
systemd_up() { command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; }

case "$ROLE" in
host)
  if have_one_user; then
    state_dir=$ONE_VAR/onestor-agent
    if [ ! -d "$state_dir" ]; then install -d -m 0750 -o "$ONE_USER" -g "$(id -gn "$ONE_USER")" "$state_dir"; record "$state_dir"; fi
    key=$ONE_VAR/.ssh/onestor_replica_ed25519
    if [ ! -f "$key" ]; then
      install -d -m 0700 -o "$ONE_USER" -g "$(id -gn "$ONE_USER")" "$ONE_VAR/.ssh"
      ssh-keygen -q -t ed25519 -N '' -C "onestor-agent@$(hostname)" -f "$key"
      chown "$ONE_USER:$(id -gn "$ONE_USER")" "$key" "$key.pub"
      record "$key"; record "$key.pub"
    fi
    install -m 0644 "$HERE/systemd/onestor-agent.service" "$UNIT_DIR/onestor-agent.service"
    record "$UNIT_DIR/onestor-agent.service"
    if systemd_up; then
      systemctl daemon-reload
      systemctl enable onestor-agent.service >/dev/null 2>&1
      systemctl restart onestor-agent.service || echo "note: the service did not start; see: journalctl -u onestor-agent"
    else
      echo "note: systemd is not running here; the unit is installed but not started"
    fi
    say "on the replica host, authorize this host's key for the receiver only:"
    echo "  ./install.sh --replica --authorize '$(cat "$key.pub")'"
    echo "or add this line to ~$ONE_USER/.ssh/authorized_keys there:"
    echo "  command=\"/usr/local/bin/onestor-agent receive\",restrict $(cat "$key.pub")"
  elif [ "$MODE" != dev ]; then
    echo "note: user '$ONE_USER' not found: the service, state dir and replica key were not set up"
    echo "      (install the OpenNebula KVM node package first, or set ONE_USER)"
  fi ;;
replica)
  have_one_user || die "user '$ONE_USER' not found on this replica host"
  snaps=$( (. "$REMOTES/etc/tm/ssh/sshrc" 2>/dev/null; echo "${REPLICA_RECOVERY_SNAPS_DIR:-$ONE_VAR/datastores/replica_snaps}") )
  if [ ! -d "$snaps" ]; then install -d -m 0750 -o "$ONE_USER" -g "$(id -gn "$ONE_USER")" "$snaps"; record "$snaps"; fi
  chown "$ONE_USER:$(id -gn "$ONE_USER")" "$snaps"
  if [ -n "$AUTHORIZE" ]; then
    case "$AUTHORIZE" in ssh-ed25519\ *|ecdsa-sha2-*\ *|ssh-rsa\ *) ;; *) die "--authorize expects a public key line (ssh-ed25519 AAAA... comment)";; esac
    ak=$ONE_VAR/.ssh/authorized_keys
    install -d -m 0700 -o "$ONE_USER" -g "$(id -gn "$ONE_USER")" "$ONE_VAR/.ssh"
    line="command=\"$BIN_DIR/onestor-agent receive\",restrict $AUTHORIZE"
    grep -qxF "$line" "$ak" 2>/dev/null || { echo "$line" >> "$ak"; chown "$ONE_USER:$(id -gn "$ONE_USER")" "$ak"; chmod 0600 "$ak"; }
    echo "authorized for the receiver only: ${AUTHORIZE##* }"
  fi
  say "replica ready: SNAPS=$snaps (receiver: $BIN_DIR/onestor-agent receive)" ;;
esac

if [ "$MODE" = dev ]; then
  # sshd refuses to start as root without its privilege-separation dir.
  mkdir -p /run/sshd && chmod 0755 /run/sshd
  # libvirt's packaged daemons may have been started by the package scripts; the tests and the demo
  # run their own private libvirtd and sshd, so nothing here needs to keep running.
fi
say "done: $("$BIN_DIR/onestor-agent" --version)"
