/**
 * PNDM with skip_prk_steps = PLMS (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models"), as diffusers
 * PNDMScheduler.step_plms (spec §3): linear multistep on eps (Adams–Bashforth up to 4th order) with a Heun-like
 * warm-up that calls the model twice on the first interval, so the timestep list has N+1 entries.
 */
import * as tf from '@tensorflow/tfjs';
import { f32, sc, spacedTimesteps, type Schedule, type SamplerState, type StepResult } from './schedule.js';
import { acAt } from './ddim.js';

/** PNDM plms_timesteps: the ascending grid T, then T[0..N-2] ++ [T[N-2]] ++ [T[N-1]] reversed (second entry repeated). */
export function plmsTimesteps(s: Schedule, n: number): number[] {
  const c = s.config;
  const grid = spacedTimesteps(c.timestepSpacing, n, c.numTrainTimesteps, c.stepsOffset).reverse();
  return [...grid.slice(0, -1), ...grid.slice(-2, -1), ...grid.slice(-1)].reverse();
}

/** PNDMScheduler._get_prev_sample (formula (9) of the paper), converting a v / sample prediction to eps first. */
function prevSample(s: Schedule, x: tf.Tensor, t: number, tPrev: number, out: tf.Tensor): { prev: tf.Tensor; x0: tf.Tensor } {
  const a = s.alphasCumprod[t], b = acAt(s, tPrev);
  const betaProd = f32(1 - a), betaProdPrev = f32(1 - b);
  const sa = sc(Math.sqrt(a)), sb = sc(Math.sqrt(betaProd));
  const eps =
    s.config.predictionType === 'v_prediction' ? tf.add(tf.mul(sa, out), tf.mul(sb, x))
    : s.config.predictionType === 'sample' ? tf.div(tf.sub(x, tf.mul(sa, out)), sb)
    : out;
  const denom = f32(f32(a * f32(Math.sqrt(betaProdPrev))) + f32(Math.sqrt(f32(f32(a * betaProd) * b))));
  const prev = tf.sub(tf.mul(sc(Math.sqrt(f32(b / a))), x), tf.div(tf.mul(sc(b - a), eps), sc(denom)));
  return { prev, x0: tf.div(tf.sub(x, tf.mul(sb, eps)), sa) };
}

/**
 * One PLMS step at timestep t (stride r = num_train // N): exactly step_plms, with the counter = state.count. The
 * returned x0 (not part of diffusers' output) is derived from the combined eps at the step's start timestep.
 */
export function plmsStep(s: Schedule, state: SamplerState, modelOutput: tf.Tensor, t: number, r: number, x: tf.Tensor): StepResult {
  const counter = state.count;
  let tPrev = t - r, tt = t, sample = x, ets = [...state.history];
  let curSample = state.curSample;
  if (counter !== 1) ets = [...ets.slice(-3), modelOutput];
  else [tPrev, tt] = [t, t + r];
  const e = (k: number) => ets[ets.length - k];
  let combined: tf.Tensor;
  if (ets.length === 1 && counter === 0) {
    combined = modelOutput;
    curSample = x;
  } else if (ets.length === 1 && counter === 1) {
    combined = tf.div(tf.add(modelOutput, e(1)), 2);
    sample = state.curSample ?? x;
    curSample = undefined;
  } else if (ets.length === 2) combined = tf.div(tf.sub(tf.mul(e(1), 3), e(2)), 2);
  else if (ets.length === 3) combined = tf.div(tf.add(tf.sub(tf.mul(e(1), 23), tf.mul(e(2), 16)), tf.mul(e(3), 5)), 12);
  else
    combined = tf.mul(
      sc(1 / 24),
      tf.sub(tf.add(tf.sub(tf.mul(e(1), 55), tf.mul(e(2), 59)), tf.mul(e(3), 37)), tf.mul(e(4), 9)),
    );
  const { prev, x0 } = prevSample(s, sample, tt, tPrev, combined);
  return { prevSample: prev, predOriginal: x0, history: ets, curSample };
}
