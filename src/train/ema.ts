/**
 * Exponential moving average of the trainable weights, with diffusers' training_utils.EMAModel semantics (as
 * train_text_to_image --use_ema uses it): shadow copies start at the params, and after every optimizer step
 * `shadow -= (1 - decay) * (shadow - param)` with the step-dependent decay of emaDecay (golden: train_full_step).
 * Pure module: the loop owns when to call emaStep and where the shadow weights go (sampling, export, checkpoint).
 */
import * as tf from '@tensorflow/tfjs';
import { fmtShape, formatError } from '../errors.js';

export interface EmaOptions {
  /** the largest decay (diffusers `decay`, default 0.9999) */
  decay: number;
  /** the smallest decay once updates start (diffusers `min_decay`, default 0) */
  minDecay: number;
  /** steps during which the shadow just copies the params (diffusers `update_after_step`, default 0) */
  updateAfterStep: number;
  /** @crowsonkb's warmup 1 - (1 + s/invGamma)^-power instead of (1 + s)/(10 + s) (diffusers `use_ema_warmup`) */
  useEmaWarmup: boolean;
  invGamma: number;
  power: number;
}

/** diffusers EMAModel's defaults. */
export const EMA_DEFAULTS: EmaOptions = { decay: 0.9999, minDecay: 0, updateAfterStep: 0, useEmaWarmup: false, invGamma: 1, power: 2 / 3 };

/** EMA state: options, diffusers' `optimization_step` (EMA steps taken so far), the decay of the last step, and one
 *  shadow tensor per param name. */
export interface EmaState {
  opts: EmaOptions;
  optimizationStep: number;
  /** decay used by the last emaStep (diffusers `cur_decay_value`); null before the first */
  lastDecay: number | null;
  shadow: Map<string, tf.Tensor>;
}

/** Host copy for checkpoints: tensors named `ema/<param>`, plus the step count and options. */
export interface EmaHostState {
  optimizationStep: number;
  opts: EmaOptions;
  tensors: Map<string, { shape: number[]; data: Float32Array }>;
}

const PREFIX = 'ema/';

/**
 * diffusers EMAModel.get_decay(optimization_step): s = max(0, step - update_after_step - 1); 0 while s <= 0 (the
 * shadow copies the params); else (1 + s)/(10 + s), or with warmup 1 - (1 + s/inv_gamma)^-power; then capped at
 * `decay` and floored at `minDecay`. (Some diffusers versions, e.g. training_utils.py at commit 0623b18, use the
 * constant `decay` when warmup is off; the golden train_full_step was made with the ramp, which we follow.)
 */
export function emaDecay(opts: EmaOptions, optimizationStep: number): number {
  const s = Math.max(0, optimizationStep - opts.updateAfterStep - 1);
  if (s <= 0) return 0;
  const ramp = opts.useEmaWarmup ? 1 - (1 + s / opts.invGamma) ** -opts.power : (1 + s) / (10 + s);
  return Math.max(Math.min(ramp, opts.decay), opts.minDecay);
}

function checkOptions(o: EmaOptions): void {
  const bad = (msg: string) => formatError(`EMA options: ${msg}`);
  if (!(o.decay >= 0 && o.decay <= 1)) throw bad(`decay must be in [0, 1], found ${o.decay}`);
  if (!(o.minDecay >= 0 && o.minDecay <= 1)) throw bad(`min_decay must be in [0, 1], found ${o.minDecay}`);
  if (!Number.isInteger(o.updateAfterStep) || o.updateAfterStep < 0) throw bad(`update_after_step must be an integer >= 0, found ${o.updateAfterStep}`);
  if (o.useEmaWarmup && !(o.invGamma > 0 && o.power > 0)) throw bad(`warmup needs inv_gamma > 0 and power > 0, found ${o.invGamma}, ${o.power}`);
}

/** Fresh state: the shadow of every param is a copy of its current value, optimization_step 0. */
export function createEma(params: Map<string, tf.Tensor>, opts: Partial<EmaOptions> = {}): EmaState {
  const o = { ...EMA_DEFAULTS, ...opts };
  checkOptions(o);
  const shadow = new Map<string, tf.Tensor>();
  for (const [name, p] of params) shadow.set(name, tf.keep(p.clone()));
  return { opts: o, optimizationStep: 0, lastDecay: null, shadow };
}

/** Dispose every shadow tensor. */
export function disposeEma(s: EmaState): void {
  for (const t of s.shadow.values()) t.dispose();
  s.shadow.clear();
}

/**
 * One EMA update after an optimizer step (EMAModel.step): optimization_step += 1 first, then decay =
 * emaDecay(opts, optimization_step) and shadow -= (1 - decay) * (shadow - param) for every tracked param.
 * Returns the decay used. Leaks no tensors; the new shadows survive enclosing tidies.
 */
export function emaStep(state: EmaState, params: Map<string, tf.Tensor>): number {
  const missing = [...state.shadow.keys()].find((name) => !params.has(name));
  if (missing !== undefined) throw new Error(`emaStep: no parameter ${missing} to average`);
  state.optimizationStep += 1;
  const decay = emaDecay(state.opts, state.optimizationStep);
  state.lastDecay = decay;
  const oneMinus = 1 - decay;
  for (const [name, s0] of state.shadow) {
    const next = tf.tidy(() => s0.sub(s0.sub(params.get(name)!).mul(oneMinus)));
    state.shadow.set(name, tf.keep(next));
    s0.dispose();
  }
  return decay;
}

/** Copy the state to host arrays (`ema/<name>`), e.g. to write into a checkpoint. */
export async function emaStateToHost(s: EmaState): Promise<EmaHostState> {
  const tensors = new Map<string, { shape: number[]; data: Float32Array }>();
  for (const [name, t] of s.shadow) tensors.set(PREFIX + name, { shape: [...t.shape], data: (await t.data()) as Float32Array });
  return { optimizationStep: s.optimizationStep, opts: { ...s.opts }, tensors };
}

/**
 * Rebuild the state from host arrays. With `params`, checks strictly (principle 2): every param has a shadow of
 * its shape and no shadow belongs to an unknown param; a mismatch is a 'format' error naming the key.
 */
export function emaStateFromHost(h: EmaHostState, params?: Map<string, tf.Tensor>): EmaState {
  const s: EmaState = { opts: { ...EMA_DEFAULTS, ...h.opts }, optimizationStep: h.optimizationStep, lastDecay: null, shadow: new Map() };
  const fail = (msg: string) => {
    disposeEma(s);
    return formatError(`EMA state: ${msg}`);
  };
  if (!Number.isInteger(h.optimizationStep) || h.optimizationStep < 0) throw fail(`optimization_step must be an integer >= 0, found ${h.optimizationStep}`);
  try {
    checkOptions(s.opts);
  } catch (e) {
    throw fail((e as Error).message);
  }
  for (const [key, { shape, data }] of h.tensors) {
    if (!key.startsWith(PREFIX)) throw fail(`unexpected tensor ${key} (expected ${PREFIX}<param>)`);
    const name = key.slice(PREFIX.length);
    const p = params?.get(name);
    if (params && !p) throw fail(`${key} belongs to no trainable parameter`);
    if (p && fmtShape(p.shape) !== fmtShape(shape)) throw fail(`${key} has shape ${fmtShape(shape)} but the parameter has ${fmtShape(p.shape)}`);
    s.shadow.set(name, tf.keep(tf.tensor(data, shape, 'float32')));
  }
  for (const name of params?.keys() ?? []) if (!s.shadow.has(name)) throw fail(`missing ${PREFIX}${name}`);
  return s;
}
