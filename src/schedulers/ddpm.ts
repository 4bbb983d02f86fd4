/**
 * DDPM ancestral sampling (Ho et al. 2020), as diffusers DDPMScheduler.step (spec §8): posterior mean of
 * q(x_{t-1} | x_t, x0) plus fixed variance noise (fixed_small default; fixed_small_log, fixed_large).
 */
import * as tf from '@tensorflow/tfjs';
import { f32, sc, drawNoise, type NoiseFn, type Schedule } from './schedule.js';
import { acAt, x0AndEps } from './ddim.js';

/** One DDPM step from t to tPrev (the next entry of the timesteps, −1 after the last); noise is drawn only when t > 0. */
export function ddpmStep(
  s: Schedule, modelOutput: tf.Tensor, t: number, tPrev: number, x: tf.Tensor, noise?: NoiseFn,
): { prevSample: tf.Tensor; predOriginal: tf.Tensor } {
  const a = s.alphasCumprod[t], b = acAt(s, tPrev, 1);
  const betaProd = f32(1 - a), betaProdPrev = f32(1 - b), curAlpha = f32(a / b), curBeta = f32(1 - curAlpha);
  const { x0 } = x0AndEps(s, modelOutput, x, a);
  const c0 = f32(f32(f32(Math.sqrt(b)) * curBeta) / betaProd);
  const c1 = f32(f32(f32(Math.sqrt(curAlpha)) * betaProdPrev) / betaProd);
  let prev = tf.add(tf.mul(sc(c0), x0), tf.mul(sc(c1), x));
  if (t > 0) {
    const variance = Math.max(f32(f32(betaProdPrev / betaProd) * curBeta), f32(1e-20));
    const std =
      s.config.varianceType === 'fixed_large' ? Math.sqrt(curBeta)
      : s.config.varianceType === 'fixed_small_log' ? Math.exp(f32(0.5 * f32(Math.log(variance))))
      : Math.sqrt(variance);
    prev = tf.add(prev, tf.mul(sc(std), drawNoise(noise, x, 'DDPM')));
  }
  return { prevSample: prev, predOriginal: x0 };
}
