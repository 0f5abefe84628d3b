/** Documented exit codes (README "Exit codes"); scripts and monitoring checks rely on them. */
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
  /** interrupted by SIGINT/SIGTERM */
  INTERRUPTED: 130,
} as const;
