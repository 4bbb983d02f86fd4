/**
 * Training checkpoints: trainable params + optimizer state + step + RNG and data-loader state + the resolved config,
 * written atomically (a temp folder renamed into place) so an interrupted save never leaves a broken checkpoint.
 */
import * as tf from '@tensorflow/tfjs';
import { existsSync } from 'node:fs';
import { mkdir, readFile, readdir, rename, rm } from 'node:fs/promises';
import path from 'node:path';
import { SdtuneError, fmtShape } from '../errors.js';
import { type LazyTensor, SafetensorsFile, writeSafetensors } from '../io/safetensors.js';
import { writeFileAtomic } from '../runtime/atomic.js';
import type { GeneratorState } from '../runtime/rng.js';
import type { LoaderState } from '../data/loader.js';
import type { EmaHostState, EmaState } from './ema.js';
import { ABSURD_MAGNITUDE } from './guards.js';
import { type AdamWState, adamwStateFromHost, adamwStateLazy } from './optim.js';

export interface TrainState {
  method: string;
  /** optimizer steps completed */
  step: number;
  rng: GeneratorState;
  loader: LoaderState;
  lossEma: number | null;
  /** the run this checkpoint belongs to: pruning touches only the same run's checkpoints (absent before 0.1.1) */
  runId?: string;
  /** the recipe's JSON state (Recipe.checkpoint.json), when it has one */
  recipe?: unknown;
}

const STATE = 'state.json';
const PARAMS = 'trainable.safetensors';
const OPTIM = 'optimizer.safetensors';
const EMA = 'ema.safetensors';
const RECIPE = 'recipe.safetensors';

/** Folder name of the checkpoint after `step` optimizer steps. */
export const checkpointName = (step: number) => `step-${String(step).padStart(6, '0')}`;

/** Write a checkpoint folder atomically, then prune older ones beyond `keepLast`. */
export async function saveCheckpoint(
  root: string,
  vars: Map<string, tf.Variable>,
  opt: AdamWState,
  state: TrainState,
  configYaml: string,
  keepLast: number | null,
  ema?: EmaState,
  recipeTensors?: Map<string, tf.Tensor>,
): Promise<string> {
  await mkdir(root, { recursive: true });
  const final = path.join(root, checkpointName(state.step));
  const tmp = path.join(root, `.${checkpointName(state.step)}.${process.pid}.tmp`);
  await rm(tmp, { recursive: true, force: true });
  await mkdir(tmp);
  try {
    // every tensor is read from the backend only when it is written: one tensor of host memory at a time (a full
    // fine-tune's trainables, two moments and an EMA copy are each the size of the UNet)
    const lazy = (t: tf.Tensor): LazyTensor => ({ shape: [...t.shape], dtype: 'F32', load: async () => (await t.data()) as Float32Array });
    await writeSafetensors(path.join(tmp, PARAMS), new Map([...vars].map(([k, v]) => [k, lazy(v)])), { metadata: { format: 'sdtune-trainable/1' } });
    await writeSafetensors(path.join(tmp, OPTIM), adamwStateLazy(opt), { metadata: { step: String(opt.step) } });
    if (ema) {
      const tensors = new Map([...ema.shadow].map(([k, t]) => [`ema/${k}`, lazy(t)]));
      await writeSafetensors(path.join(tmp, EMA), tensors, { metadata: { optimization_step: String(ema.optimizationStep), options: JSON.stringify(ema.opts) } });
    }
    if (recipeTensors?.size) {
      await writeSafetensors(path.join(tmp, RECIPE), new Map([...recipeTensors].map(([k, t]) => [k, lazy(t)])), { metadata: { format: 'sdtune-recipe-state/1' } });
    }
    await writeFileAtomic(path.join(tmp, STATE), Buffer.from(JSON.stringify(state, null, 1))); // disk full: a one-line error
    await writeFileAtomic(path.join(tmp, 'config.resolved.yaml'), Buffer.from(configYaml));
    await rm(final, { recursive: true, force: true });
    await rename(tmp, final);
  } catch (e) {
    await rm(tmp, { recursive: true, force: true });
    throw e;
  }
  if (keepLast !== null) {
    // only this run's checkpoints are pruned: a folder from another run (another runId, or none) is never deleted
    const all: string[] = [];
    for (const d of await listCheckpoints(root)) if (d !== final && (await runIdOf(d)) === state.runId) all.push(d);
    for (const old of all.slice(0, Math.max(0, all.length - (keepLast - 1)))) await rm(old, { recursive: true, force: true });
  }
  return final;
}

/** Checkpoint folders under `root`, oldest first. */
export async function listCheckpoints(root: string): Promise<string[]> {
  if (!existsSync(root)) return [];
  return (await readdir(root))
    .filter((d) => /^step-\d+$/.test(d))
    .sort()
    .map((d) => path.join(root, d));
}

async function runIdOf(dir: string): Promise<string | undefined> {
  try {
    return (JSON.parse(await readFile(path.join(dir, STATE), 'utf8')) as TrainState).runId;
  } catch {
    return undefined;
  }
}

/** Why a checkpoint's trainables are unfit to resume from (NaN/Inf or a magnitude over float16's max), if they are. */
export async function checkpointProblem(dir: string): Promise<string | undefined> {
  let f: SafetensorsFile;
  try {
    f = await SafetensorsFile.open(path.join(dir, PARAMS));
  } catch (e) {
    return (e as Error).message;
  }
  try {
    for (const k of f.keys()) {
      const { data } = await f.readFloat(k);
      for (let i = 0; i < data.length; i++) {
        const v = data[i] as number;
        if (!Number.isFinite(v)) return `${k} has non-finite values`;
        if (Math.abs(v) > ABSURD_MAGNITUDE) return `${k} has values up to ${Math.abs(v).toExponential(2)}`;
      }
    }
    return undefined;
  } catch (e) {
    return (e as Error).message;
  } finally {
    await f.close();
  }
}

/**
 * `--resume DIR`: a checkpoint folder, or an output/checkpoints folder (its latest healthy checkpoint: one whose
 * trainables are NaN/Inf or blown up is skipped with a note; sdtune never writes one, an older version might have).
 */
export async function resolveResume(dir: string, log: (line: string) => void = () => {}): Promise<string> {
  if (existsSync(path.join(dir, STATE))) {
    const bad = await checkpointProblem(dir);
    if (bad) throw new SdtuneError('format', `resume ${dir}: this checkpoint cannot be resumed from: ${bad}`);
    return dir;
  }
  for (const root of [dir, path.join(dir, 'checkpoints')]) {
    const all = await listCheckpoints(root);
    for (const ck of all.reverse()) {
      const bad = await checkpointProblem(ck);
      if (!bad) return ck;
      log(`note: skipping checkpoint ${ck}: ${bad}`);
    }
    if (all.length) throw new SdtuneError('format', `resume ${dir}: none of its ${all.length} checkpoints can be resumed from (see the notes above)`);
  }
  throw new SdtuneError('file', `resume ${dir}: no checkpoint found (expected ${STATE} in it, or step-NNNNNN folders under it or its checkpoints/)`);
}

/** Restore variables (strictly: same names and shapes) and return the optimizer and loop state, the EMA state and
 *  the recipe's tensors when the checkpoint has them. */
export async function loadCheckpoint(
  dir: string,
  vars: Map<string, tf.Variable>,
): Promise<{ opt: AdamWState; state: TrainState; ema?: EmaHostState; recipeTensors?: Map<string, { shape: number[]; data: Float32Array }> }> {
  const state = JSON.parse(await readFile(path.join(dir, STATE), 'utf8')) as TrainState;
  const f = await SafetensorsFile.open(path.join(dir, PARAMS));
  try {
    const missing = [...vars.keys()].filter((k) => !f.has(k));
    const extra = f.keys().filter((k) => !vars.has(k));
    if (missing.length || extra.length) {
      throw new SdtuneError('format', `${dir}: checkpoint does not match this training setup (missing: ${missing.slice(0, 4).join(', ') || '-'}; unexpected: ${extra.slice(0, 4).join(', ') || '-'}); resume with the same method and settings`);
    }
    for (const [k, v] of vars) {
      const t = await f.readFloat(k);
      if (fmtShape(t.shape) !== fmtShape(v.shape)) throw new SdtuneError('format', `${dir}: ${k} is ${fmtShape(t.shape)} in the checkpoint, ${fmtShape(v.shape)} now`);
      v.assign(tf.tensor(t.data as Float32Array, t.shape));
    }
  } finally {
    await f.close();
  }
  const o = await SafetensorsFile.open(path.join(dir, OPTIM));
  try {
    const tensors = new Map<string, { shape: number[]; data: Float32Array }>();
    for (const k of o.keys()) {
      const t = await o.readFloat(k);
      tensors.set(k, { shape: t.shape, data: t.data as Float32Array });
    }
    const ema = existsSync(path.join(dir, EMA)) ? await readEma(path.join(dir, EMA)) : undefined;
    const recipeTensors = existsSync(path.join(dir, RECIPE)) ? await readAll(path.join(dir, RECIPE)) : undefined;
    return { opt: adamwStateFromHost({ step: Number(o.metadata.step), tensors }, vars), state, ema, recipeTensors };
  } finally {
    await o.close();
  }
}

/** Every tensor of a safetensors file, as float32 host arrays. */
async function readAll(file: string): Promise<Map<string, { shape: number[]; data: Float32Array }>> {
  const f = await SafetensorsFile.open(file);
  try {
    const out = new Map<string, { shape: number[]; data: Float32Array }>();
    for (const k of f.keys()) {
      const t = await f.readFloat(k);
      out.set(k, { shape: t.shape, data: t.data as Float32Array });
    }
    return out;
  } finally {
    await f.close();
  }
}

/** The EMA state of a checkpoint (tensors `ema/<param>`, step count and options in the metadata). */
async function readEma(file: string): Promise<EmaHostState> {
  const f = await SafetensorsFile.open(file);
  try {
    const tensors = new Map<string, { shape: number[]; data: Float32Array }>();
    for (const k of f.keys()) {
      const t = await f.readFloat(k);
      tensors.set(k, { shape: t.shape, data: t.data as Float32Array });
    }
    let opts: EmaHostState['opts'];
    try {
      opts = JSON.parse(f.metadata.options ?? '{}');
    } catch {
      throw new SdtuneError('format', `${file}: its "options" metadata is not JSON`);
    }
    return { optimizationStep: Number(f.metadata.optimization_step), opts, tensors };
  } finally {
    await f.close();
  }
}
