/**
 * `sdtune eval` as a library call: sample each prompt with each seed through the one pipeline (src/infer/pipeline.ts,
 * LoRAs and embeddings applied as `sdtune sample` applies them), judge every image against the colour and shape its
 * prompt names (src/eval/judges.ts), and report per-prompt and overall accuracy, as JSON and as a contact sheet
 * (rows = prompts, columns = seeds, each image framed green when right and red when wrong).
 *
 * The judges only know the toy world, so the model must be a toy-world model: 32x32 images (UNet sample_size x the
 * VAE's pixels per latent) and a tokenizer with every world word as one token (see assertToyModel).
 */
import { existsSync } from 'node:fs';
import { mkdir } from 'node:fs/promises';
import path from 'node:path';
import { SdtuneError, usageError } from '../errors.js';
import { TOY_BASE_COLOURS, TOY_BASE_SHAPES, TOY_COLOURS, TOY_SHAPES, TOY_SIZE, TOY_WORDS, type ToyColour, type ToyShape, parseToyPrompt } from '../data/toy-world.js';
import { type LoadedModel, type OpenModelOptions, disposeModel, inspectModel, loadModel } from '../io/model.js';
import { writePng } from '../io/png.js';
import { vaeScaleFactor } from '../models/configs.js';
import { writeFileAtomic } from '../runtime/atomic.js';
import { progress } from '../runtime/progress.js';
import { SAMPLER_LABELS, resolveSampler } from '../schedulers/index.js';
import { generate, toUint8 } from '../infer/pipeline.js';
import { type SampleEmbedding, type SampleLora, applyAdapters } from '../infer/sample.js';
import type { ContextAdapter } from '../models/layers.js';
import { judgeToyImage } from './judges.js';

export interface EvaluateOptions {
  /** a model folder / file, or a model already loaded (it is left loaded, adapters undone) */
  model: string | LoadedModel;
  /** prompts; "PROMPT => EXPECTED" judges PROMPT against the colour/shape EXPECTED names (e.g. "a sks => green star") */
  prompts?: string[];
  /** a prompt grid "COLOURS x SHAPES": each side "colours" / "shapes" (the base ones) or a comma list; "a <colour> <shape>" */
  grid?: string;
  /** number of seeds per prompt (seeds seed, seed + 1, ...); default 4 */
  seeds?: number;
  /** first seed (default 0) */
  seed?: number;
  /** default 3 (toyworld.md: the best CFG of the base) */
  cfg?: number;
  /** default 20 */
  steps?: number;
  /** default ddim */
  sampler?: string;
  negativePrompt?: string;
  /** LoRAs and embeddings applied as sampleToFiles applies them */
  lora?: SampleLora[];
  embedding?: SampleEmbedding[];
  /** folder for eval.json and contact-sheet.png (default: nothing written) */
  out?: string;
  /** replace eval.json / contact-sheet.png in `out` (default: refuse) */
  overwrite?: boolean;
  load?: OpenModelOptions;
  quiet?: boolean;
  log?: (line: string) => void;
}

/** One image's verdict. */
export interface EvalSample {
  seed: number;
  colour: ToyColour | null;
  shape: ToyShape | null;
  correct: boolean;
}

export interface EvalPromptRow {
  prompt: string;
  /** what the prompt is judged against (absent: not judged on that attribute) */
  expected: { colour?: ToyColour; shape?: ToyShape };
  samples: EvalSample[];
  correct: number;
  total: number;
  accuracy: number;
  /** images with the right colour / the right shape (each counted where the prompt names it) */
  colourCorrect: number;
  shapeCorrect: number;
}

export interface EvalReport {
  model: string;
  sampler: string;
  steps: number;
  cfg: number;
  seeds: number[];
  prompts: EvalPromptRow[];
  overall: { correct: number; total: number; accuracy: number; colourAccuracy: number | null; shapeAccuracy: number | null };
  /** files written (absent without `out`) */
  files?: { json: string; contactSheet: string };
}

export interface EvalResult {
  report: EvalReport;
  /** the samples as uint8 RGB [32, 32, 3], [prompt][seed] */
  images: Uint8Array[][];
}

/** One prompt to judge: the text sampled and what it is judged against. */
export interface EvalPrompt {
  prompt: string;
  expected: { colour?: ToyColour; shape?: ToyShape };
}

/** Parse prompts ("PROMPT" or "PROMPT => EXPECTED") and a grid into what is sampled and what it is judged against. */
export function evalPrompts(prompts: readonly string[] = [], grid?: string): EvalPrompt[] {
  const out: EvalPrompt[] = [];
  for (const p of prompts) {
    const sep = p.indexOf('=>');
    const text = (sep >= 0 ? p.slice(0, sep) : p).trim();
    const expected = parseToyPrompt(sep >= 0 ? p.slice(sep + 2) : p);
    if (!text) throw usageError(`eval: empty prompt in ${JSON.stringify(p)}`);
    if (!expected.colour && !expected.shape) {
      throw usageError(
        `eval: prompt ${JSON.stringify(p)} names no toy-world colour (${TOY_COLOURS.join(', ')}) or shape (${TOY_SHAPES.join(', ')}); ` +
          `the judges need one (for a new word write "a sks => green star")`,
      );
    }
    out.push({ prompt: text, expected: { ...(expected.colour && { colour: expected.colour }), ...(expected.shape && { shape: expected.shape }) } });
  }
  if (grid !== undefined) {
    const sides = grid.split(/\s+x\s+/i).map((s) => s.trim());
    if (sides.length !== 2) throw usageError(`eval: a grid is "COLOURS x SHAPES" (e.g. "colours x shapes" or "red,purple x heart"), got ${JSON.stringify(grid)}`);
    const side = <T extends string>(s: string, kind: string, base: readonly T[], all: readonly T[]): T[] => {
      if (s === kind) return [...base];
      const xs = s.split(',').map((x) => x.trim()).filter(Boolean);
      for (const x of xs) if (!(all as readonly string[]).includes(x)) throw usageError(`eval: unknown ${kind.slice(0, -1)} "${x}" in the grid (known: ${all.join(', ')}, or "${kind}")`);
      if (!xs.length) throw usageError(`eval: the grid's ${kind} side is empty`);
      return xs as T[];
    };
    for (const colour of side(sides[0]!, 'colours', TOY_BASE_COLOURS, TOY_COLOURS)) {
      for (const shape of side(sides[1]!, 'shapes', TOY_BASE_SHAPES, TOY_SHAPES)) out.push({ prompt: `a ${colour} ${shape}`, expected: { colour, shape } });
    }
  }
  if (!out.length) throw usageError('eval: give prompts (--prompts "a red circle" ...) or a grid (--grid "colours x shapes")');
  return out;
}

/**
 * Refuse a model the judges cannot score: the toy world's images are 32x32 and its prompts are world words, so the
 * model must sample 32x32 by default and its tokenizer must hold every world word as one token.
 */
export function assertToyModel(m: LoadedModel): void {
  const side = m.unet && m.vae ? m.unet.config.sample_size * vaeScaleFactor(m.vae.config) : undefined;
  const missing = m.tokenizer ? TOY_WORDS.filter((w) => m.tokenizer!.tokenize(w).length !== 1) : [...TOY_WORDS];
  refuseUnlessToy(m.path, side, missing);
}

function refuseUnlessToy(where: string, side: number | undefined, missing: readonly string[]): void {
  if (side === TOY_SIZE && missing.length === 0) return;
  const why = side !== TOY_SIZE ? `it samples ${side === undefined ? 'nothing (no unet/vae)' : `${side}x${side}`} images, not ${TOY_SIZE}x${TOY_SIZE}` : `its tokenizer splits the world's words (${missing.slice(0, 4).join(', ')}${missing.length > 4 ? ', ...' : ''})`;
  throw new SdtuneError('unsupported', `${where} is not a toy-world model (${why}): the judges only know the toy world (32x32 coloured shapes, see sdtune toy-world); evaluate a model built from it`);
}

/** The image size check from the configs alone, before any weights are read (an SD v1 is refused in a second, not after loading 4 GB). */
async function precheckToyModel(model: string, load: OpenModelOptions | undefined): Promise<void> {
  const r = await inspectModel(model, load);
  const u = r.components.unet?.config, v = r.components.vae?.config;
  const boc = v?.block_out_channels;
  const side = u && Array.isArray(boc) && typeof u.sample_size === 'number' ? u.sample_size * vaeScaleFactor({ block_out_channels: boc as number[] }) : undefined;
  if (side !== TOY_SIZE) refuseUnlessToy(model, side, []);
}

const pct = (x: number) => `${(100 * x).toFixed(1)}%`;

/** The report as a text table: one row per prompt, then the overall line. */
export function formatEvalTable(r: EvalReport): string {
  const w = Math.max(6, ...r.prompts.map((p) => p.prompt.length));
  const lines = [`${'prompt'.padEnd(w)}  right  colour  shape  accuracy  verdicts (colour shape per seed)`];
  for (const p of r.prompts) {
    const v = p.samples.map((s) => `${s.correct ? '+' : '-'}${s.colour ?? 'none'}/${s.shape ?? 'none'}`).join(' ');
    lines.push(`${p.prompt.padEnd(w)}  ${`${p.correct}/${p.total}`.padStart(5)}  ${String(p.colourCorrect).padStart(6)}  ${String(p.shapeCorrect).padStart(5)}  ${pct(p.accuracy).padStart(8)}  ${v}`);
  }
  const o = r.overall;
  const extra = [o.colourAccuracy !== null ? `colour ${pct(o.colourAccuracy)}` : '', o.shapeAccuracy !== null ? `shape ${pct(o.shapeAccuracy)}` : ''].filter(Boolean).join(', ');
  lines.push(`overall: ${o.correct}/${o.total} = ${pct(o.accuracy)}${extra ? ` (${extra})` : ''}; ${r.sampler}, ${r.steps} steps, cfg ${r.cfg}, seeds ${r.seeds[0]}..${r.seeds[r.seeds.length - 1]}`);
  return lines.join('\n');
}

/** Contact sheet geometry: each image at SCALE x, in a FRAME-px frame (green right, red wrong), GAP px apart on white. */
const SCALE = 2, FRAME = 2, GAP = 2;

/** The contact sheet as RGB: rows = prompts, columns = seeds. */
export function contactSheet(images: Uint8Array[][], correct: boolean[][]): { data: Uint8Array; width: number; height: number } {
  const rows = images.length, cols = Math.max(1, ...images.map((r) => r.length));
  const cell = TOY_SIZE * SCALE + 2 * FRAME;
  const width = cols * cell + (cols + 1) * GAP, height = rows * cell + (rows + 1) * GAP;
  const data = new Uint8Array(width * height * 3).fill(255);
  const put = (x: number, y: number, rgb: ArrayLike<number>) => data.set([rgb[0]!, rgb[1]!, rgb[2]!], (y * width + x) * 3);
  images.forEach((row, r) =>
    row.forEach((img, c) => {
      const x0 = GAP + c * (cell + GAP), y0 = GAP + r * (cell + GAP);
      const frame = correct[r]![c] ? [40, 170, 60] : [210, 40, 40];
      for (let y = 0; y < cell; y++) for (let x = 0; x < cell; x++) put(x0 + x, y0 + y, frame);
      for (let y = 0; y < TOY_SIZE * SCALE; y++) {
        for (let x = 0; x < TOY_SIZE * SCALE; x++) {
          const p = (Math.floor(y / SCALE) * TOY_SIZE + Math.floor(x / SCALE)) * 3;
          put(x0 + FRAME + x, y0 + FRAME + y, img.subarray(p, p + 3));
        }
      }
    }),
  );
  return { data, width, height };
}

/** Options of judgePrompts: what evaluateModel passes, and the training loop (its current weights' context). */
export interface JudgeOptions {
  seeds: number;
  seed: number;
  cfg: number;
  steps: number;
  sampler: ReturnType<typeof resolveSampler>;
  negativePrompt?: string;
  /** the prompt as sampled (trigger words of embeddings; default: unchanged) */
  rewrite?: (prompt: string) => string;
  /** extra UNet context (a hypernetwork being trained) */
  context?: ContextAdapter;
  quiet?: boolean;
  label?: string;
}

/**
 * Sample every prompt with `seeds` seeds on a loaded toy-world model (adapters already applied) and judge each
 * image: the core of evaluateModel, also run by the training loop on its current weights (output.eval_*).
 */
export async function judgePrompts(m: LoadedModel, prompts: readonly EvalPrompt[], o: JudgeOptions): Promise<EvalResult> {
  assertToyModel(m);
  const rewrite = o.rewrite ?? ((p: string) => p);
  const { steps, cfg, sampler } = o;
  const seed0 = o.seed, nSeeds = o.seeds;
  const seeds = Array.from({ length: nSeeds }, (_, i) => seed0 + i);
  const bar = o.quiet ? undefined : progress({ total: prompts.length * steps, label: o.label ?? 'eval', logEvery: Math.max(1, Math.ceil((prompts.length * steps) / 10)), logSeconds: 10 });
  const rows: EvalPromptRow[] = [];
  const images: Uint8Array[][] = [];
  for (const p of prompts) {
    // one batch per prompt: image i uses its own generator seeded seed0 + i, the same as sampling it alone
    const r = await generate(m, { prompt: rewrite(p.prompt), negativePrompt: rewrite(o.negativePrompt ?? ''), sampler, steps, cfg, seed: seed0, batchSize: nSeeds, context: o.context, onStep: () => bar?.tick(1) });
    const row = r.images.map(toUint8);
    images.push(row);
    const samples = row.map((img, k): EvalSample => {
      const v = judgeToyImage({ data: img, width: TOY_SIZE, height: TOY_SIZE });
      const colour = v.colour.colour, shape = v.shape.shape;
      const correct = (!p.expected.colour || colour === p.expected.colour) && (!p.expected.shape || shape === p.expected.shape);
      return { seed: r.seeds[k]!, colour, shape, correct };
    });
    const correct = samples.filter((s) => s.correct).length;
    rows.push({
      prompt: p.prompt,
      expected: p.expected,
      samples,
      correct,
      total: samples.length,
      accuracy: correct / samples.length,
      colourCorrect: p.expected.colour ? samples.filter((s) => s.colour === p.expected.colour).length : 0,
      shapeCorrect: p.expected.shape ? samples.filter((s) => s.shape === p.expected.shape).length : 0,
    });
  }
  bar?.done();
  const total = rows.reduce((n, r) => n + r.total, 0);
  const correct = rows.reduce((n, r) => n + r.correct, 0);
  const share = (key: 'colour' | 'shape') => {
    const judged = rows.filter((r) => r.expected[key]);
    const n = judged.reduce((a, r) => a + r.total, 0);
    return n ? judged.reduce((a, r) => a + (key === 'colour' ? r.colourCorrect : r.shapeCorrect), 0) / n : null;
  };
  const report: EvalReport = {
    model: m.path,
    sampler: SAMPLER_LABELS[sampler],
    steps,
    cfg,
    seeds,
    prompts: rows,
    overall: { correct, total, accuracy: correct / total, colourAccuracy: share('colour'), shapeAccuracy: share('shape') },
  };
  return { report, images };
}

/** The contact sheet of a judged result (each image framed by its verdict). */
export const resultSheet = (r: EvalResult) => contactSheet(r.images, r.report.prompts.map((p) => p.samples.map((s) => s.correct)));

/** Sample, judge and report (see the module comment). */
export async function evaluateModel(o: EvaluateOptions): Promise<EvalResult> {
  const prompts = evalPrompts(o.prompts, o.grid);
  const nSeeds = o.seeds ?? 4;
  const seed0 = o.seed ?? 0;
  if (!Number.isInteger(nSeeds) || nSeeds < 1 || nSeeds > 1024) throw usageError(`eval: seeds must be a number of seeds from 1 to 1024, got ${o.seeds}`);
  if (!Number.isInteger(seed0) || seed0 < 0) throw usageError(`eval: seed must be a non-negative integer, got ${o.seed}`);
  const steps = o.steps ?? 20;
  const cfg = o.cfg ?? 3;
  const sampler = resolveSampler(o.sampler ?? 'ddim');
  const files = o.out ? { json: path.join(o.out, 'eval.json'), contactSheet: path.join(o.out, 'contact-sheet.png') } : undefined;
  if (files && !o.overwrite) {
    for (const f of Object.values(files)) if (existsSync(f)) throw usageError(`eval: ${f} already exists; choose another --out folder or pass --overwrite`);
  }
  const owned = typeof o.model === 'string';
  if (typeof o.model === 'string') await precheckToyModel(o.model, o.load);
  const m = typeof o.model === 'string' ? await loadModel(o.model, o.load) : o.model;
  const restores: (() => void)[] = [];
  try {
    assertToyModel(m);
    const { rewrite } = await applyAdapters(m, { lora: o.lora, embedding: o.embedding, prompt: '', prompts: prompts.map((p) => p.prompt), negativePrompt: o.negativePrompt, log: o.log }, restores);
    const { report: r0, images } = await judgePrompts(m, prompts, { seeds: nSeeds, seed: seed0, cfg, steps, sampler, negativePrompt: o.negativePrompt, rewrite, quiet: o.quiet });
    const report: EvalReport = { ...r0, ...(files && { files }) };
    if (files) {
      await mkdir(o.out!, { recursive: true });
      const sheet = resultSheet({ report, images });
      await writePng(files.contactSheet, sheet.data, sheet.width, sheet.height);
      await writeFileAtomic(files.json, new TextEncoder().encode(JSON.stringify(report, null, 2) + '\n'));
    }
    return { report, images };
  } finally {
    for (const r of restores.reverse()) r();
    if (owned) disposeModel(m);
  }
}
