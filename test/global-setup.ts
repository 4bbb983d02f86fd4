// Runs once per test run (not per file): say once, visibly, when the reference data is absent.
import { existsSync } from 'node:fs';
import path from 'node:path';

export default function setup(): void {
  const dir = process.env.SDTUNE_GOLDEN ?? path.resolve(import.meta.dirname, '../../shared/golden');
  if (!existsSync(path.join(dir, 'cases', 'index.json'))) {
    console.warn(`[sdtune tests] golden reference data not found at ${dir}: parity tests are skipped (set SDTUNE_GOLDEN or place ../shared next to the repo)`);
  }
}
