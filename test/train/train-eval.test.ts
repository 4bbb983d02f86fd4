// Training-time judging (output.eval_*): the machinery on a random toy model (its accuracy is noise, so the files,
// counts, TensorBoard tags and that the report is the judges' own are asserted), and its refusals before any step.
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeToyModel } from '../../src/data/toy-model.js';
import { readImageRgb } from '../../src/io/png.js';
import { judgeToyImage } from '../../src/eval/judges.js';
import { resolveConfig } from '../../src/train/config.js';
import { isNewConcept } from '../../src/train/eval.js';
import { train } from '../../src/train/loop.js';

const ROOT = path.join(import.meta.dirname, '../..');
let tmp: string;
let toy: string;
beforeAll(async () => {
  tmp = await mkdtemp(path.join(tmpdir(), 'sdtune-train-eval-'));
  toy = path.join(tmp, 'toy');
  await makeToyModel(toy);
});
afterAll(() => rm(tmp, { recursive: true, force: true }));

const lora = (over: Record<string, unknown>) =>
  resolveConfig('lora', null, {
    'model.path': toy, 'data.dir': path.join(ROOT, 'datasets/hearts'), 'train.batch_size': 4, 'train.max_steps': 2, 'train.seed': 1,
    'lora.rank': 2, 'output.eval_prompts': ['a red heart', 'a sks => blue star', 'a green circle'], 'output.eval_seeds': 2, 'output.eval_steps': 2, ...over,
  });

describe('output.eval_*: the judges during training', () => {
  it('judges before the first step, every eval_every steps and after the last; files, TensorBoard and the before/after table', async () => {
    const out = path.join(tmp, 'run');
    const lines: string[] = [];
    const r = await train('lora', lora({ 'output.dir': out, 'output.eval_every': 1 }), { quiet: true, log: (l) => lines.push(l) });
    expect(r.evals!.map((e) => e.step)).toEqual([0, 1, 2]);
    for (const e of r.evals!) {
      expect(e.report.prompts.map((p) => p.prompt)).toEqual(['a red heart', 'a sks', 'a green circle']);
      expect(e.report.overall.total).toBe(6);
      // the report is the judges' verdict on the images it returns
      e.images.forEach((row, i) => row.forEach((img, k) => expect(judgeToyImage({ data: img, width: 32, height: 32 }).colour.colour).toBe(e.report.prompts[i]!.samples[k]!.colour)));
    }
    const dir = path.join(out, 'eval');
    expect(readdirSync(dir).sort()).toEqual(['before-after.json', 'before-after.png', 'step-000000.json', 'step-000000.png', 'step-000001.json', 'step-000001.png', 'step-000002.json', 'step-000002.png']);
    const sheet = await readImageRgb(path.join(dir, 'step-000001.png'));
    expect([sheet.width, sheet.height]).toEqual([2 * 68 + 3 * 2, 3 * 68 + 4 * 2]); // 2 seeds x 3 prompts of 32x32 at 2x in 2 px frames, 2 px apart
    const ba = JSON.parse(readFileSync(path.join(dir, 'before-after.json'), 'utf8'));
    expect(ba.before.step).toBe(0);
    expect(ba.after.step).toBe(2);
    expect(ba.groups.map((g: { group: string; before: { total: number } }) => [g.group, g.before.total])).toEqual([['new concepts', 4], ['base prompts', 2]]);
    const table = lines.find((l) => l.startsWith('judged before and after'))!;
    expect(table).toMatch(/prompt +step 0 +step 2/);
    expect(table).toMatch(/new concepts +\d+\.\d% +\d+\.\d%/);
    expect(lines.filter((l) => /^eval at step \d+: \d+\/6 right/.test(l))).toHaveLength(3);
    // TensorBoard: the scalars and the contact sheet, tagged eval/
    const events = readdirSync(path.join(out, 'logs')).filter((f) => f.startsWith('events.out.tfevents'));
    const bytes = Buffer.concat(events.map((f) => readFileSync(path.join(out, 'logs', f)))).toString('latin1');
    for (const tag of ['eval/accuracy', 'eval/colour', 'eval/shape', 'eval/contact_sheet']) expect(bytes).toContain(tag);
  });

  it('new concepts: held-out colours and shapes, and words given a meaning', () => {
    expect(isNewConcept({ prompt: 'a red heart', expected: { colour: 'red', shape: 'heart' } })).toBe(true);
    expect(isNewConcept({ prompt: 'a purple star', expected: { colour: 'purple', shape: 'star' } })).toBe(true);
    expect(isNewConcept({ prompt: 'a sks', expected: { colour: 'blue', shape: 'star' } })).toBe(true);
    expect(isNewConcept({ prompt: 'a large red star on the left', expected: { colour: 'red', shape: 'star' } })).toBe(false);
  });

  it('refuses, before any step: a model the judges do not know, a prompt they cannot judge, eval_every with nothing to judge', async () => {
    let steps = 0;
    const onStep = () => void steps++;
    const tiny = lora({ 'model.path': path.join(ROOT, 'checkpoints/tiny-sd-v1'), 'data.resolution': 64, 'output.dir': path.join(tmp, 'tiny') });
    await expect(train('lora', tiny, { quiet: true, log: () => {}, onStep })).rejects.toThrow(/tiny-sd-v1 is not a toy-world model \(it samples 64x64 images, not 32x32\): the judges only know the toy world/);
    await expect(train('lora', lora({ 'output.eval_prompts': ['a dog'], 'output.dir': path.join(tmp, 'dog') }), { quiet: true, log: () => {}, onStep })).rejects.toThrow(
      /output\.eval_prompts \/ output\.eval_grid: prompt "a dog" names no toy-world colour/,
    );
    expect(steps).toBe(0);
    expect(existsSync(path.join(tmp, 'dog', 'eval'))).toBe(false);
    expect(() => resolveConfig('lora', null, { 'model.path': toy, 'data.dir': tmp, 'output.eval_every': 5 })).toThrow(/output\.eval_every is set but there is nothing to judge/);
  });
});
