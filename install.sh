#!/usr/bin/env bash
# onestor-agent installer. Idempotent; run as root.
#
#   ./install.sh              KVM host: virsh, qemu-img, ssh client, Node >= 18, the agent, the systemd
#                             unit (enabled), the state dir and a dedicated replica key; prints the
#                             authorized_keys line to put on the replica
#   ./install.sh --dev        + what the tests and the demo need: libvirtd, QEMU, sshd, rsync
#   ./install.sh --replica [--authorize 'ssh-ed25519 AAAA... comment' --host NAME [--from ADDR]]
#                             replica host: the agent (for `onestor-agent receive`), SNAPS owned by
#                             oneadmin, and the hypervisor key authorized for the receiver ONLY:
#                             command="BIN_DIR/onestor-agent receive --host NAME",restrict[,from="ADDR"]
#                             --authorize  one public key line: type, base64, optional comment (no
#                                          options, no second key; anything else is refused)
#                             --host NAME  required with --authorize: the hypervisor's name, bound into
#                                          the forced command (the receiver knows who writes from it)
#                             --from ADDR  sshd from= patterns (e.g. 10.0.0.5 or 10.0.1.0/24,hv2.lan)
#   ./install.sh --replica --authorize-only --authorize KEY --host NAME [--from ADDR]
#                             only (re)authorize a key on a replica already set up (no build)
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
AUTH_HOST=''
AUTH_FROM=''
AUTH_ONLY=0
AUTH_SET=0
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
    --authorize|--host|--from)
      [ $# -ge 2 ] || { echo "install.sh: $1 needs a value (try --help)" >&2; exit 2; }
      case "$1" in --authorize) AUTHORIZE=$2; AUTH_SET=1 ;; --host) AUTH_HOST=$2 ;; --from) AUTH_FROM=$2 ;; esac
      shift ;;
    --authorize-only) AUTH_ONLY=1 ;;
    -h|--help)
      sed -n '2,/^set -e/{/^set -e/d;p}' "$0" | sed 's/^# \{0,1\}//'
      exit 0 ;;
    *) echo "install.sh: unknown option '$1' (try --help)" >&2; exit 2 ;;
  esac
  shift
done

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }

# --- replica key authorization: validated BEFORE anything is installed or written ------------------
# The value becomes one line of oneadmin's authorized_keys: a newline, a second key or an option smuggled
# in would give a hypervisor an unrestricted oneadmin shell on the replica.
KEY_TYPE='' KEY_B64='' KEY_COMMENT=''
refuse_key() { printf 'install.sh: --authorize: %s\n  expected one public key line: TYPE BASE64 [COMMENT], e.g. the content of onestor_replica_ed25519.pub\n  (authorized_keys was not changed)\n' "$1" >&2; exit 2; }
validate_authorize() {
  local v=$AUTHORIZE LC_ALL=C
  case "$v" in *$'\n'*|*$'\r'*) refuse_key "the value contains a line break (a second line would be a second, unrestricted key)" ;; esac
  if [[ "$v" =~ [^[:print:]] ]]; then refuse_key "the value contains control characters"; fi
  local re='^(ssh-ed25519|ecdsa-sha2-nistp256|ecdsa-sha2-nistp384|ecdsa-sha2-nistp521|ssh-rsa|sk-ssh-ed25519@openssh\.com|sk-ecdsa-sha2-nistp256@openssh\.com) ([A-Za-z0-9+/]+={0,2})( [A-Za-z0-9@._+:=-]{1,128})?$'
  if ! [[ "$v" =~ $re ]]; then
    case "$v" in
      *command=*|*restrict*|*from=*|*environment=*|*permit*|*\"*) refuse_key "options are not accepted in the value (install.sh writes command=...,restrict itself)" ;;
    esac
    refuse_key "not a single public key line (known type, base64, optional comment of letters, digits and @._+:=- without spaces)"
  fi
  KEY_TYPE=${BASH_REMATCH[1]} KEY_B64=${BASH_REMATCH[2]} KEY_COMMENT=${BASH_REMATCH[3]# }
  [ $(( ${#KEY_B64} % 4 )) -eq 0 ] || refuse_key "the key is not valid base64 (length)"
  local blob_hex type_hex
  # decode strictly (bad input fails) and require canonical base64 (decoding then encoding gives it back)
  blob_hex=$(printf '%s' "$KEY_B64" | base64 -d 2>/dev/null | od -An -v -tx1 | tr -d ' \n') || refuse_key "the key is not valid base64"
  [ "$(printf '%s' "$KEY_B64" | base64 -d 2>/dev/null | base64 -w0)" = "$KEY_B64" ] || refuse_key "the key is not valid base64"
  # an SSH key blob starts with its type name (uint32 length + name): it must be the type written before it
  type_hex=$(printf '%s' "$KEY_TYPE" | od -An -v -tx1 | tr -d ' \n')
  [ ${#blob_hex} -ge 8 ] || refuse_key "the key blob is truncated"
  [ "$((16#${blob_hex:0:8}))" -eq "${#KEY_TYPE}" ] && [ "${blob_hex:8:${#type_hex}}" = "$type_hex" ] \
    || refuse_key "the key blob does not hold a $KEY_TYPE key"
  if command -v ssh-keygen >/dev/null 2>&1; then
    local t; t=$(mktemp); printf '%s\n' "$KEY_TYPE $KEY_B64" > "$t"
    ssh-keygen -l -f "$t" >/dev/null 2>&1 || { rm -f "$t"; refuse_key "ssh-keygen cannot read it as a $KEY_TYPE public key"; }
    rm -f "$t"
  fi
  [[ "$AUTH_HOST" =~ ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$ ]] \
    || { printf 'install.sh: --host: expected the hypervisor name (letters, digits, . _ -; at most 64), got %q\n  (authorized_keys was not changed)\n' "$AUTH_HOST" >&2; exit 2; }
  if [ -n "$AUTH_FROM" ] && ! [[ "$AUTH_FROM" =~ ^!?[A-Za-z0-9.:*?/_-]{1,255}(,!?[A-Za-z0-9.:*?/_-]{1,255}){0,31}$ ]]; then
    printf 'install.sh: --from: expected comma-separated address/host patterns (10.0.0.5, 10.0.1.0/24, *.lan, !10.0.0.9), got %q\n  (authorized_keys was not changed)\n' "$AUTH_FROM" >&2; exit 2
  fi
  [[ "$BIN_DIR" =~ ^/[A-Za-z0-9._/-]+$ ]] || { echo "install.sh: BIN_DIR must be a plain absolute path to put in the forced command, got '$BIN_DIR'" >&2; exit 2; }
}

if [ "$AUTH_SET" = 1 ] || [ -n "$AUTH_HOST" ] || [ -n "$AUTH_FROM" ] || [ "$AUTH_ONLY" = 1 ]; then
  [ "$ROLE" = replica ] || { echo "install.sh: --authorize, --host, --from and --authorize-only go with --replica" >&2; exit 2; }
  [ "$AUTH_SET" = 1 ] || { echo "install.sh: --host, --from and --authorize-only need --authorize KEY" >&2; exit 2; }
  # required: ownership of snapshots is keyed on this name, and a fingerprint would change with every key rotation
  [ -n "$AUTH_HOST" ] || { echo "install.sh: --authorize needs --host NAME (the hypervisor's name, bound into the forced command)" >&2; exit 2; }
  validate_authorize
fi

# Writes the line for the validated key, replacing any older line for the SAME key (sshd uses the first
# line that matches a key, so an old unrestricted line would otherwise win), and reads it back.
authorize_key() {
  local ak=$ONE_VAR/.ssh/authorized_keys grp line tmp prev n_line n_key
  grp=$(id -gn "$ONE_USER")
  line="command=\"$BIN_DIR/onestor-agent receive --host $AUTH_HOST\",restrict${AUTH_FROM:+,from=\"$AUTH_FROM\"} $KEY_TYPE $KEY_B64${KEY_COMMENT:+ $KEY_COMMENT}"
  install -d -m 0700 -o "$ONE_USER" -g "$grp" "$ONE_VAR/.ssh"
  if [ -f "$ak" ] && [ "$(grep -cxF -- "$line" "$ak")" = 1 ] && [ "$(grep -cF -- "$KEY_TYPE $KEY_B64" "$ak")" = 1 ]; then
    echo "already authorized for the receiver only as host $AUTH_HOST: ${KEY_COMMENT:-$KEY_TYPE key}"
    return 0
  fi
  tmp=$(mktemp "$ak.new.XXXXXX")
  prev=''
  if [ -f "$ak" ]; then
    prev=$(mktemp "$ak.prev.XXXXXX"); cp -p "$ak" "$prev"
    if grep -qF -- "$KEY_TYPE $KEY_B64" "$ak"; then echo "replacing the existing authorized_keys line(s) for this key"; fi
    grep -vF -- "$KEY_TYPE $KEY_B64" "$ak" > "$tmp" || true
    # keep the previous last line whole if it had no newline
    if [ -s "$tmp" ] && [ "$(tail -c1 "$tmp" | od -An -tx1 | tr -d ' ')" != 0a ]; then echo >> "$tmp"; fi
  fi
  printf '%s\n' "$line" >> "$tmp"
  chmod 0600 "$tmp"; chown "$ONE_USER:$grp" "$tmp"
  mv -f "$tmp" "$ak"
  # read back: exactly this line, and no other line for this key
  n_line=$(grep -cxF -- "$line" "$ak" || true); n_key=$(grep -cF -- "$KEY_TYPE $KEY_B64" "$ak" || true)
  if [ "$n_line" != 1 ] || [ "$n_key" != 1 ]; then
    if [ -n "$prev" ]; then mv -f "$prev" "$ak"; else rm -f "$ak"; fi
    die "authorized_keys did not read back as written (line found $n_line time(s), key $n_key time(s)); previous file restored"
  fi
  [ -z "$prev" ] || rm -f "$prev"
  echo "authorized for the receiver only, as host $AUTH_HOST${AUTH_FROM:+, from $AUTH_FROM}:"
  echo "  $line"
}

[ "$(id -u)" -eq 0 ] || die "run as root (it installs packages and writes under $PREFIX)"
HERE=$(cd "$(dirname "$0")" && pwd)

if [ "$AUTH_ONLY" = 1 ]; then
  id "$ONE_USER" >/dev/null 2>&1 || die "user '$ONE_USER' not found on this replica host"
  authorize_key
  exit 0
fi
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
    echo "  ./install.sh --replica --authorize '$(cat "$key.pub")' --host $(hostname -s) [--from THIS_HOST_ADDRESS]"
    echo "(add --authorize-only when the replica is already set up), or add this line to ~$ONE_USER/.ssh/authorized_keys there:"
    echo "  command=\"/usr/local/bin/onestor-agent receive --host $(hostname -s)\",restrict $(cat "$key.pub")"
  elif [ "$MODE" != dev ]; then
    echo "note: user '$ONE_USER' not found: the service, state dir and replica key were not set up"
    echo "      (install the OpenNebula KVM node package first, or set ONE_USER)"
  fi ;;
replica)
  have_one_user || die "user '$ONE_USER' not found on this replica host"
  snaps=$( (. "$REMOTES/etc/tm/ssh/sshrc" 2>/dev/null; echo "${REPLICA_RECOVERY_SNAPS_DIR:-$ONE_VAR/datastores/replica_snaps}") )
  if [ ! -d "$snaps" ]; then install -d -m 0750 -o "$ONE_USER" -g "$(id -gn "$ONE_USER")" "$snaps"; record "$snaps"; fi
  chown "$ONE_USER:$(id -gn "$ONE_USER")" "$snaps"
  if [ "$AUTH_SET" = 1 ]; then authorize_key; fi
  say "replica ready: SNAPS=$snaps (receiver: $BIN_DIR/onestor-agent receive)" ;;
esac

if [ "$MODE" = dev ]; then
  # sshd refuses to start as root without its privilege-separation dir.
  mkdir -p /run/sshd && chmod 0755 /run/sshd
  # libvirt's packaged daemons may have been started by the package scripts; the tests and the demo
  # run their own private libvirtd and sshd, so nothing here needs to keep running.
fi
say "done: $("$BIN_DIR/onestor-agent" --version)"
