/**
 * "Did it learn": fine-tuning the bundled toy base (checkpoints/toy-sd) teaches it what it never saw, judged by the
 * toy world's judges (issue 11). Each run uses the bundled config of its demo, shortened where the measured curve
 * allows, with the judges before and after (output.eval_prompts, the same code the user's run prints). Thresholds are
 * measured values with margin (see each case); a failure prints the before/after table.
 */
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { writeToyWorld } from '../../src/data/toy-world.js';
import { type Method, resolveConfig } from '../../src/train/config.js';
import { type TrainEval, beforeAfterGroups, formatBeforeAfter, isNewConcept } from '../../src/train/eval.js';
import { train } from '../../src/train/loop.js';

const ROOT = path.join(import.meta.dirname, '../..');
const tmp = mkdtempSync(path.join(os.tmpdir(), 'sdtune-learn-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const TOY = path.join(ROOT, 'checkpoints', 'toy-sd');

/** Train `method` from a bundled config (paths made absolute, output in tmp) with overrides; returns the first and last judging. */
async function judgedRun(method: Method, config: string | null, overrides: Record<string, unknown>): Promise<{ first: TrainEval; last: TrainEval; table: string }> {
  const yaml = config ? readFileSync(path.join(ROOT, config), 'utf8') : null;
  const c = resolveConfig(method, yaml, { 'model.path': TOY, 'output.dir': path.join(tmp, `${method}-${Math.random().toString(36).slice(2)}`), 'output.eval_every': null, ...overrides });
  const r = await train(method, c, { quiet: true, log: () => {} });
  const evals = r.evals!;
  expect(evals.length).toBe(2);
  return { first: evals[0]!, last: evals.at(-1)!, table: formatBeforeAfter(evals[0]!, evals.at(-1)!) };
}

const share = (e: TrainEval, pick: (p: TrainEval['report']['prompts'][number]) => boolean) => {
  const rows = e.report.prompts.filter(pick);
  return rows.reduce((a, p) => a + p.correct, 0) / rows.reduce((a, p) => a + p.total, 0);
};

describe('fine-tuning the toy base learns what it never saw (judged)', () => {
  it('LoRA (configs/heart.yaml): hearts from ~0 to >= 80%', async () => {
    // measured (wasm, 400 steps): hearts 1/16 -> 16/16 (100 steps: 10/16, 300: 12/16); base prompts 15/16 -> 10/16
    const { first, last, table } = await judgedRun('lora', 'configs/heart.yaml', { 'data.dir': path.join(ROOT, 'datasets', 'hearts') });
    const hearts = (e: TrainEval) => share(e, isNewConcept);
    expect(hearts(first), table).toBeLessThanOrEqual(0.2);
    expect(hearts(last), table).toBeGreaterThanOrEqual(0.8);
    expect(beforeAfterGroups(first, last).map((g) => g.group)).toEqual(['new concepts', 'base prompts']);
  });

  it('textual inversion (configs/logo.yaml): <my-logo> draws a blue triangle (>= 90%), the base prompts are unchanged (>= 90%)', async () => {
    // measured (wasm, 100 steps): <my-logo> 0/8 -> 8/8 (50 steps: 7/8); base prompts 15/16 before and after (the
    // base's own miss: one yellow star drawn as a circle)
    const { first, last, table } = await judgedRun('textual_inversion', 'configs/logo.yaml', { 'data.dir': path.join(ROOT, 'datasets', 'toy-logo') });
    expect(share(first, isNewConcept), table).toBeLessThanOrEqual(0.25);
    expect(share(last, isNewConcept), table).toBeGreaterThanOrEqual(0.9);
    // only the new word's vector trains: every base prompt's images are the same verdicts as before, and right
    const base = (e: TrainEval) => e.report.prompts.filter((p) => !isNewConcept(p));
    expect(base(last).map((p) => p.samples.map((s) => [s.colour, s.shape])), table).toEqual(base(first).map((p) => p.samples.map((s) => [s.colour, s.shape])));
    expect(share(last, (p) => !isNewConcept(p)), table).toBeGreaterThanOrEqual(0.9);
  });

  it('full fine-tune: a new colour (purple)', async () => {
    const data = path.join(tmp, 'purple');
    await writeToyWorld(data, 32, { seed: 5, colours: ['purple'], quiet: true });
    const { first, last, table } = await judgedRun('finetune', null, {
      'data.dir': data,
      'train.max_steps': FULL_FT_STEPS,
      'train.batch_size': 8,
      'train.lr': 1e-4,
      'train.seed': 42,
      'output.eval_prompts': ['a purple circle', 'a purple square', 'a purple triangle', 'a purple star'],
    });
    expect(share(first, isNewConcept), table).toBeLessThanOrEqual(0.2);
    expect(share(last, isNewConcept), table).toBeGreaterThanOrEqual(FULL_FT_MIN);
  });
});

/** Full fine-tune steps and the threshold. Measured (wasm, lr 1e-4, batch 8, 32 purple images): purple prompts 0/16
 *  at step 0, 14/16 at 50 and 100, 12/16 at 150, 16/16 at 200; the base prompts fall from 15/16 to 0/16 (everything
 *  turns purple: what prior preservation is for). */
const FULL_FT_STEPS = 100;
const FULL_FT_MIN = 0.7;
