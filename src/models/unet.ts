/**
 * UNet2DConditionModel (SD v1 family; SD 2-style linear projections and per-block heads) as a pure function.
 * NHWC activations: sample [B,H,W,in_channels], context [B,L,cross_attention_dim] -> [B,H,W,out_channels].
 */
import * as tf from '@tensorflow/tfjs';
import { type Segment, type ShapeSpec, direct, downsample, resnet, resnetShapes, transformer2d, transformer2dShapes, upsample } from './blocks.js';
import type { UNetConfig } from './configs.js';
import { type Forward, conv2d, groupNorm, linear, silu, timestepEmbedding } from './layers.js';
import { type ParamTree, sub } from './params.js';
import { checkpoint, trainableIn } from '../runtime/memory.js';
import type { GeneratorState, TorchGenerator } from '../runtime/rng.js';

const hasAttn = (type: string) => type.startsWith('CrossAttn');

/** Every parameter key the model reads, with its torch shape. */
export function unetParamShapes(cfg: UNetConfig): ShapeSpec {
  const m: ShapeSpec = new Map();
  const ch = cfg.block_out_channels;
  const n = ch.length;
  const temb = ch[0] * 4;
  const tf2d = (prefix: string, c: number) =>
    transformer2dShapes(m, prefix, c, cfg.cross_attention_dim, cfg.use_linear_projection, cfg.transformer_layers_per_block);
  m.set('conv_in.weight', [ch[0], cfg.in_channels, 3, 3]);
  m.set('conv_in.bias', [ch[0]]);
  m.set('time_embedding.linear_1.weight', [temb, ch[0]]);
  m.set('time_embedding.linear_1.bias', [temb]);
  m.set('time_embedding.linear_2.weight', [temb, temb]);
  m.set('time_embedding.linear_2.bias', [temb]);
  for (let i = 0; i < n; i++) {
    const cin = i === 0 ? ch[0] : ch[i - 1];
    for (let j = 0; j < cfg.layers_per_block; j++) {
      resnetShapes(m, `down_blocks.${i}.resnets.${j}`, j === 0 ? cin : ch[i], ch[i], temb);
      if (hasAttn(cfg.down_block_types[i])) tf2d(`down_blocks.${i}.attentions.${j}`, ch[i]);
    }
    if (i < n - 1) {
      m.set(`down_blocks.${i}.downsamplers.0.conv.weight`, [ch[i], ch[i], 3, 3]);
      m.set(`down_blocks.${i}.downsamplers.0.conv.bias`, [ch[i]]);
    }
  }
  const cm = ch[n - 1];
  resnetShapes(m, 'mid_block.resnets.0', cm, cm, temb);
  tf2d('mid_block.attentions.0', cm);
  resnetShapes(m, 'mid_block.resnets.1', cm, cm, temb);
  const rc = [...ch].reverse();
  let prev = rc[0];
  for (let i = 0; i < n; i++) {
    const out = rc[i];
    const inp = rc[Math.min(i + 1, n - 1)];
    for (let j = 0; j <= cfg.layers_per_block; j++) {
      const skip = j === cfg.layers_per_block ? inp : out;
      resnetShapes(m, `up_blocks.${i}.resnets.${j}`, (j === 0 ? prev : out) + skip, out, temb);
      if (hasAttn(cfg.up_block_types[i])) tf2d(`up_blocks.${i}.attentions.${j}`, out);
    }
    if (i < n - 1) {
      m.set(`up_blocks.${i}.upsamplers.0.conv.weight`, [out, out, 3, 3]);
      m.set(`up_blocks.${i}.upsamplers.0.conv.bias`, [out]);
    }
    prev = out;
  }
  m.set('conv_norm_out.weight', [ch[0]]);
  m.set('conv_norm_out.bias', [ch[0]]);
  m.set('conv_out.weight', [cfg.out_channels, ch[0], 3, 3]);
  m.set('conv_out.bias', [cfg.out_channels]);
  return m;
}

/** A place the UNet can checkpoint: the block kind and its resolution level (0 = the latent's own size). */
export interface CheckpointSite {
  kind: 'resnet' | 'transformer' | 'downsample' | 'upsample' | 'head';
  level: number;
}

export interface UNetOptions extends Forward {
  // From Forward: `training` + `rng` turn on dropout (LoRA's `loraDropout`, a context adapter's own), drawn from
  // that generator in forward order; `context` adapts the context of every attention before to_k / to_v.
  /**
   * Recompute blocks in the backward pass instead of keeping their activations (diffusers'
   * enable_gradient_checkpointing, kohya --gradient_checkpointing). true = the sites of CHECKPOINT_DEFAULT, 'all' =
   * every resnet, transformer, sampler and the output stage (least memory, ~1.5x the step time), or a function
   * that picks the sites. Only acts while a gradient tape records; inference is unchanged.
   */
  gradientCheckpointing?: boolean | 'all' | ((site: CheckpointSite) => boolean);
}

/**
 * The sites `gradientCheckpointing: true` recomputes: the transformers, stage by stage (attention scores and the
 * 4-8x wide GEGLU activations make them the densest in memory per FLOP at every level), and the output stage.
 * Resnets and samplers are left alone: a resnet keeps ~1/channels bytes per FLOP and the upsamplers' 3x3 convs are
 * costly to redo and small to keep. On an SD v1 LoRA step this keeps most of the memory saving of 'all' at a
 * fraction of its extra time (numbers in the README).
 */
export const CHECKPOINT_DEFAULT = (s: CheckpointSite): boolean => s.kind === 'transformer' || s.kind === 'head';

/**
 * Predict noise (or v) for `sample` at `timesteps` (scalar or one per batch item) given text `context`.
 * Stages as diffusers: 1 time embedding, 2 conv_in, 3 down blocks (collecting skips), 4 mid block,
 * 5 up blocks (consuming skips), 6 norm-SiLU-conv_out.
 */
export function unet(
  params: ParamTree,
  cfg: UNetConfig,
  sample: tf.Tensor4D,
  timesteps: tf.Tensor | number,
  context: tf.Tensor3D,
  opts: UNetOptions = {},
): tf.Tensor4D {
  const gc = opts.gradientCheckpointing;
  const pick = gc === 'all' ? () => true : gc === true ? CHECKPOINT_DEFAULT : gc || (() => false);
  const f: Forward = { training: opts.training, rng: opts.rng, loraDropout: opts.loraDropout, context: opts.context };
  const gen = f.training ? f.rng : undefined;
  const recompute: Segment = (ps, fn, xs) => checkpoint(gen ? replayingDraws(fn, gen) : fn, xs, ps.flatMap(trainableIn));
  // how a site runs its segments: checkpointed (differentiating the trainables of their params sub-trees) when picked
  const seg = (site: CheckpointSite): Segment => (pick(site) ? recompute : direct);
  return tf.tidy(() => {
    const [b] = sample.shape;
    const n = cfg.block_out_channels.length;
    const ro = { groups: cfg.norm_num_groups, eps: cfg.norm_eps, f };
    const act = silu;
    // 1. time embedding
    const t0 = typeof timesteps === 'number' ? tf.scalar(timesteps, 'float32') : timesteps.toFloat();
    const t = tf.broadcastTo(t0.reshape([-1]), [b]);
    const tp = sub(params, 'time_embedding');
    const emb0 = timestepEmbedding(t as tf.Tensor1D, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift);
    const temb = linear(sub(tp, 'linear_2'), act(linear(sub(tp, 'linear_1'), emb0))) as tf.Tensor2D;
    // 2. conv_in
    let x = cfg.center_input_sample ? (tf.sub(tf.mul(sample, 2), 1) as tf.Tensor4D) : sample;
    x = conv2d(sub(params, 'conv_in'), x);
    const skips: tf.Tensor4D[] = [x];
    // 3. down blocks
    for (let i = 0; i < n; i++) {
      const bp = sub(params, 'down_blocks', i);
      for (let j = 0; j < cfg.layers_per_block; j++) {
        const rp = sub(bp, 'resnets', j);
        x = seg({ kind: 'resnet', level: i })([rp], (h, te) => resnet(rp, h, te, ro), [x, temb]);
        if (hasAttn(cfg.down_block_types[i])) {
          const ap = sub(bp, 'attentions', j);
          x = transformer2d(ap, x, context, cfg.heads[i], cfg.norm_num_groups, seg({ kind: 'transformer', level: i }), f);
        }
        skips.push(x);
      }
      if (i < n - 1) {
        const dp = sub(bp, 'downsamplers', 0);
        x = seg({ kind: 'downsample', level: i })([dp], (h) => downsample(dp, h, cfg.downsample_padding, f), [x]);
        skips.push(x);
      }
    }
    // 4. mid block
    const mp = sub(params, 'mid_block');
    const mo = { ...ro, outputScale: cfg.mid_block_scale_factor };
    const [mr0, ma, mr1] = [sub(mp, 'resnets', 0), sub(mp, 'attentions', 0), sub(mp, 'resnets', 1)];
    x = seg({ kind: 'resnet', level: n - 1 })([mr0], (h, te) => resnet(mr0, h, te, mo), [x, temb]);
    x = transformer2d(ma, x, context, cfg.heads[n - 1], cfg.norm_num_groups, seg({ kind: 'transformer', level: n - 1 }), f);
    x = seg({ kind: 'resnet', level: n - 1 })([mr1], (h, te) => resnet(mr1, h, te, mo), [x, temb]);
    // 5. up blocks
    const heads = [...cfg.heads].reverse();
    for (let i = 0; i < n; i++) {
      const bp = sub(params, 'up_blocks', i);
      for (let j = 0; j <= cfg.layers_per_block; j++) {
        const skip = skips.pop()!;
        const rp = sub(bp, 'resnets', j);
        // the concat is inside the block so that checkpointing keeps x and skip (alive anyway), not their concat
        x = seg({ kind: 'resnet', level: n - 1 - i })([rp], (h, s, te) => resnet(rp, tf.concat([h, s], 3), te, ro), [x, skip, temb]);
        if (hasAttn(cfg.up_block_types[i])) {
          const ap = sub(bp, 'attentions', j);
          x = transformer2d(ap, x, context, heads[i], cfg.norm_num_groups, seg({ kind: 'transformer', level: n - 1 - i }), f);
        }
      }
      if (i < n - 1) {
        // upsample to the next skip's size (differs from 2x only when the latent size is not a multiple of 2^levels)
        const next = skips[skips.length - 1];
        const size: [number, number] = [next.shape[1], next.shape[2]];
        const upP = sub(bp, 'upsamplers', 0);
        x = seg({ kind: 'upsample', level: n - 1 - i })([upP], (h) => upsample(upP, h, size, f), [x]);
      }
    }
    // 6. output
    const [normP, outP] = [sub(params, 'conv_norm_out'), sub(params, 'conv_out')];
    const head = (h: tf.Tensor4D) => tf.tidy(() => conv2d(outP, act(groupNorm(normP, h, cfg.norm_num_groups, cfg.norm_eps))));
    return seg({ kind: 'head', level: 0 })([normP, outP], head, [x]);
  });
}

/**
 * fn for a checkpointed segment that draws dropout masks: the recomputation in the backward pass replays the draws
 * of the forward (the generator is rewound to where the forward started, then put back), as torch.utils.checkpoint's
 * preserve_rng_state does, so that the gradient is that of the masks the forward used.
 */
function replayingDraws<A extends tf.Tensor[], T extends tf.Tensor>(fn: (...xs: A) => T, gen: TorchGenerator): (...xs: A) => T {
  let start: GeneratorState | undefined;
  return (...xs: A) => {
    if (!start) {
      start = gen.getState();
      return fn(...xs);
    }
    const after = gen.getState();
    gen.setState(start);
    try {
      return fn(...xs);
    } finally {
      gen.setState(after);
    }
  };
}
