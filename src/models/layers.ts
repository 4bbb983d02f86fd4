/**
 * Building blocks shared by the networks: pure functions over params sub-trees, NHWC activations,
 * tfjs-layout weights (conv HWIO, linear [in,out]). Every op here is a tfjs-core op, so it runs on any backend
 * and is differentiable.
 */
import * as tf from '@tensorflow/tfjs';
import { usageError } from '../errors.js';
import type { TorchGenerator } from '../runtime/rng.js';
import { type ParamTree, has, leaf, maybeLeaf, sub } from './params.js';

/** Where an attention sits, as a context adapter sees it: self-attention (attn1) or cross-attention (attn2). */
export interface AttentionSite {
  kind: 'self' | 'cross';
  /** the context's feature width (the last dimension of the tensor to_k and to_v read) */
  width: number;
}

/**
 * An adapter that transforms the context of attention before to_k and before to_v (A1111 hypernetworks). `kv`
 * returns the [k-context, v-context] pair, or undefined to leave the attention as it is. `params` are the trees it
 * reads: their trainable tensors are differentiated through checkpointed segments (models/unet.ts).
 */
export interface ContextAdapter {
  kv(context: tf.Tensor3D, site: AttentionSite, f: Forward): [tf.Tensor3D, tf.Tensor3D] | undefined;
  params: ParamTree[];
}

/**
 * What a forward needs besides params and inputs. Everything is optional; `{}` is inference with no adapters.
 * - training / rng: dropout acts only while `training`, with masks drawn from the torch-compatible generator;
 * - loraDropout: kohya network_dropout, dropout on each LoRA down projection's output (training only);
 * - context: an adapter of the attention contexts (hypernetworks).
 */
export interface Forward {
  training?: boolean;
  rng?: TorchGenerator;
  loraDropout?: number;
  context?: ContextAdapter;
}

/**
 * Inverted dropout as torch's F.dropout (training only): zero each element with probability p, scale the rest by
 * 1/(1-p). The keep mask is `rand < 1 - p` from the forward's generator (torch's CPU bernoulli draws through MKL,
 * so masks are not torch's bit for bit; the statistics are).
 */
export function dropout<T extends tf.Tensor>(x: T, p: number, f: Forward): T {
  if (!f.training || !(p > 0)) return x;
  if (!(p < 1)) throw usageError(`dropout probability must be in [0, 1), got ${p}`);
  if (!f.rng) throw usageError('dropout while training needs a random generator (Forward.rng)');
  const u = f.rng.rand(x.shape);
  const keep = new Float32Array(u.length);
  const scale = 1 / (1 - p);
  for (let i = 0; i < u.length; i++) keep[i] = u[i] < 1 - p ? scale : 0;
  return tf.mul(x, tf.tensor(keep, x.shape)) as T;
}

/**
 * y = x W + b over the last axis. Accepts a 1x1 conv kernel [1,1,in,out] too (SD v1 proj_in/proj_out). An injected
 * LoRA is added; `f` carries its training-time dropout (kohya network_dropout).
 */
export function linear(p: ParamTree, x: tf.Tensor, f: Forward = {}): tf.Tensor {
  let w = leaf(p, 'weight');
  const ws = w.shape as number[];
  if (w.rank === 4) w = w.reshape([ws[2], ws[3]]);
  const outDim = (w.shape as number[])[1];
  const xs = x.shape as number[];
  const inDim = xs[xs.length - 1];
  const x2 = x.reshape([-1, inDim]) as tf.Tensor2D;
  let y: tf.Tensor = tf.matMul(x2, w as tf.Tensor2D);
  const b = maybeLeaf(p, 'bias');
  if (b) y = tf.add(y, b);
  if (has(p, 'lora_down')) {
    // LoRA (Hu et al. 2021): y += scale * (x down) up, down [in,r], up [r,out], scale = multiplier * alpha / rank
    const flat = (t: tf.Tensor) => (t.rank === 4 ? t.reshape([t.shape[2]!, t.shape[3]!]) : t) as tf.Tensor2D;
    const d = flat(leaf(sub(p, 'lora_down'), 'weight'));
    const u = flat(leaf(sub(p, 'lora_up'), 'weight'));
    const h = dropout(tf.matMul(x2, d), f.loraDropout ?? 0, f); // kohya LoRAModule: dropout on lora_down's output
    y = tf.add(y, tf.mul(tf.matMul(h, u), leaf(p, 'lora_scale')));
  }
  return y.reshape([...xs.slice(0, -1), outDim]);
}

export type Padding = 'same' | 'valid' | number | [number, number, number, number]; // [top,bottom,left,right]

/**
 * 2-D convolution, NHWC x HWIO. Explicit paddings are applied with tf.pad so gradients exist on every backend.
 * An injected LoCon is added; `f` carries its training-time dropout.
 */
export function conv2d(p: ParamTree, x: tf.Tensor4D, opts: { stride?: number; padding?: Padding } = {}, f: Forward = {}): tf.Tensor4D {
  const w = leaf(p, 'weight') as tf.Tensor4D;
  const stride = opts.stride ?? 1;
  const k = w.shape[0];
  let pad = opts.padding ?? (k - 1) / 2;
  let input = x;
  let mode: 'same' | 'valid' = 'valid';
  if (pad === 'same' || (typeof pad === 'number' && stride === 1 && k % 2 === 1 && pad === (k - 1) / 2)) {
    mode = 'same'; // identical to symmetric padding (k-1)/2 at stride 1
  } else if (pad !== 'valid') {
    const [t, b, l, r] = typeof pad === 'number' ? [pad, pad, pad, pad] : pad;
    if (t || b || l || r) input = tf.pad(x, [[0, 0], [t, b], [l, r], [0, 0]]);
  }
  let y = tf.conv2d(input, w, stride, mode);
  const bias = maybeLeaf(p, 'bias');
  if (bias) y = tf.add(y, bias);
  if (has(p, 'lora_down')) {
    // LoCon: the down kernel has the layer's size and stride, the up kernel is 1x1
    // a 1x1 conv's factors are held as 2-D linear ones (lora-inject): view them as 1x1 kernels
    const k4 = (t: tf.Tensor) => (t.rank === 2 ? t.reshape([1, 1, t.shape[0]!, t.shape[1]!]) : t) as tf.Tensor4D;
    const d = k4(leaf(sub(p, 'lora_down'), 'weight'));
    const u = k4(leaf(sub(p, 'lora_up'), 'weight'));
    const h = dropout(tf.conv2d(input, d, stride, mode), f.loraDropout ?? 0, f);
    y = tf.add(y, tf.mul(tf.conv2d(h, u, 1, 'valid'), leaf(p, 'lora_scale')));
  }
  return y;
}

/** GroupNorm over NHWC (tfjs has none): statistics per (batch, group) across H, W and the group's channels. */
export function groupNorm(p: ParamTree, x: tf.Tensor4D, groups: number, eps: number): tf.Tensor4D {
  const [b, h, w, c] = x.shape;
  if (c % groups !== 0) throw new Error(`groupNorm: ${c} channels not divisible into ${groups} groups`);
  const g = x.reshape([b, h * w, groups, c / groups]);
  const { mean, variance } = tf.moments(g, [1, 3], true);
  const normed = tf.div(tf.sub(g, mean), tf.sqrt(tf.add(variance, eps))).reshape([b, h, w, c]);
  return tf.add(tf.mul(normed, leaf(p, 'weight')), leaf(p, 'bias')) as tf.Tensor4D;
}

/** LayerNorm over the last axis. */
export function layerNorm(p: ParamTree, x: tf.Tensor, eps: number): tf.Tensor {
  const { mean, variance } = tf.moments(x, -1, true);
  const normed = tf.div(tf.sub(x, mean), tf.sqrt(tf.add(variance, eps)));
  return tf.add(tf.mul(normed, leaf(p, 'weight')), leaf(p, 'bias'));
}

/** SiLU / swish: x * sigmoid(x). */
export const silu = <T extends tf.Tensor>(x: T): T => tf.mul(x, tf.sigmoid(x));

/** Exact (erf) GELU as torch's default F.gelu. */
export const gelu = <T extends tf.Tensor>(x: T): T => tf.mul(tf.mul(x, 0.5), tf.add(1, tf.erf(tf.mul(x, Math.SQRT1_2))));

/** CLIP's quick GELU: x * sigmoid(1.702 x). */
export const quickGelu = <T extends tf.Tensor>(x: T): T => tf.mul(x, tf.sigmoid(tf.mul(x, 1.702)));

/** Activation by the name used in configs. */
export function activation(name: string): <T extends tf.Tensor>(x: T) => T {
  switch (name) {
    case 'silu':
    case 'swish':
      return silu;
    case 'gelu':
      return gelu;
    case 'quick_gelu':
      return quickGelu;
    default:
      throw new Error(`unsupported activation ${name}`);
  }
}

let attentionChunkElements = 32 * 1024 * 1024;
let deviceMaxElements = Infinity;

/**
 * Largest attention score tensor (elements) materialised at once. Attention is computed in query-row chunks so
 * that batch*heads*rows*keys stays under this (128 MB of float32 by default), which keeps 512x512 on real SD
 * weights within memory.
 */
export function setAttentionChunkElements(n: number): void {
  if (!(n >= 1)) throw new Error('attention chunk size must be >= 1 element');
  attentionChunkElements = Math.floor(n);
}
export const getAttentionChunkElements = () => Math.min(attentionChunkElements, deviceMaxElements);

/**
 * The largest tensor (elements) the active device can bind (a WebGPU device's maxStorageBufferBindingSize / 4;
 * Infinity elsewhere). Set by runtime/backend.ts; attention chunks never exceed it, whatever the user asked for.
 */
export function setDeviceMaxTensorElements(n: number): void {
  deviceMaxElements = n >= 1 ? Math.floor(n) : Infinity;
}

/**
 * How attention() splits its score tensor [batch*heads, nq, nk]: `group` batch*head slices and `rows` query rows at
 * a time, so that group*rows*nk stays under the chunk budget (or is one row of one head when even that is larger).
 */
export function attentionChunks(bh: number, nq: number, nk: number, budget = getAttentionChunkElements()): { group: number; rows: number } {
  const group = Math.max(1, Math.min(bh, Math.floor(budget / nk)));
  const rows = Math.max(1, Math.min(nq, Math.floor(budget / (group * nk))));
  return { group, rows };
}

/**
 * Multi-head scaled dot-product attention: softmax(q k^T / sqrt(d) + mask) v.
 * q [B,Nq,C], k/v [B,Nk,C] (already projected) -> [B,Nq,C]. `mask` broadcasts to [Nq,Nk] and is added to the
 * scores (0 keep, large negative drop). The scores are computed in chunks of query rows (and, when even one row
 * of every head is too large, of batch*head groups) of at most getAttentionChunkElements() elements.
 */
export function attention(q: tf.Tensor3D, k: tf.Tensor3D, v: tf.Tensor3D, heads: number, mask?: tf.Tensor2D): tf.Tensor3D {
  const [b, nq, c] = q.shape;
  const nk = k.shape[1];
  const d = c / heads;
  if (!Number.isInteger(d)) throw new Error(`attention: width ${c} not divisible by ${heads} heads`);
  const split = (t: tf.Tensor3D, n: number) => t.reshape([b, n, heads, d]).transpose([0, 2, 1, 3]).reshape([b * heads, n, d]) as tf.Tensor3D;
  const qh = tf.mul(split(q, nq), 1 / Math.sqrt(d)) as tf.Tensor3D;
  const kh = split(k, nk);
  const vh = split(v, nk);
  const bh = b * heads;
  const { group, rows } = attentionChunks(bh, nq, nk);
  const groups: tf.Tensor3D[] = [];
  for (let g0 = 0; g0 < bh; g0 += group) {
    const gn = Math.min(group, bh - g0);
    const whole = gn === bh;
    const qg = whole ? qh : qh.slice([g0, 0, 0], [gn, -1, -1]);
    const kg = whole ? kh : kh.slice([g0, 0, 0], [gn, -1, -1]);
    const vg = whole ? vh : vh.slice([g0, 0, 0], [gn, -1, -1]);
    const outs: tf.Tensor3D[] = [];
    for (let start = 0; start < nq; start += rows) {
      const n = Math.min(rows, nq - start);
      const qc = n === nq ? qg : qg.slice([0, start, 0], [-1, n, -1]);
      // each chunk in its own tidy: its scores and softmax are freed before the next chunk, so the chunk size bounds
      // the memory (inside the caller's tidy alone every chunk's scores would live until the block ends)
      outs.push(
        tf.tidy(() => {
          let scores: tf.Tensor3D = tf.matMul(qc, kg, false, true);
          if (mask) scores = tf.add(scores, n === nq ? mask : mask.slice([start, 0], [n, -1]));
          return tf.matMul(tf.softmax(scores), vg);
        }),
      );
    }
    groups.push(outs.length === 1 ? outs[0] : tf.concat(outs, 1));
  }
  const o = groups.length === 1 ? groups[0] : tf.concat(groups, 0);
  return o.reshape([b, heads, nq, d]).transpose([0, 2, 1, 3]).reshape([b, nq, c]) as tf.Tensor3D;
}

/**
 * Sinusoidal timestep embedding exactly as diffusers' get_timestep_embedding:
 * exponent = -ln(10000) * i / (half - freqShift); emb = [sin(t e), cos(t e)] (or [cos, sin] when flipSinToCos).
 */
export function timestepEmbedding(t: tf.Tensor1D, dim: number, flipSinToCos: boolean, freqShift: number): tf.Tensor2D {
  const half = Math.floor(dim / 2);
  const exponent = tf.div(tf.mul(tf.range(0, half, 1, 'float32'), -Math.log(10000)), half - freqShift);
  const args = tf.mul(t.toFloat().reshape([-1, 1]), tf.exp(exponent).reshape([1, half]));
  const [first, second] = flipSinToCos ? [tf.cos(args), tf.sin(args)] : [tf.sin(args), tf.cos(args)];
  let emb = tf.concat([first, second], 1) as tf.Tensor2D;
  if (dim % 2 === 1) emb = tf.pad(emb, [[0, 0], [0, 1]]);
  return emb;
}

/** Nearest-neighbour upsampling (torch F.interpolate mode='nearest'): 2x, or to an explicit size. */
export function upsampleNearest(x: tf.Tensor4D, size?: [number, number]): tf.Tensor4D {
  const [, h, w] = x.shape;
  const [oh, ow] = size ?? [h * 2, w * 2];
  if (oh === h * 2 && ow === w * 2) {
    // exact 2x: duplicate columns, then rows (concat has gradients at every rank; tile does not past rank 4)
    const [b, , , c] = x.shape;
    const cols = x.reshape([b, h, w, 1, c]);
    const wide = tf.concat([cols, cols], 3).reshape([b, h, 1, ow, c]);
    return tf.concat([wide, wide], 2).reshape([b, oh, ow, c]) as tf.Tensor4D;
  }
  return tf.image.resizeNearestNeighbor(x, [oh, ow], false, false);
}
