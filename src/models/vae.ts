/**
 * AutoencoderKL (SD VAE) as pure functions: encode an image in [-1,1] to the latent distribution, decode latents
 * to an image. NHWC. Latent scaling (x scaling_factor) is the pipelines' business, not the VAE's.
 */
import * as tf from '@tensorflow/tfjs';
import { type ShapeSpec, attnShapes, downsample, resnet, resnetShapes, upsample } from './blocks.js';
import type { VaeConfig } from './configs.js';
import { attention, conv2d, groupNorm, linear, silu } from './layers.js';
import { type ParamTree, sub } from './params.js';

const VAE_EPS = 1e-6;

function midShapes(m: ShapeSpec, prefix: string, c: number, withAttn: boolean): void {
  resnetShapes(m, `${prefix}.resnets.0`, c, c, 0);
  if (withAttn) {
    m.set(`${prefix}.attentions.0.group_norm.weight`, [c]);
    m.set(`${prefix}.attentions.0.group_norm.bias`, [c]);
    attnShapes(m, `${prefix}.attentions.0`, c, c, true);
  }
  resnetShapes(m, `${prefix}.resnets.1`, c, c, 0);
}

/** Every parameter key the model reads, with its torch shape. */
export function vaeParamShapes(cfg: VaeConfig): ShapeSpec {
  const m: ShapeSpec = new Map();
  const ch = cfg.block_out_channels;
  const n = ch.length;
  const top = ch[n - 1];
  const lat = cfg.latent_channels;
  const conv = (k: string, o: number, i: number, s = 3) => {
    m.set(`${k}.weight`, [o, i, s, s]);
    m.set(`${k}.bias`, [o]);
  };
  const norm = (k: string, c: number) => {
    m.set(`${k}.weight`, [c]);
    m.set(`${k}.bias`, [c]);
  };
  // encoder
  conv('encoder.conv_in', ch[0], cfg.in_channels);
  for (let i = 0; i < n; i++) {
    for (let j = 0; j < cfg.layers_per_block; j++) {
      resnetShapes(m, `encoder.down_blocks.${i}.resnets.${j}`, j === 0 ? (i === 0 ? ch[0] : ch[i - 1]) : ch[i], ch[i], 0);
    }
    if (i < n - 1) conv(`encoder.down_blocks.${i}.downsamplers.0.conv`, ch[i], ch[i]);
  }
  midShapes(m, 'encoder.mid_block', top, cfg.mid_block_add_attention);
  norm('encoder.conv_norm_out', top);
  conv('encoder.conv_out', 2 * lat, top);
  if (cfg.use_quant_conv) conv('quant_conv', 2 * lat, 2 * lat, 1);
  // decoder
  if (cfg.use_post_quant_conv) conv('post_quant_conv', lat, lat, 1);
  conv('decoder.conv_in', top, lat);
  midShapes(m, 'decoder.mid_block', top, cfg.mid_block_add_attention);
  const rc = [...ch].reverse();
  let prev = rc[0];
  for (let i = 0; i < n; i++) {
    for (let j = 0; j <= cfg.layers_per_block; j++) resnetShapes(m, `decoder.up_blocks.${i}.resnets.${j}`, j === 0 ? prev : rc[i], rc[i], 0);
    if (i < n - 1) conv(`decoder.up_blocks.${i}.upsamplers.0.conv`, rc[i], rc[i]);
    prev = rc[i];
  }
  norm('decoder.conv_norm_out', ch[0]);
  conv('decoder.conv_out', cfg.out_channels, ch[0]);
  return m;
}

/** UNetMidBlock2D of the VAE: resnet, single-head self-attention with its own GroupNorm, resnet. */
function midBlock(p: ParamTree, x: tf.Tensor4D, cfg: VaeConfig): tf.Tensor4D {
  const ro = { groups: cfg.norm_num_groups, eps: VAE_EPS };
  x = resnet(sub(p, 'resnets', 0), x, undefined, ro);
  if (cfg.mid_block_add_attention) {
    const prev = x;
    x = tf.tidy(() => {
      const a = sub(p, 'attentions', 0);
      const [b, h, w, c] = prev.shape;
      const hs = groupNorm(sub(a, 'group_norm'), prev, cfg.norm_num_groups, VAE_EPS).reshape([b, h * w, c]) as tf.Tensor3D;
      const q = linear(sub(a, 'to_q'), hs) as tf.Tensor3D;
      const k = linear(sub(a, 'to_k'), hs) as tf.Tensor3D;
      const v = linear(sub(a, 'to_v'), hs) as tf.Tensor3D;
      const o = linear(sub(a, 'to_out', 0), attention(q, k, v, 1));
      return tf.add(o.reshape([b, h, w, c]), prev) as tf.Tensor4D;
    });
  }
  return resnet(sub(p, 'resnets', 1), x, undefined, ro);
}

export interface LatentDist {
  mean: tf.Tensor4D;
  logvar: tf.Tensor4D;
  std: tf.Tensor4D;
}

/** Encoder + quant_conv: image [B,H,W,3] in [-1,1] -> diagonal Gaussian over latents [B,H/8,W/8,latent]. */
export function vaeEncode(params: ParamTree, cfg: VaeConfig, image: tf.Tensor4D): LatentDist {
  return tf.tidy(() => {
    const e = sub(params, 'encoder');
    const n = cfg.block_out_channels.length;
    const ro = { groups: cfg.norm_num_groups, eps: VAE_EPS };
    let x = conv2d(sub(e, 'conv_in'), image);
    for (let i = 0; i < n; i++) {
      const bp = sub(e, 'down_blocks', i);
      for (let j = 0; j < cfg.layers_per_block; j++) x = resnet(sub(bp, 'resnets', j), x, undefined, ro);
      if (i < n - 1) x = downsample(sub(bp, 'downsamplers', 0), x, [0, 1, 0, 1]); // asymmetric: right/bottom only
    }
    x = midBlock(sub(e, 'mid_block'), x, cfg);
    x = conv2d(sub(e, 'conv_out'), silu(groupNorm(sub(e, 'conv_norm_out'), x, cfg.norm_num_groups, VAE_EPS)));
    if (cfg.use_quant_conv) x = conv2d(sub(params, 'quant_conv'), x);
    const [mean, rawLogvar] = tf.split(x, 2, 3) as [tf.Tensor4D, tf.Tensor4D];
    const logvar = tf.clipByValue(rawLogvar, -30, 20) as tf.Tensor4D;
    return { mean, logvar, std: tf.exp(tf.mul(logvar, 0.5)) as tf.Tensor4D };
  });
}

/** post_quant_conv + decoder: latents [B,h,w,latent] (unscaled) -> image [B,8h,8w,3], nominally [-1,1]. */
export function vaeDecode(params: ParamTree, cfg: VaeConfig, latents: tf.Tensor4D): tf.Tensor4D {
  return tf.tidy(() => {
    const d = sub(params, 'decoder');
    const n = cfg.block_out_channels.length;
    const ro = { groups: cfg.norm_num_groups, eps: VAE_EPS };
    let x = cfg.use_post_quant_conv ? conv2d(sub(params, 'post_quant_conv'), latents) : latents;
    x = conv2d(sub(d, 'conv_in'), x);
    x = midBlock(sub(d, 'mid_block'), x, cfg);
    for (let i = 0; i < n; i++) {
      const bp = sub(d, 'up_blocks', i);
      for (let j = 0; j <= cfg.layers_per_block; j++) x = resnet(sub(bp, 'resnets', j), x, undefined, ro);
      if (i < n - 1) x = upsample(sub(bp, 'upsamplers', 0), x);
    }
    return conv2d(sub(d, 'conv_out'), silu(groupNorm(sub(d, 'conv_norm_out'), x, cfg.norm_num_groups, VAE_EPS)));
  });
}
