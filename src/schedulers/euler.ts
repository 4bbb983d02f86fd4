/**
 * Euler and Euler ancestral (Karras et al. 2022, Algorithm 1 with s_churn = 0; k-diffusion sample_euler_ancestral),
 * as diffusers EulerDiscreteScheduler / EulerAncestralDiscreteScheduler.step (spec §5, §6). Also the k-diffusion
 * x0 conversion that LMS shares.
 */
import * as tf from '@tensorflow/tfjs';
import { f32, sc, drawNoise, type NoiseFn, type PredictionType } from './schedule.js';

/** x0 from a model output at sigma (k-diffusion classes: eps: x − σ·out; v: out·(−σ/√(σ²+1)) + x/(σ²+1); sample: out). */
export function sigmaX0(pred: PredictionType, sigma: number, modelOutput: tf.Tensor, x: tf.Tensor): tf.Tensor {
  if (pred === 'epsilon') return tf.sub(x, tf.mul(sc(sigma), modelOutput));
  if (pred === 'sample') return modelOutput;
  const s2p1 = f32(f32(sigma * sigma) + 1);
  return tf.add(tf.mul(modelOutput, sc(-sigma / f32(Math.sqrt(s2p1)))), tf.div(x, sc(s2p1)));
}

/** One Euler step from sigma to sigmaNext: x + d·(σ_next − σ) with d = (x − x0)/σ. */
export function eulerStep(pred: PredictionType, sigma: number, sigmaNext: number, modelOutput: tf.Tensor, x: tf.Tensor) {
  const x0 = sigmaX0(pred, sigma, modelOutput, x);
  const d = tf.div(tf.sub(x, x0), sc(sigma));
  return { prevSample: tf.add(x, tf.mul(d, sc(sigmaNext - sigma))), predOriginal: x0 };
}

/** One Euler ancestral step: deterministic move to σ_down, then fresh noise of std σ_up (drawn on every step, incl. the last). */
export function eulerAncestralStep(
  pred: PredictionType, sigmaFrom: number, sigmaTo: number, modelOutput: tf.Tensor, x: tf.Tensor, noise?: NoiseFn,
) {
  const from2 = f32(sigmaFrom * sigmaFrom), to2 = f32(sigmaTo * sigmaTo);
  const up = f32(Math.sqrt(f32(f32(to2 * f32(from2 - to2)) / from2)));
  const down = f32(Math.sqrt(Math.max(0, f32(to2 - f32(up * up)))));
  const x0 = sigmaX0(pred, sigmaFrom, modelOutput, x);
  const d = tf.div(tf.sub(x, x0), sc(sigmaFrom));
  const prev = tf.add(x, tf.mul(d, sc(down - sigmaFrom)));
  return { prevSample: tf.add(prev, tf.mul(drawNoise(noise, x, 'Euler ancestral'), sc(up))), predOriginal: x0 };
}
