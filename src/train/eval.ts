/**
 * Training-time validation with the toy world's judges (output.eval_prompts / output.eval_grid, issue 11): the
 * current weights sample each prompt with a few seeds, the judges score every image, and the run logs
 * `eval/accuracy` (and `eval/colour`, `eval/shape`) to TensorBoard, writes `<output>/eval/step-NNNNNN.{json,png}`
 * (the report and its contact sheet), and at the end prints a before/after table and writes
 * `<output>/eval/before-after.{json,png}`. It is how a run on the toy base shows what it learned.
 */
import { mkdir } from 'node:fs/promises';
import path from 'node:path';
import { TOY_HELD_OUT_COLOURS, TOY_HELD_OUT_SHAPES, parseToyPrompt } from '../data/toy-world.js';
import { usageError } from '../errors.js';
import { type EvalPrompt, type EvalReport, assertToyModel, evalPrompts, judgePrompts, resultSheet } from '../eval/evaluate.js';
import type { LoadedModel } from '../io/model.js';
import { writePng } from '../io/png.js';
import type { TensorBoardWriter } from '../io/tensorboard.js';
import { writeFileAtomic } from '../runtime/atomic.js';
import { resolveSampler } from '../schedulers/index.js';
import { checkpointName } from './checkpoint.js';
import type { ModelResolvedConfig } from './config.js';
import type { Recipe } from './recipe.js';

/** One judging of the run's weights. */
export interface TrainEval {
  step: number;
  report: EvalReport;
  /** uint8 RGB 32x32x3 per [prompt][seed] */
  images: Uint8Array[][];
}

/** The prompts the run judges (null when output.eval_* asks for none); refuses a model the judges do not know. */
export function trainEvalPrompts(c: ModelResolvedConfig, model: LoadedModel): EvalPrompt[] | null {
  const o = c.output;
  if (!o.eval_prompts.length && o.eval_grid === null) return null;
  let prompts: EvalPrompt[];
  try {
    prompts = evalPrompts(o.eval_prompts, o.eval_grid ?? undefined);
  } catch (e) {
    throw usageError(`output.eval_prompts / output.eval_grid: ${(e as Error).message.replace(/^eval: /, '')}`);
  }
  assertToyModel(model);
  return prompts;
}

const pct = (x: number | null) => (x === null ? '-' : `${(100 * x).toFixed(1)}%`);

/** Judge the model's current weights at `step` (run inside the loop's export-weights scope). */
export async function evalAtStep(
  model: LoadedModel,
  recipe: Recipe,
  c: ModelResolvedConfig,
  prompts: readonly EvalPrompt[],
  step: number,
  tb: TensorBoardWriter,
  opts: { quiet?: boolean; log: (line: string) => void },
): Promise<TrainEval> {
  const o = c.output;
  const r = await recipe.withInference((use) =>
    judgePrompts(model, prompts, {
      seeds: o.eval_seeds,
      seed: 0,
      cfg: o.eval_cfg,
      steps: o.eval_steps,
      sampler: resolveSampler('ddim'),
      rewrite: (p) => recipe.expandPrompt?.(p) ?? p, // base prompts as written (not samplePrompt's TI template)
      context: use?.context,
      quiet: opts.quiet,
      label: `eval@${step}`,
    }),
  );
  const ov = r.report.overall;
  tb.scalars(
    { 'eval/accuracy': ov.accuracy, ...(ov.colourAccuracy !== null && { 'eval/colour': ov.colourAccuracy }), ...(ov.shapeAccuracy !== null && { 'eval/shape': ov.shapeAccuracy }) },
    step,
  );
  const dir = path.join(o.dir!, 'eval');
  await mkdir(dir, { recursive: true });
  const base = path.join(dir, checkpointName(step));
  const sheet = resultSheet(r);
  await writePng(`${base}.png`, sheet.data, sheet.width, sheet.height);
  await writeFileAtomic(`${base}.json`, new TextEncoder().encode(JSON.stringify({ step, ...r.report }, null, 2) + '\n'));
  await tb.image('eval/contact_sheet', sheet, step);
  opts.log(`eval at step ${step}: ${ov.correct}/${ov.total} right = ${pct(ov.accuracy)} (colour ${pct(ov.colourAccuracy)}, shape ${pct(ov.shapeAccuracy)}); ${base}.png`);
  return { step, ...r };
}

/**
 * Whether a prompt asks for something the base world never showed: a held-out colour or shape (purple, heart), or a
 * word the judges were told the meaning of ("a sks => green star").
 */
export function isNewConcept(p: { prompt: string; expected: { colour?: string; shape?: string } }): boolean {
  const said = parseToyPrompt(p.prompt);
  const held = (TOY_HELD_OUT_COLOURS as readonly string[]).includes(p.expected.colour ?? '') || (TOY_HELD_OUT_SHAPES as readonly string[]).includes(p.expected.shape ?? '');
  return held || said.colour !== p.expected.colour || said.shape !== p.expected.shape;
}

/** Accuracy over the prompts of one group (null when the group is empty). */
function groupShare(r: EvalReport, pick: (p: EvalReport['prompts'][number]) => boolean): { correct: number; total: number } | null {
  const rows = r.prompts.filter(pick);
  return rows.length ? { correct: rows.reduce((a, p) => a + p.correct, 0), total: rows.reduce((a, p) => a + p.total, 0) } : null;
}

/** Before/after accuracy of the new-concept prompts and of the base prompts (a group that is absent is left out). */
export function beforeAfterGroups(first: TrainEval, last: TrainEval): { group: 'new concepts' | 'base prompts'; before: { correct: number; total: number }; after: { correct: number; total: number } }[] {
  const out = [];
  for (const [group, pick] of [['new concepts', isNewConcept], ['base prompts', (p: EvalPrompt) => !isNewConcept(p)]] as const) {
    const before = groupShare(first.report, pick), after = groupShare(last.report, pick);
    if (before && after) out.push({ group, before, after });
  }
  return out;
}

/** The before/after table: per prompt, the first and the last judging's accuracy. */
export function formatBeforeAfter(first: TrainEval, last: TrainEval): string {
  const rows = first.report.prompts.map((p, i) => ({ prompt: p.prompt, before: p, after: last.report.prompts[i]! }));
  const w = Math.max(6, ...rows.map((r) => r.prompt.length));
  const head = `${'prompt'.padEnd(w)}  ${`step ${first.step}`.padStart(10)}  ${`step ${last.step}`.padStart(10)}`;
  const line = (name: string, a: { correct: number; total: number }, b: { correct: number; total: number }) =>
    `${name.padEnd(w)}  ${`${a.correct}/${a.total}`.padStart(10)}  ${`${b.correct}/${b.total}`.padStart(10)}`;
  const o1 = first.report.overall, o2 = last.report.overall;
  return [
    head,
    ...rows.map((r) => line(r.prompt, r.before, r.after)),
    ...beforeAfterGroups(first, last).map((g) => `${g.group.padEnd(w)}  ${pct(g.before.correct / g.before.total).padStart(10)}  ${pct(g.after.correct / g.after.total).padStart(10)}`),
    `${'overall'.padEnd(w)}  ${pct(o1.accuracy).padStart(10)}  ${pct(o2.accuracy).padStart(10)}`,
    `(${first.report.sampler}, ${first.report.steps} steps, cfg ${first.report.cfg}, seeds ${first.report.seeds[0]}..${first.report.seeds.at(-1)}; judged right = colour and shape as the prompt says)`,
  ].join('\n');
}

/** Write before-after.png (the first and last contact sheets side by side) and before-after.json. */
export async function writeBeforeAfter(c: ModelResolvedConfig, first: TrainEval, last: TrainEval): Promise<string> {
  const a = resultSheet(first), b = resultSheet(last);
  const gap = 8, width = a.width + gap + b.width, height = Math.max(a.height, b.height);
  const data = new Uint8Array(width * height * 3).fill(255);
  for (let y = 0; y < height; y++) {
    if (y < a.height) data.set(a.data.subarray(y * a.width * 3, (y + 1) * a.width * 3), y * width * 3);
    if (y < b.height) data.set(b.data.subarray(y * b.width * 3, (y + 1) * b.width * 3), (y * width + a.width + gap) * 3);
  }
  const base = path.join(c.output.dir!, 'eval', 'before-after');
  await writePng(`${base}.png`, data, width, height);
  const summary = (e: TrainEval) => ({ step: e.step, overall: e.report.overall, prompts: e.report.prompts.map((p) => ({ prompt: p.prompt, correct: p.correct, total: p.total, accuracy: p.accuracy })) });
  await writeFileAtomic(`${base}.json`, new TextEncoder().encode(JSON.stringify({ before: summary(first), after: summary(last), groups: beforeAfterGroups(first, last) }, null, 2) + '\n'));
  return `${base}.png`;
}
