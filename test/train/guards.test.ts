// Output-folder lock, earlier-run refusal and the trainables health check (src/train/guards.ts).
import * as tf from '@tensorflow/tfjs';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { SdtuneError } from '../../src/errors.js';
import { acquireRunLock, divergedError, earlierRun, prepareRunFolder, unhealthyTrainable } from '../../src/train/guards.js';

const tmp = mkdtempSync(path.join(os.tmpdir(), 'sdtune-guards-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

describe('run lock', () => {
  it('a second run into the same folder fails at once naming the holder; release frees it', async () => {
    const dir = path.join(tmp, 'locked');
    mkdirSync(dir);
    const lock = await acquireRunLock(dir);
    expect(JSON.parse(readFileSync(lock.file, 'utf8')).pid).toBe(process.pid);
    const e = await acquireRunLock(dir).catch((x: unknown) => x);
    expect(e).toBeInstanceOf(SdtuneError);
    expect((e as SdtuneError).message).toMatch(new RegExp(`in use by another sdtune run \\(pid ${process.pid}`));
    lock.release();
    expect(existsSync(lock.file)).toBe(false);
    (await acquireRunLock(dir)).release();
  });

  it('the lock of a killed process (pid gone) is taken over with a note', async () => {
    const dir = path.join(tmp, 'stale');
    mkdirSync(dir);
    const dead = spawnSync(process.execPath, ['-e', 'process.stdout.write(String(process.pid))'], { encoding: 'utf8' });
    const pid = Number(dead.stdout);
    writeFileSync(path.join(dir, '.sdtune.lock'), JSON.stringify({ pid, host: os.hostname(), started: 'earlier', command: 'lora' }));
    const notes: string[] = [];
    const lock = await acquireRunLock(dir, (l) => notes.push(l));
    expect(notes.join('\n')).toMatch(new RegExp(`stale lock .*pid ${pid}`));
    expect(JSON.parse(readFileSync(lock.file, 'utf8')).pid).toBe(process.pid);
    lock.release();
  });
});

describe('earlier runs in the output folder', () => {
  it('a fresh run over an earlier one is refused; --resume passes; --overwrite removes its checkpoints first', () => {
    const dir = path.join(tmp, 'run');
    mkdirSync(path.join(dir, 'checkpoints', 'step-000005'), { recursive: true });
    mkdirSync(path.join(dir, 'checkpoints', 'step-000010'));
    writeFileSync(path.join(dir, 'config.resolved.yaml'), 'x');
    writeFileSync(path.join(dir, 'style.safetensors'), 'x');
    expect(earlierRun(dir, 'style')).toEqual(['config.resolved.yaml', '2 checkpoints', 'style.safetensors']);
    expect(() => prepareRunFolder(dir, 'style', {})).toThrow(
      `${dir} holds an earlier run (config.resolved.yaml, 2 checkpoints, style.safetensors); continue it with --resume ${dir}, replace it with --overwrite, or choose another --output`,
    );
    prepareRunFolder(dir, 'style', { resume: true });
    expect(existsSync(path.join(dir, 'checkpoints', 'step-000010'))).toBe(true);
    prepareRunFolder(dir, 'style', { overwrite: true });
    expect(existsSync(path.join(dir, 'checkpoints'))).toBe(false);
    expect(earlierRun(dir, 'style')).toEqual(['style.safetensors']);
    expect(earlierRun(path.join(tmp, 'nothing-here'), 'style')).toEqual([]);
  });
});

describe('trainables health check', () => {
  it('finds NaN/Inf and absurd magnitudes; healthy weights pass', async () => {
    const ok = tf.variable(tf.tensor([0.5, -2, 3e4]), true, 'guard-ok');
    const nan = tf.variable(tf.tensor([1, NaN]), true, 'guard-nan');
    const huge = tf.variable(tf.tensor([1, -2.1e29]), true, 'guard-huge');
    expect(await unhealthyTrainable(new Map([['a', ok]]))).toBeUndefined();
    expect(await unhealthyTrainable(new Map([['a', ok], ['b', nan]]))).toEqual({ name: 'b', what: 'non-finite values (NaN or Inf)' });
    expect((await unhealthyTrainable(new Map([['c', huge]])))?.what).toMatch(/values up to 2.10e\+29 \(over 65504/);
    tf.dispose([ok, nan, huge]);
    const e = divergedError(3, 'x has NaN', '/o/checkpoints/step-000002', '/o');
    expect(e.exitCode).toBe(7);
    expect(e.message).toBe(
      'training diverged at step 3: x has NaN; nothing from this step was saved, the last good checkpoint is /o/checkpoints/step-000002 (--resume /o continues from it). Try a lower learning rate.',
    );
  });
});
