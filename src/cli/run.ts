/**
 * The one place where errors become exit codes: SdtuneError -> "error: <message>" on one line and its exit code;
 * anything else is a bug and is reported with its stack.
 */
import { SdtuneError } from '../errors.js';

/** Run a command body and exit with the right code. */
export async function runCommand(body: () => Promise<void>): Promise<void> {
  try {
    await body();
  } catch (e) {
    if (e instanceof SdtuneError) {
      process.stderr.write(`error: ${e.message}\n`);
      process.exitCode = e.exitCode;
    } else {
      process.stderr.write(`internal error (please report): ${e instanceof Error ? (e.stack ?? e.message) : String(e)}\n`);
      process.exitCode = 70;
    }
  }
}
