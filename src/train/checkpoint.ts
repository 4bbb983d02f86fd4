/**
 * Training checkpoints: trainable params + optimizer state + step + RNG and data-loader state + the resolved config,
 * written atomically (a temp folder renamed into place) so an interrupted save never leaves a broken checkpoint.
 */
import * as tf from '@tensorflow/tfjs';
import { existsSync } from 'node:fs';
import { mkdir, readFile, readdir, rename, rm } from 'node:fs/promises';
import path from 'node:path';
import { SdtuneError, fmtShape } from '../errors.js';
import { SafetensorsFile, writeSafetensors } from '../io/safetensors.js';
import { writeFileAtomic } from '../runtime/atomic.js';
import type { GeneratorState } from '../runtime/rng.js';
import type { LoaderState } from '../data/loader.js';
import { type AdamWState, adamwStateFromHost, adamwStateToHost } from './optim.js';

export interface TrainState {
  method: string;
  /** optimizer steps completed */
  step: number;
  rng: GeneratorState;
  loader: LoaderState;
  lossEma: number | null;
}

const STATE = 'state.json';
const PARAMS = 'trainable.safetensors';
const OPTIM = 'optimizer.safetensors';

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
): Promise<string> {
  await mkdir(root, { recursive: true });
  const final = path.join(root, checkpointName(state.step));
  const tmp = path.join(root, `.${checkpointName(state.step)}.${process.pid}.tmp`);
  await rm(tmp, { recursive: true, force: true });
  await mkdir(tmp);
  try {
    const params = new Map<string, { shape: number[]; data: Float32Array }>();
    for (const [k, v] of vars) params.set(k, { shape: [...v.shape], data: (await v.data()) as Float32Array });
    await writeSafetensors(path.join(tmp, PARAMS), params, { metadata: { format: 'sdtune-trainable/1' } });
    const host = await adamwStateToHost(opt);
    await writeSafetensors(path.join(tmp, OPTIM), host.tensors, { metadata: { step: String(host.step) } });
    await writeFileAtomic(path.join(tmp, STATE), Buffer.from(JSON.stringify(state, null, 1))); // disk full: a one-line error
    await writeFileAtomic(path.join(tmp, 'config.resolved.yaml'), Buffer.from(configYaml));
    await rm(final, { recursive: true, force: true });
    await rename(tmp, final);
  } catch (e) {
    await rm(tmp, { recursive: true, force: true });
    throw e;
  }
  if (keepLast !== null) {
    const all = (await listCheckpoints(root)).filter((d) => d !== final);
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

/** `--resume DIR`: a checkpoint folder, or an output/checkpoints folder (its latest checkpoint). */
export async function resolveResume(dir: string): Promise<string> {
  if (existsSync(path.join(dir, STATE))) return dir;
  for (const root of [dir, path.join(dir, 'checkpoints')]) {
    const all = await listCheckpoints(root);
    if (all.length) return all[all.length - 1];
  }
  throw new SdtuneError('file', `--resume ${dir}: no checkpoint found (expected ${STATE} in it, or step-NNNNNN folders under it or its checkpoints/)`);
}

/** Restore variables (strictly: same names and shapes) and return the optimizer and loop state. */
export async function loadCheckpoint(dir: string, vars: Map<string, tf.Variable>): Promise<{ opt: AdamWState; state: TrainState }> {
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
    return { opt: adamwStateFromHost({ step: Number(o.metadata.step), tensors }, vars), state };
  } finally {
    await o.close();
  }
}
