/**
 * Access to the reference data in ../shared/golden (read in place, never copied). On a fresh clone without
 * ../shared the golden suites are skipped, and the reason is printed once per file.
 */
import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, it } from 'vitest';

const here = path.dirname(fileURLToPath(import.meta.url));
export const GOLDEN = process.env.SDTUNE_GOLDEN ?? path.resolve(here, '../../shared/golden');
export const HAVE_GOLDEN = existsSync(path.join(GOLDEN, 'cases', 'index.json'));

/** Absolute path of a file under the golden folder. */
export const golden = (...parts: string[]) => path.join(GOLDEN, ...parts);

/**
 * `describe` that runs only when the golden data is present. Without it the body is not even collected (it may read
 * golden files at collection time); one skipped entry names the suite, and test/global-setup.ts says why, once.
 */
export function describeGolden(name: string, fn: () => void): void {
  describe.skipIf(!HAVE_GOLDEN)(name, HAVE_GOLDEN ? fn : () => it('needs ../shared/golden', () => {}));
}

export interface GoldenCase {
  description?: string;
  tolerance?: string | { atol?: number; rtol?: number; [k: string]: unknown };
  file?: string;
  tensors?: Record<string, { shape: number[]; dtype: string }>;
  [k: string]: unknown;
}

let index: { cases: Record<string, GoldenCase> } | undefined;
/** One case of cases/index.json. */
export function goldenCase(name: string): GoldenCase {
  index ??= JSON.parse(readFileSync(golden('cases', 'index.json'), 'utf8'));
  const c = index!.cases[name];
  if (!c) throw new Error(`golden case ${name} not in index.json`);
  return c;
}

/** The absolute tolerance a case declares. */
export function atolOf(name: string): number {
  const t = goldenCase(name).tolerance;
  if (typeof t === 'object' && t && typeof t.atol === 'number') return t.atol;
  throw new Error(`golden case ${name} has no atol tolerance: ${JSON.stringify(t)}`);
}

/** All tensors of a case file (cases/<name>.safetensors). */
export async function caseTensors(name: string) {
  const { SafetensorsFile } = await import('../src/io/safetensors.js');
  const f = await SafetensorsFile.open(golden('cases', `${name}.safetensors`));
  try {
    return await f.readAll();
  } finally {
    await f.close();
  }
}
