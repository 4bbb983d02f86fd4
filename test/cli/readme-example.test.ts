// The README's library example, run as written (from a folder laid out like the repo root), so it cannot rot.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const tmp = mkdtempSync(path.join(os.tmpdir(), 'sdtune-readme-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

/** The first ```ts block of the README's "## Library" section. */
function libraryExample(): string {
  const readme = readFileSync(path.join(ROOT, 'README.md'), 'utf8');
  const section = readme.slice(readme.indexOf('\n## Library\n'));
  const m = /```ts\n([\s\S]*?)```/.exec(section);
  if (!m) throw new Error('README.md: no ```ts block in the Library section');
  return m[1];
}

describe('README library example', () => {
  it('loads, samples a 64x64 PNG, trains a 4-step LoRA and lists its export', () => {
    const code = libraryExample();
    expect(code).toMatch(/from 'sdtune';/);
    const file = path.join(tmp, 'example.mts');
    writeFileSync(file, code.replace(/from 'sdtune';/, `from '${pathToFileURL(path.join(ROOT, 'src/index.ts')).href}';`));
    for (const d of ['checkpoints', 'datasets']) symlinkSync(path.join(ROOT, d), path.join(tmp, d));
    const tsx = pathToFileURL(createRequire(import.meta.url).resolve('tsx/esm')).href;
    const r = spawnSync(process.execPath, ['--import', tsx, file], { cwd: tmp, encoding: 'utf8', env: { ...process.env, SDTUNE_BACKEND: 'wasm' } });
    expect(r.status, r.stderr).toBe(0);
    const lines = r.stdout.trim().split('\n');
    expect(lines[0]).toMatch(/^backend: wasm/);
    expect(lines[1]).toBe('seed 1: library-example.png');
    expect(lines.slice(2, 6).map((l) => l.replace(/[\d.]+$/, 'X'))).toEqual(['step 1: loss X', 'step 2: loss X', 'step 3: loss X', 'step 4: loss X']);
    expect(lines[6]).toBe("[ 'output/library-example/lora.safetensors' ]");
    const png = readFileSync(path.join(tmp, 'library-example.png'));
    expect([png.readUInt32BE(16), png.readUInt32BE(20)]).toEqual([64, 64]); // IHDR width, height
    expect(existsSync(path.join(tmp, 'output/library-example/lora.safetensors'))).toBe(true);
  });
});
