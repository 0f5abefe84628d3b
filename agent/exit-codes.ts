/** The exit-code table lives in lib/shared/exit-codes.ts (the receiver uses it too); re-exported for the CLI. */
export { Exit, EXIT_TABLE, type ExitCode } from '../lib/shared/exit-codes.js';
