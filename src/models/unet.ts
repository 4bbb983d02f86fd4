/**
 * UNet2DConditionModel (SD v1 family; SD 2-style linear projections and per-block heads) as a pure function.
 * NHWC activations: sample [B,H,W,in_channels], context [B,L,cross_attention_dim] -> [B,H,W,out_channels].
 */
import * as tf from '@tensorflow/tfjs';
import { type ShapeSpec, downsample, resnet, resnetShapes, transformer2d, transformer2dShapes, upsample } from './blocks.js';
import type { UNetConfig } from './configs.js';
import { conv2d, groupNorm, linear, silu, timestepEmbedding } from './layers.js';
import { type ParamTree, sub } from './params.js';

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

/**
 * Predict noise (or v) for `sample` at `timesteps` (scalar or one per batch item) given text `context`.
 * Stages as diffusers: 1 time embedding, 2 conv_in, 3 down blocks (collecting skips), 4 mid block,
 * 5 up blocks (consuming skips), 6 norm-SiLU-conv_out.
 */
export function unet(params: ParamTree, cfg: UNetConfig, sample: tf.Tensor4D, timesteps: tf.Tensor | number, context: tf.Tensor3D): tf.Tensor4D {
  return tf.tidy(() => {
    const [b] = sample.shape;
    const n = cfg.block_out_channels.length;
    const ro = { groups: cfg.norm_num_groups, eps: cfg.norm_eps };
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
        x = resnet(sub(bp, 'resnets', j), x, temb, ro);
        if (hasAttn(cfg.down_block_types[i])) x = transformer2d(sub(bp, 'attentions', j), x, context, cfg.heads[i], cfg.norm_num_groups);
        skips.push(x);
      }
      if (i < n - 1) {
        x = downsample(sub(bp, 'downsamplers', 0), x, cfg.downsample_padding);
        skips.push(x);
      }
    }
    // 4. mid block
    const mp = sub(params, 'mid_block');
    const mo = { ...ro, outputScale: cfg.mid_block_scale_factor };
    x = resnet(sub(mp, 'resnets', 0), x, temb, mo);
    x = transformer2d(sub(mp, 'attentions', 0), x, context, cfg.heads[n - 1], cfg.norm_num_groups);
    x = resnet(sub(mp, 'resnets', 1), x, temb, mo);
    // 5. up blocks
    const heads = [...cfg.heads].reverse();
    for (let i = 0; i < n; i++) {
      const bp = sub(params, 'up_blocks', i);
      for (let j = 0; j <= cfg.layers_per_block; j++) {
        const skip = skips.pop()!;
        x = resnet(sub(bp, 'resnets', j), tf.concat([x, skip], 3) as tf.Tensor4D, temb, ro);
        if (hasAttn(cfg.up_block_types[i])) x = transformer2d(sub(bp, 'attentions', j), x, context, heads[i], cfg.norm_num_groups);
      }
      if (i < n - 1) {
        // upsample to the next skip's size (differs from 2x only when the latent size is not a multiple of 2^levels)
        const next = skips[skips.length - 1];
        x = upsample(sub(bp, 'upsamplers', 0), x, [next.shape[1], next.shape[2]]);
      }
    }
    // 6. output
    return conv2d(sub(params, 'conv_out'), act(groupNorm(sub(params, 'conv_norm_out'), x, cfg.norm_num_groups, cfg.norm_eps)));
  });
}
