/**
 * The ONE place for default paths, ciphers and limits. The config schema (lib/config/config.ts), the sshrc
 * reader, the probes (which start without reading the config, for speed and so a broken config cannot
 * blind monitoring), the receiver and the CLI help all take their defaults from here. Plain constants,
 * no imports: the probe's start-up loads this file.
 */
import type { DriverSettings } from './model.js';

// ---- paths (OpenNebula's layout, DESIGN §2) ----
export const DEFAULT_CONFIG_FILE = '/etc/onestor-agent/config.json';
export const DEFAULT_DATASTORE_LOCATION = '/var/lib/one/datastores';
export const DEFAULT_STATE_DIR = '/var/lib/one/onestor-agent';
/** The daemon writes it, the probe finds it with no arguments. */
export const DEFAULT_STATE_FILE = `${DEFAULT_STATE_DIR}/state.json`;
/** Front-end path first, then where `onehost sync` puts it on hosts. */
export const DEFAULT_SSHRC_PATHS: readonly string[] = Object.freeze(['/var/lib/one/remotes/etc/tm/ssh/sshrc', '/var/tmp/one/etc/tm/ssh/sshrc']);
export const DEFAULT_IDENTITY_FILE = '/var/lib/one/.ssh/onestor_replica_ed25519';
export const DEFAULT_KNOWN_HOSTS_FILE = '/var/lib/one/.ssh/known_hosts';
export const DEFAULT_LIBVIRT_URI = 'qemu:///system';
export const DEFAULT_STAGING_DIR_NAME = '.onestor';
export const DEFAULT_RECEIVER_COMMAND = 'onestor-agent receive';

/** Upstream defaults of the ssh driver's sshrc (DESIGN §2), used for every key the file does not set. */
export const DEFAULT_DRIVER_SETTINGS: Readonly<DriverSettings> = Object.freeze({
  REPLICA_COPY_LOCK_TIMEOUT: 600,
  REPLICA_RECOVERY_SNAPS_DIR: `${DEFAULT_DATASTORE_LOCATION}/replica_snaps`,
  REPLICA_SSH_OPTS: '-c aes128-gcm@openssh.com -m umac-64@openssh.com',
  REPLICA_SSH_FE_OPTS: '',
  REPLICA_MAX_SIZE_MB: null,
  REPLICA_MAX_USED_PERC: 90,
});

// ---- SSH ----
/**
 * Preference order: aes128-gcm first (fastest measured here; chacha20 15-25 % slower), the AEAD ciphers
 * before the CTR ones (which need a separate MAC), aes256-ctr last so a server restricted to it still works.
 */
/** What carries the replica session: the system's ssh (less CPU per byte), with ssh2 where ssh cannot serve. */
export const DEFAULT_REPLICA_TRANSPORT = 'openssh' as const;
export const DEFAULT_CIPHERS: readonly string[] = Object.freeze(['aes128-gcm@openssh.com', 'aes256-gcm@openssh.com', 'chacha20-poly1305@openssh.com', 'aes128-ctr', 'aes256-ctr']);

// ---- receiver (replica side) ----
export const RECEIVER_DEFAULTS = Object.freeze({
  /** concurrent sessions per replica; more wait for a slot */
  maxSessions: 4,
  /** upper bound accepted from config or flags: each session is a process with open files */
  maxSessionsLimit: 256,
  /** how long a session waits for a free slot before E_BUSY: longer than one typical publish */
  busyWaitSec: 300,
  /** session time limits (README "Receiver limits"; lib/replica/session-watch.ts) */
  helloTimeoutSec: 30,
  /** a peer that sends nothing for this long ends its session (stuck or half-dead agent) */
  idleTimeoutSec: 900,
  drainTimeoutSec: 120,
  progressWindowSec: 60,
  minProgressKiB: 1024,
  maxSessionSec: 86_400,
  /** at most one orphan sweep per this many seconds per replica */
  sweepIntervalSec: 600,
});
