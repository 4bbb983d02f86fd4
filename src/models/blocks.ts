/**
 * Blocks shared by the UNet and the VAE (diffusers ResnetBlock2D, Transformer2DModel, Attention, Down/Upsample2D),
 * with their parameter-shape specs. Each block runs in its own tidy and returns only its output.
 */
import * as tf from '@tensorflow/tfjs';
import { type Forward, attention, conv2d, gelu, groupNorm, layerNorm, linear, silu, upsampleNearest } from './layers.js';
import { type ParamTree, has, sub } from './params.js';

export type ShapeSpec = Map<string, number[]>;

const put = (m: ShapeSpec, prefix: string, entries: [string, number[]][]) => {
  for (const [k, s] of entries) m.set(`${prefix}.${k}`, s);
};

/** ResnetBlock2D parameters (temb = 0: no time embedding, as in the VAE). */
export function resnetShapes(m: ShapeSpec, prefix: string, cin: number, cout: number, temb: number): void {
  put(m, prefix, [
    ['norm1.weight', [cin]],
    ['norm1.bias', [cin]],
    ['conv1.weight', [cout, cin, 3, 3]],
    ['conv1.bias', [cout]],
    ['norm2.weight', [cout]],
    ['norm2.bias', [cout]],
    ['conv2.weight', [cout, cout, 3, 3]],
    ['conv2.bias', [cout]],
  ]);
  if (temb) put(m, prefix, [['time_emb_proj.weight', [cout, temb]], ['time_emb_proj.bias', [cout]]]);
  if (cin !== cout) put(m, prefix, [['conv_shortcut.weight', [cout, cin, 1, 1]], ['conv_shortcut.bias', [cout]]]);
}

export interface ResnetOpts {
  groups: number;
  eps: number;
  outputScale?: number;
  /** training flag, RNG and LoRA dropout for the convolutions' adapters */
  f?: Forward;
}

/** ResnetBlock2D: GN-SiLU-conv, + projected time embedding, GN-SiLU-conv, + (1x1-projected) shortcut. */
export function resnet(p: ParamTree, x: tf.Tensor4D, temb: tf.Tensor2D | undefined, o: ResnetOpts): tf.Tensor4D {
  return tf.tidy(() => {
    const f = o.f ?? {};
    let h = conv2d(sub(p, 'conv1'), silu(groupNorm(sub(p, 'norm1'), x, o.groups, o.eps)), {}, f);
    if (temb) {
      const t = linear(sub(p, 'time_emb_proj'), silu(temb), f) as tf.Tensor2D;
      h = tf.add(h, t.reshape([t.shape[0], 1, 1, t.shape[1]]));
    }
    h = conv2d(sub(p, 'conv2'), silu(groupNorm(sub(p, 'norm2'), h, o.groups, o.eps)), {}, f);
    const short = has(p, 'conv_shortcut') ? conv2d(sub(p, 'conv_shortcut'), x, {}, f) : x;
    const y = tf.add(short, h) as tf.Tensor4D;
    return o.outputScale && o.outputScale !== 1 ? (tf.div(y, o.outputScale) as tf.Tensor4D) : y;
  });
}

/** Attention module parameters (diffusers `Attention`: to_q/k/v without bias unless `qkvBias`, to_out.0 with). */
export function attnShapes(m: ShapeSpec, prefix: string, dim: number, ctxDim: number, qkvBias = false): void {
  put(m, prefix, [
    ['to_q.weight', [dim, dim]],
    ['to_k.weight', [dim, ctxDim]],
    ['to_v.weight', [dim, ctxDim]],
    ['to_out.0.weight', [dim, dim]],
    ['to_out.0.bias', [dim]],
  ]);
  if (qkvBias) put(m, prefix, [['to_q.bias', [dim]], ['to_k.bias', [dim]], ['to_v.bias', [dim]]]);
}

/**
 * diffusers Attention: project, multi-head attention, output projection. x [B,N,C], ctx [B,M,D] (self when absent).
 * A context adapter (`f.context`, A1111 hypernetworks) may replace the context that to_k and to_v read; q never.
 */
export function attn(p: ParamTree, x: tf.Tensor3D, ctx: tf.Tensor3D | undefined, heads: number, f: Forward = {}): tf.Tensor3D {
  const c = ctx ?? x;
  const [ck, cv] = f.context?.kv(c, { kind: ctx ? 'cross' : 'self', width: c.shape[2] }, f) ?? [c, c];
  const q = linear(sub(p, 'to_q'), x, f) as tf.Tensor3D;
  const k = linear(sub(p, 'to_k'), ck, f) as tf.Tensor3D;
  const v = linear(sub(p, 'to_v'), cv, f) as tf.Tensor3D;
  return linear(sub(p, 'to_out', 0), attention(q, k, v, heads), f) as tf.Tensor3D;
}

/** Transformer2DModel (SpatialTransformer) parameters: one BasicTransformerBlock per layer. */
export function transformer2dShapes(m: ShapeSpec, prefix: string, c: number, ctxDim: number, linearProj: boolean, layers = 1): void {
  const proj = linearProj ? [c, c] : [c, c, 1, 1];
  put(m, prefix, [
    ['norm.weight', [c]],
    ['norm.bias', [c]],
    ['proj_in.weight', proj],
    ['proj_in.bias', [c]],
    ['proj_out.weight', proj],
    ['proj_out.bias', [c]],
  ]);
  for (let l = 0; l < layers; l++) {
    const b = `${prefix}.transformer_blocks.${l}`;
    for (const n of ['norm1', 'norm2', 'norm3']) put(m, b, [[`${n}.weight`, [c]], [`${n}.bias`, [c]]]);
    attnShapes(m, `${b}.attn1`, c, c);
    attnShapes(m, `${b}.attn2`, c, ctxDim);
    put(m, b, [
      ['ff.net.0.proj.weight', [8 * c, c]],
      ['ff.net.0.proj.bias', [8 * c]],
      ['ff.net.2.weight', [c, 4 * c]],
      ['ff.net.2.bias', [c]],
    ]);
  }
}

/**
 * Runs one segment of a block: fn(...xs) directly, or (unet's gradient checkpointing) as a checkpoint that keeps
 * only xs for the backward pass; `ps` are the params sub-trees fn reads, whose trainable tensors it differentiates.
 */
export type Segment = <A extends tf.Tensor[], T extends tf.Tensor>(ps: ParamTree[], fn: (...xs: A) => T, xs: [...A]) => T;

/** The plain segment runner: just call fn. */
export const direct: Segment = (_ps, fn, xs) => fn(...xs);

/**
 * Transformer2DModel: GroupNorm(eps 1e-6), proj_in (1x1 conv in SD v1, linear with use_linear_projection),
 * BasicTransformerBlocks (self-attn, cross-attn, GEGLU feed-forward; pre-LayerNorm, residuals), proj_out, + input.
 * Each of those five stages is one segment, so a checkpointing `seg` recomputes (and holds the activations of)
 * one stage at a time in the backward pass rather than the whole block.
 */
export function transformer2d(p: ParamTree, x: tf.Tensor4D, ctx: tf.Tensor3D, heads: number, groups: number, seg: Segment = direct, f: Forward = {}): tf.Tensor4D {
  return tf.tidy(() => {
    const adapter = f.context?.params ?? []; // read by both attentions: differentiated through their segments
    const [b, h, w, c] = x.shape;
    const [norm, projIn, projOut] = [sub(p, 'norm'), sub(p, 'proj_in'), sub(p, 'proj_out')];
    // proj_in is per-pixel either way (1x1 conv == linear on NHWC), so both variants are the same op here
    let y = seg([norm, projIn], (v) => tf.tidy(() => linear(projIn, groupNorm(norm, v, groups, 1e-6).reshape([b, h * w, c]), f) as tf.Tensor3D), [x]);
    const blocks = sub(p, 'transformer_blocks');
    for (let l = 0; has(blocks, String(l)); l++) {
      const bp = sub(blocks, l);
      const [n1, a1, n2, a2, n3, ff0, ff2] = [sub(bp, 'norm1'), sub(bp, 'attn1'), sub(bp, 'norm2'), sub(bp, 'attn2'), sub(bp, 'norm3'), sub(bp, 'ff', 'net', 0, 'proj'), sub(bp, 'ff', 'net', 2)];
      y = seg([n1, a1, ...adapter], (z) => tf.tidy(() => tf.add(z, attn(a1, layerNorm(n1, z, 1e-5) as tf.Tensor3D, undefined, heads, f)) as tf.Tensor3D), [y]);
      y = seg([n2, a2, ...adapter], (z, cc) => tf.tidy(() => tf.add(z, attn(a2, layerNorm(n2, z, 1e-5) as tf.Tensor3D, cc, heads, f)) as tf.Tensor3D), [y, ctx]);
      y = seg([n3, ff0, ff2], (z) =>
        tf.tidy(() => {
          // GEGLU: proj -> [hidden, gate] halves -> hidden * gelu(gate) -> linear
          const [hid, gate] = tf.split(linear(ff0, layerNorm(n3, z, 1e-5), f), 2, -1);
          return tf.add(z, linear(ff2, tf.mul(hid, gelu(gate)), f)) as tf.Tensor3D;
        }), [y]);
    }
    return seg([projOut], (v, x0) => tf.tidy(() => tf.add(linear(projOut, v, f).reshape([b, h, w, c]), x0) as tf.Tensor4D), [y, x]);
  });
}

/** Downsample2D: 3x3 stride-2 conv with the given padding (UNet: 1 on every side; VAE: right/bottom only). */
export function downsample(p: ParamTree, x: tf.Tensor4D, padding: number | [number, number, number, number], f: Forward = {}): tf.Tensor4D {
  return tf.tidy(() => conv2d(sub(p, 'conv'), x, { stride: 2, padding }, f));
}

/** Upsample2D: nearest 2x (or to `size`) then 3x3 conv. */
export function upsample(p: ParamTree, x: tf.Tensor4D, size?: [number, number], f: Forward = {}): tf.Tensor4D {
  return tf.tidy(() => conv2d(sub(p, 'conv'), upsampleNearest(x, size), {}, f));
}
