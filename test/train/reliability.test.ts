// The training loop never saves poisoned weights, never mixes two runs, never writes through a symlink out of its
// output folder, and a resume replaces what TensorBoard logged after the checkpoint (bundled tiny model).
import { cpSync, existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { SdtuneError } from '../../src/errors.js';
import { SafetensorsFile, writeSafetensors } from '../../src/io/safetensors.js';
import { readEventFile } from '../../src/io/tensorboard.js';
import { listCheckpoints, resolveResume } from '../../src/train/checkpoint.js';
import { train } from '../../src/train/loop.js';
import { config, quiet } from './tiny.js';

const tmp = mkdtempSync(path.join(os.tmpdir(), 'sdtune-reliability-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));
const errorOf = async (p: Promise<unknown>) => {
  const e = await p.then(() => undefined, (x: unknown) => x);
  expect(e).toBeInstanceOf(SdtuneError);
  return e as SdtuneError;
};

describe('poisoned weights are never saved', () => {
  // lr 1e30 after one warm-up step at lr 0: step 1 is healthy (saved), step 2 sends the LoRA to ~1e29 while its loss,
  // computed before the update, is still finite
  const out = path.join(tmp, 'diverge');
  const cfg = () =>
    config('lora', out, { 'train.max_steps': 4, 'train.lr': 1e30, 'train.lr_scheduler': 'constant_with_warmup', 'train.lr_warmup_steps': 1, 'output.save_every': 1 });

  it('a finite loss with blown-up weights stops as diverged (exit 7), keeping only the good checkpoint and no export of the bad step', async () => {
    const e = await errorOf(train('lora', cfg(), quiet));
    expect(e.kind).toBe('diverged');
    expect(e.exitCode).toBe(7);
    const good = path.join(out, 'checkpoints', 'step-000001');
    expect(e.message).toMatch(/^training diverged at step 2: .*lora_(down|up)\.weight has values up to \d\.\d\de\+\d+ \(over 65504/);
    expect(e.message).toContain(`the last good checkpoint is ${good} (--resume ${out} continues from it)`);
    expect(readdirSync(path.join(out, 'checkpoints'))).toEqual(['step-000001']);
    expect(readdirSync(out).filter((f) => f.endsWith('.safetensors')).sort()).toEqual(['run-step-000001.safetensors']);
    // the lock is released after the failure
    expect(existsSync(path.join(out, '.sdtune.lock'))).toBe(false);
  });

  it('--resume skips a poisoned checkpoint (as older versions could write) with a note', async () => {
    const bad = path.join(out, 'checkpoints', 'step-000002');
    cpSync(path.join(out, 'checkpoints', 'step-000001'), bad, { recursive: true });
    const f = await SafetensorsFile.open(path.join(bad, 'trainable.safetensors'));
    const poisoned = new Map<string, { shape: number[]; data: Float32Array }>();
    for (const k of f.keys()) {
      const t = await f.readFloat(k);
      poisoned.set(k, { shape: t.shape, data: (t.data as Float32Array).map(() => NaN) });
    }
    await f.close();
    await writeSafetensors(path.join(bad, 'trainable.safetensors'), poisoned);
    const notes: string[] = [];
    expect(await resolveResume(out, (l) => notes.push(l))).toBe(path.join(out, 'checkpoints', 'step-000001'));
    expect(notes).toEqual([expect.stringMatching(new RegExp(`^note: skipping checkpoint ${bad}: .* has non-finite values$`))]);
    const e = await errorOf(resolveResume(bad));
    expect(e.message).toMatch(/this checkpoint cannot be resumed from: .* has non-finite values/);
  });
});

describe('one run per output folder', () => {
  it('a fresh run over an earlier one is refused; --overwrite replaces it; --resume continues it and TensorBoard purges the steps after the checkpoint', async () => {
    const out = path.join(tmp, 'twice');
    const first = await train('lora', config('lora', out, { 'train.max_steps': 2 }), quiet);
    expect(first.stopped).toBe('done');
    const e = await errorOf(train('lora', config('lora', out, { 'train.max_steps': 2 }), quiet));
    expect(e.kind).toBe('usage');
    expect(e.message).toBe(`${out} holds an earlier run (config.resolved.yaml, 1 checkpoint, run.safetensors); continue it with --resume ${out}, replace it with --overwrite, or choose another --output`);
    // resume: a new events file starting with SessionLog START at the first new step
    await train('lora', config('lora', out, { 'train.max_steps': 3 }), { ...quiet, resume: out });
    const logs = path.join(out, 'logs');
    const files = readdirSync(logs).sort();
    expect(files).toHaveLength(2);
    const resumed = await readEventFile(path.join(logs, files[1]));
    expect(resumed.filter((ev) => ev.sessionStatus !== undefined).map((ev) => [ev.step, ev.sessionStatus])).toEqual([[3, 1]]);
    // overwrite: the earlier checkpoints are gone before the new run saves its own
    await train('lora', config('lora', out, { 'train.max_steps': 1 }), { ...quiet, overwrite: true });
    expect((await listCheckpoints(path.join(out, 'checkpoints'))).map((d) => path.basename(d))).toEqual(['step-000001']);
  });

  it('pruning (keep_last) never deletes a checkpoint of another run', async () => {
    const out = path.join(tmp, 'prune');
    const foreign = path.join(out, 'checkpoints', 'step-000009');
    mkdirSync(foreign, { recursive: true });
    writeFileSync(path.join(foreign, 'state.json'), JSON.stringify({ method: 'lora', step: 9, runId: 'someone-else' }));
    // this run resumes from a copy of another folder's checkpoint, beside a checkpoint of some other run
    const first = await train('lora', config('lora', path.join(tmp, 'prune-src'), { 'train.max_steps': 1 }), quiet);
    cpSync(path.dirname(first.checkpoint), path.join(out, 'checkpoints'), { recursive: true });
    await train('lora', config('lora', out, { 'train.max_steps': 4, 'output.save_every': 1, 'output.keep_last': 1 }), { ...quiet, resume: path.join(out, 'checkpoints', 'step-000001') });
    const left = readdirSync(path.join(out, 'checkpoints')).sort();
    expect(left).toEqual(['step-000004', 'step-000009']);
    expect(JSON.parse(readFileSync(path.join(foreign, 'state.json'), 'utf8')).runId).toBe('someone-else');
  });

  it('a symlinked subfolder of the output is refused before anything is written through it', async () => {
    const out = path.join(tmp, 'linked');
    const elsewhere = path.join(tmp, 'elsewhere');
    mkdirSync(out, { recursive: true });
    mkdirSync(elsewhere);
    symlinkSync(elsewhere, path.join(out, 'logs'));
    const e = await errorOf(train('lora', config('lora', out, { 'train.max_steps': 1 }), quiet));
    expect(e.message).toBe(`${path.join(out, 'logs')} is a symbolic link; sdtune writes only inside the output folder ${out}: remove the link or choose another --output`);
    expect(readdirSync(elsewhere)).toEqual([]);
  });
});
