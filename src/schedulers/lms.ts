/**
 * k-LMS (linear multistep in sigma, order 4; Karras et al. 2022 / k-diffusion sample_lms), as diffusers
 * LMSDiscreteScheduler.step (spec §4). diffusers integrates the Lagrange basis polynomials with scipy quad; they
 * are cubics at most, so 2-point Gauss–Legendre quadrature gives the integral exactly in closed form.
 */
import * as tf from '@tensorflow/tfjs';
import type { SamplerPlan, SamplerState, StepResult } from './schedule.js';
import { sigmaX0 } from './euler.js';

/** ∫_{σ_k}^{σ_{k+1}} Π_{m<order, m≠j} (τ − σ_{k−m}) / (σ_{k−j} − σ_{k−m}) dτ (get_lms_coefficient). */
export function lmsCoefficient(sigmas: ArrayLike<number>, order: number, k: number, j: number): number {
  const basis = (tau: number) => {
    let p = 1;
    for (let m = 0; m < order; m++) if (m !== j) p *= (tau - sigmas[k - m]) / (sigmas[k - j] - sigmas[k - m]);
    return p;
  };
  const a = sigmas[k], b = sigmas[k + 1], mid = (a + b) / 2, half = (b - a) / 2, off = half / Math.sqrt(3);
  return half * (basis(mid - off) + basis(mid + off)); // exact for degree <= 3
}

/** One LMS step at loop index i: store d = (x − x0)/σ (last 4 kept), x + Σ_j c_j·d_{newest−j}. */
export function lmsStep(plan: SamplerPlan, state: SamplerState, modelOutput: tf.Tensor, i: number, x: tf.Tensor): StepResult {
  const sigmas = plan.fullSigmas!, k = plan.begin + i, sigma = sigmas[k];
  const x0 = sigmaX0(plan.schedule.config.predictionType, sigma, modelOutput, x);
  const history = [...state.history, tf.div(tf.sub(x, x0), sigma)].slice(-4);
  const order = Math.min(k + 1, 4);
  // diffusers zips the order coefficients with the stored derivatives (fewer right after an img2img truncation)
  let sum: tf.Tensor | undefined;
  for (let j = 0; j < Math.min(order, history.length); j++) {
    const term = tf.mul(lmsCoefficient(sigmas, order, k, j), history[history.length - 1 - j]);
    sum = sum ? tf.add(sum, term) : term;
  }
  return { prevSample: tf.add(x, sum!), predOriginal: x0, history };
}
