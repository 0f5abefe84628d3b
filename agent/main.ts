#!/usr/bin/env node
/**
 * onestor-agent entry (the launcher install.sh writes runs this file). Parsing and dispatch are in
 * cli.ts; this file only runs them and sets the exit code.
 */
import { runCli } from './cli.js';
import { Exit } from './exit-codes.js';

runCli(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (e: unknown) => {
    process.stderr.write(`onestor-agent: ${e instanceof Error ? e.message : String(e)}\n`);
    process.exitCode = Exit.FAILED;
  },
);
