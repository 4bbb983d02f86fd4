/**
 * DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", multistep second order on data predictions), as diffusers
 * DPMSolverMultistepScheduler with algorithm_type dpmsolver++, solver_order 2 (spec §7): timesteps, sigmas
 * (optionally Karras), the x0 conversion, first- and second-order updates, lower_order_final / final sigma zero.
 */
import * as tf from '@tensorflow/tfjs';
import {
  f32, sc, karrasSigmas, npArange, npLinspace, roundHalfEven, sigmaToT,
  type SamplerPlan, type SamplerState, type Schedule, type StepResult,
} from './schedule.js';

/** DPMSolverMultistepScheduler.set_timesteps (lambda_min_clipped = −inf): integer timesteps and sigmas (+ final). */
export function dpmSchedule(s: Schedule, n: number): { timesteps: Float32Array; sigmas: Float32Array } {
  const c = s.config, T = c.numTrainTimesteps;
  let ts: number[];
  if (c.timestepSpacing === 'linspace') ts = npLinspace(0, T - 1, n + 1).map(roundHalfEven).reverse().slice(0, -1);
  else if (c.timestepSpacing === 'leading') {
    const r = Math.floor(T / (n + 1));
    ts = Array.from({ length: n }, (_, k) => (n - k) * r + c.stepsOffset);
  } else ts = npArange(T, 0, -T / n).map((t) => roundHalfEven(t) - 1);
  let sig: number[];
  if (c.useKarrasSigmas) {
    sig = karrasSigmas(s.sigmaTable[0], s.sigmaTable[T - 1], n);
    // rounded for every schedule but squaredcos_cap_v2, whose float timesteps the int64 cast truncates
    ts = sig.map((x) => (c.betaSchedule === 'squaredcos_cap_v2' ? Math.trunc : roundHalfEven)(sigmaToT(s, x)));
  } else sig = ts.map((t) => s.sigmaTable[t]);
  const last = c.finalSigmasType === 'zero' ? 0 : s.sigmaTable[0];
  return { timesteps: Float32Array.from(ts), sigmas: Float32Array.from([...sig, last]) };
}

/** VP coefficients of a k-diffusion sigma: alpha_t = 1/√(σ²+1), sigma_t = σ·alpha_t, lambda = ln alpha_t − ln sigma_t. */
function vp(sigma: number) {
  const alpha = f32(1 / f32(Math.sqrt(f32(f32(sigma * sigma) + 1)))), sig = f32(sigma * alpha);
  return { alpha, sigma: sig, lambda: f32(f32(Math.log(alpha)) - f32(Math.log(sig))) };
}

/** One DPM-Solver++ step at loop index i (convert_model_output, then the first- or second-order multistep update). */
export function dpmppStep(plan: SamplerPlan, state: SamplerState, modelOutput: tf.Tensor, i: number, x: tf.Tensor): StepResult {
  const c = plan.schedule.config, sigmas = plan.fullSigmas!, k = plan.begin + i, n = plan.fullTimesteps.length;
  const s0 = vp(sigmas[k]), t = vp(sigmas[k + 1]);
  const x0 =
    c.predictionType === 'epsilon' ? tf.div(tf.sub(x, tf.mul(sc(s0.sigma), modelOutput)), sc(s0.alpha))
    : c.predictionType === 'v_prediction' ? tf.sub(tf.mul(sc(s0.alpha), x), tf.mul(sc(s0.sigma), modelOutput))
    : modelOutput;
  const history = [...state.history.slice(-1), x0];
  const lowerOrderFinal = k === n - 1 && (c.eulerAtFinal || (c.lowerOrderFinal && n < 15) || c.finalSigmasType === 'zero');
  const h = f32(t.lambda - s0.lambda), em1 = f32(f32(Math.exp(-h)) - 1);
  // x_t = (sigma_t/sigma_s)·x − alpha_t(e^{−h} − 1)·D0 [+ the D1 term]; with sigma_{k+1} = 0 this is x0
  let prev = tf.sub(tf.mul(sc(t.sigma / s0.sigma), x), tf.mul(sc(t.alpha * em1), x0));
  if (state.count > 0 && !lowerOrderFinal) {
    const s1 = vp(sigmas[k - 1]);
    const r0 = f32(f32(s0.lambda - s1.lambda) / h);
    const d1 = tf.mul(sc(1 / r0), tf.sub(x0, history[0]));
    prev = c.solverType === 'midpoint'
      ? tf.sub(prev, tf.mul(sc(0.5 * f32(t.alpha * em1)), d1))
      : tf.add(prev, tf.mul(sc(t.alpha * f32(f32(em1 / h) + 1)), d1));
  }
  return { prevSample: prev, predOriginal: x0, history };
}
