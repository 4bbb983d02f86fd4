// `sdtune sample` off a terminal (a child process with piped stderr): the size and memory line, progress lines
// from 0/N to N/N, the decode note; and sizes refused before any work with the sizes that would fit.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';

const BIN = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../bin/sdtune.js');
const tmp = mkdtempSync(path.join(os.tmpdir(), 'sdtune-sample-progress-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));
const sample = (...args: string[]) => {
  const r = spawnSync(process.execPath, [BIN, 'sample', '--model', 'checkpoints/tiny-sd-v1', '--prompt', 'a red circle', ...args], {
    encoding: 'utf8',
    env: { ...process.env, SDTUNE_BACKEND: 'wasm' },
  });
  return { code: r.status, out: r.stdout, err: r.stderr };
};

describe('sdtune sample off a TTY', () => {
  it('says what it runs with the memory estimate, then progress lines from 0/N to N/N, then the decode note', () => {
    const out = path.join(tmp, 'one.png');
    const r = sample('--steps', '4', '--seed', '1', '--out', out);
    expect(r.code, r.err).toBe(0);
    expect(r.out.trim()).toBe(out);
    expect(existsSync(out)).toBe(true);
    const lines = r.err.trim().split('\n');
    expect(lines[0]).toMatch(/^backend: wasm/);
    expect(lines[1]).toMatch(/^sample: 1 image\(s\) at 64x64 \(batch 1\), 4 steps PLMS, cfg 7\.5; memory ~[\d.]+ MB estimated of 3\.50 GB$/);
    // the first progress line comes before the first step; the steps are fast, so the next one is the last
    expect(lines[2]).toMatch(/^sample \[\.{24}\] 0\/4 -- it\/s /);
    expect(lines.slice(3)).toEqual([expect.stringMatching(/^sample \[#{24}\] 4\/4 [\d.]+ (it\/s|s\/it) /), 'decoding image 1 of 1 (64x64, VAE)']);
  });

  it('refuses a size whose estimate exceeds the wasm heap, with the largest size and batch that fit, exit code 2', () => {
    const r = sample('--width', '8192', '--height', '8192', '--out', path.join(tmp, 'big.png'));
    expect(r.code).toBe(2);
    expect(r.err.trim().split('\n').at(-1)).toMatch(
      /^error: 8192x8192, batch 1 with guidance needs an estimated [\d.]+ GB \(weights [\d.]+ MB x 2 with the backend's packed copy, activations [\d.]+ GB\) but the wasm backend \(safe heap 3\.5 GB\) allows 3\.50 GB; the largest square size that fits at batch 1 is \d+x\d+; no batch size fits at 8192x8192$/,
    );
    const bad = sample('--width', '1000000', '--out', path.join(tmp, 'bad.png'));
    expect(bad.code).toBe(2);
    expect(bad.err).toMatch(/error: width must be a multiple of 8 from 8 to 16384, got 1000000/);
  });
});
