/**
 * The ONE exit-code table, for every command including `receive` (whichever entry starts the receiver).
 * Scripts, monitoring checks and sshd's exit status on the hypervisor rely on it; README "Exit codes" is
 * checked against EXIT_TABLE by test/unit/errors-catalogue.test.ts.
 */
export const Exit = {
  OK: 0,
  /** at least one disk failed its cycle (snapshot), or the receiver session ended in error */
  FAILED: 1,
  /** bad command line or configuration */
  USAGE: 2,
  /** status: at least one protected disk is overdue or failing */
  NOT_PROTECTED: 3,
  /** status: the daemon is not running (no heartbeat) */
  DAEMON_DOWN: 4,
  /** receive: the peer broke the protocol (malformed frame or message, wrong version) */
  PROTOCOL: 5,
  /** interrupted by SIGINT/SIGTERM */
  INTERRUPTED: 130,
} as const;

export type ExitCode = (typeof Exit)[keyof typeof Exit];

/** code -> what it means, as the README table shows it (the test compares them cell by cell). */
export const EXIT_TABLE: ReadonlyArray<readonly [ExitCode, string]> = [
  [Exit.OK, 'success; `status`: every protected disk is fresh; `receive`: the session ended cleanly'],
  [Exit.FAILED, 'a cycle or receiver session failed (the previous snapshot on the replica is intact)'],
  [Exit.USAGE, 'bad command line or configuration (the message names the file and field)'],
  [Exit.NOT_PROTECTED, '`status`: a protected disk is overdue or failing'],
  [Exit.DAEMON_DOWN, '`status`: protected disks exist but the daemon is not running'],
  [Exit.PROTOCOL, '`receive`: the peer broke the protocol (malformed frame or message, wrong protocol version)'],
  [Exit.INTERRUPTED, 'interrupted (SIGINT/SIGTERM): running work was aborted cleanly'],
];
