import { expect } from 'vitest';
import { OnestorError } from '../../lib/shared/errors.js';

/** Runs fn, which must throw an OnestorError; returns it for assertions on code, file and field. */
export function thrownOnestorError(fn: () => unknown): OnestorError {
  try {
    fn();
  } catch (e) {
    expect(e).toBeInstanceOf(OnestorError);
    return e as OnestorError;
  }
  throw new Error('expected an OnestorError, nothing was thrown');
}
