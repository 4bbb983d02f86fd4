/**
 * DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models"), as diffusers DDIMScheduler.step (spec §2):
 * deterministic for eta = 0; eta > 0 adds sigma_t-scaled fresh noise. Also the epsilon / v / sample -> (x0, eps)
 * conversion that DDIM and DDPM share.
 */
import * as tf from '@tensorflow/tfjs';
import { f32, sc, drawNoise, type NoiseFn, type Schedule } from './schedule.js';

/** (x0, eps) from a model output at alphas_cumprod `a` (DDIMScheduler/DDPMScheduler prediction_type branches, clip_sample). */
export function x0AndEps(s: Schedule, modelOutput: tf.Tensor, x: tf.Tensor, a: number): { x0: tf.Tensor; eps: tf.Tensor } {
  const sa = sc(Math.sqrt(a)), sb = sc(Math.sqrt(f32(1 - a)));
  let x0: tf.Tensor, eps: tf.Tensor;
  switch (s.config.predictionType) {
    case 'epsilon':
      x0 = tf.div(tf.sub(x, tf.mul(sb, modelOutput)), sa);
      eps = modelOutput;
      break;
    case 'sample':
      x0 = modelOutput;
      eps = tf.div(tf.sub(x, tf.mul(sa, x0)), sb);
      break;
    case 'v_prediction':
      x0 = tf.sub(tf.mul(sa, x), tf.mul(sb, modelOutput));
      eps = tf.add(tf.mul(sa, modelOutput), tf.mul(sb, x));
      break;
  }
  if (s.config.clipSample) x0 = tf.clipByValue(x0, -s.config.clipSampleRange, s.config.clipSampleRange);
  return { x0, eps };
}

/** alphas_cumprod at a timestep, or the value "before" t = 0 (set_alpha_to_one ? 1 : ac[0]; diffusers final_alpha_cumprod). */
export const acAt = (s: Schedule, t: number, final = s.config.setAlphaToOne ? 1 : s.alphasCumprod[0]) =>
  t >= 0 ? s.alphasCumprod[t] : final;

/** One DDIM step from train timestep t to tPrev (DDIMScheduler.step, use_clipped_model_output false). Call inside tf.tidy. */
export function ddimStep(
  s: Schedule, modelOutput: tf.Tensor, t: number, tPrev: number, x: tf.Tensor, opts: { eta?: number; noise?: NoiseFn } = {},
): { prevSample: tf.Tensor; predOriginal: tf.Tensor } {
  const eta = opts.eta ?? 0;
  const a = s.alphasCumprod[t], ap = acAt(s, tPrev);
  const { x0, eps } = x0AndEps(s, modelOutput, x, a);
  const variance = f32(f32(f32(1 - ap) / f32(1 - a)) * f32(1 - f32(a / ap)));
  const std = f32(eta * f32(Math.sqrt(variance)));
  const direction = tf.mul(sc(Math.sqrt(f32(f32(1 - ap) - f32(std * std)))), eps);
  let prev = tf.add(tf.mul(sc(Math.sqrt(ap)), x0), direction);
  if (eta > 0) prev = tf.add(prev, tf.mul(sc(std), drawNoise(opts.noise, x, 'DDIM with eta > 0')));
  return { prevSample: prev, predOriginal: x0 };
}
