/**
 * AdamW with decoupled weight decay and global-norm gradient clipping, reproducing torch.optim.AdamW's
 * single-tensor path (amsgrad off) and torch.nn.utils.clip_grad_norm_ in float32 tf ops, so one step from the same
 * params and grads lands on the same values as PyTorch (golden: train_lora_step / train_full_step).
 */
import * as tf from '@tensorflow/tfjs';
import { fmtShape, formatError } from '../errors.js';

export interface AdamWOptions {
  lr: number;
  beta1: number;
  beta2: number;
  eps: number;
  weightDecay: number;
}

/** Optimizer state: the shared step count (torch keeps one per param; equal when every param gets a gradient each
 *  step, as in all our recipes) and the first / second moments (torch's exp_avg / exp_avg_sq) per param name. */
export interface AdamWState {
  step: number;
  m: Map<string, tf.Tensor>;
  v: Map<string, tf.Tensor>;
}

/** Host copy of the state for checkpoints: tensors named `exp_avg/<param>` and `exp_avg_sq/<param>`. */
export interface AdamWHostState {
  step: number;
  tensors: Map<string, { shape: number[]; data: Float32Array }>;
}

const M = 'exp_avg/';
const V = 'exp_avg_sq/';

/** Fresh state with zero moments for every param (torch fills the same zeros lazily at the first step). */
export function createAdamW(params: Map<string, tf.Variable>): AdamWState {
  const s: AdamWState = { step: 0, m: new Map(), v: new Map() };
  for (const [name, p] of params) {
    s.m.set(name, tf.keep(tf.zeros(p.shape, 'float32')));
    s.v.set(name, tf.keep(tf.zeros(p.shape, 'float32')));
  }
  return s;
}

/** Dispose every moment tensor of the state. */
export function disposeAdamW(s: AdamWState): void {
  for (const t of s.m.values()) t.dispose();
  for (const t of s.v.values()) t.dispose();
  s.m.clear();
  s.v.clear();
}

/**
 * One AdamW update of every param that has a gradient, in torch's order (torch/optim/adamw.py _single_tensor_adamw):
 * p *= 1 - lr*wd; m = lerp(m, g, 1-b1); v = b2*v + (1-b2)*g*g; denom = sqrt(v)/sqrt(1-b2^t) + eps;
 * p -= (lr/(1-b1^t)) * m/denom. `lrFor(name)` overrides lr per param (param groups, e.g. text_encoder_lr).
 * Mutates the variables (assign) and the state; leaks no tensors, and the state survives enclosing tidies.
 */
export function adamwStep(
  state: AdamWState,
  params: Map<string, tf.Variable>,
  grads: Map<string, tf.Tensor>,
  opts: AdamWOptions & { lrFor?: (name: string) => number },
): void {
  const { beta1, beta2, eps, weightDecay } = opts;
  const unknown = [...grads.keys()].find((name) => !params.has(name));
  if (unknown !== undefined) throw new Error(`adamwStep: gradient for ${unknown}, which is not a trainable parameter`);
  state.step += 1;
  const bc1 = 1 - beta1 ** state.step;
  const bc2Sqrt = Math.sqrt(1 - beta2 ** state.step);
  for (const [name, g] of grads) {
    const p = params.get(name)!;
    const m0 = state.m.get(name) ?? tf.keep(tf.zeros(p.shape, 'float32'));
    const v0 = state.v.get(name) ?? tf.keep(tf.zeros(p.shape, 'float32'));
    const lr = opts.lrFor?.(name) ?? opts.lr;
    const [m, v, next] = tf.tidy(() => {
      const m = m0.add(g.sub(m0).mul(1 - beta1)); // torch lerp_ (weight < 0.5): self + w*(end - self)
      const v = v0.mul(beta2).add(g.mul(1 - beta2).mul(g)); // addcmul_: self + value*t1*t2
      const denom = v.sqrt().div(bc2Sqrt).add(eps);
      const decayed = p.mul(1 - lr * weightDecay);
      return [m, v, decayed.sub(m.div(denom).mul(lr / bc1))]; // addcdiv_(m, denom, value=-lr/bc1)
    });
    p.assign(next);
    next.dispose();
    m0.dispose();
    v0.dispose();
    state.m.set(name, tf.keep(m));
    state.v.set(name, tf.keep(v));
  }
}

/** torch clip_grad_norm_'s factor: min(1, max_norm / (total_norm + 1e-6)), in float32 as torch computes it. */
export function clipCoefficient(totalNorm: number, maxNorm: number): number {
  return Math.min(1, Math.fround(Math.fround(maxNorm) / Math.fround(totalNorm + Math.fround(1e-6))));
}

/**
 * Global-norm clipping as torch.nn.utils.clip_grad_norm_(params, maxNorm): total = 2-norm of the per-tensor
 * 2-norms; grads scaled by clipCoefficient. maxNorm <= 0 disables clipping (the norm is still measured, for logs).
 * Returns new tensors (the caller still owns and disposes the inputs) and the total norm (NaN/Infinity pass through,
 * as in torch with error_if_nonfinite=False, so the loop can report them).
 */
export async function clipGradNorm(grads: Map<string, tf.Tensor>, maxNorm: number): Promise<{ grads: Map<string, tf.Tensor>; totalNorm: number }> {
  const out = new Map<string, tf.Tensor>();
  if (grads.size === 0) return { grads: out, totalNorm: 0 };
  const normT = tf.tidy(() => tf.norm(tf.stack([...grads.values()].map((g) => tf.norm(g)))));
  const totalNorm = (await normT.data())[0];
  normT.dispose();
  const coef = maxNorm > 0 ? clipCoefficient(totalNorm, maxNorm) : 1;
  for (const [name, g] of grads) out.set(name, coef === 1 ? g.clone() : tf.mul(g, coef));
  return { grads: out, totalNorm };
}

/** Copy the state to host arrays (exp_avg/<name>, exp_avg_sq/<name>), e.g. to write into a checkpoint. */
export async function adamwStateToHost(s: AdamWState): Promise<AdamWHostState> {
  const tensors = new Map<string, { shape: number[]; data: Float32Array }>();
  for (const [prefix, map] of [[M, s.m], [V, s.v]] as const) {
    for (const [name, t] of map) tensors.set(prefix + name, { shape: [...t.shape], data: (await t.data()) as Float32Array });
  }
  return { step: s.step, tensors };
}

/** The state as lazy tensors (`exp_avg/<param>`, ...): a checkpoint writer reads each moment only when writing it. */
export function adamwStateLazy(s: AdamWState): Map<string, { shape: number[]; dtype: 'F32'; load: () => Promise<Float32Array> }> {
  const out = new Map<string, { shape: number[]; dtype: 'F32'; load: () => Promise<Float32Array> }>();
  for (const [prefix, map] of [[M, s.m], [V, s.v]] as const) {
    for (const [name, t] of map) out.set(prefix + name, { shape: [...t.shape], dtype: 'F32', load: async () => (await t.data()) as Float32Array });
  }
  return out;
}

/**
 * Rebuild the state from host arrays. With `params`, checks strictly (principle 2): every param has both moments
 * with its shape and no moment belongs to an unknown param; a mismatch is a 'format' error naming the key.
 */
export function adamwStateFromHost(h: AdamWHostState, params?: Map<string, tf.Variable>): AdamWState {
  const s: AdamWState = { step: h.step, m: new Map(), v: new Map() };
  const fail = (msg: string) => {
    disposeAdamW(s);
    return formatError(`optimizer state: ${msg}`);
  };
  if (!Number.isInteger(h.step) || h.step < 0) throw fail(`step must be an integer >= 0, found ${h.step}`);
  for (const [key, { shape, data }] of h.tensors) {
    const map = key.startsWith(M) ? s.m : key.startsWith(V) ? s.v : undefined;
    if (!map) throw fail(`unexpected tensor ${key} (expected ${M}<param> or ${V}<param>)`);
    const name = key.slice(key.startsWith(M) ? M.length : V.length);
    const p = params?.get(name);
    if (params && !p) throw fail(`${key} belongs to no trainable parameter`);
    if (p && fmtShape(p.shape) !== fmtShape(shape)) throw fail(`${key} has shape ${fmtShape(shape)} but the parameter has ${fmtShape(p.shape)}`);
    map.set(name, tf.keep(tf.tensor(data, shape, 'float32')));
  }
  for (const name of params?.keys() ?? []) {
    if (!s.m.has(name) || !s.v.has(name)) throw fail(`missing ${s.m.has(name) ? V : M}${name}`);
  }
  return s;
}
